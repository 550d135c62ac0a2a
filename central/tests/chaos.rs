//! Chaos (issue 8's proof): real processes, killed at random, and every run still accounted for.
//!
//! One nats-server, one `bench-central` and three `bench-agent` processes (mock engine at a
//! realistic 60 tokens/s). Thirty jobs go in through central's HTTP API over about a minute, to
//! one, two or three machines, some re-using the id of an earlier job once it finished. Meanwhile
//! a chaos task driven by a seeded RNG (`CHAOS_SEED` replays a run) `kill -9`s and restarts the
//! two flaky agents, restarts the NATS server (SIGKILL, same port and store) and `kill -9`s and
//! restarts central (each kind at least once); the agent `steady` is never touched. Submissions
//! that meet a refused connection, a reset or a 503 are retried (bounded) and counted.
//!
//! Once everything is back and settled: every run is finished: `done`, or failed with a named
//! reason that a recorded kill or outage explains (a run of `steady` must be `done`); every
//! acceptance the submitter saw is a recorded run; the stream holds no event twice (per job,
//! machine and run the seqs are unique; gaps are reported, and a `done` run has none); the
//! runs in the stream and in the index are the same; `results/runs/<job>/summary.json` equals
//! `GET /api/jobs/{id}`; no run that central failed (its log's stall verdicts) went on to finish;
//! a live machine was never answered `unknown_machine`; and every process is still up.
//! `BENCH_KEEP_TMP=1` keeps the processes' logs, configs and results for a post-mortem.

#[path = "common/procs.rs"]
mod procs;

use procs::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STEADY: &str = "steady";
const FLAKY: [&str; 2] = ["flaky-a", "flaky-b"];
const MACHINES: [&str; 3] = [STEADY, "flaky-a", "flaky-b"];
/// Jobs submitted.
const JOBS: usize = 30;
/// Central's stall timeout: a run whose agent is gone fails this long after its last event.
const STALL_TIMEOUT_S: u64 = 5;
/// Attempts per submission (about 0.5 s apart) while central or NATS is away.
const MAX_ATTEMPTS: u32 = 40;
/// Failure codes a run may end with when something it depended on died.
const NAMED: [&str; 6] = [
    "agent_restarted",
    "stalled",
    "dispatch_interrupted",
    "superseded",
    "cancelled",
    "offline",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Agent,
    Nats,
    Central,
}

/// Something killed at `down_ms` and back (started again) at `up_ms`.
#[derive(Clone, Debug)]
struct Outage {
    kind: Kind,
    target: String,
    down_ms: u64,
    up_ms: Option<u64>,
}

/// One job submission and what came of it.
#[derive(Clone, Debug, Default)]
struct Submission {
    job_id: String,
    machines: Vec<String>,
    reuse: bool,
    /// (start, end) unix ms of each attempt.
    attempts: Vec<(u64, u64)>,
    /// Why each retried attempt failed.
    failures: Vec<String>,
    /// dispatched | still_running | interrupted | refused <status> <code> | gave_up
    outcome: String,
    /// (machine, accepted|rejected|offline, error code) from the 201 answer.
    answers: Vec<(String, String, String)>,
}

struct Fleet {
    central: Central,
    agents: BTreeMap<String, Proc>,
}

struct World {
    fleet: Mutex<Fleet>,
    nats: Arc<Mutex<NatsServer>>,
    outages: Mutex<Vec<Outage>>,
    submissions: Mutex<Vec<Submission>>,
    submitting_done: AtomicBool,
    /// Fires as each submission attempt goes out (a kill can be aimed into a dispatch).
    post_started: tokio::sync::Notify,
    /// Wrong answers seen along the way (each fails the test at the end).
    wrong: Mutex<Vec<String>>,
    t0: Instant,
    http: Http,
    base: String,
}

impl World {
    fn say(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.t0.elapsed().as_secs_f64());
    }

    fn down(&self, kind: Kind, target: &str) -> usize {
        let mut o = self.outages.lock().unwrap();
        o.push(Outage {
            kind,
            target: target.to_string(),
            down_ms: now_ms(),
            up_ms: None,
        });
        o.len() - 1
    }

    fn up(&self, i: usize) {
        self.outages.lock().unwrap()[i].up_ms = Some(now_ms());
    }
}

// ---- the submitter ----

fn job_body(rng: &mut Rng, job_id: &str, machines: &[String], i: usize) -> Value {
    json!({
        "job_id": job_id,
        "machines": machines,
        "model": "mock-7b",
        "prompt": format!("chaos job {i}: tell me a story"),
        "max_tokens": rng.range(20, 70),
        "repeat": rng.range(1, 2),
        "warmup": if rng.chance(0.2) { 1 } else { 0 },
    })
}

fn pick_machines(rng: &mut Rng) -> Vec<String> {
    let n = match rng.unit() {
        x if x < 0.4 => 1,
        x if x < 0.75 => 2,
        _ => 3,
    };
    let mut all: Vec<&str> = MACHINES.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let i = rng.range(0, all.len() as u64 - 1) as usize;
        out.push(all.remove(i).to_string());
    }
    out.sort();
    out
}

