//! Real processes for the chaos and hostile tests: the `bench-central` and `bench-agent`
//! binaries, started from YAML configs written into a temp folder, killed with SIGKILL (what
//! `kill -9` sends) and started again with the same config and port; their logs kept; their
//! resident memory read from `/proc/<pid>/status`. Also an HTTP client whose every call is
//! bounded and returns failures as values (a test that kills central must see them), a seeded
//! RNG, and a reader of the whole `BENCH_EVENTS` stream.
//!
//! Included with `#[path = "common/procs.rs"] mod procs;` (it does not need `common/mod.rs`).
#![allow(dead_code)]

use futures::StreamExt;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use bench_nats::harness::{free_port, within, workspace_root, NatsServer};

/// Wall-clock unix ms (the NATS server's clock is the same machine's).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---- binaries ----

/// `target/<profile>/bench-central`, built by cargo for central's tests.
pub fn central_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bench-central"))
}

/// `bench-agent` beside `bench-central` (same target folder and profile), else under the
/// workspace's `target/debug/`. Cargo builds it only for the agent's own tests, so a run of
/// central's tests alone may find it missing (or older than the agent's sources).
pub fn agent_binary() -> PathBuf {
    let beside = central_binary().with_file_name("bench-agent");
    let candidates = [beside, workspace_root().join("target/debug/bench-agent")];
    for c in &candidates {
        if c.exists() {
            return c.clone();
        }
    }
    panic!(
        "the bench-agent binary is missing (looked at {:?}): build it with \
         `cargo build -p bench-agent` (or run `cargo test --workspace`, which builds it)",
        candidates
    );
}

// ---- processes ----

/// One program that can be killed with SIGKILL and started again the same way.
pub struct Proc {
    /// Shown in messages.
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    /// stdout and stderr of every start, appended.
    pub log: PathBuf,
    child: Option<Child>,
    /// How often it was started.
    pub starts: u32,
}

impl Proc {
    /// Describes a process (not started).
    pub fn new(
        name: &str,
        bin: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
        cwd: &Path,
        log: PathBuf,
    ) -> Self {
        Self {
            name: name.to_string(),
            bin,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: cwd.to_path_buf(),
            log,
            child: None,
            starts: 0,
        }
    }

