//! Which worker of a pool runs an agent.
//!
//! Two stable steps. An agent's *partition* is a hash of `namespace/name` modulo the
//! pool's partition count P; P is fixed for the life of a pool, so the partition never
//! changes. Partitions are then dealt to the pool's N workers so that
//!
//! - every worker owns ⌊P/N⌋ or ⌈P/N⌉ partitions (balanced, even with only 64), and
//! - going from N to N+1 workers moves exactly ⌊P/(N+1)⌋ partitions, all of them to
//!   the new worker; nothing moves between the old workers.
//!
//! The assignment for N workers is built from the one for N−1: worker N−1 takes
//! ⌊P/N⌋ partitions, one at a time from the currently most loaded worker, choosing
//! among that worker's partitions by rendezvous score (a hash of partition and new
//! ordinal). Scaling down is the same function read backwards. Plain rendezvous
//! hashing has the same minimal movement but, with 64 partitions, loads that differ
//! by a factor of two; see docs/adr/0005-partition-assignment.md.
//!
//! The operator uses this to fill `status.placement`, the worker to pick its own
//! agents from `--shard i --shards N`. Both must agree, so the hashes are fixed,
//! portable functions (XXH3-64, seed 0) that must never change for existing pools.

use xxhash_rust::xxh3::xxh3_64;

use crate::name::ResourceKey;

/// Partitions of a pool unless its spec says otherwise.
pub const DEFAULT_PARTITIONS: u32 = 64;

/// Where one agent runs: its partition and the worker ordinal that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    pub partition: u32,
    pub worker: u32,
}

/// The partition function of one pool: P partitions dealt to N workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMap {
    /// Owner (worker ordinal) of each partition.
    owners: Vec<u32>,
    workers: u32,
}

impl PartitionMap {
    /// `partitions` and `workers` are clamped to at least 1 (a pool scaled to zero
    /// still has a well-defined, if unserved, placement), and `workers` to at most
    /// `partitions` (a worker beyond that would own nothing anyway).
    pub fn new(partitions: u32, workers: u32) -> Self {
        let partitions = partitions.max(1);
        let workers = workers.clamp(1, partitions);
        let mut owners = vec![0u32; partitions as usize];
        let mut owned: Vec<Vec<u32>> = vec![(0..partitions).collect()];
        for new in 1..workers {
            let mut taken = Vec::new();
            for _ in 0..partitions / (new + 1) {
                // Most loaded worker; ties go to the lowest ordinal.
                let donor = (0..owned.len())
                    .max_by_key(|&w| (owned[w].len(), std::cmp::Reverse(w)))
                    .unwrap_or(0);
                let pick = (0..owned[donor].len())
                    .max_by_key(|&i| (score(owned[donor][i], new), owned[donor][i]))
                    .unwrap_or(0);
                taken.push(owned[donor].swap_remove(pick));
            }
            owned.push(taken);
        }
        for (worker, parts) in owned.iter().enumerate() {
            for &partition in parts {
                owners[partition as usize] = worker as u32;
            }
        }
        Self { owners, workers }
    }

    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// Workers that own partitions (the requested count, at most `partitions`).
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The partition of a resource: stable for a given P, whatever N is.
    pub fn partition(&self, key: &ResourceKey) -> u32 {
        let hash = xxh3_64(format!("{}/{}", key.namespace, key.name).as_bytes());
        (hash % self.owners.len() as u64) as u32
    }

    /// The worker ordinal (0-based) that owns `partition`.
    pub fn worker(&self, partition: u32) -> u32 {
        self.owners
            .get(partition as usize)
            .copied()
            .unwrap_or_default()
    }

    pub fn place(&self, key: &ResourceKey) -> Placement {
        let partition = self.partition(key);
        Placement {
            partition,
            worker: self.worker(partition),
        }
    }

    /// Whether worker `ordinal` runs the resource `key`.
    pub fn owns(&self, ordinal: u32, key: &ResourceKey) -> bool {
        self.place(key).worker == ordinal
    }
}

