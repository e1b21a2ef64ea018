//! Which URLs an agent's browser may load (`browser.allowDomains`), checked for the
//! navigation target before it is asked for and for every request a page makes: each
//! page's requests are paused by the DevTools Fetch domain and continued, or failed
//! with `BlockedByClient`, here.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::fetch::{
    ContinueRequestParams, EventRequestPaused, FailRequestParams,
};
use chromiumoxide::cdp::browser_protocol::network::ErrorReason;
use chromiumoxide::listeners::EventStream;
use futures::StreamExt;
use url::Url;

/// Refused hosts a page remembers for the tool results: enough to name what a page
/// missed, bounded however many requests a hostile page makes.
const REMEMBERED_REFUSALS: usize = 8;

/// The hosts an agent's browser may load anything from. `example.com` allows that
/// host and every subdomain (`www.example.com`); a leading `*.` means the same.
/// Only `http` and `https` URLs are loaded, whatever the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllowList {
    domains: Vec<String>,
}

/// Why a URL is not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not `http:`/`https:` (`file:`, `chrome:`, `data:`, `javascript:`, …).
    Scheme(String),
    /// Not a URL at all, or one without a host.
    Unparsable(String),
    /// A host no entry of the allow-list covers.
    Host { host: String, allowed: Vec<String> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Scheme(scheme) => write!(
                f,
                "`{scheme}:` URLs are not loaded; the browser loads only http and https"
            ),
            Refusal::Unparsable(url) => write!(f, "`{url}` is not an http(s) URL with a host"),
            Refusal::Host { host, allowed } if allowed.is_empty() => write!(
                f,
                "host `{host}` is not allowed: this agent's `browser.allowDomains` is empty, so no host is"
            ),
            Refusal::Host { host, allowed } => write!(
                f,
                "host `{host}` is not allowed by this agent's `browser.allowDomains` [{}] (an entry allows that host and its subdomains)",
                allowed.join(", ")
            ),
        }
    }
}

impl AllowList {
    pub(crate) fn new(domains: &[String]) -> Self {
        Self {
            domains: domains
                .iter()
                .filter_map(|d| {
                    let host = d.trim().trim_start_matches("*.").trim_end_matches('.');
                    // The form a URL's host takes (lower case, punycode), so `Bücher.de`
                    // matches what Chromium requests; what is no host matches nothing.
                    Url::parse(&format!("http://{host}/"))
                        .ok()?
                        .host_str()
                        .map(str::to_owned)
                })
                .collect(),
        }
    }

    /// Chromium's proxy bypass rules for these hosts and their subdomains, and
    /// `<-loopback>` (loopback is otherwise never proxied): with a proxy that does not
    /// exist, they make what the Fetch interception does not see (WebSockets, service
    /// workers) fail unless it goes to an allowed host. Entries that are not plain
    /// host names are left out, so none can widen the rules.
    pub(crate) fn proxy_bypass_rules(&self) -> String {
        let mut rules = vec!["<-loopback>".to_owned()];
        for domain in &self.domains {
            if domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                rules.push(domain.clone());
                rules.push(format!("*.{domain}"));
            }
        }
        rules.join(";")
    }

    /// Whether `url` may be loaded.
    pub(crate) fn check(&self, url: &str) -> Result<(), Refusal> {
        let parsed = Url::parse(url).map_err(|_| Refusal::Unparsable(url.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refusal::Scheme(parsed.scheme().to_owned()));
        }
        // `host_str` is lower-case and punycode (the form Chromium requests), so an
        // entry matches however the page spells the host.
        let host = parsed
            .host_str()
            .ok_or_else(|| Refusal::Unparsable(url.to_owned()))?
            .trim_end_matches('.');
        if self.allows_host(host) {
            Ok(())
        } else {
            Err(Refusal::Host {
                host: host.to_owned(),
                allowed: self.domains.clone(),
            })
        }
    }

    fn allows_host(&self, host: &str) -> bool {
        self.domains.iter().any(|domain| {
            host == domain
                || host
                    .strip_suffix(domain.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        })
    }
}

/// The requests a page was refused, newest last, at most [`REMEMBERED_REFUSALS`]
/// distinct hosts (or schemes), with the count of all refusals.
#[derive(Debug, Default)]
pub(crate) struct Refused {
    hosts: VecDeque<String>,
    count: u64,
}

impl Refused {
    fn record(&mut self, refusal: &Refusal) {
        self.count += 1;
        let what = match refusal {
            Refusal::Host { host, .. } => host.clone(),
            Refusal::Scheme(scheme) => format!("{scheme}:"),
            Refusal::Unparsable(_) => "(unparsable URL)".to_owned(),
        };
        if let Some(at) = self.hosts.iter().position(|h| *h == what) {
            self.hosts.remove(at);
        }
        if self.hosts.len() == REMEMBERED_REFUSALS {
            self.hosts.pop_front();
        }
        self.hosts.push_back(what);
    }

