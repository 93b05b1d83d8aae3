//! The consumer seam over the in-memory queue: the one worker loop runs until the queue
//! is empty with nothing in flight, a chunk that failed transiently comes back, and one
//! that can never succeed is dead-lettered once instead of looping.

use crate::harness::{
    assert_books_balance, assert_delivered_all, expected_full, history, seeded_db, settings_for,
    small, stub,
};
use crate::support::wait_for;
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, SyncType};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use loansync::worker;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn request(entities: Option<Vec<EntityKind>>) -> PlanRequest {
    PlanRequest {
        sync_type: SyncType::Full,
        entities,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

/// Runs the worker loop over `queue` until it ends by itself (no shutdown).
async fn work_until_empty(
    ctx: Arc<worker::WorkerContext>,
    queue: &MemoryQueue,
    concurrency: u16,
) -> Result<(), loansync::queue::QueueError> {
    let mut consumer = queue.consumer();
    let consuming = AtomicBool::new(false);
    worker::run(
        ctx,
        &mut consumer,
        concurrency,
        Duration::from_secs(30),
        &consuming,
        std::future::pending::<()>(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_loop_ends_once_the_memory_queue_is_empty_and_nothing_is_in_flight() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let queue = MemoryQueue::new();
    let PlanOutcome::Planned { sync_id, .. } =
        planner::plan_sync(&db.pool, &settings, &request(None), &queue)
            .await
            .unwrap()
    else {
        panic!("not planned")
    };
    let planned = queue.len();
    assert!(planned > 4, "{planned} chunks planned");
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
    tokio::time::timeout(DEADLINE, work_until_empty(ctx, &queue, 3))
        .await
        .expect("the loop ended by itself")
        .unwrap();
    assert_eq!((queue.len(), queue.in_flight()), (0, 0));
    assert!(queue.dead_letters().is_empty());
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].sync_id, sync_id);
    assert_eq!(h[0].status, "completed");
    let expected = expected_full(&db.pool).await;
    assert_delivered_all(&stub.received(), &expected);
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_requeued_after_a_transient_failure_comes_back_and_is_delivered() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_DB_LOCK_TIMEOUT_SECS", "1")]);
    let pool = loansync::db::connect(&settings).await.unwrap();
    let queue = MemoryQueue::with_requeue_pause(Duration::from_millis(50));
    let officers = request(Some(vec![EntityKind::Officer]));
    let PlanOutcome::Planned { sync_id, .. } =
        planner::plan_sync(&pool, &settings, &officers, &queue)
            .await
            .unwrap()
    else {
        panic!("not planned")
    };
    // While the officers' table is held, loading a chunk fails with lock_not_available
    // (transient): the chunks go back to the queue (their attempts counted) and come back.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE accounts_customuser IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let ctx = Arc::new(loansync::app::worker_context(&settings, pool.clone()).unwrap());
    let work = {
        let queue = queue.clone();
        tokio::spawn(async move { work_until_empty(ctx, &queue, 2).await })
    };
    wait_for("a chunk to be started a second time", DEADLINE, || async {
        let max: i32 =
            sqlx::query_scalar("SELECT max(attempts) FROM loansync_chunk WHERE sync_id = $1")
                .bind(&sync_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        max >= 2
    })
    .await;
    assert!(!work.is_finished(), "the loop ended with a chunk requeued");
    holder.commit().await.unwrap();
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("the loop ended once the requeued chunks were delivered")
        .unwrap()
        .unwrap();
    assert_eq!((queue.len(), queue.in_flight()), (0, 0));
    assert!(queue.dead_letters().is_empty());
    let h = history(&db.pool).await;
    assert_eq!(h[0].status, "completed");
    let expected = expected_full(&db.pool).await;
    assert_eq!(
        stub.received().ids(EntityKind::Officer),
        expected[&EntityKind::Officer]
    );
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_can_never_succeed_is_dead_lettered_once_and_the_rest_goes_on() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let queue = MemoryQueue::with_requeue_pause(Duration::ZERO);
    let loans = request(Some(vec![EntityKind::Loan]));
    let PlanOutcome::Planned { .. } = planner::plan_sync(&db.pool, &settings, &loans, &queue)
        .await
        .unwrap()
    else {
        panic!("not planned")
    };
    // A job naming no chunk of the ledger: it can never succeed.
    let stray = ChunkJob {
        sync_id: "no-such-sync".into(),
        entity: EntityKind::Loan,
        seq: 0,
    };
    queue.push(stray.clone());
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
    tokio::time::timeout(DEADLINE, work_until_empty(ctx, &queue, 2))
        .await
        .expect("the loop ended: nothing loops forever")
        .unwrap();
    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, stray);
    assert!(dead[0].1.contains("names no chunk"), "{}", dead[0].1);
    assert_eq!((queue.len(), queue.in_flight()), (0, 0));
    assert_eq!(history(&db.pool).await[0].status, "completed");
    assert_books_balance(&db.pool).await;
}
