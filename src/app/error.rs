//! What can go wrong in a command or a process, by layer: the caller (the command line)
//! prints it, and its [`Classify::failure`] says whether trying again can help.

use crate::config::ConfigError;
use crate::db::DbError;
use crate::db::pooling::SessionLockError;
use crate::failure::{Classify, Failure};
use crate::http::ServeError;
use crate::planner::PlanError;
use crate::queue::QueueError;
use crate::sink::SinkError;

/// An error of the application layer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A setting the command needs is missing or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting to PostgreSQL or migrating it.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A statement on the ETL or loansync tables.
    #[error(transparent)]
    Ledger(#[from] sqlx::Error),
    /// The broker.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Planning a sync.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The planning lock (a transaction pooler in the way).
    #[error(transparent)]
    Lock(#[from] SessionLockError),
    /// The analytics client cannot be built.
    #[error("cannot build the analytics client: {0}")]
    Sink(#[from] SinkError),
    /// `METRICS_ADDR` cannot be served.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Printing a report.
    #[error("cannot print the report: {0}")]
    Print(#[from] std::io::Error),
    /// A report that cannot be encoded as JSON.
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
    /// What was asked cannot be done as things are (no such sync, nothing to abandon, a
    /// request already pending): the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

impl AppError {
    /// What was asked cannot be done: `why` says why and what to do.
    pub fn refused(why: String) -> AppError {
        AppError::Refused(why)
    }
}

impl Classify for AppError {
    fn failure(&self) -> Failure {
        match self {
            AppError::Config(_) | AppError::Serve(_) | AppError::Sink(_) => Failure::Fatal,
            AppError::Db(e) => e.failure(),
            AppError::Ledger(e) => e.failure(),
            AppError::Queue(e) => e.failure(),
            AppError::Plan(e) => e.failure(),
            AppError::Lock(e) => e.failure(),
            AppError::Print(_) | AppError::Json(_) => Failure::Transient,
            AppError::Refused(_) => Failure::Permanent,
        }
    }
}
