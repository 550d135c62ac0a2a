use bench_agent::config::{process_env, Config, DEFAULT_CONFIG_PATH};
use bench_nats::settings::{parse_command_line, CommandLine};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: bench-agent [--config <file>]   (default agent/config/agent.yaml, or BENCH_AGENT_CONFIG)";

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
        std::env::var_os("BENCH_AGENT_CONFIG").map(PathBuf::from),
    ) {
        CommandLine::Run(path) => path,
        CommandLine::Version => {
            println!("bench-agent {}", bench_agent::VERSION);
            return ExitCode::SUCCESS;
        }
        CommandLine::Usage => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let cfg = match Config::load(&path, &process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench-agent: bad config: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(bench_nats::settings::cancel_on_signal(shutdown.clone()));
    match bench_agent::run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
