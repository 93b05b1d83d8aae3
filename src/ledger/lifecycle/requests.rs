//! Planning requests (`loansync_request`): recorded the moment they arrive, pending
//! until a sync serves them, coalesced when the slot frees.

use super::syncs::{SyncSpec, decode_entities};
use crate::domain::{EntityKind, SyncType};
use crate::ledger::reads::decode_error;
use crate::ledger::sql::{INSERT_REQUEST, KNOWN_REQUEST, PENDING_FOR_UPDATE, PENDING_REQUESTS};
use crate::ledger::states::{Purpose, RequestStatus, SyncState};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// Where a planning request is: `pending` or `planned`, the sync serving it, and
/// whether that sync has finished (the request is then answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestState {
    pub state: RequestStatus,
    pub sync_id: Option<String>,
    pub finished: bool,
}

/// What [`record_request`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A new request, now pending.
    New,
    /// The request id was recorded before: nothing new (a repeated message, a retried
    /// Job pod).
    Known(RequestState),
}

/// Records a planning request as `pending`, durably, before anything waits on a lock or
/// a clock: the planner acks its message once this committed, and plans the pending
/// requests after ([`super::claim_pending`]). A repeated id records nothing.
pub async fn record_request(
    pool: &PgPool,
    request_id: &str,
    spec: &SyncSpec,
) -> sqlx::Result<Recorded> {
    let mut tx = pool.begin().await?;
    let recorded = insert(&mut tx, request_id, spec, RequestStatus::Pending, None).await?;
    let outcome = if recorded {
        Recorded::New
    } else {
        match request_state_in(&mut tx, request_id, false).await? {
            Some(known) => Recorded::Known(known),
            // Recorded and deleted in between: nothing deletes requests.
            None => Recorded::New,
        }
    };
    fail::fail_point!("lifecycle::record::before_commit");
    tx.commit().await?;
    Ok(outcome)
}

/// Inserts a request row; false (nothing written) when the id is known.
pub(super) async fn insert(
    conn: &mut PgConnection,
    request_id: &str,
    spec: &SyncSpec,
    state: RequestStatus,
    sync_id: Option<&str>,
) -> sqlx::Result<bool> {
    let names: Vec<&str> = spec.entities.iter().map(|e| e.as_str()).collect();
    let inserted: Option<String> = sqlx::query_scalar(INSERT_REQUEST)
        .bind(request_id)
        .bind(spec.sync_type.as_str())
        .bind(&names)
        .bind(spec.since)
        .bind(spec.until)
        .bind(state.as_str())
        .bind(sync_id)
        .bind(spec.purpose == Purpose::Sweep)
        .fetch_optional(conn)
        .await?;
    Ok(inserted.is_some())
}

/// A request known to the ledger, as [`request_state`] reads it.
#[derive(Debug, sqlx::FromRow)]
struct KnownRequest {
    req_state: String,
    sync_id: Option<String>,
    sync_state: Option<String>,
}

/// [`RequestState`] of a request id; `None` until a planner has recorded it.
pub async fn request_state(pool: &PgPool, request_id: &str) -> sqlx::Result<Option<RequestState>> {
    let mut conn = pool.acquire().await?;
    request_state_in(&mut conn, request_id, false).await
}

/// [`request_state`] on `conn`, locking the request row with `for_update`.
pub(super) async fn request_state_in(
    conn: &mut PgConnection,
    request_id: &str,
    for_update: bool,
) -> sqlx::Result<Option<RequestState>> {
    let sql = if for_update {
        format!("{KNOWN_REQUEST} FOR UPDATE OF r")
    } else {
        KNOWN_REQUEST.to_string()
    };
    let row: Option<KnownRequest> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(request_id)
        .fetch_optional(conn)
        .await?;
    row.map(|r| {
        let sync_state: Option<SyncState> = r
            .sync_state
            .map(|s| s.parse().map_err(decode_error))
            .transpose()?;
        Ok(RequestState {
            state: r.req_state.parse().map_err(decode_error)?,
            finished: sync_state == Some(SyncState::Done),
            sync_id: r.sync_id,
        })
    })
    .transpose()
}

/// A pending planning request, as `loansync status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingEntry {
    pub request_id: String,
    /// `full`, `incremental` or `sweep`.
    pub kind: String,
    pub received_at: DateTime<Utc>,
    /// A backfill's lower bound.
    pub since: Option<DateTime<Utc>>,
}

/// The pending requests, oldest first.
pub async fn pending_requests(pool: &PgPool) -> sqlx::Result<Vec<PendingEntry>> {
    sqlx::query_as(PENDING_REQUESTS).fetch_all(pool).await
}

/// A pending request, as [`coalesce`] reads it: decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingRequest {
    pub(crate) request_id: String,
    pub(crate) sync_type: SyncType,
    pub(crate) entities: Vec<EntityKind>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) until: Option<DateTime<Utc>>,
    pub(crate) sweep: bool,
}

#[derive(sqlx::FromRow)]
struct StoredRequest {
    request_id: String,
    sync_type: String,
    entities: Vec<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    sweep: bool,
}

/// The pending requests, oldest first, locked until the claiming transaction ends.
pub(super) async fn pending_for_update(
    conn: &mut PgConnection,
) -> sqlx::Result<Vec<PendingRequest>> {
    let rows: Vec<StoredRequest> = sqlx::query_as(PENDING_FOR_UPDATE).fetch_all(conn).await?;
    rows.into_iter()
        .map(|r| {
            Ok(PendingRequest {
                sync_type: r
                    .sync_type
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                entities: decode_entities(&r.entities)?,
                request_id: r.request_id,
                since: r.since,
                until: r.until,
                sweep: r.sweep,
            })
        })
        .collect()
}

