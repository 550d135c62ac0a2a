//! Matrix races, concurrency sweeps, the regression flag and run-against-run compare, through
//! the real indexer (a real nats-server, typed events published as an agent does): each cell
//! ranked on its own runs with a winner only where the intervals separate, the cells' statuses
//! as their events come, a sweep's capacity under the job's SLO, one CSV row per machine x cell
//! x repeat, a slower re-run of the same setup flagged (and a new fingerprint not), and
//! `GET /api/compare` in both forms with its refusals.

mod common;

use async_nats::jetstream;
use bench_schemas::event::{Accepted, Started};
use bench_schemas::{
    CellResult, CellStatus, ErrorBody, ErrorCode, EventKind, Fingerprint, Job, Load, Metrics,
    Percentiles, Summary,
};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const FAST: [f64; 6] = [50.0, 50.5, 51.0, 51.5, 52.0, 52.5];
const SLOW: [f64; 6] = [40.0, 40.5, 41.0, 41.5, 42.0, 42.5];
const EVEN_P: [f64; 6] = [30.0, 30.2, 30.4, 30.6, 30.8, 31.0];
const EVEN_Q: [f64; 6] = [30.1, 30.3, 30.5, 30.7, 30.9, 31.1];

fn fingerprint(build: &str) -> Fingerprint {
    let mut f = Fingerprint::default();
    f.hardware.cpu = "AMD EPYC 9654".into();
    f.engine.kind = "openai".into();
    f.engine.build = Some(build.into());
    f.model.name = "m".into();
    f.with_id()
}

/// One finished run.
fn run(i: u32, cell: Option<&str>, rate: f64) -> Metrics {
    let mut m: Metrics =
        serde_json::from_str(include_str!("../../schemas/messages/metrics.json")).unwrap();
    m.repeat_index = i;
    m.cell = cell.map(str::to_string);
    m.gen_tokens_per_s = Some(rate);
    m.ttft_ms = 1000.0 / rate;
    m
}

/// An agent's events for one machine of one job.
struct Agent {
    ev: RunEvents,
    repeats: Vec<Metrics>,
    results: Vec<CellResult>,
    next: u32,
}

impl Agent {
    fn new(job_id: &str, machine: &str, job: Value, fp: Option<Fingerprint>) -> Self {
        let mut job: Job = serde_json::from_value(job).unwrap();
        job.job_id = Some(job_id.into());
        let mut ev = RunEvents::new(job_id, machine);
        ev.push(EventKind::JobAccepted(Accepted {
            job,
            position: 0,
            engine: "mock".into(),
            engine_url: String::new(),
            label: format!("Label {machine}"),
            agent_version: "0".into(),
            fingerprint: fp,
        }));
        Self {
            ev,
            repeats: Vec::new(),
            results: Vec::new(),
            next: 0,
        }
    }

    fn started(&mut self, cell: Option<&str>) -> &mut Self {
        self.ev.push(EventKind::JobStarted(Started {
            cell: cell.map(str::to_string),
            stream: None,
            repeat_index: self.next,
            warmup: false,
            cold: false,
            fingerprint: None,
        }));
        self
    }

    /// Measured runs of `cell` at these decode rates.
    fn runs(&mut self, cell: Option<&str>, rates: &[f64]) -> Vec<Metrics> {
        let mut out = Vec::new();
        for rate in rates {
            let m = run(self.next, cell, *rate);
            self.next += 1;
            self.ev.push(EventKind::RepeatDone(m.clone()));
            out.push(m);
        }
        self.repeats.extend(out.clone());
        out
    }

    /// A load cell's requests: `streams` streams of 2 requests each, sent at 0 and 1000 ms.
    fn load_runs(&mut self, cell: &str, streams: u32) -> Vec<Metrics> {
        let mut out = Vec::new();
        for s in 0..streams {
            for k in 0..2 {
                let mut m = run(self.next, Some(cell), 20.0);
                m.stream = Some(s);
                m.start_ms = Some(f64::from(k) * 1000.0);
                self.next += 1;
                self.ev.push(EventKind::RepeatDone(m.clone()));
                out.push(m);
            }
        }
        self.repeats.extend(out.clone());
        out
    }

