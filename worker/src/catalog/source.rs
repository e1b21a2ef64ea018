//! Where the catalog comes from, and noticing when it changes.
//!
//! The catalog is `worker.catalogFile` when the config names one (the operator mounts
//! the pool's catalog ConfigMap there), else the `agents`, `channels` and `extensions`
//! of the config file itself. Both files are polled: each [`CatalogSource::poll`]
//! reads them and compares the bytes with the previous read.
//!
//! Polling rather than inotify: Kubernetes updates a ConfigMap volume by writing a new
//! timestamped directory and atomically swapping the `..data` symlink that the visible
//! file points through. The file itself is never written, so watchers on it (or on its
//! directory) see no event, or only a deletion after which they watch nothing. Reading
//! a small file once a second is cheap and catches every kind of update, including an
//! editor's rename-over-write on a laptop.

use std::path::{Path, PathBuf};

use nexo_api::WorkerConfig;
use nexo_api::config::{Catalog, WorkerSettings};
use sha2::{Digest, Sha256};

use crate::config::{self, ConfigError};

/// One polled file: its path and what the last read found.
struct Watched {
    path: PathBuf,
    /// The bytes, or the kind of error, of the last read.
    last: Option<Result<Vec<u8>, std::io::ErrorKind>>,
}

impl Watched {
    fn new(path: PathBuf) -> Self {
        Self { path, last: None }
    }

    /// The file's text when it differs from the last read; a read error is reported
    /// once, not on every poll.
    async fn changed(&mut self) -> Option<Result<String, ConfigError>> {
        let read = tokio::fs::read(&self.path).await;
        let seen = read.as_ref().map(Clone::clone).map_err(|e| e.kind());
        if self.last.as_ref() == Some(&seen) {
            return None;
        }
        self.last = Some(seen);
        let text = read.and_then(|bytes| {
            String::from_utf8(bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        });
        Some(text.map_err(|source| ConfigError::Read {
            path: self.path.clone(),
            source,
        }))
    }
}

/// The catalog's files and what the worker started with.
pub struct CatalogSource {
    /// The config file, when the worker was started from one.
    config: Option<Watched>,
    /// `worker.catalogFile`, when set.
    catalog: Option<Watched>,
    /// The `worker:` block the process runs with: it is not reloaded.
    settings: WorkerSettings,
}

/// The catalog a config file holds in its own lists.
fn inline_catalog(config: &WorkerConfig) -> Catalog {
    Catalog {
        revision: String::new(),
        placement: None,
        agents: config.agents.clone(),
        channels: config.channels.clone(),
        extensions: config.extensions.clone(),
    }
}

impl CatalogSource {
    /// Opens the source of `config`, loaded from `config_file` (when it came from a
    /// file: that file is then watched too), and returns the catalog to start with.
    pub async fn open(
        config: &WorkerConfig,
        config_file: Option<&Path>,
    ) -> Result<(Self, Catalog), ConfigError> {
        let mut source = Self {
            config: config_file.map(|p| Watched::new(p.to_owned())),
            catalog: config.worker.catalog_file.clone().map(Watched::new),
            settings: config.worker.clone(),
        };
        // Remember the config file as it is now: it was just loaded.
        if let Some(watched) = &mut source.config {
            let _ = watched.changed().await;
        }
        let catalog = match &mut source.catalog {
            Some(watched) => {
                let text = watched.changed().await.expect("first read is a change")?;
                config::parse_catalog(&watched.path, &text)?
            }
            None => inline_catalog(config),
        };
        Ok((source, catalog))
    }

    /// Where the catalog is read from, for logs.
    pub fn describe(&self) -> String {
        match (&self.catalog, &self.config) {
            (Some(catalog), _) => catalog.path.display().to_string(),
            (None, Some(config)) => config.path.display().to_string(),
            (None, None) => "the config (not watched: it was not read from a file)".to_owned(),
        }
    }

    /// A new catalog when a file changed since the last poll: `Some(Err)` when the
    /// change cannot be read or is invalid, `None` when nothing changed.
    pub async fn poll(&mut self) -> Option<Result<Catalog, ConfigError>> {
        let from_config = self.poll_config().await;
        if let Some(catalog) = &mut self.catalog {
            let changed = catalog
                .changed()
                .await
                .map(|text| text.and_then(|text| config::parse_catalog(&catalog.path, &text)));
            // An invalid config file is reported even when its lists are not used.
            return changed.or(from_config.and_then(Result::err).map(Err));
        }
        from_config.map(|r| r.map(|config| inline_catalog(&config)))
    }

    /// The config file, when it changed; warns when its `worker:` block did.
    async fn poll_config(&mut self) -> Option<Result<WorkerConfig, ConfigError>> {
        let watched = self.config.as_mut()?;
        let loaded = watched
            .changed()
            .await?
            .and_then(|text| config::parse(&watched.path, &text, |name| std::env::var(name).ok()));
        if let Ok(config) = &loaded
            && config.worker != self.settings
        {
            tracing::warn!(
                file = %watched.path.display(),
                "the `worker:` block changed; worker settings are read only at start: restart the worker to apply them"
            );
        }
        Some(loaded)
    }
}

/// The revision a catalog is reported under: its own `revision` (the operator's hash,
/// which also covers referenced Secrets), else a hash of its content.
pub fn revision(catalog: &Catalog) -> String {
    if !catalog.revision.is_empty() {
        return catalog.revision.clone();
    }
    let json = serde_json::to_vec(catalog).expect("a catalog serializes");
    let digest = hex::encode(Sha256::digest(&json));
    format!("sha256-{}", &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_is_the_catalogs_own_or_a_content_hash() {
        let mut catalog = Catalog::default();
        let hashed = revision(&catalog);
        assert!(
            hashed.starts_with("sha256-") && hashed.len() == 23,
            "{hashed}"
        );
        assert_eq!(hashed, revision(&catalog.clone()));
        catalog.placement = Some(nexo_api::config::CatalogPlacement {
            partitions: 8,
            workers: 2,
        });
        assert_ne!(revision(&catalog), hashed);
        catalog.revision = "abc123".to_owned();
        assert_eq!(revision(&catalog), "abc123");
    }
}
