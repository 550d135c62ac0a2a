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
//!
//! Every event is signed here, once, as it leaves the queue ([`Signer`]: the header
//! `Bench-Sig` over the exact payload bytes, so a re-sent copy carries the same signature).
//! Central checks it against the keys it learned from this machine's registry entry, which only
//! this agent can write; so the first event waits (up to [`ANNOUNCE_WAIT`]) until a heartbeat
//! carrying the key is stored ([`Publisher::announced`]): an event never reaches central before
//! a key it could be checked with.

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
use std::path::{Path, PathBuf};
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
/// Longest the first event waits for a heartbeat carrying this agent's signing key to be stored
/// (NATS away, or a registry this agent cannot write: the events then go out anyway).
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

/// How long the question that primes a new event connection is kept open (its answer is not
/// needed, and no answer is not an error).
const PRIME_WAIT: Duration = Duration::from_secs(2);

/// Where the signing key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The agent's NATS nkey (`nats.nkey_seed_file`).
    Nkey(PathBuf),
    /// The seed inside the NATS `.creds` file (`nats.creds_file`).
    Creds(PathBuf),
    /// `signing_key_file` (created at the first start).
    File(PathBuf),
    /// None could be kept: a new key at every start.
    Ephemeral,
}

/// Why no signing key could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A key file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file holds no usable user seed.
    #[error("{path} holds no nkey user seed (SU...): {detail}")]
    NotASeed {
        /// The file.
        path: PathBuf,
        /// What nkeys said.
        detail: String,
    },
}

/// This agent's event-signing key: an ed25519 nkey user pair.
pub struct Signer {
    key: nkeys::KeyPair,
    public: String,
    source: KeySource,
    /// The `Bench-Key` header value.
    id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        f.debug_struct("Signer")
            .field("public", &self.public)
            .field("source", &self.source)
            .finish()
    }
}

impl Signer {
    /// The key of this config: the NATS nkey (the agent's least-privilege identity) when it
    /// has one, else the seed in `signing_key_file` (created 0600 at the first start, reused
    /// after), else a new key for this process only. A configured file that cannot be read is
    /// an error; a default path that cannot be written falls back to a new key (with a warning).
    pub fn load(cfg: &crate::config::Config) -> Result<Self, SignerError> {
        if let Some(path) = &cfg.nats.nkey_seed_file {
            let text = read(path)?;
            return Self::from_seed(text.trim(), path, KeySource::Nkey(path.clone()));
        }
        if let Some(path) = &cfg.nats.creds_file {
            let text = read(path)?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("SU"))
                .unwrap_or_default();
            return Self::from_seed(seed, path, KeySource::Creds(path.clone()));
        }
        match &cfg.signing_key_file {
            Some(path) => match Self::from_file(path) {
                Ok(s) => Ok(s),
                Err(e) if !cfg.signing_key_file_set => {
                    tracing::warn!(error = %e, "cannot keep a signing key at the default path; using a new key until restart (set signing_key_file)");
                    Ok(Self::ephemeral())
                }
                Err(e) => Err(e),
            },
            None => Ok(Self::ephemeral()),
        }
    }

    /// The seed in `path`, created (0600, parent folders 0700) when the file does not exist.
    pub fn from_file(path: &Path) -> Result<Self, SignerError> {
        let source = KeySource::File(path.to_path_buf());
        match std::fs::read_to_string(path) {
            Ok(text) => return Self::from_seed(text.trim(), path, source),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SignerError::Io {
                    what: "reading",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            Err(_) => {}
        }
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().expect("a new user key has a seed");
        let io = |what, e| SignerError::Io {
            what,
            path: path.to_path_buf(),
            source: e,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(dir).map_err(|e| io("creating the folder of", e))?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(path) {
            Ok(mut f) => {
                use std::io::Write as _;
                f.write_all(format!("{seed}\n").as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io("writing", e))?;
                tracing::info!(path = %path.display(), public = %key.public_key(), "created the event signing key");
                Ok(Self::from_pair(key, source))
            }
            // Another process created it first: use that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::from_seed(read(path)?.trim(), path, source)
            }
            Err(e) => Err(io("creating", e)),
        }
    }

    /// A new key for this process only.
    pub fn ephemeral() -> Self {
        Self::from_pair(nkeys::KeyPair::new_user(), KeySource::Ephemeral)
    }

    fn from_seed(seed: &str, path: &Path, source: KeySource) -> Result<Self, SignerError> {
        let key = nkeys::KeyPair::from_seed(seed)
            .ok()
            .filter(|k| matches!(k.key_pair_type(), nkeys::KeyPairType::User))
            .ok_or_else(|| SignerError::NotASeed {
                path: path.to_path_buf(),
                detail: "expected one line `SU...` (nk -gen user, or scripts/nats add-agent)"
                    .into(),
            })?;
        Ok(Self::from_pair(key, source))
    }

    fn from_pair(key: nkeys::KeyPair, source: KeySource) -> Self {
        let public = key.public_key();
        // Central's `signing::key_id`: the 8 characters after the 'U'.
        let id = public.chars().skip(1).take(8).collect();
        Self {
            key,
            public,
            source,
            id,
        }
    }

    /// The public key (`U...`), as the registry entry carries it.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The `Bench-Key` header value: the key's id, so that central verifies one key only.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Where the key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The `Bench-Sig` header value of `payload`: base64url (no padding) of its ed25519
    /// signature.
    pub fn signature(&self, payload: &[u8]) -> String {
        let sig = self.key.sign(payload).expect("a signer holds a seed");
        data_encoding::BASE64URL_NOPAD.encode(&sig)
    }
}

