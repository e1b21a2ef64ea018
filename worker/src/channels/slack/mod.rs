//! `slack`: Slack through the Events API over HTTP. Slack calls
//! `/v1/slack/<name>/events` (the app's Request URL) with a signature
//! (`X-Slack-Signature: v0=<HMAC-SHA256 of "v0:<timestamp>:<raw body>">`, checked
//! before the body is parsed, and refused when the timestamp is over five minutes
//! off: a replay). A person's `message` or `app_mention` goes to the agent once (by
//! `event_id`, and by channel and `ts`, since a mention in a channel the bot reads
//! comes as both); bot messages (ours too) and edits are ignored. Slack wants an
//! answer within 3 s: the handler only publishes, the turn runs elsewhere.
//!
//! Answers go to the message's thread (`conversation` is `<channel>:<thread ts>`) with
//! `chat.postMessage`, in mrkdwn, split in parts of [`MAX_PART_CHARS`]. While the
//! answer is written, its text is shown in a first posted message updated with
//! `chat.update` at most once per [`STREAM_UPDATE_INTERVAL`]; the answer then
//! replaces it.

mod api;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nexo_api::Envelope;
use nexo_api::spec::SlackSpec;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::deltas::ReplyDeltas;
use super::markup::{self, Dialect};
use super::seen::SeenEvents;
use super::{Channel, ChannelContext, DeliverError, signing, split};
use crate::secrets::Secrets;
use api::{ApiError, SlackApi};

/// Characters per posted message: Slack cuts `text` at 40 000 and advises at most
/// 4 000 (api.slack.com/methods/chat.postMessage#truncating).
pub(crate) const MAX_PART_CHARS: usize = 4000;
/// Oldest (or newest) request timestamp taken: Slack's advice against replays.
pub(crate) const MAX_CLOCK_SKEW_SECONDS: i64 = 5 * 60;
/// Least time between two `chat.update`s of one streamed answer (Slack allows
/// about one message update per second per channel).
pub(crate) const STREAM_UPDATE_INTERVAL: Duration = Duration::from_millis(1500);
/// Answers streamed at once on one instance; past this an answer comes whole.
const MAX_STREAMS: usize = 1024;
/// How long publishing a message may take before Slack is told to send it again:
/// Slack wants an answer within 3 s.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_TEXT_BYTES: usize = 64 * 1024;

pub struct Slack {
    context: ChannelContext,
    api: SlackApi,
    signing_secret: Option<String>,
    seen: Mutex<SeenEvents>,
    /// Answers being streamed, by the id of the message they answer.
    streams: Mutex<HashMap<Uuid, Stream>>,
}

struct Stream {
    shown: Arc<tokio::sync::Mutex<Shown>>,
    task: AbortHandle,
}

/// The message showing a streamed answer. Locked across each API call, so the
/// answer's delivery waits for a post in flight (and uses its `ts`) instead of
/// racing it.
#[derive(Default)]
struct Shown {
    ts: Option<String>,
    /// The answer came: nothing more is streamed.
    done: bool,
}

impl Slack {
    pub fn new(context: ChannelContext, spec: SlackSpec, secrets: &Secrets) -> Self {
        let read = |secret, what| context.read_secret(secrets, secret, what);
        let token = read(&spec.bot_token, "bot token");
        let signing_secret = read(&spec.signing_secret, "signing secret");
        if token.is_none() || signing_secret.is_none() {
            context.disconnected("a Slack secret is not set");
        }
        Self {
            api: SlackApi::new(&spec.api_base_url, token),
            context,
            signing_secret,
            seen: Mutex::new(SeenEvents::new()),
            streams: Mutex::default(),
        }
    }

    fn count(&self, event: &str) {
        self.context
            .metrics
            .platform_events
            .with_label_values(&[self.context.kind.as_str(), &self.context.key.name, event])
            .inc();
    }

