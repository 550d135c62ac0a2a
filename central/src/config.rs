//! Central configuration: `machines.yaml` (optional) into [`RawConfig`], environment overrides,
//! then a validated [`Config`] whose errors name the file, the key and the fix.

pub use bench_nats::settings::{process_env, ConfigError, Env};
use bench_nats::streams::EventsRetention;
use bench_nats::NatsConfig;
use bench_schemas::validate_machine_id;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Config file read when `--config` is not given (and skipped when it does not exist).
pub const DEFAULT_CONFIG_PATH: &str = "central/config/machines.yaml";
/// HTTP bind host (`CENTRAL_HOST`).
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// HTTP port (`CENTRAL_PORT`), the original's.
pub const DEFAULT_PORT: u16 = 8080;
/// A machine silent for this long while its agent is gone is marked failed.
pub const DEFAULT_STALL_TIMEOUT_S: f64 = 120.0;
/// How long a `"machines": "all"` dispatch gathers accepts.
pub const DEFAULT_BROADCAST_WINDOW_S: f64 = 2.0;
/// How long one machine has to answer a dispatched job.
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 5.0;
/// How long start-up waits for NATS before giving up.
pub const DEFAULT_NATS_WAIT_S: f64 = 30.0;
/// Where finished runs are written (`results/runs/<job_id>/`).
pub const DEFAULT_RESULTS_DIR: &str = "results";
/// The browser UI's static files.
pub const DEFAULT_WEB_DIR: &str = "web";
/// Events buffered per watched job before a client that far behind is told it lagged.
pub const DEFAULT_SSE_BUFFER: usize = 16_384;
/// Finished job records kept in memory (the rest are loaded from KV when asked for).
pub const DEFAULT_INDEX_CACHE_JOBS: usize = 500;
/// Keep-alive comment period on SSE connections.
pub const DEFAULT_SSE_KEEPALIVE_S: f64 = 15.0;
/// Servers that keep each of central's streams and buckets (`replicas`): 1 for a single
/// nats-server; 3 on a cluster of three or more.
pub const DEFAULT_REPLICAS: usize = 1;

/// One machine as written in `machines.yaml`.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawMachine {
    /// The agent's `machine_id`.
    pub machine_id: String,
    /// Display name (wins over the agent's own label).
    pub label: Option<String>,
    /// Free text shown in the UI.
    pub notes: Option<String>,
}

/// The YAML as written. Every key is optional; unknown keys are errors.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Labels, notes and display order.
    #[serde(default)]
    pub machines: Vec<RawMachine>,
    /// HTTP bind host.
    pub host: Option<String>,
    /// HTTP port.
    pub port: Option<u16>,
    /// NATS connection.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Stall timeout in seconds.
    pub stall_timeout_s: Option<f64>,
    /// `"all"` gather window in seconds.
    pub broadcast_window_s: Option<f64>,
    /// Per-machine dispatch timeout in seconds.
    pub request_timeout_s: Option<f64>,
    /// Start-up wait for NATS in seconds.
    pub nats_wait_s: Option<f64>,
    /// Results folder.
    pub results_dir: Option<PathBuf>,
    /// Static files folder.
    pub web_dir: Option<PathBuf>,
    /// Events buffered per SSE client.
    pub sse_buffer: Option<usize>,
    /// Finished job records kept in memory.
    pub index_cache_jobs: Option<usize>,
    /// Keep events this many days.
    pub events_max_age_days: Option<f64>,
    /// Cap the event stream at this many bytes.
    pub events_max_bytes: Option<i64>,
    /// Servers keeping each stream and bucket (`CENTRAL_REPLICAS`), 1..=5.
    pub replicas: Option<i64>,
    /// When set, mutating API calls need `Authorization: Bearer <token>` (`CENTRAL_API_TOKEN`).
    pub api_token: Option<String>,
    /// Origins other pages may call the API from (CORS). Empty: same origin only.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// `verify` (default) or `require`: whether events of a machine with no known signing
    /// key are accepted (`CENTRAL_SIGNATURES`; see [`crate::signing`]).
    pub signatures: Option<crate::signing::SignatureMode>,
    /// This central's name among several on the same NATS (`CENTRAL_ID`; default: host name
    /// and a random suffix).
    pub central_id: Option<String>,
    /// How long the indexing lease outlives its holder's last renewal, in seconds.
    pub leader_ttl_s: Option<f64>,
}

