//! bench-agent: takes benchmark jobs off NATS, runs them on a local inference engine and
//! streams exact results back. It only dials out: nothing ever connects to an agent.
//!
//! Layout: [`config`] reads and validates `agent.yaml`; [`backend`] talks to engines (Ollama,
//! OpenAI-compatible, mock) behind one trait; [`intake`] answers jobs arriving on
//! `bench.jobs.<machine_id>` / `bench.jobs.all` (via the `bench-agent` micro service) and
//! cancels on `bench.cancel.*`, queueing accepted jobs in [`queue`]; [`runner`] runs them one at
//! a time, timing every chunk with [`measure`]; events go through [`emit`] (one run per
//! acceptance, gapless seq) into a bounded queue to [`publisher`] (JetStream, in order and
//! stored once by `Nats-Msg-Id`, a window of acks in flight); [`heartbeat`] keeps the
//! `bench_agents` KV entry fresh; [`models`] caches engine model lists and keeps list requests
//! off an engine that is running a job; [`http`] serves `/health` and `/capabilities` locally.

pub mod backend;
pub mod config;
pub mod emit;
pub mod fingerprint;
pub mod heartbeat;
pub mod http;
pub mod intake;
pub mod measure;
pub mod models;
pub mod publisher;
pub mod queue;
pub mod race;
pub mod runner;
pub mod shape;
pub mod telemetry;

use anyhow::Context as _;
use async_nats::service::ServiceExt;
use backend::{mock::Mock, ollama::Ollama, openai::OpenAi, DynBackend};
use bench_schemas::{subjects, ErrorBody, ErrorCode, Hardware, Job};
use config::{Config, EngineKind};
use futures::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Models of each engine described at start (more are described at their first job).
const MAX_DESCRIBED_AT_START: usize = 16;

/// This agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by the agent's tasks.
pub struct Shared {
    /// Validated config.
    pub cfg: Config,
    /// The NATS connection.
    pub client: async_nats::Client,
    /// Configured backends; the first is the default.
    pub backends: Vec<DynBackend>,
    /// The job queue.
    pub queue: queue::JobQueue,
    /// Event publisher.
    pub publisher: publisher::Publisher,
    /// Model lists.
    pub models: models::ModelCatalog,
    /// Machine facts.
    pub hardware: Hardware,
    /// What each engine and model said about itself last.
    pub described: fingerprint::Described,
    /// Samples the machine during jobs.
    pub telemetry: telemetry::sampler::Telemetry,
    /// Random per process (12 hex digits): run ids are `<boot_id>-<n>`, and the heartbeat
    /// carries it so that central can tell a restarted agent (whose runs are lost) from a
    /// busy one.
    pub boot_id: String,
    /// The (engine address, model) of the last run started: a job on anything else begins
    /// with a cold request where the engine cannot say what it has loaded.
    pub last_model: std::sync::Mutex<Option<(String, String)>>,
}

impl Shared {
    /// The default backend.
    pub fn default_backend(&self) -> DynBackend {
        self.backends[0].clone()
    }

    /// The backend a job asks for (its `backend`, else the default).
    pub fn backend_for(&self, job: &Job) -> Result<DynBackend, ErrorBody> {
        match &job.backend {
            None => Ok(self.default_backend()),
            Some(name) => self
                .backends
                .iter()
                .find(|b| b.kind() == name)
                .cloned()
                .ok_or_else(|| {
                    let have: Vec<_> = self.backends.iter().map(|b| b.kind()).collect();
                    ErrorBody::new(
                        ErrorCode::UnknownBackend,
                        format!(
                            "backend {name:?} is not configured on this agent; it has {have:?}"
                        ),
                    )
                }),
        }
    }
}

/// The backends a config asks for, default first. Mock only when configured explicitly.
pub fn backends_from_config(cfg: &Config) -> Vec<DynBackend> {
    let ollama = cfg
        .ollama_base_url
        .as_ref()
        .map(|u| Arc::new(Ollama::new(u.clone())) as DynBackend);
    let openai = cfg.openai_base_url.as_ref().map(|u| {
        Arc::new(
            OpenAi::new(u.clone(), cfg.openai_api_key.clone())
                .with_extra_body(cfg.openai_extra_body.clone())
                .with_ignore_eos(cfg.openai_ignore_eos),
        ) as DynBackend
    });
    let mock = Some(Arc::new(Mock::new(cfg.mock.clone(), cfg.llm_models.clone())) as DynBackend);
    let order = match cfg.engine {
        EngineKind::Ollama => [ollama, openai, None],
        EngineKind::Openai => [openai, ollama, None],
        EngineKind::Mock => [mock, ollama, openai],
    };
    order.into_iter().flatten().collect()
}

