//! Shared by the agent's integration tests: a real nats-server, agents in-process, and helpers
//! that await events with timeouts (never sleeps).
#![allow(dead_code, unused_imports)]

use bench_agent::config::{Config, Env};
use bench_agent::AgentHandle;
use bench_schemas::{subjects, Event, EventKind, JobReply};
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use bench_nats::harness::{client, within, LlamaServer, NatsServer, ENGINE_MODEL, WAIT};

pub fn config(yaml: &str, nats_url: &str) -> Config {
    let env: Env = [("NATS_URL".to_string(), nats_url.to_string())].into();
    let yaml = format!("bind_port: 0\nstream_flush_chars: 1\n{yaml}");
    Config::parse(&yaml, Path::new("test-agent.yaml"), &env).expect("test config")
}

pub use bench_agent::LocalAgent as TestAgent;

pub async fn start_agent(cfg: Config, nats_url: &str) -> TestAgent {
    within("agent start", WAIT, TestAgent::start(cfg))
        .await
        .unwrap_or_else(|e| panic!("agent on {nats_url} starts: {e:#}"))
}

/// Sends `job` (raw bytes) as a request and parses the reply.
pub async fn request(
    c: &async_nats::Client,
    subject: String,
    body: impl Into<bytes::Bytes>,
) -> JobReply {
    let msg = within("job reply", WAIT, c.request(subject, body.into()))
        .await
        .expect("request answered");
    serde_json::from_slice(&msg.payload).unwrap_or_else(|e| panic!("reply {:?}: {e}", msg.payload))
}

/// Collects the events of a job on core NATS.
pub struct Events {
    sub: async_nats::Subscriber,
    pub seen: Vec<Event>,
}

impl Events {
    pub async fn watch(c: &async_nats::Client, job_id: &str) -> Self {
        let sub = c
            .subscribe(subjects::events(job_id))
            .await
            .expect("subscribe");
        c.flush().await.expect("flush");
        Self {
            sub,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event.
    pub async fn next(&mut self) -> Event {
        let msg = within("next event", WAIT, self.sub.next())
            .await
            .expect("subscription open");
        let e: Event = serde_json::from_slice(&msg.payload).expect("event parses");
        self.seen.push(e.clone());
        e
    }

    /// Waits until an event matching `pred` arrives; returns it.
    pub async fn until(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        loop {
            let e = self.next().await;
            if pred(&e) {
                return e;
            }
        }
    }

    /// Waits for the terminal event of `machine_id`.
    pub async fn terminal(&mut self, machine_id: &str) -> Event {
        self.until(|e| e.machine_id == machine_id && e.kind.is_terminal())
            .await
    }

    /// The types of the events seen, telemetry samples left out (they come at the sampler's
    /// pace, between any two events of the run).
    pub fn types(&self) -> Vec<&'static str> {
        self.seen
            .iter()
            .map(|e| e.kind.name())
            .filter(|t| *t != "telemetry")
            .collect()
    }

    pub fn text(&self, repeat_index: u32) -> String {
        self.seen
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::LlmToken(t) if t.repeat_index == repeat_index => Some(t.text.as_str()),
                _ => None,
            })
            .collect()
    }
}

pub fn job_json(model: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut v =
        serde_json::json!({"model": model, "prompt": "The capital of France is", "max_tokens": 16});
    if let serde_json::Value::Object(m) = extra {
        for (k, val) in m {
            v[k] = val;
        }
    }
    serde_json::to_vec(&v).unwrap()
}

/// A measured number against the known truth: within `pct` percent of `want` (a missing
/// number fails).
pub fn within_pct(what: &str, got: impl Into<Option<f64>>, want: f64, pct: f64) {
    let got = got
        .into()
        .unwrap_or_else(|| panic!("{what}: missing, want {want}"));
    assert!(
        ((got - want) / want).abs() * 100.0 <= pct,
        "{what}: got {got}, want {want} within {pct}%"
    );
}

/// A measured time against the known truth: within `ms` of `want`.
pub fn within_ms(what: &str, got: f64, want: f64, ms: f64) {
    assert!(
        (got - want).abs() <= ms,
        "{what}: got {got} ms, want {want} ms within {ms} ms"
    );
}

pub mod fake_engine;
pub mod proxy;

/// Every stored event of `job_id`, in stream order, read once `terminals` terminal events are
/// stored, plus anything stored behind them (so that a copy stored twice would show).
pub async fn stored_events(
    js: &async_nats::jetstream::Context,
    job_id: &str,
    terminals: usize,
) -> Vec<Event> {
    use async_nats::jetstream::consumer::pull;
    let stream = within("stream", WAIT, js.get_stream(subjects::EVENTS_STREAM))
        .await
        .expect("stream exists");
    let consumer = within(
        "ordered consumer",
        WAIT,
        stream.create_consumer(pull::OrderedConfig {
            filter_subject: subjects::events(job_id),
            ..Default::default()
        }),
    )
    .await
    .expect("ordered consumer");
    let mut messages = within("messages", WAIT, consumer.messages())
        .await
        .expect("messages");
    let mut out = Vec::new();
    let mut seen = 0;
    loop {
        let msg = within("stored event", WAIT, messages.next())
            .await
            .expect("open")
            .expect("message");
        let e: Event = serde_json::from_slice(&msg.payload).expect("event");
        seen += usize::from(e.kind.is_terminal());
        out.push(e);
        if seen >= terminals && msg.info().expect("jetstream message").pending == 0 {
            return out;
        }
    }
}

/// Asserts that one run's events are its seq 1..n, each once, in stream order.
pub fn assert_gapless(events: &[&Event]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "a gap, a copy stored twice or a reorder in the stored events"
    );
}

/// The agent's `/health`.
pub async fn health(agent: &TestAgent) -> serde_json::Value {
    let url = format!("http://{}/health", agent.http_addr());
    within("health", WAIT, async {
        reqwest::get(&url)
            .await
            .expect("health answers")
            .json()
            .await
            .expect("health is JSON")
    })
    .await
}

/// Waits until `/health` satisfies `pred` (polled: an agent cut off from NATS can only be
/// observed there).
pub async fn health_until(
    agent: &TestAgent,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within(what, WAIT, async {
        loop {
            let h = health(agent).await;
            if pred(&h) {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
