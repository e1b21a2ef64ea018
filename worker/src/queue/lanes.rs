//! One lane per conversation: a consumer handles messages of different conversations
//! side by side, but those of one conversation one after another, in the order they
//! were delivered. A chat's second message must not overtake its first (on its way to
//! the agent, in the agent's turn, or on its way back to the platform): the WhatsApp
//! test saw the answers of one chat arrive swapped while messages were handled
//! concurrently.
//!
//! The consumer loop takes deliveries one at a time, so their order is the order they
//! enter [`Lanes::enter`]; each entry waits for the one before it in its lane to end.

use std::collections::HashMap;

use tokio::sync::oneshot;

/// The latest entry of each lane, by key.
#[derive(Default)]
pub(super) struct Lanes {
    last: HashMap<String, oneshot::Receiver<()>>,
}

/// Held while an entry runs; dropping it lets the next entry of its lane go.
pub(super) struct InLane {
    _done: Option<oneshot::Sender<()>>,
}

/// Ends once the entry before this one in its lane has (at once without one).
pub(super) type Turn = Option<oneshot::Receiver<()>>;

impl Lanes {
    /// Enters a delivery of lane `key` (none: it waits for nothing, and nothing for
    /// it). `bound` keeps the map small: past it, lanes whose last entry ended are
    /// forgotten.
    pub(super) fn enter(&mut self, key: Option<String>, bound: usize) -> (Turn, InLane) {
        let Some(key) = key else {
            return (None, InLane { _done: None });
        };
        if self.last.len() >= bound {
            self.last
                .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        let (done, next) = oneshot::channel();
        let before = self.last.insert(key, next);
        (before, InLane { _done: Some(done) })
    }
}

/// Waits for `turn` (an entry that ended, however it ended, lets the next go).
pub(super) async fn wait(turn: Turn) {
    if let Some(before) = turn {
        let _ = before.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_entry_waits_for_the_one_before_it_in_its_lane_only() {
        let mut lanes = Lanes::default();
        let (first_turn, first) = lanes.enter(Some("chat-1".into()), 16);
        let (second_turn, second) = lanes.enter(Some("chat-1".into()), 16);
        let (other_turn, _other) = lanes.enter(Some("chat-2".into()), 16);
        let (none_turn, _none) = lanes.enter(None, 16);
        assert!(first_turn.is_none() && other_turn.is_none() && none_turn.is_none());
        let second_waits = wait(second_turn);
        tokio::pin!(second_waits);
        assert!(
            futures::poll!(&mut second_waits).is_pending(),
            "the second entry of chat-1 went before the first ended"
        );
        drop(first);
        assert!(futures::poll!(&mut second_waits).is_ready());
        // Lanes whose last entry ended are forgotten past the bound.
        drop(second);
        let _ = lanes.enter(Some("chat-3".into()), 1);
        assert_eq!(lanes.last.len(), 2, "chat-2 still runs, chat-3 entered");
    }
}
