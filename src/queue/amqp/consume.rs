//! Consuming with `basic_qos`, and settling each delivery with a [`Disposition`].

use super::connection::Broker;
use crate::queue::Disposition;
use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::time::Duration;

impl Broker {
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

    /// A [`crate::queue::Consumer`] of `queue` (at most `prefetch` unsettled messages) whose
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
impl crate::queue::Consumer for QueueConsumer {
    async fn next(&mut self) -> Option<anyhow::Result<Box<dyn crate::queue::Delivery>>> {
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
impl crate::queue::Delivery for QueueDelivery {
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
