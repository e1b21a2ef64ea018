//! `/mcp`: the served agents as an MCP server over streamable HTTP (rmcp). Each
//! agent is one tool, `ask_<agent>` (`super::tool_names`), taking `message` and an
//! optional `conversation`; the answer is the tool's result, a failed turn a tool
//! error (`isError: true`). `tools/list` reads the current catalog, and a session
//! is sent `notifications/tools/list_changed` when the agents change.
//!
//! Conversation: every MCP session is one conversation with each agent (its id is
//! issued when the session starts, so two sessions never share one); a call may name
//! another with `conversation`. Under the session-less protocol revision every call
//! is a session of its own, so only `conversation` continues one.
//!
//! Streaming: a call that carries a `progressToken` is sent the answer's text as it
//! is written, one `notifications/progress` per piece (`progress` counts them,
//! `message` is the piece). Pieces of a model step that ended in tool calls are sent
//! too (progress notifications cannot take text back): the tool's result is the
//! answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{NotificationContext, Peer, RequestContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    MAX_CONVERSATION_BYTES, Outcome, Served, Surface, check_conversation, check_message, tool_names,
};
use crate::channels::conversation;
use crate::channels::deltas::ReplyDeltas;
use crate::http::HttpState;
use crate::lifecycle::Phase;
use crate::tools::{ask_description, ask_parameters, message_argument};

/// Open MCP sessions at once. A session costs a task and its buffers until the client
/// ends it or it idles out (rmcp's keep-alive, 5 minutes); past this a new client is
/// refused with `503` instead of growing memory without bound.
const MAX_SESSIONS: usize = 1024;
/// Largest JSON-RPC message a client may POST: a question is at most 64 KiB of text,
/// escaped JSON can double that.
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// When a client refused over [`MAX_SESSIONS`] may try again: idle sessions expire
/// within minutes.
const SESSIONS_RETRY_AFTER_SECONDS: &str = "30";

/// The streamable HTTP endpoint, with its session cap.
pub(super) fn routes(served: Served) -> Router<HttpState> {
    let sessions = Arc::new(LocalSessionManager::default());
    let config = StreamableHttpServerConfig::default()
        // rmcp checks `Host` against loopback names by default, against DNS rebinding:
        // a browser lured to a rebound name would reach a local server. Every request
        // here must carry the serve token, which such a page does not have, and the
        // worker is reached by its Service's and ingresses' names.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_REQUEST_BYTES)
        // Open streams end when the worker closes, rather than holding the shutdown
        // up until the HTTP grace period cuts them.
        .with_cancellation_token(served.0.lifecycle.reached(Phase::Closing));
    let service = StreamableHttpService::new(
        {
            let served = served.clone();
            move || Ok(AgentsServer::new(served.clone()))
        },
        sessions.clone(),
        config,
    );
    Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn_with_state(sessions, cap_sessions))
}

/// Refuses a request that would open a session (it carries none) while
/// [`MAX_SESSIONS`] are open.
async fn cap_sessions(
    State(sessions): State<Arc<LocalSessionManager>>,
    request: Request,
    next: Next,
) -> Response {
    let opens_one = !request.headers().contains_key("mcp-session-id");
    if opens_one && sessions.sessions.read().await.len() >= MAX_SESSIONS {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::RETRY_AFTER,
                HeaderValue::from_static(SESSIONS_RETRY_AFTER_SECONDS),
            )],
            axum::Json(json!({ "error": format!("at most {MAX_SESSIONS} MCP sessions are open at once; try again later") })),
        )
            .into_response();
    }
    next.run(request).await
}

/// One MCP session's server.
struct AgentsServer {
    served: Served,
    /// This session's conversation with each agent.
    conversation: String,
    /// Whether the session is already told of catalog changes.
    watching: AtomicBool,
    /// Cancelled when the session ends (its server is dropped): ends the watch.
    ended: CancellationToken,
    _end: DropGuard,
}

impl AgentsServer {
    fn new(served: Served) -> Self {
        let ended = CancellationToken::new();
        Self {
            served,
            conversation: conversation::issue(),
            watching: AtomicBool::new(false),
            _end: ended.clone().drop_guard(),
            ended,
        }
    }

