//! Stdio MCP servers: each session is a child process of its own, spoken to over its
//! stdin/stdout. It gets no environment but `PATH`, `HOME`, `LANG` and `TZ` from the
//! worker and the variables its spec names; its stderr goes to the worker's log, line
//! by line. It runs in a process group of its own, so whatever it starts ends with it:
//! the group is killed when the session ends (after a short grace to exit on closed
//! stdin, as MCP's stdio shutdown asks) and when the worker drops it.

use std::process::{ExitStatus, Stdio as Pipe};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use nexo_api::spec::StdioExtension;
use process_wrap::tokio::{ChildWrapper, CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::ServiceExt;
use rmcp::transport::async_rw::AsyncRwTransport;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{EXIT_STATUS_WAIT, Handler, MAX_MESSAGE_BYTES, Opened, Opener, initialize_problem};
use crate::secrets::Secrets;

/// The worker's variables a server gets: what finding programs, files and the local
/// language and time need, and nothing that could hold a credential.
const INHERITED_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];
/// Bytes of one stderr line that are logged; the rest of the line is dropped.
const MAX_STDERR_LINE_BYTES: usize = 4 * 1024;
/// Time a closing server has to exit after its stdin is closed, before its process
/// group is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

pub(super) struct Stdio {
    extension: String,
    spec: StdioExtension,
    secrets: Secrets,
}

impl Stdio {
    pub(super) fn new(extension: String, spec: StdioExtension, secrets: Secrets) -> Self {
        Self {
            extension,
            spec,
            secrets,
        }
    }

    /// The whole environment of the process. Secrets are read for every start, so a
    /// rotated one is taken by the next process.
    fn environment(&self) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = INHERITED_ENV
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
            .collect();
        for variable in &self.spec.env {
            let value = match (&variable.value, &variable.secret) {
                (Some(value), _) => value.clone(),
                (None, Some(secret)) => self.secrets.read(secret).map_err(|e| {
                    format!("cannot read the secret of variable {}: {e}", variable.name)
                })?,
                (None, None) => String::new(),
            };
            env.push((variable.name.clone(), value));
        }
        Ok(env)
    }
}

#[async_trait]
impl Opener for Stdio {
    async fn open(&self, handler: Handler) -> Result<Opened, String> {
        let env = self.environment()?;
        let mut command = tokio::process::Command::new(&self.spec.command);
        command
            .args(&self.spec.args)
            .env_clear()
            .envs(env)
            .stdin(Pipe::piped())
            .stdout(Pipe::piped())
            .stderr(Pipe::piped());
        let mut command = CommandWrap::from(command);
        command.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", self.spec.command))?;
        let pid = child.id();
        tracing::info!(pid, command = %self.spec.command, "extension process started");
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            child.stdin().take(),
            child.stdout().take(),
            child.stderr().take(),
        ) else {
            return Err("the process was started without its pipes".to_owned());
        };
        tokio::spawn(
            log_stderr(stderr, self.extension.clone()).instrument(tracing::Span::current()),
        );
        let kill = CancellationToken::new();
        let (exited_tx, mut exited) = oneshot::channel();
        tokio::spawn(
            watch_process(Group::new(child), kill.clone(), exited_tx)
                .instrument(tracing::Span::current()),
        );
        let keep = kill.drop_guard();
        let transport =
            AsyncRwTransport::new(stdout, stdin).with_max_line_length(MAX_MESSAGE_BYTES);
        let service = match handler.serve(transport).await {
            Ok(service) => service,
            // A process that exited at start says more than the handshake it broke.
            Err(error) => {
                return Err(
                    match tokio::time::timeout(EXIT_STATUS_WAIT, &mut exited).await {
                        Ok(Ok(why)) => why,
                        _ => initialize_problem(&error),
                    },
                );
            }
        };
        let exited = exited
            .map(|why| why.unwrap_or_else(|_| "the process is gone".to_owned()))
            .boxed();
        Ok(Opened {
            service,
            exited: Some(exited),
            _keep: Some(Box::new(keep)),
        })
    }
}

/// A child process leading a process group of its own; dropping it kills the group.
struct Group {
    child: Box<dyn ChildWrapper>,
    /// The group was killed after its leader was seen to exit: never signal it again,
    /// its id may be another's by now.
    done: bool,
}

impl Group {
    fn new(child: Box<dyn ChildWrapper>) -> Self {
        Self { child, done: false }
    }

    /// Waits for the group's leader (the server) to exit, not for the rest of the
    /// group: a server is gone when it is, whatever it left running.
    async fn leader_exit(&mut self) -> std::io::Result<ExitStatus> {
        self.child.inner_mut().wait().await
    }

    /// SIGKILL to every process of the group (an error when none is left).
    fn kill(&mut self) {
        if !self.done {
            self.done = true;
            // ProcessGroupChild's start_kill signals the whole group (killpg).
            let _ = self.child.start_kill();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reports the process's exit on `exited`; kills its group once it exited or when
/// `kill` is cancelled (after [`STOP_GRACE`]).
async fn watch_process(mut group: Group, kill: CancellationToken, exited: oneshot::Sender<String>) {
    let status = tokio::select! {
        status = group.leader_exit() => Some(status),
        _ = kill.cancelled() => None,
    };
    match status {
        Some(status) => {
            let why = match status {
                Ok(status) => format!("the process exited ({status})"),
                Err(e) => format!("the process could not be waited for: {e}"),
            };
            let _ = exited.send(why);
        }
        None => {
            // The session is closing, which closes the server's stdin.
            let _ = tokio::time::timeout(STOP_GRACE, group.leader_exit()).await;
        }
    }
    group.kill();
    // Reaps the leader if the kill ended it.
    let _ = group.leader_exit().await;
    tracing::debug!("extension process ended");
}

/// Logs what the server writes to stderr, a line at a time.
async fn log_stderr(stderr: impl AsyncRead + Unpin, extension: String) {
    for_each_line(stderr, MAX_STDERR_LINE_BYTES, |line, cut| {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        tracing::info!(extension, line, cut, "extension stderr");
    })
    .await;
}

/// Calls `each` with every line `reader` yields (without its `\n`), cut to `limit`
/// bytes, and whether it was cut; never holds more than `limit` bytes of a line.
async fn for_each_line(
    reader: impl AsyncRead + Unpin,
    limit: usize,
    mut each: impl FnMut(&[u8], bool),
) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let newline = chunk.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(chunk.len());
        let room = limit - line.len();
        line.extend_from_slice(&chunk[..take.min(room)]);
        cut |= take > room;
        reader.consume(newline.map_or(take, |at| at + 1));
        if newline.is_some() {
            each(&line, cut);
            line.clear();
            cut = false;
        }
    }
    if !line.is_empty() {
        each(&line, cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_line_is_cut_to_the_limit_and_the_next_line_is_whole() {
        let input = format!("{}\nshort\nend", "x".repeat(100));
        let mut lines = Vec::new();
        for_each_line(input.as_bytes(), 16, |line, cut| {
            lines.push((String::from_utf8(line.to_vec()).unwrap(), cut));
        })
        .await;
        assert_eq!(
            lines,
            [
                ("x".repeat(16), true),
                ("short".to_owned(), false),
                ("end".to_owned(), false),
            ]
        );
    }
}
