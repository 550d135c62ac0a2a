//! Matrix races and load cells against known truth: FakeSlotServer, a fake OpenAI-compatible
//! server (llama.cpp's streaming protocol: `data:` chunks, `usage` in a last chunk, `data:
//! [DONE]`) with a fixed number of parallel slots, like llama-server's `-np`. A request waits
//! for a free slot (first come, first served), then its chunks leave at scripted instants from
//! the moment it got the slot. So the numbers a load cell must report follow from the script:
//! with 2 slots and 4 closed-loop streams, half the requests wait one whole request first.

mod common;

use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use bench_schemas::event::Done;
use bench_schemas::{subjects, CellStatus, ErrorCode, Event, EventKind, Metrics};
use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Parallel slots of the fake.
const SLOTS: usize = 2;
/// First content chunk after the request got its slot.
const FIRST_MS: f64 = 150.0;
/// Content chunks per request (one token each).
const TOKENS: u64 = 10;

/// Between content chunks, per model: the decode rate is 1000 / gap.
fn gap_ms(model: &str) -> Option<f64> {
    match model {
        "fast" => Some(10.0),
        "slow" => Some(40.0),
        "load" => Some(20.0),
        _ => None,
    }
}

/// One request's whole time in its slot.
fn request_ms(gap: f64) -> f64 {
    FIRST_MS + gap * (TOKENS - 1) as f64
}

async fn models() -> Json<Value> {
    let data: Vec<Value> = ["fast", "slow", "load"]
        .iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "fake"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn chat(slots: Arc<Semaphore>, body: Value) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let gap = gap_ms(&model).unwrap_or(10.0);
    fake_engine::sse(move |tx| async move {
        // Held until the last chunk is sent: a slot serves one request at a time.
        let _slot = slots.acquire_owned().await.expect("slots");
        let start = Instant::now();
        for k in 0..TOKENS {
            let at = FIRST_MS + gap * k as f64;
            tokio::time::sleep_until(start + Duration::from_secs_f64(at / 1000.0)).await;
            let chunk = fake_engine::chat_chunk(&model, json!({"content": "x"}), None);
            let _ = tx.send(Ok(chunk)).await;
        }
        let _ = tx
            .send(Ok(fake_engine::chat_chunk(
                &model,
                json!({}),
                Some("length"),
            )))
            .await;
        fake_engine::finish(&tx, 9, TOKENS).await;
    })
}

/// The fake, with its slots, on a thread of its own.
fn start_fake() -> String {
    fake_engine::serve(|| {
        let slots = Arc::new(Semaphore::new(SLOTS));
        Router::new().route("/v1/models", get(models)).route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| chat(slots.clone(), body)),
        )
    })
}

