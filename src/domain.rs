//! The vocabulary shared by every module: what is synced, how, and the unit of work.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One of the four things loansync delivers to the analytics platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    Customer,
    Officer,
    Loan,
    Repayment,
}

impl EntityKind {
    /// Every entity, in the order a sync plans and reports them.
    pub const ALL: [EntityKind; 4] = [
        EntityKind::Officer,
        EntityKind::Customer,
        EntityKind::Loan,
        EntityKind::Repayment,
    ];

    /// The value stored in `entity_type` columns and sent as `entity_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Customer => "customer",
            EntityKind::Officer => "officer",
            EntityKind::Loan => "loan",
            EntityKind::Repayment => "repayment",
        }
    }

    /// The analytics API path this entity is POSTed to.
    pub fn endpoint(self) -> &'static str {
        match self {
            EntityKind::Customer => "/etl/customers",
            EntityKind::Officer => "/etl/officers",
            EntityKind::Loan | EntityKind::Repayment => "/etl/sync",
        }
    }

    /// Plural used in the history table's counter columns (`total_loans`, `loans_success`, ...).
    pub fn plural(self) -> &'static str {
        match self {
            EntityKind::Customer => "customers",
            EntityKind::Officer => "officers",
            EntityKind::Loan => "loans",
            EntityKind::Repayment => "repayments",
        }
    }
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown entity {0:?}: expected one of customer, officer, loan, repayment")]
pub struct UnknownEntity(pub String);

impl FromStr for EntityKind {
    type Err = UnknownEntity;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(EntityKind::Customer),
            "officer" => Ok(EntityKind::Officer),
            "loan" => Ok(EntityKind::Loan),
            "repayment" => Ok(EntityKind::Repayment),
            other => Err(UnknownEntity(other.to_string())),
        }
    }
}

/// One record that failed: its id, a code, a message and details (JSON). The sink
/// reports these, the worker adds its own (unreadable rows, rows gone, chunks given up),
/// and the ledger writes them as error rows (`etl_folder_etlsyncerror`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedRecord {
    pub id: i64,
    pub error_code: String,
    pub message: String,
    /// From the sink: `{"http_status", "response_excerpt", "attempts", "api_details"}`;
    /// inside a `200`'s `rejected` list, the API's own `details`.
    pub details: serde_json::Value,
}

/// Full syncs send every row that passes the entity's filter; incremental ones only
/// the rows changed inside the sync window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncType {
    Full,
    Incremental,
}

impl SyncType {
    /// Every sync type (the metrics pre-create a series for each).
    pub const ALL: [SyncType; 2] = [SyncType::Full, SyncType::Incremental];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncType::Full => "full",
            SyncType::Incremental => "incremental",
        }
    }
}

impl fmt::Display for SyncType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SyncType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(SyncType::Full),
            "incremental" => Ok(SyncType::Incremental),
            other => Err(format!("unknown sync type {other:?}")),
        }
    }
}

/// One record ready to send: its source primary key, the fingerprint of the source
/// values it was built from, and its JSON encoding.
///
/// Records are encoded once, by the transformer; the analytics client only
/// concatenates them into request bodies (and splits them when halving a batch).
#[derive(Debug, Clone)]
pub struct Record {
    /// Source primary key, also the `id` inside `json`.
    pub id: i64,
    /// What the record was built from (`source::fingerprint`), set by the loader that
    /// read its row (nil until then). It travels with the record so that the
    /// `Idempotency-Key` of a body covers its content, and the fingerprint written to
    /// `loansync_delivered` is the one of the body the API accepted.
    pub fingerprint: uuid::Uuid,
    /// When its source row last changed (Unix seconds; the newest of the times that
    /// select it), set by the loader; `None` for officers (no modification time). For
    /// `etl_record_lag_seconds`; never sent.
    pub changed_at: Option<f64>,
    /// The record object, serialized.
    pub json: RecordJson,
}

/// A record's JSON text, as serde_json wrote it (so valid JSON by construction).
///
/// Serialized straight into a buffer sized for a whole record, where
/// `serde_json::value::to_raw_value` grew its buffer from 128 bytes (four reallocations
/// and copies for a loan) before shrinking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordJson(Box<str>);

