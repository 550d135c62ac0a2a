//! Fan-out benchmark (not a test): N lightweight agents (mock engine, one NATS connection
//! each, as N machines would have) on a real nats-server; broadcast requests on
//! `bench.jobs.all`, selecting them by a label (a job of one size whatever the fleet's) and by
//! a list of their N ids (a job that grows with the fleet); measures publish -> last accept
//! and publish -> last `job_done`, beside the floor this machine sets: the same broadcast (same
//! size) answered at once by N bare NATS clients, in the same run; and the floor of the wire
//! contract itself: the same bare clients answering with an agent's own reply and storing its
//! own `job_accepted` (headers and payload as an agent sent them, on a connection of their own,
//! awaiting JetStream's ack), so what the agents add to the protocol's cost is plain.
//!
//! The submitter runs on a thread and runtime of its own, as central or the `nats` CLI would in
//! a process of its own (on the agents' runtime its reads would queue behind 500 agents' tasks,
//! and the bench would measure that queue). Every broadcast starts on a settled fleet: each
//! agent's registry entry says idle again after the previous job (those stores come a moment
//! after a job's end, see `heartbeat::STATUS_COALESCE`).
//!
//!   cargo bench -p bench-agent --bench fanout -- 1 10 100 500     (scripts/bench fanout)
//!   options: --repeat R (3): broadcasts per selector after the fleet's first one (shown apart:
//!   every agent's first job also pays for memory its process touches the first time); the
//!   table shows their median and worst, and the target is judged on the worst
//!   FANOUT_TOGETHER=1: the job starts together 1.5 s after its publish (`start: together`),
//!   so no agent runs it while the accepts come (what the jobs' own events cost the accepts)
//!   FANOUT_PERF_CTL=<fifo>: drives `perf record --control=fifo:<fifo> -D -1 -- <bench>` to
//!   record from each broadcast's publish to its last accept (the fleet's first job only, with
//!   FANOUT_PERF_FIRST=1; else every later one)

use async_nats::{jetstream, HeaderMap};
use bench_agent::config::{Config, Env};
use bench_agent::LocalAgent;
use bench_nats::harness::NatsServer;
use bench_schemas::{subjects, AgentInfo, AgentStatus, Event, JobReply};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
/// The fleet size and the ceiling of issue 12's target: publish -> last accept.
const TARGET_AGENTS: usize = 500;
const TARGET: Duration = Duration::from_millis(100);
const BARE_SUBJECT: &str = "bench.fanout.bare";
/// On a protocol-floor broadcast: the subject each bare client stores its event on.
const EVENT_SUBJECT_HEADER: &str = "Fanout-Event-Subject";

/// What an agent sent for a broadcast: its answer, and its `job_accepted` as stored.
#[derive(Clone)]
struct Wire {
    reply: bytes::Bytes,
    headers: HeaderMap,
    event: bytes::Bytes,
}

/// One broadcast to the agents.
struct Run {
    /// Publish -> last accept.
    accept: Duration,
    /// Publish -> last `job_done`.
    done: Duration,
    /// Publish -> the last agent's `job_accepted`, by its own clock (ms): when the last agent
    /// took the job, against when its answer arrived.
    took_ms: i64,
}

/// What one selector measured.
struct Row {
    /// Publish -> last answer of the bare clients.
    floor: Duration,
    /// Publish -> last answer of the bare clients sending the agents' wire messages, `repeat`
    /// times.
    protocol: Vec<Duration>,
    /// The size of the `job_accepted` they stored (payload, headers).
    event_bytes: (usize, usize),
    /// Each broadcast to the agents: the first one (the first such job the fleet takes)
    /// followed by `repeat` more.
    runs: Vec<Run>,
}

/// What one round measured.
struct Round {
    startup: Duration,
    /// Per selector: label, ids.
    rows: [Row; 2],
}

