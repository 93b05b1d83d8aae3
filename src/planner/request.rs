//! A planning message: parsed and validated ([`parse_plan`]), then recorded as a pending
//! request ([`record_message`]) before anything waits on a lock or a clock.

use super::{PlanError, spec_of};
use crate::domain::PlanRequest;
use crate::ledger::lifecycle::{self, Recorded};
use crate::telemetry::{Event, Telemetry};
use sqlx::PgPool;

/// The request id of a planning message: its own, or `anonymous-<uuid>` for a message
/// without one (a prefix that marks it as such), so that it can be kept and followed.
pub fn request_id_of(req: &PlanRequest) -> String {
    req.request_id
        .clone()
        .unwrap_or_else(|| format!("anonymous-{}", uuid::Uuid::new_v4()))
}

/// Records a planning message as a pending request ([`lifecycle::record_request`]):
/// nothing waits on a lock or a clock, so the message is acked at once; the planner then
/// plans what is pending ([`super::plan_pending`]).
pub async fn record_message(
    pool: &PgPool,
    telemetry: &Telemetry,
    req: &PlanRequest,
) -> Result<Recorded, PlanError> {
    let spec = spec_of(req);
    if spec.entities.is_empty() {
        return Err(PlanError::Invalid(
            "the planning message names no entity".into(),
        ));
    }
    let request_id = request_id_of(req);
    let recorded = lifecycle::record_request(pool, &request_id, &spec).await?;
    match &recorded {
        Recorded::New => telemetry.emit(Event::RequestRecorded {
            request_id: &request_id,
        }),
        Recorded::Known(known) => telemetry.emit(Event::PlanDuplicate {
            request_id: &request_id,
            sync_id: known.sync_id.as_deref(),
        }),
    }
    Ok(recorded)
}

/// Parses a planning message body and checks its rules ([`PlanRequest::validate`]);
/// `Err` carries a reason fit for the dead-letter header.
pub fn parse_plan(body: &[u8]) -> Result<PlanRequest, String> {
    let req = serde_json::from_slice::<PlanRequest>(body)
        .map_err(|e| format!("invalid planning message: {e}"))?;
    req.validate()
        .map_err(|e| format!("invalid planning message: {e}"))?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EntityKind, SyncType};
    use chrono::{DateTime, TimeZone, Utc};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn a_planning_message_parses_with_its_optional_fields() {
        let r = parse_plan(br#"{"sync_type":"full"}"#).unwrap();
        assert_eq!(r.sync_type, SyncType::Full);
        assert_eq!(
            (r.entities, r.request_id, r.since, r.sweep),
            (None, None, None, false)
        );
        let r = parse_plan(
            br#"{"sync_type":"incremental","entities":["loan","officer"],"request_id":"r1",
                 "since":"2024-01-01T00:00:00Z","until":"2024-02-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            r.entities,
            Some(vec![EntityKind::Loan, EntityKind::Officer])
        );
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        assert_eq!(r.since, Some(at(2024, 1, 1, 0, 0)));
        assert_eq!(r.until, Some(at(2024, 2, 1, 0, 0)));
        let r = parse_plan(br#"{"sync_type":"incremental","sweep":true}"#).unwrap();
        assert!(r.sweep);
    }

    #[test]
    fn a_bad_planning_message_is_refused_with_its_reason() {
        for (body, reason) in [
            (&b"not json"[..], "invalid planning message: "),
            (br#"{"sync_type":"weekly"}"#, "invalid planning message: "),
            (br#"{"sync_type":"full","colour":"red"}"#, "unknown field"),
            (br#"{"sync_type":"full","entities":[]}"#, "`entities` is empty"),
            (
                br#"{"sync_type":"incremental","until":"2024-01-01T00:00:00Z"}"#,
                "`until` without `since`",
            ),
            (
                br#"{"sync_type":"full","since":"2024-01-01T00:00:00Z"}"#,
                "a backfill (`since`) is incremental",
            ),
            (br#"{"sync_type":"full","sweep":true}"#, "a sweep is incremental"),
            (
                br#"{"sync_type":"incremental","sweep":true,"since":"2024-01-01T00:00:00Z"}"#,
                "it takes no `since`",
            ),
            (
                br#"{"sync_type":"incremental","since":"2024-01-02T00:00:00Z","until":"2024-01-02T00:00:00Z"}"#,
                "`since` is not before `until`",
            ),
        ] {
            let err = parse_plan(body).expect_err(&String::from_utf8_lossy(body));
            assert!(err.starts_with("invalid planning message: "), "{err}");
            assert!(err.contains(reason), "{err} lacks {reason}");
        }
    }
}
