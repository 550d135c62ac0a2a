//! The NATS server restarted mid-job: the agent reconnects, the job finishes, the next job runs,
//! and the BENCH_EVENTS stream holds every event of the job exactly once.

mod common;

use async_nats::jetstream::{self, consumer::pull};
use bench_schemas::{subjects, Event, EventKind};
use common::*;
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeSet;

/// Every stored event of `job_id`, in stream order, once its machine's terminal event is stored.
async fn stored_events(js: &jetstream::Context, job_id: &str) -> Vec<Event> {
    let stream = within("stream", WAIT, js.get_stream(subjects::EVENTS_STREAM))
        .await
        .expect("stream exists");
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::events(job_id),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    loop {
        let msg = within("stored event", WAIT, messages.next())
            .await
            .expect("open")
            .expect("message");
        let e: Event = serde_json::from_slice(&msg.payload).expect("event");
        let terminal = e.kind.is_terminal();
        out.push(e);
        if terminal {
            // Anything stored twice would sit right behind: drain what is already there.
            let info = msg.info().expect("jetstream message");
            assert_eq!(info.pending, 0, "events stored after the terminal one");
            return out;
        }
    }
}

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
    let events = stored_events(&js, "rs-1").await;
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
