//! Streamed model answers: one POST whose response is a stream of server-sent
//! events, read with time-outs and size limits into the answer they build (text,
//! tool calls, finish reason, usage). Each provider decodes its own events
//! ([`Decoder`]); the request, the retries, the limits and the assembly are shared.
//!
//! Time-outs: the model's `timeoutSeconds` bounds the wait for the response to
//! start (its headers) and then each wait for the next event, the first included
//! (the time to the first token). A whole answer takes as long as it takes while
//! events keep coming; its size is bounded instead ([`MAX_ANSWER_BYTES`]).

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use super::{ChatResponse, Deltas, LlmError, ToolCall, Usage};
use crate::json_http::{HttpError, JsonClient};

/// Largest server-sent event read (its bytes on the wire). A text delta or a tool
/// call fragment is tens of bytes; a peer that sends a longer event, or bytes that
/// never end an event, is cut off rather than buffered.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Largest answer assembled: its text, tool names, ids and arguments together. Far
/// above any `maxTokens` a model allows (a token is a few bytes), so only a peer
/// that never stops reaches it.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// Why a stream that had started did not give a usable answer (each reads after
/// "model stream").
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The provider sent an error event (`kind` is its type or code).
    #[error("reported {kind}: {message}")]
    Reported { kind: String, message: String },
    #[error("ended before the answer was complete")]
    Incomplete,
    #[error("had an event longer than {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
    #[error("had an answer longer than {MAX_ANSWER_BYTES} bytes")]
    AnswerTooLarge,
    /// Not server-sent events, or not UTF-8.
    #[error("could not be read: {0}")]
    Malformed(String),
}

impl StreamError {
    /// An error the provider reports for load or its own failure (not for the
    /// request), and a stream that broke off, may pass on a new attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            StreamError::Reported { kind, .. } => TRANSIENT_ERRORS.contains(&kind.as_str()),
            StreamError::Incomplete => true,
            StreamError::EventTooLarge
            | StreamError::AnswerTooLarge
            | StreamError::Malformed(_) => false,
        }
    }
}

/// Error types of streamed errors that stand for a status worth retrying: Anthropic's
/// `overloaded_error` (529), `api_error` (500), `rate_limit_error` (429) and
/// `timeout_error` (504); OpenAI's `server_error` and `rate_limit_exceeded`, and the
/// HTTP statuses OpenAI-compatible routers (OpenRouter) put in `code`.
const TRANSIENT_ERRORS: &[&str] = &[
    "overloaded_error",
    "api_error",
    "rate_limit_error",
    "timeout_error",
    "server_error",
    "rate_limit_exceeded",
    "429",
    "500",
    "502",
    "503",
    "504",
    "529",
];

/// What a decoder tells the reader after an event.
pub(crate) enum Flow {
    More,
    /// The answer is complete; the rest of the body is not read.
    Done,
}

/// One provider's reading of its events; a fresh one for each attempt.
pub(crate) trait Decoder: Default + Send {
    /// Takes one event into `answer` (whose text also goes to `deltas`).
    fn event(
        &mut self,
        event: &Event,
        answer: &mut Answer,
        deltas: &dyn Deltas,
    ) -> Result<Flow, LlmError>;
}

/// POSTs `body` (which asks for a stream) to `url` and reads the answer with `D`,
/// retrying as [`JsonClient::post`] does; text streamed by an attempt that then
/// failed is voided (`deltas.restart()`) before the next one starts.
pub(crate) async fn complete<D: Decoder>(
    http: &JsonClient,
    url: &str,
    headers: &[(&str, &str)],
    body: &(impl Serialize + Sync),
    deltas: &dyn Deltas,
) -> Result<ChatResponse, LlmError> {
    let streamed = AtomicBool::new(false);
    let attempt = || async {
        if streamed.swap(false, Ordering::Relaxed) {
            deltas.restart();
        }
        let response = http.open(url, headers, body).await?;
        let watched = Watched {
            deltas,
            streamed: &streamed,
        };
        read::<D>(response, http, &watched).await
    };
    http.with_retries(url, attempt, LlmError::is_retryable)
        .await
}

