//! The labels of loansync's metrics: each a [`Label`] (its name and every value it
//! takes, which the registry's table names), the values an enum with `ALL` (the registry
//! pre-creates a series for every value, so dashboards and alerts see it at zero before
//! its first event) and `as_str` (the value exported).

use crate::domain::{EntityKind, SyncType};
use crate::ledger::states::FinalStatus;

/// The `outcome` of a settled record (`etl_records_total`, `etl_last_sync_records`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    Success,
    Failed,
}

impl RecordOutcome {
    pub const ALL: [RecordOutcome; 2] = [RecordOutcome::Success, RecordOutcome::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Success => "success",
            RecordOutcome::Failed => "failed",
        }
    }
}

/// The `outcome` label of a chunk job handled by a worker (`etl_chunks_total`): what
/// became of its message (the worker's [`crate::worker::ChunkOutcome`] is what processing
/// it gave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcomeLabel {
    /// Sent and settled by this worker.
    Settled,
    /// Settled before: acked without sending.
    Duplicate,
    /// The API refused the credentials: the sync was failed.
    Aborted,
    /// Handed back to the broker (counts as a delivery).
    Requeued,
    /// Put back while PostgreSQL was unreachable (not counted by the broker).
    Republished,
    /// Dead-lettered (settled as failed first when it names a chunk of the ledger).
    DeadLetter,
}

impl ChunkOutcomeLabel {
    pub const ALL: [ChunkOutcomeLabel; 6] = [
        ChunkOutcomeLabel::Settled,
        ChunkOutcomeLabel::Duplicate,
        ChunkOutcomeLabel::Aborted,
        ChunkOutcomeLabel::Requeued,
        ChunkOutcomeLabel::Republished,
        ChunkOutcomeLabel::DeadLetter,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ChunkOutcomeLabel::Settled => "settled",
            ChunkOutcomeLabel::Duplicate => "duplicate",
            ChunkOutcomeLabel::Aborted => "aborted",
            ChunkOutcomeLabel::Requeued => "requeued",
            ChunkOutcomeLabel::Republished => "republished",
            ChunkOutcomeLabel::DeadLetter => "dead_letter",
        }
    }
}

/// The `entity` label of a chunk message that names no entity (it could not be parsed).
pub const UNKNOWN_ENTITY: &str = "unknown";

/// The `status_class` of an answer of the analytics API (`etl_http_responses_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpClass {
    Success,
    ClientError,
    ServerError,
    /// No answer (connection error, timeout, refused certificate).
    Network,
}

impl HttpClass {
    pub const ALL: [HttpClass; 4] = [
        HttpClass::Success,
        HttpClass::ClientError,
        HttpClass::ServerError,
        HttpClass::Network,
    ];

    /// The class of an HTTP status; `None` is no answer. Statuses outside 2xx and 5xx
    /// count as `4xx`.
    pub fn of(status: Option<u16>) -> HttpClass {
        match status {
            None => HttpClass::Network,
            Some(200..=299) => HttpClass::Success,
            Some(500..=599) => HttpClass::ServerError,
            Some(_) => HttpClass::ClientError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HttpClass::Success => "2xx",
            HttpClass::ClientError => "4xx",
            HttpClass::ServerError => "5xx",
            HttpClass::Network => "network",
        }
    }
}

/// Why a request to the analytics API was retried (`etl_http_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Status429,
    Status5xx,
    Status408,
    Network,
}

impl RetryReason {
    pub const ALL: [RetryReason; 4] = [
        RetryReason::Status429,
        RetryReason::Status5xx,
        RetryReason::Status408,
        RetryReason::Network,
    ];

    /// The reason of a transient failure with this status (`None`: no answer). The
    /// statuses retried are 408, 429 and 5xx; any other counts as `status_5xx`.
    pub fn of(status: Option<u16>) -> RetryReason {
        match status {
            None => RetryReason::Network,
            Some(429) => RetryReason::Status429,
            Some(408) => RetryReason::Status408,
            Some(_) => RetryReason::Status5xx,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Status429 => "status_429",
            RetryReason::Status5xx => "status_5xx",
            RetryReason::Status408 => "status_408",
            RetryReason::Network => "network",
        }
    }
}

/// Why a planning message planned nothing (`etl_plans_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Another sync runs (single-process mode).
    Busy,
    /// The request id was seen before.
    Duplicate,
    /// The message could not be parsed.
    Invalid,
    /// Another sync runs: the request is kept and planned when the slot frees.
    Queued,
}

