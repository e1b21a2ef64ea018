//! A real `nats-server` per test, on a free port, that the test can stop and restart
//! (same port, same JetStream store).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

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

pub struct NatsServer {
    pub port: u16,
    store: TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with extra command-line options (authentication, …).
    pub async fn start_with(extra_args: &[&str]) -> Self {
        let port = super::process::free_port();
        let mut server = Self {
            port,
            store: TempDir::new(),
            child: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "server is running");
        let child = Command::new(server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
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
