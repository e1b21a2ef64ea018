//! LLM providers behind one trait. A turn speaks [`ChatRequest`] / [`ChatResponse`];
//! each provider maps them onto its wire format. The HTTP providers always stream
//! (server-sent events, read in `sse`), so the answer's text reaches [`Deltas`] as
//! it is generated.

pub mod anthropic;
pub mod openai;
pub mod scripted;
mod sse;
mod traced;

pub use sse::{MAX_ANSWER_BYTES, MAX_EVENT_BYTES, StreamError};

use crate::json_http::HttpError;
use crate::secrets::Secrets;
use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::spec::{ModelProvider, ModelSpec};
use serde_json::Value;

pub(crate) use traced::Traced;

/// What the model is asked: instructions, the conversation so far and the tools it
/// may call.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub system: String,
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolDefinition>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatMessage {
    User(String),
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    ToolResult {
        call_id: String,
        content: String,
    },
}

/// The model asking to run a tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

/// A tool as the model sees it: name, description and JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDefinition {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    /// Why the model stopped, in the provider's words (`stop`, `end_turn`,
    /// `tool_calls`, `max_tokens`, …), when it said.
    pub finish_reason: Option<String>,
}

/// Tokens of one model call. `input_tokens` counts every input token, also those
/// `cached_input_tokens` says were read from the provider's prompt cache.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

/// Where a model call sends its answer's text while it is being generated. The
/// call's [`ChatResponse`] still holds the whole answer: deltas are a preview, and
/// a sink that drops them loses nothing.
pub trait Deltas: Send + Sync {
    /// The next piece of the answer's text, in order.
    fn text(&self, chunk: &str);

    /// The text sent so far is void: the call starts over (a retry after a stream
    /// broke off, or a fallback model answering instead).
    fn restart(&self) {}
}

/// A sink for calls nobody watches. Only tests make such calls: a turn always has its
/// sink (`agent/deltas.rs`), which times the first token even when nobody watches.
#[cfg(test)]
pub struct NoDeltas;

#[cfg(test)]
impl Deltas for NoDeltas {
    fn text(&self, _chunk: &str) {}
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The request failed (time-out, status, transport, unreadable body).
    #[error("model {0}")]
    Http(#[from] HttpError),
    /// The answer's stream began but broke off, reported an error or went over a
    /// limit.
    #[error("model stream {0}")]
    Stream(#[from] StreamError),
    /// The body was JSON but not a usable answer.
    #[error("model API sent an answer that could not be used: {0}")]
    InvalidResponse(String),
    #[error("API key: {0}")]
    MissingKey(String),
}

impl LlmError {
    /// Whether the model did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, LlmError::Http(HttpError::Timeout(_)))
    }

    /// Whether the same call may succeed when made again: rate limits, server
    /// errors and overload (as a status or an error event), time-outs, connection
    /// failures and streams that broke off.
    pub fn is_retryable(&self) -> bool {
        match self {
            LlmError::Http(err) => err.is_retryable(),
            LlmError::Stream(err) => err.is_retryable(),
            LlmError::InvalidResponse(_) | LlmError::MissingKey(_) => false,
        }
    }
}

#[async_trait]
pub trait ChatModel: Send + Sync {
    /// Provider name for metrics and logs.
    fn provider(&self) -> &'static str;
    /// Asks the model; the answer's text also goes to `deltas` as it comes, when the
    /// provider streams.
    async fn complete(
        &self,
        request: &ChatRequest,
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError>;
}

/// The model a spec describes. Its API key is read now (from the environment or a
/// mounted Secret), so a missing key is reported when the agent is built rather
/// than on the first message.
pub fn from_spec(spec: &ModelSpec, secrets: &Secrets) -> Result<Arc<dyn ChatModel>, LlmError> {
    Ok(match spec.provider {
        ModelProvider::Openai => {
            Arc::new(openai::OpenAi::new(spec, read_key(spec, secrets, false)?))
        }
        ModelProvider::Anthropic => Arc::new(anthropic::Anthropic::new(
            spec,
            read_key(spec, secrets, true)?,
        )),
        ModelProvider::Scripted => Arc::new(scripted::Scripted::new(spec.script.clone())),
    })
}

/// Reads the key `apiKey` names. OpenAI-compatible servers such as Ollama need none,
/// so only `required` providers fail without one; the others warn and go on.
fn read_key(
    spec: &ModelSpec,
    secrets: &Secrets,
    required: bool,
) -> Result<Option<String>, LlmError> {
    match &spec.api_key {
        Some(secret) => secrets
            .read_key(secret, required)
            .map_err(|err| LlmError::MissingKey(err.to_string())),
        None if required => Err(LlmError::MissingKey(
            "model.apiKey is not configured".into(),
        )),
        None => Ok(None),
    }
}