fn read(path: &Path) -> Result<String, SignerError> {
    std::fs::read_to_string(path).map_err(|e| SignerError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source: e,
    })
}

/// One event, ready to send (and to send again).
pub struct Outgoing {
    subject: Subject,
    msg_id: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Outgoing {
    /// An event with its message id (its headers, the id's among them, are set once it is
    /// signed: [`Self::signed`]).
    pub fn new(event: &Event, msg_id: String) -> Self {
        // Events are plain data (strings, numbers, non-finite floats written as null):
        // serialising them cannot fail.
        let payload = Bytes::from(serde_json::to_vec(event).expect("events serialise"));
        Self {
            subject: Subject::from(subjects::events(&event.job_id)),
            msg_id,
            headers: HeaderMap::new(),
            payload,
        }
    }

    /// With its headers, set once as the event leaves the queue (a re-sent copy keeps them):
    /// `Bench-Sig`, `Bench-Key`, and `Nats-Msg-Id` ending with the start of the signature
    /// ([`subjects::signed_msg_id`]).
    fn signed(mut self, signer: &Signer) -> Self {
        let sig = signer.signature(&self.payload);
        self.msg_id = subjects::signed_msg_id(&self.msg_id, &sig);
        self.headers.insert("Nats-Msg-Id", self.msg_id.as_str());
        self.headers
            .insert(subjects::SIGNATURE_HEADER, sig.as_str());
        self.headers.insert(subjects::KEY_HEADER, signer.key_id());
        self
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
    signer: Arc<Signer>,
    announced: Arc<watch::Sender<bool>>,
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
    /// Starts the publishing task with a key of its own (tests). It ends once every handle
    /// (and every reserved slot) is gone and everything queued is acknowledged.
    pub fn spawn(cfg: PublisherConfig) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn_signed(cfg, Signer::ephemeral())
    }

    /// Starts the publishing task, signing every event with `signer`.
    pub fn spawn_signed(
        cfg: PublisherConfig,
        signer: Signer,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(Stats::default());
        let window = cfg.window.max(1);
        let signer = Arc::new(signer);
        let (announced, announced_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            cfg,
            rx,
            stats.clone(),
            window,
            signer.clone(),
            announced_rx,
        ));
        let handle = Self {
            tx,
            stats,
            window,
            signer,
            announced: Arc::new(announced),
        };
        (handle, task)
    }

    /// The public key events are signed with (`U...`).
    pub fn signing_key(&self) -> &str {
        self.signer.public_key()
    }

