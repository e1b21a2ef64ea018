//! `/a2a/<namespace>/<agent>`: each served agent as an A2A agent (Agent2Agent
//! protocol 0.3, JSON-RPC binding), with its agent card at
//! `/a2a/<namespace>/<agent>/.well-known/agent-card.json`.
//!
//! - `message/send` answers with a Task that has ended: `completed`, the answer as its
//!   artifact and status message, or `failed`, the reason as its status message.
//! - `message/stream` answers with Server-Sent Events: the Task (`submitted`), a
//!   `working` status update, the answer's text as it is written (artifact updates
//!   of the answer artifact, `append: true`, or `append: false` where the text starts
//!   over), the whole answer as a last artifact update (`append: false`,
//!   `lastChunk: true`), then the final status update (`final: true`); then the
//!   stream ends.
//! - A message's `contextId` is its conversation with the agent; without one, a new
//!   conversation starts and its id comes back as the Task's `contextId`.
//! - Tasks end with their answer and are not kept: `tasks/get`, `tasks/cancel` and
//!   `tasks/resubscribe` find none, and a message naming a `taskId` is refused.
//!
//! `/.well-known/agent-card.json` at the root is the card of the agent when the
//! worker serves exactly one; otherwise it is a `404` listing the agents' cards.
//!
//! What a client sends is read leniently (unknown fields are ignored); a body that is
//! not JSON-RPC gets a JSON-RPC error, never a failed connection.

use std::convert::Infallible;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use nexo_api::ResourceKey;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{CallError, Outcome, Served, Surface, check_conversation, check_message};
use crate::channels::conversation;
use crate::channels::deltas::{Streamed, until_answer};
use crate::http::HttpState;
use nexo_api::delta::ReplyDelta;

/// The protocol version this endpoint speaks, as the card names it.
const PROTOCOL_VERSION: &str = "0.3.0";
/// The `A2A-Version` values taken: a client of 0.3 may send none.
const VERSIONS: [&str; 2] = ["", "0.3"];
/// Largest JSON-RPC request body: a question is at most 64 KiB of text, escaped
/// JSON and the message around it stay well within this.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest `Host` header a card's URL is made from (a DNS name has at most 253).
const MAX_HOST_BYTES: usize = 261;
/// Longest `messageId` echoed back in a Task's history.
const MAX_MESSAGE_ID_BYTES: usize = 256;

// JSON-RPC and A2A error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
const TASK_NOT_FOUND: i64 = -32001;
const PUSH_NOTIFICATION_NOT_SUPPORTED: i64 = -32003;
const UNSUPPORTED_OPERATION: i64 = -32004;
const CONTENT_TYPE_NOT_SUPPORTED: i64 = -32005;
const EXTENDED_CARD_NOT_CONFIGURED: i64 = -32007;
const VERSION_NOT_SUPPORTED: i64 = -32009;

pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/a2a/{namespace}/{agent}", post(rpc))
        .route(
            "/a2a/{namespace}/{agent}/.well-known/agent-card.json",
            get(agent_card),
        )
        .route("/.well-known/agent-card.json", get(root_card))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// A JSON-RPC request, as far as it is read before the method is known.
#[derive(Deserialize)]
struct RpcRequest {
    jsonrpc: Option<String>,
    id: Option<Value>,
    method: Option<String>,
    #[serde(default)]
    params: Value,
}

/// `MessageSendParams`: what is read of it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendParams {
    message: InMessage,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InMessage {
    #[serde(default)]
    role: Option<String>,
    parts: Vec<InPart>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
}