/// A sink that notes whether anything reached it.
struct Watched<'a> {
    deltas: &'a dyn Deltas,
    streamed: &'a AtomicBool,
}

impl Deltas for Watched<'_> {
    fn text(&self, chunk: &str) {
        self.streamed.store(true, Ordering::Relaxed);
        self.deltas.text(chunk);
    }

    fn restart(&self) {
        self.deltas.restart();
    }
}

/// Why the bytes of a response stopped.
#[derive(Debug)]
enum ReadError {
    Transport(reqwest::Error),
    EventTooLarge,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Transport(err) => err.fmt(f),
            ReadError::EventTooLarge => StreamError::EventTooLarge.fmt(f),
        }
    }
}

async fn read<D: Decoder>(
    response: reqwest::Response,
    http: &JsonClient,
    deltas: &dyn Deltas,
) -> Result<ChatResponse, LlmError> {
    // Bytes taken in since the last event came out of the parser: what it may be
    // holding. Reset on each event, so the bound is one event (plus one read).
    let unparsed = Arc::new(AtomicUsize::new(0));
    let counted = unparsed.clone();
    let bytes = response.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(ReadError::Transport)?;
        let held = counted.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len();
        if held > MAX_EVENT_BYTES {
            return Err(ReadError::EventTooLarge);
        }
        Ok(chunk)
    });
    let mut events = pin!(bytes.eventsource());
    let mut decoder = D::default();
    let mut answer = Answer::default();
    loop {
        let next = tokio::time::timeout(http.timeout(), events.next())
            .await
            .map_err(|_| HttpError::Timeout(http.timeout().as_secs()))?;
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(EventStreamError::Transport(ReadError::Transport(err)))) => {
                return Err(http.transport(err).into());
            }
            Some(Err(EventStreamError::Transport(ReadError::EventTooLarge))) => {
                return Err(StreamError::EventTooLarge.into());
            }
            Some(Err(err)) => return Err(StreamError::Malformed(err.to_string()).into()),
            // A body that ends after the finish reason lacks at most the usage
            // (or the `[DONE]` some compatible servers leave out); before it, the
            // answer is cut short.
            None if answer.finish_reason.is_some() => return answer.into_response(),
            None => return Err(StreamError::Incomplete.into()),
        };
        unparsed.store(0, Ordering::Relaxed);
        if let Flow::Done = decoder.event(&event, &mut answer, deltas)? {
            return answer.into_response();
        }
    }
}

/// The JSON of an event's data, as `T`.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(event: &Event) -> Result<T, LlmError> {
    serde_json::from_str(&event.data).map_err(|err| {
        LlmError::InvalidResponse(format!("event `{}` is not understood: {err}", event.event))
    })
}

/// An answer as its pieces come in.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    text: String,
    /// Tool calls in the order they began, each under the provider's index.
    calls: Vec<(usize, CallParts)>,
    pub(crate) finish_reason: Option<String>,
    pub(crate) usage: Usage,
    bytes: usize,
}

#[derive(Debug, Default)]
struct CallParts {
    id: String,
    name: String,
    /// JSON text, in the fragments' order.
    arguments: String,
}

