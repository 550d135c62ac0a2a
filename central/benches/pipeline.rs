//! Pipeline benchmark (not a test): what a race costs between the agents and the browsers.
//!
//! K fake agents (one NATS connection each, publishing exactly what `bench-agent` publishes,
//! signed as it signs with a key announced in their heartbeats, with a window of JetStream acks
//! in flight so the agent side is not the limit) -> a real
//! nats-server -> a real `bench-central` (the release binary, a child process with its own temp
//! config, results folder and HTTP port) -> M SSE clients reading `GET /api/jobs/{id}/events`
//! over real HTTP, which reconnect with `Last-Event-ID` after `event: lagged` like a browser.
//! One race is one `job_id` shared by the K agents.
//!
//!   scripts/bench pipeline [--quick] [-k 5] [-m 5] [-n 1000,20000,100000] [--rate 100,1000]
//!   scripts/bench jobs [N]        N small finished jobs: central's RSS and restart time
//!
//! Every `llm_token` carries its send time (ns since this process's epoch) in its text, so a
//! client computes send -> browser latency. Numbers, not assertions: the targets are printed
//! beside them; the exit status is non-zero only when the benchmark could not run or lost events.
//! Results also go to `results/bench/<mode>-<label>-<unix s>.json`.

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, context::PublishAckFuture};
use bench_nats::harness::{free_port, workspace_root, NatsServer};
use bench_schemas::event::{Started, Token};
use bench_schemas::{subjects, AgentInfo, AgentStatus, Event, EventKind, Metrics};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Publish acks a fake agent keeps outstanding.
const WINDOW: usize = 512;
/// Length of one `llm_token` text: a real agent flushes its batch at 64 characters.
const TEXT_LEN: usize = 64;
/// Start of the send time inside a token's text: `<ns:00000000001234567890>`.
const MARK: &[u8] = b"<ns:";
/// `job_done.output_text` is the run's text up to this size: a real 100,000-event output would
/// not fit NATS' 1 MiB max_payload.
const OUTPUT_CAP: usize = 256 * 1024;
/// Tokens per `llm_token` batch (llama.cpp: ~12 tokens in 64 characters of English).
const TOKENS_PER_BATCH: u64 = 12;
/// Every smaller flat race is repeated (new job each time) until an agent sent this many
/// events, so that CPU time (in 10 ms ticks) is measured over enough work.
const MIN_EVENTS_PER_POINT: u64 = 20_000;
/// Bounds of the set-up waits.
const SETUP_WAIT: Duration = Duration::from_secs(20);
/// How long a client that has every event waits for `event: end`.
const END_GRACE: Duration = Duration::from_secs(2);
/// Slowest deliveries kept (with their send time) to show when latency outliers happen.
const SLOWEST: usize = 10;

const EX_ACCEPTED: &str = include_str!("../../schemas/messages/event_job_accepted.json");
const EX_REPEAT_DONE: &str = include_str!("../../schemas/messages/event_repeat_done.json");
const EX_JOB_DONE: &str = include_str!("../../schemas/messages/event_job_done.json");
const EX_AGENT_INFO: &str = include_str!("../../schemas/messages/agent_info.json");

// ---------------------------------------------------------------- clocks and /proc

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Ns since this process's epoch: agents and clients share it, so latency needs no clock sync.
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{}", unix_ms(), N.fetch_add(1, Ordering::Relaxed))
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process (all its threads, live or gone), in seconds.
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck())
}

/// The 1-minute load average: a benchmark on a busy machine measures the machine.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The nats-server listening on `port` (the harness keeps its child private).
fn nats_pid(port: u16) -> Option<u32> {
    let want = port.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_server = args.first().is_some_and(|a| a.ends_with(b"nats-server"));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == want.as_bytes());
        (is_server && on_port).then_some(pid)
    })
}

// ---------------------------------------------------------------- events, as an agent writes them

fn example_kind(text: &str) -> EventKind {
    serde_json::from_str::<Event>(text)
        .expect("checked-in example event parses")
        .kind
}

/// One event's JSON, byte for byte as `bench-agent` serialises its `Event` (fields in
/// declaration order, `type` and `payload` flattened last). Written out here rather than
/// through `Event` so the bench builds against the contract with or without `run_id`.
fn envelope(job_id: &str, machine_id: &str, run_id: &str, seq: u64, kind: &EventKind) -> Vec<u8> {
    let kind = serde_json::to_string(kind).expect("event serialises");
    let q = |s: &str| serde_json::to_string(s).expect("string serialises");
    let mut out = format!(
        "{{\"job_id\":{},\"machine_id\":{},\"run_id\":{},\"seq\":{seq},\"ts_ms\":{},",
        q(job_id),
        q(machine_id),
        q(run_id),
        unix_ms()
    );
    out.push_str(&kind[1..]);
    out.into_bytes()
}

/// `Nats-Msg-Id: <job_id>.<machine_id>.<run_id>.<seq>` (schemas::subjects::msg_id).
fn msg_id(job_id: &str, machine_id: &str, run_id: &str, seq: u64) -> String {
    format!("{job_id}.{machine_id}.{run_id}.{seq}")
}

fn accepted_kind(job_id: &str, label: &str, n: u64) -> EventKind {
    let EventKind::JobAccepted(mut a) = example_kind(EX_ACCEPTED) else {
        unreachable!("the job_accepted example is a job_accepted")
    };
    a.job.job_id = Some(job_id.to_string());
    a.job.model = "fake-7b".into();
    a.job.prompt = "pipeline benchmark".into();
    a.job.max_tokens = (n * TOKENS_PER_BATCH).min(u32::MAX as u64) as u32;
    a.engine = "mock".into();
    a.engine_url = String::new();
    a.label = label.to_string();
    EventKind::JobAccepted(a)
}

fn metrics(n: u64, output_chars: u64) -> Metrics {
    let EventKind::RepeatDone(mut m) = example_kind(EX_REPEAT_DONE) else {
        unreachable!("the repeat_done example is a repeat_done")
    };
    m.repeat_index = 0;
    m.warmup = false;
    m.gen_tokens = n * TOKENS_PER_BATCH;
    m.chunks = n;
    m.output_chars = output_chars;
    m
}

fn done_kind(run: Metrics, output_text: String) -> EventKind {
    let EventKind::JobDone(mut d) = example_kind(EX_JOB_DONE) else {
        unreachable!("the job_done example is a job_done")
    };
    d.model = "fake-7b".into();
    d.engine = "mock".into();
    d.gen_tokens = run.gen_tokens;
    d.repeats = vec![run];
    d.output_text = output_text;
    EventKind::JobDone(d)
}

/// 64 characters of "generated text" that start with the send time.
fn token_text(sent_ns: u64) -> String {
    const FILLER: &str = " the quick brown fox jumps over the lazy dog, again and again and";
    let mut t = format!("<ns:{sent_ns:020}>");
    t.push_str(&FILLER[..TEXT_LEN - t.len()]);
    t
}

