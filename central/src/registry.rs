//! The fleet as central sees it: `machines.yaml` (labels, notes, display order) merged with the
//! `bench_agents` KV bucket the agents heart-beat into, watched live. A status change goes out
//! on the hub as an `event: machine`. The signing key in an entry goes to [`crate::signing`]:
//! central learns a machine's keys from nowhere else.

use crate::config::MachineConfig;
use crate::hub::{Hub, HubMsg};
use async_nats::jetstream::kv;
use bench_schemas::{AgentInfo, AgentStatus, Hardware};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A machine's status in `GET /api/machines`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MachineStatus {
    /// Heart-beating, idle.
    Online,
    /// Heart-beating, running a job.
    Busy,
    /// Entry gone or stale.
    Offline,
}

impl MachineStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Busy => "busy",
            Self::Offline => "offline",
        }
    }
}

/// One machine in `GET /api/machines`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MachineView {
    /// Its id.
    pub machine_id: String,
    /// machines.yaml label, else the agent's, else the id.
    pub label: String,
    /// online, busy or offline.
    pub status: MachineStatus,
    /// Unix ms (NATS server clock) of the last heartbeat.
    pub last_seen_ms: Option<u64>,
    /// Models offered.
    pub models: Vec<String>,
    /// Default backend kind.
    pub engine: Option<String>,
    /// Machine facts (CPU, memory, OS and kernel, GPUs).
    pub hardware: Option<Hardware>,
    /// The default backend's engine (kind, server, version, build), once it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_info: Option<bench_schemas::fingerprint::EngineInfo>,
    /// Telemetry sources the agent samples (`cpu` -> `sysinfo`, ...); no `power` key means no
    /// power sensor.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub telemetry: BTreeMap<String, String>,
    /// Selector labels.
    pub labels: BTreeMap<String, String>,
    /// From machines.yaml.
    pub notes: Option<String>,
    /// Running job.
    pub current_job: Option<String>,
    /// Agent version.
    pub version: Option<String>,
}

#[derive(Debug, Clone)]
struct Seen {
    info: AgentInfo,
    seen_ms: u64,
    present: bool,
}

/// Configured and heart-beating machines.
#[derive(Debug)]
pub struct Registry {
    configured: Vec<MachineConfig>,
    /// machine id -> its place in `configured`.
    configured_at: HashMap<String, usize>,
    agents: RwLock<BTreeMap<String, Seen>>,
    last_status: Mutex<HashMap<String, MachineStatus>>,
    keys: Arc<crate::signing::Keys>,
}

impl Registry {
    /// A registry of the configured machines; agents are added by [`watch`].
    pub fn new(configured: Vec<MachineConfig>) -> Self {
        let configured_at = configured
            .iter()
            .enumerate()
            .map(|(i, c)| (c.machine_id.clone(), i))
            .collect();
        Self {
            configured,
            configured_at,
            agents: RwLock::default(),
            last_status: Mutex::default(),
            keys: Arc::default(),
        }
    }

    /// The machines' signing keys, as learned from their entries (see [`crate::signing`]).
    pub fn keys(&self) -> &Arc<crate::signing::Keys> {
        &self.keys
    }

    fn config_of(&self, machine_id: &str) -> Option<&MachineConfig> {
        self.configured_at
            .get(machine_id)
            .map(|&i| &self.configured[i])
    }

    /// Whether central knows the machine at all (configured, or ever heard from).
    pub fn is_known(&self, machine_id: &str) -> bool {
        self.configured_at.contains_key(machine_id)
            || self
                .agents
                .read()
                .expect("registry lock")
                .contains_key(machine_id)
    }

    /// The label to show for a machine.
    pub fn label(&self, machine_id: &str) -> Option<String> {
        self.config_of(machine_id)
            .and_then(|m| m.label.clone())
            .or_else(|| {
                self.agents
                    .read()
                    .expect("registry lock")
                    .get(machine_id)
                    .map(|s| s.info.label.clone())
            })
    }

    fn status(seen: Option<&Seen>, now_ms: u64) -> MachineStatus {
        match seen {
            Some(s) if s.present => {
                let stale_after = (s.info.heartbeat_s * 3.0 * 1000.0) as u64;
                if now_ms.saturating_sub(s.seen_ms) > stale_after {
                    MachineStatus::Offline
                } else if s.info.status == AgentStatus::Busy {
                    MachineStatus::Busy
                } else {
                    MachineStatus::Online
                }
            }
            _ => MachineStatus::Offline,
        }
    }

    /// The machine's status and running job now.
    pub fn status_of(&self, machine_id: &str, now_ms: u64) -> (MachineStatus, Option<String>) {
        let agents = self.agents.read().expect("registry lock");
        let seen = agents.get(machine_id);
        let status = Self::status(seen, now_ms);
        let current = seen
            .filter(|_| status != MachineStatus::Offline)
            .and_then(|s| s.info.current_job.clone());
        (status, current)
    }

