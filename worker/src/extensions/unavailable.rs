//! A connection that never connects (a transport not built yet).

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use super::{Connection, Listing};
use crate::tools::ToolError;

pub(super) struct Unavailable {
    listing: watch::Sender<Listing>,
    reason: String,
}

impl Unavailable {
    // Built only to be handed out as a connection.
    #[allow(clippy::new_ret_no_self)]
    pub(super) fn new(reason: &str) -> Arc<dyn Connection> {
        Arc::new(Self {
            listing: watch::Sender::new(Listing::Failed(reason.to_owned())),
            reason: reason.to_owned(),
        })
    }
}

#[async_trait]
impl Connection for Unavailable {
    fn listing(&self) -> watch::Receiver<Listing> {
        self.listing.subscribe()
    }

    async fn call(&self, _tool: &str, _arguments: Value) -> Result<String, ToolError> {
        Err(ToolError::Failed(self.reason.clone()))
    }
}
