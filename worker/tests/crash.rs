//! A worker on NATS killed with SIGKILL in the middle of a burst: after a restart,
//! every message it had accepted (answered 202) is processed — at least once. The
//! test checks that some accepted messages were really unprocessed at the kill, so
//! it cannot pass without a recovery.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{FutureExt, StreamExt};
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
    let observer = async_nats::connect(server.url()).await.unwrap();
    let mut events = observer.subscribe("agent.events.default.a").await.unwrap();
    let mut finished = HashSet::new();

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

    // Every event the dead worker published is in the subscription once a round trip
    // to the server is done (the server writes to a connection in order).
    observer.flush().await.unwrap();
    while let Some(Some(message)) = events.next().now_or_never() {
        record_finished(&mut finished, &message.payload);
    }
    let unprocessed_at_kill = accepted.iter().filter(|id| !finished.contains(*id)).count();
    assert!(
        unprocessed_at_kill > 0,
        "all {} accepted messages were processed before the kill: nothing to recover",
        accepted.len()
    );

    let worker = WorkerProcess::spawn(&config, &[]).await;
    wait_ready(&client, &worker.base()).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let missing = accepted.iter().filter(|id| !finished.contains(*id)).count();
        if missing == 0 {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(message)) => record_finished(&mut finished, &message.payload),
            Ok(None) => panic!("the events subscription ended"),
            Err(_) => panic!(
                "{missing} of {} accepted messages were never processed ({unprocessed_at_kill} were unprocessed at the kill)",
                accepted.len()
            ),
        }
    }
    drop(worker);
}

/// Adds the message id of a `turnFinished` event to `finished`.
fn record_finished(finished: &mut HashSet<String>, payload: &[u8]) {
    let event: Value = serde_json::from_slice(payload).unwrap();
    if event["type"] == "turnFinished" {
        finished.insert(event["messageId"].as_str().unwrap().to_owned());
    }
}
