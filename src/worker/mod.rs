//! Process one chunk into an outcome ([`process_chunk`]), and the one loop that feeds it
//! from a [`crate::queue::Consumer`] ([`run`]): RabbitMQ's ([`run_amqp`]) or the in-memory queue's
//! ([`run_memory`]).
//!
//! Per chunk: read the ledger (a settled chunk is a duplicate and is only acked), load
//! and transform the rows, POST one batch, then settle in one transaction (counters,
//! error rows, resolutions, fingerprints; finalization when it was the sync's last
//! chunk). The message is acked only after that commit. A settle that keeps failing
//! after the POST succeeded goes back to the queue as a settle job carrying the API's
//! answer ([`crate::domain::SettleJob`]): it is retried as a settle, never as a chunk.

//!
//! The files: [`chunk`] (a chunk job processed: read, loaded, sent), [`settle`] (the
//! API's answer settled, retried as a settle), [`handle`] (a message turned into a
//! [`crate::queue::Disposition`], panics contained), [`run`] (the loop over a consumer),
//! [`fleet`] (the heartbeat, the share of the fleet-wide cap, the API's shared pause).

mod chunk;
pub mod fleet;
mod handle;
mod run;
mod settle;

pub use chunk::{fail_chunk, is_permanent, process_chunk, process_settle};
pub use handle::{contain_panic, handle_delivery, handle_message};
pub use run::{run, run_amqp, run_memory};

use crate::domain::SettleJob;
use crate::failure::{Classify, Failure};
use crate::ledger;
use crate::ledger::states::FinalStatus;
use crate::sink::AnalyticsClient;
use crate::telemetry::Telemetry;
use sqlx::PgPool;
use std::time::Duration;

/// What a worker needs to process chunks.
pub struct WorkerContext {
    pub pool: PgPool,
    pub client: AnalyticsClient,
    /// Starts of one chunk after which it is settled as failed and dead-lettered.
    pub delivery_limit: u32,
    /// Returns of a job after which it goes back as a fresh copy before any work
    /// ([`handle_delivery`]): `delivery_limit`, or less when the chunk queue's own
    /// `x-delivery-limit` (made with another setting) would drop it sooner.
    pub renew_at: std::sync::atomic::AtomicU32,
    /// How long a chunk is held while PostgreSQL is unreachable before it goes back to
    /// the queue (see [`crate::db::through_outage`]); also how long a settle after a
    /// successful POST is retried before it goes back as a settle job.
    pub db_outage_wait: Duration,
    /// The registry this worker counts in.
    pub telemetry: Telemetry,
    /// The form of the fingerprint upsert its settles use, learned per entity.
    pub upsert: ledger::settle::FingerprintUpsert,
}

/// How one chunk ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutcome {
    /// Sent and settled by this worker; `finished` when it closed the sync.
    Settled {
        succeeded: usize,
        failed: usize,
        finished: Option<FinalStatus>,
    },
    /// Settled before (a redelivered or duplicated job): nothing sent, nothing counted.
    Duplicate,
    /// The API refused the credentials: the sync was failed and its chunks settled.
    Aborted,
    /// Started more often than the delivery limit: settled as failed records.
    GaveUp { reason: String },
    /// The API answered but the settle kept failing: the answer goes back to the queue
    /// as a settle job (`error`: the last settle failure).
    SettleDeferred { job: Box<SettleJob>, error: String },
}

/// Why a chunk could not be processed now. Each says what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The message names no chunk of the ledger: it can never succeed (dead-letter).
    #[error("no chunk {0} in the ledger")]
    Unknown(String),
    /// Processing the chunk panicked: its records are settled as failed with this code
    /// and the message is dead-lettered.
    #[error("permanent failure ({code}): {reason}")]
    Permanent { code: &'static str, reason: String },
    /// The chunk could not even be read from the ledger: no attempt was counted. Put
    /// back without spending a delivery (transient), or dead-lettered unsettled when
    /// the ledger's row cannot be read at all (permanent).
    #[error("cannot start the chunk: {0}")]
    NotStarted(#[source] sqlx::Error),
    /// Reading the source rows failed for a reason that is not the rows' own (the
    /// database, a privilege): put back, the attempt counted.
    #[error("cannot read the source rows: {0}")]
    Source(#[source] sqlx::Error),
    /// Writing the ledger failed (settling, aborting): put back, or dead-lettered
    /// unsettled when the write can never succeed. Never a record's failure.
    #[error("cannot write the ledger: {0}")]
    Ledger(#[source] sqlx::Error),
}

impl Classify for ChunkError {
    /// What this error means for the chunk: decided by type, never by text.
    fn failure(&self) -> Failure {
        match self {
            ChunkError::Unknown(_) | ChunkError::Permanent { .. } => Failure::Permanent,
            ChunkError::NotStarted(e) | ChunkError::Ledger(e) => Failure::of_sqlx(e),
            // Unreadable rows never get here (they fail one by one in `load_isolating`).
            ChunkError::Source(e) => match Failure::of_sqlx(e) {
                Failure::Permanent => Failure::Transient,
                other => other,
            },
        }
    }
}

/// Error code of records whose source row cannot be read (decoded) as it is.
pub const RECORD_UNREADABLE: &str = "RECORD_UNREADABLE";

/// Error code of records of a chunk whose processing panicked.
pub const WORKER_PANIC: &str = "WORKER_PANIC";

/// Error code of records of a chunk started more often than `ETL_DELIVERY_LIMIT`.
pub const CHUNK_GAVE_UP: &str = "CHUNK_GAVE_UP";

/// Error code of records whose row was deleted after the sync was planned.
pub const SOURCE_ROW_MISSING: &str = "SOURCE_ROW_MISSING";

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_failure_is_never_a_record_failure() {
        let decode = || sqlx::Error::ColumnDecode {
            index: "date_created".into(),
            source: "out of range".into(),
        };
        assert!(is_permanent(&decode()));
        // The ledger's own decode failure: the chunk is dead-lettered unsettled, its
        // records are not at fault.
        assert_eq!(ChunkError::Ledger(decode()).failure(), Failure::Permanent);
        assert_eq!(
            ChunkError::NotStarted(decode()).failure(),
            Failure::Permanent
        );
        // Source errors that are not the rows' own are tried again.
        assert_eq!(ChunkError::Source(decode()).failure(), Failure::Transient);
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(ChunkError::Ledger(io()).failure(), Failure::Transient);
        assert_eq!(ChunkError::NotStarted(io()).failure(), Failure::Transient);
        let config = sqlx::Error::Configuration("no password".into());
        assert_eq!(ChunkError::Source(config).failure(), Failure::Fatal);
    }
}
