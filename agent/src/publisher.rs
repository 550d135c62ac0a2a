//! Publishes events into JetStream in order, each stored once, with a bounded window of acks in
//! flight.
//!
//! Each event carries `Nats-Msg-Id: <job_id>.<machine_id>.<run_id>.<seq>`. Up to
//! `publish_window` events are sent before their acks return (one ack at a time would cap an
//! agent at one event per round trip). When the first unacknowledged event fails (no ack in
//! time, an error, a lost connection) the publisher goes back to it and sends it and everything
//! after it again, in order, with the same ids (go-back-N): JetStream's duplicate window drops
//! those it had stored already.
//!
//! The window travels on a connection of its own that never reconnects: after a failure the
//! publisher opens a new one and re-sends there. A reconnecting client writes the events still
//! queued inside it onto the new connection first, ahead of the re-sent ones, so an event lost
//! with the old connection would be stored after later ones (seen in a test: 65..68 stored
//! before 53..64). With one connection per attempt every connection carries an in-order run of
//! events and delivers a prefix of it, so the first copy of each event to arrive is in order.
//! async-nats has no "never reconnect" (`max_reconnects(0)` means unlimited, and one reconnect
//! is always allowed), so the connection's only reconnect target is a local port that accepts
//! and hangs up: its reconnect fails and it closes, dropping what it still held.
//!
//! The queue in front of the publisher is bounded (`limits.max_event_queue`): a full queue is
//! reported to the emitter ([`QueueFull`]), never a silent drop and never a wait on the engine's
//! stream.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self};
use async_nats::{HeaderMap, ReconnectToServer, ServerAddr, Subject};
use bench_nats::NatsConfig;
use bench_schemas::{subjects, Event};
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use serde::Serialize;
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Wall-clock Unix ms (for `ts_ms` and expiry; never for metrics).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// No ack within this is a failure: the event and those after it are sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before re-sending after a failure, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long one connection attempt may take (the client's own connect timeout is 5 s).
const CONNECT_WAIT: Duration = Duration::from_secs(8);
/// An event JetStream keeps refusing is given up after this many failures spread over at least
/// [`GIVE_UP_AFTER`] (a lost connection alone never gives an event up: the bounded queue stops
/// the run instead).
const GIVE_UP_FAILURES: u32 = 10;
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// One event, ready to send (and to send again).
pub struct Outgoing {
    subject: Subject,
    msg_id: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Outgoing {
    /// An event with its message id.
    pub fn new(event: &Event, msg_id: String) -> Self {
        // Events are plain data (strings, numbers, non-finite floats written as null):
        // serialising them cannot fail.
        let payload = Bytes::from(serde_json::to_vec(event).expect("events serialise"));
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        Self {
            subject: Subject::from(subjects::events(&event.job_id)),
            msg_id,
            headers,
            payload,
        }
    }
}

/// The event queue was full: nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the agent's event queue is full (limits.max_event_queue)")]
pub struct QueueFull;

/// Counters, cheap to update on every event.
#[derive(Default)]
struct Stats {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    published: AtomicU64,
    retried: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
    overflowed: AtomicU64,
    out_of_order: AtomicU64,
    connects: AtomicU64,
}

/// What the publisher has done so far (served on `/health`).
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherStats {
    /// Slots taken in the event queue: events waiting to be sent, plus one slot that every
    /// accepted job holds for its final event.
    pub queued: u64,
    /// The queue's size (`limits.max_event_queue`).
    pub queue_capacity: u64,
    /// Events sent and not yet acknowledged.
    pub in_flight: u64,
    /// The most ever in flight at once (never above `window`).
    pub max_in_flight: u64,
    /// `publish_window`.
    pub window: u64,
    /// Events acknowledged by JetStream (or, with no stream, published on core NATS).
    pub published: u64,
    /// Events sent again after a failed or missing ack.
    pub retried: u64,
    /// Acks saying JetStream had stored the event already (a re-sent copy it dropped).
    pub duplicates: u64,
    /// Events given up (JetStream refused them again and again, or too large to send).
    pub dropped: u64,
    /// Events refused because the queue was full.
    pub overflowed: u64,
    /// Events JetStream stored before one sent earlier (should stay 0).
    pub out_of_order: u64,
    /// Connections the publisher opened.
    pub connects: u64,
}

/// A handle that queues events for the publishing task. Cloning is cheap.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outgoing>,
    stats: Arc<Stats>,
    window: usize,
}

/// How the publisher reaches NATS and how much it may hold.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The agent's NATS settings (the publisher opens its own connections with them).
    pub nats: NatsConfig,
    /// Connection name shown by the server.
    pub name: String,
    /// Acks in flight at most.
    pub window: usize,
    /// Events queued at most.
    pub queue: usize,
}