fn find_sent_ns(data: &[u8]) -> Option<u64> {
    let at = data.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    std::str::from_utf8(data.get(at..at + 20)?)
        .ok()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------- fake agent

/// One fake machine: its own NATS connection, a boot id, runs numbered like the agent's, its
/// own signing key (the agent's `Signer`: `Bench-Sig` and `Bench-Key` on every event).
struct Agent {
    machine_id: String,
    label: String,
    boot_id: String,
    /// None with `--unsigned` (agents before signatures: what central cost without them).
    signer: Option<Arc<bench_agent::publisher::Signer>>,
    runs: u64,
    js: jetstream::Context,
    inflight: VecDeque<PublishAckFuture>,
    /// Stream sequences acknowledged since the last `begin`.
    acked: Vec<u64>,
    /// Publishes the stream reported as duplicates since the last `begin`.
    duplicates: u64,
    _client: async_nats::Client,
}

/// One run of a job on one agent.
struct Run {
    job_id: String,
    subject: String,
    run_id: String,
    seq: u64,
}

impl Agent {
    async fn connect(url: &str, machine_id: String, sign: bool) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("bench-pipeline-{machine_id}"))
            .connect(url)
            .await
            .with_context(|| format!("connecting {machine_id} to {url}"))?;
        let boot_id = format!(
            "{:012x}",
            (now_ns() ^ 0x9e37_79b9_7f4a_7c15) & 0xffff_ffff_ffff
        );
        Ok(Self {
            label: format!("Fake {machine_id}"),
            machine_id,
            boot_id,
            signer: sign.then(|| Arc::new(bench_agent::publisher::Signer::ephemeral())),
            runs: 0,
            js: jetstream::new(client.clone()),
            inflight: VecDeque::new(),
            acked: Vec::new(),
            duplicates: 0,
            _client: client,
        })
    }

    fn begin(&mut self, job_id: &str, subject: String) -> Run {
        self.runs += 1;
        self.inflight.clear();
        self.acked.clear();
        self.duplicates = 0;
        Run {
            job_id: job_id.to_string(),
            subject,
            run_id: format!("{}-{}", self.boot_id, self.runs),
            seq: 0,
        }
    }

    async fn publish(&mut self, run: &mut Run, kind: &EventKind) -> anyhow::Result<()> {
        run.seq += 1;
        let payload = envelope(&run.job_id, &self.machine_id, &run.run_id, run.seq, kind);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            msg_id(&run.job_id, &self.machine_id, &run.run_id, run.seq).as_str(),
        );
        if let Some(signer) = &self.signer {
            headers.insert(
                subjects::SIGNATURE_HEADER,
                signer.signature(&payload).as_str(),
            );
            headers.insert(subjects::KEY_HEADER, signer.key_id());
        }
        while self.inflight.len() >= WINDOW {
            self.ack_one().await?;
        }
        let ack = self
            .js
            .publish_with_headers(run.subject.clone(), headers, payload.into())
            .await
            .with_context(|| format!("publishing {}", run.subject))?;
        self.inflight.push_back(ack);
        Ok(())
    }

    async fn ack_one(&mut self) -> anyhow::Result<()> {
        if let Some(f) = self.inflight.pop_front() {
            let ack = f.await.context("publish ack")?;
            if ack.duplicate {
                self.duplicates += 1;
            } else {
                self.acked.push(ack.sequence);
            }
        }
        Ok(())
    }

    async fn drain(&mut self) -> anyhow::Result<()> {
        while !self.inflight.is_empty() {
            self.ack_one().await?;
        }
        Ok(())
    }
}

/// Everything after `job_accepted`: job_started, n tokens (paced at `rate` per second, or flat
/// out), repeat_done, job_done. Returns the agent and when its last ack came back.
async fn flood(
    mut agent: Agent,
    run: Run,
    n: u64,
    rate: Option<f64>,
) -> (Agent, anyhow::Result<Instant>) {
    let r = flood_run(&mut agent, run, n, rate).await;
    (agent, r)
}

async fn flood_run(
    agent: &mut Agent,
    mut run: Run,
    n: u64,
    rate: Option<f64>,
) -> anyhow::Result<Instant> {
    agent
        .publish(
            &mut run,
            &EventKind::JobStarted(Started {
                cell: None,
                stream: None,
                repeat_index: 0,
                warmup: false,
                cold: false,
                fingerprint: None,
            }),
        )
        .await?;
    let start = tokio::time::Instant::now();
    let mut output = String::new();
    let mut chars = 0u64;
    for i in 0..n {
        if let Some(r) = rate {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / r)).await;
        }
        let text = token_text(now_ns());
        chars += text.len() as u64;
        if output.len() + text.len() <= OUTPUT_CAP {
            output.push_str(&text);
        }
        let token = EventKind::LlmToken(Token {
            repeat_index: 0,
            text,
            tokens: Some(TOKENS_PER_BATCH),
            t_ms: start.elapsed().as_secs_f64() * 1e3,
        });
        agent.publish(&mut run, &token).await?;
    }
    let m = metrics(n, chars);
    agent
        .publish(&mut run, &EventKind::RepeatDone(m.clone()))
        .await?;
    agent.publish(&mut run, &done_kind(m, output)).await?;
    agent.drain().await?;
    Ok(Instant::now())
}

/// The agents' registry entries, refreshed every 3 s like `bench-agent`'s heartbeat (central
/// judges runs against them: boot id, current job; and learns their signing keys).
fn spawn_heartbeats(
    js: jetstream::Context,
    agents: Vec<(String, String, String, Option<String>)>,
    current: Arc<Mutex<Option<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(kv) =
            bench_nats::streams::ensure_agents_bucket(&js, bench_nats::streams::AGENTS_TTL, 1)
                .await
        else {
            eprintln!(
                "warning: no {} bucket; no heartbeats",
                subjects::AGENTS_BUCKET
            );
            return;
        };
        let base: AgentInfo =
            serde_json::from_str(EX_AGENT_INFO).expect("checked-in agent_info parses");
        loop {
            let job = current.lock().expect("current job").clone();
            for (machine_id, label, boot_id, key) in &agents {
                let mut info = base.clone();
                info.machine_id = machine_id.clone();
                info.label = label.clone();
                info.engine = "mock".into();
                info.models = vec!["fake-7b".into()];
                info.labels = Default::default();
                info.signing_key = key.clone();
                info.status = if job.is_some() {
                    AgentStatus::Busy
                } else {
                    AgentStatus::Idle
                };
                info.current_job = job.clone();
                info.ts_ms = unix_ms();
                info.heartbeat_s = 3.0;
                let mut v = serde_json::to_value(&info).expect("agent info serialises");
                v["boot_id"] = json!(boot_id);
                let _ = kv
                    .put(machine_id, serde_json::to_vec(&v).expect("json").into())
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    })
}

// ---------------------------------------------------------------- central as a child process

