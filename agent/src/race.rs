//! What the other machines of a race have measured so far, for `repeat: "auto"`: the agent
//! reads the job's own event subject (`bench.events.<job_id>`, as any `nats sub` would), keeps
//! each other machine's warm decode rates, and says when this machine's interval is apart from
//! every other's. No central is involved.

use bench_schemas::{subjects, Event, EventKind, Separation, Stats};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most rates kept per other machine (a bound, well above any `max_repeat`).
const MAX_SAMPLES: usize = 1000;
/// Most other machines followed.
const MAX_MACHINES: usize = 1000;

/// Per other machine: its run, and the decode rates of its counted repeats.
type Seen = HashMap<String, (String, Vec<f64>)>;

/// A running watch of one job's other racers; stops when dropped.
pub struct RaceWatch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl RaceWatch {
    /// Starts watching `job_id` for machines other than `me`. Runs flagged short count only
    /// with `include_short`, as in the summary.
    pub async fn start(
        client: &async_nats::Client,
        job_id: &str,
        me: &str,
        include_short: bool,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut sub = client.subscribe(subjects::events(job_id)).await?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (me, store) = (me.to_string(), seen.clone());
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(ev) = serde_json::from_slice::<Event>(&msg.payload) else {
                    continue;
                };
                if ev.machine_id == me || ev.seq == 0 {
                    continue; // our own events, and refusals (no run)
                }
                let mut seen = store.lock().expect("race lock");
                match &ev.kind {
                    // Out of the race: nothing to wait for.
                    EventKind::JobError(_) | EventKind::JobCancelled(_) => {
                        seen.remove(&ev.machine_id);
                        continue;
                    }
                    _ if !seen.contains_key(&ev.machine_id) && seen.len() >= MAX_MACHINES => {
                        continue;
                    }
                    _ => {}
                }
                // Any event names a racer, so one that has not finished a run yet is waited for.
                let entry = seen
                    .entry(ev.machine_id.clone())
                    .or_insert_with(|| (ev.run_id.clone(), Vec::new()));
                if entry.0 != ev.run_id {
                    *entry = (ev.run_id.clone(), Vec::new());
                }
                if let EventKind::RepeatDone(m) = &ev.kind {
                    let counted = !m.warmup && !m.cold && (include_short || !m.short_output);
                    if let (true, Some(rate)) = (counted, m.gen_tokens_per_s) {
                        if entry.1.len() < MAX_SAMPLES {
                            entry.1.push(rate);
                        }
                    }
                }
            }
        });
        Ok(Self { seen, task })
    }

    /// Whether `own` (this machine's decode-rate stats) is apart from every other racer seen (a
    /// machine that sent any event of this job, until it fails or is cancelled): each has a 95%
    /// interval and none touches this one. False with no other racer.
    pub fn decided(&self, own: &Stats) -> bool {
        let seen = self.seen.lock().expect("race lock");
        !seen.is_empty()
            && seen.values().all(|(_, rates)| {
                Stats::from_samples(rates.iter().copied())
                    .is_some_and(|other| Separation::of(own, &other).separated)
            })
    }
}

impl Drop for RaceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
