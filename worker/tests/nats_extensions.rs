//! NATS extensions end to end: the Python example of `examples/nats-extension-python`
//! as a process of its own, a real nats-server and the worker binary. The worker finds
//! the extension by its announcements (or by asking, when it starts after it), the
//! agent's model calls its tools, and the tools go when the extension does: after
//! missed heartbeats when it is killed, at once when it says goodbye.
//!
//! Needs python3 and nats-py: `./scripts/test.sh` installs nats-py and sets
//! `NEXO_PYTHONPATH`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexo_api::{ResourceKey, subject};
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::{WorkerProcess, wait_ready, write_worker_config_with};
use support::{DEADLINE, TempDir, get_json, post_message, wait_for};

/// The extension as the worker's catalog names it.
const EXTENSION: &str = "default/text";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nats-extension-python/extension.py")
}

/// `python3` and where nats-py is (`NEXO_PYTHONPATH`); fails the test with what to do
/// when either is missing, so a machine without them never passes it silently.
fn python() -> Option<String> {
    let pythonpath = std::env::var("NEXO_PYTHONPATH").ok();
    let mut check = Command::new("python3");
    check.args(["-c", "import nats"]);
    if let Some(path) = &pythonpath {
        check.env("PYTHONPATH", path);
    }
    match check.output() {
        Err(err) => panic!("python3 is required for this test ({err}): run ./scripts/test.sh"),
        Ok(out) if !out.status.success() => panic!(
            "nats-py is required for this test (NEXO_PYTHONPATH={pythonpath:?}): run ./scripts/test.sh, which installs it and sets NEXO_PYTHONPATH\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => pythonpath,
    }
}

/// The example extension's process, killed with the test.
struct ExtensionProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl ExtensionProcess {
    fn spawn(server: &NatsServer, heartbeat: Duration) -> Self {
        let pythonpath = python();
        let key = ResourceKey::new("default", "text");
        let mut command = Command::new("python3");
        command
            .arg(example())
            .arg("--heartbeat-ms")
            .arg(heartbeat.as_millis().to_string())
            .env("NEXO_EXTENSION", key.to_string())
            .env("NEXO_EXTENSION_SUBJECT", subject::extension_call(&key))
            .env("NEXO_EXTENSION_ANNOUNCE", subject::EXTENSION_ANNOUNCE)
            .env("NEXO_NATS_URLS", server.url())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(path) = pythonpath {
            command.env("PYTHONPATH", path);
        }
        let mut child = command.spawn().expect("the example extension starts");
        let log = Arc::<Mutex<Vec<String>>>::default();
        let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let lines = log.clone();
        // Reads the log to its end, so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits for the process to end, at most [`DEADLINE`].
    async fn exit_status(&mut self) -> ExitStatus {
        wait_for("the extension to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Drop for ExtensionProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker on `server` whose agent `writer` uses the extension: a message with
/// `count` is answered with `count=<what word_count said>`, one with `reverse` with
/// `reversed=<what reverse said>`; one with `nothing` calls word_count without its
/// argument.
fn write_config(dir: &Path, server: &NatsServer) -> PathBuf {
    write_worker_config_with(
        dir,
        &format!("{{type: nats, urls: ['{}']}}", server.url()),
        "extensions:
  - name: text
    spec: {nats: {}}
agents:
  - name: writer
    spec:
      extensions: [{name: text}]
      model:
        provider: scripted
        script:
          - {contains: nothing, toolCall: {name: text__word_count, arguments: {}}, reply: 'count={{tool_result}}'}
          - {contains: count, toolCall: {name: text__word_count, arguments: {text: '{{input}}'}}, reply: 'count={{tool_result}}'}
          - {contains: reverse, toolCall: {name: text__reverse, arguments: {text: '{{input}}'}}, reply: 'reversed={{tool_result}}'}
channels:
  - name: api
    spec: {defaultAgent: writer, webhook: {}}
",
    )
}

/// The extension's entry in the worker's `GET /catalog`.
async fn catalog_entry(client: &reqwest::Client, base: &str) -> Option<Value> {
    let (_, catalog) = get_json(client, &format!("{base}/catalog")).await;
    catalog["extensions"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == EXTENSION)
        .cloned()
}

/// Waits until the catalog's entry satisfies `wanted`, and returns it.
async fn wait_for_entry(
    what: &str,
    client: &reqwest::Client,
    base: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, || async {
        catalog_entry(client, base).await.filter(|e| wanted(e))
    })
    .await
}

async fn reply(client: &reqwest::Client, base: &str, text: &str) -> String {
    let (status, answer) = post_message(client, base, "api", json!({"text": text})).await;
    assert_eq!(status.as_u16(), 200, "{answer}");
    answer["reply"].as_str().expect("a reply").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_is_discovered_called_and_dropped_when_its_heartbeats_stop() {
    python();
    let server = NatsServer::start().await;
    let dir = TempDir::new();
    let client = support::http_client();
    let worker = WorkerProcess::spawn(&write_config(dir.path(), &server), &[]).await;
    let base = worker.base();
    wait_ready(&client, &base).await;

    let heartbeat = Duration::from_millis(300);
    let mut extension = ExtensionProcess::spawn(&server, heartbeat);
    let ready = wait_for_entry("the extension to be ready", &client, &base, |e| {
        e["ready"] == true
    })
    .await;
    assert_eq!(ready["transport"], "nats", "{ready}");
    assert_eq!(ready["tools"], json!(["reverse", "word_count"]), "{ready}");

    assert_eq!(
        reply(&client, &base, "count one two three").await,
        "count=4"
    );
    assert_eq!(
        reply(&client, &base, "reverse abc").await,
        "reversed=cba esrever"
    );
    // The extension's `{error}` reply is a tool error the model sees.
    assert_eq!(
        reply(&client, &base, "nothing to count").await,
        "count=error: `text` must be a string"
    );

    // No goodbye: only the missing heartbeats tell.
    extension.child.kill().unwrap();
    extension.child.wait().unwrap();
    let killed = std::time::Instant::now();
    let gone = wait_for_entry("the extension to be dropped", &client, &base, |e| {
        e["ready"] == false
    })
    .await;
    assert!(
        gone["problem"]
            .as_str()
            .is_some_and(|p| p.starts_with("heartbeats stopped")),
        "{gone}"
    );
    assert!(
        killed.elapsed() >= heartbeat,
        "dropped {:?} after the kill, before a heartbeat was even missed",
        killed.elapsed()
    );
    assert!(
        gone["tools"].as_array().is_some_and(Vec::is_empty),
        "{gone}"
    );
    let answer = reply(&client, &base, "count once more").await;
    assert!(answer.starts_with("count=error: "), "{answer}");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_starts_later_asks_for_announcements_and_a_goodbye_drops_at_once() {
    python();
    let server = NatsServer::start().await;
    let observer = async_nats::connect(server.url()).await.unwrap();
    let mut announcements = observer
        .subscribe(subject::EXTENSION_ANNOUNCE)
        .await
        .unwrap();
    // A heartbeat far beyond the test's deadlines: what the worker learns within them
    // it learns by asking, and the goodbye, not a missed heartbeat, is what drops it.
    let mut extension = ExtensionProcess::spawn(&server, Duration::from_secs(300));
    let first = tokio::time::timeout(DEADLINE, futures::StreamExt::next(&mut announcements))
        .await
        .unwrap_or_else(|_| panic!("no announcement; extension log:\n{}", extension.log()))
        .expect("subscribed");
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["extension"], EXTENSION, "{first}");

    let dir = TempDir::new();
    let client = support::http_client();
    let worker = WorkerProcess::spawn(&write_config(dir.path(), &server), &[]).await;
    let base = worker.base();
    wait_ready(&client, &base).await;
    let ready = wait_for_entry("the extension to be ready", &client, &base, |e| {
        e["ready"] == true
    })
    .await;
    assert_eq!(ready["tools"], json!(["reverse", "word_count"]), "{ready}");
    assert_eq!(
        reply(&client, &base, "reverse 123").await,
        "reversed=321 esrever"
    );

    extension.signal("TERM");
    let gone = wait_for_entry("the extension to be dropped", &client, &base, |e| {
        e["ready"] == false
    })
    .await;
    assert!(
        gone["problem"].as_str().is_some_and(|p| p.contains("left")),
        "{gone}"
    );
    let status = extension.exit_status().await;
    assert!(status.success(), "{status}; log:\n{}", extension.log());
    drop(worker);
}
