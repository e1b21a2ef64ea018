//! MCP servers over streamable HTTP. A session is rmcp's streamable HTTP client with
//! the spec's bearer token; it is replaced when it closes or a call finds it broken
//! (the server restarted and lost it, or cannot be reached).

use std::time::Duration;

use async_trait::async_trait;
use nexo_api::spec::HttpExtension;
use rmcp::ServiceExt;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

use super::{Handler, MAX_MESSAGE_BYTES, Opened, Opener, initialize_problem};
use crate::secrets::Secrets;

/// Time to set up a TCP (and TLS) connection to the server. Requests themselves have
/// no overall timeout: the server's event stream stays open, and calls are bounded by
/// the agent's tool timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Http {
    spec: HttpExtension,
    secrets: Secrets,
}

impl Http {
    pub(super) fn new(spec: HttpExtension, secrets: Secrets) -> Self {
        Self { spec, secrets }
    }
}

#[async_trait]
impl Opener for Http {
    async fn open(&self, handler: Handler) -> Result<Opened, String> {
        let mut config = StreamableHttpClientTransportConfig::with_uri(self.spec.url.as_str())
            .max_json_response_size(MAX_MESSAGE_BYTES)
            .max_sse_event_size(MAX_MESSAGE_BYTES);
        // Read for every session, so a rotated token is taken by the next one.
        if let Some(secret) = &self.spec.bearer_token {
            let token = self
                .secrets
                .read(secret)
                .map_err(|e| format!("cannot read the bearer token: {e}"))?;
            config = config.auth_header(token);
        }
        crate::tls::install_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect could carry the token elsewhere; a server must be named by
            // the URL it serves at.
            .redirect(reqwest::redirect::Policy::none())
            // As rmcp's own client: reusing a connection whose last response was
            // not read to its end stalls on delayed ACKs.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let transport = StreamableHttpClientTransport::with_client(client, config);
        let service = handler.serve(transport).await.map_err(|e| {
            let problem = initialize_problem(&e);
            // A 401 or 403 with a `WWW-Authenticate` challenge, as servers that take
            // bearer tokens answer (RFC 6750).
            if e.is_authorization_required() {
                format!("the server refused the bearer token (or its absence): {problem}")
            } else {
                problem
            }
        })?;
        Ok(Opened {
            service,
            exited: None,
            _keep: None,
        })
    }
}
