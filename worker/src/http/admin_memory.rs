//! `/admin/agents/{namespace}/{name}/memory…`: inspect, search, export, import and
//! delete one agent's memory (bearer token, like the rest of `/admin`). Deleting by
//! sender is how a user's "forget me" is honoured.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use nexo_api::ResourceKey;
use nexo_api::spec::RecallMode;
use serde::{Deserialize, Serialize};

use super::HttpState;
use crate::memory::{AgentMemory, Hit, MemoryError, MemoryItem};
use std::sync::Arc;

/// Largest import accepted: memory files of 100,000 memories with 384-dimensional
/// vectors are about 250 MB.
const MAX_IMPORT_BYTES: usize = 1 << 30;

pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route(
            "/agents/{namespace}/{name}/memory",
            get(search).delete(forget_sender),
        )
        .route("/agents/{namespace}/{name}/memory/export", get(export))
        .route(
            "/agents/{namespace}/{name}/memory/import",
            post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
        .route("/agents/{namespace}/{name}/memory/{id}", delete(forget_one))
}

#[derive(Debug, Deserialize)]
struct AgentPath {
    namespace: String,
    name: String,
}

/// `GET …/memory`: with `query`, a search; without, the newest memories.
#[derive(Debug, Deserialize)]
struct SearchQuery {
    query: Option<String>,
    #[serde(default)]
    mode: RecallMode,
    #[serde(default = "default_k")]
    k: usize,
    /// Only memories of this sender.
    sender: Option<String>,
}

fn default_k() -> usize {
    10
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SearchResponse {
    hits: Vec<Hit>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse {
    /// Memories stored in all.
    total: u64,
    items: Vec<MemoryItem>,
}

#[derive(Debug, Deserialize)]
struct ForgetQuery {
    sender: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ForgetResponse {
    sender: String,
    /// Rows deleted: memories and conversation history.
    deleted: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportResponse {
    memories: u64,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
}

/// Why a memory request failed, as a status and a JSON `{error}` body.
#[derive(Debug)]
enum ApiError {
    NotHere(ResourceKey),
    BadRequest(&'static str),
    NoMemory(i64),
    Memory(MemoryError),
}

impl From<MemoryError> for ApiError {
    fn from(err: MemoryError) -> Self {
        ApiError::Memory(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            ApiError::NotHere(key) => (
                StatusCode::NOT_FOUND,
                format!("agent `{key}` does not run on this worker"),
            ),
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, message.to_owned()),
            ApiError::NoMemory(id) => (StatusCode::NOT_FOUND, format!("no memory {id}")),
            ApiError::Memory(err) => (
                match err {
                    MemoryError::InvalidExport(_) => StatusCode::BAD_REQUEST,
                    MemoryError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                },
                err.to_string(),
            ),
        };
        (status, axum::Json(ErrorBody { error })).into_response()
    }
}

fn agent_memory(state: &HttpState, path: &AgentPath) -> Result<Arc<AgentMemory>, ApiError> {
    let key = ResourceKey::new(&path.namespace, &path.name);
    state.catalog.memory(&key).ok_or(ApiError::NotHere(key))
}

async fn search(
    State(state): State<HttpState>,
    Path(path): Path<AgentPath>,
    Query(query): Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let memory = agent_memory(&state, &path)?;
    let k = query.k.clamp(1, 1000);
    Ok(match query.query {
        Some(text) => {
            let owners = query.sender.map(|s| vec![s]);
            let hits = memory.search(&text, query.mode, k, owners).await?;
            axum::Json(SearchResponse { hits }).into_response()
        }
        None => axum::Json(ListResponse {
            total: memory.count().await?,
            items: memory.list(query.sender, k).await?,
        })
        .into_response(),
    })
}

async fn export(
    State(state): State<HttpState>,
    Path(path): Path<AgentPath>,
) -> Result<Response, ApiError> {
    let bytes = agent_memory(&state, &path)?.export().await?;
    let file = format!(
        "attachment; filename=\"{}_{}.db\"",
        path.namespace, path.name
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.sqlite3".to_owned()),
            (header::CONTENT_DISPOSITION, file),
        ],
        bytes,
    )
        .into_response())
}

async fn import(
    State(state): State<HttpState>,
    Path(path): Path<AgentPath>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let memory = agent_memory(&state, &path)?;
    memory.import(body.to_vec()).await?;
    let memories = memory.count().await?;
    Ok(axum::Json(ImportResponse { memories }).into_response())
}

async fn forget_sender(
    State(state): State<HttpState>,
    Path(path): Path<AgentPath>,
    Query(query): Query<ForgetQuery>,
) -> Result<Response, ApiError> {
    let memory = agent_memory(&state, &path)?;
    let sender = query
        .sender
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::BadRequest(
            "expected `?sender=…`: the sender whose memories and history to delete",
        ))?;
    let deleted = memory.forget_sender(&sender).await?;
    Ok(axum::Json(ForgetResponse { sender, deleted }).into_response())
}

async fn forget_one(
    State(state): State<HttpState>,
    Path((namespace, name, id)): Path<(String, String, i64)>,
) -> Result<Response, ApiError> {
    let memory = agent_memory(&state, &AgentPath { namespace, name })?;
    if memory.forget(id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NoMemory(id))
    }
}