#[derive(Deserialize)]
struct InPart {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// A JSON-RPC error that ends a request before the agent is asked.
struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn into_response(self, id: &Value) -> Response {
        axum::Json(json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": self.code, "message": self.message},
        }))
        .into_response()
    }
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// `POST /a2a/<namespace>/<agent>`.
async fn rpc(
    State(served): State<Served>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (id, request) = match read_request(&headers, &body) {
        Ok(read) => read,
        Err((id, error)) => {
            served.count(Surface::A2a, Outcome::Invalid);
            return error.into_response(&id);
        }
    };
    let agent = ResourceKey::new(&namespace, &name);
    if !served.agents().contains(&agent) {
        served.count(Surface::A2a, Outcome::UnknownAgent);
        let mut response = RpcError::new(
            UNSUPPORTED_OPERATION,
            format!("no agent `{agent}` is served here"),
        )
        .into_response(&id);
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let method = request.method.as_deref().unwrap_or_default();
    let streaming = match method {
        "message/send" => false,
        "message/stream" => true,
        _ => {
            served.count(Surface::A2a, Outcome::Invalid);
            return unsupported_method(method).into_response(&id);
        }
    };
    let exchange = match Exchange::read(request.params) {
        Ok(exchange) => exchange,
        Err(error) => {
            served.count(Surface::A2a, Outcome::Invalid);
            return error.into_response(&id);
        }
    };
    if streaming {
        stream(served, agent, exchange, id).await
    } else {
        let result = served
            .ask(
                Surface::A2a,
                &agent,
                &exchange.text,
                &exchange.context_id,
                None,
            )
            .await;
        match result {
            // Not sent at all: an error the client may simply try again, not a task.
            Err(error) if error.not_sent() => {
                RpcError::new(INTERNAL_ERROR, error.to_string()).into_response(&id)
            }
            result => axum::Json(rpc_result(&id, exchange.ended(&agent, result))).into_response(),
        }
    }
}

/// The request's id and envelope, or the error to answer (with the id, where one
/// was read).
fn read_request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Value, RpcRequest), (Value, RpcError)> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            Value::Null,
            RpcError::new(PARSE_ERROR, format!("invalid JSON: {e}")),
        )
    })?;
    let request: RpcRequest = serde_json::from_value(value).map_err(|e| {
        (
            Value::Null,
            RpcError::new(INVALID_REQUEST, format!("not a JSON-RPC request: {e}")),
        )
    })?;
    let id = match &request.id {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => {
            return Err((
                Value::Null,
                RpcError::new(INVALID_REQUEST, "`id` (a string or number) is required"),
            ));
        }
    };
    if request.jsonrpc.as_deref() != Some("2.0") {
        return Err((
            id,
            RpcError::new(INVALID_REQUEST, "`jsonrpc` must be \"2.0\""),
        ));
    }
    let version = headers
        .get("a2a-version")
        .map(|v| v.to_str().unwrap_or("?").trim())
        .unwrap_or_default();
    if !VERSIONS.contains(&version) {
        return Err((
            id,
            RpcError::new(
                VERSION_NOT_SUPPORTED,
                "this agent speaks A2A 0.3 (send `A2A-Version: 0.3`, or none)",
            ),
        ));
    }
    Ok((id, request))
}

/// The error for every method but `message/send` and `message/stream`.
fn unsupported_method(method: &str) -> RpcError {
    match method {
        "tasks/get" | "tasks/cancel" | "tasks/resubscribe" => RpcError::new(
            TASK_NOT_FOUND,
            "tasks end with their answer and are not kept",
        ),
        m if m.starts_with("tasks/pushNotificationConfig/") => RpcError::new(
            PUSH_NOTIFICATION_NOT_SUPPORTED,
            "push notifications are not supported",
        ),
        "agent/getAuthenticatedExtendedCard" => RpcError::new(
            EXTENDED_CARD_NOT_CONFIGURED,
            "there is no extended agent card",
        ),
        // A2A 1.0's names: its clients must say which version they speak.
        "SendMessage" | "SendStreamingMessage" | "GetTask" | "CancelTask" => RpcError::new(
            VERSION_NOT_SUPPORTED,
            "this agent speaks A2A 0.3: use `message/send` or `message/stream`",
        ),
        _ => RpcError::new(METHOD_NOT_FOUND, "method not found"),
    }
}

/// One question and the task that answers it.
struct Exchange {
    task_id: String,
    context_id: String,
    text: String,
    /// The client's message, as the task's history shows it.
    question: Value,
}

