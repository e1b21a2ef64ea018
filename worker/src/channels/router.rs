//! Moves a channel's inbound messages to the agent that answers them.

use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::spec::ChannelSpec;
use nexo_api::{ResourceKey, subject};
use serde::Deserialize;
use tracing::Instrument;

use crate::broker::{Broker, Message};
use crate::queue::{Handler, Outcome};
use crate::traces;

/// Route of one channel instance: every inbound message goes to the agent its
/// channel's rules choose (`ChannelSpec::agent_for`: the first matching route, else
/// the default agent). Runs as a durable consumer, so with several workers each
/// message is routed once.
pub struct Route {
    pub channel_type: &'static str,
    pub instance: ResourceKey,
    pub spec: ChannelSpec,
    pub broker: Arc<dyn Broker>,
}

/// What routing reads of an inbound envelope; the rest travels as it came.
#[derive(Deserialize)]
struct Addressed {
    #[serde(default)]
    conversation: String,
    #[serde(default)]
    sender: String,
    #[serde(default)]
    text: String,
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
        // A message that does not parse goes to the default agent, whose consumer
        // dead-letters it with the reason.
        let agent = match serde_json::from_slice::<Addressed>(&message.payload) {
            Ok(m) => self.spec.agent_for(&m.conversation, &m.sender, &m.text),
            Err(_) => &self.spec.default_agent,
        };
        let target = subject::agent_route(&ResourceKey::new(&self.instance.namespace, agent));
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
