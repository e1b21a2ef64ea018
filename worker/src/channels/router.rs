//! Moves a channel's inbound messages to the agent that answers them.

use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::{ResourceKey, subject};

use crate::broker::{Broker, Message};
use crate::queue::{Handler, Outcome};

/// Route of one channel instance: every inbound message goes to `agent`. Runs as a
/// durable consumer, so with several workers each message is routed once.
pub struct Route {
    pub channel_type: &'static str,
    pub instance: ResourceKey,
    pub agent: ResourceKey,
    pub broker: Arc<dyn Broker>,
}

impl Route {
    pub fn inbound(&self) -> String {
        subject::inbound(self.channel_type, &self.instance)
    }

    pub fn consumer(&self) -> String {
        subject::inbound_consumer(self.channel_type, &self.instance)
    }
}

#[async_trait]
impl Handler for Route {
    async fn handle(&self, message: &Message, _attempt: u32) -> Outcome {
        let target = subject::agent_route(&self.agent);
        match self.broker.publish(&target, message.payload.clone()).await {
            Ok(()) => Outcome::Ack,
            Err(err) => Outcome::Retry {
                after: std::time::Duration::from_millis(200),
                reason: format!("cannot route to {target}: {err}"),
            },
        }
    }
}
