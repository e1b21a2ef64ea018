//! A real `nats-server` per test, that the test can stop and restart (same port, same
//! JetStream store). The first start lets the server pick its port (`-p -1`) and reads
//! it from the ports file the server writes; restarts reuse that port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{TempDir, wait_for};

/// The server binary: `NEXO_NATS_SERVER` (set by `scripts/test.sh`), else
/// `nats-server` on the PATH. JetStream KV needs 2.10 or newer.
pub fn server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NEXO_NATS_SERVER") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .expect("nats-server is required: run ./scripts/test.sh, or set NEXO_NATS_SERVER")
}

/// The server process; killed on drop.
pub struct NatsServer {
    pub port: u16,
    store: TempDir,
    /// Where the server writes `<executable>_<pid>.ports`.
    ports: TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with extra command-line options (authentication, …).
    pub async fn start_with(extra_args: &[&str]) -> Self {
        let mut server = Self {
            port: 0,
            store: TempDir::new(),
            ports: TempDir::new(),
            child: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections: on its first
    /// start on a port of its choice, then on the same port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "server is running");
        // -1: a random free port, chosen by the server as it binds.
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let child = Command::new(server_binary())
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.store.path())
            .arg("--ports_file_dir")
            .arg(self.ports.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let ports_file =
            self.ports
                .path()
                .join(format!("{}_{}.ports", executable_name(), child.id()));
        self.child = Some(child);
        self.port = wait_for("nats-server to write its ports file", || {
            let port = client_port(&ports_file);
            async move { port }
        })
        .await;
        let port = self.port;
        wait_for("nats-server to accept connections", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// Kills the server and waits until its port is closed.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let port = self.port;
        wait_for("nats-server to stop", || async move {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(_) => None,
                Err(_) => Some(()),
            }
        })
        .await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The file name the server names its ports file after.
fn executable_name() -> String {
    let binary = server_binary();
    let name = binary.file_name().expect("the server binary has a name");
    name.to_string_lossy().into_owned()
}

/// The client port in a ports file (`{"nats": ["nats://127.0.0.1:PORT"], …}`), once
/// the file is there and complete.
fn client_port(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let ports: Value = serde_json::from_str(&text).ok()?;
    let url = ports["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
