//! The one definition of every JetStream asset, created idempotently by whoever starts first,
//! and [`ensure_replicas`], which brings any existing stream (a KV bucket is the stream
//! `KV_<bucket>`) to the replica count its owner is configured with.

use async_nats::jetstream::{self, kv, stream};
use bench_schemas::subjects;
use std::time::Duration;

/// Retention of `BENCH_EVENTS`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsRetention {
    /// Drop events older than this.
    pub max_age: Duration,
    /// Cap on the stream's size in bytes.
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
}

impl Default for EventsRetention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

/// The `BENCH_EVENTS` stream definition, kept on `replicas` servers (1 on a single server).
pub fn events_stream_config(r: &EventsRetention, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects::EVENTS_STREAM.to_string(),
        description: Some("bench-race: every event of every job".into()),
        subjects: vec![subjects::EVENTS_ALL.to_string()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: r.max_age,
        max_bytes: r.max_bytes,
        duplicate_window: r.duplicate_window,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Creates or updates `BENCH_EVENTS` (an update sets `replicas` too).
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    r: &EventsRetention,
    replicas: usize,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    let cfg = events_stream_config(r, replicas);
    js.create_or_update_stream(cfg.clone()).await?;
    js.get_stream(cfg.name).await.map_err(|e| {
        jetstream::context::CreateStreamError::with_source(
            jetstream::context::CreateStreamErrorKind::JetStreamUnavailable,
            e,
        )
    })
}

/// Opens `BENCH_EVENTS`, creating it with `replicas` only when missing (agents: their users may
/// read stream info but not define streams, which is central's job; an existing stream keeps
/// its replica count).
pub async fn open_or_create_events_stream(
    js: &jetstream::Context,
    r: &EventsRetention,
    replicas: usize,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    if let Ok(s) = js.get_stream(subjects::EVENTS_STREAM).await {
        return Ok(s);
    }
    ensure_events_stream(js, r, replicas).await
}

/// How long a registry entry outlives its last heartbeat (the bucket's max age). Agents beat at
/// most every 5 s, so a live agent's entry never expires between beats.
pub const AGENTS_TTL: Duration = Duration::from_secs(15);

/// The `bench_agents` bucket: one key per machine, expiring `ttl` after the last heartbeat,
/// kept on `replicas` servers.
pub fn agents_bucket_config(ttl: Duration, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: subjects::AGENTS_BUCKET.to_string(),
        description: "bench-race: agent heartbeats (key = machine_id)".into(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Opens `bench_agents`, creating it with `replicas` when missing (an existing bucket keeps its
/// replica count: see [`ensure_replicas`]).
pub async fn ensure_agents_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    if let Ok(store) = js.get_key_value(subjects::AGENTS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(agents_bucket_config(ttl, replicas))
        .await
}

/// The stream behind KV bucket `bucket`.
pub fn kv_stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// A stream's replica count before and after [`ensure_replicas`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    /// What the stream had.
    pub found: usize,
    /// What it has now (the count asked for).
    pub now: usize,
}

impl Replicas {
    /// Whether the count had to change.
    pub fn changed(&self) -> bool {
        self.found != self.now
    }
}

/// Why [`ensure_replicas`] could not give a stream its replica count.
#[derive(Debug, thiserror::Error)]
pub enum ReplicasError {
    /// There is no such stream (create it first, with the count).
    #[error("stream {stream} does not exist")]
    NotFound {
        /// The stream.
        stream: String,
    },
    /// Its info could not be read (NATS away, no permission).
    #[error("reading stream {stream}: {detail}")]
    Info {
        /// The stream.
        stream: String,
        /// The error.
        detail: String,
    },
    /// The servers refused the count, or answered without applying it (too few JetStream
    /// servers in the cluster, a single server asked for more than 1).
    #[error(
        "stream {stream} has {found} replicas and the servers cannot make it {wanted}: {detail}"
    )]
    Placement {
        /// The stream.
        stream: String,
        /// Its count before.
        found: usize,
        /// The count asked for.
        wanted: usize,
        /// What the server said.
        detail: String,
    },
}

/// The replica count of an existing stream's config (0 means 1, as the server reads it).
async fn replicas_of(
    stream: &mut stream::Stream,
    name: &str,
) -> Result<(usize, stream::Config), ReplicasError> {
    let info = stream.info().await.map_err(|e| ReplicasError::Info {
        stream: name.to_string(),
        detail: e.to_string(),
    })?;
    Ok((info.config.num_replicas.max(1), info.config.clone()))
}

/// Brings the existing stream `stream_name` to `replicas` (a KV bucket: its stream,
/// [`kv_stream_name`]), changing nothing else in its config, and says what it found. The count
/// is checked after the update, so a server that answers without applying it is an error too,
/// never a silent R1; after a change it returns once every replica is placed and current (at
/// most [`REPLICAS_SETTLE`]).
pub async fn ensure_replicas(
    js: &jetstream::Context,
    stream_name: &str,
    replicas: usize,
) -> Result<Replicas, ReplicasError> {
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                ReplicasError::NotFound {
                    stream: stream_name.to_string(),
                }
            }
            _ => ReplicasError::Info {
                stream: stream_name.to_string(),
                detail: e.to_string(),
            },
        })?;
    let (found, config) = replicas_of(&mut stream, stream_name).await?;
    let placement = |detail: String| ReplicasError::Placement {
        stream: stream_name.to_string(),
        found,
        wanted: replicas,
        detail,
    };
    if found == replicas {
        return Ok(Replicas {
            found,
            now: replicas,
        });
    }
    js.update_stream(stream::Config {
        num_replicas: replicas,
        ..config
    })
    .await
    .map_err(|e| placement(e.to_string()))?;
    let (now, _) = replicas_of(&mut stream, stream_name).await?;
    if now != replicas {
        return Err(placement(format!("the server kept {now}")));
    }
    // Until the new peers are placed and current, the stream cannot take consumers of its own
    // replica count ("insufficient resources"): the caller's next step would fail.
    tracing::info!(
        stream = stream_name,
        found,
        now,
        "waiting for the stream's replicas to be placed and current"
    );
    let deadline = tokio::time::Instant::now() + REPLICAS_SETTLE;
    loop {
        let info = stream.info().await.map_err(|e| ReplicasError::Info {
            stream: stream_name.to_string(),
            detail: e.to_string(),
        })?;
        let settled = info.cluster.as_ref().map_or(replicas == 1, |c| {
            c.leader.is_some()
                && c.replicas.len() + 1 == replicas
                && c.replicas.iter().all(|p| p.current && !p.offline)
        });
        if settled {
            return Ok(Replicas { found, now });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(placement(format!(
                "set to {replicas}, but its replicas were not all placed and current within {REPLICAS_SETTLE:?} ({:?})",
                info.cluster
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long [`ensure_replicas`] waits for a changed stream's replicas to be placed and current.
pub const REPLICAS_SETTLE: Duration = Duration::from_secs(120);