/// A started agent.
pub struct AgentHandle {
    /// Where `/health` answers.
    pub http_addr: SocketAddr,
    /// Shared state (for tests and embedding).
    pub shared: Arc<Shared>,
    join: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    /// Waits until the agent has shut down (after the shutdown token fires).
    pub async fn join(self) {
        let Self { join, shared, .. } = self;
        // The publisher finishes once every handle on the shared state is gone.
        drop(shared);
        let _ = join.await;
    }
}

/// Starts an agent on `client`: subscriptions are live when this returns.
pub async fn start(
    cfg: Config,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<AgentHandle> {
    let machine_id = cfg.machine_id.clone();
    // With retry_on_initial_connect the client may still be dialling: give it a moment, and say
    // so when NATS is away (the agent still comes up, and subscribes once it connects).
    if !bench_nats::wait_connected(&client, Duration::from_secs(10)).await {
        tracing::warn!(url = %cfg.nats.effective_url(), "NATS not reachable yet; jobs will arrive once it is");
    }
    let backends = backends_from_config(&cfg);
    let boot_id = new_boot_id();
    let signer = publisher::Signer::load(&cfg).context("loading the event signing key")?;
    tracing::info!(public = signer.public_key(), source = ?signer.source(), "events are signed");
    let publisher_cfg = publisher::PublisherConfig {
        nats: cfg.nats.clone(),
        name: format!("bench-agent:{machine_id}:events"),
        window: cfg.publish_window,
        queue: cfg.max_event_queue,
    };
    let (publisher, publisher_task) = publisher::Publisher::spawn_signed(publisher_cfg, signer);

    // The stream is normally central's; creating it here too means events are kept even when
    // central has never run. Best effort: a server without JetStream still gets live events.
    let js = async_nats::jetstream::new(client.clone());
    match tokio::time::timeout(
        Duration::from_secs(5),
        bench_nats::streams::open_or_create_events_stream(&js, &Default::default(), 1),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not create the {} stream", subjects::EVENTS_STREAM)
        }
        Err(_) => tracing::warn!(
            "NATS not answering yet; the {} stream is not checked",
            subjects::EVENTS_STREAM
        ),
    }

    // Probing GPUs may load a driver library or run a tool: off the async threads.
    let accelerator = cfg.accelerator.clone();
    let telemetry_cfg = cfg.telemetry.clone();
    let (hardware, telemetry) = tokio::task::spawn_blocking(move || {
        (
            fingerprint::hardware::hardware(accelerator),
            telemetry::sampler::Telemetry::new(&telemetry_cfg),
        )
    })
    .await
    .context("reading the machine's facts")?;
    for m in telemetry.missing() {
        tracing::info!(source = %m.source, reason = %m.reason, "telemetry source not available");
    }
    let shared = Arc::new(Shared {
        hardware,
        telemetry,
        described: fingerprint::Described::default(),
        queue: queue::JobQueue::new(cfg.max_queue),
        models: models::ModelCatalog::new(cfg.engine_models_refresh),
        publisher,
        boot_id,
        last_model: std::sync::Mutex::new(None),
        backends,
        client: client.clone(),
        cfg,
    });

    let default = shared.default_backend();
    let metadata = HashMap::from([
        ("machine_id".to_string(), machine_id.clone()),
        ("label".to_string(), shared.cfg.label.clone()),
        ("engine".to_string(), default.kind().to_string()),
    ]);
    let service = client
        .service_builder()
        .description(format!("{} ({machine_id})", shared.cfg.label))
        .metadata(metadata)
        .queue_group(machine_id.clone())
        .start(subjects::SERVICE_NAME, VERSION)
        .await
        .map_err(|e| anyhow::anyhow!("registering the {} service: {e}", subjects::SERVICE_NAME))?;
    let jobs = service
        .endpoint_builder()
        .name("jobs")
        .add(subjects::jobs(&machine_id))
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {}: {e}", subjects::jobs(&machine_id)))?;
    let broadcast = service
        .endpoint_builder()
        .name("broadcast")
        .add(subjects::JOBS_ALL)
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {}: {e}", subjects::JOBS_ALL))?;
    let cancels = client
        .subscribe(subjects::CANCEL_ALL)
        .await
        .context("subscribing to cancels")?;
    // Make sure the server has processed the subscriptions before this returns (a flush only
    // writes them to the socket: a job published right after could still find no responders).
    bench_nats::round_trip(&client, Duration::from_secs(5)).await;

    let listener =
        tokio::net::TcpListener::bind((shared.cfg.bind_host.as_str(), shared.cfg.bind_port))
            .await
            .with_context(|| {
                format!(
            "binding the local HTTP port {}:{} (bind_host/bind_port, AGENT_HOST/AGENT_PORT)",
            shared.cfg.bind_host, shared.cfg.bind_port
        )
            })?;
    let http_addr = listener.local_addr()?;

    let worker = tokio::spawn(runner::worker(shared.clone(), shutdown.clone()));
    // The registry shows each engine's identity from the start, and the first job of an
    // offered model already has its fingerprint in job_accepted: asked once here, while the
    // engine is leased (no job runs meanwhile; a job arriving now waits for it).
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            for b in shared.backends.clone() {
                let models = shared.models.offered(&*b, &shared.cfg.llm_models).await;
                let _engine = shared.models.lease(b.kind()).await;
                let budget = shared.cfg.engine_idle_timeout;
                shared.described.refresh_engine(&*b, budget).await;
                for m in models.iter().take(MAX_DESCRIBED_AT_START) {
                    shared.described.refresh(&*b, m, budget).await;
                }
            }
        });
    }
    let beat = tokio::spawn(heartbeat::run(shared.clone(), shutdown.clone()));
    let http = {
        let app = http::app(shared.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        })
    };
    let intake_shared = shared.clone();
    let intake_shutdown = shutdown.clone();
    let intake = tokio::spawn(async move {
        let mut requests = futures::stream::select(jobs, broadcast);
        let mut cancels = cancels;
        loop {
            tokio::select! {
                _ = intake_shutdown.cancelled() => break,
                Some(req) = requests.next() => {
                    let msg = &req.message;
                    let reply = msg.reply.as_ref().map(|r| r.to_string());
                    if let Some(answer) = intake::handle_job(&intake_shared, &msg.subject, reply.as_deref(), &msg.payload).await {
                        intake::answer(&req, &answer).await;
                    }
                }
                Some(msg) = cancels.next() => intake::handle_cancel(&intake_shared, &msg.subject),
            }
        }
        let _ = service.stop().await;
    });

    tracing::info!(%machine_id, boot_id = %shared.boot_id, engine = default.kind(), engine_url = default.base_url(), %http_addr, "agent ready");

    let shared_for_join = shared.clone();
    let join = tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("shutting down");
        let _ = intake.await;
        for ctx in shared_for_join.queue.drain() {
            ctx.finish(bench_schemas::EventKind::JobCancelled(
                bench_schemas::event::Cancelled {
                    repeat_index: None,
                    reason: "agent shutting down".into(),
                },
            ));
        }
        let _ = worker.await;
        let _ = beat.await;
        let _ = http.await;
        let client = shared_for_join.client.clone();
        drop(shared_for_join);
        // The publisher ends once every handle is gone and its queue is empty.
        let _ = tokio::time::timeout(Duration::from_secs(10), publisher_task).await;
        let _ = client.drain().await;
    });
    Ok(AgentHandle {
        http_addr,
        shared,
        join,
    })
}

