//! `webchat`: a chat page at `/chat/<name>` talking to the agent over a WebSocket at
//! `/v1/channels/<name>/ws`. One socket is one conversation; the server issues its id
//! (see [`super::conversation`]) and the page keeps it so a reload continues it. A
//! second socket for the same conversation takes over, and the first is closed with
//! [`TAKEN_OVER_CLOSE_CODE`].
//!
//! The answer's text is sent as it is written (`delta` frames, plain text, shown as
//! text); the `reply` frame then replaces it with the whole answer, its Markdown
//! rendered to HTML on the worker ([`super::markdown`]) so the page never interprets
//! what the model wrote.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use nexo_api::Envelope;
use nexo_api::spec::WebchatSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use uuid::Uuid;

use super::deltas::ReplyDeltas;
use super::{Channel, ChannelContext, DeliverError};
use super::{conversation, markdown};

const PAGE: &str = include_str!("webchat.html");
const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Close code (private range 4000–4999) of a socket whose conversation was opened on
/// a newer socket; the page does not reconnect on it, so two tabs do not take the
/// conversation from each other in turn.
pub const TAKEN_OVER_CLOSE_CODE: u16 = 4001;
const TAKEN_OVER_REASON: &str = "this conversation was opened in another window";

/// Answers being watched at once on one channel instance; a message sent past this
/// is answered whole, without deltas.
const MAX_WATCHED: usize = 1024;
/// Delta frames waiting for one socket; a socket further behind gets no more deltas
/// of that answer (its reply still comes).
const SOCKET_DELTAS: usize = 64;

pub struct Webchat {
    context: ChannelContext,
    spec: WebchatSpec,
    /// Open sockets by conversation id, each with the id of its connection. The map
    /// holds the only sender, so removing an entry ends that socket's task.
    sockets: Mutex<HashMap<String, (Uuid, mpsc::UnboundedSender<ToSocket>)>>,
    /// The tasks handing deltas to a socket, by the message whose answer they watch;
    /// its reply ends the task.
    watched: Mutex<HashMap<Uuid, AbortHandle>>,
}

/// What a socket's task is handed.
#[derive(Debug)]
enum ToSocket {
    Frame(ServerFrame),
    /// A newer socket has the conversation now: close this one.
    TakenOver,
}

/// What the page sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    text: String,
}

/// What the page receives.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ServerFrame {
    Ready {
        conversation: String,
    },
    /// A piece of the answer to `message` (the text shown so far starts over with
    /// `restart`).
    Delta {
        message: Uuid,
        text: String,
        restart: bool,
    },
    /// The answer to `answers`: `text`, and for an answer (not an error) its Markdown
    /// as safe HTML.
    Reply {
        id: Uuid,
        answers: Option<Uuid>,
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        html: Option<String>,
        error: bool,
    },
    Error {
        text: String,
    },
}

#[derive(Debug, Deserialize)]
struct SocketQuery {
    conversation: Option<String>,
}

impl Webchat {
    pub fn new(context: ChannelContext, spec: WebchatSpec) -> Self {
        Self {
            context,
            spec,
            sockets: Mutex::default(),
            watched: Mutex::default(),
        }
    }

    fn page(&self) -> Html<String> {
        let title = self.spec.title.as_deref().unwrap_or(&self.context.key.name);
        Html(
            PAGE.replace("{{title}}", &escape_html(title))
                .replace(
                    "{{socket_path}}",
                    &format!("/v1/channels/{}/ws", self.context.key.name),
                )
                .replace("{{taken_over_code}}", &TAKEN_OVER_CLOSE_CODE.to_string())
                .replace(
                    "{{description}}",
                    &escape_html(
                        self.spec
                            .description
                            .as_deref()
                            .unwrap_or("Send a message to start."),
                    ),
                ),
        )
    }

