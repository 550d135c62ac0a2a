//! The command line.

use anyhow::{anyhow, bail, Result};
use bench_schemas::matrix::{Matrix, Order};
use bench_schemas::Repeat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// The prompt of a job given neither `--prompt` nor a size.
pub const DEFAULT_PROMPT: &str = "Write a short story about a robot that learns to paint.";

/// bench-race: race LLM benchmarks across the fleet from the command line.
#[derive(Parser, Debug)]
#[command(
    name = "bench-race",
    version,
    about = "bench-race: race LLM benchmarks across the fleet from the command line"
)]
pub struct Cli {
    /// bench-central's address.
    #[arg(
        long,
        global = true,
        env = "BENCH_CENTRAL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub central: String,
    /// Bearer token for central's writes (when central has an api_token).
    #[arg(long, global = true, env = "CENTRAL_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `run`: send the job straight to NATS at this URL (no central needed) and follow
    /// `bench.events.<job_id>` on the BENCH_EVENTS stream.
    #[arg(long, global = true, value_name = "URL")]
    pub nats: Option<String>,
    /// Longest wait for a job to finish, seconds.
    #[arg(long = "timeout", global = true, default_value_t = 3600)]
    pub timeout_s: u64,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of tables.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A Markdown table (llama-bench's default).
    Md,
    /// Comma-separated values with a header.
    Csv,
    /// One JSON document.
    Json,
}

/// Export formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One row per machine x repeat.
    Csv,
    /// The whole job document.
    Json,
    /// Every stored event, one per line.
    Ndjson,
}

impl ExportFormat {
    /// The export's file extension.
    pub fn ext(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Json => "json",
            Self::Ndjson => "ndjson",
        }
    }
}

/// Cell order.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OrderArg {
    /// Every repeat of a cell before the next.
    #[default]
    Sequential,
    /// One repeat of each cell per round.
    Interleaved,
}

impl From<OrderArg> for Order {
    fn from(o: OrderArg) -> Self {
        match o {
            OrderArg::Sequential => Order::Sequential,
            OrderArg::Interleaved => Order::Interleaved,
        }
    }
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a job on machines, show progress, print the results.
    Run(Box<RunArgs>),
    /// Compare jobs (the first is the baseline): deltas, ratios, whether they exceed the 95%
    /// intervals.
    Compare {
        /// Job ids, baseline first; or runs `job:machine[:cell]` (one machine's, or one cell's,
        /// result of a job against another's).
        #[arg(required = true, num_args = 2..=8)]
        jobs: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Md)]
        output: Output,
    },
    /// List the fleet's machines.
    Machines {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Md)]
        output: Output,
    },
    /// Follow a job's events until it ends, then print its results.
    Watch {
        /// The job id.
        job: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Md)]
        output: Output,
    },
    /// Print a job's export.
    Export {
        /// The job id.
        job: String,
        /// csv, json or ndjson.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
    },
}

fn parse_repeat(s: &str) -> Result<Repeat, String> {
    if s == "auto" {
        return Ok(Repeat::Auto);
    }
    s.parse::<u32>()
        .map(Repeat::Count)
        .map_err(|_| format!("a whole number or \"auto\", got {s:?}"))
}

/// `bench-race run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Engine model name.
    #[arg(long, short)]
    pub model: String,
    /// `all`, or machine ids separated by commas.
    #[arg(long, default_value = "all")]
    pub machines: String,
    /// Measured repeats: a number or `auto`.
    #[arg(long, default_value = "3", value_parser = parse_repeat)]
    pub repeat: Repeat,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// The prompt (default: a short fixed one, or none with --profile/--prompt-tokens).
    #[arg(long)]
    pub prompt: Option<String>,
    /// llama-bench's shape `ppN-tgM`: an N-token prompt, exactly M generated tokens.
    #[arg(long)]
    pub profile: Option<String>,
    /// A prompt of exactly this many tokens.
    #[arg(long)]
    pub prompt_tokens: Option<u32>,
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Context window.
    #[arg(long)]
    pub num_ctx: Option<u32>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Free text carried into the results.
    #[arg(long)]
    pub run_label: Option<String>,
    /// The job id to use (default: a new UUID).
    #[arg(long)]
    pub job_id: Option<String>,
    /// A matrix axis and its values, `axis=v1,v2` (repeatable). Axes: model, backend,
    /// num_ctx, prompt_tokens, profile, max_tokens, depth, temperature, concurrency.
    #[arg(long, value_name = "AXIS=V1,V2")]
    pub matrix: Vec<String>,
    /// Concurrent streams: one value makes a load job, several a concurrency sweep (`1,4`).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<u32>,
    /// Load: measured requests per stream.
    #[arg(long)]
    pub requests: Option<u32>,
    /// Load: keep streams busy this long instead of a request count.
    #[arg(long)]
    pub duration_s: Option<u32>,
    /// The sweep's objective: highest acceptable TTFT p99, ms.
    #[arg(long)]
    pub slo_ttft_p99_ms: Option<f64>,
    /// Cell order.
    #[arg(long, value_enum, default_value_t = OrderArg::Sequential)]
    pub order: OrderArg,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Md)]
    pub output: Output,
    /// Exit 3 when any machine's decode rate is more than PCT percent below the baseline
    /// job's (with --baseline).
    #[arg(long, value_name = "PCT")]
    pub fail_if_slower: Option<f64>,
    /// The job to compare with for --fail-if-slower.
    #[arg(long, value_name = "JOB")]
    pub baseline: Option<String>,
    /// `--nats`: how long to gather answers to a broadcast, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub window_s: f64,
}

/// `machines` as central's `POST /api/jobs` takes it.
pub fn machines_value(machines: &str) -> Value {
    if machines.trim() == "all" {
        return Value::String("all".into());
    }
    Value::Array(
        machine_list(machines)
            .into_iter()
            .map(Value::String)
            .collect(),
    )
}

/// The ids of `a,b,c` (empty for `all`).
pub fn machine_list(machines: &str) -> Vec<String> {
    if machines.trim() == "all" {
        return Vec::new();
    }
    machines
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

const STRING_AXES: [&str; 3] = ["model", "backend", "profile"];

/// The matrix of `--matrix axis=v1,v2` flags.
pub fn matrix_of(flags: &[String]) -> Result<Matrix> {
    let mut obj = serde_json::Map::new();
    for f in flags {
        let (axis, values) = f
            .split_once('=')
            .ok_or_else(|| anyhow!("--matrix {f:?}: expected axis=v1,v2"))?;
        let axis = axis.trim();
        if !bench_schemas::matrix::AXES.contains(&axis) {
            bail!(
                "--matrix {f:?}: unknown axis {axis:?}; axes: {}",
                bench_schemas::matrix::AXES.join(", ")
            );
        }
        if obj.contains_key(axis) {
            bail!("--matrix {axis} given twice; list its values once: {axis}=v1,v2");
        }
        let vals: Vec<Value> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                if STRING_AXES.contains(&axis) {
                    Ok(Value::String(v.to_string()))
                } else {
                    serde_json::from_str::<serde_json::Number>(v)
                        .map(Value::Number)
                        .map_err(|_| anyhow!("--matrix {axis}: {v:?} is not a number"))
                }
            })
            .collect::<Result<_>>()?;
        if vals.is_empty() {
            bail!("--matrix {axis}: no values");
        }
        obj.insert(axis.to_string(), Value::Array(vals));
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| anyhow!("--matrix: {e}"))
}
