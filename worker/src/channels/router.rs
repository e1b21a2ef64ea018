//! Moves a channel's inbound messages to the agent that answers them.

use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::{ResourceKey, subject};
use tracing::Instrument;

use crate::broker::{Broker, Message};
use crate::queue::{Handler, Outcome};
use crate::traces;

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
        let span = traces::context::process_payload(&message.subject, &message.payload);
        // The agent's turn becomes a child of this span, not of the channel's.
        let payload = traces::context::relay(&span, &message.payload);
        match self.broker.publish(&target, payload).instrument(span).await {
            Ok(()) => Outcome::Ack,
            Err(err) => Outcome::Retry {
                after: std::time::Duration::from_millis(200),
                reason: format!("cannot route to {target}: {err}"),
            },
        }
    }
}
