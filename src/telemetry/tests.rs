//! Each event updates exactly its metric; every series exists at zero from the start;
//! the table is what is exported, and README documents it.

use super::labels::{self, ChunkOutcomeLabel, HttpClass, RecordOutcome, RetryReason, SkipReason};
use super::registry::{Series, TABLE};
use super::{Event, Metrics, Requeue};
use crate::domain::{EntityKind, SyncType};
use crate::ledger::states::FinalStatus;
use std::collections::BTreeMap;
use std::time::Duration;

/// Every sample of the exposition but the process collector's and the histogram
/// buckets: `name{labels}` → value.
fn samples(m: &Metrics) -> BTreeMap<String, f64> {
    m.render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
        .filter(|l| !l.contains("_bucket{"))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The samples `events`, emitted in order into a fresh registry, changed.
fn changes(events: Vec<Event<'_>>) -> BTreeMap<String, f64> {
    let m = Metrics::new();
    let before = samples(&m);
    for e in events {
        e.emit(&m);
    }
    let after = samples(&m);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "an event created a series that was not there from the start"
    );
    after
        .into_iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .collect()
}

fn expect(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
}

#[test]
fn each_event_updates_exactly_its_metric() {
    let e = EntityKind::Loan;
    let error = anyhow::anyhow!("connection refused");
    let chunk = |outcome: &str| {
        expect(&[
            (
                &format!("etl_chunks_total{{entity=\"loan\",outcome=\"{outcome}\"}}"),
                1.0,
            ),
            ("etl_chunk_duration_seconds_count{entity=\"loan\"}", 1.0),
            ("etl_chunk_duration_seconds_sum{entity=\"loan\"}", 0.25),
        ])
    };
    let cases: Vec<(Vec<Event<'_>>, BTreeMap<String, f64>)> = vec![
        (
            vec![Event::RecordsSettled {
                entity: e,
                succeeded: 3,
                failed: 1,
            }],
            expect(&[
                (
                    "etl_records_total{entity=\"loan\",outcome=\"success\"}",
                    3.0,
                ),
                ("etl_records_total{entity=\"loan\",outcome=\"failed\"}", 1.0),
            ]),
        ),
        (
            vec![Event::SyncFinished {
                sync_type: SyncType::Full,
                status: FinalStatus::PartialSuccess,
                seconds: Some(12.0),
            }],
            expect(&[
                (
                    "etl_syncs_total{status=\"partial_success\",sync_type=\"full\"}",
                    1.0,
                ),
                ("etl_sync_duration_seconds_count{sync_type=\"full\"}", 1.0),
                ("etl_sync_duration_seconds_sum{sync_type=\"full\"}", 12.0),
            ]),
        ),
        (
            vec![Event::SyncFinished {
                sync_type: SyncType::Incremental,
                status: FinalStatus::Failed,
                seconds: None,
            }],
            expect(&[(
                "etl_syncs_total{status=\"failed\",sync_type=\"incremental\"}",
                1.0,
            )]),
        ),
        (
            vec![Event::SyncFinishedAtPlanning {
                sync_type: SyncType::Incremental,
                status: FinalStatus::Completed,
            }],
            expect(&[(
                "etl_syncs_total{status=\"completed\",sync_type=\"incremental\"}",
                1.0,
            )]),
        ),
        (
            vec![Event::ChunkSettled {
                entity: e,
                succeeded: 10,
                failed: 2,
                seconds: 0.25,
            }],
            chunk("settled"),
        ),
        (
            vec![Event::ChunkDuplicate {
                entity: e,
                seconds: 0.25,
            }],
            chunk("duplicate"),
        ),
        (
            vec![Event::ChunkAborted {
                entity: e,
                seconds: 0.25,
            }],
            chunk("aborted"),
        ),
        (
            vec![Event::ChunkDeadLettered {
                entity: e,
                code: Some("RECORD_UNREADABLE"),
                reason: "bad row",
                settled: true,
                seconds: 0.25,
            }],
            chunk("dead_letter"),
        ),
        (
            vec![Event::ChunkDeadLettered {
                entity: e,
                code: None,
                reason: "no such chunk",
                settled: false,
                seconds: 0.25,
            }],
            chunk("dead_letter"),
        ),
        (
            vec![Event::ChunkRequeued {
                entity: e,
                cause: Requeue::Transient { error: &error },
                seconds: 0.25,
            }],
            chunk("requeued"),
        ),
        (
            vec![Event::ChunkRequeued {
                entity: e,
                cause: Requeue::NotSettled {
                    code: "WORKER_PANIC",
                    reason: "boom",
                    error: &error,
                },
                seconds: 0.25,
            }],
            chunk("requeued"),
        ),
        (
            vec![Event::ChunkRepublished {
                entity: e,
                error: &error,
                wait_secs: 30,
                seconds: 0.25,
            }],
            chunk("republished"),
        ),
        (
            vec![Event::ChunkUnparsable { reason: "not json" }],
            expect(&[(
                "etl_chunks_total{entity=\"unknown\",outcome=\"dead_letter\"}",
                1.0,
            )]),
        ),
        (
            vec![Event::ChunkPanicked],
            expect(&[("etl_chunk_panics_total", 1.0)]),
        ),
        (
            vec![Event::TransformWarnings {
                entity: EntityKind::Repayment,
                warnings: 4,
            }],
            expect(&[("etl_transform_warnings_total{entity=\"repayment\"}", 4.0)]),
        ),
        (
            vec![Event::HttpResponse {
                endpoint: "/etl/customers",
                class: HttpClass::ServerError,
                seconds: 0.5,
            }],
            expect(&[
                (
                    "etl_http_responses_total{endpoint=\"/etl/customers\",status_class=\"5xx\"}",
                    1.0,
                ),
                (
                    "etl_http_request_duration_seconds_count{endpoint=\"/etl/customers\"}",
                    1.0,
                ),
                (
                    "etl_http_request_duration_seconds_sum{endpoint=\"/etl/customers\"}",
                    0.5,
                ),
            ]),
        ),
        (
            vec![
                Event::HttpRetry {
                    status: Some(429),
                    code: "HTTP_429",
                    delay: Duration::from_millis(100),
                },
                Event::HttpRetry {
                    status: None,
                    code: "NETWORK_ERROR",
                    delay: Duration::from_millis(100),
                },
            ],
            expect(&[
                ("etl_http_retries_total{reason=\"status_429\"}", 1.0),
                ("etl_http_retries_total{reason=\"network\"}", 1.0),
            ]),
        ),
        (
            vec![
                Event::ApiBackpressure { status: Some(429) },
                Event::ApiBackpressure { status: Some(503) },
                Event::ApiBackpressure { status: None },
            ],
            expect(&[
                ("etl_api_backpressure_total{reason=\"status_429\"}", 1.0),
                ("etl_api_backpressure_total{reason=\"status_5xx\"}", 1.0),
                ("etl_api_backpressure_total{reason=\"network\"}", 1.0),
            ]),
        ),
        (
            vec![Event::RecordsPlanned {
                entity: EntityKind::Officer,
                records: 7,
            }],
            expect(&[("etl_records_planned_total{entity=\"officer\"}", 7.0)]),
        ),
        (
            vec![Event::PlanDuplicate {
                request_id: "r1",
                sync_id: Some("s1"),
            }],
            expect(&[("etl_plans_skipped_total{reason=\"duplicate\"}", 1.0)]),
        ),
        (
            vec![Event::PlanBusy {
                active_sync_id: "s1",
            }],
            expect(&[("etl_plans_skipped_total{reason=\"busy\"}", 1.0)]),
        ),
        (
            // Recorded, then planned from the pending requests.
            vec![Event::RequestRecorded { request_id: "r1" }],
            expect(&[("etl_plans_skipped_total{reason=\"queued\"}", 1.0)]),
        ),
        (
            vec![Event::PlanInvalid { reason: "not json" }],
            expect(&[("etl_plans_skipped_total{reason=\"invalid\"}", 1.0)]),
        ),
        (
            vec![Event::DbOutageWait {
                what: "the chunk",
                error: &error,
                wait_secs: 60,
            }],
            expect(&[("etl_db_outage_waits_total", 1.0)]),
        ),
        (
            vec![Event::BrokerBlocked { reason: "memory" }],
            expect(&[
                ("etl_broker_blocked_total", 1.0),
                ("etl_broker_blocked", 1.0),
            ]),
        ),
        (
            // Blocked then unblocked: one episode counted, nothing blocked now.
            vec![
                Event::BrokerBlocked { reason: "memory" },
                Event::BrokerUnblocked,
            ],
            expect(&[("etl_broker_blocked_total", 1.0)]),
        ),
        (
            vec![Event::BrokerTimeout],
            expect(&[("etl_broker_timeouts_total", 1.0)]),
        ),
        (
            vec![Event::RecordsAcknowledged {
                entity: e,
                lags: &[30.0, 1800.0],
            }],
            expect(&[
                ("etl_record_lag_seconds_count{entity=\"loan\"}", 2.0),
                ("etl_record_lag_seconds_sum{entity=\"loan\"}", 1830.0),
            ]),
        ),
        (
            vec![Event::SweepBuckets {
                entity: e,
                unchanged: 7,
                clean: 2,
                changed: 0,
            }],
            expect(&[
                (
                    "etl_sweep_buckets_total{entity=\"loan\",outcome=\"unchanged\"}",
                    7.0,
                ),
                (
                    "etl_sweep_buckets_total{entity=\"loan\",outcome=\"clean\"}",
                    2.0,
                ),
            ]),
        ),
        (
            vec![Event::SourceSchemaChecked {
                differences: 2,
                message: Some("source schema drift: loans_ajoloan.amount changed type"),
            }],
            expect(&[("etl_source_schema_drift", 2.0)]),
        ),
        (
            // A clean check after a drift: nothing differs now.
            vec![
                Event::SourceSchemaChecked {
                    differences: 1,
                    message: Some("source schema drift"),
                },
                Event::SourceSchemaChecked {
                    differences: 0,
                    message: None,
                },
            ],
            expect(&[]),
        ),
    ];
    for (events, expected) in cases {
        assert_eq!(changes(events), expected);
    }
}

