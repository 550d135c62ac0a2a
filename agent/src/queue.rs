//! One job at a time, the rest waiting in order. Benchmarks must never overlap on a machine.

use crate::emit::JobCtx;
use bench_schemas::{ErrorBody, ErrorCode, Job};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// A job waiting or running.
pub struct Queued {
    /// The job, with its id.
    pub job: Job,
    /// Its event emitter.
    pub ctx: Arc<JobCtx>,
    /// Cancelled by `bench.cancel.<job_id>` or shutdown.
    pub cancel: CancellationToken,
}

/// What the fleet should see: the running job and how many wait.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Occupancy {
    /// The running job.
    pub running: Option<String>,
    /// Jobs waiting.
    pub waiting: u32,
}

#[derive(Default)]
struct Inner {
    waiting: VecDeque<Queued>,
    running: Option<(String, CancellationToken)>,
    /// Jobs waiting or running: a second submission of one of them is a `duplicate_job`; once
    /// a job has finished its id may run again (a new run).
    ids: HashSet<String>,
    /// Jobs accepted since this process started (the `n` of run ids).
    accepted: u64,
}

/// The agent's job queue.
pub struct JobQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    max_waiting: usize,
    occupancy: watch::Sender<Occupancy>,
}

/// What a cancel request found.
pub enum Cancelled {
    /// The running job was signalled.
    Running,
    /// A waiting job was removed; its emitter is returned so the caller can say so.
    Waiting(Arc<JobCtx>),
    /// Not on this agent.
    Unknown,
}

impl JobQueue {
    /// An empty queue holding at most `max_waiting` waiting jobs.
    pub fn new(max_waiting: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            max_waiting,
            occupancy: watch::channel(Occupancy::default()).0,
        }
    }

    /// Changes of occupancy (for heartbeats).
    pub fn watch(&self) -> watch::Receiver<Occupancy> {
        self.occupancy.subscribe()
    }

    fn publish(&self, inner: &Inner) {
        let occ = Occupancy {
            running: inner.running.as_ref().map(|r| r.0.clone()),
            waiting: inner.waiting.len() as u32,
        };
        self.occupancy.send_if_modified(|o| {
            let changed = *o != occ;
            *o = occ;
            changed
        });
    }

    /// Queues the job `id`; returns its position (jobs ahead of it, counting the running one)
    /// and its emitter. `admit(position, n)` builds the entry for the `n`-th accepted job under
    /// the queue lock, before the worker can take it, so what it emits (job_accepted) always
    /// precedes job_started; when it fails nothing is queued and `n` is not used.
    pub fn push(
        &self,
        id: &str,
        admit: impl FnOnce(u32, u64) -> Result<Queued, ErrorBody>,
    ) -> Result<(u32, Arc<JobCtx>), ErrorBody> {
        let mut inner = self.inner.lock().expect("queue lock");
        if inner.ids.contains(id) {
            return Err(ErrorBody::new(
                ErrorCode::DuplicateJob,
                format!("job {id} is already queued or running here"),
            ));
        }
        if inner.waiting.len() >= self.max_waiting {
            return Err(ErrorBody::new(
                ErrorCode::QueueFull,
                format!(
                    "{} jobs are already waiting (agent config limits.max_queue)",
                    inner.waiting.len()
                ),
            ));
        }
        let position = inner.waiting.len() as u32 + u32::from(inner.running.is_some());
        let q = admit(position, inner.accepted + 1)?;
        inner.accepted += 1;
        let ctx = q.ctx.clone();
        inner.ids.insert(id.to_string());
        inner.waiting.push_back(q);
        self.publish(&inner);
        drop(inner);
        self.notify.notify_one();
        Ok((position, ctx))
    }

    /// Waits for the next job and marks it running.
    pub async fn pop(&self) -> Queued {
        loop {
            let notified = self.notify.notified();
            {
                let mut inner = self.inner.lock().expect("queue lock");
                if let Some(q) = inner.waiting.pop_front() {
                    let id = q.job.job_id.clone().unwrap_or_default();
                    inner.running = Some((id, q.cancel.clone()));
                    self.publish(&inner);
                    return q;
                }
            }
            notified.await;
        }
    }

    /// Marks the running job finished.
    pub fn finish(&self, job_id: &str) {
        let mut inner = self.inner.lock().expect("queue lock");
        inner.ids.remove(job_id);
        if inner.running.as_ref().is_some_and(|r| r.0 == job_id) {
            inner.running = None;
        }
        self.publish(&inner);
    }

    /// Cancels a running or waiting job.
    pub fn cancel(&self, job_id: &str) -> Cancelled {
        let mut inner = self.inner.lock().expect("queue lock");
        if let Some((id, token)) = &inner.running {
            if id == job_id {
                token.cancel();
                return Cancelled::Running;
            }
        }
        if let Some(i) = inner
            .waiting
            .iter()
            .position(|q| q.job.job_id.as_deref() == Some(job_id))
        {
            let q = inner.waiting.remove(i).expect("index");
            inner.ids.remove(job_id);
            self.publish(&inner);
            return Cancelled::Waiting(q.ctx);
        }
        Cancelled::Unknown
    }

    /// Removes every waiting job (shutdown) and cancels the running one.
    pub fn drain(&self) -> Vec<Arc<JobCtx>> {
        let mut inner = self.inner.lock().expect("queue lock");
        if let Some((_, token)) = &inner.running {
            token.cancel();
        }
        let out: Vec<_> = inner.waiting.drain(..).map(|q| q.ctx).collect();
        for ctx in &out {
            inner.ids.remove(&ctx.job_id);
        }
        self.publish(&inner);
        out
    }

    /// The current occupancy.
    pub fn occupancy(&self) -> Occupancy {
        self.occupancy.borrow().clone()
    }
}
