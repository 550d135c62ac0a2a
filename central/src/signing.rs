//! Results no agent can forge: every event an agent publishes carries `Bench-Sig`, the ed25519
//! signature by its nkey over the exact payload bytes ([`subjects::SIGNATURE_HEADER`]). Central
//! learns a machine's public keys only from its registry entry (`AgentInfo.signing_key` in
//! `bench_agents`, a key that under `nats/conf/auth.conf` only that agent can write), keeps the
//! last [`MAX_KEYS`] per machine in memory (parsed once) and in its own `bench_keys` bucket (no
//! agent may write it), so that events replayed after a restart while the agent is offline
//! still verify.
//!
//! An event naming machine M, stored when central already knew a key for M, must verify under
//! one of M's keys or it is forged: counted, logged, skipped (never applied, never sent to a
//! browser, never replayed) and acknowledged with its batch. An event of a machine with no
//! known key is accepted under `signatures: verify` (the default: hand-made events keep
//! working; counted as unsigned) and refused under `signatures: require`.
//!
//! A key an agent started using a moment ago may not have reached the registry watch yet: an
//! event that fails is checked once more after reading M's entry straight from `bench_agents`
//! (at most once a second per machine, [`REFRESHES_PER_S`] in all). The agent stores a
//! heartbeat with its key before its first event, so that read always finds it.
//!
//! Cost: an ed25519 verification is ~40x central's own work on an event, so it is bounded. An
//! agent names the key it signed with ([`subjects::KEY_HEADER`], [`key_id`]): central verifies
//! under that key only, and a named key the machine never announced is refused without any
//! verification; only an event without the header (agents before it) is tried under every key.
//! Ingestion and replay check a batch at a time ([`Keys::check_batch`]): one ed25519 batch
//! verification per [`CHUNK_MAX`] events, chunks beyond [`INLINE_MAX`] events on blocking
//! threads (in parallel, and no runtime worker blocked for long); a chunk that fails as a whole
//! is verified event by event, so one forged event costs its chunk one more pass.

use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderName};
use bench_schemas::{subjects, AgentInfo};
use bytes::Bytes;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Central's bucket of every machine's keys (key = machine_id, value [`StoredKeys`]).
pub const KEYS_BUCKET: &str = subjects::KEYS_BUCKET;
/// Keys remembered per machine (newest first): a key rotated out more than this many times ago
/// no longer verifies its old events.
pub const MAX_KEYS: usize = 8;
/// A machine's entry is read back from `bench_agents` at most this often for failing events.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Most such reads in any one second, whatever the machines (a flood of forged events naming
/// made-up machines must not turn into a flood of KV reads).
pub const REFRESHES_PER_S: u32 = 20;
/// Bytes of an ed25519 signature.
const SIG_LEN: usize = 64;
/// Characters of a key's id in [`subjects::KEY_HEADER`] (after the key's leading `U`): 37 bits
/// of the key, enough to tell a machine's [`MAX_KEYS`] keys apart.
pub const KEY_ID_LEN: usize = 8;
/// Signatures of a batch verified on the calling (runtime) thread: up to ~0.3 ms of work.
pub const INLINE_MAX: usize = 16;
/// Most signatures in one batch verification, all of one machine: a forged event makes its
/// chunk be verified once more, one by one, so this bounds what one forgery costs.
pub const CHUNK_MAX: usize = 64;
/// After a refused event, a machine's events are verified one by one (no batch to fail and
/// redo) for this long: a forger who keeps sending gets one verification per forged event.
const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// The id of a public key (`U...`) that [`subjects::KEY_HEADER`] carries: its [`KEY_ID_LEN`]
/// characters after the `U` ("" for a string too short to be a key).
pub fn key_id(public_key: &str) -> &str {
    public_key.get(1..1 + KEY_ID_LEN).unwrap_or("")
}

/// `signatures:` in `machines.yaml` (`CENTRAL_SIGNATURES`).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SignatureMode {
    /// Events of a machine with known keys must be signed by one; events of a machine with no
    /// known key are accepted (counted as unsigned).
    #[default]
    Verify,
    /// Every event must be signed by a key central knows for its machine.
    Require,
}

impl SignatureMode {
    /// From its name (`verify`, `require`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "verify" => Some(Self::Verify),
            "require" => Some(Self::Require),
            _ => None,
        }
    }
}

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// No `Bench-Sig` header, while keys are known for the machine.
    NoSignature,
    /// A header that is not 64 bytes of base64url.
    Malformed,
    /// It verifies under none of the machine's keys.
    BadSignature,
    /// Its `Bench-Key` names no key of the machine (refused unverified).
    UnknownKey,
    /// `signatures: require` and no key is known for the machine.
    UnknownMachine,
}

impl Forgery {
    /// For the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSignature => "missing signature",
            Self::Malformed => "malformed signature",
            Self::BadSignature => "bad signature (none of the machine's keys)",
            Self::UnknownKey => "signed by a key the machine never announced (Bench-Key)",
            Self::UnknownMachine => "no key known for the machine (signatures: require)",
        }
    }
}

/// What the check says about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by one of its machine's keys.
    Signed,
    /// No key known for its machine (`signatures: verify`): accepted unchecked.
    Unsigned,
    /// Refused.
    Forged(Forgery),
}

