//! bench-central: sends benchmark jobs to the fleet, keeps every event durably, turns them into
//! comparable results, and serves them over a REST API, Server-Sent Events and the web UI.
//!
//! Layout: [`config`] reads `machines.yaml` and the environment; [`store`] checks the NATS
//! server and creates the `BENCH_EVENTS` stream, the `bench_jobs` / `bench_agents` buckets and
//! the durable indexer consumer; [`registry`] follows the agents' heartbeats; [`dispatch`] sends
//! `POST /api/jobs` to `bench.jobs.<id>` or `bench.jobs.all`. Agents publish events to
//! `BENCH_EVENTS`; [`index`] consumes them in batches into [`record::JobRecord`]s (memory + KV,
//! idempotent by per-machine `seq`), fans each one out on the [`hub`], queues finished jobs for
//! [`results`] (`results/runs/<job_id>/`) and fails machines that went silent. [`compare`]
//! ranks machines; [`api`] serves the REST endpoints (guarded by [`auth`]: bearer token, CORS)
//! and [`sse`] the event streams, replaying
//! from the stream via [`replay`]. [`metrics`] renders `/metrics`; [`error`] maps failures to
//! HTTP. Nothing here calls an agent directly: everything goes through NATS.

pub mod api;
pub mod auth;
pub mod compare;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod hub;
pub mod index;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod replay;
pub mod results;
pub mod sse;
pub mod store;

use async_nats::jetstream;
use axum::routing::{any, get, post};
use axum::Router;
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
}

/// Handler state.
pub type AppState = Arc<Shared>;

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
        .route("/api/{*rest}", any(api::not_found))
        .fallback(api::static_files)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(auth::cors(&state.cfg.cors_origins))
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
    let (stream, jobs_kv, agents_kv) = store::ensure_assets(&js, &cfg.retention).await?;
    let setup = |what: &str, e: async_nats::Error| StartError::Setup {
        what: what.into(),
        detail: e.to_string(),
    };
    let index = index::Index::load(jobs_kv)
        .await
        .map_err(|e| setup(store::JOBS_BUCKET, e))?;
    let consumer = store::open_indexer(&stream)
        .await
        .map_err(|e| setup(store::INDEXER_CONSUMER, e))?;
    let (results, results_rx) = results::Results::channel();
    let addr = listener.local_addr()?;
    let state = Arc::new(Shared {
        registry: registry::Registry::new(cfg.machines.clone()),
        hub: hub::Hub::new(cfg.sse_buffer),
        metrics: metrics::Metrics::default(),
        index,
        results,
        stream,
        js,
        client,
        cfg,
        shutdown: shutdown.clone(),
    });
    results::backfill(&state);
    let tasks = vec![
        tokio::spawn(index::run(state.clone(), consumer)),
        tokio::spawn(index::stall_loop(state.clone())),
        tokio::spawn(registry::watch(state.clone(), agents_kv, shutdown.clone())),
        tokio::spawn(results::run(state.clone(), results_rx)),
    ];
    let http = {
        let app = app(state.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
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
