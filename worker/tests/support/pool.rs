//! A pool of worker processes on one nats-server and one catalog file, as the
//! operator runs them: each worker knows only its ordinal (`NEXO_SHARD`), the pool's
//! size is the catalog's `placement`. Agents are scripted and have memory; the test
//! talks to them straight through their route subjects (`agent.route.<agent>`, the
//! subject a channel's router publishes on) with a reply subject of its own, so every
//! reply an agent sends is seen, duplicates included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use nexo_api::Envelope;
use serde_json::Value;
use uuid::Uuid;

use super::nats::NatsServer;
use super::process::WorkerProcess;
use super::{TempDir, http_client, wait_for_within};

/// Where agents' replies come back: `<this>.<agent>`.
const REPLIES: &str = "test.replies";

/// The agent named `agent-<i>`.
pub fn agent(i: usize) -> String {
    format!("agent-{i}")
}

/// A catalog of `agents` scripted agents with memory, spread over `workers`: a message
/// containing `remember` is stored with `memory_remember`; one containing `recall`
/// answers with what `memory_search` finds for `code` and the conversation's history;
/// anything else is echoed.
pub fn catalog(agents: usize, workers: u32) -> String {
    catalog_with(agents, workers, "")
}

/// [`catalog`] with more agents (`extra`: entries of the `agents:` list, as YAML).
pub fn catalog_with(agents: usize, workers: u32, extra: &str) -> String {
    let mut text = format!("placement: {{partitions: 64, workers: {workers}}}\nagents:\n{extra}");
    for i in 0..agents {
        text.push_str(&format!(
            "  - name: {}
    spec:
      model:
        provider: scripted
        script:
          - {{contains: remember, toolCall: {{name: memory_remember, arguments: {{text: '{{{{input}}}}'}}}}, reply: noted}}
          - {{contains: recall, toolCall: {{name: memory_search, arguments: {{query: code}}}}, reply: 'memory: {{{{tool_result}}}} history: {{{{history}}}}'}}
          - {{reply: 'echo {{{{input}}}}'}}
",
            agent(i)
        ));
    }
    text
}

/// One worker of the pool; killed on drop.
pub struct PoolWorker {
    pub ordinal: u32,
    pub process: WorkerProcess,
    pub dir: TempDir,
    pub config: PathBuf,
}

impl PoolWorker {
    pub fn base(&self) -> String {
        self.process.base()
    }
}

/// Replies seen, by the id of the message they answer.
pub type Replies = Arc<Mutex<HashMap<Uuid, Vec<Envelope>>>>;

pub struct Pool {
    pub nats: NatsServer,
    files: TempDir,
    pub catalog: PathBuf,
    pub agents: usize,
    /// Agents besides the scripted ones (YAML entries of `agents:`).
    extra: String,
    pub workers: Vec<PoolWorker>,
    pub client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    pub replies: Replies,
    http: reqwest::Client,
    /// More lines of the `worker:` block of workers added from now on (indented).
    pub worker_settings: String,
}

impl Pool {
    /// A nats-server and a catalog of `agents` over `workers`; no worker yet.
    pub async fn new(agents: usize, workers: u32) -> Self {
        let nats = NatsServer::start().await;
        Self::with_extra(nats, agents, workers, "").await
    }