    fn cell_done(
        &mut self,
        cell: &str,
        runs: &[Metrics],
        load: Option<Load>,
        error: Option<ErrorBody>,
    ) -> &mut Self {
        let (k, v) = cell.split_once('=').unwrap();
        let r = CellResult {
            cell: cell.into(),
            values: BTreeMap::from([(k.to_string(), v.to_string())]),
            status: if error.is_some() {
                CellStatus::Failed
            } else {
                CellStatus::Done
            },
            error,
            summary: (!runs.is_empty()).then(|| Summary::of(runs, false)),
            load,
            stop_reason: Default::default(),
            fingerprint_id: None,
            repeat_range: None,
        };
        self.results.push(r.clone());
        self.ev.push(EventKind::CellDone(r));
        self
    }

    fn done(&mut self) -> &mut Self {
        let (repeats, cells) = (self.repeats.clone(), self.results.clone());
        self.ev.done_with(repeats, false, |d| d.cells = cells);
        self
    }

    async fn publish(&mut self, js: &jetstream::Context) {
        publish_events(js, &self.ev.take()).await;
    }
}

/// A load aggregate with the TTFT p99 given.
fn load(concurrency: u32, p99: f64) -> Load {
    Load {
        concurrency,
        requests: concurrency * 2,
        wall_ms: 2000.0,
        output_tokens: u64::from(concurrency) * 2 * 156,
        output_tokens_per_s: f64::from(concurrency) * 156.0,
        requests_per_s: f64::from(concurrency),
        ttft_ms: Some(Percentiles {
            p50: p99 / 2.0,
            p90: p99 * 0.9,
            p99,
        }),
        itl_ms: None,
        per_stream_tokens_per_s: None,
    }
}

fn cell<'a>(v: &'a Value, key: &str) -> &'a Value {
    v["cells"]
        .as_array()
        .unwrap_or_else(|| panic!("no cells in {v:#}"))
        .iter()
        .find(|c| c["cell"] == key)
        .unwrap_or_else(|| panic!("no cell {key} in {v:#}"))
}

fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!((got - want).abs() < 1e-9, "{got} != {want}");
}

fn order(ranking: &Value) -> Vec<String> {
    ranking
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["machine_id"].as_str().unwrap().to_string())
        .collect()
}