    fn tools(&self) -> Vec<Tool> {
        tool_names(&self.served.agents())
            .into_iter()
            .map(|(name, agent)| {
                let mut schema = ask_parameters();
                schema["properties"]["conversation"] = json!({
                    "type": "string",
                    "description": format!("Continue this conversation instead of the session's (any id, at most {MAX_CONVERSATION_BYTES} bytes)")
                });
                Tool::new(
                    name,
                    format!("{} (agent `{agent}`)", ask_description(&agent.name)),
                    Arc::new(schema.as_object().cloned().unwrap_or_default()),
                )
            })
            .collect()
    }

    /// The call's answer, or why there is none as a tool error the caller reads.
    /// With `progress` (the call's progress token and the session's peer) the
    /// answer's text is sent as it is written, in progress notifications.
    async fn answer(
        &self,
        request: CallToolRequestParams,
        progress: Option<(ProgressToken, Peer<RoleServer>)>,
    ) -> Result<CallToolResult, ErrorData> {
        let Some((_, agent)) = tool_names(&self.served.agents())
            .into_iter()
            .find(|(name, _)| *name == request.name)
        else {
            self.served.count(Surface::Mcp, Outcome::UnknownAgent);
            return Err(ErrorData::invalid_params(
                format!("no tool named `{}`", request.name),
                None,
            ));
        };
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let invalid = |reason: String| {
            self.served.count(Surface::Mcp, Outcome::Invalid);
            Ok(CallToolResult::error(vec![ContentBlock::text(reason)]))
        };
        let text = match message_argument(&arguments) {
            Ok(text) => text,
            Err(error) => return invalid(error.to_string()),
        };
        if let Err(reason) = check_message(text) {
            return invalid(reason);
        }
        let conversation = match arguments.get("conversation") {
            None | Some(Value::Null) => self.conversation.as_str(),
            Some(Value::String(id)) => match check_conversation(id) {
                Ok(()) => id.as_str(),
                Err(reason) => return invalid(reason),
            },
            Some(_) => return invalid("`conversation` must be a string".to_owned()),
        };
        let watch = match progress {
            Some(progress) => self
                .served
                .watch_reply()
                .await
                .map(|watch| (watch, progress)),
            None => None,
        };
        let stream = watch.as_ref().map(|(watch, _)| watch.subject().to_owned());
        let asked = self
            .served
            .ask(Surface::Mcp, &agent, text, conversation, stream);
        let answered = match watch {
            Some((watch, (token, peer))) => with_progress(asked, watch, token, peer).await,
            None => asked.await,
        };
        Ok(match answered {
            Ok(answer) => CallToolResult::success(vec![ContentBlock::text(answer)]),
            Err(error) => CallToolResult::error(vec![ContentBlock::text(format!(
                "agent `{agent}`: {error}"
            ))]),
        })
    }
}

/// Waits for `asked`, sending each delta of `watch` meanwhile as a progress
/// notification: `progress` counts them, `message` is the piece of text. A client
/// that does not keep up misses pieces, never the answer.
async fn with_progress<T>(
    asked: impl std::future::Future<Output = T>,
    mut watch: ReplyDeltas,
    token: ProgressToken,
    peer: Peer<RoleServer>,
) -> T {
    tokio::pin!(asked);
    let mut sent = 0u32;
    loop {
        tokio::select! {
            biased;
            answered = &mut asked => return answered,
            Some(delta) = watch.next() => {
                sent += 1;
                let note = ProgressNotificationParam::new(token.clone(), f64::from(sent))
                    .with_message(delta.text);
                if let Err(error) = peer.notify_progress(note).await {
                    tracing::debug!(%error, "MCP client gone; no more progress");
                    return asked.await;
                }
            }
        }
    }
}

impl ServerHandler for AgentsServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("nexo", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Each tool asks one nexo agent a question and returns its answer. Calls of one \
             session continue one conversation with each agent.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let progress = context
            .meta
            .get_progress_token()
            .map(|token| (token, context.peer.clone()));
        self.answer(request, progress).await.map(Into::into)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut changes = self.served.agent_changes();
        changes.mark_unchanged();
        let ended = self.ended.clone();
        let peer = context.peer;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ended.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                if let Err(error) = peer.notify_tool_list_changed().await {
                    tracing::debug!(%error, "MCP session gone; no longer told of catalog changes");
                    return;
                }
            }
        });
    }
}