impl SkipReason {
    pub const ALL: [SkipReason; 4] = [
        SkipReason::Busy,
        SkipReason::Duplicate,
        SkipReason::Invalid,
        SkipReason::Queued,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Busy => "busy",
            SkipReason::Duplicate => "duplicate",
            SkipReason::Invalid => "invalid",
            SkipReason::Queued => "queued",
        }
    }
}

/// What a sweep did with an id bucket (`etl_sweep_buckets_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketOutcome {
    /// Its digest was the one stored when it was last found clean: not read.
    Unchanged,
    /// Compared record by record: nothing to send (its digest stored).
    Clean,
    /// Compared record by record: records to send, or delivered ones gone.
    Changed,
}

impl BucketOutcome {
    pub const ALL: [BucketOutcome; 3] = [
        BucketOutcome::Unchanged,
        BucketOutcome::Clean,
        BucketOutcome::Changed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BucketOutcome::Unchanged => "unchanged",
            BucketOutcome::Clean => "clean",
            BucketOutcome::Changed => "changed",
        }
    }
}

/// The analytics API's endpoints (`endpoint` label), each once, in the order of
/// [`crate::domain::EntityKind::ALL`]'s first use.
pub fn endpoints() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = Vec::new();
    for e in crate::domain::EntityKind::ALL {
        if !all.contains(&e.endpoint()) {
            all.push(e.endpoint());
        }
    }
    all
}

/// A label of loansync's metrics, as a row of the registry's table names it.
#[derive(Debug, Clone, Copy)]
pub struct Label {
    /// The label's name in the exposition.
    pub name: &'static str,
    /// Every value it takes; `None` when they are known only at run time (queue names).
    pub values: Option<fn() -> Vec<&'static str>>,
}

/// The entity of a record or chunk.
pub const ENTITY: Label = Label {
    name: "entity",
    values: Some(|| EntityKind::ALL.map(EntityKind::as_str).to_vec()),
};

/// The outcome of a settled record.
pub const RECORD_OUTCOME: Label = Label {
    name: "outcome",
    values: Some(|| RecordOutcome::ALL.map(RecordOutcome::as_str).to_vec()),
};

/// The outcome of a chunk job handled by a worker.
pub const CHUNK_OUTCOME: Label = Label {
    name: "outcome",
    values: Some(|| {
        ChunkOutcomeLabel::ALL
            .map(ChunkOutcomeLabel::as_str)
            .to_vec()
    }),
};

/// What a sweep did with an id bucket.
pub const BUCKET_OUTCOME: Label = Label {
    name: "outcome",
    values: Some(|| BucketOutcome::ALL.map(BucketOutcome::as_str).to_vec()),
};

/// The analytics API's endpoint.
pub const ENDPOINT: Label = Label {
    name: "endpoint",
    values: Some(endpoints),
};

/// The class of an answer of the analytics API.
pub const STATUS_CLASS: Label = Label {
    name: "status_class",
    values: Some(|| HttpClass::ALL.map(HttpClass::as_str).to_vec()),
};

/// Why a request was retried.
pub const RETRY_REASON: Label = Label {
    name: "reason",
    values: Some(|| RetryReason::ALL.map(RetryReason::as_str).to_vec()),
};

/// Why a planning message planned nothing.
pub const SKIP_REASON: Label = Label {
    name: "reason",
    values: Some(|| SkipReason::ALL.map(SkipReason::as_str).to_vec()),
};

/// The type of a sync.
pub const SYNC_TYPE: Label = Label {
    name: "sync_type",
    values: Some(|| SyncType::ALL.map(SyncType::as_str).to_vec()),
};

/// The final status of a sync.
pub const STATUS: Label = Label {
    name: "status",
    values: Some(|| FinalStatus::ALL.iter().map(|s| s.as_str()).collect()),
};

/// A queue's name (`<prefix>.plan`, `.chunks`, `.dead`: the prefix is a setting).
pub const QUEUE: Label = Label {
    name: "queue",
    values: None,
};

