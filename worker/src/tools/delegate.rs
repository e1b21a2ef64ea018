//! Delegation: ask another agent over `agent.route.<other>` and wait for its answer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::validate::delegate_tool_name;
use nexo_api::{Envelope, ResourceKey, subject};
use serde_json::{Value, json};

use super::{Tool, ToolContext, ToolError};
use crate::broker::Broker;
use crate::llm::ToolDefinition;

/// Channel type of envelopes one agent sends another.
pub const DELEGATION_CHANNEL: &str = "agent";

pub struct Delegate {
    target: ResourceKey,
    broker: Arc<dyn Broker>,
    timeout: Duration,
}

impl Delegate {
    pub fn new(target: ResourceKey, broker: Arc<dyn Broker>, timeout: Duration) -> Self {
        Self {
            target,
            broker,
            timeout,
        }
    }
}

#[async_trait]
impl Tool for Delegate {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: delegate_tool_name(&self.target.name),
            description: format!(
                "Ask the agent `{}` and get its answer. Send a self-contained message.",
                self.target.name
            ),
            parameters: json!({
                "type": "object",
                "properties": {"message": {"type": "string", "description": "What to ask"}},
                "required": ["message"]
            }),
        }
    }

    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError> {
        let text = arguments
            .get("message")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ToolError::InvalidArguments("`message` (a string) is required".into())
            })?;
        let origin = context.message;
        let mut request = Envelope::inbound(
            DELEGATION_CHANNEL,
            context.agent.name.clone(),
            // The delegate keeps one session per conversation of the caller.
            format!("{}:{}", context.agent, origin.conversation),
            context.agent.to_string(),
            text,
        );
        request.correlation_id = Some(origin.id);
        let reply = self
            .broker
            .request(
                &subject::agent_route(&self.target),
                Bytes::from(request.to_json()),
                self.timeout,
            )
            .await
            .map_err(|e| ToolError::Failed(format!("agent `{}`: {e}", self.target)))?;
        let answer = Envelope::from_json(&reply.payload).map_err(|e| {
            ToolError::Failed(format!(
                "agent `{}` sent an unreadable reply: {e}",
                self.target
            ))
        })?;
        Ok(answer.text)
    }
}
