//! What an update changed, kept so that an undo can put it back
//! (`import_befores`).
//!
//! Before an `update` import's statement changes an existing record, the
//! values it is about to overwrite are stored: for each field its `$set`
//! names (and the record's `last_imports`, which it pushes onto), the value
//! the record has, or the field's name among those it lacks. One document
//! per updated line, `_id = domain::deal_id(queue_id, line)` (its own
//! collection, so the ids do not meet the deals'): a replayed batch finds
//! its lines stored and keeps the first image, taken before any of its
//! writes, however often the batch runs.
//!
//! Fields are stored as `{f, v}` pairs, not as a document: their paths
//! (`additional_info.<id>`) hold dots, which stored field names should not.

use bson::oid::ObjectId;
use bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::Collection;

use super::{Error, Result, insert_unordered};
use crate::domain::{LineNo, deal_id};

/// The collection of before images.
pub const COLLECTION: &str = "import_befores";

/// The field an update pushes onto rather than sets.
const TRAIL: &str = "last_imports";

/// The value at dotted `path` of `record` (pure).
fn at_path<'a>(record: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut value = record.get(parts.next()?)?;
    for part in parts {
        value = value.as_document()?.get(part)?;
    }
    Some(value)
}

/// Sets `path` (dotted) of `record` to `value`, making the documents on
/// the way (pure).
fn set_path(record: &mut Document, path: &str, value: Bson) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut at = record;
    for part in parts {
        if !matches!(at.get(part), Some(Bson::Document(_))) {
            at.insert(part, Document::new());
        }
        let Some(Bson::Document(inner)) = at.get_mut(part) else {
            return;
        };
        at = inner;
    }
    at.insert(last, value);
}

/// Removes `path` (dotted) from `record`, if there (pure).
fn remove_path(record: &mut Document, path: &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut at = record;
    for part in parts {
        let Some(Bson::Document(inner)) = at.get_mut(part) else {
            return;
        };
        at = inner;
    }
    at.remove(last);
}

/// The fields an update statement's `$set` writes, and the trail it pushes
/// onto (pure).
pub fn changed_fields(set: &bson::RawDocument) -> Vec<String> {
    let mut fields: Vec<String> = set
        .iter()
        .filter_map(|e| e.ok().map(|(k, _)| k.to_owned()))
        .collect();
    if !fields.iter().any(|f| f == TRAIL) {
        fields.push(TRAIL.to_owned());
    }
    fields
}

/// The before image of line `line` of import `queue_id`, whose update's
/// `$set` is `set`, of `record_id` (as read now: `record`) (pure): the
/// values of the fields it changes, the fields it adds (a field inside a
/// document the record lacks counts as that document: unset whole on
/// undo, no empty one left), and the `updated_at` it writes, which tells
/// on undo that nobody wrote the record since. `None` past the largest
/// line number.
pub fn image(
    queue_id: ObjectId,
    line: LineNo,
    record_id: ObjectId,
    record: &Document,
    set: &bson::RawDocument,
) -> Option<Document> {
    let mut before = Vec::new();
    let mut absent: Vec<String> = Vec::new();
    for f in changed_fields(set) {
        if let Some(v) = at_path(record, &f) {
            before.push(Bson::Document(doc! { "f": &f, "v": v.clone() }));
            continue;
        }
        let top = f.split('.').next().unwrap_or(&f);
        let missing = if record.contains_key(top) {
            f.as_str()
        } else {
            top
        };
        if !absent.iter().any(|a| a == missing) {
            absent.push(missing.to_owned());
        }
    }
    let mut image = doc! {
        "_id": deal_id(&queue_id, line)?,
        "queue_id": queue_id,
        "line": line as i64,
        "record_id": record_id,
        "before": before,
        "absent": absent,
    };
    if let Ok(written) = set.get_datetime("updated_at") {
        image.insert("written_at", written);
    }
    Some(image)
}

/// The filter that finds `image`'s record only as its line left it (pure):
/// the last to write it is that line of that import, at that time (a CRM
/// edit that sets `updated_at`, or another import, since makes it miss).
pub fn guard(image: &Document) -> Option<Document> {
    let mut guard = doc! {
        "_id": image.get_object_id("record_id").ok()?,
        "last_import.queue_id": image.get_object_id("queue_id").ok()?,
        "last_import.line": image.get_i64("line").ok()?,
    };
    if let Ok(written) = image.get_datetime("written_at") {
        guard.insert("updated_at", *written);
    }
    Some(guard)
}

/// Whether `record` is as `image`'s line left it (pure): each equality of
/// [`guard`] evaluated here as the server evaluates it (numbers equal
/// whatever their type), so the two cannot drift apart.
pub fn guard_matches(record: &Document, image: &Document) -> bool {
    guard(image).is_some_and(|guard| {
        guard
            .iter()
            .all(|(path, wanted)| at_path(record, path).is_some_and(|v| query_eq(v, wanted)))
    })
}

