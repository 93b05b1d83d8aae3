//! Books checked at finalize, not assumed (issue 26): a sync whose chunk ledger or error
//! rows were tampered with between its last settle and its finalize is finalized (the
//! status its counts give), and the mismatch is logged with the sync id, said in the
//! history's `error_message` and counted in `etl_books_unbalanced_total{entity}`. A
//! balanced sync fires nothing.
//!
//! The chunks are settled as a settler that dies after its commit leaves them (what the
//! fault point `ledger::settle::after_commit=kill` does to a worker): all settled, the
//! sync running; the books are corrupted then, and the planner's housekeeping finalizes.

use crate::harness::{seeded_db, settings_for, small};
use crate::support::TestDb;
use loansync::domain::{ChunkJob, EntityKind, FailedRecord, PlanRequest, SyncType};
use loansync::ledger::{self, settle::ChunkResult};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use loansync::telemetry::Telemetry;
use std::sync::{Arc, Mutex};
use tracing::instrument::WithSubscriber;

/// A full sync of loans, planned, each chunk settled (every tenth record failed with an
/// error row) and not finalized. Returns the sync id.
async fn settled_not_finalized(db: &TestDb) -> String {
    let settings = settings_for(db, "http://127.0.0.1:9", &[]);
    let queue = MemoryQueue::new();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: Some(vec![EntityKind::Loan]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let outcome = planner::plan_sync(&db.pool, &settings, &req, &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let mut jobs: Vec<ChunkJob> = Vec::new();
    while let Some(j) = queue.try_pop() {
        jobs.push(j);
    }
    assert!(jobs.len() >= 2, "{}", jobs.len());
    for job in &jobs {
        let state = ledger::plan::start_chunk(
            &db.pool,
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
            if i % 10 == 9 {
                failed.push(FailedRecord {
                    id,
                    error_code: "INVALID".into(),
                    message: "refused by the test".into(),
                    details: serde_json::json!({}),
                });
            } else {
                succeeded.push(id);
            }
        }
        let answer = serde_json::json!({ "chunk": job.seq });
        let r = ChunkResult {
            sync_id: &job.sync_id,
            entity: job.entity,
            seq: job.seq,
            history_id: state.history_id,
            purpose: state.purpose,
            succeeded: &succeeded,
            delivered: &[],
            failed: &failed,
            api_response: Some(&answer),
            upsert: ledger::settle::FingerprintUpsert::plain(),
        };
        assert!(
            ledger::settle::settle_chunk_only(&db.pool, &r)
                .await
                .unwrap()
        );
    }
    sync_id
}

/// A log writer the test reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// The planner's finalize of the settled syncs, its log lines captured; then the
/// `etl_books_unbalanced_total` counter of loans as a scrape reads it.
async fn finalize(db: &TestDb, telemetry: &Telemetry) -> (String, Option<f64>) {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    planner::finalize_settled(&db.pool, telemetry)
        .with_subscriber(subscriber)
        .await;
    telemetry.refresh_state(&db.pool, 900.0, None).await;
    let counted = telemetry.value("etl_books_unbalanced_total", &[("entity", "loan")]);
    (log.text(), counted)
}

async fn history_of(db: &TestDb, sync_id: &str) -> (String, Option<String>) {
    sqlx::query_as(
        "SELECT status::text, error_message FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn books_corrupted_before_finalize_are_logged_counted_and_said() {
    let db = seeded_db(small()).await;
    let telemetry = Telemetry::fresh();

    // Balanced: nothing fires.
    let balanced = settled_not_finalized(&db).await;
    let (log, counted) = finalize(&db, &telemetry).await;
    assert!(!log.contains("do not balance"), "{log}");
    assert_eq!(counted, Some(0.0));
    let (status, message) = history_of(&db, &balanced).await;
    assert_eq!(status, "partial_success");
    assert!(!message.unwrap_or_default().contains("books"));
    // The other entities' series exist too, at zero.
    assert_eq!(
        telemetry.value("etl_books_unbalanced_total", &[("entity", "officer")]),
        Some(0.0)
    );

    // An error row lost: 1 record short.
    let lost_row = settled_not_finalized(&db).await;
    let deleted = sqlx::query(
        "DELETE FROM etl_folder_etlsyncerror WHERE id = (SELECT min(e.id) FROM etl_folder_etlsyncerror e \
         JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id WHERE h.sync_id = $1)",
    )
    .bind(&lost_row)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    let (log, counted) = finalize(&db, &telemetry).await;
    assert_eq!(counted, Some(1.0), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("the books of a sync do not balance at finalize"))
        .unwrap_or_else(|| panic!("no log line: {log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&lost_row), "the sync id: {line}");
    assert!(line.contains("entity=\"loan\""), "{line}");
    let (status, message) = history_of(&db, &lost_row).await;
    // Finalized all the same, with the status its counts give.
    assert_eq!(status, "partial_success");
    let message = message.unwrap_or_default();
    assert!(
        message.contains("books unbalanced at finalize (loan: "),
        "{message}"
    );
    let failed: i64 = sqlx::query_scalar(
        "SELECT loans_failed::int8 FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(&lost_row)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        message.contains(&format!(
            "error rows for {} records (expected {failed})",
            failed - 1
        )),
        "{message}"
    );

    // A chunk ledger row lost: success + failed falls short of the total.
    let lost_chunk = settled_not_finalized(&db).await;
    let deleted = sqlx::query(
        "DELETE FROM loansync_chunk WHERE sync_id = $1 AND seq = (SELECT max(seq) FROM loansync_chunk WHERE sync_id = $1)",
    )
    .bind(&lost_chunk)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    let (log, counted) = finalize(&db, &telemetry).await;
    assert_eq!(counted, Some(2.0), "{log}");
    assert!(log.contains(&lost_chunk), "{log}");
    let (_, message) = history_of(&db, &lost_chunk).await;
    assert!(
        message.unwrap_or_default().contains("books unbalanced"),
        "said in the history"
    );
    let recorded: Vec<Option<Vec<String>>> = sqlx::query_scalar(
        "SELECT books_unbalanced FROM loansync_sync WHERE sync_id = ANY($1) ORDER BY created_at",
    )
    .bind(vec![balanced.clone(), lost_row.clone(), lost_chunk.clone()])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        vec![
            None,
            Some(vec!["loan".to_string()]),
            Some(vec!["loan".into()])
        ]
    );

    // Another pod (a fresh registry) counts the same at its first scrape.
    let other = Telemetry::fresh();
    other.refresh_state(&db.pool, 900.0, None).await;
    assert_eq!(
        other.value("etl_books_unbalanced_total", &[("entity", "loan")]),
        Some(2.0)
    );
}
