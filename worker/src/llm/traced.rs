//! A model whose calls are spans: `chat {model}` (client kind) with the attributes
//! of the OpenTelemetry GenAI semantic conventions, and what was said only when the
//! agent opts in (`observability.recordContent`).

use std::sync::Arc;

use async_trait::async_trait;
use opentelemetry::{Array, StringValue, Value};
use serde_json::json;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, StreamError, ToolCall,
};
use crate::json_http::HttpError;
use crate::traces::{TARGET, genai};

pub(crate) struct Traced {
    inner: Arc<dyn ChatModel>,
    /// The model asked for, as the spec names it (empty for `scripted`).
    model: String,
    record_content: bool,
}

impl Traced {
    pub(crate) fn new(inner: Arc<dyn ChatModel>, model: String, record_content: bool) -> Self {
        Self {
            inner,
            model,
            record_content,
        }
    }

    fn span(&self) -> tracing::Span {
        let provider = self.inner.provider();
        let name = if self.model.is_empty() {
            "chat".to_owned()
        } else {
            format!("chat {}", self.model)
        };
        let span = tracing::info_span!(
            target: TARGET,
            "chat",
            otel.name = %name,
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = provider,
            // The attribute `gen_ai.provider.name` replaced, for older backends.
            gen_ai.system = provider,
            gen_ai.request.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        );
        if !self.model.is_empty() {
            span.record("gen_ai.request.model", self.model.as_str());
        }
        span
    }
}

#[async_trait]
impl ChatModel for Traced {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let span = self.span();
        // `is_disabled`: no subscriber takes the span (traces off), so the content
        // is not even serialised.
        let record_content = self.record_content && !span.is_disabled();
        if record_content {
            if !request.system.is_empty() {
                let instructions = json!([{"type": "text", "content": request.system}]);
                span.set_attribute("gen_ai.system_instructions", instructions.to_string());
            }
            span.set_attribute("gen_ai.input.messages", input_messages(request).to_string());
        }
        let result = self
            .inner
            .complete(request, deltas)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(response) => {
                // As i64: the OpenTelemetry bridge exports a u64 as a string.
                let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                span.record(
                    "gen_ai.usage.input_tokens",
                    tokens(response.usage.input_tokens),
                );
                span.record(
                    "gen_ai.usage.output_tokens",
                    tokens(response.usage.output_tokens),
                );
                // The model that answered: a fallback's when the agent's own failed.
                let answered = match response.answered.model.as_str() {
                    "" => self.model.as_str(),
                    model => model,
                };
                if !answered.is_empty() {
                    span.set_attribute("gen_ai.response.model", answered.to_owned());
                }
                if let Some(reason) = &response.finish_reason {
                    let reasons = Array::String(vec![StringValue::from(reason.clone())]);
                    span.set_attribute("gen_ai.response.finish_reasons", Value::Array(reasons));
                }
                if record_content {
                    let output = json!([output_message(response)]);
                    span.set_attribute("gen_ai.output.messages", output.to_string());
                }
            }
            Err(err) => genai::failed(&span, error_type(err)),
        }
        result
    }
}

/// `error.type` of a failed call: low-cardinality, never the provider's message.
fn error_type(err: &LlmError) -> &'static str {
    match err {
        LlmError::Http(HttpError::Timeout(_)) => "timeout",
        LlmError::Http(HttpError::Status { status, .. }) if *status == 429 => "rate_limited",
        LlmError::Http(HttpError::Status { status, .. }) if *status >= 500 => "server_error",
        LlmError::Http(HttpError::Status { .. }) => "refused",
        LlmError::Http(HttpError::Transport(_)) => "transport",
        LlmError::Http(HttpError::InvalidResponse(_)) | LlmError::InvalidResponse(_) => {
            "invalid_response"
        }
        LlmError::MissingKey(_) => "missing_key",
        LlmError::Stream(StreamError::Reported { .. }) => "reported",
        LlmError::Stream(StreamError::Incomplete) => "incomplete_stream",
        LlmError::Stream(
            StreamError::EventTooLarge | StreamError::AnswerTooLarge | StreamError::Malformed(_),
        ) => "invalid_response",
        LlmError::CircuitOpen(_) => "circuit_open",
        LlmError::Exhausted { last, .. } => error_type(last),
    }
}

/// The request's messages in the conventions' shape (`role` and `parts`).
fn input_messages(request: &ChatRequest) -> serde_json::Value {
    let messages: Vec<_> = request
        .messages
        .iter()
        .map(|message| match message {
            ChatMessage::User(text) => {
                json!({"role": "user", "parts": [{"type": "text", "content": text}]})
            }
            ChatMessage::Assistant { text, tool_calls } => {
                json!({"role": "assistant", "parts": parts(text, tool_calls)})
            }
            ChatMessage::ToolResult { call_id, content } => json!({
                "role": "tool",
                "parts": [{"type": "tool_call_response", "id": call_id, "response": content}],
            }),
        })
        .collect();
    serde_json::Value::Array(messages)
}

fn output_message(response: &ChatResponse) -> serde_json::Value {
    let mut message = json!({
        "role": "assistant",
        "parts": parts(&response.text, &response.tool_calls),
    });
    if let Some(reason) = &response.finish_reason {
        message["finish_reason"] = json!(reason);
    }
    message
}

fn parts(text: &str, tool_calls: &[ToolCall]) -> Vec<serde_json::Value> {
    let text = (!text.is_empty()).then(|| json!({"type": "text", "content": text}));
    text.into_iter()
        .chain(tool_calls.iter().map(|call| {
            json!({"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments})
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_few_and_never_the_providers_words() {
        let status = |status| {
            LlmError::Http(HttpError::Status {
                status,
                body: "account acme-corp over quota".into(),
            })
        };
        assert_eq!(
            error_type(&LlmError::Http(HttpError::Timeout(30))),
            "timeout"
        );
        assert_eq!(error_type(&status(429)), "rate_limited");
        assert_eq!(error_type(&status(503)), "server_error");
        assert_eq!(error_type(&status(401)), "refused");
        assert_eq!(
            error_type(&LlmError::InvalidResponse("x".into())),
            "invalid_response"
        );
    }

    #[test]
    fn messages_take_the_conventions_shape() {
        let call = ToolCall {
            id: "c1".into(),
            name: "current_time".into(),
            arguments: json!({}),
        };
        let request = ChatRequest {
            system: "be brief".into(),
            messages: vec![
                ChatMessage::User("time?".into()),
                ChatMessage::Assistant {
                    text: String::new(),
                    tool_calls: vec![call.clone()],
                },
                ChatMessage::ToolResult {
                    call_id: "c1".into(),
                    content: "noon".into(),
                },
            ],
            tools: Vec::new(),
        };
        assert_eq!(
            input_messages(&request),
            json!([
                {"role": "user", "parts": [{"type": "text", "content": "time?"}]},
                {"role": "assistant", "parts": [
                    {"type": "tool_call", "id": "c1", "name": "current_time", "arguments": {}}
                ]},
                {"role": "tool", "parts": [
                    {"type": "tool_call_response", "id": "c1", "response": "noon"}
                ]},
            ])
        );
        let response = ChatResponse {
            text: "noon".into(),
            finish_reason: Some("stop".into()),
            ..Default::default()
        };
        assert_eq!(
            output_message(&response),
            json!({"role": "assistant", "parts": [{"type": "text", "content": "noon"}], "finish_reason": "stop"})
        );
    }
}
