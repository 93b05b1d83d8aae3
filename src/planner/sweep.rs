//! A sweep (SPEC.md section 2): what timestamps cannot show, found by comparing the
//! fingerprints of what was delivered with the source, page after page.

use super::PlanError;
use crate::domain::{EntityKind, SyncWindow};
use crate::{ledger, source};

/// How many ids of the source a sweep compares per statement: a keyset page of the full
/// sync's selection (memory stays bounded whatever the table's size).
pub(super) const SWEEP_PAGE: i64 = 20_000;

/// How a sweep went through an entity's buckets (`etl_sweep_buckets_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct BucketCounts {
    /// Digest as stored when last found clean: not read.
    pub unchanged: u64,
    /// Compared record by record, nothing to send: its digest stored.
    pub clean: u64,
    /// Compared, something to send or gone: its stored digest removed.
    pub changed: u64,
}

/// Plans one entity of a sweep, in the planning transaction: finds the id buckets whose
/// digest is not the one stored when a sweep last found them clean
/// ([`source::digest`]), pages through the full sync's selection in those buckets only,
/// plans chunks (of the usual size) of the ids whose fingerprint differs from the
/// delivered one or that were never delivered, records the delivered ids that are gone,
/// and stores the digests of the buckets it found clean. Returns the records and chunks
/// planned, and the buckets by outcome.
pub(super) async fn plan_sweep(
    tx: &mut sqlx::PgConnection,
    sync_id: &str,
    entity: EntityKind,
    window: &SyncWindow,
    size: i64,
) -> Result<(i64, i32, BucketCounts), PlanError> {
    use source::digest::{self, bucket_of};
    let size = usize::try_from(size.max(1)).unwrap_or(usize::MAX);
    // Each page's statement costs enough for PostgreSQL to JIT-compile it, page after
    // page: the compilation costs more than it saves (about 8 % of a loan page, 20 % of
    // a repayment page on dataset M). For this transaction only.
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    let (stale, unchanged) = digest::stale_buckets(&mut *tx, entity).await?;
    let (mut seq, mut planned, mut gone) = (0i32, 0i64, 0u64);
    let mut pending: Vec<i64> = Vec::with_capacity(size);
    // Buckets in which something was found, ascending (pages are in id order).
    let mut changed: Vec<i64> = Vec::new();
    for (first, last) in runs(&stale) {
        let (mut after, upto) = digest::bucket_ids(first, last);
        loop {
            let page = source::sweep_page_within(&mut *tx, entity, window, after, SWEEP_PAGE, upto)
                .await?;
            gone += ledger::plan::record_deleted(&mut *tx, sync_id, entity, &page.gone).await?;
            send_deletes(entity, &page.gone);
            let mut found_here: Vec<i64> = page.gone.iter().chain(&page.changed).copied().collect();
            found_here.sort_unstable();
            for b in found_here.into_iter().map(bucket_of) {
                if changed.last() != Some(&b) {
                    changed.push(b);
                }
            }
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
    }
    if !pending.is_empty() {
        ledger::plan::insert_chunk(&mut *tx, sync_id, entity, seq, &pending).await?;
        planned += pending.len() as i64;
        seq += 1;
    }
    let mut clean = Vec::new();
    let mut removed = Vec::new();
    for b in &stale {
        match b.digest {
            Some(d) if changed.binary_search(&b.bucket).is_err() => clean.push((b.bucket, d)),
            _ => removed.push(b.bucket),
        }
    }
    digest::store(&mut *tx, entity, &clean, &removed).await?;
    let counts = BucketCounts {
        unchanged,
        clean: clean.len() as u64,
        changed: (stale.len() - clean.len()) as u64,
    };
    tracing::info!(%sync_id, %entity, changed = planned, deleted = gone,
        buckets_unchanged = counts.unchanged, buckets_compared = stale.len(), "swept");
    Ok((planned, seq, counts))
}

/// The stale buckets as runs of consecutive buckets (`first`, `last`): one range of ids
/// each, read page after page.
fn runs(stale: &[source::digest::StaleBucket]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for b in stale {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == b.bucket => *last = b.bucket,
            _ => out.push((b.bucket, b.bucket)),
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use source::digest::StaleBucket;

    #[test]
    fn consecutive_stale_buckets_are_read_as_one_range() {
        let stale: Vec<StaleBucket> = [0, 1, 2, 5, 7, 8]
            .into_iter()
            .map(|bucket| StaleBucket {
                bucket,
                digest: None,
            })
            .collect();
        assert_eq!(runs(&stale), vec![(0, 2), (5, 5), (7, 8)]);
        assert!(runs(&[]).is_empty());
    }
}
