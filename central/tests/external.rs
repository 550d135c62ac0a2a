//! Jobs central never dispatched: one submitted by an independent NATS client straight to an
//! agent is recorded from the stream; a machine that goes silent with no agent behind it is
//! marked failed by the stall timeout and the job completes.

mod common;

use async_nats::jetstream;
use bench_schemas::event::{Started, Token};
use bench_schemas::{subjects, Event, EventKind};
use common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn job_from_an_independent_nats_client_is_recorded() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let _agent = mock_agent("cli-box", "mock-7b", 400.0, &nats.url()).await;
    machines_online(&base, &["cli-box"]).await;

    // What `nats pub bench.jobs.cli-box '{...}'` does: a plain publish, no reply, no central.
    let other = client(&nats.url()).await;
    let job = json!({"job_id": "from-cli-1", "test_type": "llm_generate", "model": "mock-7b", "prompt": "hello from the CLI", "max_tokens": 8, "run_label": "cli"});
    other
        .publish(
            subjects::jobs("cli-box"),
            serde_json::to_vec(&job).unwrap().into(),
        )
        .await
        .unwrap();
    other.flush().await.unwrap();

    let listed = until("external job listed", || async {
        let (_, v) = get(&base, "/api/jobs").await;
        v["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["job_id"] == "from-cli-1")
            .cloned()
    })
    .await;
    assert_eq!(listed["source"], "external");
    assert_eq!(listed["model"], "mock-7b");
    assert_eq!(listed["prompt"], "hello from the CLI");
    let done = job_finished(&base, "from-cli-1").await;
    assert_eq!(done["status"], "done", "{done:#}");
    assert_eq!(done["job"]["run_label"], "cli");
    assert_eq!(done["machines"][0]["machine_id"], "cli-box");
    assert_eq!(done["machines"][0]["summary"]["repeats"], 1);
    until("results written", || async {
        dir.path()
            .join("runs/from-cli-1/metadata.json")
            .exists()
            .then_some(())
    })
    .await;
    assert_exactly_once(&results_events(dir.path(), "from-cli-1"));
}

#[tokio::test]
async fn a_silent_machine_is_marked_failed_and_the_job_completes() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.stall_timeout = Duration::from_millis(600);
    let central = start_central(cfg).await;
    let base = central.base();

    // An "agent" that accepts, starts, streams a little and dies: no heartbeat, no more events.
    let js = jetstream::new(client(&nats.url()).await);
    let ev = |seq, kind| Event {
        job_id: "ghost-job".into(),
        machine_id: "ghost".into(),
        run_id: "ghostboot-1".into(),
        seq,
        ts_ms: 1,
        kind,
    };
    publish_events(&js, &[ev(1, accepted_kind("ghost-job", "m", "Ghost"))]).await;
    publish_events(
        &js,
        &[ev(
            2,
            EventKind::JobStarted(Started {
                cell: None,
                stream: None,
                repeat_index: 0,
                warmup: false,
                cold: false,
                fingerprint: None,
            }),
        )],
    )
    .await;
    publish_events(
        &js,
        &[ev(
            3,
            EventKind::LlmToken(Token {
                repeat_index: 0,
                text: "half a sen".into(),
                tokens: Some(3),
                t_ms: 5.0,
            }),
        )],
    )
    .await;

    let mut sse = Sse::open(&format!("{base}/api/jobs/ghost-job/events"), None).await;
    let frames = sse.until_end().await;
    let end = frames.last().unwrap();
    assert_eq!(end.event, "end", "{frames:?}");
    assert_eq!(end.json()["status"], "failed");
    assert_eq!(frames.iter().filter(|f| f.id.is_some()).count(), 3);
    let (_, detail) = get(&base, "/api/jobs/ghost-job").await;
    assert_eq!(detail["machines"][0]["status"], "failed");
    assert_eq!(detail["machines"][0]["error"]["code"], "stalled");
    assert_eq!(detail["machines"][0]["output_text"], "half a sen");
    let (_, metrics) = get(&base, "/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("bench_central_stalls_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn forged_events_with_bad_ids_are_skipped_and_central_keeps_working() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    let forged = |job_id: &str, machine_id: &str| json!({"job_id": job_id, "machine_id": machine_id, "seq": 1, "ts_ms": 0, "type": "job_cancelled", "payload": {"reason": "x"}});
    // Not a valid KV key; a path outside results/; a job the subject does not name; a bad machine.
    for (subject_job, event) in [
        ("x", forged("a b", "m")),
        ("x", forged("/tmp/pwn", "m")),
        ("x", forged("other-job", "m")),
        ("y", forged("y", "../m")),
    ] {
        js.publish(
            subjects::events(subject_job),
            serde_json::to_vec(&event).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    until("the forged events counted as invalid", || async {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| l == "bench_central_events_invalid_total 4")
            .then_some(())
    })
    .await;
    let (_, v) = get(&base, "/api/jobs").await;
    assert_eq!(v["jobs"].as_array().unwrap().len(), 0, "{v}");
    assert!(!std::path::Path::new("/tmp/pwn").exists());

    // Still indexing: a real job goes through.
    let _agent = mock_agent("after", "mock-7b", 400.0, &nats.url()).await;
    machines_online(&base, &["after"]).await;
    let (status, created) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["after"], "model": "mock-7b", "prompt": "hi", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let done = job_finished(&base, created["job_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "done");
}
