//! A deterministic model for offline runs and tests: answers from rules in the spec,
//! and can call a tool so tool paths run without a network.

use async_trait::async_trait;
use nexo_api::spec::ScriptRule;
use serde_json::Value;

use super::{ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, ToolCall};

pub struct Scripted {
    rules: Vec<ScriptRule>,
}

impl Scripted {
    pub fn new(rules: Vec<ScriptRule>) -> Self {
        Self { rules }
    }

    fn rule_for(&self, input: &str) -> Option<&ScriptRule> {
        let input = input.to_lowercase();
        self.rules.iter().find(|rule| {
            rule.contains
                .as_deref()
                .is_none_or(|needle| input.contains(&needle.to_lowercase()))
        })
    }
}

/// Replaces `{{input}}` and `{{tool_result}}`.
fn render(template: &str, input: &str, tool_result: &str) -> String {
    template
        .replace("{{input}}", input)
        .replace("{{tool_result}}", tool_result)
}

/// The user's earlier messages in the conversation (the history the agent was given),
/// oldest first, joined by ` | `: what `{{history}}` stands for.
fn history(request: &ChatRequest) -> String {
    let mut said: Vec<&str> = request
        .messages
        .iter()
        .filter_map(|m| match m {
            ChatMessage::User(text) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    said.pop();
    said.join(" | ")
}

fn render_value(value: &Value, input: &str) -> Value {
    match value {
        Value::String(s) => Value::String(render(s, input, "")),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, input)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_value(v, input)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[async_trait]
impl ChatModel for Scripted {
    fn provider(&self) -> &'static str {
        "scripted"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let input = request
            .messages
            .iter()
            .rev()
            .find_map(|m| match m {
                ChatMessage::User(text) => Some(text.as_str()),
                _ => None,
            })
            .unwrap_or_default();
        // Tool results after the latest user message: the rule's tool already ran.
        let tool_results: Vec<&str> = request
            .messages
            .iter()
            .rev()
            .take_while(|m| !matches!(m, ChatMessage::User(_)))
            .filter_map(|m| match m {
                ChatMessage::ToolResult { content, .. } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        let Some(rule) = self.rule_for(input) else {
            return Ok(ChatResponse {
                text: "(no scripted rule matches this message)".to_owned(),
                ..Default::default()
            });
        };
        match &rule.tool_call {
            Some(call) if tool_results.is_empty() => Ok(ChatResponse {
                tool_calls: vec![ToolCall {
                    id: format!("scripted-{}", request.messages.len()),
                    name: call.name.clone(),
                    arguments: render_value(&Value::Object(call.arguments.clone()), input),
                }],
                ..Default::default()
            }),
            _ => {
                let text = render(&rule.reply, input, &tool_results.join("\n"))
                    .replace("{{history}}", &history(request));
                // Word by word, as a streaming provider would: each word with the
                // space before it, so the pieces join to the whole.
                for word in text.split_inclusive(' ') {
                    deltas.text(word);
                }
                Ok(ChatResponse {
                    text,
                    finish_reason: Some("stop".to_owned()),
                    ..Default::default()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nexo_api::spec::ScriptToolCall;

    use super::*;

    fn rules() -> Vec<ScriptRule> {
        vec![
            ScriptRule {
                contains: Some("TIME".into()),
                tool_call: Some(ScriptToolCall {
                    name: "current_time".into(),
                    arguments: serde_json::json!({"q": "{{input}}"})
                        .as_object()
                        .unwrap()
                        .clone(),
                }),
                reply: "It is {{tool_result}}.".into(),
            },
            ScriptRule {
                contains: None,
                tool_call: None,
                reply: "You said: {{input}}".into(),
            },
        ]
    }

    #[tokio::test]
    async fn fallback_rule_echoes() {
        let model = Scripted::new(rules());
        let request = ChatRequest {
            messages: vec![ChatMessage::User("hello".into())],
            ..Default::default()
        };
        assert_eq!(
            model
                .complete(&request, &crate::llm::NoDeltas)
                .await
                .unwrap()
                .text,
            "You said: hello"
        );
    }

    #[tokio::test]
    async fn tool_rule_calls_then_answers() {
        let model = Scripted::new(rules());
        let mut request = ChatRequest {
            messages: vec![ChatMessage::User("what time is it".into())],
            ..Default::default()
        };
        let first = model
            .complete(&request, &crate::llm::NoDeltas)
            .await
            .unwrap();
        assert_eq!(first.tool_calls.len(), 1);
        assert_eq!(first.tool_calls[0].arguments["q"], "what time is it");
        request.messages.push(ChatMessage::Assistant {
            text: String::new(),
            tool_calls: first.tool_calls.clone(),
        });
        request.messages.push(ChatMessage::ToolResult {
            call_id: first.tool_calls[0].id.clone(),
            content: "noon".into(),
        });
        let second = model
            .complete(&request, &crate::llm::NoDeltas)
            .await
            .unwrap();
        assert!(second.tool_calls.is_empty());
        assert_eq!(second.text, "It is noon.");
    }

    #[tokio::test]
    async fn the_reply_streams_word_by_word_and_the_words_join_to_it() {
        struct Collect(std::sync::Mutex<Vec<String>>);
        impl Deltas for Collect {
            fn text(&self, chunk: &str) {
                self.0.lock().unwrap().push(chunk.to_owned());
            }
        }
        let model = Scripted::new(rules());
        let request = ChatRequest {
            messages: vec![ChatMessage::User("hello there".into())],
            ..Default::default()
        };
        let deltas = Collect(Default::default());
        let answer = model.complete(&request, &deltas).await.unwrap();
        let chunks = deltas.0.into_inner().unwrap();
        assert_eq!(chunks, ["You ", "said: ", "hello ", "there"]);
        assert_eq!(chunks.concat(), answer.text);
    }
}
