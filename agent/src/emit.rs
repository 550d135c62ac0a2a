//! Builds one run's events with a gapless sequence and hands them to the publisher.
//!
//! A run is one acceptance of a job on this machine (`run_id` = `<boot_id>-<n>`); its events are
//! numbered from 1 and identified by `<job_id>.<machine_id>.<run_id>.<seq>`, so a retried
//! publish is stored once while a later run of the same `job_id` is never taken for a retry.

use crate::publisher::{now_ms, Outgoing, Publisher, QueueFull};
use bench_schemas::{subjects, Event, EventKind};
use std::sync::Mutex;
use tokio::sync::mpsc::{OwnedPermit, Permit};

/// One run's event emitter on this machine.
pub struct JobCtx {
    /// The job.
    pub job_id: String,
    /// This machine.
    pub machine_id: String,
    /// This run: `<boot_id>-<n>`.
    pub run_id: String,
    /// The last seq handed out. Locked while an event is queued, so the queue holds a run's
    /// events in seq order.
    seq: Mutex<u64>,
    /// A queue slot held from acceptance for the run's final event, so that the outcome of a
    /// run is always queued, even when its stream filled the queue.
    final_slot: Mutex<Option<OwnedPermit<Outgoing>>>,
    publisher: Publisher,
}

impl JobCtx {
    /// A run's emitter; the first event gets `seq` 1. Fails when the event queue has no slot
    /// left to hold for the run's final event.
    pub fn new(
        job_id: String,
        machine_id: String,
        run_id: String,
        publisher: Publisher,
    ) -> Result<Self, QueueFull> {
        let slot = publisher.try_reserve_owned()?;
        Ok(Self {
            job_id,
            machine_id,
            run_id,
            seq: Mutex::new(0),
            final_slot: Mutex::new(Some(slot)),
            publisher,
        })
    }

    fn event(&self, seq: u64, kind: EventKind) -> Outgoing {
        let event = Event {
            job_id: self.job_id.clone(),
            machine_id: self.machine_id.clone(),
            run_id: self.run_id.clone(),
            seq,
            ts_ms: now_ms(),
            kind,
        };
        let id = subjects::msg_id(&self.job_id, &self.machine_id, &self.run_id, seq);
        Outgoing::new(&event, id)
    }

    /// Queues one event and returns its seq. A full queue is [`QueueFull`], and then no seq is
    /// used: the run's sequence stays gapless, and the caller stops the run (it never waits, so
    /// an engine's stream is never held up by NATS).
    pub fn emit(&self, kind: EventKind) -> Result<u64, QueueFull> {
        let mut seq = self.seq.lock().expect("seq lock");
        let permit: Permit<'_, Outgoing> = self.publisher.try_reserve()?;
        *seq += 1;
        permit.send(self.event(*seq, kind));
        Ok(*seq)
    }

    /// Queues a best-effort event (a telemetry sample) only while the queue is more than half
    /// free; otherwise [`QueueFull`], no seq used, and the caller drops the event. The run's
    /// own events always find the room it leaves.
    pub fn emit_spare(&self, kind: EventKind) -> Result<u64, QueueFull> {
        if !self.publisher.has_room() {
            return Err(QueueFull);
        }
        self.emit(kind)
    }

    /// Queues the run's final event (job_done, job_error or job_cancelled) in the slot held
    /// for it since acceptance, so it never waits and never finds the queue full.
    pub fn finish(&self, kind: EventKind) {
        let mut seq = self.seq.lock().expect("seq lock");
        let slot = self.final_slot.lock().expect("slot lock").take();
        match slot {
            Some(slot) => {
                *seq += 1;
                slot.send(self.event(*seq, kind));
            }
            // Only a second final event lands here (a bug): queue it if there is room.
            None => match self.publisher.try_reserve() {
                Ok(permit) => {
                    *seq += 1;
                    permit.send(self.event(*seq, kind));
                }
                Err(QueueFull) => {
                    tracing::error!(job_id = %self.job_id, run_id = %self.run_id, event = kind.name(), "a second final event found the event queue full; not published")
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::PublisherConfig;
    use bench_schemas::event::{Cancelled, Started};

    fn started() -> EventKind {
        EventKind::JobStarted(Started {
            cell: None,
            stream: None,
            repeat_index: 0,
            warmup: false,
            cold: false,
            fingerprint: None,
        })
    }

    #[tokio::test]
    async fn a_full_queue_costs_no_seq_and_the_final_event_has_its_slot() {
        // Nothing listens on port 1: the publisher never takes an event off the queue.
        let nats = bench_nats::NatsConfig {
            url: Some("nats://127.0.0.1:1".into()),
            ..Default::default()
        };
        let (publisher, task) = Publisher::spawn(PublisherConfig {
            nats,
            name: "test".into(),
            window: 4,
            queue: 3,
        });
        let ctx = JobCtx::new("j".into(), "m".into(), "b-1".into(), publisher.clone()).unwrap();
        assert_eq!(ctx.emit(started()), Ok(1));
        assert_eq!(ctx.emit(started()), Ok(2));
        // Two events and the final slot fill the queue of 3.
        assert_eq!(ctx.emit(started()), Err(QueueFull));
        assert_eq!(ctx.emit(started()), Err(QueueFull));
        ctx.finish(EventKind::JobCancelled(Cancelled {
            repeat_index: None,
            reason: "test".into(),
        }));
        assert_eq!(*ctx.seq.lock().unwrap(), 3, "seq 3 went to the final event");
        assert!(
            JobCtx::new("k".into(), "m".into(), "b-2".into(), publisher.clone()).is_err(),
            "no slot left for another run's final event"
        );
        let s = publisher.stats();
        assert_eq!((s.queued, s.queue_capacity, s.overflowed), (3, 3, 3));
        task.abort();
    }
}
