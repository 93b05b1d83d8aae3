//! Production safety (issue 9): a least-privilege role, planners that die or race, an
//! operator ending a sync by hand, settle and abort at once, and a chunk ledger that
//! does not grow forever. Races are forced with held locks, never with timing.

use crate::harness::{
    InProcess, assert_books_balance, assert_delivered_all, expected_full, history, hold_plans,
    loansync_process, planning_syncs, seeded_db, settings_for, small, stub, wait_planner_held,
    wait_syncs_finished, waiting,
};
use crate::support::{TestDb, admin_url, amqp_url, run_detached, wait_for};
use chrono::{DateTime, Utc};
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, SyncType};
use loansync::ledger::{
    self,
    settle::{ChunkResult, Settled},
};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::Broker;
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// Two login roles made for one test: loansync's least-privilege role, with exactly the
/// grants of `deploy/sql/grants.sql`, and a Django application role that writes the
/// source tables. Dropped after the test's database (declare it before the [`TestDb`]).
pub(crate) struct Roles {
    pub(crate) app: String,
    django: String,
}

impl Roles {
    pub(crate) fn new() -> Roles {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Roles {
            app: format!("ls_app_{}", &tag[..12]),
            django: format!("ls_dj_{}", &tag[..12]),
        }
    }

    pub(crate) async fn create(&self, db: &TestDb) {
        let admin = PgPool::connect(&admin_url()).await.unwrap();
        for role in [&self.app, &self.django] {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
                .execute(&admin)
                .await
                .unwrap();
        }
        admin.close().await;
        let grants = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/grants.sql"),
        )
        .unwrap()
        .replace(" TO loansync;", &format!(" TO {};", self.app));
        sqlx::raw_sql(sqlx::AssertSqlSafe(grants))
            .execute(&db.pool)
            .await
            .expect("deploy/sql/grants.sql applies");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "GRANT USAGE ON SCHEMA public TO {d}; GRANT SELECT, UPDATE ON loans_ajoloan TO {d};",
            d = self.django
        )))
        .execute(&db.pool)
        .await
        .unwrap();
    }

    pub(crate) fn url(db: &TestDb, role: &str) -> String {
        db.url.replacen("postgres@", &format!("{role}@"), 1)
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let roles = [self.app.clone(), self.django.clone()];
        run_detached(async move {
            if let Ok(admin) = PgPool::connect(&admin_url()).await {
                for r in roles {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {r}")))
                        .execute(&admin)
                        .await;
                }
                admin.close().await;
            }
        });
    }
}

fn loans_only(sync_type: SyncType) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities: Some(vec![EntityKind::Loan]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_is_caught_when_loansync_runs_as_a_least_privilege_role() {
    let roles = Roles::new();
    let db = seeded_db(small()).await;
    roles.create(&db).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_INCREMENTAL_OVERLAP_SECS", "1")]);
    // loansync runs as the role deploy/ grants; Django writes as a role of its own.
    let app = loansync::db::connect_url(&Roles::url(&db, &roles.app), 6)
        .await
        .unwrap();
    let django = loansync::db::connect_url(&Roles::url(&db, &roles.django), 2)
        .await
        .unwrap();
    let first = loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Full))
        .await
        .unwrap();
    assert_eq!(first.exit_code(), 0, "{}", first.render());

    // Django opens a transaction, saves a loan (date_modified is the transaction's now()),
    // and keeps it open for longer than the overlap.
    let mut writer = django.begin().await.unwrap();
    let (loan, started): (i32, DateTime<Utc>) = sqlx::query_as(
        "UPDATE loans_ajoloan SET date_modified = now() \
         WHERE id = (SELECT min(id) FROM loans_ajoloan WHERE is_disbursed) RETURNING id, date_modified",
    )
    .fetch_one(&mut *writer)
    .await
    .unwrap();
    // What the previous cap read is hidden from this role: it would not have capped.
    let visible_start: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT min(xact_start) FROM pg_stat_activity \
         WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    assert_eq!(visible_start, None, "the role sees other roles' xact_start");
    wait_for(
        "the writer's transaction to be older than the overlap",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, bool>("SELECT now() > $1 + interval '2 seconds'")
                .bind(started)
                .fetch_one(&db.pool)
                .await
                .unwrap()
        },
    )
    .await;

    let second =
        loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Incremental))
            .await
            .unwrap();
    assert_eq!(second.exit_code(), 0, "{}", second.render());
    let hi: DateTime<Utc> = sqlx::query_scalar(
        "SELECT sync_end_date FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(second.sync_id.as_deref().unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        hi <= started,
        "window end {hi} not capped at the open transaction's start {started}"
    );
    let before = stub.received();
    writer.commit().await.unwrap();

    let third = loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Incremental))
        .await
        .unwrap();
    assert_eq!(third.exit_code(), 0, "{}", third.render());
    assert!(
        stub.received()
            .ids_sent_since(&before, EntityKind::Loan)
            .contains(&i64::from(loan)),
        "the row committed late was lost"
    );
    assert_books_balance(&db.pool).await;
    app.close().await;
    django.close().await;
}

