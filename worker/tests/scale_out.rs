//! Scaling a pool of worker processes on one nats-server (the must-show of partition
//! leases and journalled memory): agents are hosted exactly once, a resize moves only
//! the partitions it must, no message is lost or answered twice across the move, and
//! every moved agent answers with its memory (a fact it stored, its session history).
//!
//! `NEXO_SCALE_AGENTS` sets the number of agents (default 900: 300 per worker of 3).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::pool::{Pool, index};
use uuid::Uuid;

/// How long a pool of this size gets to settle after a start or a resize.
const SETTLE: Duration = Duration::from_secs(180);
/// How long the messages sent around a resize get to be answered.
const ANSWER: Duration = Duration::from_secs(120);

fn agents() -> usize {
    std::env::var("NEXO_SCALE_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(900)
}

/// Messages sent to every agent while the pool resizes: each must be answered exactly
/// once (the raw reply subject sees duplicates a channel would drop).
async fn during(pool: &Pool, resize: impl FnOnce()) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..pool.agents {
        ids.push(pool.send(i, "busy", &format!("before {i}")).await);
    }
    resize();
    for i in 0..pool.agents {
        ids.push(pool.send(i, "busy", &format!("after {i}")).await);
    }
    pool.wait_answered(&ids, ANSWER).await;
    ids
}

async fn assert_answered_once(pool: &Pool, ids: &[Uuid]) {
    let twice: Vec<_> = ids
        .iter()
        .filter(|id| pool.replies_to(id).len() != 1)
        .collect();
    if !twice.is_empty() {
        let texts: Vec<Vec<String>> = twice
            .iter()
            .take(5)
            .map(|id| {
                pool.replies_to(id)
                    .iter()
                    .map(|r| format!("{} from {}", r.text, r.sender))
                    .collect()
            })
            .collect();
        let mut outcomes = Vec::new();
        for worker in &pool.workers {
            let text = support::http_client()
                .get(format!("{}/metrics", worker.base()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            outcomes.push(
                text.lines()
                    .filter(|l| {
                        (l.starts_with("nexo_consumed_total") || l.starts_with("nexo_leases_lost"))
                            && !l.ends_with(" 0")
                    })
                    .filter(|l| !l.contains("outcome=\"ack\""))
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            );
        }
        panic!(
            "{} messages answered more than once: {texts:?}\n{outcomes:#?}",
            twice.len()
        );
    }
}

/// Agents whose worker differs between `before` and `after`.
fn moved(before: &BTreeMap<String, u32>, after: &BTreeMap<String, u32>) -> Vec<(String, u32, u32)> {
    before
        .iter()
        .filter_map(|(agent, from)| {
            let to = after[agent];
            (to != *from).then(|| (agent.clone(), *from, to))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_scales_3_to_4_and_back_moving_only_what_it_must_and_losing_nothing() {
    let mut pool = Pool::new(agents(), 3).await;
    for ordinal in 0..3 {
        pool.add_worker(ordinal).await;
    }
    let three = pool.wait_settled(&[0, 1, 2], SETTLE).await;
    pool.tell_codes(ANSWER).await;

    // A fourth worker joins; the catalog says so.
    pool.add_worker(3).await;
    let ids = during(&pool, || pool.resize(4)).await;
    let four = pool.wait_settled(&[0, 1, 2, 3], SETTLE).await;
    assert_answered_once(&pool, &ids).await;
    let up = moved(&three, &four);
    let n = pool.agents;
    assert!(
        up.len() <= n / 3 && up.len() >= n / 6,
        "{} of {n} agents moved going to 4 workers (a quarter expected)",
        up.len()
    );
    assert!(
        up.iter().all(|(_, _, to)| *to == 3),
        "agents move only to the new worker"
    );
    pool.check_memory(up.iter().map(|(a, _, _)| index(a)), ANSWER)
        .await;

    // And back to three: the fourth hands its agents off.
    let ids = during(&pool, || pool.resize(3)).await;
    let back = pool.wait_settled(&[0, 1, 2], SETTLE).await;
    assert_answered_once(&pool, &ids).await;
    let down = moved(&four, &back);
    assert_eq!(down.len(), up.len(), "the same agents move back");
    assert!(down.iter().all(|(_, from, _)| *from == 3));
    assert_eq!(back, three, "the agents return to where they were");
    pool.check_memory(down.iter().map(|(a, _, _)| index(a)), ANSWER)
        .await;
}
