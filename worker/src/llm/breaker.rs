//! Circuit breakers of model endpoints: after `failures` failed calls in a row an
//! endpoint is skipped for a cool-down, then one probe call is let through and its
//! outcome closes the circuit or opens it again. One breaker per endpoint (provider,
//! base URL, model) for the whole worker, so every agent that uses an endpoint
//! stops waiting on it at once.
//!
//! The state machine ([`Circuit`]) is pure and takes the time as an argument; the
//! [`Breaker`] around it reads the clock and keeps the `nexo_llm_circuit_open` gauge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexo_api::config::CircuitBreakerSettings;
use prometheus::IntGaugeVec;

/// What the circuit says about a call about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Closed: go ahead.
    Call,
    /// The cool-down is over: this call is the one probe.
    Probe,
    /// Open (or a probe is under way): skip this endpoint.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The pure state machine of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Circuit {
    failures: u32,
    cool_down: Duration,
    state: State,
}

impl Circuit {
    /// `failures` failed calls in a row open it (0: never); it stays open for
    /// `cool_down`.
    pub(crate) fn new(failures: u32, cool_down: Duration) -> Self {
        Self {
            failures,
            cool_down,
            state: State::Closed { failures: 0 },
        }
    }

    /// Whether a call starting at `now` may go to the endpoint.
    pub(crate) fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Call,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
            State::Open { .. } | State::HalfOpen { probing: true } => Admission::Skip,
        }
    }

    /// The outcome of an admitted call that ended at `now`.
    pub(crate) fn record(&mut self, admission: Admission, ok: bool, now: Instant) {
        self.state = match (self.state, ok) {
            (_, true) => State::Closed { failures: 0 },
            (State::HalfOpen { .. }, false) if admission == Admission::Probe => State::Open {
                until: now + self.cool_down,
            },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if self.failures > 0 && failures >= self.failures {
                    State::Open {
                        until: now + self.cool_down,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            // A call admitted before the circuit opened, ending after: it changes
            // nothing more.
            (state, false) => state,
        };
    }

    /// A probe that ended without an outcome (its turn was cancelled): the next
    /// call probes instead.
    pub(crate) fn abandon(&mut self, admission: Admission) {
        if admission == Admission::Probe && self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }
}

/// Which endpoint a breaker guards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    pub provider: &'static str,
    /// The spec's `baseUrl`; empty for the provider's default.
    pub base_url: String,
    pub model: String,
}

/// The breaker of one endpoint, shared by every agent of the worker that calls it.
pub(crate) struct Breaker {
    circuit: Mutex<Circuit>,
    /// This endpoint's `nexo_llm_circuit_open{provider,model}` gauge.
    open: prometheus::IntGauge,
}

impl Breaker {
    pub(crate) fn admit(&self) -> Admission {
        self.circuit.lock().unwrap().admit(Instant::now())
    }

    pub(crate) fn record(&self, admission: Admission, ok: bool) {
        self.update(|c| c.record(admission, ok, Instant::now()));
    }

    pub(crate) fn abandon(&self, admission: Admission) {
        self.update(|c| c.abandon(admission));
    }

    fn update(&self, change: impl FnOnce(&mut Circuit)) {
        let mut circuit = self.circuit.lock().unwrap();
        let was_closed = circuit.is_closed();
        change(&mut circuit);
        match (was_closed, circuit.is_closed()) {
            (true, false) => {
                self.open.inc();
                tracing::warn!("model endpoint failing: circuit open");
            }
            (false, true) => {
                self.open.dec();
                tracing::info!("model endpoint answered: circuit closed");
            }
            _ => {}
        }
    }
}

/// Every breaker of the worker, one per endpoint, made on first use and kept for the
/// life of the process (endpoints are few: the models the catalog names).
pub struct Breakers {
    settings: CircuitBreakerSettings,
    /// `nexo_llm_circuit_open`: endpoints of a provider and model that are not
    /// closed (1 when the one endpoint is open).
    gauge: IntGaugeVec,
    breakers: Mutex<HashMap<Endpoint, Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(settings: CircuitBreakerSettings, gauge: IntGaugeVec) -> Self {
        Self {
            settings,
            gauge,
            breakers: Mutex::default(),
        }
    }

    pub(crate) fn of(&self, endpoint: Endpoint) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap();
        let open = self
            .gauge
            .with_label_values(&[endpoint.provider, &endpoint.model]);
        breakers
            .entry(endpoint)
            .or_insert_with(|| {
                Arc::new(Breaker {
                    circuit: Mutex::new(Circuit::new(
                        self.settings.failures,
                        Duration::from_secs(self.settings.cool_down_seconds),
                    )),
                    open,
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> (Circuit, Instant) {
        (Circuit::new(3, Duration::from_secs(30)), Instant::now())
    }

    #[test]
    fn opens_after_the_failures_in_a_row_and_skips_until_the_cool_down_ends() {
        let (mut c, t) = circuit();
        for _ in 0..2 {
            assert_eq!(c.admit(t), Admission::Call);
            c.record(Admission::Call, false, t);
        }
        assert!(c.is_closed());
        c.record(Admission::Call, false, t);
        assert!(!c.is_closed());
        assert_eq!(c.admit(t + Duration::from_secs(29)), Admission::Skip);
        assert_eq!(c.admit(t + Duration::from_secs(30)), Admission::Probe);
        // One probe at a time.
        assert_eq!(c.admit(t + Duration::from_secs(31)), Admission::Skip);
    }

    #[test]
    fn a_success_in_between_starts_the_count_again() {
        let (mut c, t) = circuit();
        c.record(Admission::Call, false, t);
        c.record(Admission::Call, false, t);
        c.record(Admission::Call, true, t);
        c.record(Admission::Call, false, t);
        c.record(Admission::Call, false, t);
        assert!(c.is_closed());
    }

    #[test]
    fn a_good_probe_closes_and_a_bad_one_opens_for_another_cool_down() {
        let (mut c, t) = circuit();
        for _ in 0..3 {
            c.record(Admission::Call, false, t);
        }
        let later = t + Duration::from_secs(30);
        assert_eq!(c.admit(later), Admission::Probe);
        c.record(Admission::Probe, false, later);
        assert_eq!(c.admit(later + Duration::from_secs(29)), Admission::Skip);
        let again = later + Duration::from_secs(30);
        assert_eq!(c.admit(again), Admission::Probe);
        c.record(Admission::Probe, true, again);
        assert!(c.is_closed());
        assert_eq!(c.admit(again), Admission::Call);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let (mut c, t) = circuit();
        for _ in 0..3 {
            c.record(Admission::Call, false, t);
        }
        let later = t + Duration::from_secs(30);
        assert_eq!(c.admit(later), Admission::Probe);
        c.abandon(Admission::Probe);
        assert_eq!(c.admit(later), Admission::Probe);
    }

    #[test]
    fn zero_failures_never_opens() {
        let mut c = Circuit::new(0, Duration::from_secs(1));
        let t = Instant::now();
        for _ in 0..100 {
            c.record(Admission::Call, false, t);
        }
        assert!(c.is_closed());
    }
}
