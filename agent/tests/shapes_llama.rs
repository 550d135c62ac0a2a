//! Controlled shapes against a real llama.cpp `llama-server` (gemma-3-270m): exact prompt
//! sizes as the engine counts them, a depth served from the engine's cache, exactly
//! `max_tokens` generated, the first request reported cold, and our client-side rates against
//! llama.cpp's own `timings` within 2%.

mod common;

use bench_schemas::{subjects, EventKind, Metrics, Stats};
use common::*;
use serde_json::json;

fn median(runs: &[&Metrics], f: impl Fn(&Metrics) -> Option<f64>) -> f64 {
    Stats::from_samples(runs.iter().filter_map(|m| f(m)))
        .expect("samples")
        .median
}

#[tokio::test]
async fn exact_shapes_depth_cold_and_agreement_with_llamacpp_timings() {
    let engine = LlamaServer::start();
    let nats = NatsServer::start();
    let cfg = config(
        &format!(
            "machine_id: shape\nengine: openai\nopenai_base_url: {}\n",
            engine.url()
        ),
        &nats.url(),
    );
    let _agent = start_agent(cfg, &nats.url()).await;
    let c = client(&nats.url()).await;

    // pp512-tg32: every run's prompt is exactly 512 tokens as llama.cpp counts them (BOS
    // included), processed in full (cold), and exactly 32 tokens come back. 512 tokens, as
    // llama-bench's pp512: the client-side prompt rate (512 / TTFT) also holds ~10 ms of HTTP
    // and server queueing, about 1% of a 512-token prompt here but 3% of a 128-token one.
    let mut ev = Events::watch(&c, "pp-1").await;
    let job = job_json(
        ENGINE_MODEL,
        json!({"job_id": "pp-1", "prompt": "", "profile": "pp512-tg32", "repeat": 4, "temperature": 0.0}),
    );
    let r = request(&c, subjects::jobs("shape"), job).await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("shape").await.kind else {
        panic!("{:?}", ev.types())
    };
    // The agent's first request to the model since it started is cold, reported apart.
    assert_eq!(d.repeats.len(), 5, "a cold run, then 4 measured");
    assert!(d.repeats[0].cold && !d.repeats[0].warmup);
    assert!(d.repeats[1..].iter().all(|m| !m.cold));
    assert_eq!(d.summary.repeats, 4);
    assert!(d.summary.cold.is_some());
    let shape = d.shape.expect("shape");
    assert_eq!(
        (shape.prompt_tokens, shape.max_tokens, shape.ignore_eos),
        (Some(512), 32, true)
    );
    for m in &d.repeats {
        assert_eq!(m.prompt_tokens, Some(512), "run {}", m.repeat_index);
        assert_eq!(
            m.prompt_evaluated,
            Some(512),
            "cold: nothing from the cache"
        );
        assert!(!m.prompt_cache_hit);
        assert_eq!((m.gen_tokens, m.streamed_tokens), (32, 32));
        assert!(!m.short_output);
    }
    let warm: Vec<&Metrics> = d.repeats.iter().filter(|m| !m.cold).collect();
    let ours = median(&warm, |m| m.gen_tokens_per_s);
    let theirs = median(&warm, |m| m.engine_gen_tokens_per_s);
    let pp_ours = median(&warm, |m| m.prompt_tokens_per_s);
    let pp_theirs = median(&warm, |m| m.engine_prompt_tokens_per_s);
    eprintln!(
        "pp512-tg32: decode {ours:.2} tok/s vs llama.cpp {theirs:.2} ({:+.2}%), prompt {pp_ours:.1} vs {pp_theirs:.1} ({:+.2}%)",
        (ours / theirs - 1.0) * 100.0,
        (pp_ours / pp_theirs - 1.0) * 100.0
    );
    assert!(
        (ours / theirs - 1.0).abs() < 0.02,
        "decode {ours} vs llama.cpp's predicted_per_second {theirs}"
    );
    assert!(
        (pp_ours / pp_theirs - 1.0).abs() < 0.02,
        "prompt rate {pp_ours} vs llama.cpp's prompt_per_second {pp_theirs}"
    );
    assert_eq!(
        d.pp_tokens_per_s,
        d.summary.pp_tokens_per_s.map(|s| s.median)
    );

    // depth 256 + 64 measured tokens: the engine holds 320, evaluates only the 64.
    let mut ev = Events::watch(&c, "depth-1").await;
    let job = job_json(
        ENGINE_MODEL,
        json!({"job_id": "depth-1", "prompt": "", "prompt_tokens": 64, "depth": 256, "max_tokens": 8, "repeat": 2}),
    );
    let r = request(&c, subjects::jobs("shape"), job).await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = ev.terminal("shape").await.kind else {
        panic!("{:?}", ev.types())
    };
    assert_eq!(d.repeats.len(), 2, "same model as before: no cold run");
    for m in &d.repeats {
        assert_eq!(m.prompt_tokens, Some(320));
        assert_eq!(
            m.prompt_evaluated,
            Some(64),
            "the depth came from the cache"
        );
        assert_eq!(m.gen_tokens, 8);
    }

    // A shape the context cannot hold is refused before anything runs.
    let r = request(
        &c,
        subjects::jobs("shape"),
        job_json(
            ENGINE_MODEL,
            json!({"job_id": "too-big", "profile": "pp4000-tg128", "num_ctx": 2048}),
        ),
    )
    .await;
    assert!(!r.accepted);
    assert_eq!(r.error.unwrap().code, bench_schemas::ErrorCode::InvalidJob);
}
