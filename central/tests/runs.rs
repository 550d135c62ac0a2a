//! Run identity and the failures that must end a run with a reason: a re-used job id is a new
//! run on every path (API, nats CLI, stream, SSE, results), the agents' limits decide, a run of
//! an agent that restarted is failed, an interrupted dispatch is cleared by its deadline, NATS
//! away makes writes fail at once while reads answer, and a `job_done` with null metrics is
//! stored.

mod common;

use async_nats::jetstream;
use bench_schemas::event::Started;
use bench_schemas::{subjects, AgentInfo, AgentStatus, Event, EventKind, Hardware, Job};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn event(job: &str, machine: &str, run: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        job_id: job.into(),
        machine_id: machine.into(),
        run_id: run.into(),
        seq,
        ts_ms: 1,
        kind,
    }
}

fn accepted(job_id: &str) -> EventKind {
    accepted_kind(job_id, "m", "Ghost")
}

#[tokio::test]
async fn a_reused_job_id_is_a_new_run_everywhere() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let _agent = mock_agent("m1", "mock-7b", 400.0, &nats.url()).await;
    machines_online(&base, &["m1"]).await;
    let job = json!({"job_id": "race-1", "machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 40});

    let (s, out) = post(&base, "/api/jobs", &job).await;
    assert_eq!(s, 201, "{out}");
    let first = job_finished(&base, "race-1").await;
    let first_run = first["machines"][0]["run_id"].as_str().unwrap().to_string();
    assert!(subjects::boot_of(&first_run).is_some(), "{first_run}");

    // Again through the API: a new run, not a refusal and not a silent no-op.
    let (s, out) = post(&base, "/api/jobs", &job).await;
    assert_eq!(s, 201, "{out}");
    assert_eq!(out["machines"][0]["status"], "accepted", "{out}");
    // While it runs, a third submission is refused with a reason.
    let (s, busy) = post(&base, "/api/jobs", &job).await;
    if s != 201 {
        assert_eq!(s, 400, "{busy}");
        assert!(busy["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still running"));
    }
    let second = job_when(&base, "race-1", "second run done", |v| {
        v["status"] == "done"
            && v["machines"][0]["earlier_runs"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
    })
    .await;
    let second_run = second["machines"][0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first_run, second_run);
    assert_eq!(
        second["machines"][0]["earlier_runs"][0]["run_id"],
        first_run.as_str()
    );

    // Again with the plain nats CLI form: a core publish of the same job id.
    let nc = client(&nats.url()).await;
    let reply = within(
        "nats req",
        WAIT,
        nc.request(
            subjects::jobs("m1"),
            json!({"job_id": "race-1", "model": "mock-7b", "prompt": "hi", "max_tokens": 40})
                .to_string()
                .into(),
        ),
    )
    .await
    .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["accepted"], true, "{reply}");
    let third = job_when(&base, "race-1", "third run done", |v| {
        v["status"] == "done"
            && v["machines"][0]["earlier_runs"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
    })
    .await;
    let m = &third["machines"][0];
    assert_eq!(m["gaps"], 0);
    assert!(!m["output_text"].as_str().unwrap().is_empty());

    // The stream holds all three runs, each gapless; the SSE replay and the results agree.
    let mut sse = Sse::open(&format!("{base}/api/jobs/race-1/events"), None).await;
    let frames = sse.until_end().await;
    let events: Vec<Event> = frames
        .iter()
        .filter(|f| f.event != "end")
        .map(|f| serde_json::from_str(&f.data).unwrap())
        .collect();
    let runs = assert_exactly_once(&events);
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(frames.iter().filter(|f| f.event == "job_done").count(), 3);
    let meta = dir.path().join("runs/race-1/metadata.json");
    until("results of the third run", || async {
        let v: Value = serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
        (v["machines"][0]["earlier_runs"].as_array()?.len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        assert_exactly_once(&results_events(dir.path(), "race-1")),
        runs
    );
}

#[tokio::test]
async fn the_agents_limits_decide() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let _agent = start_agent(
        "machine_id: small\nengine: mock\nllm_models: [mock-7b]\nlimits: {max_tokens: 100}\n",
        &nats.url(),
    )
    .await;
    machines_online(&base, &["small"]).await;
    // Beyond central's old fixed cap (8192) and beyond this agent's own limit: the agent says no.
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["small"], "model": "mock-7b", "prompt": "hi", "max_tokens": 20000}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    assert_eq!(out["machines"][0]["status"], "rejected", "{out}");
    assert_eq!(
        out["machines"][0]["error"]["code"], "invalid_max_tokens",
        "{out}"
    );
}

fn heartbeat(machine_id: &str, boot_id: &str) -> AgentInfo {
    AgentInfo {
        machine_id: machine_id.into(),
        label: "Ghost".into(),
        status: AgentStatus::Idle,
        engine: "mock".into(),
        models: vec!["m".into()],
        hardware: Hardware {
            cpu: String::new(),
            cores: 1,
            memory_bytes: 0,
            os: "linux".into(),
            arch: "x86_64".into(),
            accelerator: None,
            ..Hardware::default()
        },
        engine_info: None,
        telemetry: Default::default(),
        labels: Default::default(),
        version: "0".into(),
        boot_id: boot_id.into(),
        ts_ms: 0,
        heartbeat_s: 1.0,
        current_job: None,
        queued: 0,
        signing_key: None,
    }
}

#[tokio::test]
async fn a_run_of_an_agent_that_restarted_fails_with_a_reason() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    // The old agent process (boot "oldboot") accepted and started the job, then died.
    publish_events(
        &js,
        &[event("lost-1", "ghost", "oldboot-1", 1, accepted("lost-1"))],
    )
    .await;
    let started = EventKind::JobStarted(Started {
        cell: None,
        stream: None,
        repeat_index: 0,
        warmup: false,
        cold: false,
        fingerprint: None,
    });
    publish_events(&js, &[event("lost-1", "ghost", "oldboot-1", 2, started)]).await;
    job_when(&base, "lost-1", "running", |v| {
        v["machines"][0]["status"] == "running"
    })
    .await;
    // The machine's agent is back, as a new process: its queue is gone.
    let agents = bench_nats::streams::ensure_agents_bucket(&js, bench_nats::streams::AGENTS_TTL, 1)
        .await
        .unwrap();
    let t0 = Instant::now();
    agents
        .put(
            "ghost",
            serde_json::to_vec(&heartbeat("ghost", "newboot"))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    let done = job_finished(&base, "lost-1").await;
    assert_eq!(done["status"], "failed");
    let m = &done["machines"][0];
    assert_eq!(m["error"]["code"], "agent_restarted", "{m}");
    assert!(m["error"]["message"].as_str().unwrap().contains("oldboot"));
    eprintln!(
        "restarted agent's run failed {:?} after its new heartbeat",
        t0.elapsed()
    );
    // Long before the stall timeout would have.
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// The window the chaos test found: an agent answers "accepted" and is killed before its
/// `job_accepted` is stored. Its answer names the run, so central records it at dispatch and the
/// run fails as the restarted agent's, by its boot id, not as an anonymous stall 5 s later.
#[tokio::test]
async fn an_agent_killed_between_its_accept_and_its_first_event_fails_as_restarted() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let nc = client(&nats.url()).await;
    let js = jetstream::new(nc.clone());
    let agents = bench_nats::streams::ensure_agents_bucket(&js, bench_nats::streams::AGENTS_TTL, 1)
        .await
        .unwrap();
    let beat = |boot: &str| {
        serde_json::to_vec(&heartbeat("ghost", boot))
            .unwrap()
            .into()
    };
    agents.put("ghost", beat("oldboot")).await.unwrap();
    machines_online(&base, &["ghost"]).await;
    // A fake of the agent's intake: it answers the job as the agent does, then dies before
    // any event of the run is stored.
    let mut jobs = nc.subscribe(subjects::jobs("ghost")).await.unwrap();
    nc.flush().await.unwrap();
    let fake = tokio::spawn({
        let nc = nc.clone();
        async move {
            let msg = within("the job at the fake agent", WAIT, jobs.next())
                .await
                .expect("a job");
            let job: Job = serde_json::from_slice(&msg.payload).unwrap();
            let reply = bench_schemas::JobReply::accepted(
                job.job_id.as_deref().unwrap(),
                "ghost",
                "oldboot-1",
                0,
            );
            nc.publish(
                msg.reply.unwrap(),
                serde_json::to_vec(&reply).unwrap().into(),
            )
            .await
            .unwrap();
            nc.flush().await.unwrap();
        }
    });
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"job_id": "lost-2", "machines": ["ghost"], "model": "m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    assert_eq!(out["machines"][0]["status"], "accepted", "{out}");
    assert_eq!(out["machines"][0]["run_id"], "oldboot-1", "{out}");
    fake.await.unwrap();
    let (_, queued) = get(&base, "/api/jobs/lost-2").await;
    assert_eq!(queued["machines"][0]["run_id"], "oldboot-1", "{queued}");
    assert_eq!(queued["machines"][0]["status"], "queued", "{queued}");

    // Back as a new process, idle: without the run's id the queued run would look like one
    // waiting on a live agent, and wait for ever.
    agents.put("ghost", beat("newboot")).await.unwrap();
    let done = job_finished(&base, "lost-2").await;
    let m = &done["machines"][0];
    assert_eq!(m["error"]["code"], "agent_restarted", "{m}");
    assert_eq!(m["run_id"], "oldboot-1", "{m}");
    assert!(m["error"]["message"].as_str().unwrap().contains("oldboot"));
}

#[tokio::test]
async fn an_interrupted_dispatch_is_cleared_by_its_deadline() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Central was killed while dispatching: the record says so, with a deadline long past.
    let js = jetstream::new(client(&nats.url()).await);
    let kv = js
        .create_key_value(bench_central::store::jobs_bucket_config(
            Duration::from_secs(3600),
        ))
        .await
        .unwrap();
    let mut r = bench_central::record::JobRecord::dispatched(
        "half-sent",
        Job::new("m", "p"),
        &["m1".into()],
        bench_central::now_ms() - 60_000,
    );
    r.dispatch_deadline_ms = Some(bench_central::now_ms() - 30_000);
    kv.put("half-sent", serde_json::to_vec(&r).unwrap().into())
        .await
        .unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let done = job_finished(&base, "half-sent").await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["machines"][0]["error"]["code"], "dispatch_interrupted",
        "{done}"
    );
}

