//! Scaling a pool without dropping agents: partitions move between workers while the
//! pods on both ends run. Pure, like [`crate::render`]: the pool controller passes in
//! what it read and applies what [`step`] decides.
//!
//! A worker runs the agents of a partition only while it holds the partition's lease,
//! and hands them off (drains them, snapshots their memory, releases the lease) once
//! the catalog's `placement.workers` says it no longer owns the partition. So:
//!
//! - **Scale-down** N → M: the catalog says M first while the StatefulSet keeps N pods;
//!   once every worker with ordinal ≥ M reports it holds nothing (or, reporting no
//!   ownership at all, runs no agent), or at the deadline ([`hand_off_deadline`]), the
//!   StatefulSet goes to M.
//! - **Scale-up** M → N: the StatefulSet goes to N first; the catalog says N once every
//!   new worker answers `GET /catalog` or the StatefulSet reports all N ready, so no
//!   partition moves to a pod that does not run yet. There is no deadline: a new pod
//!   that never starts leaves the partitions where they run.
//!
//! The scale under way is kept in the pool's status ([`PoolHandOff`]), so its deadline
//! survives an operator restart.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nexo_api::crd::{PoolHandOff, WorkerOwnership, WorkerPool};
use nexo_api::report::CatalogReport;

/// What a scale-down waits for beyond the pool's `drainTimeoutSeconds` before it removes
/// pods that still hold partitions: the kubelet's sync of the catalog's ConfigMap volume
/// (up to a minute), then each handed-off agent's memory snapshot and the release of its
/// lease. Past it the pods go anyway; their shutdown hands off what they still hold.
pub const HAND_OFF_MARGIN: Duration = Duration::from_secs(90);

/// How long a scale-down of `pool` waits for its workers to hand their partitions off.
pub fn hand_off_deadline(pool: &WorkerPool) -> Duration {
    Duration::from_secs(pool.spec.drain_timeout_seconds) + HAND_OFF_MARGIN
}

/// How many workers the catalog places partitions on and how many pods the
/// StatefulSet runs. Both are `spec.replicas` once a pool is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// The catalog's `placement.workers` (at least 1: a catalog with none is invalid).
    pub placement: u32,
    /// The StatefulSet's `replicas`.
    pub replicas: u32,
}

impl Workers {
    /// A settled pool: what its spec says.
    pub fn settled(pool: &WorkerPool) -> Self {
        let replicas = pool.spec.replicas.max(0) as u32;
        Self {
            placement: replicas.max(1),
            replicas,
        }
    }
}

/// What the pool controller read.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// `spec.replicas`.
    pub wanted: u32,
    /// The catalog's `placement.workers` as last written (`status.placementWorkers`);
    /// `None` before the operator recorded one.
    pub placed: Option<u32>,
    /// The StatefulSet's `spec.replicas`; `None` before it exists.
    pub pods: Option<u32>,
    /// The StatefulSet's ready replicas.
    pub ready: u32,
    /// The scale under way, from the previous status.
    pub hand_off: Option<&'a PoolHandOff>,
    /// Each worker's report, by ordinal; `None` when it cannot be asked.
    pub reports: &'a [Option<CatalogReport>],
    pub now: &'a Time,
    /// How long a scale-down waits ([`hand_off_deadline`]).
    pub deadline: Duration,
}

impl Observed<'_> {
    fn report(&self, ordinal: u32) -> Option<&CatalogReport> {
        self.reports.get(ordinal as usize)?.as_ref()
    }
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub workers: Workers,
    /// The scale still under way after this step; `None` once settled.
    pub hand_off: Option<PoolHandOff>,
    /// A new scale began at this step.
    pub started: bool,
    /// Workers that still held partitions when the deadline passed and the pods went.
    pub deadline_passed: Vec<u32>,
}

/// The ordinals to ask: every pod that exists or is wanted.
pub fn asked(wanted: u32, pods: Option<u32>) -> u32 {
    wanted.max(pods.unwrap_or(0))
}