    /// Forgets what earlier loads were refused (a new navigation starts).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// One line for a tool result, or `None` if nothing was refused.
    pub(crate) fn summary(&self) -> Option<String> {
        (self.count > 0).then(|| {
            format!(
                "Refused {} request(s) to hosts outside the allow-list: {}",
                self.count,
                self.hosts.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Answers every request `page` pauses: continued if `allow` allows its URL, else
/// failed as blocked by the client (and remembered in `refused`). Runs until the
/// page's event stream ends (the page is closed). One request at a time: the page
/// waits for each answer, so the stream holds no more than the page's requests in
/// flight.
pub(crate) async fn answer_paused_requests(
    page: Page,
    mut paused: EventStream<EventRequestPaused>,
    allow: Arc<AllowList>,
    refused: Arc<Mutex<Refused>>,
) {
    while let Some(event) = paused.next().await {
        let answered = match allow.check(&event.request.url) {
            Ok(()) => page
                .execute(ContinueRequestParams::new(event.request_id.clone()))
                .await
                .map(drop),
            Err(refusal) => {
                tracing::debug!(url = %event.request.url, %refusal, "browser request refused");
                refused.lock().unwrap().record(&refusal);
                page.execute(FailRequestParams::new(
                    event.request_id.clone(),
                    ErrorReason::BlockedByClient,
                ))
                .await
                .map(drop)
            }
        };
        // A request the page gave up meanwhile (it navigated away, or closed).
        if let Err(err) = answered {
            tracing::debug!(error = %err, "cannot answer a paused browser request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(domains: &[&str]) -> AllowList {
        AllowList::new(&domains.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn an_entry_allows_its_host_and_subdomains_only() {
        let list = allow(&["example.com", "*.docs.rs", "127.0.0.1", "Bücher.de"]);
        for url in [
            "https://example.com/",
            "http://www.example.com/a?b",
            "https://a.b.example.com:8443/",
            "https://EXAMPLE.com./x",
            "https://xn--bcher-kva.de/",
            "https://docs.rs/",
            "https://crates.docs.rs/",
            "http://127.0.0.1:9/page",
        ] {
            assert_eq!(list.check(url), Ok(()), "{url}");
        }
        for url in [
            "https://badexample.com/",
            "https://example.com.evil.net/",
            "https://example.org/",
            "http://localhost:9/",
            "http://127.0.0.2/",
        ] {
            assert!(
                matches!(list.check(url), Err(Refusal::Host { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn the_proxy_bypass_rules_are_the_allowed_hosts() {
        assert_eq!(
            allow(&["example.com", "127.0.0.1", "a;*"]).proxy_bypass_rules(),
            "<-loopback>;example.com;*.example.com;127.0.0.1;*.127.0.0.1"
        );
    }

    #[test]
    fn only_http_and_https_are_loaded() {
        let list = allow(&["example.com"]);
        for (url, scheme) in [
            ("file:///etc/passwd", "file"),
            ("chrome://settings", "chrome"),
            ("data:text/html,<b>x</b>", "data"),
            ("javascript:alert(1)", "javascript"),
            ("ftp://example.com/", "ftp"),
        ] {
            assert_eq!(
                list.check(url),
                Err(Refusal::Scheme(scheme.into())),
                "{url}"
            );
        }
        assert!(matches!(
            list.check("example.com"),
            Err(Refusal::Unparsable(_))
        ));
    }

    #[test]
    fn the_refusal_names_the_host_and_the_rule() {
        let refusal = allow(&["example.com"])
            .check("https://evil.net/x")
            .unwrap_err();
        let text = refusal.to_string();
        assert!(text.contains("`evil.net`"), "{text}");
        assert!(text.contains("[example.com]"), "{text}");
        assert!(text.contains("subdomains"), "{text}");
    }

    #[test]
    fn refusals_are_remembered_within_a_bound() {
        let list = allow(&[]);
        let mut refused = Refused::default();
        for i in 0..100 {
            refused.record(&list.check(&format!("https://h{i}.net/")).unwrap_err());
        }
        refused.record(&list.check("https://h99.net/again").unwrap_err());
        assert_eq!(refused.hosts.len(), REMEMBERED_REFUSALS);
        assert_eq!(refused.hosts.back().unwrap(), "h99.net");
        assert_eq!(refused.hosts.front().unwrap(), "h92.net");
        assert!(
            refused
                .summary()
                .unwrap()
                .starts_with("Refused 101 request(s)")
        );
    }
}
