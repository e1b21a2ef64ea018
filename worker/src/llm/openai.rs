//! OpenAI-compatible chat completions (`POST {base}/chat/completions`): OpenAI,
//! Ollama, vLLM, OpenRouter and others that speak the same format.

use async_trait::async_trait;
use nexo_api::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, ToolCall, Usage};
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
}

#[derive(Serialize, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: WireFunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Serialize, Deserialize)]
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

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
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
        _deltas: &dyn Deltas,
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
        };
        let headers = authorization(self.authorization.as_deref());
        let response: WireResponse = self.http.post(&self.url, &headers, &body).await?;
        let choice = response
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| LlmError::InvalidResponse("no choices".to_owned()))?;
        let tool_calls = choice
            .message
            .tool_calls
            .into_iter()
            .map(|call| {
                let arguments = if call.function.arguments.trim().is_empty() {
                    Value::Object(Default::default())
                } else {
                    serde_json::from_str(&call.function.arguments).map_err(|e| {
                        LlmError::InvalidResponse(format!(
                            "arguments of tool call `{}` are not JSON: {e}",
                            call.function.name
                        ))
                    })?
                };
                Ok(ToolCall {
                    id: call.id,
                    name: call.function.name,
                    arguments,
                })
            })
            .collect::<Result<_, LlmError>>()?;
        let usage = response.usage.map_or_else(Usage::default, |u| Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            cached_input_tokens: 0,
        });
        Ok(ChatResponse {
            text: choice.message.content.unwrap_or_default(),
            tool_calls,
            usage,
            finish_reason: choice.finish_reason,
            ..ChatResponse::default()
        })
    }
}