/// Equality as a query's `{path: value}` compares (pure): numbers by value
/// across `int32`, `int64` and `double`; anything else by type and value.
fn query_eq(a: &Bson, b: &Bson) -> bool {
    let number = |v: &Bson| match v {
        Bson::Int64(n) => Some(*n as f64),
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Double(n) => Some(*n),
        _ => None,
    };
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The fields `image` puts back with their values (`before`) (pure).
fn before_values(image: &Document) -> impl Iterator<Item = (&str, &Bson)> {
    image
        .get_array("before")
        .into_iter()
        .flatten()
        .filter_map(Bson::as_document)
        .filter_map(|pair| Some((pair.get_str("f").ok()?, pair.get("v")?)))
}

/// The fields `image` removes, which the record lacked (`absent`) (pure).
fn absent_fields(image: &Document) -> impl Iterator<Item = &str> {
    image
        .get_array("absent")
        .into_iter()
        .flatten()
        .filter_map(Bson::as_str)
}

/// `record` as [`restore`] of `image` leaves it (pure).
pub fn put_back(record: &mut Document, image: &Document) {
    for (f, v) in before_values(image) {
        set_path(record, f, v.clone());
    }
    for f in absent_fields(image) {
        remove_path(record, f);
    }
}

/// Whether `record` holds what `image` would put back (pure): an undo that
/// stopped right after putting it back, before recording so.
pub fn holds(record: &Document, image: &Document) -> bool {
    before_values(image).all(|(f, v)| at_path(record, f) == Some(v))
        && absent_fields(image).all(|f| at_path(record, f).is_none())
}

/// Deletes every image of import `queue_id` (idempotent): once its undo
/// has put them back, or its retention ended.
pub async fn delete_all(db: &mongodb::Database, queue_id: ObjectId) -> mongodb::error::Result<u64> {
    let (lo, hi) = crate::domain::deal_id_range(&queue_id);
    let r = db
        .collection::<Document>(COLLECTION)
        .delete_many(doc! { "_id": { "$gte": lo, "$lte": hi }, "queue_id": queue_id })
        .await?;
    Ok(r.deleted_count)
}

/// Marks the images of `lines` of import `queue_id` as of updates the
/// database refused: an undo still applies them (a record's later images
/// were taken as if they applied), but does not count them.
pub async fn mark_refused(
    coll: &Collection<RawDocumentBuf>,
    queue_id: ObjectId,
    lines: &[LineNo],
) -> Result<()> {
    let ids: Vec<ObjectId> = lines
        .iter()
        .filter_map(|&l| deal_id(&queue_id, l))
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    coll.update_many(
        doc! { "_id": { "$in": ids }, "queue_id": queue_id },
        doc! { "$set": { "refused": true } },
    )
    .await?;
    Ok(())
}

/// `record` as an update leaves it (pure): `set`'s fields set, and
/// `pushed` (its `last_imports` entry) appended, keeping the last `kept`.
/// The next update of the same record in the same batch takes its image
/// from this, as it will find the record.
pub fn apply(record: &mut Document, set: &RawDocumentBuf, pushed: Option<Document>, kept: usize) {
    for (path, value) in set.iter().filter_map(std::result::Result::ok) {
        let Ok(value) = Bson::try_from(value.to_raw_bson()) else {
            continue;
        };
        set_path(record, path, value);
    }
    if let Some(entry) = pushed {
        let mut trail = match record.remove(TRAIL) {
            Some(Bson::Array(a)) => a,
            _ => Vec::new(),
        };
        trail.push(Bson::Document(entry));
        let excess = trail.len().saturating_sub(kept);
        trail.drain(..excess);
        record.insert(TRAIL, trail);
    }
}

/// The update that puts a record back as `image` found it (pure): `$set`
/// of the values it had, `$unset` of the fields it lacked.
pub fn restore(image: &Document) -> Document {
    let set: Document = before_values(image)
        .map(|(f, v)| (f.to_owned(), v.clone()))
        .collect();
    let unset: Document = absent_fields(image)
        .map(|f| (f.to_owned(), Bson::String(String::new())))
        .collect();
    let mut update = Document::new();
    if !set.is_empty() {
        update.insert("$set", set);
    }
    if !unset.is_empty() {
        update.insert("$unset", unset);
    }
    update
}

/// Stores `images` of updates about to be applied. A line stored already
/// (a batch written again: its update did not apply, or it would not be
/// written again) keeps its first image, taken before any of its writes,
/// with the time this write stamps (`written_at`) and no `refused` mark.
pub async fn store(coll: &Collection<RawDocumentBuf>, images: &[Document]) -> Result<()> {
    let raw: Vec<RawDocumentBuf> = images
        .iter()
        .map(RawDocumentBuf::from_document)
        .collect::<std::result::Result<_, _>>()?;
    for (index, code) in insert_unordered(coll, &raw).await? {
        if code != 11000 {
            return Err(Error::ImageRefused(code));
        }
        let Some(image) = images.get(index) else {
            continue;
        };
        let mut update = doc! { "$unset": { "refused": "" } };
        if let Ok(written) = image.get_datetime("written_at") {
            update.insert("$set", doc! { "written_at": *written });
        }
        coll.update_one(doc! { "_id": image.get("_id") }, update)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    #[test]
    fn an_image_holds_what_the_update_overwrites_and_restores_it() {
        let q = ObjectId::new();
        let id = ObjectId::new();
        let mut set = RawDocumentBuf::new();
        set.append("name", "New");
        set.append("value", 5.0);
        set.append("additional_info.abc", "x");
        set.append("updated_at", bson::DateTime::from_millis(2));
        assert_eq!(
            changed_fields(&set),
            [
                "name",
                "value",
                "additional_info.abc",
                "updated_at",
                "last_imports"
            ]
        );
        let record = doc! {
            "_id": id, "name": "Old", "additional_info": { "abc": "old", "keep": 1 },
            "updated_at": bson::DateTime::from_millis(1),
        };
        let image = image(q, 7, id, &record, &set).unwrap();
        assert_eq!(image.get_object_id("_id").unwrap(), deal_id(&q, 7).unwrap());
        assert_eq!(image.get_i64("line").unwrap(), 7);
        assert_eq!(
            guard(&image).unwrap(),
            doc! {
                "_id": id, "last_import.queue_id": q, "last_import.line": 7_i64,
                "updated_at": bson::DateTime::from_millis(2),
            }
        );
        assert!(holds(&record, &image));
        assert_eq!(
            restore(&image),
            doc! {
                "$set": {
                    "name": "Old", "additional_info.abc": "old",
                    "updated_at": bson::DateTime::from_millis(1),
                },
                "$unset": { "value": "", "last_imports": "" },
            }
        );
        // As the update leaves it, for the next line's image.
        let mut after = record.clone();
        apply(&mut after, &set, Some(doc! { "line": 7_i64 }), 2);
        assert!(!holds(&after, &image));
        assert_eq!(
            after,
            doc! {
                "_id": id, "name": "New", "additional_info": { "abc": "x", "keep": 1 },
                "updated_at": bson::DateTime::from_millis(2), "value": 5.0,
                "last_imports": [{ "line": 7_i64 }],
            }
        );
        apply(&mut after, &set, Some(doc! { "line": 8_i64 }), 2);
        apply(&mut after, &set, Some(doc! { "line": 9_i64 }), 2);
        assert_eq!(
            after.get_array("last_imports").unwrap(),
            &vec![
                Bson::from(doc! { "line": 8_i64 }),
                Bson::from(doc! { "line": 9_i64 })
            ]
        );
    }

    /// What the database would match and put back, judged in memory: a
    /// record as its line left it matches and comes back as it was; one
    /// written since does not.
    #[test]
    fn an_image_is_matched_and_put_back_in_memory_as_the_database_would() {
        let q = ObjectId::new();
        let id = ObjectId::new();
        let mut set = RawDocumentBuf::new();
        set.append("name", "New");
        set.append("additional_info.abc", "x");
        set.append("updated_at", bson::DateTime::from_millis(2));
        set.append("last_import", rawdoc! { "queue_id": q, "line": 7_i64 });
        let record = doc! {
            "_id": id, "name": "Old", "additional_info": { "keep": 1 },
            "updated_at": bson::DateTime::from_millis(1),
            "last_import": { "queue_id": ObjectId::new(), "line": 3_i64 },
        };
        let image = image(q, 7, id, &record, &set).unwrap();
        assert!(!guard_matches(&record, &image), "not written by line 7");
        let mut after = record.clone();
        apply(&mut after, &set, Some(doc! { "line": 7_i64 }), 2);
        assert!(guard_matches(&after, &image));
        // A line stored as a 32-bit number is the same line.
        let mut narrow = after.clone();
        narrow.insert("last_import", doc! { "queue_id": q, "line": 7_i32 });
        assert!(guard_matches(&narrow, &image));
        // Written since (a CRM edit stamps `updated_at`): left alone.
        let mut edited = after.clone();
        edited.insert("updated_at", bson::DateTime::from_millis(3));
        assert!(!guard_matches(&edited, &image));
        put_back(&mut after, &image);
        assert_eq!(after, record);
        assert!(holds(&after, &image));
    }

    /// A custom field of a record without `additional_info`: the undo
    /// unsets `additional_info` whole, leaving no empty document.
    #[test]
    fn a_field_inside_a_missing_document_is_undone_with_the_document() {
        let mut set = RawDocumentBuf::new();
        set.append("additional_info.a", "x");
        set.append("additional_info.b", "y");
        let record = doc! { "_id": 1, "name": "N" };
        let image = image(ObjectId::new(), 2, ObjectId::new(), &record, &set).unwrap();
        assert_eq!(
            restore(&image),
            doc! { "$unset": { "additional_info": "", "last_imports": "" } }
        );
        assert!(image.get("written_at").is_none());
    }
}