    /// Adds (or replaces) an environment variable for the next starts.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts it (a no-op when it runs).
    pub fn spawn(&mut self) {
        if self.child.is_some() {
            return;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open process log");
        let _ = writeln!(log, "==== start #{} at {} ms", self.starts + 1, now_ms());
        let err = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .env("RUST_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} ({}): {e}", self.name, self.bin.display()));
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL, then reaps it. Returns whether it was running.
    pub fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Whether it was started and has not exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its exit status, when it exited on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(&format!("/proc/{}/status", self.pid()?))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `VmRSS` in KiB from a `/proc/.../status` file.
pub fn rss_kib_of(status_file: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status_file).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `bench-central` process on a fixed loopback port (the same after every restart).
pub struct Central {
    /// The process.
    pub proc: Proc,
    /// Its HTTP port.
    pub port: u16,
    /// `results_dir`.
    pub results: PathBuf,
}

impl Central {
    /// Writes its config into `dir` (results in `dir/results`) and describes the process;
    /// `extra_yaml` adds keys (stall_timeout_s, ...).
    pub fn new(dir: &Path, nats_url: &str, extra_yaml: &str) -> Self {
        let port = free_port();
        let results = dir.join("results");
        let web = dir.join("web");
        std::fs::create_dir_all(&web).expect("web dir");
        std::fs::write(web.join("index.html"), "<h1>bench-race</h1>").expect("index.html");
        let cfg = dir.join("central.yaml");
        std::fs::write(
            &cfg,
            format!(
                "host: 127.0.0.1\nport: {port}\nnats: {{url: \"{nats_url}\"}}\n\
                 results_dir: \"{}\"\nweb_dir: \"{}\"\n{extra_yaml}",
                results.display(),
                web.display()
            ),
        )
        .expect("central config");
        let cfg_s = cfg.display().to_string();
        let proc = Proc::new(
            "central",
            central_binary(),
            &["--config", &cfg_s],
            &[("NATS_URL", nats_url)],
            dir,
            dir.join("central.log"),
        );
        Self {
            proc,
            port,
            results,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A `bench-agent` process with the mock engine at `tokens_per_s`, heart-beating every 0.5 s,
/// its `/health` on `bind_port` (0: any free port).
pub fn agent(
    dir: &Path,
    machine_id: &str,
    nats_url: &str,
    tokens_per_s: f64,
    ttft_ms: u64,
    bind_port: u16,
) -> Proc {
    let cfg = dir.join(format!("agent-{machine_id}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "machine_id: {machine_id}\nlabel: \"Agent {machine_id}\"\nengine: mock\n\
             mock: {{tokens_per_s: {tokens_per_s}, ttft_ms: {ttft_ms}}}\nllm_models: [mock-7b]\n\
             bind_host: 127.0.0.1\nbind_port: {bind_port}\nheartbeat_s: 0.5\nnats: {{url: \"{nats_url}\"}}\n"
        ),
    )
    .expect("agent config");
    let cfg_s = cfg.display().to_string();
    Proc::new(
        machine_id,
        agent_binary(),
        &["--config", &cfg_s],
        &[("NATS_URL", nats_url)],
        dir,
        dir.join(format!("agent-{machine_id}.log")),
    )
}

// ---- HTTP ----

/// Status and body (JSON, or the text as a JSON string).
pub type Answer = (u16, Value);

/// An HTTP client whose calls never hang: connect and whole-request timeouts, and failures
/// (refused, reset, timed out) returned as `Err(text)`.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
}

impl Http {
    /// Calls time out after `timeout` (connecting after 2 s).
    pub fn new(timeout: Duration) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(4)
                .build()
                .expect("HTTP client"),
        }
    }

    /// The underlying client (for requests these helpers do not build).
    pub fn raw(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a built request and reads the whole answer.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, String> {
        let resp = req.send().await.map_err(|e| describe(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| describe(&e))?;
        Ok((
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        ))
    }

    /// `GET`.
    pub async fn get(&self, url: &str) -> Result<Answer, String> {
        self.send(self.client.get(url)).await
    }

    /// `POST` of a JSON body.
    pub async fn post(&self, url: &str, body: &Value) -> Result<Answer, String> {
        self.send(self.client.post(url).json(body)).await
    }
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut s = format!("{kind}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// Polls `f` every `every` until it returns Some, for at most `limit`; None when it never did.
pub async fn poll<T, F, Fut>(limit: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        // Each attempt is bounded too: a hung call counts as a failed one.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left.max(Duration::from_millis(1)), f()).await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until central answers `GET /health` with `ok: true` (serving, NATS connected).
pub async fn central_healthy(http: &Http, base: &str, limit: Duration) -> bool {
    poll(limit, Duration::from_millis(100), || async {
        match http.get(&format!("{base}/health")).await {
            Ok((200, v)) if v["ok"] == true => Some(()),
            _ => None,
        }
    })
    .await
    .is_some()
}

/// Waits until every named machine is online or busy in `GET /api/machines`.
pub async fn machines_online(http: &Http, base: &str, ids: &[&str], limit: Duration) -> bool {
    poll(limit, Duration::from_millis(100), || async {
        let (s, v) = http.get(&format!("{base}/api/machines")).await.ok()?;
        let ms = v["machines"].as_array().filter(|_| s == 200)?.clone();
        ids.iter()
            .all(|id| {
                ms.iter()
                    .any(|m| m["machine_id"] == *id && m["status"] != "offline")
            })
            .then_some(())
    })
    .await
    .is_some()
}

// ---- RNG ----

/// SplitMix64: small, seeded, reproducible (the chaos must be replayable from its seed).
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A duration uniform in `lo_ms..=hi_ms`.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    /// One element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

/// The seed from `var` when set (to replay a run), else from the clock; printed either way.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a u64 seed")),
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

// ---- the stream ----

/// One stored message of `BENCH_EVENTS`.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub stream_seq: u64,
    /// Subject it was published on.
    pub subject: String,
    /// `Nats-Msg-Id` header, when it had one.
    pub msg_id: Option<String>,
    /// `Bench-Sig` header, when it had one.
    pub signature: Option<String>,
    /// The payload parsed as JSON (Null when it is not JSON).
    pub event: Value,
}

/// Every message `BENCH_EVENTS` holds now, in stream order.
pub async fn read_stream(nc: &async_nats::Client) -> Vec<Stored> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use async_nats::jetstream::consumer::DeliverPolicy;
    let js = async_nats::jetstream::new(nc.clone());
    let mut stream = within(
        "get BENCH_EVENTS",
        Duration::from_secs(10),
        js.get_stream(bench_schemas::subjects::EVENTS_STREAM),
    )
    .await
    .expect("BENCH_EVENTS exists");
    let info = within("stream info", Duration::from_secs(10), stream.info())
        .await
        .expect("stream info");
    let (first, last, count) = (
        info.state.first_sequence,
        info.state.last_sequence,
        info.state.messages,
    );
    let mut out = Vec::with_capacity(count as usize);
    if count == 0 {
        return out;
    }
    let consumer = within(
        "ordered consumer",
        Duration::from_secs(10),
        stream.create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ..Default::default()
        }),
    )
    .await
    .expect("ordered consumer");
    let mut msgs = within("messages", Duration::from_secs(10), consumer.messages())
        .await
        .expect("messages");
    while let Some(m) = within("next stored message", Duration::from_secs(15), msgs.next()).await {
        let m = m.expect("stored message");
        let info = m.info().expect("message info");
        let stream_seq = info.stream_sequence;
        out.push(Stored {
            stream_seq,
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string()),
            signature: m
                .headers
                .as_ref()
                .and_then(|h| h.get(bench_schemas::subjects::SIGNATURE_HEADER))
                .map(|v| v.to_string()),
            event: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
        });
        if stream_seq >= last {
            break;
        }
    }
    out
}

/// The first place two JSON values differ (`None` when equal), as a path and both sides.
pub fn first_diff(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                first_diff(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_diff(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        (Value::String(x), Value::String(y)) => {
            let at = x
                .char_indices()
                .zip(y.chars())
                .find(|((_, p), q)| p != q)
                .map(|((i, _), _)| i)
                .unwrap_or(x.len().min(y.len()));
            let around = |s: &str| {
                let from = (0..=at.saturating_sub(20))
                    .rev()
                    .find(|i| s.is_char_boundary(*i))
                    .unwrap_or(0);
                s[from..].chars().take(40).collect::<String>()
            };
            Some(format!(
                "{path}: strings of {} and {} bytes differ from byte {at}: {:?} vs {:?}",
                x.len(),
                y.len(),
                around(x),
                around(y)
            ))
        }
        _ => {
            let show = |v: &Value| {
                let s = v.to_string();
                if s.len() > 160 {
                    let mut cut = 160;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    format!("{}…", &s[..cut])
                } else {
                    s
                }
            };
            Some(format!("{path}: {} vs {}", show(a), show(b)))
        }
    }
}
