//! Helpers shared by the worker's integration tests: a worker on a free port with a
//! temporary data directory, a local server speaking a model provider's wire format
//! (plain or streamed), and waiting on conditions with a deadline.

#![allow(dead_code)]

pub mod conformance;
pub mod embeddings;
pub mod nats;
pub mod pool;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod slack;
pub mod telegram;
pub mod whatsapp;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use nexo_worker::broker::{Broker, Message, Subscription};
use nexo_worker::{Application, Running};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use prometheus::Scrape;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A variable cargo sets for every test process: a worker started with
/// `admin_token_env: ADMIN_TOKEN_ENV` takes its value, [`ADMIN_TOKEN`], as the admin
/// token.
pub const ADMIN_TOKEN_ENV: &str = "CARGO_PKG_NAME";
pub const ADMIN_TOKEN: &str = env!("CARGO_PKG_NAME");

/// Likewise for a webhook with `signingSecret: {env: WEBHOOK_SECRET_ENV}`: its
/// secret is [`WEBHOOK_SECRET`] (see [`TestWorker::post_signed_message`]).
pub const WEBHOOK_SECRET_ENV: &str = "CARGO_PKG_NAME";
pub const WEBHOOK_SECRET: &str = env!("CARGO_PKG_NAME");

/// `X-Nexo-Signature` of `body` under `secret`.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Polls `check` until it returns `Some`, failing the test after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_within(DEADLINE, what, check).await
}

/// Like [`wait_for`], for conditions that take longer than `DEADLINE` (recovery after a
/// broker outage: reconnect, backoffs, renewed pulls).
pub async fn wait_for_within<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("nexo-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Process settings of a [`TestWorker`].
pub struct WorkerOptions {
    pub drain_seconds: u64,
    /// Variable holding the admin token; unset by default, so the admin API is off.
    pub admin_token_env: &'static str,
    /// The `worker.broker` value, as flow YAML.
    pub broker: String,
    /// More lines of the `worker:` block (each indented by two spaces), such as
    /// `  catalogFile: /path\n`.
    pub worker_extra: String,
    /// Messages (subject, payload) stored in the outbox before the worker starts, as
    /// a crash leaves them.
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Data directory to use (kept after the worker stops) instead of a fresh one.
    pub data_dir: Option<PathBuf>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            drain_seconds: 5,
            admin_token_env: "NEXO_TEST_ADMIN_TOKEN_UNSET",
            broker: "{type: local}".to_owned(),
            worker_extra: String::new(),
            outbox: Vec::new(),
            data_dir: None,
        }
    }
}

/// A worker started in this process from YAML. `{data_dir}` in the YAML is replaced
/// with a temporary directory; the HTTP server listens on a free port.
pub struct TestWorker {
    pub addr: SocketAddr,
    pub broker: Arc<dyn Broker>,
    pub shutdown: CancellationToken,
    pub running: Option<Running>,
    pub http: reqwest::Client,
    _dir: TempDir,
}

