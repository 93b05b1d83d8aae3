//! The end of a sync's window, capped at the oldest transaction still open that may
//! still commit rows (SPEC.md section 2, "Window"). Where the role can read a session's
//! `xact_start` that start is the cap; otherwise, and for prepared transactions, the xid
//! clock (migration `20261127000001`) turns the transaction id every role can see into
//! a time before the transaction's first write. [`window_cap`] says which applies.

use super::sql::{SAMPLE_XID_CLOCK, WINDOW_CAP, WINDOW_HI};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

/// Why a window's end could not be bounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot bound the sync window: a transaction of this database has been open, with \
     writes, since before loansync's transaction-id clock began ({oldest_sample}), so a row \
     it commits later could carry any earlier time. Nothing was planned; plan again once that \
     transaction has ended (it is the session with the oldest backend_xid in pg_stat_activity, \
     or the oldest transaction in pg_prepared_xacts: COMMIT PREPARED or ROLLBACK PREPARED it)"
)]
pub struct Unbounded {
    pub oldest_sample: String,
}

/// The window's end for a sync planned now: `now()`, capped at the `xact_start` of every
/// other open transaction of this database whose start this role can read (written yet
/// or not), and at the time of the newest xid-clock sample older than each other open
/// transaction with writes and each prepared transaction (`window_hi.sql` says which is
/// which). Run it before the calling transaction writes anything.
pub async fn window_hi(conn: &mut PgConnection) -> sqlx::Result<Result<DateTime<Utc>, Unbounded>> {
    let row = sqlx::query(WINDOW_HI).fetch_one(conn).await?;
    let now: DateTime<Utc> = row.get(0);
    let oldest_start: Option<DateTime<Utc>> = row.get(1);
    let oldest_by_xid: Option<i32> = row.get(2);
    let xid_cap: Option<DateTime<Utc>> = row.get(3);
    let first_sample: Option<DateTime<Utc>> = row.get(4);
    let by_xid = match (oldest_by_xid, xid_cap) {
        (None, _) => None,
        (Some(_), Some(cap)) => Some(cap),
        (Some(_), None) => {
            return Ok(Err(Unbounded {
                oldest_sample: first_sample
                    .map(|t| format!("first sample at {}", t.to_rfc3339()))
                    .unwrap_or_else(|| "no sample yet".into()),
            }));
        }
    };
    Ok(Ok([oldest_start, by_xid]
        .into_iter()
        .flatten()
        .fold(now, DateTime::min)))
}

/// How [`window_hi`] caps the window for the role connected (SPEC.md section 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowCap {
    /// The role reads every session's `xact_start` (superuser or `pg_read_all_stats`):
    /// an open transaction caps the window at its start. A prepared transaction, whose
    /// start is recorded nowhere, still caps it at its first write.
    TransactionStart,
    /// The role reads only its own sessions' `xact_start`: another role's open
    /// transaction caps the window at its first write (the xid clock). A row stamped with
    /// a time taken before its transaction's first write (a transaction that reads first
    /// and writes `now()` later, a time the application took earlier), committed after a
    /// sync was planned, can be missed. `grant` is the statement that closes it.
    FirstWrite { grant: String },
}

impl std::fmt::Display for WindowCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowCap::TransactionStart => f.write_str(
                "capped at transaction start: the sync window ends at or before the start \
                 (xact_start) of every open transaction of this database (a prepared one's: \
                 its first write)",
            ),
            WindowCap::FirstWrite { grant } => write!(
                f,
                "capped at first write, not transaction start: this role cannot read other \
                 roles' xact_start, so the sync window ends at or before the first write of \
                 their open transactions. A row stamped with a time taken before its \
                 transaction's first write (now() in a transaction that read first, a time \
                 the application took earlier) and committed after a sync was planned can be \
                 missed; to cap at transaction start, an administrator runs: {grant}"
            ),
        }
    }
}

/// Which [`WindowCap`] applies to the role of `pool`: whether it has the privileges of
/// `pg_read_all_stats` (a superuser has them all).
pub async fn window_cap(pool: &PgPool) -> sqlx::Result<WindowCap> {
    let (role, reads_all): (String, bool) = sqlx::query_as(WINDOW_CAP).fetch_one(pool).await?;
    Ok(if reads_all {
        WindowCap::TransactionStart
    } else {
        WindowCap::FirstWrite {
            grant: format!("GRANT pg_read_all_stats TO {role};"),
        }
    })
}

/// Takes one sample of the xid clock (and drops old ones). Cheap: one row.
pub async fn sample(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query(SAMPLE_XID_CLOCK).execute(conn).await?;
    Ok(())
}

/// [`sample`] in a transaction of its own.
pub async fn sample_now(pool: &PgPool) -> sqlx::Result<()> {
    let mut conn = pool.acquire().await?;
    sample(&mut conn).await
}