/// A machine's value in `bench_keys`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct StoredKeys {
    /// Server time (unix ms) of the registry entry that brought the first key central ever saw
    /// for the machine. Events stored before it are judged as of a machine with no key (so an
    /// upgrade does not hide the unsigned events of older jobs), events stored after it must be
    /// signed; it never moves forward, even when old keys are dropped.
    pub since_ms: u64,
    /// Public keys (`U...`), newest first, at most [`MAX_KEYS`].
    pub keys: Vec<String>,
}

/// One machine's keys, parsed.
#[derive(Clone)]
struct Known {
    since_ms: u64,
    /// Newest first.
    keys: Vec<(String, VerifyingKey)>,
    /// Until when (ms of [`mono_ms`]) its events are not batch-verified: one was refused.
    suspect_until: Arc<AtomicU64>,
}

/// Ms since this process first asked (a monotonic clock for [`Known::suspect_until`]).
fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What an event needs before (or instead of) a signature verification.
enum Step {
    /// Decided without one.
    Done(Verdict),
    /// Verify under this key (the hinted one, or a machine's only key).
    One(VerifyingKey, Signature),
    /// No hint: verify under any of the machine's keys.
    Any(Signature),
}

/// One event of a batch, owned, so that it can be verified on a blocking thread.
struct Job {
    at: usize,
    known: Arc<Known>,
    step: StepOwned,
    payload: Bytes,
}

enum StepOwned {
    One(VerifyingKey, Signature),
    Any(Signature),
}

/// One event to check with [`Keys::check_batch`] (what [`Keys::check`] takes).
#[derive(Clone, Copy)]
pub struct Item<'a> {
    /// The machine it names.
    pub machine: &'a str,
    /// The exact payload.
    pub payload: &'a Bytes,
    /// Its headers.
    pub headers: Option<&'a HeaderMap>,
    /// The stream's time for it (unix ms).
    pub stored_ms: u64,
}

#[cfg(test)]
thread_local! {
    /// Single verifications made on this thread (tests count them).
    static VERIFIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn verify_one(key: &VerifyingKey, payload: &[u8], sig: &Signature) -> bool {
    #[cfg(test)]
    VERIFIED.with(|n| n.set(n.get() + 1));
    key.verify(payload, sig).is_ok()
}

fn signed_if(ok: bool) -> Verdict {
    if ok {
        Verdict::Signed
    } else {
        Verdict::Forged(Forgery::BadSignature)
    }
}

impl Job {
    fn verify(&self) -> bool {
        match &self.step {
            StepOwned::One(key, sig) => verify_one(key, &self.payload, sig),
            StepOwned::Any(sig) => self
                .known
                .keys
                .iter()
                .any(|(_, k)| verify_one(k, &self.payload, sig)),
        }
    }
}

/// `(job, verified)` for the jobs of each unit (a range of `order`, indexes of `jobs`).
fn verify_units(
    jobs: &[Job],
    order: &[usize],
    units: &[std::ops::Range<usize>],
) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    for u in units {
        let unit: Vec<&Job> = order[u.clone()].iter().map(|&k| &jobs[k]).collect();
        out.extend(order[u.clone()].iter().copied().zip(verify_jobs(&unit)));
    }
    out
}

/// Whether each job's signature verifies: one batch verification for the one-key jobs, and
/// one by one when that fails (to find the bad ones) and for the jobs of any key.
fn verify_jobs(jobs: &[&Job]) -> Vec<bool> {
    let mut msgs = Vec::with_capacity(jobs.len());
    let mut sigs = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    for j in jobs {
        if let StepOwned::One(k, s) = &j.step {
            msgs.push(&j.payload[..]);
            sigs.push(*s);
            keys.push(*k);
        }
    }
    let batch_ok = msgs.len() > 1 && ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok();
    jobs.iter()
        .map(|j| (batch_ok && matches!(j.step, StepOwned::One(..))) || j.verify())
        .collect()
}

impl Known {
    fn stored(&self) -> StoredKeys {
        StoredKeys {
            since_ms: self.since_ms,
            keys: self.keys.iter().map(|(k, _)| k.clone()).collect(),
        }
    }
}

/// Rate limit of the reads of `bench_agents` for failing events.
#[derive(Default)]
struct Refreshes {
    window: Option<Instant>,
    in_window: u32,
    last: HashMap<String, Instant>,
}

/// Every machine's known keys, and the check.
pub struct Keys {
    require: AtomicBool,
    machines: RwLock<HashMap<String, Arc<Known>>>,
    // Behind a Mutex, not a OnceLock: a kv::Store is Send but not Sync, and these are cloned
    // out before any await.
    store: Mutex<Option<kv::Store>>,
    agents: Mutex<Option<kv::Store>>,
    dirty: Mutex<HashSet<String>>,
    wake: Notify,
    refreshes: Mutex<Refreshes>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("mode", &self.mode())
            .field("machines", &self.machines.read().expect("keys lock").len())
            .finish()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(SignatureMode::default())
    }
}

/// A user public key, parsed (None for anything else).
fn parse_key(key: &str) -> Option<VerifyingKey> {
    nkeys::KeyPair::from_public_key(key)
        .ok()
        .filter(|k| k.key_pair_type() == nkeys::KeyPairType::User)?;
    let (_, raw) = nkeys::from_public_key(key).ok()?;
    VerifyingKey::from_bytes(&raw).ok()
}

