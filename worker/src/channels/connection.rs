//! Whether each channel instance that talks to a platform (Telegram, WhatsApp, Slack)
//! reaches it: the instance says so after each exchange ([`ConnectionReport::connected`],
//! [`ConnectionReport::disconnected`]); `GET /catalog` lists it, and it is published on
//! `plugin.health.<type>.<ns>.<name>` when it changes (and at most every
//! [`REPUBLISH_EVERY`] while it does not), for the operator's `Connected` condition and
//! for anyone watching the bus.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use nexo_api::report::ChannelConnection;
use nexo_api::{ResourceKey, subject};
use prometheus::IntGaugeVec;

use crate::broker::Broker;

/// How often an unchanged state is published again: a watcher that started late
/// learns it within this, and a cursor moving at every poll is not published at
/// every poll.
pub const REPUBLISH_EVERY: Duration = Duration::from_secs(30);

/// The connection state of every platform channel instance of this worker.
pub struct Connections {
    entries: Mutex<BTreeMap<ResourceKey, Entry>>,
    next_id: AtomicU64,
    broker: Arc<dyn Broker>,
    worker: String,
    /// `nexo_channel_connected{channel, instance}`.
    gauge: IntGaugeVec,
}

struct Entry {
    /// Which started version of the instance wrote it (a replaced version that
    /// closes late must not remove its successor's entry).
    id: u64,
    state: ChannelConnection,
    published: Option<Instant>,
}

impl Connections {
    pub fn new(broker: Arc<dyn Broker>, worker: String, gauge: IntGaugeVec) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::default(),
            next_id: AtomicU64::new(0),
            broker,
            worker,
            gauge,
        })
    }

    /// The report for a newly started instance `key` of type `kind`; nothing is
    /// listed until it says something.
    pub fn report_for(self: &Arc<Self>, kind: &'static str, key: ResourceKey) -> ConnectionReport {
        ConnectionReport {
            connections: self.clone(),
            kind,
            key,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Every instance's state, sorted by channel.
    pub fn report(&self) -> Vec<ChannelConnection> {
        let entries = self.entries.lock().unwrap();
        entries.values().map(|e| e.state.clone()).collect()
    }
}

/// What one channel instance tells [`Connections`].
pub struct ConnectionReport {
    connections: Arc<Connections>,
    kind: &'static str,
    key: ResourceKey,
    id: u64,
}

impl ConnectionReport {
    /// An exchange with the platform succeeded (a poll, a registered webhook, a
    /// send); `cursor` is where a poller is in the platform's updates.
    pub fn connected(&self, detail: &str, cursor: Option<String>) {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        self.update(|state| {
            state.connected = true;
            state.detail = detail.to_owned();
            state.last_success_at = Some(now);
            if cursor.is_some() {
                state.cursor = cursor;
            }
        });
    }

    /// The platform cannot be reached, or refuses the instance (a revoked token), for
    /// `reason`.
    pub fn disconnected(&self, reason: &str) {
        self.update(|state| {
            state.connected = false;
            state.detail = reason.to_owned();
        });
    }

    fn update(&self, change: impl FnOnce(&mut ChannelConnection)) {
        let connections = &self.connections;
        let publish = {
            let mut entries = connections.entries.lock().unwrap();
            let entry = entries.entry(self.key.clone()).or_insert_with(|| Entry {
                id: self.id,
                state: ChannelConnection {
                    channel: self.key.to_string(),
                    type_: self.kind.to_owned(),
                    worker: connections.worker.clone(),
                    connected: false,
                    detail: String::new(),
                    last_success_at: None,
                    cursor: None,
                },
                published: None,
            });
            entry.id = self.id;
            let before = (entry.state.connected, entry.state.detail.clone());
            change(&mut entry.state);
            connections
                .gauge
                .with_label_values(&[self.kind, &self.key.name])
                .set(i64::from(entry.state.connected));
            let changed = before != (entry.state.connected, entry.state.detail.clone());
            let due = entry
                .published
                .is_none_or(|at| at.elapsed() >= REPUBLISH_EVERY);
            (changed || due).then(|| {
                entry.published = Some(Instant::now());
                serde_json::to_vec(&entry.state).expect("a connection state serialises")
            })
        };
        if let Some(payload) = publish {
            let subject = subject::channel_health(self.kind, &self.key);
            let broker = connections.broker.clone();
            // Not awaited by the platform's path: a health message is worth nothing
            // later, and the bus may be away.
            tokio::spawn(async move {
                if let Err(err) = broker.publish(&subject, Bytes::from(payload)).await {
                    tracing::debug!(%subject, error = %err, "cannot publish a channel's health");
                }
            });
        }
    }
}

impl Drop for ConnectionReport {
    fn drop(&mut self) {
        let mut entries = self.connections.entries.lock().unwrap();
        if entries.get(&self.key).is_some_and(|e| e.id == self.id) {
            entries.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;

    #[tokio::test]
    async fn a_state_is_listed_and_published_when_it_changes_and_gone_with_its_instance() {
        let broker = Arc::new(LocalBroker::new());
        let mut health = broker
            .subscribe("plugin.health.telegram.default.bot")
            .await
            .unwrap();
        let gauge = crate::metrics::Metrics::new().channel_connected.clone();
        let connections = Connections::new(broker, "worker-0".to_owned(), gauge.clone());
        let key = ResourceKey::new("default", "bot");
        let report = connections.report_for("telegram", key.clone());
        assert!(connections.report().is_empty());

        report.connected("polling", Some("42".to_owned()));
        let published = tokio::time::timeout(Duration::from_secs(5), health.next())
            .await
            .unwrap()
            .unwrap();
        let published: ChannelConnection = serde_json::from_slice(&published.payload).unwrap();
        assert!(published.connected);
        assert_eq!(published.cursor.as_deref(), Some("42"));
        assert_eq!(published.worker, "worker-0");

        assert_eq!(gauge.with_label_values(&["telegram", "bot"]).get(), 1);
        report.disconnected("401 Unauthorized");
        let published = tokio::time::timeout(Duration::from_secs(5), health.next())
            .await
            .unwrap()
            .unwrap();
        let published: ChannelConnection = serde_json::from_slice(&published.payload).unwrap();
        assert!(!published.connected);
        assert_eq!(published.detail, "401 Unauthorized");
        assert_eq!(gauge.with_label_values(&["telegram", "bot"]).get(), 0);
        // The last success and the cursor are kept while it is down.
        let listed = connections.report();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].cursor.as_deref(), Some("42"));
        assert!(listed[0].last_success_at.is_some());

        // A replacement started before the old version is gone keeps its entry.
        let replacement = connections.report_for("telegram", key);
        replacement.connected("polling", None);
        drop(report);
        assert_eq!(connections.report().len(), 1);
        drop(replacement);
        assert!(connections.report().is_empty());
    }
}
