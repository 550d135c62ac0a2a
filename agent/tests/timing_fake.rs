//! The metric definitions against known truth: FakeScriptedServer, a fake OpenAI-compatible
//! server (llama.cpp's and vLLM's streaming protocol: `data:` chunks, a role-only first delta,
//! `usage` in a last chunk with empty `choices`, `data: [DONE]`) whose every chunk leaves at a
//! scripted instant (absolute deadlines from the request's arrival, so delays never add up).
//! The agent's TTFT, decode rate, ITL and TTFOT must match the script, not a formula applied
//! to the agent's own timestamps: TTFT within a few ms, rates and ITL within 1%.

mod common;

use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use bench_schemas::{subjects, EventKind, Metrics, Stats};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// First content chunk after the request arrives.
const FIRST_MS: f64 = 150.0;
/// Between content chunks.
const GAP_MS: f64 = 50.0;

/// One scripted stream: what each chunk holds, in order.
#[derive(Clone, Copy)]
enum Piece {
    /// `delta: {role: assistant}`, no content: never a token.
    Role,
    /// Reasoning text (`reasoning_content`), one token.
    Think,
    /// Answer text holding this many tokens.
    Text(u64),
}

/// The script for a model: pieces (the role chunk at 10 ms, content from FIRST_MS every
/// GAP_MS), the engine's completion_tokens count, and its finish_reason.
fn script(model: &str) -> (Vec<Piece>, u64, &'static str) {
    let text = |n: usize, k: u64| std::iter::repeat_n(Piece::Text(k), n);
    match model {
        // 24 single tokens, then an end-of-sequence the engine counts but never streams.
        "eos" => (
            [Piece::Role].into_iter().chain(text(24, 1)).collect(),
            25,
            "stop",
        ),
        // 10 chunks of 3 tokens each (a detokenizer holding back partial UTF-8, say).
        "multi" => (text(10, 3).collect(), 30, "length"),
        // 6 reasoning tokens, then 12 answer tokens.
        "think" => (
            [Piece::Role]
                .into_iter()
                .chain(std::iter::repeat_n(Piece::Think, 6))
                .chain(text(12, 1))
                .collect(),
            18,
            "length",
        ),
        "one" => (text(1, 1).collect(), 1, "length"),
        "none" => (vec![Piece::Role], 0, "stop"),
        _ => (vec![], 0, "stop"),
    }
}

const MODELS: &[&str] = &["eos", "multi", "think", "one", "none"];

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": MODELS.iter().map(|m| json!({"id": m, "object": "model", "owned_by": "fake"})).collect::<Vec<_>>()}),
    )
}

async fn chat(Json(body): Json<Value>) -> Response {
    let arrived = Instant::now();
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let (pieces, count, finish) = script(&model);
    fake_engine::sse(move |tx| async move {
        let mut k = 0u32;
        for p in pieces {
            let at_ms = match p {
                Piece::Role => 10.0,
                _ => {
                    k += 1;
                    FIRST_MS + GAP_MS * f64::from(k - 1)
                }
            };
            tokio::time::sleep_until(arrived + Duration::from_secs_f64(at_ms / 1000.0)).await;
            let delta = match p {
                Piece::Role => json!({"role": "assistant", "content": null}),
                Piece::Think => json!({"reasoning_content": "hm"}),
                Piece::Text(n) => json!({"content": "x".repeat(n as usize)}),
            };
            let _ = tx
                .send(Ok(fake_engine::chat_chunk(&model, delta, None)))
                .await;
        }
        let _ = tx
            .send(Ok(fake_engine::chat_chunk(&model, json!({}), Some(finish))))
            .await;
        fake_engine::finish(&tx, 9, count).await;
    })
}

/// The fake on a thread of its own (its schedule is never late because the agent is busy).
fn start_fake() -> String {
    fake_engine::serve(|| {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
    })
}