impl TestWorker {
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(WorkerOptions::default(), yaml).await
    }

    pub async fn start_with_drain(drain_seconds: u64, yaml: &str) -> Self {
        Self::start_with(
            WorkerOptions {
                drain_seconds,
                ..Default::default()
            },
            yaml,
        )
        .await
    }

    pub async fn start_with(options: WorkerOptions, yaml: &str) -> Self {
        let dir = TempDir::new();
        let data_dir = options.data_dir.as_deref().unwrap_or(dir.path());
        let yaml = format!(
            "worker:\n  dataDir: {}\n  http:\n    listen: 127.0.0.1:0\n  drainTimeoutSeconds: {}\n  admin:\n    tokenEnv: {}\n  broker: {}\n{}{yaml}",
            data_dir.display(),
            options.drain_seconds,
            options.admin_token_env,
            options.broker,
            options.worker_extra,
        );
        let config = nexo_worker::config::parse(Path::new("test.yaml"), &yaml, |_| None)
            .unwrap_or_else(|e| panic!("test config is valid: {e}"));
        let app = Application::new(config).await.expect("application builds");
        let broker = app.broker();
        for (subject, payload) in &options.outbox {
            app.queue().enqueue(subject, None, payload).await.unwrap();
        }
        let shutdown = CancellationToken::new();
        let running = app.start(shutdown.clone()).await.expect("worker starts");
        Self {
            addr: running.addr,
            broker,
            shutdown,
            running: Some(running),
            http: http_client(),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GETs `path` and returns status and JSON body.
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        get_json(&self.http, &self.url(path)).await
    }

    /// POSTs a webhook message and returns status and JSON body.
    pub async fn post_message(&self, channel: &str, body: Value) -> (StatusCode, Value) {
        post_message(&self.http, &self.url(""), channel, body).await
    }

    /// [`post_async`] to this worker: the id of the accepted message.
    pub async fn post_async(&self, channel: &str, body: Value) -> String {
        post_async(&self.http, &self.url(""), channel, body).await
    }

    /// [`answer_of`] on this worker.
    pub async fn answer_of(&self, channel: &str, id: &str) -> Value {
        answer_of(&self.http, &self.url(""), channel, id).await
    }

    /// POSTs a webhook message signed with [`WEBHOOK_SECRET`] (so `sender` and a
    /// conversation id of the test's choosing are taken) and returns status and body.
    pub async fn post_signed_message(&self, channel: &str, body: Value) -> (StatusCode, Value) {
        let body = body.to_string();
        let request = self
            .http
            .post(self.url(&format!("/v1/channels/{channel}/messages")))
            .header(
                "x-nexo-signature",
                webhook_signature(WEBHOOK_SECRET, body.as_bytes()),
            )
            .body(body);
        json_answer(request).await
    }

    /// The samples of `/metrics`.
    pub async fn metrics(&self) -> Scrape {
        let response = self.http.get(self.url("/metrics")).send().await;
        Scrape::parse(&response.expect("worker answers").text().await.unwrap())
    }

    /// A request to the admin API at `path` (such as `/admin/dlq`) with the bearer
    /// token of a worker started with `admin_token_env: ADMIN_TOKEN_ENV`.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Waits until `/metrics` has the sample `name` with exactly `labels` and `value`
    /// (such as `nexo_memory_items`, `[("agent", "default/a")]`, 2), failing the test
    /// after `DEADLINE`.
    pub async fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        wait_for(
            &format!("{name}{labels:?} = {value} in /metrics"),
            || async { (self.metrics().await.value(name, labels) == Some(value)).then_some(()) },
        )
        .await;
    }

    /// The dead letters `GET /admin/dlq` lists (admin token as for [`TestWorker::admin`]).
    pub async fn dead_letters(&self) -> Vec<Value> {
        let response = self
            .admin(reqwest::Method::GET, "/admin/dlq")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.unwrap();
        body["deadLetters"].as_array().unwrap().clone()
    }

    /// Cancels the worker and waits for it to stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(DEADLINE, running.wait())
                .await
                .expect("worker stops in time")
                .expect("worker stops cleanly");
        }
    }
}

/// GETs `url` and returns status and JSON body.
pub async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    json_answer(client.get(url)).await
}

/// POSTs a webhook message to the worker at `base` and returns status and JSON body.
pub async fn post_message(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    body: Value,
) -> (StatusCode, Value) {
    let url = format!("{base}/v1/channels/{channel}/messages");
    json_answer(client.post(url).json(&body)).await
}

/// The `agents:` block of a scripted `concierge` that asks `researcher` (through its
/// delegation tool) about every message, and a `researcher` answering
/// `researcher_reply` (`{{input}}` is the concierge's question).
pub fn concierge_and_researcher(researcher_reply: &str) -> String {
    format!(
        r#"agents:
  - name: concierge
    spec:
      delegates: [researcher]
      model:
        provider: scripted
        script:
          - toolCall: {{name: ask_researcher, arguments: {{message: "look up {{{{input}}}}"}}}}
            reply: "researcher says: {{{{tool_result}}}}"
  - name: researcher
    spec:
      model:
        provider: scripted
        script:
          - reply: "{researcher_reply}"
"#
    )
}

