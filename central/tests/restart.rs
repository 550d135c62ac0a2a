//! Central stopped and restarted mid-job, on the same NATS: the job completes, and its results
//! hold every event exactly once. The second stop also leaves messages delivered but never
//! acknowledged on the durable consumer, as a central killed mid-batch would.

mod common;

use async_nats::jetstream::{self, consumer::pull};
use bench_central::store::INDEXER_CONSUMER;
use bench_schemas::subjects;
use common::*;
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn central_restarted_mid_job_loses_nothing_and_duplicates_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = central_config(&nats.url(), dir.path());
    let mut first = start_central(cfg.clone()).await;
    let base = first.base();
    let _agent = mock_agent("m1", "mock-7b", 60.0, &nats.url()).await;
    machines_online(&base, &["m1"]).await;
    let (s, out) = post(&base, "/api/jobs", &json!({"machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 40, "repeat": 3})).await;
    assert_eq!(s, 201, "{out}");
    let job_id = out["job_id"].as_str().unwrap().to_string();
    job_when(&base, &job_id, "some tokens indexed", |v| {
        v["machines"][0]["last_seq"].as_u64() >= Some(4)
    })
    .await;

    // Stop central while the agent keeps going, and watch it publish while nobody indexes.
    let watcher = client(&nats.url()).await;
    let mut live = watcher.subscribe(subjects::events(&job_id)).await.unwrap();
    first.stop().await;
    for _ in 0..3 {
        within("events while central is down", WAIT, live.next())
            .await
            .expect("event");
    }

    // A predecessor "killed" holding un-acked messages.
    let js = jetstream::new(watcher.clone());
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let durable: jetstream::consumer::Consumer<pull::Config> =
        stream.get_consumer(INDEXER_CONSUMER).await.unwrap();
    let mut held = durable.fetch().max_messages(5).messages().await.unwrap();
    let mut n_held = 0;
    while let Some(m) = within("held messages", WAIT, held.next()).await {
        m.unwrap();
        n_held += 1;
    }
    assert!(n_held > 0, "there were events to hold");

    let mut second = start_central(cfg.clone()).await;
    let base = second.base();
    let done = job_finished(&base, &job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    let m = &done["machines"][0];
    assert_eq!(m["repeats"].as_array().unwrap().len(), 3);
    assert_eq!(m["summary"]["repeats"], 3);

    until("results written", || async {
        dir.path()
            .join("runs")
            .join(&job_id)
            .join("metadata.json")
            .exists()
            .then_some(())
    })
    .await;
    let events = results_events(dir.path(), &job_id);
    let counts = assert_exactly_once(&events);
    assert_eq!(
        m["last_seq"].as_u64(),
        Some(counts["m1"]),
        "the index reached the last event"
    );
    let record = second.state().index.get(&job_id).unwrap();
    assert_eq!(
        record.machines[0].gaps, 0,
        "the index applied every event, none skipped"
    );
    // The streamed text the index rebuilt equals what the agent reported.
    let last_measured: String = events
        .iter()
        .filter_map(|e| match &e.kind {
            bench_schemas::EventKind::LlmToken(t) if t.repeat_index == 2 => Some(t.text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(m["output_text"].as_str().unwrap(), last_measured);

    // A third start over the same state re-indexes nothing new and keeps the record.
    second.stop().await;
    let third = start_central(cfg).await;
    let (_, again) = get(&third.base(), &format!("/api/jobs/{job_id}")).await;
    assert_eq!(again["machines"][0]["last_seq"], m["last_seq"]);
    assert_eq!(again["status"], "done");
    let mut sse = Sse::open(&format!("{}/api/jobs/{job_id}/events", third.base()), None).await;
    let frames = sse.until_end().await;
    assert_eq!(
        frames.len() as u64,
        counts["m1"] + 1,
        "every stored event once, then end"
    );
}
