//! The in-process fan-out from ingestion to SSE clients. Each job someone is watching has its
//! own bounded broadcast channel of ready-made SSE frames (formatted once, shared by every
//! client as [`Bytes`]); job and machine status changes go on one fleet-wide channel. The
//! indexer never waits on either; a client that falls more than the buffer behind gets
//! `Lagged` and is told so.

use crate::record::JobStatus;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// One message on a job's channel.
#[derive(Debug, Clone)]
pub enum JobFrame {
    /// A stored event, as an SSE frame with `id:` = its stream sequence.
    Event {
        /// Stream sequence.
        seq: u64,
        /// `id: ..\nevent: ..\ndata: ..\n\n`.
        frame: Bytes,
    },
    /// The job finished once every event up to `last_seq` was sent.
    End {
        /// Its status.
        status: JobStatus,
        /// Its last stream sequence.
        last_seq: u64,
    },
}

/// One message on the fleet-wide channel.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// A job was created or changed status: a `GET /api/jobs` list item.
    Job {
        /// The list item JSON.
        item: Arc<str>,
    },
    /// A machine changed status: a `GET /api/machines` entry.
    Machine {
        /// The machine object.
        data: Arc<str>,
    },
}

/// The channels.
#[derive(Debug)]
pub struct Hub {
    all: broadcast::Sender<HubMsg>,
    jobs: Mutex<HashMap<String, broadcast::Sender<JobFrame>>>,
    capacity: usize,
}

/// An SSE frame: `id`, `event` and the data, split into `data:` lines where it has line breaks
/// (a published payload is any bytes; JSON from our agents has none).
pub fn sse_frame(id: Option<u64>, event: &str, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        b.put_slice(b"id: ");
        b.put_slice(id.to_string().as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_u8(b'\n');
    for line in data.split(|c| *c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        b.put_slice(b"data: ");
        for part in line.split(|c| *c == b'\r') {
            b.put_slice(part);
        }
        b.put_u8(b'\n');
    }
    b.put_u8(b'\n');
    b.freeze()
}

impl Hub {
    /// A hub that buffers `capacity` messages per listener.
    pub fn new(capacity: usize) -> Self {
        Self {
            all: broadcast::channel(capacity).0,
            jobs: Mutex::default(),
            capacity,
        }
    }

    /// Sends a fleet-wide message to whoever listens; never blocks.
    pub fn send(&self, msg: HubMsg) {
        let _ = self.all.send(msg);
    }

    /// A new fleet-wide listener, seeing messages sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubMsg> {
        self.all.subscribe()
    }

    /// A new listener of one job, seeing its frames sent from now on.
    pub fn subscribe_job(&self, job_id: &str) -> broadcast::Receiver<JobFrame> {
        let mut jobs = self.jobs.lock().expect("hub lock");
        match jobs.get(job_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                jobs.insert(job_id.to_string(), tx);
                rx
            }
        }
    }

    /// Sends to the job's listeners, if any; drops the channel once nobody listens.
    pub fn send_job(&self, job_id: &str, frame: JobFrame) {
        self.send_job_with(job_id, || frame);
    }

    /// [`Hub::send_job`] of a frame built only when someone listens (one lock per event, and
    /// no formatting for jobs nobody watches).
    pub fn send_job_with(&self, job_id: &str, frame: impl FnOnce() -> JobFrame) {
        let mut jobs = self.jobs.lock().expect("hub lock");
        if let Some(tx) = jobs.get(job_id) {
            if tx.send(frame()).is_err() {
                jobs.remove(job_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_line_breaks_into_data_lines() {
        assert_eq!(
            &sse_frame(Some(7), "llm_token", br#"{"a":1}"#)[..],
            b"id: 7\nevent: llm_token\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(
            &sse_frame(None, "x", b"a\r\nb\rc\nd")[..],
            b"event: x\ndata: a\ndata: bc\ndata: d\n\n"
        );
    }

    #[test]
    fn a_job_channel_lives_while_someone_listens() {
        let hub = Hub::new(4);
        let frame = || JobFrame::End {
            status: JobStatus::Done,
            last_seq: 1,
        };
        hub.send_job_with("j", || unreachable!("nobody listens: no frame is built"));
        assert!(hub.jobs.lock().unwrap().is_empty());
        let mut rx = hub.subscribe_job("j");
        hub.send_job("j", frame());
        assert!(matches!(rx.try_recv(), Ok(JobFrame::End { .. })));
        drop(rx);
        hub.send_job("j", frame());
        assert!(hub.jobs.lock().unwrap().is_empty());
    }
}