    /// Checks the request's timestamp and signature; `Err` with why not.
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), (StatusCode, &'static str)> {
        let Some(secret) = &self.signing_secret else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "signing secret is not configured",
            ));
        };
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let timestamp = header("x-slack-request-timestamp")
            .ok_or((StatusCode::UNAUTHORIZED, "no X-Slack-Request-Timestamp"))?;
        let at: i64 = timestamp.parse().map_err(|_| {
            (
                StatusCode::UNAUTHORIZED,
                "malformed X-Slack-Request-Timestamp",
            )
        })?;
        if (now - at).abs() > MAX_CLOCK_SKEW_SECONDS {
            return Err((
                StatusCode::UNAUTHORIZED,
                "request timestamp is too old or too new",
            ));
        }
        let signature = header("x-slack-signature")
            .and_then(|v| v.strip_prefix("v0="))
            .ok_or((StatusCode::UNAUTHORIZED, "no X-Slack-Signature"))?;
        if !signing::matches(
            secret,
            &[b"v0:", timestamp.as_bytes(), b":", body],
            signature,
        ) {
            return Err((StatusCode::UNAUTHORIZED, "X-Slack-Signature does not match"));
        }
        Ok(())
    }

    async fn event(self: Arc<Self>, headers: HeaderMap, body: Bytes) -> Response {
        if let Err((status, reason)) = self.verify(&headers, &body, chrono::Utc::now().timestamp())
        {
            self.count("refused");
            return (status, reason).into_response();
        }
        self.context.connected("request verified", None);
        let request: wire::Request = match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(err) => {
                tracing::debug!(channel = %self.context.key, error = %err, "ignoring a malformed Slack request");
                self.count("ignored");
                return StatusCode::OK.into_response();
            }
        };
        match request {
            wire::Request::UrlVerification { challenge } => {
                axum::Json(serde_json::json!({ "challenge": challenge })).into_response()
            }
            wire::Request::EventCallback {
                event_id,
                team_id,
                event,
            } => self
                .callback(&event_id, &team_id, *event)
                .await
                .into_response(),
            wire::Request::Other => {
                self.count("ignored");
                StatusCode::OK.into_response()
            }
        }
    }

    async fn callback(
        self: &Arc<Self>,
        event_id: &str,
        team: &str,
        event: wire::Event,
    ) -> StatusCode {
        if !event.is_user_message() || event.text.len() > MAX_TEXT_BYTES {
            self.count("ignored");
            return StatusCode::OK;
        }
        let text = wire::without_leading_mentions(&event.text);
        if text.is_empty() {
            self.count("ignored");
            return StatusCode::OK;
        }
        let message_key = format!("{}:{}", event.channel, event.ts);
        {
            let mut seen = self.seen.lock().unwrap();
            if !seen.first(event_id) {
                self.count("duplicate");
                return StatusCode::OK;
            }
            if !seen.first(&message_key) {
                // The same message as `message` and as `app_mention`.
                self.count("duplicate");
                return StatusCode::OK;
            }
        }
        if !self.context.is_accepting() {
            self.forget(event_id, &message_key);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let thread = event.thread_ts.clone().unwrap_or_else(|| event.ts.clone());
        let user = event.user.clone().unwrap_or_default();
        let mut envelope = self.context.envelope(
            format!("{}:{thread}", event.channel),
            // Slack user ids are unique within a workspace.
            format!("{team}:{user}"),
            text.to_owned(),
        );
        // A message is its channel and timestamp, whether it came as `message` or as
        // `app_mention`, and to whichever worker.
        envelope.id = self
            .context
            .platform_id(&format!("{}:{}", event.channel, event.ts));
        for (key, value) in [
            ("slack.channel", &event.channel),
            ("slack.ts", &event.ts),
            ("slack.threadTs", &thread),
            ("slack.team", &team.to_owned()),
        ] {
            envelope.metadata.insert(key.to_owned(), value.clone());
        }
        let watching = self.streams.lock().unwrap().len() < MAX_STREAMS;
        let watch = match watching {
            true => self.context.watch_reply(&mut envelope).await,
            false => None,
        };
        let published =
            tokio::time::timeout(PUBLISH_TIMEOUT, self.context.publish_inbound(&envelope)).await;
        match published {
            Ok(Ok(())) => {
                self.count("message");
                if let Some(watch) = watch {
                    self.stream(envelope.id, event.channel, thread, watch);
                }
                StatusCode::OK
            }
            Ok(Err(err)) => {
                tracing::warn!(channel = %self.context.key, error = %err, "could not accept a Slack message; Slack sends it again");
                self.forget(event_id, &message_key);
                StatusCode::SERVICE_UNAVAILABLE
            }
            Err(_) => {
                // It may still be published: a retry is then dropped as a duplicate
                // only if this worker gets it, so it is not forgotten.
                tracing::warn!(channel = %self.context.key, "publishing a Slack message is slow; answering Slack first");
                StatusCode::OK
            }
        }
    }

    fn forget(&self, event_id: &str, message_key: &str) {
        let mut seen = self.seen.lock().unwrap();
        seen.forget(event_id);
        seen.forget(message_key);
    }

    /// Shows the answer to `message` as it is written: posted at the first delta,
    /// then updated at most once per [`STREAM_UPDATE_INTERVAL`].
    fn stream(
        self: &Arc<Self>,
        message: Uuid,
        channel: String,
        thread: String,
        mut watch: ReplyDeltas,
    ) {
        let shown = Arc::new(tokio::sync::Mutex::new(Shown::default()));
        let slack = self.clone();
        let state = shown.clone();
        // Entered under the lock, so the task's own removal comes after.
        let mut streams = self.streams.lock().unwrap();
        let task = tokio::spawn(async move {
            let mut text = String::new();
            let mut pending = false;
            let mut next_call = Instant::now();
            loop {
                let delta = if pending {
                    tokio::select! {
                        delta = watch.next() => delta,
                        () = tokio::time::sleep_until(next_call) => {
                            pending = false;
                            next_call = slack.show(&state, &channel, &thread, &text).await;
                            continue;
                        }
                    }
                } else {
                    watch.next().await
                };
                let Some(delta) = delta else { break };
                if delta.restart {
                    text.clear();
                }
                text.push_str(&delta.text);
                if text.trim().is_empty() {
                    continue;
                }
                if Instant::now() >= next_call {
                    next_call = slack.show(&state, &channel, &thread, &text).await;
                } else {
                    pending = true;
                }
            }
            slack.streams.lock().unwrap().remove(&message);
        });
        streams.insert(
            message,
            Stream {
                shown,
                task: task.abort_handle(),
            },
        );
    }

    /// Posts or updates the streamed message with `markdown` so far; when the next
    /// update may come.
    async fn show(
        &self,
        state: &tokio::sync::Mutex<Shown>,
        channel: &str,
        thread: &str,
        markdown: &str,
    ) -> Instant {
        let mut shown = state.lock().await;
        if shown.done {
            return Instant::now() + STREAM_UPDATE_INTERVAL;
        }
        let text = preview(markdown);
        let result = match &shown.ts {
            None => self
                .api
                .post_message(channel, thread, &text)
                .await
                .map(|ts| {
                    shown.ts = Some(ts);
                }),
            Some(ts) => self.api.update(channel, ts, &text).await,
        };
        let after = match result {
            Ok(()) => STREAM_UPDATE_INTERVAL,
            Err(ApiError::Retry { after, .. }) => after.max(STREAM_UPDATE_INTERVAL),
            Err(ApiError::Refused { reason }) => {
                tracing::debug!(channel = %self.context.key, reason, "could not show a streamed answer");
                STREAM_UPDATE_INTERVAL
            }
        };
        Instant::now() + after
    }

    fn outcome<T>(&self, result: Result<T, ApiError>) -> Result<T, ApiError> {
        match &result {
            Ok(_) => self.context.connected("message sent", None),
            Err(ApiError::Retry {
                down: true, reason, ..
            }) => self.context.disconnected(reason),
            Err(_) => {}
        }
        result
    }
}

