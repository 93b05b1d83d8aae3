//! A sweep (SPEC.md section 2): what timestamps cannot show, found by comparing the
//! fingerprints of what was delivered with the source, page after page.

use super::PlanError;
use crate::domain::{EntityKind, SyncWindow};
use crate::{ledger, source};

/// How many ids of the source a sweep compares per statement: a keyset page of the full
/// sync's selection (memory stays bounded whatever the table's size).
pub(super) const SWEEP_PAGE: i64 = 20_000;

/// Plans one entity of a sweep, in the planning transaction: pages through the full
/// sync's selection, plans chunks (of the usual size) of the ids whose fingerprint
/// differs from the delivered one or that were never delivered, and records the
/// delivered ids that are gone. Returns the records and chunks planned.
pub(super) async fn plan_sweep(
    tx: &mut sqlx::PgConnection,
    sync_id: &str,
    entity: EntityKind,
    window: &SyncWindow,
    size: i64,
) -> Result<(i64, i32), PlanError> {
    let size = usize::try_from(size.max(1)).unwrap_or(usize::MAX);
    // Each page's statement costs enough for PostgreSQL to JIT-compile it, page after
    // page: the compilation costs more than it saves (about 8 % of a loan page, 20 % of
    // a repayment page on dataset M). For this transaction only.
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    let (mut after, mut seq, mut planned, mut gone) = (0i64, 0i32, 0i64, 0u64);
    let mut pending: Vec<i64> = Vec::with_capacity(size);
    loop {
        let page = source::sweep_page(&mut *tx, entity, window, after, SWEEP_PAGE).await?;
        gone += ledger::plan::record_deleted(&mut *tx, sync_id, entity, &page.gone).await?;
        send_deletes(entity, &page.gone);
        for id in page.changed {
            pending.push(id);
            if pending.len() == size {
                ledger::plan::insert_chunk(&mut *tx, sync_id, entity, seq, &pending).await?;
                planned += pending.len() as i64;
                seq += 1;
                pending.clear();
            }
        }
        match page.last {
            Some(last) => after = last,
            None => break,
        }
    }
    if !pending.is_empty() {
        ledger::plan::insert_chunk(&mut *tx, sync_id, entity, seq, &pending).await?;
        planned += pending.len() as i64;
        seq += 1;
    }
    tracing::info!(%sync_id, %entity, changed = planned, deleted = gone, "swept");
    Ok((planned, seq))
}

/// Where deleted records would be sent to the analytics platform. The API's contract
/// (SPEC.md section 4) has no delete: nothing is sent, and the ids a sweep finds gone
/// are only recorded (`loansync_deleted`, `loansync deletes list`, the
/// `etl_deleted_records` gauge) for someone to act on. Returns how many were sent: none.
/// Once the contract has a delete, this is the one step to change.
fn send_deletes(entity: EntityKind, ids: &[i64]) -> usize {
    if !ids.is_empty() {
        tracing::info!(%entity, deleted = ids.len(), "deleted records found: not sent (the analytics API has no delete)");
    }
    0
}
