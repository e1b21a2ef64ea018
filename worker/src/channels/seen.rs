//! Ids of platform events already taken (a WhatsApp message id, a Slack `event_id`, a
//! Telegram `update_id`):
//! platforms deliver again when our answer is slow or lost, and a message must reach
//! the agent once. Bounded: the oldest ids are forgotten first.

use std::collections::{HashSet, VecDeque};

/// How many ids one channel instance remembers: platforms retry within minutes
/// (Slack three times within an hour at most, Meta with backoff), far fewer
/// messages than this for one instance; about 0.5 MiB at most.
pub(crate) const REMEMBERED_EVENTS: usize = 8192;
/// Longest id kept; a longer one is cut (ids are tens of characters).
const MAX_ID_BYTES: usize = 128;

pub(crate) struct SeenEvents {
    ids: HashSet<String>,
    order: VecDeque<String>,
    limit: usize,
}

impl SeenEvents {
    pub(crate) fn new() -> Self {
        Self::with_limit(REMEMBERED_EVENTS)
    }

    fn with_limit(limit: usize) -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
            limit,
        }
    }

    /// Records `id`; `false` when it was seen already (a redelivery, to drop).
    pub(crate) fn first(&mut self, id: &str) -> bool {
        let id = cut(id);
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > self.limit
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        true
    }

    /// Whether `id` was seen (and not forgotten or evicted since).
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids.contains(cut(id))
    }

    /// Forgets `id`: its message was not accepted, so the platform's retry must be.
    pub(crate) fn forget(&mut self, id: &str) {
        let id = cut(id);
        if self.ids.remove(id) {
            self.order.retain(|kept| kept != id);
        }
    }
}

fn cut(id: &str) -> &str {
    let mut end = id.len().min(MAX_ID_BYTES);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_sight_is_refused_until_forgotten_or_evicted() {
        let mut seen = SeenEvents::with_limit(2);
        assert!(seen.first("a"));
        assert!(!seen.first("a"));
        assert!(seen.contains("a") && !seen.contains("b"));
        seen.forget("a");
        assert!(seen.first("a"));
        assert!(seen.first("b"));
        assert!(seen.first("c"));
        assert_eq!(seen.ids.len(), 2);
        // `a` was the oldest: forgotten.
        assert!(seen.first("a"));
        // Ids are kept cut to 128 bytes (on a character boundary): memory per id is bounded.
        assert!(seen.first(&format!("{}x", "é".repeat(100))));
        assert!(!seen.first(&format!("{}y", "é".repeat(100))));
        assert!(seen.ids.iter().all(|id| id.len() <= MAX_ID_BYTES));
    }
}
