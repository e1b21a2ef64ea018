//! Delegation: ask another agent over `agent.route.<other>` and wait for its answer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::envelope::MAX_DELEGATION_HOPS;
use nexo_api::validate::delegate_tool_name;
use nexo_api::{Envelope, ResourceKey, subject};
use serde_json::{Value, json};

use super::{Tool, ToolContext, ToolError};
use crate::broker::{Broker, new_inbox};
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
        if origin.hops >= MAX_DELEGATION_HOPS {
            // A loop across catalog revisions, or a chain too long to be intended: the
            // model is told, and answers without this delegate.
            return Err(ToolError::Failed(format!(
                "cannot ask agent `{}`: this message was already handed on {} times (at most {MAX_DELEGATION_HOPS})",
                self.target, origin.hops
            )));
        }
        let mut request = Envelope::inbound(
            DELEGATION_CHANNEL,
            context.agent.name.clone(),
            // The delegate keeps one session per conversation of the caller.
            format!("{}:{}", context.agent, origin.conversation),
            context.agent.to_string(),
            text,
        );
        request.correlation_id = Some(origin.id);
        request.hops = origin.hops + 1;
        // The answer comes to a private inbox named in the envelope, not through a
        // broker-level request: the route subject is durable, and a stored message
        // keeps no reply subject.
        let inbox = new_inbox();
        request.reply_to = Some(inbox.clone());
        let failed = |e: String| ToolError::Failed(format!("agent `{}`: {e}", self.target));
        let mut answers = self
            .broker
            .subscribe(&inbox)
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.broker
            .publish(
                &subject::agent_route(&self.target),
                Bytes::from(request.to_json()),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        let answer = tokio::time::timeout(self.timeout, async {
            while let Some(message) = answers.next().await {
                match Envelope::from_json(&message.payload) {
                    Ok(answer) if answer.correlation_id == Some(request.id) => return Ok(answer),
                    Ok(_) => continue,
                    Err(e) => return Err(failed(format!("unreadable reply: {e}"))),
                }
            }
            Err(failed("reply inbox closed".to_owned()))
        })
        .await
        .map_err(|_| failed(format!("no answer within {} s", self.timeout.as_secs())))??;
        match answer.error {
            // The delegate's turn failed: a tool error, so the model does not take the
            // apology for an answer.
            Some(error) => Err(failed(error.message)),
            None => Ok(answer.text),
        }
    }
}