/// An entry of the `agents:` block: agent `name`, whose turn always fails (it is
/// still calling tools when its one step is used up).
pub fn agent_whose_turn_fails(name: &str) -> String {
    format!(
        r#"  - name: {name}
    spec:
      tools: [current_time]
      limits: {{maxSteps: 1}}
      model:
        provider: scripted
        script:
          - toolCall: {{name: current_time}}
            reply: "never"
"#
    )
}

/// Replaces `path` with `text` at once (write beside it, then rename), as editors
/// save and as a ConfigMap update swaps its files: a reader never sees half a file.
pub fn replace_file(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(staged, path).unwrap();
}

/// POSTs a webhook message with `Prefer: respond-async`; checks it is accepted (`202`)
/// and returns the message id to fetch the answer with.
pub async fn post_async(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    body: Value,
) -> String {
    let url = format!("{base}/v1/channels/{channel}/messages");
    let request = client
        .post(url)
        .header("prefer", "respond-async")
        .json(&body);
    let (status, accepted) = json_answer(request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["status"], "pending", "{accepted}");
    accepted["id"].as_str().expect("a message id").to_owned()
}

/// Waits until `GET …/messages/<id>` of `channel` has the agent's answer (status
/// `answered`) and returns it.
pub async fn answer_of(client: &reqwest::Client, base: &str, channel: &str, id: &str) -> Value {
    let url = format!("{base}/v1/channels/{channel}/messages/{id}");
    wait_for(&format!("the answer at GET {url}"), || async {
        let (status, body) = get_json(client, &url).await;
        (status == StatusCode::OK && body["status"] == "answered").then_some(body)
    })
    .await
}

async fn json_answer(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("worker answers");
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    (status, response.json().await.expect("JSON body"))
}

/// An HTTP client for talking to the worker (plain HTTP; the TLS provider is only
/// installed because reqwest insists on one).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// What the fake model server answers to one request.
///
/// A request whose body says `"stream": true` is answered in the provider's SSE
/// wire format (see [`openai_events`], [`anthropic_events`]): `body` converted into
/// events, or `events` when the test scripts them. A non-2xx `status` is always a
/// plain JSON answer, as the providers reject a request before any stream starts.
pub struct FakeReply {
    /// Waited before the response starts (its headers): the time to the first byte.
    pub delay: Duration,
    pub status: StatusCode,
    pub body: Value,
    /// Events a streaming request gets instead of `body` converted (see
    /// [`FakeReply::events`]).
    pub events: Option<Vec<Value>>,
    /// When set, the last event waits until this is notified (see
    /// [`FakeReply::hold_last_until`]).
    pub hold_last: Option<Arc<Notify>>,
    /// The connection breaks after the events instead of the body ending cleanly.
    pub cut_off: bool,
}

impl FakeReply {
    /// A plain text answer in chat-completions format.
    pub fn text(text: &str) -> Self {
        Self::message(json!({"role": "assistant", "content": text}))
    }

