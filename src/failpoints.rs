//! Named fault points (tikv's `fail` crate), armed from the environment so that a test
//! can make a `loansync` process fail or die at exactly one step of claiming, planning,
//! publishing, settling or finalizing, instead of holding locks and hoping for timing.
//!
//! `LOANSYNC_FAILPOINTS` holds `name=action` pairs separated by `;`. An action is one of
//! the `fail` crate's (`panic`, `sleep(ms)`, `pause`, `off`, with `N*` and `P%`
//! prefixes), or `kill`: the process aborts on the spot, as a SIGKILL or an OOM kill
//! would end it (no destructor, no graceful shutdown; PostgreSQL and RabbitMQ see the
//! sockets close), the `n`-th time the point is reached with `kill(n)`.
//!
//! Only a build with the `failpoints` feature (on by default, off in the production
//! image) has fault points; without it the variable is refused with a warning.

/// The environment variable that arms fault points.
pub const ENV: &str = "LOANSYNC_FAILPOINTS";

/// Every fault point in the code, for `LOANSYNC_FAILPOINTS` and the torture run.
pub const POINTS: &[&str] = &[
    "lifecycle::record::before_commit",
    "planner::message_before_settle",
    "lifecycle::takeover::before_commit",
    "planner::claimed",
    "planner::part_written",
    "planner::before_totals",
    "planner::totals_before_commit",
    "planner::before_publish",
    "planner::before_mark_published",
    "worker::received",
    "worker::chunk_started",
    "worker::after_post",
    "ledger::settle::before_commit",
    "ledger::settle::after_commit",
    "ledger::finalize::before_commit",
    "worker::before_ack",
];

/// A point and what to do there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arming {
    pub point: String,
    pub action: Action,
}

/// What a fault point does when reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Abort the process the `n`-th time (1 = the first).
    Kill(u32),
    /// One of the `fail` crate's own actions, as written.
    Fail(String),
}

/// Parses `LOANSYNC_FAILPOINTS`' value; `Err` names the part that is wrong.
pub fn parse(spec: &str) -> Result<Vec<Arming>, String> {
    spec.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (point, action) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected name=action"))?;
            let (point, action) = (point.trim(), action.trim());
            if !POINTS.contains(&point) {
                return Err(format!("`{point}`: no such fault point"));
            }
            let action = if action == "kill" {
                Action::Kill(1)
            } else if let Some(n) = action
                .strip_prefix("kill(")
                .and_then(|r| r.strip_suffix(')'))
            {
                Action::Kill(
                    n.parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("`{pair}`: kill(n) takes a count from 1"))?,
                )
            } else {
                Action::Fail(action.to_string())
            };
            Ok(Arming {
                point: point.to_string(),
                action,
            })
        })
        .collect()
}

/// Arms the fault points `LOANSYNC_FAILPOINTS` names, if it is set. Call once, at start.
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    let armings = parse(&spec)?;
    arm(armings)
}

#[cfg(feature = "failpoints")]
fn arm(armings: Vec<Arming>) -> Result<(), String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    for a in armings {
        match a.action {
            Action::Kill(n) => {
                let hits = AtomicU32::new(0);
                let point = a.point.clone();
                fail::cfg_callback(a.point, move || {
                    if hits.fetch_add(1, Ordering::SeqCst) + 1 == n {
                        eprintln!("loansync: fault point {point}: killing the process");
                        std::process::abort();
                    }
                })?;
            }
            Action::Fail(action) => fail::cfg(a.point, &action)?,
        }
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn arm(armings: Vec<Arming>) -> Result<(), String> {
    if armings.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{ENV} is set but this build has no fault points (the `failpoints` feature is off)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armings_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse("worker::after_post=kill; planner::claimed = kill(3);ledger::settle::before_commit=1*panic").unwrap(),
            vec![
                Arming {
                    point: "worker::after_post".into(),
                    action: Action::Kill(1)
                },
                Arming {
                    point: "planner::claimed".into(),
                    action: Action::Kill(3)
                },
                Arming {
                    point: "ledger::settle::before_commit".into(),
                    action: Action::Fail("1*panic".into())
                },
            ]
        );
        assert!(parse("").unwrap().is_empty());
        assert!(
            parse("nowhere=kill")
                .unwrap_err()
                .contains("no such fault point")
        );
        assert!(
            parse("worker::after_post")
                .unwrap_err()
                .contains("name=action")
        );
        assert!(
            parse("worker::after_post=kill(0)")
                .unwrap_err()
                .contains("from 1")
        );
    }

    #[test]
    fn every_fault_point_named_here_is_in_the_code() {
        let sources = [
            include_str!("planner/plan.rs"),
            include_str!("planner/run.rs"),
            include_str!("worker/chunk.rs"),
            include_str!("worker/handle.rs"),
            include_str!("ledger/settle.rs"),
            include_str!("ledger/finalize.rs"),
            include_str!("ledger/lifecycle/syncs.rs"),
            include_str!("ledger/lifecycle/requests.rs"),
        ];
        for point in POINTS {
            let call = format!("fail_point!(\"{point}\"");
            assert!(
                sources.iter().any(|s| s.contains(&call)),
                "{point} is listed but never reached"
            );
        }
    }
}
