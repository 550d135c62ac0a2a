//! Central's cost per heartbeat at fleet scale (not a test): n machines heart-beat into the
//! registry (each heartbeat is a `bench_agents` KV entry, applied and checked for a status
//! change, exactly what the registry watch does with it). Measured in the same run against the
//! handling it replaced, which after every heartbeat built and compared every machine's view
//! (`machines` + the status sweep that now runs only once a second for staleness), so a fleet
//! of n agents cost n x n per heartbeat period.
//!
//!   cargo bench -p bench-central --bench heartbeats -- 100 500 1000   (scripts/bench fanout)
//!
//! PASS when the cost per heartbeat at the largest fleet is within 3x of the smallest's (it
//! does not grow with the fleet), printed beside the old handling's growth.

use async_nats::jetstream::kv;
use bench_central::hub::Hub;
use bench_central::registry::Registry;
use std::time::Instant;

/// Heartbeat rounds measured per fleet size (each: one heartbeat from every machine).
const ROUNDS: usize = 5;

fn entry(id: &str, value: &bytes::Bytes, now_ns: i128, revision: u64) -> kv::Entry {
    kv::Entry {
        bucket: "bench_agents".into(),
        key: id.into(),
        value: value.clone(),
        revision,
        delta: 0,
        created: async_nats::datetime::from_nanos(now_ns).expect("time"),
        operation: kv::Operation::Put,
        seen_current: true,
    }
}

/// Per-heartbeat cost in µs of `ROUNDS` rounds over `n` machines, with `per_beat` run after
/// each applied heartbeat.
fn measure(n: usize, per_beat: impl Fn(&Registry, &Hub, &str, u64)) -> f64 {
    let registry = Registry::new(Vec::new());
    let hub = Hub::new(1024);
    let template: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/messages/agent_info.json")).unwrap();
    let ids: Vec<String> = (0..n).map(|i| format!("m-{i:04}")).collect();
    let values: Vec<bytes::Bytes> = ids
        .iter()
        .map(|id| {
            let mut v = template.clone();
            v["machine_id"] = id.as_str().into();
            serde_json::to_vec(&v).unwrap().into()
        })
        .collect();
    let now_ms = bench_central::now_ms();
    let now_ns = i128::from(now_ms) * 1_000_000;
    // Every machine appears once (its status changes: one event each), not measured.
    for (i, id) in ids.iter().enumerate() {
        registry.apply(&entry(id, &values[i], now_ns, i as u64));
        per_beat(&registry, &hub, id, now_ms);
    }
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        for (i, id) in ids.iter().enumerate() {
            let rev = ((round + 1) * n + i) as u64;
            registry.apply(&entry(id, &values[i], now_ns, rev));
            per_beat(&registry, &hub, id, now_ms);
        }
    }
    t0.elapsed().as_secs_f64() * 1e6 / (ROUNDS * n) as f64
}

fn main() {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![100, 500, 1000];
    }
    println!("| agents | per heartbeat (now) | per heartbeat (old: every view rebuilt) | one heartbeat period, all agents (now / old) |");
    println!("|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &n in &sizes {
        let now = measure(n, |r, h, id, t| r.publish_change_of(h, id, t));
        // The old handling: every machine's view built (`machines`) and compared after each
        // heartbeat.
        let old = measure(n, |r, h, _, t| {
            std::hint::black_box(r.machines(t));
            r.publish_changes(h, t)
        });
        println!(
            "| {n} | {now:.1} µs | {old:.1} µs | {:.1} ms / {:.1} ms |",
            now * n as f64 / 1e3,
            old * n as f64 / 1e3
        );
        rows.push((n, now, old));
    }
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    let growth = last.1 / first.1;
    let old_growth = last.2 / first.2;
    let pass = growth <= 3.0;
    println!(
        "\nper-heartbeat cost from {} to {} agents: x{growth:.2} now (ceiling x3), x{old_growth:.1} before: {}",
        first.0,
        last.0,
        if pass { "PASS" } else { "FAIL" }
    );
}
