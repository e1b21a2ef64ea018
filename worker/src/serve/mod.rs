//! The worker's agents, served to other programs: each agent of its pool is a tool
//! `ask_<agent>` of the MCP server at `/mcp` (`mcp.rs`) and an A2A agent at
//! `/a2a/<namespace>/<agent>` (`a2a.rs`). Both sit behind one bearer token
//! (`worker.serve.tokenEnv`) and ask the agent the way the delegation tool does
//! (`crate::ask`): a caller gets the agent's answers, never the agent's own tools.

mod a2a;
mod mcp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use nexo_api::config::ServeSettings;
use nexo_api::validate::delegate_tool_name;
use nexo_api::{Envelope, ResourceKey};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use crate::ask::{AskError, ask};
use crate::broker::Broker;
use crate::catalog::Live;
use crate::channels::deltas::ReplyDeltas;
use crate::http::{BearerToken, HttpState};
use crate::lifecycle::{Lifecycle, Phase};
use crate::metrics::Metrics;

/// Calls waiting for an answer at once, over both surfaces. Each holds an inbox
/// subscription and (for A2A streams, MCP calls) a connection until the answer or
/// `answerTimeoutSeconds`; past this a call is refused before anything is sent, so
/// memory stays bounded however many callers pile up.
const MAX_WAITING_CALLS: usize = 1024;
/// Longest question a caller may send, as the webhook channel takes.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest conversation id a caller may choose (a UUID has 36 characters).
const MAX_CONVERSATION_BYTES: usize = 256;

/// Where a call came in; the `surface` label of the served-call metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Surface {
    Mcp,
    A2a,
}

impl Surface {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Surface::Mcp => "mcp",
            Surface::A2a => "a2a",
        }
    }
}

/// How a served call ended; the `outcome` label of `nexo_served_calls_total`. Never
/// anything a caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The agent answered.
    Ok,
    /// The agent's turn failed.
    Error,
    /// No answer within `answerTimeoutSeconds`.
    Timeout,
    /// Not sent: the worker is starting or stopping, too many calls wait, or the
    /// broker refused.
    Unavailable,
    /// The request was malformed or broke a limit.
    Invalid,
    /// No such agent is served here.
    UnknownAgent,
    /// The caller went away before the answer.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::Invalid => "invalid",
            Outcome::UnknownAgent => "unknown_agent",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Why a served call got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("the worker is not taking calls now (starting or shutting down); try again")]
    NotServing,
    #[error("too many calls are waiting for answers (at most {MAX_WAITING_CALLS}); try again")]
    Busy,
    #[error(transparent)]
    Ask(#[from] AskError),
}

impl CallError {
    fn outcome(&self) -> Outcome {
        match self {
            CallError::NotServing | CallError::Busy => Outcome::Unavailable,
            CallError::Ask(AskError::Timeout(_)) => Outcome::Timeout,
            CallError::Ask(AskError::TurnFailed(_)) => Outcome::Error,
            CallError::Ask(_) => Outcome::Unavailable,
        }
    }

    /// Whether the call was never sent to the agent (so trying again is safe).
    pub(crate) fn not_sent(&self) -> bool {
        matches!(self, CallError::NotServing | CallError::Busy)
    }
}

/// What the served surfaces share: how to reach the agents, and the token.
#[derive(Clone)]
pub(crate) struct Served(Arc<Inner>);

struct Inner {
    broker: Arc<dyn Broker>,
    agents: watch::Receiver<Arc<[ResourceKey]>>,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    token: BearerToken,
    answer_timeout: Duration,
    public_url: Option<String>,
    waiting: Semaphore,
}

impl Served {
    pub(crate) fn new(
        settings: &ServeSettings,
        broker: Arc<dyn Broker>,
        catalog: &Live,
        metrics: Arc<Metrics>,
        lifecycle: Lifecycle,
    ) -> Self {
        let token = BearerToken::from_env(&settings.token_env);
        if !token.is_set() {
            tracing::info!(env = %settings.token_env, "serving agents over MCP and A2A is off: the token environment variable is not set");
        }
        Self(Arc::new(Inner {
            broker,
            agents: catalog.pool_agents(),
            metrics,
            lifecycle,
            token,
            answer_timeout: Duration::from_secs(settings.answer_timeout_seconds),
            public_url: settings
                .public_url
                .as_deref()
                .map(|url| url.trim_end_matches('/').to_owned()),
            waiting: Semaphore::new(MAX_WAITING_CALLS),
        }))
    }

    /// The agents served now, in key order: those of the worker's pool, whichever
    /// worker of the pool runs them.
    pub(crate) fn agents(&self) -> Arc<[ResourceKey]> {
        self.0.agents.borrow().clone()
    }

    /// Changes whenever the served agents do.
    pub(crate) fn agent_changes(&self) -> watch::Receiver<Arc<[ResourceKey]>> {
        self.0.agents.clone()
    }

    pub(crate) fn public_url(&self) -> Option<&str> {
        self.0.public_url.as_deref()
    }

    /// Counts a call that ended before it was asked (malformed, no such agent).
    pub(crate) fn count(&self, surface: Surface, outcome: Outcome) {
        self.0
            .metrics
            .served_calls
            .with_label_values(&[surface.as_str(), outcome.as_str()])
            .inc();
    }

    /// A watch on the deltas of an answer, for the `stream` of [`Served::ask`];
    /// `None` when the broker refuses it (the answer comes whole).
    pub(crate) async fn watch_reply(&self) -> Option<ReplyDeltas> {
        ReplyDeltas::watch(self.0.broker.as_ref())
            .await
            .inspect_err(|err| tracing::warn!(error = %err, "cannot watch an answer's deltas; it comes whole"))
            .ok()
    }