impl RecordJson {
    /// Serializes `value`.
    pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Self> {
        let mut buf = Vec::with_capacity(2048);
        serde_json::to_writer(&mut buf, value)?;
        let text = String::from_utf8(buf).map_err(|e| {
            serde::ser::Error::custom(format!("serde_json wrote invalid UTF-8: {e}"))
        })?;
        Ok(Self(text.into_boxed_str()))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.0
    }
}

/// Identifies one chunk job: the message published on `<prefix>.chunks`.
/// The ids of the chunk live in the chunk ledger, not in the message, so that a
/// stalled sync can be resumed by re-publishing the same small message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkJob {
    pub sync_id: String,
    pub entity: EntityKind,
    pub seq: i32,
}

/// What the analytics API answered for one chunk, as the worker settles it: which records
/// it accepted (and the fingerprint of what it now holds of each), which failed, and its
/// last response body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkAnswer {
    pub succeeded: Vec<i64>,
    /// The fingerprint of each accepted record, written to `loansync_delivered`.
    pub delivered: Vec<(i64, uuid::Uuid)>,
    pub failed: Vec<FailedRecord>,
    /// The last response body of the API (already made storable and cut to 64 KiB).
    pub api_response: Option<serde_json::Value>,
}

/// A chunk whose POST succeeded but whose settle kept failing: published again on
/// `<prefix>.chunks` with the API's answer, so that the next worker settles it as it is
/// (nothing is sent again, no attempt is counted, and records the API accepted are never
/// counted as failed because the ledger was briefly unwritable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleJob {
    pub sync_id: String,
    pub entity: EntityKind,
    pub seq: i32,
    pub answer: ChunkAnswer,
}

impl SettleJob {
    /// The chunk this settle is for.
    pub fn chunk(&self) -> ChunkJob {
        ChunkJob {
            sync_id: self.sync_id.clone(),
            entity: self.entity,
            seq: self.seq,
        }
    }
}

/// A message on `<prefix>.chunks`: a chunk to deliver, or a settle to retry.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerMessage {
    Chunk(ChunkJob),
    Settle(Box<SettleJob>),
}

impl WorkerMessage {
    /// Parses a message body; `Err` says what is wrong with it (for the dead-letter
    /// header): a body with an `answer` is a settle job, any other a chunk job.
    pub fn parse(body: &[u8]) -> Result<WorkerMessage, String> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid chunk job: {e}"))?;
        if value.get("answer").is_some() {
            serde_json::from_value(value)
                .map(|j| WorkerMessage::Settle(Box::new(j)))
                .map_err(|e| format!("invalid settle job: {e}"))
        } else {
            serde_json::from_value(value)
                .map(WorkerMessage::Chunk)
                .map_err(|e| format!("invalid chunk job: {e}"))
        }
    }

    /// The chunk the message is about.
    pub fn chunk(&self) -> ChunkJob {
        match self {
            WorkerMessage::Chunk(j) => j.clone(),
            WorkerMessage::Settle(s) => s.chunk(),
        }
    }
}

/// The planning message published on `<prefix>.plan` (SPEC.md section 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub sync_type: SyncType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<EntityKind>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// A backfill: rows changed at or after this time (RFC 3339), whatever the
    /// watermarks say; such a sync moves no watermark (`loansync trigger --since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// A backfill's end (exclusive); the window never ends later than a regular one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// A sweep (`loansync trigger --sweep`): sends what timestamps miss (records whose
    /// fingerprint differs from what was delivered), records deleted ids, moves no
    /// watermark. Incremental; never with `since`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sweep: bool,
}

/// Why a planning request cannot be planned ([`PlanRequest::validate`]): each variant is
/// one rule of SPEC.md section 6 that serde cannot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPlanRequest {
    #[error("`entities` is empty")]
    NoEntities,
    #[error("`until` without `since`")]
    UntilWithoutSince,
    #[error("a backfill (`since`) is incremental, not full")]
    FullBackfill,
    #[error("a sweep is incremental, not full")]
    FullSweep,
    #[error("a sweep compares every record, it takes no `since`")]
    SweepWithSince,
    #[error("`since` is not before `until`")]
    EmptyWindow,
}

