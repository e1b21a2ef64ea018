//! Outbound rate limits: a token bucket per chat and one for the whole bot, each
//! holding up to one second's worth of messages. A sender reserves a token from both
//! and waits until the later of the two is due; reservations go below zero, so
//! concurrent senders queue in order instead of racing. The counts are this worker's
//! (Telegram's limits are per bot; with several senders each keeps its own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Chats whose buckets are kept; past this the buckets that are full again (idle
/// chats) are forgotten, so many chats cannot grow memory without bound.
const MAX_TRACKED_CHATS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self {
            tokens: capacity(rate),
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity(rate));
        self.at = now;
    }

    /// Takes a token; how long until it is due.
    fn reserve(&mut self, rate: f64, now: Instant) -> Duration {
        self.refill(rate, now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

fn capacity(rate: f64) -> f64 {
    rate.max(1.0)
}

pub(crate) struct RateLimiter {
    per_chat: f64,
    global_rate: f64,
    global: Mutex<Bucket>,
    chats: Mutex<HashMap<i64, Bucket>>,
}

impl RateLimiter {
    pub(crate) fn new(per_chat: f64, global: f64) -> Self {
        // Validation refuses other values; this keeps a bad one from dividing by zero.
        let sane = |rate: f64| {
            if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1.0
            }
        };
        let (per_chat, global_rate) = (sane(per_chat), sane(global));
        Self {
            per_chat,
            global_rate,
            global: Mutex::new(Bucket::full(global_rate, Instant::now())),
            chats: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until a message may go to `chat`.
    pub(crate) async fn message(&self, chat: i64) {
        let now = Instant::now();
        let chat_wait = {
            let mut chats = self.chats.lock().unwrap();
            if chats.len() >= MAX_TRACKED_CHATS {
                let rate = self.per_chat;
                chats.retain(|_, bucket| {
                    bucket.refill(rate, now);
                    bucket.tokens < capacity(rate)
                });
            }
            chats
                .entry(chat)
                .or_insert_with(|| Bucket::full(self.per_chat, now))
                .reserve(self.per_chat, now)
        };
        let wait = chat_wait.max(self.global_wait(now));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until anything (a draft, a chat action) may be sent, counted against
    /// the bot's limit only.
    pub(crate) async fn any(&self) {
        let wait = self.global_wait(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn global_wait(&self, now: Instant) -> Duration {
        self.global.lock().unwrap().reserve(self.global_rate, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_message_a_second_per_chat_and_other_chats_go_on() {
        let limiter = RateLimiter::new(1.0, 30.0);
        let start = Instant::now();
        limiter.message(1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.message(1).await;
        limiter.message(1).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let other = Instant::now();
        limiter.message(2).await;
        assert_eq!(other.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_holds_over_all_chats() {
        let limiter = RateLimiter::new(1.0, 2.0);
        let start = Instant::now();
        for chat in 0..4 {
            limiter.message(chat).await;
        }
        // Two at once (a second's worth), then one every half second.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
