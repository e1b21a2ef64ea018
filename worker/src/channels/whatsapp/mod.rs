//! `whatsapp`: WhatsApp through Meta's Cloud API. Meta calls
//! `/v1/whatsapp/<name>/webhook`: a `GET` to verify it (the configured verify token,
//! its challenge echoed) and a `POST` per batch of events, signed with the app secret
//! (`X-Hub-Signature-256`, checked on the raw body before it is parsed). Text
//! messages and button or list choices go to the agent, once each (by message id);
//! delivery statuses are only counted. Each accepted message is marked read with the
//! typing indicator. Answers go out as text (WhatsApp markup, split at 4096
//! characters) with `POST /<version>/<phone number id>/messages`.
//!
//! The 24-hour customer service window: a free-form answer to a user who wrote
//! longer ago is refused by Graph (error 131047); the configured template is sent
//! instead, or the answer fails (dead-letter queue). Graph is the one place that
//! knows the window for sure, whichever worker delivers the answer.

mod graph;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nexo_api::Envelope;
use nexo_api::spec::WhatsappSpec;
use subtle::ConstantTimeEq;

use super::markup::{self, Dialect};
use super::seen::SeenEvents;
use super::{Channel, ChannelContext, DeliverError, signing, split};
use crate::secrets::Secrets;
use graph::{Graph, GraphError};

/// Longest text message WhatsApp takes, in characters.
pub(crate) const MAX_TEXT_CHARS: usize = 4096;
/// Most reply buttons on one interactive message, and the longest title of one.
// Reply buttons are sent by the flows (coming next), not by `deliver`.
#[allow(dead_code)]
pub const MAX_BUTTONS: usize = 3;
#[allow(dead_code)]
const MAX_BUTTON_TITLE_CHARS: usize = 20;
#[allow(dead_code)]
const MAX_BUTTON_ID_CHARS: usize = 256;
/// Longest `hub.challenge` echoed (Meta's are a few dozen digits).
const MAX_CHALLENGE_BYTES: usize = 256;
/// Longest text taken from a user, in bytes (WhatsApp's own limit is 4096 characters).
const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Waits inside one delivery before a later part of a long answer is sent again
/// (its earlier parts have gone out, so the whole reply is not retried).
const PART_RETRIES: usize = 3;
const MAX_PART_WAIT: Duration = Duration::from_secs(30);

pub struct Whatsapp {
    context: ChannelContext,
    spec: WhatsappSpec,
    graph: Graph,
    app_secret: Option<String>,
    verify_token: Option<String>,
    seen: Mutex<SeenEvents>,
}

/// The query of the verification `GET` (`hub.mode`, `hub.verify_token`, `hub.challenge`).
struct Verification {
    mode: Option<String>,
    verify_token: Option<String>,
    challenge: Option<String>,
}

impl Whatsapp {
    pub fn new(context: ChannelContext, spec: WhatsappSpec, secrets: &Secrets) -> Self {
        let read = |secret, what| context.read_secret(secrets, secret, what);
        let token = read(&spec.access_token, "access token");
        let app_secret = read(&spec.app_secret, "app secret");
        let verify_token = read(&spec.verify_token, "verify token");
        if token.is_none() || app_secret.is_none() {
            context.disconnected("a WhatsApp secret is not set");
        }
        let graph = Graph::new(
            &spec.api_base_url,
            &spec.api_version,
            &spec.phone_number_id,
            token,
        );
        Self {
            context,
            spec,
            graph,
            app_secret,
            verify_token,
            seen: Mutex::new(SeenEvents::new()),
        }
    }

    fn count(&self, event: &str) {
        self.context
            .metrics
            .platform_events
            .with_label_values(&[self.context.kind.as_str(), &self.context.key.name, event])
            .inc();
    }

