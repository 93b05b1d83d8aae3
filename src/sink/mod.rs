//! The analytics API client (SPEC.md section 4).
//!
//! * [`encoder`]: records → request body bytes and the idempotency key; nothing else.
//! * [`service`]: one HTTP call and what its answer means; never retries.
//! * [`retry`]: the backoff policy (exponential, jittered, bounded, `Retry-After`).
//! * [`arc`]: the adaptive concurrency controller (AIMD on RTT and backpressure), pure.
//! * [`gate`]: the worker's limit on requests in flight, the fleet's pause and limit.
//! * [`share`]: a worker's share of the fleet's total, in turns, pure.
//! * [`client`]: delivers one chunk: retries around the service, halves refused batches
//!   down to the records refused alone, fails fast on rejected credentials.

pub mod arc;
pub mod client;
pub mod encoder;
pub mod gate;
pub mod retry;
pub mod service;
pub mod share;

pub use client::{AnalyticsClient, Batch, DeliveryReport, FatalError, SinkError};
