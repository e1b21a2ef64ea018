//! Anthropic Messages API (`POST {base}/v1/messages`) with tool use.

use async_trait::async_trait;
use nexo_api::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, ToolCall, Usage};
use crate::json_http::{JsonClient, join};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    http: JsonClient,
    url: String,
    api_key: String,
    model: String,
    max_tokens: u32,
    temperature: Option<f32>,
}

impl Anthropic {
    pub fn new(spec: &ModelSpec, api_key: Option<String>) -> Self {
        let base = spec.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Self {
            http: JsonClient::new(spec.timeout_seconds, spec.max_retries),
            url: join(base, "/v1/messages"),
            api_key: api_key.unwrap_or_default(),
            model: spec.model.clone(),
            max_tokens: spec.max_tokens,
            temperature: spec.temperature,
        }
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage {
    role: &'static str,
    content: Vec<Block>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
    },
    /// Blocks this client does not use (thinking, citations, …) are skipped.
    #[serde(other)]
    Other,
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a Value,
}

#[derive(Deserialize)]
struct WireResponse {
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

/// Anthropic wants strictly alternating roles, with tool results inside a user turn,
/// so consecutive messages of one role are merged into one.
fn to_wire(messages: &[ChatMessage]) -> Vec<WireMessage> {
    let mut wire: Vec<WireMessage> = Vec::new();
    for message in messages {
        let (role, blocks) = match message {
            ChatMessage::User(text) => ("user", vec![Block::Text { text: text.clone() }]),
            ChatMessage::Assistant { text, tool_calls } => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(Block::Text { text: text.clone() });
                }
                blocks.extend(tool_calls.iter().map(|call| Block::ToolUse {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    input: call.arguments.clone(),
                }));
                ("assistant", blocks)
            }
            ChatMessage::ToolResult { call_id, content } => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: call_id.clone(),
                    content: content.clone(),
                }],
            ),
        };
        match wire.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => wire.push(WireMessage {
                role,
                content: blocks,
            }),
        }
    }
    wire
}

#[async_trait]
impl ChatModel for Anthropic {
    fn provider(&self) -> &'static str {
        "anthropic"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        _deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let body = WireRequest {
            model: &self.model,
            max_tokens: self.max_tokens,
            system: &request.system,
            messages: to_wire(&request.messages),
            tools: request
                .tools
                .iter()
                .map(|tool| WireTool {
                    name: &tool.name,
                    description: &tool.description,
                    input_schema: &tool.parameters,
                })
                .collect(),
            temperature: self.temperature,
        };
        let headers = [
            ("x-api-key", self.api_key.as_str()),
            ("anthropic-version", API_VERSION),
        ];
        let response: WireResponse = self.http.post(&self.url, &headers, &body).await?;
        let mut out = ChatResponse {
            finish_reason: response.stop_reason,
            ..ChatResponse::default()
        };
        for block in response.content {
            match block {
                Block::Text { text } => out.text.push_str(&text),
                Block::ToolUse { id, name, input } => out.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: input,
                }),
                Block::ToolResult { .. } | Block::Other => {}
            }
        }
        if let Some(usage) = response.usage {
            out.usage = Usage {
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cached_input_tokens: 0,
            };
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_merge_into_one_user_turn() {
        let call = |id: &str| ToolCall {
            id: id.to_owned(),
            name: "current_time".to_owned(),
            arguments: Value::Object(Default::default()),
        };
        let wire = to_wire(&[
            ChatMessage::User("hi".into()),
            ChatMessage::Assistant {
                text: String::new(),
                tool_calls: vec![call("a"), call("b")],
            },
            ChatMessage::ToolResult {
                call_id: "a".into(),
                content: "1".into(),
            },
            ChatMessage::ToolResult {
                call_id: "b".into(),
                content: "2".into(),
            },
        ]);
        let roles: Vec<_> = wire.iter().map(|m| m.role).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(wire[2].content.len(), 2);
    }
}
