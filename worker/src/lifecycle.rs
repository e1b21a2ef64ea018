//! The worker's life as one ordered sequence of phases.
//!
//! Every part that stops at some point of a shutdown holds the token of the phase at
//! which it stops ([`Lifecycle::reached`]). `app.rs` alone moves the phase forward:
//! its start to `Serving` once the first catalog is applied, its shutdown driver
//! through the rest, one step at a time, waiting for what a step promises before it
//! takes the next. So the order of a shutdown is written once, here and in
//! that driver, instead of being spread over tokens handed around separately.
//!
//! Why not a crate such as `tokio-graceful-shutdown`: its subsystem tree restarts and
//! joins tasks, which the catalog already does for its components (it starts and
//! stops them on every reload, not only at shutdown); what was missing was a single,
//! ordered notion of *when* each part stops, which is this small type.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio_util::sync::CancellationToken;

/// The phases of a worker, in the order it goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Listening (liveness is answered); the first catalog is being applied.
    Starting,
    /// The first catalog is applied: channels take traffic. The only ready phase.
    Serving,
    /// Shutdown began: channels refuse new messages, consumers stop fetching, the
    /// catalog is no longer reloaded, running turns finish up to the drain deadline
    /// and what did not finish is handed back to the broker.
    Draining,
    /// Turns are over; replies still in the outbox are sent, for a short grace.
    Flushing,
    /// Channels stop delivering answers, the outbox drain stops, the HTTP server
    /// closes its connections.
    Closing,
    /// Everything has stopped.
    Stopped,
}

impl Phase {
    const ALL: [Phase; 6] = [
        Phase::Starting,
        Phase::Serving,
        Phase::Draining,
        Phase::Flushing,
        Phase::Closing,
        Phase::Stopped,
    ];

    fn from_index(index: u8) -> Phase {
        Self::ALL[usize::from(index)]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Flushing => "flushing",
            Phase::Closing => "closing",
            Phase::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current phase of one worker, shared by everything in it.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    phase: AtomicU8,
    /// `reached[p]` is cancelled once the worker has reached phase `p`.
    reached: [CancellationToken; Phase::ALL.len()],
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lifecycle").field(&self.phase()).finish()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        let reached: [CancellationToken; Phase::ALL.len()] = Default::default();
        reached[Phase::Starting as usize].cancel();
        Self {
            inner: Arc::new(Inner {
                phase: AtomicU8::new(Phase::Starting as u8),
                reached,
            }),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_index(self.inner.phase.load(Ordering::SeqCst))
    }

    /// Moves to `next`. Phases only go forward: moving to a phase already reached
    /// (or passed) changes nothing and returns `false`. Phases skipped on the way are
    /// reached too, in order, so every token of an earlier phase fires first.
    pub fn advance(&self, next: Phase) -> bool {
        let previous = self.inner.phase.fetch_max(next as u8, Ordering::SeqCst);
        if previous >= next as u8 {
            return false;
        }
        for phase in &Phase::ALL[usize::from(previous) + 1..=next as usize] {
            tracing::debug!(%phase, "worker phase");
            self.inner.reached[*phase as usize].cancel();
        }
        true
    }

    /// A token cancelled once the worker reaches `phase`. A part that also stops on
    /// its own (a component removed by a reload) takes a `child_token()` of it.
    pub fn reached(&self, phase: Phase) -> CancellationToken {
        self.inner.reached[phase as usize].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_worker_is_starting_and_not_serving() {
        let lifecycle = Lifecycle::new();
        assert_eq!(lifecycle.phase(), Phase::Starting);
        assert!(lifecycle.reached(Phase::Starting).is_cancelled());
        assert!(!lifecycle.reached(Phase::Serving).is_cancelled());
    }

    #[test]
    fn every_phase_is_reached_in_turn() {
        let lifecycle = Lifecycle::new();
        for phase in Phase::ALL {
            lifecycle.advance(phase);
            assert_eq!(lifecycle.phase(), phase);
            assert!(lifecycle.reached(phase).is_cancelled(), "{phase}");
        }
    }

    #[test]
    fn phases_never_go_back() {
        let lifecycle = Lifecycle::new();
        assert!(lifecycle.advance(Phase::Draining));
        assert!(!lifecycle.advance(Phase::Serving));
        assert!(!lifecycle.advance(Phase::Draining));
        assert_eq!(lifecycle.phase(), Phase::Draining);
    }

    /// A shutdown before the first catalog was applied (Starting → Draining) still
    /// fires the tokens of every phase on the way.
    #[test]
    fn skipped_phases_are_reached_too() {
        let lifecycle = Lifecycle::new();
        let tokens: Vec<_> = Phase::ALL.iter().map(|p| lifecycle.reached(*p)).collect();
        lifecycle.advance(Phase::Closing);
        let fired: Vec<_> = tokens.iter().map(CancellationToken::is_cancelled).collect();
        assert_eq!(fired, [true, true, true, true, true, false]);
    }

    /// Tokens fire in phase order: a waiter on a later phase never runs before the
    /// earlier phase's waiters could observe their token.
    #[tokio::test]
    async fn tokens_fire_in_phase_order() {
        let lifecycle = Lifecycle::new();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = tokio::task::JoinSet::new();
        for phase in [Phase::Closing, Phase::Draining, Phase::Flushing] {
            let (lifecycle, order) = (lifecycle.clone(), order.clone());
            waiters.spawn(async move {
                lifecycle.reached(phase).cancelled().await;
                // Every earlier phase's token is already cancelled when this one fires.
                let earlier_fired = Phase::ALL
                    .iter()
                    .filter(|p| **p < phase)
                    .all(|p| lifecycle.reached(*p).is_cancelled());
                order.lock().unwrap().push((phase, earlier_fired));
            });
        }
        tokio::task::yield_now().await;
        lifecycle.advance(Phase::Draining);
        lifecycle.advance(Phase::Closing);
        while let Some(done) =
            tokio::time::timeout(std::time::Duration::from_secs(5), waiters.join_next())
                .await
                .expect("waiters finish")
        {
            done.unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 3);
        assert!(order.iter().all(|(_, earlier)| *earlier), "{order:?}");
    }
}
