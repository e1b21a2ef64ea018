//! A worker on NATS killed with SIGKILL in the middle of a burst: after a restart,
//! every message it had accepted (answered 202) is processed — at least once.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use nexo_worker::broker::{Broker, NatsBroker};
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::{WorkerProcess, wait_ready, write_worker_config};
use support::{TempDir, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_survive_a_sigkill() {
    let server = NatsServer::start().await;
    let dir = TempDir::new();
    let config = write_worker_config(
        dir.path(),
        &format!("{{type: nats, urls: ['{}']}}", server.url()),
        "done {{input}}",
    );
    let client = support::http_client();

    // Everything the agent finishes is announced on its events subject.
    let finished: Arc<Mutex<HashSet<String>>> = Arc::default();
    let observer = NatsBroker::connect_url(&server.url()).await.unwrap();
    let mut events = observer.subscribe("agent.events.default.a").await.unwrap();
    let seen = finished.clone();
    tokio::spawn(async move {
        // Silence this long means the test is over (it fails on its own deadline).
        let quiet = std::time::Duration::from_secs(120);
        while let Ok(Some(message)) = tokio::time::timeout(quiet, events.next()).await {
            let event: Value = serde_json::from_slice(&message.payload).unwrap();
            if event["type"] == "turnFinished" {
                seen.lock()
                    .unwrap()
                    .insert(event["messageId"].as_str().unwrap().to_owned());
            }
        }
    });

    let mut worker = WorkerProcess::spawn(&config, &[]).await;
    let base = worker.base();
    wait_ready(&client, &base).await;
    let answer: Value = client
        .post(format!("{base}/v1/channels/api/messages"))
        .json(&json!({"text": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["reply"], "done hello",
        "the worker answers over NATS"
    );

    // A burst of asynchronous messages; the worker dies in the middle of it.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let sender = {
        let (client, base, accepted) = (client.clone(), base.clone(), accepted.clone());
        tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..2_000 {
                let response = client
                    .post(format!("{base}/v1/channels/api/messages"))
                    .header("prefer", "respond-async")
                    .json(&json!({"text": format!("m{i}")}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let body: Value = r.json().await.unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .push(body["id"].as_str().unwrap().to_owned());
                    }
                    _ => {
                        refused += 1;
                        if refused >= 3 {
                            return;
                        }
                    }
                }
            }
        })
    };
    wait_for("part of the burst to be accepted", || async {
        (accepted.lock().unwrap().len() >= 200).then_some(())
    })
    .await;
    worker.kill();
    sender.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();

    let worker = WorkerProcess::spawn(&config, &[]).await;
    wait_ready(&client, &worker.base()).await;
    let missing = || {
        let done = finished.lock().unwrap();
        accepted.iter().filter(|id| !done.contains(*id)).count()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while missing() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} accepted messages were never processed",
            missing(),
            accepted.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(worker);
}
