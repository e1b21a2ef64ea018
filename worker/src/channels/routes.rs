//! The HTTP routes of the channels a worker serves. Channels come and go with catalog
//! reloads while the server keeps running, so the server's fallback hands every path
//! it does not own to a router that is replaced as a whole on each reload.

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

/// The current channels' routes; a path no channel serves answers 404.
#[derive(Clone, Default)]
pub struct ChannelRoutes(Arc<RwLock<Router>>);

impl ChannelRoutes {
    /// Serves exactly `routes` from now on; requests already running finish on the
    /// routes they started with.
    pub fn replace(&self, routes: impl IntoIterator<Item = Router>) {
        let merged = routes.into_iter().fold(Router::new(), Router::merge);
        *self.0.write().unwrap() = merged;
    }

    /// Serves `request` with the current routes.
    pub async fn handle(&self, request: Request) -> Response {
        // Routers are cheap to clone (shared internally); the lock is not held while
        // the request runs.
        let router = self.0.read().unwrap().clone();
        match router.oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        }
        .into_response()
    }
}
