//! Connecting to NATS: one config shape for the agent and central.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Used when neither config nor `NATS_URL` names a server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Short enough that a NAT box or a stateful firewall never drops an idle connection, and that
/// a dead link is noticed within a minute.
pub const DEFAULT_PING_INTERVAL_S: u64 = 20;

/// How to reach NATS. Every field is optional in YAML; programs let `NATS_URL` override `url`.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://`, `tls://`, `ws://` or `wss://` URL; several may be comma-separated.
    pub url: Option<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// File holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT + seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key_file`, for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk without TLS.
    #[serde(default)]
    pub tls_required: bool,
    /// Seconds between client PINGs.
    pub ping_interval_s: Option<u64>,
    /// Reply inbox prefix (default `_INBOX`); per-agent users get `_INBOX_<machine_id>`.
    pub inbox_prefix: Option<String>,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A credentials or key file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The client refused the options or the first connect failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The error.
        source: async_nats::ConnectError,
    },
}

impl NatsConfig {
    /// The URL to use: `url`, else the default. (`NATS_URL` is applied by each program's config
    /// loader, from the environment it was given, so that tests can pass their own.)
    pub fn effective_url(&self) -> String {
        self.url
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
    }

    /// The client options this config stands for.
    pub async fn options(&self, name: &str) -> Result<async_nats::ConnectOptions, ConnectError> {
        let mut opts = match &self.creds_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| ConnectError::File {
                    path: path.clone(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(pass)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|source| ConnectError::File {
                path: path.clone(),
                source,
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        let ping = self
            .ping_interval_s
            .unwrap_or(DEFAULT_PING_INTERVAL_S)
            .max(1);
        Ok(opts
            .name(name)
            .ping_interval(Duration::from_secs(ping))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    // A subscription's buffer was full (a flood of messages): those were dropped.
                    async_nats::Event::SlowConsumer(sid) => tracing::warn!(
                        subscription = sid,
                        "messages dropped: a subscription's buffer was full (slow consumer)"
                    ),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }))
    }
}

/// No wait before the first attempt (the callback also runs for it), then 100 ms more per failed
/// attempt, capped at 2 s so a returning server is found within seconds, not minutes.
fn reconnect_delay(attempts: usize) -> Duration {
    Duration::from_millis(100 * (attempts.saturating_sub(1).min(20) as u64))
}

/// Messages one subscription of an agent may buffer before the client drops more (a slow
/// consumer): the client's default (65,536) is bounded by count only, so a burst of
/// max_payload-sized hostile messages on `bench.jobs.<id>` could hold gigabytes.
pub const AGENT_SUBSCRIPTION_CAPACITY: usize = 256;

/// Connects with `cfg`, retrying in the background forever (the returned client queues
/// publishes until the server answers).
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    connect_with_capacity(cfg, name, None).await
}

/// [`connect`], with each subscription buffering at most `capacity` messages (None: the
/// client's default).
pub async fn connect_with_capacity(
    cfg: &NatsConfig,
    name: &str,
    capacity: Option<usize>,
) -> Result<async_nats::Client, ConnectError> {
    let url = cfg.effective_url();
    let mut opts = cfg.options(name).await?;
    if let Some(c) = capacity {
        opts = opts.subscription_capacity(c);
    }
    // A comma-separated list is several servers (a cluster's): the client connects to one and
    // fails over to the others (and to those the cluster announces).
    let servers = server_list(&url);
    opts.connect(servers.as_slice())
        .await
        .map_err(|source| ConnectError::Connect { url, source })
}

/// The servers of a URL list (`nats://a:4222, nats://b:4222`): trimmed, empty entries left out.
pub fn server_list(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Waits up to `limit` for the client to be connected; false if it is not by then.
pub async fn wait_connected(client: &async_nats::Client, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if client.connection_state() == async_nats::connection::State::Connected {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (up to `limit`) for an answer the server gives itself, so that every command this client
/// sent before (subscriptions above all) has been processed by the server. `flush` only puts
/// them on the wire.
pub async fn round_trip(client: &async_nats::Client, limit: Duration) {
    // JetStream's account info, or the server's own "no responders": either is a round trip.
    let _ = tokio::time::timeout(limit, client.request("$JS.API.INFO", bytes::Bytes::new())).await;
}