/// SPEC.md section 2 with `pg_read_all_stats`: a Django transaction that reads first,
/// stays open longer than the overlap without writing (no transaction id yet: the xid
/// clock cannot see it), and only after a sync was planned saves a loan stamped with its
/// `now()` (its start). The window ends at or before that start, so the next sync
/// sends the loan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_reads_first_and_writes_its_start_later_is_caught_with_pg_read_all_stats()
 {
    let roles = Roles::new();
    let db = seeded_db(small()).await;
    roles.create(&db).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT pg_read_all_stats TO {}",
        roles.app
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_INCREMENTAL_OVERLAP_SECS", "1")]);
    let app = loansync::db::connect_url(&Roles::url(&db, &roles.app), 6)
        .await
        .unwrap();
    let django = loansync::db::connect_url(&Roles::url(&db, &roles.django), 2)
        .await
        .unwrap();
    let first = loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Full))
        .await
        .unwrap();
    assert_eq!(first.exit_code(), 0, "{}", first.render());

    // Django's transaction reads, and has written nothing yet.
    let mut writer = django.begin().await.unwrap();
    let (loan, started): (i32, DateTime<Utc>) =
        sqlx::query_as("SELECT min(id), now() FROM loans_ajoloan WHERE is_disbursed")
            .fetch_one(&mut *writer)
            .await
            .unwrap();
    let without_xid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE usename = $1 AND state = 'idle in transaction' AND backend_xid IS NULL",
    )
    .bind(&roles.django)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(without_xid, 1, "the reader has a transaction id already");
    wait_for(
        "the reader's transaction to be older than the overlap",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, bool>("SELECT now() > $1 + interval '2 seconds'")
                .bind(started)
                .fetch_one(&db.pool)
                .await
                .unwrap()
        },
    )
    .await;

    let second =
        loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Incremental))
            .await
            .unwrap();
    assert_eq!(second.exit_code(), 0, "{}", second.render());
    let hi: DateTime<Utc> = sqlx::query_scalar(
        "SELECT sync_end_date FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(second.sync_id.as_deref().unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();

    // Only now does it write: the loan carries the transaction's start.
    let stamped: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() WHERE id = $1 RETURNING date_modified",
    )
    .bind(loan)
    .fetch_one(&mut *writer)
    .await
    .unwrap();
    assert_eq!(stamped, started);
    let before = stub.received();
    writer.commit().await.unwrap();

    let third = loansync::app::sync_in_process(&app, &settings, &loans_only(SyncType::Incremental))
        .await
        .unwrap();
    assert_eq!(third.exit_code(), 0, "{}", third.render());
    assert!(
        stub.received()
            .ids_sent_since(&before, EntityKind::Loan)
            .contains(&i64::from(loan)),
        "the row stamped before its transaction's first write was lost (window end {hi}, \
         transaction start {started})"
    );
    assert!(
        hi <= started,
        "window end {hi} not capped at the open transaction's start {started}"
    );
    assert_books_balance(&db.pool).await;
    app.close().await;
    django.close().await;
}

