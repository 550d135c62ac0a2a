use bench_central::config::{process_env, Config};
use bench_nats::settings::{parse_command_line, CommandLine};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

const USAGE: &str =
    "usage: bench-central [--config <file>]   (default central/config/machines.yaml, optional)";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .init();
    let path = match parse_command_line(
        std::env::args().skip(1),
        std::env::var_os("BENCH_CENTRAL_CONFIG").map(PathBuf::from),
    ) {
        CommandLine::Run(path) => path,
        CommandLine::Version => {
            println!("bench-central {}", bench_central::VERSION);
            return ExitCode::SUCCESS;
        }
        CommandLine::Usage => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::load(path.as_deref(), &process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench-central: bad config: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(bench_nats::settings::cancel_on_signal(shutdown.clone()));
    match bench_central::run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-central: {e:#}");
            ExitCode::FAILURE
        }
    }
}
