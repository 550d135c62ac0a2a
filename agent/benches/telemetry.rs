//! Telemetry sampler cost benchmark (not a test): what does sampling cost the machine it
//! measures? Runs the real sampler (`Telemetry::new` with the default config: the probes
//! `probes::build` finds here) at 4 Hz for `--secs` (20) with a no-op sink, and reports:
//!
//! - the sampling thread's own CPU time (`/proc/self/task/<tid>/schedstat`, ns) as % of one
//!   core, against the ceiling (0.5% of one core), PASS/FAIL;
//! - the same from the process's CPU time (`/proc/self/stat` utime+stime, 10 ms ticks) over the
//!   run minus an equal idle window without the sampler, taken first in the same process: a
//!   cross-check that sees everything the sampler causes, at tick resolution;
//! - samples taken vs expected on the fixed schedule, and the last sample's lateness;
//! - the cost of one read of every probe, µs (thread CPU / samples, and 100 back-to-back reads).
//!
//!   cargo bench -p bench-agent --bench telemetry -- [--secs 20] [--label L]
//!
//! Linux only for the CPU figures (elsewhere they print n/a). Writes
//! `results/bench/telemetry-<label>-<unix s>.json`.

use bench_agent::telemetry::probe::Reading;
use bench_agent::telemetry::probes;
use bench_agent::telemetry::sampler::Telemetry;
use bench_agent::telemetry::TelemetryConfig;
use bench_nats::harness::{git_describe, workspace_root, write_bench_result};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ceiling for the sampler, % of one core.
const CEILING_PCT: f64 = 0.5;
/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every architecture it
/// exposes to user space (the kernel's internal HZ is hidden behind it).
const USER_HZ: f64 = 100.0;
const USAGE: &str = "usage: telemetry [--secs N (20)] [--label L]";

/// utime + stime of this process, seconds.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// CPU time of this process's thread named `name`, seconds (ns resolution).
fn thread_cpu_s(name: &str) -> Option<f64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let sched = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns: u64 = sched.split_whitespace().next()?.parse().ok()?;
            return Some(ns as f64 / 1e9);
        }
    }
    None
}