    /// The boot id of the agent process heart-beating for the machine now (None when it is
    /// offline or too old to say).
    pub fn boot_of(&self, machine_id: &str, now_ms: u64) -> Option<String> {
        let agents = self.agents.read().expect("registry lock");
        let seen = agents.get(machine_id);
        (Self::status(seen, now_ms) != MachineStatus::Offline)
            .then(|| seen.map(|s| s.info.boot_id.clone()))
            .flatten()
            .filter(|b| !b.is_empty())
    }

    /// One machine's view (`agents` is the registry's map, read-locked by the caller).
    fn view(
        &self,
        agents: &BTreeMap<String, Seen>,
        id: &str,
        cfg: Option<&MachineConfig>,
        now_ms: u64,
    ) -> MachineView {
        let seen = agents.get(id);
        let status = Self::status(seen, now_ms);
        let info = seen.map(|s| &s.info);
        MachineView {
            machine_id: id.to_string(),
            label: cfg
                .and_then(|c| c.label.clone())
                .or_else(|| info.map(|i| i.label.clone()))
                .unwrap_or_else(|| id.to_string()),
            status,
            last_seen_ms: seen.map(|s| s.seen_ms),
            models: info.map(|i| i.models.clone()).unwrap_or_default(),
            engine: info.map(|i| i.engine.clone()),
            hardware: info.map(|i| i.hardware.clone()),
            engine_info: info.and_then(|i| i.engine_info.clone()),
            telemetry: info.map(|i| i.telemetry.clone()).unwrap_or_default(),
            labels: info.map(|i| i.labels.clone()).unwrap_or_default(),
            notes: cfg.and_then(|c| c.notes.clone()),
            current_job: info
                .filter(|_| status != MachineStatus::Offline)
                .and_then(|i| i.current_job.clone()),
            version: info.map(|i| i.version.clone()),
        }
    }

    /// Every machine: machines.yaml order first, then the rest by id.
    pub fn machines(&self, now_ms: u64) -> Vec<MachineView> {
        let agents = self.agents.read().expect("registry lock");
        let mut out: Vec<MachineView> = self
            .configured
            .iter()
            .map(|c| self.view(&agents, &c.machine_id, Some(c), now_ms))
            .collect();
        for id in agents.keys() {
            if !self.configured_at.contains_key(id) {
                out.push(self.view(&agents, id, None, now_ms));
            }
        }
        out
    }

    /// Machines per status, for metrics.
    pub fn status_counts(&self) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for (_, status) in self.statuses(crate::now_ms()) {
            *counts.entry(status.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// Every machine's id and status (no view built), in `machines` order.
    fn statuses(&self, now_ms: u64) -> Vec<(String, MachineStatus)> {
        let agents = self.agents.read().expect("registry lock");
        let mut out: Vec<(String, MachineStatus)> = self
            .configured
            .iter()
            .map(|c| {
                let status = Self::status(agents.get(&c.machine_id), now_ms);
                (c.machine_id.clone(), status)
            })
            .collect();
        for (id, seen) in agents.iter() {
            if !self.configured_at.contains_key(id) {
                out.push((id.clone(), Self::status(Some(seen), now_ms)));
            }
        }
        out
    }

    /// Ids of machines heart-beating now.
    pub fn online_ids(&self, now_ms: u64) -> Vec<String> {
        self.statuses(now_ms)
            .into_iter()
            .filter(|(_, s)| *s != MachineStatus::Offline)
            .map(|(id, _)| id)
            .collect()
    }

    /// Reads every entry the bucket holds now (start-up: so that the first requests already
    /// know the machines that are online).
    pub async fn load(&self, agents: &kv::Store) -> Result<usize, async_nats::Error> {
        let mut keys = agents.keys().await?;
        let mut n = 0;
        while let Some(key) = keys.next().await {
            if let Some(entry) = agents.entry(key?).await? {
                self.apply(&entry);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records one bucket entry (a heartbeat, or an agent gone).
    pub fn apply(&self, entry: &kv::Entry) {
        let mut agents = self.agents.write().expect("registry lock");
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<AgentInfo>(&entry.value) {
                Ok(info) => {
                    let seen_ms = (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                    // The bucket key, never the entry's own machine_id: under auth.conf only
                    // the agent of that id can write it.
                    if let Some(key) = &info.signing_key {
                        self.keys.learn(&entry.key, key, seen_ms);
                    }
                    agents.insert(
                        entry.key.clone(),
                        Seen {
                            info,
                            seen_ms,
                            present: true,
                        },
                    );
                }
                Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable heartbeat"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(s) = agents.get_mut(&entry.key) {
                    s.present = false;
                }
            }
        }
    }

    /// Sends an `event: machine` for every machine whose status changed since the last call
    /// (the once-a-second sweep that finds machines gone stale): statuses are compared first,
    /// and a view is built only for a machine that changed.
    pub fn publish_changes(&self, hub: &Hub, now_ms: u64) {
        let changed: Vec<String> = {
            let mut last = self.last_status.lock().expect("status lock");
            self.statuses(now_ms)
                .into_iter()
                .filter(|(id, status)| last.insert(id.clone(), *status) != Some(*status))
                .map(|(id, _)| id)
                .collect()
        };
        for id in changed {
            self.send_view(hub, &id, now_ms);
        }
    }

    /// After one machine's heartbeat: an `event: machine` when its status changed. Costs the
    /// same whatever the fleet's size (a heartbeat used to rebuild every machine's view, so a
    /// fleet of n heart-beating agents cost n x n).
    pub fn publish_change_of(&self, hub: &Hub, machine_id: &str, now_ms: u64) {
        let status = {
            let agents = self.agents.read().expect("registry lock");
            Self::status(agents.get(machine_id), now_ms)
        };
        let changed = self
            .last_status
            .lock()
            .expect("status lock")
            .insert(machine_id.to_string(), status)
            != Some(status);
        if changed {
            self.send_view(hub, machine_id, now_ms);
        }
    }

    fn send_view(&self, hub: &Hub, machine_id: &str, now_ms: u64) {
        let view = {
            let agents = self.agents.read().expect("registry lock");
            self.view(&agents, machine_id, self.config_of(machine_id), now_ms)
        };
        if let Ok(data) = serde_json::to_string(&view) {
            hub.send(HubMsg::Machine { data: data.into() });
        }
    }
}

/// Follows the bucket until shutdown, re-watching after errors; re-checks staleness every
/// second.
pub async fn watch(registry: &Registry, hub: &Hub, agents: kv::Store, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    'outer: loop {
        let mut entries = match agents.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the agent registry; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                _ = tick.tick() => registry.publish_changes(hub, crate::now_ms()),
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        registry.apply(&entry);
                        registry.publish_change_of(hub, &entry.key, crate::now_ms());
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "registry watch error; re-watching");
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'outer,
                        }
                    }
                    None => continue 'outer,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, status: &str, at_ms: u64) -> kv::Entry {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/messages/agent_info.json")).unwrap();
        v["machine_id"] = id.into();
        v["status"] = status.into();
        kv::Entry {
            bucket: "bench_agents".into(),
            key: id.into(),
            value: serde_json::to_vec(&v).unwrap().into(),
            revision: 1,
            delta: 0,
            created: async_nats::datetime::from_nanos(i128::from(at_ms) * 1_000_000).unwrap(),
            operation: kv::Operation::Put,
            seen_current: true,
        }
    }

