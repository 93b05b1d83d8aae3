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
//!
//! One concern a file; the types are used from here (`queue::amqp::Broker`):
//! * `connection`: [`Broker`], connecting (TLS, the connection's events, the confirming
//!   publish channel), the confirm timeout on every wait, and [`with_reconnect`].
//! * `topology`: declaring the queues and adopting the arguments of existing ones
//!   ([`ArgumentMismatch`], [`broker_delivery_limit`]), their depth, deleting them.
//! * `publish`: publishing with confirms: chunk jobs, republished and dead-lettered messages.
//! * `consume`: [`BrokerConsumer`], the [`Consumer`](super::Consumer) of a queue, over
//!   a [`RawConsumer`] whose [`RawDelivery`]s settle with a
//!   [`Disposition`](super::Disposition).
//! * `health`: [`BrokerHealth`], what `/readyz` and the metrics know of the connection.

mod connection;
mod consume;
mod health;
mod publish;
mod topology;

pub use connection::{
    Broker, BrokerOptions, RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY, with_reconnect,
};
pub use consume::{BrokerConsumer, RawConsumer, RawDelivery};
pub use health::BrokerHealth;
pub use topology::{ArgumentMismatch, broker_delivery_limit};