fn pct_of_core(cpu_s: f64, wall: Duration) -> f64 {
    cpu_s / wall.as_secs_f64() * 100.0
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn main() -> anyhow::Result<()> {
    let mut secs = 20.0_f64;
    let mut label = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => {
                secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s: &f64| *s >= 1.0)
                    .ok_or_else(|| anyhow::anyhow!("--secs needs a number >= 1\n{USAGE}"))?;
            }
            "--label" => label = args.next(),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let label = label.unwrap_or_else(|| git_describe(&workspace_root()));
    let cfg = TelemetryConfig::default();
    // Half an interval past the last tick, so counting samples never races a tick.
    let window = Duration::from_secs_f64(secs) + cfg.interval / 2;

    let telemetry = Telemetry::new(&cfg);
    println!(
        "telemetry bench: {} s at {} ms; sources {:?}; missing {:?}",
        secs,
        cfg.interval.as_millis(),
        telemetry.sources(),
        telemetry
            .missing()
            .iter()
            .map(|m| format!("{}: {}", m.source, m.reason))
            .collect::<Vec<_>>()
    );

    // The idle baseline: this process with the probes built but not sampling.
    let idle_cpu0 = process_cpu_s();
    let idle_t0 = Instant::now();
    std::thread::sleep(window);
    let idle_wall = idle_t0.elapsed();
    let idle_cpu = process_cpu_s().zip(idle_cpu0).map(|(b, a)| b - a);

    // The run: the real sampler with a no-op sink that only counts.
    let count = Arc::new(AtomicU64::new(0));
    let last_t_ms = Arc::new(AtomicU64::new(0));
    let sink = {
        let (count, last) = (Arc::clone(&count), Arc::clone(&last_t_ms));
        Box::new(move |s: bench_schemas::Sample| {
            count.fetch_add(1, Ordering::Relaxed);
            last.store(s.t_ms.to_bits(), Ordering::Relaxed);
        })
    };
    let run_cpu0 = process_cpu_s();
    let run_t0 = Instant::now();
    let session = telemetry
        .start(sink)
        .ok_or_else(|| anyhow::anyhow!("telemetry is disabled"))?;
    std::thread::sleep(window);
    let thread_cpu = thread_cpu_s("telemetry");
    let run_wall = run_t0.elapsed();
    // Before the summary, whose own reading is off the schedule.
    let samples = count.load(Ordering::Relaxed);
    let last_t_ms = f64::from_bits(last_t_ms.load(Ordering::Relaxed));
    // Energy over the whole run (where this machine has a power source): the decode-window
    // path of a real job, over a window of known length.
    let run = (run_t0, run_t0 + window);
    let summary = session.summary(run, Some(run), 0);
    session.stop();
    let run_cpu = process_cpu_s().zip(run_cpu0).map(|(b, a)| b - a);

    let expected = (run_wall.as_secs_f64() / cfg.interval.as_secs_f64()).floor() as u64 + 1;

    // One read of every probe, back to back (wall time; includes the syscalls).
    let (mut probes, _) = probes::build(&cfg);
    let reads = 100u32;
    let t0 = Instant::now();
    for _ in 0..reads {
        let mut r = Reading::new(Instant::now());
        for p in probes.iter_mut() {
            p.read(&mut r);
        }
        std::hint::black_box(&r);
    }
    let direct_read_us = t0.elapsed().as_secs_f64() * 1e6 / f64::from(reads);

    let thread_pct = thread_cpu.map(|c| pct_of_core(c, run_wall));
    let per_read_us = thread_cpu.map(|c| c * 1e6 / samples.max(1) as f64);
    let process_pct = run_cpu.zip(idle_cpu).map(|(run, idle)| {
        pct_of_core(
            run - idle * run_wall.as_secs_f64() / idle_wall.as_secs_f64(),
            run_wall,
        )
    });
    let verdict = match thread_pct.or(process_pct) {
        Some(p) if p <= CEILING_PCT => "PASS",
        Some(_) => "FAIL",
        None => "n/a (no /proc)",
    };

    println!();
    println!("{:<44} {:>12}   ceiling", "", "measured");
    println!(
        "{:<44} {:>11}%   {CEILING_PCT}% of one core",
        "sampler thread CPU (schedstat)",
        fmt_opt(thread_pct, 3)
    );
    println!(
        "{:<44} {:>11}%   (cross-check, 10 ms ticks: run {} s - idle {} s CPU)",
        "process CPU, run minus idle",
        fmt_opt(process_pct, 3),
        fmt_opt(run_cpu, 2),
        fmt_opt(idle_cpu, 2)
    );
    println!(
        "{:<44} {:>12}   expected {expected} ({} s / {} ms + 1)",
        "samples taken",
        samples,
        format_args!("{:.3}", run_wall.as_secs_f64()),
        cfg.interval.as_millis()
    );
    println!(
        "{:<44} {:>12}   (on the schedule: {} ms)",
        "last sample at, ms",
        format!("{last_t_ms:.1}"),
        samples.saturating_sub(1) * cfg.interval.as_millis() as u64
    );
    println!(
        "{:<44} {:>12}",
        "per read, µs (thread CPU / samples)",
        fmt_opt(per_read_us, 1)
    );
    println!(
        "{:<44} {:>12}",
        "per read, µs (100 back-to-back, wall)",
        format!("{direct_read_us:.1}")
    );
    println!(
        "{:<44} {:>12}   cpu {:?}",
        "summary over the run: samples", summary.samples, summary.cpu_pct
    );
    println!(
        "{:<44} {:>12}   {} J over {:.1} s",
        "power over the run: mean W",
        fmt_opt(summary.power_w.map(|p| p.mean), 2),
        fmt_opt(summary.energy_j, 1),
        window.as_secs_f64()
    );
    println!(
        "{:<44} {:>12}",
        "power source",
        summary.power_source.as_deref().unwrap_or("none")
    );
    println!();
    println!(
        "{verdict}: sampler CPU {}% of one core, ceiling {CEILING_PCT}%",
        fmt_opt(thread_pct.or(process_pct), 3)
    );

    let doc = json!({
        "mode": "telemetry",
        "label": label,
        "secs": secs,
        "interval_ms": cfg.interval.as_millis() as u64,
        "sources": telemetry.sources(),
        "thread_cpu_pct": thread_pct,
        "process_cpu_pct_run_minus_idle": process_pct,
        "ceiling_pct": CEILING_PCT,
        "verdict": verdict,
        "samples": samples,
        "expected_samples": expected,
        "last_sample_t_ms": last_t_ms,
        "per_read_us_thread_cpu": per_read_us,
        "per_read_us_direct": direct_read_us,
        "power_source": summary.power_source,
        "power_w_mean": summary.power_w.map(|p| p.mean),
        "energy_j_run": summary.energy_j,
    });
    let path = write_bench_result("telemetry", &label, &serde_json::to_string_pretty(&doc)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