/// The fake, a nats-server, an agent on both, and a client.
async fn fleet() -> (NatsServer, TestAgent, async_nats::Client) {
    let nats = NatsServer::start();
    let url = start_fake();
    let agent = start_agent(
        config(
            &format!("machine_id: ml\nengine: openai\nopenai_base_url: {url}\ntelemetry:\n  enabled: false\n"),
            &nats.url(),
        ),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;
    (nats, agent, c)
}

async fn run_job(c: &async_nats::Client, job: Value) -> (Done, Vec<Event>) {
    let job_id = job["job_id"].as_str().unwrap().to_string();
    let mut ev = Events::watch(c, &job_id).await;
    let r = request(c, subjects::jobs("ml"), serde_json::to_vec(&job).unwrap()).await;
    assert!(r.accepted, "{r:?}");
    let end = ev.terminal("ml").await;
    let EventKind::JobDone(d) = end.kind else {
        panic!("{job_id}: {:?} {:?}", ev.types(), end.kind)
    };
    (d, ev.seen)
}

fn cell_done(events: &[Event]) -> Vec<bench_schemas::CellResult> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CellDone(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_sweep_reports_the_scripted_throughput_latency_and_capacity() {
    let (_nats, _agent, c) = fleet().await;
    let (done, events) = run_job(
        &c,
        json!({"job_id": "sweep", "model": "load", "mode": "chat", "prompt": "go", "max_tokens": 64,
               "repeat": 2, "matrix": {"concurrency": [1, 2, 4]}, "slo": {"ttft_p99_ms": 300}}),
    )
    .await;
    let cells = cell_done(&events);
    assert_eq!(
        cells.iter().map(|c| c.cell.as_str()).collect::<Vec<_>>(),
        ["concurrency=1", "concurrency=2", "concurrency=4"]
    );
    assert_eq!(done.cells, cells, "job_done repeats every cell_done");
    let one = request_ms(20.0) / 1000.0; // 0.33 s in a slot
                                         // (concurrency, requests, rounds of the 2 slots, TTFT p99 in ms)
    let truth = [
        (1u32, 2u32, 2.0, FIRST_MS),
        (2, 4, 2.0, FIRST_MS),
        // 4 streams on 2 slots: every request but the first two waits one whole request.
        (4, 8, 4.0, FIRST_MS + request_ms(20.0)),
    ];
    for (cell, (conc, requests, rounds, ttft_p99)) in cells.iter().zip(truth) {
        assert_eq!(cell.status, CellStatus::Done, "{cell:?}");
        let load = cell.load.as_ref().expect("a load cell has a load");
        assert_eq!((load.concurrency, load.requests), (conc, requests));
        assert_eq!(load.output_tokens, u64::from(requests) * TOKENS);
        let wall = rounds * one;
        within_pct(&format!("c{conc} wall"), load.wall_ms, wall * 1000.0, 5.0);
        within_pct(
            &format!("c{conc} output tok/s"),
            load.output_tokens_per_s,
            f64::from(requests) * TOKENS as f64 / wall,
            5.0,
        );
        within_pct(
            &format!("c{conc} req/s"),
            load.requests_per_s,
            f64::from(requests) / wall,
            5.0,
        );
        within_ms(
            &format!("c{conc} ttft p99"),
            load.ttft_ms.unwrap().p99,
            ttft_p99,
            15.0,
        );
        within_ms(
            &format!("c{conc} ttft p50"),
            load.ttft_ms.unwrap().p50,
            if conc == 4 { ttft_p99 } else { FIRST_MS },
            15.0,
        );
        within_pct(
            &format!("c{conc} itl p50"),
            load.itl_ms.unwrap().p50,
            20.0,
            5.0,
        );
        // What one user sees: the scripted decode rate, whatever the queueing.
        within_pct(
            &format!("c{conc} per-stream decode"),
            load.per_stream_tokens_per_s.unwrap().median,
            50.0,
            3.0,
        );
        // Every request of the cell is a run of its own, tagged with its cell and stream.
        let runs: Vec<&Metrics> = done
            .repeats
            .iter()
            .filter(|m| m.cell.as_deref() == Some(cell.cell.as_str()) && !m.cold)
            .collect();
        assert_eq!(runs.len() as u32, requests);
        let streams: std::collections::BTreeSet<u32> =
            runs.iter().filter_map(|m| m.stream).collect();
        assert_eq!(streams.len() as u32, conc, "{}", cell.cell);
        let (a, b) = cell.repeat_range.expect("range");
        assert!(runs.iter().all(|m| (a..=b).contains(&m.repeat_index)));
    }
    // The capacity question: the highest concurrency within TTFT p99 <= 300 ms.
    let slo = bench_schemas::Slo {
        ttft_p99_ms: Some(300.0),
    };
    let points: Vec<(u32, &bench_schemas::Load)> = cells
        .iter()
        .map(|c| {
            (
                c.load.as_ref().unwrap().concurrency,
                c.load.as_ref().unwrap(),
            )
        })
        .collect();
    assert_eq!(bench_schemas::matrix::capacity(&slo, &points), Some(2));
    // Each cell's first run carries the fingerprint, once, even where it is a load request
    // (no warmup, no cold run: cells 2 and 3), whichever stream sent it.
    for cell in &cells {
        let with_fp = events
            .iter()
            .filter(|e| {
                matches!(&e.kind, EventKind::JobStarted(s)
                    if s.cell.as_deref() == Some(cell.cell.as_str()) && s.fingerprint.is_some())
            })
            .count();
        assert_eq!(with_fp, 1, "{}", cell.cell);
    }
    // Repeat indexes are unique over the job, and every run started before it ended.
    let mut idx: Vec<u32> = done.repeats.iter().map(|m| m.repeat_index).collect();
    idx.dedup();
    assert_eq!(idx.len(), done.repeats.len());
    assert_gapless(&events.iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrix_runs_every_cell_reports_a_missing_model_and_interleaves() {
    let (_nats, _agent, c) = fleet().await;

    // Nothing here can run: refused at once, like any job.
    let r = request(
        &c,
        subjects::jobs("ml"),
        serde_json::to_vec(
            &json!({"job_id": "none", "model": "x", "mode": "chat", "prompt": "go",
            "matrix": {"model": ["gone", "missing"]}}),
        )
        .unwrap(),
    )
    .await;
    assert!(!r.accepted);
    assert_eq!(r.error.unwrap().code, ErrorCode::ModelNotFound);

    let (done, events) = run_job(
        &c,
        json!({"job_id": "mx", "model": "fast", "mode": "chat", "prompt": "go", "max_tokens": 64,
               "repeat": 3, "order": "interleaved", "matrix": {"model": ["fast", "missing", "slow"]}}),
    )
    .await;
    let keys: Vec<&str> = done.cells.iter().map(|c| c.cell.as_str()).collect();
    assert_eq!(keys, ["model=fast", "model=missing", "model=slow"]);
    let missing = &done.cells[1];
    assert_eq!(missing.status, CellStatus::Failed);
    assert_eq!(
        missing.error.as_ref().unwrap().code,
        ErrorCode::ModelNotFound
    );
    for (cell, gap) in [(&done.cells[0], 10.0), (&done.cells[2], 40.0)] {
        assert_eq!(cell.status, CellStatus::Done, "{cell:?}");
        let s = cell.summary.as_ref().unwrap();
        assert_eq!(s.repeats, 3);
        within_pct(
            &cell.cell,
            s.gen_tokens_per_s.unwrap().median,
            1000.0 / gap,
            3.0,
        );
        within_ms(&cell.cell, s.ttft_ms.unwrap().median, FIRST_MS, 15.0);
        assert!(cell.load.is_none());
    }
    // Interleaved: the measured runs alternate between the two cells.
    let order: Vec<&str> = done
        .repeats
        .iter()
        .filter(|m| !m.cold && !m.warmup)
        .map(|m| m.cell.as_deref().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "model=fast",
            "model=slow",
            "model=fast",
            "model=slow",
            "model=fast",
            "model=slow"
        ]
    );
    // The top level describes the first cell that finished.
    assert_eq!(done.model, "fast");
    within_pct(
        "top-level decode",
        done.gen_tokens_per_s.unwrap(),
        100.0,
        3.0,
    );
    // Each cell's first run carries its own fingerprint.
    let fps: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::JobStarted(s) => s
                .fingerprint
                .as_ref()
                .map(|f| (s.cell.clone().unwrap(), f.model.name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        fps,
        [
            ("model=fast".to_string(), "fast".to_string()),
            ("model=slow".to_string(), "slow".to_string())
        ]
    );
}
