//! The `bench-race` command line against real processes: a nats-server with JetStream, a
//! `bench-central` and `bench-agent`s with the mock engine (each from `common/procs.rs`), the
//! binary run with `std::process`-style commands (tokio's, so each run is bounded and killed
//! when it overstays). Needs the `bench-agent` binary (`cargo build -p bench-agent`).

#[path = "common/procs.rs"]
mod procs;

use procs::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Longest any one `bench-race` invocation may take here.
const CLI_LIMIT: Duration = Duration::from_secs(120);
const MODEL: &str = "mock-7b";

struct Fleet {
    dir: tempfile::TempDir,
    nats: NatsServer,
    central: Central,
    agents: Vec<Proc>,
    http: Http,
}

impl Fleet {
    /// nats-server, central and one mock agent per `(machine_id, tokens_per_s)`, all online.
    async fn start(agents: &[(&str, f64)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = NatsServer::start();
        let url = nats.url();
        let mut central = Central::new(
            dir.path(),
            &url,
            "broadcast_window_s: 2\nrequest_timeout_s: 5\n",
        );
        central.proc.spawn();
        let http = Http::new(Duration::from_secs(20));
        assert!(
            central_healthy(&http, &central.base(), Duration::from_secs(30)).await,
            "central did not start: {}",
            central.proc.log_tail(30)
        );
        let mut procs = Vec::new();
        for (id, rate) in agents {
            let mut p = agent(dir.path(), id, &url, *rate, 5, 0);
            p.spawn();
            procs.push(p);
        }
        let ids: Vec<&str> = agents.iter().map(|a| a.0).collect();
        let fleet = Self {
            dir,
            nats,
            central,
            agents: procs,
            http,
        };
        assert!(
            machines_online(&fleet.http, &fleet.base(), &ids, Duration::from_secs(30)).await,
            "agents did not come online: {}",
            fleet
                .agents
                .iter()
                .map(|a| a.log_tail(20))
                .collect::<Vec<_>>()
                .join("\n")
        );
        fleet
    }

    fn base(&self) -> String {
        self.central.base()
    }

    /// Restarts agent `i` with another mock rate and waits until its new process heart-beats.
    async fn restart_agent(&mut self, i: usize, tokens_per_s: f64) {
        let id = self.agents[i].name.clone();
        self.agents[i].kill9();
        let since = now_ms();
        let mut p = agent(self.dir.path(), &id, &self.nats.url(), tokens_per_s, 5, 0);
        p.spawn();
        self.agents[i] = p;
        let (http, base) = (self.http.clone(), self.base());
        let fresh = poll(Duration::from_secs(30), Duration::from_millis(100), || {
            let (http, base, id) = (http.clone(), base.clone(), id.clone());
            async move {
                let (_, v) = http.get(&format!("{base}/api/machines")).await.ok()?;
                v["machines"]
                    .as_array()?
                    .iter()
                    .find(|m| m["machine_id"] == id.as_str())
                    .filter(|m| m["status"] == "online" && m["last_seen_ms"].as_u64() > Some(since))
                    .map(|_| ())
            }
        })
        .await;
        assert!(
            fresh.is_some(),
            "agent {id} did not come back: {}",
            self.agents[i].log_tail(20)
        );
    }
}

/// What one `bench-race` run printed, and how it exited.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// The job id it printed (`job <id>` on stderr).
    fn job_id(&self) -> String {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("job "))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no job id printed:\n{}", self.stderr))
    }

    fn show(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `bench-race <args>` against `central` (bounded; killed when it overstays).
async fn bench_race(central: &str, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bench-race"));
    cmd.args(args)
        .env("BENCH_CENTRAL", central)
        .env_remove("CENTRAL_API_TOKEN")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = within(
        &format!("bench-race {}", args.join(" ")),
        CLI_LIMIT,
        cmd.output(),
    )
    .await
    .expect("bench-race runs");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Markdown rows of a table whose first column is one of `ids`.
fn table_rows<'a>(md: &'a str, ids: &[&str]) -> Vec<&'a str> {
    md.lines()
        .filter(|l| {
            let first = l
                .trim_start_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim();
            ids.contains(&first)
        })
        .collect()
}

