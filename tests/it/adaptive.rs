//! Adaptive request concurrency and the fleet-wide cap against the real stack: the stub
//! API with a capacity and a latency of its own, PostgreSQL's heartbeat and pause
//! tables, worker processes.

use crate::harness::{
    assert_books_balance, assert_delivered_all, expected_full, seeded_db, settings_for, small,
    stub, wait_syncs_finished, worker_process,
};
use crate::support::wait_for;
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, Record, SyncType};
use loansync::queue::amqp::Broker;
use loansync::sink::gate::{ConcurrencyMode, Gate, GateSettings};
use loansync::sink::{AnalyticsClient, Batch};
use loansync::stub_api::Faults;
use loansync::telemetry::Telemetry;
use loansync::worker::fleet::Fleet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

fn records(first: i64, n: i64) -> Vec<Record> {
    (first..first + n)
        .map(|id| Record {
            id,
            fingerprint: uuid::Uuid::from_u128(id as u128),
            changed_at: None,
            json: loansync::domain::RecordJson::encode(&serde_json::json!({"id": id})).unwrap(),
        })
        .collect()
}

fn batch(records: &[Record], chunk: i32) -> Batch<'_> {
    Batch {
        sync_id: "s-arc",
        sync_type: SyncType::Full,
        entity: EntityKind::Loan,
        chunk,
        records,
    }
}

/// A worker's client and gate as `loansync worker` builds them, on `settings`.
fn worker_client(settings: &Settings, pool: &sqlx::PgPool) -> (AnalyticsClient, Arc<Gate>) {
    let ctx = loansync::app::worker_context(settings, pool.clone()).unwrap();
    let gate = ctx.client.gate().unwrap().clone();
    (ctx.client, gate)
}

/// A client whose adaptive gate starts at `initial` (a worker starts at 1).
fn adaptive_client(settings: &Settings, initial: usize) -> (AnalyticsClient, Arc<Gate>) {
    let api = settings.api().unwrap();
    let gate = Arc::new(Gate::new(
        GateSettings {
            mode: ConcurrencyMode::Adaptive,
            initial,
            max: initial,
            max_pause: api.retry.max_interval,
            burst_pause: api.retry.initial,
            fleet_cap: None,
        },
        Telemetry::fresh(),
    ));
    let client = AnalyticsClient::new(api).unwrap().with_gate(gate.clone());
    (client, gate)
}

