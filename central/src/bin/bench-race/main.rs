//! `bench-race`: the command line of the fleet. Submits a job through central (or straight to
//! NATS), follows its events with live progress per machine, prints a llama-bench-like table,
//! compares jobs, lists machines, follows and exports jobs, and gates CI on regressions.
//!
//! Exit codes: 0 success; 1 the run failed (a machine failed, nobody accepted, central or NATS
//! could not be reached); 2 bad usage; 3 `--fail-if-slower` found a machine slower than the
//! baseline by more than the allowed percentage.

mod args;
mod http;
mod progress;
mod table;
mod via_nats;

use anyhow::{anyhow, bail, Context, Result};
use args::{Cli, Command, Output, RunArgs};
use bench_schemas::Job;
use clap::Parser;
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;

/// The run failed (or anything went wrong talking to central / NATS).
const EXIT_FAILED: u8 = 1;
/// Bad usage (clap exits with the same code).
const EXIT_USAGE: u8 = 2;
/// `--fail-if-slower` tripped.
const EXIT_SLOWER: u8 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_cli(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bench-race: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn run_cli(cli: Cli) -> Result<u8> {
    let central = http::Central::new(&cli.central, cli.token.clone())?;
    match cli.command {
        Command::Run(a) => run(&central, &cli.nats, *a, cli.timeout_s).await,
        Command::Watch { job, output } => {
            let detail = follow_and_fetch(&central, &job, cli.timeout_s, None).await?;
            print_results(&detail, output)?;
            Ok(exit_of(&detail))
        }
        Command::Machines { output } => {
            let v = central.get_json("/api/machines").await?;
            table::print_machines(&v, output)?;
            Ok(0)
        }
        Command::Export { job, format } => {
            let ext = format.ext();
            let body = central
                .get_bytes(&format!("/api/jobs/{}/export.{ext}", http::enc(&job)))
                .await?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&body)?;
            out.flush()?;
            Ok(0)
        }
        Command::Compare { jobs, output } => {
            if jobs.len() < 2 {
                bail!("compare needs at least two jobs (the first is the baseline)");
            }
            let v = compare(&central, &jobs).await?;
            table::print_compare(&v, output)?;
            Ok(0)
        }
    }
}

/// `GET /api/compare?jobs=a,b,...`, or with `job:machine[:cell]` references (any argument
/// with a `:`) `GET /api/compare?run=...&run=...`: one machine's (cell of a) job against
/// another's.
async fn compare(central: &http::Central, jobs: &[String]) -> Result<Value> {
    let list: Vec<String> = jobs.iter().map(|j| http::enc(j)).collect();
    if jobs.iter().any(|j| j.contains(':')) {
        let runs: Vec<String> = list.iter().map(|r| format!("run={r}")).collect();
        return central
            .get_json(&format!("/api/compare?{}", runs.join("&")))
            .await;
    }
    central
        .get_json(&format!("/api/compare?jobs={}", list.join(",")))
        .await
}

/// The job the flags describe.
fn build_job(a: &RunArgs) -> Result<Job> {
    let prompt = match (&a.prompt, &a.profile, a.prompt_tokens) {
        (Some(p), _, _) => p.clone(),
        (None, None, None) => args::DEFAULT_PROMPT.to_string(),
        _ => String::new(),
    };
    let mut job = Job::new(a.model.clone(), prompt);
    job.job_id = a.job_id.clone();
    job.repeat = a.repeat;
    job.warmup = a.warmup;
    job.profile = a.profile.clone();
    job.prompt_tokens = a.prompt_tokens;
    if let Some(n) = a.max_tokens {
        job.max_tokens = n;
    }
    if let Some(t) = a.temperature {
        job.temperature = t;
    }
    if let Some(n) = a.num_ctx {
        job.num_ctx = n;
    }
    job.seed = a.seed;
    job.run_label = a.run_label.clone();
    job.order = a.order.into();
    job.requests = a.requests;
    job.duration_s = a.duration_s;
    if let Some(ms) = a.slo_ttft_p99_ms {
        job.slo = Some(bench_schemas::matrix::Slo {
            ttft_p99_ms: Some(ms),
        });
    }
    let mut matrix = args::matrix_of(&a.matrix)?;
    match a.concurrency.as_slice() {
        [] => {}
        [one] if !a.matrix.iter().any(|m| m.starts_with("concurrency=")) => {
            job.concurrency = Some(*one)
        }
        many => {
            if !matrix.concurrency.is_empty() {
                bail!("--concurrency and --matrix concurrency=... both set; keep one");
            }
            matrix.concurrency = many.to_vec();
        }
    }
    if !matrix.is_empty() {
        job.matrix = Some(matrix);
    }
    // The shape check central does too: a bad flag is said before anything is sent.
    let any = bench_schemas::JobLimits {
        max_prompt_bytes: usize::MAX,
        max_tokens: u32::MAX,
        max_runs: u32::MAX,
        max_num_ctx: u32::MAX,
    };
    job.validate(&any)
        .map_err(|e| anyhow!("invalid job: {}: {}", e.code, e.message))?;
    Ok(job)
}

