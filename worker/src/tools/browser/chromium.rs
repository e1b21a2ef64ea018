//! The worker's one Chromium: started at the first browser call of any agent, closed
//! once no agent has used it for its `idleSeconds`, at the worker's shutdown, and
//! killed when dropped. Each agent has a profile of its own in it.
//!
//! A profile is a browser context (`Target.createBrowserContext`), not a user-data-dir
//! of its own: a user-data-dir is a whole Chromium process (a few hundred MB each,
//! seconds to start), while contexts share one process and are as separate as
//! separate profiles for what an agent could leak to another (cookies, storage,
//! cache, service workers, permissions), and cost a few MB. A context lives in
//! memory: nothing of it outlives its disposal (idle agent, changed spec, worker
//! stop), so an agent starts each session logged out. The process's own
//! user-data-dir (`<dataDir>/browser/chromium`) holds no agent's data and is wiped
//! before each start.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::browser::{BrowserContextId, CloseParams};
use chromiumoxide::cdp::browser_protocol::fetch::{self, EventRequestPaused, RequestPattern};
use chromiumoxide::cdp::browser_protocol::target::{
    CreateBrowserContextParams, CreateTargetParams,
};
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::{Browser, BrowserConfig, Page};
use futures::StreamExt;
use nexo_api::ResourceKey;
use nexo_api::config::BrowserSettings;
use nexo_api::spec::BrowserSpec;
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::allow::{AllowList, Refused, answer_paused_requests};

/// Executables tried on `PATH`, in order, when neither `worker.browser.executable`
/// nor `NEXO_CHROMIUM` names one (Debian's, other distributions', Google's).
const EXECUTABLE_NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
/// The variable naming the executable when the config does not.
const EXECUTABLE_ENV: &str = "NEXO_CHROMIUM";
/// Time Chromium gets to start and print its DevTools address; a cold start in a
/// small container takes a few seconds.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a closing Chromium gets to exit on its own before it is killed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Longest wait between two looks for idle profiles: a profile opened meanwhile may
/// be due before the earliest deadline known at the last look.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Shortest idle time: `idleSeconds: 0` would close a profile between two calls of
/// one turn.
const MIN_IDLE: Duration = Duration::from_secs(1);
/// The size pages are laid out (and screenshots taken) at: a laptop's window.
const VIEWPORT: (u32, u32) = (1280, 800);
/// A proxy nothing listens on (the discard port), for what the Fetch interception
/// does not see: only requests to allowed hosts bypass it (see
/// [`AllowList::proxy_bypass_rules`]), every other one fails to connect.
const NO_PROXY: &str = "http://127.0.0.1:9";

#[derive(Debug, thiserror::Error)]
pub(crate) enum BrowserError {
    #[error(
        "no Chromium to run: {0}; set `worker.browser.executable` or {EXECUTABLE_ENV}, or install chromium (see docs/browser.md)"
    )]
    NoExecutable(String),
    #[error("cannot start Chromium ({executable}): {message}")]
    Launch { executable: String, message: String },
    #[error("the browser failed: {0}")]
    Cdp(#[from] CdpError),
    #[error("the worker is shutting down; the browser is closed")]
    Closed,
}

/// The worker's browser: one Chromium, started when first needed.
pub(crate) struct Browsers {
    settings: BrowserSettings,
    /// `<dataDir>/browser`: Chromium's user-data-dir and the agents' screenshots.
    dir: PathBuf,
    running: Arc<tokio::sync::Mutex<Option<Chromium>>>,
    /// Counts the starts, so each Chromium's idle watch knows its own.
    starts: AtomicU64,
    closing: CancellationToken,
}

/// A started Chromium and the agents' profiles in it.
struct Chromium {
    /// Which start of the worker's Chromium this is.
    start: u64,
    browser: Arc<Browser>,
    /// Drives the DevTools connection; it ends when Chromium exits.
    connection: JoinHandle<()>,
    profiles: HashMap<ResourceKey, Arc<Profile>>,
}

/// One agent's browser context and pages.
struct Profile {
    context: BrowserContextId,
    /// What the context was made for; a changed spec gets a new context.
    spec: BrowserSpec,
    allow: Arc<AllowList>,
    idle: Duration,
    last_used: Mutex<Instant>,
    /// Held for the length of one action: an agent's actions take turns, so two of
    /// its turns never type into the same page at once.
    pages: Arc<tokio::sync::Mutex<Pages>>,
}

#[derive(Default)]
struct Pages {
    /// Oldest first; the last one is the page the tools act on.
    open: VecDeque<AgentPage>,
    /// The profile was disposed while an action waited for it.
    disposed: bool,
}

