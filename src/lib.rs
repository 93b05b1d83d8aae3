//! loansync keeps the analytics platform in sync with the lending application's
//! PostgreSQL database. A planner turns a planning message into chunk jobs on
//! RabbitMQ; workers load, transform and POST each chunk to the analytics API and
//! record the outcome, atomically, in the ETL tables the Django application reads.
//!
//! # Layout
//!
//! * [`domain`]: the shared vocabulary: [`domain::EntityKind`], [`domain::SyncType`],
//!   [`domain::ChunkJob`], [`domain::PlanRequest`], [`domain::Record`].
//! * [`failure`]: what an error means for the work that met it: permanent, transient or
//!   fatal ([`failure::Failure`]), decided by type at the database, planner and worker.
//! * [`failpoints`]: named fault points armed by `LOANSYNC_FAILPOINTS` (tests, the
//!   torture run).
//! * [`config`]: every setting, typed and validated at start-up ([`config::Settings`]);
//!   [`config::env`]: the variables read (the [`config::env::ENV_VARS`] table behind
//!   `--help` and README's configuration table) and their parsers; `config/api.rs`: the
//!   analytics API's settings, with the local stub's URL and key as defaults only in a
//!   `dev-tools` build; `config/urls.rs`: the checks of the database, broker and API URLs.
//! * [`redact`]: credentials hidden in URLs and free text before they are printed,
//!   logged or stored.
//! * [`db`]: the connection pool and the embedded migrations.
//! * [`source`]: reading the Django tables: id enumeration for a window, loading one
//!   chunk with its related rows. SQL lives beside the code in `.sql` files;
//!   `source/columns.rs` lists every column it reads, checked against the database.
//! * [`transform`]: source rows → records, pure functions (SPEC.md section 5).
//! * [`sink`]: the analytics API client: encoding, one request, the retry policy, the
//!   halving of refused batches, the gate of a worker's requests in flight (`gate.rs`)
//!   and its adaptive concurrency controller (`arc.rs`).
//! * [`queue`]: the queue seam: [`queue::ChunkPublisher`] to publish, [`queue::Consumer`]
//!   and [`queue::Delivery`] to consume and settle with a [`queue::Disposition`];
//!   RabbitMQ ([`queue::amqp`], a file per concern: connecting and reconnecting with
//!   backoff, topology, publishing with confirms, consuming, health) and the in-memory
//!   queue of single-process mode ([`queue::memory`]) implement both.
//! * [`ledger`]: every query on the ETL (`etl_folder_*`) and `loansync_*` tables, a file
//!   per concern, each path naming its file: [`ledger::lifecycle`] (the state machine of
//!   requests and syncs, the only writer of their states, and the planning lock),
//!   [`ledger::plan`], [`ledger::settle`], [`ledger::finalize`], [`ledger::rollup`],
//!   [`ledger::end`], [`ledger::errors`], [`ledger::watermarks`], [`ledger::clock`],
//!   [`ledger::reads`]; states and outcomes as enums ([`ledger::states`]), the
//!   entity→history-column mapping ([`ledger::history`]), SQL in `ledger/sql/`.
//! * [`planner`]: a planning message recorded, the pending requests claimed and planned,
//!   sweeps, dry runs (what a sync would send, written nowhere), the housekeeping that
//!   heals what a dead planner left, the planner loop; its errors typed
//!   ([`planner::PlanError`]). [`worker`]: one chunk processed into an
//!   outcome (`chunk.rs`), its answer settled and retried as a settle (`settle.rs`), a
//!   message turned into a disposition (`handle.rs`), the loop over a consumer (`run.rs`),
//!   the heartbeat, share of the fleet-wide cap and shared pause (`fleet.rs`).
//! * [`progress`]: a running sync's progress for people (bars on a terminal).
//! * [`telemetry`]: logging and metrics, a file per concern: `registry.rs` defines each
//!   metric once, as a row of one table (field, kind, name, help, labels, buckets) the
//!   registry is built from; `events.rs` each [`telemetry::Event`] with its log line and
//!   its metric; `labels.rs` the labels and their values (every series pre-created at
//!   zero); `gauges.rs` the state gauges, read from PostgreSQL and the broker when
//!   `/metrics` is scraped ([`telemetry::Metrics::refresh_state`]); `mod.rs` logging and
//!   the [`telemetry::Telemetry`] handle (the process's, or a test's own).
//!   [`http`]: `/metrics` (the state gauges refreshed, then every metric), `/healthz`,
//!   `/readyz` (database, broker and consumer, each with its state).
//! * [`tls`]: extra CA files (`ANALYTICS_CA_FILE`, `AMQP_CA_FILE`) and refused certificates.
//! * [`app`]: the application layer, a file per concern: run a planner or a worker
//!   process (reconnect, metrics server, signals), run a sync in this process, wait for a
//!   request's sync, and what each command does (trigger, status, errors, watermarks,
//!   abandon, resume, deletes), each returning a report ([`app::SyncReport`],
//!   [`app::status::StatusReport`], ...) that renders itself as text and JSON and knows
//!   its exit code. Abandon and watermark set hold the planning lock as a planner does.
//! * [`check`]: `loansync check` (can this installation work?) and `loansync probe`: the
//!   report in `mod.rs`, the PostgreSQL checks in `database.rs`, the broker's, the API's
//!   and `probe` in `services.rs`.
//! * [`cli`]: the `loansync` command line: [`cli::args`] defines the commands and flags
//!   (clap); `cli/mod.rs` parses, calls [`app`], prints the report and maps it to an exit
//!   code; `main.rs` only calls [`cli::main`].
//! * Behind the `dev-tools` feature (default; not in the production image):
//!   `stub_api` (a faithful local analytics API with fault injection, for tests and
//!   demos: the running stub in `mod.rs`, one request answered in `ingest.rs`, capacity, rate limit and latency under load in
//!   `load.rs`), `seed` (deterministic synthetic source data, generated set-based in
//!   PostgreSQL) and `demo` (`loansync demo`, the whole system on local services).
//!
//! Dependencies point one way: `cli` → `demo` → `app` → `planner`/`worker` → `queue`,
//! `ledger`, `source`, `sink` → `domain`, `config`. `app` uses neither `cli` nor `demo`.

#![warn(unreachable_pub, missing_debug_implementations)]

pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod db;
#[cfg(feature = "dev-tools")]
pub mod demo;
pub mod domain;
pub mod failpoints;
pub mod failure;
pub mod http;
pub mod ledger;
pub mod planner;
pub mod progress;
pub mod queue;
pub mod redact;
#[cfg(feature = "dev-tools")]
pub mod seed;
pub mod sink;
pub mod source;
#[cfg(feature = "dev-tools")]
pub mod stub_api;
pub mod telemetry;
pub mod tls;
pub mod transform;
pub mod worker;
