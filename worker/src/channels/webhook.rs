//! `webhook`: an HTTP API for programs. `POST /v1/channels/<name>/messages` answers
//! with the agent's reply, or at once with a message id when the request carries
//! `Prefer: respond-async`; `GET /v1/channels/<name>/messages/<id>` then returns the
//! reply once it exists. With `Accept: text/event-stream` the answer is a stream of
//! Server-Sent Events: the reply's text as it is written (`delta` events), then the
//! `reply` event with the JSON the request would otherwise have got.

use crate::secrets::{self, Secrets};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{ACCEPT, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use nexo_api::Envelope;
use nexo_api::spec::WebhookSpec;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::deltas::{ReplyDeltas, Streamed, until_answer};
use super::{Channel, ChannelContext, DeliverError, InboundError};
use super::{conversation, signing};

/// Header carrying `sha256=<hex HMAC of the body>` when a signing secret is set.
pub const SIGNATURE_HEADER: &str = "x-nexo-signature";
/// Replies kept for `GET …/messages/<id>` after an asynchronous request, or a
/// synchronous one that timed out.
const KEPT_REPLIES: usize = 4096;
const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Longest `conversation` id a signed client may choose (a UUID has 36 characters).
pub const MAX_CONVERSATION_BYTES: usize = 256;
/// Synchronous requests waiting for their reply at once, per channel instance. Each
/// holds a connection and an entry until the reply or `replyTimeoutSeconds`; past this
/// a request is refused with `503` and `Retry-After` before anything is published, so
/// nothing is lost and memory stays bounded however many clients pile up.
pub const MAX_WAITING_REQUESTS: usize = 1024;
/// When a client refused over [`MAX_WAITING_REQUESTS`] may try again: a synchronous
/// request usually ends within seconds.
const WAITING_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Sender of an unsigned request: the conversation id is the only thing such a caller
/// proves it has (ids are issued by the server and cannot be guessed), so memories are
/// scoped to it and a caller cannot read another caller's by naming them.
const ANONYMOUS_SENDER_PREFIX: &str = "anonymous:";

pub struct Webhook {
    context: ChannelContext,
    spec: WebhookSpec,
    /// The signing secret, read when the channel was built (a rotated one restarts
    /// the channel); `None` when it is configured but not set.
    signing_secret: Option<String>,
    replies: Mutex<ReplyBook>,
    /// [`MAX_WAITING_REQUESTS`]; lower in tests.
    max_waiting: usize,
}

/// Who sent a request, as far as the channel can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The body is signed with the channel's secret: its `sender` and `conversation`
    /// are trusted.
    Signed,
    /// The channel has no signing secret: anyone can call it.
    Anonymous,
}

/// Waiters for synchronous requests, and the replies of asynchronous ones.
#[derive(Default)]
struct ReplyBook {
    /// Changed only through the `*_waiter` methods, which keep `waiting_gauge` true.
    waiting: HashMap<Uuid, oneshot::Sender<Envelope>>,
    /// `nexo_webhook_waiting_requests` of this instance.
    waiting_gauge: Option<IntGauge>,
    /// `None` while the agent has not answered yet.
    kept: HashMap<Uuid, Option<Envelope>>,
    order: VecDeque<Uuid>,
}

impl ReplyBook {
    fn add_waiter(&mut self, id: Uuid, waiter: oneshot::Sender<Envelope>) {
        if self.waiting.insert(id, waiter).is_none() {
            self.count_waiters(1);
        }
    }

    fn take_waiter(&mut self, id: &Uuid) -> Option<oneshot::Sender<Envelope>> {
        let waiter = self.waiting.remove(id);
        if waiter.is_some() {
            self.count_waiters(-1);
        }
        waiter
    }

    fn clear_waiters(&mut self) {
        let gone = i64::try_from(self.waiting.len()).unwrap_or(i64::MAX);
        self.waiting.clear();
        self.count_waiters(-gone);
    }

    /// Adds `change` to the gauge. Added and subtracted, not set: a restarted
    /// instance's old and new versions share the series while both hold requests.
    fn count_waiters(&self, change: i64) {
        if let Some(gauge) = &self.waiting_gauge {
            gauge.add(change);
        }
    }

    /// Forgets a kept reply (its message was never accepted).
    fn forget(&mut self, id: &Uuid) {
        if self.kept.remove(id).is_some() {
            self.order.retain(|kept| kept != id);
        }
    }

    fn keep(&mut self, id: Uuid, reply: Option<Envelope>) {
        if self.kept.insert(id, reply).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > KEPT_REPLIES {
            if let Some(old) = self.order.pop_front() {
                self.kept.remove(&old);
            }
        }
    }
}

