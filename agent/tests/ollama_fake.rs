//! The Ollama backend against FakeOllama: a fake (Ollama cannot run here) that speaks Ollama's
//! documented wire protocol — `/api/tags`, streaming NDJSON from `/api/generate` and
//! `/api/chat` with `application/x-ndjson`, the final line's counts and nanosecond durations,
//! and a 404 `{"error": ...}` for an unknown model. Every derived metric is checked exactly.

mod common;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bench_schemas::metrics::percentiles;
use bench_schemas::{subjects, ErrorCode, EventKind, TokenCountSource};
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CHUNKS: &[&str] = &["Paris", " is", " the", " capital", "."];
const EVAL_COUNT: u64 = 6; // Ollama counts the end-of-sequence token too
const PROMPT_EVAL_COUNT: u64 = 7;
const LOAD_NS: u64 = 12_345_678;
const PROMPT_EVAL_NS: u64 = 70_000_000;
const EVAL_NS: u64 = 150_000_000;
const TOTAL_NS: u64 = 260_000_000;
const FIRST_DELAY: Duration = Duration::from_millis(120);
const GAP: Duration = Duration::from_millis(30);

#[derive(Clone, Default)]
struct Fake {
    requests: Arc<Mutex<Vec<(String, Value)>>>,
    /// Models "in memory", as `/api/ps` lists them: loaded by their first generation.
    loaded: Arc<Mutex<Vec<String>>>,
}

async fn ps(State(f): State<Fake>) -> Json<Value> {
    let models: Vec<Value> = f
        .loaded
        .lock()
        .unwrap()
        .iter()
        .map(|m| json!({"name": m, "model": m, "size": 5137025024u64, "digest": "46e0c10c039e", "expires_at": "2025-10-17T23:19:07Z", "size_vram": 5137025024u64}))
        .collect();
    Json(json!({"models": models}))
}