    /// Says that a registry entry carrying [`Self::signing_key`] is stored: the first event
    /// waits for this (at most [`ANNOUNCE_WAIT`]).
    pub fn announced(&self) {
        self.announced
            .send_if_modified(|a| !std::mem::replace(a, true));
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
    // A connection's first request subscribes its reply inbox, which the server files in its
    // subject index (a cost that grows with the server's subscriptions). Done now, not by the
    // first event: when a broadcast job reaches a fleet of 500, 500 first events meant 500 such
    // subscriptions in the very moment every agent answers it. Nothing waits for the answer.
    let prime = js.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(PRIME_WAIT, prime.get_stream(subjects::EVENTS_STREAM)).await;
    });
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
    signer: Arc<Signer>,
    mut announced: watch::Receiver<bool>,
) {
    let mut waited_for_announce = false;
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
            if !waited_for_announce {
                waited_for_announce = true;
                let stored = tokio::time::timeout(ANNOUNCE_WAIT, announced.wait_for(|a| *a)).await;
                if !matches!(stored, Ok(Ok(_))) {
                    tracing::warn!(wait = ?ANNOUNCE_WAIT, "no heartbeat with the signing key stored yet; publishing events anyway (central may not know the key)");
                }
            }
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
            next = rx.recv(), if open && pending.len() < window => Step::Next(next.map(|o| o.signed(&signer))),
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
            // "No responders" also answers a publish while a clustered stream elects a new
            // leader: fall back to core NATS only when JetStream says there is no stream, else
            // the event is re-sent like any unacknowledged one (it was lost from the stream).
            Step::Ack(Err(e))
                if e.kind() == PublishErrorKind::StreamNotFound && no_stream(&l.js).await =>
            {
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

/// Whether JetStream answers that `BENCH_EVENTS` does not exist (no answer within 2 s, or a
/// failed question, is not one: the caller re-sends).
async fn no_stream(js: &jetstream::Context) -> bool {
    match tokio::time::timeout(
        Duration::from_secs(2),
        js.get_stream(subjects::EVENTS_STREAM),
    )
    .await
    {
        Ok(Err(e)) => matches!(
            e.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        ),
        _ => false,
    }
}

async fn pause(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/bench-race/m.signing.nk");
        let first = Signer::from_file(&path).unwrap();
        assert!(first.public_key().starts_with('U'));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Signer::from_file(&path).unwrap();
        assert_eq!(
            again.public_key(),
            first.public_key(),
            "stable across restarts"
        );
        assert_eq!(again.source(), &KeySource::File(path.clone()));
        std::fs::write(&path, "not a seed").unwrap();
        assert!(matches!(
            Signer::from_file(&path),
            Err(SignerError::NotASeed { .. })
        ));
    }

    #[test]
    fn the_nkey_signs_when_there_is_one_and_the_signature_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let nkey = nkeys::KeyPair::new_user();
        let seed_file = dir.path().join("a.nk");
        std::fs::write(&seed_file, nkey.seed().unwrap()).unwrap();
        let yaml = format!(
            "machine_id: a\nengine: mock\nnats: {{nkey_seed_file: \"{}\"}}\n",
            seed_file.display()
        );
        let cfg =
            crate::config::Config::parse(&yaml, Path::new("a.yaml"), &Default::default()).unwrap();
        let signer = Signer::load(&cfg).unwrap();
        assert_eq!(signer.public_key(), nkey.public_key());
        assert_eq!(signer.source(), &KeySource::Nkey(seed_file));
        let signed = || {
            Outgoing {
                subject: Subject::from("bench.events.j"),
                msg_id: "j.a.b-1.1".into(),
                headers: HeaderMap::new(),
                payload: Bytes::from_static(br#"{"job_id":"j"}"#),
            }
            .signed(&signer)
        };
        let event = signed();
        let sig = event
            .headers
            .get(subjects::SIGNATURE_HEADER)
            .expect("signed")
            .as_str();
        let raw = data_encoding::BASE64URL_NOPAD
            .decode(sig.as_bytes())
            .unwrap();
        nkeys::KeyPair::from_public_key(signer.public_key())
            .unwrap()
            .verify(&event.payload, &raw)
            .expect("verifies");
        // And names its key for central: the 8 characters after the 'U'.
        let id = event.headers.get(subjects::KEY_HEADER).expect("key id");
        assert_eq!(id.as_str(), &signer.public_key()[1..9]);
        // Its message id ends with the signature's start: the same for a copy of the same
        // bytes (a retry is still dropped as one), unknown to anyone without the key.
        let want = format!("j.a.b-1.1.{}", &sig[..subjects::MSG_ID_SIG_CHARS]);
        let ids: Vec<_> = event.headers.get_all("Nats-Msg-Id").collect();
        assert_eq!(ids.len(), 1, "one message id");
        assert_eq!(ids[0].as_str(), want);
        assert_eq!(event.msg_id, want);
        assert_eq!(signed().msg_id, want);
        // No nkey and nowhere to keep a key (no HOME in the environment): a key per process.
        let cfg = crate::config::Config::parse(
            "machine_id: a\nengine: mock\n",
            Path::new("a.yaml"),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(cfg.signing_key_file, None);
        assert_eq!(Signer::load(&cfg).unwrap().source(), &KeySource::Ephemeral);
        let env = [("HOME".to_string(), "/home/u".to_string())].into();
        let cfg = crate::config::Config::parse(
            "machine_id: a\nengine: mock\n",
            Path::new("a.yaml"),
            &env,
        )
        .unwrap();
        assert_eq!(
            cfg.signing_key_file.as_deref(),
            Some(Path::new("/home/u/.local/state/bench-race/a.signing.nk"))
        );
        assert!(!cfg.signing_key_file_set);
    }
}