/// Body of `POST /v1/channels/<name>/messages`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PostMessage {
    text: String,
    /// Who is speaking; defaults to `webhook`. Only on signed requests.
    #[serde(default)]
    sender: Option<String>,
    /// Continue a conversation; a new one is started when absent.
    #[serde(default)]
    conversation: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageAnswer {
    id: Uuid,
    conversation: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn problem(status: StatusCode, reason: impl Into<String>) -> Response {
    let (status, body) = problem_body(status, reason);
    (status, axum::Json(body)).into_response()
}

fn problem_body(status: StatusCode, reason: impl Into<String>) -> (StatusCode, serde_json::Value) {
    (status, json!({ "error": reason.into() }))
}

/// Whether the client asked for the answer as Server-Sent Events.
fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// The answer as Server-Sent Events: a `delta` event per delta of the reply's text
/// (the [`nexo_api::delta::ReplyDelta`] JSON), then one `reply` event whose data is
/// the JSON body the request would have had without streaming, its HTTP status in
/// `httpStatus`; then the stream ends. The status of the response itself is 200.
fn stream_answer(
    watch: ReplyDeltas,
    answered: impl Future<Output = (StatusCode, serde_json::Value)> + Send + 'static,
) -> Response {
    let events = until_answer(watch, answered).map(|item| {
        Ok::<_, Infallible>(match item {
            Streamed::Delta(delta) => Event::default()
                .event("delta")
                .data(String::from_utf8_lossy(&delta.to_json())),
            Streamed::Answer(answer) => reply_event(answer),
        })
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// [`stream_answer`] without deltas: the `reply` event alone.
fn stream_answer_alone(
    answered: impl Future<Output = (StatusCode, serde_json::Value)> + Send + 'static,
) -> Response {
    let events =
        futures::stream::once(answered).map(|answer| Ok::<_, Infallible>(reply_event(answer)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn reply_event((status, mut body): (StatusCode, serde_json::Value)) -> Event {
    body["httpStatus"] = json!(status.as_u16());
    Event::default().event("reply").data(body.to_string())
}

impl Webhook {
    /// The webhook `spec` describes, with its signing secret read from `secrets`.
    pub fn new(context: ChannelContext, spec: WebhookSpec, secrets: &Secrets) -> Self {
        let signing_secret = spec.signing_secret.as_ref().and_then(|secret| {
            secrets
                .read_optional(secret)
                .inspect_err(|err| tracing::error!(channel = %context.key, error = %err, "cannot read the webhook signing secret"))
                .ok()
                .flatten()
        });
        if let (Some(secret), None) = (&spec.signing_secret, &signing_secret) {
            tracing::error!(channel = %context.key, secret = %secrets::describe(secret), "webhook signing secret is not set; refusing requests");
        }
        let replies = ReplyBook {
            waiting_gauge: Some(
                context
                    .metrics
                    .webhook_waiting
                    .with_label_values(&[&context.key.name]),
            ),
            ..ReplyBook::default()
        };
        Self {
            context,
            spec,
            signing_secret,
            replies: Mutex::new(replies),
            max_waiting: MAX_WAITING_REQUESTS,
        }
    }

    /// Checks the HMAC signature when the channel has a signing secret.
    fn verify_signature(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Caller, (StatusCode, String)> {
        if self.spec.signing_secret.is_none() {
            return Ok(Caller::Anonymous);
        }
        let Some(secret) = &self.signing_secret else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "webhook signing secret is not configured".to_owned(),
            ));
        };
        let signature = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256="))
            .filter(|hex_sig| hex::decode(hex_sig).is_ok())
            .ok_or_else(|| {
                (
                    StatusCode::UNAUTHORIZED,
                    format!("missing or malformed `{SIGNATURE_HEADER}: sha256=<hex>` header"),
                )
            })?;
        signing::matches(secret, &[body], signature)
            .then_some(Caller::Signed)
            .ok_or_else(|| {
                (
                    StatusCode::UNAUTHORIZED,
                    "signature does not match the body".to_owned(),
                )
            })
    }

    async fn post_message(self: Arc<Self>, headers: HeaderMap, body: Bytes) -> Response {
        if !self.context.is_accepting() {
            return refused(&InboundError::Closed);
        }
        let caller = match self.verify_signature(&headers, &body) {
            Ok(caller) => caller,
            Err((status, reason)) => return problem(status, reason),
        };
        let request = match parse_post_message(&body, caller) {
            Ok(request) => request,
            Err((status, reason)) => return problem(status, reason),
        };
        let asynchronous = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            });
        let streaming = !asynchronous && wants_event_stream(&headers);

        let conversation = request.conversation.unwrap_or_else(conversation::issue);
        let sender = match caller {
            Caller::Signed => request.sender.unwrap_or_else(|| "webhook".to_owned()),
            Caller::Anonymous => format!("{ANONYMOUS_SENDER_PREFIX}{conversation}"),
        };
        let mut envelope = self
            .context
            .envelope(conversation.clone(), sender, request.text);
        envelope.metadata = request.metadata;
        let id = envelope.id;

        let waiter = {
            let mut book = self.replies.lock().unwrap();
            if asynchronous {
                book.keep(id, None);
                None
            } else if book.waiting.len() >= self.max_waiting {
                return too_many_waiting(self.max_waiting);
            } else {
                let (tx, rx) = oneshot::channel();
                book.add_waiter(id, tx);
                // From here on the entry leaves with this request: answered, timed out,
                // or dropped because the client went away.
                Some((
                    WaitGuard {
                        hook: self.clone(),
                        id,
                    },
                    rx,
                ))
            }
        };
        let watch = match streaming {
            true => self.context.watch_reply(&mut envelope).await,
            false => None,
        };
        if let Err(err) = self.context.publish_inbound(&envelope).await {
            // The guard, if any, removes the waiter.
            self.replies.lock().unwrap().forget(&id);
            return refused(&err);
        }
        let Some((guard, waiter)) = waiter else {
            return (
                StatusCode::ACCEPTED,
                axum::Json(MessageAnswer {
                    id,
                    conversation,
                    status: "pending",
                    reply: None,
                    error: None,
                }),
            )
                .into_response();
        };
        let answered = {
            let hook = self.clone();
            async move {
                let answer = hook.await_reply(id, conversation, waiter).await;
                drop(guard);
                answer
            }
        };
        match (streaming, watch) {
            (true, Some(watch)) => stream_answer(watch, answered),
            // Asked for a stream but the deltas cannot be watched: the reply alone, as
            // the stream's one event.
            (true, None) => stream_answer_alone(answered),
            (false, _) => {
                let (status, body) = answered.await;
                (status, axum::Json(body)).into_response()
            }
        }
    }

    /// The reply to `id`, waiting at most `replyTimeoutSeconds`: the status and body
    /// of the answer to a synchronous request.
    async fn await_reply(
        &self,
        id: Uuid,
        conversation: String,
        mut waiter: oneshot::Receiver<Envelope>,
    ) -> (StatusCode, serde_json::Value) {
        let timeout = Duration::from_secs(self.spec.reply_timeout_seconds);
        match tokio::time::timeout(timeout, &mut waiter).await {
            Ok(Ok(reply)) => answer(id, conversation, reply),
            Ok(Err(_)) => problem_body(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the worker stopped before answering message {id}"),
            ),
            Err(_) => {
                {
                    let mut book = self.replies.lock().unwrap();
                    if book.take_waiter(&id).is_some() {
                        // From now on the reply is kept for `GET …/messages/<id>`, as
                        // an asynchronous request's is.
                        book.keep(id, None);
                    } else if let Ok(reply) = waiter.try_recv() {
                        // It arrived just as the time ran out.
                        return answer(id, conversation, reply);
                    }
                }
                let poll = format!("/v1/channels/{}/messages/{id}", self.context.key.name);
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    json!({
                        "error": format!(
                            "no reply within {} s; the answer can be fetched with GET {poll}",
                            timeout.as_secs()
                        ),
                        "id": id,
                        "conversation": conversation,
                        "status": "pending",
                    }),
                )
            }
        }
    }

    fn get_message(&self, id: &str) -> Response {
        let Ok(id) = Uuid::parse_str(id) else {
            return problem(StatusCode::BAD_REQUEST, "message id is not a UUID");
        };
        let book = self.replies.lock().unwrap();
        match book.kept.get(&id) {
            None => problem(
                StatusCode::NOT_FOUND,
                "unknown message id (or its reply has expired)",
            ),
            Some(None) => (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "id": id, "status": "pending" })),
            )
                .into_response(),
            Some(Some(reply)) => {
                let (status, body) = answer(id, reply.conversation.clone(), reply.clone());
                (status, axum::Json(body)).into_response()
            }
        }
    }
}