/// Starts `n` agents (labelled with their round) and `n` bare clients; broadcasts `repeat`
/// times by label and then by a list of the agents' ids.
async fn round(nats: &NatsServer, n: usize, repeat: usize) -> Round {
    let started = Instant::now();
    let mut agents = Vec::new();
    for i in 0..n {
        let yaml = format!(
            "machine_id: fan-{n}-{i}\nengine: mock\nmock: {{tokens_per_s: 2000, ttft_ms: 1}}\nllm_models: [mock-7b]\nbind_port: 0\nheartbeat_s: 5\nlabels: {{round: \"r{n}\"}}\ntelemetry: {{enabled: false}}\n"
        );
        let env: Env = [("NATS_URL".to_string(), nats.url())].into();
        let cfg = Config::parse(&yaml, Path::new("bench.yaml"), &env).expect("config");
        agents.push(LocalAgent::start(cfg).await.expect("agent"));
    }
    let startup = started.elapsed();
    let bare = BareFleet::start(nats, n).await;
    let (wire, mut stored) = (bare.wire.clone(), bare.stored.subscribe());
    let url = nats.url();
    let rows = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = async_nats::connect(url.clone()).await.unwrap();
            // The job's events are watched on a connection of their own, as `nats sub` in
            // another terminal would: on the submitter's, the answers queued behind them in
            // the same socket (one sent at 66 ms arrived at 217 ms in a slow stretch).
            let watch = async_nats::connect(url).await.unwrap();
            let kv = jetstream::new(c.clone())
                .get_key_value(subjects::AGENTS_BUCKET)
                .await
                .unwrap();
            let mut rows = Vec::new();
            let mut ended = HashMap::new();
            for by_ids in [false, true] {
                let floor = bare_broadcast(&c, n, &job(n, by_ids, "bare"), None).await;
                let mut runs = Vec::new();
                let mut sent = None;
                for r in 0..=repeat {
                    let job_id = format!("fanout-{n}-{}-{r}", if by_ids { "ids" } else { "label" });
                    settled(&kv, n, &ended).await;
                    // Profiled (FANOUT_PERF_CTL): the fleet's first job with FANOUT_PERF_FIRST,
                    // else every later one.
                    let profiled = (r == 0) == std::env::var_os("FANOUT_PERF_FIRST").is_some();
                    let (run, done_at, w) =
                        broadcast(&c, &watch, n, &job(n, by_ids, &job_id), &job_id, profiled).await;
                    runs.push(run); // [0]: the fleet's first job of this kind
                    ended = done_at;
                    sent = Some(w);
                }
                // The protocol's floor: the bare clients answer as the agents did and store
                // what they stored, on the same server, the agents idle.
                let sent = sent.expect("a broadcast");
                let event_bytes = (sent.event.len(), header_bytes(&sent.headers));
                *wire.lock().unwrap() = Some(sent);
                settled(&kv, n, &ended).await;
                let mut protocol = Vec::new();
                for r in 0..repeat {
                    let id = format!(
                        "fanout-{n}-{}-protocol-{r}",
                        if by_ids { "ids" } else { "label" }
                    );
                    let before = *stored.borrow();
                    let subject = subjects::events(&id);
                    protocol
                        .push(bare_broadcast(&c, n, &job(n, by_ids, &id), Some(&subject)).await);
                    // Every event stored (acked) before the next broadcast.
                    tokio::time::timeout(LIMIT, stored.wait_for(|s| *s >= before + n))
                        .await
                        .expect("every bare client's event stored")
                        .unwrap();
                }
                rows.push(Row {
                    floor,
                    protocol,
                    event_bytes,
                    runs,
                });
            }
            let [a, b]: [_; 2] = rows.try_into().ok().unwrap();
            [a, b]
        })
    })
    .await
    .unwrap();
    bare.stop();
    for a in &mut agents {
        a.stop().await;
    }
    Round { startup, rows }
}