/// Runs `model`'s script 3 times (after the cold first request) and returns the measured run's
/// metrics with every timing replaced by its median over the 3: one scheduling hiccup of a
/// loaded machine must not decide a test of the definitions.
async fn run(c: &async_nats::Client, model: &str) -> Metrics {
    let job_id = format!("t-{model}");
    let mut ev = Events::watch(c, &job_id).await;
    let r = request(
        c,
        subjects::jobs("tf"),
        job_json(
            model,
            json!({"job_id": job_id, "mode": "chat", "prompt": "go", "max_tokens": 64, "repeat": 3}),
        ),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("tf").await.kind else {
        panic!("{model}: {:?}", ev.types())
    };
    // The fake cannot say what it has loaded: the agent's first request to a model is cold.
    let runs: Vec<Metrics> = d.repeats.into_iter().filter(|m| !m.cold).collect();
    assert_eq!(runs.len(), 3, "{model}");
    let mut m = runs[0].clone();
    for r in &runs {
        assert_eq!(
            (r.gen_tokens, r.streamed_tokens, &r.null_reason),
            (m.gen_tokens, m.streamed_tokens, &m.null_reason),
            "{model}: every run of a script counts the same"
        );
    }
    let med = |f: &dyn Fn(&Metrics) -> Option<f64>| {
        Stats::from_samples(runs.iter().filter_map(f)).map(|s| s.median)
    };
    m.ttft_ms = med(&|r| Some(r.ttft_ms)).unwrap_or(f64::NAN);
    m.ttfot_ms = med(&|r| r.ttfot_ms);
    m.gen_tokens_per_s = med(&|r| r.gen_tokens_per_s);
    m.tpot_ms = med(&|r| r.tpot_ms);
    if let Some(itl) = m.itl_ms.as_mut() {
        itl.p50 = med(&|r| r.itl_ms.map(|i| i.p50)).expect("itl");
    }
    m
}

// The agent runs on a multi-threaded runtime, as `bench-agent` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttft_decode_rate_and_itl_match_the_scripted_timing() {
    let nats = NatsServer::start();
    let url = start_fake();
    let _agent = start_agent(
        config(
            &format!("machine_id: tf\nengine: openai\nopenai_base_url: {url}\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    // A few ms for connecting and parsing on a loaded machine; 1% for rates and ITL.
    let ttft_slack = 5.0;

    // A role-only chunk first (not a token), then 24 tokens, and an end-of-sequence counted
    // (25) but never streamed: the rate is over the 23 tokens after the first, in 23 gaps.
    let m = run(&c, "eos").await;
    within_ms("eos ttft", m.ttft_ms, FIRST_MS, ttft_slack);
    assert_eq!((m.gen_tokens, m.streamed_tokens), (25, 24));
    within_pct("eos decode", m.gen_tokens_per_s, 1000.0 / GAP_MS, 1.0);
    within_pct("eos itl p50", m.itl_ms.map(|p| p.p50), GAP_MS, 1.0);
    within_pct("eos tpot", m.tpot_ms, GAP_MS, 1.0);
    assert_eq!(m.ttfot_ms, Some(m.ttft_ms));

    // 10 chunks of 3 tokens: 27 tokens after the first chunk in 9 gaps; ITL per token is a
    // third of a gap.
    let m = run(&c, "multi").await;
    within_ms("multi ttft", m.ttft_ms, FIRST_MS, ttft_slack);
    assert_eq!(m.streamed_tokens, 30);
    within_pct(
        "multi decode",
        m.gen_tokens_per_s,
        27.0 / (9.0 * GAP_MS / 1000.0),
        1.0,
    );
    within_pct("multi itl p50", m.itl_ms.map(|p| p.p50), GAP_MS / 3.0, 1.0);

    // Reasoning: TTFT is the first reasoning token; TTFOT the first answer token 6 gaps later.
    let m = run(&c, "think").await;
    within_ms("think ttft", m.ttft_ms, FIRST_MS, ttft_slack);
    within_ms(
        "think ttfot",
        m.ttfot_ms.expect("an answer came"),
        FIRST_MS + 6.0 * GAP_MS,
        ttft_slack,
    );
    within_pct("think decode", m.gen_tokens_per_s, 1000.0 / GAP_MS, 1.0);

    // One token: TTFT yes, no rate (and a reason), never an infinity.
    let m = run(&c, "one").await;
    within_ms("one ttft", m.ttft_ms, FIRST_MS, ttft_slack);
    assert_eq!((m.gen_tokens_per_s, m.tpot_ms), (None, None));
    assert!(m.null_reason.is_some());

    // Nothing but a role chunk: no TTFT at all (null on the wire), no rate.
    let m = run(&c, "none").await;
    assert!(m.ttft_ms.is_nan(), "no fabricated TTFT: {}", m.ttft_ms);
    assert_eq!(m.gen_tokens_per_s, None);
    assert_eq!(m.null_reason.as_deref(), Some("no tokens were generated"));
}