async fn status_json(db: &TestDb, settings: &loansync::config::Settings) -> serde_json::Value {
    let out = loansync_process(db, settings, "http://127.0.0.1:9")
        .args(["status", "--json"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_while_planning_blocks_nothing_in_single_process_mode() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let expected = expected_full(&db.pool).await;

    let held = hold_plans(&db).await;
    let mut killed = loansync_process(&db, &settings, &stub.url())
        .args(["sync", "--full"])
        .spawn()
        .unwrap();
    wait_planner_held(&db).await;
    killed.kill().await.unwrap(); // SIGKILL, as an OOM kill or an eviction
    held.rollback().await.unwrap();

    // `status` shows it stalled as soon as its session is gone.
    wait_for(
        "the dead planner's sync shown stalled",
        DEADLINE,
        || async { status_json(&db, &settings).await[0]["stalled"] == serde_json::json!(true) },
    )
    .await;
    let shown = status_json(&db, &settings).await;
    assert_eq!(shown[0]["state"], "planning", "{shown}");
    assert_eq!(
        ledger::reads::stalled_count(&db.pool, 900.0).await.unwrap(),
        1
    );

    // The next sync runs at once, taking the dead claim over.
    let next = loansync_process(&db, &settings, &stub.url())
        .args(["sync", "--full"])
        .output()
        .await
        .unwrap();
    assert_eq!(next.status.code(), Some(0), "{next:?}");
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 2);
    let dead = h
        .iter()
        .find(|h| h.status == "failed")
        .expect("the dead claim");
    assert!(
        dead.error_message
            .as_deref()
            .is_some_and(|m| m.contains("planner stopped while planning")),
        "{:?}",
        dead.error_message
    );
    assert!(h.iter().any(|h| h.status == "completed"));
    assert_delivered_all(&stub.received(), &expected);
    assert_eq!(
        ledger::reads::stalled_count(&db.pool, 900.0).await.unwrap(),
        0
    );
    assert_books_balance(&db.pool).await;
}

/// Each entity's chunks commit on their own (in parts, side by side), and the entity
/// windows and totals last: a planner killed between the two leaves a `planning` sync
/// with chunks. The next sync takes the dead claim over and removes them (none was
/// published): every record is delivered, each chunk of the dead claim is gone, the
/// books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_killed_between_its_entities_and_its_totals_leaves_no_chunk_behind() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let expected = expected_full(&db.pool).await;

    let entities = hold_plans(&db).await;
    let mut killed = loansync_process(&db, &settings, &stub.url())
        .args(["sync", "--full"])
        .spawn()
        .unwrap();
    wait_planner_held(&db).await;
    // The totals' transaction writes the sync's history row: held before the entities go on.
    let mut totals = db.pool.begin().await.unwrap();
    let orphan: String = sqlx::query_scalar(
        "SELECT h.sync_id::text FROM etl_folder_etlsynchistory h \
         JOIN loansync_sync s ON s.sync_id = h.sync_id WHERE s.state = 'planning' FOR UPDATE OF h",
    )
    .fetch_one(&mut *totals)
    .await
    .unwrap();
    entities.rollback().await.unwrap();
    let windows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM loansync_sync_entity WHERE sync_id = $1")
            .bind(&orphan)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    // The totals' transaction is the only one that waits on the history row, and it
    // starts after every part of every entity committed.
    wait_for(
        "every entity committed, the totals waiting on the history row",
        DEADLINE,
        || async { waiting(&db.pool, "any").await >= 1 },
    )
    .await;
    assert_eq!(
        windows().await,
        0,
        "the windows are written with the totals"
    );
    killed.kill().await.unwrap(); // SIGKILL
    totals.rollback().await.unwrap();
    let chunks = |sync_id: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM loansync_chunk WHERE sync_id = $1")
                .bind(sync_id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(
        chunks(orphan.clone()).await > 0,
        "the dead planner committed no chunk"
    );

    let next = loansync_process(&db, &settings, &stub.url())
        .args(["sync", "--full"])
        .output()
        .await
        .unwrap();
    assert_eq!(next.status.code(), Some(0), "{next:?}");
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(
        h.iter()
            .any(|h| h.status == "failed" && h.sync_id == orphan),
        "{h:?}"
    );
    assert!(h.iter().any(|h| h.status == "completed"), "{h:?}");
    assert_eq!(
        chunks(orphan.clone()).await,
        0,
        "the dead claim's chunks are left"
    );
    assert_eq!(
        windows().await,
        0,
        "the dead claim's entity windows are left"
    );
    assert_delivered_all(&stub.received(), &expected);
    assert_books_balance(&db.pool).await;
}

async fn a_planner_killed_while_planning_over_rabbitmq(request_id: Option<&str>) {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let expected = expected_full(&db.pool).await;
    let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();

    let held = hold_plans(&db).await;
    let mut planner = loansync_process(&db, &settings, &stub.url())
        .arg("planner")
        .spawn()
        .unwrap();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: request_id.map(str::to_string),
        since: None,
        until: None,
        sweep: false,
    };
    admin
        .publish_json(&admin.topology.plan, std::slice::from_ref(&req))
        .await
        .unwrap();
    wait_planner_held(&db).await;
    planner.kill().await.unwrap();
    held.rollback().await.unwrap();

    // The message was acked once its request was recorded: nothing comes back from the
    // broker. A new planner (and workers) finds the dead claim, ends it (nothing was
    // sent) and puts its request back to pending, then plans it again: an anonymous
    // request exactly as one with an id.
    let running = InProcess::start(&db, &settings).await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h.len(), 2, "{h:?}");
    let dead = h
        .iter()
        .find(|h| h.status == "failed")
        .expect("the dead claim");
    let done = h
        .iter()
        .find(|h| h.status == "completed")
        .expect("the request served");
    assert!(
        dead.error_message
            .as_deref()
            .is_some_and(|m| m.contains("requests it served are pending again")),
        "{dead:?}"
    );
    let requests: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT request_id, state, sync_id::text FROM loansync_request ORDER BY request_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let (id, state, served_by) = &requests[0];
    match request_id {
        Some(rid) => assert_eq!(id, rid),
        None => assert!(id.starts_with("anonymous-"), "{id}"),
    }
    assert_eq!(
        (state.as_str(), served_by.as_deref()),
        ("planned", Some(done.sync_id.as_str()))
    );
    assert_eq!(h.iter().filter(|h| h.status == "completed").count(), 1);
    for e in EntityKind::ALL {
        let got = stub.received();
        assert_eq!(got.ids(e), expected[&e], "{e}");
        assert!(got.accepted[&e].values().all(|&n| n == 1), "{e} sent twice");
    }
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planner_killed_while_planning_is_taken_over_with_a_request_id() {
    a_planner_killed_while_planning_over_rabbitmq(Some("killed-mid-plan")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planner_killed_while_planning_is_taken_over_without_a_request_id() {
    a_planner_killed_while_planning_over_rabbitmq(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_planners_given_one_request_id_at_once_plan_one_sync() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let expected = expected_full(&db.pool).await;
    // A planner and two workers, and a second planner replica.
    let running = InProcess::start(&db, &settings).await;
    let stop = CancellationToken::new();
    let second_up = Arc::new(AtomicBool::new(false));
    let second = tokio::spawn(loansync::app::run_planner(
        loansync::db::connect_url(&db.url, 4).await.unwrap(),
        settings.clone(),
        second_up.clone(),
        stop.clone(),
    ));
    wait_for("the second planner consuming", DEADLINE, || async {
        second_up.load(Ordering::SeqCst)
    })
    .await;
    let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: Some("nightly-once".into()),
        since: None,
        until: None,
        sweep: false,
    };

    // One planner is held inside its plan; the other records the copy as a duplicate
    // and acks it, without waiting for the planning lock.
    let held = hold_plans(&db).await;
    admin
        .publish_json(&admin.topology.plan, &[req.clone(), req.clone()])
        .await
        .unwrap();
    wait_for(
        "one planner held in its plan, both copies taken",
        DEADLINE,
        || async {
            planning_syncs(&db.pool).await == 1
                && waiting(&db.pool, "relation").await >= 1
                && admin.queue_depth(&admin.topology.plan).await.unwrap() == 0
        },
    )
    .await;
    held.rollback().await.unwrap();

    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].status, "completed");
    // The ledger was written once: as many chunks as planned, each settled once.
    let (chunks, settled, total): (i64, i64, i32) = sqlx::query_as(
        "SELECT count(*), count(settled_at), max(s.chunks_total) FROM loansync_chunk c \
         JOIN loansync_sync s USING (sync_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((chunks, settled), (i64::from(total), i64::from(total)));
    let got = stub.received();
    for e in EntityKind::ALL {
        assert_eq!(got.ids(e), expected[&e], "{e}");
        assert!(got.accepted[&e].values().all(|&n| n == 1), "{e} sent twice");
    }
    // The copy was answered as a duplicate, not retried to death.
    wait_for("the plan queue drained", DEADLINE, || async {
        admin.queue_depth(&admin.topology.plan).await.unwrap() == 0
    })
    .await;
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    assert_books_balance(&db.pool).await;
    stop.cancel();
    second.await.unwrap().unwrap();
    running.shutdown().await;
    admin.close().await;
}

/// A planned sync of loans whose chunks nobody works (an in-memory queue left alone).
async fn planned_loans(
    db: &TestDb,
    settings: &loansync::config::Settings,
) -> (String, Vec<ChunkJob>) {
    let queue = MemoryQueue::new();
    let outcome = planner::plan_sync(&db.pool, settings, &loans_only(SyncType::Full), &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let mut jobs = Vec::new();
    while let Some(j) = queue.try_pop() {
        jobs.push(j);
    }
    assert!(jobs.len() >= 3, "a few chunks");
    (sync_id, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_and_an_abort_at_once_take_their_locks_in_one_order() {
    let db = seeded_db(small()).await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let (sync_id, jobs) = planned_loans(&db, &settings).await;
    let job = jobs[0].clone();
    let state = ledger::plan::start_chunk(
        &db.pool,
        &sync_id,
        job.entity,
        job.seq,
        ledger::plan::Attempt::Count,
    )
    .await
    .unwrap()
    .unwrap();

    // The history row is held: the settle commits its chunk (it shares no row with other
    // settles), then its roll-up of the counters (the sync's first, so due at once) takes
    // the sync row and waits for the history row.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM etl_folder_etlsynchistory WHERE sync_id = $1 FOR UPDATE")
        .bind(&sync_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let settle = {
        let (pool, sync_id, ids) = (db.pool.clone(), sync_id.clone(), state.ids.clone());
        let (history_id, purpose) = (state.history_id, state.purpose);
        tokio::spawn(async move {
            ledger::settle::settle_chunk(
                &pool,
                &ChunkResult {
                    sync_id: &sync_id,
                    entity: job.entity,
                    seq: job.seq,
                    history_id,
                    purpose,
                    succeeded: &ids,
                    failed: &[],
                    api_response: None,
                    delivered: &[],
                    upsert: ledger::settle::FingerprintUpsert::plain(),
                },
            )
            .await
        })
    };
    wait_for(
        "the settle waiting for the history row",
        DEADLINE,
        || async { waiting(&db.pool, "any").await >= 1 },
    )
    .await;
    // The API refuses the credentials for another chunk: the sync is aborted meanwhile;
    // it settles the other chunks, then waits for the sync row (chunks, sync, history).
    let abort = {
        let (pool, sync_id) = (db.pool.clone(), sync_id.clone());
        tokio::spawn(async move {
            ledger::end::abort_sync(
                &pool,
                &sync_id,
                "the analytics API refused the credentials (HTTP 401): test",
                None,
            )
            .await
        })
    };
    wait_for("the abort waiting too", DEADLINE, || async {
        waiting(&db.pool, "any").await >= 2
    })
    .await;
    holder.rollback().await.unwrap();

    let settled = settle
        .await
        .unwrap()
        .expect("the settle neither deadlocked nor failed");
    assert_eq!(settled, Settled::Now(None));
    assert!(
        abort
            .await
            .unwrap()
            .expect("the abort neither deadlocked nor failed")
    );
    let h = &history(&db.pool).await[0];
    assert_eq!(h.status, "failed");
    let (total, ok, failed) = h.counts(EntityKind::Loan);
    assert_eq!(
        ok as usize,
        state.ids.len(),
        "the settled chunk counts as sent"
    );
    assert_eq!(ok + failed, total);
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abandons_a_running_sync_and_retries_its_records() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let (sync_id, jobs) = planned_loans(&db, &settings).await;
    // One chunk is worked; the others are lost (nobody consumes them).
    let ctx = loansync::app::worker_context(&settings, db.pool.clone()).unwrap();
    loansync::worker::process_chunk(&ctx, &jobs[0])
        .await
        .unwrap();

    let out = loansync_process(&db, &settings, &stub.url())
        .args(["abandon", &sync_id])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let h = &history(&db.pool).await[0];
    assert_eq!(h.status, "failed");
    let (total, ok, failed) = h.counts(EntityKind::Loan);
    assert_eq!(ok + failed, total);
    assert!(ok > 0 && failed > 0, "{ok} {failed}");
    let abandoned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM etl_folder_etlsyncerror WHERE error_code = $1 AND NOT resolved",
    )
    .bind(ledger::end::ABANDONED_CODE)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(abandoned, i64::from(failed));
    let wm: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(wm, 0, "an abandoned sync moves no watermark");
    assert_books_balance(&db.pool).await;

    // A finished sync cannot be abandoned again.
    let again = loansync_process(&db, &settings, &stub.url())
        .args(["abandon", &sync_id])
        .output()
        .await
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to abandon"));

    // The abandoned records are delivered by a retry.
    let retry = loansync_process(&db, &settings, &stub.url())
        .args(["errors", "retry", "--in-process"])
        .output()
        .await
        .unwrap();
    assert_eq!(retry.status.code(), Some(0), "{retry:?}");
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(open, 0);
    let expected = expected_full(&db.pool).await;
    assert_eq!(
        stub.received().ids(EntityKind::Loan),
        expected[&EntityKind::Loan]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_syncs_lose_their_chunk_lists_after_the_retention_and_nothing_else() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults {
        reject_every_nth: 7,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let old = loansync::app::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Full))
        .await
        .unwrap();
    let old_id = old.sync_id.clone().unwrap();
    let new = loansync::app::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Full))
        .await
        .unwrap();
    let new_id = new.sync_id.clone().unwrap();
    let count = |sql: &'static str, id: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    const CHUNKS: &str = "SELECT count(*) FROM loansync_chunk WHERE sync_id = $1";
    const ERRORS: &str = "SELECT count(*) FROM etl_folder_etlsyncerror e \
                          JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id WHERE h.sync_id = $1";
    let old_chunks = count(CHUNKS, old_id.clone()).await;
    let old_errors = count(ERRORS, old_id.clone()).await;
    assert!(old_chunks > 0 && old_errors > 0);

    // Within the retention nothing goes; past it, only the old sync's chunk lists.
    let week = Duration::from_secs(7 * 86_400);
    assert_eq!(ledger::end::prune_chunks(&db.pool, week).await.unwrap(), 0);
    sqlx::query(
        "UPDATE loansync_sync SET finished_at = now() - interval '8 days' WHERE sync_id = $1",
    )
    .bind(&old_id)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        ledger::end::prune_chunks(&db.pool, week).await.unwrap(),
        old_chunks as u64
    );
    assert_eq!(count(CHUNKS, old_id.clone()).await, 0);
    assert!(count(CHUNKS, new_id.clone()).await > 0);
    assert_eq!(count(ERRORS, old_id.clone()).await, old_errors);
    assert_eq!(ledger::end::prune_chunks(&db.pool, week).await.unwrap(), 0);
    // The pruned sync still reads the same, and a late copy of one of its chunk jobs
    // counts as the duplicate it is, not as an unknown chunk.
    let again = loansync::app::summarize(&db.pool, old_id.clone())
        .await
        .unwrap();
    assert_eq!(again.progress, old.progress);
    let ctx = loansync::app::worker_context(&settings, db.pool.clone()).unwrap();
    let late = ChunkJob {
        sync_id: old_id,
        entity: EntityKind::Loan,
        seq: 0,
    };
    assert_eq!(
        loansync::worker::process_chunk(&ctx, &late).await.unwrap(),
        loansync::worker::ChunkOutcome::Duplicate
    );
}