    /// An answer that calls one tool.
    pub fn tool_call(id: &str, name: &str, arguments: Value) -> Self {
        Self::message(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()}
            }]
        }))
    }

    fn message(message: Value) -> Self {
        Self::ok(json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        }))
    }

    /// An Anthropic Messages answer made of content blocks.
    pub fn anthropic(content: Value) -> Self {
        Self::ok(json!({
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": "test-model",
            "content": content,
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 3}
        }))
    }

    /// A streamed answer of exactly these events, in order: for OpenAI each is a
    /// chunk's JSON (a JSON string is sent as it is, so `json!("[DONE]")` is
    /// `data: [DONE]`); for Anthropic each is an event's JSON, its `type` also the
    /// SSE `event:` name. Nothing is added: end with `[DONE]` / `message_stop`
    /// yourself.
    pub fn events(events: Vec<Value>) -> Self {
        Self {
            events: Some(events),
            ..Self::ok(Value::Null)
        }
    }

    fn ok(body: Value) -> Self {
        Self {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            body,
            events: None,
            hold_last: None,
            cut_off: false,
        }
    }

    /// A provider refusing the request with `status` (a 429, a 500, …) before any
    /// stream starts.
    pub fn failing(status: StatusCode) -> Self {
        Self {
            status,
            ..Self::text("")
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Streams every event but the last at once and sends the last only after
    /// `gate` is notified (`gate.notify_one()`, which may come first: the permit is
    /// kept), so a test sees what reached a user before the model finished.
    pub fn hold_last_until(mut self, gate: Arc<Notify>) -> Self {
        self.hold_last = Some(gate);
        self
    }

    /// Breaks the connection after the events (no clean end of the body), as a
    /// dropped connection does.
    pub fn cut_off(mut self) -> Self {
        self.cut_off = true;
        self
    }
}

/// A chat-completions answer (`FakeReply::text`, `FakeReply::tool_call` or one of the
/// same shape) as the chunks OpenAI streams: the role, the content word by word,
/// each tool call's id and name then its arguments in fragments of a few
/// characters, the finish reason, the usage (`choices: []`), then `[DONE]`.
pub fn openai_events(body: &Value) -> Vec<Value> {
    let chunk = |choices: Value| {
        json!({
            "id": body["id"].as_str().unwrap_or("chatcmpl-test"),
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "test-model",
            "choices": choices,
            "usage": null,
        })
    };
    let delta = |delta: Value| chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]));
    let choice = &body["choices"][0];
    let message = &choice["message"];
    let mut events = vec![delta(json!({"role": "assistant", "content": ""}))];
    if let Some(text) = message["content"].as_str() {
        events.extend(words(text).map(|word| delta(json!({"content": word}))));
    }
    for (index, call) in message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        events.push(delta(json!({"tool_calls": [{
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}
        }]})));
        let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
        events.extend(fragments(arguments).into_iter().map(|fragment| {
            delta(json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}))
        }));
    }
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]),
    ));
    if !body["usage"].is_null() {
        let mut usage = chunk(json!([]));
        usage["usage"] = body["usage"].clone();
        events.push(usage);
    }
    events.push(json!("[DONE]"));
    events
}

/// An Anthropic Messages answer (`FakeReply::anthropic` or one of the same shape) as
/// the events Anthropic streams: `message_start` with the input usage, a `ping`,
/// each content block as start, deltas (text word by word, a tool's input JSON in
/// fragments of a few characters) and stop, `message_delta` with the stop reason and
/// output tokens, then `message_stop`.
pub fn anthropic_events(body: &Value) -> Vec<Value> {
    let usage = &body["usage"];
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut message = body.clone();
    message["content"] = json!([]);
    message["stop_reason"] = Value::Null;
    message["usage"] = start_usage;
    let mut events = vec![
        json!({"type": "message_start", "message": message}),
        json!({"type": "ping"}),
    ];
    for (index, block) in body["content"].as_array().into_iter().flatten().enumerate() {
        let delta =
            |delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
        match block["type"].as_str() {
            Some("tool_use") => {
                let mut start = block.clone();
                start["input"] = json!({});
                events.push(
                    json!({"type": "content_block_start", "index": index, "content_block": start}),
                );
                let input = block["input"].to_string();
                events.extend(fragments(&input).into_iter().map(|fragment| {
                    delta(json!({"type": "input_json_delta", "partial_json": fragment}))
                }));
            }
            _ => {
                events.push(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}));
                let text = block["text"].as_str().unwrap_or_default();
                events.extend(
                    words(text).map(|word| delta(json!({"type": "text_delta", "text": word}))),
                );
            }
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({
        "type": "message_delta",
        "delta": {"stop_reason": body["stop_reason"], "stop_sequence": null},
        "usage": {"output_tokens": usage["output_tokens"]}
    }));
    events.push(json!({"type": "message_stop"}));
    events
}

