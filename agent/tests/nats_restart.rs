//! The NATS server restarted or away mid-job: the agent reconnects, the job finishes (or stops
//! with `event_queue_full` when its bounded event queue filled meanwhile), the next job runs,
//! and the BENCH_EVENTS stream holds every event of the job exactly once, in order.

mod common;

use async_nats::jetstream;
use bench_schemas::{subjects, ErrorCode, Event, EventKind};
use common::proxy::DelayProxy;
use common::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn nats_restart_mid_job_loses_nothing_and_duplicates_nothing() {
    let mut nats = NatsServer::start();
    let cfg = config("machine_id: rs\nengine: mock\nmock: {tokens_per_s: 40, ttft_ms: 5}\nllm_models: [mock-7b]\n", &nats.url());
    let _agent = start_agent(cfg, &nats.url()).await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "rs-1").await;
    let r = request(
        &c,
        subjects::jobs("rs"),
        job_json("mock-7b", json!({"job_id": "rs-1", "max_tokens": 80})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    // Restart while tokens are streaming.
    ev.until(|e| matches!(&e.kind, EventKind::LlmToken(t) if !t.text.is_empty()))
        .await;
    ev.until(|e| e.seq >= 10).await;
    nats.restart();

    let js = jetstream::new(client(&nats.url()).await);
    let events = stored_events(&js, "rs-1", 1).await;
    let EventKind::JobDone(done) = &events.last().unwrap().kind else {
        panic!("{:?}", events.last())
    };
    assert_eq!(done.repeats[0].gen_tokens, 80);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seqs.len(),
        "an event was stored twice: {seqs:?}"
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap or reorder in the stored events"
    );
    let text: String = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::LlmToken(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        text, done.output_text,
        "the stored tokens are the whole output, once"
    );

    // The next job runs on the reconnected agent.
    let c2 = client(&nats.url()).await;
    let mut ev2 = Events::watch(&c2, "rs-2").await;
    let r = request(
        &c2,
        subjects::jobs("rs"),
        job_json("mock-7b", json!({"job_id": "rs-2", "max_tokens": 4})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    assert!(matches!(
        ev2.terminal("rs").await.kind,
        EventKind::JobDone(_)
    ));
}

fn token_text(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::LlmToken(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn nats_restart_with_the_window_full_loses_and_duplicates_nothing() {
    let mut nats = NatsServer::start();
    // A 40 ms round trip and a fast engine keep the window full when the server goes.
    let proxy = DelayProxy::start(nats.port(), Duration::from_millis(20)).await;
    let cfg = config(
        "machine_id: rw\nengine: mock\nmock: {tokens_per_s: 2000, ttft_ms: 1}\nllm_models: [mock-7b]\npublish_window: 16\n",
        &proxy.url(),
    );
    let agent = start_agent(cfg, &proxy.url()).await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "rw-1").await;
    let r = request(
        &c,
        subjects::jobs("rw"),
        job_json("mock-7b", json!({"job_id": "rw-1", "max_tokens": 1500})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    ev.until(|e| e.seq >= 50).await;
    let before = health(&agent).await["publisher"].clone();
    assert_eq!(
        before["max_in_flight"].as_u64(),
        Some(16),
        "window full: {before}"
    );
    nats.restart();

    let js = jetstream::new(client(&nats.url()).await);
    let events = stored_events(&js, "rw-1", 1).await;
    let EventKind::JobDone(done) = &events.last().unwrap().kind else {
        panic!("{:?}", events.last())
    };
    assert_eq!(done.repeats[0].gen_tokens, 1500);
    assert_gapless(&events.iter().collect::<Vec<_>>());
    assert_eq!(token_text(&events), done.output_text);
    let p = health_until(&agent, "every ack back", |h| {
        h["publisher"]["in_flight"].as_u64() == Some(0)
            && h["publisher"]["queued"].as_u64() == Some(0)
    })
    .await["publisher"]
        .clone();
    println!("publisher after the restart: {p}");
    assert!(
        p["retried"].as_u64().unwrap() > 0,
        "the window was sent again: {p}"
    );
    assert!(p["connects"].as_u64().unwrap() >= 2, "{p}");
    assert_eq!(
        (
            p["dropped"].as_u64(),
            p["out_of_order"].as_u64(),
            p["max_in_flight"].as_u64()
        ),
        (Some(0), Some(0), Some(16)),
        "{p}"
    );
}

#[tokio::test]
async fn event_queue_full_while_nats_is_away_stops_the_run_without_a_gap() {
    let mut nats = NatsServer::start();
    let cfg = config(
        "machine_id: rq\nengine: mock\nmock: {tokens_per_s: 200, ttft_ms: 1}\nllm_models: [mock-7b]\npublish_window: 4\nlimits: {max_queue: 1, max_event_queue: 8}\n",
        &nats.url(),
    );
    let agent = start_agent(cfg, &nats.url()).await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "rq-1").await;
    let r = request(
        &c,
        subjects::jobs("rq"),
        job_json("mock-7b", json!({"job_id": "rq-1", "max_tokens": 4000})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    ev.until(|e| e.seq >= 5).await;
    nats.stop();
    // Cut off from NATS the run fills the queue and stops (the agent turns idle): only /health
    // can tell.
    let h = health_until(&agent, "the run stopped", |h| h["busy"] == false).await;
    assert!(h["publisher"]["overflowed"].as_u64().unwrap() >= 1, "{h}");
    nats.restart();

    let js = jetstream::new(client(&nats.url()).await);
    let events = stored_events(&js, "rq-1", 1).await;
    assert_gapless(&events.iter().collect::<Vec<_>>());
    let last = events.last().unwrap();
    match &last.kind {
        EventKind::JobError(f) => {
            assert_eq!(
                f.error.code,
                ErrorCode::EventQueueFull,
                "{}",
                f.error.message
            );
            assert!(
                f.error.message.contains("limits.max_event_queue"),
                "{}",
                f.error.message
            );
            assert_eq!(f.repeat_index, Some(0));
        }
        other => panic!("{other:?}"),
    }
    let tokens = events
        .iter()
        .filter(|e| e.kind.name() == "llm_token")
        .count();
    assert!(tokens < 4000, "stopped early: {tokens} tokens");

    // The agent serves the next job once NATS is back.
    let c2 = client(&nats.url()).await;
    let mut ev2 = Events::watch(&c2, "rq-2").await;
    let r = request(
        &c2,
        subjects::jobs("rq"),
        job_json("mock-7b", json!({"job_id": "rq-2", "max_tokens": 3})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    assert!(matches!(
        ev2.terminal("rq").await.kind,
        EventKind::JobDone(_)
    ));
    let p = health(&agent).await["publisher"].clone();
    assert_eq!(
        (p["dropped"].as_u64(), p["out_of_order"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
}
