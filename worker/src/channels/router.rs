//! Moves a channel's inbound messages to the agent that answers them.

use std::sync::Arc;

use bytes::Bytes;
use nexo_api::{ResourceKey, subject};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Subscription};

/// Route of one channel instance: every inbound message goes to `agent`.
pub struct Route {
    pub inbound: String,
    pub agent: ResourceKey,
}

impl Route {
    /// Subscribes in a queue group so that, with several workers, each inbound
    /// message is routed once.
    pub async fn subscribe(&self, broker: &dyn Broker) -> Result<Subscription, BrokerError> {
        broker
            .queue_subscribe(&self.inbound, &format!("router.{}", self.inbound))
            .await
    }

    pub async fn run(
        self,
        broker: Arc<dyn Broker>,
        mut inbound: Subscription,
        cancel: CancellationToken,
    ) {
        let target = subject::agent_route(&self.agent);
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => return,
                message = inbound.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let payload: Bytes = message.payload;
            if let Err(err) = broker.publish(&target, payload).await {
                tracing::error!(subject = %target, error = %err, "could not route an inbound message");
            }
        }
    }
}
