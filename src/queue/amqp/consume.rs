//! Consuming with `basic_qos`, and settling each delivery with a [`Disposition`].
//!
//! Two layers: a [`RawConsumer`] yields [`RawDelivery`]s, lapin's messages, which the
//! caller settles naming the broker and the queue they came from (tools and tests that
//! read a queue, the dead-letter queue say); a [`BrokerConsumer`] is the queue layer's
//! [`crate::queue::Consumer`] over one, whose deliveries know their connection and queue
//! and pause before a message goes back, as the planner's and workers' loops need.

use super::connection::Broker;
use crate::queue::{Disposition, QueueError};
use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::time::Duration;

impl Broker {
    /// Starts consuming `queue` with at most `prefetch` unacknowledged messages, on a
    /// channel of its own.
    pub async fn raw_consumer(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<RawConsumer, QueueError> {
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
        Ok(RawConsumer {
            inner: consumer,
            channel,
        })
    }

    /// A [`crate::queue::Consumer`] of `queue` (at most `prefetch` unsettled messages) whose
    /// deliveries settle on this connection; requeued and republished messages go back
    /// after `requeue_pause`.
    pub async fn consumer(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
        requeue_pause: Duration,
    ) -> Result<BrokerConsumer, QueueError> {
        Ok(BrokerConsumer {
            raw: self.raw_consumer(queue, prefetch, tag).await?,
            broker: self.clone(),
            queue: queue.to_string(),
            requeue_pause,
        })
    }
}

/// A lapin consumer of one queue on its channel ([`Broker::raw_consumer`]); yields
/// [`RawDelivery`]s.
pub struct RawConsumer {
    inner: lapin::Consumer,
    /// Kept alive for as long as the consumer: closing it would cancel consumption.
    channel: Channel,
}

impl RawConsumer {
    /// Cancels consumption by closing its channel; unacknowledged messages go back to
    /// the queue.
    pub async fn close(&self) {
        let _ = self
            .channel
            .close(200, ShortString::from("consumer stopped"))
            .await;
    }

    /// The next delivery, or `None` when the consumer was cancelled or the connection lost.
    pub async fn next(&mut self) -> Option<Result<RawDelivery, QueueError>> {
        self.inner.next().await.map(|r| {
            r.map(|d| RawDelivery { inner: d })
                .map_err(QueueError::from)
        })
    }
}

/// One message received from RabbitMQ, settled with [`RawDelivery::settle`] on the
/// connection it came from.
pub struct RawDelivery {
    inner: lapin::message::Delivery,
}

impl RawDelivery {
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// How often RabbitMQ delivered this message before (`x-delivery-count`, which a
    /// quorum queue sets on a message returned to it; absent on a first delivery).
    pub fn returned(&self) -> u32 {
        let count = self
            .inner
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        match count {
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
            Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
            Some(AMQPValue::ShortInt(n)) => u32::try_from(n).unwrap_or(0),
            Some(AMQPValue::LongUInt(n)) => n,
            Some(AMQPValue::ShortUInt(n)) => u32::from(n),
            Some(AMQPValue::ShortShortInt(n)) => u32::try_from(n).unwrap_or(0),
            Some(AMQPValue::ShortShortUInt(n)) => u32::from(n),
            _ => 0,
        }
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

    /// Acks, requeues, republishes (publish again to `source`, confirmed, then ack),
    /// replaces (the same with the new body), or dead-letters (publish to
    /// `<prefix>.dead` with the reason, confirmed, then ack). Each step gives up after
    /// the broker's confirm timeout; the message, not acked, is then redelivered when
    /// its channel closes.
    pub async fn settle(
        &self,
        broker: &Broker,
        source: &str,
        d: Disposition,
    ) -> Result<(), QueueError> {
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

/// The queue layer's consumer of one RabbitMQ queue ([`Broker::consumer`]), as
/// [`crate::queue::memory::MemoryConsumer`] is of the in-memory queue.
pub struct BrokerConsumer {
    raw: RawConsumer,
    broker: Broker,
    queue: String,
    requeue_pause: Duration,
}

impl std::fmt::Debug for BrokerConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConsumer")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl crate::queue::Consumer for BrokerConsumer {
    async fn next(&mut self) -> Option<Result<Box<dyn crate::queue::Delivery>, QueueError>> {
        Some(match self.raw.next().await {
            Some(Ok(raw)) => Ok(Box::new(BrokerDelivery {
                raw,
                broker: self.broker.clone(),
                queue: self.queue.clone(),
                requeue_pause: self.requeue_pause,
            })),
            Some(Err(e)) => Err(e),
            // RabbitMQ's work never ends: a consumer that stops was cancelled or lost.
            None => Err(QueueError::ConsumerLost(self.queue.clone())),
        })
    }

    async fn close(&mut self) {
        self.raw.close().await;
    }
}

/// A message of a [`BrokerConsumer`], settled on its connection.
struct BrokerDelivery {
    raw: RawDelivery,
    broker: Broker,
    queue: String,
    requeue_pause: Duration,
}

#[async_trait::async_trait]
impl crate::queue::Delivery for BrokerDelivery {
    fn body(&self) -> &[u8] {
        self.raw.body()
    }

    fn returned(&self) -> u32 {
        self.raw.returned()
    }

    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), QueueError> {
        if matches!(
            disposition,
            Disposition::Requeue | Disposition::Republish | Disposition::Replace(_)
        ) {
            tokio::time::sleep(self.requeue_pause).await;
        }
        self.raw
            .settle(&self.broker, &self.queue, disposition)
            .await
    }
}

impl std::fmt::Debug for RawConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConsumer").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RawDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDelivery").finish_non_exhaustive()
    }
}
