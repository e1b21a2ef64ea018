//! The memory tools the model may call: `memory_remember`, `memory_search`,
//! `memory_forget`. They act for the sender of the message being answered: what is
//! remembered belongs to that sender (so their "forget me" removes it), a search sees
//! that sender's memories and the agent's own, and only the sender's can be forgotten.

use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::spec::MEMORY_TOOLS;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Tool, ToolContext, ToolError};
use crate::llm::ToolDefinition;
use crate::memory::{AgentMemory, NewMemory, owners};

/// Results `memory_search` returns at most.
const MAX_SEARCH_RESULTS: usize = 20;

/// The three memory tools over `memory`.
pub fn memory_tools(memory: Arc<AgentMemory>) -> Vec<Arc<dyn Tool>> {
    vec![
        Arc::new(Remember(memory.clone())),
        Arc::new(Search(memory.clone())),
        Arc::new(Forget(memory)),
    ]
}

fn arguments<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, ToolError> {
    serde_json::from_value(value).map_err(|e| ToolError::InvalidArguments(e.to_string()))
}

fn failed(err: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(err.to_string())
}

struct Remember(Arc<AgentMemory>);

#[derive(Deserialize)]
struct RememberArgs {
    text: String,
}

#[async_trait]
impl Tool for Remember {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: MEMORY_TOOLS[0].to_owned(),
            description:
                "Remember a fact about the user or the conversation for later conversations."
                    .to_owned(),
            parameters: json!({
                "type": "object",
                "properties": {"text": {"type": "string", "description": "The fact, as a short self-contained sentence."}},
                "required": ["text"]
            }),
        }
    }

    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: RememberArgs = self::arguments(arguments)?;
        if args.text.trim().is_empty() {
            return Err(ToolError::InvalidArguments("`text` is empty".to_owned()));
        }
        let message = context.message;
        let mut memory = NewMemory::fact(args.text).from_sender(message.sender.clone());
        memory.conversation = Some(message.conversation.clone());
        memory.source_id = Some(message.id.to_string());
        let id = self.0.remember(memory).await.map_err(failed)?;
        Ok(format!("remembered as memory {id}"))
    }
}

struct Search(Arc<AgentMemory>);

#[derive(Deserialize)]
struct SearchArgs {
    query: String,
    #[serde(default)]
    k: Option<usize>,
}

#[async_trait]
impl Tool for Search {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: MEMORY_TOOLS[1].to_owned(),
            description: "Search long-term memory; returns matching memories with their ids."
                .to_owned(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_RESULTS}
                },
                "required": ["query"]
            }),
        }
    }

    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: SearchArgs = self::arguments(arguments)?;
        let recall = &self.0.spec().long_term.recall;
        let k = args
            .k
            .unwrap_or(recall.k as usize)
            .clamp(1, MAX_SEARCH_RESULTS);
        let hits = self
            .0
            .search(
                &args.query,
                recall.mode,
                k,
                Some(owners(&context.message.sender)),
            )
            .await
            .map_err(failed)?;
        if hits.is_empty() {
            return Ok("no memories match".to_owned());
        }
        Ok(hits
            .iter()
            .map(|h| format!("[{}] {}", h.item.id, h.item.memory.text))
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

struct Forget(Arc<AgentMemory>);

#[derive(Deserialize)]
struct ForgetArgs {
    id: i64,
}

#[async_trait]
impl Tool for Forget {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: MEMORY_TOOLS[2].to_owned(),
            description: "Forget one memory by the id memory_search showed.".to_owned(),
            parameters: json!({
                "type": "object",
                "properties": {"id": {"type": "integer"}},
                "required": ["id"]
            }),
        }
    }

    async fn call(&self, arguments: Value, context: &ToolContext<'_>) -> Result<String, ToolError> {
        let args: ForgetArgs = self::arguments(arguments)?;
        // Only the sender's own memories: a model talked into it must not erase what
        // other people told the agent, nor the agent's own facts.
        let forgotten = self
            .0
            .forget_own(args.id, &context.message.sender)
            .await
            .map_err(failed)?;
        if !forgotten {
            return Err(ToolError::Failed(format!(
                "no memory {} of this user",
                args.id
            )));
        }
        Ok(format!("forgot memory {}", args.id))
    }
}