/// Removes a synchronous request's waiter when the request ends, however it ends: the
/// handler's future is dropped when the client disconnects, and without this the entry
/// would stay until the reply came, or forever if it never did.
struct WaitGuard {
    hook: Arc<Webhook>,
    id: Uuid,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if let Ok(mut book) = self.hook.replies.lock() {
            book.take_waiter(&self.id);
        }
    }
}

/// The body of a `POST`, checked. `caller` decides which fields may be given:
/// `sender`, and a conversation id of the client's choosing, only on signed requests.
fn parse_post_message(body: &[u8], caller: Caller) -> Result<PostMessage, (StatusCode, String)> {
    let bad = |reason: String| (StatusCode::BAD_REQUEST, reason);
    let request: PostMessage =
        serde_json::from_slice(body).map_err(|err| bad(format!("invalid JSON body: {err}")))?;
    if request.text.trim().is_empty() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "`text` must not be empty".to_owned(),
        ));
    }
    if request.text.len() > MAX_TEXT_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("`text` is longer than {MAX_TEXT_BYTES} bytes"),
        ));
    }
    if let Some(conversation) = &request.conversation {
        if conversation.is_empty() {
            return Err(bad(
                "`conversation` must not be empty; leave it out to start a new one".to_owned(),
            ));
        }
        if conversation.len() > MAX_CONVERSATION_BYTES {
            return Err(bad(format!(
                "`conversation` is longer than {MAX_CONVERSATION_BYTES} bytes"
            )));
        }
        if caller == Caller::Anonymous && !conversation::is_well_formed(conversation) {
            return Err(bad(format!(
                "`conversation` must be an id this channel issued ({}) on an unsigned request; leave it out to start a new one",
                conversation::SHAPE
            )));
        }
    }
    if caller == Caller::Anonymous && request.sender.is_some() {
        return Err(bad(
            "`sender` is accepted only on signed requests (the channel needs a `signingSecret`); leave it out"
                .to_owned(),
        ));
    }
    Ok(request)
}