struct Central {
    child: Child,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Central {
    /// Starts the binary with a config, results and web folder under `dir` and a free port, and
    /// waits (at most `wait`) until `/health` answers.
    async fn start(
        bin: &Path,
        dir: &Path,
        nats_url: &str,
        http: &reqwest::Client,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("web"))?;
        std::fs::create_dir_all(dir.join("results"))?;
        let config = dir.join("machines.yaml");
        std::fs::write(&config, "machines: []\n")?;
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("central.log"))?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .current_dir(dir)
            .env("NATS_URL", nats_url)
            .env("CENTRAL_HOST", "127.0.0.1")
            .env("CENTRAL_PORT", port.to_string())
            .env("CENTRAL_RESULTS_DIR", dir.join("results"))
            .env("CENTRAL_WEB_DIR", dir.join("web"))
            .env_remove("CENTRAL_API_TOKEN")
            .env_remove("BENCH_CENTRAL_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut c = Self {
            child,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            port,
        };
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = c.child.try_wait()? {
                bail!("bench-central exited with {status}: {}", c.log_tail());
            }
            let ok = http
                .get(format!("{}/health", c.base()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "bench-central not healthy in {SETUP_WAIT:?}: {}",
                    c.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("central.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM (a clean shutdown), SIGKILL after 15 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Value)> {
    let r = http.get(url).timeout(Duration::from_secs(5)).send().await?;
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

// ---------------------------------------------------------------- SSE client, like a browser

#[derive(Clone, Copy, PartialEq, Default)]
enum Kind {
    #[default]
    Message,
    Token,
    End,
    Lagged,
}

struct Parsed {
    id: Option<u64>,
    kind: Kind,
    sent_ns: Option<u64>,
}

/// `text/event-stream` framing: fields per line, a blank line ends a message.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    id: Option<u64>,
    kind: Kind,
    sent_ns: Option<u64>,
    fields: bool,
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Parsed>) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = buf[start..].iter().position(|b| *b == b'\n') {
            let mut line = &buf[start..start + len];
            start += len + 1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if self.fields {
                    out.push(Parsed {
                        id: self.id.take(),
                        kind: std::mem::take(&mut self.kind),
                        sent_ns: self.sent_ns.take(),
                    });
                }
                self.fields = false;
                continue;
            }
            if line[0] == b':' {
                continue; // keep-alive comment
            }
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &[][..]),
            };
            self.fields = true;
            match field {
                b"id" => self.id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
                b"event" => {
                    self.kind = match value {
                        b"llm_token" => Kind::Token,
                        b"end" => Kind::End,
                        b"lagged" => Kind::Lagged,
                        _ => Kind::Message,
                    }
                }
                b"data" if self.sent_ns.is_none() => self.sent_ns = find_sent_ns(value),
                _ => {}
            }
        }
        buf.drain(..start);
        self.buf = buf;
    }
}

fn keep_slowest(v: &mut Vec<(u64, u64)>, sample: (u64, u64)) {
    if v.len() < SLOWEST {
        v.push(sample);
    } else if let Some(min) = v.iter_mut().min_by_key(|s| s.1) {
        if sample.1 > min.1 {
            *min = sample;
        }
    }
}

#[derive(Default)]
struct ClientOut {
    ids: HashSet<u64>,
    before_start: usize,
    duplicates: u64,
    lagged: u64,
    /// Connections that ended without `end` or `lagged` (errors, closes), then reconnected.
    dropped: u64,
    ended: bool,
    latencies_ns: Vec<u64>,
    /// The slowest deliveries as (send time, latency) in ns, at most [`SLOWEST`].
    slowest: Vec<(u64, u64)>,
    last_delivery: Option<Instant>,
    errors: Vec<String>,
}

enum Outcome {
    End,
    Lagged,
    Dropped(String),
    Stop,
}

/// Reads one job's events until `end` (or every expected event and a grace period, or the
/// deadline), reconnecting with `Last-Event-ID` after `lagged` or a broken connection.
async fn sse_client(
    http: reqwest::Client,
    url: String,
    ready_after: usize,
    ready: oneshot::Sender<()>,
    expected: Arc<AtomicU64>,
    deadline: tokio::time::Instant,
) -> ClientOut {
    let mut out = ClientOut::default();
    let mut ready = Some(ready);
    let mut last_id = 0u64;
    let mut parsed = Vec::new();
    let mut grace: Option<tokio::time::Instant> = None;
    'connect: loop {
        let until = grace.map_or(deadline, |g| g.min(deadline));
        if tokio::time::Instant::now() >= until {
            break;
        }
        let mut req = http.get(&url).header("Accept", "text/event-stream");
        if last_id > 0 {
            req = req.header("Last-Event-ID", last_id.to_string());
        }
        let resp = match tokio::time::timeout_at(until, req.send()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                out.errors.push(e.to_string());
                out.dropped += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            out.errors.push(format!("HTTP {}", resp.status()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let outcome = loop {
            let until = grace.map_or(deadline, |g| g.min(deadline));
            let chunk = match tokio::time::timeout_at(until, body.next()).await {
                Err(_) => break Outcome::Stop,
                Ok(None) => break Outcome::Dropped("closed without end".into()),
                Ok(Some(Err(e))) => break Outcome::Dropped(e.to_string()),
                Ok(Some(Ok(c))) => c,
            };
            let now = now_ns();
            let now_i = Instant::now();
            parser.feed(&chunk, &mut parsed);
            let mut stop = None;
            for p in parsed.drain(..) {
                if stop.is_some() {
                    continue;
                }
                match p.kind {
                    Kind::End => stop = Some(Outcome::End),
                    Kind::Lagged => stop = Some(Outcome::Lagged),
                    Kind::Message | Kind::Token => {
                        let Some(id) = p.id else { continue };
                        last_id = id;
                        if !out.ids.insert(id) {
                            out.duplicates += 1;
                            continue;
                        }
                        out.last_delivery = Some(now_i);
                        if p.kind == Kind::Token {
                            if let Some(sent) = p.sent_ns {
                                let lat = now.saturating_sub(sent);
                                out.latencies_ns.push(lat);
                                keep_slowest(&mut out.slowest, (sent, lat));
                            }
                        }
                    }
                }
            }
            if ready.is_some() && out.ids.len() >= ready_after {
                out.before_start = out.ids.len();
                let _ = ready.take().map(|r| r.send(()));
            }
            let want = expected.load(Ordering::Relaxed);
            if grace.is_none() && want > 0 && out.ids.len() as u64 >= want {
                grace = Some(tokio::time::Instant::now() + END_GRACE);
            }
            if let Some(o) = stop {
                break o;
            }
        };
        match outcome {
            Outcome::End => {
                out.ended = true;
                break 'connect;
            }
            Outcome::Lagged => out.lagged += 1,
            Outcome::Dropped(e) => {
                out.dropped += 1;
                out.errors.push(e);
            }
            Outcome::Stop => break 'connect,
        }
    }
    out
}

// ---------------------------------------------------------------- one race

/// What one race (or several, summed) measured.
#[derive(Default)]
struct RaceOut {
    races: u64,
    tokens: u64,
    expected_per_client: u64,
    deliveries: u64,
    window_s: f64,
    publish_s: f64,
    central_cpu_s: f64,
    nats_cpu_s: f64,
    bench_cpu_s: f64,
    latencies_ns: Vec<u64>,
    /// Slowest deliveries: (ms from the flood's start to the send, latency in ms).
    slowest: Vec<(f64, f64)>,
    lost: u64,
    unexpected: u64,
    duplicates: u64,
    publish_duplicates: u64,
    lagged: u64,
    dropped: u64,
    not_ended: u64,
    /// Time spent waiting for central to go idle before the races.
    quiesce_s: f64,
    /// Races whose events had not all arrived at the deadline.
    timed_out: u64,
    /// Races that could not run at all (their error is in `errors`).
    failed: u64,
    kv_bytes: u64,
    kv_msgs: u64,
    errors: Vec<String>,
}

impl RaceOut {
    fn add(&mut self, o: RaceOut) {
        self.races += o.races;
        self.tokens += o.tokens;
        self.expected_per_client += o.expected_per_client;
        self.deliveries += o.deliveries;
        self.window_s += o.window_s;
        self.publish_s += o.publish_s;
        self.central_cpu_s += o.central_cpu_s;
        self.nats_cpu_s += o.nats_cpu_s;
        self.bench_cpu_s += o.bench_cpu_s;
        self.latencies_ns.extend(o.latencies_ns);
        self.latencies_ns.sort_unstable();
        self.slowest.extend(o.slowest);
        self.slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        self.slowest.truncate(SLOWEST);
        self.lost += o.lost;
        self.unexpected += o.unexpected;
        self.duplicates += o.duplicates;
        self.publish_duplicates += o.publish_duplicates;
        self.lagged += o.lagged;
        self.dropped += o.dropped;
        self.not_ended += o.not_ended;
        self.timed_out += o.timed_out;
        self.quiesce_s += o.quiesce_s;
        self.failed += o.failed;
        self.kv_bytes += o.kv_bytes;
        self.kv_msgs += o.kv_msgs;
        self.errors.extend(o.errors);
    }

    fn rate(&self) -> f64 {
        self.deliveries as f64 / self.window_s.max(1e-9)
    }

    fn central_us_per_delivery(&self) -> f64 {
        self.central_cpu_s * 1e6 / (self.deliveries.max(1) as f64)
    }

    fn kv_bytes_per_1k_tokens(&self) -> f64 {
        self.kv_bytes as f64 * 1000.0 / (self.tokens.max(1) as f64)
    }

    /// Over the sorted latencies.
    fn pct_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.latencies_ns, p).map(|ns| ns as f64 / 1e6)
    }

    fn json(&self) -> Value {
        json!({
            "races": self.races,
            "token_events": self.tokens,
            "expected_events_per_client_all_races": self.expected_per_client,
            "deliveries": self.deliveries,
            "window_s": self.window_s,
            "deliveries_per_s": self.rate(),
            "publish_s": self.publish_s,
            "central_cpu_s": self.central_cpu_s,
            "central_cpu_us_per_delivery": self.central_us_per_delivery(),
            "nats_cpu_s": self.nats_cpu_s,
            "bench_cpu_s": self.bench_cpu_s,
            "latency_ms": {
                "samples": self.latencies_ns.len(),
                "slowest_sent_at_ms_and_latency_ms": self.slowest,
                "p50": self.pct_ms(50.0),
                "p99": self.pct_ms(99.0),
                "max": self.pct_ms(100.0),
            },
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "publish_duplicates": self.publish_duplicates,
            "lagged_reconnects": self.lagged,
            "dropped_reconnects": self.dropped,
            "clients_without_end": self.not_ended,
            "races_timed_out": self.timed_out,
            "quiesce_s": self.quiesce_s,
            "races_failed": self.failed,
            "kv_bytes": self.kv_bytes,
            "kv_writes": self.kv_msgs,
            "kv_bytes_per_1k_token_events": self.kv_bytes_per_1k_tokens(),
            "errors": self.errors.iter().take(10).collect::<Vec<_>>(),
        })
    }
}

