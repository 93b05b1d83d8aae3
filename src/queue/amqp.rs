//! RabbitMQ: topology, publisher confirms, consumers with `basic_qos` and ack after commit.
//!
//! Separate channels publish and consume (as lapin's examples do). Queues are durable
//! quorum queues with a delivery limit, dead-lettering to `<prefix>.dead`; on a broker
//! without quorum queues they fall back to classic durable queues.
//!
//! A queue's arguments are fixed when it is created. A queue that already exists with
//! other arguments (say, an earlier `ETL_DELIVERY_LIMIT`) is used as the broker has it:
//! each differing argument is logged once with how to change it for real, and counted
//! in `etl_queue_arguments_mismatch` ([`ArgumentMismatch`]).

use super::{ChunkPublisher, Disposition, Topology};
use crate::domain::ChunkJob;
use crate::telemetry::{Event, Metrics, Telemetry};
use anyhow::Context;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The `x-delivery-limit` declared on the queues for loansync's `ETL_DELIVERY_LIMIT`.
///
/// A backstop only: loansync settles a chunk that keeps failing (and says why) after
/// `limit` starts, from its own ledger count. The broker's limit sits a margin above
/// it, for deliveries that never reach the ledger (a worker killed before its first
/// statement). Requeues caused by a database outage do not count against it at all
/// ([`Disposition::Republish`]).
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

/// How a [`Broker`] behaves beyond its URL.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Longest wait for a publish (or an ack) to be taken and confirmed
    /// (`ETL_PUBLISH_CONFIRM_TIMEOUT_SECS`).
    pub confirm_timeout: Duration,
    /// Where this connection reports its state (shared with `/readyz`).
    pub health: BrokerHealth,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            confirm_timeout: Duration::from_secs(30),
            health: BrokerHealth::default(),
        }
    }
}

/// What `/readyz` knows of a process's broker connection, kept across reconnections:
/// connected or not, and blocked or not (RabbitMQ sends `connection.blocked` while a
/// memory or disk alarm holds publishers).
#[derive(Clone, Debug, Default)]
pub struct BrokerHealth(Arc<HealthInner>);

#[derive(Debug, Default)]
struct HealthInner {
    connected: AtomicBool,
    blocked: AtomicBool,
    /// The current connection and its dead-letter queue, for the depth gauge read at
    /// scrape time (replaced on every reconnection).
    current: std::sync::Mutex<Option<(Arc<Connection>, String)>>,
    /// Where blocked notices, timeouts and argument mismatches are counted (the
    /// process-wide registry by default).
    telemetry: Telemetry,
}

impl BrokerHealth {
    /// A health that counts in `telemetry` instead of the process-wide registry.
    pub fn with_telemetry(telemetry: Telemetry) -> BrokerHealth {
        BrokerHealth(Arc::new(HealthInner {
            telemetry,
            ..HealthInner::default()
        }))
    }

    /// The registry this connection counts in.
    pub fn telemetry(&self) -> &Telemetry {
        &self.0.telemetry
    }

    pub fn set_connected(&self, up: bool) {
        self.0.connected.store(up, Ordering::SeqCst);
        if !up {
            // A new connection starts unblocked.
            self.set_blocked(false, "");
        }
    }

    /// Records a `connection.blocked` (with the broker's reason) or `connection.unblocked`.
    pub fn set_blocked(&self, blocked: bool, reason: &str) {
        let was = self.0.blocked.swap(blocked, Ordering::SeqCst);
        if blocked && !was {
            self.0.telemetry.emit(Event::BrokerBlocked { reason });
        } else if !blocked && was {
            self.0.telemetry.emit(Event::BrokerUnblocked);
        }
    }

    /// Messages waiting in the dead-letter queue of the current connection; `None`
    /// without a connection or when the broker does not answer.
    pub async fn dead_letter_depth(&self) -> Option<u32> {
        let (conn, queue) = self.0.current.lock().ok()?.clone()?;
        queue_depth_on(&conn, &queue).await.ok()
    }

    fn set_current(&self, conn: &Arc<Connection>, dead: &str) {
        if let Ok(mut c) = self.0.current.lock() {
            *c = Some((conn.clone(), dead.to_string()));
        }
    }

    /// Applies a connection event of lapin.
    pub fn on_event(&self, event: &lapin::Event) {
        match event {
            lapin::Event::ConnectionBlocked(reason) => self.set_blocked(true, reason),
            lapin::Event::ConnectionUnblocked => self.set_blocked(false, ""),
            _ => {}
        }
    }

