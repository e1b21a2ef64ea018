//! Scaling a pool of worker processes on one nats-server (the must-show of partition
//! leases and journalled memory): agents are hosted exactly once, a resize moves only
//! the partitions it must, no message is lost and no turn runs twice across the move,
//! and every moved agent answers with its memory (a fact it stored, its session
//! history).
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

/// A message sent around a resize: to agent `agent`, saying `text`.
struct Sent {
    agent: usize,
    text: String,
    id: Uuid,
}

/// Messages sent to every agent while the pool resizes, in conversation `busy`; returns
/// once each has an answer. `round` names the resize, so no text repeats across rounds
/// of one conversation (the history check counts a text's occurrences).
async fn during(pool: &Pool, round: &str, resize: impl FnOnce()) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut resize = Some(resize);
    for phase in ["before", "after"] {
        if phase == "after"
            && let Some(resize) = resize.take()
        {
            resize();
        }
        for agent in 0..pool.agents {
            let text = format!("{round} {phase} {agent}");
            let id = pool.send(agent, "busy", &text).await;
            sent.push(Sent { agent, text, id });
        }
    }
    let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    pool.wait_answered(&ids, ANSWER).await;
    sent
}

/// Every message's turn ran once. The reply subject of the test sees every reply an
/// agent sends, also the copy a worker sends when a message comes again after its turn
/// was recorded (a drain deadline that cut the acknowledgement off): such a copy must
/// be the recorded answer, and the conversation's history must hold the message once.
/// Channels drop the copy (`tests/webchat.rs`, `tests/webhook.rs`).
async fn assert_each_turn_ran_once(pool: &Pool, sent: &[Sent]) {
    let repeated: Vec<&Sent> = sent
        .iter()
        .filter(|s| pool.replies_to(&s.id).len() > 1)
        .collect();
    for s in &repeated {
        let replies = pool.replies_to(&s.id);
        assert!(
            replies.iter().all(|r| r.text == replies[0].text),
            "agent-{} answered `{}` twice, differently: {replies:?}",
            s.agent,
            s.text
        );
        let probe = pool.send(s.agent, "busy", "recall").await;
        pool.wait_answered(&[probe], ANSWER).await;
        let answer = pool.answer(&probe);
        let history = answer.split("history: ").nth(1).unwrap_or_default();
        let times = history.split(" | ").filter(|m| *m == s.text).count();
        assert_eq!(times, 1, "agent-{}'s history: {history}", s.agent);
    }
    eprintln!(
        "{} of {} messages were answered once more with their recorded answer",
        repeated.len(),
        sent.len()
    );
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
    let sent = during(&pool, "up", || pool.resize(4)).await;
    let four = pool.wait_settled(&[0, 1, 2, 3], SETTLE).await;
    assert_each_turn_ran_once(&pool, &sent).await;
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
    let sent = during(&pool, "down", || pool.resize(3)).await;
    let back = pool.wait_settled(&[0, 1, 2], SETTLE).await;
    assert_each_turn_ran_once(&pool, &sent).await;
    let down = moved(&four, &back);
    assert_eq!(down.len(), up.len(), "the same agents move back");
    assert!(down.iter().all(|(_, from, _)| *from == 3));
    assert_eq!(back, three, "the agents return to where they were");
    pool.check_memory(down.iter().map(|(a, _, _)| index(a)), ANSWER)
        .await;
}