/// Nearest rank over sorted samples; `p` = 100 is the maximum.
fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The SSE clients of a race; a race that fails stops them.
struct Clients(Vec<tokio::task::JoinHandle<ClientOut>>);

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &self.0 {
            c.abort();
        }
    }
}

struct Bench {
    http: reqwest::Client,
    central: Central,
    nats_pid: Option<u32>,
    agents: Vec<Agent>,
    m: usize,
    timeout: Duration,
    kv_bytes: Arc<AtomicU64>,
    kv_msgs: Arc<AtomicU64>,
    current_job: Arc<Mutex<Option<String>>>,
}

impl Bench {
    /// Waits (at most [`SETUP_WAIT`]) until central is idle: under 5% of a core over 200 ms.
    /// What the last race left behind (result files, KV writes) must not be measured as the
    /// next one's.
    async fn quiesce(&self) -> Duration {
        let t0 = Instant::now();
        let pid = self.central.pid();
        while t0.elapsed() < SETUP_WAIT {
            let before = cpu_s(pid).unwrap_or(0.0);
            tokio::time::sleep(Duration::from_millis(200)).await;
            if cpu_s(pid).unwrap_or(0.0) - before <= 0.01 {
                break;
            }
        }
        t0.elapsed()
    }

    async fn wait_job_known(&self, job_id: &str) -> anyhow::Result<()> {
        let url = format!("{}/api/jobs/{job_id}", self.central.base());
        let deadline = Instant::now() + SETUP_WAIT;
        loop {
            if let Ok((200, _)) = get_json(&self.http, &url).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "central did not know job {job_id} after {SETUP_WAIT:?}: {}",
                    self.central.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A race, or a failed one that carries its error (the other races still run).
    async fn race_or_failure(&mut self, tag: &str, n: u64, rate: Option<f64>) -> RaceOut {
        match self.race(tag, n, rate).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("  race failed: {e:#}");
                RaceOut {
                    failed: 1,
                    errors: vec![format!("{e:#}")],
                    ..Default::default()
                }
            }
        }
    }