/// The running loansync's version.
pub const VERSION: Label = Label {
    name: "version",
    values: Some(|| vec![env!("CARGO_PKG_VERSION")]),
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A match with no wildcard: adding a variant without adding it to `ALL` fails to
    /// compile here first, then the length check below.
    fn covered<T: PartialEq + Copy>(all: &[T], every: &[T]) {
        assert_eq!(all.len(), every.len());
        for v in every {
            assert!(all.contains(v));
        }
    }

    #[test]
    fn every_label_list_covers_every_value_once() {
        let chunk = |o: ChunkOutcomeLabel| match o {
            ChunkOutcomeLabel::Settled
            | ChunkOutcomeLabel::Duplicate
            | ChunkOutcomeLabel::Aborted
            | ChunkOutcomeLabel::Requeued
            | ChunkOutcomeLabel::Republished
            | ChunkOutcomeLabel::DeadLetter => o,
        };
        covered(
            &ChunkOutcomeLabel::ALL,
            &[
                chunk(ChunkOutcomeLabel::Settled),
                ChunkOutcomeLabel::Duplicate,
                ChunkOutcomeLabel::Aborted,
                ChunkOutcomeLabel::Requeued,
                ChunkOutcomeLabel::Republished,
                ChunkOutcomeLabel::DeadLetter,
            ],
        );
        let record = |o: RecordOutcome| match o {
            RecordOutcome::Success | RecordOutcome::Failed => o,
        };
        covered(
            &RecordOutcome::ALL,
            &[record(RecordOutcome::Success), RecordOutcome::Failed],
        );
        let class = |c: HttpClass| match c {
            HttpClass::Success
            | HttpClass::ClientError
            | HttpClass::ServerError
            | HttpClass::Network => c,
        };
        covered(
            &HttpClass::ALL,
            &[
                class(HttpClass::Success),
                HttpClass::ClientError,
                HttpClass::ServerError,
                HttpClass::Network,
            ],
        );
        let retry = |r: RetryReason| match r {
            RetryReason::Status429
            | RetryReason::Status5xx
            | RetryReason::Status408
            | RetryReason::Network => r,
        };
        covered(
            &RetryReason::ALL,
            &[
                retry(RetryReason::Status429),
                RetryReason::Status5xx,
                RetryReason::Status408,
                RetryReason::Network,
            ],
        );
        let skip = |r: SkipReason| match r {
            SkipReason::Busy | SkipReason::Duplicate | SkipReason::Invalid | SkipReason::Queued => {
                r
            }
        };
        covered(
            &SkipReason::ALL,
            &[
                skip(SkipReason::Busy),
                SkipReason::Duplicate,
                SkipReason::Invalid,
                SkipReason::Queued,
            ],
        );
        let sync_type = |t: SyncType| match t {
            SyncType::Full | SyncType::Incremental => t,
        };
        covered(
            &SyncType::ALL,
            &[sync_type(SyncType::Full), SyncType::Incremental],
        );
        let status = |s: FinalStatus| match s {
            FinalStatus::Completed | FinalStatus::PartialSuccess | FinalStatus::Failed => s,
        };
        covered(
            FinalStatus::ALL,
            &[
                status(FinalStatus::Completed),
                FinalStatus::PartialSuccess,
                FinalStatus::Failed,
            ],
        );
        let entity = |e: EntityKind| match e {
            EntityKind::Customer
            | EntityKind::Officer
            | EntityKind::Loan
            | EntityKind::Repayment => e,
        };
        covered(
            &EntityKind::ALL,
            &[
                entity(EntityKind::Customer),
                EntityKind::Officer,
                EntityKind::Loan,
                EntityKind::Repayment,
            ],
        );
    }

    #[test]
    fn label_values_are_the_exported_strings() {
        let s = |v: Vec<&'static str>| v.join(",");
        assert_eq!(
            s(ChunkOutcomeLabel::ALL
                .map(ChunkOutcomeLabel::as_str)
                .to_vec()),
            "settled,duplicate,aborted,requeued,republished,dead_letter"
        );
        assert_eq!(
            s(HttpClass::ALL.map(HttpClass::as_str).to_vec()),
            "2xx,4xx,5xx,network"
        );
        assert_eq!(
            s(RetryReason::ALL.map(RetryReason::as_str).to_vec()),
            "status_429,status_5xx,status_408,network"
        );
        assert_eq!(
            s(SkipReason::ALL.map(SkipReason::as_str).to_vec()),
            "busy,duplicate,invalid,queued"
        );
        assert_eq!(s(endpoints()), "/etl/officers,/etl/customers,/etl/sync");
    }

    #[test]
    fn statuses_map_to_their_class_and_retry_reason() {
        assert_eq!(HttpClass::of(None), HttpClass::Network);
        assert_eq!(HttpClass::of(Some(200)), HttpClass::Success);
        assert_eq!(HttpClass::of(Some(204)), HttpClass::Success);
        assert_eq!(HttpClass::of(Some(301)), HttpClass::ClientError);
        assert_eq!(HttpClass::of(Some(422)), HttpClass::ClientError);
        assert_eq!(HttpClass::of(Some(503)), HttpClass::ServerError);
        assert_eq!(RetryReason::of(None), RetryReason::Network);
        assert_eq!(RetryReason::of(Some(429)), RetryReason::Status429);
        assert_eq!(RetryReason::of(Some(408)), RetryReason::Status408);
        assert_eq!(RetryReason::of(Some(502)), RetryReason::Status5xx);
    }
}
