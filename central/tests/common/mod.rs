//! Shared by central's integration tests: a real nats-server, central and agents in-process, an
//! HTTP client on the real socket, an SSE frame reader, and waits that poll or await with a
//! timeout (never a bare sleep as synchronisation).
#![allow(dead_code, unused_imports)]

use bench_central::config::Config;
use bench_central::CentralHandle;
use futures::StreamExt;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use bench_nats::harness::{client, within, LlamaServer, NatsServer, ENGINE_MODEL, WAIT};

/// Polls `f` every 20 ms until it returns Some, for at most `WAIT`.
pub async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(what, WAIT, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---- agents ----

pub use bench_agent::LocalAgent as TestAgent;

/// An agent from YAML (bind_port 0, fast heartbeats) on `nats_url`.
pub async fn start_agent(yaml: &str, nats_url: &str) -> TestAgent {
    let env: bench_agent::config::Env = [("NATS_URL".to_string(), nats_url.to_string())].into();
    let yaml = format!("bind_port: 0\nheartbeat_s: 0.5\n{yaml}");
    let cfg = bench_agent::config::Config::parse(&yaml, Path::new("test-agent.yaml"), &env)
        .expect("agent config");
    within("agent start", WAIT, TestAgent::start(cfg))
        .await
        .expect("agent starts")
}

/// A mock agent offering `model`.
pub async fn mock_agent(
    machine_id: &str,
    model: &str,
    tokens_per_s: f64,
    nats_url: &str,
) -> TestAgent {
    let yaml = format!(
        "machine_id: {machine_id}\nlabel: Mock {machine_id}\nengine: mock\nmock: {{tokens_per_s: {tokens_per_s}, ttft_ms: 5}}\nllm_models: [{model}]\n"
    );
    start_agent(&yaml, nats_url).await
}

// ---- central ----

pub struct TestCentral {
    pub handle: Option<CentralHandle>,
    pub token: CancellationToken,
    pub client: async_nats::Client,
}

impl TestCentral {
    pub fn base(&self) -> String {
        format!("http://{}", self.handle.as_ref().expect("running").addr)
    }
    pub fn state(&self) -> bench_central::AppState {
        self.handle.as_ref().expect("running").state.clone()
    }
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            within("central shutdown", WAIT, h.join()).await;
        }
    }
}

impl Drop for TestCentral {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A nats-server with the least-privilege accounts of `nats/conf/auth.conf` for these agents
/// (machine id, identity), central and an observer.
pub fn least_privilege_server(
    agents: &[(&str, &bench_nats::auth::Identity)],
    central: &bench_nats::auth::Identity,
    observer: &bench_nats::auth::Identity,
) -> NatsServer {
    let users: Vec<(String, String)> = agents
        .iter()
        .map(|(id, who)| (id.to_string(), who.public.clone()))
        .collect();
    let conf = bench_nats::auth::render_accounts(&users, &central.public, &observer.public);
    NatsServer::start_with_config(Some(&conf))
}

/// Writes `id`'s seed to `<dir>/<name>.nk` (a client's `nkey_seed_file`).
pub fn seed_file(dir: &Path, name: &str, id: &bench_nats::auth::Identity) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.nk"));
    std::fs::write(&p, &id.seed).expect("seed file");
    p
}

/// A test config: results in `results_dir`, short timeouts.
pub fn central_config(nats_url: &str, results_dir: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.nats.url = Some(nats_url.to_string());
    cfg.results_dir = results_dir.to_path_buf();
    cfg.web_dir = results_dir.join("web");
    cfg.broadcast_window = Duration::from_secs(2);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.nats_wait = Duration::from_secs(10);
    cfg
}

pub async fn start_central(cfg: Config) -> TestCentral {
    let url = cfg.nats.url.clone().expect("url");
    let client = client(&url).await;
    start_central_on(cfg, client).await.expect("central starts")
}

/// Central in-process on `client` (connected as the test needs) and a free loopback port.
pub async fn start_central_on(
    cfg: Config,
    client: async_nats::Client,
) -> Result<TestCentral, bench_central::error::StartError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let token = CancellationToken::new();
    let handle = within(
        "central start",
        WAIT,
        bench_central::start(cfg, client.clone(), listener, token.clone()),
    )
    .await?;
    Ok(TestCentral {
        handle: Some(handle),
        token,
        client,
    })
}

/// Central connected as its config says (credentials, URL list), as `bench-central` connects.
pub async fn start_central_connected(
    cfg: Config,
) -> Result<TestCentral, bench_central::error::StartError> {
    let client = bench_nats::connect(&cfg.nats, "bench-central")
        .await
        .expect("central connects");
    start_central_on(cfg, client).await
}

