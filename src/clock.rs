//! The time leases are written and compared in: the database server's.
//!
//! A lease's expiry is written by one daemon and compared by every other,
//! on other hosts: with each host's own clock, a host whose clock runs a
//! minute ahead would take live leases for expired ones. So every time a
//! claimer writes or compares (lease expiries, backoffs, delivery rounds)
//! is its host's clock corrected by the offset to the server's clock,
//! measured with the `hello` command's `localTime` at start-up and at each
//! rescue tick (a replica set's primary answers it; behind `mongos`, the
//! router the driver picks, so the routers' hosts must agree). Until a
//! measure succeeds, the offset is zero: the host's clock as it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bson::{DateTime, doc};
use mongodb::Database;

/// A measure is kept only if its round trip took at most this long: the
/// server's time is known to within half of it.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(1);

/// This host's clock, corrected to the database server's; cheap to clone
/// (clones share the offset).
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The server's time now, as far as this host can tell.
    pub fn now(&self) -> DateTime {
        self.at(DateTime::now())
    }

    /// `local`, a reading of this host's clock, in the server's time.
    fn at(&self, local: DateTime) -> DateTime {
        DateTime::from_millis(
            local
                .timestamp_millis()
                .saturating_add(self.offset_ms.load(Ordering::Relaxed)),
        )
    }

    /// How far the server's clock is ahead of this host's, in
    /// milliseconds (negative: behind), as last measured.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Sets the offset (a measure made elsewhere; tests use it to play a
    /// host whose clock is off).
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// Measures the offset to `db`'s server and keeps it. Returns it, or
    /// `None` when the answer came too late to be precise or carried no
    /// time (the offset is then left as it was).
    pub async fn sync(&self, db: &Database) -> mongodb::error::Result<Option<i64>> {
        // The round trip is timed by the monotonic clock: a step of the
        // host's clock during the call does not skew the midpoint.
        let sent = DateTime::now();
        let started = std::time::Instant::now();
        let hello = db.run_command(doc! { "hello": 1 }).await?;
        let round_trip = started.elapsed();
        let Ok(server) = hello.get_datetime("localTime") else {
            return Ok(None);
        };
        if round_trip > MAX_ROUND_TRIP {
            return Ok(None);
        }
        let offset = offset_ms(
            sent.timestamp_millis(),
            round_trip.as_millis() as i64,
            server.timestamp_millis(),
        );
        self.set_offset_ms(offset);
        Ok(Some(offset))
    }
}

/// The server's clock minus this host's (pure): the server read its clock
/// at `server`, about halfway through the `round_trip` this host began at
/// `sent` (milliseconds).
pub fn offset_ms(sent: i64, round_trip: i64, server: i64) -> i64 {
    server - (sent + round_trip / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_taken_at_the_round_trip_midpoint() {
        assert_eq!(offset_ms(1_000, 10, 1_005), 0);
        // The server's clock runs a minute ahead, or 30 s behind.
        assert_eq!(offset_ms(1_000, 10, 61_005), 60_000);
        assert_eq!(offset_ms(100_000, 20, 70_010), -30_000);
    }

    #[test]
    fn clones_share_the_offset_and_now_follows_it() {
        let clock = Clock::default();
        let other = clock.clone();
        let local = DateTime::from_millis(1_000_000);
        assert_eq!(clock.at(local), local);
        other.set_offset_ms(-90_000);
        assert_eq!(clock.offset_ms(), -90_000);
        assert_eq!(clock.at(local), DateTime::from_millis(910_000));
    }
}