#[test]
fn every_series_exists_at_zero_from_the_start() {
    let m = Metrics::new();
    let s = samples(&m);
    let zero = |key: String| assert_eq!(s.get(&key), Some(&0.0), "{key}");
    for e in EntityKind::ALL.map(EntityKind::as_str) {
        for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
            zero(format!(
                "etl_records_total{{entity=\"{e}\",outcome=\"{o}\"}}"
            ));
        }
        for o in ChunkOutcomeLabel::ALL.map(ChunkOutcomeLabel::as_str) {
            zero(format!(
                "etl_chunks_total{{entity=\"{e}\",outcome=\"{o}\"}}"
            ));
        }
        zero(format!("etl_records_planned_total{{entity=\"{e}\"}}"));
        zero(format!("etl_transform_warnings_total{{entity=\"{e}\"}}"));
        zero(format!("etl_deleted_records{{entity=\"{e}\"}}"));
        zero(format!(
            "etl_chunk_duration_seconds_count{{entity=\"{e}\"}}"
        ));
    }
    zero("etl_chunks_total{entity=\"unknown\",outcome=\"dead_letter\"}".into());
    for endpoint in labels::endpoints() {
        for c in HttpClass::ALL.map(HttpClass::as_str) {
            zero(format!(
                "etl_http_responses_total{{endpoint=\"{endpoint}\",status_class=\"{c}\"}}"
            ));
        }
        zero(format!(
            "etl_http_request_duration_seconds_count{{endpoint=\"{endpoint}\"}}"
        ));
    }
    for r in RetryReason::ALL.map(RetryReason::as_str) {
        zero(format!("etl_http_retries_total{{reason=\"{r}\"}}"));
    }
    for r in SkipReason::ALL.map(SkipReason::as_str) {
        zero(format!("etl_plans_skipped_total{{reason=\"{r}\"}}"));
    }
    for t in SyncType::ALL.map(SyncType::as_str) {
        for st in FinalStatus::ALL.iter().map(|s| s.as_str()) {
            zero(format!(
                "etl_syncs_total{{status=\"{st}\",sync_type=\"{t}\"}}"
            ));
            zero(format!(
                "etl_last_sync_status{{status=\"{st}\",sync_type=\"{t}\"}}"
            ));
        }
        for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
            zero(format!(
                "etl_last_sync_records{{outcome=\"{o}\",sync_type=\"{t}\"}}"
            ));
        }
        zero(format!(
            "etl_sync_duration_seconds_count{{sync_type=\"{t}\"}}"
        ));
        zero(format!("etl_pending_requests{{sync_type=\"{t}\"}}"));
        zero(format!(
            "etl_last_sync_completed_timestamp_seconds{{sync_type=\"{t}\"}}"
        ));
        zero(format!(
            "etl_last_successful_sync_timestamp_seconds{{sync_type=\"{t}\"}}"
        ));
    }
    for name in [
        "etl_chunks_in_flight",
        "etl_chunk_panics_total",
        "etl_db_outage_waits_total",
        "etl_broker_blocked_total",
        "etl_broker_blocked",
        "etl_broker_timeouts_total",
        "etl_stalled_syncs",
        "etl_dead_letter_messages",
        "etl_source_schema_drift",
    ] {
        zero(name.into());
    }
}

