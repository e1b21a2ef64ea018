//! Delegation: ask another agent over `agent.route.<other>` and wait for its answer
//! (see `crate::ask`). The delegated envelope carries the caller's `stream`, so while
//! the caller waits the user watching it sees the delegate's answer being written;
//! the caller's next step starts the shown text over with its own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nexo_api::envelope::MAX_DELEGATION_HOPS;
use nexo_api::validate::delegate_tool_name;
use nexo_api::{Envelope, ResourceKey};
use serde_json::{Value, json};

use super::{Tool, ToolContext, ToolError};
use crate::ask::ask;
use crate::broker::Broker;
use crate::llm::ToolDefinition;

/// Channel type of envelopes one agent sends another.
pub const DELEGATION_CHANNEL: &str = "agent";

/// What an `ask_<agent>` tool says it does (the served MCP tools say the same).
pub(crate) fn ask_description(agent: &str) -> String {
    format!("Ask the agent `{agent}` and get its answer. Send a self-contained message.")
}

/// The parameters of an `ask_<agent>` tool: the question, as `message`.
pub(crate) fn ask_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {"message": {"type": "string", "description": "What to ask"}},
        "required": ["message"]
    })
}

/// The `message` of an `ask_<agent>` call.
pub(crate) fn message_argument(arguments: &Value) -> Result<&str, ToolError> {
    arguments
        .get("message")
        .and_then(Value::as_str)
        .ok_or_else(|| ToolError::InvalidArguments("`message` (a string) is required".into()))
}

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
            description: ask_description(&self.target.name),
            parameters: ask_parameters(),
        }
    }

    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError> {
        let text = message_argument(&arguments)?;
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
        // The delegate's text streams to whoever watches the caller's: the caller
        // waits for it meanwhile, and usually relays it.
        request.stream = origin.stream.clone();
        ask(self.broker.as_ref(), &self.target, request, self.timeout)
            .await
            // A failed turn of the delegate is a tool error too, so the model does not
            // take the apology for an answer.
            .map_err(|e| ToolError::Failed(format!("agent `{}`: {e}", self.target)))
    }
}
