//! The publisher keeps a window of JetStream acks in flight: over a link with a long round trip
//! (a delaying proxy between the agent and nats-server) a fast run's events arrive in a
//! fraction of the time one-ack-at-a-time would take, in order, each stored once.

mod common;

use bench_schemas::{subjects, EventKind};
use common::proxy::DelayProxy;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const WINDOW: u64 = 64;
/// Each way: the round trip is twice this.
const DELAY: Duration = Duration::from_millis(50);

#[tokio::test]
async fn acks_overlap_within_the_window_over_a_slow_link() {
    let nats = NatsServer::start();
    let proxy = DelayProxy::start(nats.port(), DELAY).await;
    let agent = start_agent(
        config(
            &format!("machine_id: far\nengine: mock\nmock: {{tokens_per_s: 5000, ttft_ms: 1}}\nllm_models: [mock-7b]\npublish_window: {WINDOW}\n"),
            &proxy.url(),
        ),
        &proxy.url(),
    )
    .await;
    // The observer sits next to the server: what it sees is paced by the agent's publishing.
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "far-1").await;
    let r = request(
        &c,
        subjects::jobs("far"),
        job_json("mock-7b", json!({"job_id": "far-1", "max_tokens": 300})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    ev.next().await;
    let first = Instant::now();
    let done = ev.terminal("far").await;
    let took = first.elapsed();
    assert!(matches!(done.kind, EventKind::JobDone(_)), "{done:?}");
    let n = done.seq;
    // accepted, started, 300 tokens, repeat_done, job_done, and the telemetry samples taken
    // meanwhile (they hold seqs too).
    let samples = ev
        .seen
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Telemetry(_)))
        .count() as u64;
    assert_eq!(n, 1 + 1 + 300 + 1 + 1 + samples);
    // One ack at a time needs a round trip per event: (n - 1) * 100 ms here, about 30 s.
    let one_at_a_time = (n - 1) as u32 * 2 * DELAY;
    println!(
        "{n} events over a {:?} round trip: {took:?} (one at a time: at least {one_at_a_time:?})",
        2 * DELAY
    );
    assert!(
        took < one_at_a_time / 10,
        "{n} events took {took:?}: acks do not overlap (one at a time: {one_at_a_time:?})"
    );

    let js = async_nats::jetstream::new(c.clone());
    let stored = stored_events(&js, "far-1", 1).await;
    assert_gapless(&stored.iter().collect::<Vec<_>>());
    let p = health_until(&agent, "every ack back", |h| {
        h["publisher"]["published"].as_u64() == Some(n)
    })
    .await["publisher"]
        .clone();
    let most = p["max_in_flight"].as_u64().unwrap();
    assert!(
        most > 1 && most <= WINDOW,
        "at most the window in flight, and more than one: {p}"
    );
    assert_eq!(p["window"].as_u64(), Some(WINDOW));
    assert_eq!(
        (p["in_flight"].as_u64(), p["queued"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    assert_eq!(
        (
            p["retried"].as_u64(),
            p["dropped"].as_u64(),
            p["out_of_order"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{p}"
    );
}
