//! The request and sync state machine (issue 22, `ledger::lifecycle`), one test per way
//! work used to be lost when a planner died at the wrong moment, a wait spent the
//! broker's delivery limit, or a plan's jobs never reached the broker:
//!
//! * merged requests whose planner died are planned again, each from its own request,
//!   never from the message that happened to come back (case 1);
//! * a request kept pending, anonymous or not, whose planner died while planning it is
//!   planned again with no new message (cases 2 and 4);
//! * a planning message that meets a busy planning lock, and a chunk that cannot be
//!   started, spend no broker delivery (case 3);
//! * a sync whose plan committed but whose jobs were never published is published again
//!   by a planner's housekeeping, with no operator (case 4).

use crate::harness::{
    InProcess, assert_books_balance, expected_full, hold_plans, loansync_process, seeded_db,
    settings_for, small, stub, wait_planner_held,
};
use crate::support::{TestDb, amqp_url, wait_for};
use loansync::config::Settings;
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, SyncType};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::Broker;
use loansync::queue::memory::MemoryQueue;
use loansync::queue::{ChunkPublisher, QueueError};
use loansync::stub_api::{Faults, StubHandle};
use loansync::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(90);

/// A first incremental sync looks back ten years: it selects every seeded row.
const LOOK_BACK_FAR: &[(&str, &str)] = &[("ETL_DEFAULT_LOOKBACK_DAYS", "3650")];

fn request(sync_type: SyncType, entities: &[EntityKind], request_id: Option<&str>) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities: Some(entities.to_vec()),
        request_id: request_id.map(str::to_string),
        since: None,
        until: None,
        sweep: false,
    }
}

/// A request's state, its sync, that sync's type and history status.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Served {
    request_id: String,
    state: String,
    sync_id: Option<String>,
    sync_type: Option<String>,
    entities: Option<Vec<String>>,
    status: Option<String>,
}

