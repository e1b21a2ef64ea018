//! MCP servers as extensions, through `rmcp`: a child process over stdio
//! ([`stdio`]), or a server over streamable HTTP ([`http`]).
//!
//! Both run the same way: a task of the connection's own opens a session (starts the
//! process or connects, `initialize`, `tools/list`), publishes the tools, follows
//! `notifications/tools/list_changed`, and when the session ends (the process exits,
//! the connection fails) publishes why and opens a new one after a backoff. Calls go
//! to the session that is up; a call whose session ends under it fails at once.

mod http;
mod stdio;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use futures::future::BoxFuture;
use nexo_api::ResourceKey;
use nexo_api::spec::{HttpExtension, StdioExtension};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ContentBlock,
    Implementation, PaginatedRequestParams, ProtocolVersion, ResourceContents,
};
use rmcp::service::{ClientInitializeError, NotificationContext, RunningService};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceError};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{ConnectContext, Connection, Listing, RemoteTool};
use crate::tools::{ToolAnnotations, ToolError};

/// Tools kept from one server; the rest are left out (with a warning). Far more than
/// a model can choose from, and it bounds what a server can make the worker hold.
const MAX_TOOLS: usize = 1_000;
/// Pages of `tools/list` followed: a server that keeps handing out cursors (with
/// few or no tools on each page) cannot keep the listing going for ever.
const MAX_LIST_PAGES: usize = 100;
/// Bytes of a tool's name; longer ones are left out. MCP asks for at most 128
/// characters, and the model's providers take no more than 64 for the whole
/// `<extension>__<tool>` name (longer ones are shortened with a hash).
const MAX_TOOL_NAME_BYTES: usize = 128;
/// Bytes of a tool's description the model is shown; a longer one is cut. Every
/// description goes into every prompt of the agents using the tool.
const MAX_DESCRIPTION_BYTES: usize = 8 * 1024;
/// Bytes of a tool's input schema (as JSON); a tool with a larger one is left out,
/// since a schema cannot be cut and still mean something.
const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Bytes of one message from a server (a line over stdio, a body or event over
/// HTTP); a longer one is dropped. Results beyond the agent's `toolOutputBytes` are
/// refused anyway; this bounds what is read before that.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of an error a server reports that the model is shown; the rest is cut.
const MAX_ERROR_BYTES: usize = 4 * 1024;
/// Time to start or connect and complete `initialize`: a server that never answers
/// must not leave the extension `Starting` for ever.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a whole (paginated) `tools/list`.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits between sessions after one ends or cannot be opened: a quarter of a second
/// at first (a crash is often a one-off), growing to at most half a minute, so a
/// server that keeps failing costs little, with jitter so the workers of a pool do
/// not all come back at once.
const RESTART_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();
/// Time to learn how a process exited once its pipes closed, for the problem shown.
const EXIT_STATUS_WAIT: Duration = Duration::from_secs(1);
/// A session that served at least this long counts as healthy: the next failure
/// starts the backoff from its shortest wait again.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// An MCP server the worker starts as a child process and speaks to over its
/// stdin/stdout (one process per extension per worker; see `stdio.rs`).
pub(super) fn stdio(
    key: &ResourceKey,
    spec: &StdioExtension,
    context: &ConnectContext,
    stop: CancellationToken,
) -> Arc<dyn Connection> {
    let opener = stdio::Stdio::new(key.to_string(), spec.clone(), context.secrets.clone());
    McpConnection::start(
        key,
        opener,
        "the extension's process exited during the call",
        stop,
    )
}

/// An MCP server over streamable HTTP (see `http.rs`). rmcp 3.11 has no client for
/// the older HTTP+SSE transport (protocol version 2024-11-05), so a server that
/// speaks only that one cannot be used.
pub(super) fn http(
    key: &ResourceKey,
    spec: &HttpExtension,
    context: &ConnectContext,
    stop: CancellationToken,
) -> Arc<dyn Connection> {
    let opener = http::Http::new(spec.clone(), context.secrets.clone());
    McpConnection::start(
        key,
        opener,
        "the connection to the extension was lost during the call",
        stop,
    )
}

/// How a transport opens one session: the MCP client initialized over a new process
/// or connection.
#[async_trait]
trait Opener: Send + Sync + 'static {
    /// Why not, as the extension's problem, when it cannot.
    async fn open(&self, handler: Handler) -> Result<Opened, String>;
}

