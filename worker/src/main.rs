//! `nexo-worker`: run a worker, or check a config file without starting one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nexo_worker::telemetry::{self, LogFormat};
use nexo_worker::{Application, app, config};
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
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        #[arg(long, short, env = "NEXO_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(loaded) => {
                println!(
                    "{}: valid ({} agents, {} channels)",
                    config.display(),
                    loaded.agents.len(),
                    loaded.channels.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let loaded = match config::load(&config) {
                Ok(loaded) => loaded,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match runtime.block_on(run(loaded)) {
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

async fn run(config: nexo_api::WorkerConfig) -> Result<(), nexo_worker::AppError> {
    let shutdown = CancellationToken::new();
    let running = Application::new(config)
        .await?
        .start(shutdown.clone())
        .await?;
    app::shutdown_signal().await;
    shutdown.cancel();
    running.wait().await
}
