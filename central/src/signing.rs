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

use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderName};
use bench_schemas::{subjects, AgentInfo};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
    keys: Vec<(String, nkeys::KeyPair)>,
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
fn parse_key(key: &str) -> Option<nkeys::KeyPair> {
    nkeys::KeyPair::from_public_key(key)
        .ok()
        .filter(|k| k.key_pair_type() == nkeys::KeyPairType::User)
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

    /// Checks one event's payload and headers (`stored_ms`: the stream's time for it) without
    /// any I/O. O(1) in the number of machines; no allocation.
    pub fn verify(
        &self,
        machine: &str,
        payload: &[u8],
        headers: Option<&HeaderMap>,
        stored_ms: u64,
    ) -> Verdict {
        let known = self
            .machines
            .read()
            .expect("keys lock")
            .get(machine)
            .cloned();
        let unknown = match self.mode() {
            SignatureMode::Verify => Verdict::Unsigned,
            SignatureMode::Require => Verdict::Forged(Forgery::UnknownMachine),
        };
        let Some(known) = known else {
            return unknown;
        };
        let verdict = match headers
            .and_then(|h| h.get(HeaderName::from_static(subjects::SIGNATURE_HEADER)))
        {
            None => Verdict::Forged(Forgery::NoSignature),
            Some(sig) => {
                let sig = sig.as_str().as_bytes();
                let mut raw = [0u8; SIG_LEN];
                let enc = data_encoding::BASE64URL_NOPAD;
                if enc.decode_len(sig.len()) != Ok(SIG_LEN)
                    || enc.decode_mut(sig, &mut raw).is_err()
                {
                    Verdict::Forged(Forgery::Malformed)
                } else if known
                    .keys
                    .iter()
                    .any(|(_, k)| k.verify(payload, &raw).is_ok())
                {
                    Verdict::Signed
                } else {
                    Verdict::Forged(Forgery::BadSignature)
                }
            }
        };
        // Stored before central knew any key of the machine: judged as then (a good signature
        // still counts).
        if verdict != Verdict::Signed && stored_ms < known.since_ms {
            return unknown;
        }
        verdict
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
        let may_be_new_key = matches!(
            verdict,
            Verdict::Forged(Forgery::BadSignature | Forgery::UnknownMachine)
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
