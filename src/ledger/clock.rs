//! The end of a sync's window, capped at the oldest open writing transaction, for any
//! role: the xid clock (migration `20261127000001`) turns the transaction id every role
//! can see into a time (SPEC.md section 2: "window safety for any role").

use super::sql::{SAMPLE_XID_CLOCK, WINDOW_HI};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

/// Why a window's end could not be bounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot bound the sync window: a transaction of this database has been open, with \
     writes, since before loansync's transaction-id clock began ({oldest_sample}), so a row \
     it commits later could carry any earlier time. Nothing was planned; plan again once that \
     transaction has ended (it is the session with the oldest backend_xid in pg_stat_activity)"
)]
pub struct Unbounded {
    pub oldest_sample: String,
}

/// The window's end for a sync planned now: `now()`, or the time of the newest xid-clock
/// sample older than the oldest transaction of this database still open with writes.
/// Run it before the calling transaction writes anything.
pub async fn window_hi(conn: &mut PgConnection) -> sqlx::Result<Result<DateTime<Utc>, Unbounded>> {
    let row = sqlx::query(WINDOW_HI).fetch_one(conn).await?;
    let now: DateTime<Utc> = row.get(0);
    let oldest_open: Option<i32> = row.get(1);
    let cap: Option<DateTime<Utc>> = row.get(2);
    let first_sample: Option<DateTime<Utc>> = row.get(3);
    Ok(match (oldest_open, cap) {
        (None, _) => Ok(now),
        (Some(_), Some(cap)) => Ok(cap.min(now)),
        (Some(_), None) => Err(Unbounded {
            oldest_sample: first_sample
                .map(|t| format!("first sample at {}", t.to_rfc3339()))
                .unwrap_or_else(|| "no sample yet".into()),
        }),
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
