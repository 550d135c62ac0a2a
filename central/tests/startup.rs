//! Start-up refuses clearly when NATS is missing or has no JetStream; a NATS server restart
//! while central runs loses nothing.

mod common;

use bench_central::error::StartError;
use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn start_err(url: &str, dir: &std::path::Path) -> StartError {
    let mut cfg = central_config(url, dir);
    cfg.nats_wait = Duration::from_millis(500);
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    match within(
        "start",
        WAIT,
        bench_central::start(cfg, client, listener, token),
    )
    .await
    {
        Ok(_) => panic!("central started"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn refuses_without_nats_or_without_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let port = bench_nats::harness::free_port();
    let e = start_err(&format!("nats://127.0.0.1:{port}"), dir.path()).await;
    assert!(matches!(e, StartError::NatsUnreachable { .. }), "{e}");
    assert!(e.to_string().contains("scripts/nats start"), "{e}");

    // A real server without -js.
    let mut plain = Command::new(bench_nats::harness::server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    until("plain nats-server up", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let e = start_err(&url, dir.path()).await;
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(matches!(e, StartError::JetStreamOff(_)), "{e}");
    assert!(e.to_string().contains("-js"), "{e}");
}

#[tokio::test]
async fn nats_restart_while_central_runs() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let _agent = mock_agent("m1", "mock-7b", 400.0, &nats.url()).await;
    machines_online(&base, &["m1"]).await;
    let body = json!({"machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 8});
    let (_, out) = post(&base, "/api/jobs", &body).await;
    assert_eq!(
        job_finished(&base, out["job_id"].as_str().unwrap()).await["status"],
        "done"
    );

    nats.restart();
    // Central, agent and the health endpoint come back by themselves.
    until("nats reconnected", || async {
        let (_, h) = get(&base, "/health").await;
        (h["nats"] == "connected").then_some(())
    })
    .await;
    machines_online(&base, &["m1"]).await;
    let out = until("dispatch after restart", || async {
        let (s, out) = post(&base, "/api/jobs", &body).await;
        (s == 201 && out["machines"][0]["status"] == "accepted").then_some(out)
    })
    .await;
    let job_id = out["job_id"].as_str().unwrap();
    let done = job_finished(&base, job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    let r = central.state().index.get(job_id).unwrap();
    assert_eq!(r.machines[0].gaps, 0);
    let (_, list) = get(&base, "/api/jobs").await;
    // Attempts made before the agent had re-subscribed were recorded as offline, not lost.
    assert_eq!(list["jobs"][0]["job_id"], job_id);
    assert!(
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .all(|j| j["status"] == "failed" || j["status"] == "done"),
        "{list}"
    );

    // Mid-job: the agent's publishes retry (deduplicated by Nats-Msg-Id), the indexer resumes.
    let slow = json!({"machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 300});
    let (s, out) = post(&base, "/api/jobs", &slow).await;
    assert_eq!(
        (s, &out["machines"][0]["status"]),
        (201, &json!("accepted")),
        "{out}"
    );
    let job_id = out["job_id"].as_str().unwrap();
    job_when(&base, job_id, "tokens indexed", |v| {
        v["machines"][0]["last_seq"].as_u64() >= Some(5)
    })
    .await;
    nats.restart();
    let done = job_finished(&base, job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    let r = central.state().index.get(job_id).unwrap();
    assert_eq!(
        r.machines[0].gaps, 0,
        "no event lost across the NATS restart"
    );
    until("results written", || async {
        dir.path()
            .join("runs")
            .join(job_id)
            .join("metadata.json")
            .exists()
            .then_some(())
    })
    .await;
    assert_exactly_once(&results_events(dir.path(), job_id));
}