    fn machine_events(rx: &mut tokio::sync::broadcast::Receiver<HubMsg>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let HubMsg::Machine { data } = msg {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                out.push((
                    v["machine_id"].as_str().unwrap().to_string(),
                    v["status"].as_str().unwrap().to_string(),
                ));
            }
        }
        out
    }

    #[test]
    fn a_signing_key_is_learned_for_the_bucket_key_only() {
        let r = Registry::new(Vec::new());
        // Agent `a` writes its own key (all auth.conf lets it write) claiming to be `b`.
        let mut e = beat("a", "idle", 1_764_340_000_000);
        let mut v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
        let key = v["signing_key"].as_str().unwrap().to_string();
        v["machine_id"] = "b".into();
        e.value = serde_json::to_vec(&v).unwrap().into();
        r.apply(&e);
        let stored = r.keys().stored("a").expect("a's key learned");
        assert_eq!(
            (stored.keys, stored.since_ms),
            (vec![key], 1_764_340_000_000)
        );
        assert!(r.keys().stored("b").is_none());
    }

    #[test]
    fn a_heartbeat_announces_only_its_own_machine_and_only_a_change() {
        let r = Registry::new(Vec::new());
        let hub = Hub::new(64);
        let mut rx = hub.subscribe();
        let now = 1_764_340_000_000;
        for id in ["a", "b", "c"] {
            r.apply(&beat(id, "idle", now));
            r.publish_change_of(&hub, id, now);
        }
        let online = |id: &str| (id.to_string(), "online".to_string());
        assert_eq!(
            machine_events(&mut rx),
            [online("a"), online("b"), online("c")]
        );
        // The same status again: nothing; b turns busy: only b.
        r.apply(&beat("a", "idle", now + 1000));
        r.publish_change_of(&hub, "a", now + 1000);
        r.apply(&beat("b", "busy", now + 1000));
        r.publish_change_of(&hub, "b", now + 1000);
        assert_eq!(
            machine_events(&mut rx),
            [("b".to_string(), "busy".to_string())]
        );
        // The once-a-second sweep finds c stale (3 x heartbeat_s of 5 s without one): offline.
        let later = now + 16_000;
        r.apply(&beat("a", "idle", later));
        r.apply(&beat("b", "busy", later));
        r.publish_changes(&hub, later);
        assert_eq!(
            machine_events(&mut rx),
            [("c".to_string(), "offline".to_string())]
        );
        assert_eq!(r.online_ids(later), ["a", "b"]);
    }
}
