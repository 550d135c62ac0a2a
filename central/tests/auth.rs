//! Central under the generated least-privilege accounts (nats/src/auth.rs): it connects as the
//! central user, sets everything up, dispatches, indexes (acks included) and replays.

mod common;

use bench_nats::auth::{agent_inbox_prefix, Identity};
use common::*;
use serde_json::json;

#[tokio::test]
async fn central_runs_as_the_central_user() {
    let dir = tempfile::tempdir().unwrap();
    let (central_id, observer, agent) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let nats = least_privilege_server(&[("sec-a", &agent)], &central_id, &observer);
    let seed = |name: &str, id: &Identity| seed_file(dir.path(), name, id);

    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.nats.nkey_seed_file = Some(seed("central", &central_id));
    let central = start_central_connected(cfg)
        .await
        .expect("central starts under its own permissions");
    let base = central.base();

    let yaml = format!(
        "machine_id: sec-a\nengine: mock\nllm_models: [mock-7b]\nmock: {{tokens_per_s: 500, ttft_ms: 1}}\nnats: {{nkey_seed_file: \"{}\", inbox_prefix: \"{}\"}}\n",
        seed("a", &agent).display(),
        agent_inbox_prefix("sec-a")
    );
    let _agent = start_agent(&yaml, &nats.url()).await;
    machines_online(&base, &["sec-a"]).await;
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["sec-a"], "model": "mock-7b", "prompt": "hi", "max_tokens": 5}),
    )
    .await;
    assert_eq!(
        (s, &out["machines"][0]["status"]),
        (201, &json!("accepted")),
        "{out}"
    );
    let job_id = out["job_id"].as_str().unwrap();
    let done = job_finished(&base, job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    let mut sse = Sse::open(&format!("{base}/api/jobs/{job_id}/events"), None).await;
    assert_eq!(sse.until_end().await.last().unwrap().event, "end");
    let (s, _) = post(&base, &format!("/api/jobs/{job_id}/cancel"), &json!({})).await;
    assert_eq!(s, 202);
    // Acks go through: nothing is left pending on the indexer's consumer.
    let js = async_nats::jetstream::new(central.client.clone());
    let stream = js
        .get_stream(bench_schemas::subjects::EVENTS_STREAM)
        .await
        .unwrap();
    let info = until("all acked", || {
        let stream = stream.clone();
        async move {
            let i = stream
                .consumer_info(bench_central::store::INDEXER_CONSUMER)
                .await
                .ok()?;
            (i.num_ack_pending == 0 && i.num_pending == 0).then_some(i)
        }
    })
    .await;
    assert!(info.ack_floor.stream_sequence > 0);
}