/// `mx-race`: cells model=a (p clearly faster than q) and model=b (intervals overlapping).
/// Checks the cells' statuses while it runs; returns the finished document.
async fn race(js: &jetstream::Context, base: &str) -> Value {
    let job = json!({"model": "m", "prompt": "p", "repeat": 6, "matrix": {"model": ["a", "b"]}});
    let mut p = Agent::new("mx-race", "p", job.clone(), Some(fingerprint("b1")));
    let mut q = Agent::new("mx-race", "q", job, Some(fingerprint("b1")));
    p.started(Some("model=a"));
    let pa = p.runs(Some("model=a"), &FAST);
    p.cell_done("model=a", &pa, None, None)
        .started(Some("model=b"));
    p.publish(js).await;
    q.publish(js).await;
    let v = job_when(base, "mx-race", "p done with a, running b", |v| {
        v["cells"][1]["machines"][0]["status"] == "running"
            && v["machines"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let (a, b) = (cell(&v, "model=a"), cell(&v, "model=b"));
    assert_eq!(a["values"], json!({"model": "a"}));
    assert_eq!(a["machines"][0]["status"], "done", "{v:#}");
    assert_eq!(a["machines"][0]["runs"], 6);
    assert_eq!(
        a["machines"][0]["summary"]["gen_tokens_per_s"]["median"],
        51.25
    );
    assert_eq!(
        a["machines"][0]["fingerprint_id"],
        fingerprint("b1").fingerprint_id.as_str()
    );
    assert_eq!(b["machines"][0]["runs"], 0);
    assert!(b["machines"][0]["summary"].is_null());
    assert_eq!(
        (
            a["machines"][1]["status"].as_str(),
            b["machines"][1]["status"].as_str()
        ),
        (Some("pending"), Some("pending"))
    );
    assert_eq!(order(&a["ranking"]), ["p"]);
    assert!(a["winner"].is_null(), "one racer is no winner");

    // q's runs of a, then b's runs of both: before q's cell_done its summary is its runs'.
    let qa = q.runs(Some("model=a"), &SLOW);
    q.publish(js).await;
    let v = job_when(base, "mx-race", "q's runs of a", |v| {
        v["cells"][0]["machines"][1]["runs"] == 6
    })
    .await;
    let a = cell(&v, "model=a");
    assert_eq!(a["machines"][1]["status"], "running");
    assert_eq!(
        a["machines"][1]["summary"]["gen_tokens_per_s"]["median"],
        41.25
    );
    assert_eq!(a["winner"], "p", "{v:#}");

    q.cell_done("model=a", &qa, None, None);
    let qb = q.runs(Some("model=b"), &EVEN_Q);
    q.cell_done("model=b", &qb, None, None).done();
    let pb = p.runs(Some("model=b"), &EVEN_P);
    p.cell_done("model=b", &pb, None, None).done();
    p.publish(js).await;
    q.publish(js).await;
    job_finished(base, "mx-race").await
}

/// `mx-sweep`: concurrency 1, 2, 4 with slo ttft_p99_ms 500; p's p99 100/200/800, q's
/// 300/600 and its concurrency=4 failed (timeout, no runs).
async fn sweep(js: &jetstream::Context, base: &str) -> Value {
    let job = json!({"model": "m", "prompt": "p", "repeat": 2,
        "matrix": {"concurrency": [1, 2, 4]}, "slo": {"ttft_p99_ms": 500}});
    let mut p = Agent::new("mx-sweep", "p", job.clone(), None);
    let mut q = Agent::new("mx-sweep", "q", job, None);
    for (c, p99) in [(1, 100.0), (2, 200.0), (4, 800.0)] {
        let key = format!("concurrency={c}");
        let runs = p.load_runs(&key, c);
        p.cell_done(&key, &runs, Some(load(c, p99)), None);
    }
    for (c, p99) in [(1, 300.0), (2, 600.0)] {
        let key = format!("concurrency={c}");
        let runs = q.load_runs(&key, c);
        q.cell_done(&key, &runs, Some(load(c, p99)), None);
    }
    q.cell_done(
        "concurrency=4",
        &[],
        None,
        Some(ErrorBody::new(
            ErrorCode::Timeout,
            "the engine stopped answering",
        )),
    );
    p.done().publish(js).await;
    q.done().publish(js).await;
    job_finished(base, "mx-sweep").await
}

/// `rg-1` then `rg-2` (no matrix, 6 repeats): p on the same fingerprint, fast then slow; q slow
/// the second time too, but on another engine build.
async fn regression_pair(js: &jetstream::Context, base: &str) -> (Value, Value) {
    let job = json!({"model": "m", "prompt": "p", "repeat": 6});
    let mut evs = Vec::new();
    for (machine, build) in [("p", "b1"), ("q", "b1")] {
        let mut a = Agent::new("rg-1", machine, job.clone(), Some(fingerprint(build)));
        a.runs(None, &FAST);
        a.done();
        evs.extend(a.ev.take());
    }
    publish_events(js, &evs).await;
    let one = job_finished(base, "rg-1").await;
    let created = one["created_ms"].as_u64().unwrap();
    // The second must be created later (the earlier jobs are those created before it).
    until("the clock past rg-1's creation", || async {
        (bench_central::now_ms() > created).then_some(())
    })
    .await;
    let mut evs = Vec::new();
    for (machine, build) in [("p", "b1"), ("q", "b2")] {
        let mut a = Agent::new("rg-2", machine, job.clone(), Some(fingerprint(build)));
        a.runs(None, &SLOW);
        a.done();
        evs.extend(a.ev.take());
    }
    publish_events(js, &evs).await;
    let two = job_finished(base, "rg-2").await;
    assert!(two["created_ms"].as_u64().unwrap() > created);
    (one, two)
}

#[tokio::test]
async fn each_cell_is_ranked_on_its_own_runs_and_a_sweep_finds_the_capacity() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);

    let v = race(&js, &base).await;
    assert_eq!(v["status"], "done", "{v:#}");
    let keys: Vec<&str> = v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cell"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["model=a", "model=b"]);
    let a = cell(&v, "model=a");
    for m in a["machines"].as_array().unwrap() {
        assert_eq!(m["status"], "done", "{m:#}");
        assert_eq!(m["runs"], 6);
        assert!(m["error"].is_null() && m["load"].is_null());
    }
    assert_eq!(order(&a["ranking"]), ["p", "q"]);
    assert_eq!(a["ranking"][0]["gen_tokens_per_s"]["median"], 51.25);
    assert_eq!(a["ranking"][1]["gen_tokens_per_s"]["median"], 41.25);
    assert_eq!(a["ranking"][0]["clear_winner"], true);
    assert_eq!(a["winner"], "p");
    let b = cell(&v, "model=b");
    assert_eq!(order(&b["ranking"]), ["q", "p"]);
    close(&b["ranking"][0]["gen_tokens_per_s"]["median"], 30.6);
    assert_eq!(b["ranking"][0]["clear_winner"], false);
    assert!(
        b["ranking"][0]["verdict"]
            .as_str()
            .unwrap()
            .starts_with("no clear winner"),
        "{b:#}"
    );
    assert!(b["winner"].is_null());
    // The top level is the first cell's.
    assert_eq!(v["ranking"], a["ranking"]);
    assert_eq!(v["energy"]["available"], true, "{v:#}");
    assert_eq!(order(&v["energy"]["ranking"]), ["p", "q"]);
    assert_eq!(v["sweeps"], json!([]), "no concurrency axis");
    let p = machine_in(&v, "p");
    assert_eq!(p["cells"].as_array().unwrap().len(), 2);
    assert_eq!(p["cells"][0]["cell"], "model=a");
    assert_eq!(p["cells"][0]["status"], "done");
    assert_eq!(p["repeats"].as_array().unwrap().len(), 12);
    // A baseline applies within each cell.
    let (s, vb) = get(&base, "/api/jobs/mx-race?baseline=q").await;
    assert_eq!(s, 200);
    let d = &cell(&vb, "model=b")["ranking"][1]["delta_vs_baseline"];
    assert!(d["gen_tokens_per_s_pct"].as_f64().unwrap() < 0.0, "{d}");

    // CSV: one row per machine x cell x repeat, the cell in its column.
    let csv = csv_export(&base, "mx-race").await;
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(head[head.len() - 3..], ["cell", "stream", "start_ms"]);
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 24, "{csv}");
    for (mid, key) in [
        ("p", "model=a"),
        ("p", "model=b"),
        ("q", "model=a"),
        ("q", "model=b"),
    ] {
        let n = rows
            .iter()
            .filter(|r| r[col("machine_id")] == mid && r[col("cell")] == key)
            .count();
        assert_eq!(n, 6, "{mid} {key}: {csv}");
    }
    assert!(rows.iter().all(|r| r.len() == head.len()));
    assert!(rows.iter().all(|r| r[col("stream")].is_empty()));
    let (_, json) = get(&base, "/api/jobs/mx-race/export.json").await;
    assert_eq!(json["cells"], v["cells"]);
    assert_eq!(json["sweeps"], json!([]));

    // The sweep: capacity is the last concurrency before the first point over the SLO.
    let v = sweep(&js, &base).await;
    let sweeps = v["sweeps"].as_array().unwrap();
    assert_eq!(sweeps.len(), 1, "{v:#}");
    let s = &sweeps[0];
    assert_eq!(
        (s["group"].clone(), s["values"].clone(), s["slo"].clone()),
        (json!(""), json!({}), json!({"ttft_p99_ms": 500.0}))
    );
    let sp = &s["machines"][0];
    assert_eq!(sp["machine_id"], "p");
    let points: Vec<(u64, &str, f64)> = sp["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["concurrency"].as_u64().unwrap(),
                p["cell"].as_str().unwrap(),
                p["load"]["ttft_ms"]["p99"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            (1, "concurrency=1", 100.0),
            (2, "concurrency=2", 200.0),
            (4, "concurrency=4", 800.0)
        ]
    );
    assert_eq!(sp["capacity"], 2);
    let sq = &s["machines"][1];
    assert_eq!(
        sq["points"].as_array().unwrap().len(),
        2,
        "the failed cell has no load"
    );
    assert_eq!(sq["capacity"], 1);
    let c4 = cell(&v, "concurrency=4");
    assert_eq!(c4["machines"][1]["status"], "failed");
    assert_eq!(c4["machines"][1]["error"]["code"], "timeout");
    assert_eq!(c4["machines"][1]["runs"], 0);
    assert_eq!(c4["machines"][0]["load"]["output_tokens_per_s"], 624.0);
    assert_eq!(c4["machines"][0]["summary"]["repeats"], 8);
    assert_eq!(order(&c4["ranking"]), ["p"]);
    let csv = csv_export(&base, "mx-sweep").await;
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let of = |mid: &str| rows.iter().filter(|r| r[col("machine_id")] == mid).count();
    assert_eq!((of("p"), of("q")), (14, 6), "{csv}");
    let last_p = rows.iter().rfind(|r| r[col("machine_id")] == "p").unwrap();
    assert_eq!(
        (
            last_p[col("cell")],
            last_p[col("stream")],
            last_p[col("start_ms")]
        ),
        ("concurrency=4", "3", "1000")
    );
    let (_, json) = get(&base, "/api/jobs/mx-sweep/export.json").await;
    assert_eq!(json["sweeps"], v["sweeps"]);

    // A job without a matrix has neither cells nor sweeps.
    let (one, _) = regression_pair(&js, &base).await;
    assert!(
        one.get("cells").is_none() && one.get("sweeps").is_none(),
        "{one:#}"
    );
    assert_eq!(machine_in(&one, "p")["cells"], json!([]));
}

