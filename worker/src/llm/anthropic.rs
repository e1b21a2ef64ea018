//! Anthropic Messages API (`POST {base}/v1/messages`) with tool use, streamed
//! (`stream: true`) and with prompt caching of the tools and the system prompt.

use async_trait::async_trait;
use nexo_api::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use eventsource_stream::Event;

use super::sse::{self, Answer, Decoder, Flow, StreamError, parse};
use super::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError};
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
    /// One text block, so it can carry a cache breakpoint.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<SystemBlock<'a>>,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    /// Always: the answer comes as events.
    stream: bool,
}

#[derive(Serialize)]
struct SystemBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    cache_control: CacheControl,
}

/// A prompt-cache breakpoint: the prompt up to and including the block that carries
/// it is cached (for five minutes, renewed by each read), and a later request with
/// the same prefix reads it for a tenth of the price. The order is tools, system,
/// messages, so a breakpoint on the last tool caches the tools even when the
/// system prompt changes (memories recalled into it), and one on the system prompt
/// caches both. Prefixes shorter than the model's minimum (1024 tokens on most) are
/// not cached, silently.
#[derive(Serialize, Clone, Copy)]
struct CacheControl {
    #[serde(rename = "type")]
    kind: &'static str,
}

const EPHEMERAL: CacheControl = CacheControl { kind: "ephemeral" };

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
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<CacheControl>,
}

/// One event of a streamed message.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: MessageStart,
    },
    ContentBlockStart {
        index: usize,
        content_block: Block,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {},
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop {},
    Ping {},
    Error {
        error: WireError,
    },
    /// Event types added after this client was written are skipped, as Anthropic's
    /// versioning policy asks.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageStart {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking, signatures, citations: not part of the answer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Token counts; `message_start` has them all, `message_delta` at least the output
/// (cumulative, so a count it carries replaces the earlier one).
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Reads a message's events into the answer; knows which content blocks are text.
#[derive(Default)]
struct Events {
    /// Anthropic's usage parts as they came: `input_tokens` there excludes the
    /// tokens read from or written to the cache.
    uncached: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl Events {
    fn usage(&mut self, usage: WireUsage, answer: &mut Answer) {
        if let Some(tokens) = usage.input_tokens {
            self.uncached = tokens;
        }
        if let Some(tokens) = usage.cache_read_input_tokens {
            self.cache_read = tokens;
        }
        if let Some(tokens) = usage.cache_creation_input_tokens {
            self.cache_creation = tokens;
        }
        if let Some(tokens) = usage.output_tokens {
            answer.usage.output_tokens = tokens;
        }
        // `Usage::input_tokens` counts every input token, the cached ones too.
        answer.usage.input_tokens = self.uncached + self.cache_read + self.cache_creation;
        answer.usage.cached_input_tokens = self.cache_read;
    }
}

impl Decoder for Events {
    fn event(
        &mut self,
        event: &Event,
        answer: &mut Answer,
        deltas: &dyn Deltas,
    ) -> Result<Flow, LlmError> {
        match parse(event)? {
            StreamEvent::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.usage(usage, answer);
                }
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::Text { text } => answer.text(&text, deltas)?,
                Block::ToolUse { id, name, input } => {
                    answer.call(index, &id, &name)?;
                    // The input comes in `input_json_delta`s; a non-empty one here
                    // (not sent today) would be the whole input.
                    if input.as_object().is_some_and(|o| !o.is_empty()) {
                        answer.arguments(index, &input.to_string())?;
                    }
                }
                Block::ToolResult { .. } | Block::Other => {}
            },
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => answer.text(&text, deltas)?,
                BlockDelta::InputJsonDelta { partial_json } => {
                    answer.arguments(index, &partial_json)?;
                }
                BlockDelta::Other => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    answer.finish_reason = delta.stop_reason;
                }
                if let Some(usage) = usage {
                    self.usage(usage, answer);
                }
            }
            StreamEvent::MessageStop {} => return Ok(Flow::Done),
            StreamEvent::Error { error } => {
                return Err(StreamError::Reported {
                    kind: error.kind,
                    message: error.message,
                }
                .into());
            }
            StreamEvent::ContentBlockStop {} | StreamEvent::Ping {} | StreamEvent::Other => {}
        }
        Ok(Flow::More)
    }
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
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let last_tool = request.tools.len().saturating_sub(1);
        let body = WireRequest {
            model: &self.model,
            max_tokens: self.max_tokens,
            system: if request.system.is_empty() {
                Vec::new()
            } else {
                vec![SystemBlock {
                    kind: "text",
                    text: &request.system,
                    cache_control: EPHEMERAL,
                }]
            },
            messages: to_wire(&request.messages),
            tools: request
                .tools
                .iter()
                .enumerate()
                .map(|(n, tool)| WireTool {
                    name: &tool.name,
                    description: &tool.description,
                    input_schema: &tool.parameters,
                    cache_control: (n == last_tool).then_some(EPHEMERAL),
                })
                .collect(),
            temperature: self.temperature,
            stream: true,
        };
        let headers = [
            ("x-api-key", self.api_key.as_str()),
            ("anthropic-version", API_VERSION),
        ];
        sse::complete::<Events>(&self.http, &self.url, &headers, &body, deltas).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ToolCall;

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
