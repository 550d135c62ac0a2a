//! The agent against a real llama.cpp `llama-server` serving gemma-3-270m (built and installed
//! by `scripts/engine install`), on a real nats-server.

mod common;

use bench_schemas::{subjects, ErrorCode, EventKind, TokenCountSource};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PROMPT: &str = "The capital of France is";

/// llama.cpp's own `timings.predicted_n` for the same greedy request, read by this test's own
/// SSE parsing (independent of the agent's).
async fn predicted_n_direct(engine: &str, max_tokens: u32) -> u64 {
    let body = json!({"model": ENGINE_MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 7, "stream": true});
    let resp = reqwest::Client::new()
        .post(format!("{engine}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = within("direct stream", WAIT, body.next()).await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.pointer("/timings/predicted_n").and_then(Value::as_u64))
        .expect("llama-server sent timings")
}

#[tokio::test]
async fn real_engine_jobs_metrics_and_repeats() {
    let engine = LlamaServer::start();
    let nats = NatsServer::start();
    let cfg = config(
        &format!(
            "machine_id: llama\nengine: openai\nopenai_base_url: {}\n",
            engine.url()
        ),
        &nats.url(),
    );
    let _agent = start_agent(cfg, &nats.url()).await;
    let c = client(&nats.url()).await;

    // One job: accepted, started, tokens, done.
    let mut ev = Events::watch(&c, "ll-1").await;
    let job = job_json(
        ENGINE_MODEL,
        json!({"job_id": "ll-1", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "seed": 7}),
    );
    let r = request(&c, subjects::jobs("llama"), job).await;
    assert!(r.accepted, "{r:?}");
    let done = ev.terminal("llama").await;
    let EventKind::JobDone(d) = &done.kind else {
        panic!("{:?}", ev.types())
    };
    let types = ev.types();
    assert_eq!(&types[..2], &["job_accepted", "job_started"]);
    assert!(types.contains(&"llm_token"));
    assert_eq!(&types[types.len() - 2..], &["repeat_done", "job_done"]);
    let streamed = ev.text(0);
    assert!(!streamed.trim().is_empty());
    assert_eq!(streamed, d.output_text);
    let m = &d.repeats[0];
    assert_eq!(m.token_count_source, TokenCountSource::LlamacppTimings);
    assert_eq!(
        m.gen_tokens,
        predicted_n_direct(&engine.url(), 24).await,
        "gen_tokens is llama.cpp's predicted_n"
    );
    assert!(m.gen_tokens > 0 && m.gen_tokens <= 24);
    assert!(
        m.ttft_ms > 0.0 && m.ttft_ms < m.total_ms,
        "ttft {} total {}",
        m.ttft_ms,
        m.total_ms
    );
    assert!(m.prompt_tokens.unwrap_or(0) > 0);
    assert!(m.engine_gen_tokens_per_s.is_some() && m.engine_gen_ms.is_some());
    if m.gen_tokens >= 2 {
        assert!(m.gen_tokens_per_s.unwrap() > 0.0);
    }
    eprintln!(
        "gemma-3-270m via llama-server: ttft {:.1} ms, decode {:.1} tok/s (engine says {:.1}), {} tokens in {:.1} ms",
        m.ttft_ms,
        m.gen_tokens_per_s.unwrap_or(0.0),
        m.engine_gen_tokens_per_s.unwrap_or(0.0),
        m.gen_tokens,
        m.total_ms
    );

    // Chat mode goes through /v1/chat/completions with the gemma template.
    let mut ev = Events::watch(&c, "ll-chat").await;
    let r = request(
        &c,
        subjects::jobs("llama"),
        job_json(
            ENGINE_MODEL,
            json!({"job_id": "ll-chat", "mode": "chat", "max_tokens": 12}),
        ),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("llama").await.kind else {
        panic!("{:?}", ev.types())
    };
    assert!(d.repeats[0].gen_tokens > 0);

    // repeat 3, warmup 1: three measured repeats and their summary.
    let mut ev = Events::watch(&c, "ll-rep").await;
    let r = request(
        &c,
        subjects::jobs("llama"),
        job_json(
            ENGINE_MODEL,
            json!({"job_id": "ll-rep", "max_tokens": 12, "repeat": 3, "warmup": 1}),
        ),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("llama").await.kind else {
        panic!("{:?}", ev.types())
    };
    assert_eq!(d.repeats.len(), 4);
    assert_eq!(
        d.repeats.iter().map(|m| m.warmup).collect::<Vec<_>>(),
        vec![true, false, false, false]
    );
    assert_eq!(d.summary.repeats, 3);
    let ttft = d.summary.ttft_ms.expect("ttft stats");
    assert_eq!(ttft.n, 3);
    assert!(ttft.min <= ttft.median && ttft.median <= ttft.max);
    assert_eq!(
        ev.types().iter().filter(|t| **t == "job_started").count(),
        4
    );

    // A model the engine doesn't serve is refused (llama-server itself would answer anyway).
    let r = request(
        &c,
        subjects::jobs("llama"),
        job_json("llama3.1:70b", json!({})),
    )
    .await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::ModelNotFound));
}

#[tokio::test]
async fn engine_killed_mid_stream_is_stream_broken_within_seconds() {
    let mut engine = LlamaServer::start();
    let nats = NatsServer::start();
    let cfg = config(
        &format!(
            "machine_id: victim\nengine: openai\nopenai_base_url: {}\n",
            engine.url()
        ),
        &nats.url(),
    );
    let _agent = start_agent(cfg, &nats.url()).await;
    let c = client(&nats.url()).await;
    let mut ev = Events::watch(&c, "kill-1").await;
    let job = job_json(
        ENGINE_MODEL,
        json!({"job_id": "kill-1", "prompt": "Once upon a time, in a land far away,", "max_tokens": 2000}),
    );
    assert!(request(&c, subjects::jobs("victim"), job).await.accepted);
    ev.until(|e| matches!(e.kind, EventKind::LlmToken(_))).await;
    engine.kill();
    let killed = Instant::now();
    let end = within(
        "job_error after the kill",
        Duration::from_secs(20),
        ev.terminal("victim"),
    )
    .await;
    match end.kind {
        EventKind::JobError(f) => {
            assert_eq!(f.error.code, ErrorCode::StreamBroken, "{}", f.error.message)
        }
        other => panic!("expected job_error, got {other:?}"),
    }
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        killed.elapsed()
    );
}
