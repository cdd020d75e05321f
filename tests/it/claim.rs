//! Claims: atomic under races, leases fence stale owners, expired leases are
//! rescued and claimed again, live ones never; oldest first.

use std::collections::HashSet;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{DateTime, doc};
use importd::claim::{self, Claimer};

use crate::helpers::{TestApp, get_i64};

fn pending(id: ObjectId) -> bson::Document {
    doc! { "_id": id, "source": "deals", "status": "pending", "in_progress": false, "created_at": DateTime::now() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claimers_claim_each_document_once_and_only_expired_leases_again() {
    let app = TestApp::new().await;
    let ids: Vec<ObjectId> = (0..50).map(|_| ObjectId::new()).collect();
    app.queues()
        .insert_many(ids.iter().map(|&id| pending(id)))
        .await
        .unwrap();

    // Four claimers, each on its own client (separate connection pools).
    let mut claimers = Vec::new();
    for i in 0..4 {
        let db = importd::db::connect(&app.settings().mongodb).await.unwrap();
        claimers.push(Claimer::new(
            &db,
            format!("claimer-{i}"),
            Duration::from_secs(60),
        ));
    }
    let mut tasks = Vec::new();
    for c in claimers.clone() {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = c.claim_next().await.unwrap() {
                got.push((
                    job.lease.queue_id,
                    job.lease.owner.clone(),
                    job.lease.attempt,
                ));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 50, "every document claimed");
    let unique: HashSet<ObjectId> = all.iter().map(|c| c.0).collect();
    assert_eq!(unique.len(), 50, "no document claimed twice");
    assert!(all.iter().all(|c| c.2 == 1));
    let owners: HashSet<&str> = all.iter().map(|c| c.1.as_str()).collect();
    assert!(owners.len() > 1, "the claimers really raced");
    for d in app.find_all("queues", doc! {}).await {
        assert_eq!(d.get_str("status").unwrap(), "processing");
        assert!(d.get_bool("in_progress").unwrap());
        assert_eq!(get_i64(&d, "attempts"), 1);
    }

    // Expire one lease by editing it (no sleeping), keep another live.
    let (expired, live) = (ids[0], ids[1]);
    let past = DateTime::from_millis(DateTime::now().timestamp_millis() - 1000);
    app.queues()
        .update_one(
            doc! { "_id": expired },
            doc! { "$set": { "lease.expires_at": past } },
        )
        .await
        .unwrap();
    // A pending document carrying a live lease is not claimable either.
    let odd = ObjectId::new();
    let future = DateTime::from_millis(DateTime::now().timestamp_millis() + 60_000);
    let mut d = pending(odd);
    d.insert("lease", doc! { "owner": "someone", "expires_at": future });
    app.queues().insert_one(d).await.unwrap();

    assert_eq!(claimers[0].rescue_expired(Duration::ZERO).await.unwrap(), 1);
    let mut reclaimed = Vec::new();
    for c in &claimers {
        while let Some(job) = c.claim_next().await.unwrap() {
            reclaimed.push(job);
        }
    }
    assert_eq!(
        reclaimed.len(),
        1,
        "only the expired import is claimed again"
    );
    assert_eq!(reclaimed[0].lease.queue_id, expired);
    assert_eq!(reclaimed[0].lease.attempt, 2);
    let live_doc = app.queue(live).await;
    assert_eq!(
        get_i64(&live_doc, "attempts"),
        1,
        "a live lease is never claimed"
    );
    assert_eq!(app.queue(odd).await.get_str("status").unwrap(), "pending");
    app.cleanup().await;
}

#[tokio::test]
async fn a_stale_owner_is_fenced_off() {
    let app = TestApp::new().await;
    let id = ObjectId::new();
    app.queues().insert_one(pending(id)).await.unwrap();
    let a = Claimer::new(&app.db, "a", Duration::from_secs(60));
    let b = Claimer::new(&app.db, "b", Duration::from_secs(60));
    let first = a.claim_next().await.unwrap().unwrap();
    first.lease.heartbeat().await.unwrap();
    // The lease expires and b takes over.
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "lease.expires_at": DateTime::from_millis(0) } },
        )
        .await
        .unwrap();
    a.rescue_expired(Duration::ZERO).await.unwrap();
    let second = b.claim_next().await.unwrap().unwrap();
    assert_eq!(second.lease.attempt, 2);
    for result in [
        first.lease.heartbeat().await.map(|_| ()),
        first
            .lease
            .save_progress(Default::default(), Default::default(), false)
            .await
            .map(|_| ()),
        first
            .lease
            .finish(&claim::Final::Completed, Default::default(), doc! {})
            .await,
        first
            .lease
            .release(
                Default::default(),
                Default::default(),
                claim::Release::Trouble {
                    error: "an outage",
                    advanced: false,
                },
            )
            .await,
    ] {
        assert!(
            matches!(result, Err(claim::Error::LeaseLost { .. })),
            "{result:?}"
        );
    }
    // The rightful owner completes it, in one guarded update.
    second
        .lease
        .finish(&claim::Final::Completed, Default::default(), doc! {})
        .await
        .unwrap();
    let q = app.queue(id).await;
    assert_eq!(q.get_str("status").unwrap(), "completed");
    assert!(!q.get_bool("in_progress").unwrap());
    assert!(q.get("lease").is_none());
    assert!(q.get_datetime("completed_at").is_ok());
    app.cleanup().await;
}