    pub fn is_connected(&self) -> bool {
        self.0.connected.load(Ordering::SeqCst)
    }

    pub fn is_blocked(&self) -> bool {
        self.0.blocked.load(Ordering::SeqCst)
    }

    /// Connected and not blocked.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && !self.is_blocked()
    }

    /// `connected`, `blocked` or `disconnected`, for `/readyz`.
    pub fn describe(&self) -> &'static str {
        match (self.is_connected(), self.is_blocked()) {
            (false, _) => "disconnected",
            (true, true) => "blocked",
            (true, false) => "connected",
        }
    }
}

/// A connection to RabbitMQ with the topology declared and a confirming publish channel.
#[derive(Clone)]
pub struct Broker {
    conn: Arc<Connection>,
    /// Confirm-mode channel used only for publishing.
    publish: Channel,
    pub topology: Topology,
    confirm_timeout: Duration,
    health: BrokerHealth,
    /// Arguments of existing queues that differ from what was declared.
    mismatches: Arc<Vec<ArgumentMismatch>>,
}

/// Messages waiting in `queue` (a passive declare on a channel of its own).
async fn queue_depth_on(conn: &Connection, queue: &str) -> anyhow::Result<u32> {
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

/// Headers the broker sets on delivery, dropped when a message is published again.
const BROKER_HEADERS: [&str; 5] = [
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
];

/// Persistent JSON messages.
fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

impl Broker {
    /// Connects, declares the three queues and opens the publish channel.
    pub async fn connect(url: &str, prefix: &str, delivery_limit: u32) -> anyhow::Result<Broker> {
        Self::connect_with_ca(url, prefix, delivery_limit, None).await
    }

    /// [`Broker::connect`], trusting the CA certificates of `ca_pem` (PEM text, from
    /// `AMQP_CA_FILE`) besides the system roots when `url` is `amqps://`. The broker's
    /// certificate is always checked.
    pub async fn connect_with_ca(
        url: &str,
        prefix: &str,
        delivery_limit: u32,
        ca_pem: Option<&str>,
    ) -> anyhow::Result<Broker> {
        Self::connect_with(
            url,
            prefix,
            delivery_limit,
            ca_pem,
            BrokerOptions::default(),
        )
        .await
    }

    /// [`Broker::connect_with_ca`] with a confirm timeout, reporting its state (blocked,
    /// connected) to `opts.health`.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        delivery_limit: u32,
        ca_pem: Option<&str>,
        opts: BrokerOptions,
    ) -> anyhow::Result<Broker> {
        let tls = OwnedTLSConfig {
            cert_chain: ca_pem.map(str::to_owned),
            ..OwnedTLSConfig::default()
        };
        let conn = Connection::connect_with_config(
            url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from(format!("loansync-{prefix}"))),
            tls,
            lapin::runtime::default_runtime()?,
        )
        .await
        .map_err(|e| {
            let at = crate::config::redact_url(url);
            match crate::tls::certificate_refused(&e) {
                // The reason is all the chain below would say (three times over).
                Some(reason) => anyhow::anyhow!(
                    "cannot connect to RabbitMQ at {at}: the broker's TLS certificate was refused \
                     ({reason}); if a private CA signed it, name that CA's PEM file in AMQP_CA_FILE"
                ),
                None => {
                    anyhow::Error::new(e).context(format!("cannot connect to RabbitMQ at {at}"))
                }
            }
        })?;
        let health = opts.health;
        // Blocked / unblocked notices, for /readyz and the metrics. The stream ends with
        // the connection.
        let mut events = conn.events_listener();
        let watcher = health.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                watcher.on_event(&event);
            }
        });
        let topology = Topology::new(prefix);
        let mismatches =
            declare_topology(&conn, &topology, delivery_limit, health.telemetry()).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        health.set_connected(true);
        let conn = Arc::new(conn);
        health.set_current(&conn, &topology.dead);
        Ok(Broker {
            conn,
            publish,
            topology,
            confirm_timeout: opts.confirm_timeout,
            health,
            mismatches: Arc::new(mismatches),
        })
    }

    /// Arguments of the existing queues that differ from what this connection declared
    /// (empty when all match). The queues are used as the broker has them.
    pub fn argument_mismatches(&self) -> &[ArgumentMismatch] {
        &self.mismatches
    }

    /// True while the connection is usable and not blocked (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected() && !self.conn.status().blocked()
    }

    /// The state this connection reports to.
    pub fn health(&self) -> &BrokerHealth {
        &self.health
    }

    /// `op`, failed after the confirm timeout: nothing waits forever on a blocked or
    /// silent broker.
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.confirm_timeout, op).await {
            Ok(r) => r,
            Err(_) => {
                self.health.telemetry().emit(Event::BrokerTimeout);
                Err(anyhow::anyhow!(
                    "{what}: no answer from RabbitMQ within {}s (ETL_PUBLISH_CONFIRM_TIMEOUT_SECS){}",
                    self.confirm_timeout.as_secs_f64(),
                    if self.conn.status().blocked() {
                        "; the broker has blocked this connection (memory or disk alarm)"
                    } else {
                        ""
                    }
                ))
            }
        }
    }

    /// Publishes persistent JSON messages to `queue` and waits for every confirm.
    ///
    /// Up to [`PUBLISHES_IN_FLIGHT`] publishes are handed to the connection at once, in
    /// order. lapin's `basic_publish` returns once the connection's I/O thread has
    /// written the message; awaited one by one, every message cost two wake-ups across
    /// threads and a write of its own, and the planner's publishing of dataset M's 6,664
    /// chunk jobs slowed down most when the workers took the CPU. Their confirms are
    /// awaited 1,024 at a time, as before.
    pub async fn publish_json<T: serde::Serialize + Sync>(
        &self,
        queue: &str,
        messages: &[T],
    ) -> anyhow::Result<()> {
        self.bounded("publishing", async {
            let mut pending = Vec::with_capacity(messages.len().min(1024));
            let mut started = futures::stream::FuturesOrdered::new();
            let mut messages = messages.iter();
            loop {
                while started.len() < PUBLISHES_IN_FLIGHT {
                    let Some(m) = messages.next() else { break };
                    started.push_back(self.start_publish_owned(queue, serde_json::to_vec(m)?));
                }
                let Some(confirm) = started.next().await else {
                    break;
                };
                pending.push(confirm?);
                if pending.len() >= 1024 {
                    await_confirms(&mut pending).await?;
                }
            }
            await_confirms(&mut pending).await
        })
        .await
    }

    /// Publishes one message as it is (any bytes) and waits for its confirm.
    pub async fn publish_bytes(&self, queue: &str, body: &[u8]) -> anyhow::Result<()> {
        self.bounded("publishing", async {
            let confirm = self.start_publish(queue, body, properties()).await?;
            await_confirms(&mut vec![confirm]).await
        })
        .await
    }

    /// Publishes a received message again to `queue` (its body and headers, less those
    /// the broker adds on delivery, plus `x-loansync-republished` counting how often)
    /// and waits for the confirm.
    pub async fn republish(
        &self,
        queue: &str,
        body: &[u8],
        received: &BasicProperties,
    ) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        let mut times = 0i64;
        if let Some(h) = received.headers() {
            for (k, v) in h.inner() {
                if k.as_str() == "x-loansync-republished" {
                    times = match v {
                        AMQPValue::LongLongInt(n) => *n,
                        AMQPValue::LongInt(n) => i64::from(*n),
                        _ => 0,
                    };
                } else if !BROKER_HEADERS.contains(&k.as_str()) {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        headers.insert(
            ShortString::from("x-loansync-republished"),
            AMQPValue::LongLongInt(times + 1),
        );
        self.bounded("republishing", async {
            let confirm = self
                .start_publish(queue, body, properties().with_headers(headers))
                .await?;
            await_confirms(&mut vec![confirm]).await
        })
        .await
    }

    async fn start_publish_owned(
        &self,
        queue: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        self.start_publish(queue, &body, properties()).await
    }

    async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        Ok(self
            .publish
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?)
    }

    /// Moves a message to the dead-letter queue with `reason` in its `x-loansync-reason`
    /// header and the queue it came from in `x-loansync-source`.
    pub async fn dead_letter(&self, body: &[u8], source: &str, reason: &str) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-loansync-reason"),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            ShortString::from("x-loansync-source"),
            AMQPValue::LongString(LongString::from(source)),
        );
        self.bounded("dead-lettering", async {
            let confirm = self
                .publish
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(self.topology.dead.as_str()),
                    BasicPublishOptions::default(),
                    body,
                    properties().with_headers(headers),
                )
                .await?
                .await?;
            anyhow::ensure!(confirm.is_ack(), "the broker refused the dead letter");
            Ok(())
        })
        .await
    }

    /// Starts consuming `queue` with at most `prefetch` unacknowledged messages.
    pub async fn consume(&self, queue: &str, prefetch: u16, tag: &str) -> anyhow::Result<Consumer> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            inner: consumer,
            channel,
        })
    }

    /// A [`super::Consumer`] of `queue` (at most `prefetch` unsettled messages) whose
    /// deliveries settle on this connection; requeued and republished messages go back
    /// after `requeue_pause`.
    pub async fn consumer(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
        requeue_pause: Duration,
    ) -> anyhow::Result<QueueConsumer> {
        Ok(QueueConsumer {
            consumer: self.consume(queue, prefetch, tag).await?,
            broker: self.clone(),
            queue: queue.to_string(),
            requeue_pause,
        })
    }

    /// Messages waiting in `queue` (not counting unacknowledged ones).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        queue_depth_on(&self.conn, queue).await
    }

    /// Deletes this prefix's queues (tests and tenants that leave).
    pub async fn delete_topology(&self) -> anyhow::Result<()> {
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

    pub async fn close(&self) {
        let _ = self.conn.close(200, ShortString::from("bye")).await;
    }
}