async fn served(pool: &sqlx::PgPool) -> Vec<Served> {
    sqlx::query_as(
        "SELECT r.request_id, r.state, r.sync_id::text AS sync_id, s.sync_type::text AS sync_type, \
                s.entities, h.status::text AS status \
         FROM loansync_request r LEFT JOIN loansync_sync s USING (sync_id) \
         LEFT JOIN etl_folder_etlsynchistory h USING (sync_id) ORDER BY r.request_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Waits until every recorded request (at least `n`) is answered: planned, its sync
/// finished.
async fn wait_answered(pool: &sqlx::PgPool, n: usize) -> Vec<Served> {
    wait_for("every request answered", DEADLINE, || async {
        let s = served(pool).await;
        s.len() >= n
            && s.iter().all(|r| {
                r.state == "planned"
                    && r.status
                        .as_deref()
                        .is_some_and(|st| ["completed", "partial_success", "failed"].contains(&st))
            })
    })
    .await;
    served(pool).await
}

/// The world of the planner-death tests: a sync S0 (a full sync of the officers) holds
/// the slot, planned into a queue nobody works; a planner process records `requests`
/// as pending; then, held inside its plan of the pending requests (which it claims the
/// moment S0 finishes), it is SIGKILLed. `resend` is then published again, as a
/// Kubernetes CronJob's retried pod does, and a new planner with workers starts.
async fn planner_killed_planning_pending(
    db: &TestDb,
    settings: &Arc<Settings>,
    stub: &StubHandle,
    requests: &[PlanRequest],
    resend: &[PlanRequest],
) -> InProcess {
    let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let s0 = MemoryQueue::new();
    let planned = planner::plan_sync(
        &db.pool,
        settings,
        &request(SyncType::Full, &[EntityKind::Officer], None),
        &s0,
    )
    .await
    .unwrap();
    assert!(
        matches!(planned, PlanOutcome::Planned { .. }),
        "{planned:?}"
    );

    let mut planner = loansync_process(db, settings, &stub.url())
        .arg("planner")
        .spawn()
        .unwrap();
    admin
        .publish_json(&admin.topology.plan, requests)
        .await
        .unwrap();
    wait_for("the requests kept as pending", DEADLINE, || async {
        let s = served(&db.pool).await;
        s.len() == requests.len() && s.iter().all(|r| r.state == "pending")
    })
    .await;

    // S0 finishes; the planner claims the slot for the pending requests and is held
    // inside their plan, then killed.
    let held = hold_plans(db).await;
    let ctx = Arc::new(loansync::app::worker_context(settings, db.pool.clone()).unwrap());
    loansync::worker::run_memory(ctx, s0, 2).await;
    wait_planner_held(db).await;
    planner.kill().await.unwrap(); // SIGKILL, as an OOM kill or an eviction
    held.rollback().await.unwrap();

    if !resend.is_empty() {
        admin
            .publish_json(&admin.topology.plan, resend)
            .await
            .unwrap();
    }
    admin.close().await;
    InProcess::start(db, settings).await
}

/// Case 1: two incremental requests (loans; customers) kept while a sync runs are merged
/// into one sync; its planner is killed while planning; the customers' request is sent
/// again. The dead sync used to be planned again from the message that came back
/// (customers only) while finishing as the merged one: the loans' watermark moved and no
/// loan was ever sent. Now the dead sync ends, both requests are pending again and are
/// planned as they asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merged_requests_whose_planner_died_are_planned_again_as_each_asked() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), LOOK_BACK_FAR));
    let expected = expected_full(&db.pool).await;
    let loans = request(SyncType::Incremental, &[EntityKind::Loan], Some("i-loans"));
    let customers = request(
        SyncType::Incremental,
        &[EntityKind::Customer],
        Some("i-customers"),
    );
    let running = planner_killed_planning_pending(
        &db,
        &settings,
        &stub,
        &[loans, customers.clone()],
        &[customers],
    )
    .await;
    let answered = wait_answered(&db.pool, 2).await;
    for r in &answered {
        assert_eq!(r.status.as_deref(), Some("completed"), "{answered:?}");
    }
    let by_id = |id: &str| answered.iter().find(|r| r.request_id == id).unwrap();
    let covers = |r: &Served, e: EntityKind| {
        r.entities
            .as_ref()
            .is_some_and(|es| es.iter().any(|x| x == e.as_str()))
    };
    assert!(covers(by_id("i-loans"), EntityKind::Loan), "{answered:?}");
    assert!(
        covers(by_id("i-customers"), EntityKind::Customer),
        "{answered:?}"
    );
    // Only the loans' request sends loans: every one arrived (the seeded rows are inside
    // the first incremental window).
    let got = stub.received();
    for e in [EntityKind::Loan, EntityKind::Customer] {
        assert!(expected[&e].is_subset(&got.ids(e)), "{e}: not all sent");
    }
    // Every watermark names a sync that synced its entity.
    let marks: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT w.entity_type::text, s.entities FROM etl_folder_etllastsync w \
         JOIN loansync_sync s ON s.sync_id = w.last_sync_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (entity, entities) in &marks {
        assert!(entities.contains(entity), "{entity} moved by {entities:?}");
    }
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
}

/// Case 1, the other shape: a pending full request merged with the incremental it covers
/// used to be planned again as an incremental when the incremental's message came back:
/// the full request was answered without a full sync. Now it is served by a full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merged_full_request_whose_planner_died_is_served_by_a_full_sync() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let expected = expected_full(&db.pool).await;
    let full = request(SyncType::Full, &[EntityKind::Loan], Some("f-loans"));
    let incremental = request(SyncType::Incremental, &[EntityKind::Loan], Some("i-loans"));
    let running = planner_killed_planning_pending(
        &db,
        &settings,
        &stub,
        &[full, incremental.clone()],
        &[incremental],
    )
    .await;
    let answered = wait_answered(&db.pool, 2).await;
    let full = answered.iter().find(|r| r.request_id == "f-loans").unwrap();
    assert_eq!(
        (full.sync_type.as_deref(), full.status.as_deref()),
        (Some("full"), Some("completed")),
        "{answered:?}"
    );
    // Planned as a full sync: no lower bound, every disbursed loan sent (an incremental
    // looks back ETL_DEFAULT_LOOKBACK_DAYS, 30, and the seed goes further back).
    let lo: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT window_lo FROM loansync_sync_entity WHERE sync_id = $1 AND entity = 'loan'",
    )
    .bind(full.sync_id.as_deref())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(lo, None, "the full request was planned with a lower bound");
    assert!(
        expected[&EntityKind::Loan].is_subset(&stub.received().ids(EntityKind::Loan)),
        "not every loan was sent"
    );
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
}

