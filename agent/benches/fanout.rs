//! Fan-out benchmark (not a test): N lightweight agents (mock engine, one NATS connection
//! each, as N machines would have) on a real nats-server; broadcast requests on
//! `bench.jobs.all`, selecting them by a label (a job of one size whatever the fleet's) and by
//! a list of their N ids (a job that grows with the fleet); measures publish -> last accept
//! and publish -> last `job_done`.
//!
//!   cargo bench -p bench-agent --bench fanout -- 1 10 100 500     (scripts/bench fanout)

use bench_agent::config::{Config, Env};
use bench_agent::LocalAgent;
use bench_nats::harness::NatsServer;
use bench_schemas::{subjects, Event, JobReply};
use futures::StreamExt;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// Starts `n` agents (labelled with their round), broadcasts to them by label and then by a
/// list of their ids; (start-up, [(last accept, last job_done)] by label, by ids).
async fn round(nats: &NatsServer, n: usize) -> (Duration, [(Duration, Duration); 2]) {
    let started = Instant::now();
    let mut agents = Vec::new();
    for i in 0..n {
        let yaml = format!(
            "machine_id: fan-{n}-{i}\nengine: mock\nmock: {{tokens_per_s: 2000, ttft_ms: 1}}\nllm_models: [mock-7b]\nbind_port: 0\nheartbeat_s: 5\nlabels: {{round: \"r{n}\"}}\ntelemetry: {{enabled: false}}\n"
        );
        let env: Env = [("NATS_URL".to_string(), nats.url())].into();
        let cfg = Config::parse(&yaml, Path::new("bench.yaml"), &env).expect("config");
        agents.push(LocalAgent::start(cfg).await.expect("agent"));
    }
    let startup = started.elapsed();
    let c = async_nats::connect(nats.url()).await.unwrap();
    let by_label = broadcast(&c, n, false).await;
    let by_ids = broadcast(&c, n, true).await;
    for a in &mut agents {
        a.stop().await;
    }
    (startup, [by_label, by_ids])
}

/// One broadcast request on `bench.jobs.all` to this round's `n` agents: publish -> last
/// accept, publish -> last `job_done`.
async fn broadcast(c: &async_nats::Client, n: usize, by_ids: bool) -> (Duration, Duration) {
    let job_id = format!("fanout-{n}-{}", if by_ids { "ids" } else { "label" });
    let mut events = c.subscribe(subjects::events(&job_id)).await.unwrap();
    let inbox = c.new_inbox();
    let mut replies = c.subscribe(inbox.clone()).await.unwrap();
    c.flush().await.unwrap();
    // Only this round's agents: by label (a job of the same size whatever the fleet's), or by
    // listing their ids (a job that grows with the fleet: every agent parses every id).
    let selector = if by_ids {
        let ids: Vec<String> = (0..n).map(|i| format!("fan-{n}-{i}")).collect();
        serde_json::json!(ids)
    } else {
        serde_json::json!({"round": format!("r{n}")})
    };
    let job = serde_json::json!({"job_id": job_id, "model": "mock-7b", "prompt": "hi", "max_tokens": 8, "selector": selector});
    let t0 = Instant::now();
    c.publish_with_reply(
        subjects::JOBS_ALL,
        inbox,
        serde_json::to_vec(&job).unwrap().into(),
    )
    .await
    .unwrap();
    let mut accepted = 0;
    let last_accept = tokio::time::timeout(LIMIT, async {
        while accepted < n {
            let m = replies.next().await.unwrap();
            if m.status.is_some() {
                panic!("broadcast got {:?} (no agent subscribed yet?)", m.status);
            }
            let r: JobReply = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                panic!("reply {:?} {:?} {:?}: {e}", m.status, m.headers, m.payload)
            });
            assert!(r.accepted, "{r:?}");
            accepted += 1;
        }
        t0.elapsed()
    })
    .await
    .expect("accepts");
    let mut done = HashSet::new();
    let last_done = tokio::time::timeout(LIMIT, async {
        while done.len() < n {
            let m = events.next().await.unwrap();
            let e: Event = serde_json::from_slice(&m.payload).unwrap();
            if matches!(e.kind, bench_schemas::EventKind::JobDone(_)) {
                done.insert(e.machine_id);
            }
        }
        t0.elapsed()
    })
    .await
    .expect("job_done from every agent");
    (last_accept, last_done)
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1, 10, 100, 500]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let nats = NatsServer::start();
        println!(
            "| agents | start-up | selector | publish -> last accept | publish -> last job_done |"
        );
        println!("|---:|---:|---|---:|---:|");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for n in sizes {
            let (s, [(la, ld), (ia, id)]) = round(&nats, n).await;
            println!(
                "| {n} | {:.0} ms | label | {:.1} ms | {:.1} ms |",
                ms(s),
                ms(la),
                ms(ld)
            );
            println!("| {n} | | {n} ids | {:.1} ms | {:.1} ms |", ms(ia), ms(id));
        }
    });
}