/// Which pending requests the next sync serves, and what that sync is. Oldest first:
/// every pending full request and the incremental ones it covers become one full sync
/// (a pending full supersedes the incrementals it covers); otherwise the oldest sweep or
/// backfill runs alone (each is a kind of its own); otherwise every pending incremental
/// request becomes one incremental sync of the union of their entities.
pub(crate) fn coalesce(pending: &[PendingRequest]) -> Option<(SyncSpec, Vec<String>)> {
    let regular = |t: SyncType| {
        pending
            .iter()
            .filter(move |r| r.sync_type == t && r.since.is_none() && !r.sweep)
            .collect::<Vec<_>>()
    };
    let union = |rows: &[&PendingRequest]| -> Vec<EntityKind> {
        EntityKind::ALL
            .into_iter()
            .filter(|e| rows.iter().any(|r| r.entities.contains(e)))
            .collect()
    };
    let fulls = regular(SyncType::Full);
    if !fulls.is_empty() {
        let entities = union(&fulls);
        let mut served: Vec<String> = fulls.iter().map(|r| r.request_id.clone()).collect();
        for r in regular(SyncType::Incremental) {
            if r.entities.iter().all(|e| entities.contains(e)) {
                served.push(r.request_id.clone());
            }
        }
        let spec = SyncSpec {
            sync_type: SyncType::Full,
            entities,
            purpose: Purpose::Sync,
            since: None,
            until: None,
        };
        return Some((spec, served));
    }
    let oldest = pending.first()?;
    if oldest.sweep || oldest.since.is_some() {
        let spec = SyncSpec {
            sync_type: SyncType::Incremental,
            entities: oldest.entities.clone(),
            purpose: if oldest.sweep {
                Purpose::Sweep
            } else {
                Purpose::Backfill
            },
            since: oldest.since,
            until: oldest.until,
        };
        return Some((spec, vec![oldest.request_id.clone()]));
    }
    let incrementals = regular(SyncType::Incremental);
    let spec = SyncSpec {
        sync_type: SyncType::Incremental,
        entities: union(&incrementals),
        purpose: Purpose::Sync,
        since: None,
        until: None,
    };
    Some((
        spec,
        incrementals.iter().map(|r| r.request_id.clone()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, sync_type: SyncType, entities: &[EntityKind], since: bool) -> PendingRequest {
        PendingRequest {
            request_id: id.into(),
            sync_type,
            entities: entities.to_vec(),
            since: since.then(Utc::now),
            until: None,
            sweep: false,
        }
    }

    use EntityKind::{Customer, Loan, Officer, Repayment};
    use SyncType::{Full, Incremental};

    #[test]
    fn a_pending_sweep_is_never_merged_with_other_requests() {
        let sweep = |id: &str, entities: &[EntityKind]| PendingRequest {
            sweep: true,
            ..req(id, Incremental, entities, false)
        };
        // Oldest first: the sweep runs alone, for its own entities.
        let pending = [
            sweep("s1", &[Loan]),
            req("i1", Incremental, &[Loan, Customer], false),
            sweep("s2", &[Customer]),
        ];
        let (spec, served) = coalesce(&pending).unwrap();
        assert_eq!(spec.purpose, Purpose::Sweep);
        assert_eq!(spec.sync_type, Incremental);
        assert_eq!(spec.entities, vec![Loan]);
        assert_eq!(served, vec!["s1"]);
        // Behind an incremental, the incrementals merge without the sweeps...
        let (spec, served) = coalesce(&pending[1..]).unwrap();
        assert_eq!(
            (spec.purpose, served),
            (Purpose::Sync, vec!["i1".to_string()])
        );
        // ...and a full supersedes incrementals, never a sweep.
        let with_full = [sweep("s1", &[Loan]), req("f1", Full, &[Loan], false)];
        let (spec, served) = coalesce(&with_full).unwrap();
        assert_eq!((spec.sync_type, served), (Full, vec!["f1".to_string()]));
    }

    #[test]
    fn a_pending_full_supersedes_the_incrementals_it_covers() {
        let pending = [
            req("i1", Incremental, &[Loan], false),
            req("f1", Full, &[Loan, Customer], false),
            req("i2", Incremental, &[Officer], false),
            req("f2", Full, &[Repayment], false),
            req("b1", Incremental, &[Loan], true),
        ];
        let (spec, served) = coalesce(&pending).unwrap();
        assert_eq!(spec.sync_type, Full);
        assert_eq!(spec.entities, vec![Customer, Loan, Repayment]);
        assert_eq!(
            served,
            vec!["f1", "f2", "i1"],
            "i2 (officer) is not covered"
        );
    }

    #[test]
    fn without_a_full_the_oldest_backfill_runs_alone_else_incrementals_merge() {
        let backfill_first = [
            req("b1", Incremental, &[Loan], true),
            req("i1", Incremental, &[Loan], false),
        ];
        let (spec, served) = coalesce(&backfill_first).unwrap();
        assert_eq!(
            (spec.purpose, served),
            (Purpose::Backfill, vec!["b1".to_string()])
        );
        let incrementals = [
            req("i1", Incremental, &[Loan], false),
            req("b1", Incremental, &[Loan], true),
            req("i2", Incremental, &[Officer], false),
        ];
        let (spec, served) = coalesce(&incrementals).unwrap();
        assert_eq!(spec.purpose, Purpose::Sync);
        assert_eq!(spec.entities, vec![Officer, Loan]);
        assert_eq!(served, vec!["i1", "i2"]);
        assert!(coalesce(&[]).is_none());
    }
}