    /// Like [`Pool::new`] on a given server, with more agents (YAML entries of
    /// `agents:`).
    pub async fn with_extra(nats: NatsServer, agents: usize, workers: u32, extra: &str) -> Self {
        let files = TempDir::new();
        let catalog = files.path().join("catalog.yaml");
        std::fs::write(&catalog, self::catalog_with(agents, workers, extra)).unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let jetstream = async_nats::jetstream::new(client.clone());
        let replies: Replies = Arc::default();
        let mut subscription = client.subscribe(format!("{REPLIES}.>")).await.unwrap();
        client.flush().await.unwrap();
        let seen = replies.clone();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                if let Ok(reply) = Envelope::from_json(&message.payload)
                    && let Some(id) = reply.correlation_id
                {
                    seen.lock().unwrap().entry(id).or_default().push(reply);
                }
            }
        });
        Self {
            nats,
            files,
            catalog,
            agents,
            extra: extra.to_owned(),
            workers: Vec::new(),
            client,
            jetstream,
            replies,
            http: http_client(),
            worker_settings: String::new(),
        }
    }

    /// The config of a worker of this pool on `nats_url`, in `dir`.
    pub fn write_config(&self, dir: &TempDir, nats_url: &str) -> PathBuf {
        let config = dir.path().join("worker.yaml");
        std::fs::write(
            &config,
            format!(
                "worker:\n  dataDir: {}\n  http: {{listen: '127.0.0.1:0'}}\n  broker: {{type: nats, urls: ['{nats_url}']}}\n  catalogFile: {}\n  drainTimeoutSeconds: 10\n{}",
                dir.path().join("data").display(),
                self.catalog.display(),
                self.worker_settings,
            ),
        )
        .unwrap();
        config
    }

    /// Starts worker `ordinal` on the pool's server.
    pub async fn add_worker(&mut self, ordinal: u32) {
        let url = self.nats.url();
        self.add_worker_on(ordinal, &url).await;
    }

    /// Starts worker `ordinal` connecting to `nats_url` (a proxy in front of the
    /// server, say).
    pub async fn add_worker_on(&mut self, ordinal: u32, nats_url: &str) {
        let dir = TempDir::new();
        let config = self.write_config(&dir, nats_url);
        let process = WorkerProcess::spawn(&config, &[("NEXO_SHARD", &ordinal.to_string())]).await;
        self.workers.push(PoolWorker {
            ordinal,
            process,
            dir,
            config,
        });
    }

    /// Rewrites the catalog's placement: workers apply it in place.
    pub fn resize(&self, workers: u32) {
        let text = catalog_with(self.agents, workers, &self.extra);
        let tmp = self.files.path().join("catalog.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.catalog).unwrap();
    }

    /// `GET /catalog` of every worker, by ordinal; `None` for one that does not answer.
    pub async fn reports(&self) -> BTreeMap<u32, Option<Value>> {
        let mut reports = BTreeMap::new();
        for worker in &self.workers {
            let url = format!("{}/catalog", worker.base());
            let asked = async {
                let response = self.http.get(&url).send().await.ok()?;
                response.json::<Value>().await.ok()
            };
            let report = tokio::time::timeout(Duration::from_secs(2), asked)
                .await
                .ok()
                .flatten();
            reports.insert(worker.ordinal, report);
        }
        reports
    }

    /// Waits until every worker runs the placement over `ordinals`, and those together
    /// run every agent exactly once, with no partition moving and nothing attaching or
    /// failing; returns each agent's worker.
    pub async fn wait_settled(&self, ordinals: &[u32], within: Duration) -> BTreeMap<String, u32> {
        let expected: BTreeSet<String> = (0..self.agents)
            .map(|i| format!("default/{}", agent(i)))
            .collect();
        wait_for_within(within, "every agent hosted exactly once", || async {
            let reports = self.reports().await;
            let mut hosts = BTreeMap::new();
            for (ordinal, report) in &reports {
                let report = report.as_ref()?;
                let ownership = &report["ownership"];
                let busy = ["acquiring", "releasing"]
                    .iter()
                    .any(|k| ownership[k].as_array().is_some_and(|a| !a.is_empty()));
                let unsettled = report["attaching"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                    || !report["failed"].as_array()?.is_empty();
                // Still on the previous placement?
                let placed = report["shards"].as_u64()? == ordinals.len() as u64;
                if busy || unsettled || !placed {
                    return None;
                }
                for name in report["agents"].as_array()? {
                    let name = name.as_str()?.to_owned();
                    if hosts.insert(name, *ordinal).is_some() {
                        return None;
                    }
                }
                if !ordinals.contains(ordinal) && !report["agents"].as_array()?.is_empty() {
                    return None;
                }
            }
            let hosted: BTreeSet<String> = hosts.keys().cloned().collect();
            expected.is_subset(&hosted).then_some(hosts)
        })
        .await
    }

    /// Sends `text` to agent `i` in conversation `conversation` (sender `tester-<i>`)
    /// through its route subject; returns the message id.
    pub async fn send(&self, i: usize, conversation: &str, text: &str) -> Uuid {
        self.send_to(&agent(i), &format!("tester-{i}"), conversation, text)
            .await
    }

    /// Sends `text` to the agent named `name` as `sender`; returns the message id.
    pub async fn send_to(&self, name: &str, sender: &str, conversation: &str, text: &str) -> Uuid {
        let mut envelope = Envelope::inbound("test", "direct", conversation, sender, text);
        envelope.reply_to = Some(format!("{REPLIES}.{name}"));
        let subject = format!("agent.route.default.{name}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
        self.jetstream
            .publish_with_headers(subject, headers, Bytes::from(envelope.to_json()))
            .await
            .unwrap()
            .await
            .expect("JetStream stored the message");
        envelope.id
    }

    /// The replies to `id` seen so far.
    pub fn replies_to(&self, id: &Uuid) -> Vec<Envelope> {
        self.replies
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every message of `ids` has a reply.
    pub async fn wait_answered(&self, ids: &[Uuid], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let missing: Vec<Uuid> = {
                let replies = self.replies.lock().unwrap();
                ids.iter()
                    .filter(|id| !replies.contains_key(id))
                    .copied()
                    .collect()
            };
            if missing.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} messages not answered within {within:?}, among them {:?}",
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of the first reply to `id`.
    pub fn answer(&self, id: &Uuid) -> String {
        self.replies_to(id)
            .first()
            .map(|r| r.text.clone())
            .unwrap_or_default()
    }

    /// Tells every agent its code (stored with `memory_remember`, and in the session
    /// of conversation `c`).
    pub async fn tell_codes(&self, within: Duration) {
        let mut ids = Vec::new();
        for i in 0..self.agents {
            ids.push(
                self.send(i, "c", &format!("remember: my code is S{i}X"))
                    .await,
            );
        }
        self.wait_answered(&ids, within).await;
        for id in &ids {
            assert_eq!(self.answer(id), "noted");
        }
    }

    /// Asks every agent of `agents` for its code (conversation `c`); each answer must
    /// show the stored fact and the session's earlier message.
    pub async fn check_memory(&self, agents: impl Iterator<Item = usize>, within: Duration) {
        let mut asked = Vec::new();
        for i in agents {
            asked.push((i, self.send(i, "c", "recall").await));
        }
        let ids: Vec<Uuid> = asked.iter().map(|(_, id)| *id).collect();
        self.wait_answered(&ids, within).await;
        for (i, id) in asked {
            let answer = self.answer(&id);
            assert!(
                answer.contains(&format!("my code is S{i}X"))
                    && answer.contains("history: remember: my code is"),
                "agent-{i} forgot: {answer}"
            );
        }
    }
}

/// The index of `default/agent-<i>`.
pub fn index(agent: &str) -> usize {
    agent.trim_start_matches("default/agent-").parse().unwrap()
}
