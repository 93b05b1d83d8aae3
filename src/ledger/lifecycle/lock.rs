//! The planning lock: a session advisory lock held by whoever claims and plans a sync,
//! so that at most one process plans at a time, and so that a `planning` sync nobody
//! holds the lock for is known to have lost its planner.

use sqlx::PgPool;
use std::sync::LazyLock;

/// The key of the session advisory lock held while a sync is claimed and planned.
pub const PLANNING_LOCK_KEY: i64 = 0x4C53_504C;

/// An SQL predicate: no session of this database holds the planning lock, so a sync
/// left `planning` lost its planner. `pg_locks` shows a one-argument advisory lock with
/// the key's high half as `classid`, its low half as `objid`, and `objsubid` 1. The same
/// predicate in `status`, the stalled gauge and the planner's housekeeping.
pub static PLANNER_GONE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "NOT EXISTS (SELECT 1 FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {} AND l.objid = {} \
           AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        PLANNING_LOCK_KEY >> 32,
        PLANNING_LOCK_KEY & 0xFFFF_FFFF
    )
});

/// Held by whoever claims and plans a sync (the planner, single-process mode, `errors
/// retry`, `abandon`, `watermark set`): a session advisory lock on a connection of its
/// own, taken out of the pool. [`PlanningLock::release`] unlocks it and closes that
/// connection; the death of the process releases it too, since PostgreSQL ends the
/// session with its socket.
#[derive(Debug)]
pub struct PlanningLock {
    conn: Option<sqlx::PgConnection>,
}

impl PlanningLock {
    /// Waits until no other session plans (planning takes seconds; a wait longer than
    /// the connection's `lock_timeout` is an error, and the caller tries again later).
    pub async fn acquire(pool: &PgPool) -> sqlx::Result<PlanningLock> {
        let mut conn = pool.acquire().await?.detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PLANNING_LOCK_KEY)
            .execute(&mut conn)
            .await?;
        Ok(PlanningLock { conn: Some(conn) })
    }

    /// Takes the lock if no other session holds it; `None` when one does (it is
    /// planning, and sees what this caller would have seen).
    pub async fn try_acquire(pool: &PgPool) -> sqlx::Result<Option<PlanningLock>> {
        let mut conn = pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(PLANNING_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(PlanningLock { conn: Some(conn) }))
        } else {
            let _ = sqlx::Connection::close(conn).await;
            Ok(None)
        }
    }

    /// Releases the lock and closes its connection.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(PLANNING_LOCK_KEY)
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// Runs `f` holding the [`PlanningLock`] (waiting for it), and releases the lock
/// whatever `f` returned: the one acquire-operate-release of every caller.
pub async fn with_planning_lock<T, E>(
    pool: &PgPool,
    f: impl AsyncFnOnce(&PlanningLock) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
    let lock = PlanningLock::acquire(pool).await?;
    let result = f(&lock).await;
    lock.release().await;
    result
}
