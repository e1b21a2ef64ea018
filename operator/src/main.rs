//! `nexo-operator`: print the CRDs, or run the controllers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nexo_api::crd::{PoolNats, WorkerPoolSpec};
use nexo_operator::controller::{self, Context, DefaultPool, Scope};
use nexo_operator::http::{self, HttpState};
use nexo_operator::metrics::Metrics;
use nexo_operator::{crds, leader};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "nexo-operator",
    version,
    about = "Reconciles nexo resources into worker pools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD.
    Crd {
        /// Write `<plural>.<group>.yaml` files into this directory instead (repeat
        /// for several: `--out-dir crds --out-dir charts/nexo-crds/templates`).
        #[arg(long)]
        out_dir: Vec<PathBuf>,
        /// Print a Markdown reference of every field instead.
        #[arg(long, conflicts_with = "out_dir")]
        reference: bool,
    },
    /// Run the controllers (in a cluster, or against the current kubeconfig).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Manage only these namespaces (comma-separated); every namespace when unset.
    #[arg(
        long = "watch-namespace",
        env = "NEXO_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NEXO_OPERATOR_LISTEN", default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// Create a WorkerPool named `default` with this worker image in namespaces whose
    /// agents use the `default` pool and have none.
    #[arg(
        long,
        env = "NEXO_DEFAULT_POOL_IMAGE",
        requires = "default_pool_nats_url"
    )]
    default_pool_image: Option<String>,
    /// NATS URL of the created default pools.
    #[arg(long, env = "NEXO_DEFAULT_POOL_NATS_URL")]
    default_pool_nats_url: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "NEXO_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd {
            reference: true, ..
        } => {
            print!("{}", crds::reference());
            ExitCode::SUCCESS
        }
        Command::Crd { out_dir, .. } if out_dir.is_empty() => {
            print!("{}", crds::to_yaml_stream());
            ExitCode::SUCCESS
        }
        Command::Crd { out_dir, .. } => {
            for dir in out_dir {
                for crd in crds::all() {
                    let path = dir.join(crds::file_name(&crd));
                    if let Err(err) = std::fs::write(&path, crds::to_yaml(&crd)) {
                        eprintln!("error: cannot write {}: {err}", path.display());
                        return ExitCode::FAILURE;
                    }
                    println!("wrote {}", path.display());
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "operator failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.compact().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or kubeconfig)")?;
    let metrics = Arc::new(Metrics::new());
    let state = HttpState {
        metrics: metrics.clone(),
        ready: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tokio::spawn(axum::serve(listener, http::router(state.clone())).into_future());

    let identity = args
        .identity
        .unwrap_or_else(|| format!("nexo-operator-{}", std::process::id()));
    let mut leading = leader::campaign(client.clone(), &args.lease_namespace, identity.clone())
        .await
        .context("cannot take part in leader election")?;
    state.ready.store(true, Ordering::Release);
    tracing::info!(%identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => changed.context("leader election stopped")?,
            () = shutdown_signal() => return Ok(()),
        }
    }
    tracing::info!(%identity, "leading; starting controllers");

    let default_pool = args.default_pool_image.map(|image| DefaultPool {
        spec: WorkerPoolSpec {
            replicas: 1,
            partitions: nexo_api::partition::DEFAULT_PARTITIONS,
            image,
            image_pull_policy: None,
            resources: None,
            nats: PoolNats {
                urls: args.default_pool_nats_url.into_iter().collect(),
                user: None,
                token: None,
                nkey_seed: None,
                credentials: None,
                tls: None,
            },
            storage: None,
            drain_timeout_seconds: 30,
            admin_token_secret: None,
            image_pull_secrets: Vec::new(),
            env: Vec::new(),
            models: None,
        },
    });
    let probe = Arc::new(nexo_operator::probe::HttpProbe::default());
    let ctx = Arc::new(Context::new(client, metrics, default_pool, probe));
    // One set of controllers per watched namespace (or one for all of them).
    let scopes: Vec<Scope> = if args.watch_namespaces.is_empty() {
        vec![Scope { namespace: None }]
    } else {
        args.watch_namespaces
            .into_iter()
            .map(|ns| Scope {
                namespace: Some(ns),
            })
            .collect()
    };
    let stop = CancellationToken::new();
    let watch = {
        let stop = stop.clone();
        async move {
            let lost = tokio::select! {
                () = shutdown_signal() => false,
                _ = wait_until_not_leading(&mut leading) => true,
            };
            stop.cancel();
            lost
        }
    };
    let lost = tokio::spawn(watch);
    let mut controllers = tokio::task::JoinSet::new();
    for scope in scopes {
        controllers.spawn(controller::run_all(ctx.clone(), scope, stop.clone()));
    }
    while controllers.join_next().await.is_some() {}
    // Exiting makes Kubernetes restart this replica as a standby.
    if lost.await.unwrap_or(false) {
        anyhow::bail!("lost leadership of the Lease `{}`", leader::LEASE_NAME);
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_until_not_leading(leading: &mut tokio::sync::watch::Receiver<bool>) {
    while *leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