#[tokio::test]
async fn a_slower_rerun_of_the_same_setup_is_flagged_and_a_new_fingerprint_is_not() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);

    let (one, two) = regression_pair(&js, &base).await;
    for m in one["machines"].as_array().unwrap() {
        assert!(m.get("regression").is_none(), "nothing earlier: {m:#}");
    }
    let r = &machine_in(&two, "p")["regression"];
    assert_eq!(r["job_id"], "rg-1", "{two:#}");
    assert_eq!(r["created_ms"], one["created_ms"]);
    assert_eq!(r["regressed"], true);
    let rate = &r["metrics"][0];
    assert_eq!(
        (
            rate["cell"].as_str(),
            rate["metric"].as_str(),
            rate["before"].as_f64(),
            rate["after"].as_f64()
        ),
        (Some(""), Some("gen_tokens_per_s"), Some(51.25), Some(41.25))
    );
    assert!((rate["pct"].as_f64().unwrap() - (-10.0 / 51.25 * 100.0)).abs() < 1e-9);
    assert_eq!(
        (rate["exceeds_ci"].clone(), rate["worse"].clone()),
        (json!(true), json!(true))
    );
    let ttft = &r["metrics"][1];
    assert_eq!(ttft["metric"], "ttft_ms");
    assert_eq!(
        ttft["worse"], true,
        "a slower decode here also has a longer TTFT"
    );
    // q changed engine build: `previous` says so, and it is no regression.
    let q = machine_in(&two, "q");
    assert!(q.get("regression").is_none(), "{q:#}");
    assert_eq!(q["previous"]["job_id"], "rg-1");
    assert_eq!(q["previous"]["changes"][0]["field"], "engine.build");
    // export.json carries it too.
    let (_, json) = get(&base, "/api/jobs/rg-2/export.json").await;
    assert_eq!(machine_in(&json, "p")["regression"], *r);
}

