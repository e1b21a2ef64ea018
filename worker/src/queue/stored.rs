//! The outbox rows one handling of a message stored, so that the message is
//! acknowledged only once they have left the outbox.
//!
//! Why: a handler's consequences (a router's hand-off to the agent, the agent's reply)
//! are first stored in this worker's outbox. Acknowledged as soon as they were stored,
//! a worker killed before its outbox drained would hold them on its own disk, sent
//! only if that worker starts again on the same volume: the failover test lost a reply
//! so (its worker 1 never comes back; nor does a pod whose node is gone). Acknowledged
//! once they are on the bus, a kill before that leaves the message unacknowledged: it
//! is delivered again, on the agent's new owner, which sends the recorded answer.
//!
//! The rows are collected in a task-local, filled by [`crate::queue::QueuedBroker`]:
//! handlers publish through the `Broker` trait as before, and the consumer loop, which
//! runs each handling in its own task, reads what that handling stored.

use std::cell::RefCell;

use super::store::{QueueError, QueueStore};

tokio::task_local! {
    static STORED: RefCell<Vec<(QueueStore, i64)>>;
}

/// Rows stored in outboxes by one handling.
#[derive(Default)]
pub struct StoredRows(Vec<(QueueStore, i64)>);

impl StoredRows {
    /// Runs `handling`, collecting the outbox rows it stores (through
    /// [`note`]) while it runs.
    pub async fn collect<T>(handling: impl Future<Output = T>) -> (T, StoredRows) {
        STORED
            .scope(RefCell::new(Vec::new()), async {
                let output = handling.await;
                (output, StoredRows(STORED.with(RefCell::take)))
            })
            .await
    }

    /// Waits until every row has left its outbox (sent, or dead-lettered).
    pub async fn wait_sent(self) -> Result<(), QueueError> {
        let mut rows = self.0;
        while let Some((store, _)) = rows.first() {
            let store = store.clone();
            let (same, other): (Vec<_>, Vec<_>) =
                rows.into_iter().partition(|(s, _)| s.is_same(&store));
            store
                .wait_sent(same.into_iter().map(|(_, seq)| seq).collect())
                .await?;
            rows = other;
        }
        Ok(())
    }
}

/// Notes that the running handling (if any) stored row `seq` in `store`.
pub(super) fn note(store: &QueueStore, seq: i64) {
    // Outside a collecting handling (a channel's intake, the drain) nobody waits.
    let _ = STORED.try_with(|rows| rows.borrow_mut().push((store.clone(), seq)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (std::path::PathBuf, QueueStore) {
        let dir = std::env::temp_dir().join(format!("nexo-stored-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = QueueStore::open(&dir.join("queue.db"), 3).unwrap();
        (dir, store)
    }

    /// The rows a handling stored are waited for until the drain removed them, and
    /// only those.
    #[tokio::test]
    async fn waits_for_the_rows_of_its_handling_until_they_are_removed() {
        let (dir, store) = temp_store();
        let before = store.keep("a.b", None, b"not ours").await.unwrap();
        let (seq, rows) = StoredRows::collect(async {
            let seq = store.keep("a.b", None, b"ours").await.unwrap();
            note(&store, seq);
            seq
        })
        .await;
        let waiting = rows.wait_sent();
        tokio::pin!(waiting);
        // The first poll asks the database thread to register the wait; a round trip
        // of that thread (it answers in order) makes sure it did.
        assert!(futures::poll!(&mut waiting).is_pending());
        store.peek(1).await.unwrap();
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "waits for its row"
        );
        store.remove(vec![before]).await.unwrap();
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "another row leaving is not its own"
        );
        store.remove(vec![seq]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the wait ended once the row was removed")
            .unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A row that left before the wait began does not hold it up.
    #[tokio::test]
    async fn rows_already_sent_are_not_waited_for() {
        let (dir, store) = temp_store();
        let seq = store.keep("a.b", None, b"x").await.unwrap();
        store.remove(vec![seq]).await.unwrap();
        let rows = StoredRows(vec![(store.clone(), seq)]);
        tokio::time::timeout(std::time::Duration::from_secs(5), rows.wait_sent())
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