/// How many publishes [`Broker::publish_json`] hands to the connection at once.
const PUBLISHES_IN_FLIGHT: usize = 128;

async fn await_confirms(pending: &mut Vec<lapin::PublisherConfirm>) -> anyhow::Result<()> {
    for confirm in pending.drain(..) {
        let c = confirm.await?;
        anyhow::ensure!(
            c.is_ack(),
            "the broker did not confirm a published message ({c:?})"
        );
        if let Some(returned) = c.take_message() {
            anyhow::bail!(
                "the broker could not route a message (reply {}): is the queue declared?",
                returned.reply_code
            );
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl ChunkPublisher for Broker {
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> anyhow::Result<()> {
        self.publish_json(&self.topology.chunks, jobs).await
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
async fn declare_topology(
    conn: &Connection,
    t: &Topology,
    delivery_limit: u32,
    metrics: &Metrics,
) -> anyhow::Result<Vec<ArgumentMismatch>> {
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
                Err(e) => return Err(e).with_context(|| format!("cannot declare queue {name}")),
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
) -> anyhow::Result<Vec<ArgumentMismatch>> {
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
        let channel = conn.create_channel().await?;
        let passive = channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if passive.is_err() {
            return Err(anyhow::Error::new(e).context(format!("queue {name} refused")));
        }
        let _ = channel.close(200, ShortString::from("declared")).await;
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

/// A consumer of one queue; yields [`AmqpDelivery`]s.
pub struct Consumer {
    inner: lapin::Consumer,
    /// Kept alive for as long as the consumer: closing it would cancel consumption.
    channel: Channel,
}

impl Consumer {
    /// Cancels consumption by closing its channel; unacknowledged messages go back to
    /// the queue.
    pub async fn close(&self) {
        let _ = self
            .channel
            .close(200, ShortString::from("consumer stopped"))
            .await;
    }

    /// The next delivery, or `None` when the consumer was cancelled or the connection lost.
    pub async fn next(&mut self) -> Option<anyhow::Result<AmqpDelivery>> {
        self.inner.next().await.map(|r| {
            r.map(|d| AmqpDelivery { inner: d })
                .map_err(anyhow::Error::from)
        })
    }
}

/// One message received from RabbitMQ, settled with [`AmqpDelivery::settle`].
pub struct AmqpDelivery {
    inner: lapin::message::Delivery,
}

impl AmqpDelivery {
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// A string header of the message (`x-loansync-reason` on a dead letter, say).
    pub fn header(&self, name: &str) -> Option<String> {
        match self
            .inner
            .properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)?
        {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Acks, requeues, republishes (publish again to `source`, confirmed, then ack), or
    /// dead-letters (publish to `<prefix>.dead` with the reason, then ack). Each step
    /// gives up after the broker's confirm timeout; the message is then redelivered
    /// when the connection goes.
    pub async fn settle(
        &self,
        broker: &Broker,
        source: &str,
        d: Disposition,
    ) -> anyhow::Result<()> {
        let ack = || async {
            broker
                .bounded("acking", async {
                    self.inner.ack(BasicAckOptions::default()).await?;
                    Ok(())
                })
                .await
        };
        match d {
            Disposition::Ack => ack().await?,
            Disposition::Requeue => {
                broker
                    .bounded("requeueing", async {
                        self.inner
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await?;
                        Ok(())
                    })
                    .await?;
            }
            Disposition::Republish => {
                broker
                    .republish(source, self.body(), &self.inner.properties)
                    .await?;
                ack().await?;
            }
            Disposition::Replace(body) => {
                broker
                    .republish(source, &body, &self.inner.properties)
                    .await?;
                ack().await?;
            }
            Disposition::DeadLetter(reason) => {
                broker.dead_letter(self.body(), source, &reason).await?;
                ack().await?;
            }
        }
        Ok(())
    }
}

/// The queue layer's consumer of one RabbitMQ queue ([`Broker::consumer`]).
pub struct QueueConsumer {
    consumer: Consumer,
    broker: Broker,
    queue: String,
    requeue_pause: Duration,
}

impl std::fmt::Debug for QueueConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConsumer")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl QueueConsumer {
    /// The connection this consumer settles on (and publishes on).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

#[async_trait::async_trait]
impl super::Consumer for QueueConsumer {
    async fn next(&mut self) -> Option<anyhow::Result<Box<dyn super::Delivery>>> {
        Some(match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(Box::new(QueueDelivery {
                delivery,
                broker: self.broker.clone(),
                queue: self.queue.clone(),
                requeue_pause: self.requeue_pause,
            })),
            Some(Err(e)) => Err(e),
            // RabbitMQ's work never ends: a consumer that stops was cancelled or lost.
            None => Err(anyhow::anyhow!(
                "the broker cancelled the consumer of {}",
                self.queue
            )),
        })
    }

    async fn close(&mut self) {
        self.consumer.close().await;
    }
}

/// A message of a [`QueueConsumer`], settled on its connection.
struct QueueDelivery {
    delivery: AmqpDelivery,
    broker: Broker,
    queue: String,
    requeue_pause: Duration,
}

#[async_trait::async_trait]
impl super::Delivery for QueueDelivery {
    fn body(&self) -> &[u8] {
        self.delivery.body()
    }

    async fn settle(self: Box<Self>, disposition: Disposition) -> anyhow::Result<()> {
        if matches!(
            disposition,
            Disposition::Requeue | Disposition::Republish | Disposition::Replace(_)
        ) {
            tokio::time::sleep(self.requeue_pause).await;
        }
        self.delivery
            .settle(&self.broker, &self.queue, disposition)
            .await
    }
}

/// The first pause before reconnecting, doubled after each failed attempt up to
/// [`RECONNECT_MAX_DELAY`].
pub const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest pause between two connection attempts.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

/// Runs `consume` on a connection from `connect`, and again on a new one whenever the
/// connection is lost (broker restart, network), with exponential backoff (backon),
/// until `shutdown` is cancelled or `consume` ends without an error. While disconnected
/// the `consuming` flag is down and `health` says so, so that `/readyz` reports the
/// outage. Messages in flight on a lost connection are redelivered by the broker.
pub async fn with_reconnect<C, CF, F, Fut>(
    what: &str,
    consuming: &AtomicBool,
    health: &BrokerHealth,
    shutdown: CancellationToken,
    mut connect: C,
    mut consume: F,
) -> anyhow::Result<()>
where
    C: FnMut() -> CF,
    CF: std::future::Future<Output = anyhow::Result<Broker>>,
    F: FnMut(Broker, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use backon::Retryable;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(RECONNECT_FIRST_DELAY)
            .with_max_delay(RECONNECT_MAX_DELAY)
            .with_factor(2.0)
            .without_max_times();
        let connecting = (|| connect()).retry(backoff).notify(|e, delay| {
            consuming.store(false, Ordering::SeqCst);
            tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} cannot reach the broker");
        });
        let broker = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            broker = connecting => broker?,
        };
        let ended = consume(broker, shutdown.clone()).await;
        health.set_connected(false);
        consuming.store(false, Ordering::SeqCst);
        match ended {
            Ok(()) => return Ok(()),
            // A wrong installation: reconnecting cannot help, stop.
            Err(e) if crate::failure::Failure::of(&e) == crate::failure::Failure::Fatal => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "{what} lost its broker connection: reconnecting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RECONNECT_FIRST_DELAY) => {}
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDelivery").finish_non_exhaustive()
    }
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
