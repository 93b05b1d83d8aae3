//! `loansync errors retry`: unresolved error rows re-delivered in a sync of their own
//! that moves no watermark; rows that fail again are bumped, delivered ones resolved.

use crate::harness::{assert_books_balance, history, seeded_db, settings_for, small};
use loansync::domain::EntityKind;
use loansync::planner::{self, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_bumps_what_fails_again_and_resolves_what_arrives() {
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults {
        reject_every_nth: 5,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let s = db.full_sync_in_process(&settings).await;
    assert_eq!(s.exit_code(), loansync::app::EXIT_PARTIAL, "{}", s.render());
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(open > 0);
    let marks = || async {
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "SELECT entity_type::text, last_sync_timestamp FROM etl_folder_etllastsync ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let marks_before = marks().await;

    let retry = || async {
        let queue = MemoryQueue::new();
        let PlanOutcome::Planned { totals, .. } =
            planner::plan_retry(&db.pool, &settings, &[], &queue)
                .await
                .unwrap()
        else {
            panic!("retry not planned")
        };
        let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
        loansync::worker::run_memory(ctx, queue, 2).await;
        totals
    };

    // The API still rejects them: same rows, bumped, no new rows.
    let totals = retry().await;
    let planned: i64 = totals.records.iter().map(|(_, n)| n).sum();
    assert_eq!(planned, open);
    let (rows, bumped): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE retry_count = 1 AND last_retry_at IS NOT NULL) \
         FROM etl_folder_etlsyncerror",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((rows, bumped), (open, open));

    // The API is fixed: the retry delivers them and resolves every row.
    stub.set_faults(Faults::default());
    retry().await;
    let still_open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(still_open, 0);
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 3);
    assert_eq!(h[1].status, "failed", "every retried record failed again");
    assert_eq!(h[2].status, "completed");
    assert_eq!(marks().await, marks_before, "a retry moved a watermark");
    let received = stub.received();
    assert!(received.ids(EntityKind::Loan).iter().any(|id| id % 5 == 0));
    assert_books_balance(&db.pool).await;
}
