//! Agents' memory on JetStream: each agent's journal is a subject of one stream
//! (`memory.journal.<namespace>.<name>`), appended with
//! `Nats-Expected-Last-Subject-Sequence` so only the writer that knows the last entry
//! can add one; snapshots are objects of one object store, found through an index
//! key-value bucket whose entry per agent only ever moves forward (compare-and-set),
//! so a stale owner's late snapshot never replaces a newer one.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, UpdateErrorKind};
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_nats::jetstream::{self};
use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::{ResourceKey, subject};
use tokio::io::AsyncReadExt;

use crate::memory::{Durable, DurableError, Snapshot};

/// The key-value bucket that names each agent's newest snapshot.
const SNAPSHOT_INDEX_BUCKET: &str = "nexo-memory-snapshot-index";
/// Snapshots are stored in chunks of this size (JetStream messages stay well below the
/// default 1 MB payload limit).
const SNAPSHOT_CHUNK: usize = 256 * 1024;
/// Attempts to move the snapshot index forward while other writers race for it.
const INDEX_ATTEMPTS: usize = 10;
/// How long JetStream may take to answer a journal or snapshot request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(what: &str) -> impl FnOnce(String) -> DurableError + '_ {
    move |e| DurableError::Unavailable(format!("{what}: {e}"))
}

/// The journal stream and snapshot stores every agent's journal uses.
#[derive(Clone)]
pub struct JournalStore {
    jetstream: jetstream::Context,
    journal: stream::Stream,
    snapshots: ObjectStore,
    index: kv::Store,
}

