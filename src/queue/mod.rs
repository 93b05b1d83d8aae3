//! Queues: RabbitMQ ([`amqp`]: the topology, confirmed publishing, consuming with ack
//! after commit, reconnecting, the connection's health, a file each), and the in-memory
//! queue of single-process mode ([`memory`]).
//!
//! The planner publishes through [`ChunkPublisher`]; the planner's and the workers' loops
//! take messages from a [`Consumer`] and settle each [`Delivery`] with a [`Disposition`],
//! whichever queue is behind them. The queue layer owns what a disposition means: the
//! pause before a message comes back ([`REQUEUE_PAUSE`]), republishing, dead-lettering,
//! and (on RabbitMQ) reconnecting with backoff ([`amqp::with_reconnect`]).

pub mod amqp;
pub mod memory;

use crate::domain::ChunkJob;
use crate::failure::{Classify, Failure};
use std::time::Duration;

/// What went wrong with the queue: for the work at hand, transient (the message comes
/// back, the caller reconnects), except a broker that refuses the installation's
/// connection ([`QueueError::Refused`]), which is fatal.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Connecting failed (a broker down, a network); `at` is the redacted URL.
    #[error("cannot connect to RabbitMQ at {at}: {source}")]
    Connect {
        at: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused the connection as configured (its TLS certificate): someone
    /// must fix the installation.
    #[error("cannot connect to RabbitMQ at {at}: {reason}")]
    Refused { at: String, reason: String },
    /// The connection or a channel failed.
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    /// A queue could not be declared as loansync declares it.
    #[error("queue {queue} refused: {source}")]
    Queue {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    /// No answer within the confirm timeout (`ETL_PUBLISH_CONFIRM_TIMEOUT_SECS`).
    #[error(
        "{what}: no answer from RabbitMQ within {secs}s (ETL_PUBLISH_CONFIRM_TIMEOUT_SECS){blocked}"
    )]
    Timeout {
        what: String,
        secs: f64,
        /// Why, when the broker says: it has blocked the connection.
        blocked: &'static str,
    },
    /// A publish the broker did not take (nacked) or could not route (returned).
    #[error("{0}")]
    NotConfirmed(String),
    /// The broker cancelled a consumer, or the connection ended under it.
    #[error("the consumer of {0} was cancelled or lost its connection")]
    ConsumerLost(String),
    /// A message could not be encoded.
    #[error("encoding a message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Classify for QueueError {
    fn failure(&self) -> Failure {
        match self {
            QueueError::Refused { .. } => Failure::Fatal,
            _ => Failure::Transient,
        }
    }
}

/// How long a message that failed transiently waits before it goes back to its queue
/// ([`Disposition::Requeue`], [`Disposition::Republish`]): a failing dependency gets room
/// to breathe before the message comes back.
pub const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

/// The queue names derived from `ETL_QUEUE_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Planning messages.
    pub plan: String,
    /// Chunk jobs.
    pub chunks: String,
    /// Messages that cannot be parsed or kept failing, with the reason in a header.
    pub dead: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Topology {
            plan: format!("{prefix}.plan"),
            chunks: format!("{prefix}.chunks"),
            dead: format!("{prefix}.dead"),
        }
    }
}

/// Where the planner sends chunk jobs.
#[async_trait::async_trait]
pub trait ChunkPublisher: Send + Sync {
    /// Publishes every job; returns only once the queue has accepted them all
    /// (publisher confirms on RabbitMQ).
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> Result<(), QueueError>;
}

/// What to do with a message once its work is done (or cannot be done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done and committed (or nothing to do): remove it.
    Ack,
    /// A transient failure (shutting down, a statement that failed): deliver it again.
    /// On RabbitMQ this counts against the queue's `x-delivery-limit`.
    Requeue,
    /// Put it back without counting a delivery: the same body and headers are published
    /// again (confirmed) and only then is the original acked, so the broker's delivery
    /// count starts over; loansync's own attempt count (the ledger's) is what gives up
    /// on a chunk. What every transient failure does: no correctness depends on how a
    /// broker counts requeues.
    Republish,
    /// Put this body back in the message's place, as [`Disposition::Republish`] does
    /// with the original (a settle job carrying the API's answer, say).
    Replace(Vec<u8>),
    /// It can never succeed: move it to the dead-letter queue with this reason.
    DeadLetter(String),
}

/// One message taken from a queue: its body, and how to settle it once its work is done.
/// A delivery dropped without being settled comes back (RabbitMQ redelivers it when the
/// channel closes; the in-memory queue puts it back at once).
#[async_trait::async_trait]
pub trait Delivery: Send {
    /// The message as published (a JSON document).
    fn body(&self) -> &[u8];

    /// How often the queue delivered this message before without it being settled
    /// (RabbitMQ's `x-delivery-count`: its consumers died or requeued it).
    fn returned(&self) -> u32 {
        0
    }

    /// Settles the message as `disposition` says. One that goes back (requeued,
    /// republished, replaced) waits [`REQUEUE_PAUSE`] or the consumer's own pause first.
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), QueueError>;
}

/// Where a consuming loop takes its messages from.
#[async_trait::async_trait]
pub trait Consumer: Send {
    /// The next message, waiting for one. `Some(Err(_))`: the consumer is lost (connection
    /// closed, consumer cancelled by the broker): the loop ends with that error and the
    /// caller reconnects. `None`: there is no more work and there will be none (the
    /// in-memory queue is empty and no delivery is in flight); RabbitMQ never says so.
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, QueueError>>;

    /// Stops consuming; unsettled messages go back to the queue.
    async fn close(&mut self);
}