/// Rendezvous weight of a (partition, worker) pair.
fn score(partition: u32, ordinal: u32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&partition.to_le_bytes());
    bytes[4..].copy_from_slice(&ordinal.to_le_bytes());
    xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(count: usize) -> Vec<ResourceKey> {
        (0..count)
            .map(|i| ResourceKey::new(format!("team-{}", i % 7), format!("agent-{i}")))
            .collect()
    }

    #[test]
    fn placement_is_stable() {
        // Pinned values: if these change, running pools would reshuffle every agent.
        let map = PartitionMap::new(DEFAULT_PARTITIONS, 3);
        let key = ResourceKey::new("default", "concierge");
        assert_eq!(map.partition(&key), PINNED_CONCIERGE_PARTITION);
        assert_eq!(map.place(&key), map.place(&key.clone()));
        // The partition does not depend on the number of workers.
        for workers in 1..10 {
            assert_eq!(
                PartitionMap::new(DEFAULT_PARTITIONS, workers).partition(&key),
                PINNED_CONCIERGE_PARTITION
            );
        }
    }

    const PINNED_CONCIERGE_PARTITION: u32 = 3;

    #[test]
    fn every_worker_gets_work_and_only_valid_ordinals_are_used() {
        let map = PartitionMap::new(DEFAULT_PARTITIONS, 4);
        let mut per_worker = [0usize; 4];
        for key in agents(1_000) {
            let placement = map.place(&key);
            assert!(placement.partition < DEFAULT_PARTITIONS);
            per_worker[placement.worker as usize] += 1;
        }
        for (worker, count) in per_worker.iter().enumerate() {
            // 16 partitions each; agents per partition vary around 15.6.
            assert!(
                (200..=300).contains(count),
                "worker {worker} got {count} of 1000"
            );
        }
    }

    #[test]
    fn partitions_are_balanced() {
        for partitions in [1, 7, 64, 100] {
            for workers in 1..=partitions.min(40) {
                let map = PartitionMap::new(partitions, workers);
                let mut load = vec![0u32; workers as usize];
                for p in 0..partitions {
                    load[map.worker(p) as usize] += 1;
                }
                let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
                assert!(max - min <= 1, "P={partitions} N={workers}: loads {load:?}");
            }
        }
    }

    #[test]
    fn scaling_out_moves_about_one_in_n_plus_one() {
        let keys = agents(1_000);
        for workers in 1..=12u32 {
            let before = PartitionMap::new(DEFAULT_PARTITIONS, workers);
            let after = PartitionMap::new(DEFAULT_PARTITIONS, workers + 1);
            let mut moved = 0;
            for key in &keys {
                let (from, to) = (before.place(key), after.place(key));
                if from != to {
                    // Minimal disruption: an agent only ever moves to the new worker.
                    assert_eq!(to.worker, workers, "{key} moved between old workers");
                    moved += 1;
                }
            }
            // Exactly ⌊64/(N+1)⌋ partitions move; agents per partition vary, so
            // allow a quarter more agents than the exact share.
            let bound = 1.25 * keys.len() as f64 / f64::from(workers + 1);
            assert!(
                f64::from(moved) <= bound,
                "{workers}->{}: {moved} of 1000 agents moved, bound {bound:.0}",
                workers + 1
            );
            assert!(
                moved > 0,
                "{workers}->{}: the new worker got nothing",
                workers + 1
            );
        }
    }

    #[test]
    fn degenerate_sizes_are_clamped() {
        let map = PartitionMap::new(0, 0);
        let key = ResourceKey::new("a", "b");
        assert_eq!(
            map.place(&key),
            Placement {
                partition: 0,
                worker: 0
            }
        );
        assert!(map.owns(0, &key));
        // More workers than partitions: the extra ones own nothing.
        assert_eq!(PartitionMap::new(4, 10).workers(), 4);
    }
}