/// A page of an agent, with the task answering its paused requests.
pub(crate) struct AgentPage {
    pub(crate) page: Page,
    /// What the allow-list refused since the last navigation.
    pub(crate) refused: Arc<Mutex<Refused>>,
    interceptor: JoinHandle<()>,
}

impl Drop for AgentPage {
    fn drop(&mut self) {
        self.interceptor.abort();
    }
}

/// One action's hold on an agent's pages.
pub(crate) struct Session {
    browser: Arc<Browser>,
    profile: Arc<Profile>,
    pages: OwnedMutexGuard<Pages>,
}

impl Browsers {
    /// The browser of a worker keeping its files in `data_dir`. Chromium is closed
    /// once `closing` is cancelled (the worker's shutdown) and not started again.
    pub(crate) fn new(
        settings: BrowserSettings,
        data_dir: &Path,
        closing: CancellationToken,
    ) -> Arc<Self> {
        let browsers = Arc::new(Self {
            settings,
            dir: data_dir.join("browser"),
            running: Arc::default(),
            starts: AtomicU64::new(0),
            closing: closing.clone(),
        });
        let running = browsers.running.clone();
        tokio::spawn(async move {
            closing.cancelled().await;
            if let Some(chromium) = running.lock().await.take() {
                chromium.close().await;
            }
        });
        browsers
    }

    /// Where the screenshots of `agent` go.
    pub(crate) fn screenshot_dir(&self, agent: &ResourceKey) -> PathBuf {
        self.dir
            .join("screenshots")
            .join(&agent.namespace)
            .join(&agent.name)
    }

    /// Holds `agent`'s pages for one action, starting Chromium and making the
    /// agent's profile as needed.
    pub(crate) async fn session(
        self: &Arc<Self>,
        agent: &ResourceKey,
        spec: &BrowserSpec,
    ) -> Result<Session, BrowserError> {
        loop {
            let (browser, profile) = self.profile(agent, spec).await?;
            let pages = profile.pages.clone().lock_owned().await;
            // Disposed for idleness between the look-up and the lock: make another.
            if pages.disposed {
                continue;
            }
            return Ok(Session {
                browser,
                profile,
                pages,
            });
        }
    }

    async fn profile(
        self: &Arc<Self>,
        agent: &ResourceKey,
        spec: &BrowserSpec,
    ) -> Result<(Arc<Browser>, Arc<Profile>), BrowserError> {
        let mut running = self.running.lock().await;
        if self.closing.is_cancelled() {
            return Err(BrowserError::Closed);
        }
        // Chromium that exited (crashed, killed) is started again.
        if running.as_ref().is_some_and(|c| c.connection.is_finished()) {
            tracing::warn!("Chromium exited; starting it again");
            running.take();
        }
        let chromium = match &mut *running {
            Some(chromium) => chromium,
            None => {
                let chromium = self.launch().await?;
                tokio::spawn(close_idle(Arc::downgrade(self), chromium.start));
                running.insert(chromium)
            }
        };
        let stale = chromium
            .profiles
            .get(agent)
            .is_some_and(|p| p.spec != *spec);
        if stale && let Some(old) = chromium.profiles.remove(agent) {
            chromium.dispose(agent, &old).await;
        }
        let profile = match chromium.profiles.get(agent) {
            Some(profile) => profile.clone(),
            None => {
                let profile = Arc::new(chromium.new_profile(spec).await?);
                tracing::info!(agent = %agent, "browser profile opened");
                chromium.profiles.insert(agent.clone(), profile.clone());
                profile
            }
        };
        *profile.last_used.lock().unwrap() = Instant::now();
        Ok((chromium.browser.clone(), profile))
    }