/// A new boot id: 12 random hex digits.
fn new_boot_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(12);
    id
}

/// Connects to NATS with the config's settings and runs until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let name = format!("bench-agent:{}", cfg.machine_id);
    let client = bench_nats::connect_with_capacity(
        &cfg.nats,
        &name,
        Some(bench_nats::connect::AGENT_SUBSCRIPTION_CAPACITY),
    )
    .await?;
    start(cfg, client, shutdown).await?.join().await;
    Ok(())
}

/// An agent run in-process (tests, benchmarks, embedding): it connects with its own config's
/// NATS settings and stops when dropped.
pub struct LocalAgent {
    handle: Option<AgentHandle>,
    token: CancellationToken,
}

impl LocalAgent {
    /// Connects and starts; subscriptions are live when this returns.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let name = format!("bench-agent:{}", cfg.machine_id);
        let client = bench_nats::connect_with_capacity(
            &cfg.nats,
            &name,
            Some(bench_nats::connect::AGENT_SUBSCRIPTION_CAPACITY),
        )
        .await?;
        let token = CancellationToken::new();
        let handle = start(cfg, client, token.clone()).await?;
        Ok(Self {
            handle: Some(handle),
            token,
        })
    }

    /// Where `/health` answers.
    pub fn http_addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("running").http_addr
    }

    /// Shuts down and waits for it (idempotent).
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.join().await;
        }
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
