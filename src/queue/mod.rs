//! Queues: the RabbitMQ topology, confirmed publishing and consuming with ack after
//! commit ([`amqp`]), and the in-memory queue of single-process mode ([`memory`]).
//!
//! The planner publishes through [`ChunkPublisher`]; workers receive [`Delivery`]s and
//! settle each with a [`Disposition`], whichever queue is behind them.

pub mod amqp;
pub mod memory;

use crate::domain::ChunkJob;

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
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> anyhow::Result<()>;
}

/// What to do with a message once its work is done (or cannot be done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done and committed (or nothing to do): remove it.
    Ack,
    /// A transient failure (shutting down, a statement that failed): deliver it again.
    /// On RabbitMQ this counts against the queue's `x-delivery-limit`.
    Requeue,
    /// Not worked on because a dependency (PostgreSQL) was unreachable: put it back
    /// without counting a delivery. On RabbitMQ the same body and headers are published
    /// again (confirmed) and only then is the original acked, so the broker's delivery
    /// count starts over; loansync's own attempt count (the ledger's) is unaffected.
    Republish,
    /// It can never succeed: move it to the dead-letter queue with this reason.
    DeadLetter(String),
}