async fn tags() -> Json<Value> {
    Json(json!({"models": [
        {"name": "llama3.1:8b", "model": "llama3.1:8b", "modified_at": "2025-10-17T23:14:07Z", "size": 4920753328u64, "digest": "46e0c10c039e", "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}},
        {"name": "broken:latest", "model": "broken:latest", "modified_at": "2025-10-17T23:14:07Z", "size": 1, "digest": "0", "details": {}}
    ]}))
}

async fn stream(path: &'static str, fake: Fake, body: Value) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    // A raw prompt is counted as this fake's tokenizer would: a BOS and one token per word.
    let prompt_count = match body["raw"].as_bool() {
        Some(true) => {
            body["prompt"]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .count() as u64
                + 1
        }
        _ => PROMPT_EVAL_COUNT,
    };
    fake.requests.lock().unwrap().push((path.to_string(), body));
    {
        let mut loaded = fake.loaded.lock().unwrap();
        if !loaded.contains(&model) {
            loaded.push(model.clone());
        }
    }
    if model != "llama3.1:8b" && model != "broken" {
        let msg = format!("model \"{model}\" not found, try pulling it first");
        return (StatusCode::NOT_FOUND, Json(json!({"error": msg}))).into_response();
    }
    let chat = path == "/api/chat";
    let broken = model == "broken";
    // Lines written field by field in the order Ollama's own encoder writes them.
    let created = "2025-10-17T23:14:07.414671Z";
    let m = serde_json::to_string(&model).unwrap();
    let piece = move |text: &str| {
        let t = serde_json::to_string(text).unwrap();
        if chat {
            format!(
                r#"{{"model":{m},"created_at":"{created}","message":{{"role":"assistant","content":{t}}},"done":false}}"#
            )
        } else {
            format!(r#"{{"model":{m},"created_at":"{created}","response":{t},"done":false}}"#)
        }
    };
    let m = serde_json::to_string(&model).unwrap();
    let stats = format!(
        r#""total_duration":{TOTAL_NS},"load_duration":{LOAD_NS},"prompt_eval_count":{prompt_count},"prompt_eval_duration":{PROMPT_EVAL_NS},"eval_count":{EVAL_COUNT},"eval_duration":{EVAL_NS}"#
    );
    let last = if chat {
        format!(
            r#"{{"model":{m},"created_at":"{created}","message":{{"role":"assistant","content":""}},"done_reason":"stop","done":true,{stats}}}"#
        )
    } else {
        format!(
            r#"{{"model":{m},"created_at":"{created}","response":"","done":true,"done_reason":"stop","context":[1,2,3],{stats}}}"#
        )
    };
    let s = async_stream(
        move |tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>| async move {
            tokio::time::sleep(FIRST_DELAY).await;
            for (i, c) in CHUNKS.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(GAP).await;
                }
                let _ = tx.send(Ok(format!("{}\n", piece(c)).into())).await;
                if broken && i == 1 {
                    return; // connection closes without the final line
                }
            }
            let _ = tx.send(Ok(format!("{last}\n").into())).await;
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(s))
        .unwrap()
}

fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn start_fake() -> (String, Fake) {
    let fake = Fake::default();
    let app = Router::new()
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route(
            "/api/generate",
            post(|State(f): State<Fake>, Json(b): Json<Value>| stream("/api/generate", f, b)),
        )
        .route(
            "/api/chat",
            post(|State(f): State<Fake>, Json(b): Json<Value>| stream("/api/chat", f, b)),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

/// Equal up to float rounding (1 part in 10^12).
fn close(got: Option<f64>, want: f64) {
    let got = got.unwrap_or_else(|| panic!("missing value, expected {want}"));
    assert!(
        (got - want).abs() <= want.abs() * 1e-12,
        "got {got}, want {want}"
    );
}

async fn run_and_check(mode: &str, expect_path: &str) {
    let nats = NatsServer::start();
    let (url, fake) = start_fake().await;
    let _agent = start_agent(
        config(
            &format!("machine_id: ol\nengine: ollama\nollama_base_url: {url}\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let job_id = format!("ol-{mode}");
    let mut ev = Events::watch(&c, &job_id).await;
    let job = job_json(
        "llama3.1:8b",
        json!({"job_id": job_id, "mode": mode, "max_tokens": 64, "num_ctx": 4096, "temperature": 0.5, "seed": 42}),
    );
    let r = request(&c, subjects::jobs("ol"), job).await;
    assert!(r.accepted, "{r:?}");
    let done = ev.terminal("ol").await;
    let EventKind::JobDone(d) = &done.kind else {
        panic!("{:?}", done)
    };

    // What we asked Ollama for.
    let (path, body) = fake.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(path, expect_path);
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["options"],
        json!({"num_predict": 64, "num_ctx": 4096, "temperature": 0.5, "seed": 42})
    );

    // The model was not loaded (`/api/ps`): the first run is cold, reported apart with
    // Ollama's load time, and the measured run follows.
    assert_eq!(d.repeats.len(), 2);
    let cold = &d.repeats[0];
    assert!(cold.cold && !cold.warmup);
    close(d.summary.cold.expect("cold run").load_ms, 12.345678);
    assert_eq!(d.summary.repeats, 1);

    // Streamed text, one llm_token per chunk (flush_chars 1), stamped on arrival.
    let tokens: Vec<(String, f64)> = ev
        .seen
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::LlmToken(t) if t.repeat_index == 1 => Some((t.text.clone(), t.t_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(
        tokens.iter().map(|t| t.0.as_str()).collect::<String>(),
        CHUNKS.concat()
    );
    assert_eq!(d.output_text, CHUNKS.concat());
    let times: Vec<f64> = tokens.iter().map(|t| t.1).collect();

    let m = &d.repeats[1];
    assert_eq!(m.token_count_source, TokenCountSource::OllamaEvalCount);
    assert_eq!(m.gen_tokens, EVAL_COUNT);
    // Each line is one token; the end-of-sequence Ollama counts was never streamed.
    let streamed = CHUNKS.len() as u64;
    assert_eq!(m.streamed_tokens, streamed);
    assert_eq!(m.chunks, CHUNKS.len() as u64);
    assert_eq!(m.output_chars, CHUNKS.concat().chars().count() as u64);
    assert_eq!(m.ttft_ms, times[0]);
    assert!(m.ttft_ms >= FIRST_DELAY.as_millis() as f64, "{}", m.ttft_ms);
    assert!(m.total_ms >= *times.last().unwrap());
    let span_s = (times.last().unwrap() - times[0]) / 1000.0;
    assert!(span_s * 1000.0 >= (GAP * (CHUNKS.len() as u32 - 1)).as_millis() as f64);
    let rate = (streamed - 1) as f64 / span_s;
    close(m.gen_tokens_per_s, rate);
    close(m.tpot_ms, 1000.0 / rate);
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let (got, want) = (m.itl_ms.unwrap(), percentiles(&gaps).unwrap());
    close(Some(got.p50), want.p50);
    close(Some(got.p90), want.p90);
    close(Some(got.p99), want.p99);
    assert_eq!(m.prompt_tokens, Some(PROMPT_EVAL_COUNT));
    close(
        m.prompt_tokens_per_s,
        PROMPT_EVAL_COUNT as f64 / (m.ttft_ms / 1000.0),
    );
    // Ollama's own numbers, converted from nanoseconds.
    close(m.load_ms, 12.345678);
    close(m.engine_prompt_ms, 70.0);
    close(m.engine_gen_ms, 150.0);
    close(m.engine_total_ms, 260.0);
    close(m.engine_gen_tokens_per_s, 40.0);
    close(m.engine_prompt_tokens_per_s, 100.0);
    assert_eq!(m.done_reason.as_deref(), Some("stop"));
    assert_eq!(m.prompt_evaluated, Some(PROMPT_EVAL_COUNT));
    // job_done's top-level fields are the medians over the (one) measured run.
    assert_eq!(
        (d.ttft_ms, d.total_ms, d.gen_tokens, d.gen_tokens_per_s),
        (m.ttft_ms, m.total_ms, m.gen_tokens, m.gen_tokens_per_s)
    );
    assert_eq!(d.engine, "ollama");
}

#[tokio::test]
async fn exact_prompt_sizes_without_a_tokenizer_endpoint() {
    // Ollama has no /tokenize: the agent builds the prompt from words and corrects it with the
    // probe's prompt_eval_count; every measured run starts with its own word (cold).
    let nats = NatsServer::start();
    let (url, fake) = start_fake().await;
    let _agent = start_agent(
        config(
            &format!("machine_id: olp\nengine: ollama\nollama_base_url: {url}\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "olp-1").await;
    let job = job_json(
        "llama3.1:8b",
        json!({"job_id": "olp-1", "prompt": "", "prompt_tokens": 40, "max_tokens": 8, "repeat": 3}),
    );
    let r = request(&c, subjects::jobs("olp"), job).await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("olp").await.kind else {
        panic!("{:?}", ev.types())
    };
    assert!(d.repeats.iter().all(|m| m.prompt_tokens == Some(40)));
    let requests = fake.requests.lock().unwrap().clone();
    let runs: Vec<&Value> = requests
        .iter()
        .map(|(_, b)| b)
        .filter(|b| b["options"]["num_predict"] == 8)
        .collect();
    assert_eq!(runs.len(), d.repeats.len());
    let firsts: std::collections::BTreeSet<&str> = runs
        .iter()
        .map(|b| {
            assert_eq!(b["raw"], true, "no template around a counted prompt");
            b["prompt"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        firsts.len(),
        runs.len(),
        "every run starts differently: {firsts:?}"
    );
    // Ollama never generates to a fixed length: the 5-token answers are flagged short and
    // left out of the summary.
    assert!(d.repeats.iter().all(|m| m.short_output));
    assert_eq!((d.summary.repeats, d.summary.excluded_short), (0, 3));
    assert!(d.summary.gen_tokens_per_s.is_none());
}

#[tokio::test]
async fn generate_metrics_are_exact() {
    run_and_check("generate", "/api/generate").await;
}

#[tokio::test]
async fn chat_metrics_are_exact() {
    run_and_check("chat", "/api/chat").await;
}

#[tokio::test]
async fn unknown_model_broken_stream_and_unreachable_engine() {
    let nats = NatsServer::start();
    let (url, _fake) = start_fake().await;
    let _agent = start_agent(
        config(
            &format!("machine_id: ol2\nengine: ollama\nollama_base_url: {url}\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    // Not in /api/tags: refused before it queues.
    let r = request(&c, subjects::jobs("ol2"), job_json("qwen:0.5b", json!({}))).await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::ModelNotFound));
    // `llama3.1` means `llama3.1:latest` to Ollama, which this fake doesn't have.
    let r = request(&c, subjects::jobs("ol2"), job_json("llama3.1", json!({}))).await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::ModelNotFound));
    // The stream closes after two chunks without its final line.
    let mut ev = Events::watch(&c, "ol-broken").await;
    let r = request(
        &c,
        subjects::jobs("ol2"),
        job_json("broken", json!({"job_id": "ol-broken"})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    match ev.terminal("ol2").await.kind {
        EventKind::JobError(f) => {
            assert_eq!(f.error.code, ErrorCode::StreamBroken, "{}", f.error.message)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ev.text(0),
        "Paris is",
        "text streamed before the break is kept"
    );

    // Nothing listening: engine_unreachable, never a silent switch to mock.
    let dead = format!("http://127.0.0.1:{}", bench_nats::harness::free_port());
    let _agent3 = start_agent(
        config(&format!("machine_id: ol3\nengine: ollama\nollama_base_url: {dead}\nllm_models: [llama3.1:8b]\n"), &nats.url()),
        &nats.url(),
    )
    .await;
    let mut ev = Events::watch(&c, "ol-dead").await;
    let r = request(
        &c,
        subjects::jobs("ol3"),
        job_json("llama3.1:8b", json!({"job_id": "ol-dead"})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    match ev.terminal("ol3").await.kind {
        EventKind::JobError(f) => assert_eq!(
            f.error.code,
            ErrorCode::EngineUnreachable,
            "{}",
            f.error.message
        ),
        other => panic!("{other:?}"),
    }
    assert!(!ev.types().contains(&"llm_token"));
}

#[tokio::test]
async fn a_hung_engine_stalls_neither_intake_nor_the_run() {
    // Accepts connections and never answers: neither the model list nor a generation.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let nats = NatsServer::start();
    let yaml = format!(
        "machine_id: hung\nengine: ollama\nollama_base_url: {url}\nengine_idle_timeout_s: 1\n"
    );
    let _agent = start_agent(config(&yaml, &nats.url()), &nats.url()).await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "hung-1").await;
    let asked = std::time::Instant::now();
    let r = request(
        &c,
        subjects::jobs("hung"),
        job_json("llama3.1:8b", json!({"job_id": "hung-1"})),
    )
    .await;
    assert!(
        r.accepted,
        "nothing to check the model against: accepted ({r:?})"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the reply waited {:?}",
        asked.elapsed()
    );
    match within("job_error", Duration::from_secs(15), ev.terminal("hung"))
        .await
        .kind
    {
        EventKind::JobError(f) => {
            assert_eq!(f.error.code, ErrorCode::Timeout, "{}", f.error.message)
        }
        other => panic!("{other:?}"),
    }
}
