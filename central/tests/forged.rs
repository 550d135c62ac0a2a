//! Results no agent can forge: under the least-privilege accounts (nats/src/auth.rs) agent `a`
//! may publish on any `bench.events.*`, but an event naming machine `b` must be signed by a key
//! `b` announced in its own registry entry. Central refuses the rest (counted, logged, never
//! applied, never replayed), and `b`'s real result stands.

mod common;

use bench_nats::auth::{agent_inbox_prefix, Identity};
use bench_schemas::subjects;
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// Log lines written while the test runs (for the forged-event warnings).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn install() -> Self {
        let logs = Logs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("bench_central=warn")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A counter's value in `/metrics` (0 when absent).
async fn counter(base: &str, name: &str) -> u64 {
    let (_, m) = get(base, "/metrics").await;
    let text = m.as_str().unwrap_or_default().to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Every event of the job as SSE replays it (id -> JSON), to the `end` frame.
async fn replayed(base: &str, job_id: &str) -> Vec<Value> {
    let mut sse = Sse::open(&format!("{base}/api/jobs/{job_id}/events"), None).await;
    let frames = sse.until_end().await;
    assert_eq!(frames.last().map(|f| f.event.as_str()), Some("end"));
    frames
        .iter()
        .filter(|f| f.id.is_some())
        .map(|f| f.json())
        .collect()
}

fn example(name: &str) -> Value {
    let path = bench_nats::harness::workspace_root().join(format!("schemas/messages/{name}"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A message example made an event of machine `b`'s run `run_id` of `job_id`, at `seq`.
fn example_of_b(name: &str, job_id: &str, run_id: &str, seq: u64) -> Value {
    let mut v = example(name);
    v["job_id"] = job_id.into();
    v["machine_id"] = "b".into();
    v["run_id"] = run_id.into();
    v["seq"] = seq.into();
    v
}

/// Publishes `payload` on `job_id`'s events as agent a may (`js` holds a's credentials), under
/// message id `id`, signed with `key` when given; waits until it is stored.
async fn publish_as_a(
    js: &async_nats::jetstream::Context,
    job_id: &str,
    id: &str,
    payload: &[u8],
    key: Option<&nkeys::KeyPair>,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    if let Some(key) = key {
        let sig = data_encoding::BASE64URL_NOPAD.encode(&key.sign(payload).unwrap());
        headers.insert(subjects::SIGNATURE_HEADER, sig.as_str());
    }
    let ack = js
        .publish_with_headers(subjects::events(job_id), headers, payload.to_vec().into())
        .await
        .expect("a may publish on bench.events.*");
    within(
        "a's event stored",
        WAIT,
        std::future::IntoFuture::into_future(ack),
    )
    .await
    .expect("stored in BENCH_EVENTS");
}

#[tokio::test]
async fn an_agent_cannot_forge_another_machine_s_result() {
    let logs = Logs::install();
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (central_id, observer, a, b) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let nats = least_privilege_server(&[("a", &a), ("b", &b)], &central_id, &observer);
    let seed = |name: &str, id: &Identity| seed_file(dir.path(), name, id);

    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.nats.nkey_seed_file = Some(seed("central", &central_id));
    let central = start_central_connected(cfg)
        .await
        .expect("central starts under its own permissions");
    let base = central.base();

    let agent_yaml = |id: &str, who: &Identity| {
        format!(
            "machine_id: {id}\nengine: mock\nllm_models: [mock-7b]\nmock: {{tokens_per_s: 500, ttft_ms: 1}}\nnats: {{nkey_seed_file: \"{}\", inbox_prefix: \"{}\"}}\n",
            seed(id, who).display(),
            agent_inbox_prefix(id)
        )
    };
    let _agent_a = start_agent(&agent_yaml("a", &a), &nats.url()).await;
    let _agent_b = start_agent(&agent_yaml("b", &b), &nats.url()).await;
    machines_online(&base, &["a", "b"]).await;

    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["a", "b"], "model": "mock-7b", "prompt": "hi", "max_tokens": 8, "repeat": 2}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    let job_id = out["job_id"].as_str().unwrap().to_string();
    let done = job_finished(&base, &job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    let b_before = machine_in(&done, "b").clone();
    let replay_before = replayed(&base, &job_id).await;
    let b_events: Vec<&Value> = replay_before
        .iter()
        .filter(|e| e["machine_id"] == "b")
        .collect();
    let run_id = b_events[0]["run_id"].as_str().unwrap().to_string();
    let last_seq = b_events
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    // Every real event was signed and checked: none went through unchecked.
    assert_eq!(
        counter(&base, "bench_central_events_unsigned_total").await,
        0
    );
    assert_eq!(counter(&base, "bench_central_events_forged_total").await, 0);

    // Agent a, with its own credentials, publishes results naming b (plausible seqs, b's run).
    let a_cfg = bench_nats::NatsConfig {
        url: Some(nats.url()),
        nkey_seed_file: Some(dir.path().join("a.nk")),
        inbox_prefix: Some(agent_inbox_prefix("a")),
        ..Default::default()
    };
    let forger = bench_nats::connect(&a_cfg, "forger")
        .await
        .expect("a connects");
    let js = async_nats::jetstream::new(forger);
    let a_key = nkeys::KeyPair::from_seed(&a.seed).unwrap();
    let forge = |name: &str, seq: u64| {
        let mut v = example_of_b(name, &job_id, &run_id, seq);
        match v["type"].as_str().unwrap() {
            "job_done" => {
                v["payload"]["output_text"] = "FORGED".into();
                v["payload"]["gen_tokens"] = 999_999.into();
            }
            "llm_token" => v["payload"]["text"] = "FORGED".into(),
            _ => v["payload"]["gen_tokens"] = 999_999.into(),
        }
        serde_json::to_vec(&v).unwrap()
    };
    let forged = [
        (forge("event_job_done.json", last_seq + 1), false),
        (forge("event_job_done.json", last_seq + 2), true),
        (forge("event_repeat_done.json", last_seq + 3), true),
        (forge("event_llm_token.json", last_seq + 4), false),
        (forge("event_llm_token.json", last_seq + 5), true),
    ];
    for (i, (payload, sign)) in forged.iter().enumerate() {
        let id = subjects::msg_id(&job_id, "b", &run_id, last_seq + 1 + i as u64);
        let key = sign.then_some(&a_key);
        publish_as_a(&js, &job_id, &id, payload, key).await;
    }

    let n = forged.len() as u64;
    until("forged events refused", || {
        let base = base.clone();
        async move { (counter(&base, "bench_central_events_forged_total").await >= n).then_some(()) }
    })
    .await;
    // Acknowledged with their batch: nothing left pending on the indexer.
    let stream = async_nats::jetstream::new(central.client.clone())
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .unwrap();
    until("all acked", || {
        let stream = stream.clone();
        async move {
            let i = stream
                .consumer_info(bench_central::store::INDEXER_CONSUMER)
                .await
                .ok()?;
            (i.num_ack_pending == 0 && i.num_pending == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        counter(&base, "bench_central_events_forged_total").await,
        n,
        "exactly the forged ones"
    );
    assert_eq!(
        counter(&base, "bench_central_events_unsigned_total").await,
        0
    );

    // b's result stands.
    let (_, after) = get(&base, &format!("/api/jobs/{job_id}")).await;
    assert_eq!(after["status"], "done");
    let b_after = machine_in(&after, "b");
    assert_eq!(b_after, &b_before, "b's record unchanged");
    assert!(!after.to_string().contains("FORGED"), "{after}");
    // And the forged events are not replayed.
    let replay_after = replayed(&base, &job_id).await;
    assert_eq!(replay_after, replay_before);
    assert!(!replay_after
        .iter()
        .any(|e| e.to_string().contains("FORGED")));
    let (_, ndjson) = get(&base, &format!("/api/jobs/{job_id}/events.ndjson")).await;
    assert!(!ndjson.to_string().contains("FORGED"), "nor exported");

    let text = logs.text();
    let warned = text
        .lines()
        .filter(|l| l.contains("forged event") && l.contains("machine_id=b"))
        .count();
    assert_eq!(warned as u64, n, "one warning per forged event:\n{text}");
    assert!(
        text.contains("missing signature") && text.contains("bad signature"),
        "{text}"
    );

    // Pre-empting b's next run: every part of a message id but the signature's end is
    // public (b's next run id follows from its last one), so a publishes first under the ids
    // b's next events would have had without it. JetStream would drop b's real events as
    // duplicates of these; with the signature in the id they are not the same ids.
    let (boot, n_run) = run_id.rsplit_once('-').expect("<boot_id>-<n>");
    let next_run = subjects::run_id(boot, n_run.parse::<u64>().unwrap() + 1);
    let squat = 40u64;
    for seq in 1..=squat {
        let v = example_of_b("event_llm_token.json", &job_id, &next_run, seq);
        let id = subjects::msg_id(&job_id, "b", &next_run, seq);
        publish_as_a(&js, &job_id, &id, &serde_json::to_vec(&v).unwrap(), None).await;
    }
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"job_id": job_id, "machines": ["b"], "model": "mock-7b", "prompt": "hi", "max_tokens": 8, "repeat": 2}),
    )
    .await;
    assert_eq!(s, 201, "re-run: {out}");
    let rerun = job_when(&base, &job_id, "b's next run finished", |v| {
        v["machines"].as_array().is_some_and(|ms| {
            ms.iter().any(|m| {
                m["machine_id"] == "b"
                    && m["run_id"] == next_run.as_str()
                    && m["status"] != "running"
            })
        })
    })
    .await;
    let b_next = machine_in(&rerun, "b");
    assert_eq!(
        b_next["status"], "done",
        "b's next run, under squatted ids: {b_next:#}"
    );
    assert_eq!(
        b_next["repeats"].as_array().map(Vec::len),
        Some(2),
        "{b_next:#}"
    );
    assert_eq!(b_next["gaps"], 0, "{b_next:#}");
    assert_eq!(
        counter(&base, "bench_central_events_forged_total").await,
        n + squat,
        "the squatting events refused"
    );
    eprintln!("forged test took {:?}", t0.elapsed());
}

#[tokio::test]
async fn require_refuses_machines_without_a_key_and_verify_accepts_them() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.signatures = bench_central::signing::SignatureMode::Require;
    let central = start_central(cfg).await;
    let base = central.base();
    // A real agent's events verify under require (its heartbeat brought the key first).
    let _agent = mock_agent("real", "mock-7b", 500.0, &nats.url()).await;
    machines_online(&base, &["real"]).await;
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["real"], "model": "mock-7b", "prompt": "hi", "max_tokens": 4}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    let job_id = out["job_id"].as_str().unwrap();
    assert_eq!(job_finished(&base, job_id).await["status"], "done");
    // A hand-made event of a machine nobody knows a key of: refused.
    let js = async_nats::jetstream::new(client(&nats.url()).await);
    let ghost = RunEvents::new("ghost-job", "ghost")
        .push(accepted_kind("ghost-job", "m", "Ghost"))
        .take();
    publish_events(&js, &ghost).await;
    until("ghost refused", || {
        let base = base.clone();
        async move { (counter(&base, "bench_central_events_forged_total").await == 1).then_some(()) }
    })
    .await;
    assert_eq!(
        counter(&base, "bench_central_events_unsigned_total").await,
        0
    );
    let (status, _) = get(&base, "/api/jobs/ghost-job").await;
    assert_eq!(status, 404, "never recorded");

    // The default, verify: the same event is accepted, counted as unsigned.
    let nats2 = NatsServer::start();
    let dir2 = tempfile::tempdir().unwrap();
    let central2 = start_central(central_config(&nats2.url(), dir2.path())).await;
    let js2 = async_nats::jetstream::new(client(&nats2.url()).await);
    publish_events(&js2, &ghost).await;
    let base2 = central2.base();
    job_when(&base2, "ghost-job", "ghost recorded", |_| true).await;
    assert_eq!(
        counter(&base2, "bench_central_events_unsigned_total").await,
        1
    );
    assert_eq!(
        counter(&base2, "bench_central_events_forged_total").await,
        0
    );
}
