//! bench-central: sends benchmark jobs to the fleet, keeps every event durably, turns them into
//! comparable results, and serves them over a REST API, Server-Sent Events and the web UI.
//!
//! Layout: [`config`] reads `machines.yaml` and the environment; [`store`] checks the NATS
//! server and creates the `BENCH_EVENTS` stream, the `bench_jobs` / `bench_agents` buckets and
//! the durable indexer consumer; [`registry`] follows the agents' heartbeats; [`dispatch`] sends
//! `POST /api/jobs` to `bench.jobs.<id>` or `bench.jobs.all`. Agents publish events to
//! `BENCH_EVENTS`; [`ingest`] consumes them in batches into [`record::JobRecord`]s held by the
//! in-memory [`index`] (recent records, a list entry for every job) and persisted by
//! [`jobs_kv`] (compare-and-set, on status changes and at most once a second, never per token),
//! fans each one out on the [`hub`] and queues finished jobs for [`results`]
//! (`results/runs/<job_id>/`); [`stall`] ends runs that can no longer finish (agent restarted
//! or gone, dispatch interrupted). [`compare`] ranks machines (and energy per token);
//! [`fingerprints`] says what changed between two runs' machines, engines and models; [`cells`]
//! adds a matrix job's cells and sweeps, [`regression`] each machine against its earlier job
//! with the same setup, and [`runs_compare`] sets any runs side by side; [`api`] serves the REST
//! endpoints (guarded by [`auth`]: bearer token, CORS) and [`sse`] the event streams,
//! replaying from the stream via [`replay`]; [`signing`] refuses events not signed by the
//! machine they name (keys learned from the registry), in ingestion and replay alike;
//! [`metrics`] renders `/metrics`; [`error`] maps failures to HTTP. Nothing here calls an agent
//! directly: everything goes through NATS.

pub mod api;
pub mod auth;
pub mod cells;
pub mod compare;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod fingerprints;
pub mod hub;
pub mod index;
pub mod ingest;
pub mod jobs_kv;
pub mod leader;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod regression;
pub mod replay;
pub mod results;
pub mod runs_compare;
pub mod signing;
pub mod sse;
pub mod stall;
pub mod store;

use async_nats::jetstream;
use axum::extract::State;
use axum::routing::{any, get, post};
use axum::Router;
use bench_schemas::subjects;
use config::Config;
use error::StartError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Wall-clock unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the handlers and background tasks share.
pub struct Shared {
    /// Validated config.
    pub cfg: Config,
    /// The NATS connection.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
    /// `BENCH_EVENTS`.
    pub stream: jetstream::stream::Stream,
    /// Indexed jobs.
    pub index: index::Index,
    /// Where job records are persisted.
    pub jobs_kv: jobs_kv::JobsKv,
    /// Known machines.
    pub registry: registry::Registry,
    /// Live fan-out.
    pub hub: hub::Hub,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// Results queue.
    pub results: results::Results,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
    /// Leader (indexes) or follower (see [`leader`]).
    pub role: leader::Role,
}