/// The streamed text so far as mrkdwn, cut to one message.
fn preview(markdown: &str) -> String {
    let text = markup::convert(markdown, Dialect::Slack);
    if text.chars().count() <= MAX_PART_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_PART_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[async_trait]
impl Channel for Slack {
    fn context(&self) -> &ChannelContext {
        &self.context
    }

    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                &format!("/v1/slack/{}/events", self.context.key.name),
                post(
                    |State(slack): State<Arc<Slack>>, headers: HeaderMap, body: Bytes| {
                        slack.event(headers, body)
                    },
                ),
            )
            .with_state(self)
    }

    async fn close(&self) {
        for (_, stream) in self.streams.lock().unwrap().drain() {
            stream.task.abort();
        }
    }

    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError> {
        let Some((channel, thread)) = reply.conversation.split_once(':') else {
            return Err(DeliverError::Failed {
                reason: format!(
                    "`{}` is not a Slack conversation (<channel>:<thread ts>)",
                    reply.conversation
                ),
            });
        };
        let parts = split::split(
            &markup::convert(&reply.text, Dialect::Slack),
            MAX_PART_CHARS,
        );
        let stream = reply
            .correlation_id
            .and_then(|answers| self.streams.lock().unwrap().remove(&answers));
        // The streamed message, when there is one, shows the first part.
        let mut streamed = None;
        if let Some(stream) = stream {
            stream.task.abort();
            let mut shown = stream.shown.lock().await;
            shown.done = true;
            streamed = shown.ts.clone();
        }
        let mut parts = parts.iter();
        if let Some(ts) = streamed {
            let first = parts.next().map(String::as_str).unwrap_or(" ");
            if let Err(err) = self.outcome(self.api.update(channel, &ts, first).await) {
                // Put the stream back so that the retry updates the same message.
                if let (Some(answers), ApiError::Retry { .. }) = (reply.correlation_id, &err) {
                    let shown = Arc::new(tokio::sync::Mutex::new(Shown {
                        ts: Some(ts),
                        done: true,
                    }));
                    let task = tokio::spawn(async {}).abort_handle();
                    self.streams
                        .lock()
                        .unwrap()
                        .insert(answers, Stream { shown, task });
                }
                return Err(err.into());
            }
        }
        for part in parts {
            self.outcome(self.api.post_message(channel, thread, part).await)?;
        }
        Ok(())
    }
}