/// Each word with the space after it, so the pieces join to `text`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(' ')
}

/// `text` in pieces of at most five characters.
fn fragments(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(5)
        .map(|piece| piece.iter().collect())
        .collect()
}

/// Which provider's wire format a [`FakeModel`] speaks.
#[derive(Clone, Copy)]
enum Wire {
    OpenAi,
    Anthropic,
}

impl Wire {
    /// One event's bytes on the wire.
    fn sse(self, event: &Value) -> Bytes {
        let data = match event {
            Value::String(raw) => raw.clone(),
            other => other.to_string(),
        };
        Bytes::from(match (self, event["type"].as_str()) {
            (Wire::Anthropic, Some(name)) => format!("event: {name}\ndata: {data}\n\n"),
            _ => format!("data: {data}\n\n"),
        })
    }

    fn events(self, body: &Value) -> Vec<Value> {
        match self {
            Wire::OpenAi => openai_events(body),
            Wire::Anthropic => anthropic_events(body),
        }
    }
}

/// The streamed response of `reply`.
fn sse_response(wire: Wire, reply: FakeReply) -> Response {
    let mut events = reply.events.unwrap_or_else(|| wire.events(&reply.body));
    let last = events.pop();
    let (gate, cut_off) = (reply.hold_last, reply.cut_off);
    let first = futures::stream::iter(events.into_iter().map(move |e| Ok(wire.sse(&e))));
    let rest = futures::stream::once(async move {
        if let Some(gate) = gate {
            gate.notified().await;
        }
        last.map(|e| wire.sse(&e))
    })
    .filter_map(|event| async move { event.map(Ok) });
    // An error from the body makes hyper drop the connection, and with it what it
    // has not written yet: one pending poll first has it flush the events.
    let end = futures::stream::once(async move {
        tokio::task::yield_now().await;
        cut_off.then(|| {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "stream cut off",
            ))
        })
    })
    .filter_map(|end| async move { end });
    let body = axum::body::Body::from_stream(first.chain(rest).chain(end));
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        body,
    )
        .into_response()
}

type Handler = dyn Fn(&Value) -> FakeReply + Send + Sync;
/// Each request body with its `Authorization` header.
type Recorded = Arc<Mutex<Vec<(Value, Option<String>)>>>;