/// Checks a `POST` body as a signed (`signed`) or unsigned request's, for the fuzz
/// target; `true` when it is accepted.
#[doc(hidden)]
pub fn fuzz_post_body(body: &[u8], signed: bool) -> bool {
    let caller = if signed {
        Caller::Signed
    } else {
        Caller::Anonymous
    };
    parse_post_message(body, caller).is_ok()
}

/// 503 for a synchronous request over [`MAX_WAITING_REQUESTS`]; nothing was published.
fn too_many_waiting(limit: usize) -> Response {
    unavailable(
        format!(
            "{limit} requests are already waiting for a reply on this channel; send it again shortly, or with `Prefer: respond-async`"
        ),
        Some(WAITING_RETRY_AFTER),
    )
}

/// 503 for a message that was not accepted; `Retry-After` when sending it again can
/// succeed ([`InboundError::retry_after`]: shutting down, a full outbox).
fn refused(err: &InboundError) -> Response {
    unavailable(
        format!("could not accept the message: {err}"),
        err.retry_after(),
    )
}

/// 503 with `reason`, and `Retry-After` (whole seconds, at least 1) when given.
fn unavailable(reason: String, retry_after: Option<Duration>) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, reason);
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
    }
    response
}

/// 200 with the reply, or 502 when the agent answered with an error.
fn answer(id: Uuid, conversation: String, reply: Envelope) -> (StatusCode, serde_json::Value) {
    if reply.error.is_some() {
        let body = MessageAnswer {
            id,
            conversation,
            status: "failed",
            reply: None,
            error: Some(reply.text),
        };
        return (StatusCode::BAD_GATEWAY, to_value(body));
    }
    let body = MessageAnswer {
        id,
        conversation,
        status: "answered",
        reply: Some(reply.text),
        error: None,
    };
    (StatusCode::OK, to_value(body))
}

fn to_value(body: MessageAnswer) -> serde_json::Value {
    // A struct of strings serialises.
    serde_json::to_value(body).expect("answer serialises")
}

#[async_trait]
impl Channel for Webhook {
    fn context(&self) -> &ChannelContext {
        &self.context
    }

    fn routes(self: Arc<Self>) -> Router {
        let base = format!("/v1/channels/{}/messages", self.context.key.name);
        Router::new()
            .route(
                &base,
                post(
                    |State(hook): State<Arc<Webhook>>, headers: HeaderMap, body: Bytes| {
                        hook.post_message(headers, body)
                    },
                ),
            )
            .route(
                &format!("{base}/{{id}}"),
                get(
                    |State(hook): State<Arc<Webhook>>, Path(id): Path<String>| async move {
                        hook.get_message(&id)
                    },
                ),
            )
            .with_state(self)
    }