    async fn launch(&self) -> Result<Chromium, BrowserError> {
        let executable = executable(&self.settings)?;
        let shown = executable.display().to_string();
        let launch_error = |message: String| BrowserError::Launch {
            executable: shown.clone(),
            message,
        };
        let user_data = self.dir.join("chromium");
        // Left by an earlier Chromium (a crash leaves its lock): nothing in it is an
        // agent's, and a fresh one starts cleanly.
        let _ = std::fs::remove_dir_all(&user_data);
        std::fs::create_dir_all(&user_data).map_err(|e| launch_error(e.to_string()))?;
        let mut config = BrowserConfig::builder()
            .chrome_executable(&executable)
            .new_headless_mode()
            .user_data_dir(&user_data)
            .respect_https_errors()
            .launch_timeout(LAUNCH_TIMEOUT)
            .window_size(VIEWPORT.0, VIEWPORT.1)
            .viewport(Viewport {
                width: VIEWPORT.0,
                height: VIEWPORT.1,
                ..Viewport::default()
            })
            // Cross-site frames stay in their page's process, where the page's Fetch
            // interception sees their requests (an out-of-process frame is a target
            // of its own, which it would not).
            .arg("disable-site-isolation-trials")
            .arg((
                "disable-features",
                &["IsolateOrigins", "site-per-process"][..],
            ))
            // WebRTC would reach hosts outside the proxy's rules over UDP.
            .arg(("force-webrtc-ip-handling-policy", "disable_non_proxied_udp"));
        // Chromium's sandbox needs user namespaces, which it refuses to use as root
        // (it exits with "Running as root without --no-sandbox is not supported"):
        // only then is it started without one. As any other user (the distroless
        // image's `nonroot`) the sandbox stays on; where the kernel forbids user
        // namespaces it cannot start, which docs/browser.md explains.
        if running_as_root() {
            config = config.no_sandbox();
        }
        let config = config.build().map_err(launch_error)?;
        let (browser, mut handler) = Browser::launch(config)
            .await
            .map_err(|e| launch_error(e.to_string()))?;
        let connection = tokio::spawn(async move {
            while let Some(event) = handler.next().await {
                if let Err(err) = event {
                    tracing::debug!(error = %err, "DevTools connection");
                }
            }
        });
        tracing::info!(executable = %shown, "Chromium started");
        Ok(Chromium {
            start: self.starts.fetch_add(1, Ordering::Relaxed),
            browser: Arc::new(browser),
            connection,
            profiles: HashMap::new(),
        })
    }
}

/// The Chromium to start: the configured one, `NEXO_CHROMIUM`, or the first of
/// [`EXECUTABLE_NAMES`] on `PATH`. A name without a `/` is looked up on `PATH`.
fn executable(settings: &BrowserSettings) -> Result<PathBuf, BrowserError> {
    let find = |name: &Path| {
        if name.components().count() > 1 {
            name.is_file().then(|| name.to_owned())
        } else {
            which::which(name).ok()
        }
    };
    if let Some(configured) = &settings.executable {
        return find(configured).ok_or_else(|| {
            BrowserError::NoExecutable(format!(
                "`worker.browser.executable` ({}) is not an executable file",
                configured.display()
            ))
        });
    }
    if let Some(named) = std::env::var_os(EXECUTABLE_ENV).filter(|v| !v.is_empty()) {
        return find(Path::new(&named)).ok_or_else(|| {
            BrowserError::NoExecutable(format!(
                "{EXECUTABLE_ENV} ({}) is not an executable file",
                named.to_string_lossy()
            ))
        });
    }
    EXECUTABLE_NAMES
        .iter()
        .find_map(|name| find(Path::new(name)))
        .ok_or_else(|| {
            BrowserError::NoExecutable(format!(
                "none of {} is on PATH",
                EXECUTABLE_NAMES.join(", ")
            ))
        })
}

/// Whether this process runs as root (the owner of `/proc/self` is its user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl Chromium {
    async fn new_profile(&self, spec: &BrowserSpec) -> Result<Profile, BrowserError> {
        let allow = AllowList::new(&spec.allow_domains);
        let params = CreateBrowserContextParams::builder()
            .dispose_on_detach(true)
            .proxy_server(NO_PROXY)
            .proxy_bypass_list(allow.proxy_bypass_rules())
            .build();
        let context = self.browser.create_browser_context(params).await?;
        Ok(Profile {
            context,
            spec: spec.clone(),
            allow: Arc::new(allow),
            idle: Duration::from_secs(spec.idle_seconds).max(MIN_IDLE),
            last_used: Mutex::new(Instant::now()),
            pages: Arc::default(),
        })
    }

    /// Closes `profile`'s context and with it its pages.
    async fn dispose(&self, agent: &ResourceKey, profile: &Profile) {
        let disposed = tokio::time::timeout(
            CLOSE_GRACE,
            self.browser
                .dispose_browser_context(profile.context.clone()),
        )
        .await;
        match disposed {
            Ok(Ok(())) => tracing::info!(agent = %agent, "browser profile closed"),
            Ok(Err(err)) => {
                tracing::warn!(agent = %agent, error = %err, "cannot close a browser profile")
            }
            Err(_) => tracing::warn!(agent = %agent, "closing a browser profile timed out"),
        }
    }

    /// Asks Chromium to exit, and kills it if it does not in time.
    async fn close(self) {
        let _ =
            tokio::time::timeout(CLOSE_GRACE, self.browser.execute(CloseParams::default())).await;
        let connection = self.connection;
        let exited = tokio::time::timeout(CLOSE_GRACE, connection).await.is_ok();
        // The child process is killed when the last handle to it goes (sessions still
        // running hold one for a moment).
        drop(self.browser);
        tracing::info!(exited, "Chromium closed");
    }
}

