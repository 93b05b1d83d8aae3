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

    // One chunk, handled once: its settle, and its settle without the API's text, both
    // fail permanently. The records are not at fault: the chunk is dead-lettered
    // unsettled, never settled as failed records.
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
        (1, false),
        "started once, to deliver it; never settled"
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
    assert_eq!(
        max_attempts, 1,
        "failing a chunk counts no attempt of its own"
    );
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

/// A full sync of a table whose id span holds many chunks is written in id-range parts,
/// side by side (debug builds split at 4 chunks a part): together the parts hold every
/// selected id exactly once, each part numbers its chunks densely from its own base
/// (`PART_SEQ_STRIDE` apart), pages stay full but for each part's last, and a chunk job
/// goes out for every chunk. The sync then runs to the end with balanced books.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_full_selection_is_planned_in_parts_that_hold_every_id_once() {
    use crate::harness::{assert_books_balance, assert_delivered_all, expected_full, history};
    use loansync::domain::EntityKind;
    use loansync::ledger::plan::PART_SEQ_STRIDE;
    use std::collections::{BTreeMap, BTreeSet};

    let spec = loansync::seed::SeedSpec {
        repayments: 2_000,
        ..small()
    };
    let db = seeded_db(spec).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let expected = expected_full(&db.pool).await;
    let queue = MemoryQueue::new();
    let planned = planner::plan_sync(&db.pool, &settings, &full_request(), &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned {
        sync_id, totals, ..
    } = planned
    else {
        panic!("not planned: {planned:?}")
    };

    let rows: Vec<(String, i32, Vec<i64>)> = sqlx::query_as(
        "SELECT entity::text, seq, ids FROM loansync_chunk WHERE sync_id = $1 ORDER BY entity, seq",
    )
    .bind(&sync_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, totals.chunks);
    let mut by_entity: BTreeMap<EntityKind, Vec<(i32, Vec<i64>)>> = BTreeMap::new();
    for (entity, seq, ids) in rows {
        by_entity
            .entry(entity.parse().unwrap())
            .or_default()
            .push((seq, ids));
    }
    for (entity, chunks) in &by_entity {
        let size = settings.chunk_sizes.for_entity(*entity) as usize;
        // Every selected id once, in ascending order across the chunks.
        let ids: Vec<i64> = chunks.iter().flat_map(|(_, ids)| ids.clone()).collect();
        let want: Vec<i64> = expected[entity].iter().copied().collect();
        assert_eq!(ids, want, "{entity}: the chunks' ids");
        // Per part: seqs dense from the part's base, every page full but the last.
        let mut parts: BTreeMap<i32, Vec<&(i32, Vec<i64>)>> = BTreeMap::new();
        for c in chunks {
            parts.entry(c.0 / PART_SEQ_STRIDE).or_default().push(c);
        }
        for (part, chunks) in &parts {
            let seqs: Vec<i32> = chunks.iter().map(|c| c.0).collect();
            let dense: Vec<i32> = (0..chunks.len() as i32)
                .map(|i| part * PART_SEQ_STRIDE + i)
                .collect();
            assert_eq!(seqs, dense, "{entity} part {part}");
            for c in &chunks[..chunks.len() - 1] {
                assert_eq!(c.1.len(), size, "{entity} part {part} chunk {}", c.0);
            }
        }
        if *entity == EntityKind::Repayment {
            // 2,000 repayments, 50 a chunk: 40 chunks, as many parts as allowed.
            assert_eq!(parts.len(), 2, "{entity}: {:?}", parts.keys());
        }
    }
    let jobs: Vec<_> = std::iter::from_fn(|| queue.try_pop()).collect();
    let sent: BTreeSet<(EntityKind, i32)> = jobs.iter().map(|j| (j.entity, j.seq)).collect();
    let planned: BTreeSet<(EntityKind, i32)> = by_entity
        .iter()
        .flat_map(|(e, chunks)| chunks.iter().map(move |c| (*e, c.0)))
        .collect();
    assert_eq!(jobs.len(), planned.len(), "one chunk job per chunk");
    assert_eq!(sent, planned, "one chunk job per chunk");

    // The jobs back on the queue, worked off to the end.
    use loansync::queue::ChunkPublisher;
    queue.publish_chunks(&jobs).await.unwrap();
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
    tokio::time::timeout(
        Duration::from_secs(300),
        loansync::worker::run_memory(ctx, queue, 3),
    )
    .await
    .expect("the chunks are worked off");
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].status, "completed", "{h:?}");
    assert_delivered_all(&api.received(), &expected);
    assert_books_balance(&db.pool).await;
}

