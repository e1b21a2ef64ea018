//! Worker death: one of three workers is SIGKILLed while its agents have work in
//! flight. Its leases expire, the first live worker after it adopts its partitions,
//! and its agents answer again from their snapshot and journal within the lease's
//! time to live plus a few seconds, with every acknowledged turn's memory; no accepted
//! message is lost, and a message delivered again after its turn was recorded gets
//! the recorded answer, not a second turn.

mod support;

use std::time::Duration;

use support::pool::{Pool, index};
use tokio::time::Instant;
use uuid::Uuid;

/// The lease's time to live (`LEASE_TTL` in `worker/src/ownership/lease.rs`).
const LEASE_TTL: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(120);
const ANSWER: Duration = Duration::from_secs(120);

fn agents() -> usize {
    std::env::var("NEXO_FAILOVER_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(90)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_agents_answer_again_within_the_lease_ttl_with_their_memory() {
    let mut pool = Pool::new(agents(), 3).await;
    for ordinal in 0..3 {
        pool.add_worker(ordinal).await;
    }
    let hosts = pool.wait_settled(&[0, 1, 2], SETTLE).await;
    pool.tell_codes(ANSWER).await;
    let victims: Vec<usize> = hosts
        .iter()
        .filter(|(_, worker)| **worker == 1)
        .map(|(agent, _)| index(agent))
        .collect();
    assert!(!victims.is_empty());

    // Load on every agent; worker 1 dies once it has answered some of it.
    let mut load: Vec<(usize, Uuid)> = Vec::new();
    for round in 0..5 {
        for i in 0..pool.agents {
            load.push((i, pool.send(i, "load", &format!("load {round}")).await));
        }
    }
    support::wait_for("worker 1 to be busy with the load", || async {
        load.iter()
            .any(|(i, id)| victims.contains(i) && !pool.replies_to(id).is_empty())
            .then_some(())
    })
    .await;
    pool.workers[1].process.kill();
    let killed = Instant::now();
    let in_flight = load
        .iter()
        .filter(|(i, id)| victims.contains(i) && pool.replies_to(id).is_empty())
        .count();
    assert!(
        in_flight > 0,
        "worker 1 had answered all its load before the kill: nothing to recover"
    );

    // Its agents answer again, on the others, with what they were told.
    let probes = victims.iter().copied();
    let left = (LEASE_TTL + Duration::from_secs(5)).saturating_sub(killed.elapsed());
    pool.check_memory(probes, left).await;
    let took = killed.elapsed();
    eprintln!(
        "worker 1's {} agents answered again {took:?} after the kill",
        victims.len()
    );
    let reports = pool.reports().await;
    let adopters: Vec<u32> = reports
        .iter()
        .filter(|(ordinal, report)| {
            **ordinal != 1
                && report.as_ref().is_some_and(|r| {
                    r["agents"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| victims.contains(&index(a.as_str().unwrap())))
                })
        })
        .map(|(ordinal, _)| *ordinal)
        .collect();
    assert_eq!(
        adopters,
        [2],
        "the first live worker after worker 1 adopts its agents"
    );

    // Nothing accepted is lost; a repeat is the same answer, not a second turn.
    let ids: Vec<Uuid> = load.iter().map(|(_, id)| *id).collect();
    pool.wait_answered(&ids, ANSWER).await;
    for (i, id) in &load {
        let replies = pool.replies_to(id);
        assert!(
            replies.iter().all(|r| r.text == replies[0].text),
            "agent-{i} answered one message twice differently: {replies:?}"
        );
    }
}
