//! The queues: declaring them (quorum, else classic), adopting the arguments of queues
//! that exist with other ones, their depth, deleting them.

use super::connection::Broker;
use crate::queue::{QueueError, Topology};
use crate::telemetry::{Event, Metrics};
use lapin::Connection;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The `x-delivery-limit` declared on the queues for loansync's `ETL_DELIVERY_LIMIT`.
///
/// A backstop only: loansync settles a chunk that keeps failing (and says why) after
/// `limit` starts, from its own ledger count. The broker's limit sits a margin above
/// it, for deliveries that never reach the ledger (a worker killed before its first
/// statement). Requeues caused by a database outage do not count against it at all
/// ([`Disposition::Republish`](crate::queue::Disposition::Republish)).
pub fn broker_delivery_limit(limit: u32) -> u32 {
    limit.saturating_add(2)
}

/// One argument of an existing queue whose value on the broker differs from the one
/// loansync declares. The queue is used as it is; [`ArgumentMismatch::advice`] says what
/// that means and how to change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentMismatch {
    pub queue: String,
    /// `x-delivery-limit`, `x-dead-letter-exchange`, `durable`...; `?` when the broker's
    /// refusal names none (then `broker` holds its whole text).
    pub argument: String,
    /// The broker's value, as RabbitMQ prints it (`none`: not set).
    pub broker: String,
    /// loansync's value (`none`: not set).
    pub wanted: String,
}

impl ArgumentMismatch {
    /// Reads RabbitMQ's refusal of a redeclaration, such as `PRECONDITION_FAILED -
    /// inequivalent arg 'x-delivery-limit' for queue 'etl.chunks' in vhost '/': received
    /// the value '9' of type 'long' but current is the value '5' of type 'long'`.
    pub fn from_refusal(queue: &str, text: &str) -> Option<ArgumentMismatch> {
        let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
        let argument = &rest[..rest.find('\'')?];
        let rest = &rest[rest.find(": received ")? + ": received ".len()..];
        let (received, current) = rest.split_once(" but current is ")?;
        Some(ArgumentMismatch {
            queue: queue.to_string(),
            argument: argument.to_string(),
            broker: plain_value(current),
            wanted: plain_value(received),
        })
    }

    /// What the difference means for loansync and how to change the queue for real.
    pub fn advice(&self) -> String {
        let q = &self.queue;
        let recreate = format!(
            "to apply loansync's value, stop the planners, let the queue drain, delete it \
             (`rabbitmqctl delete_queue {q} --if-empty`) and restart loansync, which declares it again"
        );
        let num = |v: &str| v.parse::<i64>().ok();
        match (self.argument.as_str(), num(&self.broker), num(&self.wanted)) {
            ("x-delivery-limit", Some(have), Some(want)) if have < want => format!(
                "the broker dead-letters a message of {q} after {have} deliveries, loansync \
                 wanted {want} (ETL_DELIVERY_LIMIT + 2). loansync still gives up on a chunk \
                 after ETL_DELIVERY_LIMIT starts (its ledger's count, in force at once), but \
                 only while ETL_DELIVERY_LIMIT + 2 <= {have}: above that the broker may drop \
                 a chunk that keeps failing into the dead-letter queue before loansync \
                 settles it, and its sync stalls until `loansync resume`. A policy cannot \
                 raise the limit \
                 (RabbitMQ applies the lower of policy and argument): {recreate}"
            ),
            ("x-delivery-limit", Some(have), Some(want)) => format!(
                "the broker dead-letters a message of {q} after {have} deliveries, loansync \
                 wanted {want} (ETL_DELIVERY_LIMIT + 2). loansync gives up on a chunk after \
                 ETL_DELIVERY_LIMIT starts (its ledger's count, in force at once), so the \
                 broker's backstop is only looser than needed. To lower it now: \
                 `rabbitmqctl set_policy loansync-limits '^{}$' '{{\"delivery-limit\":{want}}}' \
                 --apply-to queues` (RabbitMQ applies the lower of policy and \
                 argument); or {recreate}",
                q.replace('.', "\\.")
            ),
            ("x-dead-letter-exchange" | "x-dead-letter-routing-key", _, _) => format!(
                "messages the broker dead-letters from {q} (past its delivery limit) go where \
                 the queue's arguments say, not where loansync wanted; what loansync \
                 dead-letters itself still goes to its dead-letter queue. A policy does not \
                 override a queue's own dead-letter arguments: {recreate}"
            ),
            ("x-queue-type", _, _) => format!(
                "{q} stays a {} queue (a queue's type never changes): {recreate}",
                self.broker
            ),
            _ => format!("loansync uses {q} as the broker has it: {recreate}"),
        }
    }
}

