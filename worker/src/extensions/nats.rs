//! NATS extensions: services that announce their tools on `ext.announce` and answer
//! calls on `ext.<namespace>.<name>.call` (docs/extensions/nats-protocol.md).

use std::sync::Arc;

use nexo_api::ResourceKey;
use tokio_util::sync::CancellationToken;

use super::{ConnectContext, Connection, unavailable::Unavailable};

pub(super) fn discover(
    _key: &ResourceKey,
    _context: &ConnectContext,
    _stop: CancellationToken,
) -> Arc<dyn Connection> {
    Unavailable::new("NATS extensions are not built yet")
}
