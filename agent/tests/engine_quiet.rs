//! An engine running a benchmark is left alone: with heartbeats and model-list refreshes every
//! 0.1 s, not one model-list request reaches the engine while it streams a job (heartbeats and
//! job intake use the cached list), and the idle engine is asked again afterwards.
//!
//! The engine is a fake Ollama (Ollama cannot run here): `/api/tags`, and `/api/generate`
//! streaming one NDJSON line per token every 75 ms, `num_predict` tokens, then the final line.
//! It logs every request, so the test can see what reached it during a stream.

mod common;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use bench_schemas::{subjects, ErrorCode, EventKind};
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GAP: Duration = Duration::from_millis(75);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hit {
    Tags,
    StreamStart,
    StreamEnd,
}

#[derive(Clone, Default)]
struct Fake {
    log: Arc<Mutex<Vec<Hit>>>,
}

impl Fake {
    fn hit(&self, h: Hit) {
        self.log.lock().unwrap().push(h);
    }
    fn log(&self) -> Vec<Hit> {
        self.log.lock().unwrap().clone()
    }
}

async fn tags(State(f): State<Fake>) -> Json<Value> {
    f.hit(Hit::Tags);
    Json(
        json!({"models": [{"name": "slow:latest", "model": "slow:latest", "size": 1, "digest": "0", "details": {}}]}),
    )
}

async fn generate(State(f): State<Fake>, Json(body): Json<Value>) -> Response {
    f.hit(Hit::StreamStart);
    let n = body["options"]["num_predict"].as_u64().unwrap_or(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for _ in 0..n {
            tokio::time::sleep(GAP).await;
            let line = r#"{"model":"slow:latest","created_at":"2025-10-17T23:14:07Z","response":" tok","done":false}"#;
            let _ = tx.send(Ok(format!("{line}\n").into())).await;
        }
        let last = format!(
            r#"{{"model":"slow:latest","created_at":"2025-10-17T23:14:07Z","response":"","done":true,"done_reason":"length","total_duration":1,"load_duration":1,"prompt_eval_count":1,"prompt_eval_duration":1,"eval_count":{n},"eval_duration":1}}"#
        );
        f.hit(Hit::StreamEnd);
        let _ = tx.send(Ok(format!("{last}\n").into())).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
        .unwrap()
}

#[tokio::test]
async fn no_model_list_request_reaches_an_engine_while_it_runs_a_job() {
    let nats = NatsServer::start();
    let fake = Fake::default();
    let app = Router::new()
        .route("/api/tags", get(tags))
        .route("/api/generate", post(generate))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let _agent = start_agent(
        config(
            &format!("machine_id: quiet\nengine: ollama\nollama_base_url: {url}\nheartbeat_s: 0.1\nengine_models_refresh_s: 0.1\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "quiet-1").await;
    let mut ev2 = Events::watch(&c, "quiet-2").await;
    // 40 tokens at 75 ms: a 3 s stream, 30 heartbeats.
    let r = request(
        &c,
        subjects::jobs("quiet"),
        job_json("slow", json!({"job_id": "quiet-1", "max_tokens": 40})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    ev.until(|e| matches!(e.kind, EventKind::LlmToken(_))).await;
    // Intake while busy: a known model queues from the cached list, an unknown one is refused
    // from it too; neither asks the engine.
    let queued = request(
        &c,
        subjects::jobs("quiet"),
        job_json("slow", json!({"job_id": "quiet-2", "max_tokens": 2})),
    )
    .await;
    assert_eq!(
        (queued.accepted, queued.position),
        (true, Some(1)),
        "{queued:?}"
    );
    let unknown = request(
        &c,
        subjects::jobs("quiet"),
        job_json("llama-9000", json!({"job_id": "quiet-3"})),
    )
    .await;
    let err = unknown.error.expect("refused");
    assert_eq!(err.code, ErrorCode::ModelNotFound, "{}", err.message);
    assert!(err.message.contains("not asked"), "{}", err.message);

    assert!(matches!(
        ev.terminal("quiet").await.kind,
        EventKind::JobDone(_)
    ));
    assert!(matches!(
        ev2.terminal("quiet").await.kind,
        EventKind::JobDone(_)
    ));
    // The idle engine is asked again (heartbeats go on).
    let log = within("a list request after the runs", WAIT, async {
        loop {
            let log = fake.log();
            if log.last() == Some(&Hit::Tags) {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut streaming = false;
    let mut during = 0;
    for h in &log {
        match h {
            Hit::StreamStart => streaming = true,
            Hit::StreamEnd => streaming = false,
            Hit::Tags if streaming => during += 1,
            Hit::Tags => {}
        }
    }
    let before = log.iter().take_while(|h| **h != Hit::StreamStart).count();
    println!("engine log: {before} list requests before the first stream, {during} during streams, {} in all", log.iter().filter(|h| **h == Hit::Tags).count());
    assert!(before >= 1, "heartbeats ask the idle engine: {log:?}");
    assert_eq!(
        during, 0,
        "model-list requests while the engine streamed: {log:?}"
    );
}
