//! The worker binary as a child process, for what only a real process shows: a
//! SIGKILL, the lock file, secrets read from its own environment.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::wait_for;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nexo-worker run --config <config>` with extra environment variables.
pub fn spawn_worker(config: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nexo-worker"))
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts")
}

/// Waits until `GET {base}/readyz` answers 2xx.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let url = format!("{base}/readyz");
    wait_for("the worker to be ready", || {
        let probe = client.get(&url).send();
        async move { probe.await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
}

/// Writes `<dir>/worker.yaml`: data in `<dir>/data`, HTTP on `port`, the given
/// `broker` block, one scripted agent `a` answering `reply` behind webhook `api`.
pub fn write_worker_config(dir: &Path, port: u16, broker: &str, reply: &str) -> PathBuf {
    let path = dir.join("worker.yaml");
    std::fs::write(
        &path,
        format!(
            "worker:
  dataDir: {data}
  http: {{listen: '127.0.0.1:{port}'}}
  broker: {broker}
  delivery: {{ackWaitSeconds: 2}}
agents:
  - name: a
    spec:
      model: {{provider: scripted, script: [{{reply: '{reply}'}}]}}
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
",
            data = dir.join("data").display(),
        ),
    )
    .unwrap();
    path
}