/// The real-engine race: the demo llama-server, a nats-server, central, an agent on the
/// engine (`llama`, label "Real llama.cpp", plus `llama_yaml`) and a mock agent (`mock`) at
/// `mock_tokens_per_s`, both online. Fields drop in the order they are declared: agents first.
pub struct LlamaRace {
    pub mock: TestAgent,
    pub llama: TestAgent,
    pub central: TestCentral,
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub engine: LlamaServer,
}

impl LlamaRace {
    pub async fn start(llama_yaml: &str, mock_tokens_per_s: f64) -> Self {
        let engine = LlamaServer::start();
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let central = start_central(central_config(&nats.url(), dir.path())).await;
        let llama = start_agent(
            &format!(
                "machine_id: llama\nlabel: Real llama.cpp\nengine: openai\nopenai_base_url: {}\n{llama_yaml}",
                engine.url()
            ),
            &nats.url(),
        )
        .await;
        let mock = mock_agent("mock", ENGINE_MODEL, mock_tokens_per_s, &nats.url()).await;
        machines_online(&central.base(), &["llama", "mock"]).await;
        Self {
            mock,
            llama,
            central,
            dir,
            nats,
            engine,
        }
    }
}

// ---- HTTP ----

/// A job's CSV export, as text (bounded like every request).
pub async fn csv_export(base: &str, job_id: &str) -> String {
    let url = format!("{base}/api/jobs/{job_id}/export.csv");
    let resp = within("CSV export", WAIT, reqwest::get(&url))
        .await
        .expect("GET export.csv");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    within("CSV body", WAIT, resp.text())
        .await
        .expect("CSV body")
}

pub async fn get(base: &str, path: &str) -> (u16, Value) {
    let resp = within(
        path,
        WAIT,
        reqwest::Client::new().get(format!("{base}{path}")).send(),
    )
    .await
    .expect("GET");
    let status = resp.status().as_u16();
    let text = within(path, WAIT, resp.text()).await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = within(
        path,
        WAIT,
        reqwest::Client::new()
            .post(format!("{base}{path}"))
            .json(body)
            .send(),
    )
    .await
    .expect("POST");
    let status = resp.status().as_u16();
    let text = within(path, WAIT, resp.text()).await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Waits until `GET /api/jobs/{id}` satisfies `ok`, and returns it.
pub async fn job_when(base: &str, job_id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/api/jobs/{job_id}");
    until(what, || async {
        let (status, v) = get(base, &path).await;
        (status == 200 && ok(&v)).then_some(v)
    })
    .await
}

pub async fn job_finished(base: &str, job_id: &str) -> Value {
    job_when(base, job_id, "job finished", |v| v["status"] != "running").await
}

/// Waits until every named machine is online (or busy) in `GET /api/machines`.
pub async fn machines_online(base: &str, ids: &[&str]) {
    until("machines online", || async {
        let (_, v) = get(base, "/api/machines").await;
        let ms = v["machines"].as_array()?.clone();
        ids.iter()
            .all(|id| {
                ms.iter()
                    .any(|m| m["machine_id"] == *id && m["status"] != "offline")
            })
            .then_some(())
    })
    .await
}

/// Machine `id`'s entry in a document with a `machines` list (a job, a matrix cell); panics
/// with the document when it has none.
pub fn machine_in<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["machine_id"] == id)
        .unwrap_or_else(|| panic!("no machine {id} in {doc:#}"))
}

// ---- publishing events as an agent does ----

/// A `job_accepted` of job `job_id` (model `model`) from a mock engine labelled `label`.
pub fn accepted_kind(job_id: &str, model: &str, label: &str) -> bench_schemas::EventKind {
    let mut job = bench_schemas::Job::new(model, "p");
    job.job_id = Some(job_id.into());
    bench_schemas::EventKind::JobAccepted(bench_schemas::event::Accepted {
        job,
        position: 0,
        engine: "mock".into(),
        engine_url: String::new(),
        label: label.into(),
        agent_version: "0".into(),
        fingerprint: None,
    })
}

/// Publishes envelopes (as JSON values, so tests can send what no typed event can hold) into
/// JetStream with their `Nats-Msg-Id`, 256 acks in flight at a time.
pub async fn publish_values(js: &async_nats::jetstream::Context, evs: &[Value]) {
    use std::future::IntoFuture;
    for chunk in evs.chunks(256) {
        let mut acks = Vec::new();
        for v in chunk {
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            let id = bench_schemas::subjects::msg_id(
                &text("job_id"),
                &text("machine_id"),
                &text("run_id"),
                v["seq"].as_u64().unwrap_or(0),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            acks.push(
                js.publish_with_headers(
                    bench_schemas::subjects::events(&text("job_id")),
                    headers,
                    serde_json::to_vec(v).unwrap().into(),
                )
                .await
                .unwrap(),
            );
        }
        for ack in acks {
            within("publish ack", WAIT, ack.into_future())
                .await
                .unwrap();
        }
    }
}

/// [`publish_values`] of typed events.
pub async fn publish_events(js: &async_nats::jetstream::Context, evs: &[bench_schemas::Event]) {
    let values: Vec<Value> = evs
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    publish_values(js, &values).await;
}

// ---- SSE ----

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<u64>,
    pub event: String,
    pub data: String,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An SSE connection on the real socket, parsed into frames.
pub struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    pub status: u16,
}

