//! Counters for `GET /metrics` (Prometheus text format), kept as atomics so that ingestion
//! never waits on a scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// Central's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events applied to the index.
    pub events_ingested: AtomicU64,
    /// Events skipped as already applied.
    pub events_duplicate: AtomicU64,
    /// Events of a run its machine had already moved past.
    pub events_stale: AtomicU64,
    /// `telemetry` samples applied (counted and forwarded; never a record write of their own).
    pub events_sampled: AtomicU64,
    /// Messages on the stream that were not events.
    pub events_invalid: AtomicU64,
    /// Events refused as forged: not signed by a key of the machine they name.
    pub events_forged: AtomicU64,
    /// Events accepted without a signature check: no key known for their machine
    /// (`signatures: verify`).
    pub events_unsigned: AtomicU64,
    /// Batches persisted.
    pub batches: AtomicU64,
    /// KV writes that failed (and were retried).
    pub kv_errors: AtomicU64,
    /// Open SSE connections.
    pub sse_clients: AtomicI64,
    /// SSE clients dropped for lagging.
    pub sse_lagged: AtomicU64,
    /// Jobs dispatched by central.
    pub jobs_dispatched: AtomicU64,
    /// Machines marked failed by the stall timeout.
    pub stalls: AtomicU64,
    /// Highest stream sequence indexed.
    pub last_stream_seq: AtomicU64,
    /// The indexer's last message had nothing pending behind it.
    pub caught_up: AtomicBool,
}

/// Decrements the SSE gauge when a connection ends.
pub struct SseGuard(Arc<crate::Shared>);

impl SseGuard {
    /// Counts a new SSE connection.
    pub fn new(shared: Arc<crate::Shared>) -> Self {
        shared.metrics.sse_clients.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for SseGuard {
    fn drop(&mut self) {
        self.0.metrics.sse_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Renders everything in the Prometheus text format.
pub fn render(shared: &crate::Shared) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let counts = shared.index.status_counts();
    let by_state: Vec<(String, f64)> = crate::record::JobStatus::ALL
        .iter()
        .map(|s| {
            (
                format!("{{state=\"{}\"}}", s.as_str()),
                counts.get(s).copied().unwrap_or(0) as f64,
            )
        })
        .collect();
    let by_state: Vec<(&str, f64)> = by_state.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "bench_central_jobs",
        "gauge",
        "Indexed jobs by state.",
        &by_state,
    );
    let machines = shared.registry.status_counts();
    let by_machine: Vec<(String, f64)> = ["online", "busy", "offline"]
        .iter()
        .map(|s| {
            (
                format!("{{status=\"{s}\"}}"),
                machines.get(*s).copied().unwrap_or(0) as f64,
            )
        })
        .collect();
    let by_machine: Vec<(&str, f64)> = by_machine.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "bench_central_machines",
        "gauge",
        "Known machines by status.",
        &by_machine,
    );
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    metric(
        "bench_central_events_ingested_total",
        "counter",
        "Events applied to the index.",
        &[("", load(&m.events_ingested))],
    );
    metric(
        "bench_central_events_duplicate_total",
        "counter",
        "Redelivered events skipped.",
        &[("", load(&m.events_duplicate))],
    );
    metric(
        "bench_central_events_stale_total",
        "counter",
        "Events of a run its machine had already moved past (not applied).",
        &[("", load(&m.events_stale))],
    );
    metric(
        "bench_central_events_sampled_total",
        "counter",
        "Telemetry samples applied in memory and forwarded (no record write of their own).",
        &[("", load(&m.events_sampled))],
    );
    metric(
        "bench_central_leader",
        "gauge",
        "1 while this central holds the indexing lease (indexes, writes records), 0 while it follows.",
        &[("", f64::from(u8::from(shared.role.is_leader())))],
    );
    metric(
        "bench_central_takeovers_total",
        "counter",
        "Times this central took the indexing lease from a follower's role.",
        &[("", load(&shared.role.takeovers))],
    );
    metric(
        "bench_central_forwarded_writes_total",
        "counter",
        "API writes this central forwarded to the indexing central.",
        &[("", load(&shared.role.forwarded))],
    );
    metric(
        "bench_central_kv_writes_total",
        "counter",
        "Job records written to the jobs bucket.",
        &[("", load(&shared.jobs_kv.writes))],
    );
    metric(
        "bench_central_kv_written_bytes_total",
        "counter",
        "Bytes of job records written to the jobs bucket.",
        &[("", load(&shared.jobs_kv.bytes))],
    );
    let (cached, known) = shared.index.sizes();
    metric(
        "bench_central_index_records",
        "gauge",
        "Job records held in memory, and jobs known.",
        &[
            ("{kind=\"in_memory\"}", cached as f64),
            ("{kind=\"known\"}", known as f64),
        ],
    );
    metric(
        "bench_central_events_invalid_total",
        "counter",
        "Stream messages that were not valid events (unparsable, invalid ids, or a job_id the subject does not name).",
        &[("", load(&m.events_invalid))],
    );
    metric(
        "bench_central_events_forged_total",
        "counter",
        "Events refused (not applied, not shown): not signed by a key of the machine they name.",
        &[("", load(&m.events_forged))],
    );
    metric(
        "bench_central_events_unsigned_total",
        "counter",
        "Events accepted unchecked: no signing key known for their machine (signatures: verify).",
        &[("", load(&m.events_unsigned))],
    );
    metric(
        "bench_central_index_batches_total",
        "counter",
        "Batches written to the jobs bucket.",
        &[("", load(&m.batches))],
    );
    metric(
        "bench_central_kv_errors_total",
        "counter",
        "Failed (retried) writes to the jobs bucket.",
        &[("", load(&m.kv_errors))],
    );
    metric(
        "bench_central_last_stream_seq",
        "gauge",
        "Highest BENCH_EVENTS sequence indexed.",
        &[("", load(&m.last_stream_seq))],
    );
    metric(
        "bench_central_jobs_dispatched_total",
        "counter",
        "Jobs dispatched by central.",
        &[("", load(&m.jobs_dispatched))],
    );
    metric(
        "bench_central_stalls_total",
        "counter",
        "Runs ended by central: agent restarted, stalled, or dispatch interrupted.",
        &[("", load(&m.stalls))],
    );
    metric(
        "bench_central_sse_clients",
        "gauge",
        "Open SSE connections.",
        &[("", m.sse_clients.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "bench_central_sse_lagged_total",
        "counter",
        "SSE clients dropped for lagging.",
        &[("", load(&m.sse_lagged))],
    );
    let connected = shared.client.connection_state() == async_nats::connection::State::Connected;
    metric(
        "bench_central_nats_connected",
        "gauge",
        "1 when connected to NATS.",
        &[("", if connected { 1.0 } else { 0.0 })],
    );
    out
}
