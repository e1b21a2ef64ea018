//! Replies a channel instance has delivered, by the id of the message they answer, so
//! a second reply to the same message is dropped instead of shown twice.
//!
//! An agent's reply can be published twice: a worker that published it and then lost
//! the agent before acknowledging the message (a crash, a partition, a move to
//! another worker) leaves the message to be delivered again, and the agent's new
//! owner answers it once more. The first reply is the one the user saw, so it wins.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

/// How many answered message ids one channel instance remembers. A duplicate comes
/// within a redelivery of the message (the ack wait, seconds to a minute, plus an
/// agent's move), so this covers minutes of replies at tens per second, for about
/// 150 KiB per instance (16-byte ids, kept in a ring and a set). A duplicate of an
/// older reply is delivered again.
pub const REMEMBERED_REPLIES: usize = 4096;

/// The last [`REMEMBERED_REPLIES`] answered message ids, oldest forgotten first.
pub struct DeliveredReplies {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
    limit: usize,
}

impl DeliveredReplies {
    pub fn new() -> Self {
        Self::with_limit(REMEMBERED_REPLIES)
    }

    fn with_limit(limit: usize) -> Self {
        Self {
            ids: HashSet::with_capacity(limit),
            order: VecDeque::with_capacity(limit),
            limit,
        }
    }

    /// Whether a reply to message `answers` was delivered.
    pub fn contains(&self, answers: &Uuid) -> bool {
        self.ids.contains(answers)
    }

    /// Records that the reply to message `answers` is being delivered; `false` when a
    /// reply to it already was (a duplicate, to drop).
    pub fn first_delivery(&mut self, answers: Uuid) -> bool {
        if !self.ids.insert(answers) {
            return false;
        }
        self.order.push_back(answers);
        if self.order.len() > self.limit
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        true
    }
}

impl Default for DeliveredReplies {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_reply_to_a_message_is_a_duplicate() {
        let mut delivered = DeliveredReplies::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(delivered.first_delivery(a));
        assert!(delivered.first_delivery(b));
        assert!(!delivered.first_delivery(a));
        assert!(!delivered.first_delivery(b));
    }

    #[test]
    fn only_the_last_ids_up_to_the_limit_are_remembered() {
        let mut delivered = DeliveredReplies::with_limit(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            assert!(delivered.first_delivery(*id));
        }
        assert_eq!(delivered.ids.len(), 2);
        assert_eq!(delivered.order.len(), 2);
        // The oldest was forgotten; the two newest are still known.
        assert!(!delivered.first_delivery(ids[2]));
        assert!(!delivered.first_delivery(ids[1]));
        assert!(delivered.first_delivery(ids[0]));
    }
}
