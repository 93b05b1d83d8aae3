//! The sync pipeline end to end: planner → RabbitMQ → two workers → the stub analytics
//! API on a loopback port, against a real PostgreSQL database of the test's own.

use crate::support::{TestDb, amqp_url, wait_for};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::Broker;
use loansync::queue::memory::MemoryQueue;
use loansync::seed::{self, SeedSpec};
use loansync::stub_api::{self, Faults, StubConfig, StubHandle};
use loansync::worker::{self, ChunkOutcome};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "test-key-not-secret";
const DEADLINE: Duration = Duration::from_secs(60);

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
pub async fn seeded_db(spec: SeedSpec) -> TestDb {
    let db = TestDb::migrated().await;
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
/// failed fast, which writes none).
pub async fn assert_books_balance(pool: &sqlx::PgPool) {
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

    /// Stops every component; the queues go when the pipeline is dropped.
    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Deletes the queues of a prefix when dropped, so that they go even when the test
/// failed half-way.
pub struct Queues(pub String);

impl Drop for Queues {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        // The test's runtime may be blocked in this Drop: use a connection of our own.
        crate::support::run_detached(async move {
            if let Ok(b) = Broker::connect(&amqp_url(), &prefix, 7).await {
                let _ = b.delete_topology().await;
                b.close().await;
            }
        });
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

fn ids(set: &BTreeMap<EntityKind, BTreeSet<i64>>, e: EntityKind) -> &BTreeSet<i64> {
    &set[&e]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_then_incremental_over_rabbitmq() {
    let db = seeded_db(small()).await;
    let expected = expected_full(&db.pool).await;
    // The seed covers what the filters must tell apart.
    let mixed: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE user_type = 'AGENT' AND account_type = 'KEY_ACCOUNT'), \
                count(*) FILTER (WHERE user_type = 'MERCHANT') FROM accounts_customuser",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        mixed.0 > 0 && mixed.1 > 0,
        "seed lacks officer variety: {mixed:?}"
    );

    let p = Pipeline::start(&db, Faults::default(), &[]).await;
    p.trigger(SyncType::Full, "full-1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let received = p.stub.received();
    assert_eq!(received.forbidden, 0, "a never-send key reached the API");
    assert!(received.status_count(422) == 0 && received.status_count(400) == 0);
    for e in EntityKind::ALL {
        let got: BTreeSet<i64> = received.ids(e);
        assert_eq!(
            &got,
            ids(&expected, e),
            "{e}: ids sent differ from the filters"
        );
        let (total, ok, failed) = h[0].counts(e);
        assert_eq!(
            (total, ok, failed),
            (got.len() as i32, got.len() as i32, 0),
            "{e}"
        );
    }
    // Watermarks moved to the window's end.
    let marks: Vec<(String, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT entity_type::text, last_sync_timestamp, last_sync_id::text FROM etl_folder_etllastsync ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(marks.len(), 4);
    for (_, ts, id) in &marks {
        assert_eq!(Some(*ts), h[0].sync_end_date);
        assert_eq!(id, &h[0].sync_id);
    }

    // Change some rows; the incremental sync sends exactly those (officers: all).
    let changed_loans: Vec<i64> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() WHERE id IN (3, 4, 5) RETURNING id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let onboarded_changed: Vec<i64> = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET date_modified = now() WHERE id IN \
         (SELECT id FROM ajo_ajouser WHERE onboarding_complete ORDER BY id LIMIT 2) RETURNING id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE ajo_ajouser SET date_modified = now() WHERE id = \
         (SELECT min(id) FROM ajo_ajouser WHERE NOT onboarding_complete)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A new repayment: sent, and so is its loan (its `repayments` aggregate changed).
    let (new_repayment, its_loan): (i64, i64) = sqlx::query_as(
        "INSERT INTO loans_ajoloanrepayment (repayment_type, loan_amount, repayment_amount, health_insurance, paid_date, \
         repayment_ref, settlement_status, repayment_meta_response, ledger_amount, comment, borrower_notified, sms_body, \
         sms_result, marked_as, expected_recovery_amt, applied_to_loan, date_created, date_modified, agent_id, ajo_loan_id, borrower_id) \
         SELECT 'CASH', 1, 2, 0, now(), gen_random_uuid(), false, NULL, 0, NULL, false, NULL, NULL, NULL, 0, NULL, now(), now(), \
                agent_id, id, borrower_id FROM loans_ajoloan WHERE is_disbursed ORDER BY id LIMIT 1 \
         RETURNING id::int8, ajo_loan_id::int8",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let before = p.stub.received();
    p.trigger(SyncType::Incremental, "incr-1").await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h[1].sync_type, "incremental");
    assert_eq!(h[1].status, "completed", "{:?}", h[1].error_message);
    let after = p.stub.received();
    let sent_now = |e: EntityKind| -> BTreeSet<i64> { after.ids_sent_since(&before, e) };
    assert_eq!(
        sent_now(EntityKind::Loan),
        changed_loans.into_iter().chain([its_loan]).collect()
    );
    assert_eq!(
        sent_now(EntityKind::Customer),
        onboarded_changed.into_iter().collect()
    );
    assert_eq!(
        sent_now(EntityKind::Repayment),
        BTreeSet::from([new_repayment])
    );
    assert_eq!(
        &sent_now(EntityKind::Officer),
        ids(&expected, EntityKind::Officer)
    );
    let wm: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(Some(wm), h[1].sync_end_date);
    assert!(h[1].sync_end_date > h[0].sync_end_date);

    // A repeated request id plans nothing new.
    p.trigger(SyncType::Full, "full-1").await;
    p.trigger(SyncType::Incremental, "incr-2").await;
    let h = wait_syncs_finished(&db.pool, 3).await;
    assert_eq!(h.len(), 3, "the repeated request id planned a sync");
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_records_give_error_rows_then_resolve() {
    let db = seeded_db(small()).await;
    let faults = Faults {
        reject_every_nth: 7,
        ..Default::default()
    };
    let p = Pipeline::start(&db, faults, &[]).await;
    p.trigger(SyncType::Full, "r1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success");
    assert!(
        h[0].error_message
            .as_deref()
            .unwrap_or("")
            .contains("failed")
    );
    let expected = expected_full(&db.pool).await;
    for e in EntityKind::ALL {
        let want: BTreeSet<String> = expected[&e]
            .iter()
            .filter(|id| *id % 7 == 0)
            .map(|id| id.to_string())
            .collect();
        let got: BTreeSet<String> = sqlx::query_scalar(
            "SELECT entity_id::text FROM etl_folder_etlsyncerror WHERE entity_type = $1 AND NOT resolved",
        )
        .bind(e.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(got, want, "{e}: error rows");
        assert_eq!(h[0].counts(e).2 as usize, want.len());
    }
    let details: serde_json::Value =
        sqlx::query_scalar("SELECT error_details FROM etl_folder_etlsyncerror ORDER BY id LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(details.get("http_status").is_some(), "{details}");

    // The API recovers; the next full sync delivers them and resolves their error rows.
    p.stub.set_faults(Faults::default());
    p.trigger(SyncType::Full, "r2").await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h[1].status, "completed");
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved OR resolved_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_errors_are_retried_and_a_refused_batch_is_halved() {
    let db = seeded_db(small()).await;
    let bad_loan: i64 = sqlx::query_scalar(
        "SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed ORDER BY id OFFSET 7 LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let faults = Faults {
        fail_next: 4,
        fail_next_status: 503,
        rate_429: 0.1,
        retry_after_secs: 1,
        refuse_ids: vec![bad_loan],
        seed: 3,
        ..Default::default()
    };
    let p = Pipeline::start(&db, faults, &[]).await;
    p.trigger(SyncType::Full, "t1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success", "{:?}", h[0].error_message);
    // The stub refuses the id in any entity's batch: exactly that record fails in each
    // entity that has it, and its 99 neighbours go through.
    let expected = expected_full(&db.pool).await;
    for e in EntityKind::ALL {
        let expect_failed = i32::from(expected[&e].contains(&bad_loan));
        assert_eq!(h[0].counts(e).2, expect_failed, "{e}");
    }
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT entity_type::text, entity_id::text, error_code::text FROM etl_folder_etlsyncerror",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(rows.iter().any(|(e, _, _)| e == "loan"));
    for (_, id, code) in &rows {
        assert_eq!(id, &bad_loan.to_string());
        assert_eq!(code.as_deref(), Some("RECORD_REFUSED"));
    }
    let stats = p.stub.received();
    assert!(stats.status_count(503) >= 4, "the 503s were not seen");
    assert!(stats.status_count(429) >= 1, "no 429 was answered");
    assert!(!stats.ids(EntityKind::Loan).contains(&bad_loan));
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_credentials_fail_the_sync_fast() {
    let db = seeded_db(small()).await;
    let p = Pipeline::start(
        &db,
        Faults::default(),
        &[("ANALYTICS_API_KEY", "wrong-key")],
    )
    .await;
    p.trigger(SyncType::Full, "u1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "failed");
    assert!(
        h[0].error_message
            .as_deref()
            .unwrap_or("")
            .contains("credentials")
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no error row per record on rejected credentials");
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(marks, 0, "a failed sync moves no watermark");
    // Fail fast: far fewer requests than chunks.
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        (p.stub.received().status_count(401) as i64) < chunks / 2,
        "remaining chunks were still sent"
    );
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

/// Worker and planner driven directly (no broker): the units the loops are made of.
mod units {
    use super::*;

    async fn stub() -> StubHandle {
        crate::pipeline::stub(Faults::default()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_same_chunk_job_delivered_twice_counts_once() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let queue = MemoryQueue::new();
        let req = PlanRequest {
            sync_type: SyncType::Full,
            entities: None,
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        };
        let PlanOutcome::Planned { totals, .. } =
            planner::plan_sync(&db.pool, &settings, &req, &queue)
                .await
                .unwrap()
        else {
            panic!("not planned")
        };
        let ctx = loansync::app::worker_context(&settings, db.pool.clone()).unwrap();
        let mut settled = 0;
        let mut duplicates = 0;
        while let Some(job) = queue.try_pop() {
            // Two deliveries of the same job racing each other, then a third one late.
            let (a, b) = tokio::join!(
                worker::process_chunk(&ctx, &job),
                worker::process_chunk(&ctx, &job)
            );
            let late = worker::process_chunk(&ctx, &job).await.unwrap();
            assert_eq!(late, ChunkOutcome::Duplicate);
            for o in [a.unwrap(), b.unwrap()] {
                match o {
                    ChunkOutcome::Settled { .. } => settled += 1,
                    ChunkOutcome::Duplicate => duplicates += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(settled, totals.chunks);
        assert_eq!(duplicates, totals.chunks);
        let h = history(&db.pool).await;
        assert_eq!(h[0].status, "completed");
        for (e, n) in &totals.records {
            assert_eq!(h[0].counts(*e), (*n as i32, *n as i32, 0), "{e}");
        }
        assert_books_balance(&db.pool).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_planning_messages_at_once_yield_one_sync() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let queue = MemoryQueue::new();
        let req = |id: &str| PlanRequest {
            sync_type: SyncType::Full,
            entities: None,
            request_id: Some(id.into()),
            since: None,
            until: None,
            sweep: false,
        };
        let (r1, r2) = (req("a"), req("b"));
        let (a, b) = tokio::join!(
            planner::plan_sync(&db.pool, &settings, &r1, &queue),
            planner::plan_sync(&db.pool, &settings, &r2, &queue)
        );
        let outcomes = [a.unwrap(), b.unwrap()];
        let planned = outcomes
            .iter()
            .filter(|o| matches!(o, PlanOutcome::Planned { .. }))
            .count();
        let busy = outcomes
            .iter()
            .filter(|o| matches!(o, PlanOutcome::Busy { .. }))
            .count();
        assert_eq!((planned, busy), (1, 1), "{outcomes:?}");
        assert_eq!(history(&db.pool).await.len(), 1);
        // While it runs, a third message is refused too; a repeated id plans nothing.
        let c = planner::plan_sync(&db.pool, &settings, &req("c"), &queue)
            .await
            .unwrap();
        assert!(matches!(c, PlanOutcome::Busy { .. }), "{c:?}");
        let again = planner::plan_sync(&db.pool, &settings, &req("a"), &queue)
            .await
            .unwrap();
        assert!(
            matches!(
                again,
                PlanOutcome::Duplicate { .. } | PlanOutcome::Busy { .. }
            ),
            "{again:?}"
        );
        assert_eq!(history(&db.pool).await.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn single_process_mode_syncs_the_same_rows() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let expected = expected_full(&db.pool).await;
        let req = PlanRequest {
            sync_type: SyncType::Full,
            entities: None,
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        };
        let summary = loansync::app::sync_in_process(&db.pool, &settings, &req)
            .await
            .unwrap();
        assert_eq!(summary.exit_code(), 0, "{}", summary.render());
        let received = stub.received();
        for e in EntityKind::ALL {
            assert_eq!(&received.ids(e), &expected[&e], "{e}");
        }
        // Nothing to send: completes at once, zero counters, watermarks still move.
        let only_loans = PlanRequest {
            sync_type: SyncType::Incremental,
            entities: Some(vec![EntityKind::Loan]),
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        };
        let s2 = loansync::app::sync_in_process(&db.pool, &settings, &only_loans)
            .await
            .unwrap();
        assert_eq!(s2.exit_code(), 0);
        let h = history(&db.pool).await;
        assert_eq!(h[1].status, "completed");
        assert_eq!(h[1].counts(EntityKind::Loan), (0, 0, 0));
        let wm: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(Some(wm), h[1].sync_end_date);
        assert_books_balance(&db.pool).await;
    }
}

/// A planner and two workers in this process, each on its own broker connection (and
/// the workers on their own database pools), as separate processes would be, with the
/// `/readyz` of the first worker. Their queues are deleted when it is dropped.
pub struct InProcess {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// Consumer flags: the planner's, then each worker's.
    pub consuming: Vec<Arc<AtomicBool>>,
    readyz: String,
    _queues: Queues,
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
            _queues: Queues(settings.queue_prefix.clone()),
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
