//! The worker binary as a child process, for what only a real process shows: a
//! SIGKILL, the lock file, secrets read from its own environment.
//!
//! No port is chosen ahead: the worker listens on port 0 and the address it got is read
//! from its `worker started` log line, so two tests can never be handed the same port.
//! The child is killed when its [`WorkerProcess`] is dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use tokio::sync::oneshot;

use super::{DEADLINE, wait_for};

/// Log lines of a worker that did not start, kept for the failure message.
const KEPT_LOG_LINES: usize = 50;

/// A local port that refuses connections for as long as this lives: bound, so no
/// other process can be given it, but not listening.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let port = socket.local_addr().unwrap().port();
        Self {
            _socket: socket,
            port,
        }
    }
}

/// `nexo-worker run --config <config>`, killed on drop.
pub struct WorkerProcess {
    child: Child,
    /// Where its HTTP server listens, from its log.
    pub addr: SocketAddr,
}

impl WorkerProcess {
    /// Starts the worker with extra environment variables and waits for its `worker
    /// started` log line (it listens and its catalog is applied), failing the test after
    /// [`DEADLINE`] or when the process ends first.
    pub async fn spawn(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nexo-worker"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (started, address) = oneshot::channel();
        // Reads the log to its end, so the worker never blocks on a full pipe.
        std::thread::spawn(move || read_log(BufReader::new(stderr), started));
        let mut process = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        process.addr = match tokio::time::timeout(DEADLINE, address).await {
            Ok(Ok(Ok(addr))) => addr,
            Ok(Ok(Err(log))) => panic!("the worker ended before it started:\n{log}"),
            Ok(Err(_)) => panic!("the worker's log reader stopped"),
            Err(_) => panic!("the worker did not start within {DEADLINE:?}"),
        };
        process
    }

    /// `http://<addr>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (a graceful shutdown, as Kubernetes asks for one), and waits for the
    /// process to exit, at most [`DEADLINE`].
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
        wait_for("the worker to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.child.wait().expect("the worker can be waited for");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends the address of the `worker started` line, or the last lines of the log if it
/// ends without one; then reads on until the worker closes its stderr.
fn read_log(log: impl BufRead, started: oneshot::Sender<Result<SocketAddr, String>>) {
    let mut started = Some(started);
    let mut kept = std::collections::VecDeque::new();
    // `NEXO_TEST_LOG_DIR`: every worker's whole log goes to a file there, for
    // debugging a test.
    let mut copy = std::env::var_os("NEXO_TEST_LOG_DIR").and_then(|dir| {
        let name = format!("worker-{}.log", uuid::Uuid::new_v4().simple());
        std::fs::File::create(std::path::Path::new(&dir).join(name)).ok()
    });
    for line in log.lines() {
        let Ok(line) = line else { break };
        if let Some(file) = &mut copy {
            use std::io::Write;
            let _ = writeln!(file, "{line}");
        }
        if started.is_none() {
            continue;
        }
        if let Some(addr) = started_at(&line) {
            let _ = started.take().expect("not sent yet").send(Ok(addr));
            continue;
        }
        if kept.len() == KEPT_LOG_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
    if let Some(started) = started {
        let _ = started.send(Err(Vec::from(kept).join("\n")));
    }
}

/// The `addr` of a JSON `worker started` log line.
fn started_at(line: &str) -> Option<SocketAddr> {
    let entry: Value = serde_json::from_str(line).ok()?;
    if entry["message"] != "worker started" {
        return None;
    }
    entry["addr"].as_str()?.parse().ok()
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

/// Writes `<dir>/worker.yaml`: data in `<dir>/data`, HTTP on a port the worker picks,
/// the given `broker` block, one scripted agent `a` answering `reply` behind webhook
/// `api`.
pub fn write_worker_config(dir: &Path, broker: &str, reply: &str) -> PathBuf {
    write_worker_config_with(
        dir,
        broker,
        &format!(
            "agents:
  - name: a
    spec:
      model: {{provider: scripted, script: [{{reply: '{reply}'}}]}}
channels:
  - name: api
    spec: {{defaultAgent: a, webhook: {{}}}}
"
        ),
    )
}

/// Writes `<dir>/worker.yaml` for a worker of a pool on the NATS at `nats_url` that
/// runs `catalog_file`: data in `<dir>/data`, HTTP on a port the worker picks.
pub fn write_pool_worker_config(dir: &Path, nats_url: &str, catalog_file: &Path) -> PathBuf {
    let path = dir.join("worker.yaml");
    std::fs::write(
        &path,
        format!(
            "worker:\n  dataDir: {}\n  http: {{listen: '127.0.0.1:0'}}\n  broker: {{type: nats, urls: ['{nats_url}']}}\n  catalogFile: {}\n",
            dir.join("data").display(),
            catalog_file.display()
        ),
    )
    .unwrap();
    path
}

/// Like [`write_worker_config`], with `resources` (the `agents`, `channels` and
/// `extensions` lists, as YAML) instead of agent `a` and its webhook, and mounted
/// secrets read from `<dir>/secrets`.
pub fn write_worker_config_with(dir: &Path, broker: &str, resources: &str) -> PathBuf {
    let path = dir.join("worker.yaml");
    std::fs::write(
        &path,
        format!(
            "worker:
  dataDir: {data}
  secretsDir: {secrets}
  http: {{listen: '127.0.0.1:0'}}
  broker: {broker}
  delivery: {{ackWaitSeconds: 2}}
{resources}",
            data = dir.join("data").display(),
            secrets = dir.join("secrets").display(),
        ),
    )
    .unwrap();
    path
}
