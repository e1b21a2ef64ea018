//! What each agent and channel of this worker's share is doing: running, still
//! starting (attaching to the broker, preparing its memory), or not running and why.
//! `GET /catalog` reports it (`failed`, `attaching`) and `nexo_components_not_running`
//! counts it, so an agent that cannot run is visible without making the whole pod
//! unready (`/readyz` is about the pod taking traffic, see `http::probes`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nexo_api::ResourceKey;
use nexo_api::report::{NotRunning, ResourceKind};
use prometheus::IntGaugeVec;

/// The state of every component of the running catalog.
pub struct Health {
    entries: Mutex<BTreeMap<(Kind, ResourceKey), Entry>>,
    next_id: AtomicU64,
    /// `nexo_components_not_running{kind}`.
    not_running: IntGaugeVec,
}

/// [`ResourceKind`] with an order, as a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Agent,
    Channel,
}

impl Kind {
    fn of(kind: ResourceKind) -> Self {
        match kind {
            ResourceKind::Agent => Kind::Agent,
            ResourceKind::Channel => Kind::Channel,
        }
    }

    fn resource_kind(self) -> ResourceKind {
        match self {
            Kind::Agent => ResourceKind::Agent,
            Kind::Channel => ResourceKind::Channel,
        }
    }

    fn label(self) -> &'static str {
        self.resource_kind().as_str()
    }
}

#[derive(Default)]
struct Entry {
    /// Why the wanted version could not be built (a version that ran before may
    /// still run).
    build: Option<String>,
    /// The started version: which one (a restarted component's old version must not
    /// clear the new one's state when it goes) and its state.
    run: Option<(u64, RunState)>,
}

impl Entry {
    /// Why the component does not run, if it does not.
    fn not_running(&self) -> Option<&str> {
        match (&self.build, &self.run) {
            (Some(reason), _) | (None, Some((_, RunState::Failed(reason)))) => Some(reason),
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.build.is_none() && self.run.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunState {
    Starting,
    Running,
    Failed(String),
}

/// The state of one started component; removed from the report when dropped.
pub struct Tracked {
    health: Arc<Health>,
    key: (Kind, ResourceKey),
    id: u64,
}

impl Health {
    pub fn new(not_running: IntGaugeVec) -> Self {
        for kind in [Kind::Agent, Kind::Channel] {
            not_running.with_label_values(&[kind.label()]).set(0);
        }
        Self {
            entries: Mutex::default(),
            next_id: AtomicU64::new(0),
            not_running,
        }
    }

    /// A component that is starting now; it reports itself with the returned handle.
    pub fn track(self: &Arc<Self>, kind: ResourceKind, key: ResourceKey) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (Kind::of(kind), key);
        self.update(&key, |entry| entry.run = Some((id, RunState::Starting)));
        Tracked {
            health: self.clone(),
            key,
            id,
        }
    }

    /// Replaces the build failures with `failures` (the outcome of the last apply):
    /// which resource, and why it could not be built.
    pub fn set_build_failures(
        &self,
        failures: impl IntoIterator<Item = (ResourceKind, ResourceKey, String)>,
    ) {
        let mut entries = self.entries.lock().unwrap();
        for entry in entries.values_mut() {
            entry.build = None;
        }
        for (kind, key, reason) in failures {
            entries.entry((Kind::of(kind), key)).or_default().build = Some(reason);
        }
        entries.retain(|_, entry| !entry.is_empty());
        // Once per applied catalog: every entry may have changed, count them again.
        for kind in [Kind::Agent, Kind::Channel] {
            let count = entries
                .iter()
                .filter(|((k, _), entry)| *k == kind && entry.not_running().is_some())
                .count();
            self.gauge(kind)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// What should run but does not, with why: build failures first, then what failed
    /// while starting (a memory file that cannot be prepared, a broker that refuses
    /// the consumer).
    pub fn not_running(&self) -> Vec<NotRunning> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .filter_map(|((kind, key), entry)| {
                Some(NotRunning {
                    kind: kind.resource_kind(),
                    name: key.to_string(),
                    reason: entry.not_running()?.to_owned(),
                })
            })
            .collect()
    }

    /// Whether a version of the component is started (tracked) now.
    pub fn is_started(&self, kind: ResourceKind, key: &ResourceKey) -> bool {
        let entries = self.entries.lock().unwrap();
        entries
            .get(&(Kind::of(kind), key.clone()))
            .is_some_and(|entry| entry.run.is_some())
    }

    /// `namespace/name` of the components started but not taking work yet (and not
    /// failed so far).
    pub fn attaching(&self) -> Vec<String> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .filter(|(_, e)| e.build.is_none() && matches!(e.run, Some((_, RunState::Starting))))
            .map(|((_, key), _)| key.to_string())
            .collect()
    }

    /// Changes the entry of `key` (made if missing, removed once empty) and keeps
    /// the gauge in step: one entry changes, so the count moves by at most one.
    fn update(&self, key: &(Kind, ResourceKey), change: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.clone()).or_default();
        let was = entry.not_running().is_some();
        change(entry);
        let is = entry.not_running().is_some();
        if entry.is_empty() {
            entries.remove(key);
        }
        match (was, is) {
            (false, true) => self.gauge(key.0).inc(),
            (true, false) => self.gauge(key.0).dec(),
            _ => {}
        }
    }

    fn gauge(&self, kind: Kind) -> prometheus::IntGauge {
        self.not_running.with_label_values(&[kind.label()])
    }

    /// Sets the state of version `id` of `key`, if it is still the current one.
    fn set_run(&self, key: &(Kind, ResourceKey), id: u64, state: Option<RunState>) {
        self.update(key, |entry| {
            if matches!(entry.run, Some((current, _)) if current == id) {
                entry.run = state.map(|state| (id, state));
            }
        });
    }
}

impl Tracked {
    /// The component takes work now.
    pub fn running(&self) {
        self.health
            .set_run(&self.key, self.id, Some(RunState::Running));
    }

