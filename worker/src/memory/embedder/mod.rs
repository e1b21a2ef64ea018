//! What turns text into vectors. Two kinds: an OpenAI-compatible `/embeddings` API
//! (semantic, needs a model server) and offline feature hashing (lexical: it finds
//! shared words and spellings, not meanings).

mod hashing;
mod openai;

use std::sync::Arc;

use async_trait::async_trait;
use nexo_api::spec::{EmbedderProvider, EmbedderSpec};

use crate::json_http::HttpError;
use crate::secrets::{SecretError, Secrets};

pub use hashing::HashingEmbedder;
pub use openai::OpenAiEmbedder;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding request failed: {0}")]
    Request(#[from] HttpError),
    #[error(
        "the embedding model returned {got} vectors of {dimensions} numbers, expected {expected} of {wanted} (set `memory.longTerm.embedder.dimensions` to the model's size)"
    )]
    Shape {
        got: usize,
        dimensions: usize,
        expected: usize,
        wanted: usize,
    },
    #[error("embedder API key: {0}")]
    Secret(#[from] SecretError),
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// Identifies the vector space: memories embedded under another id are embedded
    /// again before they are searched.
    fn id(&self) -> String;
    fn dimensions(&self) -> usize;
    /// One unit-length vector per text, in order.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// The embedder `spec` describes.
pub fn from_spec(spec: &EmbedderSpec, secrets: &Secrets) -> Result<Arc<dyn Embedder>, EmbedError> {
    let dimensions = spec.dimensions as usize;
    Ok(match spec.provider {
        EmbedderProvider::Hashing => Arc::new(HashingEmbedder::new(dimensions)),
        EmbedderProvider::Openai => {
            let key = spec
                .api_key
                .as_ref()
                .map(|k| secrets.read_key(k, false))
                .transpose()?
                .flatten();
            Arc::new(OpenAiEmbedder::new(spec, key))
        }
    })
}

/// Scales `v` to unit length (left as it is when all zero), so that the L2 distance
/// sqlite-vec computes ranks like cosine similarity.
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}
