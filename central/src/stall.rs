//! Runs that will never finish on their own, found and ended with a named reason:
//! - `agent_restarted`: the machine's agent heart-beats with another boot id than the one that
//!   accepted the run (its queue died with the old process);
//! - `stalled`: no events for `stall_timeout_s` while the agent is gone or runs something else;
//! - `dispatch_interrupted`: central never finished dispatching (it was killed, or NATS went
//!   away mid-dispatch), so machines that never answered are failed once the deadline passed.
//!
//! Judged only while the indexer is caught up with the stream: a machine whose events are
//! still waiting to be indexed is behind, not silent. The same loop retries KV writes that an
//! API call could not finish and forgets jobs older than the retention.

use crate::error::ErrorInfo;
use crate::hub::Hub;
use crate::index::Index;
use crate::ingest::announce;
use crate::jobs_kv::{persist_retrying, JobsKv};
use crate::metrics::Metrics;
use crate::record::{JobRecord, RunStatus};
use crate::registry::{MachineStatus, Registry};
use crate::results::Results;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the loop needs from central.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    /// The index.
    pub index: &'a Index,
    /// Where records are persisted.
    pub kv: &'a JobsKv,
    /// Who is alive.
    pub registry: &'a Registry,
    /// Live listeners.
    pub hub: &'a Hub,
    /// Results writer queue.
    pub results: &'a Results,
    /// Counters.
    pub metrics: &'a Metrics,
    /// Central's own NATS connection: while it is (or was just) away, every agent looks offline.
    pub client: &'a async_nats::Client,
    /// Silence that fails a run whose agent is gone.
    pub stall_timeout: Duration,
    /// Jobs older than this are forgotten (the stream and bucket age them out too).
    pub max_age: Duration,
    /// Stops the loop.
    pub shutdown: &'a CancellationToken,
}

/// How long central must have been connected before it calls an agent offline: long enough for
/// every live agent to have heart-beaten again after an outage.
const TRUST_REGISTRY_AFTER: Duration =
    Duration::from_secs(bench_nats::streams::AGENTS_TTL.as_secs() + 2);

/// Why a run is ended, if it should be. `registry_fresh`: the registry's offline verdicts can be
/// trusted (central has been connected for [`TRUST_REGISTRY_AFTER`]).
fn verdict(
    w: &Watch<'_>,
    r: &JobRecord,
    m: &crate::record::MachineRun,
    now: u64,
    registry_fresh: bool,
) -> Option<ErrorInfo> {
    if m.status.is_terminal() {
        return None;
    }
    if let Some(boot) = bench_schemas::subjects::boot_of(&m.run_id) {
        if let Some(current) = w.registry.boot_of(&m.machine_id, now) {
            if current != boot {
                return Some(ErrorInfo::new(
                    "agent_restarted",
                    format!("the agent restarted (boot {boot} -> {current}) and lost run {} with its queue", m.run_id),
                ));
            }
        }
    }
    let timeout_ms = w.stall_timeout.as_millis() as u64;
    if !registry_fresh {
        return None;
    }
    if now.saturating_sub(m.last_event_ms.unwrap_or(r.created_ms)) <= timeout_ms {
        return None;
    }
    let (status, current) = w.registry.status_of(&m.machine_id, now);
    // Queued behind other work on a live agent is waiting, not stalled.
    let gone = status == MachineStatus::Offline
        || (m.status == RunStatus::Running && current.as_deref() != Some(r.job_id.as_str()));
    gone.then(|| {
        let secs = w.stall_timeout.as_secs_f64();
        ErrorInfo::new(
            "stalled",
            format!("no events for {secs:.0} s and the agent is not running the job (offline or restarted)"),
        )
    })
}

/// One pass over the unfinished jobs.
pub async fn check(w: &Watch<'_>, now: u64, registry_fresh: bool) {
    for job_id in w.index.running_ids() {
        let Some(r) = w.index.get(&job_id) else {
            continue;
        };
        let interrupted = r.dispatching && r.dispatch_deadline_ms.is_some_and(|d| now > d);
        if r.dispatching && !interrupted {
            continue;
        }
        let ended: Vec<(String, ErrorInfo)> = r
            .machines
            .iter()
            .filter_map(|m| {
                verdict(w, &r, m, now, registry_fresh).map(|e| (m.machine_id.clone(), e))
            })
            .collect();
        if ended.is_empty() && !interrupted {
            continue;
        }
        let changed = w.index.update(&job_id, now, |r| {
            let mut r = r?;
            if interrupted && r.dispatching {
                tracing::warn!(%job_id, "dispatch never completed; giving it up");
                r.dispatching = false;
                for m in &mut r.machines {
                    if m.status == RunStatus::Queued && m.run_id.is_empty() && m.last_seq == 0 {
                        m.fail(ErrorInfo::new(
                            "dispatch_interrupted",
                            "central stopped (or lost NATS) before this machine answered the job",
                        ));
                    }
                }
            }
            for (id, e) in &ended {
                let m = r.machine_mut(id);
                if !m.status.is_terminal() {
                    tracing::warn!(%job_id, machine_id = %id, code = %e.code, "{}", e.message);
                    m.fail(e.clone());
                }
            }
            Some(r)
        });
        if let Some((_, change)) = changed {
            w.metrics
                .stalls
                .fetch_add(ended.len() as u64, Ordering::Relaxed);
            let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
            if persist_retrying(w.index, w.kv, &job_id, Some(give_up), w.shutdown)
                .await
                .is_ok()
            {
                announce(w.hub, w.results, &job_id, &change);
            }
        }
    }
}

/// The loop.
pub async fn run(w: Watch<'_>) {
    let period = (w.stall_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut tick = tokio::time::interval(period);
    let mut last_prune = tokio::time::Instant::now();
    let mut last_retry = tokio::time::Instant::now();
    let mut connected_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = w.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Changes an API call could not store (NATS away) are stored once it is back.
        let retry = last_retry.elapsed() > Duration::from_secs(10);
        if retry {
            last_retry = tokio::time::Instant::now();
        }
        for job_id in w.index.dirty_ids().into_iter().filter(|_| retry) {
            let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
            let _ = persist_retrying(w.index, w.kv, &job_id, Some(give_up), w.shutdown).await;
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = tokio::time::Instant::now();
            let cutoff = crate::now_ms().saturating_sub(w.max_age.as_millis() as u64);
            let n = w.index.forget_older_than(cutoff);
            if n > 0 {
                tracing::info!(jobs = n, "forgot jobs older than the retention");
            }
        }
        let connected = w.client.connection_state() == async_nats::connection::State::Connected;
        connected_since = match (connected, connected_since) {
            (false, _) => None,
            (true, None) => Some(tokio::time::Instant::now()),
            (true, since) => since,
        };
        if !w.metrics.caught_up.load(Ordering::Relaxed) || !connected {
            continue;
        }
        let trust_after = TRUST_REGISTRY_AFTER.min(w.stall_timeout);
        let fresh = connected_since.is_some_and(|t| t.elapsed() >= trust_after);
        check(&w, crate::now_ms(), fresh).await;
    }
}