    /// The component cannot take work, for `reason`; it keeps trying.
    pub fn failed(&self, reason: impl std::fmt::Display) {
        let failed = RunState::Failed(reason.to_string());
        self.health.set_run(&self.key, self.id, Some(failed));
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.health.set_run(&self.key, self.id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        let gauge = IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["kind"]).unwrap();
        Arc::new(Health::new(gauge))
    }

    fn count(health: &Health, kind: &str) -> i64 {
        health.not_running.with_label_values(&[kind]).get()
    }

    #[test]
    fn a_failed_start_is_reported_until_it_runs() {
        let health = health();
        let agent = health.track(ResourceKind::Agent, ResourceKey::new("default", "a"));
        assert_eq!(health.attaching(), ["default/a"]);
        assert!(health.not_running().is_empty());
        agent.failed("cannot prepare its memory: embedding server down");
        assert_eq!(health.not_running()[0].name, "default/a");
        assert!(health.attaching().is_empty());
        assert_eq!(count(&health, "agent"), 1);
        agent.running();
        assert!(health.not_running().is_empty());
        assert_eq!(count(&health, "agent"), 0);
    }

    #[test]
    fn an_old_version_going_away_leaves_the_new_ones_state() {
        let health = health();
        let key = ResourceKey::new("default", "a");
        let old = health.track(ResourceKind::Agent, key.clone());
        old.running();
        let new = health.track(ResourceKind::Agent, key);
        new.failed("broken");
        old.failed("ignored: replaced");
        drop(old);
        assert_eq!(health.not_running()[0].reason, "broken");
        drop(new);
        assert!(health.not_running().is_empty());
        assert_eq!(count(&health, "agent"), 0);
    }

    #[test]
    fn build_failures_are_replaced_by_the_next_apply() {
        let health = health();
        let failure = |name: &str| {
            let key = ResourceKey::new("default", name);
            (ResourceKind::Channel, key, "no secret".to_owned())
        };
        health.set_build_failures([failure("c"), failure("d")]);
        assert_eq!(count(&health, "channel"), 2);
        health.set_build_failures([failure("d")]);
        let names: Vec<_> = health.not_running().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["default/d"]);
        assert_eq!(count(&health, "channel"), 1);
    }
}