async fn submit(w: &World, body: &Value, mut s: Submission) -> Submission {
    let url = format!("{}/api/jobs", w.base);
    for attempt in 1..=MAX_ATTEMPTS {
        let start = now_ms();
        w.post_started.notify_waiters();
        let r = w.http.post(&url, body).await;
        s.attempts.push((start, now_ms()));
        match r {
            Ok((400, v)) if v["error"]["code"] == "unknown_machine" => {
                // Every machine here heart-beats (a killed one is back within 9 s and its entry
                // lives 15 s): central must know it, also right after a restart. Retried so
                // that the run goes on; it fails the test at the end.
                let wrong = format!(
                    "{}: POST /api/jobs answered 400 unknown_machine ({}) for live machines {:?}",
                    s.job_id,
                    v["error"]["message"].as_str().unwrap_or(""),
                    s.machines
                );
                w.say(&format!("WRONG: {wrong}"));
                w.wrong.lock().unwrap().push(wrong);
                s.failures.push("400 unknown_machine".into());
            }
            Ok((201, v)) => {
                s.outcome = "dispatched".into();
                for m in v["machines"].as_array().cloned().unwrap_or_default() {
                    s.answers.push((
                        m["machine_id"].as_str().unwrap_or("?").to_string(),
                        m["status"].as_str().unwrap_or("?").to_string(),
                        m["error"]["code"].as_str().unwrap_or("").to_string(),
                    ));
                }
                return s;
            }
            Ok((400, v))
                if v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("still running")) =>
            {
                // After a failed attempt: that attempt's dispatch was recorded (and maybe sent)
                // before central died; its runs are accounted for from the index.
                s.outcome = if attempt > 1 {
                    "interrupted"
                } else {
                    "still_running"
                }
                .into();
                return s;
            }
            Ok((503, v)) => s.failures.push(format!(
                "503 {}",
                v["error"]["code"].as_str().unwrap_or("?")
            )),
            Err(e) => s.failures.push(e.chars().take(60).collect()),
            Ok((status, v)) => {
                s.outcome = format!(
                    "refused {status} {}",
                    v["error"]["code"].as_str().unwrap_or("?")
                );
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.outcome = "gave_up".into();
    s
}

async fn job_status(w: &World, job_id: &str) -> Option<String> {
    match w.http.get(&format!("{}/api/jobs/{job_id}", w.base)).await {
        Ok((200, v)) => v["status"].as_str().map(str::to_string),
        _ => None,
    }
}

async fn submitter(w: Arc<World>, seed: u64) {
    let mut rng = Rng::new(seed ^ 0x5EED_F00D_5AB5);
    let mut reused: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..JOBS {
        // Re-use an earlier id (at most twice each) once that job has finished.
        let mut reuse = None;
        if i >= 4 && rng.chance(0.3) {
            let earlier: Vec<String> = {
                let subs = w.submissions.lock().unwrap();
                let mut ids: Vec<String> = subs.iter().map(|s| s.job_id.clone()).collect();
                ids.sort();
                ids.dedup();
                ids
            };
            for _ in 0..3 {
                let id = rng.pick(&earlier).clone();
                if reused.get(&id).copied().unwrap_or(0) >= 2 {
                    continue;
                }
                if let Some(st) = job_status(&w, &id).await {
                    if st != "running" {
                        reuse = Some(id);
                        break;
                    }
                }
            }
        }
        let machines = pick_machines(&mut rng);
        let job_id = match &reuse {
            Some(id) => {
                *reused.entry(id.clone()).or_default() += 1;
                id.clone()
            }
            None => format!("chaos-{i:02}"),
        };
        let body = job_body(&mut rng, &job_id, &machines, i);
        let s = Submission {
            job_id: job_id.clone(),
            machines: machines.clone(),
            reuse: reuse.is_some(),
            ..Default::default()
        };
        let s = submit(&w, &body, s).await;
        w.say(&format!(
            "job {job_id}{} -> {:?}: {} after {} attempt(s) {:?}",
            if s.reuse { " (re-used id)" } else { "" },
            s.machines,
            s.outcome,
            s.attempts.len(),
            s.answers
                .iter()
                .map(|(m, st, c)| format!(
                    "{m}:{st}{}",
                    if c.is_empty() {
                        String::new()
                    } else {
                        format!("/{c}")
                    }
                ))
                .collect::<Vec<_>>()
        ));
        w.submissions.lock().unwrap().push(s);
        // Pacing, as users submit: not a synchronisation.
        tokio::time::sleep(rng.millis(1200, 2800)).await;
    }
    w.submitting_done.store(true, Ordering::SeqCst);
}

// ---- the chaos ----

/// Waits (at most 10 s) for the next submission attempt to go out, then `delay` more.
async fn aim_at_submission(w: &World, delay: Duration) {
    if tokio::time::timeout(Duration::from_secs(10), w.post_started.notified())
        .await
        .is_ok()
    {
        tokio::time::sleep(delay).await;
        w.say(&format!("(aimed {delay:?} into a submission)"));
    }
}

async fn restart_nats(w: &World, down_for: Duration) {
    let nats = w.nats.clone();
    let i = w.down(Kind::Nats, "nats");
    w.say(&format!("CHAOS nats-server SIGKILL, back in {down_for:?}"));
    {
        let nats = nats.clone();
        tokio::task::spawn_blocking(move || nats.lock().unwrap().stop())
            .await
            .unwrap();
    }
    tokio::time::sleep(down_for).await;
    within(
        "nats-server restart",
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || nats.lock().unwrap().restart()),
    )
    .await
    .expect("nats-server restarts");
    w.up(i);
    w.say("nats-server back");
}

async fn restart_central(w: &World, down_for: Duration) {
    let i = w.down(Kind::Central, "central");
    w.say(&format!("CHAOS central kill -9, back in {down_for:?}"));
    w.fleet.lock().unwrap().central.proc.kill9();
    tokio::time::sleep(down_for).await;
    w.fleet.lock().unwrap().central.proc.spawn();
    w.up(i);
    let healthy = central_healthy(&w.http, &w.base, Duration::from_secs(60)).await;
    assert!(
        healthy,
        "central did not come back within 60 s: {}",
        w.fleet.lock().unwrap().central.proc.log_tail(30)
    );
    w.say("central back and healthy");
}

#[derive(Default, Debug)]
struct Kills {
    agent: u32,
    nats: u32,
    central: u32,
}

async fn chaos(w: Arc<World>, seed: u64) -> Kills {
    let mut rng = Rng::new(seed);
    let mut kills = Kills::default();
    // Agents down, with the time they come back and their outage index.
    let mut pending: Vec<(String, Instant, usize)> = Vec::new();
    // The first three actions are one of each kind, in a random order, so that every run has
    // them all; then each is drawn (agent 40%, NATS 25%, central 35%).
    let mut first: Vec<f64> = vec![0.2, 0.5, 0.8];
    for i in (1..first.len()).rev() {
        first.swap(i, rng.range(0, i as u64) as usize);
    }
    loop {
        let next_action = Instant::now() + rng.millis(2500, 6500);
        loop {
            let due = pending.iter().map(|p| p.1).min();
            match due {
                Some(t) if t <= next_action => {
                    tokio::time::sleep_until(t.into()).await;
                    let k = pending.iter().position(|p| p.1 == t).unwrap();
                    let (m, _, i) = pending.remove(k);
                    w.fleet.lock().unwrap().agents.get_mut(&m).unwrap().spawn();
                    w.up(i);
                    w.say(&format!("agent {m} started again"));
                }
                _ => {
                    tokio::time::sleep_until(next_action.into()).await;
                    break;
                }
            }
        }
        if w.submitting_done.load(Ordering::SeqCst) {
            break;
        }
        let up: Vec<&str> = FLAKY
            .iter()
            .copied()
            .filter(|m| !pending.iter().any(|p| p.0 == *m))
            .collect();
        let roll = first.pop().unwrap_or_else(|| rng.unit());
        // Half the kills are aimed into a dispatch: a few ms after a submission goes out.
        let aim = rng.chance(0.5);
        let aim_delay = rng.millis(0, 6);
        if roll < 0.4 && !up.is_empty() {
            let m = rng.pick(&up).to_string();
            let back = rng.millis(800, 9000);
            if aim {
                aim_at_submission(&w, aim_delay).await;
            }
            let i = w.down(Kind::Agent, &m);
            w.fleet.lock().unwrap().agents.get_mut(&m).unwrap().kill9();
            kills.agent += 1;
            w.say(&format!("CHAOS agent {m} kill -9, back in {back:?}"));
            pending.push((m, Instant::now() + back, i));
        } else if roll < 0.65 {
            kills.nats += 1;
            let d = rng.millis(300, 3000);
            restart_nats(&w, d).await;
        } else {
            kills.central += 1;
            let d = rng.millis(300, 3000);
            if aim {
                aim_at_submission(&w, aim_delay).await;
            }
            restart_central(&w, d).await;
        }
    }
    for (m, _, i) in pending {
        w.fleet.lock().unwrap().agents.get_mut(&m).unwrap().spawn();
        w.up(i);
        w.say(&format!("agent {m} started again (chaos over)"));
    }
    kills
}

// ---- the accounting ----

/// One run (or a machine that never started one) as the index shows it.
#[derive(Clone, Debug)]
struct RunView {
    job_id: String,
    machine: String,
    run_id: String,
    status: String,
    code: String,
    message: String,
}

fn runs_of(doc: &Value) -> Vec<RunView> {
    let mut out = Vec::new();
    let job_id = doc["job_id"].as_str().unwrap_or("?").to_string();
    for m in doc["machines"].as_array().cloned().unwrap_or_default() {
        let machine = m["machine_id"].as_str().unwrap_or("?").to_string();
        let view = |r: &Value| RunView {
            job_id: job_id.clone(),
            machine: machine.clone(),
            run_id: r["run_id"].as_str().unwrap_or("").to_string(),
            status: r["status"].as_str().unwrap_or("?").to_string(),
            code: r["error"]["code"].as_str().unwrap_or("").to_string(),
            message: r["error"]["message"].as_str().unwrap_or("").to_string(),
        };
        for e in m["earlier_runs"].as_array().cloned().unwrap_or_default() {
            out.push(view(&e));
        }
        out.push(view(&m));
    }
    out
}

/// Per run in the stream: seqs (with repeats), first and last agent time, last event type.
#[derive(Default, Debug)]
struct StreamRun {
    seqs: Vec<u64>,
    first_ts: u64,
    last_ts: u64,
    last_type: String,
}

fn overlaps(o: &Outage, from: u64, to: u64, after_up_ms: u64) -> bool {
    let up = o.up_ms.unwrap_or(u64::MAX).saturating_add(after_up_ms);
    o.down_ms <= to && up >= from
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_accounts_for_every_run() {
    let seed = seed_from_env("CHAOS_SEED");
    eprintln!("chaos seed: {seed} (replay the same choices with CHAOS_SEED={seed})");
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("chaos-").tempdir().unwrap();
    // BENCH_KEEP_TMP=1 keeps the logs, configs and results for a post-mortem.
    let dir = if std::env::var_os("BENCH_KEEP_TMP").is_some() {
        let kept = dir.keep();
        eprintln!("keeping {}", kept.display());
        KeepOrTemp::Kept(kept)
    } else {
        KeepOrTemp::Temp(dir)
    };
    let nats = NatsServer::start();
    let url = nats.url();
    let central = Central::new(
        dir.path(),
        &url,
        &format!(
            "stall_timeout_s: {STALL_TIMEOUT_S}\nbroadcast_window_s: 1\nrequest_timeout_s: 3\nnats_wait_s: 120\n"
        ),
    );
    let base = central.base();
    let agents: BTreeMap<String, Proc> = MACHINES
        .iter()
        .map(|m| (m.to_string(), agent(dir.path(), m, &url, 60.0, 30, 0)))
        .collect();
    let w = Arc::new(World {
        fleet: Mutex::new(Fleet { central, agents }),
        nats: Arc::new(Mutex::new(nats)),
        outages: Mutex::new(Vec::new()),
        submissions: Mutex::new(Vec::new()),
        submitting_done: AtomicBool::new(false),
        post_started: tokio::sync::Notify::new(),
        wrong: Mutex::new(Vec::new()),
        t0,
        http: Http::new(Duration::from_secs(20)),
        base: base.clone(),
    });
    {
        let mut f = w.fleet.lock().unwrap();
        f.central.proc.spawn();
        for a in f.agents.values_mut() {
            a.spawn();
        }
    }
    assert!(
        central_healthy(&w.http, &base, Duration::from_secs(30)).await,
        "central did not start: {}",
        w.fleet.lock().unwrap().central.proc.log_tail(30)
    );
    assert!(
        machines_online(&w.http, &base, &MACHINES, Duration::from_secs(30)).await,
        "agents did not come online: {}",
        w.fleet.lock().unwrap().agents[STEADY].log_tail(30)
    );
    w.say("fleet up: nats-server, central, 3 agents");

    let sub = tokio::spawn(submitter(w.clone(), seed));
    let cha = tokio::spawn(chaos(w.clone(), seed));
    within("submissions", Duration::from_secs(150), sub)
        .await
        .expect("submitter");
    let kills = within("chaos winds down", Duration::from_secs(60), cha)
        .await
        .expect("chaos task");
    w.say(&format!(
        "chaos over: {kills:?}; waiting for everything to settle"
    ));

    // Everything back: central healthy on a connected NATS, every agent heart-beating.
    assert!(
        central_healthy(&w.http, &base, Duration::from_secs(60)).await,
        "central not healthy after the chaos"
    );
    assert!(
        machines_online(&w.http, &base, &MACHINES, Duration::from_secs(30)).await,
        "agents not back online after the chaos"
    );

    let subs = w.submissions.lock().unwrap().clone();
    // What the submitter saw accepted, per (job, machine).
    let mut accepted: BTreeMap<(String, String), u32> = BTreeMap::new();
    for s in &subs {
        for (m, st, _) in &s.answers {
            if st == "accepted" {
                *accepted.entry((s.job_id.clone(), m.clone())).or_default() += 1;
            }
        }
    }
    let submitted: BTreeSet<String> = subs.iter().map(|s| s.job_id.clone()).collect();

    // Settled: every job finished, and every acceptance seen is a recorded run. Bounded: the
    // slowest path is a run queued on a killed agent (stall timeout) behind an interrupted
    // dispatch (its deadline, ~13 s) behind a queue of jobs.
    let settled = poll(
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async {
            let (s, list) = w
                .http
                .get(&format!("{base}/api/jobs?limit=500"))
                .await
                .ok()?;
            if s != 200 {
                return None;
            }
            let mut ids: BTreeSet<String> = list["jobs"]
                .as_array()?
                .iter()
                .filter_map(|j| j["job_id"].as_str().map(str::to_string))
                .collect();
            ids.extend(submitted.iter().cloned());
            let mut docs = BTreeMap::new();
            for id in ids {
                let (s, doc) = w.http.get(&format!("{base}/api/jobs/{id}")).await.ok()?;
                if s == 404 {
                    continue;
                }
                if s != 200 || doc["status"] == "running" {
                    return None;
                }
                docs.insert(id, doc);
            }
            let runs_recorded = |job: &str, m: &str| {
                docs.get(job).map_or(0, |d| {
                    runs_of(d)
                        .iter()
                        .filter(|r| r.machine == m && !r.run_id.is_empty())
                        .count() as u32
                })
            };
            accepted
                .iter()
                .all(|((j, m), n)| runs_recorded(j, m) >= *n)
                .then_some(docs)
        },
    )
    .await;
    let docs = match settled {
        Some(d) => d,
        None => {
            let mut report = String::new();
            let mut docs = BTreeMap::new();
            for id in &submitted {
                match w.http.get(&format!("{base}/api/jobs/{id}")).await {
                    Ok((200, doc)) => {
                        if doc["status"] == "running" {
                            report.push_str(&format!("\n  {id} running: {}", summary_of(&doc)));
                        }
                        docs.insert(id.clone(), doc);
                    }
                    other => report.push_str(&format!("\n  {id}: GET {other:?}")),
                }
            }
            for ((j, m), n) in &accepted {
                let runs: Vec<RunView> = docs
                    .get(j)
                    .map(runs_of)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| &r.machine == m && !r.run_id.is_empty())
                    .collect();
                if runs.len() < *n as usize {
                    let when: Vec<String> = subs
                        .iter()
                        .filter(|s| {
                            &s.job_id == j
                                && s.answers.iter().any(|a| &a.0 == m && a.1 == "accepted")
                        })
                        .map(|s| format!("+{:.3}s", rel(&w, s.attempts.last().map_or(0, |a| a.0))))
                        .collect();
                    report.push_str(&format!(
                        "\n  {j} on {m}: accepted {n}x (submitted at {when:?}) but {} run(s) recorded: {:?}",
                        runs.len(),
                        runs.iter().map(|r| format!("{} {}", r.run_id, r.status)).collect::<Vec<_>>()
                    ));
                }
            }
            let kills: Vec<String> = w
                .outages
                .lock()
                .unwrap()
                .iter()
                .map(|o| format!("{:?} {} +{:.3}s", o.kind, o.target, rel(&w, o.down_ms)))
                .collect();
            report.push_str(&format!("\n  outages: {kills:?}"));
            dump_logs(&w);
            panic!("not settled within 90 s after the chaos:{report}");
        }
    };
    w.say(&format!("settled: {} jobs", docs.len()));

    let mut problems: Vec<String> = Vec::new();
    let outages = w.outages.lock().unwrap().clone();

    // ---- the stream ----
    let nc = bench_nats::harness::client(&url).await;
    let stored = read_stream(&nc).await;
    let mut stream_runs: BTreeMap<(String, String, String), StreamRun> = BTreeMap::new();
    let mut refusal_events = 0;
    let mut per_job_stored: BTreeMap<String, usize> = BTreeMap::new();
    for m in &stored {
        let e = &m.event;
        let job = e["job_id"].as_str().unwrap_or("?").to_string();
        *per_job_stored.entry(job.clone()).or_default() += 1;
        if m.subject != format!("bench.events.{job}") {
            problems.push(format!(
                "stream seq {}: subject {} for job {job}",
                m.stream_seq, m.subject
            ));
        }
        let seq = e["seq"].as_u64().unwrap_or(0);
        if seq == 0 {
            refusal_events += 1;
            continue;
        }
        let key = (
            job,
            e["machine_id"].as_str().unwrap_or("?").to_string(),
            e["run_id"].as_str().unwrap_or("").to_string(),
        );
        // Signed by a real agent: the start of its signature ends the id.
        let want_id = bench_schemas::subjects::signed_msg_id(
            &format!("{}.{}.{}.{seq}", key.0, key.1, key.2),
            m.signature.as_deref().unwrap_or(""),
        );
        if m.msg_id.as_deref() != Some(want_id.as_str()) {
            problems.push(format!(
                "stream seq {}: Nats-Msg-Id {:?}, expected {want_id}",
                m.stream_seq, m.msg_id
            ));
        }
        let ts = e["ts_ms"].as_u64().unwrap_or(0);
        let r = stream_runs.entry(key).or_default();
        if r.seqs.is_empty() {
            r.first_ts = ts;
        }
        r.first_ts = r.first_ts.min(ts);
        if r.seqs.iter().all(|s| *s < seq) {
            r.last_type = e["type"].as_str().unwrap_or("?").to_string();
        }
        r.last_ts = r.last_ts.max(ts);
        r.seqs.push(seq);
    }
    let mut duplicates = 0;
    let mut gap_report = Vec::new();
    for ((j, m, run), r) in &stream_runs {
        let mut s = r.seqs.clone();
        s.sort();
        let n = s.len();
        s.dedup();
        if s.len() != n {
            duplicates += n - s.len();
            problems.push(format!(
                "{j} on {m} run {run}: {} event(s) stored twice",
                n - s.len()
            ));
        }
        let max = *s.last().unwrap();
        let gaps = max - s.len() as u64;
        if gaps > 0 {
            gap_report.push(format!(
                "{j} on {m} run {run}: {gaps} seq(s) missing below {max}"
            ));
        }
    }

    // ---- the index: every run finished, failures named and explained ----
    let mut all_runs: Vec<RunView> = Vec::new();
    for doc in docs.values() {
        all_runs.extend(runs_of(doc));
    }
    let mut done = 0;
    let mut failed_by_code: BTreeMap<String, u32> = BTreeMap::new();
    let mut never_ran_by_code: BTreeMap<String, u32> = BTreeMap::new();
    let mut explained: Vec<String> = Vec::new();
    // Runs known only from their accept (the agent died before storing an event).
    let mut killed_before_first_event: BTreeSet<(String, String, String)> = BTreeSet::new();
    for r in &all_runs {
        if !["done", "failed", "cancelled"].contains(&r.status.as_str()) {
            problems.push(format!(
                "{} on {}: run {:?} still {}",
                r.job_id, r.machine, r.run_id, r.status
            ));
            continue;
        }
        if r.run_id.is_empty() {
            // Never started a run: the submission that put it there was answered offline (or
            // timeout) for this machine, or its dispatch was cut short by an outage.
            *never_ran_by_code.entry(r.code.clone()).or_default() += 1;
            let mine = subs.iter().filter(|s| s.job_id == r.job_id);
            let answered = mine.clone().any(|s| {
                s.answers
                    .iter()
                    .any(|(m, st, c)| m == &r.machine && st != "accepted" && c == &r.code)
            });
            let cut_short = r.code == "dispatch_interrupted"
                && mine.clone().any(|s| {
                    s.outcome == "interrupted" || explain_attempts(&outages, s, None).is_some()
                });
            // Central recorded the machine's answer (offline: its agent or NATS was away) and
            // was killed before it could pass the answers on: the submitter saw none.
            let answer_lost = ["offline", "timeout", "nats_unavailable"].contains(&r.code.as_str())
                && mine.clone().any(|s| {
                    s.outcome == "interrupted"
                        && s.answers.is_empty()
                        && explain_attempts_by(
                            &outages,
                            s,
                            Some(&r.machine),
                            &[Kind::Agent, Kind::Nats],
                        )
                        .is_some()
                });
            if answered || cut_short || answer_lost {
                explained.push(format!(
                    "{} on {}: never ran ({}), {}",
                    r.job_id,
                    r.machine,
                    r.code,
                    if answered {
                        "as the submission's answer said"
                    } else if cut_short {
                        "its dispatch cut short by central or NATS going away"
                    } else {
                        "as central recorded while its agent (or NATS) was away; central was killed before it answered the submission"
                    }
                ));
            } else {
                problems.push(format!(
                    "{} on {}: never ran, {} ({}), which no submission's answer or outage explains",
                    r.job_id, r.machine, r.code, r.message
                ));
            }
            continue;
        }
        if r.status == "done" {
            done += 1;
            let key = (r.job_id.clone(), r.machine.clone(), r.run_id.clone());
            match stream_runs.get(&key) {
                Some(s) => {
                    let mut q = s.seqs.clone();
                    q.sort();
                    q.dedup();
                    let max = *q.last().unwrap();
                    if max != q.len() as u64 || s.last_type != "job_done" {
                        problems.push(format!(
                            "{} on {} run {}: done, but its stored events are {} of 1..{max}, last {}",
                            r.job_id, r.machine, r.run_id, q.len(), s.last_type
                        ));
                    }
                }
                None => problems.push(format!(
                    "{} on {} run {}: done, but none of its events is in the stream",
                    r.job_id, r.machine, r.run_id
                )),
            }
            continue;
        }
        *failed_by_code.entry(r.code.clone()).or_default() += 1;
        if r.machine == STEADY {
            problems.push(format!(
                "{} on {STEADY} (never touched) run {}: {} {} ({})",
                r.job_id, r.run_id, r.status, r.code, r.message
            ));
            continue;
        }
        if !NAMED.contains(&r.code.as_str()) {
            problems.push(format!(
                "{} on {} run {}: {} with an unexpected code {:?} ({})",
                r.job_id, r.machine, r.run_id, r.status, r.code, r.message
            ));
            continue;
        }
        let key = (r.job_id.clone(), r.machine.clone(), r.run_id.clone());
        let stored = stream_runs.get(&key);
        let (first, last) = stored
            .map(|s| (s.first_ts, s.last_ts))
            .unwrap_or((0, u64::MAX));
        // Its agent was killed while the run was alive: begun before, silent after. A run with
        // no stored event at all is known from the agent's answer alone: its agent was killed
        // between answering a submission of this job and storing the run's first event.
        let why = outages.iter().find(|o| {
            o.kind == Kind::Agent
                && o.target == r.machine
                && match stored {
                    Some(_) => {
                        first <= o.down_ms + 1000
                            && last <= o.down_ms + 1000
                            && last + 60_000 >= o.down_ms
                    }
                    None => subs.iter().any(|s| {
                        s.job_id == r.job_id
                            && s.answers
                                .iter()
                                .any(|(m, st, _)| m == &r.machine && st == "accepted")
                            && s.attempts.last().is_some_and(|&(start, end)| {
                                o.down_ms + 1000 >= start && o.down_ms <= end + 1000
                            })
                    }),
                }
        });
        match why {
            Some(o) => {
                if stored.is_none() {
                    killed_before_first_event.insert(key.clone());
                }
                explained.push(format!(
                    "{} on {} run {}: {} ; agent killed at +{:.1}s{}",
                    r.job_id,
                    r.machine,
                    r.run_id,
                    r.code,
                    rel(&w, o.down_ms),
                    if stored.is_none() {
                        ", as it answered the submission (no event of the run stored)"
                    } else {
                        ""
                    }
                ))
            }
            None => problems.push(format!(
                "{} on {} run {}: {} {} ({}) but its agent was not killed while it ran (events +{:.1}s..+{:.1}s)",
                r.job_id, r.machine, r.run_id, r.status, r.code, r.message, rel(&w, first), rel(&w, last)
            )),
        }
    }
    // Every answer other than accepted came while its machine, NATS or central was away.
    for s in &subs {
        for (m, st, c) in s.answers.iter().filter(|a| a.1 != "accepted") {
            match explain_attempts(&outages, s, Some(m)) {
                Some(o) => explained.push(format!(
                    "{} answered {st}/{c} for {m}: {:?} {} down at +{:.1}s",
                    s.job_id,
                    o.kind,
                    o.target,
                    rel(&w, o.down_ms)
                )),
                None if c == "duplicate_job" => explained.push(format!(
                    "{} answered {st}/{c} for {m}: a re-submission while the agent still ran it",
                    s.job_id
                )),
                None => problems.push(format!(
                    "{} answered {st}/{c} for {m} while nothing was down",
                    s.job_id
                )),
            }
        }
    }
    // Every acceptance the submitter saw is a run.
    for ((j, m), n) in &accepted {
        let recorded = all_runs
            .iter()
            .filter(|r| &r.job_id == j && &r.machine == m && !r.run_id.is_empty())
            .count() as u32;
        if recorded < *n {
            problems.push(format!(
                "{j} on {m}: accepted {n} time(s) but {recorded} run(s) recorded"
            ));
        }
    }
    // The stream's runs and the index's runs are the same.
    let indexed: BTreeSet<(String, String, String)> = all_runs
        .iter()
        .filter(|r| !r.run_id.is_empty())
        .map(|r| (r.job_id.clone(), r.machine.clone(), r.run_id.clone()))
        .collect();
    let in_stream: BTreeSet<(String, String, String)> = stream_runs.keys().cloned().collect();
    for k in in_stream.difference(&indexed) {
        problems.push(format!("run {k:?} is in the stream but not in the index"));
    }
    for k in indexed
        .difference(&in_stream)
        .filter(|k| !killed_before_first_event.contains(*k))
    {
        problems.push(format!("run {k:?} is in the index but has no stored event"));
    }

    // ---- results files ----
    let results = w.fleet.lock().unwrap().central.results.clone();
    let ids: Vec<String> = docs.keys().cloned().collect();
    let last_mismatch: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mismatched = poll(
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let mut bad = Vec::new();
            for id in &ids {
                let dir = results.join("runs").join(id);
                let Ok((200, mut doc)) = w.http.get(&format!("{base}/api/jobs/{id}")).await else {
                    bad.push(format!("{id}: GET failed"));
                    continue;
                };
                // `previous` and `regression` (each machine's earlier jobs) are looked up
                // across jobs when the API answers; the results files hold the job itself.
                if let Some(ms) = doc["machines"].as_array_mut() {
                    for m in ms {
                        if let Some(m) = m.as_object_mut() {
                            m.remove("previous");
                            m.remove("regression");
                        }
                    }
                }
                let summary: Value = match std::fs::read(dir.join("summary.json")) {
                    Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                    Err(e) => {
                        bad.push(format!("{id}: no summary.json ({e})"));
                        continue;
                    }
                };
                if let Some(d) = first_diff(&summary, &doc, "") {
                    bad.push(format!(
                        "{id}: summary.json differs from GET /api/jobs/{id} at {d}"
                    ));
                    continue;
                }
                let meta: Value = std::fs::read(dir.join("metadata.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                let runs = |v: &Value| -> Vec<(String, String)> {
                    v["machines"]
                        .as_array()
                        .map(|ms| {
                            ms.iter()
                                .map(|m| {
                                    (
                                        m["machine_id"].as_str().unwrap_or("").to_string(),
                                        m["run_id"].as_str().unwrap_or("").to_string(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                };
                if runs(&meta) != runs(&doc) {
                    bad.push(format!(
                        "{id}: metadata.json runs {:?} vs index {:?}",
                        runs(&meta),
                        runs(&doc)
                    ));
                    continue;
                }
                let lines = std::fs::read_to_string(dir.join("events.ndjson"))
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                let want = per_job_stored.get(id).copied().unwrap_or(0);
                if lines != want {
                    bad.push(format!(
                        "{id}: events.ndjson has {lines} lines, the stream {want} events"
                    ));
                }
            }
            if bad.is_empty() {
                Some(())
            } else {
                // Kept for the report, should the files never catch up.
                *last_mismatch.lock().unwrap() = bad;
                None
            }
        },
    )
    .await;
    if mismatched.is_none() {
        for b in last_mismatch.lock().unwrap().iter() {
            problems.push(format!("results: {b}"));
        }
    }

    // ---- verdicts central took back: a run failed by the stall loop that went on to finish ----
    {
        let log =
            std::fs::read_to_string(&w.fleet.lock().unwrap().central.proc.log).unwrap_or_default();
        let mut verdicts: BTreeMap<(String, String, String), u32> = BTreeMap::new();
        for line in log.lines().filter(|l| l.contains("bench_central::stall:")) {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|t| t.strip_prefix(&format!("{k}=")))
                    .map(|v| v.trim_matches('"').to_string())
            };
            if let (Some(j), Some(m), Some(c)) =
                (field("job_id"), field("machine_id"), field("code"))
            {
                *verdicts.entry((j, m, c)).or_default() += 1;
            }
        }
        for ((j, m, c), n) in &verdicts {
            let kept = all_runs
                .iter()
                .filter(|r| &r.job_id == j && &r.machine == m && &r.code == c)
                .count() as u32;
            if *n > kept {
                let at = stream_runs
                    .iter()
                    .filter(|((sj, sm, _), _)| sj == j && sm == m)
                    .map(|(_, r)| {
                        format!(
                            "events +{:.1}s..+{:.1}s",
                            rel(&w, r.first_ts),
                            rel(&w, r.last_ts)
                        )
                    })
                    .collect::<Vec<_>>();
                let nats: Vec<String> = outages
                    .iter()
                    .filter(|o| o.kind == Kind::Nats)
                    .map(|o| {
                        format!(
                            "+{:.1}s..+{:.1}s",
                            rel(&w, o.down_ms),
                            rel(&w, o.up_ms.unwrap_or(0))
                        )
                    })
                    .collect();
                let bug = format!(
                    "{j} on {m}: central failed a run {c} ({n}x) that went on to finish ({at:?}); NATS was down {nats:?}"
                );
                problems.push(format!("false verdict: {bug}"));
            }
        }
    }

    // ---- every process still up ----
    {
        let mut f = w.fleet.lock().unwrap();
        if let Some(st) = f.central.proc.exited() {
            problems.push(format!("central exited: {st}"));
        }
        for (m, a) in f.agents.iter_mut() {
            if let Some(st) = a.exited() {
                problems.push(format!("agent {m} exited: {st}"));
            }
        }
        let logs = std::iter::once(&f.central.proc).chain(f.agents.values());
        for p in logs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                problems.push(format!("{} panicked: {line}", p.name));
            }
        }
    }

    // ---- the counts ----
    let retried: Vec<&Submission> = subs.iter().filter(|s| s.attempts.len() > 1).collect();
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    for s in &subs {
        *outcomes.entry(s.outcome.clone()).or_default() += 1;
        for (_, st, c) in &s.answers {
            let k = if c.is_empty() {
                st.clone()
            } else {
                format!("{st}/{c}")
            };
            *answers.entry(k).or_default() += 1;
        }
    }
    let runs_total = all_runs.iter().filter(|r| !r.run_id.is_empty()).count();
    eprintln!(
        "---- chaos run, seed {seed}, {:.1} s ----",
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "kills: agent {} (kill -9), nats-server {} (SIGKILL + restart), central {} (kill -9)",
        kills.agent, kills.nats, kills.central
    );
    eprintln!(
        "submissions: {} ({} re-using an id), outcomes {outcomes:?}; retried {} (extra attempts {}), reasons {:?}",
        subs.len(),
        subs.iter().filter(|s| s.reuse).count(),
        retried.len(),
        retried.iter().map(|s| s.attempts.len() - 1).sum::<usize>(),
        retried.iter().flat_map(|s| s.failures.iter().map(|f| f.split(':').next().unwrap_or("").to_string())).collect::<BTreeSet<_>>()
    );
    eprintln!("machine answers: {answers:?}");
    eprintln!(
        "jobs: {}; runs: {runs_total}; done {done}; failed by code {failed_by_code:?}; never ran by code {never_ran_by_code:?}",
        docs.len()
    );
    eprintln!(
        "events checked: {} stored ({} refusals outside runs), {} runs in the stream, duplicates {duplicates}, runs with gaps {}",
        stored.len(),
        refusal_events,
        stream_runs.len(),
        gap_report.len()
    );
    for g in &gap_report {
        eprintln!("  gap: {g}");
    }
    for e in &explained {
        eprintln!("  explained: {e}");
    }
    problems.extend(w.wrong.lock().unwrap().iter().cloned());
    if !problems.is_empty() {
        dump_logs(&w);
        panic!(
            "chaos seed {seed}: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
}

/// The test's folder: removed at the end, or kept (`BENCH_KEEP_TMP`).
enum KeepOrTemp {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl KeepOrTemp {
    fn path(&self) -> &std::path::Path {
        match self {
            Self::Temp(d) => d.path(),
            Self::Kept(p) => p,
        }
    }
}

/// An outage that overlaps one of the submission's attempts: NATS or central, or the agent of
/// `machine` (agents need a few seconds after a start or a NATS restart to answer again).
fn explain_attempts<'a>(
    outages: &'a [Outage],
    s: &Submission,
    machine: Option<&str>,
) -> Option<&'a Outage> {
    explain_attempts_by(
        outages,
        s,
        machine,
        &[Kind::Agent, Kind::Nats, Kind::Central],
    )
}

/// [`explain_attempts`] by an outage of one of `kinds` only.
fn explain_attempts_by<'a>(
    outages: &'a [Outage],
    s: &Submission,
    machine: Option<&str>,
    kinds: &[Kind],
) -> Option<&'a Outage> {
    outages.iter().find(|o| {
        let relevant = kinds.contains(&o.kind)
            && match o.kind {
                Kind::Agent => machine == Some(o.target.as_str()),
                Kind::Nats | Kind::Central => true,
            };
        relevant
            && s.attempts
                .iter()
                .any(|(a, b)| overlaps(o, a.saturating_sub(500), b + 500, 5000))
    })
}

fn rel(w: &World, ms: u64) -> f64 {
    let start = now_ms() - w.t0.elapsed().as_millis() as u64;
    (ms as f64 - start as f64) / 1000.0
}

fn summary_of(doc: &Value) -> String {
    doc["machines"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    format!(
                        "{}:{} run {:?} last_seq {} {}",
                        m["machine_id"].as_str().unwrap_or("?"),
                        m["status"].as_str().unwrap_or("?"),
                        m["run_id"].as_str().unwrap_or(""),
                        m["last_seq"],
                        m["error"]["code"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn dump_logs(w: &World) {
    let f = w.fleet.lock().unwrap();
    eprintln!(
        "---- central log (tail) ----\n{}",
        f.central.proc.log_tail(40)
    );
    for (m, a) in &f.agents {
        eprintln!("---- agent {m} log (tail) ----\n{}", a.log_tail(15));
    }
}