/// This round's job: only this round's agents, by label (a job of the same size whatever the
/// fleet's), or by listing their ids (a job that grows with the fleet: every agent parses every
/// id).
fn job(n: usize, by_ids: bool, job_id: &str) -> Vec<u8> {
    let selector = if by_ids {
        let ids: Vec<String> = (0..n).map(|i| format!("fan-{n}-{i}")).collect();
        serde_json::json!(ids)
    } else {
        serde_json::json!({"round": format!("r{n}")})
    };
    let mut job = serde_json::json!({"job_id": job_id, "model": "mock-7b", "prompt": "hi", "max_tokens": 8, "selector": selector});
    if std::env::var_os("FANOUT_TOGETHER").is_some() {
        // Every agent starts the job 1.5 s after the publish: no job runs while accepts come.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        job["start"] = "together".into();
        job["start_at_ms"] = (now + 1500).into();
    }
    serde_json::to_vec(&job).unwrap()
}

/// Waits until every agent of the round has an idle registry entry stored at or after its last
/// `job_done` (`ended`: machine id -> the event's ts_ms; none yet: any idle entry): the fleet
/// is quiet, as it was before the first broadcast.
async fn settled(kv: &jetstream::kv::Store, n: usize, ended: &HashMap<String, u64>) {
    let prefix = format!("fan-{n}-");
    let mut watch = kv.watch_with_history(">").await.unwrap();
    let mut idle = HashSet::new();
    tokio::time::timeout(LIMIT, async {
        while idle.len() < n {
            let e = watch.next().await.unwrap().unwrap();
            if !e.key.starts_with(&prefix) {
                continue;
            }
            let Ok(info) = serde_json::from_slice::<AgentInfo>(&e.value) else {
                continue;
            };
            if info.status == AgentStatus::Idle
                && info.current_job.is_none()
                && info.ts_ms >= ended.get(&e.key).copied().unwrap_or(0)
            {
                idle.insert(e.key);
            } else {
                idle.remove(&e.key);
            }
        }
    })
    .await
    .expect("every agent idle again");
}

/// `n` bare NATS clients answering every message on [`BARE_SUBJECT`] at once: with
/// `{"accepted":true}`, or, when the message names an [`EVENT_SUBJECT_HEADER`], as an agent
/// did ([`Wire`]): its reply, and its `job_accepted` stored on that subject through a
/// connection of their own (as an agent's events travel), the ack awaited.
struct BareFleet {
    clients: Vec<async_nats::Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    wire: std::sync::Arc<std::sync::Mutex<Option<Wire>>>,
    /// Events stored (acked) so far.
    stored: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl BareFleet {
    async fn start(nats: &NatsServer, n: usize) -> Self {
        let (mut clients, mut tasks) = (Vec::new(), Vec::new());
        let wire = std::sync::Arc::new(std::sync::Mutex::new(None::<Wire>));
        let stored = std::sync::Arc::new(tokio::sync::watch::Sender::new(0));
        for i in 0..n {
            let c = async_nats::connect(nats.url()).await.unwrap();
            let events = async_nats::connect(nats.url()).await.unwrap();
            let js = jetstream::new(events.clone());
            let mut sub = c.subscribe(BARE_SUBJECT).await.unwrap();
            c.flush().await.unwrap();
            let (answer, wire, stored) = (c.clone(), wire.clone(), stored.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let reply = m.reply.expect("a request");
                    let subject = m.headers.as_ref().and_then(|h| h.get(EVENT_SUBJECT_HEADER));
                    let body = match subject {
                        None => r#"{"accepted":true}"#.into(),
                        Some(subject) => {
                            let w = wire.lock().unwrap().clone().expect("an agent's wire");
                            let mut headers = w.headers.clone();
                            let msg_id = format!("{}.{i}", subject.as_str());
                            headers.insert("Nats-Msg-Id", msg_id.as_str());
                            let ack = js
                                .publish_with_headers(subject.to_string(), headers, w.event)
                                .await
                                .unwrap();
                            let stored = stored.clone();
                            tokio::spawn(async move {
                                ack.await.expect("event stored");
                                stored.send_modify(|s| *s += 1);
                            });
                            w.reply
                        }
                    };
                    answer.publish(reply, body).await.unwrap();
                    answer.flush().await.unwrap();
                }
            }));
            clients.push(c);
            clients.push(events);
        }
        Self {
            clients,
            tasks,
            wire,
            stored,
        }
    }

    fn stop(self) {
        for t in self.tasks {
            assert!(!t.is_finished(), "a bare client stopped early");
            t.abort();
        }
        drop(self.clients);
    }
}