async fn run(
    central: &http::Central,
    nats: &Option<String>,
    a: RunArgs,
    timeout_s: u64,
) -> Result<u8> {
    // A job the flags cannot make is a usage error, said before anything is sent.
    let job = match build_job(&a) {
        Ok(j) if a.fail_if_slower.is_some() == a.baseline.is_some() => j,
        Ok(_) => {
            eprintln!("bench-race: --fail-if-slower and --baseline go together");
            return Ok(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("bench-race: {e:#}");
            return Ok(EXIT_USAGE);
        }
    };
    let detail = match nats {
        Some(url) => via_nats::run(url, &job, &a.machines, &a, timeout_s).await?,
        None => {
            let mut body = serde_json::to_value(&job)?;
            body["machines"] = args::machines_value(&a.machines);
            let answer = central.post_json("/api/jobs", &body).await?;
            let job_id = answer["job_id"]
                .as_str()
                .ok_or_else(|| anyhow!("central's answer has no job_id: {answer}"))?
                .to_string();
            eprintln!("job {job_id}");
            let answers = answer["machines"].as_array().cloned().unwrap_or_default();
            report_answers(&answers);
            if !answers.iter().any(|m| m["status"] == "accepted") {
                eprintln!("bench-race: nobody accepted job {job_id}");
                return Ok(EXIT_FAILED);
            }
            follow_and_fetch(central, &job_id, timeout_s, Some(&job)).await?
        }
    };
    print_results(&detail, a.output)?;
    let mut code = exit_of(&detail);
    if let (Some(pct), Some(base)) = (a.fail_if_slower, &a.baseline) {
        let job_id = detail["job_id"].as_str().unwrap_or_default().to_string();
        if nats.is_some() {
            // Central indexes the stream on its own; wait (bounded) until it has the result.
            central
                .wait_finished(&job_id, Duration::from_secs(30))
                .await?;
        }
        let v = compare(central, &[base.clone(), job_id]).await?;
        let slower = table::slower_than(&v, pct);
        if slower.is_empty() {
            eprintln!("no machine is more than {pct}% slower than baseline job {base}");
        } else {
            for s in &slower {
                eprintln!("regression: {s}");
            }
            eprintln!(
                "bench-race: {} slower than baseline job {base} by more than {pct}% (exit {EXIT_SLOWER})",
                if slower.len() == 1 {
                    "a machine is".to_string()
                } else {
                    format!("{} machines are", slower.len())
                }
            );
            if code == 0 {
                code = EXIT_SLOWER;
            }
        }
    }
    Ok(code)
}

/// Prints each machine's answer to the dispatch (stderr).
pub fn report_answers(answers: &[Value]) {
    for m in answers {
        let id = m["machine_id"].as_str().unwrap_or("?");
        let status = m["status"].as_str().unwrap_or("?");
        match m["error"].as_object() {
            Some(e) => eprintln!(
                "{id}: {status}: {}: {}",
                e.get("code").and_then(Value::as_str).unwrap_or(""),
                e.get("message").and_then(Value::as_str).unwrap_or("")
            ),
            None => eprintln!("{id}: {status}"),
        }
    }
    if answers.is_empty() {
        eprintln!("no machine answered");
    }
}

/// Follows the job's events until `end`, then reads its document.
async fn follow_and_fetch(
    central: &http::Central,
    job_id: &str,
    timeout_s: u64,
    job: Option<&Job>,
) -> Result<Value> {
    let mut view = progress::View::new(job.cloned());
    let limit = Duration::from_secs(timeout_s);
    central
        .follow(job_id, limit, |ev| view.on_event(&ev))
        .await
        .with_context(|| format!("following job {job_id}"))?;
    view.finish();
    central
        .get_json(&format!("/api/jobs/{}", http::enc(job_id)))
        .await
}

fn print_results(detail: &Value, output: Output) -> Result<()> {
    let rows = table::rows(detail);
    table::print_rows(detail, &rows, output)
}

/// 0 when every machine finished its run (and every cell of it), else 1.
fn exit_of(detail: &Value) -> u8 {
    let machines = detail["machines"].as_array().cloned().unwrap_or_default();
    let ok = detail["status"] == "done"
        && !machines.is_empty()
        && machines.iter().all(|m| m["status"] == "done")
        && !machines.iter().any(|m| {
            m["cells"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["status"] == "failed"))
        });
    if ok {
        0
    } else {
        EXIT_FAILED
    }
}