fn full_request() -> PlanRequest {
    PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

/// An incremental sync's selections (a window's time-index ranges) are written a
/// statement's chunks at a time from one read of the selection, cut into chunks
/// (`Paging::OnePass`; debug builds take 3 chunks a statement): each entity's chunks are
/// exactly the keyset pages `source::next_ids` reads of the same window, page after
/// page, seq after seq, across the statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incremental_plan_holds_exactly_the_keyset_pages_of_its_window() {
    use loansync::domain::{EntityKind, SyncWindow};
    use loansync::source::next_ids;

    let db = seeded_db(small()).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[("ETL_BATCH_SIZE_LOANS", "7")]);
    let full = db.full_sync_in_process(&settings).await;
    assert_eq!(full.exit_code(), 0, "{}", full.render());
    // Half the repayments and customers change: their loans are selected too.
    sqlx::raw_sql(
        "UPDATE loans_ajoloanrepayment SET date_modified = now() WHERE id % 2 = 0; \
         UPDATE ajo_ajouser SET date_modified = now() WHERE id % 2 = 0;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let queue = MemoryQueue::new();
    let request = PlanRequest {
        sync_type: SyncType::Incremental,
        ..full_request()
    };
    let planned = planner::plan_sync(&db.pool, &settings, &request, &queue)
        .await
        .unwrap();
    let PlanOutcome::Planned { sync_id, .. } = planned else {
        panic!("not planned: {planned:?}")
    };

    let mut conn = db.pool.acquire().await.unwrap();
    let mut multi_statement = Vec::new();
    for entity in EntityKind::ALL {
        let (lo, hi): (
            Option<chrono::DateTime<chrono::Utc>>,
            chrono::DateTime<chrono::Utc>,
        ) = sqlx::query_as(
            "SELECT window_lo, window_hi FROM loansync_sync_entity \
                 WHERE sync_id = $1 AND entity = $2",
        )
        .bind(&sync_id)
        .bind(entity.as_str())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        let window = SyncWindow { lo, hi };
        let size = i64::from(settings.chunk_sizes.for_entity(entity));
        let mut pages = Vec::new();
        let mut after = 0;
        loop {
            let page = next_ids(
                &mut conn,
                entity,
                SyncType::Incremental,
                &window,
                after,
                size,
            )
            .await
            .unwrap();
            let Some(&last) = page.last() else { break };
            let full_page = page.len() as i64 == size;
            pages.push(page);
            if !full_page {
                break;
            }
            after = last;
        }
        let chunks: Vec<(i32, Vec<i64>)> = sqlx::query_as(
            "SELECT seq, ids FROM loansync_chunk WHERE sync_id = $1 AND entity = $2 ORDER BY seq",
        )
        .bind(&sync_id)
        .bind(entity.as_str())
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let seqs: Vec<i32> = chunks.iter().map(|c| c.0).collect();
        assert_eq!(
            seqs,
            (0..pages.len() as i32).collect::<Vec<_>>(),
            "{entity}"
        );
        let ids: Vec<Vec<i64>> = chunks.into_iter().map(|c| c.1).collect();
        assert_eq!(
            ids, pages,
            "{entity}: the chunks are not the window's pages"
        );
        if pages.len() > 3 {
            multi_statement.push(entity);
        }
    }
    // Loans (7 a chunk) and repayments (50) span more than one statement of 3 chunks.
    assert!(
        multi_statement.contains(&EntityKind::Loan)
            && multi_statement.contains(&EntityKind::Repayment),
        "{multi_statement:?}"
    );
}