impl JournalStore {
    /// Creates (or finds) the stream, the object store and the index bucket.
    pub async fn open(jetstream: &jetstream::Context) -> Result<Self, DurableError> {
        let mut jetstream = jetstream.clone();
        jetstream.set_timeout(REQUEST_TIMEOUT);
        let journal = jetstream
            .get_or_create_stream(stream::Config {
                name: subject::MEMORY_JOURNAL_STREAM.to_owned(),
                subjects: vec![subject::MEMORY_JOURNAL_ALL.to_owned()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                // Entries are read one by one when an agent is taken over.
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("journal stream")(e.to_string()))?;
        let snapshots = match jetstream
            .get_object_store(subject::MEMORY_SNAPSHOT_BUCKET)
            .await
        {
            Ok(store) => store,
            Err(_) => jetstream
                .create_object_store(object_store::Config {
                    bucket: subject::MEMORY_SNAPSHOT_BUCKET.to_owned(),
                    description: Some("nexo: the newest memory snapshot of each agent".to_owned()),
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("snapshot store")(e.to_string()))?,
        };
        let index = match jetstream.get_key_value(SNAPSHOT_INDEX_BUCKET).await {
            Ok(store) => store,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: SNAPSHOT_INDEX_BUCKET.to_owned(),
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("snapshot index")(e.to_string()))?,
        };
        Ok(Self {
            jetstream,
            journal,
            snapshots,
            index,
        })
    }
}

/// The journal store, opened on first use: building an agent never waits for NATS,
/// taking one over (which needs NATS anyway) does.
pub struct Journals {
    jetstream: jetstream::Context,
    store: tokio::sync::OnceCell<JournalStore>,
}

impl Journals {
    pub fn new(jetstream: jetstream::Context) -> Arc<Self> {
        Arc::new(Self {
            jetstream,
            store: tokio::sync::OnceCell::new(),
        })
    }

    async fn store(&self) -> Result<&JournalStore, DurableError> {
        self.store
            .get_or_try_init(|| JournalStore::open(&self.jetstream))
            .await
    }

    /// The journal and snapshot of `agent`.
    pub fn agent(self: &Arc<Self>, agent: &ResourceKey) -> AgentJournal {
        AgentJournal {
            journals: self.clone(),
            subject: subject::memory_journal(agent),
            snapshot: subject::memory_snapshot(agent),
        }
    }
}

/// One agent's journal and snapshot.
pub struct AgentJournal {
    journals: Arc<Journals>,
    subject: String,
    /// The agent's key in the snapshot index; its objects are `<this>.<seq>`.
    snapshot: String,
}

impl AgentJournal {
    async fn store(&self) -> Result<&JournalStore, DurableError> {
        self.journals.store().await
    }

    fn object(&self, seq: u64) -> String {
        format!("{}.{seq}", self.snapshot)
    }

    /// The sequence the index names as the newest snapshot, and the entry's revision.
    async fn indexed(&self) -> Result<Option<(u64, u64)>, DurableError> {
        let entry = self
            .store()
            .await?
            .index
            .entry(&self.snapshot)
            .await
            .map_err(|e| unavailable("snapshot index")(e.to_string()))?;
        Ok(entry.and_then(|entry| {
            let seq = std::str::from_utf8(&entry.value).ok()?.parse().ok()?;
            (entry.operation == kv::Operation::Put).then_some((seq, entry.revision))
        }))
    }
}

#[async_trait]
impl Durable for AgentJournal {
    async fn append(&self, entry: Vec<u8>, last: u64) -> Result<u64, DurableError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        let ack = self
            .store()
            .await?
            .jetstream
            .publish_with_headers(self.subject.clone(), headers, Bytes::from(entry))
            .await
            .map_err(|e| unavailable("append")(e.to_string()))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                Err(DurableError::Fenced { expected: last })
            }
            Err(err) => Err(unavailable("append")(err.to_string())),
        }
    }

    async fn entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, DurableError> {
        let store = self.store().await?;
        let mut entries = Vec::new();
        let mut next = after + 1;
        loop {
            match store
                .journal
                .direct_get_next_for_subject(&self.subject, Some(next))
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    entries.push((message.sequence, message.payload.to_vec()));
                }
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => return Ok(entries),
                Err(err) => return Err(unavailable("read")(err.to_string())),
            }
        }
    }

    async fn last(&self) -> Result<u64, DurableError> {
        match self
            .store()
            .await?
            .journal
            .direct_get_last_for_subject(&self.subject)
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(0),
            Err(err) => Err(unavailable("read")(err.to_string())),
        }
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>, DurableError> {
        let Some((seq, _)) = self.indexed().await? else {
            return Ok(None);
        };
        let mut object = self
            .store()
            .await?
            .snapshots
            .get(self.object(seq))
            .await
            .map_err(|e| unavailable("snapshot")(e.to_string()))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| unavailable("snapshot")(e.to_string()))?;
        Ok(Some(Snapshot { seq, bytes }))
    }

    async fn store_snapshot(&self, snapshot: Snapshot) -> Result<(), DurableError> {
        let store = self.store().await?;
        // One that includes as much is stored already (a hand-off right after a
        // take-over snapshot, with no change between).
        if self
            .indexed()
            .await?
            .is_some_and(|(seq, _)| seq >= snapshot.seq)
        {
            return Ok(());
        }
        let name = self.object(snapshot.seq);
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            chunk_size: Some(SNAPSHOT_CHUNK),
            ..Default::default()
        };
        store
            .snapshots
            .put(meta, &mut snapshot.bytes.as_slice())
            .await
            .map_err(|e| unavailable("snapshot")(e.to_string()))?;
        // Point the index at it, unless it already names this one or a newer one.
        let mut previous = None;
        let mut moved = false;
        let mut superseded = false;
        for _ in 0..INDEX_ATTEMPTS {
            let value = Bytes::from(snapshot.seq.to_string());
            let result = match self.indexed().await? {
                // Another writer indexed this same state meanwhile (the same object
                // name): it stays.
                Some((seq, _)) if seq == snapshot.seq => return Ok(()),
                Some((seq, _)) if seq > snapshot.seq => {
                    superseded = true;
                    break;
                }
                Some((seq, revision)) => {
                    previous = Some(seq);
                    store
                        .index
                        .update(&self.snapshot, value, revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.kind() == UpdateErrorKind::WrongLastRevision)
                }
                None => store
                    .index
                    .create(&self.snapshot, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            };
            match result {
                Ok(()) => {
                    moved = true;
                    break;
                }
                // Someone else moved it meanwhile: look again.
                Err(true) => continue,
                Err(false) => return Err(unavailable("snapshot index")("refused".to_owned())),
            }
        }
        if superseded {
            // A newer snapshot is indexed: this one is of no use.
            let _ = store.snapshots.delete(&name).await;
            return Ok(());
        }
        if !moved {
            return Err(unavailable("snapshot index")(
                "other writers kept moving it".to_owned(),
            ));
        }
        if let Some(previous) = previous.filter(|p| *p != snapshot.seq) {
            let _ = store.snapshots.delete(self.object(previous)).await;
        }
        // Entries the snapshot includes go, except its last: later appends are
        // conditional on the subject's last entry, which must stay. (A purge up to
        // sequence 0 would be a purge of everything.)
        if snapshot.seq == 0 {
            return Ok(());
        }
        store
            .journal
            .purge()
            .filter(&self.subject)
            .sequence(snapshot.seq)
            .await
            .map_err(|e| unavailable("trim")(e.to_string()))?;
        Ok(())
    }
}