impl PlanRequest {
    /// Checks the rules a request must keep beyond its shape: the one check of a planning
    /// request, whether it arrives as a message or is built from `loansync trigger`'s flags.
    pub fn validate(&self) -> Result<(), InvalidPlanRequest> {
        let full = self.sync_type == SyncType::Full;
        if self.entities.as_ref().is_some_and(|e| e.is_empty()) {
            Err(InvalidPlanRequest::NoEntities)
        } else if self.until.is_some() && self.since.is_none() {
            Err(InvalidPlanRequest::UntilWithoutSince)
        } else if self.since.is_some() && full {
            Err(InvalidPlanRequest::FullBackfill)
        } else if self.sweep && full {
            Err(InvalidPlanRequest::FullSweep)
        } else if self.sweep && self.since.is_some() {
            Err(InvalidPlanRequest::SweepWithSince)
        } else if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            Err(InvalidPlanRequest::EmptyWindow)
        } else {
            Ok(())
        }
    }

    /// The entities to sync, deduplicated, in [`EntityKind::ALL`] order.
    pub fn entity_set(&self) -> Vec<EntityKind> {
        match &self.entities {
            None => EntityKind::ALL.to_vec(),
            Some(list) => EntityKind::ALL
                .into_iter()
                .filter(|e| list.contains(e))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_request_parses_the_documented_shape() {
        let p: PlanRequest = serde_json::from_str(
            r#"{"sync_type":"incremental","entities":["loan","officer","loan"],"request_id":"r1"}"#,
        )
        .unwrap();
        assert_eq!(p.entity_set(), vec![EntityKind::Officer, EntityKind::Loan]);
        let all: PlanRequest = serde_json::from_str(r#"{"sync_type":"full"}"#).unwrap();
        assert_eq!(all.entity_set().len(), 4);
    }

    #[test]
    fn plan_request_rejects_unknown_things() {
        assert!(serde_json::from_str::<PlanRequest>(r#"{"sync_type":"weekly"}"#).is_err());
        assert!(
            serde_json::from_str::<PlanRequest>(r#"{"sync_type":"full","entities":["x"]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<PlanRequest>(r#"{"sync_type":"full","extra":1}"#).is_err());
    }

    #[test]
    fn a_request_breaking_a_rule_is_invalid() {
        let parse = |json: &str| {
            serde_json::from_str::<PlanRequest>(json)
                .unwrap()
                .validate()
        };
        for (json, why) in [
            (r#"{"sync_type":"full"}"#, Ok(())),
            (
                r#"{"sync_type":"incremental","since":"2026-01-01T00:00:00Z","until":"2026-01-02T00:00:00Z"}"#,
                Ok(()),
            ),
            (r#"{"sync_type":"incremental","sweep":true}"#, Ok(())),
            (
                r#"{"sync_type":"full","entities":[]}"#,
                Err(InvalidPlanRequest::NoEntities),
            ),
            (
                r#"{"sync_type":"incremental","until":"2026-01-02T00:00:00Z"}"#,
                Err(InvalidPlanRequest::UntilWithoutSince),
            ),
            (
                r#"{"sync_type":"full","since":"2026-01-01T00:00:00Z"}"#,
                Err(InvalidPlanRequest::FullBackfill),
            ),
            (
                r#"{"sync_type":"full","sweep":true}"#,
                Err(InvalidPlanRequest::FullSweep),
            ),
            (
                r#"{"sync_type":"incremental","sweep":true,"since":"2026-01-01T00:00:00Z"}"#,
                Err(InvalidPlanRequest::SweepWithSince),
            ),
            (
                r#"{"sync_type":"incremental","since":"2026-01-02T00:00:00Z","until":"2026-01-02T00:00:00Z"}"#,
                Err(InvalidPlanRequest::EmptyWindow),
            ),
        ] {
            assert_eq!(parse(json), why, "{json}");
        }
    }

    #[test]
    fn entity_round_trips() {
        for e in EntityKind::ALL {
            assert_eq!(e.as_str().parse::<EntityKind>().unwrap(), e);
        }
        assert!("loans".parse::<EntityKind>().is_err());
    }
}

/// The rows of one entity a sync selects by time: `lo <= t < hi`.
/// `lo` is `None` for a full sync, which has no lower bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncWindow {
    pub lo: Option<chrono::DateTime<chrono::Utc>>,
    pub hi: chrono::DateTime<chrono::Utc>,
}
