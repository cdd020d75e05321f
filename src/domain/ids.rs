//! The deterministic `_id` of a record created from one CSV line.
//!
//! Idempotency without a secondary index: the record's `_id` is a function
//! of `(queue_id, line)`, so a replay of any part of a file regenerates the
//! same ids and the `_id` index (which every collection has anyway) refuses
//! the second copy. A secondary unique index on `import.{queue_id, line}`
//! costs ~40 % of insert throughput on the target server (STACK.md); this
//! costs nothing.
//!
//! Layout of the 12 bytes, chosen to stay a well-formed, sortable ObjectId:
//! - bytes 0..4: the queue id's timestamp (so ids sort with the import);
//! - bytes 4..8: a 32-bit hash of the whole queue id, which makes the id
//!   space of one import distinct from every other import's;
//! - bytes 8..12: the line number, big-endian `u32`.
//!
//! All records of one import therefore lie in one contiguous `_id` range
//! ([`deal_id_range`]) that holds nothing else but by chance, and support can
//! compute a line's record id from `(queue_id, line)`.
//!
//! An ordinary ObjectId (timestamp, 5 random bytes per process, 3-byte
//! counter) equals one of ours only if it was made in the same second as the
//! queue document by a process whose random bytes start with our hash and
//! whose fifth random byte equals our line's top byte: about 2⁻⁴⁰ per
//! process-second. The writer still checks, on a duplicate key, that the
//! stored record is really this import's line before it counts the line as
//! already imported.

use bson::oid::ObjectId;

use super::LineNo;

/// Largest line number a deterministic id can carry.
pub const MAX_LINE: LineNo = u32::MAX as LineNo;

fn queue_hash(queue_id: &ObjectId) -> [u8; 4] {
    // FNV-1a, 32 bit: stable across versions and platforms (unlike
    // std's hasher), which the ids must be forever.
    let mut h: u32 = 0x811c_9dc5;
    for b in queue_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_be_bytes()
}

/// The `_id` of the record created from `line` of import `queue_id`.
///
/// Returns `None` for lines past [`MAX_LINE`] (only a file of over 4 GiB
/// can reach one): its writer refuses the batch (`LineOutOfRange`, not
/// retried) and the import ends `too_many_attempts` naming the line.
pub fn deal_id(queue_id: &ObjectId, line: LineNo) -> Option<ObjectId> {
    let line = u32::try_from(line).ok()?;
    let q = queue_id.bytes();
    let h = queue_hash(queue_id);
    let l = line.to_be_bytes();
    Some(ObjectId::from_bytes([
        q[0], q[1], q[2], q[3], h[0], h[1], h[2], h[3], l[0], l[1], l[2], l[3],
    ]))
}

/// Id of the contact an import creates for the first line naming it: the
/// scheme of [`deal_id`], in the `contacts` collection.
pub fn contact_id(queue_id: &ObjectId, line: LineNo) -> Option<ObjectId> {
    deal_id(queue_id, line)
}

/// A second deterministic contact id for `(queue_id, line)`, used when
/// [`contact_id`] is already taken (the contact that line created was
/// since given another email): a replay derives it again, so it still
/// recognises the contact as its own. Outside the import's `_id` range.
pub fn contact_fallback_id(queue_id: &ObjectId, line: LineNo) -> Option<ObjectId> {
    let mut b = contact_id(queue_id, line)?.bytes();
    for x in &mut b[4..8] {
        *x = !*x;
    }
    Some(ObjectId::from_bytes(b))
}

/// Inclusive `_id` range holding every record id of import `queue_id`.
pub fn deal_id_range(queue_id: &ObjectId) -> (ObjectId, ObjectId) {
    let q = queue_id.bytes();
    let h = queue_hash(queue_id);
    let lo = [q[0], q[1], q[2], q[3], h[0], h[1], h[2], h[3], 0, 0, 0, 0];
    let mut hi = lo;
    hi[8..].copy_from_slice(&[0xff; 4]);
    (ObjectId::from_bytes(lo), ObjectId::from_bytes(hi))
}

/// The line whose record id `id` is, if `id` is in `queue_id`'s range.
pub fn line_of_deal_id(queue_id: &ObjectId, id: &ObjectId) -> Option<LineNo> {
    let (lo, _) = deal_id_range(queue_id);
    let (lo, id) = (lo.bytes(), id.bytes());
    (lo[..8] == id[..8]).then(|| u64::from(u32::from_be_bytes([id[8], id[9], id[10], id[11]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fallback_contact_id_is_stable_and_outside_the_range() {
        let q = ObjectId::new();
        let f = contact_fallback_id(&q, 9).unwrap();
        assert_eq!(Some(f), contact_fallback_id(&q, 9));
        assert_ne!(Some(f), contact_id(&q, 9));
        assert_eq!(line_of_deal_id(&q, &f), None);
    }

    #[test]
    fn ids_are_deterministic_and_distinct_per_line() {
        let q = ObjectId::new();
        assert_eq!(deal_id(&q, 2), deal_id(&q, 2));
        assert_ne!(deal_id(&q, 2), deal_id(&q, 3));
        assert_eq!(deal_id(&q, MAX_LINE + 1), None);
    }

    #[test]
    fn ids_keep_the_queue_timestamp() {
        let q = ObjectId::new();
        let id = deal_id(&q, 7).unwrap();
        assert_eq!(id.timestamp(), q.timestamp());
    }

    proptest! {
        #[test]
        fn line_round_trips_and_stays_in_range(bytes in any::<[u8; 12]>(), line in 0u64..=MAX_LINE) {
            let q = ObjectId::from_bytes(bytes);
            let id = deal_id(&q, line).unwrap();
            prop_assert_eq!(line_of_deal_id(&q, &id), Some(line));
            let (lo, hi) = deal_id_range(&q);
            prop_assert!(lo <= id && id <= hi);
        }

        #[test]
        fn other_imports_do_not_share_ids(a in any::<[u8; 12]>(), b in any::<[u8; 12]>(), line in 0u64..1_000_000) {
            prop_assume!(a != b);
            let (qa, qb) = (ObjectId::from_bytes(a), ObjectId::from_bytes(b));
            // Same timestamp and same hash would be needed for a clash; the
            // ids of b are never read back as lines of a unless both match.
            let id = deal_id(&qb, line).unwrap();
            if line_of_deal_id(&qa, &id).is_some() {
                prop_assert_eq!(&a[..4], &b[..4]);
                prop_assert_eq!(queue_hash(&qa), queue_hash(&qb));
            }
        }
    }
}