impl Shared {
    /// `Err(nats_unavailable)` at once while NATS is away: a write must not hang on it.
    pub fn require_nats(&self) -> Result<(), error::ApiError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(error::ApiError::Nats(format!(
                "not connected to NATS ({state}); try again once it is back"
            ))),
        }
    }

    /// The job's record: from memory, else from KV (None when there is no such job).
    pub async fn record(&self, job_id: &str) -> Result<Option<record::JobRecord>, error::ApiError> {
        if let Some(r) = self.index.get(job_id) {
            return Ok(Some(r));
        }
        // A follower may not have seen the leader's write of a new job yet: ask KV.
        if !self.index.needs_load(job_id)
            && (self.role.is_leader()
                || self.index.contains(job_id)
                || self.index.was_deleted(job_id))
        {
            return Ok(None);
        }
        self.require_nats()?;
        match self
            .jobs_kv
            .load(job_id)
            .await
            .map_err(error::ApiError::nats)?
        {
            Some((r, revision)) => {
                self.index.insert_loaded(r.clone(), revision);
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// Changes one record (outside ingestion), stores it (giving up after a few seconds: the
    /// stall loop stores it once NATS is back) and tells listeners.
    pub async fn update_record(
        &self,
        job_id: &str,
        f: impl FnOnce(Option<record::JobRecord>) -> Option<record::JobRecord>,
    ) -> Result<Option<record::JobRecord>, error::ApiError> {
        let Some((r, change)) = self.index.update(job_id, now_ms(), f) else {
            return Ok(None);
        };
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        jobs_kv::persist_retrying(
            &self.index,
            &self.jobs_kv,
            job_id,
            Some(give_up),
            &self.shutdown,
        )
        .await
        .map_err(error::ApiError::nats)?;
        ingest::announce(&self.hub, &self.results, job_id, &change);
        Ok(Some(r))
    }

    fn ingest(&self) -> ingest::Ingest<'_> {
        ingest::Ingest {
            index: &self.index,
            kv: &self.jobs_kv,
            hub: &self.hub,
            metrics: &self.metrics,
            results: &self.results,
            keys: self.registry.keys(),
            shutdown: &self.shutdown,
            load_unknown: false,
        }
    }

    fn watch(&self) -> stall::Watch<'_> {
        stall::Watch {
            index: &self.index,
            kv: &self.jobs_kv,
            registry: &self.registry,
            hub: &self.hub,
            results: &self.results,
            metrics: &self.metrics,
            client: &self.client,
            stall_timeout: self.cfg.stall_timeout,
            max_age: self.cfg.retention.max_age,
            shutdown: &self.shutdown,
        }
    }
}

/// Handler state.
pub type AppState = Arc<Shared>;

/// Answers 503 `timeout` when a request has not been answered within `http_timeout` (a
/// response's body, such as an SSE stream, is not limited).
async fn bounded(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = state.cfg.http_timeout();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error::ApiError::Timeout(format!(
            "central did not answer within {limit:?} (NATS slow or away?)"
        ))
        .into_response(),
    }
}

/// The HTTP routes (for `axum::serve`, or `tower::ServiceExt::oneshot` in tests).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/api/machines", get(api::machines))
        .route("/api/jobs", get(api::list_jobs).post(api::create_job))
        .route("/api/jobs/{id}", get(api::get_job).delete(api::delete_job))
        .route("/api/jobs/{id}/cancel", post(api::cancel_job))
        .route("/api/jobs/{id}/events", get(sse::job_events))
        .route("/api/jobs/{id}/{file}", get(api::export))
        .route("/api/events", get(sse::all_events))
        .route("/api/fingerprints/diff", get(fingerprints::diff))
        .route("/api/compare", get(runs_compare::compare))
        .route("/api", any(api::not_found))
        .route("/api/", any(api::not_found))
        .route("/api/{*rest}", any(api::not_found))
        .method_not_allowed_fallback(api::method_not_allowed)
        .fallback(api::static_files)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            leader::forward_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(auth::cors(&state.cfg.cors_origins))
        .layer(axum::middleware::from_fn_with_state(state.clone(), bounded))
        .with_state(state)
}

/// A running central.
pub struct CentralHandle {
    /// Where HTTP answers.
    pub addr: SocketAddr,
    /// Shared state (for tests and embedding).
    pub state: AppState,
    join: tokio::task::JoinHandle<()>,
}

impl CentralHandle {
    /// Waits until central has shut down (after the shutdown token fires).
    pub async fn join(self) {
        let _ = self.join.await;
    }
}