impl Sse {
    pub async fn open(url: &str, last_event_id: Option<u64>) -> Self {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = within("SSE connect", WAIT, req.send())
            .await
            .expect("SSE request");
        let status = resp.status().as_u16();
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            status,
        }
    }

    /// The next frame (comments and keep-alives skipped), or None when the server closed.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut f = Frame {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        f.id = v.trim().parse().ok();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        f.event = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !f.data.is_empty() {
                            f.data.push('\n');
                        }
                        f.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Some(f);
                }
                continue;
            }
            match within("SSE frame", WAIT, self.body.next()).await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Frames until (and including) `end`, or until the server closes.
    pub async fn until_end(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await {
            let end = f.event == "end";
            out.push(f);
            if end {
                break;
            }
        }
        out
    }
}

/// The job's stored events from `results/runs/<job>/events.ndjson`.
pub fn results_events(results_dir: &Path, job_id: &str) -> Vec<bench_schemas::Event> {
    let text = std::fs::read_to_string(results_dir.join("runs").join(job_id).join("events.ndjson"))
        .expect("events.ndjson");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("event line"))
        .collect()
}

/// Asserts each run's events (per machine and run id) are 1..n exactly once, ending with a
/// terminal event; returns the count per run (`machine` or `machine/run_id` after the first).
pub fn assert_exactly_once(
    events: &[bench_schemas::Event],
) -> std::collections::BTreeMap<String, u64> {
    let mut per: std::collections::BTreeMap<String, Vec<&bench_schemas::Event>> =
        Default::default();
    let mut first_run: std::collections::BTreeMap<String, String> = Default::default();
    for e in events.iter().filter(|e| e.seq > 0) {
        let first = first_run
            .entry(e.machine_id.clone())
            .or_insert_with(|| e.run_id.clone());
        let key = if *first == e.run_id {
            e.machine_id.clone()
        } else {
            format!("{}/{}", e.machine_id, e.run_id)
        };
        per.entry(key).or_default().push(e);
    }
    let mut counts = std::collections::BTreeMap::new();
    for (m, evs) in per {
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "machine {m}: every event once, in order"
        );
        assert!(
            evs.last().unwrap().kind.is_terminal(),
            "machine {m} ends with a terminal event"
        );
        counts.insert(m, seqs.len() as u64);
    }
    counts
}

/// One machine's events of one run of a job, as an agent numbers them (seq from 1, no gaps).
pub struct RunEvents {
    pub job: String,
    pub machine: String,
    pub seq: u64,
    pub events: Vec<bench_schemas::Event>,
}

impl RunEvents {
    pub fn new(job: &str, machine: &str) -> Self {
        Self {
            job: job.into(),
            machine: machine.into(),
            seq: 0,
            events: Vec::new(),
        }
    }

    /// Appends the next event of the run.
    pub fn push(&mut self, kind: bench_schemas::EventKind) -> &mut Self {
        self.seq += 1;
        self.events.push(bench_schemas::Event {
            job_id: self.job.clone(),
            machine_id: self.machine.clone(),
            run_id: format!("{}boot-1", self.machine),
            seq: self.seq,
            ts_ms: 1,
            kind,
        });
        self
    }

    /// The events pushed since the last take.
    pub fn take(&mut self) -> Vec<bench_schemas::Event> {
        std::mem::take(&mut self.events)
    }

    /// Appends a `job_done` over `repeats` (their summary and its medians); `edit` sets the
    /// rest (shape, stop reason, fingerprint, text).
    pub fn done_with(
        &mut self,
        repeats: Vec<bench_schemas::Metrics>,
        include_short: bool,
        edit: impl FnOnce(&mut bench_schemas::event::Done),
    ) -> &mut Self {
        let summary = bench_schemas::Summary::of(&repeats, include_short);
        let median = |s: Option<bench_schemas::Stats>| s.map(|s| s.median);
        let mut d = bench_schemas::event::Done {
            cells: Vec::new(),
            model: "m".into(),
            engine: "mock".into(),
            ttft_ms: 1.0,
            gen_tokens: 1,
            gen_tokens_per_s: median(summary.gen_tokens_per_s),
            total_ms: 1.0,
            token_count_source: bench_schemas::TokenCountSource::Mock,
            pp_tokens_per_s: median(summary.pp_tokens_per_s),
            tg_tokens_per_s: median(summary.tg_tokens_per_s),
            repeats,
            summary,
            output_text: String::new(),
            shape: None,
            stop_reason: bench_schemas::event::StopReason::Count,
            fingerprint: None,
        };
        edit(&mut d);
        self.push(bench_schemas::EventKind::JobDone(d))
    }
}
