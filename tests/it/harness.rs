//! The shared test harness: a [`TestApp`] that owns a database and the queue names of
//! one test and deletes both when dropped, the stub API, settings, processes, and the
//! assertions most tests end with (every expected id delivered, the books balance).

use crate::support::{TestDb, amqp_url, wait_for};
use loansync::app::SyncReport;
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::queue::amqp::Broker;
use loansync::seed::{self, SeedSpec};
use loansync::stub_api::{self, Faults, StubConfig, StubHandle};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "test-key-not-secret";
const DEADLINE: Duration = Duration::from_secs(60);

/// One test's world, as zero-to-production's `TestApp`: a database of its own (the Django
/// source schema, loansync's migrations when asked) and queue names of its own
/// (`ETL_QUEUE_PREFIX`), BOTH deleted when it is dropped, whether the test passed or
/// panicked half-way. Derefs to its [`TestDb`] (`app.pool`, `app.url`, `&app` where a
/// `&TestDb` is wanted).
pub struct TestApp {
    /// Dropped after [`TestApp`]'s own `Drop` has deleted the queues.
    pub db: TestDb,
    /// This test's `ETL_QUEUE_PREFIX` (the one [`settings_for`] uses).
    pub queue_prefix: String,
}

impl TestApp {
    /// An empty database holding the Django source schema, not yet migrated.
    pub async fn with_source_schema() -> TestApp {
        Self::own(TestDb::with_source_schema().await)
    }

    /// The source schema plus loansync's migrations.
    pub async fn migrated() -> TestApp {
        Self::own(TestDb::migrated().await)
    }

    fn own(db: TestDb) -> TestApp {
        let queue_prefix = db.queue_prefix();
        TestApp { db, queue_prefix }
    }

    /// A full sync of every entity run to its end in this process, as `loansync sync` does.
    pub async fn full_sync_in_process(&self, settings: &Settings) -> SyncReport {
        loansync::app::sync_in_process(&self.db.pool, settings, &full_request())
            .await
            .expect("full sync in process")
    }
}

impl std::ops::Deref for TestApp {
    type Target = TestDb;

    fn deref(&self) -> &TestDb {
        &self.db
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // The queues first (the database is dropped right after, with its field).
        delete_queues(&self.queue_prefix);
    }
}

/// Deletes the plan, chunk and dead-letter queues of `prefix`, from a `Drop` too: on a
/// thread of its own with its own runtime and connection (the test's runtime may be
/// blocked there). Deleting a queue that was never declared is not an error.
pub fn delete_queues(prefix: &str) {
    let prefix = prefix.to_string();
    crate::support::run_detached(async move {
        if let Ok(b) = Broker::connect(&amqp_url(), &prefix, 7).await {
            let _ = b.delete_topology().await;
            b.close().await;
        }
    });
}