impl std::fmt::Display for ArgumentMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {} exists with {} = {} where loansync declares {}: {}",
            self.queue,
            self.argument,
            self.broker,
            self.wanted,
            self.advice()
        )
    }
}

/// `the value '5' of type 'long'` → `5`, `'true'` → `true`, `none` → `none`.
fn plain_value(v: &str) -> String {
    let v = v.trim();
    let v = v.strip_prefix("the value ").unwrap_or(v);
    let v = match v.rfind("' of type '") {
        Some(i) => &v[..=i],
        None => v,
    };
    v.strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(v)
        .to_string()
}

/// Messages waiting in `queue` (a passive declare on a channel of its own); an error
/// when there is no such queue.
pub(super) async fn queue_depth_on(conn: &Connection, queue: &str) -> Result<u32, QueueError> {
    let channel = conn.create_channel().await?;
    let q = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, ShortString::from("done")).await;
    Ok(q?.message_count())
}

impl Broker {
    /// Messages waiting in `queue` (not counting unacknowledged ones).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, QueueError> {
        queue_depth_on(&self.conn, queue).await
    }

    /// Deletes this prefix's queues (tests and tenants that leave).
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let channel = self.conn.create_channel().await?;
        for q in [
            &self.topology.plan,
            &self.topology.chunks,
            &self.topology.dead,
        ] {
            channel
                .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await?;
        }
        // Closed here: a channel left open errors in lapin when the connection closes.
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(())
    }
}

fn queue_args(kind: &str, dead: Option<(&str, u32)>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(kind)),
    );
    if let Some((dead_queue, limit)) = dead {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(dead_queue)),
        );
        if kind == "quorum" {
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
    }
    args
}

/// Declares the three queues, quorum if the broker takes them, classic otherwise. A
/// queue that exists with other arguments is used as it is: the differences are
/// returned, logged once each and counted in `etl_queue_arguments_mismatch`.
pub(super) async fn declare_topology(
    conn: &Connection,
    t: &Topology,
    delivery_limit: u32,
    metrics: &Metrics,
) -> Result<Vec<ArgumentMismatch>, QueueError> {
    'kinds: for kind in ["quorum", "classic"] {
        let mut found = Vec::new();
        let mut per_queue = Vec::new();
        for (name, dead) in [
            (&t.dead, None),
            (&t.plan, Some((t.dead.as_str(), delivery_limit))),
            (&t.chunks, Some((t.dead.as_str(), delivery_limit))),
        ] {
            match declare_accepting(conn, name, queue_args(kind, dead)).await {
                Ok(differs) => {
                    per_queue.push((name, differs.clone()));
                    found.extend(differs);
                }
                Err(e) if kind == "quorum" => {
                    tracing::warn!(queue = %name, error = %format!("{e:#}"), "quorum queue refused; falling back to classic queues");
                    continue 'kinds;
                }
                Err(QueueError::Broker(source)) => {
                    return Err(QueueError::Queue {
                        queue: name.to_string(),
                        source,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        for (name, differs) in per_queue {
            report_mismatches(name, &differs, metrics);
        }
        return Ok(found);
    }
    unreachable!("the classic declaration returns")
}

/// The code and text of the broker's refusal when it closed the channel with it.
fn refusal(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().as_str().to_string()))
        }
        _ => None,
    }
}