#[tokio::test]
async fn nats_away_writes_fail_at_once_and_reads_answer() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.machines = vec![bench_central::config::MachineConfig {
        machine_id: "ghost".into(),
        label: None,
        notes: None,
    }];
    let central = start_central(cfg).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    publish_events(&js, &[event("kept", "ghost", "b-1", 1, accepted("kept"))]).await;
    job_when(&base, "kept", "indexed", |_| true).await;
    nats.stop();
    let state = central.state();
    until("central sees NATS gone", || async {
        (state.client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["ghost"], "model": "m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(
        (s, out["error"]["code"].as_str()),
        (503, Some("nats_unavailable")),
        "{out}"
    );
    let (s, out) = post(&base, "/api/jobs/kept/cancel", &json!({})).await;
    assert_eq!(
        (s, out["error"]["code"].as_str()),
        (503, Some("nats_unavailable")),
        "{out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Reads answer from memory.
    let (s, list) = get(&base, "/api/jobs").await;
    assert_eq!(s, 200);
    assert_eq!(list["jobs"][0]["job_id"], "kept");
    assert_eq!(get(&base, "/api/jobs/kept").await.0, 200);
    assert_eq!(get(&base, "/api/machines").await.0, 200);
    nats.restart();
    until("central reconnected", || async {
        (state.client.connection_state() == async_nats::connection::State::Connected).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_done_with_null_metrics_is_stored() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    publish_events(&js, &[event("nulls", "a", "b-1", 1, accepted("nulls"))]).await;
    // What serde_json writes for a NaN or infinite f64: null.
    let metrics = json!({"repeat_index": 0, "warmup": false, "ttft_ms": null, "total_ms": 12.5,
        "gen_tokens": 1, "token_count_source": "mock", "gen_tokens_per_s": null, "tpot_ms": null,
        "itl_ms": {"p50": null, "p90": 1.0, "p99": 1.0}, "prompt_tokens": null,
        "prompt_tokens_per_s": null, "load_ms": null, "engine_gen_tokens_per_s": null,
        "engine_prompt_tokens_per_s": null, "engine_gen_ms": null, "engine_prompt_ms": null,
        "engine_total_ms": null, "chunks": 1, "output_chars": 1, "done_reason": "stop"});
    let done = json!({"job_id": "nulls", "machine_id": "a", "run_id": "b-1", "seq": 2, "ts_ms": 1,
        "type": "job_done", "payload": {"model": "m", "engine": "mock", "ttft_ms": null,
        "gen_tokens": 1, "gen_tokens_per_s": null, "total_ms": null, "token_count_source": "mock",
        "repeats": [metrics], "summary": {"repeats": 1, "ttft_ms": null, "gen_tokens_per_s": null,
        "total_ms": {"n": 1, "median": 12.5, "mean": null, "stdev": 0.0, "min": 12.5, "max": 12.5},
        "tpot_ms": null, "gen_tokens": null, "prompt_tokens_per_s": null}, "output_text": "x"}});
    publish_values(&js, &[done]).await;
    let v = job_finished(&base, "nulls").await;
    assert_eq!(v["status"], "done", "{v}");
    assert_eq!(v["machines"][0]["repeats"][0]["total_ms"], 12.5);
    assert_eq!(
        central
            .state()
            .metrics
            .events_invalid
            .load(Ordering::Relaxed),
        0
    );
}
