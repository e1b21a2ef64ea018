//! A local server speaking the OpenAI `/v1/embeddings` wire format, answering every
//! input with the vector a function gives it and recording each request body with
//! its `Authorization` header.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

/// Each request body with its `Authorization` header.
type Recorded = Arc<Mutex<Vec<(Value, Option<String>)>>>;

pub struct FakeEmbeddings {
    /// Ends in `/v1`, as OpenAI's does.
    pub base_url: String,
    pub requests: Recorded,
}

impl FakeEmbeddings {
    pub async fn start(vector_for: fn(&str) -> Vec<f32>) -> Self {
        let requests: Recorded = Arc::default();
        let recorded = requests.clone();
        let app = axum::Router::new().route(
            "/v1/embeddings",
            post(
                move |headers: HeaderMap, Json(body): Json<Value>| async move {
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
                    Json(json!({"object": "list", "data": data, "model": "fixed",
                            "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
                },
            ),
        );
        Self {
            base_url: format!("{}/v1", super::serve_locally(app).await),
            requests,
        }
    }

    pub fn request(&self, index: usize) -> Value {
        self.requests.lock().unwrap()[index].0.clone()
    }

    /// The `Authorization` header of the latest request.
    pub fn last_authorization(&self) -> Option<String> {
        self.requests.lock().unwrap().last()?.1.clone()
    }
}
