//! Runtime robustness: PostgreSQL cannot wedge a worker (session timeouts), a row that
//! cannot be read fails alone (and a panic is contained), a broker that holds its
//! confirms or blocks the connection is noticed, and a long database outage spends none
//! of the broker's delivery limit.

use crate::harness::TestApp;
use crate::harness::{
    Pipeline, assert_books_balance, assert_delivered_all, expected_full, history, seeded_db,
    settings_for, small, stub, wait_syncs_finished,
};
use crate::proxy::{self, Framing, Mode, Proxy};
use crate::support::{TestDb, amqp_url, wait_for};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::{Broker, BrokerHealth, BrokerOptions, broker_delivery_limit};
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use loansync::telemetry::Telemetry;
use loansync::worker;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

fn request(sync_type: SyncType, entities: Option<Vec<EntityKind>>) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

async fn show(pool: &sqlx::PgPool, sql: &'static str) -> String {
    sqlx::query_scalar::<_, String>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
}

// ---------------------------------------------------------------- item 6a: timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_connections_carry_the_session_timeouts() {
    let db = TestApp::migrated().await;
    let defaults =
        loansync::config::Settings::from_lookup(|k| (k == "DATABASE_URL").then(|| db.url.clone()))
            .unwrap();
    let pool = loansync::db::connect(&defaults).await.unwrap();
    // Several connections: every pooled one carries them, not only the first.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.acquire().await.unwrap());
    }
    for conn in &mut held {
        let v: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(v, "1min");
    }
    drop(held);
    assert_eq!(show(&pool, "SHOW lock_timeout").await, "30s");
    assert_eq!(
        show(&pool, "SHOW idle_in_transaction_session_timeout").await,
        "1min"
    );
    assert_eq!(show(&pool, "SHOW tcp_keepalives_idle").await, "30");

    let custom = loansync::config::Settings::from_lookup(|k| match k {
        "DATABASE_URL" => Some(db.url.clone()),
        "ETL_DB_STATEMENT_TIMEOUT_SECS" => Some("7".into()),
        "ETL_DB_LOCK_TIMEOUT_SECS" => Some("2".into()),
        "ETL_DB_IDLE_IN_TX_TIMEOUT_SECS" => Some("0".into()),
        _ => None,
    })
    .unwrap();
    let pool = loansync::db::connect(&custom).await.unwrap();
    assert_eq!(show(&pool, "SHOW statement_timeout").await, "7s");
    assert_eq!(show(&pool, "SHOW lock_timeout").await, "2s");
    assert_eq!(
        show(&pool, "SHOW idle_in_transaction_session_timeout").await,
        "0"
    );
    // A statement that outlives the limit is cancelled, per statement.
    let err = sqlx::query("SELECT pg_sleep(3)")
        .execute(
            &loansync::db::connect(&{
                let mut s = custom.clone();
                s.db_timeouts.statement = Duration::from_secs(1);
                s
            })
            .await
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("57014"),
        "{err}"
    );
    // Migrations run without the limits and give the connection back with them.
    loansync::db::migrate(&pool).await.unwrap();
    assert_eq!(show(&pool, "SHOW statement_timeout").await, "7s");
    assert_eq!(show(&pool, "SHOW lock_timeout").await, "2s");
}