/// One open session.
struct Opened {
    service: RunningService<RoleClient, Handler>,
    /// Resolves, with why, when the session's process exits (`None`: no process).
    exited: Option<BoxFuture<'static, String>>,
    /// Whatever must live as long as the session (the process: dropping this ends it).
    _keep: Option<Box<dyn Send>>,
}

/// The client's side of a session: takes the server's notifications.
struct Handler {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        // A session-based version: the 2026-07-28 revision delivers
        // `tools/list_changed` only on a `subscriptions/listen` request, which this
        // client does not hold; with the handshake, servers send it on the session.
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("nexo-worker", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // A permit is kept if the session is busy listing: no change is missed.
        self.tools_changed.notify_one();
    }
}

/// The session calls go to.
#[derive(Clone)]
struct Session {
    peer: Peer<RoleClient>,
    /// Cancelled when the session ends: calls in flight on it fail.
    ended: CancellationToken,
    /// Told (why) by a call that found the connection broken, so the session is
    /// replaced.
    broken: mpsc::Sender<String>,
}

struct Shared {
    /// `namespace/name`, for logs and errors.
    extension: String,
    listing: watch::Sender<Listing>,
    session: watch::Sender<Option<Session>>,
    stop: CancellationToken,
    /// What a call whose session ends under it returns.
    lost: &'static str,
}

struct McpConnection {
    shared: Arc<Shared>,
}

impl McpConnection {
    fn start(
        key: &ResourceKey,
        opener: impl Opener,
        lost: &'static str,
        stop: CancellationToken,
    ) -> Arc<dyn Connection> {
        let shared = Arc::new(Shared {
            extension: key.to_string(),
            listing: watch::Sender::new(Listing::Starting),
            session: watch::Sender::new(None),
            stop,
            lost,
        });
        let span = tracing::info_span!("extension", extension = %key);
        tokio::spawn(supervise(shared.clone(), opener).instrument(span));
        Arc::new(Self { shared })
    }

    /// The session that is up, waiting for one while the server (re)starts.
    async fn session(&self) -> Result<Session, ToolError> {
        let closed = || ToolError::Failed("the extension is closed".to_owned());
        let mut sessions = self.shared.session.subscribe();
        tokio::select! {
            // One that just ended is skipped: its successor is on the way.
            session = sessions.wait_for(|s| s.as_ref().is_some_and(|s| !s.ended.is_cancelled())) => {
                session.map_err(|_| closed())?.clone().ok_or_else(closed)
            }
            _ = self.shared.stop.cancelled() => Err(closed()),
        }
    }
}

#[async_trait]
impl Connection for McpConnection {
    fn listing(&self) -> watch::Receiver<Listing> {
        self.shared.listing.subscribe()
    }

    async fn call(&self, tool: &str, arguments: Value) -> Result<String, ToolError> {
        let arguments = match arguments {
            Value::Object(arguments) => Some(arguments),
            Value::Null => None,
            _ => {
                return Err(ToolError::InvalidArguments(
                    "arguments must be a JSON object".to_owned(),
                ));
            }
        };
        let session = self.session().await?;
        let mut params = CallToolRequestParams::new(tool.to_owned());
        params.arguments = arguments;
        let span = tracing::info_span!("extension_call", extension = %self.shared.extension, tool);
        // Dropping the call (the agent's tool timeout) makes rmcp send
        // `notifications/cancelled`, so nothing is left waiting on either side.
        let result = tokio::select! {
            result = session.peer.call_tool(params).instrument(span) => result,
            _ = session.ended.cancelled() => {
                return Err(ToolError::Failed(self.shared.lost.to_owned()));
            }
        };
        match result {
            Ok(result) => call_result(result),
            Err(ServiceError::McpError(error)) => Err(ToolError::Failed(bounded(format!(
                "{} (JSON-RPC error {})",
                error.message, error.code.0
            )))),
            Err(ServiceError::TransportClosed) => {
                let _ = session.broken.try_send(self.shared.lost.to_owned());
                Err(ToolError::Failed(self.shared.lost.to_owned()))
            }
            Err(ServiceError::TransportSend(error)) => {
                // The transport's own error, without rmcp's type names.
                let why = bounded(format!(
                    "the connection to the extension failed: {}",
                    error.error
                ));
                let _ = session.broken.try_send(why.clone());
                Err(ToolError::Failed(why))
            }
            Err(error) => Err(ToolError::Failed(bounded(error.to_string()))),
        }
    }
}

