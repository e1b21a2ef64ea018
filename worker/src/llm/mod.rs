//! LLM providers behind one trait. A turn speaks [`ChatRequest`] / [`ChatResponse`];
//! each provider maps them onto its wire format. The HTTP providers always stream
//! (server-sent events, read in `sse`), so the answer's text reaches [`Deltas`] as
//! it is generated.

pub mod anthropic;
pub(crate) mod breaker;
pub mod fallback;
pub mod openai;
pub mod scripted;
mod sse;
mod traced;

pub use sse::{MAX_ANSWER_BYTES, MAX_EVENT_BYTES, StreamError};

pub use breaker::Breakers;
pub use fallback::Fallbacks;

use crate::json_http::HttpError;
use crate::secrets::Secrets;
use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::config::{ModelPrice, ModelSettings};
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
    /// Which of the agent's models answered, set by [`Fallbacks`]; a provider leaves
    /// it empty.
    pub answered: Answered,
}

/// The model of an agent's list that answered a call, and those passed over first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answered {
    /// As [`nexo_api::spec::ModelSpec::label`] names it.
    pub model: String,
    pub provider: &'static str,
    /// The models tried before, in order, each with why it did not answer.
    pub passed_over: Vec<PassedOver>,
}

/// A model a call went past.
#[derive(Debug, Clone, PartialEq)]
pub struct PassedOver {
    pub model: String,
    pub error: String,
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
    /// The model's endpoint failed too often lately; it was not called.
    #[error("model {0}: circuit open after repeated failures, not called")]
    CircuitOpen(String),
    /// Every model of the agent's list failed; `last` is the last one's failure.
    #[error("every model failed; last: {last}")]
    Exhausted {
        passed_over: Vec<PassedOver>,
        last: Box<LlmError>,
    },
}

impl LlmError {
    /// Whether the model did not answer in time.
    pub fn is_timeout(&self) -> bool {
        match self {
            LlmError::Http(HttpError::Timeout(_)) => true,
            LlmError::Exhausted { last, .. } => last.is_timeout(),
            _ => false,
        }
    }

    /// The models the call went past before it failed (empty for one model).
    pub fn passed_over(&self) -> &[PassedOver] {
        match self {
            LlmError::Exhausted { passed_over, .. } => passed_over,
            _ => &[],
        }
    }

    /// Whether the same call may succeed when made again: rate limits, server
    /// errors and overload (as a status or an error event), time-outs, connection
    /// failures and streams that broke off.
    pub fn is_retryable(&self) -> bool {
        match self {
            LlmError::Http(err) => err.is_retryable(),
            LlmError::Stream(err) => err.is_retryable(),
            LlmError::InvalidResponse(_)
            | LlmError::MissingKey(_)
            | LlmError::CircuitOpen(_)
            | LlmError::Exhausted { .. } => false,
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

/// What the agents of a worker share about their models: one circuit breaker per
/// endpoint, and the price table.
pub struct SharedModels {
    pub breakers: Breakers,
    prices: Vec<ModelPrice>,
}

impl SharedModels {
    pub fn new(settings: &ModelSettings, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            breakers: Breakers::new(
                settings.circuit_breaker.clone(),
                metrics.llm_circuit_open.clone(),
            ),
            prices: settings.prices.clone(),
        }
    }

    /// What `usage` of `model` cost, when the price table has the model.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        let price = self.prices.iter().find(|p| p.model == model)?;
        Some(price.cost(
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens,
        ))
    }
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