/// Checks NATS, sets up JetStream, loads the index and starts every task on `client` and
/// `listener`. Returns once it is serving; everything stops when `shutdown` fires.
pub async fn start(
    cfg: Config,
    client: async_nats::Client,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<CentralHandle, StartError> {
    store::wait_connected(&client, &cfg.nats.effective_url(), cfg.nats_wait).await?;
    let js = jetstream::new(client.clone());
    store::check_server(&client, &js).await?;
    let cluster = client.server_info().cluster;
    let assets =
        store::ensure_assets(&js, &cfg.retention, cfg.replicas, cluster.as_deref()).await?;
    let setup = |what: &str, e: async_nats::Error| StartError::Setup {
        what: what.into(),
        detail: e.to_string(),
    };
    // Leave room for the KV headers under the server's max_payload.
    let max_value = client.server_info().max_payload.max(64 * 1024) - 4096;
    let jobs_kv = jobs_kv::JobsKv::new(assets.jobs, assets.jobs_stream, max_value);
    let lease = leader::lease_bucket(&js, cfg.leader_ttl, cfg.replicas)
        .await
        .map_err(|e| setup(subjects::CENTRAL_BUCKET, e))?;
    let central_id = cfg.central_id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            config::host_id(),
            listener.local_addr().map_or(0, |a| a.port())
        )
    });
    // The follower's KV watch starts here: every later write is adopted (earlier ones are in
    // what load_all reads).
    let kv_from = jobs_kv
        .last_revision()
        .await
        .map_err(|e| setup(store::JOBS_BUCKET, e))?
        + 1;
    let index = index::Index::new(cfg.index_cache_jobs);
    let t0 = std::time::Instant::now();
    // In the order they were last written, so the cache keeps the most recently written.
    let n = jobs_kv
        .load_all(|r, revision| index.insert_loaded(r, revision))
        .await
        .map_err(|e| setup(store::JOBS_BUCKET, e))?;
    tracing::info!(
        jobs = n,
        in_memory = index.sizes().0,
        ms = t0.elapsed().as_millis() as u64,
        "index loaded"
    );
    let stream = assets.events;
    let agents_kv = assets.agents;
    let registry = registry::Registry::new(cfg.machines.clone());
    registry
        .keys()
        .open(&js, &agents_kv, cfg.signatures, shutdown.clone())
        .await
        .map_err(|e| setup(signing::KEYS_BUCKET, e))?;
    match tokio::time::timeout(std::time::Duration::from_secs(5), registry.load(&agents_kv)).await {
        Ok(Ok(n)) => tracing::info!(agents = n, "registry loaded"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the agent registry failed; it fills from the watch")
        }
        Err(_) => {
            tracing::warn!("reading the agent registry took over 5 s; it fills from the watch")
        }
    }
    let role = leader::Role::new(central_id.clone());
    let (held, holder) = leader::try_acquire(&lease, &role, cfg.leader_ttl / 5)
        .await
        .map_err(|e| setup(subjects::CENTRAL_BUCKET, e))?;
    role.set(held.is_some(), holder.clone());
    match &held {
        Some(_) => tracing::info!(%central_id, "holding the indexing lease: this central indexes"),
        None => {
            tracing::info!(%central_id, leader = ?holder.map(|h| h.central_id), "another central indexes: following it")
        }
    }
    let (results, results_rx) = results::Results::channel();
    let addr = listener.local_addr()?;
    let state = Arc::new(Shared {
        registry,
        hub: hub::Hub::new(cfg.sse_buffer),
        metrics: metrics::Metrics::default(),
        index,
        jobs_kv,
        results,
        stream,
        js,
        client,
        cfg,
        shutdown: shutdown.clone(),
        role,
    });
    results::backfill(&state);
    let tasks = vec![
        tokio::spawn(leader::run(state.clone(), lease, held, kv_from)),
        {
            let (s, token) = (state.clone(), shutdown.clone());
            tokio::spawn(
                async move { registry::watch(&s.registry, &s.hub, agents_kv, token).await },
            )
        },
        tokio::spawn(results::run(state.clone(), results_rx)),
    ];
    let http = {
        let app = app(state.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            // Streaming sockets: an event goes out at once, not after Nagle's delay.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };
    tracing::info!(%addr, web = %state.cfg.web_dir.display(), results = %state.cfg.results_dir.display(), "central ready");
    let join = tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("shutting down");
        for t in tasks {
            let _ = t.await;
        }
        let _ = http.await;
    });
    Ok(CentralHandle { addr, state, join })
}

/// Connects to NATS, binds `host:port` and runs until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = bench_nats::connect(&cfg.nats, "bench-central").await?;
    let bind = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| anyhow::anyhow!("binding {bind} (CENTRAL_HOST/CENTRAL_PORT): {e}"))?;
    let handle = start(cfg, client.clone(), listener, shutdown).await?;
    handle.join().await;
    let _ = client.drain().await;
    Ok(())
}
