//! OpenAI-compatible embeddings (`POST {base}/embeddings`): OpenAI, Ollama
//! (`http://localhost:11434/v1`), vLLM and others speaking the same format.

use async_trait::async_trait;
use nexo_api::spec::EmbedderSpec;
use serde::{Deserialize, Serialize};

use super::{EmbedError, Embedder, normalize};
use crate::json_http::{JsonClient, authorization, join};
use nexo_api::spec::OPENAI_BASE_URL;

pub struct OpenAiEmbedder {
    http: JsonClient,
    url: String,
    authorization: Option<String>,
    model: String,
    dimensions: usize,
}

/// Retries of one embedding request (429, 5xx, timeouts).
const MAX_RETRIES: u32 = 3;

impl OpenAiEmbedder {
    pub fn new(spec: &EmbedderSpec, api_key: Option<String>) -> Self {
        let base = spec.base_url.as_deref().unwrap_or(OPENAI_BASE_URL);
        Self {
            http: JsonClient::new(spec.timeout_seconds, MAX_RETRIES),
            url: join(base, "/embeddings"),
            authorization: api_key.map(|key| format!("Bearer {key}")),
            model: spec.model.clone(),
            dimensions: spec.dimensions as usize,
        }
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    input: &'a [String],
}

#[derive(Deserialize)]
struct WireResponse {
    data: Vec<WireEmbedding>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    embedding: Vec<f32>,
    #[serde(default)]
    index: usize,
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn id(&self) -> String {
        format!("openai/{}/{}/{}", self.url, self.model, self.dimensions)
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let headers = authorization(self.authorization.as_deref());
        let body = WireRequest {
            model: &self.model,
            input: texts,
        };
        let mut response: WireResponse = self.http.post(&self.url, &headers, &body).await?;
        // `dimensions` is not sent: vLLM refuses it for models without Matryoshka
        // support. The configured size is checked instead.
        let wrong = response.data.len() != texts.len()
            || response
                .data
                .iter()
                .any(|e| e.embedding.len() != self.dimensions);
        if wrong {
            return Err(EmbedError::Shape {
                got: response.data.len(),
                dimensions: response.data.first().map_or(0, |e| e.embedding.len()),
                expected: texts.len(),
                wanted: self.dimensions,
            });
        }
        response.data.sort_by_key(|e| e.index);
        Ok(response
            .data
            .into_iter()
            .map(|mut e| {
                normalize(&mut e.embedding);
                e.embedding
            })
            .collect())
    }
}
