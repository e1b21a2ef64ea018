//! What the outbox drain publishes through: each broker sends a batch of stored
//! messages its own way (the local bus in order, NATS pipelined with de-duplication
//! ids). It lives with the brokers so that the queue depends on the broker, never the
//! other way round.

use async_trait::async_trait;

/// A message to publish, as the outbox stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: i64,
    pub subject: String,
    pub reply: Option<String>,
    pub payload: Vec<u8>,
    /// Unique per stored message; JetStream de-duplicates re-sends by it.
    pub msg_id: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The broker cannot take it now (unreachable, or its buffers are full); try
    /// again later, it is not the message's fault.
    Unavailable(String),
    /// The broker refused this message; it counts as a failed attempt.
    Rejected(String),
}

/// What became of a batch, by index into it. Messages in neither list were held back
/// because an earlier one on their subject failed; they stay in the outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    pub sent: Vec<usize>,
    pub failed: Vec<(usize, SendError)>,
}

/// Where the outbox drain publishes to.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Publishes `batch`, keeping the order of messages that share a subject: a
    /// message is not sent while an earlier one on its subject has failed.
    async fn send(&self, batch: &[Pending]) -> SendReport;
}
