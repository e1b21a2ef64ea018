//! Durable work: messages on durable subjects are kept until a consumer acknowledges
//! them. On NATS this is a JetStream pull consumer; in process, a queue subscription
//! that redelivers what is nacked.

use std::time::Duration;

use async_trait::async_trait;

use super::{BrokerError, Message};

/// One delivery of a durable message, to be settled exactly once.
pub struct Delivery {
    pub message: Message,
    /// 1 for the first delivery, counted by the broker across workers.
    pub attempt: u32,
    pub acker: Box<dyn Acker>,
}

/// Settles a delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Handled: never deliver again.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Not handled: deliver again, after `delay` if given.
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BrokerError>;
    /// Never deliver again, although it was not handled (it went to the DLQ).
    async fn term(&self) -> Result<(), BrokerError>;
    /// Still working on it: do not redeliver yet.
    async fn in_progress(&self) -> Result<(), BrokerError>;
}

/// A stream of deliveries for one durable consumer.
#[async_trait]
pub trait WorkSource: Send {
    /// Waits for the next delivery. Called only when the caller can take the work
    /// (it holds a concurrency permit), so the backlog stays in the broker.
    async fn next(&mut self) -> Result<Delivery, BrokerError>;
}

/// Settings of a durable consumer.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeOptions {
    /// Without an acknowledgement (or progress) for this long, a delivery is sent again.
    pub ack_wait: Duration,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
        }
    }
}
