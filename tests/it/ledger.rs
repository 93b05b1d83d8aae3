//! The ledger's error boundary: a database error is classified by its type, and a
//! permanent one in a chunk (here a constraint the database enforces on every settle)
//! dead-letters the chunk instead of requeueing it until the delivery limit and beyond.

use crate::harness::{seeded_db, settings_for, small, stub};
use loansync::domain::{PlanRequest, SyncType};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::Disposition;
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use std::sync::Arc;
use std::time::Duration;

/// Every settle of a chunk fails with a `check_violation` (SQLSTATE 23514): permanent.
const REFUSE_SETTLES: &str = "\
    CREATE FUNCTION test_refuse_settle() RETURNS trigger LANGUAGE plpgsql AS $$ \
    BEGIN RAISE EXCEPTION 'settles refused by the test' USING ERRCODE = 'check_violation'; END $$; \
    CREATE TRIGGER test_refuse_settle BEFORE UPDATE ON loansync_chunk FOR EACH ROW \
    WHEN (NEW.settled_at IS NOT NULL) EXECUTE FUNCTION test_refuse_settle();";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_database_error_in_a_chunk_is_dead_lettered_not_requeued() {
    let db = seeded_db(small()).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let queue = MemoryQueue::new();
    let request = PlanRequest {
        sync_type: SyncType::Full,
        entities: Some(vec![loansync::domain::EntityKind::Repayment]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let planned = planner::plan_sync(&db.pool, &settings, &request, &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned {
        sync_id, totals, ..
    } = planned
    else {
        panic!("not planned: {planned:?}")
    };
    assert!(totals.chunks >= 2, "{totals:?}");
    sqlx::raw_sql(REFUSE_SETTLES)
        .execute(&db.pool)
        .await
        .unwrap();
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());

    // One chunk, handled once: its settle and its settle-as-failed both fail permanently.
    let job = queue.try_pop().expect("a chunk job");
    let disposition =
        loansync::worker::handle_message(&ctx, &serde_json::to_vec(&job).unwrap()).await;
    let Disposition::DeadLetter(reason) = disposition else {
        panic!("not dead-lettered: {disposition:?}")
    };
    assert!(reason.contains("settles refused by the test"), "{reason}");
    let (attempts, settled): (i32, bool) = sqlx::query_as(
        "SELECT attempts, settled_at IS NOT NULL FROM loansync_chunk \
         WHERE sync_id = $1 AND entity = $2 AND seq = $3",
    )
    .bind(&sync_id)
    .bind(job.entity.as_str())
    .bind(job.seq)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (attempts, settled),
        (2, false),
        "started once to deliver and once to fail it; never settled"
    );

    // The in-memory loop over the rest ends: nothing comes back to the queue.
    tokio::time::timeout(
        Duration::from_secs(300),
        loansync::worker::run_memory(ctx, queue, 2),
    )
    .await
    .expect("the loop ends: no chunk is requeued forever");
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM loansync_chunk WHERE sync_id = $1")
            .bind(&sync_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(max_attempts, 2);
    let unsettled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NULL",
    )
    .bind(&sync_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        unsettled, totals.chunks,
        "the refused settles changed nothing"
    );
}