    async fn close(&self) {
        // Dropping the senders wakes every synchronous request with "no reply".
        self.replies.lock().unwrap().clear_waiters();
    }

    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError> {
        let Some(id) = reply.correlation_id else {
            return Ok(());
        };
        let mut book = self.replies.lock().unwrap();
        if let Some(waiter) = book.take_waiter(&id) {
            // The requester may have timed out and gone; nothing more to do then.
            let _ = waiter.send(reply);
        } else if book.kept.contains_key(&id) {
            book.keep(id, Some(reply));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::metrics::Metrics;
    use nexo_api::ResourceKey;
    use nexo_api::spec::{ChannelType, SecretRef};
    use tokio_util::sync::CancellationToken;

    fn signed(secret: &str, body: &[u8]) -> HeaderMap {
        let signature = format!("sha256={}", signing::sign(secret, &[body]));
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
        headers
    }

    /// The context of a webhook instance `default/api` on a local bus.
    fn test_context() -> ChannelContext {
        let broker = Arc::new(LocalBroker::new());
        let key = ResourceKey::new("default", "api");
        let connections = super::super::Connections::new(
            broker.clone(),
            "test".to_owned(),
            Metrics::new().channel_connected.clone(),
        );
        ChannelContext {
            connection: connections.report_for("webhook", key.clone()),
            key,
            kind: ChannelType::Webhook,
            delivery: super::super::Delivery::Broadcast,
            broker,
            metrics: Arc::new(Metrics::new()),
            intake: CancellationToken::new(),
        }
    }

    fn unsigned_webhook() -> Webhook {
        let context = test_context();
        Webhook::new(
            context,
            WebhookSpec::default(),
            &Secrets::new("/nonexistent"),
        )
    }

    /// Serves `webhook`'s routes on a free local port.
    async fn serve(webhook: Arc<Webhook>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = webhook.routes();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A synchronous `POST` written on a raw connection, left waiting for its reply.
    async fn waiting_request(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let body = r#"{"text":"hi"}"#;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /v1/channels/api/messages HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        client
    }

    /// Requests waiting, as `nexo_webhook_waiting_requests` says (checked against the
    /// map itself).
    fn waiting(webhook: &Webhook) -> usize {
        let book = webhook.replies.lock().unwrap();
        let gauge = book.waiting_gauge.as_ref().expect("the gauge is set").get();
        assert_eq!(usize::try_from(gauge).unwrap(), book.waiting.len());
        book.waiting.len()
    }

    /// Polls `condition` until it holds, failing after ten seconds.
    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_disconnects_leaves_no_waiter() {
        let webhook = Arc::new(unsigned_webhook());
        let addr = serve(webhook.clone()).await;
        let client = waiting_request(addr).await;
        until("the request waits", || waiting(&webhook) == 1).await;
        drop(client);
        until("the waiter is gone", || waiting(&webhook) == 0).await;
    }

    #[tokio::test]
    async fn requests_over_the_waiting_limit_get_503_with_retry_after() {
        let mut webhook = unsigned_webhook();
        webhook.max_waiting = 2;
        let webhook = Arc::new(webhook);
        let addr = serve(webhook.clone()).await;
        let _first = waiting_request(addr).await;
        let _second = waiting_request(addr).await;
        until("two requests wait", || waiting(&webhook) == 2).await;

        crate::tls::install_provider();
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/v1/channels/api/messages");
        let refused = client
            .post(&url)
            .body(r#"{"text":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 503);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("2 requests are already waiting"),
            "{body}"
        );
        assert_eq!(waiting(&webhook), 2);
        // An asynchronous request holds no waiter and is still taken.
        let accepted = client
            .post(&url)
            .header("prefer", "respond-async")
            .body(r#"{"text":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(accepted.status().as_u16(), 202);
    }

    /// The signing secret is read once, when the channel is built (a rotation
    /// restarts the channel), not on every request.
    #[test]
    fn the_signing_secret_is_read_when_the_channel_is_built() {
        let dir = std::env::temp_dir().join(format!("nexo-webhook-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = SecretRef::secret_key("hook", "secret");
        let file = dir.join(secret.secret_key_ref.as_ref().unwrap().mounted_file_name());
        std::fs::write(&file, "s3cret\n").unwrap();
        let context = test_context();
        let spec = WebhookSpec {
            signing_secret: Some(secret),
            ..Default::default()
        };
        let webhook = Webhook::new(context, spec, &Secrets::new(&dir));
        std::fs::remove_dir_all(&dir).unwrap();

        let body = br#"{"text":"hi"}"#;
        assert!(
            webhook
                .verify_signature(&signed("s3cret", body), body)
                .is_ok()
        );
        let (status, _) = webhook
            .verify_signature(&signed("other", body), body)
            .unwrap_err();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}
