//! MCP servers as extensions, through `rmcp`: a child process over stdio, or a server
//! over streamable HTTP.

use std::sync::Arc;

use nexo_api::ResourceKey;
use nexo_api::spec::{HttpExtension, StdioExtension};
use tokio_util::sync::CancellationToken;

use super::{ConnectContext, Connection, unavailable::Unavailable};

pub(super) fn stdio(
    _key: &ResourceKey,
    _spec: &StdioExtension,
    _context: &ConnectContext,
    _stop: CancellationToken,
) -> Arc<dyn Connection> {
    Unavailable::new("stdio MCP extensions are not built yet")
}

pub(super) fn http(
    _key: &ResourceKey,
    _spec: &HttpExtension,
    _context: &ConnectContext,
    _stop: CancellationToken,
) -> Arc<dyn Connection> {
    Unavailable::new("HTTP MCP extensions are not built yet")
}