#[tokio::test]
async fn runs_and_jobs_are_compared_against_the_first() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    race(&js, &base).await;
    sweep(&js, &base).await;
    regression_pair(&js, &base).await;

    // run=: the same machine in two jobs.
    let (s, v) = get(&base, "/api/compare?run=rg-1:p&run=rg-2:p").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["baseline"], "rg-1:p");
    let g = &v["groups"][0];
    assert_eq!(v["groups"].as_array().unwrap().len(), 1);
    assert_eq!(
        (g["machine_id"].clone(), g["cell"].clone()),
        (json!("p"), json!(""))
    );
    let (e0, e1) = (&g["entries"][0], &g["entries"][1]);
    assert_eq!(
        (e0["ref"].as_str(), e1["ref"].as_str()),
        (Some("rg-1:p"), Some("rg-2:p"))
    );
    assert_eq!(
        (e1["job_id"].as_str(), e1["model"].as_str()),
        (Some("rg-2"), Some("m"))
    );
    assert_eq!(e1["status"], "done");
    assert_eq!(e1["label"], "Label p");
    assert!(e0["vs_baseline"].is_null());
    assert_eq!(e0["changes"], json!([]));
    let d = &e1["vs_baseline"]["gen_tokens_per_s"];
    assert_eq!(
        (d["baseline"].as_f64(), d["value"].as_f64()),
        (Some(51.25), Some(41.25))
    );
    assert_eq!(d["delta"], -10.0);
    assert!((d["ratio"].as_f64().unwrap() - 41.25 / 51.25).abs() < 1e-12);
    assert_eq!(
        (d["exceeds_ci"].clone(), d["worse"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(e1["vs_baseline"]["ttft_ms"]["worse"], true);
    assert!(
        e1["vs_baseline"].get("output_tokens_per_s").is_none(),
        "no load"
    );
    assert_eq!(e1["changes"], json!([]), "same fingerprint");
    assert_eq!(e1["summary"]["gen_tokens_per_s"]["median"], 41.25);

    // A changed fingerprint is listed.
    let (_, v) = get(&base, "/api/compare?run=rg-1:q&run=rg-2:q").await;
    let changes = &v["groups"][0]["entries"][1]["changes"];
    assert_eq!(changes[0]["field"], "engine.build", "{v:#}");
    assert_eq!(
        (changes[0]["before"].as_str(), changes[0]["after"].as_str()),
        (Some("b1"), Some("b2"))
    );

    // Cells: two machines in one cell (URL-encoded key), then load figures.
    let (s, v) = get(
        &base,
        "/api/compare?run=mx-race:q:model%3Da&run=mx-race:p:model%3Da&run=mx-race:p:model%3Db",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["baseline"], "mx-race:q:model=a");
    let g = &v["groups"][0];
    assert!(g["machine_id"].is_null() && g["cell"].is_null(), "{g:#}");
    let e = g["entries"].as_array().unwrap();
    assert_eq!(e[1]["cell"], "model=a");
    assert_eq!(e[1]["vs_baseline"]["gen_tokens_per_s"]["worse"], false);
    assert_eq!(e[1]["vs_baseline"]["gen_tokens_per_s"]["exceeds_ci"], true);
    close(&e[2]["summary"]["gen_tokens_per_s"]["median"], 30.5);
    let (s, v) = get(
        &base,
        "/api/compare?run=mx-sweep:p:concurrency%3D2&run=mx-sweep:q:concurrency=2",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let vs = &v["groups"][0]["entries"][1]["vs_baseline"];
    assert_eq!(vs["ttft_p99_ms"]["baseline"], 200.0, "{v:#}");
    assert_eq!(vs["ttft_p99_ms"]["value"], 600.0);
    assert_eq!(
        (
            vs["ttft_p99_ms"]["worse"].clone(),
            vs["ttft_p99_ms"]["exceeds_ci"].clone()
        ),
        (json!(true), json!(false))
    );
    assert_eq!(vs["output_tokens_per_s"]["delta"], 0.0);
    assert_eq!(v["groups"][0]["cell"], "concurrency=2");
    assert_eq!(v["groups"][0]["entries"][0]["load"]["concurrency"], 2);

    // jobs=: one group per machine and cell the baseline shares.
    let (s, v) = get(&base, "/api/compare?jobs=rg-1,rg-2").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["baseline"], "rg-1");
    let groups = v["groups"].as_array().unwrap();
    let heads: Vec<(&str, &str, usize)> = groups
        .iter()
        .map(|g| {
            (
                g["machine_id"].as_str().unwrap(),
                g["cell"].as_str().unwrap(),
                g["entries"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(heads, [("p", "", 2), ("q", "", 2)]);
    assert_eq!(groups[0]["entries"][0]["job_id"], "rg-1");
    assert_eq!(
        groups[0]["entries"][1]["vs_baseline"]["gen_tokens_per_s"]["worse"],
        true
    );

    // Refusals.
    let nine = ["run=rg-1:p"; 9].join("&");
    let refusals: [(u16, &str, &[&str]); 3] = [
        (
            400,
            "bad_request",
            &[
                "",
                "run=rg-1:p",
                &nine,
                "run=rg-1&run=rg-2:p",
                "run=rg-1:p&jobs=rg-1,rg-2",
                "jobs=rg-1",
                "jobs=rg-1,rg-2,rg-1,rg-2,rg-1,rg-2,rg-1,rg-2,rg-1",
            ],
        ),
        (
            400,
            "invalid_id",
            &[
                "run=rg.1:p&run=rg-2:p",
                "run=rg-1:P!&run=rg-2:p",
                "jobs=rg-1,rg.2",
            ],
        ),
        (
            404,
            "not_found",
            &[
                "run=nope:p&run=rg-2:p",
                "run=rg-1:zz&run=rg-2:p",
                "run=mx-race:p:model%3Dzz&run=rg-2:p",
                "run=mx-sweep:q:concurrency%3D4&run=mx-sweep:p:concurrency%3D4",
                "jobs=rg-1,nope",
                "jobs=mx-race,rg-1",
            ],
        ),
    ];
    for (status, code, queries) in refusals {
        for query in queries {
            let (s, e) = get(&base, &format!("/api/compare?{query}")).await;
            assert_eq!(
                (s, e["error"]["code"].as_str()),
                (status, Some(code)),
                "{query}: {e}"
            );
            assert!(!e["error"]["message"].as_str().unwrap().is_empty());
        }
    }
}