/// Whether a worker's report says it has nothing to hand off.
fn holds_nothing(report: &CatalogReport) -> bool {
    match &report.ownership {
        Some(ownership) => ownership.held.is_empty(),
        // A worker without leases (an older version): nothing runs there any more.
        None => report.agents.is_empty(),
    }
}

/// The next step of a pool's scale.
pub fn step(observed: &Observed<'_>) -> Step {
    let wanted = observed.wanted;
    let target = wanted.max(1);
    let previous = observed.hand_off.filter(|h| h.to == wanted);
    // A status that records the pool settled at this size means the StatefulSet was
    // applied with it: a cache that still shows more pods missed that write.
    let settled_before = observed.hand_off.is_none() && observed.placed == Some(target);
    let pods_now = match observed.pods {
        Some(_) if settled_before => wanted,
        Some(pods) => pods,
        None => wanted,
    };
    // The operators before this one kept the catalog at the StatefulSet's size.
    let placed_now = observed.placed.unwrap_or(pods_now.max(1));
    let started_at = previous.map_or_else(|| observed.now.clone(), |h| h.started_at.clone());

    // New pods first.
    let mut replicas = pods_now.max(wanted);
    let mut waiting_for = Vec::new();
    // The catalog grows once every new worker runs, all at once: growing a step at a
    // time would move some partitions twice.
    let placement = if placed_now >= target {
        target
    } else {
        let silent: Vec<u32> = (placed_now..target)
            .filter(|&ordinal| observed.report(ordinal).is_none())
            .collect();
        if silent.is_empty() || observed.ready >= wanted {
            target
        } else {
            waiting_for.extend(silent);
            placed_now
        }
    };
    // Pods go once the workers beyond the new placement hold nothing.
    let mut deadline = None;
    let mut deadline_passed = Vec::new();
    if replicas > wanted {
        let holding: Vec<u32> = (target..replicas)
            .filter(|&ordinal| !observed.report(ordinal).is_some_and(holds_nothing))
            .collect();
        let ends = at(&started_at, observed.deadline);
        if holding.is_empty() {
            replicas = wanted;
        } else if observed.now.0 >= ends.0 {
            replicas = wanted;
            deadline_passed = holding;
        } else {
            waiting_for.extend(holding);
            deadline = Some(ends);
        }
    }

    let workers = Workers {
        placement,
        replicas,
    };
    let settled = placement == target && replicas == wanted;
    let hand_off = (!settled).then(|| PoolHandOff {
        from: previous.map_or(pods_now, |h| h.from),
        to: wanted,
        started_at,
        deadline,
        waiting_for,
    });
    Step {
        workers,
        started: hand_off.is_some() && previous.is_none(),
        hand_off,
        deadline_passed,
    }
}

/// `time` plus `duration` (saturating at the end of time).
fn at(time: &Time, duration: Duration) -> Time {
    Time(
        time.0
            .checked_add(duration)
            .unwrap_or(k8s_openapi::jiff::Timestamp::MAX),
    )
}