/// A session holding a lock the settle needs (the fingerprints of delivered records,
/// which a settle writes; the settle shares no row with other chunks' settles any more)
/// makes the settle fail with `lock_timeout` after the configured second instead of
/// waiting: the chunk is requeued, and once the lock goes the sync completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_lock_times_out_the_settle_and_the_settle_comes_back_without_a_second_post() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(
            &db,
            &stub.url(),
            &[
                ("ETL_DB_LOCK_TIMEOUT_SECS", "1"),
                // A settle is retried for this long before it goes back to the queue.
                ("ETL_DB_OUTAGE_WAIT_SECS", "1"),
                ("ETL_DELIVERY_LIMIT", "2"),
            ],
        )
    };
    let pool = loansync::db::connect(&settings).await.unwrap();
    assert_eq!(show(&pool, "SHOW lock_timeout").await, "1s");

    let queue = MemoryQueue::new();
    let officers = request(SyncType::Full, Some(vec![EntityKind::Officer]));
    let PlanOutcome::Planned {
        sync_id, totals, ..
    } = planner::plan_sync(&pool, &settings, &officers, &queue)
        .await
        .unwrap()
    else {
        panic!("not planned")
    };
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE loansync_delivered IN EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();

    // The settle itself fails with lock_not_available.
    let state = loansync::ledger::plan::start_chunk(
        &pool,
        &sync_id,
        EntityKind::Officer,
        0,
        loansync::ledger::plan::Attempt::Read,
    )
    .await
    .unwrap()
    .unwrap();
    let delivered: Vec<(i64, uuid::Uuid)> = state
        .ids
        .iter()
        .map(|&id| (id, uuid::Uuid::new_v4()))
        .collect();
    let err = loansync::ledger::settle::settle_chunk(
        &pool,
        &loansync::ledger::settle::ChunkResult {
            sync_id: &sync_id,
            entity: EntityKind::Officer,
            seq: 0,
            history_id: state.history_id,
            purpose: state.purpose,
            succeeded: &state.ids,
            failed: &[],
            api_response: None,
            delivered: &delivered,
            upsert: loansync::ledger::settle::FingerprintUpsert::plain(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("55P03"),
        "{err}"
    );

    // Every chunk is POSTed and answered; each settle times out, is tried again for a
    // second, then goes back to the queue as a settle job, again and again while the
    // lock is held.
    let ctx = Arc::new(loansync::app::worker_context(&settings, pool.clone()).unwrap());
    let work = tokio::spawn(worker::run_memory(ctx, queue, 3));
    let chunks = |outcome: &str| {
        let series = [("entity", "officer"), ("outcome", outcome)];
        let n = telemetry.value("etl_chunks_total", &series);
        n.expect("every chunk outcome's series exists") as u64
    };
    let planned = u64::try_from(totals.chunks).unwrap();
    wait_for(
        "every chunk's settle to go back to the queue at least twice",
        DEADLINE,
        || async { chunks("requeued") >= 2 * planned },
    )
    .await;
    assert_eq!(chunks("settled"), 0);
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NOT NULL",
    )
    .bind(&sync_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(settled, 0, "nothing settles while the lock is held");
    holder.rollback().await.unwrap();

    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("the in-memory workers finish")
        .unwrap();
    let h = history(&db.pool).await;
    assert_eq!(h[0].status, "completed", "nothing gave up: {h:?}");
    let expected = expected_full(&db.pool).await;
    let got = stub.received();
    assert_eq!(got.ids(EntityKind::Officer), expected[&EntityKind::Officer]);
    // Each chunk was POSTed once: its settle was retried, never the chunk, and no
    // attempt beyond the first was counted (the delivery limit of 2 was never near).
    assert_eq!(got.status_count(200), planned, "a chunk was sent twice");
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM loansync_chunk WHERE sync_id = $1")
            .bind(&sync_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(max_attempts, 1);
    assert_books_balance(&db.pool).await;
}

// ------------------------------------------------------- item 7: unreadable rows, panics

/// One loan and one customer whose `date_created` is `infinity`: sqlx's chrono decoder
/// panics on it (the addition overflows). Returns their ids.
async fn poison_rows(pool: &sqlx::PgPool) -> (i64, i64) {
    let loan: i64 = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_created = 'infinity' \
         WHERE id = (SELECT min(id) FROM loans_ajoloan WHERE is_disbursed) RETURNING id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let customer: i64 = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET date_created = 'infinity' \
         WHERE id = (SELECT max(id) FROM ajo_ajouser WHERE onboarding_complete) RETURNING id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    (loan, customer)
}

async fn assert_unreadable_rows_failed_alone(
    db: &TestDb,
    received: &loansync::stub_api::Received,
    sync_id: &str,
    loan: i64,
    customer: i64,
    expected: &std::collections::BTreeMap<EntityKind, BTreeSet<i64>>,
) {
    let errors: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT e.entity_type, e.entity_id, e.error_code, e.error_message \
         FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id \
         WHERE h.sync_id = $1 ORDER BY e.entity_type",
    )
    .bind(sync_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let codes: Vec<(&str, &str, &str)> = errors
        .iter()
        .map(|(e, id, c, _)| (e.as_str(), id.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        codes,
        vec![
            (
                "customer",
                customer.to_string().as_str(),
                "RECORD_UNREADABLE"
            ),
            ("loan", loan.to_string().as_str(), "RECORD_UNREADABLE"),
        ]
    );
    assert!(
        errors
            .iter()
            .all(|(_, _, _, m)| m.contains("cannot be read")),
        "{errors:?}"
    );
    for e in EntityKind::ALL {
        let bad = match e {
            EntityKind::Loan => Some(loan),
            EntityKind::Customer => Some(customer),
            _ => None,
        };
        let mut want = expected[&e].clone();
        if let Some(b) = bad {
            assert!(want.remove(&b), "{e} {b} is in the selection");
        }
        assert_eq!(
            received.ids(e),
            want,
            "{e}: every readable record delivered, the unreadable one never sent"
        );
    }
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_rows_fail_alone_in_single_process_mode() {
    let db = seeded_db(small()).await;
    let expected = expected_full(&db.pool).await;
    let (loan, customer) = poison_rows(&db.pool).await;
    let stub = stub(Faults::default()).await;
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(&db, &stub.url(), &[])
    };
    let summary =
        loansync::app::sync_in_process(&db.pool, &settings, &request(SyncType::Full, None))
            .await
            .unwrap();
    assert_eq!(
        summary.status,
        Some(loansync::ledger::states::FinalStatus::PartialSuccess)
    );
    assert!(
        telemetry.value("etl_chunk_panics_total", &[]) > Some(0.0),
        "the panics were caught"
    );
    let sync_id = summary.sync_id.unwrap();
    assert_unreadable_rows_failed_alone(&db, &stub.received(), &sync_id, loan, customer, &expected)
        .await;
    // The same process goes on: an incremental sync after it runs to its end.
    let again =
        loansync::app::sync_in_process(&db.pool, &settings, &request(SyncType::Incremental, None))
            .await
            .unwrap();
    assert!(again.status.is_some(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_rows_fail_alone_over_rabbitmq() {
    let db = seeded_db(small()).await;
    let expected = expected_full(&db.pool).await;
    let (loan, customer) = poison_rows(&db.pool).await;
    let p = Pipeline::start(&db, Faults::default(), &[]).await;
    p.trigger(SyncType::Full, "with-unreadable-rows").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success");
    assert_unreadable_rows_failed_alone(
        &db,
        &p.stub.received(),
        &h[0].sync_id,
        loan,
        customer,
        &expected,
    )
    .await;
    // Nothing was dead-lettered (the chunks were settled, not given up), and the
    // workers still consume: a second sync completes its readable records too.
    assert_eq!(
        p.admin.queue_depth(&p.admin.topology.dead).await.unwrap(),
        0
    );
    assert!(p.consumers_running());
    p.trigger(SyncType::Incremental, "after-unreadable-rows")
        .await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert!(
        ["completed", "partial_success"].contains(&h[1].status.as_str()),
        "{}",
        h[1].status
    );
    assert!(p.consumers_running());
    p.stop().await;
}

/// What the worker does with a chunk whose processing panicked: every record of it is
/// settled as `WORKER_PANIC` (so the books balance), the others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_that_panicked_is_settled_as_worker_panic() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let queue = MemoryQueue::new();
    let officers = request(SyncType::Full, Some(vec![EntityKind::Officer]));
    let PlanOutcome::Planned { sync_id, .. } =
        planner::plan_sync(&db.pool, &settings, &officers, &queue)
            .await
            .unwrap()
    else {
        panic!("not planned")
    };
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
    let first = queue.try_pop().unwrap();
    worker::fail_chunk(
        &ctx,
        &first,
        worker::WORKER_PANIC,
        "processing the chunk panicked: boom",
    )
    .await
    .unwrap();
    // Delivered again (the broker redelivers what it had not seen acked): counted once.
    queue.push(first.clone());
    worker::run_memory(ctx, queue, 3).await;

    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT entity_id FROM etl_folder_etlsyncerror WHERE error_code = 'WORKER_PANIC' ORDER BY entity_id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT unnest(ids) FROM loansync_chunk WHERE sync_id = $1 AND entity = 'officer' AND seq = $2",
    )
    .bind(&sync_id)
    .bind(first.seq)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        failed,
        ids.iter().map(i64::to_string).collect::<Vec<_>>(),
        "the panicked chunk's records, once each"
    );
    let h = history(&db.pool).await;
    assert_eq!(h[0].status, "partial_success");
    let mut want = expected_full(&db.pool).await[&EntityKind::Officer].clone();
    for id in &ids {
        want.remove(id);
    }
    assert_eq!(stub.received().ids(EntityKind::Officer), want);
    assert_books_balance(&db.pool).await;
}

// ---------------------------------------------------------------- item 8: the broker

/// Deletes a prefix's queues (declared with `limit`) when dropped.
struct Cleanup(String, u32);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (prefix, limit) = (self.0.clone(), self.1);
        crate::support::run_detached(async move {
            if let Ok(b) = Broker::connect(&amqp_url(), &prefix, limit).await {
                let _ = b.delete_topology().await;
                b.close().await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_whose_confirm_never_comes_fails_after_the_timeout() {
    let proxy = Proxy::start(proxy::upstream_of(&amqp_url()).await, Framing::Amqp).await;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let _cleanup = Cleanup(prefix.clone(), 7);
    let telemetry = Telemetry::fresh();
    let health = BrokerHealth::with_telemetry(telemetry.clone());
    let broker = Broker::connect_with(
        &proxy::through(&amqp_url(), &proxy),
        &prefix,
        7,
        None,
        BrokerOptions {
            confirm_timeout: Duration::from_secs(1),
            health: health.clone(),
        },
    )
    .await
    .unwrap();
    assert!(health.is_ready());
    let plan = broker.topology.plan.clone();
    broker.publish_bytes(&plan, b"{}").await.unwrap();

    assert_eq!(telemetry.value("etl_broker_timeouts_total", &[]), Some(0.0));
    proxy.set(Mode::Paused);
    let err = tokio::time::timeout(DEADLINE, broker.publish_bytes(&plan, b"{}"))
        .await
        .expect("the publish gives up by itself")
        .unwrap_err();
    assert!(
        err.to_string().contains("ETL_PUBLISH_CONFIRM_TIMEOUT_SECS"),
        "{err:#}"
    );
    assert_eq!(telemetry.value("etl_broker_timeouts_total", &[]), Some(1.0));
    proxy.set(Mode::Open);
    broker.publish_bytes(&plan, b"{}").await.unwrap();
    broker.close().await;
}

/// The planner's connection goes through the proxy. While it plans (held on a lock),
/// the proxy stops passing answers: its chunk publishes get no confirm and publishing
/// fails after the confirm timeout, the sync left `running` and not published (its
/// request was recorded and its message acked before); once the proxy passes answers
/// again the planner's housekeeping publishes its jobs again and the sync completes,
/// with nothing lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planning_message_whose_confirms_never_come_is_planned_again() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let proxy = Proxy::start(proxy::upstream_of(&amqp_url()).await, Framing::Amqp).await;
    let direct = Arc::new(settings_for(&db, &stub.url(), &[]));
    // The planner counts in a registry of its own: its timeouts are this test's.
    let planner_telemetry = Telemetry::fresh();
    let planner_settings = Arc::new(Settings {
        telemetry: planner_telemetry.clone(),
        ..settings_for(
            &db,
            &stub.url(),
            &[
                ("AMQP_URL", &proxy::through(&amqp_url(), &proxy)),
                ("ETL_PUBLISH_CONFIRM_TIMEOUT_SECS", "1"),
            ],
        )
    });
    let _cleanup = Cleanup(direct.queue_prefix.clone(), 7);
    let stop = CancellationToken::new();
    let flags: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let planner = tokio::spawn(loansync::app::run_planner(
        db.pool.clone(),
        planner_settings,
        flags[0].clone(),
        stop.clone(),
    ));
    let worker = tokio::spawn(loansync::app::run_worker(
        loansync::db::connect_url(&db.url, 4).await.unwrap(),
        direct.clone(),
        flags[1].clone(),
        stop.clone(),
    ));
    wait_for("consumers up", DEADLINE, || async {
        flags.iter().all(|f| f.load(Ordering::SeqCst))
    })
    .await;

    // Hold the chunk ledger so the planner stops inside its transaction.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE loansync_chunk IN SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let admin = Broker::connect(&amqp_url(), &direct.queue_prefix, 7)
        .await
        .unwrap();
    admin
        .publish_json(
            &admin.topology.plan,
            &[PlanRequest {
                sync_type: SyncType::Full,
                entities: None,
                request_id: Some("confirms-held".into()),
                since: None,
                until: None,
                sweep: false,
            }],
        )
        .await
        .unwrap();
    wait_for("the planner to wait on the lock", DEADLINE, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'loansync_chunk'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    assert_eq!(
        planner_telemetry.value("etl_broker_timeouts_total", &[]),
        Some(0.0)
    );
    proxy.set(Mode::Paused);
    holder.rollback().await.unwrap();
    wait_for("the planner's publish to time out", DEADLINE, || async {
        planner_telemetry.value("etl_broker_timeouts_total", &[]) > Some(0.0)
    })
    .await;
    proxy.set(Mode::Open);

    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    let expected = expected_full(&db.pool).await;
    assert_delivered_all(&stub.received(), &expected);
    assert_books_balance(&db.pool).await;
    wait_for("the planning message to be acked", DEADLINE, || async {
        admin.queue_depth(&admin.topology.plan).await.unwrap() == 0
    })
    .await;
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    stop.cancel();
    planner.await.unwrap().unwrap();
    worker.await.unwrap().unwrap();
    admin.close().await;
}

/// RabbitMQ's `connection.blocked` (slipped in by the proxy, as the broker sends it on
/// a memory or disk alarm) makes the worker's `/readyz` fail and is counted; the
/// unblocking makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_broker_connection_fails_readyz_and_is_counted() {
    let db = TestApp::migrated().await;
    let stub = stub(Faults::default()).await;
    let proxy = Proxy::start(proxy::upstream_of(&amqp_url()).await, Framing::Amqp).await;
    let telemetry = Telemetry::fresh();
    let settings = Arc::new(Settings {
        telemetry: telemetry.clone(),
        ..settings_for(
            &db,
            &stub.url(),
            &[("AMQP_URL", &proxy::through(&amqp_url(), &proxy))],
        )
    });
    let _cleanup = Cleanup(settings.queue_prefix.clone(), 7);
    let stop = CancellationToken::new();
    let consuming = Arc::new(AtomicBool::new(false));
    let health = BrokerHealth::with_telemetry(telemetry.clone());
    let worker = tokio::spawn(loansync::app::run_worker_with(
        db.pool.clone(),
        settings.clone(),
        consuming.clone(),
        health.clone(),
        stop.clone(),
    ));
    let addr = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness {
            pool: db.pool.clone(),
            broker: Some(health.clone()),
            consuming: consuming.clone(),
            stale_after_secs: 900.0,
            telemetry: telemetry.clone(),
        },
    )
    .await
    .unwrap();
    let get = |path: &'static str| {
        let url = format!("http://{addr}{path}");
        async move {
            let r = reqwest::get(&url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    wait_for("ready", DEADLINE, || async {
        get("/readyz").await.0 == 200
    })
    .await;
    assert!(get("/readyz").await.1.contains("broker: true (connected)"));

    assert_eq!(telemetry.value("etl_broker_blocked_total", &[]), Some(0.0));
    proxy.inject(proxy::connection_blocked("low on memory"));
    wait_for("/readyz to fail", DEADLINE, || async {
        let (code, body) = get("/readyz").await;
        code == 503 && body.contains("broker: false (blocked)")
    })
    .await;
    assert_eq!(telemetry.value("etl_broker_blocked_total", &[]), Some(1.0));
    let metrics = get("/metrics").await.1;
    assert!(metrics.contains("etl_broker_blocked_total 1"), "{metrics}");
    assert!(metrics.contains("etl_broker_blocked 1"), "{metrics}");

    proxy.inject(proxy::connection_unblocked());
    wait_for("/readyz to pass again", DEADLINE, || async {
        get("/readyz").await.0 == 200
    })
    .await;
    assert!(consuming.load(Ordering::SeqCst));
    stop.cancel();
    worker.await.unwrap().unwrap();
}

// ------------------------------------------------- item 9: a long database outage

/// The worker reaches PostgreSQL through a proxy that is cut for many outage waits
/// (ETL_DB_OUTAGE_WAIT_SECS=1) with ETL_DELIVERY_LIMIT=2: each chunk is put back far
/// more often than the broker's delivery limit, yet nothing is dead-lettered, no
/// attempt is counted, and once the database is back the sync completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_database_outage_spends_no_delivery() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let proxy = Proxy::start(proxy::upstream_of(&db.url).await, Framing::Raw).await;
    let limit = [
        ("ETL_DELIVERY_LIMIT", "2"),
        ("ETL_DB_OUTAGE_WAIT_SECS", "1"),
    ];
    let planner_settings = Arc::new(settings_for(&db, &stub.url(), &limit));
    // The worker counts in a registry of its own: every count is this test's.
    let telemetry = Telemetry::fresh();
    let worker_settings = Arc::new(Settings {
        telemetry: telemetry.clone(),
        ..settings_for(
            &db,
            &stub.url(),
            &[
                limit[0],
                limit[1],
                ("DATABASE_URL", &proxy::through(&db.url, &proxy)),
                ("ETL_DB_ACQUIRE_TIMEOUT_SECS", "1"),
            ],
        )
    });
    let broker_limit = broker_delivery_limit(2);
    let _cleanup = Cleanup(planner_settings.queue_prefix.clone(), broker_limit);
    let stop = CancellationToken::new();
    let flags: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let planner = tokio::spawn(loansync::app::run_planner(
        db.pool.clone(),
        planner_settings.clone(),
        flags[0].clone(),
        stop.clone(),
    ));
    let worker_pool = loansync::db::connect(&worker_settings).await.unwrap();
    let worker = tokio::spawn(loansync::app::run_worker(
        worker_pool,
        worker_settings.clone(),
        flags[1].clone(),
        stop.clone(),
    ));
    wait_for("consumers up", DEADLINE, || async {
        flags.iter().all(|f| f.load(Ordering::SeqCst))
    })
    .await;

    proxy.set(Mode::Cut);
    let admin = Broker::connect(&amqp_url(), &planner_settings.queue_prefix, broker_limit)
        .await
        .unwrap();
    admin
        .publish_json(
            &admin.topology.plan,
            &[PlanRequest {
                sync_type: SyncType::Full,
                entities: Some(vec![EntityKind::Officer]),
                request_id: Some("outage".into()),
                since: None,
                until: None,
                sweep: false,
            }],
        )
        .await
        .unwrap();
    // Planned: the chunk ledger is written in one transaction, after the history row
    // (waiting for the history row alone raced with it).
    let planned_chunks = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM loansync_chunk")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    wait_for("the sync to be planned", DEADLINE, || async {
        planned_chunks().await > 0
    })
    .await;
    assert_eq!(history(&db.pool).await.len(), 1);
    let chunks = planned_chunks().await;
    assert!(chunks >= 2, "{chunks} chunks");
    let count = |outcome: &str| {
        let series = [("entity", "officer"), ("outcome", outcome)];
        let n = telemetry.value("etl_chunks_total", &series);
        n.expect("every chunk outcome's series exists") as u64
    };
    let republished = || count("republished");
    let requeued = || count("requeued");
    let dead = || async { admin.queue_depth(&admin.topology.dead).await.unwrap() };
    // Every chunk goes round about as often: far past the broker's delivery limit.
    let enough = chunks as u64 * u64::from(broker_limit + 2);
    wait_for(
        "chunks to be put back many times during the outage (or lost)",
        Duration::from_secs(180),
        || async { republished() >= enough || requeued() > 0 || dead().await > 0 },
    )
    .await;
    assert_eq!(
        requeued(),
        0,
        "an unreachable database never requeues (nack)"
    );
    assert_eq!(
        dead().await,
        0,
        "nothing was dead-lettered during the outage"
    );
    proxy.set(Mode::Open);

    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    let expected = expected_full(&db.pool).await;
    assert_eq!(
        stub.received().ids(EntityKind::Officer),
        expected[&EntityKind::Officer]
    );
    let max_attempts: i32 = sqlx::query_scalar("SELECT max(attempts) FROM loansync_chunk")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        max_attempts, 1,
        "the outage spent none of loansync's attempts"
    );
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    assert_books_balance(&db.pool).await;
    eprintln!("republished {} times for {chunks} chunks", republished());
    stop.cancel();
    planner.await.unwrap().unwrap();
    worker.await.unwrap().unwrap();
    admin.close().await;
}
