//! The in-process fan-out from ingestion to SSE clients: one bounded broadcast channel. The
//! indexer never waits on it; a client that falls more than the buffer behind gets `Lagged`
//! and is told so.

use crate::record::JobStatus;
use std::sync::Arc;
use tokio::sync::broadcast;

/// One message to live listeners.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// An event as stored in `BENCH_EVENTS`.
    Event {
        /// Stream sequence (the SSE `id`).
        stream_seq: u64,
        /// Its job.
        job_id: Arc<str>,
        /// Event type (the SSE `event`).
        kind: &'static str,
        /// The envelope JSON as published.
        data: Arc<str>,
    },
    /// A job was created or changed status.
    Job {
        /// The job.
        job_id: Arc<str>,
        /// Its status now.
        status: JobStatus,
        /// A `GET /api/jobs` list item.
        item: Arc<str>,
    },
    /// A machine changed status: a `GET /api/machines` entry.
    Machine {
        /// The machine object.
        data: Arc<str>,
    },
}

/// The channel.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<HubMsg>,
}

impl Hub {
    /// A hub that buffers `capacity` messages per listener.
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity).0,
        }
    }

    /// Sends to whoever listens; never blocks.
    pub fn send(&self, msg: HubMsg) {
        let _ = self.tx.send(msg);
    }

    /// A new listener, seeing messages sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubMsg> {
        self.tx.subscribe()
    }
}