/// What each worker reports owning, by ordinal; workers that report no ownership are
/// left out.
pub fn ownership(reports: &[Option<CatalogReport>]) -> Vec<WorkerOwnership> {
    reports
        .iter()
        .enumerate()
        .filter_map(|(ordinal, report)| {
            let owned = report.as_ref()?.ownership.as_ref()?;
            Some(WorkerOwnership {
                worker: ordinal as u32,
                held: owned.held.len() as u32,
                acquiring: owned.acquiring.clone(),
                releasing: owned.releasing.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexo_api::report::{HeldPartition, Ownership};

    fn time(text: &str) -> Time {
        Time(text.parse().unwrap())
    }

    const START: &str = "2026-01-01T00:00:00Z";
    const DEADLINE: Duration = Duration::from_secs(120);

    fn holding(partitions: &[u32]) -> Option<CatalogReport> {
        Some(CatalogReport {
            ownership: Some(Ownership {
                worker: "w".into(),
                held: partitions
                    .iter()
                    .map(|&partition| HeldPartition {
                        partition,
                        epoch: 1,
                    })
                    .collect(),
                ..Ownership::default()
            }),
            ..CatalogReport::default()
        })
    }

    fn observed<'a>(
        wanted: u32,
        placed: u32,
        pods: u32,
        hand_off: Option<&'a PoolHandOff>,
        reports: &'a [Option<CatalogReport>],
        now: &'a Time,
    ) -> Observed<'a> {
        Observed {
            wanted,
            placed: Some(placed),
            pods: Some(pods),
            ready: pods,
            hand_off,
            reports,
            now,
            deadline: DEADLINE,
        }
    }

    #[test]
    fn a_scale_down_shrinks_the_catalog_first_and_the_pods_once_handed_off() {
        let now = time(START);
        let reports = [holding(&[0]), holding(&[1]), holding(&[2]), holding(&[3])];
        let first = step(&observed(3, 4, 4, None, &reports, &now));
        assert_eq!(
            first.workers,
            Workers {
                placement: 3,
                replicas: 4
            }
        );
        assert!(first.started);
        let hand_off = first.hand_off.clone().unwrap();
        assert_eq!((hand_off.from, hand_off.to), (4, 3));
        assert_eq!(hand_off.waiting_for, [3]);
        assert_eq!(hand_off.deadline, Some(time("2026-01-01T00:02:00Z")));

        // Worker 3 still holds its partition: the pods stay, the clock keeps its start.
        let later = time("2026-01-01T00:01:00Z");
        let second = step(&observed(3, 3, 4, Some(&hand_off), &reports, &later));
        assert_eq!(second.workers.replicas, 4);
        assert!(!second.started);
        assert_eq!(second.hand_off.as_ref().unwrap().started_at, now);

        let released = [holding(&[0]), holding(&[1]), holding(&[2, 3]), holding(&[])];
        let done = step(&observed(3, 3, 4, Some(&hand_off), &released, &later));
        assert_eq!(
            done.workers,
            Workers {
                placement: 3,
                replicas: 3
            }
        );
        assert_eq!(done.hand_off, None);
        assert!(done.deadline_passed.is_empty());
    }

    #[test]
    fn a_scale_down_removes_the_pods_at_its_deadline() {
        let started = time(START);
        let reports = [holding(&[0]), None];
        let first = step(&observed(1, 2, 2, None, &reports, &started));
        let hand_off = first.hand_off.unwrap();
        let before = time("2026-01-01T00:01:59Z");
        let waiting = step(&observed(1, 1, 2, Some(&hand_off), &reports, &before));
        assert_eq!(waiting.workers.replicas, 2, "a silent worker is waited for");
        let after = time("2026-01-01T00:02:00Z");
        let done = step(&observed(1, 1, 2, Some(&hand_off), &reports, &after));
        assert_eq!(done.workers.replicas, 1);
        assert_eq!(done.deadline_passed, [1]);
        assert_eq!(done.hand_off, None);
    }

    #[test]
    fn a_worker_without_leases_is_done_once_it_runs_no_agent() {
        let now = time(START);
        let running = CatalogReport {
            agents: vec!["team-a/concierge".into()],
            ..CatalogReport::default()
        };
        let reports = [None, Some(running)];
        assert_eq!(
            step(&observed(1, 2, 2, None, &reports, &now))
                .workers
                .replicas,
            2
        );
        let reports = [None, Some(CatalogReport::default())];
        assert_eq!(
            step(&observed(1, 2, 2, None, &reports, &now))
                .workers
                .replicas,
            1
        );
    }

    #[test]
    fn a_scale_up_starts_pods_first_and_places_partitions_once_they_answer() {
        let now = time(START);
        let reports = [holding(&[0, 1]), None, None];
        let mut first = observed(3, 1, 1, None, &reports, &now);
        first.ready = 1;
        let first = step(&first);
        assert_eq!(
            first.workers,
            Workers {
                placement: 1,
                replicas: 3
            }
        );
        let hand_off = first.hand_off.unwrap();
        assert_eq!(hand_off.waiting_for, [1, 2]);
        assert_eq!(hand_off.deadline, None, "a scale-up has no deadline");

        // Long after, one new worker answers: still all or nothing.
        let much_later = time("2026-01-02T00:00:00Z");
        let one = [holding(&[0, 1]), holding(&[]), None];
        let mut waiting = observed(3, 1, 3, Some(&hand_off), &one, &much_later);
        waiting.ready = 2;
        assert_eq!(step(&waiting).workers.placement, 1);
        // Both answer, or the StatefulSet says all are ready.
        let both = [holding(&[0, 1]), holding(&[]), holding(&[])];
        let done = step(&observed(3, 1, 3, Some(&hand_off), &both, &much_later));
        assert_eq!(done.workers.placement, 3);
        assert_eq!(done.hand_off, None);
        let ready = observed(3, 1, 3, Some(&hand_off), &one, &much_later);
        assert_eq!(step(&ready).workers.placement, 3);
    }

    #[test]
    fn a_new_pool_and_a_settled_one_need_no_hand_off() {
        let now = time(START);
        let new = Observed {
            placed: None,
            pods: None,
            ready: 0,
            ..observed(2, 0, 0, None, &[], &now)
        };
        let first = step(&new);
        assert_eq!(
            first.workers,
            Workers {
                placement: 2,
                replicas: 2
            }
        );
        assert_eq!(first.hand_off, None);
        // Settled at 3 by the status: a cache still showing 4 pods missed the write.
        let stale = step(&observed(3, 3, 4, None, &[], &now));
        assert_eq!(stale.workers.replicas, 3);
        assert_eq!(stale.hand_off, None);
    }

    #[test]
    fn scaling_to_zero_keeps_one_worker_in_the_catalog() {
        let now = time(START);
        let reports = [holding(&[0, 1])];
        let down = step(&observed(0, 1, 1, None, &reports, &now));
        assert_eq!(
            down.workers,
            Workers {
                placement: 1,
                replicas: 0
            },
            "worker 0 has nobody to hand off to; its shutdown does"
        );
    }

    #[test]
    fn a_scale_reversed_midway_starts_over() {
        let now = time(START);
        let reports = [holding(&[0]), holding(&[1]), holding(&[2]), holding(&[3])];
        let down = step(&observed(3, 4, 4, None, &reports, &now))
            .hand_off
            .unwrap();
        // Back to 4 before worker 3 let go: it answers, so the catalog says 4 again.
        let later = time("2026-01-01T00:00:30Z");
        let back = step(&observed(4, 3, 4, Some(&down), &reports, &later));
        assert_eq!(
            back.workers,
            Workers {
                placement: 4,
                replicas: 4
            }
        );
        assert_eq!(back.hand_off, None);
        // Down to 2 instead: a new scale, with a new clock.
        let further = step(&observed(2, 3, 4, Some(&down), &reports, &later));
        let hand_off = further.hand_off.unwrap();
        assert!(further.started);
        assert_eq!(hand_off.started_at, later);
        assert_eq!((hand_off.from, hand_off.to), (4, 2));
        assert_eq!(hand_off.waiting_for, [2, 3]);
    }

    #[test]
    fn ownership_lists_the_workers_that_report_it() {
        let mut releasing = holding(&[4, 5]).unwrap();
        releasing.ownership.as_mut().unwrap().releasing = vec![5];
        let reports = [Some(releasing), None, Some(CatalogReport::default())];
        assert_eq!(
            ownership(&reports),
            [WorkerOwnership {
                worker: 0,
                held: 2,
                acquiring: vec![],
                releasing: vec![5],
            }]
        );
    }
}