impl Exchange {
    fn read(params: Value) -> Result<Self, RpcError> {
        let params: SendParams = serde_json::from_value(params)
            .map_err(|e| RpcError::new(INVALID_PARAMS, format!("invalid params: {e}")))?;
        let message = params.message;
        if message.role.as_deref().is_some_and(|role| role != "user") {
            return Err(RpcError::new(
                INVALID_PARAMS,
                "`message.role` must be \"user\"",
            ));
        }
        if message.task_id.is_some() {
            return Err(RpcError::new(
                UNSUPPORTED_OPERATION,
                "tasks end with their answer; continue the conversation with `contextId` instead of `taskId`",
            ));
        }
        let mut texts = Vec::with_capacity(message.parts.len());
        for part in &message.parts {
            match (part.kind.as_deref(), &part.text) {
                (None | Some("text"), Some(text)) => texts.push(text.as_str()),
                _ => {
                    return Err(RpcError::new(
                        CONTENT_TYPE_NOT_SUPPORTED,
                        "only text parts are supported",
                    ));
                }
            }
        }
        let text = texts.join("\n");
        check_message(&text).map_err(|reason| RpcError::new(INVALID_PARAMS, reason))?;
        let context_id = match message.context_id {
            Some(id) => {
                check_conversation(&id).map_err(|reason| {
                    RpcError::new(INVALID_PARAMS, format!("`contextId`: {reason}"))
                })?;
                id
            }
            None => conversation::issue(),
        };
        let message_id = match message.message_id {
            Some(id) if id.len() <= MAX_MESSAGE_ID_BYTES => id,
            Some(_) => {
                return Err(RpcError::new(
                    INVALID_PARAMS,
                    format!("`messageId` has at most {MAX_MESSAGE_ID_BYTES} bytes"),
                ));
            }
            None => Uuid::new_v4().to_string(),
        };
        let task_id = Uuid::now_v7().to_string();
        let question = json!({
            "kind": "message",
            "role": "user",
            "messageId": message_id,
            "taskId": task_id,
            "contextId": context_id,
            "parts": [{"kind": "text", "text": text}],
        });
        Ok(Self {
            task_id,
            context_id,
            text,
            question,
        })
    }

    /// The agent's message in this task.
    fn agent_message(&self, text: &str) -> Value {
        json!({
            "kind": "message",
            "role": "agent",
            "messageId": Uuid::new_v4().to_string(),
            "taskId": self.task_id,
            "contextId": self.context_id,
            "parts": [{"kind": "text", "text": text}],
        })
    }