/// Closes the profiles unused for their idle time, and Chromium (start `start`) with
/// the last one. Ends when that Chromium is closed or gone (crashed and replaced), or
/// the browser dropped.
async fn close_idle(browsers: std::sync::Weak<Browsers>, start: u64) {
    loop {
        let Some(browsers) = browsers.upgrade() else {
            return;
        };
        let mut running = browsers.running.lock().await;
        let Some(chromium) = running.as_mut().filter(|c| c.start == start) else {
            return;
        };
        let now = Instant::now();
        let mut next = now + IDLE_CHECK;
        let mut idle = Vec::new();
        for (agent, profile) in &chromium.profiles {
            let due = *profile.last_used.lock().unwrap() + profile.idle;
            // An action running now keeps its profile.
            match profile.pages.clone().try_lock_owned() {
                Ok(pages) if due <= now => idle.push((agent.clone(), pages)),
                _ => next = next.min(due.max(now + MIN_IDLE / 10)),
            }
        }
        for (agent, mut pages) in idle {
            if let Some(profile) = chromium.profiles.remove(&agent) {
                pages.disposed = true;
                pages.open.clear();
                chromium.dispose(&agent, &profile).await;
            }
        }
        if chromium.profiles.is_empty() {
            if let Some(chromium) = running.take() {
                tracing::info!("no agent used the browser for its idle time; closing Chromium");
                chromium.close().await;
            }
            return;
        }
        drop(running);
        drop(browsers);
        tokio::time::sleep_until(next).await;
    }
}

/// What opening a page did.
pub(crate) struct Opened {
    /// The URL of the page closed to stay within `maxPages`, if one was.
    pub(crate) closed: Option<String>,
}

/// Idle time counts from the end of the last action: a long one does not leave its
/// profile due the moment it ends.
impl Drop for Session {
    fn drop(&mut self) {
        *self.profile.last_used.lock().unwrap() = Instant::now();
    }
}

impl Session {
    pub(crate) fn allow(&self) -> &AllowList {
        &self.profile.allow
    }

    /// The page the tools act on, if the agent has one.
    pub(crate) fn current(&self) -> Option<&AgentPage> {
        self.pages.open.back()
    }

    /// The page to navigate: the current one, or a new one if there is none or
    /// `new_page`. A new page beyond `maxPages` closes the oldest (the agent's
    /// earliest work is the likeliest to be done with).
    pub(crate) async fn page_for_navigation(
        &mut self,
        new_page: bool,
    ) -> Result<(&AgentPage, Opened), BrowserError> {
        let mut opened = Opened { closed: None };
        if new_page || self.pages.open.is_empty() {
            let page = self.open_page().await?;
            self.pages.open.push_back(page);
            let max = self.profile.spec.max_pages.max(1) as usize;
            while self.pages.open.len() > max {
                if let Some(oldest) = self.pages.open.pop_front() {
                    opened.closed =
                        Some(oldest.page.url().await.ok().flatten().unwrap_or_default());
                    if let Err(err) = oldest.page.clone().close().await {
                        tracing::debug!(error = %err, "cannot close the oldest page");
                    }
                }
            }
        }
        let page = self.pages.open.back().expect("a page was just ensured");
        Ok((page, opened))
    }

    /// A blank page in the agent's context whose every request is paused and
    /// checked against the allow-list.
    async fn open_page(&self) -> Result<AgentPage, BrowserError> {
        let params = CreateTargetParams::builder()
            .url("about:blank")
            .browser_context_id(self.profile.context.clone())
            .build()
            .map_err(CdpError::ChromeMessage)?;
        let page = self.browser.new_page(params).await?;
        // Listening before interception is enabled: no paused request goes unanswered.
        let paused = page.event_listener::<EventRequestPaused>().await?;
        let refused = Arc::new(Mutex::new(Refused::default()));
        let interceptor = tokio::spawn(answer_paused_requests(
            page.clone(),
            paused,
            self.profile.allow.clone(),
            refused.clone(),
        ));
        let page = AgentPage {
            page,
            refused,
            interceptor,
        };
        page.page
            .execute(
                fetch::EnableParams::builder()
                    .pattern(RequestPattern::builder().url_pattern("*").build())
                    .build(),
            )
            .await?;
        Ok(page)
    }
}
