//! `webchat`: a chat page at `/chat/<name>` talking to the agent over a WebSocket at
//! `/v1/channels/<name>/ws`. One socket is one conversation; the server issues its id
//! (see [`super::conversation`]) and the page keeps it so a reload continues it. A
//! second socket for the same conversation takes over, and the first is closed with
//! [`TAKEN_OVER_CLOSE_CODE`].

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
use uuid::Uuid;

use super::conversation;
use super::{Channel, ChannelContext};

const PAGE: &str = include_str!("webchat.html");
const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Close code (private range 4000–4999) of a socket whose conversation was opened on
/// a newer socket; the page does not reconnect on it, so two tabs do not take the
/// conversation from each other in turn.
pub const TAKEN_OVER_CLOSE_CODE: u16 = 4001;
const TAKEN_OVER_REASON: &str = "this conversation was opened in another window";

pub struct Webchat {
    context: ChannelContext,
    spec: WebchatSpec,
    /// Open sockets by conversation id, each with the id of its connection. The map
    /// holds the only sender, so removing an entry ends that socket's task.
    sockets: Mutex<HashMap<String, (Uuid, mpsc::UnboundedSender<ToSocket>)>>,
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
    Ready { conversation: String },
    Reply { id: Uuid, text: String, error: bool },
    Error { text: String },
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
                .replace("{{taken_over_code}}", &TAKEN_OVER_CLOSE_CODE.to_string()),
        )
    }

    async fn serve_socket(self: Arc<Self>, mut socket: WebSocket, conversation: String) {
        let (tx, mut rx) = mpsc::unbounded_channel();
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
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Text(text))) => {
                        if let Err(reason) = self.accept(&conversation, text.as_str()).await {
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

    async fn accept(&self, conversation: &str, frame: &str) -> Result<(), String> {
        let text = parse_client_frame(frame)?;
        // The conversation id is the only identity a web chat has, and it is the
        // server's (unguessable), so it is the sender too: memories are per chat.
        let envelope =
            self.context
                .envelope(conversation.to_owned(), conversation.to_owned(), text);
        self.context
            .publish_inbound(&envelope)
            .await
            .map_err(|e| format!("could not send: {e}"))
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
    }

    async fn deliver(&self, reply: Envelope) {
        let sockets = self.sockets.lock().unwrap();
        if let Some((_, socket)) = sockets.get(&reply.conversation) {
            let _ = socket.send(ToSocket::Frame(ServerFrame::Reply {
                id: reply.id,
                error: reply.error.is_some(),
                text: reply.text,
            }));
        }
    }
}