    fn status(state: &str, message: Option<Value>) -> Value {
        let mut status = json!({
            "state": state,
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        if let Some(message) = message {
            status["message"] = message;
        }
        status
    }

    fn answer_artifact(&self, answer: &str) -> Value {
        json!({
            "artifactId": format!("{}-answer", self.task_id),
            "name": "answer",
            "parts": [{"kind": "text", "text": answer}],
        })
    }

    /// A piece of the answer being written, as an update of the answer artifact.
    fn delta_event(&self, delta: &ReplyDelta) -> Value {
        json!({
            "kind": "artifact-update",
            "taskId": self.task_id,
            "contextId": self.context_id,
            "artifact": self.answer_artifact(&delta.text),
            "append": !delta.restart,
            "lastChunk": false,
        })
    }

    /// The task as it starts: the question in its history.
    fn submitted(&self) -> Value {
        json!({
            "kind": "task",
            "id": self.task_id,
            "contextId": self.context_id,
            "status": Self::status("submitted", None),
            "history": [self.question],
        })
    }

    fn status_update(&self, state: &str, message: Option<Value>, last: bool) -> Value {
        json!({
            "kind": "status-update",
            "taskId": self.task_id,
            "contextId": self.context_id,
            "status": Self::status(state, message),
            "final": last,
        })
    }

    /// The state, status message and (when answered) the answer's text.
    fn outcome(
        &self,
        agent: &ResourceKey,
        result: &Result<String, CallError>,
    ) -> (&'static str, Value) {
        match result {
            Ok(answer) => ("completed", self.agent_message(answer)),
            Err(error) => (
                "failed",
                self.agent_message(&format!("agent `{agent}`: {error}")),
            ),
        }
    }

    /// The task once it has ended, for `message/send`.
    fn ended(&self, agent: &ResourceKey, result: Result<String, CallError>) -> Value {
        let (state, message) = self.outcome(agent, &result);
        let mut task = json!({
            "kind": "task",
            "id": self.task_id,
            "contextId": self.context_id,
            "status": Self::status(state, Some(message.clone())),
            "history": [self.question, message],
        });
        if let Ok(answer) = &result {
            task["artifacts"] = json!([self.answer_artifact(answer)]);
        }
        task
    }

    /// The last events of `message/stream`: the answer (if any), then the final status.
    fn last_events(&self, agent: &ResourceKey, result: Result<String, CallError>) -> Vec<Value> {
        let (state, message) = self.outcome(agent, &result);
        let mut events = Vec::with_capacity(2);
        if let Ok(answer) = &result {
            events.push(json!({
                "kind": "artifact-update",
                "taskId": self.task_id,
                "contextId": self.context_id,
                "artifact": self.answer_artifact(answer),
                "append": false,
                "lastChunk": true,
            }));
        }
        events.push(self.status_update(state, Some(message), true));
        events
    }
}

/// `message/stream`: the events of the task, ending with its final status. While
/// the agent writes, its text comes as updates of the answer artifact: appended, or
/// replacing what came before where the text starts over (a new model step); the
/// final artifact update then replaces it with the whole answer. A client that goes
/// away drops the stream, and with it the wait for the answer.
async fn stream(served: Served, agent: ResourceKey, exchange: Exchange, id: Value) -> Response {
    let first = [
        exchange.submitted(),
        exchange.status_update("working", None, false),
    ];
    let exchange = std::sync::Arc::new(exchange);
    let watch = served.watch_reply().await;
    let answered = {
        let exchange = exchange.clone();
        let stream = watch.as_ref().map(|watch| watch.subject().to_owned());
        async move {
            let result = served
                .ask(
                    Surface::A2a,
                    &agent,
                    &exchange.text,
                    &exchange.context_id,
                    stream,
                )
                .await;
            exchange.last_events(&agent, result)
        }
    };
    let rest = match watch {
        Some(watch) => until_answer(watch, answered)
            .flat_map(move |item| {
                futures::stream::iter(match item {
                    Streamed::Delta(delta) => vec![exchange.delta_event(&delta)],
                    Streamed::Answer(events) => events,
                })
            })
            .boxed(),
        None => futures::stream::once(answered)
            .flat_map(futures::stream::iter)
            .boxed(),
    };
    let events = futures::stream::iter(first).chain(rest).map(move |result| {
        Ok::<_, Infallible>(Event::default().data(rpc_result(&id, result).to_string()))
    });
    // Comments while the agent thinks, so proxies do not take the stream for dead.
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /a2a/<namespace>/<agent>/.well-known/agent-card.json`.
async fn agent_card(
    State(served): State<Served>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let agent = ResourceKey::new(&namespace, &name);
    if !served.agents().contains(&agent) {
        return not_found(format!("no agent `{agent}` is served here"), Vec::new());
    }
    match base_url(&served, &headers) {
        Some(base) => axum::Json(card(&base, &agent)).into_response(),
        None => no_base_url(),
    }
}

/// `GET /.well-known/agent-card.json`: the only agent's card, or where the cards are.
async fn root_card(State(served): State<Served>, headers: HeaderMap) -> Response {
    let Some(base) = base_url(&served, &headers) else {
        return no_base_url();
    };
    match &*served.agents() {
        [agent] => axum::Json(card(&base, agent)).into_response(),
        agents => not_found(
            format!(
                "this worker serves {} agents; each has its own card",
                agents.len()
            ),
            agents
                .iter()
                .map(|agent| format!("{}/.well-known/agent-card.json", endpoint(&base, agent)))
                .collect(),
        ),
    }
}

fn not_found(error: String, cards: Vec<String>) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": error, "agentCards": cards })),
    )
        .into_response()
}

/// Where callers reach this worker: `worker.serve.publicUrl`, or the address the
/// request was sent to; `None` without a usable `Host` header.
fn base_url(served: &Served, headers: &HeaderMap) -> Option<String> {
    if let Some(url) = served.public_url() {
        return Some(url.to_owned());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= MAX_HOST_BYTES
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    host.map(|host| format!("http://{host}"))
}

fn no_base_url() -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "no usable Host header to name the agent's URL by; set worker.serve.publicUrl" })),
    )
        .into_response()
}

fn endpoint(base: &str, agent: &ResourceKey) -> String {
    format!("{base}/a2a/{}/{}", agent.namespace, agent.name)
}

/// The agent card of `agent`.
fn card(base: &str, agent: &ResourceKey) -> Value {
    let url = endpoint(base, agent);
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "name": agent.name,
        "description": format!("The nexo agent `{agent}`: send it a text message and it answers with text."),
        "url": url,
        "preferredTransport": "JSONRPC",
        "additionalInterfaces": [{"url": url, "transport": "JSONRPC"}],
        "version": env!("CARGO_PKG_VERSION"),
        "capabilities": {"streaming": true, "pushNotifications": false, "stateTransitionHistory": false},
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The worker's serve token (worker.serve.tokenEnv).",
            },
        },
        "security": [{"bearer": []}],
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{
            "id": "ask",
            "name": format!("Ask {}", agent.name),
            "description": format!("Ask the agent `{agent}` and get its answer. Send a self-contained message."),
            "tags": ["nexo"],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> Result<RpcRequest, (Value, i64)> {
        read_request(&HeaderMap::new(), body.as_bytes())
            .map(|(_, request)| request)
            .map_err(|(id, error)| (id, error.code))
    }

    #[test]
    fn malformed_requests_get_their_json_rpc_error() {
        assert_eq!(read("not json").err(), Some((Value::Null, PARSE_ERROR)));
        assert_eq!(read("[1, 2]").err(), Some((Value::Null, INVALID_REQUEST)));
        assert_eq!(
            read(r#"{"jsonrpc": "2.0", "method": "message/send"}"#).err(),
            Some((Value::Null, INVALID_REQUEST))
        );
        assert_eq!(
            read(r#"{"jsonrpc": "1.0", "id": 7, "method": "message/send"}"#).err(),
            Some((json!(7), INVALID_REQUEST))
        );
        assert_eq!(
            read(r#"{"jsonrpc": "2.0", "id": 7, "method": 3}"#).err(),
            Some((Value::Null, INVALID_REQUEST))
        );
        let request =
            read(r#"{"jsonrpc": "2.0", "id": "a", "method": "message/send", "future": 1}"#);
        assert!(request.is_ok(), "unknown fields are ignored");
    }

    #[test]
    fn other_protocol_versions_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("a2a-version", "1.0".parse().unwrap());
        let body = br#"{"jsonrpc": "2.0", "id": 1, "method": "SendMessage"}"#;
        let error = read_request(&headers, body).err().map(|(_, e)| e.code);
        assert_eq!(error, Some(VERSION_NOT_SUPPORTED));
        headers.insert("a2a-version", "0.3".parse().unwrap());
        assert!(read_request(&headers, body).is_ok());
    }

    fn exchange(params: Value) -> Result<Exchange, i64> {
        Exchange::read(params).map_err(|e| e.code)
    }

    #[test]
    fn messages_are_read_leniently_and_bounded() {
        let ok = exchange(json!({"message": {
            "kind": "message", "role": "user", "messageId": "m1", "contextId": "c1",
            "parts": [{"kind": "text", "text": "hello"}, {"text": "there", "metadata": {}}],
            "extensions": [], "somethingNew": true,
        }, "configuration": {"blocking": true}}))
        .unwrap();
        assert_eq!(ok.text, "hello\nthere");
        assert_eq!(ok.context_id, "c1");
        assert_eq!(ok.question["messageId"], "m1");
        let fresh =
            exchange(json!({"message": {"parts": [{"kind": "text", "text": "hi"}]}})).unwrap();
        assert!(conversation::is_well_formed(&fresh.context_id));

        for (params, code) in [
            (json!({}), INVALID_PARAMS),
            (json!({"message": {"parts": []}}), INVALID_PARAMS),
            (
                json!({"message": {"parts": [{"kind": "text", "text": " "}]}}),
                INVALID_PARAMS,
            ),
            (
                json!({"message": {"role": "agent", "parts": [{"text": "x"}]}}),
                INVALID_PARAMS,
            ),
            (
                json!({"message": {"parts": [{"kind": "file", "file": {"uri": "x"}}]}}),
                CONTENT_TYPE_NOT_SUPPORTED,
            ),
            (
                json!({"message": {"taskId": "t", "parts": [{"text": "x"}]}}),
                UNSUPPORTED_OPERATION,
            ),
            (
                json!({"message": {"contextId": "c".repeat(300), "parts": [{"text": "x"}]}}),
                INVALID_PARAMS,
            ),
            (
                json!({"message": {"parts": [{"text": "x".repeat(70_000)}]}}),
                INVALID_PARAMS,
            ),
        ] {
            assert_eq!(exchange(params.clone()).err(), Some(code), "{params}");
        }
    }

    #[test]
    fn the_card_names_the_endpoint_and_the_bearer_scheme() {
        let card = card(
            "https://agents.example.com",
            &ResourceKey::new("team", "echo"),
        );
        assert_eq!(card["url"], "https://agents.example.com/a2a/team/echo");
        assert_eq!(card["preferredTransport"], "JSONRPC");
        assert_eq!(card["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(card["security"][0]["bearer"], json!([]));
        assert_eq!(card["capabilities"]["streaming"], true);
    }
}