/// Cases 2 and 4: requests kept pending, one without an id (any AMQP client, the Django
/// application publishing directly: its message was acked when it was kept), whose
/// planner dies while planning them. Nothing is sent again from the broker and no new
/// message comes: the next planner's housekeeping ends the dead sync and plans them.
/// The anonymous request used to stay `planned` on the failed sync, and the planning
/// sync blocked the pending path until some new message arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_requests_whose_planner_died_run_with_no_new_message_anonymous_too() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), LOOK_BACK_FAR));
    let expected = expected_full(&db.pool).await;
    let running = planner_killed_planning_pending(
        &db,
        &settings,
        &stub,
        &[
            request(SyncType::Incremental, &[EntityKind::Loan], None),
            request(SyncType::Incremental, &[EntityKind::Customer], Some("kept")),
        ],
        &[],
    )
    .await;
    let answered = wait_answered(&db.pool, 2).await;
    assert!(
        answered
            .iter()
            .any(|r| r.request_id.starts_with("anonymous-")),
        "{answered:?}"
    );
    for r in &answered {
        assert_eq!(r.status.as_deref(), Some("completed"), "{answered:?}");
    }
    let got = stub.received();
    for e in [EntityKind::Loan, EntityKind::Customer] {
        assert!(expected[&e].is_subset(&got.ids(e)), "{e}: not all sent");
    }
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
}

/// A broker that is gone: the plan commits, no chunk job is published.
struct LostBroker;

#[async_trait::async_trait]
impl ChunkPublisher for LostBroker {
    async fn publish_chunks(&self, _jobs: &[ChunkJob]) -> Result<(), QueueError> {
        Err(QueueError::ConsumerLost(
            "connection to the broker lost".into(),
        ))
    }
}

/// Case 4: the plan committed but its jobs never reached the broker (a confirm timeout
/// while the broker blocks publishers, a planner killed mid-publish). The sync used to
/// stay `running` until an operator ran `resume`; now a planner's housekeeping
/// publishes its unsettled chunks again and it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_whose_jobs_were_never_published_is_healed_by_the_planner() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let expected = expected_full(&db.pool).await;
    let err = planner::plan_sync(
        &db.pool,
        &settings,
        &request(SyncType::Full, &EntityKind::ALL, None),
        &LostBroker,
    )
    .await
    .expect_err("publishing fails");
    assert!(format!("{err:#}").contains("broker lost"), "{err:#}");
    let (state, published): (String, bool) =
        sqlx::query_as("SELECT state, published_at IS NOT NULL FROM loansync_sync")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), published), ("running", false));

    // A planner and workers; nobody runs `resume`, no message is sent.
    let running = InProcess::start(&db, &settings).await;
    let h = crate::harness::wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].status, "completed");
    crate::harness::assert_delivered_all(&stub.received(), &expected);
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
}

/// A planner (if `planner`) and `workers` workers in this process, each on a pool with
/// the settings' session limits (a one-second `lock_timeout` here), until the token is
/// cancelled.
async fn services(
    settings: &Arc<Settings>,
    planner: bool,
    workers: usize,
) -> (
    tokio_util::sync::CancellationToken,
    Vec<tokio::task::JoinHandle<Result<(), loansync::app::AppError>>>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let flag = || Arc::new(std::sync::atomic::AtomicBool::new(false));
    if planner {
        tasks.push(tokio::spawn(loansync::app::run_planner(
            loansync::db::connect(settings).await.unwrap(),
            settings.clone(),
            flag(),
            stop.clone(),
        )));
    }
    for _ in 0..workers {
        tasks.push(tokio::spawn(loansync::app::run_worker(
            loansync::db::connect(settings).await.unwrap(),
            settings.clone(),
            flag(),
            stop.clone(),
        )));
    }
    (stop, tasks)
}

