//! The `reprise` command line.

mod auth_bench;
mod bench;
mod demo;
mod journal_cli;
mod recovery_bench;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use reprise::auth::hba::AuthMethod;
use reprise::config::{
    Backend, ClientTlsMode, Config, HumanDuration, LogFormat, Overrides, ServerTlsMode,
};
use reprise::Proxy;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};

#[derive(Parser, Debug)]
#[command(
    name = "reprise",
    version,
    about = "A PostgreSQL proxy that keeps sessions alive through backend failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Start a throwaway PostgreSQL (unless --backend is given), run Reprise
    /// in front of it and drive a short workload through it.
    Demo(demo::DemoArgs),
    /// pgbench select-only through Reprise, directly and through PgBouncer,
    /// interleaved in one run, with ratios.
    Bench(bench::BenchArgs),
    /// Read the journal (stats, inspect) or put a synthetic load through
    /// its writer (load, bench).
    Journal(journal_cli::JournalArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (see fixtures/reprise.toml).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A server as NAME=HOST:PORT; repeatable; replaces the file's backends.
    #[arg(long = "backend", value_parser = Backend::parse_flag)]
    backends: Vec<Backend>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `users_file`.
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Overrides `templates_dir`.
    #[arg(long)]
    templates_dir: Option<PathBuf>,
    /// Overrides `log_format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Overrides `auth_type`.
    #[arg(long, value_enum)]
    auth_type: Option<AuthMethod>,
    /// Overrides `auth_query`.
    #[arg(long)]
    auth_query: Option<String>,
    /// Overrides `auth_user`.
    #[arg(long)]
    auth_user: Option<String>,
    /// Overrides `client_tls`.
    #[arg(long, value_enum)]
    client_tls: Option<ClientTlsMode>,
    /// Overrides `tls_cert_file`.
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// Overrides `tls_key_file`.
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    /// Overrides `server_tls`.
    #[arg(long, value_enum)]
    server_tls: Option<ServerTlsMode>,
    /// Overrides `server_tls_ca_file`.
    #[arg(long)]
    server_tls_ca_file: Option<PathBuf>,
    /// Overrides `auth_timeout` (a duration such as "30s").
    #[arg(long)]
    auth_timeout: Option<HumanDuration>,
    /// Overrides `max_unauthenticated`.
    #[arg(long)]
    max_unauthenticated: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    match cli.command {
        Command::Serve(args) => runtime()?.block_on(serve(args)),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Bench(args) => runtime()?.block_on(bench::run(args)),
        // Plain threads: the journal writer is one, and waiting for
        // durability blocks.
        Command::Journal(args) => journal_cli::run(args),
    }
}

/// Cancelled on the first SIGINT or SIGTERM; installed before any work
/// starts, so that an interruption always leads to an orderly cleanup.
fn interrupt_token() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let token = tokio_util::sync::CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        trigger.cancel();
    });
    Ok(token)
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(config: &Config) -> anyhow::Result<FilterHandle> {
    let filter = EnvFilter::try_new(&config.log_level).with_context(|| {
        format!(
            "config key `log_level`: invalid filter {:?}",
            config.log_level
        )
    })?;
    let (filter, handle) = reload::Layer::new(filter);
    let format = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .context("cannot install the logger")?;
    Ok(handle)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        backends: args.backends,
        data_dir: args.data_dir,
        users_file: args.users_file,
        templates_dir: args.templates_dir,
        log_format: args.log_format,
        auth_type: args.auth_type,
        auth_query: args.auth_query,
        auth_user: args.auth_user,
        client_tls: args.client_tls,
        tls_cert_file: args.tls_cert_file,
        tls_key_file: args.tls_key_file,
        server_tls: args.server_tls,
        server_tls_ca_file: args.server_tls_ca_file,
        auth_timeout: args.auth_timeout,
        max_unauthenticated: args.max_unauthenticated,
    };
    let config = Config::load(args.config.as_deref(), &overrides)
        .context("refusing to start: bad configuration")?;
    let log_filter = init_logging(&config)?;
    let proxy = Proxy::bind(config.clone())
        .await
        .context("refusing to start")?;
    let handle = proxy.handle();
    tracing::info!(
        listen = %proxy.local_addr(),
        backend = %config.backends[0].address(),
        "reprise started"
    );

    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let signals = {
        let handle = handle.clone();
        async move {
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                    _ = hangup.recv() => {
                        reload(&args.config, &overrides, &handle, &log_filter);
                        continue;
                    }
                }
                if stopping {
                    tracing::warn!("second stop signal: closing all sessions now");
                    handle.terminate();
                } else {
                    tracing::info!(
                        "stop signal: no new connections; sessions close as they become idle"
                    );
                    handle.shutdown();
                    stopping = true;
                }
            }
        }
    };
    let signal_task = tokio::spawn(signals);
    proxy.run().await;
    signal_task.abort();
    Ok(())
}

/// SIGHUP: re-read the config file and the users file. A bad file is
/// reported and the running configuration stays.
fn reload(
    path: &Option<PathBuf>,
    overrides: &Overrides,
    handle: &reprise::ProxyHandle,
    log_filter: &FilterHandle,
) {
    let config = match Config::load(path.as_deref(), overrides) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(error = %err, "reload refused: keeping the running configuration");
            return;
        }
    };
    match handle.reload(config.clone()) {
        Ok(restart_only) => {
            if let Ok(filter) = EnvFilter::try_new(&config.log_level) {
                if let Err(err) = log_filter.reload(filter) {
                    tracing::warn!(error = %err, "could not change log_level");
                }
            }
            if !restart_only.is_empty() {
                tracing::warn!(keys = ?restart_only, "these settings change only on restart");
            }
            tracing::info!("configuration reloaded");
        }
        Err(err) => {
            tracing::error!(error = %err, "reload refused: keeping the running configuration")
        }
    }
}
