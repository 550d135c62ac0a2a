//! Server-Sent Events. `GET /api/jobs/{id}/events` replays the job from `BENCH_EVENTS` after
//! `Last-Event-ID`, then follows it live from the hub, then sends `end`. `GET /api/events`
//! follows job status and machine status changes live (per-job events are on the job's own
//! stream: a page listing the fleet must not receive every token of every job).
//!
//! No gap, no duplicate: the job's hub listener is taken *before* the replay reads the stream,
//! so every event stored after the replay's end reaches the listener; anything at or below the
//! last sent `id` (the stream sequence) is dropped. A client that falls a hub buffer behind gets
//! `event: lagged` and the connection ends; it reconnects with `Last-Event-ID`.
//!
//! Cost: frames are formatted once at ingestion and shared; a connection copies what is ready
//! into one chunk (up to [`CHUNK_MAX`]) per socket write, so a busy stream costs a write per
//! batch, not per event, and an idle one sends each event at once (TCP_NODELAY is set by
//! [`crate::start`]).

use crate::error::ApiError;
use crate::hub::{sse_frame, HubMsg, JobFrame};
use crate::metrics::SseGuard;
use crate::{replay, AppState};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Most bytes put into one socket write.
pub const CHUNK_MAX: usize = 128 * 1024;
/// Most events replayed into one chunk.
const REPLAY_CHUNK: usize = 256;

/// `?last_event_id=` (the header wins).
#[derive(Deserialize, Debug, Default)]
pub struct ResumeParams {
    /// Resume after this stream sequence.
    pub last_event_id: Option<String>,
}

fn resume_point(headers: &HeaderMap, params: &ResumeParams) -> Result<u64, ApiError> {
    let raw = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::BadRequest(
                        "Last-Event-ID is not a stream sequence number (not visible ASCII)".into(),
                    )
                })?
                .to_string(),
        ),
        None => params.last_event_id.clone(),
    };
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "Last-Event-ID {v:?} is not a stream sequence number"
            ))
        }),
    }
}

/// A `text/event-stream` response over `chunks`.
fn sse_response<S>(chunks: S) -> Response
where
    S: futures::Stream<Item = Bytes> + Send + 'static,
{
    let body = Body::from_stream(futures::StreamExt::map(chunks, Ok::<_, Infallible>));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) must not buffer a live stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn end_frame(job_id: &str, status: crate::record::JobStatus) -> Bytes {
    sse_frame(
        None,
        "end",
        json!({"job_id": job_id, "status": status})
            .to_string()
            .as_bytes(),
    )
}

fn lagged_frame(state: &AppState, last: u64) -> Bytes {
    state.metrics.sse_lagged.fetch_add(1, Ordering::Relaxed);
    sse_frame(
        None,
        "lagged",
        json!({"missed_from": last + 1}).to_string().as_bytes(),
    )
}

const KEEPALIVE: &[u8] = b":\n\n";

/// The event type of a stored payload, read without building the rest.
fn kind_of(payload: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_slice::<Kind>(payload)
        .map(|k| k.kind)
        .unwrap_or_else(|_| "message".into())
}

/// `GET /api/jobs/{id}/events`.
pub async fn job_events(
    State(state): State<AppState>,
    job_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    params: Result<Query<ResumeParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job_id = crate::api::path_id(job_id)?;
    let params = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = resume_point(&headers, &params)?;
    state.require_nats()?;
    // Listen before reading the stream: see the module doc.
    let live = state.hub.subscribe_job(&job_id);
    if !state.index.contains(&job_id)
        && replay::last_seq(&state.stream, &job_id)
            .await
            .map_err(ApiError::nats)?
            == 0
    {
        return Err(ApiError::NotFound(format!("no job {job_id}")));
    }
    let replay = replay::open(&state.stream, state.registry.keys(), &job_id, after)
        .await
        .map_err(ApiError::nats)?;
    let follow = JobFollow {
        _guard: SseGuard::new(state.clone()),
        state,
        job_id,
        last: after,
        replay,
        live,
        done: false,
        checked: false,
    };
    Ok(sse_response(futures::stream::unfold(
        follow,
        |mut f| async move { f.next_chunk().await.map(|c| (c, f)) },
    )))
}