async fn stop_services(
    (stop, tasks): (
        tokio_util::sync::CancellationToken,
        Vec<tokio::task::JoinHandle<Result<(), loansync::app::AppError>>>,
    ),
) {
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Settings whose lock waits end after a second, with a delivery limit of 1 (the
/// broker's own: 3, on queues declared with these settings), counting in a registry of
/// their own.
fn impatient(db: &TestDb, stub: &StubHandle) -> (Arc<Settings>, Telemetry) {
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(
            db,
            &stub.url(),
            &[
                ("ETL_DB_LOCK_TIMEOUT_SECS", "1"),
                ("ETL_DELIVERY_LIMIT", "1"),
            ],
        )
    };
    (Arc::new(settings), telemetry)
}

/// Case 3, the planner: a planning message that meets a busy planning lock (another
/// replica planning, an operator's `abandon`) for longer than `lock_timeout` used to be
/// requeued, each requeue counting against the broker's delivery limit, until it was
/// dead-lettered and its request lost. Now the request is recorded and the message
/// acked before anything waits; it is planned once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planning_message_waiting_for_the_planning_lock_spends_no_delivery() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let (settings, _) = impatient(&db, &stub);
    // The queues declared with the settings' delivery limit (the broker's: 3).
    let admin = loansync::app::connect_broker(&settings).await.unwrap();
    // Another session holds the planning lock.
    let mut holder = db.pool.acquire().await.unwrap().detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(loansync::ledger::lifecycle::PLANNING_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();
    let running = services(&settings, true, 1).await;
    admin
        .publish_json(
            &admin.topology.plan,
            &[request(
                SyncType::Full,
                &[EntityKind::Officer],
                Some("patient"),
            )],
        )
        .await
        .unwrap();
    // Recorded, or (as before) dead-lettered after the broker's delivery limit: either
    // way a bounded wait.
    wait_for(
        "the request recorded or dead-lettered",
        DEADLINE,
        || async {
            !served(&db.pool).await.is_empty()
                || admin.queue_depth(&admin.topology.dead).await.unwrap() > 0
        },
    )
    .await;
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    sqlx::Connection::close(holder).await.unwrap();
    let answered = wait_answered(&db.pool, 1).await;
    assert_eq!(answered[0].status.as_deref(), Some("completed"));
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    stop_services(running).await;
    admin.close().await;
}

/// Case 3, the worker: a chunk whose ledger row cannot be read now (a lock held on it
/// longer than `lock_timeout`) used to be requeued, spending a broker delivery but no
/// ledger attempt, until the broker dead-lettered it unsettled and the sync stalled for
/// good. Now it goes back without spending a delivery, and is delivered once it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_that_cannot_be_started_spends_no_delivery() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let (settings, telemetry) = impatient(&db, &stub);
    let expected = expected_full(&db.pool).await;
    // The queues declared with the settings' delivery limit (the broker's: 3).
    let admin = loansync::app::connect_broker(&settings).await.unwrap();
    let officers = request(SyncType::Full, &[EntityKind::Officer], None);
    let planned = planner::plan_sync(&db.pool, &settings, &officers, &admin)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id, .. } = planned else {
        panic!("{planned:?}")
    };
    // The first chunk's ledger row is held.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM loansync_chunk WHERE sync_id = $1 AND entity = 'officer' AND seq = 0 \
         FOR UPDATE",
    )
    .bind(&sync_id)
    .execute(&mut *holder)
    .await
    .unwrap();
    let running = services(&settings, false, 1).await;
    let back = || {
        ["requeued", "republished"]
            .iter()
            .map(|o| {
                telemetry
                    .value("etl_chunks_total", &[("entity", "officer"), ("outcome", o)])
                    .unwrap_or(0.0) as u64
            })
            .sum::<u64>()
    };
    // More tries than the broker's delivery limit (1 + 2), or (as before) a dead letter.
    wait_for(
        "the chunk tried past the broker's limit, or dead-lettered",
        DEADLINE,
        || async { back() > 4 || admin.queue_depth(&admin.topology.dead).await.unwrap() > 0 },
    )
    .await;
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    holder.rollback().await.unwrap();
    let h = crate::harness::wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{h:?}");
    assert_eq!(
        stub.received().ids(EntityKind::Officer),
        expected[&EntityKind::Officer]
    );
    assert_books_balance(&db.pool).await;
    stop_services(running).await;
    admin.close().await;
}
