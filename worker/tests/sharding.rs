//! Two worker processes sharing one nats-server and one catalog, started as shards 0
//! and 1 of 2 (through `NEXO_SHARD` / `NEXO_SHARDS`, as in a pod): each runs exactly
//! the agents the partition map gives it, both serve every channel, and a message
//! sent to one worker for an agent of the other is answered. Rewriting the catalog's
//! placement to one worker moves every agent to shard 0 without a restart.

mod support;

use std::path::Path;

use nexo_api::ResourceKey;
use nexo_api::partition::{DEFAULT_PARTITIONS, PartitionMap};
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::{WorkerProcess, wait_ready, write_pool_worker_config};
use support::{TempDir, get_json, http_client, post_message, wait_for};

const AGENTS: usize = 8;

fn name(i: usize) -> String {
    format!("agent-{i}")
}

/// Every agent with a webhook channel `to-agent-<i>` of its own, after `placement`
/// (a YAML line, or nothing).
fn catalog(placement: &str) -> String {
    let mut text = format!("{placement}agents:\n");
    for i in 0..AGENTS {
        text.push_str(&format!(
            "  - name: {0}\n    spec:\n      model: {{provider: scripted, script: [{{reply: '{0} answers'}}]}}\n",
            name(i)
        ));
    }
    text.push_str("channels:\n");
    for i in 0..AGENTS {
        text.push_str(&format!(
            "  - name: to-{0}\n    spec: {{defaultAgent: {0}, webhook: {{}}}}\n",
            name(i)
        ));
    }
    text
}

/// A worker process running shard `shard` of 2 against `nats`; killed on drop.
struct Shard {
    base: String,
    _process: WorkerProcess,
    _dir: TempDir,
}

impl Shard {
    async fn spawn(shard: u32, nats: &NatsServer, catalog_file: &Path) -> Self {
        let dir = TempDir::new();
        let config = write_pool_worker_config(dir.path(), &nats.url(), catalog_file);
        let shard = shard.to_string();
        let process =
            WorkerProcess::spawn(&config, &[("NEXO_SHARD", &shard), ("NEXO_SHARDS", "2")]).await;
        Self {
            base: process.base(),
            _process: process,
            _dir: dir,
        }
    }
}

fn agent_names(report: &Value) -> Vec<String> {
    report["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn shards_split_agents_and_route_work_to_the_owner() {
    let nats = NatsServer::start().await;
    let files = TempDir::new();
    let catalog_file = files.path().join("catalog.yaml");
    std::fs::write(&catalog_file, catalog("")).unwrap();
    let shards = [
        Shard::spawn(0, &nats, &catalog_file).await,
        Shard::spawn(1, &nats, &catalog_file).await,
    ];
    let client = http_client();
    for shard in &shards {
        wait_ready(&client, &shard.base).await;
    }

    let map = PartitionMap::new(DEFAULT_PARTITIONS, 2);
    let mut owned = [Vec::new(), Vec::new()];
    for i in 0..AGENTS {
        let key = ResourceKey::new("default", name(i));
        owned[map.place(&key).worker as usize].push(key.to_string());
    }
    assert!(
        owned.iter().all(|o| !o.is_empty()),
        "both shards own agents: {owned:?}"
    );
    for (index, shard) in shards.iter().enumerate() {
        // Agents start once the worker holds their partitions' leases; the first
        // worker up runs the other's too until that one is there to take them.
        let url = format!("{}/catalog", shard.base);
        let report = wait_for(&format!("shard {index} to run its own agents"), || async {
            let (_, report) = get_json(&client, &url).await;
            (agent_names(&report) == owned[index]
                && report["ownership"]["held"].as_array()?.len() == 32)
                .then_some(report)
        })
        .await;
        assert_eq!(report["shard"], index);
        assert_eq!(report["shards"], 2);
        assert_eq!(agent_names(&report), owned[index], "shard {index}");
        assert_eq!(report["channels"].as_array().unwrap().len(), AGENTS);
        let held = report["ownership"]["held"].as_array().unwrap();
        assert_eq!(
            held.len(),
            32,
            "shard {index} holds half of the 64 partitions"
        );
    }

    // An agent of shard 1, asked through shard 0.
    let remote = owned[1][0].trim_start_matches("default/").to_owned();
    let channel = format!("to-{remote}");
    let hello = || json!({"text": "hello"});
    let (_, answer) = post_message(&client, &shards[0].base, &channel, hello()).await;
    assert_eq!(answer["reply"], format!("{remote} answers"), "{answer}");

    // The pool shrinks to one worker: only the catalog changes.
    support::replace_file(
        &catalog_file,
        &catalog("placement: {partitions: 64, workers: 1}\n"),
    );
    let mut everything = owned.concat();
    everything.sort();
    for (index, shard) in shards.iter().enumerate() {
        let expected = if index == 0 {
            everything.clone()
        } else {
            Vec::new()
        };
        let url = format!("{}/catalog", shard.base);
        wait_for(
            &format!("shard {index} to take the new placement"),
            || async {
                let (_, report) = get_json(&client, &url).await;
                (report["shards"] == 1 && agent_names(&report) == expected).then_some(())
            },
        )
        .await;
    }
    let (_, answer) = post_message(&client, &shards[1].base, &channel, hello()).await;
    assert_eq!(answer["reply"], format!("{remote} answers"), "{answer}");
}

#[test]
fn a_shard_beyond_the_shard_count_is_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nexo-worker"))
        .args([
            "run",
            "--config",
            "unused.yaml",
            "--shard",
            "2",
            "--shards",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--shard 2 is out of range: shards are numbered 0 to 1 (--shards 2)"),
        "{stderr}"
    );
}