    async fn serve_socket(self: Arc<Self>, mut socket: WebSocket, conversation: String) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (delta_tx, mut deltas) = mpsc::channel(SOCKET_DELTAS);
        let connection = Uuid::new_v4();
        let older = self
            .sockets
            .lock()
            .unwrap()
            .insert(conversation.clone(), (connection, tx));
        if let Some((_, older)) = older {
            let _ = older.send(ToSocket::TakenOver);
        }
        let mut outgoing = Some(ServerFrame::Ready {
            conversation: conversation.clone(),
        });
        let mut close = None;
        loop {
            if let Some(frame) = outgoing.take() {
                let text = serde_json::to_string(&frame).expect("frame serialises");
                if socket.send(WsMessage::Text(text.into())).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(ToSocket::Frame(frame)) => outgoing = Some(frame),
                    Some(ToSocket::TakenOver) => {
                        close = Some(CloseFrame {
                            code: TAKEN_OVER_CLOSE_CODE,
                            reason: TAKEN_OVER_REASON.into(),
                        });
                        break;
                    }
                    None => break,
                },
                Some(delta) = deltas.recv() => outgoing = Some(delta),
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Text(text))) => {
                        if let Err(reason) = self.accept(&conversation, text.as_str(), &delta_tx).await {
                            outgoing = Some(ServerFrame::Error { text: reason });
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = socket.send(WsMessage::Close(close)).await;
        let mut sockets = self.sockets.lock().unwrap();
        // A newer socket of the same conversation may have taken the slot.
        if sockets
            .get(&conversation)
            .is_some_and(|(id, _)| *id == connection)
        {
            sockets.remove(&conversation);
        }
    }

    async fn accept(
        self: &Arc<Self>,
        conversation: &str,
        frame: &str,
        deltas: &mpsc::Sender<ServerFrame>,
    ) -> Result<(), String> {
        let text = parse_client_frame(frame)?;
        // The conversation id is the only identity a web chat has, and it is the
        // server's (unguessable), so it is the sender too: memories are per chat.
        let mut envelope =
            self.context
                .envelope(conversation.to_owned(), conversation.to_owned(), text);
        let watching = self.watched.lock().unwrap().len() < MAX_WATCHED;
        let watch = match watching {
            true => self.context.watch_reply(&mut envelope).await,
            false => None,
        };
        let published = self
            .context
            .publish_inbound(&envelope)
            .await
            .map_err(|e| format!("could not send: {e}"));
        if let (Some(watch), Ok(())) = (watch, &published) {
            self.forward_deltas(envelope.id, watch, deltas.clone());
        }
        published
    }

    /// Hands the deltas of the answer to `message` to a socket until its reply comes,
    /// the socket closes or falls [`SOCKET_DELTAS`] behind, or the watch ends.
    fn forward_deltas(
        self: &Arc<Self>,
        message: Uuid,
        mut watch: ReplyDeltas,
        socket: mpsc::Sender<ServerFrame>,
    ) {
        let chat = self.clone();
        // Spawned and entered under the lock, so the task's own removal comes after.
        let mut watched = self.watched.lock().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let delta = tokio::select! {
                    () = socket.closed() => break,
                    delta = watch.next() => match delta {
                        Some(delta) => delta,
                        None => break,
                    },
                };
                let frame = ServerFrame::Delta {
                    message,
                    text: delta.text,
                    restart: delta.restart,
                };
                if socket.try_send(frame).is_err() {
                    break;
                }
            }
            chat.watched.lock().unwrap().remove(&message);
        });
        watched.insert(message, task.abort_handle());
    }
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Checks one frame from the page, for the fuzz target: the text to send, or why it is
/// refused (what the error frame would say).
#[doc(hidden)]
pub fn fuzz_client_frame(frame: &str) -> Result<String, String> {
    parse_client_frame(frame)
}

fn parse_client_frame(frame: &str) -> Result<String, String> {
    let frame: ClientFrame =
        serde_json::from_str(frame).map_err(|e| format!("invalid message: {e}"))?;
    if frame.text.trim().is_empty() {
        return Err("message is empty".to_owned());
    }
    if frame.text.len() > MAX_TEXT_BYTES {
        return Err(format!("message is longer than {MAX_TEXT_BYTES} bytes"));
    }
    Ok(frame.text)
}

#[async_trait]
impl Channel for Webchat {
    fn context(&self) -> &ChannelContext {
        &self.context
    }

    fn routes(self: Arc<Self>) -> Router {
        let name = &self.context.key.name;
        Router::new()
            .route(
                &format!("/chat/{name}"),
                get(|State(chat): State<Arc<Webchat>>| async move { chat.page() }),
            )
            .route(
                &format!("/v1/channels/{name}/ws"),
                get(
                    |State(chat): State<Arc<Webchat>>,
                     Query(query): Query<SocketQuery>,
                     upgrade: WebSocketUpgrade| async move {
                        // Only an id of the issued shape resumes; anything else (an id
                        // someone chose, like `a`) gets a new conversation.
                        let conversation = query
                            .conversation
                            .filter(|c| conversation::is_well_formed(c))
                            .unwrap_or_else(conversation::issue);
                        let response: Response = upgrade
                            .on_upgrade(move |socket| chat.serve_socket(socket, conversation))
                            .into_response();
                        response
                    },
                ),
            )
            .with_state(self)
    }

    async fn close(&self) {
        self.sockets.lock().unwrap().clear();
        for (_, task) in self.watched.lock().unwrap().drain() {
            task.abort();
        }
    }

    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError> {
        if let Some(answers) = reply.correlation_id
            && let Some(task) = self.watched.lock().unwrap().remove(&answers)
        {
            task.abort();
        }
        let sockets = self.sockets.lock().unwrap();
        if let Some((_, socket)) = sockets.get(&reply.conversation) {
            let error = reply.error.is_some();
            let _ = socket.send(ToSocket::Frame(ServerFrame::Reply {
                id: reply.id,
                answers: reply.correlation_id,
                html: (!error).then(|| markdown::to_safe_html(&reply.text)),
                error,
                text: reply.text,
            }));
        }
        Ok(())
    }
}
