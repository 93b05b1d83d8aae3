//! loansync keeps the analytics platform in sync with the lending application's
//! PostgreSQL database. A planner turns a planning message into chunk jobs on
//! RabbitMQ; workers load, transform and POST each chunk to the analytics API and
//! record the outcome, atomically, in the ETL tables the Django application reads.
//!
//! # Layout
//!
//! * [`domain`]: the shared vocabulary: [`domain::EntityKind`], [`domain::SyncType`],
//!   [`domain::ChunkJob`], [`domain::PlanRequest`], [`domain::Record`].
//! * [`config`]: every setting, typed and validated at start-up; secrets redacted.
//! * [`db`]: the connection pool and the embedded migrations.
//! * [`source`]: reading the Django tables: id enumeration for a window, loading one
//!   chunk with its related rows. SQL lives beside the code in `.sql` files.
//! * [`transform`]: source rows → records, pure functions (SPEC.md section 5).
//! * [`sink`]: the analytics API client: encoding, one request, the retry policy, the
//!   halving of refused batches.
//! * [`stub_api`]: a faithful local analytics API with fault injection, for tests and demos.
//! * [`queue`]: AMQP topology, confirmed publishing, consuming with ack after commit,
//!   and the in-memory queue of single-process mode behind the same seam.
//! * [`ledger`]: sync history, chunk ledger, counters, error rows, watermarks.
//! * [`planner`]: plan one sync; [`worker`]: process one chunk into an outcome.
//! * [`progress`]: a running sync's progress for people (bars on a terminal).
//! * [`telemetry`]: logging and metrics: each [`telemetry::Event`] writes its log line and
//!   its metric; label enums pre-create the series; the registry is a
//!   [`telemetry::Telemetry`] handle (the process's, or a test's own).
//!   [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! * [`tls`]: extra CA files (`ANALYTICS_CA_FILE`, `AMQP_CA_FILE`) and refused certificates.
//! * [`seed`]: deterministic synthetic source data, generated set-based in PostgreSQL.
//! * [`demo`]: `loansync demo`, the whole system on local services in one command.
//! * [`check`]: `loansync check` (can this installation work?) and `loansync probe`.
//! * [`cli`]: the `loansync` command line; `main.rs` only calls [`cli::main`].

pub mod check;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod http;
pub mod ledger;
pub mod planner;
pub mod progress;
pub mod queue;
pub mod seed;
pub mod sink;
pub mod source;
pub mod stub_api;
pub mod telemetry;
pub mod tls;
pub mod transform;
pub mod worker;