    /// The verification `GET` Meta sends when the webhook is set up.
    fn verify(&self, query: Verification) -> Response {
        let Some(expected) = &self.verify_token else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "verify token is not configured",
            )
                .into_response();
        };
        let token_matches = query
            .verify_token
            .as_deref()
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())));
        match (query.mode.as_deref(), token_matches, query.challenge) {
            (Some("subscribe"), true, Some(challenge))
                if challenge.len() <= MAX_CHALLENGE_BYTES =>
            {
                self.context.connected("webhook verified", None);
                (StatusCode::OK, challenge).into_response()
            }
            _ => {
                self.count("refused");
                (StatusCode::FORBIDDEN, "verification refused").into_response()
            }
        }
    }

    async fn notification(self: Arc<Self>, headers: HeaderMap, body: Bytes) -> Response {
        let Some(secret) = &self.app_secret else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "app secret is not configured",
            )
                .into_response();
        };
        let signed = headers
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256="))
            .is_some_and(|sig| signing::matches(secret, &[&body], sig));
        if !signed {
            self.count("refused");
            return (StatusCode::UNAUTHORIZED, "bad X-Hub-Signature-256").into_response();
        }
        if !self.context.is_accepting() {
            // Meta retries what is not answered 200.
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        let notification: wire::Notification = match serde_json::from_slice(&body) {
            Ok(notification) => notification,
            Err(err) => {
                tracing::debug!(channel = %self.context.key, error = %err, "ignoring a malformed WhatsApp notification");
                return StatusCode::OK.into_response();
            }
        };
        if notification.object != "whatsapp_business_account" {
            return StatusCode::OK.into_response();
        }
        for change in notification.entry.iter().flat_map(|e| &e.changes) {
            let ours = change
                .value
                .metadata
                .as_ref()
                .is_some_and(|m| m.phone_number_id == self.spec.phone_number_id);
            if change.field != "messages" || !ours {
                // Another number of the same app, or a field we did not ask for.
                continue;
            }
            for status in &change.value.statuses {
                self.status(status);
            }
            for message in &change.value.messages {
                if let Err(status) = self.message(message).await {
                    return status.into_response();
                }
            }
        }
        StatusCode::OK.into_response()
    }

    fn status(&self, status: &wire::Status) {
        let event = match status.status.as_str() {
            "sent" => "status_sent",
            "delivered" => "status_delivered",
            "read" => "status_read",
            "failed" => "status_failed",
            _ => "ignored",
        };
        self.count(event);
        if event == "status_failed" {
            tracing::warn!(channel = %self.context.key, message = %status.id, errors = ?status.errors, "WhatsApp could not deliver a message");
        }
    }

    /// Publishes one user message; `Err` with the status to answer when it could not
    /// be taken (Meta then sends the batch again; what was taken is dropped then as
    /// a duplicate).
    async fn message(self: &Arc<Self>, message: &wire::Message) -> Result<(), StatusCode> {
        let Some((text, choice)) = wire::said(message) else {
            self.count("ignored");
            return Ok(());
        };
        if text.len() > MAX_TEXT_BYTES || message.from.is_empty() {
            self.count("ignored");
            return Ok(());
        }
        if !self.seen.lock().unwrap().first(&message.id) {
            self.count("duplicate");
            return Ok(());
        }
        // The user's number is their identity and their conversation.
        let mut envelope = self
            .context
            .envelope(message.from.clone(), message.from.clone(), text);
        envelope.id = self.context.platform_id(&message.id);
        envelope
            .metadata
            .insert("whatsapp.messageId".to_owned(), message.id.clone());
        if !message.timestamp.is_empty() {
            envelope
                .metadata
                .insert("whatsapp.timestamp".to_owned(), message.timestamp.clone());
        }
        if let Some(choice) = choice {
            envelope
                .metadata
                .insert("whatsapp.choiceId".to_owned(), choice);
        }
        if let Err(err) = self.context.publish_inbound(&envelope).await {
            self.seen.lock().unwrap().forget(&message.id);
            tracing::warn!(channel = %self.context.key, error = %err, "could not accept a WhatsApp message; Meta sends it again");
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        self.count("message");
        // Read receipts and the typing indicator must not hold up the answer to Meta.
        let channel = self.clone();
        let id = message.id.clone();
        tokio::spawn(async move {
            if let Err(err) = channel.graph.mark_read_typing(&id).await {
                tracing::debug!(channel = %channel.context.key, error = ?err, "could not mark a message read");
            }
        });
        Ok(())
    }

    fn outcome(&self, result: Result<(), GraphError>) -> Result<(), GraphError> {
        match &result {
            Ok(()) => self.context.connected("message sent", None),
            Err(GraphError::Retry {
                down: true, reason, ..
            }) => self.context.disconnected(reason),
            Err(_) => {}
        }
        result
    }

    /// Sends `parts` in order; a later part that is throttled is waited for here (the
    /// earlier ones are out, so retrying the whole reply would repeat them).
    async fn send_parts(&self, to: &str, parts: &[String]) -> Result<(), GraphError> {
        for (index, part) in parts.iter().enumerate() {
            let mut tries = 0;
            loop {
                match self.outcome(self.graph.send_text(to, part).await) {
                    Ok(()) => break,
                    Err(GraphError::Retry { after, .. }) if index > 0 && tries < PART_RETRIES => {
                        tries += 1;
                        tokio::time::sleep(after.min(MAX_PART_WAIT)).await;
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// Sends `text` with up to [`MAX_BUTTONS`] reply buttons (`(id, title)`); the
    /// user's choice comes back as a message whose text is the title and whose
    /// `whatsapp.choiceId` metadata is the id.
    #[allow(dead_code)]
    pub async fn send_buttons(
        &self,
        to: &str,
        text: &str,
        buttons: &[(String, String)],
    ) -> Result<(), DeliverError> {
        if buttons.is_empty() || buttons.len() > MAX_BUTTONS {
            return Err(DeliverError::Failed {
                reason: format!(
                    "WhatsApp takes 1 to {MAX_BUTTONS} reply buttons, not {}",
                    buttons.len()
                ),
            });
        }
        let buttons: Vec<(String, String)> = buttons
            .iter()
            .map(|(id, title)| {
                (
                    id.chars().take(MAX_BUTTON_ID_CHARS).collect(),
                    title.chars().take(MAX_BUTTON_TITLE_CHARS).collect(),
                )
            })
            .collect();
        let body: String = markup::convert(text, Dialect::Whatsapp)
            .chars()
            .take(1024)
            .collect();
        Ok(self.outcome(self.graph.send_buttons(to, &body, &buttons).await)?)
    }
}

#[async_trait]
impl Channel for Whatsapp {
    fn context(&self) -> &ChannelContext {
        &self.context
    }

    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                &format!("/v1/whatsapp/{}/webhook", self.context.key.name),
                get(
                    |State(channel): State<Arc<Whatsapp>>,
                     Query(query): Query<HashMap<String, String>>| async move {
                        let mut query = query;
                        channel.verify(Verification {
                            mode: query.remove("hub.mode"),
                            verify_token: query.remove("hub.verify_token"),
                            challenge: query.remove("hub.challenge"),
                        })
                    },
                )
                .post(
                    |State(channel): State<Arc<Whatsapp>>, headers: HeaderMap, body: Bytes| {
                        channel.notification(headers, body)
                    },
                ),
            )
            .with_state(self)
    }

    async fn close(&self) {}

    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError> {
        let to = reply.conversation.as_str();
        let parts = split::split(
            &markup::convert(&reply.text, Dialect::Whatsapp),
            MAX_TEXT_CHARS,
        );
        let sent = self.send_parts(to, &parts).await;
        match sent {
            Err(GraphError::Refused {
                code: Some(graph::CLOSED_WINDOW),
                reason,
            }) => match &self.spec.template_on_closed_window {
                Some(template) => {
                    tracing::info!(channel = %self.context.key, template = %template.name, "the 24-hour window is closed; sending the template instead of the answer");
                    Ok(self.outcome(
                        self.graph
                            .send_template(to, &template.name, &template.language)
                            .await,
                    )?)
                }
                None => Err(DeliverError::Failed {
                    reason: format!(
                        "the user's 24-hour customer service window is closed and no `templateOnClosedWindow` is configured: {reason}"
                    ),
                }),
            },
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::metrics::Metrics;
    use axum::Json;
    use nexo_api::ResourceKey;
    use nexo_api::spec::{ChannelType, SecretRef};
    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;

    /// A channel sending to a local `messages` endpoint that hands each body to the test.
    async fn channel_and_sent() -> (Whatsapp, tokio::sync::mpsc::UnboundedReceiver<Value>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/v21.0/123/messages",
            axum::routing::post(move |Json(body): Json<Value>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(body);
                    Json(json!({"messages": [{"id": "wamid.x"}]}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let present = SecretRef::env("CARGO_PKG_NAME");
        let spec = WhatsappSpec {
            api_base_url: format!("http://{addr}"),
            api_version: "v21.0".to_owned(),
            phone_number_id: "123".to_owned(),
            access_token: present.clone(),
            app_secret: present.clone(),
            verify_token: present,
            template_on_closed_window: None,
        };
        let broker = Arc::new(LocalBroker::new());
        let key = ResourceKey::new("default", "wa");
        let metrics = Arc::new(Metrics::new());
        let connections = crate::channels::Connections::new(
            broker.clone(),
            "test".to_owned(),
            metrics.channel_connected.clone(),
        );
        let context = ChannelContext {
            connection: connections.report_for("whatsapp", key.clone()),
            key,
            kind: ChannelType::Whatsapp,
            delivery: crate::channels::Delivery::Durable,
            broker,
            metrics,
            intake: CancellationToken::new(),
        };
        let channel = Whatsapp::new(context, spec, &Secrets::new("/nonexistent"));
        (channel, rx)
    }

    #[tokio::test]
    async fn reply_buttons_are_sent_as_an_interactive_message() {
        let (channel, mut sent) = channel_and_sent().await;
        let buttons = [
            ("yes".to_owned(), "Yes".to_owned()),
            ("no".to_owned(), "No, a title longer than twenty".to_owned()),
        ];
        channel
            .send_buttons("16505551234", "Go **on**?", &buttons)
            .await
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(5), sent.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body["to"], "16505551234");
        assert_eq!(body["type"], "interactive");
        assert_eq!(
            body["interactive"],
            json!({
                "type": "button",
                "body": {"text": "Go *on*?"},
                "action": {"buttons": [
                    {"type": "reply", "reply": {"id": "yes", "title": "Yes"}},
                    {"type": "reply", "reply": {"id": "no", "title": "No, a title longer t"}},
                ]},
            })
        );
        let four = vec![("a".to_owned(), "A".to_owned()); 4];
        let refused = channel.send_buttons("1", "x", &four).await;
        assert!(
            matches!(refused, Err(DeliverError::Failed { .. })),
            "{refused:?}"
        );
    }
}