    /// One race: every agent accepts the job, central knows it, M clients are reading, then
    /// every agent floods n tokens (at `rate` per second each, or flat out).
    async fn race(&mut self, tag: &str, n: u64, rate: Option<f64>) -> anyhow::Result<RaceOut> {
        let quiesce = self.quiesce().await;
        let job_id = format!("{tag}-{}", unique());
        let subject = subjects::events(&job_id);
        *self.current_job.lock().expect("current job") = Some(job_id.clone());
        let k = self.agents.len();
        let mut runs = Vec::new();
        for a in &mut self.agents {
            let mut run = a.begin(&job_id, subject.clone());
            let accepted = accepted_kind(&job_id, &a.label, n);
            a.publish(&mut run, &accepted).await?;
            runs.push(run);
        }
        for a in &mut self.agents {
            a.drain().await?;
        }
        self.wait_job_known(&job_id).await?;

        let deadline = tokio::time::Instant::now() + SETUP_WAIT + self.timeout;
        let expected_count = Arc::new(AtomicU64::new(0));
        let url = format!("{}/api/jobs/{job_id}/events", self.central.base());
        let mut clients = Clients(Vec::new());
        let mut readies = Vec::new();
        for _ in 0..self.m {
            let (tx, rx) = oneshot::channel();
            readies.push(rx);
            clients.0.push(tokio::spawn(sse_client(
                self.http.clone(),
                url.clone(),
                k,
                tx,
                expected_count.clone(),
                deadline,
            )));
        }
        for r in readies {
            tokio::time::timeout(SETUP_WAIT, r)
                .await
                .map_err(|_| {
                    anyhow!("an SSE client got no replayed job_accepted in {SETUP_WAIT:?}")
                })?
                .map_err(|_| anyhow!("an SSE client ended before the replay"))?;
        }

        let pid = self.central.pid();
        let cpu0 = (
            cpu_s(pid).unwrap_or(0.0),
            self.nats_pid.and_then(cpu_s).unwrap_or(0.0),
            cpu_s(std::process::id()).unwrap_or(0.0),
        );
        let kv0 = (
            self.kv_bytes.load(Ordering::Relaxed),
            self.kv_msgs.load(Ordering::Relaxed),
        );
        let t0 = Instant::now();
        let t0_ns = now_ns();
        let floods: Vec<_> = std::mem::take(&mut self.agents)
            .into_iter()
            .zip(runs)
            .map(|(a, r)| tokio::spawn(flood(a, r, n, rate)))
            .collect();
        let mut last_ack = t0;
        let mut expected = HashSet::new();
        let mut publish_duplicates = 0;
        let mut flood_error = None;
        for f in floods {
            let (a, res) = f.await?;
            match res {
                Ok(t) => {
                    last_ack = last_ack.max(t);
                    expected.extend(a.acked.iter().copied());
                    publish_duplicates += a.duplicates;
                }
                Err(e) => flood_error = Some(e),
            }
            self.agents.push(a);
        }
        if let Some(e) = flood_error {
            return Err(e.context("a fake agent could not publish"));
        }
        expected_count.store(expected.len() as u64, Ordering::Relaxed);
        let mut outs = Vec::new();
        for c in std::mem::take(&mut clients.0) {
            outs.push(c.await?);
        }
        let cpu1 = (
            cpu_s(pid).unwrap_or(0.0),
            self.nats_pid.and_then(cpu_s).unwrap_or(0.0),
            cpu_s(std::process::id()).unwrap_or(0.0),
        );
        *self.current_job.lock().expect("current job") = None;
        // The last KV writes of the job follow its last event.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let last = outs
            .iter()
            .filter_map(|o| o.last_delivery)
            .max()
            .unwrap_or(t0);
        let mut r = RaceOut {
            races: 1,
            tokens: n * k as u64,
            expected_per_client: expected.len() as u64,
            window_s: last.saturating_duration_since(t0).as_secs_f64(),
            publish_s: last_ack.saturating_duration_since(t0).as_secs_f64(),
            central_cpu_s: cpu1.0 - cpu0.0,
            nats_cpu_s: cpu1.1 - cpu0.1,
            bench_cpu_s: cpu1.2 - cpu0.2,
            publish_duplicates,
            quiesce_s: quiesce.as_secs_f64(),
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed) - kv0.0,
            kv_msgs: self.kv_msgs.load(Ordering::Relaxed) - kv0.1,
            ..Default::default()
        };
        for o in outs {
            let got = o.ids.iter().filter(|id| expected.contains(id)).count() as u64;
            r.lost += expected.len() as u64 - got;
            r.unexpected += o.ids.len() as u64 - got;
            r.deliveries += (o.ids.len() - o.before_start) as u64;
            r.duplicates += o.duplicates;
            r.lagged += o.lagged;
            r.dropped += o.dropped;
            r.not_ended += u64::from(!o.ended);
            r.latencies_ns.extend(o.latencies_ns);
            r.slowest.extend(
                o.slowest
                    .iter()
                    .map(|(sent, lat)| ((*sent as f64 - t0_ns as f64) / 1e6, *lat as f64 / 1e6)),
            );
            r.errors.extend(o.errors.into_iter().take(3));
        }
        r.latencies_ns.sort_unstable();
        r.slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        r.slowest.truncate(SLOWEST);
        if r.not_ended > 0 && r.lost > 0 {
            // Not delivered within the timeout. Deleting the job purges its events, so that a
            // central still working through them does not spoil the next race.
            r.timed_out = 1;
            r.errors.push(format!(
                "not every event reached every client within {:?}; job deleted",
                self.timeout
            ));
            let _ = self
                .http
                .delete(format!("{}/api/jobs/{job_id}", self.central.base()))
                .timeout(SETUP_WAIT)
                .send()
                .await;
        }
        Ok(r)
    }
}

/// The raw JetStream publish ceiling: the same agents flat out into a stream of
/// `BENCH_EVENTS`' config on another subject, with nothing consuming it.
async fn ceiling(
    js: &jetstream::Context,
    agents: &mut Vec<Agent>,
    n: u64,
) -> anyhow::Result<Value> {
    let mut cfg = bench_nats::streams::events_stream_config(&Default::default(), 1);
    cfg.name = "BENCH_CEILING".into();
    cfg.subjects = vec![format!("{}.ceiling.>", subjects::PREFIX)];
    js.create_stream(cfg.clone())
        .await
        .map_err(|e| anyhow!("creating {}: {e}", cfg.name))?;
    let job_id = format!("ceiling-{}", unique());
    let subject = format!("{}.ceiling.{job_id}", subjects::PREFIX);
    let t0 = Instant::now();
    let floods: Vec<_> = std::mem::take(agents)
        .into_iter()
        .map(|mut a| {
            let run = a.begin(&job_id, subject.clone());
            tokio::spawn(flood(a, run, n, None))
        })
        .collect();
    let mut last = t0;
    let mut msgs = 0u64;
    let mut error = None;
    for f in floods {
        let (a, res) = f.await?;
        match res {
            Ok(t) => last = last.max(t),
            Err(e) => error = Some(e),
        }
        msgs += a.acked.len() as u64;
        agents.push(a);
    }
    if let Some(e) = error {
        let _ = js.delete_stream(&cfg.name).await;
        return Err(e.context("a fake agent could not publish"));
    }
    let secs = last.duration_since(t0).as_secs_f64();
    let _ = js.delete_stream(&cfg.name).await;
    Ok(json!({"messages": msgs, "seconds": secs, "messages_per_s": msgs as f64 / secs}))
}

// ---------------------------------------------------------------- command line

struct Opts {
    mode: String,
    central_bin: PathBuf,
    k: usize,
    m: usize,
    ns: Vec<u64>,
    rates: Vec<u64>,
    paced_secs: f64,
    ceiling_n: Option<u64>,
    timeout: Duration,
    quick: bool,
    label: Option<String>,
    jobs: u64,
    /// The fake agents neither sign nor announce a key.
    unsigned: bool,
}

const USAGE: &str = "usage: pipeline [pipeline] [--central-bin PATH] [-k AGENTS] [-m CLIENTS] \
[-n N[,N...]] [--rate R[,R...]] [--paced-secs S] [--ceiling-n N] [--timeout S] [--quick] [--label L] \
[--unsigned]
       pipeline jobs [N] [--central-bin PATH] [--label L] [--unsigned]";

fn list(v: &str) -> anyhow::Result<Vec<u64>> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace('_', "")
                .parse::<u64>()
                .map_err(|_| anyhow!("not a number: {s}"))
        })
        .collect()
}