#[tokio::test]
async fn release_makes_the_import_claimable_at_once_with_its_checkpoint() {
    let app = TestApp::new().await;
    let id = ObjectId::new();
    app.queues().insert_one(pending(id)).await.unwrap();
    let a = Claimer::new(&app.db, "a", Duration::from_secs(60));
    let job = a.claim_next().await.unwrap().unwrap();
    let cp = claim::Checkpoint {
        line: 1001,
        byte: 52_000,
        records: 1000,
        batch_size: 1000,
    };
    job.lease
        .release(Default::default(), cp, claim::Release::Shutdown)
        .await
        .unwrap();
    let again = a
        .claim_next()
        .await
        .unwrap()
        .expect("claimable again without waiting");
    assert_eq!(claim::Checkpoint::from_queue_doc(&again.doc), cp);
    assert_eq!(again.lease.attempt, 2);
    assert_eq!(
        again.doc.get_i64("shutdown_releases").unwrap(),
        1,
        "a release on shutdown is counted apart from other attempts"
    );

    // Released after trouble (an outage): not claimable until its backoff
    // has passed, so a few ticks of outage do not use up its attempts.
    again
        .lease
        .release(
            Default::default(),
            cp,
            claim::Release::Trouble {
                error: "an outage",
                advanced: false,
            },
        )
        .await
        .unwrap();
    let q = app.queue(id).await;
    assert_eq!(
        q.get_document("last_error").unwrap().get_str("message"),
        Ok("an outage")
    );
    let wait = q.get_datetime("retry_at").unwrap().timestamp_millis()
        - q.get_datetime("released_at").unwrap().timestamp_millis();
    assert_eq!(wait, claim::retry_delay(2).as_millis() as i64, "{q}");
    assert!(a.claim_next().await.unwrap().is_none(), "{q}");
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "retry_at": DateTime::from_millis(0) } },
        )
        .await
        .unwrap();
    let third = a
        .claim_next()
        .await
        .unwrap()
        .expect("claimable after its backoff");
    assert_eq!(third.lease.attempt, 3);
    assert_eq!(third.doc.get_i64("progress_releases").unwrap(), 0);
    // A run that moved the checkpoint on before its trouble: counted
    // apart, like a shutdown.
    third
        .lease
        .release(
            Default::default(),
            cp,
            claim::Release::Trouble {
                error: "an outage",
                advanced: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(get_i64(&app.queue(id).await, "progress_releases"), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn oldest_first_by_created_at_then_created_at_camel_then_id() {
    let app = TestApp::new().await;
    let now = DateTime::now().timestamp_millis();
    let at = |secs_ago: i64| DateTime::from_millis(now - secs_ago * 1000);
    // An _id whose timestamp is 30 s ago, and no timestamp field at all.
    let old_ts = ((now / 1000) - 30) as u32;
    let mut bytes = ObjectId::new().bytes();
    bytes[..4].copy_from_slice(&old_ts.to_be_bytes());
    let by_id = ObjectId::from_bytes(bytes);
    let (snake, camel, contacts) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    app.queues()
        .insert_many([
            doc! { "_id": snake, "source": "deals", "status": "pending", "created_at": at(10) },
            doc! { "_id": camel, "source": "deals", "status": "pending", "createdAt": at(20) },
            doc! { "_id": by_id, "source": "deals", "status": "pending" },
            doc! { "_id": contacts, "source": "contacts", "status": "pending", "created_at": at(99) },
        ])
        .await
        .unwrap();
    let c = Claimer::new(&app.db, "a", Duration::from_secs(60));
    assert_eq!(c.stamp_claim_order().await.unwrap(), 4);
    let mut order = Vec::new();
    while let Some(job) = c.claim_next().await.unwrap() {
        order.push(job.lease.queue_id);
    }
    // Whatever the source: contacts are imported too.
    assert_eq!(order, vec![contacts, by_id, camel, snake]);
    app.cleanup().await;
}

#[tokio::test]
async fn a_daemon_claims_within_a_tick_and_ends_bad_requests_failed() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    // A queue document without its CSV reference cannot be imported.
    let id = ObjectId::new();
    app.queues().insert_one(pending(id)).await.unwrap();
    let q = app.wait_final(id, Duration::from_secs(10)).await;
    assert_eq!(q.get_str("status").unwrap(), "failed");
    assert_eq!(
        q.get_document("error").unwrap().get_str("code").unwrap(),
        "invalid_queue_document"
    );
    assert!(!q.get_bool("in_progress").unwrap());
    app.cleanup().await;
}

#[tokio::test]
async fn a_quiet_delivery_round_waits_out_the_grace_and_a_late_sent_stands() {
    let app = TestApp::new().await;
    let claimer = Claimer::new(&app.db, "a", Duration::from_secs(60));
    let past = DateTime::from_millis(0);
    let round = |rounds: i64| {
        let id = ObjectId::new();
        let d = doc! {
            "_id": id, "source": "deals", "status": "completed",
            "notify": { "state": "sending", "owner": "gone", "expires_at": past, "rounds": rounds },
        };
        (id, d)
    };
    let (early, early_doc) = round(2);
    app.queues().insert_one(early_doc).await.unwrap();
    let before = DateTime::now().timestamp_millis();
    claimer
        .rescue_expired(Duration::from_secs(30))
        .await
        .unwrap();
    let n = app
        .queue(early)
        .await
        .get_document("notify")
        .unwrap()
        .clone();
    assert_eq!(n.get_str("state"), Ok("pending"), "{n}");
    let due = n
        .get_datetime("next_attempt_at")
        .unwrap()
        .timestamp_millis()
        - before;
    assert!((29_000..=32_000).contains(&due), "{due}");
    // Not claimable during the grace...
    let claimed = claimer
        .claim_notification(claim::Channel::Email, Some(early), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(claimed.is_none());
    // ... in which the sender that delivered records it after all.
    assert!(
        claimer
            .record_delivered(
                claim::Channel::Email,
                early,
                2,
                doc! { "notify.to": "x@y.z" }
            )
            .await
            .unwrap()
    );
    let n = app
        .queue(early)
        .await
        .get_document("notify")
        .unwrap()
        .clone();
    assert_eq!(n.get_str("state"), Ok("sent"), "{n}");
    assert!(!n.contains_key("next_attempt_at"), "{n}");
    // A later round, once claimed, fences off the late record.
    let (later, mut later_doc) = round(3);
    later_doc.insert(
        "notify",
        doc! { "state": "sending", "owner": "b", "rounds": 3_i64 },
    );
    app.queues().insert_one(later_doc).await.unwrap();
    assert!(
        !claimer
            .record_delivered(claim::Channel::Email, later, 2, doc! {})
            .await
            .unwrap()
    );
    let n = app
        .queue(later)
        .await
        .get_document("notify")
        .unwrap()
        .clone();
    assert_eq!(n.get_str("state"), Ok("sending"), "{n}");
    // The round claimed past the last one gave up; the late record of the
    // last round's delivery still stands.
    let (past, mut past_doc) = round(7);
    past_doc.insert(
        "notify",
        doc! { "state": "failed", "gave_up": true, "rounds": 7_i64 },
    );
    app.queues().insert_one(past_doc).await.unwrap();
    assert!(
        claimer
            .record_delivered(claim::Channel::Email, past, 6, doc! {})
            .await
            .unwrap()
    );
    let n = app
        .queue(past)
        .await
        .get_document("notify")
        .unwrap()
        .clone();
    assert_eq!(n.get_str("state"), Ok("sent"), "{n}");
    assert!(!n.contains_key("gave_up"), "{n}");
    app.cleanup().await;
}

/// A host whose clock runs 90 s ahead takes a live 60 s lease for an
/// expired one, until its claimer measures the database server's clock:
/// from then on it compares in the server's time, as every daemon writes.
#[tokio::test]
async fn a_host_clock_ahead_takes_no_live_lease_once_synced() {
    let app = TestApp::new().await;
    let id = ObjectId::new();
    app.queues().insert_one(pending(id)).await.unwrap();
    let a = Claimer::new(&app.db, "a", Duration::from_secs(60));
    let b = Claimer::new(&app.db, "b", Duration::from_secs(60));
    let job = a.claim_next().await.unwrap().unwrap();
    // b plays a host whose clock is 90 s ahead; its sync corrects it (on
    // this host the server's clock is the host's).
    b.clock().set_offset_ms(90_000);
    // A measure is kept when its round trip is under a second: a loaded
    // machine may need a few tries.
    let mut offset = None;
    for _ in 0..20 {
        offset = b.clock().sync(&app.db).await.unwrap();
        if offset.is_some() {
            break;
        }
    }
    let offset = offset.expect("a measure");
    assert!(offset.abs() < 1_000, "offset {offset} ms on one host");
    assert_eq!(b.rescue_expired(Duration::ZERO).await.unwrap(), 0);
    assert!(b.claim_next().await.unwrap().is_none());
    job.lease.heartbeat().await.unwrap();
    // Unsynced, the same host rescues the live lease: what the sync is for.
    b.clock().set_offset_ms(90_000);
    assert_eq!(b.rescue_expired(Duration::ZERO).await.unwrap(), 1);
    assert!(matches!(
        job.lease.heartbeat().await,
        Err(claim::Error::LeaseLost { .. })
    ));
    app.cleanup().await;
}
