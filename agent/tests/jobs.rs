//! The agent on a real nats-server with the mock engine: the job lifecycle, bad input, cancel,
//! queueing, discovery and the local HTTP surface.

mod common;

use bench_schemas::{subjects, AgentInfo, AgentStatus, ErrorCode, EventKind, TokenCountSource};
use common::*;
use futures::StreamExt;
use serde_json::json;

const MOCK: &str = "engine: mock\nmock: {tokens_per_s: 400, ttft_ms: 5}\nllm_models: [mock-7b]\nlimits: {max_prompt_bytes: 1000, max_tokens: 4096}\n";

#[tokio::test]
async fn mock_job_lifecycle_and_summary() {
    let nats = NatsServer::start();
    let _agent = start_agent(
        config(&format!("machine_id: m1\n{MOCK}"), &nats.url()),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "job-1").await;
    let reply = request(
        &c,
        subjects::jobs("m1"),
        job_json(
            "mock-7b",
            json!({"job_id": "job-1", "repeat": 3, "warmup": 1, "max_tokens": 8}),
        ),
    )
    .await;
    assert!(reply.accepted, "{reply:?}");
    assert_eq!(
        (reply.job_id.as_deref(), reply.position),
        (Some("job-1"), Some(0))
    );
    let done = ev.terminal("m1").await;
    let EventKind::JobDone(d) = &done.kind else {
        panic!("{:?}", ev.types())
    };
    assert_eq!(d.engine, "mock");
    assert_eq!(d.repeats.len(), 4);
    assert_eq!(d.repeats.iter().filter(|m| m.warmup).count(), 1);
    assert_eq!(d.summary.repeats, 3);
    assert!(d
        .repeats
        .iter()
        .all(|m| m.gen_tokens == 8 && m.token_count_source == TokenCountSource::Mock));
    assert!(d.repeats.iter().all(|m| m.ttft_ms < m.total_ms));
    assert_eq!(
        d.output_text,
        ev.text(3),
        "job_done output is the last measured repeat's streamed text"
    );
    // Sequence: 1..n, no gap, accepted first.
    let seqs: Vec<u64> = ev.seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(ev.types()[0], "job_accepted");
    // The answer named the run every event carries.
    assert!(
        ev.seen
            .iter()
            .all(|e| Some(e.run_id.as_str()) == reply.run_id.as_deref()),
        "{:?} vs {:?}",
        reply.run_id,
        ev.seen.iter().map(|e| &e.run_id).collect::<Vec<_>>()
    );
    let starts: Vec<(u32, bool)> = ev
        .seen
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::JobStarted(s) => Some((s.repeat_index, s.warmup)),
            _ => None,
        })
        .collect();
    assert_eq!(starts, vec![(0, true), (1, false), (2, false), (3, false)]);
    assert_eq!(
        ev.types().iter().filter(|t| **t == "repeat_done").count(),
        4
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_codes_and_the_agent_keeps_serving() {
    let nats = NatsServer::start();
    let _agent = start_agent(
        config(&format!("machine_id: m2\n{MOCK}"), &nats.url()),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let subject = subjects::jobs("m2");
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("malformed json", b"{not json".to_vec(), ErrorCode::BadJson),
        (
            "unknown field",
            job_json("mock-7b", json!({"max_token": 5})),
            ErrorCode::BadJson,
        ),
        (
            "wrong type",
            job_json("mock-7b", json!({"max_tokens": "many"})),
            ErrorCode::BadJson,
        ),
        (
            "unknown test_type",
            job_json("mock-7b", json!({"test_type": "whisper"})),
            ErrorCode::UnknownTestType,
        ),
        (
            "missing model",
            serde_json::to_vec(&json!({"prompt": "hi"})).unwrap(),
            ErrorCode::MissingModel,
        ),
        (
            "unknown model",
            job_json("llama-9000", json!({})),
            ErrorCode::ModelNotFound,
        ),
        (
            "max_tokens 0",
            job_json("mock-7b", json!({"max_tokens": 0})),
            ErrorCode::InvalidMaxTokens,
        ),
        (
            "max_tokens absurd",
            job_json("mock-7b", json!({"max_tokens": 10_000_000})),
            ErrorCode::InvalidMaxTokens,
        ),
        (
            "id with dot",
            job_json("mock-7b", json!({"job_id": "a.b"})),
            ErrorCode::InvalidId,
        ),
        (
            "id with star",
            job_json("mock-7b", json!({"job_id": "a*"})),
            ErrorCode::InvalidId,
        ),
        (
            "id with gt",
            job_json("mock-7b", json!({"job_id": "a>"})),
            ErrorCode::InvalidId,
        ),
        (
            "id with space",
            job_json("mock-7b", json!({"job_id": "a b"})),
            ErrorCode::InvalidId,
        ),
        (
            "prompt over limit",
            job_json("mock-7b", json!({"prompt": "x".repeat(1001)})),
            ErrorCode::PromptTooLarge,
        ),
        (
            "empty prompt",
            job_json("mock-7b", json!({"prompt": ""})),
            ErrorCode::InvalidJob,
        ),
        (
            "unknown backend",
            job_json("mock-7b", json!({"backend": "vllm"})),
            ErrorCode::UnknownBackend,
        ),
        (
            "expired",
            job_json("mock-7b", json!({"expires_at": 1})),
            ErrorCode::Expired,
        ),
    ];
    for (what, body, code) in cases {
        let r = request(&c, subject.clone(), body).await;
        assert!(!r.accepted, "{what}: {r:?}");
        assert_eq!(r.machine_id, "m2");
        let err = r.error.unwrap_or_else(|| panic!("{what}: no error"));
        assert_eq!(err.code, code, "{what}: {}", err.message);
        assert!(!err.message.is_empty());
    }
    // A refusal of a job with a usable id is also an event for `nats sub` watchers.
    let mut ev = Events::watch(&c, "bad-1").await;
    let r = request(
        &c,
        subject.clone(),
        job_json("mock-7b", json!({"job_id": "bad-1", "max_tokens": 0})),
    )
    .await;
    assert!(!r.accepted);
    let e = ev.next().await;
    match e.kind {
        EventKind::JobError(f) => assert_eq!(f.error.code, ErrorCode::InvalidMaxTokens),
        other => panic!("{other:?}"),
    }
    // ... and the agent still serves the next job.
    let mut ev = Events::watch(&c, "good-1").await;
    let r = request(
        &c,
        subject,
        job_json("mock-7b", json!({"job_id": "good-1"})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    assert!(matches!(
        ev.terminal("m2").await.kind,
        EventKind::JobDone(_)
    ));
}

#[tokio::test]
async fn queue_in_order_and_cancel_running_and_waiting() {
    let nats = NatsServer::start();
    let slow = "engine: mock\nmock: {tokens_per_s: 20, ttft_ms: 5}\nllm_models: [mock-7b]\n";
    let _agent = start_agent(
        config(&format!("machine_id: m3\n{slow}"), &nats.url()),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut a = Events::watch(&c, "q-a").await;
    let mut b = Events::watch(&c, "q-b").await;
    let mut d = Events::watch(&c, "q-c").await;
    let ra = request(
        &c,
        subjects::jobs("m3"),
        job_json("mock-7b", json!({"job_id": "q-a", "max_tokens": 2000})),
    )
    .await;
    let rb = request(
        &c,
        subjects::jobs("m3"),
        job_json("mock-7b", json!({"job_id": "q-b", "max_tokens": 2000})),
    )
    .await;
    let rc = request(
        &c,
        subjects::jobs("m3"),
        job_json("mock-7b", json!({"job_id": "q-c", "max_tokens": 3})),
    )
    .await;
    assert_eq!(
        (ra.position, rb.position, rc.position),
        (Some(0), Some(1), Some(2))
    );
    let dup = request(
        &c,
        subjects::jobs("m3"),
        job_json("mock-7b", json!({"job_id": "q-b"})),
    )
    .await;
    assert_eq!(dup.run_id, None, "a refusal starts no run");
    assert_eq!(dup.error.map(|e| e.code), Some(ErrorCode::DuplicateJob));
    // Each accept is a run of its own, of this agent's boot.
    let runs: Vec<&str> = [&ra, &rb, &rc]
        .iter()
        .map(|r| r.run_id.as_deref().expect("an accept names its run"))
        .collect();
    assert_eq!(
        runs.iter()
            .map(|r| subjects::boot_of(r).unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        1,
        "{runs:?}"
    );
    assert!(runs[0] != runs[1] && runs[1] != runs[2], "{runs:?}");
    // Cancel the waiting one first, then the running one once it streams.
    c.publish(subjects::cancel("q-b"), "".into()).await.unwrap();
    assert!(matches!(
        b.terminal("m3").await.kind,
        EventKind::JobCancelled(_)
    ));
    a.until(|e| matches!(e.kind, EventKind::LlmToken(_))).await;
    c.publish(subjects::cancel("q-a"), "".into()).await.unwrap();
    match a.terminal("m3").await.kind {
        EventKind::JobCancelled(x) => assert_eq!(x.repeat_index, Some(0)),
        other => panic!("{other:?}"),
    }
    // The third runs to completion after both.
    assert!(matches!(d.terminal("m3").await.kind, EventKind::JobDone(_)));
    assert!(
        !b.types().contains(&"job_started"),
        "a cancelled waiting job never starts"
    );
}

#[tokio::test]
async fn publish_without_reply_or_id_runs_and_discovery_and_http() {
    let nats = NatsServer::start();
    let mut agent = start_agent(
        config(
            &format!("machine_id: m4\nlabel: Box Four\nlabels: {{accelerator: none}}\n{MOCK}"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    // `nats pub` style: no reply subject, no job_id. The agent assigns a UUID and says so in
    // job_accepted.
    let mut all = c.subscribe(subjects::EVENTS_ALL).await.unwrap();
    c.flush().await.unwrap();
    c.publish(subjects::jobs("m4"), job_json("mock-7b", json!({})).into())
        .await
        .unwrap();
    let mut job_id = None;
    loop {
        let msg = within("events", WAIT, all.next()).await.unwrap();
        let e: bench_schemas::Event = serde_json::from_slice(&msg.payload).unwrap();
        if let EventKind::JobAccepted(a) = &e.kind {
            assert_eq!(a.job.job_id.as_deref(), Some(e.job_id.as_str()));
            assert!(uuid_like(&e.job_id), "{}", e.job_id);
            assert_eq!(a.engine, "mock");
            job_id = Some(e.job_id.clone());
        }
        if e.kind.is_terminal() {
            assert_eq!(Some(&e.job_id), job_id.as_ref());
            assert!(matches!(e.kind, EventKind::JobDone(_)));
            break;
        }
    }

    // Registry entry.
    let js = async_nats::jetstream::new(c.clone());
    let kv = js.get_key_value(subjects::AGENTS_BUCKET).await.unwrap();
    let entry = within("heartbeat", WAIT, async {
        loop {
            if let Ok(Some(v)) = kv.get("m4").await {
                break v;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let info: AgentInfo = serde_json::from_slice(&entry).unwrap();
    assert_eq!(
        (
            info.machine_id.as_str(),
            info.label.as_str(),
            info.engine.as_str()
        ),
        ("m4", "Box Four", "mock")
    );
    assert_eq!(info.models, vec!["mock-7b"]);
    assert!(matches!(info.status, AgentStatus::Idle | AgentStatus::Busy));

    // Micro service: what `nats micro ls bench-agent` asks.
    let msg = within(
        "micro info",
        WAIT,
        c.request(format!("$SRV.INFO.{}", subjects::SERVICE_NAME), "".into()),
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["name"], subjects::SERVICE_NAME);
    assert_eq!(v["metadata"]["machine_id"], "m4");
    let subjects_listed: Vec<&str> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    assert!(
        subjects_listed.contains(&"bench.jobs.m4") && subjects_listed.contains(&subjects::JOBS_ALL),
        "{v}"
    );

    // Local HTTP.
    let http = reqwest::Client::new();
    let health: serde_json::Value = http
        .get(format!("http://{}/health", agent.http_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (health["ok"].as_bool(), health["machine_id"].as_str()),
        (Some(true), Some("m4"))
    );
    // The heartbeat names this process's boot, as /health does.
    assert_eq!(info.boot_id.len(), 12, "{}", info.boot_id);
    assert_eq!(health["boot_id"].as_str(), Some(info.boot_id.as_str()));
    assert!(
        health["publisher"]["published"].as_u64().unwrap() >= 1,
        "{health}"
    );
    let caps: serde_json::Value = http
        .get(format!("http://{}/capabilities", agent.http_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(caps["tests"], json!(["llm_generate"]));
    assert_eq!(caps["llm_models"], json!(["mock-7b"]));

    // A clean stop removes the registry entry at once.
    within("agent stop", WAIT, agent.stop()).await;
    assert!(kv.get("m4").await.unwrap().is_none());
}

#[tokio::test]
async fn broadcast_with_selector_and_shared_job_id() {
    let nats = NatsServer::start();
    let _a = start_agent(
        config(
            &format!("machine_id: ga\nlabels: {{accelerator: nvidia}}\n{MOCK}"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let _b = start_agent(
        config(
            &format!("machine_id: gb\nlabels: {{accelerator: apple}}\n{MOCK}"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "bc-1").await;
    // Both agents answer a broadcast; the selector leaves only ga.
    c.publish(
        subjects::JOBS_ALL,
        job_json(
            "mock-7b",
            json!({"job_id": "bc-1", "selector": {"accelerator": "nvidia"}}),
        )
        .into(),
    )
    .await
    .unwrap();
    let done = ev.terminal("ga").await;
    assert!(matches!(done.kind, EventKind::JobDone(_)));
    let mut ev2 = Events::watch(&c, "bc-2").await;
    c.publish(
        subjects::JOBS_ALL,
        job_json("mock-7b", json!({"job_id": "bc-2"})).into(),
    )
    .await
    .unwrap();
    let first = ev2.until(|e| e.kind.is_terminal()).await;
    let other = if first.machine_id == "ga" { "gb" } else { "ga" };
    ev2.terminal(other).await;
    assert!(
        ev.seen.iter().all(|e| e.machine_id == "ga"),
        "gb stayed silent for the nvidia selector"
    );

    // An id list: only the listed machine runs it, and its job_accepted echoes the job with
    // only its own id (the list grows with the fleet; the others' ids are not its business).
    let mut ev3 = Events::watch(&c, "bc-3").await;
    c.publish(
        subjects::JOBS_ALL,
        job_json(
            "mock-7b",
            json!({"job_id": "bc-3", "selector": ["gb", "elsewhere-1", "elsewhere-2"]}),
        )
        .into(),
    )
    .await
    .unwrap();
    ev3.terminal("gb").await;
    let accepted = ev3
        .seen
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::JobAccepted(a) => Some(a.clone()),
            _ => None,
        })
        .expect("job_accepted");
    assert_eq!(
        accepted.job.selector,
        Some(bench_schemas::Selector::Machines(vec!["gb".into()]))
    );
    assert!(
        ev3.seen.iter().all(|e| e.machine_id == "gb"),
        "ga stayed silent"
    );
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[test]
fn bad_config_fails_at_start_naming_file_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, "machine_id: Not.Valid\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench-agent"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("machine_id")
            && err.contains("Fix:"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench-agent"))
        .arg("--config")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
}

#[tokio::test]
async fn start_together_waits_for_the_shared_start_time() {
    let nats = NatsServer::start();
    let _a = start_agent(
        config(&format!("machine_id: ta\n{MOCK}"), &nats.url()),
        &nats.url(),
    )
    .await;
    let _b = start_agent(
        config(&format!("machine_id: tb\n{MOCK}"), &nats.url()),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "together-1").await;
    let start_at = bench_agent::publisher::now_ms() + 600;
    let job = job_json(
        "mock-7b",
        json!({"job_id": "together-1", "start": "together", "start_at_ms": start_at}),
    );
    c.publish(subjects::JOBS_ALL, job.into()).await.unwrap();
    let mut started = Vec::new();
    while started.len() < 2 {
        let e = ev.next().await;
        if let EventKind::JobStarted(_) = e.kind {
            started.push((e.machine_id.clone(), e.ts_ms));
        }
    }
    for (m, ts) in &started {
        assert!(*ts >= start_at, "{m} started at {ts}, before {start_at}");
    }
    let accepted: Vec<u64> = ev
        .seen
        .iter()
        .filter(|e| e.kind.name() == "job_accepted")
        .map(|e| e.ts_ms)
        .collect();
    assert!(
        accepted.iter().all(|t| *t < start_at),
        "accepted at once, started later"
    );
    // A start far ahead would park the agent: refused.
    let far = bench_agent::publisher::now_ms() + 3_600_000;
    let r = request(
        &c,
        subjects::jobs("ta"),
        job_json("mock-7b", json!({"start": "together", "start_at_ms": far})),
    )
    .await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::InvalidJob));
    // A together job without a start time is refused.
    let r = request(
        &c,
        subjects::jobs("ta"),
        job_json("mock-7b", json!({"start": "together"})),
    )
    .await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::InvalidJob));
}
