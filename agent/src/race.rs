//! What the other machines of a race have measured so far, for `repeat: "auto"`: the agent
//! reads the job's events (`bench.events.<job_id>`) from the start of the stream with an
//! ordered consumer, so every racer that accepted the job is known even if it did so before
//! this agent started its run; it keeps each other machine's warm decode rates and says when
//! this machine's interval is apart from every other's. No central is involved. Where the
//! stream cannot be read (no JetStream), it follows the live subject as `nats sub` would.

use async_nats::jetstream::{self, consumer::push};
use bench_schemas::{subjects, Event, EventKind, Separation, Stats};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most rates kept per other machine (a bound, well above any `max_repeat`).
const MAX_SAMPLES: usize = 1000;
/// How long setting up the read of the stream may take before the live subject is used.
const STREAM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Most other machines followed.
const MAX_MACHINES: usize = 1000;

/// The envelope of an event without its payload.
#[derive(serde::Deserialize)]
struct Head {
    machine_id: String,
    #[serde(default)]
    run_id: String,
    seq: u64,
    #[serde(rename = "type")]
    kind: String,
}

/// One other machine of the race.
struct Racer {
    /// Its run.
    run_id: String,
    /// Decode rates of its counted repeats.
    rates: Vec<f64>,
    /// It finished before this machine's run was accepted: an earlier race of the same job id.
    finished: bool,
}

type Seen = HashMap<String, Racer>;

/// A running watch of one job's other racers; stops when dropped.
pub struct RaceWatch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl RaceWatch {
    /// Starts watching `job_id` for machines other than `me`, whose run is `my_run`. Runs
    /// flagged short count only with `include_short`, as in the summary; in a matrix job only
    /// the runs of `cell` count.
    pub async fn start(
        client: &async_nats::Client,
        job_id: &str,
        me: &str,
        my_run: &str,
        include_short: bool,
        cell: Option<String>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut sub = event_source(client, job_id, me).await?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (me, my_run, store) = (me.to_string(), my_run.to_string(), seen.clone());
        let task = tokio::spawn(async move {
            // Until this machine's own job_accepted goes by in the stream, a run that ends
            // belongs to an earlier race of the same job id (a re-run).
            let mut ours_accepted = false;
            while let Some(payload) = sub.next().await {
                // Token batches (nearly every event) only name a racer: their text is never
                // parsed; the few events that change the race are read whole.
                let Ok(head) = serde_json::from_slice::<Head>(&payload) else {
                    continue;
                };
                let kind = if head.kind == "llm_token" || head.kind == "job_started" {
                    None
                } else {
                    match serde_json::from_slice::<Event>(&payload) {
                        Ok(ev) => Some(ev.kind),
                        Err(_) => continue,
                    }
                };
                let Head {
                    machine_id,
                    run_id,
                    seq,
                    ..
                } = head;
                let mut seen = store.lock().expect("race lock");
                if machine_id == me {
                    if run_id == my_run && matches!(kind, Some(EventKind::JobAccepted(_))) {
                        ours_accepted = true;
                        seen.retain(|_, r| !r.finished);
                    }
                    continue;
                }
                if seq == 0 {
                    continue; // a refusal: no run
                }
                match &kind {
                    // Out of the race: nothing to wait for.
                    Some(EventKind::JobError(_) | EventKind::JobCancelled(_)) => {
                        seen.remove(&machine_id);
                        continue;
                    }
                    _ if !seen.contains_key(&machine_id) && seen.len() >= MAX_MACHINES => {
                        continue;
                    }
                    _ => {}
                }
                // Any event names a racer, so one that has not finished a run yet is waited for.
                let racer = seen.entry(machine_id).or_insert_with(|| Racer {
                    run_id: run_id.clone(),
                    rates: Vec::new(),
                    finished: false,
                });
                if racer.run_id != run_id {
                    *racer = Racer {
                        run_id,
                        rates: Vec::new(),
                        finished: false,
                    };
                }
                match &kind {
                    Some(EventKind::RepeatDone(m)) => {
                        // A matrix job races cell by cell: only this cell's runs count.
                        let counted = !m.warmup
                            && !m.cold
                            && (include_short || !m.short_output)
                            && m.cell == cell;
                        if let (true, Some(rate)) = (counted, m.gen_tokens_per_s) {
                            if racer.rates.len() < MAX_SAMPLES {
                                racer.rates.push(rate);
                            }
                        }
                    }
                    Some(EventKind::JobDone(_)) => racer.finished = !ours_accepted,
                    _ => {}
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
            && seen.values().all(|r| {
                Stats::from_samples(r.rates.iter().copied())
                    .is_some_and(|other| Separation::of(own, &other).separated)
            })
    }
}

/// The job's events from the first one stored (an ordered consumer on the events stream), or
/// live ones only where the stream cannot be read.
async fn event_source(
    client: &async_nats::Client,
    job_id: &str,
    me: &str,
) -> Result<BoxStream<'static, bytes::Bytes>, async_nats::SubscribeError> {
    let subject = subjects::events(job_id);
    let ordered = async {
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(subjects::EVENTS_STREAM).await.ok()?;
        // Named, so the create goes to `CONSUMER.CREATE.<stream>.<name>.<filter>`, the one
        // form agents may use (see bench_nats::auth).
        let name = format!("race_{me}_{}", uuid::Uuid::new_v4().simple());
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                name: Some(name),
                deliver_subject: client.new_inbox(),
                filter_subject: subject.clone(),
                ..Default::default()
            })
            .await
            .ok()?;
        consumer.messages().await.ok()
    };
    // Bounded: a server that refuses the call without answering must not hold up the job.
    if let Ok(Some(messages)) = tokio::time::timeout(STREAM_READ_TIMEOUT, ordered).await {
        return Ok(messages
            .filter_map(|m| async move { m.ok().map(|m| m.payload.clone()) })
            .boxed());
    }
    tracing::warn!(%subject, "cannot read the race from the events stream; following live events only");
    let sub = client.subscribe(subject).await?;
    Ok(sub.map(|m| m.payload).boxed())
}

impl Drop for RaceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