#[test]
fn the_queue_arguments_gauge_has_a_series_per_queue_declared() {
    let m = Metrics::new();
    let gauge = |queue| m.value("etl_queue_arguments_mismatch", &[("queue", queue)]);
    assert_eq!(
        gauge("p.chunks"),
        None,
        "queue names are known only once declared"
    );
    for (differing, expected) in [(2, 2.0), (0, 0.0)] {
        Event::QueueArgumentsChecked {
            queue: "p.chunks",
            differing,
        }
        .emit(&m);
        assert_eq!(gauge("p.chunks"), Some(expected));
    }
    assert_eq!(gauge("p.plan"), None);
}

#[test]
fn the_table_is_what_is_exported() {
    let m = Metrics::new();
    let text = m.render();
    let mut names: Vec<&str> = TABLE.iter().map(|row| row.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), TABLE.len(), "a name defined twice");
    for row in TABLE {
        let help = format!("# HELP {} {}\n", row.name, row.help);
        match row.series {
            Series::AtZero { .. } => {
                assert!(text.contains(&help), "{help}");
                let histogram = text.contains(&format!("# TYPE {} histogram\n", row.name));
                assert_eq!(histogram, !row.buckets.is_empty(), "{}", row.name);
                assert!(
                    row.labels.iter().all(|l| l.values.is_some()),
                    "{}: a series at zero for every value needs every value",
                    row.name
                );
            }
            // Nothing until first set.
            Series::WhenSet => assert!(!text.contains(&help), "{}", row.name),
        }
    }
    // Every family exported (but the process's own) is a row.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap_or_default();
        assert!(
            name.starts_with("process_") || names.contains(&name),
            "{name} is not in the table"
        );
    }
}

#[test]
fn the_readme_documents_every_metric_with_its_labels() {
    // README's metrics table: `name{label,label}` (or `name`) in its first column.
    let readme = include_str!("../../README.md");
    let mut documented = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split(" | ").next().unwrap_or_default();
        for item in cell.split('`').skip(1).step_by(2) {
            let (name, labels) = item.split_once('{').unwrap_or((item, "}"));
            if !(name.starts_with("etl_") || name.starts_with("loansync_")) || name.contains(' ') {
                continue;
            }
            let labels: Vec<String> = labels
                .trim_end_matches('}')
                .split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            documented.insert(name.to_string(), labels);
        }
    }
    let defined: BTreeMap<String, Vec<String>> = TABLE
        .iter()
        .map(|row| {
            let labels = row.labels.iter().map(|l| l.name.to_string()).collect();
            (row.name.to_string(), labels)
        })
        .collect();
    assert_eq!(documented, defined);
}