/// A message's header bytes on the wire (`NATS/1.0` line, `name: value` lines, blank line).
fn header_bytes(h: &HeaderMap) -> usize {
    let lines: usize = h
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| k.to_string().len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// Publish -> last answer from the [`BareFleet`], for a message of `body`; with `event`, each
/// client stores an agent's `job_accepted` on that subject too.
async fn bare_broadcast(
    c: &async_nats::Client,
    n: usize,
    body: &[u8],
    event: Option<&str>,
) -> Duration {
    let inbox = c.new_inbox();
    let mut replies = c.subscribe(inbox.clone()).await.unwrap();
    c.flush().await.unwrap();
    let mut headers = HeaderMap::new();
    if let Some(subject) = event {
        headers.insert(EVENT_SUBJECT_HEADER, subject);
    }
    let t0 = Instant::now();
    c.publish_with_reply_and_headers(BARE_SUBJECT, inbox, headers, body.to_vec().into())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        for _ in 0..n {
            replies.next().await.unwrap();
        }
    })
    .await
    .expect("every bare client answers");
    t0.elapsed()
}

/// One broadcast request on `bench.jobs.all` to this round's `n` agents: what it measured,
/// each machine's `job_done` ts_ms, and what an agent sent (its answer and `job_accepted`).
async fn broadcast(
    c: &async_nats::Client,
    watch: &async_nats::Client,
    n: usize,
    body: &[u8],
    job_id: &str,
    profiled: bool,
) -> (Run, HashMap<String, u64>, Wire) {
    let mut events = watch.subscribe(subjects::events(job_id)).await.unwrap();
    watch.flush().await.unwrap();
    let inbox = c.new_inbox();
    let mut replies = c.subscribe(inbox.clone()).await.unwrap();
    c.flush().await.unwrap();
    if profiled {
        perf_ctl("enable");
    }
    let t0 = Instant::now();
    let published_ms = bench_agent::publisher::now_ms() as i64;
    c.publish_with_reply(subjects::JOBS_ALL, inbox, body.to_vec().into())
        .await
        .unwrap();
    let mut accepted = 0;
    let mut reply = None;
    let last_accept = tokio::time::timeout(LIMIT, async {
        while accepted < n {
            let m = replies.next().await.unwrap();
            if m.status.is_some() {
                panic!("broadcast got {:?} (no agent subscribed yet?)", m.status);
            }
            let r: JobReply = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                panic!("reply {:?} {:?} {:?}: {e}", m.status, m.headers, m.payload)
            });
            assert!(r.accepted, "{r:?}");
            accepted += 1;
            reply.get_or_insert(m.payload);
        }
        t0.elapsed()
    })
    .await
    .expect("accepts");
    if profiled {
        perf_ctl("disable");
    }

    let mut done = HashMap::new();
    let (mut took_ms, mut event) = (i64::MIN, None);
    let last_done = tokio::time::timeout(LIMIT, async {
        while done.len() < n {
            let m = events.next().await.unwrap();
            let e: Event = serde_json::from_slice(&m.payload).unwrap();
            match e.kind {
                bench_schemas::EventKind::JobAccepted(_) => {
                    took_ms = took_ms.max(e.ts_ms as i64 - published_ms);
                    event.get_or_insert((m.headers.expect("a signed event"), m.payload));
                }
                bench_schemas::EventKind::JobDone(_) => {
                    done.insert(e.machine_id, e.ts_ms);
                }
                _ => {}
            }
        }
        t0.elapsed()
    })
    .await
    .expect("job_done from every agent");
    // The bare clients give each copy a Nats-Msg-Id of its own (insert replaces).
    let (headers, event) = event.expect("a job_accepted before job_done");
    let wire = Wire {
        reply: reply.expect("an answer"),
        headers,
        event,
    };
    let run = Run {
        accept: last_accept,
        done: last_done,
        took_ms,
    };
    (run, done, wire)
}