struct JobFollow {
    state: AppState,
    job_id: String,
    last: u64,
    replay: Option<replay::Replay>,
    live: broadcast::Receiver<JobFrame>,
    done: bool,
    /// Whether the finished check after the replay (or in place of it) was made.
    checked: bool,
    /// Counts the connection while it lives.
    _guard: SseGuard,
}

impl JobFollow {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if self.replay.is_some() {
            return Some(self.replay_chunk().await);
        }
        if !self.checked {
            // Nothing to replay (resumed at the last event): a finished job ends right here.
            self.checked = true;
            if let Some(end) = self.end_if_finished() {
                return Some(end);
            }
        }
        let keepalive = self.state.cfg.sse_keepalive;
        let first = tokio::select! {
            _ = self.state.shutdown.cancelled() => return None,
            r = tokio::time::timeout(keepalive, self.live.recv()) => match r {
                Err(_) => return Some(Bytes::from_static(KEEPALIVE)),
                Ok(r) => r,
            },
        };
        let mut out = BytesMut::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ok(JobFrame::Event { seq, frame }) => {
                    if seq > self.last {
                        out.extend_from_slice(&frame);
                        self.last = seq;
                    }
                }
                Ok(JobFrame::End { status, last_seq }) => {
                    if self.last >= last_seq {
                        out.extend_from_slice(&end_frame(&self.job_id, status));
                        self.done = true;
                        break;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    out.extend_from_slice(&lagged_frame(&self.state, self.last));
                    self.done = true;
                    break;
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    break;
                }
            }
            if out.len() >= CHUNK_MAX {
                break;
            }
            next = match self.live.try_recv() {
                Ok(f) => Some(Ok(f)),
                Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                Err(TryRecvError::Empty) => None,
            };
        }
        Some(out.freeze())
    }

    /// The next stored events, then (once the replay is over) `end` if the job has finished.
    async fn replay_chunk(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        let r = self.replay.as_mut().expect("replaying");
        let mut n = 0;
        let mut finished = false;
        loop {
            let next = if n == 0 {
                tokio::select! {
                    _ = self.state.shutdown.cancelled() => Ok(None),
                    n = r.next() => n,
                }
            } else {
                match r.next().now_or_never() {
                    Some(n) => n,
                    None => break,
                }
            };
            match next {
                Ok(Some((seq, payload))) => {
                    out.extend_from_slice(&sse_frame(Some(seq), &kind_of(&payload), &payload));
                    self.last = seq;
                    n += 1;
                    if n >= REPLAY_CHUNK || out.len() >= CHUNK_MAX {
                        break;
                    }
                }
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(job_id = %self.job_id, error = %e, "replay failed");
                    self.done = true;
                    finished = true;
                    break;
                }
            }
        }
        if finished {
            self.replay = None;
            self.checked = true;
            if let Some(end) = self.end_if_finished() {
                out.extend_from_slice(&end);
            }
        }
        out.freeze()
    }

    /// `end` when the index says the job is finished and everything it indexed was sent.
    fn end_if_finished(&mut self) -> Option<Bytes> {
        let (status, last_seq) = self.state.index.progress(&self.job_id)?;
        (status != crate::record::JobStatus::Running && last_seq <= self.last).then(|| {
            self.done = true;
            end_frame(&self.job_id, status)
        })
    }
}

/// `GET /api/events`.
pub async fn all_events(State(state): State<AppState>) -> impl IntoResponse {
    let live = state.hub.subscribe();
    let guard = SseGuard::new(state.clone());
    let follow = (state, live, guard, false);
    sse_response(futures::stream::unfold(
        follow,
        |(state, mut live, guard, done)| async move {
            if done {
                return None;
            }
            let msg = tokio::select! {
                _ = state.shutdown.cancelled() => return None,
                r = tokio::time::timeout(state.cfg.sse_keepalive, live.recv()) => match r {
                    Err(_) => return Some((Bytes::from_static(KEEPALIVE), (state, live, guard, false))),
                    Ok(m) => m,
                },
            };
            let (chunk, done) = match msg {
                Ok(HubMsg::Job { item }) => (sse_frame(None, "job", item.as_bytes()), false),
                Ok(HubMsg::Machine { data }) => {
                    (sse_frame(None, "machine", data.as_bytes()), false)
                }
                Err(RecvError::Lagged(_)) => (lagged_frame(&state, 0), true),
                Err(RecvError::Closed) => return None,
            };
            Some((chunk, (state, live, guard, done)))
        },
    ))
}
