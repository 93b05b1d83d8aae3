//! The checks of the other services: the broker's queues, the analytics API's key; and
//! `loansync probe`.

use crate::config::Settings;
use crate::queue::amqp::BrokerHealth;
use crate::redact::{redact_text, redact_url};
use crate::sink::AnalyticsClient;
use crate::sink::service::Answer;
use std::time::Duration;

/// Connects and declares the topology exactly as a planner does.
pub(super) async fn broker(settings: &Settings) -> Result<String, String> {
    let broker = crate::app::connect_broker_with(
        settings,
        BrokerHealth::with_telemetry(settings.telemetry.clone()),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    let t = broker.topology.clone();
    let mut mismatches = broker.argument_mismatches().to_vec();
    // One line per queue and argument: the first difference the broker named.
    let mut seen = std::collections::HashSet::new();
    mismatches.retain(|m| seen.insert((m.queue.clone(), m.argument.clone())));
    broker.close().await;
    // A different broker delivery limit is a supported change (loansync's own limit, in
    // the chunk ledger, applies at once): noted, not failed. Any other difference (queue
    // type, dead-lettering, a length limit…) is not what loansync runs on: failed.
    let (limits, others): (Vec<_>, Vec<_>) = mismatches
        .iter()
        .partition(|m| m.argument == "x-delivery-limit");
    let describe = |ms: &[&crate::queue::amqp::ArgumentMismatch]| {
        ms.iter()
            .map(|m| {
                format!(
                    "{} {}={} (wanted {})",
                    m.queue, m.argument, m.broker, m.wanted
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !others.is_empty() {
        return Err(format!(
            "{}: queues declared with other arguments: {}; re-create them (drained) or see \
             deploy/README.md, \"Changing queue settings\"",
            settings.amqp_url_redacted(),
            describe(&others)
        ));
    }
    let note = if limits.is_empty() {
        String::new()
    } else {
        format!(
            " (the broker's delivery-limit backstop differs: {})",
            describe(&limits)
        )
    };
    Ok(format!(
        "{}: queues {}, {} and {} declared as expected{note}",
        settings.amqp_url_redacted(),
        t.plan,
        t.chunks,
        t.dead
    ))
}

/// The key is accepted: a batch of no records, as the contract allows.
pub(super) async fn api(settings: &Settings) -> Result<String, String> {
    let api = settings.api().map_err(|e| e.to_string())?;
    let at = redact_url(api.base_url.as_str());
    let client = AnalyticsClient::new(api).map_err(|e| e.to_string())?;
    let status = |s: Option<u16>| s.map_or_else(String::new, |s| format!("HTTP {s}: "));
    match client.check_key().await {
        Ok(Answer::Accepted { .. }) => Ok(format!(
            "{at}: the key was accepted (an empty batch to /etl/officers answered 200)"
        )),
        Ok(Answer::Unauthorized { status, .. }) => Err(format!(
            "{at}: HTTP {status}: the API refused the key (ANALYTICS_API_KEY / ANALYTICS_API_KEY_FILE)"
        )),
        Ok(Answer::Refused {
            status: s,
            error_code,
            message,
            ..
        }) => Err(format!("{at}: HTTP {s} {error_code}: {message}")),
        Ok(Answer::Failed {
            status: s,
            error_code,
            message,
            ..
        }) => Err(format!("{at}: {}{error_code}: {message}", status(s))),
        Err(t) => Err(format!("{at}: {}{}", status(t.status), t.message)),
    }
}

/// `loansync probe`: GETs `url`; `Ok` (the status) on a 2xx answer, `Err` (the status
/// or the error) otherwise.
pub async fn probe(url: &str, timeout: Duration) -> Result<String, String> {
    let at = redact_url(url);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => Ok(format!("{at}: {}", r.status())),
        Ok(r) => Err(format!("{at}: {}", r.status())),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            Err(redact_text(&format!("{at}: {text}")))
        }
    }
}
