//! What a bot keeps beyond a process: the poller's next `getUpdates` offset, and for
//! each chat reset with `/reset` its generation (the conversation id's suffix).
//!
//! On NATS both live in the JetStream KV bucket [`BUCKET`], so they move with the
//! poller's lease to whichever worker takes it. The offset is written with a
//! compare-and-set on the revision the poller last read or wrote: a poller that lost
//! its lease without noticing cannot move the offset back under its successor (its
//! write fails, and it stops). On the local bus (one process) they are JSON files in
//! the worker's data directory, written whole through a rename.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::ResourceKey;

pub(crate) const BUCKET: &str = "nexo-telegram";

#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("the offset was written by another poller meanwhile")]
    Fenced,
    #[error("telegram state: {0}")]
    Unavailable(String),
}

/// The poller's offset and the revision to write the next one on (0: none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredOffset {
    pub offset: Option<i64>,
    pub revision: u64,
}

#[async_trait]
pub(crate) trait BotState: Send + Sync {
    async fn offset(&self) -> Result<StoredOffset, StateError>;
    /// Stores `offset` over the value at `revision`; returns the new revision.
    async fn save_offset(&self, offset: i64, revision: u64) -> Result<u64, StateError>;
    /// The chat's generation: how often it was reset (0: never).
    async fn generation(&self, chat: i64) -> Result<u64, StateError>;
    /// Starts a new generation of the chat; returns it.
    async fn reset(&self, chat: i64) -> Result<u64, StateError>;
}

/// State in the KV bucket, keys under `<namespace>.<name>.`.
pub(crate) struct KvState {
    kv: kv::Store,
    prefix: String,
}

impl KvState {
    pub(crate) async fn open(
        jetstream: &jetstream::Context,
        channel: &ResourceKey,
    ) -> Result<Self, StateError> {
        let kv = match jetstream.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    description: "nexo: Telegram pollers' offsets and chat resets".to_owned(),
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| StateError::Unavailable(e.to_string()))?,
        };
        Ok(Self {
            kv,
            prefix: format!("{}.{}", channel.namespace, channel.name),
        })
    }

    async fn read_number(&self, key: &str) -> Result<Option<(i64, u64)>, StateError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| StateError::Unavailable(e.to_string()))?;
        Ok(entry.and_then(|entry| {
            let value = std::str::from_utf8(&entry.value).ok()?.parse().ok()?;
            (entry.operation == kv::Operation::Put).then_some((value, entry.revision))
        }))
    }
}

#[async_trait]
impl BotState for KvState {
    async fn offset(&self) -> Result<StoredOffset, StateError> {
        let key = format!("{}.offset", self.prefix);
        Ok(match self.read_number(&key).await? {
            Some((offset, revision)) => StoredOffset {
                offset: Some(offset),
                revision,
            },
            None => StoredOffset {
                offset: None,
                revision: 0,
            },
        })
    }

    async fn save_offset(&self, offset: i64, revision: u64) -> Result<u64, StateError> {
        let key = format!("{}.offset", self.prefix);
        let value = Bytes::from(offset.to_string());
        if revision == 0 {
            return self
                .kv
                .create(&key, value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => StateError::Fenced,
                    _ => StateError::Unavailable(e.to_string()),
                });
        }
        self.kv
            .update(&key, value, revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StateError::Fenced,
                _ => StateError::Unavailable(e.to_string()),
            })
    }

    async fn generation(&self, chat: i64) -> Result<u64, StateError> {
        let key = format!("{}.reset.{chat}", self.prefix);
        Ok(self
            .read_number(&key)
            .await?
            .map_or(0, |(generation, _)| generation.max(0) as u64))
    }

    async fn reset(&self, chat: i64) -> Result<u64, StateError> {
        let key = format!("{}.reset.{chat}", self.prefix);
        // A reset racing another one of the same chat: either wins, both start anew.
        let next = self.generation(chat).await? + 1;
        self.kv
            .put(&key, Bytes::from(next.to_string()))
            .await
            .map_err(|e| StateError::Unavailable(e.to_string()))?;
        Ok(next)
    }
}

/// State in `<data dir>/telegram/<namespace>.<name>.json`.
pub(crate) struct FileState {
    path: PathBuf,
    state: Mutex<FileContents>,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct FileContents {
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    resets: BTreeMap<i64, u64>,
}

impl FileState {
    pub(crate) fn open(data_dir: &std::path::Path, channel: &ResourceKey) -> Self {
        let path = data_dir
            .join("telegram")
            .join(format!("{}.{}.json", channel.namespace, channel.name));
        let state = std::fs::read(&path)
            .ok()
            .and_then(|bytes| {
                serde_json::from_slice(&bytes)
                    .inspect_err(|err| tracing::warn!(path = %path.display(), error = %err, "unreadable Telegram state; starting without it"))
                    .ok()
            })
            .unwrap_or_default();
        Self {
            path,
            state: Mutex::new(state),
        }
    }

    fn write(&self, contents: &FileContents) -> Result<(), StateError> {
        let unavailable =
            |e: std::io::Error| StateError::Unavailable(format!("{}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let partial = self.path.with_extension("json.partial");
        let bytes = serde_json::to_vec(contents).expect("plain data serialises");
        std::fs::write(&partial, bytes).map_err(unavailable)?;
        std::fs::rename(&partial, &self.path).map_err(unavailable)
    }

    fn change(&self, change: impl FnOnce(&mut FileContents)) -> Result<FileContents, StateError> {
        let mut state = self.state.lock().unwrap();
        let mut next = state.clone();
        change(&mut next);
        self.write(&next)?;
        *state = next.clone();
        Ok(next)
    }
}

#[async_trait]
impl BotState for FileState {
    async fn offset(&self) -> Result<StoredOffset, StateError> {
        Ok(StoredOffset {
            offset: self.state.lock().unwrap().offset,
            revision: 0,
        })
    }

    async fn save_offset(&self, offset: i64, _revision: u64) -> Result<u64, StateError> {
        self.change(|state| state.offset = Some(offset))?;
        Ok(0)
    }

    async fn generation(&self, chat: i64) -> Result<u64, StateError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .resets
            .get(&chat)
            .copied()
            .unwrap_or(0))
    }

    async fn reset(&self, chat: i64) -> Result<u64, StateError> {
        let state = self.change(|state| *state.resets.entry(chat).or_insert(0) += 1)?;
        Ok(state.resets[&chat])
    }
}
