//! The process's TLS crypto provider. rustls is built without a default provider
//! (ADR 0004), so every client that may speak TLS (model and embedding APIs, NATS,
//! the admin CLI) calls [`install_provider`] before it builds its connector.

/// Installs ring as the process's rustls provider; later calls change nothing.
pub(crate) fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
