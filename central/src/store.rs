//! JetStream assets central owns: the start-up checks (connected, server >= 2.11, JetStream on),
//! the `BENCH_EVENTS` stream and buckets (created or updated idempotently), and the durable
//! indexer consumer.

use crate::error::StartError;
use async_nats::jetstream::{self, consumer, kv, stream};
use bench_schemas::subjects;
use std::time::Duration;

/// KV bucket of indexed jobs (key = job_id, value = [`crate::record::JobRecord`] JSON).
pub const JOBS_BUCKET: &str = bench_schemas::subjects::JOBS_BUCKET;
/// The durable consumer that indexes `BENCH_EVENTS`.
pub const INDEXER_CONSUMER: &str = bench_schemas::subjects::INDEXER_CONSUMER;
/// Oldest server central runs against.
pub const MIN_SERVER_VERSION: &str = "2.11.0";
/// Max age of `bench_agents` entries when central creates the bucket first: three of the
/// agents' default 5 s heartbeats, as the agent would create it.
pub const AGENTS_TTL: Duration = bench_nats::streams::AGENTS_TTL;

/// Waits until the client is connected.
pub async fn wait_connected(
    client: &async_nats::Client,
    url: &str,
    wait: Duration,
) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + wait;
    // The client reconnects on its own; start-up only needs to know when it got there.
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::NatsUnreachable {
                url: url.to_string(),
                secs: wait.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim().trim_start_matches('v').split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Refuses servers older than [`MIN_SERVER_VERSION`].
pub fn check_version(version: &str) -> Result<(), StartError> {
    let min = parse_version(MIN_SERVER_VERSION).expect("constant parses");
    match parse_version(version) {
        Some(v) if v >= min => Ok(()),
        _ => Err(StartError::ServerTooOld {
            version: version.to_string(),
            min: MIN_SERVER_VERSION,
        }),
    }
}

/// Checks the connected server: version and JetStream.
pub async fn check_server(
    client: &async_nats::Client,
    js: &jetstream::Context,
) -> Result<(), StartError> {
    let info = client.server_info();
    check_version(&info.version)?;
    if !info.jetstream {
        return Err(StartError::JetStreamOff(
            "the server announces no JetStream".into(),
        ));
    }
    js.query_account()
        .await
        .map_err(|e| StartError::JetStreamOff(e.to_string()))?;
    Ok(())
}

fn setup(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Setup {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

/// The `bench_jobs` bucket definition: records age out with the events they index.
pub fn jobs_bucket_config(max_age: Duration) -> kv::Config {
    kv::Config {
        bucket: JOBS_BUCKET.to_string(),
        description: "bench-race: indexed jobs (key = job_id)".into(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The assets central works on.
pub struct Assets {
    /// `BENCH_EVENTS`.
    pub events: stream::Stream,
    /// `bench_jobs`.
    pub jobs: kv::Store,
    /// The stream behind `bench_jobs`.
    pub jobs_stream: stream::Stream,
    /// `bench_agents`.
    pub agents: kv::Store,
}

/// Creates or updates the stream and both buckets (an existing jobs bucket gets the
/// configured max age).
pub async fn ensure_assets(
    js: &jetstream::Context,
    retention: &bench_nats::streams::EventsRetention,
) -> Result<Assets, StartError> {
    let events = bench_nats::streams::ensure_events_stream(js, retention)
        .await
        .map_err(|e| setup(subjects::EVENTS_STREAM, e))?;
    let jobs = match js.get_key_value(JOBS_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jobs_bucket_config(retention.max_age))
            .await
            .map_err(|e| setup(JOBS_BUCKET, e))?,
    };
    let stream_name = format!("KV_{JOBS_BUCKET}");
    let mut jobs_stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| setup(JOBS_BUCKET, e))?;
    let config = jobs_stream
        .info()
        .await
        .map_err(|e| setup(JOBS_BUCKET, e))?
        .config
        .clone();
    if config.max_age != retention.max_age {
        tracing::info!(from = ?config.max_age, to = ?retention.max_age, "updating the max age of {JOBS_BUCKET}");
        js.update_stream(stream::Config {
            max_age: retention.max_age,
            ..config
        })
        .await
        .map_err(|e| setup(JOBS_BUCKET, e))?;
    }
    let agents = bench_nats::streams::ensure_agents_bucket(js, AGENTS_TTL)
        .await
        .map_err(|e| setup(subjects::AGENTS_BUCKET, e))?;
    Ok(Assets {
        events,
        jobs,
        jobs_stream,
        agents,
    })
}

/// The indexer's durable consumer definition, starting after `ack_floor`.
pub fn indexer_config(ack_floor: Option<u64>) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(INDEXER_CONSUMER.to_string()),
        description: Some("bench-central: indexes every event into bench_jobs".into()),
        filter_subject: subjects::EVENTS_ALL.to_string(),
        ack_policy: consumer::AckPolicy::All,
        deliver_policy: match ack_floor {
            Some(floor) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: floor + 1,
            },
            None => consumer::DeliverPolicy::All,
        },
        ack_wait: Duration::from_secs(60),
        // Ingestion acknowledges every FLUSH_EVERY or ACK_EVERY messages (AckPolicy::All).
        max_ack_pending: 4 * crate::ingest::ACK_EVERY as i64,
        ..Default::default()
    }
}

/// Opens the indexer consumer so that delivery restarts right after the last acknowledged
/// event, in stream order.
///
/// Why recreate it: messages a previous run received but never acknowledged (it was stopped or
/// killed mid-batch, or an ack was lost to a NATS restart) would otherwise come back only after
/// `ack_wait`, behind newer ones; the index relies on per-machine order, so a restart resumes
/// from the ack floor instead. Only central uses this consumer, and only at these points.
pub async fn open_indexer(
    events: &stream::Stream,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let floor = match events.consumer_info(INDEXER_CONSUMER).await {
        Ok(info) => Some(info.ack_floor.stream_sequence),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if floor.is_some() {
        events.delete_consumer(INDEXER_CONSUMER).await?;
    }
    tracing::info!(resume_after = floor.unwrap_or(0), "indexer consumer ready");
    Ok(events.create_consumer(indexer_config(floor)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["2.11.0", "2.15.1", "v2.12.3-beta", "3.0.0"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for old in ["2.9.10", "2.10.25", "", "x"] {
            assert!(
                matches!(check_version(old), Err(StartError::ServerTooOld { .. })),
                "{old}"
            );
        }
    }
}
