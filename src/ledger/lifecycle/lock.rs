//! The planning lock: a session advisory lock held by whoever claims and plans a sync,
//! so that at most one process plans at a time, and so that a `planning` sync nobody
//! holds the lock for is known to have lost its planner.

use crate::db::pooling::{self, SessionLockError};
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
///
/// Taking it verifies that the lock is this session's ([`pooling::verify_session_lock`]):
/// behind a transaction pooler it would be taken on whatever backend the statement landed
/// on, and two planners could plan at once. That is refused, fatally, before anything is
/// claimed.
#[derive(Debug)]
pub struct PlanningLock {
    conn: Option<sqlx::PgConnection>,
    /// The backend (`pg_backend_pid()`) the lock was granted to.
    backend_pid: i32,
}

impl PlanningLock {
    /// Waits until no other session plans (planning takes seconds; a wait longer than
    /// the connection's `lock_timeout` is an error, and the caller tries again later).
    pub async fn acquire(pool: &PgPool) -> Result<PlanningLock, SessionLockError> {
        let mut conn = pool.acquire().await?.detach();
        let backend_pid = pooling::advisory_lock(&mut conn, PLANNING_LOCK_KEY).await?;
        Self::verified(conn, backend_pid, pool).await
    }

    /// Takes the lock if no other session holds it; `None` when one does (it is
    /// planning, and sees what this caller would have seen).
    pub async fn try_acquire(pool: &PgPool) -> Result<Option<PlanningLock>, SessionLockError> {
        let mut conn = pool.acquire().await?.detach();
        match pooling::try_advisory_lock(&mut conn, PLANNING_LOCK_KEY).await? {
            Some(backend_pid) => Self::verified(conn, backend_pid, pool).await.map(Some),
            None => {
                let _ = sqlx::Connection::close(conn).await;
                Ok(None)
            }
        }
    }

    /// The lock just granted on `conn`, once verified to be this session's; dropped (its
    /// connection closed) when it is not.
    async fn verified(
        mut conn: sqlx::PgConnection,
        backend_pid: i32,
        pool: &PgPool,
    ) -> Result<PlanningLock, SessionLockError> {
        pooling::verify_session_lock(&mut conn, backend_pid, PLANNING_LOCK_KEY, pool).await?;
        Ok(PlanningLock {
            conn: Some(conn),
            backend_pid,
        })
    }

    /// Whether the lock is still this session's (see [`PlanningLock::acquire`]).
    pub async fn verify(&mut self, pool: &PgPool) -> Result<(), SessionLockError> {
        let conn = self
            .conn
            .as_mut()
            .ok_or(SessionLockError::Db(sqlx::Error::PoolClosed))?;
        pooling::verify_session_lock(conn, self.backend_pid, PLANNING_LOCK_KEY, pool).await
    }

    /// Releases the lock and closes its connection.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SELECT pg_advisory_unlock({PLANNING_LOCK_KEY})"
            )))
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
    E: From<SessionLockError>,
{
    let lock = PlanningLock::acquire(pool).await?;
    let result = f(&lock).await;
    lock.release().await;
    result
}