impl Answer {
    /// Adds a piece of the text and sends it to `deltas`.
    pub(crate) fn text(&mut self, chunk: &str, deltas: &dyn Deltas) -> Result<(), StreamError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.grow(chunk.len())?;
        self.text.push_str(chunk);
        deltas.text(chunk);
        Ok(())
    }

    /// Tool calls begun so far.
    pub(crate) fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// Sets the id and name of the call under `index` (each when not empty),
    /// beginning it if it is new.
    pub(crate) fn call(&mut self, index: usize, id: &str, name: &str) -> Result<(), StreamError> {
        self.grow(id.len() + name.len())?;
        let call = self.parts(index);
        if !id.is_empty() {
            id.clone_into(&mut call.id);
        }
        if !name.is_empty() {
            name.clone_into(&mut call.name);
        }
        Ok(())
    }

    /// Adds a fragment of the JSON arguments of the call under `index`.
    pub(crate) fn arguments(&mut self, index: usize, fragment: &str) -> Result<(), StreamError> {
        self.grow(fragment.len())?;
        self.parts(index).arguments.push_str(fragment);
        Ok(())
    }

    fn parts(&mut self, index: usize) -> &mut CallParts {
        let at = match self.calls.iter().position(|(i, _)| *i == index) {
            Some(at) => at,
            None => {
                self.calls.push((index, CallParts::default()));
                self.calls.len() - 1
            }
        };
        &mut self.calls[at].1
    }

    fn grow(&mut self, by: usize) -> Result<(), StreamError> {
        self.bytes += by;
        if self.bytes > MAX_ANSWER_BYTES {
            return Err(StreamError::AnswerTooLarge);
        }
        Ok(())
    }

    /// The whole answer; every tool call needs a name and arguments that are a JSON
    /// value (none at all stands for `{}`).
    pub(crate) fn into_response(self) -> Result<ChatResponse, LlmError> {
        let count = self.calls.len();
        let tool_calls = self
            .calls
            .into_iter()
            .enumerate()
            .map(|(n, (_, call))| {
                if call.name.is_empty() {
                    return Err(LlmError::InvalidResponse(format!(
                        "tool call {} of {count} has no name",
                        n + 1
                    )));
                }
                let arguments = if call.arguments.trim().is_empty() {
                    Value::Object(Default::default())
                } else {
                    serde_json::from_str(&call.arguments).map_err(|e| {
                        LlmError::InvalidResponse(format!(
                            "arguments of tool call `{}` are not JSON: {e}",
                            call.name
                        ))
                    })?
                };
                Ok(ToolCall {
                    // Some compatible servers send none; the id only pairs the call
                    // with its result in the next request.
                    id: if call.id.is_empty() {
                        format!("call_{n}")
                    } else {
                        call.id
                    },
                    name: call.name,
                    arguments,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ChatResponse {
            text: self.text,
            tool_calls,
            usage: self.usage,
            finish_reason: self.finish_reason,
            ..ChatResponse::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::NoDeltas;

    #[test]
    fn fragments_of_interleaved_calls_join_under_their_index() {
        let mut answer = Answer::default();
        answer.call(1, "b", "second").unwrap();
        answer.call(0, "a", "first").unwrap();
        answer.arguments(0, "{\"x\":").unwrap();
        answer.arguments(1, "{}").unwrap();
        answer.arguments(0, " 1}").unwrap();
        answer.text("hi", &NoDeltas).unwrap();
        let response = answer.into_response().unwrap();
        let names: Vec<_> = response
            .tool_calls
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["second", "first"]);
        assert_eq!(
            response.tool_calls[1].arguments,
            serde_json::json!({"x": 1})
        );
        assert_eq!(response.text, "hi");
    }

    #[test]
    fn an_answer_over_the_limit_is_refused() {
        let mut answer = Answer::default();
        let piece = "x".repeat(MAX_ANSWER_BYTES / 2);
        answer.text(&piece, &NoDeltas).unwrap();
        answer.arguments(0, &piece).unwrap();
        assert!(matches!(
            answer.text("x", &NoDeltas),
            Err(StreamError::AnswerTooLarge)
        ));
    }

    #[test]
    fn a_call_without_a_name_or_with_broken_arguments_is_refused() {
        let mut nameless = Answer::default();
        nameless.arguments(0, "{}").unwrap();
        assert!(nameless.into_response().is_err());
        let mut broken = Answer::default();
        broken.call(0, "a", "f").unwrap();
        broken.arguments(0, "{\"x\"").unwrap();
        assert!(broken.into_response().is_err());
    }
}