/// A full sync of every entity, no request id, no window given.
pub fn full_request() -> PlanRequest {
    PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

/// Every id the filters select was delivered to the stub (`expected`: [`expected_full`]),
/// and nothing else.
pub fn assert_delivered_all(
    received: &loansync::stub_api::Received,
    expected: &BTreeMap<EntityKind, BTreeSet<i64>>,
) {
    for e in EntityKind::ALL {
        assert_eq!(
            &received.ids(e),
            &expected[&e],
            "{e}: ids delivered differ from the filters"
        );
    }
}

/// The stub analytics API on a loopback port of its own, accepting [`KEY`].
pub async fn stub(faults: Faults) -> StubHandle {
    stub_api::spawn(
        StubConfig {
            api_key: KEY.into(),
            faults,
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("stub api")
}

/// A `loansync worker` process on this test's database, queues and stub, with the test
/// chunk sizes; the caller adds what differs.
pub fn worker_process(db: &TestDb, settings: &Settings, api_url: &str) -> tokio::process::Command {
    let mut cmd = loansync_process(db, settings, api_url);
    cmd.arg("worker");
    cmd
}

/// The `loansync` binary on this test's database, queues and stub, with the test chunk
/// sizes; the caller adds the command and what differs.
pub fn loansync_process(
    db: &TestDb,
    settings: &Settings,
    api_url: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"));
    cmd.env("DATABASE_URL", &db.url)
        .env("AMQP_URL", amqp_url())
        .env("ETL_QUEUE_PREFIX", &settings.queue_prefix)
        .env("ANALYTICS_API_URL", api_url)
        .env("ANALYTICS_API_KEY", KEY)
        .env("ETL_BATCH_SIZE_LOANS", "20")
        .env("ETL_BATCH_SIZE_REPAYMENTS", "50")
        .env("ETL_BATCH_SIZE_CUSTOMERS", "30")
        .env("ETL_BATCH_SIZE_OFFICERS", "10")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

/// A small deterministic dataset: every user type, onboarded and not, disbursed and not.
pub fn small() -> SeedSpec {
    SeedSpec {
        users: 40,
        customers: 120,
        loans: 150,
        repayments: 420,
        seed: 11,
    }
}

/// Settings pointing at this test's database, queues and stub, with tiny retry delays.
pub fn settings_for(db: &TestDb, api_url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = [
        ("DATABASE_URL", db.url.as_str()),
        ("ANALYTICS_API_URL", api_url),
        ("ANALYTICS_API_KEY", KEY),
        ("ETL_RETRY_INITIAL_MS", "10"),
        ("ETL_RETRY_MAX_INTERVAL_SECS", "1"),
        ("ETL_RETRY_MAX_ELAPSED_SECS", "5"),
        ("ETL_HTTP_TIMEOUT_SECS", "5"),
        ("ETL_WORKER_CONCURRENCY", "3"),
        ("ETL_BATCH_SIZE_LOANS", "20"),
        ("ETL_BATCH_SIZE_REPAYMENTS", "50"),
        ("ETL_BATCH_SIZE_CUSTOMERS", "30"),
        ("ETL_BATCH_SIZE_OFFICERS", "10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("AMQP_URL".into(), amqp_url());
    env.insert("ETL_QUEUE_PREFIX".into(), db.queue_prefix());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings")
}

/// A seeded, migrated database with every seeded timestamp moved a day back, so that
/// nothing falls inside the incremental overlap of a sync run right now.
pub async fn seeded_db(spec: SeedSpec) -> TestApp {
    let db = TestApp::migrated().await;
    seed::seed(&db.pool, spec).await.expect("seed");
    sqlx::raw_sql(
        "UPDATE ajo_ajouser SET date_modified = date_modified - interval '1 day', date_created = date_created - interval '1 day';
         UPDATE loans_ajoloan SET date_modified = date_modified - interval '1 day', date_created = date_created - interval '1 day';
         UPDATE loans_ajoloanschedule SET date_created = date_created - interval '1 day', date_modified = date_modified - interval '1 day';
         UPDATE loans_ajoloanrepayment SET date_created = date_created - interval '1 day', date_modified = date_modified - interval '1 day';",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db
}

/// The ids a sync must send, computed straight from SPEC.md section 2's filters.
pub async fn expected_full(pool: &sqlx::PgPool) -> BTreeMap<EntityKind, BTreeSet<i64>> {
    let q = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect::<BTreeSet<i64>>()
    };
    BTreeMap::from([
        (
            EntityKind::Officer,
            q(
                "SELECT id::int8 FROM accounts_customuser WHERE user_type IN \
               ('AGENT','STAFF_AGENT','PROSPER_AGENT','DMO_AGENT','AJO_AGENT','RECOVERY_AGENT')",
            )
            .await,
        ),
        (
            EntityKind::Customer,
            q("SELECT id::int8 FROM ajo_ajouser WHERE onboarding_complete").await,
        ),
        (
            EntityKind::Loan,
            q("SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed").await,
        ),
        (
            EntityKind::Repayment,
            q("SELECT id::int8 FROM loans_ajoloanrepayment").await,
        ),
    ])
}

/// The history row of a sync.
#[derive(Debug, sqlx::FromRow)]
pub struct History {
    pub id: i32,
    pub sync_id: String,
    pub sync_type: String,
    pub status: String,
    pub sync_end_date: Option<chrono::DateTime<chrono::Utc>>,
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
    pub duration_seconds: Option<f64>,
    pub error_message: Option<String>,
    pub total_loans: i32,
    pub loans_success: i32,
    pub loans_failed: i32,
    pub total_repayments: i32,
    pub repayments_success: i32,
    pub repayments_failed: i32,
    pub total_customers: i32,
    pub customers_success: i32,
    pub customers_failed: i32,
    pub total_officers: i32,
    pub officers_success: i32,
    pub officers_failed: i32,
}

impl History {
    pub fn counts(&self, e: EntityKind) -> (i32, i32, i32) {
        match e {
            EntityKind::Loan => (self.total_loans, self.loans_success, self.loans_failed),
            EntityKind::Repayment => (
                self.total_repayments,
                self.repayments_success,
                self.repayments_failed,
            ),
            EntityKind::Customer => (
                self.total_customers,
                self.customers_success,
                self.customers_failed,
            ),
            EntityKind::Officer => (
                self.total_officers,
                self.officers_success,
                self.officers_failed,
            ),
        }
    }
}

pub async fn history(pool: &sqlx::PgPool) -> Vec<History> {
    sqlx::query_as("SELECT * FROM etl_folder_etlsynchistory ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The books balance: for every finished sync and entity, success + failed == total,
/// and the failed count equals the error rows written for it (except for a sync that
/// failed fast, which writes none); and the finalize found them balanced too.
pub async fn assert_books_balance(pool: &sqlx::PgPool) {
    // The finalize's own check of the books agreed (`ledger::books`).
    let unbalanced: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT sync_id::text, books_unbalanced FROM loansync_sync WHERE books_unbalanced IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        unbalanced.is_empty(),
        "finalize found books unbalanced: {unbalanced:?}"
    );
    for h in history(pool).await {
        assert!(
            ["completed", "partial_success", "failed"].contains(&h.status.as_str()),
            "sync {} left {}",
            h.sync_id,
            h.status
        );
        assert!(h.completed_at.is_some() && h.duration_seconds.is_some());
        for e in EntityKind::ALL {
            let (total, ok, failed) = h.counts(e);
            assert_eq!(
                ok + failed,
                total,
                "sync {} {e}: {ok} + {failed} != {total}",
                h.sync_id
            );
            let rows: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT entity_id) FROM etl_folder_etlsyncerror WHERE sync_history_id = $1 AND entity_type = $2",
            )
            .bind(h.id)
            .bind(e.as_str())
            .fetch_one(pool)
            .await
            .unwrap();
            let fast_failed = h
                .error_message
                .as_deref()
                .is_some_and(|m| m.contains("refused the credentials"));
            // A retry sync bumps the rows of the syncs that first failed instead.
            // (A history row of its own, like a watermark set by hand, has no loansync_sync.)
            let retry: bool = sqlx::query_scalar(
                "SELECT purpose = 'retry' FROM loansync_sync WHERE sync_id = $1",
            )
            .bind(&h.sync_id)
            .fetch_optional(pool)
            .await
            .unwrap()
            .unwrap_or(false);
            if !fast_failed && !retry {
                assert_eq!(
                    rows,
                    i64::from(failed),
                    "sync {} {e}: error rows vs failed",
                    h.sync_id
                );
            }
        }
    }
}

/// The stub API, a planner and two workers on RabbitMQ ([`InProcess`]), and an admin
/// connection to publish with.
pub struct Pipeline {
    pub stub: StubHandle,
    running: InProcess,
    pub admin: Broker,
}

impl Pipeline {
    pub async fn start(db: &TestDb, faults: Faults, extra: &[(&str, &str)]) -> Pipeline {
        let stub = stub(faults).await;
        let settings = Arc::new(settings_for(db, &stub.url(), extra));
        let running = InProcess::start(db, &settings).await;
        let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
            .await
            .expect("broker");
        Pipeline {
            stub,
            running,
            admin,
        }
    }

    /// Publishes a planning message, as `loansync trigger` does.
    pub async fn trigger(&self, sync_type: SyncType, request_id: &str) {
        let req = PlanRequest {
            sync_type,
            entities: None,
            request_id: Some(request_id.into()),
            since: None,
            until: None,
            sweep: false,
        };
        self.admin
            .publish_json(&self.admin.topology.plan, &[req])
            .await
            .unwrap();
    }

    /// True while the planner and both workers are consuming.
    pub fn consumers_running(&self) -> bool {
        self.running
            .consuming
            .iter()
            .all(|f| f.load(Ordering::SeqCst))
    }

    /// Stops every component; the queues go with the test's [`TestApp`].
    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Waits until `n` syncs exist and all are finished.
pub async fn wait_syncs_finished(pool: &sqlx::PgPool, n: usize) -> Vec<History> {
    wait_for("syncs to finish", DEADLINE, || async {
        let h = history(pool).await;
        h.len() >= n
            && h.iter()
                .all(|h| ["completed", "partial_success", "failed"].contains(&h.status.as_str()))
    })
    .await;
    history(pool).await
}

/// A planner and two workers in this process, each on its own broker connection (and
/// the workers on their own database pools), as separate processes would be, with the
/// `/readyz` of the first worker. Their queues go with the test's [`TestApp`].
pub struct InProcess {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), loansync::app::AppError>>>,
    /// Consumer flags: the planner's, then each worker's.
    pub consuming: Vec<Arc<AtomicBool>>,
    readyz: String,
}

impl InProcess {
    pub async fn start(db: &TestDb, settings: &Arc<Settings>) -> InProcess {
        let stop = CancellationToken::new();
        let consuming: Vec<Arc<AtomicBool>> =
            (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let mut tasks = vec![tokio::spawn(loansync::app::run_planner(
            db.pool.clone(),
            settings.clone(),
            consuming[0].clone(),
            stop.clone(),
        ))];
        for flag in &consuming[1..] {
            // Each worker has a pool of its own, as a worker process would.
            let pool = loansync::db::connect_url(&db.url, 4).await.unwrap();
            tasks.push(tokio::spawn(loansync::app::run_worker(
                pool,
                settings.clone(),
                flag.clone(),
                stop.clone(),
            )));
        }
        let addr = http::serve(
            "127.0.0.1:0".parse().unwrap(),
            Readiness {
                pool: loansync::db::connect_url(&db.url, 2).await.unwrap(),
                broker: None,
                consuming: consuming[1].clone(),
                stale_after_secs: 900.0,
                telemetry: settings.telemetry.clone(),
            },
        )
        .await
        .unwrap();
        wait_for("consumers up", Duration::from_secs(20), || async {
            consuming.iter().all(|f| f.load(Ordering::SeqCst))
        })
        .await;
        InProcess {
            stop,
            tasks,
            consuming,
            readyz: format!("http://{addr}/readyz"),
        }
    }

    pub async fn readyz(&self) -> (u16, String) {
        match reqwest::get(&self.readyz).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A session that holds `loansync_sync_entity` exclusively: a planner that claimed its
/// sync stops there, inside the plan, holding the planning lock.
pub async fn hold_plans(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE loansync_sync_entity IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Sessions of this test's database waiting on a lock of `locktype` (`relation`,
/// `advisory`, `transactionid`, … or `any`).
pub async fn waiting(pool: &sqlx::PgPool, locktype: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE NOT l.granted AND a.datname = current_database() AND ($1 = 'any' OR l.locktype = $1)",
    )
    .bind(locktype)
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn planning_syncs(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM loansync_sync WHERE state = 'planning'")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn wait_planner_held(db: &TestDb) {
    wait_for("a planner held inside its plan", DEADLINE, || async {
        planning_syncs(&db.pool).await == 1 && waiting(&db.pool, "relation").await >= 1
    })
    .await;
}