/// `run --model MODEL --repeat <repeat> --warmup 0`, then `extra`.
fn run_args<'a>(repeat: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--model", MODEL, "--repeat", repeat, "--warmup", "0"];
    a.extend_from_slice(extra);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_machines_watch_export_compare_and_refusals() {
    let fleet = Fleet::start(&[("alpha", 400.0), ("beta", 200.0)]).await;
    let base = fleet.base();

    // machines: both listed.
    let m = bench_race(&base, &["machines"]).await;
    assert_eq!(m.code, 0, "{}", m.show());
    assert_eq!(
        table_rows(&m.stdout, &["alpha", "beta"]).len(),
        2,
        "{}",
        m.show()
    );
    let mj = bench_race(&base, &["machines", "-o", "json"]).await;
    let v: Value = serde_json::from_str(&mj.stdout).expect("machines -o json parses");
    assert_eq!(v["machines"].as_array().map(Vec::len), Some(2), "{v}");

    // run: a plain job on the whole fleet; one row per machine, exit 0.
    let run = bench_race(&base, &run_args("2", &["--max-tokens", "16"])).await;
    println!("{}", run.show());
    assert_eq!(run.code, 0, "{}", run.show());
    let rows = table_rows(&run.stdout, &["alpha", "beta"]);
    assert_eq!(rows.len(), 2, "{}", run.show());
    assert!(
        run.stdout.contains("t/s") && run.stdout.contains("gen16"),
        "{}",
        run.show()
    );
    assert!(rows.iter().all(|r| r.contains("done")), "{}", run.show());
    let job1 = run.job_id();
    // Not a terminal: progress comes as plain lines on stderr.
    assert!(run.stderr.contains("alpha: done"), "{}", run.show());

    // -o json parses and carries both machines' rates.
    let run2 = bench_race(
        &base,
        &run_args(
            "2",
            &[
                "--machines",
                "alpha,beta",
                "--max-tokens",
                "16",
                "-o",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(run2.code, 0, "{}", run2.show());
    let doc: Value =
        serde_json::from_str(&run2.stdout).unwrap_or_else(|e| panic!("{e}: {}", run2.show()));
    let job2 = doc["job_id"].as_str().expect("job_id").to_string();
    assert_eq!(doc["status"], "done");
    let jrows = doc["rows"].as_array().expect("rows");
    assert_eq!(jrows.len(), 2, "{doc:#}");
    for r in jrows {
        assert_eq!(r["status"], "done", "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert_eq!(r["n"], 2, "{r}");
    }

    // -o csv: a header and one line per machine.
    let w = bench_race(&base, &["watch", &job1, "-o", "csv"]).await;
    assert_eq!(w.code, 0, "{}", w.show());
    let lines: Vec<&str> = w.stdout.lines().collect();
    assert!(
        lines[0].starts_with("job_id,machine_id,label,model,cell,test"),
        "{}",
        w.show()
    );
    assert_eq!(lines.len(), 3, "{}", w.show());

    // export: central's CSV (one row per machine x repeat), JSON and NDJSON.
    let e = bench_race(&base, &["export", &job1]).await;
    assert_eq!(e.code, 0, "{}", e.show());
    assert!(
        e.stdout
            .starts_with("job_id,machine_id,label,engine,model,repeat_index"),
        "{}",
        e.show()
    );
    assert_eq!(e.stdout.lines().count(), 1 + 2 * 2, "{}", e.show());
    let ej = bench_race(&base, &["export", &job1, "--format", "json"]).await;
    let v: Value = serde_json::from_str(&ej.stdout).expect("export json parses");
    assert_eq!(v["job_id"], job1.as_str());
    let en = bench_race(&base, &["export", &job1, "--format", "ndjson"]).await;
    assert!(en.stdout.lines().count() > 4, "{}", en.show());
    for l in en.stdout.lines() {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }

    // compare: per machine, the second job against the first (deltas and ratios).
    let c = bench_race(&base, &["compare", &job1, &job2]).await;
    println!("{}", c.show());
    assert_eq!(c.code, 0, "{}", c.show());
    assert!(
        c.stdout.contains("Δ %") && c.stdout.contains("ratio"),
        "{}",
        c.show()
    );
    assert_eq!(
        table_rows(&c.stdout, &["alpha", "beta"]).len(),
        4,
        "{}",
        c.show()
    );
    assert!(
        c.stdout.contains(&job2) && c.stdout.contains("baseline"),
        "{}",
        c.show()
    );
    let cj = bench_race(&base, &["compare", &job1, &job2, "-o", "json"]).await;
    let v: Value = serde_json::from_str(&cj.stdout).expect("compare json parses");
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(2), "{v:#}");
    // One machine of one job against another machine of the other: one group of two.
    let (a, b) = (format!("{job1}:alpha"), format!("{job2}:beta"));
    let cr = bench_race(&base, &["compare", &a, &b, "-o", "json"]).await;
    assert_eq!(cr.code, 0, "{}", cr.show());
    let v: Value = serde_json::from_str(&cr.stdout).expect("compare json parses");
    assert_eq!(v["baseline"], a.as_str(), "{v:#}");
    let entries = v["groups"][0]["entries"].as_array().expect("entries");
    assert_eq!(
        entries
            .iter()
            .map(|e| e["machine_id"].clone())
            .collect::<Vec<_>>(),
        [json!("alpha"), json!("beta")]
    );
    assert!(entries[1]["vs_baseline"]["gen_tokens_per_s"]["ratio"].is_number());

    // A model nobody has: every machine refuses, exit non-zero, the reason said.
    let bad = bench_race(&base, &["run", "--model", "no-such-model", "--repeat", "1"]).await;
    assert_ne!(bad.code, 0, "{}", bad.show());
    assert!(bad.stderr.contains("model_not_found"), "{}", bad.show());
    assert!(bad.stderr.contains("nobody accepted"), "{}", bad.show());
    // An unknown machine: central refuses the request.
    let ghost = bench_race(&base, &["run", "--model", MODEL, "--machines", "ghost"]).await;
    assert_ne!(ghost.code, 0, "{}", ghost.show());
    // A bad flag is a usage error (2) before anything is sent.
    let usage = bench_race(&base, &["run", "--model", MODEL, "--repeat", "many"]).await;
    assert_eq!(usage.code, 2, "{}", usage.show());
    let shape = bench_race(
        &base,
        &[
            "run",
            "--model",
            MODEL,
            "--profile",
            "pp8-tg4",
            "--prompt-tokens",
            "9",
        ],
    )
    .await;
    assert_eq!(shape.code, 2, "{}", shape.show());
    assert!(shape.stderr.contains("invalid job"), "{}", shape.show());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_if_slower_gates_on_the_baseline() {
    let mut fleet = Fleet::start(&[("solo", 500.0)]).await;
    let base = fleet.base();
    fn job<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        run_args(
            "3",
            &[&["--machines", "solo", "--max-tokens", "24"], extra].concat(),
        )
    }
    let fast = bench_race(&base, &job(&[])).await;
    assert_eq!(fast.code, 0, "{}", fast.show());
    let fast_id = fast.job_id();

    // The same machine, five times slower.
    fleet.restart_agent(0, 100.0).await;
    let slow = bench_race(
        &base,
        &job(&["--fail-if-slower", "50", "--baseline", &fast_id]),
    )
    .await;
    assert_eq!(
        slow.code,
        3,
        "slower than the baseline: exit 3\n{}",
        slow.show()
    );
    assert!(slow.stderr.contains("regression: solo"), "{}", slow.show());
    assert!(
        slow.stderr.contains("slower than baseline job"),
        "{}",
        slow.show()
    );
    // The table was still printed.
    assert_eq!(
        table_rows(&slow.stdout, &["solo"]).len(),
        1,
        "{}",
        slow.show()
    );
    let slow_id = slow.job_id();

    // Against a baseline as slow as itself: passes.
    let same = bench_race(
        &base,
        &job(&["--fail-if-slower", "50", "--baseline", &slow_id]),
    )
    .await;
    assert_eq!(same.code, 0, "{}", same.show());
    assert!(
        same.stderr.contains("no machine is more than 50% slower"),
        "{}",
        same.show()
    );
    // And against the fast one with a generous allowance.
    let lax = bench_race(
        &base,
        &job(&["--fail-if-slower", "95", "--baseline", &fast_id]),
    )
    .await;
    assert_eq!(lax.code, 0, "{}", lax.show());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mode_runs_a_plain_job_without_central() {
    let fleet = Fleet::start(&[("n1", 400.0), ("n2", 300.0)]).await;
    let base = fleet.base();
    let url = fleet.nats.url();
    let args = |out: &'static str| {
        let mut a = vec!["--nats", url.as_str()];
        a.extend(run_args(
            "2",
            &["--max-tokens", "16", "--window-s", "5", "-o", out],
        ));
        a
    };
    let a = args("md");
    // Central is given a port nobody listens on: nothing goes through it.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let run = bench_race(&dead, &a).await;
    assert_eq!(run.code, 0, "{}", run.show());
    let rows = table_rows(&run.stdout, &["n1", "n2"]);
    assert_eq!(rows.len(), 2, "{}", run.show());
    assert!(rows.iter().all(|r| r.contains("done")), "{}", run.show());
    let job_id = run.job_id();

    // The same job's table from central, which indexed the same events on its own: identical.
    let mut a = args("csv");
    a.extend(["--job-id", "nats-csv-1"]);
    let n = bench_race(&dead, &a).await;
    assert_eq!(n.code, 0, "{}", n.show());
    assert_eq!(n.stdout.lines().count(), 3, "{}", n.show());
    let http = fleet.http.clone();
    let finished = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let (http, url) = (http.clone(), format!("{base}/api/jobs/nats-csv-1"));
        async move {
            let (s, v) = http.get(&url).await.ok()?;
            (s == 200 && v["status"] == "done").then_some(())
        }
    })
    .await;
    assert!(finished.is_some(), "central never showed nats-csv-1 done");
    let c = bench_race(&base, &["watch", "nats-csv-1", "-o", "csv"]).await;
    assert_eq!(c.code, 0, "{}", c.show());
    assert_eq!(
        c.stdout,
        n.stdout,
        "central's table\n{}\nbench-race --nats's\n{}",
        c.show(),
        n.show()
    );
    let _ = job_id;

    // Nobody there: exit non-zero.
    let mut a = args("md");
    a.extend(["--machines", "ghost"]);
    let ghost = bench_race(&dead, &a).await;
    assert_ne!(ghost.code, 0, "{}", ghost.show());
    assert!(ghost.stderr.contains("nobody accepted"), "{}", ghost.show());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_and_concurrency_give_one_row_per_machine_and_cell() {
    let fleet = Fleet::start(&[("mx1", 400.0), ("mx2", 300.0)]).await;
    let base = fleet.base();
    let matrix = |extra: &[&'static str]| {
        run_args(
            "2",
            &[
                &["--matrix", "max_tokens=8,16", "--concurrency", "1,2"],
                extra,
            ]
            .concat(),
        )
    };
    let run = bench_race(&base, &matrix(&["--slo-ttft-p99-ms", "5000"])).await;
    println!("{}", run.show());
    assert_eq!(run.code, 0, "{}", run.show());
    let rows = table_rows(&run.stdout, &["mx1", "mx2"]);
    assert_eq!(rows.len(), 8, "2 machines x 4 cells\n{}", run.show());
    let mut seen = std::collections::BTreeSet::new();
    for r in &rows {
        let cols: Vec<&str> = r.trim_matches('|').split('|').map(str::trim).collect();
        // machine | model | cell | test | n | t/s | ttft | out t/s | req/s | ttft p99 | status
        assert!(seen.insert((cols[0], cols[2])), "row twice: {r}");
        assert!(
            cols[3].ends_with(&format!(" c{}", &cols[2][cols[2].len() - 1..])),
            "{r}"
        );
        assert!(
            !cols[7].is_empty() && !cols[9].is_empty(),
            "load figures: {r}"
        );
        assert_eq!(cols.last(), Some(&"done"), "{r}");
    }
    for m in ["mx1", "mx2"] {
        for mt in [8, 16] {
            for c in [1, 2] {
                let key = format!("max_tokens={mt},concurrency={c}");
                assert!(
                    seen.contains(&(m, key.as_str())),
                    "{m} {key} missing\n{}",
                    run.show()
                );
            }
        }
    }
    assert!(
        run.stdout.contains("out t/s") && run.stdout.contains("ttft p99 ms"),
        "{}",
        run.show()
    );

    // -o json: the same rows, typed.
    let j = bench_race(&base, &matrix(&["-o", "json"])).await;
    assert_eq!(j.code, 0, "{}", j.show());
    let doc: Value = serde_json::from_str(&j.stdout).expect("json");
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 8, "{doc:#}");
    assert!(
        rows.iter()
            .all(|r| r["output_tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0),
        "{doc:#}"
    );
}
