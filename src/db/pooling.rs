//! Transaction pooling (PgBouncer `pool_mode = transaction` and the like): told apart
//! from a session of one's own, by `loansync check` and by the planning lock.
//!
//! Behind a transaction pooler each transaction of a client connection may run on a
//! different server backend. A session advisory lock (the planning lock) is then taken
//! on whatever backend its statement lands on and stays there, held by nobody that knows
//! it: two planners plan at once, or the lock leaks and planning blocks. Both checks
//! look at `pg_backend_pid()`, which names the backend a statement runs on: on a direct
//! connection, or through a session-mode pool, a client connection keeps one backend for
//! its life and no two client connections share one.
//!
//! Every statement here goes through the simple query protocol ([`sqlx::raw_sql`]: one
//! `Query` message, one `ReadyForQuery`, one implicit transaction): sqlx sends a bound
//! statement, named or unnamed, as Parse/Describe/Sync then Bind/Execute/Sync, two round
//! trips a transaction pooler may put on two backends, and would fail there (the prepared
//! statement "does not exist") instead of telling what it saw. The values inlined in the
//! SQL are integers.

use sqlx::{PgConnection, PgPool, Row};

/// What to do about it, in every message of this module.
pub const FIX: &str = "use a session-mode pool (PgBouncer pool_mode = session) or a direct \
     connection for the planner: DATABASE_URL of the planner must not point at a transaction \
     pooler (deploy/README.md, \"Connection poolers\")";

/// Statements in a transaction pooler's place: a client connection's backend changed, or
/// two client connections ran on one backend. Fatal ([`SessionLockError`]'s classification):
/// nothing can be planned safely until the installation changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transaction pooling detected: {evidence}; {FIX}")]
pub struct TransactionPooling {
    /// What was seen, with the backends' pids.
    pub evidence: String,
}

/// The backend a statement on `conn` runs on.
async fn backend_pid(conn: &mut PgConnection) -> sqlx::Result<i32> {
    sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?
        .try_get(0)
}

/// Why a session advisory lock could not be taken or verified.
#[derive(Debug, thiserror::Error)]
pub enum SessionLockError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// Not a session of one's own: fatal.
    #[error(transparent)]
    Pooling(#[from] TransactionPooling),
}

impl crate::failure::Classify for SessionLockError {
    /// What the error means for the work that met it.
    fn failure(&self) -> crate::failure::Failure {
        match self {
            SessionLockError::Db(e) => crate::failure::Failure::of_sqlx(e),
            SessionLockError::Pooling(_) => crate::failure::Failure::Fatal,
        }
    }
}

/// Takes the session advisory lock `key` on `conn` if no other session holds it, and
/// returns the backend it was granted to (`None`: another session holds it), read in the
/// same statement.
pub async fn try_advisory_lock(conn: &mut PgConnection, key: i64) -> sqlx::Result<Option<i32>> {
    let sql = format!("SELECT pg_try_advisory_lock({key}), pg_backend_pid()");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(conn)
        .await?;
    let got: bool = row.try_get(0)?;
    Ok(if got { Some(row.try_get(1)?) } else { None })
}

/// Takes the session advisory lock `key` on `conn`, waiting for it, and returns the
/// backend it was granted to, read in the same statement (so on the same backend, even
/// behind a transaction pooler).
pub async fn advisory_lock(conn: &mut PgConnection, key: i64) -> sqlx::Result<i32> {
    let sql = format!("SELECT pg_advisory_lock({key}), pg_backend_pid()");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(conn)
        .await?
        .try_get(1)
}

/// Whether the session advisory lock `key`, granted to the backend `granted_to` on
/// `conn`, is still that session's: `conn` still runs on `granted_to`, which holds the
/// lock (`pg_locks`), and another connection of `pool` runs elsewhere. A transaction
/// pooler fails one of the three whichever way it hands out its backends: in turn (the
/// lock's own connection moves) or the most recently used first (the other connection
/// lands on the lock's backend). Errors: [`TransactionPooling`], or the database's.
pub async fn verify_session_lock(
    conn: &mut PgConnection,
    granted_to: i32,
    key: i64,
    pool: &PgPool,
) -> Result<(), SessionLockError> {
    // Advisory locks on a bigint key: classid the high half, objid the low half,
    // objsubid 1; at most one session holds an exclusive one.
    let sql = format!(
        "SELECT pg_backend_pid(), (SELECT min(l.pid) FROM pg_locks l \
           WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {} AND l.objid = {} \
             AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        (key >> 32) as u32,
        key as u32,
    );
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await?;
    let (now, holder): (i32, Option<i32>) = (row.try_get(0)?, row.try_get(1)?);
    let elsewhere = backend_pid(&mut *pool.acquire().await?).await?;
    judge_lock(granted_to, now, holder, elsewhere).map_err(Into::into)
}

