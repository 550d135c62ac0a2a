//! Server-Sent Events. `GET /api/jobs/{id}/events` replays the job from `BENCH_EVENTS` after
//! `Last-Event-ID`, then follows it live from the hub, then sends `end`. `GET /api/events`
//! follows every job, machine status and job status live.
//!
//! No gap, no duplicate: the hub listener is taken *before* the replay reads the stream, so
//! every event stored after the replay's end reaches the listener; anything at or below the
//! last sent `id` (the stream sequence) is dropped. A client that falls a hub buffer behind gets
//! `event: lagged` and the connection ends; it reconnects with `Last-Event-ID`.

use crate::error::ApiError;
use crate::hub::HubMsg;
use crate::metrics::SseGuard;
use crate::{replay, AppState};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use bench_schemas::validate_job_id;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use tokio::sync::{broadcast, mpsc};

/// Events queued per connection between its task and the socket.
const CONNECTION_QUEUE: usize = 64;

/// `?last_event_id=` (the header wins).
#[derive(Deserialize, Debug, Default)]
pub struct ResumeParams {
    /// Resume after this stream sequence.
    pub last_event_id: Option<String>,
}

fn resume_point(headers: &HeaderMap, params: &ResumeParams) -> Result<u64, ApiError> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| params.last_event_id.clone());
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "Last-Event-ID {v:?} is not a stream sequence number"
            ))
        }),
    }
}

fn event_msg(stream_seq: u64, kind: &str, data: &str) -> SseEvent {
    SseEvent::default()
        .id(stream_seq.to_string())
        .event(kind)
        .data(data)
}

fn sse_response(state: &AppState, rx: mpsc::Receiver<SseEvent>) -> impl IntoResponse {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(Box::pin(stream)
        as std::pin::Pin<
            Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>,
        >)
    .keep_alive(KeepAlive::new().interval(state.cfg.sse_keepalive))
}

/// `GET /api/jobs/{id}/events`.
pub async fn job_events(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    params: Result<Query<ResumeParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    validate_job_id(&job_id)?;
    let params = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = resume_point(&headers, &params)?;
    // Listen before reading the stream: see the module doc.
    let live = state.hub.subscribe();
    if !state.index.contains(&job_id)
        && replay::last_seq(&state.stream, &job_id)
            .await
            .map_err(ApiError::nats)?
            == 0
    {
        return Err(ApiError::NotFound(format!("no job {job_id}")));
    }
    let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
    tokio::spawn(follow_job(state.clone(), job_id, after, live, tx));
    Ok(sse_response(&state, rx))
}

/// `end` when the index says the job is finished and everything it indexed was sent.
fn end_event(state: &AppState, job_id: &str, last_sent: u64) -> Option<SseEvent> {
    let r = state.index.get(job_id)?;
    (r.is_finished() && r.last_stream_seq <= last_sent).then(|| {
        SseEvent::default()
            .event("end")
            .data(json!({"job_id": job_id, "status": r.status}).to_string())
    })
}

async fn follow_job(
    state: AppState,
    job_id: String,
    after: u64,
    mut live: broadcast::Receiver<HubMsg>,
    tx: mpsc::Sender<SseEvent>,
) {
    let _guard = SseGuard::new(state.clone());
    let mut last = after;
    match replay::open(&state.stream, &job_id, after).await {
        Ok(None) => {}
        Ok(Some(mut r)) => loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = state.shutdown.cancelled() => return,
                n = r.next() => n,
            };
            match next {
                Ok(Some((seq, payload))) => {
                    let kind = serde_json::from_slice::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v.get("type").and_then(|t| t.as_str().map(str::to_string)))
                        .unwrap_or_else(|| "message".into());
                    if tx
                        .send(event_msg(seq, &kind, &String::from_utf8_lossy(&payload)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = seq;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%job_id, error = %e, "replay failed");
                    return;
                }
            }
        },
        Err(e) => {
            tracing::warn!(%job_id, error = %e, "replay failed");
            return;
        }
    }
    if let Some(end) = end_event(&state, &job_id, last) {
        let _ = tx.send(end).await;
        return;
    }
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return,
            _ = state.shutdown.cancelled() => return,
            m = live.recv() => m,
        };
        match msg {
            Ok(HubMsg::Event {
                stream_seq,
                job_id: j,
                kind,
                data,
            }) if *j == *job_id && stream_seq > last => {
                if tx.send(event_msg(stream_seq, kind, &data)).await.is_err() {
                    return;
                }
                last = stream_seq;
                // The job may have finished before this event was sent (same batch).
                if let Some(end) = end_event(&state, &job_id, last) {
                    let _ = tx.send(end).await;
                    return;
                }
            }
            Ok(HubMsg::Job { job_id: j, .. }) if *j == *job_id => {
                if let Some(end) = end_event(&state, &job_id, last) {
                    let _ = tx.send(end).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                lagged(&state, &tx, last).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn lagged(state: &AppState, tx: &mpsc::Sender<SseEvent>, last: u64) {
    state.metrics.sse_lagged.fetch_add(1, Ordering::Relaxed);
    let _ = tx
        .send(
            SseEvent::default()
                .event("lagged")
                .data(json!({"missed_from": last + 1}).to_string()),
        )
        .await;
}

/// `GET /api/events`.
pub async fn all_events(State(state): State<AppState>) -> impl IntoResponse {
    let live = state.hub.subscribe();
    let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
    tokio::spawn(follow_all(state.clone(), live, tx));
    sse_response(&state, rx)
}

async fn follow_all(
    state: AppState,
    mut live: broadcast::Receiver<HubMsg>,
    tx: mpsc::Sender<SseEvent>,
) {
    let _guard = SseGuard::new(state.clone());
    let mut last = 0;
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return,
            _ = state.shutdown.cancelled() => return,
            m = live.recv() => m,
        };
        let event = match msg {
            Ok(HubMsg::Event {
                stream_seq,
                kind,
                data,
                ..
            }) => {
                last = stream_seq;
                event_msg(stream_seq, kind, &data)
            }
            Ok(HubMsg::Job { item, .. }) => SseEvent::default().event("job").data(&*item),
            Ok(HubMsg::Machine { data }) => SseEvent::default().event("machine").data(&*data),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                lagged(&state, &tx, last).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
