//! The one definition of every JetStream asset, created idempotently by whoever starts first.

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

/// The `BENCH_EVENTS` stream definition.
pub fn events_stream_config(r: &EventsRetention) -> stream::Config {
    stream::Config {
        name: subjects::EVENTS_STREAM.to_string(),
        description: Some("bench-race: every event of every job".into()),
        subjects: vec![subjects::EVENTS_ALL.to_string()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: r.max_age,
        max_bytes: r.max_bytes,
        duplicate_window: r.duplicate_window,
        ..Default::default()
    }
}

/// Creates or updates `BENCH_EVENTS`.
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    r: &EventsRetention,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    let cfg = events_stream_config(r);
    js.create_or_update_stream(cfg.clone()).await?;
    js.get_stream(cfg.name).await.map_err(|e| {
        jetstream::context::CreateStreamError::with_source(
            jetstream::context::CreateStreamErrorKind::JetStreamUnavailable,
            e,
        )
    })
}

/// Opens `BENCH_EVENTS`, creating it only when missing (agents: their users may read stream
/// info but not define streams, which is central's job).
pub async fn open_or_create_events_stream(
    js: &jetstream::Context,
    r: &EventsRetention,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    if let Ok(s) = js.get_stream(subjects::EVENTS_STREAM).await {
        return Ok(s);
    }
    ensure_events_stream(js, r).await
}

/// How long a registry entry outlives its last heartbeat (the bucket's max age). Agents beat at
/// most every 5 s, so a live agent's entry never expires between beats.
pub const AGENTS_TTL: Duration = Duration::from_secs(15);

/// The `bench_agents` bucket: one key per machine, expiring `ttl` after the last heartbeat.
pub fn agents_bucket_config(ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: subjects::AGENTS_BUCKET.to_string(),
        description: "bench-race: agent heartbeats (key = machine_id)".into(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Opens `bench_agents`, creating it when missing.
pub async fn ensure_agents_bucket(
    js: &jetstream::Context,
    ttl: Duration,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    if let Ok(store) = js.get_key_value(subjects::AGENTS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(agents_bucket_config(ttl)).await
}
