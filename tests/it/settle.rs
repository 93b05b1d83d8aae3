//! Settles that never wait for each other (issue 12 item 1): the settle transaction
//! touches its own chunk row only; the last chunk is found after the commit and exactly
//! one settler finalizes; a settler that dies before finalizing is caught up by the
//! planner's housekeeping or the next planner; the history counters are rolled up while
//! a sync runs and exact at the end. Races are forced with held locks, never timing.

use crate::harness::{assert_books_balance, history, seeded_db, settings_for, small};
use crate::support::{TestDb, wait_for};
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, SyncType};
use loansync::ledger::{
    self,
    settle::{ChunkResult, Settled},
    states::FinalStatus,
};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use sqlx::PgPool;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn loans(sync_type: SyncType) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities: Some(vec![EntityKind::Loan]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

/// A planned full sync of loans whose chunks nobody works (20 loans a chunk).
async fn planned(db: &TestDb) -> (String, Vec<ChunkJob>) {
    let settings = settings_for(db, "http://127.0.0.1:9", &[]);
    let queue = MemoryQueue::new();
    let outcome = planner::plan_sync(&db.pool, &settings, &loans(SyncType::Full), &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let mut jobs = Vec::new();
    while let Some(j) = queue.try_pop() {
        jobs.push(j);
    }
    assert!(jobs.len() >= 4, "a few chunks: {}", jobs.len());
    (sync_id, jobs)
}

/// What a worker would settle for `job`: every record accepted, except every tenth,
/// which fails; the API's answer names the chunk.
struct Outcome {
    succeeded: Vec<i64>,
    failed: Vec<loansync::domain::FailedRecord>,
    history_id: i32,
    purpose: ledger::states::Purpose,
    answer: serde_json::Value,
}

/// Starts the chunk (as a worker does) and makes up its outcome.
async fn outcome_of(pool: &PgPool, job: &ChunkJob) -> Outcome {
    outcome_with(pool, job, true).await
}

/// [`outcome_of`]; without `failures`, every record is accepted.
async fn outcome_with(pool: &PgPool, job: &ChunkJob, failures: bool) -> Outcome {
    let state = ledger::plan::start_chunk(
        pool,
        &job.sync_id,
        job.entity,
        job.seq,
        ledger::plan::Attempt::Count,
    )
    .await
    .unwrap()
    .unwrap();
    let (mut succeeded, mut failed) = (Vec::new(), Vec::new());
    for (i, &id) in state.ids.iter().enumerate() {
        if failures && i % 10 == 9 {
            failed.push(loansync::domain::FailedRecord {
                id,
                error_code: "INVALID".into(),
                message: "refused by the test".into(),
                details: serde_json::json!({}),
            });
        } else {
            succeeded.push(id);
        }
    }
    Outcome {
        succeeded,
        failed,
        history_id: state.history_id,
        purpose: state.purpose,
        answer: serde_json::json!({ "chunk": job.seq }),
    }
}

fn result<'a>(job: &'a ChunkJob, o: &'a Outcome) -> ChunkResult<'a> {
    ChunkResult {
        sync_id: &job.sync_id,
        entity: job.entity,
        seq: job.seq,
        history_id: o.history_id,
        purpose: o.purpose,
        succeeded: &o.succeeded,
        delivered: &[],
        failed: &o.failed,
        api_response: Some(&o.answer),
        upsert: ledger::settle::FingerprintUpsert::plain(),
    }
}

async fn settle(pool: &PgPool, job: &ChunkJob) -> Settled {
    let o = outcome_of(pool, job).await;
    ledger::settle::settle_chunk(pool, &result(job, &o))
        .await
        .unwrap()
}

/// The settle transaction of a started chunk, run on its own task, as a worker's.
fn spawn_settle(pool: &PgPool, job: &ChunkJob, o: Outcome) -> tokio::task::JoinHandle<Settled> {
    let (pool, job) = (pool.clone(), job.clone());
    tokio::spawn(async move {
        ledger::settle::settle_chunk(&pool, &result(&job, &o))
            .await
            .unwrap()
    })
}

/// Loans (success, failed) summed over the settled chunk rows.
async fn chunk_sums(pool: &PgPool, sync_id: &str) -> (i32, i32) {
    sqlx::query_as(
        "SELECT coalesce(sum(succeeded), 0)::int4, coalesce(sum(failed), 0)::int4 \
         FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NOT NULL",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn history_loans(pool: &PgPool, sync_id: &str) -> (i32, i32, i32, String) {
    sqlx::query_as(
        "SELECT total_loans, loans_success, loans_failed, status::text \
         FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn sync_state(pool: &PgPool, sync_id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1")
        .bind(sync_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Backends of this database waiting for a lock.
async fn waiting(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE NOT l.granted AND a.datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The loan watermark: where it is and which sync moved it.
async fn loan_watermark(pool: &PgPool) -> Option<(chrono::DateTime<chrono::Utc>, String)> {
    sqlx::query_as(
        "SELECT last_sync_timestamp, last_sync_id::text FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn window_hi(pool: &PgPool, sync_id: &str) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT window_hi FROM loansync_sync WHERE sync_id = $1")
        .bind(sync_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The sync finished exactly: `completed`... or `partial_success` here (every tenth
/// record fails), counters equal to the chunk sums and to the total, the watermark at
/// the window's end, moved by this sync.
async fn assert_finished_exactly(pool: &PgPool, sync_id: &str) {
    let (total, ok, failed, status) = history_loans(pool, sync_id).await;
    assert_eq!(status, "partial_success");
    assert_eq!((ok, failed), chunk_sums(pool, sync_id).await);
    assert_eq!(ok + failed, total);
    assert_eq!(sync_state(pool, sync_id).await, "done");
    assert_eq!(
        loan_watermark(pool).await,
        Some((window_hi(pool, sync_id).await, sync_id.to_string()))
    );
    let errors: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h \
         ON h.id = e.sync_history_id WHERE h.sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(errors, i64::from(failed), "one error row per failed record");
    assert_books_balance(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settles_of_two_chunks_commit_while_the_history_and_sync_rows_are_held() {
    let db = seeded_db(small()).await;
    let (sync_id, jobs) = planned(&db).await;

    // Another session holds both rows every settle used to update.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM etl_folder_etlsynchistory WHERE sync_id = $1 FOR UPDATE")
        .bind(&sync_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM loansync_sync WHERE sync_id = $1 FOR UPDATE")
        .bind(&sync_id)
        .execute(&mut *holder)
        .await
        .unwrap();

    // Every record accepted: a failed record's error row checks its foreign key to the
    // history row at commit (FOR KEY SHARE, which only a FOR UPDATE of that row blocks;
    // the roll-up's and Django's UPDATEs do not).
    let (oa, ob) = (
        outcome_with(&db.pool, &jobs[0], false).await,
        outcome_with(&db.pool, &jobs[1], false).await,
    );
    let (a, b) = (
        spawn_settle(&db.pool, &jobs[0], oa),
        spawn_settle(&db.pool, &jobs[1], ob),
    );
    let (a, b) = tokio::time::timeout(DEADLINE, async { (a.await, b.await) })
        .await
        .expect("two settles blocked by the history and sync rows held");
    assert_eq!(a.unwrap(), Settled::Now(None));
    assert_eq!(b.unwrap(), Settled::Now(None));
    // Committed, seen from another session while the rows are still held.
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NOT NULL",
    )
    .bind(&sync_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(settled, 2);
    assert_eq!(waiting(&db.pool).await, 0, "nobody waits");
    // The roll-up skipped the held row: the history is untouched, the live progress
    // (from the chunk rows) is exact.
    let (_, ok, failed, _) = history_loans(&db.pool, &sync_id).await;
    assert_eq!((ok, failed), (0, 0));
    let live = ledger::reads::entity_progress(&db.pool, &sync_id)
        .await
        .unwrap();
    let loans = live.iter().find(|p| p.entity == EntityKind::Loan).unwrap();
    assert_eq!(
        (loans.success, loans.failed),
        chunk_sums(&db.pool, &sync_id).await
    );
    holder.rollback().await.unwrap();

    let mut last = None;
    for job in &jobs[2..] {
        last = Some(settle(&db.pool, job).await);
    }
    assert_eq!(last, Some(Settled::Now(Some(FinalStatus::PartialSuccess))));
    assert_finished_exactly(&db.pool, &sync_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_two_chunks_settled_at_once_are_finalized_once() {
    let db = seeded_db(small()).await;
    let (sync_id, jobs) = planned(&db).await;
    let n = jobs.len();
    for job in &jobs[..n - 2] {
        assert_eq!(settle(&db.pool, job).await, Settled::Now(None));
    }
    // The barrier: both last chunk rows held, so both settles wait in their
    // transactions, and go on together when the holder lets go.
    let (oa, ob) = (
        outcome_of(&db.pool, &jobs[n - 2]).await,
        outcome_of(&db.pool, &jobs[n - 1]).await,
    );
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NULL ORDER BY entity, seq FOR UPDATE",
    )
    .bind(&sync_id)
    .execute(&mut *holder)
    .await
    .unwrap();
    let a = spawn_settle(&db.pool, &jobs[n - 2], oa);
    let b = spawn_settle(&db.pool, &jobs[n - 1], ob);
    wait_for("both settles at the barrier", DEADLINE, || async {
        waiting(&db.pool).await >= 2
    })
    .await;
    holder.rollback().await.unwrap();
    let outcomes = [a.await.unwrap(), b.await.unwrap()];
    let finalized: Vec<_> = outcomes
        .iter()
        .filter(|s| matches!(s, Settled::Now(Some(_))))
        .collect();
    assert_eq!(finalized.len(), 1, "exactly one finalize: {outcomes:?}");
    assert!(outcomes.iter().all(|s| matches!(s, Settled::Now(_))));
    assert_finished_exactly(&db.pool, &sync_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_settlers_that_both_see_every_chunk_settled_finalize_once() {
    let db = seeded_db(small()).await;
    let (sync_id, jobs) = planned(&db).await;
    // Every chunk committed, no settler has looked yet.
    for job in &jobs {
        let o = outcome_of(&db.pool, job).await;
        assert!(
            ledger::settle::settle_chunk_only(&db.pool, &result(job, &o))
                .await
                .unwrap()
        );
    }
    // Both find every chunk settled and go for the sync row, which is held.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM loansync_sync WHERE sync_id = $1 FOR UPDATE")
        .bind(&sync_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let after = || {
        let (pool, sync_id) = (db.pool.clone(), sync_id.clone());
        tokio::spawn(async move { ledger::finalize::after_settle(&pool, &sync_id).await })
    };
    let (a, b) = (after(), after());
    wait_for(
        "both finalizers waiting for the sync row",
        DEADLINE,
        || async { waiting(&db.pool).await >= 2 },
    )
    .await;
    let before = loan_watermark(&db.pool).await;
    holder.rollback().await.unwrap();
    let outcomes = [a.await.unwrap(), b.await.unwrap()];
    assert_eq!(
        outcomes.iter().filter(|o| o.is_some()).count(),
        1,
        "exactly one finalize: {outcomes:?}"
    );
    assert_ne!(
        before,
        loan_watermark(&db.pool).await,
        "the watermark moved"
    );
    assert_finished_exactly(&db.pool, &sync_id).await;
    // A late copy of a chunk counts nothing.
    assert_eq!(settle(&db.pool, &jobs[0]).await, Settled::Already);
    assert_finished_exactly(&db.pool, &sync_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_that_dies_before_finalizing_is_caught_up_by_housekeeping_and_the_next_planner() {
    let db = seeded_db(small()).await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);

    // The last settler commits and dies before it looks at the sync.
    let (sync_id, jobs) = planned(&db).await;
    for job in &jobs {
        let o = outcome_of(&db.pool, job).await;
        assert!(
            ledger::settle::settle_chunk_only(&db.pool, &result(job, &o))
                .await
                .unwrap()
        );
    }
    assert_eq!(sync_state(&db.pool, &sync_id).await, "running");
    assert_eq!(history_loans(&db.pool, &sync_id).await.3, "in_progress");
    // The planner's housekeeping tick finalizes it.
    planner::housekeep(&db.pool, &settings, 1).await;
    assert_finished_exactly(&db.pool, &sync_id).await;

    // Again, and this time the next planning request finds the slot held: it finalizes
    // the sync first, then plans its own.
    let (second, jobs) = planned(&db).await;
    for job in &jobs {
        let o = outcome_of(&db.pool, job).await;
        assert!(
            ledger::settle::settle_chunk_only(&db.pool, &result(job, &o))
                .await
                .unwrap()
        );
    }
    assert_eq!(sync_state(&db.pool, &second).await, "running");
    let queue = MemoryQueue::new();
    let outcome = planner::plan_sync(&db.pool, &settings, &loans(SyncType::Full), &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id: third, .. } = outcome else {
        panic!("the next planner is not held up: {outcome:?}")
    };
    assert_ne!(third, second);
    assert_eq!(sync_state(&db.pool, &second).await, "done");
    let (total, ok, failed, status) = history_loans(&db.pool, &second).await;
    assert_eq!(status, "partial_success");
    assert_eq!((ok, failed), chunk_sums(&db.pool, &second).await);
    assert_eq!(ok + failed, total);
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_counters_catch_up_while_a_sync_runs_and_are_exact_at_the_end() {
    let db = seeded_db(small()).await;
    let (sync_id, jobs) = planned(&db).await;
    let n = jobs.len();

    // The first settle rolls up (nobody has): the history shows its chunk at once.
    assert_eq!(settle(&db.pool, &jobs[0]).await, Settled::Now(None));
    let (_, ok, failed, status) = history_loans(&db.pool, &sync_id).await;
    assert_eq!(status, "in_progress");
    assert_eq!((ok, failed), chunk_sums(&db.pool, &sync_id).await);
    assert!(ok > 0 && failed > 0);

    // More settles, and a duplicate of one of them, which counts nothing.
    for job in &jobs[1..n - 1] {
        assert_eq!(settle(&db.pool, job).await, Settled::Now(None));
    }
    assert_eq!(settle(&db.pool, &jobs[1]).await, Settled::Already);
    let expected = chunk_sums(&db.pool, &sync_id).await;
    // What a settler does after its commit, tried until a roll-up is due (at most a
    // second after the last one): the history catches up with the chunk rows.
    wait_for("the history counters to catch up", DEADLINE, || async {
        ledger::rollup::roll_up(&db.pool, &sync_id).await.unwrap();
        let (_, ok, failed, _) = history_loans(&db.pool, &sync_id).await;
        (ok, failed) == expected
    })
    .await;
    let shown: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT api_response FROM etl_folder_etlsynchistory WHERE sync_id = $1")
            .bind(&sync_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        shown.is_some_and(|v| v["chunk"].as_i64().is_some()),
        "the history keeps showing an answer of the API"
    );

    // The last settle finalizes, counters exact; the last answer is the history's.
    assert_eq!(
        settle(&db.pool, &jobs[n - 1]).await,
        Settled::Now(Some(FinalStatus::PartialSuccess))
    );
    assert_finished_exactly(&db.pool, &sync_id).await;
    let shown: serde_json::Value =
        sqlx::query_scalar("SELECT api_response FROM etl_folder_etlsynchistory WHERE sync_id = $1")
            .bind(&sync_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(shown, serde_json::json!({ "chunk": jobs[n - 1].seq }));
}

/// A roll-up sets when the next is due from its own duration: a second after a quick
/// one, twenty times its duration after a slow one, so that roll-ups, which read every
/// settled chunk row, take a bounded share of the database on the largest syncs. The
/// slow roll-up is made slow by a held lock on the history row it writes, released only
/// once PostgreSQL shows its statement waiting for at least 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_roll_up_puts_the_next_one_further_off() {
    let db = seeded_db(small()).await;
    let (sync_id, jobs) = planned(&db).await;
    let due = |pool: PgPool, sync_id: String| async move {
        sqlx::query_as::<_, (f64, bool)>(
            "SELECT EXTRACT(EPOCH FROM roll_up_due - rolled_up_at)::float8, roll_up_due > now() \
             FROM loansync_sync WHERE sync_id = $1",
        )
        .bind(&sync_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // The first settle rolls up at once: the next is due a second later, not before.
    assert_eq!(settle(&db.pool, &jobs[0]).await, Settled::Now(None));
    let (gap, _) = due(db.pool.clone(), sync_id.clone()).await;
    assert!(
        (1.0..2.0).contains(&gap),
        "next roll-up {gap} s after a quick one"
    );

    // A roll-up held up by a lock on the history row.
    assert_eq!(settle(&db.pool, &jobs[1]).await, Settled::Now(None));
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM etl_folder_etlsynchistory WHERE sync_id = $1 FOR UPDATE")
        .bind(&sync_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let slow = tokio::spawn({
        let (pool, sync_id) = (db.pool.clone(), sync_id.clone());
        async move { ledger::rollup::roll_up_now(&pool, &sync_id).await.unwrap() }
    });
    wait_for("the roll-up to wait 200 ms on the lock", DEADLINE, || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
               AND wait_event_type = 'Lock' AND clock_timestamp() - xact_start > interval '200 milliseconds')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    holder.rollback().await.unwrap();
    assert!(slow.await.unwrap(), "the held-up roll-up rolled up");
    let (gap, pending) = due(db.pool.clone(), sync_id.clone()).await;
    assert!(gap >= 4.0, "next roll-up {gap} s after one of over 200 ms");
    assert!(pending);
    assert!(
        !ledger::rollup::roll_up(&db.pool, &sync_id).await.unwrap(),
        "no roll-up before it is due"
    );
}

/// The two forms of the fingerprint upsert ([`ledger::settle::FingerprintUpsert`]) write the same
/// rows; the skipping one does not even lock the row of a record delivered again
/// unchanged, where the plain one does (it writes a WAL record and dirties the page);
/// and a worker's adaptive form skips after a settle that found most records unchanged
/// and goes back to plain after one that found most changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_fingerprints_are_skipped_once_a_settle_finds_most_unchanged() {
    let db = seeded_db(small()).await;
    let fp = |id: i64, version: u128| uuid::Uuid::from_u128((u128::from(id as u64) << 8) | version);
    // Settles `job` with every record accepted and fingerprint `version` (the records
    // `changed` says get version + 1), through `form`.
    let deliver = |job: ChunkJob, version: u128, changed: fn(usize) -> bool, form| {
        let pool = db.pool.clone();
        async move {
            let o = outcome_with(&pool, &job, false).await;
            let delivered: Vec<(i64, uuid::Uuid)> = o
                .succeeded
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, fp(id, version + u128::from(changed(i)))))
                .collect();
            let r = ChunkResult {
                delivered: &delivered,
                upsert: form,
                ..result(&job, &o)
            };
            assert_ne!(
                ledger::settle::settle_chunk(&pool, &r).await.unwrap(),
                Settled::Already
            );
            o.succeeded
        }
    };
    // Of these ids' fingerprint rows: (sync that wrote this version, fingerprint, whether
    // a transaction has locked or updated the row since its insert).
    let rows = |ids: Vec<i64>| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, uuid::Uuid, bool)>(
                "SELECT sync_id::text, fingerprint, xmax::text <> '0' FROM loansync_delivered \
                 WHERE entity = 'loan' AND id = ANY($1) ORDER BY id",
            )
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let none = |_: usize| false;

    // A first sync, every record new: plain, and a worker's form stays plain.
    let learner = ledger::settle::FingerprintUpsert::adaptive();
    let (first, jobs) = planned(&db).await;
    deliver(jobs[0].clone(), 0, none, &learner).await;
    assert!(!learner.skips(EntityKind::Loan), "all new: plain");
    for job in &jobs[1..] {
        deliver(
            job.clone(),
            0,
            none,
            ledger::settle::FingerprintUpsert::skipping(),
        )
        .await;
    }
    assert_eq!(sync_state(&db.pool, &first).await, "done");
    let all: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM loansync_delivered WHERE entity = 'loan'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows(all.clone())
            .await
            .iter()
            .filter(|(s, _, locked)| *s == first && !locked)
            .count(),
        all.len(),
        "the skipping form inserted the new records as the plain one does"
    );

    // The same records again, unchanged.
    let (second, jobs) = planned(&db).await;
    let plain_ids = deliver(jobs[0].clone(), 0, none, &learner).await;
    assert!(learner.skips(EntityKind::Loan), "all unchanged: skip next");
    let plain_rows = rows(plain_ids.clone()).await;
    assert!(
        plain_rows
            .iter()
            .all(|(s, _, locked)| *s == first && *locked),
        "the plain form kept them and locked them: {plain_rows:?}"
    );
    let skipped_ids = deliver(jobs[1].clone(), 0, none, &learner).await;
    let skipped_rows = rows(skipped_ids.clone()).await;
    assert!(
        skipped_rows
            .iter()
            .all(|(s, _, locked)| *s == first && !locked),
        "the skipping form kept them and did not lock them: {skipped_rows:?}"
    );
    assert!(learner.skips(EntityKind::Loan));
    assert!(!learner.skips(EntityKind::Repayment), "learned per entity");

    // Most records changed: the skipping form writes them, the next settle is plain.
    let changed_ids = deliver(jobs[2].clone(), 0, |i| i % 4 != 0, &learner).await;
    assert!(!learner.skips(EntityKind::Loan), "most changed: plain next");
    let changed_rows = rows(changed_ids.clone()).await;
    for (i, (&id, (s, f, _))) in changed_ids.iter().zip(&changed_rows).enumerate() {
        let version = u128::from(i % 4 != 0);
        assert_eq!(*f, fp(id, version), "record {id}");
        assert_eq!(
            s,
            if version == 1 { &second } else { &first },
            "record {id}"
        );
    }
    // And the plain form writes a changed record as well.
    let plain_changed = deliver(jobs[3].clone(), 0, |i| i == 0, &learner).await;
    let (s, f, _) = &rows(vec![plain_changed[0]]).await[0];
    assert_eq!((s, *f), (&second, fp(plain_changed[0], 1)));
    assert!(
        learner.skips(EntityKind::Loan),
        "one of many changed: skip next"
    );
}
