//! The `sidekey` binary: `serve`, or a control-plane client command.

#![forbid(unsafe_code)]
// Nothing a request, a peer or a file can make fail may panic; unit tests may unwrap
// (clippy.toml), integration tests are other crates.
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use sidekey::cli::{Cli, ClientCommand, Command, Exit};
use sidekey::config::{LogFormat, ServeConfig};
use sidekey::log_format::PlainFields;
use sidekey::log_writer::{BatchWriter, FlushGuard};

/// Logs to stderr in batches (see `sidekey::log_writer`); the guard writes what is left
/// when `main` returns.
fn init_logging(format: LogFormat) -> std::io::Result<FlushGuard> {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A precaution: the HTTP and TLS libraries log connection and protocol details at debug
    // and trace, and a request URI (a Miradore v1 query) or header may carry a credential.
    // None is known to print one today; capping them at info whatever RUST_LOG says keeps
    // a future version from doing so. sidekey's own events never hold a credential.
    for target in [
        "h2",
        "hyper",
        "hyper_util",
        "rustls",
        "tonic",
        "tower",
        "reqwest",
    ] {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let (writer, guard) = BatchWriter::stderr()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // With a log collector gone (stderr a closed pipe), tracing-subscriber would report
        // the failed write with `eprintln!`, which panics on the same closed stderr and takes
        // the proxy down with it. Lost log lines are the lesser harm.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.fmt_fields(PlainFields).init(),
    }
    Ok(guard)
}

async fn serve(config: ServeConfig) -> ExitCode {
    let running = match sidekey::server::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sidekey: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutdown signal received; draining");
    if running.shutdown().await {
        tracing::info!("drained; exiting");
    }
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is still honoured.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The runtime of `serve`: one worker thread per CPU sidekey may use (CPU affinity and
/// cgroup quota count; `TOKIO_WORKER_THREADS` overrides, as for any tokio program). With a
/// single worker, the usual budget of a sidecar, it is a current-thread runtime: the same
/// work without the multi-thread scheduler's cross-thread bookkeeping on every wake-up
/// (linkerd2-proxy makes the same choice). Blocking store and file work still goes to
/// tokio's blocking pool either way.
fn serve_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("TOKIO_WORKER_THREADS must be a whole number above 0, not {v:?}"),
                )
            })?,
        Err(_) => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
    };
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// The outcome of a local command: its output on stdout, or its error on stderr and exit 1.
fn report(outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("sidekey: {message}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (client, command) = match cli.command {
        Command::Serve(args) => {
            let mut config = args.into_config(
                std::env::var("SIDEKEY_MASTER_KEY").ok(),
                std::env::var(sidekey::config::ETCD_PASSWORD_ENV).ok(),
            );
            // The standard OpenTelemetry variable, when --otlp-endpoint is not given.
            if config.otlp_endpoint.is_none()
                && let Ok(value) = std::env::var(sidekey::telemetry::OTEL_ENDPOINT_ENV)
                && !value.is_empty()
            {
                match sidekey::telemetry::parse_endpoint(&value) {
                    Ok(endpoint) => config.otlp_endpoint = Some(endpoint),
                    Err(e) => {
                        eprintln!("sidekey: {}: {e}", sidekey::telemetry::OTEL_ENDPOINT_ENV);
                        return ExitCode::FAILURE;
                    }
                }
            }
            let _flush_logs = match init_logging(config.log_format) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("sidekey: cannot start the log writer: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match serve_runtime() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("sidekey: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = runtime.block_on(serve(config));
            // Tasks still running log nothing more once the runtime is gone; then the
            // guard writes the last batch.
            drop(runtime);
            return code;
        }
        Command::Tenants { client, command } => (client, ClientCommand::Tenants(command)),
        Command::Partner { client, command } => (client, ClientCommand::Partner(command)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sidekey",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Health(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            return report(
                runtime
                    .map_err(|e| format!("cannot start the runtime: {e}"))
                    .and_then(|runtime| runtime.block_on(sidekey::cli::health::run(args))),
            );
        }
        Command::Ca { command } => return report(sidekey::cli::ca::run(command)),
        Command::Store { command } => {
            let env = sidekey::cli::store::StoreEnv {
                master_key: std::env::var("SIDEKEY_MASTER_KEY").ok(),
                etcd_password: std::env::var(sidekey::config::ETCD_PASSWORD_ENV).ok(),
            };
            return report(sidekey::cli::store::run(command, env));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sidekey: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sidekey::cli::run_client(client, command)) {
        Ok(()) => Exit::Ok.into(),
        Err(failure) => {
            eprintln!("sidekey: {}", failure.message);
            failure.exit.into()
        }
    }
}