/// [`verify_session_lock`]'s verdict on what it read.
fn judge_lock(
    granted_to: i32,
    now: i32,
    holder: Option<i32>,
    elsewhere: i32,
) -> Result<(), TransactionPooling> {
    let evidence = if now != granted_to {
        format!(
            "the planning lock's connection was on backend {granted_to} when the lock was \
             granted and is now on backend {now}"
        )
    } else if holder != Some(granted_to) {
        format!(
            "the planning lock, granted to backend {granted_to}, is held by {}",
            holder.map_or("no backend".to_string(), |h| format!("backend {h}"))
        )
    } else if elsewhere == granted_to {
        format!(
            "another connection ran on backend {granted_to}, the planning lock's own, while \
             the lock's connection was open"
        )
    } else {
        return Ok(());
    };
    Err(TransactionPooling { evidence })
}

/// The order in which [`detect`]'s two connections ask for their backend: each by turns
/// and each twice in a row, so that a pooler handing out its backends in turn moves one
/// connection, and one handing out the most recently used puts both on one backend.
const TURNS: [usize; 6] = [0, 1, 1, 0, 0, 1];

/// What [`detect`] saw on a direct connection or a session-mode pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sessions {
    /// The backend of each of the two connections.
    pub backends: [i32; 2],
    /// How many transactions ran.
    pub transactions: usize,
}

/// `loansync check`'s test: two connections of `pool` (so with loansync's connect
/// options) ask for their backend in separate transactions, interleaved ([`TURNS`]).
/// [`TransactionPooling`] when one connection saw two backends or two connections one.
pub async fn detect(pool: &PgPool) -> Result<Sessions, SessionLockError> {
    let mut conns = [pool.acquire().await?, pool.acquire().await?];
    let mut seen = Vec::with_capacity(TURNS.len());
    for &c in &TURNS {
        seen.push((c, backend_pid(&mut conns[c]).await?));
    }
    Ok(judge_sessions(&seen)?)
}

/// [`detect`]'s verdict on `(connection, backend)` in the order they were read.
fn judge_sessions(seen: &[(usize, i32)]) -> Result<Sessions, TransactionPooling> {
    let mut backends: [Option<i32>; 2] = [None, None];
    for &(c, pid) in seen {
        match backends[c] {
            Some(first) if first != pid => {
                return Err(TransactionPooling {
                    evidence: format!(
                        "one client connection ran on backend {first}, then on backend {pid}, \
                         with no transaction open in between"
                    ),
                });
            }
            _ => backends[c] = Some(pid),
        }
        if backends[1 - c] == Some(pid) {
            return Err(TransactionPooling {
                evidence: format!("two client connections ran on the same backend {pid}"),
            });
        }
    }
    match backends {
        [Some(a), Some(b)] => Ok(Sessions {
            backends: [a, b],
            transactions: seen.len(),
        }),
        _ => Err(TransactionPooling {
            evidence: "fewer than two connections answered".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_backends_are_sessions_anything_else_is_pooling() {
        let direct: Vec<(usize, i32)> = TURNS.iter().map(|&c| (c, 100 + c as i32)).collect();
        assert_eq!(
            judge_sessions(&direct),
            Ok(Sessions {
                backends: [100, 101],
                transactions: 6
            })
        );
        // Most recently used first: both connections on one backend.
        let lifo: Vec<(usize, i32)> = TURNS.iter().map(|&c| (c, 100)).collect();
        let e = judge_sessions(&lifo).unwrap_err();
        assert!(e.evidence.contains("same backend 100"), "{e}");
        // In turn: a connection moves.
        let turns = [(0, 100), (1, 101), (1, 100)];
        let e = judge_sessions(&turns).unwrap_err();
        assert!(
            e.evidence.contains("backend 101, then on backend 100"),
            "{e}"
        );
        assert!(e.to_string().starts_with("transaction pooling detected: "));
        assert!(e.to_string().ends_with(FIX));
    }

    #[test]
    fn the_lock_is_a_session_s_when_its_backend_holds_it_alone() {
        assert_eq!(judge_lock(7, 7, Some(7), 8), Ok(()));
        let moved = judge_lock(7, 9, Some(7), 8).unwrap_err();
        assert!(moved.evidence.contains("now on backend 9"), "{moved}");
        let lost = judge_lock(7, 7, None, 8).unwrap_err();
        assert!(lost.evidence.contains("held by no backend"), "{lost}");
        let shared = judge_lock(7, 7, Some(7), 7).unwrap_err();
        assert!(shared.evidence.contains("another connection"), "{shared}");
    }

    #[test]
    fn the_lock_key_splits_as_pg_locks_shows_it() {
        // The planning lock's key fits the low half: classid 0, objid the key, as
        // `ledger`'s PLANNER_GONE_SQL reads it.
        let key = crate::ledger::lifecycle::PLANNING_LOCK_KEY;
        assert_eq!(((key >> 32) as u32, key as u32), (0, 1_280_528_460));
    }
}