fn parse_args() -> anyhow::Result<Opts> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let mut o = Opts {
        mode: "pipeline".into(),
        central_bin: target.join("release/bench-central"),
        k: 5,
        m: 5,
        ns: vec![],
        rates: vec![],
        paced_secs: 0.0,
        ceiling_n: None,
        timeout: Duration::from_secs(60),
        quick: false,
        label: None,
        jobs: 10_000,
        unsigned: false,
    };
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--central-bin" => o.central_bin = PathBuf::from(val(&a)?),
            "-k" => o.k = val(&a)?.parse()?,
            "-m" => o.m = val(&a)?.parse()?,
            "-n" => o.ns.extend(list(&val(&a)?)?),
            "--rate" => o.rates.extend(list(&val(&a)?)?),
            "--paced-secs" => o.paced_secs = val(&a)?.parse()?,
            "--ceiling-n" => o.ceiling_n = Some(val(&a)?.replace('_', "").parse()?),
            "--timeout" => o.timeout = Duration::from_secs_f64(val(&a)?.parse()?),
            "--label" => o.label = Some(val(&a)?),
            "--quick" => o.quick = true,
            "--unsigned" => o.unsigned = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => positional.push(s.to_string()),
        }
    }
    let mut positional = positional.into_iter();
    if let Some(mode) = positional.next() {
        o.mode = mode;
    }
    match o.mode.as_str() {
        "pipeline" => {}
        "jobs" => {
            if let Some(n) = positional.next() {
                o.jobs = n.replace('_', "").parse()?;
            }
        }
        m => bail!("unknown mode {m}\n{USAGE}"),
    }
    if let Some(extra) = positional.next() {
        bail!("unexpected argument {extra}\n{USAGE}");
    }
    if o.ns.is_empty() {
        o.ns = if o.quick {
            vec![1_000, 20_000]
        } else {
            vec![1_000, 20_000, 100_000]
        };
    }
    if o.rates.is_empty() {
        o.rates = vec![100, 1_000];
    }
    if o.paced_secs <= 0.0 {
        o.paced_secs = if o.quick { 2.0 } else { 3.0 };
    }
    if o.k == 0 || o.m == 0 || o.ns.contains(&0) || o.rates.contains(&0) {
        bail!("-k, -m, -n and --rate must be positive");
    }
    if !o.central_bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release --locked -p bench-central) or pass \
             --central-bin (scripts/bench builds it)",
            o.central_bin.display()
        );
    }
    Ok(o)
}

/// `git describe` of the checkout the central binary was built in (or the label given).
fn source_label(o: &Opts) -> String {
    if let Some(l) = &o.label {
        return l.clone();
    }
    let bin = std::fs::canonicalize(&o.central_bin).unwrap_or(o.central_bin.clone());
    let tree = bin.ancestors().find(|d| d.join(".git").exists());
    tree.map_or_else(|| "unknown".into(), bench_nats::harness::git_describe)
}

fn write_json(mode: &str, label: &str, doc: &Value) -> anyhow::Result<PathBuf> {
    let json = serde_json::to_string_pretty(doc)?;
    Ok(bench_nats::harness::write_bench_result(mode, label, &json)?)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2} ms"))
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------- pipeline mode

async fn connect_agents(
    url: &str,
    k: usize,
    prefix: &str,
    sign: bool,
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for i in 0..k {
        agents.push(Agent::connect(url, format!("{prefix}-{i}"), sign).await?);
    }
    Ok(agents)
}