/// `args` with `m.argument` set to the broker's value (removed for `none`), typed as
/// loansync's own value; false when that cannot be done (not a queue argument, an
/// unknown value), or `m.argument` was adopted already.
fn adopt(args: &mut FieldTable, m: &ArgumentMismatch, adopted: &[ArgumentMismatch]) -> bool {
    if !m.argument.starts_with("x-") || adopted.iter().any(|a| a.argument == m.argument) {
        return false;
    }
    let mut map = args.inner().clone();
    let key = ShortString::from(m.argument.as_str());
    if m.broker == "none" {
        map.remove(&key);
    } else {
        let value = match map.get(&key) {
            Some(AMQPValue::LongString(_)) | None => {
                AMQPValue::LongString(LongString::from(m.broker.as_str()))
            }
            Some(AMQPValue::LongLongInt(_)) => match m.broker.parse::<i64>() {
                Ok(n) => AMQPValue::LongLongInt(n),
                Err(_) => return false,
            },
            Some(AMQPValue::Boolean(_)) => match m.broker.parse::<bool>() {
                Ok(b) => AMQPValue::Boolean(b),
                Err(_) => return false,
            },
            Some(_) => return false,
        };
        map.insert(key, value);
    }
    *args = FieldTable::from(map);
    true
}

/// Declares `name` durable with `wanted`. When the queue exists with other arguments
/// (the broker refuses with 406 PRECONDITION_FAILED and closes the channel), declares it
/// again on a new channel with the broker's value of each argument it names, until the
/// declaration is accepted, and returns what differed; a difference that cannot be
/// adopted so (not a queue argument, a refusal naming none) is checked with a passive
/// declaration instead. Anything else, or no queue, is an error.
async fn declare_accepting(
    conn: &Connection,
    name: &str,
    wanted: FieldTable,
) -> Result<Vec<ArgumentMismatch>, QueueError> {
    let mut args = wanted;
    let mut found: Vec<ArgumentMismatch> = Vec::new();
    loop {
        let channel = conn.create_channel().await?;
        let res = channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions::durable(),
                args.clone(),
            )
            .await;
        let e = match res {
            Ok(_) => {
                let _ = channel.close(200, ShortString::from("declared")).await;
                return Ok(found);
            }
            Err(e) => e,
        };
        let Some((406, text)) = refusal(&e) else {
            return Err(e.into());
        };
        let m = ArgumentMismatch::from_refusal(name, &text);
        if let Some(m) = m.as_ref().filter(|m| adopt(&mut args, m, &found)) {
            found.push(m.clone());
            continue;
        }
        // The queue's other differences cannot be adopted: use it as it is if it exists.
        if queue_depth_on(conn, name).await.is_err() {
            return Err(QueueError::Queue {
                queue: name.to_string(),
                source: e,
            });
        }
        found.push(m.unwrap_or_else(|| ArgumentMismatch {
            queue: name.to_string(),
            argument: "?".into(),
            broker: text,
            wanted: "?".into(),
        }));
        return Ok(found);
    }
}

/// Queues whose differences were logged, with what was logged: each is logged once per
/// process (every reconnection declares again), and again only if it changes.
static REPORTED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Vec<ArgumentMismatch>>>,
> = std::sync::LazyLock::new(Default::default);

