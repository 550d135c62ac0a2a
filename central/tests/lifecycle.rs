//! Cancel and delete through the API, against a real agent.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn cancel_then_delete() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let _agent = mock_agent("m1", "mock-7b", 50.0, &nats.url()).await;
    machines_online(&base, &["m1"]).await;
    let (_, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 2000}),
    )
    .await;
    let job_id = out["job_id"].as_str().unwrap().to_string();
    job_when(&base, &job_id, "running", |v| {
        v["machines"][0]["status"] == "running"
    })
    .await;

    let (s, c) = post(&base, &format!("/api/jobs/{job_id}/cancel"), &json!({})).await;
    assert_eq!((s, &c["cancel_sent"]), (202, &json!(true)), "{c}");
    let mut sse = Sse::open(&format!("{base}/api/jobs/{job_id}/events"), None).await;
    let frames = sse.until_end().await;
    assert_eq!(frames.last().unwrap().json()["status"], "cancelled");
    let done = job_finished(&base, &job_id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["machines"][0]["error"]["code"], "cancelled");
    let run = dir.path().join("runs").join(&job_id);
    until("results written", || async {
        run.join("metadata.json").exists().then_some(())
    })
    .await;

    let resp = reqwest::Client::new()
        .delete(format!("{base}/api/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(!run.exists(), "results removed");
    assert_eq!(get(&base, &format!("/api/jobs/{job_id}")).await.0, 404);
    assert_eq!(
        get(&base, &format!("/api/jobs/{job_id}/events")).await.0,
        404,
        "events purged from the stream"
    );
    let (_, list) = get(&base, "/api/jobs").await;
    assert_eq!(list["jobs"], json!([]));
    // The deleted id is not handed out again (its late events are dropped).
    let (status, v) = post(
        &base,
        "/api/jobs",
        &json!({"job_id": job_id, "machines": ["m1"], "model": "mock-7b", "prompt": "again"}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
}
