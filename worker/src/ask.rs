//! Asking an agent and waiting for its answer: the request goes to the agent's route
//! subject (`agent.route.<namespace>.<agent>`), the answer comes back to a private
//! inbox named in the envelope. The delegation tool (`tools/delegate.rs`) and the
//! served surfaces (`serve/`: MCP and A2A) both ask this way.

use std::time::Duration;

use bytes::Bytes;
use nexo_api::{Envelope, ResourceKey, subject};
use tracing::Instrument;

use crate::broker::{Broker, new_inbox};

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    /// The request could not be sent, or the inbox not subscribed.
    #[error("{0}")]
    Broker(String),
    #[error("unreadable reply: {0}")]
    UnreadableReply(String),
    #[error("reply inbox closed")]
    InboxClosed,
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The agent's turn failed; its message says why.
    #[error("{0}")]
    TurnFailed(String),
}

/// Sends `request` to `target` and returns the text of its answer, waiting at most
/// `timeout`. `request.reply_to` is set here.
pub(crate) async fn ask(
    broker: &dyn Broker,
    target: &ResourceKey,
    mut request: Envelope,
    timeout: Duration,
) -> Result<String, AskError> {
    // The answer comes to a private inbox named in the envelope, not through a
    // broker-level request: the route subject is durable, and a stored message keeps
    // no reply subject.
    let inbox = new_inbox();
    request.reply_to = Some(inbox.clone());
    let mut answers = broker
        .subscribe(&inbox)
        .await
        .map_err(|e| AskError::Broker(e.to_string()))?;
    let route = subject::agent_route(target);
    let span = crate::traces::context::send(&route, &mut request);
    broker
        .publish(&route, Bytes::from(request.to_json()))
        .instrument(span)
        .await
        .map_err(|e| AskError::Broker(e.to_string()))?;
    let answer = tokio::time::timeout(timeout, async {
        while let Some(message) = answers.next().await {
            match Envelope::from_json(&message.payload) {
                Ok(answer) if answer.correlation_id == Some(request.id) => return Ok(answer),
                Ok(_) => continue,
                Err(e) => return Err(AskError::UnreadableReply(e.to_string())),
            }
        }
        Err(AskError::InboxClosed)
    })
    .await
    .map_err(|_| AskError::Timeout(timeout))??;
    match answer.error {
        // The agent's turn failed: an error, so the caller does not take the apology
        // for an answer.
        Some(error) => Err(AskError::TurnFailed(error.message)),
        None => Ok(answer.text),
    }
}
