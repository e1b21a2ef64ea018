//! `nexo-worker`: run a worker, or check a config file without starting one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nexo_worker::Shard;
use nexo_worker::admin_client::{AdminClient, AdminClientError};
use nexo_worker::telemetry::{self, LogFormat};
use nexo_worker::{Application, config, shutdown_signal};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "nexo-worker", version, about = "Runs nexo agents and channels")]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "NEXO_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the worker.
    Run {
        #[arg(long, short, env = "NEXO_CONFIG")]
        config: PathBuf,
        /// This worker's shard (0-based): it runs the agents of its pool that the
        /// partition map assigns to it. In a pod, set from the pod's index.
        #[arg(long, env = "NEXO_SHARD", default_value_t = 0)]
        shard: u32,
        /// Workers the pool's agents are spread over. A catalog with `placement`
        /// overrides it, so scaling a pool needs no restart. Unset: the catalog's
        /// placement, or 1 without one (then only shard 0 runs agents).
        #[arg(long, env = "NEXO_SHARDS")]
        shards: Option<u32>,
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        #[arg(long, short, env = "NEXO_CONFIG")]
        config: PathBuf,
    },
    /// Inspect and manage a running worker's dead-letter queue (admin API).
    Dlq {
        /// The worker's HTTP address.
        #[arg(
            long,
            env = "NEXO_URL",
            default_value = "http://127.0.0.1:8080",
            global = true
        )]
        url: String,
        /// Environment variable holding the admin bearer token.
        #[arg(long, default_value = "NEXO_ADMIN_TOKEN", global = true)]
        token_env: String,
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print dead letters as JSON, oldest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publish a dead letter again (with a fresh attempt count).
    Replay { id: i64 },
    /// Delete a dead letter for good.
    Delete { id: i64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    // Only a running worker exports traces, sending them from its runtime.
    let traces = matches!(cli.command, Command::Run { .. }).then(|| runtime.handle().clone());
    let telemetry = telemetry::init(cli.log_format, traces);
    let code = execute(cli.command, &runtime);
    // The worker has stopped; the last spans leave while the runtime still runs.
    telemetry.shutdown();
    code
}

fn execute(command: Command, runtime: &tokio::runtime::Runtime) -> ExitCode {
    match command {
        Command::Check { config } => match check(&config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Dlq {
            url,
            token_env,
            action,
        } => match runtime.block_on(dlq(&url, &token_env, action)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            shard,
            shards,
        } => {
            let shard = match shards.map(|shards| Shard::new(shard, shards)) {
                None => Shard::from_catalog(shard),
                Some(Ok(shard)) => shard,
                Some(Err(err)) => {
                    eprintln!("error: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let loaded = match config::load(&config) {
                Ok(loaded) => loaded,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(loaded, config, shard)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "worker failed");
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Validates the config, and the catalog file it names, if any.
fn check(path: &Path) -> Result<String, config::ConfigError> {
    let loaded = config::load(path)?;
    let (file, agents, channels) = match &loaded.worker.catalog_file {
        Some(catalog_file) => {
            let catalog = config::load_catalog(catalog_file)?;
            (
                catalog_file.as_path(),
                catalog.agents.len(),
                catalog.channels.len(),
            )
        }
        None => (path, loaded.agents.len(), loaded.channels.len()),
    };
    Ok(format!(
        "{}: valid ({agents} agents, {channels} channels)",
        file.display()
    ))
}

async fn run(
    config: nexo_api::WorkerConfig,
    path: PathBuf,
    shard: Shard,
) -> Result<(), nexo_worker::AppError> {
    let shutdown = CancellationToken::new();
    let running = Application::new(config)
        .await?
        .with_shard(shard)
        .with_config_file(path)
        .start(shutdown.clone())
        .await?;
    shutdown_signal().await;
    shutdown.cancel();
    running.wait().await
}

async fn dlq(url: &str, token_env: &str, action: DlqAction) -> Result<(), AdminClientError> {
    let client = AdminClient::new(url, token_env)?;
    match action {
        DlqAction::List { limit } => {
            let listing = client.dead_letters(limit).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&listing).expect("JSON value prints")
            );
        }
        DlqAction::Replay { id } => {
            client.replay(id).await?;
            println!("dead letter {id} replayed");
        }
        DlqAction::Delete { id } => {
            client.delete(id).await?;
            println!("dead letter {id} deleted");
        }
    }
    Ok(())
}
