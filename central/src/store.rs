//! JetStream assets central owns: the start-up checks (connected, server >= 2.11, JetStream on),
//! the `BENCH_EVENTS` stream and buckets (created or updated idempotently, each kept on the
//! configured number of servers: `replicas`), and the durable indexer consumer.

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

/// What start-up found and did about one asset's replica count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetReplicas {
    /// The stream (a bucket's is `KV_<bucket>`).
    pub stream: String,
    /// Its count before start-up touched it (None: it did not exist, and was created).
    pub found: Option<usize>,
    /// Its count now: the configured one.
    pub now: usize,
}

impl AssetReplicas {
    /// The start-up log line: `BENCH_EVENTS: replicas 1 -> 3`, `... replicas 3 (as
    /// configured)`, `... created with replicas 3`.
    pub fn describe(&self) -> String {
        match self.found {
            None => format!("{}: created with replicas {}", self.stream, self.now),
            Some(f) if f == self.now => {
                format!("{}: replicas {} (as configured)", self.stream, self.now)
            }
            Some(f) => format!("{}: replicas {f} -> {}", self.stream, self.now),
        }
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
    /// Each asset's replica count, before and now (events, jobs, agents).
    pub replicas: Vec<AssetReplicas>,
}

/// A start-up error that names the `replicas` key and the fix.
fn replicas_error(what: &str, replicas: usize, e: impl std::fmt::Display) -> StartError {
    StartError::Setup {
        what: format!("{what} with replicas: {replicas}"),
        detail: format!(
            "{e}. Fix: `replicas: {replicas}` (or CENTRAL_REPLICAS) needs a NATS cluster of at \
             least {replicas} JetStream servers; on a single nats-server set `replicas: 1` \
             (the default), or start a cluster (scripts/nats cluster start) and list its URLs \
             in NATS_URL"
        ),
    }
}

/// Brings an existing stream to `replicas`; None when it does not exist yet.
async fn existing_replicas(
    js: &jetstream::Context,
    what: &str,
    stream: &str,
    replicas: usize,
) -> Result<Option<bench_nats::streams::Replicas>, StartError> {
    match bench_nats::streams::ensure_replicas(js, stream, replicas).await {
        Ok(r) => Ok(Some(r)),
        Err(bench_nats::streams::ReplicasError::NotFound { .. }) => Ok(None),
        Err(e @ bench_nats::streams::ReplicasError::Placement { .. }) => {
            Err(replicas_error(what, replicas, e))
        }
        Err(e) => Err(setup(what, e)),
    }
}

/// Refuses `replicas` > 1 on a server that is not in a cluster, before anything is touched.
fn check_clustered(client_cluster: Option<&str>, replicas: usize) -> Result<(), StartError> {
    if replicas > 1 && client_cluster.is_none_or(str::is_empty) {
        return Err(replicas_error(
            "JetStream",
            replicas,
            "the connected nats-server is not part of a cluster",
        ));
    }
    Ok(())
}

/// Creates or updates the stream and both buckets with `replicas` each (an existing jobs
/// bucket also gets the configured max age; an existing asset with another replica count is
/// changed to `replicas`, and each asset's outcome is logged and returned). `cluster` is the
/// connected server's cluster name (`server_info().cluster`).
pub async fn ensure_assets(
    js: &jetstream::Context,
    retention: &bench_nats::streams::EventsRetention,
    replicas: usize,
    cluster: Option<&str>,
) -> Result<Assets, StartError> {
    check_clustered(cluster, replicas)?;
    let mut outcomes = Vec::new();
    let mut note = |stream: &str, found: Option<bench_nats::streams::Replicas>| {
        let r = AssetReplicas {
            stream: stream.to_string(),
            found: found.map(|r| r.found),
            now: replicas,
        };
        tracing::info!(stream, found = ?r.found, now = r.now, "{}", r.describe());
        outcomes.push(r);
    };

    let events_name = subjects::EVENTS_STREAM;
    let before = existing_replicas(js, events_name, events_name, replicas).await?;
    let events = bench_nats::streams::ensure_events_stream(js, retention, replicas)
        .await
        .map_err(|e| match replicas {
            1 => setup(events_name, e),
            _ => replicas_error(events_name, replicas, e),
        })?;
    note(events_name, before);

    let stream_name = bench_nats::streams::kv_stream_name(JOBS_BUCKET);
    let before = existing_replicas(js, JOBS_BUCKET, &stream_name, replicas).await?;
    let jobs = match js.get_key_value(JOBS_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                num_replicas: replicas,
                ..jobs_bucket_config(retention.max_age)
            })
            .await
            .map_err(|e| match replicas {
                1 => setup(JOBS_BUCKET, e),
                _ => replicas_error(JOBS_BUCKET, replicas, e),
            })?,
    };
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
    note(&stream_name, before);

    let agents_name = bench_nats::streams::kv_stream_name(subjects::AGENTS_BUCKET);
    let before = existing_replicas(js, subjects::AGENTS_BUCKET, &agents_name, replicas).await?;
    let agents = bench_nats::streams::ensure_agents_bucket(js, AGENTS_TTL, replicas)
        .await
        .map_err(|e| match replicas {
            1 => setup(subjects::AGENTS_BUCKET, e),
            _ => replicas_error(subjects::AGENTS_BUCKET, replicas, e),
        })?;
    // An agent may have created the bucket between the check and here, with its own count.
    let before = match before {
        Some(b) => Some(b),
        None => existing_replicas(js, subjects::AGENTS_BUCKET, &agents_name, replicas)
            .await?
            .filter(|r| r.changed()),
    };
    note(&agents_name, before);
    Ok(Assets {
        events,
        jobs,
        jobs_stream,
        agents,
        replicas: outcomes,
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