/// A machine from `machines.yaml`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    /// Its id.
    pub machine_id: String,
    /// Display name.
    pub label: Option<String>,
    /// Notes.
    pub notes: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (`-` when no file was read).
    pub source: PathBuf,
    /// Configured machines, in display order.
    pub machines: Vec<MachineConfig>,
    /// HTTP bind host.
    pub host: String,
    /// HTTP port.
    pub port: u16,
    /// NATS connection.
    pub nats: NatsConfig,
    /// Stall timeout.
    pub stall_timeout: Duration,
    /// `"all"` gather window.
    pub broadcast_window: Duration,
    /// Per-machine dispatch timeout.
    pub request_timeout: Duration,
    /// Start-up wait for NATS.
    pub nats_wait: Duration,
    /// Results folder.
    pub results_dir: PathBuf,
    /// Static files folder.
    pub web_dir: PathBuf,
    /// Events buffered per SSE client.
    pub sse_buffer: usize,
    /// SSE keep-alive period.
    pub sse_keepalive: Duration,
    /// Finished job records kept in memory.
    pub index_cache_jobs: usize,
    /// Bearer token required by POST / DELETE under `/api/` (None: open).
    pub api_token: Option<String>,
    /// Allowed cross-origin callers (empty: none).
    pub cors_origins: Vec<String>,
    /// Events of machines with no known signing key: accepted (`verify`) or refused.
    pub signatures: crate::signing::SignatureMode,
    /// `BENCH_EVENTS` limits.
    pub retention: EventsRetention,
    /// Replicas of `BENCH_EVENTS`, `bench_jobs` and `bench_agents` (set at every start).
    pub replicas: usize,
    /// This central's id when configured (shown in `/health`, held in the lease while it
    /// indexes); None: `<host>-<HTTP port>`, stable across restarts on the same port.
    pub central_id: Option<String>,
    /// The indexing lease's lifetime without renewal (see [`crate::leader`]).
    pub leader_ttl: Duration,
}

impl Config {
    /// The longest any HTTP request may take to answer (a dispatch waits for its machines,
    /// then stores the record).
    pub fn http_timeout(&self) -> Duration {
        self.request_timeout.max(self.broadcast_window) + Duration::from_secs(10)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: PathBuf::from("-"),
            machines: Vec::new(),
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            nats: NatsConfig::default(),
            stall_timeout: Duration::from_secs_f64(DEFAULT_STALL_TIMEOUT_S),
            broadcast_window: Duration::from_secs_f64(DEFAULT_BROADCAST_WINDOW_S),
            request_timeout: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT_S),
            nats_wait: Duration::from_secs_f64(DEFAULT_NATS_WAIT_S),
            results_dir: DEFAULT_RESULTS_DIR.into(),
            web_dir: DEFAULT_WEB_DIR.into(),
            sse_buffer: DEFAULT_SSE_BUFFER,
            sse_keepalive: Duration::from_secs_f64(DEFAULT_SSE_KEEPALIVE_S),
            index_cache_jobs: DEFAULT_INDEX_CACHE_JOBS,
            api_token: None,
            cors_origins: Vec::new(),
            signatures: crate::signing::SignatureMode::default(),
            retention: EventsRetention::default(),
            replicas: DEFAULT_REPLICAS,
            central_id: None,
            leader_ttl: Duration::from_secs_f64(DEFAULT_LEADER_TTL_S),
        }
    }
}

/// The default indexing lease lifetime: a dead leader is replaced within about this long.
pub const DEFAULT_LEADER_TTL_S: f64 = 5.0;

/// This host's name, made id-safe (a central's default id is `<host>-<HTTP port>`).
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "central".into())
}

