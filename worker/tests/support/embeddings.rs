//! A local server speaking the OpenAI `/v1/embeddings` wire format, answering every
//! input with the vector a function gives it and recording each request body with
//! its `Authorization` header.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Each request body with its `Authorization` header.
type Recorded = Arc<Mutex<Vec<(Value, Option<String>)>>>;

pub struct FakeEmbeddings {
    /// Ends in `/v1`, as OpenAI's does.
    pub base_url: String,
    pub requests: Recorded,
    /// While set, every request is answered `503` (an embedding server that is down).
    failing: Arc<AtomicBool>,
}

impl FakeEmbeddings {
    pub async fn start(vector_for: fn(&str) -> Vec<f32>) -> Self {
        let requests: Recorded = Arc::default();
        let recorded = requests.clone();
        let failing = Arc::new(AtomicBool::new(false));
        let down = failing.clone();
        let app = axum::Router::new().route(
            "/v1/embeddings",
            post(
                move |headers: HeaderMap, Json(body): Json<Value>| async move {
                    if down.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    recorded.lock().unwrap().push((body.clone(), auth));
                    let data: Vec<Value> = body["input"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .enumerate()
                        .map(|(index, text)| {
                            json!({"object": "embedding", "index": index,
                               "embedding": vector_for(text.as_str().unwrap())})
                        })
                        .collect();
                    let answer: Response =
                        Json(json!({"object": "list", "data": data, "model": "fixed",
                            "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
                        .into_response();
                    answer
                },
            ),
        );
        Self {
            base_url: format!("{}/v1", super::serve_locally(app).await),
            requests,
            failing,
        }
    }

    /// Makes the server answer `503` to everything (`true`) or serve again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn request(&self, index: usize) -> Value {
        self.requests.lock().unwrap()[index].0.clone()
    }

    /// The `Authorization` header of the latest request.
    pub fn last_authorization(&self) -> Option<String> {
        self.requests.lock().unwrap().last()?.1.clone()
    }
}