/// A local HTTP server speaking a model provider's wire format (OpenAI chat
/// completions or Anthropic Messages, plain JSON or streamed as SSE when the request
/// asks `"stream": true`), answering with `handler` and recording every request body
/// and its credentials header.
#[derive(Clone)]
pub struct FakeModel {
    pub base_url: String,
    pub requests: Recorded,
    /// Most requests it was answering at the same time.
    pub peak_in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeModel {
    /// `POST /v1/chat/completions`; `base_url` ends in `/v1` as OpenAI's does.
    pub async fn openai(handler: impl Fn(&Value) -> FakeReply + Send + Sync + 'static) -> Self {
        let mut model = Self::serve(
            "/v1/chat/completions",
            "authorization",
            Wire::OpenAi,
            handler,
        )
        .await;
        model.base_url.push_str("/v1");
        model
    }

    /// `POST /v1/messages`; `base_url` is the host, as Anthropic's is.
    pub async fn anthropic(handler: impl Fn(&Value) -> FakeReply + Send + Sync + 'static) -> Self {
        Self::serve("/v1/messages", "x-api-key", Wire::Anthropic, handler).await
    }

    async fn serve(
        path: &'static str,
        key_header: &'static str,
        wire: Wire,
        handler: impl Fn(&Value) -> FakeReply + Send + Sync + 'static,
    ) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = (Arc::new(handler) as Arc<Handler>, requests.clone());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak_in_flight = Arc::new(AtomicUsize::new(0));
        let peak = peak_in_flight.clone();
        let app = axum::Router::new()
            .route(
                path,
                post(
                    move |State((handler, requests)): State<(Arc<Handler>, Recorded)>,
                          headers: axum::http::HeaderMap,
                          Json(body): Json<Value>| async move {
                        let auth = headers
                            .get(key_header)
                            .map(|v| v.to_str().unwrap().to_owned());
                        requests.lock().unwrap().push((body.clone(), auth));
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let reply = handler(&body);
                        tokio::time::sleep(reply.delay).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        let streams = body["stream"] == true && reply.status.is_success();
                        let response: Response = if streams {
                            sse_response(wire, reply)
                        } else {
                            (reply.status, Json(reply.body)).into_response()
                        };
                        response
                    },
                ),
            )
            .with_state(state);
        Self {
            base_url: serve_locally(app).await,
            requests,
            peak_in_flight,
        }
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn request(&self, index: usize) -> Value {
        self.requests.lock().unwrap()[index].0.clone()
    }
}

/// Serves `app` on a free local port in the background; returns `http://<addr>`.
pub async fn serve_locally(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The text of the latest user message in a chat-completions request.
pub fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Whether the request already carries tool results.
pub fn has_tool_result(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["role"] == "tool")
}

/// The next message of `subscription`, failing the test (naming `what`) after
/// `DEADLINE` or when the subscription ends.
pub async fn next_message(subscription: &mut Subscription, what: &str) -> Message {
    match tokio::time::timeout(DEADLINE, subscription.next()).await {
        Ok(Some(message)) => message,
        Ok(None) => panic!("{what}: subscription closed"),
        Err(_) => panic!("{what}: nothing received within {DEADLINE:?}"),
    }
}

/// Reads JSON messages from `subscription` until one satisfies `wanted`; every
/// message read on the way is returned too, in order.
pub async fn read_until(
    subscription: &mut Subscription,
    mut wanted: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let message = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("no matching message within {DEADLINE:?}; seen {seen:#?}"))
            .expect("subscription open");
        let value: Value = serde_json::from_slice(&message.payload).expect("JSON message");
        let done = wanted(&value);
        seen.push(value);
        if done {
            return seen;
        }
    }
}

/// The Chromium the browser tests drive: `NEXO_CHROMIUM`, else `chromium` on the
/// `PATH`. Without one the test fails (never skips): `scripts/test.sh` installs it.
pub fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NEXO_CHROMIUM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|candidate| candidate.is_file())
        })
        .expect("Chromium is required for the browser tests: run ./scripts/test.sh (it installs Chromium), or set NEXO_CHROMIUM")
}

/// An OpenAI fake whose every answer is `text`, streamed with its last word held
/// back until the returned gate is notified: what reached a user before that came
/// before the model finished.
pub async fn model_holding_back_its_last_chunk(text: &str) -> (FakeModel, Arc<Notify>) {
    let gate = Arc::new(Notify::new());
    let model = FakeModel::openai({
        let (gate, text) = (gate.clone(), text.to_owned());
        move |_| {
            // The answer's last word ends the stream (with the finish reason in its
            // chunk, as some servers send it) and is what is held back: holding only
            // the `[DONE]` after the finish would let every word through, and a test
            // looking for partial text would pass or fail by timing.
            let mut events = openai_events(&FakeReply::text(&text).body);
            let last_word = events
                .iter()
                .rposition(|e| {
                    e["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|w| !w.is_empty())
                })
                .expect("the answer has words");
            events.truncate(last_word + 1);
            events[last_word]["choices"][0]["finish_reason"] = json!("stop");
            FakeReply::events(events).hold_last_until(gate.clone())
        }
    })
    .await;
    (model, gate)
}

/// An agent `writer` answering with the OpenAI provider at `base_url`: the
/// `agents:` block of a config.
pub fn openai_writer(base_url: &str) -> String {
    format!(
        "agents:
  - name: writer
    spec:
      model:
        provider: openai
        model: test-model
        baseUrl: {base_url}
        apiKey: {{env: CARGO_PKG_NAME}}
        timeoutSeconds: 10
        maxRetries: 0
"
    )
}