impl Config {
    /// Reads `path` (when given it must exist; the default path may be absent), applies the
    /// environment and validates.
    pub fn load(path: Option<&Path>, env: &Env) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path, env),
            Err(e) if required || e.kind() != std::io::ErrorKind::NotFound => Err(ConfigError {
                file: path.display().to_string(),
                key: "-".into(),
                problem: format!("cannot read the file ({e})"),
                fix: format!("create it (see central/config/machines.example.yaml) or omit --config to run without one; default is {DEFAULT_CONFIG_PATH}"),
            }),
            Err(_) => Self::from_raw(RawConfig::default(), Path::new("-"), env),
        }
    }

    /// Parses YAML text as if read from `path`. An empty file is a valid, empty config.
    pub fn parse(text: &str, path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError {
                file: path.display().to_string(),
                key: "-".into(),
                problem: e.to_string(),
                fix:
                    "correct the YAML; every key is listed in central/config/machines.example.yaml"
                        .into(),
            })?
        };
        Self::from_raw(raw, path, env)
    }

    /// Applies environment overrides to `raw` and validates it.
    pub fn from_raw(raw: RawConfig, path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let err = |key: &str, problem: String, fix: &str| ConfigError {
            file: file.clone(),
            key: key.into(),
            problem,
            fix: fix.into(),
        };
        let env_err = |key: &str, problem: String, fix: &str| ConfigError {
            file: format!("environment ({file})"),
            key: key.into(),
            problem,
            fix: fix.into(),
        };
        let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
        let d = Config::default();

        let mut machines = Vec::new();
        for (i, m) in raw.machines.iter().enumerate() {
            validate_machine_id(&m.machine_id).map_err(|e| {
                err(
                    &format!("machines[{i}].machine_id"),
                    e.to_string(),
                    "use the agent's machine_id (a-z, 0-9, '_' and '-')",
                )
            })?;
            if machines
                .iter()
                .any(|x: &MachineConfig| x.machine_id == m.machine_id)
            {
                return Err(err(
                    &format!("machines[{i}]"),
                    format!("{} is listed twice", m.machine_id),
                    "list each machine once",
                ));
            }
            machines.push(MachineConfig {
                machine_id: m.machine_id.clone(),
                label: m.label.clone(),
                notes: m.notes.clone(),
            });
        }

        let host = get("CENTRAL_HOST").or(raw.host).unwrap_or(d.host);
        let port = match get("CENTRAL_PORT") {
            Some(p) => p.parse::<u16>().map_err(|_| {
                env_err(
                    "CENTRAL_PORT",
                    format!("{p:?} is not a port"),
                    "set CENTRAL_PORT to 0..65535",
                )
            })?,
            None => raw.port.unwrap_or(d.port),
        };
        let mut nats = raw.nats;
        if let Some(url) = get("NATS_URL") {
            nats.url = Some(url);
        }
        let secs = |key: &str,
                    v: Option<f64>,
                    default: Duration,
                    range: std::ops::RangeInclusive<f64>| match v {
            None => Ok(default),
            Some(s) if s.is_finite() && range.contains(&s) => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(err(
                key,
                format!("{s} is out of range"),
                &format!("use {}..={} seconds", range.start(), range.end()),
            )),
        };
        let stall_env = match get("CENTRAL_STALL_TIMEOUT_S") {
            Some(v) => Some(v.parse::<f64>().map_err(|_| {
                env_err(
                    "CENTRAL_STALL_TIMEOUT_S",
                    format!("{v:?} is not a number"),
                    "set it to seconds, e.g. 120",
                )
            })?),
            None => None,
        };
        let stall_timeout = secs(
            "stall_timeout_s",
            stall_env.or(raw.stall_timeout_s),
            d.stall_timeout,
            0.1..=86_400.0,
        )?;
        let broadcast_window = secs(
            "broadcast_window_s",
            raw.broadcast_window_s,
            d.broadcast_window,
            0.05..=60.0,
        )?;
        let request_timeout = secs(
            "request_timeout_s",
            raw.request_timeout_s,
            d.request_timeout,
            0.1..=120.0,
        )?;
        let nats_wait = secs("nats_wait_s", raw.nats_wait_s, d.nats_wait, 0.0..=3600.0)?;
        let sse_buffer = raw.sse_buffer.unwrap_or(d.sse_buffer);
        if !(16..=1_000_000).contains(&sse_buffer) {
            return Err(err(
                "sse_buffer",
                format!("{sse_buffer} is out of range"),
                "use 16..=1000000 (default 16384)",
            ));
        }
        let index_cache_jobs = raw.index_cache_jobs.unwrap_or(d.index_cache_jobs);
        if !(10..=1_000_000).contains(&index_cache_jobs) {
            return Err(err(
                "index_cache_jobs",
                format!("{index_cache_jobs} is out of range"),
                "use 10..=1000000 (default 500)",
            ));
        }
        let mut retention = d.retention;
        if let Some(days) = raw.events_max_age_days {
            retention.max_age = secs(
                "events_max_age_days",
                Some(days * 86_400.0),
                retention.max_age,
                60.0..=(3650.0 * 86_400.0),
            )?;
        }
        if let Some(bytes) = raw.events_max_bytes {
            if bytes < 1 << 20 {
                return Err(err(
                    "events_max_bytes",
                    format!("{bytes} is too small"),
                    "use at least 1048576 (1 MiB)",
                ));
            }
            retention.max_bytes = bytes;
        }

        let replicas_fix = "use 1 for a single nats-server, 3 (or 5) on a cluster of at least that many JetStream servers; at most 5";
        let replicas_env = get("CENTRAL_REPLICAS");
        let replicas = match &replicas_env {
            Some(v) => v.trim().parse::<i64>().map_err(|_| {
                env_err(
                    "CENTRAL_REPLICAS",
                    format!("{v:?} is not a number"),
                    replicas_fix,
                )
            })?,
            None => raw.replicas.unwrap_or(d.replicas as i64),
        };
        if !(1..=bench_nats::streams::MAX_REPLICAS as i64).contains(&replicas) {
            let problem = format!("{replicas} is out of range 1..=5");
            return Err(match replicas_env {
                Some(_) => env_err("CENTRAL_REPLICAS", problem, replicas_fix),
                None => err("replicas", problem, replicas_fix),
            });
        }
        let replicas = replicas as usize;

        let api_token = get("CENTRAL_API_TOKEN").or(raw.api_token);
        if api_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(err(
                "api_token",
                "shorter than 16 characters".into(),
                "use a long random token, e.g. `openssl rand -hex 24`",
            ));
        }
        let central_id = match get("CENTRAL_ID").or(raw.central_id) {
            Some(id) => {
                validate_machine_id(&id).map_err(|e| {
                    err(
                        "central_id",
                        e.to_string(),
                        "use a-z, 0-9, '_' and '-' (it names this central in the lease and logs)",
                    )
                })?;
                Some(id)
            }
            None => None,
        };
        let leader_ttl = secs("leader_ttl_s", raw.leader_ttl_s, d.leader_ttl, 2.0..=120.0)?;
        let signatures = match get("CENTRAL_SIGNATURES") {
            Some(v) => crate::signing::SignatureMode::parse(&v).ok_or_else(|| {
                env_err(
                    "CENTRAL_SIGNATURES",
                    format!("{v:?} is neither verify nor require"),
                    "set it to verify (the default) or require",
                )
            })?,
            None => raw.signatures.unwrap_or(d.signatures),
        };
        let cors_origins = raw.cors_origins;
        for o in &cors_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(err(
                    "cors_origins",
                    format!("{o:?} is not an origin"),
                    "list origins like https://dash.example.org (scheme, host, optional port; no path)",
                ));
            }
        }
        Ok(Self {
            source: path.to_path_buf(),
            machines,
            host,
            port,
            nats,
            stall_timeout,
            broadcast_window,
            request_timeout,
            nats_wait,
            results_dir: get("CENTRAL_RESULTS_DIR")
                .map(PathBuf::from)
                .or(raw.results_dir)
                .unwrap_or(d.results_dir),
            web_dir: get("CENTRAL_WEB_DIR")
                .map(PathBuf::from)
                .or(raw.web_dir)
                .unwrap_or(d.web_dir),
            sse_buffer,
            sse_keepalive: d.sse_keepalive,
            index_cache_jobs,
            retention,
            replicas,
            api_token,
            cors_origins,
            signatures,
            central_id,
            leader_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(yaml, Path::new("machines.yaml"), &env)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("", &[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), (DEFAULT_HOST, DEFAULT_PORT));
        let c = parse(
            "machines:\n  - machine_id: box1\n    label: Box One\nport: 9000\n",
            &[
                ("CENTRAL_HOST", "127.0.0.1"),
                ("CENTRAL_PORT", "0"),
                ("NATS_URL", "nats://h:1"),
            ],
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 0));
        assert_eq!(c.machines[0].label.as_deref(), Some("Box One"));
        assert_eq!(c.nats.url.as_deref(), Some("nats://h:1"));
        assert_eq!(c.replicas, DEFAULT_REPLICAS);
        assert_eq!(parse("replicas: 3\n", &[]).unwrap().replicas, 3);
        let c = parse("replicas: 3\n", &[("CENTRAL_REPLICAS", "5")]).unwrap();
        assert_eq!(c.replicas, 5, "the environment wins");
        use crate::signing::SignatureMode;
        assert_eq!(c.signatures, SignatureMode::Verify);
        assert_eq!(
            parse("signatures: require\n", &[]).unwrap().signatures,
            SignatureMode::Require
        );
        let c = parse("signatures: require\n", &[("CENTRAL_SIGNATURES", "verify")]).unwrap();
        assert_eq!(c.signatures, SignatureMode::Verify, "the environment wins");
    }

    #[test]
    fn errors_name_key_and_fix() {
        let e = parse("machines:\n  - machine_id: Bad.Id\n", &[]).unwrap_err();
        assert_eq!(e.key, "machines[0].machine_id");
        let e = parse("prot: 1\n", &[]).unwrap_err();
        assert!(e.problem.contains("prot"), "{e}");
        let e = parse("", &[("CENTRAL_PORT", "http")]).unwrap_err();
        assert_eq!(e.key, "CENTRAL_PORT");
        let e = parse("stall_timeout_s: -1\n", &[]).unwrap_err();
        assert_eq!(e.key, "stall_timeout_s");
        for bad in ["replicas: 0\n", "replicas: 6\n", "replicas: -1\n"] {
            assert_eq!(parse(bad, &[]).unwrap_err().key, "replicas", "{bad}");
        }
        let e = parse("signatures: always\n", &[]).unwrap_err();
        assert!(e.problem.contains("always"), "{e}");
        let e = parse("", &[("CENTRAL_SIGNATURES", "yes")]).unwrap_err();
        assert_eq!(e.key, "CENTRAL_SIGNATURES");
        let e = parse("", &[("CENTRAL_REPLICAS", "three")]).unwrap_err();
        assert_eq!(e.key, "CENTRAL_REPLICAS");
        let e = parse("", &[("CENTRAL_REPLICAS", "9")]).unwrap_err();
        assert_eq!(e.key, "CENTRAL_REPLICAS");
        let missing =
            Config::load(Some(Path::new("/nonexistent/machines.yaml")), &Env::new()).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        for bad in ["central_id: Lab.A\n", "central_id: \"\"\n"] {
            assert_eq!(parse(bad, &[]).unwrap_err().key, "central_id", "{bad}");
        }
        for bad in ["leader_ttl_s: 1\n", "leader_ttl_s: 500\n"] {
            assert_eq!(parse(bad, &[]).unwrap_err().key, "leader_ttl_s", "{bad}");
        }
    }

    #[test]
    fn several_centrals_keys() {
        let c = parse("", &[]).unwrap();
        assert_eq!(
            (c.central_id.as_deref(), c.leader_ttl),
            (None, Duration::from_secs(5))
        );
        let c = parse(
            "central_id: lab-a\nleader_ttl_s: 3\n",
            &[("CENTRAL_ID", "lab-b")],
        )
        .unwrap();
        assert_eq!(
            c.central_id.as_deref(),
            Some("lab-b"),
            "the environment wins"
        );
        assert_eq!(c.leader_ttl, Duration::from_secs(3));
        assert!(!host_id().is_empty() && validate_machine_id(&host_id()).is_ok());
    }

    #[test]
    fn the_example_parses() {
        parse(include_str!("../config/machines.example.yaml"), &[]).expect("example config");
    }
}