/// Connects a plain client that sums what central writes to its jobs bucket.
async fn kv_meter(url: &str) -> anyhow::Result<(Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let slow = Arc::new(AtomicU64::new(0));
    let s = slow.clone();
    let client = async_nats::ConnectOptions::new()
        .name("bench-pipeline-kv-meter")
        .subscription_capacity(1 << 16)
        .event_callback(move |e| {
            let s = s.clone();
            async move {
                if matches!(e, async_nats::Event::SlowConsumer(_)) {
                    s.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .connect(url)
        .await?;
    let mut sub = client
        .subscribe(format!("$KV.{}.>", subjects::JOBS_BUCKET))
        .await?;
    client.flush().await?;
    let bytes = Arc::new(AtomicU64::new(0));
    let msgs = Arc::new(AtomicU64::new(0));
    let (b, n) = (bytes.clone(), msgs.clone());
    tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            // Header + payload bytes, as stored (the subject and reply are framing).
            let framing = m.subject.len() + m.reply.as_ref().map_or(0, |r| r.len());
            b.fetch_add(m.length.saturating_sub(framing) as u64, Ordering::Relaxed);
            n.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok((bytes, msgs, slow))
}

async fn pipeline(o: &Opts, label: &str) -> anyhow::Result<(Value, bool)> {
    let _ = now_ns();
    let load_start = loadavg();
    if load_start.is_some_and(|l| l > 0.5) {
        eprintln!(
            "warning: load average {:.2} before the run: the machine is not idle",
            load_start.unwrap_or(0.0)
        );
    }
    // The envelope must be an Event as the contract reads it.
    let probe = envelope("j1", "m1", "b1-1", 1, &example_kind(EX_JOB_DONE));
    serde_json::from_slice::<Event>(&probe).context("fake agent envelope is not an Event")?;

    let nats = NatsServer::start();
    let nats_pid = nats_pid(nats.port());
    let control = bench_nats::harness::client(&nats.url()).await;
    let js = jetstream::new(control.clone());
    let server_version = control.server_info().version.clone();
    let mut agents = connect_agents(&nats.url(), o.k, "fake", !o.unsigned).await?;

    let ceiling_n = o
        .ceiling_n
        .unwrap_or_else(|| *o.ns.iter().max().expect("at least one n"));
    eprintln!(
        "ceiling: {} agents x {ceiling_n} events into JetStream, no central",
        o.k
    );
    let ceiling = ceiling(&js, &mut agents, ceiling_n).await?;

    let (kv_bytes, kv_msgs, kv_slow) = kv_meter(&nats.url()).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(0)
        .build()?;
    let dir = tempfile::tempdir()?;
    let central =
        Central::start(&o.central_bin, dir.path(), &nats.url(), &http, SETUP_WAIT).await?;
    let current_job = Arc::new(Mutex::new(None));
    let beats = spawn_heartbeats(
        js.clone(),
        agents
            .iter()
            .map(|a| {
                (
                    a.machine_id.clone(),
                    a.label.clone(),
                    a.boot_id.clone(),
                    a.signer.as_ref().map(|s| s.public_key().to_string()),
                )
            })
            .collect(),
        current_job.clone(),
    );
    let mut b = Bench {
        http,
        central,
        nats_pid,
        agents,
        m: o.m,
        timeout: o.timeout,
        kv_bytes,
        kv_msgs,
        current_job,
    };
    // One small race first: connections, caches and the consumer warmed up, not measured.
    b.race("warmup", 200, None).await?;

    let mut flat = Vec::new();
    for &n in &o.ns {
        let min_events = if o.quick {
            MIN_EVENTS_PER_POINT / 2
        } else {
            MIN_EVENTS_PER_POINT
        };
        let rounds = min_events.div_ceil(n).clamp(1, 20);
        eprintln!(
            "flat out: {} agents x {n} events, {} clients, {rounds} race(s)",
            o.k, o.m
        );
        let mut sum = RaceOut::default();
        for _ in 0..rounds {
            sum.add(b.race_or_failure(&format!("flat{n}"), n, None).await);
            if sum.timed_out + sum.failed > 0 {
                break;
            }
        }
        flat.push((n, sum));
    }
    let mut paced = Vec::new();
    for &rate in &o.rates {
        let n = ((rate as f64) * o.paced_secs).ceil() as u64;
        eprintln!(
            "paced: {} agents at {rate} events/s for {} s, {} clients",
            o.k, o.paced_secs, o.m
        );
        paced.push((
            rate,
            b.race_or_failure(&format!("paced{rate}"), n, Some(rate as f64))
                .await,
        ));
    }
    beats.abort();
    // Every event went through central's signature check, and passed it.
    let base = b.central.base();
    let forged = counter_metric(&b.http, &base, "bench_central_events_forged_total").await;
    let unsigned = counter_metric(&b.http, &base, "bench_central_events_unsigned_total").await;

    let central_rss_kb = rss_kb(b.central.pid());
    b.central.stop();

    // ---- report
    let mut lost_any = false;
    println!();
    println!(
        "pipeline: central {label} ({}), nats-server {server_version}, K={} agents, M={} SSE clients, {} cores",
        b.central.bin.display(),
        o.k,
        o.m,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| mode | events/agent | races | deliveries | deliveries/s | central CPU/delivery | p50 | p99 | max | lost | dup | lagged reconnects | KV bytes / 1k tokens |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = |mode: &str, n: u64, r: &RaceOut| {
        lost_any |= r.lost + r.failed + r.timed_out > 0;
        println!(
            "| {mode} | {} | {} | {} | {} | {:.2} µs | {} | {} | {} | {} | {} | {} | {} |",
            thousands(n as f64),
            r.races,
            thousands(r.deliveries as f64),
            thousands(r.rate()),
            r.central_us_per_delivery(),
            fmt_ms(r.pct_ms(50.0)),
            fmt_ms(r.pct_ms(99.0)),
            fmt_ms(r.pct_ms(100.0)),
            r.lost,
            r.duplicates,
            r.lagged,
            thousands(r.kv_bytes_per_1k_tokens())
        );
    };
    for (n, r) in &flat {
        rows("flat out", *n, r);
    }
    for (rate, r) in &paced {
        let n = ((*rate as f64) * o.paced_secs).ceil() as u64;
        rows(&format!("paced {rate}/s"), n, r);
    }
    let notes = flat
        .iter()
        .map(|(n, r)| (format!("flat out {n}"), r))
        .chain(paced.iter().map(|(rate, r)| (format!("paced {rate}/s"), r)));
    for (what, r) in notes {
        if r.timed_out + r.failed > 0 || r.not_ended > 0 {
            println!(
                "  {what}: {} race(s) timed out, {} failed, {} client(s) without `end`{}",
                r.timed_out,
                r.failed,
                r.not_ended,
                r.errors.last().map_or(String::new(), |e| format!(": {e}"))
            );
        }
    }
    let ceiling_rate = ceiling["messages_per_s"].as_f64().unwrap_or(0.0);
    println!();
    println!(
        "raw JetStream publish ceiling (same publishers, no central): {} messages/s ({} messages in {:.2} s)",
        thousands(ceiling_rate),
        thousands(ceiling["messages"].as_f64().unwrap_or(0.0)),
        ceiling["seconds"].as_f64().unwrap_or(0.0)
    );
    for (n, r) in &flat {
        println!(
            "  flat {n}: {} events/s ingested by central ({} deliveries/s over {} clients) = {:.0}% of the ceiling",
            thousands(r.rate() / o.m as f64),
            thousands(r.rate()),
            o.m,
            100.0 * r.rate() / o.m as f64 / ceiling_rate.max(1.0)
        );
    }
    if kv_slow.load(Ordering::Relaxed) > 0 {
        println!("  (the KV meter was a slow consumer: KV bytes are a lower bound)");
    }

    // ---- targets
    let big = flat
        .iter_mut()
        .max_by_key(|(n, _)| *n)
        .map(|(n, r)| (*n, r.rate(), r.central_us_per_delivery(), r.lost));
    let small = flat
        .iter()
        .min_by_key(|(n, _)| *n)
        .map(|(n, r)| (*n, r.central_us_per_delivery()));
    let mut targets = Vec::new();
    let mut target = |name: String, measured: String, ok: bool| {
        targets.push(json!({"target": name, "measured": measured, "pass": ok}));
    };
    if let Some((n, rate, us, lost)) = big {
        target(
            format!("flat out (5,5) at {n}/agent: >= 180,000 deliveries/s"),
            thousands(rate),
            rate >= 180_000.0,
        );
        target(
            format!("flat out at {n}/agent: <= 5 µs central CPU per delivery"),
            format!("{us:.2} µs"),
            us <= 5.0,
        );
        if let Some((sn, sus)) = small.filter(|(sn, _)| *sn != n) {
            let ratio = us / sus.max(1e-9);
            target(
                format!("same cost per delivery at {sn} and {n} per job (within 25%)"),
                format!("{sus:.2} µs vs {us:.2} µs (x{ratio:.2})"),
                (0.75..=1.25).contains(&ratio),
            );
        }
        target(
            format!("zero loss at {n}/agent"),
            format!("{lost} lost"),
            lost == 0,
        );
    }
    let checked = format!(
        "{} forged, {} unsigned",
        forged.map_or("?".into(), |n| n.to_string()),
        unsigned.map_or("?".into(), |n| n.to_string())
    );
    if o.unsigned {
        target(
            "--unsigned: no event refused (0 forged)".into(),
            checked,
            forged == Some(0),
        );
    } else {
        target(
            "events signed by the agents' announced keys (0 forged, 0 unsigned)".into(),
            checked,
            forged == Some(0) && unsigned == Some(0),
        );
    }
    for (rate, r) in &paced {
        let limit = if *rate <= 100 { 5.0 } else { 10.0 };
        let p99 = r.pct_ms(99.0);
        target(
            format!("paced {rate} ev/s per agent: p99 <= {limit} ms"),
            fmt_ms(p99),
            p99.is_some_and(|p| p <= limit),
        );
    }
    println!();
    println!("| target | measured | |");
    println!("|---|---:|---|");
    for t in &targets {
        println!(
            "| {} | {} | {} |",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or(""),
            pass(t["pass"].as_bool().unwrap_or(false))
        );
    }

    let doc = json!({
        "bench": "pipeline",
        "label": label,
        "central_bin": b.central.bin.display().to_string(),
        "nats_server": server_version,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "unix_ms": unix_ms(),
        "loadavg_1m_at_start": load_start,
        "k": o.k, "m": o.m, "signed": !o.unsigned, "window": WINDOW, "text_len": TEXT_LEN,
        "ceiling": ceiling,
        "flat": flat.iter().map(|(n, r)| json!({"events_per_agent": n, "result": r.json()})).collect::<Vec<_>>(),
        "paced": paced.iter().map(|(rate, r)| json!({"events_per_s_per_agent": rate, "seconds": o.paced_secs, "result": r.json()})).collect::<Vec<_>>(),
        "central_rss_kb_at_end": central_rss_kb,
        "kv_meter_slow_consumer": kv_slow.load(Ordering::Relaxed),
        "targets": targets,
    });
    drop(nats);
    Ok((doc, lost_any))
}

/// Central's /metrics text (None when it does not answer within 5 s).
async fn metrics_text(http: &reqwest::Client, base: &str) -> Option<String> {
    http.get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// A counter in central's /metrics, if it has it.
async fn counter_metric(http: &reqwest::Client, base: &str, name: &str) -> Option<u64> {
    let text = metrics_text(http, base).await?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|v| v as u64)
}

// ---------------------------------------------------------------- jobs mode

/// Jobs central counts: the sum of `bench_central_jobs{state=...}` in /metrics, if it has one.
async fn jobs_metric(http: &reqwest::Client, base: &str) -> Option<u64> {
    let text = metrics_text(http, base).await?;
    let mut found = false;
    let sum: f64 = text
        .lines()
        .filter(|l| l.starts_with("bench_central_jobs{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .inspect(|_| found = true)
        .sum();
    found.then_some(sum as u64)
}

/// Distinct jobs with `prefix` that `GET /api/jobs` pages through.
async fn count_listed(http: &reqwest::Client, base: &str, prefix: &str) -> anyhow::Result<u64> {
    let mut seen = HashSet::new();
    let mut before: Option<u64> = None;
    for _ in 0..10_000 {
        let url = match before {
            // `before` is exclusive: jobs created in the same ms as the page's last are listed
            // again and counted once.
            Some(b) => format!("{base}/api/jobs?limit=500&before={}", b + 1),
            None => format!("{base}/api/jobs?limit=500"),
        };
        let (status, v) = get_json(http, &url).await?;
        if status != 200 {
            bail!("GET /api/jobs: HTTP {status}");
        }
        let mut new = 0;
        for j in v["jobs"].as_array().into_iter().flatten() {
            if let Some(id) = j["job_id"].as_str().filter(|id| id.starts_with(prefix)) {
                new += usize::from(seen.insert(id.to_string()));
            }
        }
        match v["next_before"].as_u64() {
            Some(b) if new > 0 => before = Some(b),
            _ => break,
        }
    }
    Ok(seen.len() as u64)
}

/// Waits until central counts (cheap, polled often) or lists (paged, polled every 2 s) `n` jobs.
async fn wait_indexed(
    http: &reqwest::Client,
    base: &str,
    prefix: &str,
    n: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut listed_at: Option<Instant> = None;
    loop {
        if jobs_metric(http, base).await.unwrap_or(0) >= n {
            return Ok(());
        }
        if listed_at.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            listed_at = Some(Instant::now());
            if count_listed(http, base, prefix).await.unwrap_or(0) >= n {
                return Ok(());
            }
        }
        if t0.elapsed() > limit {
            bail!("central counted and listed fewer than {n} jobs after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn jobs(o: &Opts, label: &str) -> anyhow::Result<Value> {
    let _ = now_ns();
    let load_start = loadavg();
    let nats = NatsServer::start();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let dir = tempfile::tempdir()?;
    let mut central =
        Central::start(&o.central_bin, dir.path(), &nats.url(), &http, SETUP_WAIT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kb(central.pid());
    let mut agents = connect_agents(&nats.url(), o.k, "stored", !o.unsigned).await?;
    let prefix = format!("stored-{}", unique());
    let n = o.jobs;
    eprintln!(
        "jobs: storing {n} finished jobs (job_accepted + job_done) from {} agents",
        o.k
    );
    let t0 = Instant::now();
    for i in 0..n {
        let job_id = format!("{prefix}-{i}");
        let a = &mut agents[i as usize % o.k];
        let mut run = a.begin(&job_id, subjects::events(&job_id));
        let accepted = accepted_kind(&job_id, &a.label, 16);
        a.publish(&mut run, &accepted).await?;
        let m = metrics(16, 300);
        a.publish(&mut run, &done_kind(m, "Unified memory ...".into()))
            .await?;
    }
    for a in &mut agents {
        a.drain().await?;
    }
    let published = t0.elapsed();
    let limit = Duration::from_secs(60) + Duration::from_millis(n * 20);
    wait_indexed(&http, &central.base(), &prefix, n, limit).await?;
    let indexed_total = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kb(central.pid());

    eprintln!("jobs: restarting central with {n} stored jobs");
    central.stop();
    let t_restart = Instant::now();
    let central2 = Central::start(&o.central_bin, dir.path(), &nats.url(), &http, limit).await?;
    let healthy = t_restart.elapsed();
    let base = central2.base();
    let deadline = Instant::now() + limit;
    let first_list = loop {
        if let Ok((200, v)) = get_json(&http, &format!("{base}/api/jobs?limit=1")).await {
            if v["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
                break t_restart.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!("restarted central listed no job in {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    wait_indexed(&http, &base, &prefix, n, limit).await?;
    let all_listed = t_restart.elapsed();
    // What a client paging through GET /api/jobs finds (the counter above may be /metrics).
    let t_page = Instant::now();
    let listed = count_listed(&http, &base, &prefix).await.ok();
    let page_all = t_page.elapsed();
    let rss_restarted = rss_kb(central2.pid());
    drop(central2);
    drop(nats);

    let mb = |kb: Option<u64>| kb.map_or("-".into(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0));
    println!();
    println!(
        "jobs: central {label} ({}), {n} stored finished jobs",
        o.central_bin.display()
    );
    println!();
    println!("| | |");
    println!("|---|---:|");
    println!("| central RSS before | {} |", mb(rss_before));
    println!("| central RSS with {n} jobs indexed | {} |", mb(rss_after));
    println!(
        "| published (2 events per job) | {:.2} s |",
        published.as_secs_f64()
    );
    println!(
        "| first publish -> all indexed | {:.2} s |",
        indexed_total.as_secs_f64()
    );
    println!(
        "| restart -> /health | {:.0} ms |",
        healthy.as_secs_f64() * 1e3
    );
    println!(
        "| restart -> GET /api/jobs lists jobs | {:.0} ms |",
        first_list.as_secs_f64() * 1e3
    );
    println!(
        "| restart -> all {n} listed | {:.0} ms |",
        all_listed.as_secs_f64() * 1e3
    );
    println!(
        "| GET /api/jobs paged through after restart | {} jobs in {:.0} ms |",
        listed.map_or("-".into(), |l| l.to_string()),
        page_all.as_secs_f64() * 1e3
    );
    println!("| central RSS after restart | {} |", mb(rss_restarted));
    Ok(json!({
        "bench": "jobs",
        "label": label,
        "central_bin": o.central_bin.display().to_string(),
        "jobs": n,
        "rss_kb_before": rss_before,
        "rss_kb_indexed": rss_after,
        "rss_kb_after_restart": rss_restarted,
        "publish_s": published.as_secs_f64(),
        "publish_to_indexed_s": indexed_total.as_secs_f64(),
        "restart_to_health_ms": healthy.as_secs_f64() * 1e3,
        "restart_to_first_list_ms": first_list.as_secs_f64() * 1e3,
        "restart_to_all_listed_ms": all_listed.as_secs_f64() * 1e3,
        "paged_listing_after_restart": {"jobs": listed, "ms": page_all.as_secs_f64() * 1e3},
        "unix_ms": unix_ms(),
        "loadavg_1m_at_start": load_start,
    }))
}

fn main() -> std::process::ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pipeline: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let label = source_label(&opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match opts.mode.as_str() {
            "jobs" => jobs(&opts, &label).await.map(|d| (d, false)),
            _ => pipeline(&opts, &label).await,
        }
    });
    match result {
        Ok((doc, lost)) => {
            match write_json(&opts.mode, &label, &doc) {
                Ok(p) => println!("\nwritten: {}", p.display()),
                Err(e) => eprintln!("pipeline: could not write results: {e:#}"),
            }
            if lost {
                eprintln!("pipeline: events were lost (see the table)");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pipeline: could not run: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
