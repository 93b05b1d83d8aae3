//! Sync history, chunk ledger, counters, error rows and watermarks: every query on the
//! ETL (`etl_folder_*`) and `loansync_*` tables, one file per concern.
//!
//! Every write that decides what a sync counted happens here, each in one transaction:
//! * [`lifecycle`]: requests and syncs through their states (recorded, claimed,
//!   planning, running, published, done) and the [`lifecycle::PlanningLock`]: the one
//!   module that writes `loansync_request.state` and `loansync_sync.state`;
//! * [`plan`]: the chunk ledger a planner writes, its totals and the move to
//!   `in_progress` ([`plan::write_plan`]), a chunk's start by a worker;
//! * [`settle`]: one chunk settled exactly once, on its own `loansync_chunk` row
//!   (counts, outcome, the API's answer), with its error rows, resolutions and
//!   fingerprints ([`settle::settle_chunk`]);
//! * [`finalize`]: after the settle that leaves no chunk unsettled, the sync finalized
//!   exactly once ([`finalize::finalize_if_settled`]), the counters set from the chunk
//!   rows, the status, duration and watermarks; [`finalize::finalize_settled`] is its
//!   safety net (housekeeping, the next planner) for a settler that died in between;
//!   the books verified there ([`books::verify`]), a mismatch logged and recorded;
//! * [`rollup`]: the history counters of a running sync rolled up from the chunk rows
//!   about once a second, never waited for;
//! * [`end`]: a sync failed fast (rejected credentials, [`end::abort_sync`]) or ended by
//!   hand ([`end::abandon_sync`]), and finished syncs' chunk id lists pruned;
//! * [`errors`] (error rows listed and resolved by hand), [`watermarks`], [`clock`] (the
//!   end of a sync's window), [`reads`] (what commands, metrics and the demo show),
//!   [`states`] (the states and outcomes as enums), [`history`] (the entity → history
//!   column mapping).
//!
//! The settle transaction locks its own chunk row only: settles of different chunks of a
//! sync never wait for each other. Lock order, for every transaction that takes more than
//! one of these rows: chunk rows, then the `loansync_sync` row, then the history row.
//! The finalizer and the roll-up take the sync row first (the roll-up with `SKIP
//! LOCKED`: it never waits for it); an abort and an abandon settle the chunks first.

pub mod books;
pub mod clock;
pub mod end;
pub mod errors;
pub mod finalize;
pub mod history;
pub mod lifecycle;
pub mod plan;
pub mod reads;
pub mod rollup;
pub mod settle;
mod sql;
pub mod states;
pub mod watermarks;
