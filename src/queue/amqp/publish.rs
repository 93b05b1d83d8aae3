//! Publishing with publisher confirms: chunk jobs, republished and dead-lettered messages.
//!
//! Every publish is mandatory and waits for its confirm through [`confirmed`]: taken
//! (acked) and routed to a queue (a mandatory publish that no queue takes comes back,
//! returned), or an error.

use super::connection::Broker;
use crate::domain::ChunkJob;
use crate::queue::{ChunkPublisher, QueueError};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

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
    /// Publishes persistent JSON messages to `queue` and waits for every confirm.
    ///
    /// Up to `PUBLISHES_IN_FLIGHT` publishes are handed to the connection at once, in
    /// order. lapin's `basic_publish` returns once the connection's I/O thread has
    /// written the message; awaited one by one, every message cost two wake-ups across
    /// threads and a write of its own, and the planner's publishing of dataset M's 6,664
    /// chunk jobs slowed down most when the workers took the CPU. Their confirms are
    /// awaited 1,024 at a time.
    pub async fn publish_json<T: serde::Serialize + Sync>(
        &self,
        queue: &str,
        messages: &[T],
    ) -> Result<(), QueueError> {
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
    pub async fn publish_bytes(&self, queue: &str, body: &[u8]) -> Result<(), QueueError> {
        self.publish_one("publishing", queue, body, properties())
            .await
    }

    /// Publishes `body` to `queue` in a received message's place: with its headers, less
    /// those the broker adds on delivery, plus `x-loansync-republished` counting how
    /// often; and waits for the confirm.
    pub async fn republish(
        &self,
        queue: &str,
        body: &[u8],
        received: &BasicProperties,
    ) -> Result<(), QueueError> {
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
        self.publish_one(
            "republishing",
            queue,
            body,
            properties().with_headers(headers),
        )
        .await
    }

    /// Publishes one message and waits for its confirm, within the confirm timeout.
    async fn publish_one(
        &self,
        what: &str,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), QueueError> {
        self.bounded(what, async {
            confirmed(self.start_publish(queue, body, props).await?).await
        })
        .await
    }

    async fn start_publish_owned(
        &self,
        queue: &str,
        body: Vec<u8>,
    ) -> Result<lapin::PublisherConfirm, QueueError> {
        self.start_publish(queue, &body, properties()).await
    }

    async fn start_publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, QueueError> {
        Ok(self
            .publish_channel
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
    pub async fn dead_letter(
        &self,
        body: &[u8],
        source: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-loansync-reason"),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            ShortString::from("x-loansync-source"),
            AMQPValue::LongString(LongString::from(source)),
        );
        self.publish_one(
            "dead-lettering",
            &self.topology.dead,
            body,
            properties().with_headers(headers),
        )
        .await
    }
}

/// How many publishes [`Broker::publish_json`] hands to the connection at once.
const PUBLISHES_IN_FLIGHT: usize = 128;

/// Waits for the confirms of `pending`, in order (it is left empty).
async fn await_confirms(pending: &mut Vec<lapin::PublisherConfirm>) -> Result<(), QueueError> {
    for confirm in pending.drain(..) {
        confirmed(confirm).await?;
    }
    Ok(())
}

/// Waits for a publish's confirm: an error unless the broker took the message and a
/// queue did (a mandatory publish that no queue takes is returned, then acked).
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<(), QueueError> {
    let c = confirm.await?;
    if !c.is_ack() {
        return Err(QueueError::NotConfirmed(format!(
            "the broker did not confirm a published message ({c:?})"
        )));
    }
    if let Some(returned) = c.take_message() {
        return Err(QueueError::NotConfirmed(format!(
            "the broker could not route a message (reply {}): is the queue declared?",
            returned.reply_code
        )));
    }
    Ok(())
}

#[async_trait::async_trait]
impl ChunkPublisher for Broker {
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> Result<(), QueueError> {
        self.publish_json(&self.topology.chunks, jobs).await
    }
}
