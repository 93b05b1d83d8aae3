//! The states and outcomes the ledger writes, as enums: every comparison or bind in Rust
//! goes through these (the `.sql` files keep their literals, which the migrations'
//! `CHECK` constraints and Django's choices pin).

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// A value read from the database that names no known variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownValue { what: $what, value: s.to_string() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(
    /// Why a sync exists: a regular sync moves watermarks, a retry of error rows does not
    /// (`loansync_sync.purpose`).
    Purpose, "purpose" {
        Sync => "sync",
        Retry => "retry",
        /// A bounded window asked for by hand (`trigger --since`); moves no watermark.
        Backfill => "backfill",
        /// What timestamps miss (`trigger --sweep`): the records whose fingerprint differs
        /// from the delivered one; moves no watermark, records deleted ids.
        Sweep => "sweep",
    }
);

str_enum!(
    /// loansync's own state of a sync (`loansync_sync.state`): one sync at a time is not
    /// `done`.
    SyncState, "sync state" {
        /// Claimed; its planner (holding the `PlanningLock`) is writing the plan.
        Planning => "planning",
        /// Planned; chunks are being delivered and settled.
        Running => "running",
        /// Finished (completed, partial, failed or abandoned).
        Done => "done",
    }
);

str_enum!(
    /// `etl_folder_etlsynchistory.status`, as Django's admin shows it.
    HistoryStatus, "history status" {
        /// Claimed, not planned yet.
        Pending => "pending",
        /// Planned; chunks are being delivered.
        InProgress => "in_progress",
        Completed => "completed",
        PartialSuccess => "partial_success",
        Failed => "failed",
    }
);

str_enum!(
    /// The final status written to `etl_folder_etlsynchistory.status`.
    FinalStatus, "final status" {
        Completed => "completed",
        PartialSuccess => "partial_success",
        Failed => "failed",
    }
);

impl From<FinalStatus> for HistoryStatus {
    fn from(s: FinalStatus) -> Self {
        match s {
            FinalStatus::Completed => HistoryStatus::Completed,
            FinalStatus::PartialSuccess => HistoryStatus::PartialSuccess,
            FinalStatus::Failed => HistoryStatus::Failed,
        }
    }
}

impl HistoryStatus {
    /// The final status, for a finished sync's history row.
    pub fn final_status(self) -> Option<FinalStatus> {
        match self {
            HistoryStatus::Completed => Some(FinalStatus::Completed),
            HistoryStatus::PartialSuccess => Some(FinalStatus::PartialSuccess),
            HistoryStatus::Failed => Some(FinalStatus::Failed),
            HistoryStatus::Pending | HistoryStatus::InProgress => None,
        }
    }
}

str_enum!(
    /// How a chunk was settled (`loansync_chunk.outcome`).
    ChunkSettlement, "chunk outcome" {
        /// Sent by a worker (its records succeeded or failed one by one).
        Delivered => "delivered",
        /// Failed with its sync when the API refused the credentials.
        Aborted => "aborted",
        /// Failed with its sync, ended by hand (`loansync abandon`).
        Abandoned => "abandoned",
    }
);

str_enum!(
    /// Where a planning request is (`loansync_request.state`).
    RequestStatus, "request state" {
        /// Kept until the slot frees.
        Pending => "pending",
        /// A sync serves it.
        Planned => "planned",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_what_it_writes() {
        fn round_trip<T: FromStr + Copy + PartialEq + fmt::Debug>(
            all: &[T],
            s: fn(T) -> &'static str,
        ) {
            for &v in all {
                assert_eq!(s(v).parse::<T>().ok(), Some(v));
            }
        }
        round_trip(Purpose::ALL, Purpose::as_str);
        round_trip(SyncState::ALL, SyncState::as_str);
        round_trip(HistoryStatus::ALL, HistoryStatus::as_str);
        round_trip(FinalStatus::ALL, FinalStatus::as_str);
        round_trip(ChunkSettlement::ALL, ChunkSettlement::as_str);
        round_trip(RequestStatus::ALL, RequestStatus::as_str);
        let e = "runing".parse::<SyncState>().unwrap_err();
        assert_eq!(e.to_string(), "unknown sync state `runing`");
        for f in FinalStatus::ALL {
            assert_eq!(HistoryStatus::from(*f).final_status(), Some(*f));
            assert_eq!(HistoryStatus::from(*f).as_str(), f.as_str());
        }
        assert_eq!(HistoryStatus::InProgress.final_status(), None);
    }

    #[test]
    fn the_check_constraints_name_the_same_states() {
        let ledger = include_str!("../../migrations/20261125000002_loansync_ledger.sql");
        assert!(ledger.contains("CHECK (state IN ('planning', 'running', 'done'))"));
        let requests = include_str!("../../migrations/20261127000002_loansync_requests.sql");
        assert!(requests.contains("CHECK (state IN ('pending', 'planned'))"));
    }
}
