//! RabbitMQ: topology, publisher confirms, consumers with `basic_qos` and ack after commit.
//!
//! Separate channels publish and consume (as lapin's examples do). Queues are durable
//! quorum queues with a delivery limit, dead-lettering to `<prefix>.dead`; on a broker
//! without quorum queues they fall back to classic durable queues.

use super::{ChunkPublisher, Disposition, Topology};
use crate::domain::ChunkJob;
use anyhow::Context;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A connection to RabbitMQ with the topology declared and a confirming publish channel.
#[derive(Clone)]
pub struct Broker {
    conn: std::sync::Arc<Connection>,
    /// Confirm-mode channel used only for publishing.
    publish: Channel,
    pub topology: Topology,
}

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
        let topology = Topology::new(prefix);
        declare_topology(&conn, &topology, delivery_limit).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            conn: std::sync::Arc::new(conn),
            publish,
            topology,
        })
    }

    /// True while the connection is usable (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Publishes persistent JSON messages to `queue` and waits for every confirm.
    pub async fn publish_json<T: serde::Serialize + Sync>(
        &self,
        queue: &str,
        messages: &[T],
    ) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(messages.len().min(1024));
        for m in messages {
            pending.push(self.start_publish(queue, &serde_json::to_vec(m)?).await?);
            if pending.len() >= 1024 {
                await_confirms(&mut pending).await?;
            }
        }
        await_confirms(&mut pending).await
    }

    /// Publishes one message as it is (any bytes) and waits for its confirm.
    pub async fn publish_bytes(&self, queue: &str, body: &[u8]) -> anyhow::Result<()> {
        let confirm = self.start_publish(queue, body).await?;
        await_confirms(&mut vec![confirm]).await
    }

    async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
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
                properties(),
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

    /// Messages waiting in `queue` (not counting unacknowledged ones).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let channel = self.conn.create_channel().await?;
        let q = channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(q.message_count())
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

async fn declare_topology(
    conn: &Connection,
    t: &Topology,
    delivery_limit: u32,
) -> anyhow::Result<()> {
    for kind in ["quorum", "classic"] {
        let channel = conn.create_channel().await?;
        let mut ok = true;
        for (name, dead) in [
            (&t.dead, None),
            (&t.plan, Some((t.dead.as_str(), delivery_limit))),
            (&t.chunks, Some((t.dead.as_str(), delivery_limit))),
        ] {
            let res = channel
                .queue_declare(
                    ShortString::from(name.as_str()),
                    QueueDeclareOptions::durable(),
                    queue_args(kind, dead),
                )
                .await;
            if let Err(e) = res {
                if kind == "classic" {
                    return Err(e).with_context(|| format!("cannot declare queue {name}"));
                }
                tracing::warn!(queue = %name, error = %e, "quorum queue refused; falling back to classic queues");
                ok = false;
                break;
            }
        }
        if ok {
            let _ = channel.close(200, ShortString::from("declared")).await;
            return Ok(());
        }
    }
    Ok(())
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

    /// How many times a quorum queue delivered this message before (its `x-delivery-count`).
    pub fn delivery_count(&self) -> u32 {
        self.inner
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(n).ok(),
                AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
                AMQPValue::LongUInt(n) => Some(n),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Acks, requeues, or dead-letters (publish to `<prefix>.dead` with the reason, then ack).
    pub async fn settle(
        &self,
        broker: &Broker,
        source: &str,
        d: Disposition,
    ) -> anyhow::Result<()> {
        match d {
            Disposition::Ack => {
                self.inner.ack(BasicAckOptions::default()).await?;
            }
            Disposition::Requeue => {
                self.inner
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
            Disposition::DeadLetter(reason) => {
                broker.dead_letter(self.body(), source, &reason).await?;
                self.inner.ack(BasicAckOptions::default()).await?;
            }
        }
        Ok(())
    }
}
