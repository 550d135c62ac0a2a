//! Several centrals on one NATS: one indexes, the others follow.
//!
//! The indexer is whoever holds the lease, key [`subjects::LEADER_KEY`] in the KV bucket
//! [`subjects::CENTRAL_BUCKET`], whose max age is `leader_ttl_s`. The holder renews it every
//! fifth of that with a compare-and-set update; a central that finds the key gone (its holder
//! died: the entry aged out, or it let go on shutdown) creates it with a compare-and-set
//! create, so exactly one central wins. A holder whose renewal meets another revision has lost
//! it and steps down at once. Why a lease rather than every central indexing with
//! compare-and-set writes: the indexer owns one durable consumer and the stall verdicts, both of
//! which must have one owner, and a record holds state that is not in any event (dispatch
//! answers, stall failures) which two writers could only merge field by field.
//!
//! - **The leader** runs what a lone central runs: the durable indexer ([`crate::ingest`]),
//!   the stall loop, KV writes, and answers API writes forwarded to [`subjects::CENTRAL_API`].
//! - **A follower** serves the same API, SSE and UI from its own index: it loads the bucket
//!   at start, applies every event from an ordered (ephemeral) consumer exactly as the leader
//!   does, live to its SSE clients, but writes nothing; it adopts the leader's KV writes
//!   (dispatch answers, stall failures, deletions) through a watch. API writes (`POST`,
//!   `DELETE` under `/api/`) are forwarded over NATS to the leader and answered with its reply.
//! - **Taking over**: the follower's index is already current, so its API and SSE never
//!   stop; it writes every record it holds ahead of KV, opens the durable consumer at its ack
//!   floor (redelivered events are duplicates), and starts the stall loop.
//!
//! A central restarted with the same `central_id` (by default the host name and HTTP port)
//! takes its own lease back once it has seen no renewal for a renewal period and a half,
//! instead of waiting for it to age out; a second live central given the same id sees the
//! renewals, says so (error log) and follows.

use crate::ingest::{announce, BATCH_MAX};
use crate::{AppState, Shared};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::{self, stream};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bench_schemas::subjects;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest API write body forwarded (a job is a few KiB; the server's max payload bounds it too).
const MAX_FORWARD_BODY: usize = 1 << 20;
/// Header set on a forwarded request: the receiver never forwards it again.
const FORWARDED: &str = "bench-forwarded";
/// NATS headers carrying a forwarded request's method, URI and the reply's status.
const H_METHOD: &str = "Bench-Method";
const H_URI: &str = "Bench-Uri";
const H_STATUS: &str = "Bench-Status";
/// Request headers that travel with a forwarded write.
const FORWARD_HEADERS: [&str; 3] = ["authorization", "content-type", "origin"];

/// What the lease holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Lease {
    /// The holder's `central_id`.
    pub central_id: String,
    /// The holder process (new at every start): tells a restart of this central, whose old
    /// process is gone, from a second central configured with the same `central_id`.
    #[serde(default)]
    pub instance: String,
    /// When it took the lease (unix ms).
    pub since_ms: u64,
}

/// This central's role, read by handlers and `/health`.
#[derive(Debug)]
pub struct Role {
    /// This central's id.
    pub id: String,
    /// This process's [`Lease::instance`].
    pub instance: String,
    leader: AtomicBool,
    holder: RwLock<Option<Lease>>,
    /// Times this central took the lease.
    pub takeovers: AtomicU64,
    /// API writes this central forwarded to the leader.
    pub forwarded: AtomicU64,
}

impl Role {
    /// A follower named `id` until it takes the lease.
    pub fn new(id: String) -> Self {
        Self {
            id,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            leader: AtomicBool::new(false),
            holder: RwLock::new(None),
            takeovers: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        }
    }

    /// Whether this central indexes now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// The lease as last seen (None: nobody holds it, or not read yet).
    pub fn holder(&self) -> Option<Lease> {
        self.holder.read().expect("holder lock").clone()
    }