impl Publisher {
    /// Starts the publishing task. It ends once every handle (and every reserved slot) is gone
    /// and everything queued is acknowledged.
    pub fn spawn(cfg: PublisherConfig) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(Stats::default());
        let window = cfg.window.max(1);
        let task = tokio::spawn(run(cfg, rx, stats.clone(), window));
        (Self { tx, stats, window }, task)
    }

    /// A queue slot for one event, or [`QueueFull`] (counted).
    pub fn try_reserve(&self) -> Result<mpsc::Permit<'_, Outgoing>, QueueFull> {
        self.tx.try_reserve().map_err(|_| self.overflow())
    }

    /// A queue slot held until used or dropped (a run's final event).
    pub fn try_reserve_owned(&self) -> Result<mpsc::OwnedPermit<Outgoing>, QueueFull> {
        self.tx
            .clone()
            .try_reserve_owned()
            .map_err(|_| self.overflow())
    }

    /// Whether more than half the queue is free: best-effort events (telemetry) are only
    /// queued then, so they can never be what fills the queue and stops a run.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() * 2 > self.tx.max_capacity()
    }

    fn overflow(&self) -> QueueFull {
        self.stats.overflowed.fetch_add(1, Relaxed);
        QueueFull
    }

    /// Queues an event outside any run's sequence (a refusal) with its own message id. Best
    /// effort: the refused sender has the reply, so a full queue only logs.
    pub fn send_with_id(&self, event: &Event, msg_id: String) {
        match self.try_reserve() {
            Ok(permit) => permit.send(Outgoing::new(event, msg_id)),
            Err(_) => {
                tracing::warn!(job_id = %event.job_id, %msg_id, "event queue full; refusal event not published")
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> PublisherStats {
        let s = &self.stats;
        let capacity = self.tx.max_capacity() as u64;
        PublisherStats {
            queued: capacity - self.tx.capacity() as u64,
            queue_capacity: capacity,
            in_flight: s.in_flight.load(Relaxed),
            max_in_flight: s.max_in_flight.load(Relaxed),
            window: self.window as u64,
            published: s.published.load(Relaxed),
            retried: s.retried.load(Relaxed),
            duplicates: s.duplicates.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            overflowed: s.overflowed.load(Relaxed),
            out_of_order: s.out_of_order.load(Relaxed),
            connects: s.connects.load(Relaxed),
        }
    }
}

/// An event sent and not yet acknowledged.
struct Pending {
    out: Outgoing,
    failures: u32,
    first_failure: Option<Instant>,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// One connection, used until its first failure.
struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Link {
    async fn send(&self, out: &Outgoing) -> Result<AckFuture, PublishError> {
        let ack = self
            .js
            .publish_with_headers(
                out.subject.clone(),
                out.headers.clone(),
                out.payload.clone(),
            )
            .await?;
        // Awaited as one future from now on, so its timeout runs while later events go out.
        Ok(ack.into_future())
    }
}

/// A local port that accepts connections and closes them at once: the only reconnect target
/// of an event connection, so that its reconnect fails (see the module doc).
struct Refuser {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Refuser {
    async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        Ok(Self { port, task })
    }

    /// Its URL, in the scheme family of `url` (websocket and plain URLs cannot be mixed).
    fn url(&self, url: &str) -> String {
        let scheme = if url.starts_with("ws") { "ws" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a connection that never reconnects, trying each configured URL in turn until one
/// answers.
async fn connect(cfg: &PublisherConfig, refuser: &Refuser, window: usize, stats: &Stats) -> Link {
    let url = cfg.nats.effective_url();
    let mut urls: Vec<String> = url
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        urls.push(url);
    }
    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0usize;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        match try_connect(cfg, url, refuser, window).await {
            Ok(link) => {
                stats.connects.fetch_add(1, Relaxed);
                return link;
            }
            Err(e) => tracing::debug!(%url, error = %e, "event connection not up; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn try_connect(
    cfg: &PublisherConfig,
    url: &str,
    refuser: &Refuser,
    window: usize,
) -> anyhow::Result<Link> {
    let refuser_url = refuser.url(url);
    let refuser_addr: ServerAddr = refuser_url.parse()?;
    let (state_tx, mut state) = watch::channel(None::<bool>);
    let state_tx = Arc::new(state_tx);
    let first = Arc::new(AtomicBool::new(true));
    let opts = cfg
        .nats
        .options(&cfg.name)
        .await?
        // The first attempt goes to the server, any later one to the refuser (and a second
        // failed attempt closes the client).
        .max_reconnects(1)
        .reconnect_to_server_callback(move |servers, _info| {
            let to_server = first.swap(false, SeqCst);
            let refuser = refuser_addr.clone();
            async move {
                servers
                    .iter()
                    .find(|s| (s.addr != refuser) == to_server)
                    .map(|s| ReconnectToServer {
                        addr: s.addr.clone(),
                        delay: Some(Duration::ZERO),
                    })
            }
        })
        .event_callback(move |event| {
            let state_tx = state_tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        state_tx.send_replace(Some(true));
                    }
                    async_nats::Event::Disconnected
                    | async_nats::Event::Closed
                    | async_nats::Event::ClientError(_) => {
                        state_tx.send_replace(Some(false));
                    }
                    _ => {}
                }
            }
        });
    let client = opts.connect(vec![url, refuser_url.as_str()]).await?;
    let up = tokio::time::timeout(CONNECT_WAIT, state.wait_for(|s| s.is_some()))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_WAIT:?}"))?
        .map(|s| *s == Some(true))
        .unwrap_or(false);
    if !up {
        anyhow::bail!("connection failed");
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok(Link { client, js })
}

/// What woke the loop.
enum Step {
    Ack(Result<PublishAck, PublishError>),
    Next(Option<Outgoing>),
}

async fn run(
    cfg: PublisherConfig,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<Stats>,
    window: usize,
) {
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(window);
    let mut acks: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut link: Option<Link> = None;
    let mut open = true;
    let mut backoff = MIN_BACKOFF;
    let mut last_stored = 0u64;
    let mut warned_no_stream = false;
    let refuser = loop {
        match Refuser::start().await {
            Ok(r) => break r,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind a local port for the event connection; retrying");
                pause(&mut backoff).await;
            }
        }
    };
    loop {
        stats.in_flight.store(pending.len() as u64, Relaxed);
        if !open && pending.is_empty() {
            break;
        }
        let Some(l) = &link else {
            let l = connect(&cfg, &refuser, window, &stats).await;
            // Go-back-N: everything unacknowledged again, in order, with the same ids.
            acks = FuturesOrdered::new();
            let mut failed = false;
            for p in &pending {
                stats.retried.fetch_add(1, Relaxed);
                match l.send(&p.out).await {
                    Ok(ack) => acks.push_back(ack),
                    Err(e) => {
                        tracing::debug!(error = %e, "re-send failed; reconnecting");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                pause(&mut backoff).await;
            } else {
                link = Some(l);
            }
            continue;
        };
        let step = tokio::select! {
            biased;
            Some(res) = acks.next() => Step::Ack(res),
            next = rx.recv(), if open && pending.len() < window => Step::Next(next),
        };
        match step {
            Step::Next(None) => open = false,
            Step::Next(Some(out)) => match l.send(&out).await {
                Ok(ack) => {
                    acks.push_back(ack);
                    pending.push_back(Pending {
                        out,
                        failures: 0,
                        first_failure: None,
                    });
                    stats.max_in_flight.fetch_max(pending.len() as u64, Relaxed);
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    tracing::error!(msg_id = %out.msg_id, bytes = out.payload.len(), error = %e, "event too large for the server; dropped");
                    stats.dropped.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "send failed; reconnecting");
                    pending.push_back(Pending {
                        out,
                        failures: 0,
                        first_failure: None,
                    });
                    link = None;
                    pause(&mut backoff).await;
                }
            },
            Step::Ack(Ok(ack)) => {
                let p = pending.pop_front().expect("one pending event per ack");
                stats.published.fetch_add(1, Relaxed);
                if ack.duplicate {
                    stats.duplicates.fetch_add(1, Relaxed);
                } else {
                    if ack.sequence <= last_stored {
                        stats.out_of_order.fetch_add(1, Relaxed);
                        tracing::warn!(msg_id = %p.out.msg_id, "event stored after a later one");
                    }
                    last_stored = ack.sequence;
                }
                backoff = MIN_BACKOFF;
            }
            Step::Ack(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                // No stream (nobody created BENCH_EVENTS): live subscribers still get it.
                if !warned_no_stream {
                    tracing::warn!(
                        "no JetStream stream on {}; events are not stored",
                        subjects::EVENTS_ALL
                    );
                    warned_no_stream = true;
                }
                let p = pending.front().expect("one pending event per ack");
                let sent = l
                    .client
                    .publish_with_headers(
                        p.out.subject.clone(),
                        p.out.headers.clone(),
                        p.out.payload.clone(),
                    )
                    .await;
                if sent.is_ok() {
                    pending.pop_front();
                    stats.published.fetch_add(1, Relaxed);
                } else {
                    link = None;
                    pause(&mut backoff).await;
                }
            }
            Step::Ack(Err(e)) => {
                let unacked = pending.len();
                let head = pending.front_mut().expect("one pending event per ack");
                head.failures += 1;
                let since = *head.first_failure.get_or_insert_with(Instant::now);
                if e.kind() == PublishErrorKind::Other
                    && head.failures >= GIVE_UP_FAILURES
                    && since.elapsed() >= GIVE_UP_AFTER
                {
                    tracing::error!(msg_id = %head.out.msg_id, error = %e, "JetStream keeps refusing this event; given up");
                    pending.pop_front();
                    stats.dropped.fetch_add(1, Relaxed);
                } else if backoff == MIN_BACKOFF {
                    // The first failure since the last ack: say so once, not at every retry.
                    tracing::warn!(msg_id = %head.out.msg_id, error = %e, unacked, "event not acknowledged; re-sending from it on a new connection");
                } else {
                    tracing::debug!(msg_id = %head.out.msg_id, error = %e, unacked, "event not acknowledged; re-sending from it on a new connection");
                }
                link = None;
                pause(&mut backoff).await;
            }
        }
    }
    if let Some(l) = link {
        let _ = l.client.flush().await;
    }
}

async fn pause(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}
