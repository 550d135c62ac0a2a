//! Builds a job's events with a gapless per-(job, machine) sequence and hands them to the
//! publisher.

use crate::publisher::{now_ms, Publisher};
use bench_schemas::{Event, EventKind};
use std::sync::atomic::{AtomicU64, Ordering};

/// One job's event emitter on this machine.
pub struct JobCtx {
    /// The job.
    pub job_id: String,
    /// This machine.
    pub machine_id: String,
    seq: AtomicU64,
    publisher: Publisher,
}

impl JobCtx {
    /// A new emitter; the first event gets `seq` 1.
    pub fn new(job_id: String, machine_id: String, publisher: Publisher) -> Self {
        Self {
            job_id,
            machine_id,
            seq: AtomicU64::new(0),
            publisher,
        }
    }

    /// Publishes one event.
    pub fn emit(&self, kind: EventKind) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let event = Event {
            job_id: self.job_id.clone(),
            machine_id: self.machine_id.clone(),
            seq,
            ts_ms: now_ms(),
            kind,
        };
        self.publisher.send(&event);
    }
}
