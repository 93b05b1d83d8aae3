//! Poison input: messages that cannot be parsed, or name things that do not exist, go to
//! `<prefix>.dead` with the reason in a header, and the pipeline goes on working.

use crate::harness::{Pipeline, assert_books_balance, seeded_db, small, wait_syncs_finished};
use crate::support::wait_for;
use loansync::domain::{ChunkJob, EntityKind, SyncType};
use loansync::stub_api::Faults;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_with_a_reason() {
    let db = seeded_db(small()).await;
    let p = Pipeline::start(&db, Faults::default(), &[]).await;
    let t = p.admin.topology.clone();
    p.admin.publish_bytes(&t.plan, b"{not json").await.unwrap();
    p.admin
        .publish_bytes(&t.plan, br#"{"sync_type":"weekly"}"#)
        .await
        .unwrap();
    p.admin
        .publish_bytes(
            &t.plan,
            br#"{"sync_type":"full","entities":["loan","spaceship"]}"#,
        )
        .await
        .unwrap();
    p.admin
        .publish_bytes(&t.chunks, b"\x00\x01garbage")
        .await
        .unwrap();
    p.admin
        .publish_json(
            &t.chunks,
            &[ChunkJob {
                sync_id: "no-such-sync".into(),
                entity: EntityKind::Loan,
                seq: 0,
            }],
        )
        .await
        .unwrap();

    let mut dead = p
        .admin
        .raw_consumer(&t.dead, 10, "test-dead")
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < 5 {
        let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
            .await
            .expect("dead letters within 30 s")
            .expect("consumer open")
            .unwrap();
        let reason = d.header("x-loansync-reason").expect("a reason header");
        let source = d.header("x-loansync-source").expect("a source header");
        reasons.push((source, reason, d.body().to_vec()));
        d.settle(&p.admin, &t.dead, loansync::queue::Disposition::Ack)
            .await
            .unwrap();
    }
    dead.close().await;
    let count = |src: &str, needle: &str| {
        reasons
            .iter()
            .filter(|(s, r, _)| s == src && r.contains(needle))
            .count()
    };
    assert_eq!(count(&t.plan, "invalid planning message"), 3, "{reasons:?}");
    assert_eq!(count(&t.chunks, "invalid chunk job"), 1, "{reasons:?}");
    assert_eq!(count(&t.chunks, "no chunk of the ledger"), 1, "{reasons:?}");
    // The original bodies are kept, so nothing is lost.
    assert!(reasons.iter().any(|(_, _, b)| b == b"{not json"));

    // Nothing was planned from them, and a good message still works.
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsynchistory")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(none, 0);
    p.trigger(SyncType::Full, "after-poison").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    wait_for(
        "the dead queue to stay empty",
        Duration::from_secs(5),
        || async { p.admin.queue_depth(&t.dead).await.unwrap() == 0 },
    )
    .await;
    assert_books_balance(&db.pool).await;
    p.stop().await;
}
