//! OpenAI-compatible chat completions (`POST {base}/chat/completions`): OpenAI,
//! Ollama, vLLM, LM Studio, OpenRouter and others that speak the same format. The
//! answer is always streamed (`stream: true`): every one of those servers streams,
//! tool calls included, so there is one code path.

use async_trait::async_trait;
use nexo_api::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use eventsource_stream::Event;

use super::sse::{self, Answer, Decoder, Flow, StreamError, parse};
use super::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, Usage};
use crate::json_http::{JsonClient, authorization, join};

/// Where OpenAI-compatible requests go without a `baseUrl`.
pub use nexo_api::spec::OPENAI_BASE_URL as DEFAULT_BASE_URL;

pub struct OpenAi {
    http: JsonClient,
    url: String,
    authorization: Option<String>,
    model: String,
    max_tokens: u32,
    temperature: Option<f32>,
}

impl OpenAi {
    pub fn new(spec: &ModelSpec, api_key: Option<String>) -> Self {
        let base = spec.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Self {
            http: JsonClient::new(spec.timeout_seconds, spec.max_retries),
            url: join(base, "/chat/completions"),
            authorization: api_key.map(|key| format!("Bearer {key}")),
            model: spec.model.clone(),
            max_tokens: spec.max_tokens,
            temperature: spec.temperature,
        }
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    /// Always: the answer comes as chunks, its usage in a last one.
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage {
    role: String,
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: WireFunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Serialize)]
struct WireFunctionCall {
    name: String,
    /// JSON text, as the API sends it.
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

/// One `chat.completion.chunk` (or an error in its place).
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<ChunkError>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A fragment of a tool call: the first carries its id and name, the following
/// pieces of its JSON arguments.
#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ChunkError {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// A string (`rate_limit_exceeded`) or, from routers, an HTTP status.
    #[serde(default)]
    code: Option<Value>,
}

/// Reads chunks into the answer: content deltas, tool-call fragments by `index`, the
/// finish reason, the usage chunk (`choices: []`), `[DONE]`.
#[derive(Default)]
struct Chunks;

impl Decoder for Chunks {
    fn event(
        &mut self,
        event: &Event,
        answer: &mut Answer,
        deltas: &dyn Deltas,
    ) -> Result<Flow, LlmError> {
        if event.data.trim() == "[DONE]" {
            return Ok(Flow::Done);
        }
        let chunk: Chunk = parse(event)?;
        if let Some(error) = chunk.error {
            let kind = error
                .kind
                .or_else(|| {
                    error.code.map(|code| {
                        code.as_str()
                            .map_or_else(|| code.to_string(), str::to_owned)
                    })
                })
                .unwrap_or_else(|| "an error".to_owned());
            return Err(StreamError::Reported {
                kind,
                message: error.message,
            }
            .into());
        }
        if let Some(usage) = chunk.usage {
            // `prompt_tokens` counts the cached ones too, as `Usage` does.
            answer.usage = Usage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                cached_input_tokens: usage
                    .prompt_tokens_details
                    .and_then(|details| details.cached_tokens)
                    .unwrap_or_default(),
            };
        }
        // Only the first choice: requests never ask for more (`n`).
        for choice in chunk.choices.into_iter().flatten().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(content) = delta.content {
                    answer.text(&content, deltas)?;
                }
                for call in delta.tool_calls.into_iter().flatten() {
                    // Without an index (older Ollama), a fragment with an id begins a
                    // call and one without continues the latest.
                    let index = call.index.unwrap_or_else(|| match call.id {
                        Some(_) => answer.call_count(),
                        None => answer.call_count().saturating_sub(1),
                    });
                    let function = call.function.unwrap_or(FunctionDelta {
                        name: None,
                        arguments: None,
                    });
                    answer.call(
                        index,
                        call.id.as_deref().unwrap_or_default(),
                        function.name.as_deref().unwrap_or_default(),
                    )?;
                    if let Some(arguments) = function.arguments {
                        answer.arguments(index, &arguments)?;
                    }
                }
            }
            if choice.finish_reason.is_some() {
                answer.finish_reason = choice.finish_reason;
            }
        }
        Ok(Flow::More)
    }
}

fn to_wire(system: &str, messages: &[ChatMessage]) -> Vec<WireMessage> {
    let plain = |role: &str, content: &str| WireMessage {
        role: role.to_owned(),
        content: Some(content.to_owned()),
        tool_calls: Vec::new(),
        tool_call_id: None,
    };
    let mut wire = Vec::with_capacity(messages.len() + 1);
    if !system.is_empty() {
        wire.push(plain("system", system));
    }
    for message in messages {
        wire.push(match message {
            ChatMessage::User(text) => plain("user", text),
            ChatMessage::Assistant { text, tool_calls } => WireMessage {
                role: "assistant".to_owned(),
                content: (!text.is_empty()).then(|| text.clone()),
                tool_calls: tool_calls
                    .iter()
                    .map(|call| WireToolCall {
                        id: call.id.clone(),
                        kind: function_type(),
                        function: WireFunctionCall {
                            name: call.name.clone(),
                            arguments: call.arguments.to_string(),
                        },
                    })
                    .collect(),
                tool_call_id: None,
            },
            ChatMessage::ToolResult { call_id, content } => WireMessage {
                tool_call_id: Some(call_id.clone()),
                ..plain("tool", content)
            },
        });
    }
    wire
}

#[async_trait]
impl ChatModel for OpenAi {
    fn provider(&self) -> &'static str {
        "openai"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let body = WireRequest {
            model: &self.model,
            messages: to_wire(&request.system, &request.messages),
            tools: request
                .tools
                .iter()
                .map(|tool| WireTool {
                    kind: "function",
                    function: WireFunction {
                        name: &tool.name,
                        description: &tool.description,
                        parameters: &tool.parameters,
                    },
                })
                .collect(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let headers = authorization(self.authorization.as_deref());
        sse::complete::<Chunks>(&self.http, &self.url, &headers, &body, deltas).await
    }
}