/// Keeps sessions of the extension up until `stop`.
async fn supervise(shared: Arc<Shared>, opener: impl Opener) {
    let mut delays = RESTART_BACKOFF.build();
    loop {
        let opened_at = Instant::now();
        let Some(why) = run_session(&shared, &opener).await else {
            tracing::debug!("extension closed");
            return;
        };
        shared.session.send_replace(None);
        tracing::warn!(problem = %why, "extension session ended; starting a new one");
        shared.listing.send_replace(Listing::Failed(why));
        if opened_at.elapsed() >= HEALTHY_SESSION {
            delays = RESTART_BACKOFF.build();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// One session, from opening to its end: why it ended, or `None` once stopped.
async fn run_session(shared: &Shared, opener: &impl Opener) -> Option<String> {
    let tools_changed = Arc::new(Notify::new());
    let handler = Handler {
        tools_changed: tools_changed.clone(),
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout(OPEN_TIMEOUT, opener.open(handler)) => opened,
        _ = shared.stop.cancelled() => return None,
    };
    let Opened {
        service,
        exited,
        _keep,
    } = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(why)) => return Some(why),
        Err(_) => {
            return Some(format!(
                "the server did not complete `initialize` within {OPEN_TIMEOUT:?}"
            ));
        }
    };
    let has_process = exited.is_some();
    let mut exited = exited.unwrap_or_else(|| std::future::pending().boxed());
    let peer = service.peer().clone();
    // Dropping this (on every way out) closes the session: rmcp's task ends, and
    // with it the process's stdin.
    let ended = service.waiting();
    tokio::pin!(ended);
    let (broken, mut broken_calls) = mpsc::channel(1);
    let session = Session {
        peer: peer.clone(),
        ended: CancellationToken::new(),
        broken,
    };
    let _fail_calls = session.ended.clone().drop_guard();
    let mut published = false;
    loop {
        let listed = tokio::select! {
            listed = tokio::time::timeout(LIST_TIMEOUT, list_tools(&peer)) => listed,
            why = &mut exited => return Some(why),
            _ = &mut ended => return Some(closed(&mut exited, has_process).await),
            _ = shared.stop.cancelled() => return None,
        };
        let tools = match listed {
            Ok(Ok(tools)) => tools,
            Ok(Err(error)) => return Some(format!("tools/list failed: {error}")),
            Err(_) => return Some(format!("tools/list took more than {LIST_TIMEOUT:?}")),
        };
        tracing::info!(tools = tools.len(), "extension ready");
        let tools: Arc<[RemoteTool]> = tools.into();
        shared.listing.send_if_modified(|listing| {
            let changed = !matches!(listing, Listing::Ready(old) if *old == tools);
            if changed {
                *listing = Listing::Ready(tools);
            }
            changed
        });
        if !published {
            shared.session.send_replace(Some(session.clone()));
            published = true;
        }
        tokio::select! {
            _ = tools_changed.notified() => tracing::info!("tool list changed; listing again"),
            why = &mut exited => return Some(why),
            _ = &mut ended => return Some(closed(&mut exited, has_process).await),
            Some(why) = broken_calls.recv() => return Some(why),
            _ = shared.stop.cancelled() => return None,
        }
    }
}

/// Why `initialize` failed, for the extension's problem: the transport's own error
/// without rmcp's type names, bounded (an HTTP error carries part of the body).
fn initialize_problem(error: &ClientInitializeError) -> String {
    let problem = match error {
        ClientInitializeError::TransportError { error, context } => {
            format!("initialize failed ({context}): {}", error.error)
        }
        other => format!("initialize failed: {other}"),
    };
    bounded(problem)
}

/// Why a session the server closed ended: for a process, how it exited, which is
/// usually known a moment after its pipes closed.
async fn closed(exited: &mut BoxFuture<'static, String>, has_process: bool) -> String {
    if has_process && let Ok(why) = tokio::time::timeout(EXIT_STATUS_WAIT, exited).await {
        return why;
    }
    "the server closed the session".to_owned()
}

/// The server's tools, every page, within the bounds.
async fn list_tools(peer: &Peer<RoleClient>) -> Result<Vec<RemoteTool>, ServiceError> {
    let mut tools = Vec::new();
    let mut names = HashSet::new();
    let mut cursor = None;
    for _ in 0..MAX_LIST_PAGES {
        let params = cursor.map(|c| PaginatedRequestParams::default().with_cursor(Some(c)));
        let page = peer.list_tools(params).await?;
        for tool in page.tools {
            if tools.len() == MAX_TOOLS {
                tracing::warn!(
                    limit = MAX_TOOLS,
                    "the server offers more tools than are kept; the rest are left out"
                );
                return Ok(tools);
            }
            if let Some(tool) = remote_tool(tool)
                && names.insert(tool.name.clone())
            {
                tools.push(tool);
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            return Ok(tools);
        }
    }
    tracing::warn!(
        limit = MAX_LIST_PAGES,
        "the server's tool list has more pages than are followed; the rest are left out"
    );
    Ok(tools)
}

/// A tool as the worker keeps it, or `None` (with a warning) for one out of bounds.
fn remote_tool(tool: rmcp::model::Tool) -> Option<RemoteTool> {
    let name = tool.name.into_owned();
    if name.is_empty() || name.len() > MAX_TOOL_NAME_BYTES {
        tracing::warn!(
            bytes = name.len(),
            "left out a tool whose name is empty or too long"
        );
        return None;
    }
    let input_schema = Value::Object(Arc::unwrap_or_clone(tool.input_schema));
    let schema_bytes = input_schema.to_string().len();
    if schema_bytes > MAX_SCHEMA_BYTES {
        tracing::warn!(tool = %name, bytes = schema_bytes, limit = MAX_SCHEMA_BYTES, "left out a tool whose input schema is too large");
        return None;
    }
    let description = tool
        .description
        .map(|d| d.into_owned())
        .or(tool.title)
        .unwrap_or_default();
    let annotations = tool
        .annotations
        .map(|a| ToolAnnotations {
            read_only_hint: a.read_only_hint,
            destructive_hint: a.destructive_hint,
            idempotent_hint: a.idempotent_hint,
            open_world_hint: a.open_world_hint,
        })
        .unwrap_or_default();
    Some(RemoteTool {
        name,
        description: cut(description, MAX_DESCRIPTION_BYTES),
        input_schema,
        annotations,
    })
}

/// What the model is told a call returned: its text, the other kinds of content
/// described; an error result is a tool error.
fn call_result(result: CallToolResult) -> Result<String, ToolError> {
    let mut parts: Vec<String> = result.content.iter().map(describe_content).collect();
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    let text = parts.join("\n");
    if result.is_error == Some(true) {
        let text = if text.is_empty() {
            "the tool failed without saying why".to_owned()
        } else {
            text
        };
        return Err(ToolError::Failed(bounded(text)));
    }
    Ok(text)
}

fn describe_content(content: &ContentBlock) -> String {
    match content {
        ContentBlock::Text(text) => text.text.clone(),
        ContentBlock::Image(image) => format!(
            "[image {}, {} bytes]",
            image.mime_type,
            base64_bytes(&image.data)
        ),
        ContentBlock::Audio(audio) => format!(
            "[audio {}, {} bytes]",
            audio.mime_type,
            base64_bytes(&audio.data)
        ),
        ContentBlock::Resource(embedded) => match &embedded.resource {
            ResourceContents::TextResourceContents { uri, text, .. } => {
                format!("[resource {uri}]\n{text}")
            }
            ResourceContents::BlobResourceContents {
                uri,
                mime_type,
                blob,
                ..
            } => format!(
                "[resource {uri}, {}, {} bytes]",
                mime_type.as_deref().unwrap_or("application/octet-stream"),
                base64_bytes(blob)
            ),
            _ => "[resource of a kind this worker does not know]".to_owned(),
        },
        ContentBlock::ResourceLink(link) => format!("[resource link {} ({})]", link.uri, link.name),
        _ => "[content of a kind this worker does not know]".to_owned(),
    }
}

/// Bytes that base64 `data` stands for.
fn base64_bytes(data: &str) -> usize {
    let data = data.trim_end();
    let padding = data.bytes().rev().take_while(|&b| b == b'=').count();
    (data.len() / 4 * 3).saturating_sub(padding.min(2))
}

/// `text` cut to at most `limit` bytes (at a character boundary), marked when cut.
fn cut(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn bounded(text: String) -> String {
    cut(text, MAX_ERROR_BYTES)
}

#[cfg(test)]
mod tests;