    /// Sets the role and the lease as seen.
    pub fn set(&self, leader: bool, holder: Option<Lease>) {
        self.leader.store(leader, Ordering::Release);
        *self.holder.write().expect("holder lock") = holder;
    }
}

/// The lease bucket: its max age is the lease's lifetime (an existing bucket gets `ttl`).
pub async fn lease_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, async_nats::Error> {
    let cfg = kv::Config {
        bucket: subjects::CENTRAL_BUCKET.to_string(),
        description: "bench-central: the indexing lease (one central indexes, others follow)"
            .into(),
        history: 1,
        max_age: ttl,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let store = match js.get_key_value(subjects::CENTRAL_BUCKET).await {
        Ok(store) => store,
        Err(_) => js.create_key_value(cfg).await?,
    };
    let name = bench_nats::streams::kv_stream_name(subjects::CENTRAL_BUCKET);
    let r = bench_nats::streams::ensure_replicas(js, &name, replicas).await?;
    if r.changed() {
        tracing::info!(
            "{}: replicas {} -> {}",
            subjects::CENTRAL_BUCKET,
            r.found,
            r.now
        );
    }
    let mut s = js.get_stream(&name).await?;
    let config = s.info().await?.config.clone();
    if config.max_age != ttl {
        js.update_stream(stream::Config {
            max_age: ttl,
            ..config
        })
        .await?;
    }
    Ok(store)
}

/// One attempt to take the lease: `Ok(Some(revision))` when this central holds it now.
/// `renew`: how often a holder renews it.
pub async fn try_acquire(
    lease: &kv::Store,
    role: &Role,
    renew: Duration,
) -> Result<(Option<u64>, Option<Lease>), async_nats::Error> {
    let me = role.id.as_str();
    let mine = Lease {
        central_id: me.to_string(),
        instance: role.instance.clone(),
        since_ms: crate::now_ms(),
    };
    let value: bytes::Bytes = serde_json::to_vec(&mine)?.into();
    match lease.create(subjects::LEADER_KEY, value.clone()).await {
        Ok(rev) => return Ok((Some(rev), Some(mine))),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let Some(entry) = lease.entry(subjects::LEADER_KEY).await? else {
        return Ok((None, None));
    };
    if entry.operation != Operation::Put {
        return Ok((None, None));
    }
    let holder: Option<Lease> = serde_json::from_slice(&entry.value).ok();
    if holder.as_ref().is_some_and(|h| h.central_id == me) {
        // Our id, held by another process: this central before a restart (gone: take the lease
        // back now rather than after its age) or a second central configured with the same id
        // (alive: it renews). Seen unchanged for longer than a renewal, it is the first.
        let ours = holder.as_ref().is_some_and(|h| h.instance == role.instance);
        if !ours {
            tokio::time::sleep(renew + renew / 2).await;
            match lease.entry(subjects::LEADER_KEY).await? {
                Some(now) if now.revision == entry.revision => {}
                _ => {
                    tracing::error!(central_id = %me, "another central runs with this central_id and holds the indexing lease: give each central its own central_id (CENTRAL_ID); this one follows");
                    return Ok((None, holder));
                }
            }
        }
        if let Ok(rev) = lease
            .update(subjects::LEADER_KEY, value, entry.revision)
            .await
        {
            return Ok((Some(rev), Some(mine)));
        }
    }
    Ok((None, holder))
}

/// Where a follower's ordered consumer starts: right after what the leader acknowledged (the
/// records in KV hold everything up to there), or at the stream's start.
async fn mirror_start(s: &Shared) -> u64 {
    match s.stream.consumer_info(subjects::INDEXER_CONSUMER).await {
        Ok(info) => info.ack_floor.stream_sequence + 1,
        Err(_) => 1,
    }
}

/// A follower's reader opened by `open`, tried again every second until it opens; None once
/// `token` is cancelled.
async fn open_until<T, E, F>(
    token: &CancellationToken,
    what: &str,
    mut open: impl FnMut() -> F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    loop {
        if token.is_cancelled() {
            return None;
        }
        match open().await {
            Ok(reader) => return Some(reader),
            Err(e) => {
                tracing::warn!(error = %e, "follower: cannot {what}; retrying");
                tokio::select! {
                    _ = token.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// The follower's index feed: every event, applied and sent to SSE listeners as the leader
/// does, never written.
async fn mirror(s: &Shared, token: &CancellationToken) {
    let mut ingest = s.ingest();
    ingest.shutdown = token;
    ingest.load_unknown = true;
    let mut next = mirror_start(s).await;
    let mut touched = HashSet::new();
    loop {
        let opened = open_until(token, "read the event stream", || async {
            s.stream
                .create_consumer(OrderedConfig {
                    filter_subject: subjects::EVENTS_ALL.to_string(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await?
                .messages()
                .await
                .map_err(async_nats::Error::from)
        });
        let Some(mut messages) = opened.await else {
            return;
        };
        loop {
            let first = tokio::select! {
                _ = token.cancelled() => return,
                m = messages.next() => m,
            };
            let first = match first {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "follower stream error");
                    continue;
                }
                None => break,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            ingest.apply(&batch, &mut touched).await;
            s.index.mark_mirrored(touched.iter());
            touched.clear();
            if let Some(seq) = batch
                .last()
                .and_then(|m| m.info().ok())
                .map(|i| i.stream_sequence)
            {
                next = seq + 1;
            }
        }
    }
}

/// The follower's view of the leader's KV writes, from `from_revision` on.
async fn follow_kv(s: &Shared, token: &CancellationToken, from_revision: u64) {
    let mut from = from_revision;
    loop {
        let opened = open_until(token, "watch the jobs bucket", || {
            s.jobs_kv.watch_from(from)
        });
        let Some(mut watch) = opened.await else {
            return;
        };
        loop {
            let entry = tokio::select! {
                _ = token.cancelled() => return,
                e = watch.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "follower KV watch error");
                    break;
                }
                None => break,
            };
            from = entry.revision + 1;
            match entry.operation {
                Operation::Put => {
                    // Our own copy is as new: no parse (the leader's writes are at most one a
                    // second per running job, and a status change).
                    if s.index
                        .revision_of(&entry.key)
                        .is_some_and(|r| r >= entry.revision)
                    {
                        continue;
                    }
                    match serde_json::from_slice::<crate::record::JobRecord>(&entry.value) {
                        Ok(r) if r.job_id == entry.key => {
                            if let Some(change) = s.index.adopt(r, entry.revision) {
                                announce(&s.hub, &s.results, &entry.key, &change);
                            }
                        }
                        _ => {
                            tracing::warn!(key = %entry.key, "follower: unreadable job record skipped")
                        }
                    }
                }
                Operation::Delete | Operation::Purge => {
                    if s.index.remove(&entry.key) {
                        tracing::info!(job_id = %entry.key, "follower: job deleted by the leader");
                    }
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Runs the leader's tasks until `token` fires.
async fn lead(state: &AppState, token: &CancellationToken) {
    // Records this central applied as a follower beyond what KV holds.
    let ahead = state.index.take_ahead();
    if !ahead.is_empty() {
        tracing::info!(jobs = ahead.len(), "writing records held ahead of KV");
    }
    for id in ahead {
        let _ = crate::jobs_kv::persist_retrying(
            &state.index,
            &state.jobs_kv,
            &id,
            Some(tokio::time::Instant::now() + Duration::from_secs(5)),
            token,
        )
        .await;
    }
    let consumer = loop {
        match crate::store::open_indexer(&state.stream).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the indexer consumer; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut ingest = state.ingest();
    ingest.shutdown = token;
    let mut watch = state.watch();
    watch.shutdown = token;
    tokio::join!(
        crate::ingest::run(ingest, &state.stream, consumer),
        crate::stall::run(watch),
        serve_forwarded(state, token),
    );
}

/// Runs the role loop until shutdown: follow until the lease is free, then lead until it is
/// lost or central stops (and then let go of it).
pub async fn run(state: AppState, lease: kv::Store, mut held: Option<u64>, kv_from: u64) {
    let me = state.role.id.clone();
    let ttl = state.cfg.leader_ttl;
    let period = ttl / 5;
    let shutdown = state.shutdown.clone();
    let mut kv_from = kv_from;
    loop {
        if held.is_none() {
            let follow = shutdown.child_token();
            let tasks = {
                let (s1, s2, t1, t2) =
                    (state.clone(), state.clone(), follow.clone(), follow.clone());
                (
                    tokio::spawn(async move { mirror(&s1, &t1).await }),
                    tokio::spawn(async move { follow_kv(&s2, &t2, kv_from).await }),
                )
            };
            tracing::info!(central_id = %me, holder = ?state.role.holder().map(|h| h.central_id), "following the indexing central");
            let mut tick = tokio::time::interval(period);
            while held.is_none() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match try_acquire(&lease, &state.role, period).await {
                    Ok((Some(rev), lease_now)) => {
                        held = Some(rev);
                        state.role.set(true, lease_now);
                    }
                    Ok((None, holder)) => state.role.set(false, holder),
                    Err(e) => tracing::debug!(error = %e, "reading the lease failed"),
                }
            }
            follow.cancel();
            let _ = tasks.0.await;
            let _ = tasks.1.await;
            if shutdown.is_cancelled() {
                return;
            }
            state.role.takeovers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(central_id = %me, "took the indexing lease: indexing now");
        }
        let Some(mut rev) = held else { continue };
        state.role.set(true, state.role.holder());
        let leading = shutdown.child_token();
        let lead_task = {
            let (s, t) = (state.clone(), leading.clone());
            tokio::spawn(async move { lead(&s, &t).await })
        };
        let value: bytes::Bytes = serde_json::to_vec(&state.role.holder().unwrap_or(Lease {
            central_id: me.clone(),
            instance: state.role.instance.clone(),
            since_ms: crate::now_ms(),
        }))
        .unwrap_or_default()
        .into();
        let mut tick = tokio::time::interval(period);
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tick.tick() => {}
            }
            match lease.update(subjects::LEADER_KEY, value.clone(), rev).await {
                Ok(r) => rev = r,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // A renewal whose answer was lost (a stream leader change in a cluster)
                    // moved the revision on under our own name: still ours.
                    match lease.entry(subjects::LEADER_KEY).await {
                        Ok(Some(entry))
                            if entry.operation == Operation::Put
                                && serde_json::from_slice::<Lease>(&entry.value).is_ok_and(
                                    |l| l.central_id == me && l.instance == state.role.instance,
                                ) =>
                        {
                            rev = entry.revision;
                        }
                        Ok(_) => break true,
                        Err(e) => tracing::debug!(error = %e, "reading the lease failed"),
                    }
                }
                // NATS away: nobody can index meanwhile; a revision conflict on the next
                // renewal says whether someone else took over.
                Err(e) => tracing::debug!(error = %e, "renewing the lease failed"),
            }
        };
        leading.cancel();
        let _ = lead_task.await;
        held = None;
        state.role.set(false, None);
        if !lost {
            // Let a follower take over at its next look instead of after the lease's age.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                lease.delete_expect_revision(subjects::LEADER_KEY, Some(rev)),
            )
            .await;
            tracing::info!(central_id = %me, "let go of the indexing lease");
            return;
        }
        tracing::warn!(central_id = %me, "lost the indexing lease to another central: following");
        kv_from = state.jobs_kv.last_revision().await.map_or(1, |r| r + 1);
    }
}

/// The leader answers API writes forwarded by followers, one at a time through the same routes.
async fn serve_forwarded(state: &AppState, token: &CancellationToken) {
    let mut sub = loop {
        match state
            .client
            .queue_subscribe(subjects::CENTRAL_API, "bench-central".into())
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve forwarded API writes; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let app = crate::app(state.clone());
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => break,
            m = sub.next() => m,
        };
        let Some(msg) = msg else { break };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (app, client) = (app.clone(), state.client.clone());
        tokio::spawn(async move {
            let resp = match forwarded_request(&msg) {
                Ok(req) => tower::ServiceExt::oneshot(app, req)
                    .await
                    .unwrap_or_else(|e| match e {}),
                Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
            };
            let status = resp.status();
            let ctype = resp
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
                .await
                .unwrap_or_default();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(H_STATUS, status.as_u16().to_string().as_str());
            headers.insert("Content-Type", ctype.as_str());
            let _ = client.publish_with_headers(reply, headers, body).await;
        });
    }
    let _ = sub.unsubscribe().await;
}

fn forwarded_request(msg: &async_nats::Message) -> Result<Request, String> {
    let h = msg.headers.as_ref().ok_or("no headers")?;
    let method = h.get(H_METHOD).ok_or("no method")?.as_str();
    let uri = h.get(H_URI).ok_or("no uri")?.as_str();
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?)
        .uri(uri)
        .header(FORWARDED, "1");
    for name in FORWARD_HEADERS {
        if let Some(v) = h.get(name) {
            req = req.header(name, v.as_str());
        }
    }
    req.body(Body::from(msg.payload.clone()))
        .map_err(|e| e.to_string())
}

fn json_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Middleware: on a follower, API writes go to the leader over NATS and its answer comes back.
pub async fn forward_writes(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !write || !req.uri().path().starts_with("/api/") || state.role.is_leader() {
        return next.run(req).await;
    }
    if req.headers().contains_key(FORWARDED) {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "leader_changing",
            "this central was the leader when the request was forwarded and is not any more; try again".into(),
        );
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_FORWARD_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body over {MAX_FORWARD_BODY} bytes: {e}"),
            )
        }
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(H_METHOD, parts.method.as_str());
    let uri = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str())
        .to_string();
    headers.insert(H_URI, uri.as_str());
    for name in FORWARD_HEADERS {
        if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            headers.insert(name, v);
        }
    }
    state.role.forwarded.fetch_add(1, Ordering::Relaxed);
    let limit = state.cfg.http_timeout();
    let asked = state
        .client
        .request_with_headers(subjects::CENTRAL_API, headers, body);
    let reply = match tokio::time::timeout(limit, asked).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                format!(
                    "no central holds the indexing lease right now (one takes over within {:?}); try again",
                    state.cfg.leader_ttl + state.cfg.leader_ttl / 5
                ),
            )
        }
        Ok(Err(e)) => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "nats_unavailable",
                format!("forwarding to the indexing central failed: {e}"),
            )
        }
        Err(_) => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the indexing central did not answer within {limit:?}"),
            )
        }
    };
    let h = reply.headers.as_ref();
    let status = h
        .and_then(|h| h.get(H_STATUS))
        .and_then(|v| v.as_str().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = Response::new(Body::from(reply.payload.clone()));
    *resp.status_mut() = status;
    if let Some(ct) = h
        .and_then(|h| h.get("Content-Type"))
        .and_then(|v| HeaderValue::from_str(v.as_str()).ok())
    {
        resp.headers_mut()
            .insert(HeaderName::from_static("content-type"), ct);
    }
    // Read your own write: a job just created is in KV now; load it so the next GET finds it.
    if parts.method == Method::POST && status.is_success() {
        if let Some(id) = serde_json::from_slice::<serde_json::Value>(&reply.payload)
            .ok()
            .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_string))
        {
            if let Ok(Some((r, rev))) = state.jobs_kv.load(&id).await {
                if let Some(change) = state.index.adopt(r, rev) {
                    announce(&state.hub, &state.results, &id, &change);
                }
            }
        }
    }
    resp
}