impl Keys {
    /// No keys yet, nothing stored (see [`Self::open`]).
    pub fn new(mode: SignatureMode) -> Self {
        Self {
            require: AtomicBool::new(mode == SignatureMode::Require),
            machines: RwLock::default(),
            store: Mutex::default(),
            agents: Mutex::default(),
            dirty: Mutex::default(),
            wake: Notify::new(),
            refreshes: Mutex::default(),
        }
    }

    /// The mode in force.
    pub fn mode(&self) -> SignatureMode {
        if self.require.load(Ordering::Relaxed) {
            SignatureMode::Require
        } else {
            SignatureMode::Verify
        }
    }

    /// Start-up: sets the mode, creates `bench_keys` (with as many replicas as `agents`, the
    /// bucket the keys come from), loads every machine's keys from it and starts the task that
    /// stores newly learned keys (until `shutdown`). `agents` is also where a failing event's
    /// machine is looked up again.
    pub async fn open(
        self: &Arc<Self>,
        js: &jetstream::Context,
        agents: &kv::Store,
        mode: SignatureMode,
        shutdown: CancellationToken,
    ) -> Result<usize, async_nats::Error> {
        self.require
            .store(mode == SignatureMode::Require, Ordering::Relaxed);
        let store = match js.get_key_value(KEYS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => {
                let replicas = match js.get_stream(&agents.stream_name).await {
                    Ok(mut s) => s.info().await.map(|i| i.config.num_replicas).unwrap_or(1),
                    Err(_) => 1,
                };
                js.create_key_value(kv::Config {
                    bucket: KEYS_BUCKET.to_string(),
                    description: "bench-race: signing keys seen per machine (central's only)"
                        .into(),
                    history: 1,
                    num_replicas: replicas.max(1),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await?
            }
        };
        let mut n = 0;
        let mut names = store.keys().await?;
        while let Some(machine) = names.next().await {
            let machine = machine?;
            let Some(value) = store.get(&machine).await? else {
                continue;
            };
            match serde_json::from_slice::<StoredKeys>(&value) {
                Ok(s) => {
                    self.merge_stored(&machine, &s);
                    n += 1;
                }
                Err(e) => tracing::warn!(%machine, error = %e, "unreadable {KEYS_BUCKET} entry"),
            }
        }
        *self.agents.lock().expect("agents lock") = Some(agents.clone());
        let first = self
            .store
            .lock()
            .expect("store lock")
            .replace(store.clone());
        if first.is_none() {
            tokio::spawn(self.clone().write_loop(store, shutdown));
        }
        // Keys learned before the bucket was open (the registry loaded first) are stored now.
        self.wake.notify_one();
        Ok(n)
    }

    fn merge_stored(&self, machine: &str, s: &StoredKeys) {
        let mut machines = self.machines.write().expect("keys lock");
        let mut known = machines
            .get(machine)
            .map(|k| (**k).clone())
            .unwrap_or(Known {
                since_ms: s.since_ms,
                keys: Vec::new(),
                suspect_until: Arc::default(),
            });
        known.since_ms = known.since_ms.min(s.since_ms);
        for key in &s.keys {
            if known.keys.len() >= MAX_KEYS {
                break;
            }
            if known.keys.iter().any(|(k, _)| k == key) {
                continue;
            }
            if let Some(pair) = parse_key(key) {
                known.keys.push((key.clone(), pair));
            }
        }
        if !known.keys.is_empty() {
            machines.insert(machine.to_string(), Arc::new(known));
        }
    }

    /// A key seen in `machine`'s registry entry (stored at server time `seen_ms`). Costs a map
    /// look-up when it is the machine's newest key already (every heartbeat).
    pub fn learn(&self, machine: &str, key: &str, seen_ms: u64) {
        if let Some(k) = self.machines.read().expect("keys lock").get(machine) {
            if k.keys.first().is_some_and(|(newest, _)| newest == key) {
                return;
            }
        }
        let Some(pair) = parse_key(key) else {
            tracing::warn!(%machine, key, "registry entry with a signing key that is not an nkey user key; ignored");
            return;
        };
        {
            let mut machines = self.machines.write().expect("keys lock");
            let mut known = machines
                .get(machine)
                .map(|k| (**k).clone())
                .unwrap_or(Known {
                    since_ms: seen_ms,
                    keys: Vec::new(),
                    suspect_until: Arc::default(),
                });
            known.keys.retain(|(k, _)| k != key);
            known.keys.insert(0, (key.to_string(), pair));
            known.keys.truncate(MAX_KEYS);
            let first = known.keys.len() == 1;
            machines.insert(machine.to_string(), Arc::new(known));
            tracing::info!(%machine, key, first, "signing key learned from the registry");
        }
        self.dirty
            .lock()
            .expect("dirty lock")
            .insert(machine.to_string());
        self.wake.notify_one();
    }

    /// The keys known for `machine` (newest first) and since when.
    pub fn stored(&self, machine: &str) -> Option<StoredKeys> {
        self.machines
            .read()
            .expect("keys lock")
            .get(machine)
            .map(|k| k.stored())
    }

    /// What `unknown` machines get in the mode in force.
    fn unknown(&self) -> Verdict {
        match self.mode() {
            SignatureMode::Verify => Verdict::Unsigned,
            SignatureMode::Require => Verdict::Forged(Forgery::UnknownMachine),
        }
    }

    /// Everything before the signature verification: the machine's keys, the signature decoded
    /// (on the stack) and the key its hint names. None: no key is known for the machine.
    fn prepare(&self, machine: &str, headers: Option<&HeaderMap>) -> Option<(Arc<Known>, Step)> {
        let known = self
            .machines
            .read()
            .expect("keys lock")
            .get(machine)
            .cloned()?;
        let Some(sig) =
            headers.and_then(|h| h.get(HeaderName::from_static(subjects::SIGNATURE_HEADER)))
        else {
            return Some((known, Step::Done(Verdict::Forged(Forgery::NoSignature))));
        };
        let sig = sig.as_str().as_bytes();
        let mut raw = [0u8; SIG_LEN];
        let enc = data_encoding::BASE64URL_NOPAD;
        if enc.decode_len(sig.len()) != Ok(SIG_LEN) || enc.decode_mut(sig, &mut raw).is_err() {
            return Some((known, Step::Done(Verdict::Forged(Forgery::Malformed))));
        }
        let sig = Signature::from_bytes(&raw);
        let hint = headers.and_then(|h| h.get(HeaderName::from_static(subjects::KEY_HEADER)));
        let step = match hint {
            // The newest key of that id (two of a machine's keys sharing 37 bits: the older
            // one's events no longer verify; never more than one verification).
            Some(id) => match known.keys.iter().find(|(k, _)| key_id(k) == id.as_str()) {
                Some((_, key)) => Step::One(*key, sig),
                None => Step::Done(Verdict::Forged(Forgery::UnknownKey)),
            },
            None if known.keys.len() == 1 => Step::One(known.keys[0].1, sig),
            None => Step::Any(sig),
        };
        Some((known, step))
    }

    /// A verdict on an event stored at `stored_ms`, given the machine's keys.
    fn judged(&self, verdict: Verdict, known: &Known, stored_ms: u64) -> Verdict {
        // Stored before central knew any key of the machine: judged as then (a good signature
        // still counts).
        if verdict != Verdict::Signed && stored_ms < known.since_ms {
            return self.unknown();
        }
        verdict
    }

    /// Checks one event's payload and headers (`stored_ms`: the stream's time for it) without
    /// any I/O: at most one ed25519 verification when it names its key (`Bench-Key`), none
    /// when that names no key of the machine. O(1) in the number of machines; no allocation.
    pub fn verify(
        &self,
        machine: &str,
        payload: &[u8],
        headers: Option<&HeaderMap>,
        stored_ms: u64,
    ) -> Verdict {
        let Some((known, step)) = self.prepare(machine, headers) else {
            return self.unknown();
        };
        let verdict = match step {
            Step::Done(v) => v,
            Step::One(key, sig) => signed_if(verify_one(&key, payload, &sig)),
            Step::Any(sig) => {
                signed_if(known.keys.iter().any(|(_, k)| verify_one(k, payload, &sig)))
            }
        };
        self.judged(verdict, &known, stored_ms)
    }

    /// [`Self::verify`], and for an event it refuses for want of a key, once more after reading
    /// the machine's registry entry straight from `bench_agents` (rate-limited).
    pub async fn check(
        &self,
        machine: &str,
        payload: &[u8],
        headers: Option<&HeaderMap>,
        stored_ms: u64,
    ) -> Verdict {
        let verdict = self.verify(machine, payload, headers, stored_ms);
        self.recheck(verdict, machine, payload, headers, stored_ms)
            .await
    }

    /// [`Self::check`] of every item, in order, with the signatures verified together: ed25519
    /// batch verification per chunk of at most [`CHUNK_MAX`], one by one in a chunk that fails;
    /// up to [`INLINE_MAX`] signatures on this thread, more split over blocking threads.
    pub async fn check_batch(&self, items: &[Item<'_>]) -> Vec<Verdict> {
        let mut verdicts = Vec::with_capacity(items.len());
        let mut jobs = Vec::new();
        for (at, item) in items.iter().enumerate() {
            let Some((known, step)) = self.prepare(item.machine, item.headers) else {
                verdicts.push(self.unknown());
                continue;
            };
            let step = match step {
                Step::Done(v) => {
                    verdicts.push(self.judged(v, &known, item.stored_ms));
                    continue;
                }
                Step::One(k, s) => StepOwned::One(k, s),
                Step::Any(s) => StepOwned::Any(s),
            };
            // Decided below.
            verdicts.push(Verdict::Signed);
            jobs.push(Job {
                at,
                known,
                step,
                payload: item.payload.clone(),
            });
        }
        // Units of one batch verification: a machine's events (a failure redoes only its own),
        // at most CHUNK_MAX; one event each for a machine under suspicion. Ranges of `order`.
        let now = mono_ms();
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by_key(|&k| Arc::as_ptr(&jobs[k].known) as usize);
        let mut units: Vec<std::ops::Range<usize>> = Vec::new();
        for (at, &k) in order.iter().enumerate() {
            let known = &jobs[k].known;
            let batchable = known.suspect_until.load(Ordering::Relaxed) <= now;
            match units.last_mut() {
                Some(u)
                    if batchable
                        && u.len() < CHUNK_MAX
                        && Arc::ptr_eq(&jobs[order[u.start]].known, known) =>
                {
                    u.end = at + 1
                }
                _ => units.push(at..at + 1),
            }
        }
        let (jobs, order, units) = (Arc::new(jobs), Arc::new(order), Arc::new(units));
        let ok: Vec<(usize, bool)> = if jobs.len() <= INLINE_MAX {
            verify_units(&jobs, &order, &units)
        } else {
            // Units packed into tasks of about an equal share per core.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let share = jobs.len().div_ceil(threads).clamp(INLINE_MAX, CHUNK_MAX);
            let mut tasks: Vec<std::ops::Range<usize>> = Vec::new();
            let mut in_task = share;
            for (i, u) in units.iter().enumerate() {
                if in_task >= share {
                    tasks.push(i..i);
                    in_task = 0;
                }
                in_task += u.len();
                tasks.last_mut().expect("a task").end = i + 1;
            }
            let running: Vec<_> = tasks
                .into_iter()
                .map(|t| {
                    let (jobs, order, units) = (jobs.clone(), order.clone(), units.clone());
                    let mine = t.clone();
                    let task =
                        tokio::task::spawn_blocking(move || verify_units(&jobs, &order, &units[t]));
                    (mine, task)
                })
                .collect();
            let mut ok = Vec::with_capacity(jobs.len());
            for (t, task) in running {
                match task.await {
                    Ok(v) => ok.extend(v),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // The runtime is shutting down: still no event is refused unchecked.
                    Err(_) => ok.extend(verify_units(&jobs, &order, &units[t])),
                }
            }
            ok
        };
        let until = now + SUSPECT_FOR.as_millis() as u64;
        for (k, ok) in ok {
            let job = &jobs[k];
            if !ok {
                job.known.suspect_until.store(until, Ordering::Relaxed);
            }
            verdicts[job.at] = self.judged(signed_if(ok), &job.known, items[job.at].stored_ms);
        }
        for (item, verdict) in items.iter().zip(verdicts.iter_mut()) {
            *verdict = self
                .recheck(
                    *verdict,
                    item.machine,
                    item.payload,
                    item.headers,
                    item.stored_ms,
                )
                .await;
        }
        verdicts
    }

    /// `verdict` as it stands, or for an event refused for want of a key, the verdict after
    /// reading the machine's registry entry again (rate-limited).
    async fn recheck(
        &self,
        verdict: Verdict,
        machine: &str,
        payload: &[u8],
        headers: Option<&HeaderMap>,
        stored_ms: u64,
    ) -> Verdict {
        let may_be_new_key = matches!(
            verdict,
            Verdict::Forged(Forgery::BadSignature | Forgery::UnknownKey | Forgery::UnknownMachine)
        );
        if !may_be_new_key || !self.refresh_allowed(machine) {
            return verdict;
        }
        let Some(agents) = self.agents.lock().expect("agents lock").clone() else {
            return verdict;
        };
        match tokio::time::timeout(Duration::from_secs(2), agents.entry(machine)).await {
            Ok(Ok(Some(entry))) if entry.operation == kv::Operation::Put => {
                if let Ok(info) = serde_json::from_slice::<AgentInfo>(&entry.value) {
                    if let Some(key) = &info.signing_key {
                        let seen_ms =
                            (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                        self.learn(machine, key, seen_ms);
                        return self.verify(machine, payload, headers, stored_ms);
                    }
                }
                verdict
            }
            Ok(Err(e)) => {
                tracing::debug!(%machine, error = %e, "registry entry not read");
                verdict
            }
            _ => verdict,
        }
    }

    fn refresh_allowed(&self, machine: &str) -> bool {
        let now = Instant::now();
        let mut r = self.refreshes.lock().expect("refresh lock");
        if r.window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            r.window = Some(now);
            r.in_window = 0;
            // Bounded: only machines refreshed within the last REFRESH_EVERY matter.
            r.last.retain(|_, t| now.duration_since(*t) < REFRESH_EVERY);
        }
        if r.in_window >= REFRESHES_PER_S {
            return false;
        }
        if r.last
            .get(machine)
            .is_some_and(|t| now.duration_since(*t) < REFRESH_EVERY)
        {
            return false;
        }
        r.in_window += 1;
        r.last.insert(machine.to_string(), now);
        true
    }

    /// Stores the machines whose keys changed, merging with what another central may have
    /// stored meanwhile (compare-and-set).
    async fn write_loop(self: Arc<Self>, store: kv::Store, shutdown: CancellationToken) {
        loop {
            let machines: Vec<String> =
                std::mem::take(&mut *self.dirty.lock().expect("dirty lock"))
                    .into_iter()
                    .collect();
            for machine in machines {
                let Some(mine) = self.stored(&machine) else {
                    continue;
                };
                if let Err(e) = persist(&store, &machine, &mine).await {
                    tracing::warn!(%machine, error = %e, "signing keys not stored; will retry");
                    self.dirty.lock().expect("dirty lock").insert(machine);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// `mine` merged into the machine's stored value: mine first, then the stored keys not among
/// them, at most [`MAX_KEYS`]; the earlier `since_ms`.
pub fn merged(mine: &StoredKeys, theirs: &StoredKeys) -> StoredKeys {
    let mut keys = mine.keys.clone();
    for k in &theirs.keys {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    keys.truncate(MAX_KEYS);
    let since_ms = match (mine.keys.is_empty(), theirs.keys.is_empty()) {
        (false, false) => mine.since_ms.min(theirs.since_ms),
        (true, _) => theirs.since_ms,
        (false, true) => mine.since_ms,
    };
    StoredKeys { since_ms, keys }
}

async fn persist(
    store: &kv::Store,
    machine: &str,
    mine: &StoredKeys,
) -> Result<(), async_nats::Error> {
    for _ in 0..5 {
        let current = store.entry(machine).await?;
        let (theirs, revision) = match &current {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice::<StoredKeys>(&e.value).unwrap_or_default(),
                Some(e.revision),
            ),
            Some(e) => (StoredKeys::default(), Some(e.revision)),
            None => (StoredKeys::default(), None),
        };
        let value = merged(mine, &theirs);
        if current.is_some() && value == theirs {
            return Ok(());
        }
        let body = serde_json::to_vec(&value)?;
        let written: Result<(), async_nats::Error> = match revision {
            Some(rev) => store
                .update(machine, body.into(), rev)
                .await
                .map(|_| ())
                .map_err(Into::into),
            None => store
                .create(machine, body.into())
                .await
                .map(|_| ())
                .map_err(Into::into),
        };
        match written {
            Ok(()) => return Ok(()),
            // Another central wrote first: merge with its value.
            Err(e) => {
                tracing::debug!(%machine, error = %e, "signing keys changed meanwhile; merging again")
            }
        }
    }
    Err("signing keys kept changing under this central".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(machine: &str) -> Vec<u8> {
        format!(r#"{{"job_id":"j","machine_id":"{machine}","run_id":"b-1","seq":1,"ts_ms":1,"type":"job_cancelled","payload":{{"reason":"x"}}}}"#).into_bytes()
    }

    fn signed(kp: &nkeys::KeyPair, payload: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        let sig = data_encoding::BASE64URL_NOPAD.encode(&kp.sign(payload).unwrap());
        h.insert(subjects::SIGNATURE_HEADER, sig.as_str());
        h
    }

    #[test]
    fn valid_tampered_foreign_and_unknown() {
        let (a, b) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
        let keys = Keys::new(SignatureMode::Verify);
        keys.learn("a", &a.public_key(), 1000);
        keys.learn("b", &b.public_key(), 1000);
        let p = event("a");
        let h = signed(&a, &p);
        assert_eq!(keys.verify("a", &p, Some(&h), 2000), Verdict::Signed);
        // One byte changed: the signature no longer fits.
        let mut tampered = p.clone();
        let at = tampered.len() - 4;
        tampered[at] = b'y';
        assert_eq!(
            keys.verify("a", &tampered, Some(&h), 2000),
            Verdict::Forged(Forgery::BadSignature)
        );
        // A's event, or one naming B signed by A: A's key is not B's.
        let pb = event("b");
        assert_eq!(
            keys.verify("b", &pb, Some(&signed(&a, &pb)), 2000),
            Verdict::Forged(Forgery::BadSignature)
        );
        assert_eq!(
            keys.verify("b", &p, Some(&h), 2000),
            Verdict::Forged(Forgery::BadSignature)
        );
        assert_eq!(
            keys.verify("b", &pb, None, 2000),
            Verdict::Forged(Forgery::NoSignature)
        );
        let mut junk = HeaderMap::new();
        junk.insert(subjects::SIGNATURE_HEADER, "not base64!");
        assert_eq!(
            keys.verify("b", &pb, Some(&junk), 2000),
            Verdict::Forged(Forgery::Malformed)
        );
        // Stored before central knew any key of b: judged as of an unknown machine.
        assert_eq!(keys.verify("b", &pb, None, 999), Verdict::Unsigned);
        // Unknown machine: verify accepts (unsigned), require refuses.
        let pc = event("c");
        assert_eq!(keys.verify("c", &pc, None, 2000), Verdict::Unsigned);
        assert_eq!(
            keys.verify("c", &pc, Some(&signed(&a, &pc)), 2000),
            Verdict::Unsigned
        );
        let strict = Keys::new(SignatureMode::Require);
        assert_eq!(
            strict.verify("c", &pc, None, 2000),
            Verdict::Forged(Forgery::UnknownMachine)
        );
        strict.learn("a", &a.public_key(), 1000);
        assert_eq!(strict.verify("a", &p, Some(&h), 2000), Verdict::Signed);
        assert_eq!(
            strict.verify("a", &p, Some(&h), 10),
            Verdict::Signed,
            "a good signature counts whenever it was stored"
        );
        assert_eq!(
            strict.verify("a", &p, None, 10),
            Verdict::Forged(Forgery::UnknownMachine),
            "require: no key known then means no key"
        );
    }

    /// Signed as the agent signs (its `Signer`): `Bench-Sig` and `Bench-Key`.
    fn agent_signed(signer: &bench_agent::publisher::Signer, payload: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            subjects::SIGNATURE_HEADER,
            signer.signature(payload).as_str(),
        );
        h.insert(subjects::KEY_HEADER, signer.key_id());
        h
    }

    /// Verdict and the single verifications it took.
    fn counted(keys: &Keys, machine: &str, p: &[u8], h: Option<&HeaderMap>) -> (Verdict, usize) {
        let before = VERIFIED.with(|n| n.get());
        let v = keys.verify(machine, p, h, 2000);
        (v, VERIFIED.with(|n| n.get()) - before)
    }

    #[test]
    fn the_key_hint_picks_one_key_and_an_unknown_one_costs_nothing() {
        let old = bench_agent::publisher::Signer::ephemeral();
        let new = bench_agent::publisher::Signer::ephemeral();
        assert_eq!(
            old.key_id(),
            key_id(old.public_key()),
            "agent and central agree"
        );
        assert_eq!(old.key_id().len(), KEY_ID_LEN);
        let keys = Keys::default();
        keys.learn("m", old.public_key(), 1000);
        keys.learn("m", new.public_key(), 1000);
        let p = event("m");
        // The oldest key, named: one verification (not one per key).
        let h = agent_signed(&old, &p);
        assert_eq!(counted(&keys, "m", &p, Some(&h)), (Verdict::Signed, 1));
        // Named wrongly: only the named key is tried, although the other would verify.
        let mut wrong = h.clone();
        wrong.insert(subjects::KEY_HEADER, new.key_id());
        assert_eq!(
            counted(&keys, "m", &p, Some(&wrong)),
            (Verdict::Forged(Forgery::BadSignature), 1)
        );
        // A key the machine never announced: refused without any verification.
        let forger = bench_agent::publisher::Signer::ephemeral();
        assert_eq!(
            counted(&keys, "m", &p, Some(&agent_signed(&forger, &p))),
            (Verdict::Forged(Forgery::UnknownKey), 0)
        );
        // No hint (an agent before it): every key is tried, newest first.
        let mut bare = HeaderMap::new();
        bare.insert(subjects::SIGNATURE_HEADER, old.signature(&p).as_str());
        assert_eq!(counted(&keys, "m", &p, Some(&bare)), (Verdict::Signed, 2));
        let mut bare_forged = HeaderMap::new();
        bare_forged.insert(subjects::SIGNATURE_HEADER, forger.signature(&p).as_str());
        assert_eq!(
            counted(&keys, "m", &p, Some(&bare_forged)),
            (Verdict::Forged(Forgery::BadSignature), 2)
        );
        // Stored before central knew a key: still judged as of a machine without one.
        assert_eq!(
            keys.verify("m", &p, Some(&agent_signed(&forger, &p)), 999),
            Verdict::Unsigned
        );
    }

    /// A batch of `n` signed events of machine "m" by `signer`, and their headers.
    fn batch_of(
        signer: &bench_agent::publisher::Signer,
        n: usize,
    ) -> (Vec<Bytes>, Vec<Option<HeaderMap>>) {
        let payloads: Vec<Bytes> = (0..n)
            .map(|i| {
                Bytes::from(
                    String::from_utf8(event("m"))
                        .unwrap()
                        .replace(r#""seq":1"#, &format!(r#""seq":{i}"#)),
                )
            })
            .collect();
        let headers = payloads
            .iter()
            .map(|p| Some(agent_signed(signer, p)))
            .collect();
        (payloads, headers)
    }

    fn items<'a>(payloads: &'a [Bytes], headers: &'a [Option<HeaderMap>]) -> Vec<Item<'a>> {
        payloads
            .iter()
            .zip(headers)
            .map(|(p, h)| Item {
                machine: "m",
                payload: p,
                headers: h.as_ref(),
                stored_ms: 2000,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_refuses_only_its_forged_events_in_order() {
        let agent = bench_agent::publisher::Signer::ephemeral();
        let forger = bench_agent::publisher::Signer::ephemeral();
        let keys = Keys::default();
        keys.learn("m", agent.public_key(), 1000);
        // Inline (a few events) and over blocking threads (several chunks).
        for n in [5, INLINE_MAX + 1, 3 * CHUNK_MAX + 7] {
            let (payloads, mut headers) = batch_of(&agent, n);
            let all = keys.check_batch(&items(&payloads, &headers)).await;
            assert!(all.iter().all(|v| *v == Verdict::Signed), "{n}: {all:?}");
            // One in the middle signed by another key under the agent's key id.
            let mid = n / 2;
            let mut forged = agent_signed(&forger, &payloads[mid]);
            forged.insert(subjects::KEY_HEADER, agent.key_id());
            headers[mid] = Some(forged);
            // Others: without a signature, and an agent's event without a key id.
            headers[0] = None;
            let mut bare = HeaderMap::new();
            bare.insert(
                subjects::SIGNATURE_HEADER,
                agent.signature(&payloads[n - 1]).as_str(),
            );
            headers[n - 1] = Some(bare);
            let got = keys.check_batch(&items(&payloads, &headers)).await;
            let want: Vec<Verdict> = (0..n)
                .map(|i| match i {
                    0 => Verdict::Forged(Forgery::NoSignature),
                    i if i == mid => Verdict::Forged(Forgery::BadSignature),
                    _ => Verdict::Signed,
                })
                .collect();
            assert_eq!(got, want, "{n} events");
            // The same as one by one.
            let one_by_one: Vec<Verdict> = items(&payloads, &headers)
                .iter()
                .map(|i| keys.verify(i.machine, i.payload, i.headers, i.stored_ms))
                .collect();
            assert_eq!(got, one_by_one);
        }
        // Machines with no key and several of them in one batch.
        let (payloads, headers) = batch_of(&agent, 3);
        let mut mixed = items(&payloads, &headers);
        mixed[1].machine = "nobody";
        assert_eq!(
            keys.check_batch(&mixed).await,
            [Verdict::Signed, Verdict::Unsigned, Verdict::Signed]
        );
        assert!(keys.check_batch(&[]).await.is_empty());
    }

    #[tokio::test]
    async fn a_refused_event_puts_its_machine_on_single_verifications() {
        let (a, b) = (
            bench_agent::publisher::Signer::ephemeral(),
            bench_agent::publisher::Signer::ephemeral(),
        );
        let keys = Keys::default();
        keys.learn("m", a.public_key(), 1000);
        keys.learn("n", b.public_key(), 1000);
        async fn singles(keys: &Keys, items: Vec<Item<'_>>) -> (Vec<Verdict>, usize) {
            let before = VERIFIED.with(|n| n.get());
            let v = keys.check_batch(&items).await;
            (v, VERIFIED.with(|n| n.get()) - before)
        }
        // Inline batches (counted on this thread).
        let (payloads, mut headers) = batch_of(&a, INLINE_MAX);
        let (v, n) = singles(&keys, items(&payloads, &headers)).await;
        assert!(v.iter().all(|v| *v == Verdict::Signed));
        assert_eq!(n, 0, "one batch verification, no single one");
        let mut forged = agent_signed(&b, &payloads[3]);
        forged.insert(subjects::KEY_HEADER, a.key_id());
        headers[3] = Some(forged);
        let (v, n) = singles(&keys, items(&payloads, &headers)).await;
        assert_eq!(v[3], Verdict::Forged(Forgery::BadSignature));
        assert_eq!(n, INLINE_MAX, "the failed batch, one by one");
        // Now m's events are verified one by one: forged events cost one verification each.
        let (v, n) = singles(&keys, items(&payloads, &headers)).await;
        assert_eq!(v.iter().filter(|v| **v != Verdict::Signed).count(), 1);
        assert_eq!(n, INLINE_MAX, "no batch to fail and redo");
        // Other machines' batches are not affected.
        let (pn, hn) = batch_of(&b, INLINE_MAX);
        let mut other = items(&pn, &hn);
        for i in &mut other {
            i.machine = "n";
        }
        let (v, n) = singles(&keys, other).await;
        assert!(v.iter().all(|v| *v == Verdict::Signed));
        assert_eq!(n, 0);
    }

    #[test]
    fn keys_rotate_newest_first_and_stay_bounded() {
        let keys = Keys::default();
        let pairs: Vec<_> = (0..MAX_KEYS + 2)
            .map(|_| nkeys::KeyPair::new_user())
            .collect();
        for (i, kp) in pairs.iter().enumerate() {
            keys.learn("m", &kp.public_key(), 1000 + i as u64);
        }
        let s = keys.stored("m").unwrap();
        assert_eq!(s.keys.len(), MAX_KEYS);
        assert_eq!(s.keys[0], pairs.last().unwrap().public_key());
        assert_eq!(s.since_ms, 1000, "since never moves forward");
        let p = event("m");
        assert_eq!(
            keys.verify("m", &p, Some(&signed(&pairs[2], &p)), 5000),
            Verdict::Signed,
            "an older key still verifies"
        );
        assert_eq!(
            keys.verify("m", &p, Some(&signed(&pairs[0], &p)), 5000),
            Verdict::Forged(Forgery::BadSignature),
            "a key rotated out long ago does not"
        );
        // An account key or junk is no signing key.
        keys.learn("x", &nkeys::KeyPair::new_account().public_key(), 1);
        keys.learn("x", "Ujunk", 1);
        assert!(keys.stored("x").is_none());
        // The same key again (every heartbeat) changes nothing.
        keys.learn("m", &pairs.last().unwrap().public_key(), 9000);
        assert_eq!(keys.stored("m").unwrap(), s);
    }

    #[test]
    fn stored_values_merge() {
        let mine = StoredKeys {
            since_ms: 50,
            keys: vec!["U2".into(), "U1".into()],
        };
        let theirs = StoredKeys {
            since_ms: 10,
            keys: vec!["U1".into(), "U0".into()],
        };
        assert_eq!(
            merged(&mine, &theirs),
            StoredKeys {
                since_ms: 10,
                keys: vec!["U2".into(), "U1".into(), "U0".into()]
            }
        );
        assert_eq!(merged(&mine, &StoredKeys::default()), mine);
        let keys = Keys::default();
        let kp = nkeys::KeyPair::new_user();
        keys.merge_stored(
            "m",
            &StoredKeys {
                since_ms: 7,
                keys: vec![kp.public_key(), "Ujunk".into()],
            },
        );
        assert_eq!(keys.stored("m").unwrap().keys, [kp.public_key()]);
    }

    #[test]
    fn refreshes_are_rate_limited() {
        let keys = Keys::default();
        assert!(keys.refresh_allowed("m"));
        assert!(!keys.refresh_allowed("m"), "once a second per machine");
        let allowed = (0..100)
            .filter(|i| keys.refresh_allowed(&format!("x{i}")))
            .count();
        assert_eq!(allowed as u32, REFRESHES_PER_S - 1, "and a cap in all");
    }
}
