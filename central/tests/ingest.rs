//! Load: tens of thousands of events straight into `BENCH_EVENTS`. Central catches up on a full
//! stream (the rate is printed), then ingests live while one SSE client never reads: ingestion
//! finishes regardless, the stalled client gets `lagged`, and a reading client that falls behind
//! resumes with `Last-Event-ID` and ends up with every event exactly once.

mod common;

use async_nats::jetstream;
use bench_schemas::event::{Cancelled, Started, Token};
use bench_schemas::{Event, EventKind};
use common::*;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MACHINES: usize = 4;

fn events(job_id: &str, per_machine: u64, text: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for seq in 1..=per_machine {
        for m in 0..MACHINES {
            let kind = match seq {
                1 => accepted_kind(job_id, "bulk", &format!("M{m}")),
                2 => EventKind::JobStarted(Started {
                    cell: None,
                    stream: None,
                    repeat_index: 0,
                    warmup: false,
                    cold: false,
                    fingerprint: None,
                }),
                s if s == per_machine => EventKind::JobCancelled(Cancelled {
                    repeat_index: Some(0),
                    reason: "bulk test".into(),
                }),
                s => EventKind::LlmToken(Token {
                    repeat_index: 0,
                    text: text.into(),
                    tokens: Some(1),
                    t_ms: s as f64,
                }),
            };
            out.push(Event {
                job_id: job_id.into(),
                machine_id: format!("m{m}"),
                run_id: "bulkboot-1".into(),
                seq,
                ts_ms: 1,
                kind,
            });
        }
    }
    out
}

async fn ingested(state: &bench_central::AppState, n: u64) {
    until("events ingested", || async {
        (state.metrics.events_ingested.load(Ordering::Relaxed) >= n).then_some(())
    })
    .await;
}

/// Reads a job's SSE to `end`, reconnecting with Last-Event-ID whenever told it lagged.
async fn read_with_resume(url: String) -> (Vec<u64>, u32) {
    let mut ids = Vec::new();
    let mut reconnects = 0;
    let mut last = None;
    loop {
        let mut sse = Sse::open(&url, last).await;
        loop {
            let f = sse.next().await.expect("stream open until end or lagged");
            match f.event.as_str() {
                "end" => return (ids, reconnects),
                "lagged" => {
                    assert_eq!(
                        f.json()["missed_from"].as_u64(),
                        Some(last.unwrap_or(0) + 1)
                    );
                    reconnects += 1;
                    break;
                }
                _ => {
                    let id = f.id.expect("events carry ids");
                    ids.push(id);
                    last = Some(id);
                }
            }
        }
    }
}

#[tokio::test]
async fn catch_up_rate_and_a_stalled_sse_client() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(client(&nats.url()).await);
    bench_nats::streams::ensure_events_stream(&js, &Default::default(), 1)
        .await
        .unwrap();

    // Phase 1: a full stream before central starts.
    let per_machine = 5_000;
    let backlog = events("bulk-a", per_machine, "tok ");
    publish_events(&js, &backlog).await;
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.sse_buffer = 64;
    let t0 = Instant::now();
    let central = start_central(cfg).await;
    let state = central.state();
    ingested(&state, backlog.len() as u64).await;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "catch-up: {} events in {secs:.2} s = {:.0} events/s",
        backlog.len(),
        backlog.len() as f64 / secs
    );
    let r = state.index.get("bulk-a").unwrap();
    assert!(
        r.machines
            .iter()
            .all(|m| m.last_seq == per_machine && m.gaps == 0),
        "every event applied"
    );
    assert_eq!(r.status.as_str(), "cancelled");

    // Phase 2: live, with a client that never reads and one that reads (and may lag).
    let base = central.base();
    let live = events("bulk-b", 2_000, &"x".repeat(2_000));
    publish_events(&js, &live[..MACHINES]).await; // the accepts, so the job exists
    job_when(&base, "bulk-b", "bulk-b indexed", |_| true).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(central.handle.as_ref().unwrap().addr)
        .await
        .unwrap();
    stalled
        .write_all(b"GET /api/jobs/bulk-b/events HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    until("stalled client connected", || async {
        (state.metrics.sse_clients.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    let reader = tokio::spawn(read_with_resume(format!("{base}/api/jobs/bulk-b/events")));

    let before = state.metrics.events_ingested.load(Ordering::Relaxed);
    let t1 = Instant::now();
    publish_events(&js, &live[MACHINES..]).await;
    ingested(&state, before + (live.len() - MACHINES) as u64).await;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!("live (publish + ingest, 2 kB events, one stalled SSE client): {} events in {secs:.2} s = {:.0} events/s", live.len() - MACHINES, (live.len() - MACHINES) as f64 / secs);

    let (ids, reconnects) = within("reader", WAIT, reader).await.unwrap();
    eprintln!(
        "reading client: {} events, {reconnects} lagged reconnects",
        ids.len()
    );
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, ids, "in order, no duplicates");
    assert_eq!(ids.len(), live.len(), "no gaps");

    // The stalled client, finally read: it was told it lagged.
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // The body ends after `lagged`; the connection itself stays open (keep-alive).
    while !String::from_utf8_lossy(&text).contains("event: lagged") {
        let n = within("stalled client reads lagged", WAIT, stalled.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "connection closed before lagged");
        text.extend_from_slice(&buf[..n]);
    }
    assert!(state.metrics.sse_lagged.load(Ordering::Relaxed) >= 1);
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("")
        .to_string();
    eprintln!("test process (central + clients) {rss}");
}
