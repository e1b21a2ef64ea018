//! The durable consumer of a [`Delivery::Durable`](super::Delivery::Durable) channel
//! instance: one worker of the pool takes each answer from `plugin.delivery.…` and
//! hands it to the platform, which is tried again (as the platform asks: a rate
//! limit's wait) until it takes it, or dead-lettered when it refuses it for good.
//! Every redelivery counts as an attempt (`delivery.maxAttempts`), so a channel waits
//! out a short rate limit inside [`Channel::deliver`] rather than asking for a retry.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nexo_api::Envelope;
use tracing::Instrument;

use super::duplicates::DeliveredReplies;
use super::{Channel, DeliverError};
use crate::broker::Message;
use crate::queue::{Handler, Outcome};
use crate::traces;

/// Hands each delivered answer to `channel`, once per answered message on this worker
/// (see [`super::duplicates`]; a second copy taken by another worker is sent again).
pub struct DeliverAnswers {
    channel: Arc<dyn Channel>,
    delivered: Mutex<DeliveredReplies>,
}

impl DeliverAnswers {
    pub fn new(channel: Arc<dyn Channel>) -> Self {
        Self {
            channel,
            delivered: Mutex::new(DeliveredReplies::new()),
        }
    }
}

#[async_trait]
impl Handler for DeliverAnswers {
    async fn handle(&self, message: &Message, _attempt: u32) -> Outcome {
        let reply = match Envelope::from_json(&message.payload) {
            Ok(reply) => reply,
            Err(err) => {
                return Outcome::Nack {
                    requeue: false,
                    reason: format!("malformed answer: {err}"),
                };
            }
        };
        let context = self.channel.context();
        let labels = [context.kind.as_str(), context.key.name.as_str()];
        let answers = reply.correlation_id;
        if let Some(answers) = answers
            && self.delivered.lock().unwrap().contains(&answers)
        {
            context
                .metrics
                .duplicate_replies
                .with_label_values(&labels)
                .inc();
            return Outcome::Ack;
        }
        let span = traces::context::process(&message.subject, &reply);
        match self.channel.deliver(reply).instrument(span).await {
            Ok(()) => {
                if let Some(answers) = answers {
                    self.delivered.lock().unwrap().first_delivery(answers);
                }
                context
                    .metrics
                    .messages_out
                    .with_label_values(&labels)
                    .inc();
                Outcome::Ack
            }
            Err(DeliverError::Retry { after, reason }) => Outcome::Retry { after, reason },
            Err(DeliverError::Failed { reason }) => Outcome::Nack {
                requeue: false,
                reason,
            },
        }
    }
}
