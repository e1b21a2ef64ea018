//! One turn: ask the model, run the tools it calls, feed the results back, until it
//! answers in text or the step limit is reached. No IO of its own beyond the model
//! and the tools it is given.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexo_api::{Envelope, ErrorKind, ReplyError, ResourceKey};

use crate::llm::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError};
use crate::memory::MemoryError;
use crate::tools::{ToolContext, ToolSet};

/// Hooks for what happens during a turn (metrics, events).
#[async_trait]
pub trait TurnObserver: Send + Sync {
    async fn model_called(&self, result: Result<&ChatResponse, &LlmError>, took: Duration);
    /// `known`: the turn's tools had one called `tool` (the model may name any).
    async fn tool_called(&self, tool: &str, known: bool, ok: bool);
}

/// Where the answer's text goes while the model writes it, told when each model call
/// (step) begins: the text of a step that ends in tool calls is void, and the next
/// step's text replaces it.
pub trait StepDeltas: Deltas {
    fn step(&self, step: u32);
}

pub struct Turn<'a> {
    pub agent: &'a ResourceKey,
    pub system_prompt: &'a str,
    pub history: Vec<ChatMessage>,
    pub message: &'a Envelope,
    pub max_steps: u32,
    pub deltas: &'a dyn StepDeltas,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    pub text: String,
    /// Model calls made.
    pub steps: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Model(#[from] LlmError),
    #[error("the model was still calling tools after {0} steps")]
    StepLimit(u32),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Refused before any model call: the agent reached `limit` of its budget.
    #[error("the agent's daily budget is spent ({limit} reached)")]
    BudgetExceeded { limit: String },
}

impl TurnError {
    /// [`Self::public_message`] with its kind, for the reply envelope.
    pub fn reply_error(&self) -> ReplyError {
        let kind = match self {
            TurnError::Model(err) if err.is_timeout() => ErrorKind::Timeout,
            TurnError::Model(_) => ErrorKind::Model,
            TurnError::StepLimit(_) => ErrorKind::StepLimit,
            TurnError::Memory(_) => ErrorKind::Memory,
            TurnError::BudgetExceeded { .. } => ErrorKind::Budget,
        };
        ReplyError {
            kind,
            message: self.public_message(),
        }
    }

    /// What the person talking to the agent is told. Nothing the model provider sent
    /// (its error body may hold request details, account names or key prefixes) and no
    /// address or credential name of ours: those go to the log and the `turnFailed`
    /// event, which carry the full error.
    pub fn public_message(&self) -> String {
        match self {
            TurnError::Model(err) if err.is_timeout() => self.to_string(),
            TurnError::StepLimit(_) => self.to_string(),
            TurnError::Model(_) => "the model service failed".to_owned(),
            // The file name and SQLite's message stay in the log.
            TurnError::Memory(MemoryError::Full { .. }) => {
                "the agent's memory is full, so this answer could not be kept".to_owned()
            }
            TurnError::Memory(_) => "the agent's memory failed".to_owned(),
            TurnError::BudgetExceeded { .. } => super::BUDGET_MESSAGE.to_owned(),
        }
    }
}

pub async fn run(
    turn: Turn<'_>,
    model: &dyn ChatModel,
    tools: &ToolSet,
    observer: &dyn TurnObserver,
) -> Result<TurnOutcome, TurnError> {
    let tools = &tools.for_turn();
    let mut messages = turn.history;
    messages.push(ChatMessage::User(turn.message.text.clone()));
    let mut request = ChatRequest {
        system: turn.system_prompt.to_owned(),
        messages,
        tools: tools.definitions(),
    };
    let context = ToolContext {
        agent: turn.agent,
        message: turn.message,
    };
    for step in 1..=turn.max_steps {
        let started = Instant::now();
        turn.deltas.step(step);
        let result = model.complete(&request, turn.deltas).await;
        observer
            .model_called(result.as_ref(), started.elapsed())
            .await;
        let response = result?;
        if response.tool_calls.is_empty() {
            return Ok(TurnOutcome {
                text: response.text,
                steps: step,
            });
        }
        request.messages.push(ChatMessage::Assistant {
            text: response.text,
            tool_calls: response.tool_calls.clone(),
        });
        for call in response.tool_calls {
            let span = crate::traces::genai::tool_span(&call.name, &call.id);
            let result = tracing::Instrument::instrument(
                tools.call(&call.name, call.arguments, &context),
                span.clone(),
            )
            .await;
            if result.is_err() {
                crate::traces::genai::failed(&span, "tool_error");
            }
            observer
                .tool_called(&call.name, tools.contains(&call.name), result.is_ok())
                .await;
            // A failing tool is reported to the model, which may recover from it.
            let content = result.unwrap_or_else(|e| format!("error: {e}"));
            request.messages.push(ChatMessage::ToolResult {
                call_id: call.id,
                content,
            });
        }
    }
    Err(TurnError::StepLimit(turn.max_steps))
}