/// Keeps `tasks` deliveries going through `client` until `stop`; each its own records.
fn load(
    client: &AnalyticsClient,
    tasks: i64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut chunk = 0;
                while !stop.load(Ordering::SeqCst) {
                    let recs = records(t * 1_000_000 + i64::from(chunk) * 10, 10);
                    client.deliver(&batch(&recs, chunk)).await.unwrap();
                    chunk += 1;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_rises_when_the_api_is_fast_and_falls_when_it_throttles() {
    let db = crate::harness::TestApp::migrated().await;
    let api = stub(Faults {
        latency_ms: 20,
        ..Faults::default()
    })
    .await;
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(
            &db,
            &api.url(),
            &[
                ("ETL_WORKER_CONCURRENCY_MODE", "adaptive"),
                ("ETL_WORKER_CONCURRENCY", "1"),
                ("ETL_WORKER_MAX_CONCURRENCY", "12"),
                ("ETL_RETRY_MAX_ELAPSED_SECS", "30"),
            ],
        )
    };
    let (client, gate) = worker_client(&settings, &db.pool);
    assert_eq!(gate.limit(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&client, 12, &stop);
    // Fast answers whose RTT does not move with the load: +1 per RTT up to the ceiling.
    wait_for("the limit to rise", DEADLINE, || async {
        gate.limit() >= 8 && api.received().max_in_flight >= 6
    })
    .await;
    // Never more than the ceiling at once.
    assert!(api.received().max_in_flight <= 12);
    // The API now serves 2 at once and answers 429 beyond: ×0.9 per RTT down to near 2.
    api.set_faults(Faults {
        latency_ms: 20,
        capacity: 2,
        ..Faults::default()
    });
    wait_for("the limit to fall", DEADLINE, || async {
        gate.limit() <= 3
    })
    .await;
    let limit = telemetry.value("etl_api_concurrency_limit", &[]).unwrap();
    assert!(limit <= 4.0, "the gauge follows the limit: {limit}");
    assert!(
        telemetry
            .value("etl_api_backpressure_total", &[("reason", "status_429")])
            .unwrap()
            >= 1.0
    );
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(api.received().over_capacity >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_workers_retry_after_pauses_the_others() {
    let db = crate::harness::TestApp::migrated().await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(
        &db,
        &api.url(),
        &[
            ("ETL_RETRY_MAX_INTERVAL_SECS", "10"),
            ("ETL_RETRY_MAX_ELAPSED_SECS", "20"),
        ],
    );
    // Two workers of one fleet: each its gate, its heartbeat, the shared pause.
    let (a, gate_a) = worker_client(&settings, &db.pool);
    let (b, gate_b) = worker_client(&settings, &db.pool);
    for gate in [&gate_a, &gate_b] {
        let fleet = Fleet::new(db.pool.clone(), gate.clone(), settings.concurrency.clone());
        gate.set_board(fleet);
    }
    // A's first request is answered 429 with Retry-After: 3 (then the API is healed).
    api.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 3,
        ..Faults::default()
    });
    let a_records = records(1, 5);
    let a_started = tokio::time::Instant::now();
    let a_task = {
        let a = a.clone();
        tokio::spawn(async move { a.deliver(&batch(&a_records, 1)).await.unwrap() })
    };
    // The pause reaches PostgreSQL's one row.
    wait_for("the fleet's pause to be written", DEADLINE, || async {
        let left: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM paused_until - now())::float8 FROM loansync_api_pause",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        left > 0.0
    })
    .await;
    api.set_faults(Faults::default());
    let requests_before_b = api.received().requests();
    // B has seen no 429: it still waits for the pause to end before its request.
    let b_records = records(100, 5);
    let b_report = b.deliver(&batch(&b_records, 2)).await.unwrap();
    let waited = a_started.elapsed();
    assert_eq!(b_report.succeeded.len(), 5);
    assert_eq!(b_report.requests, 1, "B sent once, after the pause");
    assert!(
        waited >= Duration::from_millis(2500),
        "B's request went out before A's Retry-After ended: {waited:?}"
    );
    let a_report = a_task.await.unwrap();
    assert_eq!(a_report.succeeded.len(), 5);
    assert_eq!(api.received().status_count(429), 1);
    assert_eq!(api.received().requests(), requests_before_b + 2);
}

/// Publishes a full sync request.
async fn trigger_full(settings: &Settings) {
    let admin = Broker::connect(&crate::support::amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: Some("arc-full".into()),
        since: None,
        until: None,
        sweep: false,
    };
    admin
        .publish_json(&admin.topology.plan, &[req])
        .await
        .unwrap();
}

/// The live workers' rows: (worker id, share).
async fn live(pool: &sqlx::PgPool) -> Vec<(String, Option<i32>)> {
    sqlx::query_as(
        "SELECT worker_id, fleet_share FROM loansync_worker WHERE expires_at > now() ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `n` worker processes with `env` on the test's database, queues and stub.
fn spawn_workers(
    db: &crate::support::TestDb,
    settings: &Settings,
    api_url: &str,
    n: usize,
    env: &[(&str, &str)],
) -> Vec<tokio::process::Child> {
    (0..n)
        .map(|_| {
            let mut cmd = worker_process(db, settings, api_url);
            cmd.envs(env.iter().copied());
            cmd.spawn().unwrap()
        })
        .collect()
}

/// One full sync by an in-process planner and `workers`, which are then killed: the
/// sync's history row, books checked balanced and every record delivered.
async fn full_sync_by(
    db: &crate::support::TestDb,
    settings: &Arc<Settings>,
    api: &loansync::stub_api::StubHandle,
    workers: Vec<tokio::process::Child>,
) -> crate::harness::History {
    let stop = CancellationToken::new();
    let planner = tokio::spawn(loansync::app::run_planner(
        db.pool.clone(),
        settings.clone(),
        Arc::new(AtomicBool::new(false)),
        stop.clone(),
    ));
    trigger_full(settings).await;
    let mut history = wait_syncs_finished(&db.pool, 1).await;
    assert_delivered_all(&api.received(), &expected_full(&db.pool).await);
    assert_books_balance(&db.pool).await;
    stop.cancel();
    planner.await.unwrap().unwrap();
    for mut w in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    history.swap_remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_wide_cap_is_never_exceeded_by_several_worker_processes() {
    let db = seeded_db(small()).await;
    // Each request is served for 50 ms: requests of several workers overlap.
    let api = stub(Faults {
        latency_ms: 50,
        ..Faults::default()
    })
    .await;
    let settings = Arc::new(settings_for(&db, &api.url(), &[]));
    let workers = spawn_workers(
        &db,
        &settings,
        &api.url(),
        3,
        &[
            ("ETL_WORKER_CONCURRENCY_MODE", "adaptive"),
            ("ETL_WORKER_MAX_CONCURRENCY", "8"),
            ("ANALYTICS_MAX_IN_FLIGHT", "4"),
            ("ETL_WORKER_HEARTBEAT_SECS", "1"),
        ],
    );
    // 4 among 3: one or two each, the extra one with the first.
    wait_for("three workers with their shares", DEADLINE, || async {
        let rows = live(&db.pool).await;
        rows.len() == 3
            && rows
                .iter()
                .all(|r| r.1.is_some_and(|s| (1..=2).contains(&s)))
    })
    .await;
    let sync = full_sync_by(&db, &settings, &api, workers).await;
    assert_eq!(sync.status, "completed");
    let received = api.received();
    assert!(
        received.max_in_flight <= 4,
        "the fleet had {} requests in flight; the cap is 4",
        received.max_in_flight
    );
    assert!(received.max_in_flight >= 2, "the workers sent in parallel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_while_holding_its_share_frees_it() {
    let db = crate::harness::TestApp::migrated().await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let fleet_env = [
        ("ANALYTICS_MAX_IN_FLIGHT", "6"),
        ("ETL_WORKER_HEARTBEAT_SECS", "1"),
    ];
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut cmd = worker_process(&db, &settings, &api.url());
        cmd.envs(fleet_env);
        workers.push(cmd.spawn().unwrap());
    }
    wait_for("two workers holding 3 each", DEADLINE, || async {
        let rows = live(&db.pool).await;
        rows.len() == 2 && rows.iter().all(|r| r.1 == Some(3))
    })
    .await;
    // SIGKILL: no goodbye, its row stays until it expires (three heartbeats).
    let mut killed = workers.remove(0);
    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    wait_for("the survivor to take the whole cap", DEADLINE, || async {
        let rows = live(&db.pool).await;
        rows.len() == 1 && rows[0].1 == Some(6)
    })
    .await;
    for mut w in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_larger_than_its_cap_takes_turns_and_loses_nothing() {
    let db = seeded_db(small()).await;
    let api = stub(Faults {
        latency_ms: 20,
        ..Faults::default()
    })
    .await;
    let settings = Arc::new(settings_for(&db, &api.url(), &[]));
    // Four workers, two requests in flight for the whole fleet: at any instant two
    // workers hold a request slot and two hold none. A worker whose share stayed 0 would
    // keep its chunks until their deadline (20 s) and fail them.
    let workers = spawn_workers(
        &db,
        &settings,
        &api.url(),
        4,
        &[
            ("ANALYTICS_MAX_IN_FLIGHT", "2"),
            ("ETL_WORKER_CONCURRENCY", "2"),
            ("ETL_WORKER_HEARTBEAT_SECS", "1"),
            ("ETL_RETRY_MAX_ELAPSED_SECS", "20"),
        ],
    );
    wait_for("four workers live", DEADLINE, || async {
        live(&db.pool).await.len() == 4
    })
    .await;
    let sync = full_sync_by(&db, &settings, &api, workers).await;
    assert_eq!(
        sync.status, "completed",
        "every chunk was sent in time: {sync:?}"
    );
    let received = api.received();
    assert!(
        received.max_in_flight <= 2,
        "the fleet had {} requests in flight; the cap is 2",
        received.max_in_flight
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_adaptive_workers_429_lowers_every_workers_share_without_a_pause() {
    let db = crate::harness::TestApp::migrated().await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(
        &db,
        &api.url(),
        &[
            ("ETL_WORKER_CONCURRENCY_MODE", "adaptive"),
            ("ETL_WORKER_CONCURRENCY", "8"),
            ("ETL_WORKER_MAX_CONCURRENCY", "8"),
            ("ETL_RETRY_MAX_ELAPSED_SECS", "20"),
            ("ETL_WORKER_HEARTBEAT_SECS", "1"),
        ],
    );
    // Two adaptive workers of one fleet, each its gate and heartbeat, one board; their
    // controllers have reached 8 each.
    let (a, gate_a) = adaptive_client(&settings, 8);
    let (b, gate_b) = adaptive_client(&settings, 8);
    let beating = CancellationToken::new();
    let mut heartbeats = Vec::new();
    for gate in [&gate_a, &gate_b] {
        let fleet = Fleet::new(db.pool.clone(), gate.clone(), settings.concurrency.clone());
        gate.set_board(fleet.clone());
        heartbeats.push(tokio::spawn(fleet.run(beating.clone())));
    }
    wait_for("two workers live", DEADLINE, || async {
        live(&db.pool).await.len() == 2
    })
    .await;
    // No fleet limit yet: each worker its own limit, whatever its heartbeats say.
    b.deliver(&batch(&records(1, 5), 1)).await.unwrap();
    assert_eq!(gate_b.fleet_limit().limit, None);
    assert_eq!(gate_b.limit(), 8);
    // A's first request is answered 429.
    api.set_faults(Faults {
        fail_next: 1,
        fail_next_status: 429,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let a_report = a.deliver(&batch(&records(100, 5), 2)).await.unwrap();
    assert_eq!(a_report.succeeded.len(), 5);
    assert_eq!(api.received().status_count(429), 1);
    // The board: from what the two allowed together (16) to 14; no pause.
    let (limit, generation, paused): (Option<i32>, i64, bool) = sqlx::query_as(
        "SELECT fleet_limit, limit_generation, paused_until > now() FROM loansync_api_pause",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((limit, generation, paused), (Some(14), 1, false));
    // B, which saw no 429, takes its share of 14 at its next read of the board, once its
    // heartbeats of the last 1.5 periods (1 s) all see two live workers.
    wait_for(
        "B to take its share of the fleet's limit",
        DEADLINE,
        || async {
            b.deliver(&batch(&records(200, 5), 3)).await.unwrap();
            gate_b.fleet_limit().limit == Some(14) && gate_b.limit() == 7
        },
    )
    .await;
    assert_eq!(gate_a.limit(), 7, "A's share of 14 among 2");
    beating.cancel();
    for h in heartbeats {
        h.await.unwrap();
    }
}
