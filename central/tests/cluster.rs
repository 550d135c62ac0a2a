//! A three-node NATS cluster under central and three agents: central keeps `BENCH_EVENTS` and
//! its buckets on 3 servers (`replicas: 3`); the stream's leader is SIGKILLed mid-race, and the
//! race still completes with every event stored exactly once, central's record and an SSE
//! client agreeing with the stream, and the killed server catching up once restarted. Also:
//! existing R1 assets are scaled to R3 at start-up, and `replicas: 3` on a single server is a
//! clear start-up error.

mod common;
// For its reader of the whole stream.
#[allow(unused_imports)]
#[path = "common/procs.rs"]
mod procs;

use async_nats::jetstream::{self, stream};
use bench_central::config::Config;
use bench_central::error::StartError;
use bench_central::store::{self, AssetReplicas, JOBS_BUCKET};
use bench_nats::harness::NatsCluster;
use bench_nats::streams::{kv_stream_name, EventsRetention};
use bench_nats::NatsConfig;
use bench_schemas::subjects;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const MODEL: &str = "mock-7b";
/// Slow enough that the race outlives a leader election (a few seconds) by a margin.
const TOKENS_PER_S: f64 = 25.0;
const MAX_TOKENS: u64 = 200;
const MACHINES: [&str; 3] = ["m1", "m2", "m3"];
/// Bound on anything cluster-wide (an election, a catch-up, the whole race).
const CLUSTER_WAIT: Duration = Duration::from_secs(90);

/// A client of the whole cluster, connected as the programs connect (a URL list, reconnecting).
async fn cluster_client(urls: &str, name: &str) -> async_nats::Client {
    let cfg = NatsConfig {
        url: Some(urls.to_string()),
        ..Default::default()
    };
    let client = within("nats connect", WAIT, bench_nats::connect(&cfg, name))
        .await
        .expect("connects");
    assert!(
        bench_nats::wait_connected(&client, WAIT).await,
        "connected to one of {urls}"
    );
    client
}

/// Central started in-process on its config's URL list (as `bench-central` connects).
async fn start_central_on(cfg: Config) -> Result<TestCentral, StartError> {
    let client = cluster_client(&cfg.nats.effective_url(), "bench-central").await;
    common::start_central_on(cfg, client).await
}