/// With `FANOUT_PERF_CTL=<fifo>`, tells `perf record --control=fifo:<fifo> -D -1` to record
/// only from each broadcast's publish to its last accept.
fn perf_ctl(what: &str) {
    if let Some(path) = std::env::var_os("FANOUT_PERF_CTL") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("perf control fifo");
        writeln!(f, "{what}").expect("perf control");
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let (mut sizes, mut repeat) = (Vec::new(), 3usize);
    while let Some(a) = args.next() {
        if a == "--repeat" {
            repeat = args
                .next()
                .and_then(|r| r.parse().ok())
                .expect("--repeat R");
        } else if let Ok(n) = a.parse() {
            sizes.push(n);
        }
    }
    let sizes = if sizes.is_empty() {
        vec![1, 10, 100, 500]
    } else {
        sizes
    };
    let repeat = repeat.max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let nats = NatsServer::start();
        println!(
            "| agents | start-up | selector | bare NATS floor | protocol floor (median / worst of {repeat}) | last accept, first job | publish -> last accept (median / worst of the next {repeat}) | publish -> last job_done (median / worst) |"
        );
        println!("|---:|---:|---|---:|---:|---:|---:|---:|");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut verdicts = Vec::new();
        for n in sizes {
            let r = round(&nats, n, repeat).await;
            for (i, row) in r.rows.into_iter().enumerate() {
                let (first, runs) = row.runs.split_first().expect("a first broadcast");
                let accepts: Vec<Duration> = runs.iter().map(|r| r.accept).collect();
                let dones: Vec<Duration> = runs.iter().map(|r| r.done).collect();
                let worst_run = runs.iter().max_by_key(|r| r.accept).unwrap();
                let worst = worst_run.accept;
                let protocol_worst = *row.protocol.iter().max().unwrap();
                let (startup, selector) = if i == 0 {
                    (format!("{:.0} ms", ms(r.startup)), "label".to_string())
                } else {
                    (String::new(), format!("{n} ids"))
                };
                println!(
                    "| {n} | {startup} | {selector} | {:.1} ms | {:.1} / {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms |",
                    ms(row.floor),
                    ms(median(&row.protocol)),
                    ms(protocol_worst),
                    ms(first.accept),
                    ms(median(&accepts)),
                    ms(worst),
                    ms(median(&dones)),
                    ms(*dones.iter().max().unwrap())
                );
                if n == TARGET_AGENTS {
                    verdicts.push(format!(
                        "{n} agents by {selector}: publish -> last accept, worst of {repeat}: {:.1} ms (target < {} ms; bare floor {:.1} ms; protocol floor, worst of {repeat}, {:.1} ms, storing a {} B job_accepted with {} B of headers; in the worst run the last agent took the job at {} ms by its own clock; the fleet's first such job {:.1} ms): {}",
                        ms(worst),
                        TARGET.as_millis(),
                        ms(row.floor),
                        ms(protocol_worst),
                        row.event_bytes.0,
                        row.event_bytes.1,
                        worst_run.took_ms,
                        ms(first.accept),
                        if worst < TARGET { "PASS" } else { "FAIL" }
                    ));
                }
            }
        }
        println!();
        for v in verdicts {
            println!("{v}");
        }
    });
}
