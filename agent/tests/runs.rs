//! Run identity: every acceptance of a job on a machine is a run with its own `run_id`, so the
//! README's example job sent twice under one `job_id` is stored twice in full, while a copy sent
//! while the first is still running stays a `duplicate_job` refusal.

mod common;

use bench_schemas::{subjects, ErrorCode, Event, EventKind};
use common::*;
use std::collections::BTreeMap;

/// The README's fire-and-forget example, as `nats pub` sends it.
const README_JOB: &str = r#"{"job_id":"race-1","model":"gemma-3-270m","prompt":"Hello","max_tokens":32,"repeat":3,"warmup":1}"#;

#[tokio::test]
async fn a_finished_job_id_sent_again_is_a_new_run_stored_in_full() {
    let nats = NatsServer::start();
    let agent = start_agent(
        config(
            "machine_id: rr\nengine: mock\nmock: {tokens_per_s: 400, ttft_ms: 5}\nllm_models: [gemma-3-270m]\n",
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let boot_id = health(&agent).await["boot_id"]
        .as_str()
        .expect("boot_id on /health")
        .to_string();
    assert_eq!(boot_id.len(), 12, "{boot_id}");
    assert!(boot_id.bytes().all(|b| b.is_ascii_hexdigit()), "{boot_id}");

    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "race-1").await;
    within(
        "publish",
        WAIT,
        c.publish(subjects::jobs("rr"), README_JOB.into()),
    )
    .await
    .unwrap();
    // While it is queued or running, the same id is a duplicate (and not an event).
    let dup = request(&c, subjects::jobs("rr"), README_JOB).await;
    assert_eq!(
        dup.error.map(|e| e.code),
        Some(ErrorCode::DuplicateJob),
        "a job still running here stays a duplicate"
    );
    let first = ev.terminal("rr").await;
    assert!(matches!(first.kind, EventKind::JobDone(_)), "{first:?}");

    // Finished: the same job_id again is a new run.
    let again = request(&c, subjects::jobs("rr"), README_JOB).await;
    assert!(again.accepted, "{again:?}");
    let second = ev.terminal("rr").await;
    assert!(matches!(second.kind, EventKind::JobDone(_)), "{second:?}");
    assert_ne!(first.run_id, second.run_id);

    // Both runs are stored in full: the second run's ids never collide with the first's.
    let js = async_nats::jetstream::new(c.clone());
    let stored = stored_events(&js, "race-1", 2).await;
    let mut runs: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in &stored {
        assert_eq!(e.machine_id, "rr");
        runs.entry(e.run_id.as_str()).or_default().push(e);
    }
    assert_eq!(
        runs.keys().copied().collect::<Vec<_>>(),
        vec![
            subjects::run_id(&boot_id, 1).as_str(),
            subjects::run_id(&boot_id, 2).as_str()
        ],
        "two runs, numbered by acceptance (the refused duplicate took no number)"
    );
    for (run_id, events) in &runs {
        assert_eq!(subjects::boot_of(run_id), Some(boot_id.as_str()));
        assert_gapless(events);
        assert_eq!(events[0].kind.name(), "job_accepted", "{run_id}");
        assert_eq!(events.last().unwrap().kind.name(), "job_done", "{run_id}");
        // 4 runs (1 warmup + 3) of 32 one-token batches, each opened and closed.
        let tokens = events
            .iter()
            .filter(|e| e.kind.name() == "llm_token")
            .count();
        assert_eq!(tokens, 4 * 32, "{run_id}");
        let samples = events
            .iter()
            .filter(|e| e.kind.name() == "telemetry")
            .count();
        assert_eq!(events.len(), 1 + 4 * (1 + 32 + 1) + 1 + samples, "{run_id}");
    }
    // What live subscribers saw is what was stored, run by run.
    let live: Vec<(String, u64)> = ev.seen.iter().map(|e| (e.run_id.clone(), e.seq)).collect();
    let kept: Vec<(String, u64)> = stored.iter().map(|e| (e.run_id.clone(), e.seq)).collect();
    assert_eq!(live, kept);
}