/// Stream info, retried until the cluster answers (an election may be under way).
async fn info(js: &jetstream::Context, name: &str) -> stream::Info {
    within(&format!("{name} info"), CLUSTER_WAIT, async {
        loop {
            if let Ok(mut s) = js.get_stream(name).await {
                if let Ok(i) = s.info().await {
                    return i.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Polls stream info until `ok` holds; returns it and how long that took.
async fn info_when(
    js: &jetstream::Context,
    name: &str,
    what: &str,
    ok: impl Fn(&stream::Info) -> bool,
) -> (stream::Info, Duration) {
    let t0 = Instant::now();
    within(what, CLUSTER_WAIT, async {
        loop {
            let i = info(js, name).await;
            if ok(&i) {
                return (i, t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Every replica of the stream is current, online and without lag (the leader is not among
/// `replicas`; `peers` are the followers' names).
fn all_current(i: &stream::Info, peers: usize) -> bool {
    i.cluster.as_ref().is_some_and(|c| {
        c.leader.is_some()
            && c.replicas.len() == peers
            && c.replicas
                .iter()
                .all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0)
    })
}

fn leader_of(i: &stream::Info) -> Option<String> {
    i.cluster.as_ref().and_then(|c| c.leader.clone())
}

/// `BENCH_EVENTS` as node `node` holds it locally (its `/jsz`): (messages, last sequence).
fn local_state(cluster: &NatsCluster, node: usize) -> Option<(u64, u64)> {
    let (status, body) = cluster.monitor(node, "/jsz?streams=true")?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == subjects::EVENTS_STREAM)
        .map(|s| {
            (
                s["state"]["messages"].as_u64().unwrap_or(0),
                s["state"]["last_seq"].as_u64().unwrap_or(0),
            )
        })
}

/// The job once it is no longer running; past [`CLUSTER_WAIT`], a failure that shows the record,
/// the stream and the indexer consumer.
async fn finished_or_dump(
    base: &str,
    job_id: &str,
    js: &jetstream::Context,
    nc: &async_nats::Client,
    agent_healths: &[String],
) -> Value {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let (status, v) = get(base, &format!("/api/jobs/{job_id}")).await;
        if status == 200 && v["status"] != "running" {
            return v;
        }
        if Instant::now() > deadline {
            let i = info(js, subjects::EVENTS_STREAM).await;
            let consumer = match js.get_stream(subjects::EVENTS_STREAM).await {
                Ok(s) => format!("{:?}", s.consumer_info(store::INDEXER_CONSUMER).await),
                Err(e) => e.to_string(),
            };
            let (_, health) = get(base, "/health").await;
            let mut agents = String::new();
            for url in agent_healths {
                let (_, h) = get(url, "").await;
                agents.push_str(&format!("{}\n", h["publisher"]));
            }
            let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for s in procs::read_stream(nc).await {
                seqs.entry(format!("{}", s.event["machine_id"]))
                    .or_default()
                    .push(s.event["seq"].as_u64().unwrap_or(0));
            }
            let machines: Vec<_> = v["machines"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    (
                        m["machine_id"].clone(),
                        m["status"].clone(),
                        m["last_seq"].clone(),
                        m["events"].clone(),
                    )
                })
                .collect();
            panic!(
                "the race did not complete in {CLUSTER_WAIT:?}: machines {machines:?}\nstream {:?} cluster {:?}\nindexer {consumer}\ncentral {health}\nagents' publishers {agents}\nstored seqs {seqs:?}",
                i.state, i.cluster
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the job's SSE stream to its `end`, reconnecting with `Last-Event-ID` when the
/// connection closes first; returns the frames (end included) and how often it reconnected.
async fn sse_to_end(url: String) -> (Vec<Frame>, u32) {
    let mut frames: Vec<Frame> = Vec::new();
    let mut reconnects = 0;
    loop {
        let last = frames.iter().rev().find_map(|f| f.id);
        let mut sse = Sse::open(&url, last).await;
        assert_eq!(sse.status, 200, "SSE status");
        while let Some(f) = sse.next().await {
            let end = f.event == "end";
            let lagged = f.event == "lagged";
            if !lagged {
                frames.push(f);
            }
            if end {
                return (frames, reconnects);
            }
            if lagged {
                break;
            }
        }
        reconnects += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_survives_killing_the_events_stream_leader() {
    let t_test = Instant::now();
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&urls, dir.path());
    cfg.replicas = 3;
    let central = start_central_on(cfg).await.expect("central starts on R3");
    let base = central.base();

    // Central's start-up created the stream and both buckets on all three servers.
    let nc = cluster_client(&urls, "test").await;
    let js = jetstream::new(nc.clone());
    for name in [
        subjects::EVENTS_STREAM.to_string(),
        kv_stream_name(JOBS_BUCKET),
        kv_stream_name(subjects::AGENTS_BUCKET),
    ] {
        let (i, _) = info_when(&js, &name, "R3 asset with both followers", |i| {
            i.cluster.as_ref().is_some_and(|c| c.replicas.len() == 2)
        })
        .await;
        assert_eq!(i.config.num_replicas, 3, "{name}");
    }

    // Three agents, each publishing first to a different server: the list starts at its own
    // (the publisher tries the URLs in order; the others are where it fails over to).
    let mut agents = Vec::new();
    for (i, id) in MACHINES.iter().enumerate() {
        let list: Vec<String> = (0..3).map(|k| cluster.url((i + k) % 3)).collect();
        agents.push(mock_agent(id, MODEL, TOKENS_PER_S, &list.join(",")).await);
    }
    machines_online(&base, &MACHINES).await;

    let job_id = "failover-1";
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"job_id": job_id, "machines": MACHINES, "model": MODEL, "prompt": "hi",
                "max_tokens": MAX_TOKENS}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    let t_race = Instant::now();
    let sse = tokio::spawn(sse_to_end(format!("{base}/api/jobs/{job_id}/events")));

    // Mid-race: every machine has streamed some tokens.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v) = get(&base, &format!("/api/jobs/{job_id}")).await;
        let ms = v["machines"].as_array().cloned().unwrap_or_default();
        if ms.len() == 3 && ms.iter().all(|m| m["last_seq"].as_u64() >= Some(10)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no tokens from every machine in {WAIT:?}: {:?} (accepts: {out})",
            ms.iter()
                .map(|m| (
                    m["machine_id"].clone(),
                    m["status"].clone(),
                    m["last_seq"].clone(),
                    m["error"].clone()
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = info(&js, subjects::EVENTS_STREAM).await;
    let old_leader = leader_of(&before).expect("the stream has a leader");
    let victim = cluster.node_of(&old_leader).expect("the leader is a node");
    let central_on = central.client.server_info().server_name;
    let t_kill = Instant::now();
    let kill_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let killed_at = t_race.elapsed();
    cluster.kill(victim);

    // The election as the new leader dates it (the info requests themselves may wait out a
    // JetStream API timeout while there is no leader).
    let (elected, _) = info_when(&js, subjects::EVENTS_STREAM, "a new stream leader", |i| {
        leader_of(i).is_some_and(|l| l != old_leader)
    })
    .await;
    let since = elected.cluster.as_ref().and_then(|c| c.leader_since);
    let election = since
        .map(|t| Duration::from_nanos((t.unix_timestamp_nanos() - kill_unix_ns).max(0) as u64));
    let new_leader = leader_of(&elected).unwrap();
    let healths: Vec<String> = agents
        .iter()
        .map(|a| format!("http://{}/health", a.http_addr()))
        .collect();
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let i = info(&js, subjects::EVENTS_STREAM).await;
        if i.state.last_sequence > before.state.last_sequence {
            break;
        }
        if Instant::now() > deadline {
            let mut publishers = Vec::new();
            for url in &healths {
                publishers.push(get(url, "").await.1["publisher"].to_string());
            }
            panic!(
                "no event stored in {CLUSTER_WAIT:?} after the kill: stream {:?} {:?}; agents' publishers {publishers:#?}",
                i.state, i.cluster
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = t_kill.elapsed();

    let done = finished_or_dump(&base, job_id, &js, &nc, &healths).await;
    let race_time = t_race.elapsed();
    let after_kill = t_kill.elapsed();
    assert_eq!(done["status"], "done", "{done:#}");
    let mut publishers = Vec::new();
    for url in &healths {
        let (_, h) = get(url, "").await;
        publishers.push(h["publisher"].to_string());
    }

    // The stream holds every event of every machine once: per machine one run, seq 1..n in
    // stream order, each Nats-Msg-Id once, ending with job_done.
    let stored: Vec<procs::Stored> = procs::read_stream(&nc)
        .await
        .into_iter()
        .filter(|s| s.event["job_id"] == job_id)
        .collect();
    let mut per: BTreeMap<String, Vec<&procs::Stored>> = BTreeMap::new();
    for s in &stored {
        per.entry(s.event["machine_id"].as_str().unwrap().to_string())
            .or_default()
            .push(s);
    }
    assert_eq!(per.keys().map(String::as_str).collect::<Vec<_>>(), MACHINES);
    for m in done["machines"].as_array().unwrap() {
        assert_eq!(m["status"], "done", "{m:#}");
        assert_eq!(m["gaps"], 0, "{m:#}");
    }
    let ids: BTreeSet<_> = stored.iter().map(|s| s.msg_id.clone().unwrap()).collect();
    assert_eq!(ids.len(), stored.len(), "every Nats-Msg-Id stored once");
    for (machine, evs) in &per {
        let seqs: Vec<u64> = evs
            .iter()
            .map(|s| s.event["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{machine}: seq contiguous from 1, each once, in order"
        );
        let runs: BTreeSet<&str> = evs
            .iter()
            .map(|s| s.event["run_id"].as_str().unwrap())
            .collect();
        assert_eq!(runs.len(), 1, "{machine}: one run");
        let last = &evs.last().unwrap().event;
        assert_eq!(last["type"], "job_done", "{machine}");
        let gen_tokens = last["payload"]["gen_tokens"].as_u64().unwrap();
        assert_eq!(gen_tokens, MAX_TOKENS, "{machine}");
        let streamed: u64 = evs
            .iter()
            .filter(|s| s.event["type"] == "llm_token")
            .map(|s| s.event["payload"]["tokens"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(streamed, gen_tokens, "{machine}: every token event stored");
        let text: String = evs
            .iter()
            .filter(|s| s.event["type"] == "llm_token")
            .map(|s| s.event["payload"]["text"].as_str().unwrap().to_string())
            .collect();

        // Central's record agrees with the stream.
        let m = machine_in(&done, machine);
        assert_eq!(m["last_seq"].as_u64(), Some(seqs.len() as u64), "{machine}");
        assert_eq!(m["gaps"], 0, "{machine}: central applied every event");
        assert_eq!(m["repeats"].as_array().unwrap().len(), 1, "{machine}");
        assert_eq!(m["repeats"][0]["gen_tokens"].as_u64(), Some(gen_tokens));
        assert_eq!(
            m["repeats"][0]["streamed_tokens"].as_u64(),
            Some(gen_tokens)
        );
        assert_eq!(m["output_text"].as_str(), Some(text.as_str()), "{machine}");
    }

    // The SSE client saw the job to its end: each stored event once, in stream order, then end.
    let (frames, reconnects) = within("SSE to its end", CLUSTER_WAIT, sse)
        .await
        .expect("SSE task");
    let (end, events) = frames.split_last().expect("frames");
    assert_eq!(end.event, "end");
    assert_eq!(end.json()["status"], "done");
    let sse_seqs: Vec<u64> = events.iter().map(|f| f.id.expect("id")).collect();
    let stream_seqs: Vec<u64> = stored.iter().map(|s| s.stream_seq).collect();
    assert_eq!(
        sse_seqs, stream_seqs,
        "SSE ids are the job's stream sequences, each once"
    );
    for (f, s) in events.iter().zip(&stored) {
        let v = f.json();
        assert_eq!(
            (&v["machine_id"], &v["seq"]),
            (&s.event["machine_id"], &s.event["seq"]),
            "SSE frame {:?}",
            f.id
        );
    }

    // The killed server comes back on its store, rejoins and catches up.
    let t_restart = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(victim));
    let rejoined = t_restart.elapsed();
    let victim_name = cluster.name(victim).to_string();
    let (caught_up, catch_up) = info_when(
        &js,
        subjects::EVENTS_STREAM,
        "every replica current, the restarted one among them",
        |i| {
            all_current(i, 2)
                && i.cluster.as_ref().is_some_and(|c| {
                    c.leader.as_deref() == Some(victim_name.as_str())
                        || c.replicas.iter().any(|r| r.name == victim_name)
                })
        },
    )
    .await;
    let want = (caught_up.state.messages, caught_up.state.last_sequence);
    let t_local = Instant::now();
    let local = until("the restarted node's own view of the stream", || async {
        local_state(&cluster, victim).filter(|s| *s == want)
    })
    .await;
    assert_eq!(local, want);
    let local_wait = t_local.elapsed();

    let agent_on_victim = MACHINES[victim];
    eprintln!(
        "cluster failover: killed {old_leader} (BENCH_EVENTS leader; agent {agent_on_victim} on it; \
         central on {central_on}) {killed_at:?} into the race, at stream seq {}; {new_leader} \
         leader after {election:?} (by its leader_since); new events seen stored {resumed:?} after \
         the kill; race done {after_kill:?} after the kill ({race_time:?} in all); {} events \
         stored ({}), SSE reconnects {reconnects}; agents' publishers {publishers:?}; restart \
         healthy in {rejoined:?}, replicas current after {catch_up:?} more, local view {} msgs \
         (+{local_wait:?}); test {:?}",
        before.state.last_sequence,
        stored.len(),
        per.iter()
            .map(|(m, e)| format!("{m} {}", e.len()))
            .collect::<Vec<_>>()
            .join(", "),
        local.0,
        t_test.elapsed(),
    );
    drop(agents);
}

/// Publishes one message and awaits its ack. Right after a stream is created on a cluster, the
/// server this client is on may not have heard of the stream's interest yet (it crosses the routes
/// after the create reply): that answer, "no responders", is retried; any other error fails.
async fn publish_stored(js: &jetstream::Context, subject: String, body: String) {
    within("publish, stored", WAIT, async {
        loop {
            let err = match js.publish(subject.clone(), body.clone().into()).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            assert_eq!(
                err.kind(),
                jetstream::context::PublishErrorKind::StreamNotFound,
                "{err}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Creates the three assets as an agent (and an older central) would: one replica each.
async fn r1_assets(js: &jetstream::Context) {
    bench_nats::streams::ensure_events_stream(js, &EventsRetention::default(), 1)
        .await
        .unwrap();
    bench_nats::streams::ensure_agents_bucket(js, bench_nats::streams::AGENTS_TTL, 1)
        .await
        .unwrap();
    js.create_key_value(store::jobs_bucket_config(
        EventsRetention::default().max_age,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_r1_assets_are_scaled_to_the_configured_replicas() {
    let cluster = NatsCluster::start(3);
    let nc = cluster_client(&cluster.urls(), "test").await;
    let js = jetstream::new(nc.clone());
    r1_assets(&js).await;
    for i in 0..5u64 {
        publish_stored(&js, subjects::events("r1-job"), format!("{{\"n\":{i}}}")).await;
    }
    let names = [
        subjects::EVENTS_STREAM.to_string(),
        kv_stream_name(JOBS_BUCKET),
        kv_stream_name(subjects::AGENTS_BUCKET),
    ];
    for name in &names {
        assert_eq!(info(&js, name).await.config.num_replicas, 1, "{name}");
    }

    let retention = EventsRetention::default();
    let assets = within(
        "ensure_assets",
        WAIT,
        store::ensure_assets(&js, &retention, 3, Some("bench_race")),
    )
    .await
    .expect("scaled to R3");
    let expect = |found| -> Vec<AssetReplicas> {
        names
            .iter()
            .map(|n| AssetReplicas {
                stream: n.clone(),
                found: Some(found),
                now: 3,
            })
            .collect()
    };
    assert_eq!(assets.replicas, expect(1));
    // Central's next step takes a consumer of the stream's count at once: the scaled stream
    // must have its replicas placed by now.
    within(
        "the indexer consumer on the scaled stream",
        WAIT,
        store::open_indexer(&assets.events),
    )
    .await
    .expect("indexer consumer on R3");
    assert_eq!(
        assets.replicas[0].describe(),
        "BENCH_EVENTS: replicas 1 -> 3"
    );
    for name in &names {
        let (i, took) = info_when(&js, name, "R3, every replica current", |i| {
            i.config.num_replicas == 3 && all_current(i, 2)
        })
        .await;
        eprintln!("{name}: R1 -> R3, replicas current after {took:?}");
        if name == subjects::EVENTS_STREAM {
            assert_eq!(i.state.messages, 5, "the scaled stream kept its messages");
        }
    }

    // A second start finds everything as configured and changes nothing.
    let again = within(
        "ensure_assets again",
        WAIT,
        store::ensure_assets(&js, &retention, 3, Some("bench_race")),
    )
    .await
    .expect("as configured");
    assert_eq!(again.replicas, expect(3));
    assert_eq!(
        again.replicas[1].describe(),
        "KV_bench_jobs: replicas 3 (as configured)"
    );
}

#[tokio::test]
async fn replicas_3_on_a_single_server_is_a_clear_start_error() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.replicas = 3;
    let err = start_central_on(cfg).await.err().expect("refused");
    let text = err.to_string();
    assert!(
        matches!(&err, StartError::Setup { what, detail }
            if what.contains("replicas: 3") && detail.contains("replicas: 1")),
        "{text}"
    );
    eprintln!("single server, replicas 3: {text}");
    let js = jetstream::new(client(&nats.url()).await);
    assert!(
        js.get_stream(subjects::EVENTS_STREAM).await.is_err(),
        "nothing was created"
    );

    // Past the cluster check (a server that claims a cluster), the server's own refusal is
    // the same clear error, and nothing is left at one replica silently.
    r1_assets(&js).await;
    let err = within(
        "ensure_assets",
        WAIT,
        store::ensure_assets(&js, &EventsRetention::default(), 3, Some("claimed")),
    )
    .await
    .err()
    .expect("the server cannot place R3");
    assert!(
        matches!(&err, StartError::Setup { what, .. } if what.contains("replicas: 3")),
        "{err}"
    );
    eprintln!("single server past the cluster check: {err}");
}