    /// Asks `agent` `text` in `conversation` (as the caller of `surface` names it)
    /// and returns the answer; its text is streamed to `stream` as it is written
    /// (see [`Served::watch_reply`]). Counted and timed whatever happens, also when
    /// the caller goes away meanwhile.
    pub(crate) async fn ask(
        &self,
        surface: Surface,
        agent: &ResourceKey,
        text: &str,
        conversation: &str,
        stream: Option<String>,
    ) -> Result<String, CallError> {
        let mut record = CallRecord {
            served: self,
            surface,
            started: Instant::now(),
            outcome: Outcome::Cancelled,
        };
        let span = tracing::info_span!("served_call", surface = surface.as_str(), agent = %agent, conversation = %conversation);
        let result: Result<String, CallError> = async {
            // While starting or draining the agents do not take work: a question
            // sent now would wait on the route subject past the caller's patience.
            if self.0.lifecycle.phase() != Phase::Serving {
                return Err(CallError::NotServing);
            }
            let _permit = self.0.waiting.try_acquire().map_err(|_| CallError::Busy)?;
            let channel = surface.as_str();
            // The caller's conversation ids live beside the channels' and the
            // delegating agents': the prefix keeps an MCP caller from continuing a
            // webhook's.
            let mut request = Envelope::inbound(
                channel,
                channel,
                format!("{channel}:{conversation}"),
                channel,
                text,
            );
            request.stream = stream;
            Ok(ask(
                self.0.broker.as_ref(),
                agent,
                request,
                self.0.answer_timeout,
            )
            .await?)
        }
        .instrument(span.clone())
        .await;
        record.outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(error) => {
                span.in_scope(|| tracing::info!(%error, "served call not answered"));
                error.outcome()
            }
        };
        result
    }
}

/// Records one served call when it ends, however it ends.
struct CallRecord<'a> {
    served: &'a Served,
    surface: Surface,
    started: Instant,
    outcome: Outcome,
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        let metrics = &self.served.0.metrics;
        metrics
            .served_call_duration
            .with_label_values(&[self.surface.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
        self.served.count(self.surface, self.outcome);
    }
}

/// A question a caller sent is acceptable: not empty, not too long.
pub(crate) fn check_message(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("the message must not be empty".to_owned());
    }
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message has {} bytes, more than the {MAX_MESSAGE_BYTES} an agent takes",
            text.len()
        ));
    }
    Ok(())
}

/// A conversation id a caller chose is acceptable: not empty, not too long.
pub(crate) fn check_conversation(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("a conversation id must not be empty".to_owned());
    }
    if id.len() > MAX_CONVERSATION_BYTES {
        return Err(format!(
            "a conversation id has at most {MAX_CONVERSATION_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The MCP tool name of each served agent. Agents of one namespace are
/// `ask_<agent>`, as the delegation tools name them; once agents of several
/// namespaces are served, names could clash, so every tool is
/// `ask_<namespace>__<agent>` (a namespace and an agent name are DNS labels, which
/// have no `__`, so the two parts cannot run into each other).
pub(crate) fn tool_names(agents: &[ResourceKey]) -> Vec<(String, ResourceKey)> {
    let one_namespace = agents
        .windows(2)
        .all(|pair| pair[0].namespace == pair[1].namespace);
    agents
        .iter()
        .map(|key| {
            let name = if one_namespace {
                delegate_tool_name(&key.name)
            } else {
                delegate_tool_name(&format!("{}__{}", key.namespace, key.name))
            };
            (name, key.clone())
        })
        .collect()
}

/// `/mcp`, `/a2a/…` and `/.well-known/agent-card.json`, behind the serve token.
pub(crate) fn routes(served: &Served) -> Router<HttpState> {
    Router::new()
        .merge(mcp::routes(served.clone()))
        .merge(a2a::routes())
        .layer(middleware::from_fn_with_state(
            served.clone(),
            require_token,
        ))
}

async fn require_token(State(served): State<Served>, request: Request, next: Next) -> Response {
    match served.0.token.refusal(
        request.headers(),
        "serving agents is off: set the serve token environment variable (worker.serve.tokenEnv)",
    ) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tool names of agents given as `(namespace, name)`.
    fn names(agents: &[(&str, &str)]) -> Vec<String> {
        let keys: Vec<ResourceKey> = agents
            .iter()
            .map(|(namespace, name)| ResourceKey::new(*namespace, *name))
            .collect();
        tool_names(&keys)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    #[test]
    fn tools_of_one_namespace_are_ask_agent() {
        let listed = names(&[("team", "concierge"), ("team", "researcher")]);
        assert_eq!(listed, ["ask_concierge", "ask_researcher"]);
    }

    #[test]
    fn tools_of_several_namespaces_name_the_namespace() {
        let listed = names(&[("a", "concierge"), ("b", "concierge")]);
        assert_eq!(listed, ["ask_a__concierge", "ask_b__concierge"]);
        let long = names(&[(&"n".repeat(63), &"x".repeat(63)), ("b", "y")]);
        assert!(
            long[0].len() <= nexo_api::validate::MAX_TOOL_NAME,
            "{long:?}"
        );
    }

    #[test]
    fn questions_and_conversation_ids_are_bounded() {
        assert!(check_message("hi").is_ok());
        assert!(check_message("  ").is_err());
        assert!(check_message(&"x".repeat(MAX_MESSAGE_BYTES + 1)).is_err());
        assert!(check_conversation("c-1").is_ok());
        assert!(check_conversation("").is_err());
        assert!(check_conversation(&"c".repeat(MAX_CONVERSATION_BYTES + 1)).is_err());
    }
}