fn report_mismatches(queue: &str, differs: &[ArgumentMismatch], metrics: &Metrics) {
    Event::QueueArgumentsChecked {
        queue,
        differing: differs.len(),
    }
    .emit(metrics);
    let Ok(mut reported) = REPORTED.lock() else {
        return;
    };
    let before = reported.get(queue).map(Vec::as_slice).unwrap_or_default();
    if before == differs {
        return;
    }
    if differs.is_empty() {
        tracing::info!(queue, "the queue's arguments now match loansync's");
    }
    for m in differs {
        tracing::warn!(
            queue,
            argument = %m.argument,
            broker = %m.broker,
            wanted = %m.wanted,
            "queue {queue} exists with {} = {}, loansync declares {}; using it as it is: {}",
            m.argument,
            m.broker,
            m.wanted,
            m.advice()
        );
    }
    reported.insert(queue.to_string(), differs.to_vec());
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: &str = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'etl.chunks' in vhost '/': received '9' but current is '5'";

    #[test]
    fn a_refused_redeclaration_names_the_argument_and_both_values() {
        let m = ArgumentMismatch::from_refusal("etl.chunks", LIMIT).unwrap();
        assert_eq!(
            m,
            ArgumentMismatch {
                queue: "etl.chunks".into(),
                argument: "x-delivery-limit".into(),
                broker: "5".into(),
                wanted: "9".into(),
            }
        );
        // Set on one side only: RabbitMQ prints the type, or `none`.
        let m = ArgumentMismatch::from_refusal(
            "etl.plan",
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'etl.plan' in vhost '/': received the value 'etl.dead' of type 'longstr' but current is none",
        )
        .unwrap();
        assert_eq!(
            (m.argument.as_str(), m.broker.as_str(), m.wanted.as_str()),
            ("x-dead-letter-routing-key", "none", "etl.dead")
        );
        let m = ArgumentMismatch::from_refusal(
            "etl.plan",
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'etl.plan' in vhost '/': received 'true' but current is 'false'",
        )
        .unwrap();
        assert_eq!((m.broker.as_str(), m.wanted.as_str()), ("false", "true"));
        // Any other refusal is not a difference of arguments.
        assert_eq!(
            ArgumentMismatch::from_refusal(
                "etl.plan",
                "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 'etl.plan'"
            ),
            None
        );
    }

    #[test]
    fn the_description_says_what_a_different_delivery_limit_means_and_how_to_change_it() {
        // The broker's limit is now lower than loansync's: a policy cannot raise it.
        let lower = ArgumentMismatch::from_refusal("etl.chunks", LIMIT).unwrap();
        let text = lower.to_string();
        assert!(
            text.starts_with(
                "queue etl.chunks exists with x-delivery-limit = 5 where loansync declares 9"
            ),
            "{text}"
        );
        assert!(text.contains("ETL_DELIVERY_LIMIT + 2 <= 5"), "{text}");
        assert!(text.contains("cannot raise"), "{text}");
        assert!(
            text.contains("rabbitmqctl delete_queue etl.chunks --if-empty"),
            "{text}"
        );
        // Higher than loansync's: loansync gives up first; a policy lowers it.
        let higher = ArgumentMismatch {
            broker: "9".into(),
            wanted: "4".into(),
            ..lower
        };
        let text = higher.advice();
        assert!(text.contains("gives up on a chunk after ETL_DELIVERY_LIMIT starts"));
        assert!(
            text.contains(
                r#"rabbitmqctl set_policy loansync-limits '^etl\.chunks$' '{"delivery-limit":4}' --apply-to queues"#
            ),
            "{text}"
        );
        let dlx = ArgumentMismatch {
            queue: "etl.plan".into(),
            argument: "x-dead-letter-routing-key".into(),
            broker: "none".into(),
            wanted: "etl.dead".into(),
        };
        assert!(
            dlx.advice().contains("does not override"),
            "{}",
            dlx.advice()
        );
    }

    #[test]
    fn adopting_the_brokers_value_keeps_loansyncs_type_and_removes_what_it_lacks() {
        let mut args = queue_args("quorum", Some(("etl.dead", 9)));
        let limit = ArgumentMismatch::from_refusal("etl.chunks", LIMIT).unwrap();
        assert!(adopt(&mut args, &limit, &[]));
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(5))
        );
        // The same argument twice means adopting did not help.
        assert!(!adopt(&mut args, &limit, std::slice::from_ref(&limit)));
        let gone = ArgumentMismatch {
            argument: "x-dead-letter-exchange".into(),
            broker: "none".into(),
            wanted: "".into(),
            ..limit.clone()
        };
        assert!(adopt(&mut args, &gone, std::slice::from_ref(&limit)));
        assert!(!args.contains_key("x-dead-letter-exchange"));
        // Options such as `durable` are not arguments.
        let durable = ArgumentMismatch {
            argument: "durable".into(),
            ..limit
        };
        assert!(!adopt(&mut args, &durable, &[]));
    }
}
