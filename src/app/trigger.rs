//! `loansync trigger`: a planning request checked as a planner checks one, then
//! published on `<prefix>.plan` (`trigger --wait` then follows it: [`super::wait`]).

use super::error::AppError;
use super::report::Report;
use crate::config::Settings;
use crate::domain::{InvalidPlanRequest, PlanRequest};
use serde::Serialize;

/// The request to publish for `req`, as `trigger` built it from its flags: with a request
/// id (a new UUID when none was given), and refused when a planner would refuse it
/// ([`PlanRequest::validate`]), before anything is published.
pub fn request(mut req: PlanRequest) -> Result<PlanRequest, InvalidPlanRequest> {
    req.validate()?;
    req.request_id
        .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
    Ok(req)
}

/// A planning message published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    pub request_id: String,
    /// `backfill`, `sweep`, `full` or `incremental`.
    pub kind: &'static str,
    /// The queue it was published to.
    pub queue: String,
}

/// Publishes `req` (a request from [`request`]) on the planning queue, publisher-confirmed.
pub async fn publish(settings: &Settings, req: &PlanRequest) -> Result<Published, AppError> {
    let broker = super::connect_broker(settings).await?;
    let published = broker
        .publish_json(&broker.topology.plan, std::slice::from_ref(req))
        .await;
    broker.close().await;
    published?;
    Ok(Published {
        request_id: req.request_id.clone().unwrap_or_default(),
        kind: if req.since.is_some() {
            "backfill"
        } else if req.sweep {
            "sweep"
        } else {
            req.sync_type.as_str()
        },
        queue: broker.topology.plan.clone(),
    })
}

impl Report for Published {
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        format!(
            "published a {} planning message (request_id {}) to {}\n",
            self.kind, self.request_id, self.queue
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SyncType;

    fn incremental() -> PlanRequest {
        PlanRequest {
            sync_type: SyncType::Incremental,
            entities: None,
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        }
    }

    #[test]
    fn a_request_gets_an_id_unless_it_has_one() {
        let fresh = request(incremental()).unwrap();
        assert!(uuid::Uuid::parse_str(fresh.request_id.as_deref().unwrap()).is_ok());
        let named = request(PlanRequest {
            request_id: Some("job-7".into()),
            ..incremental()
        })
        .unwrap();
        assert_eq!(named.request_id.as_deref(), Some("job-7"));
    }

    #[test]
    fn a_request_a_planner_would_refuse_is_refused() {
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let backwards = PlanRequest {
            since: Some(at("2026-01-02T00:00:00Z")),
            until: Some(at("2026-01-01T00:00:00Z")),
            ..incremental()
        };
        assert_eq!(request(backwards), Err(InvalidPlanRequest::EmptyWindow));
    }
}
