//! Two `bench-central` processes on one NATS: one holds the indexing lease, the other follows
//! (serves the same API and SSE from the stream, forwards writes to the leader). The indexing
//! one is killed with SIGKILL mid-race: the other's API and SSE show the complete race within
//! 10 s, it takes the lease over, and once the killed one is back (following now) both agree on
//! every job.

mod common;
#[path = "common/procs.rs"]
mod procs;

use common::{mock_agent, Sse, WAIT};
use procs::{first_diff, poll, Central, Http, NatsServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TTL_S: f64 = 3.0;

async fn health(http: &Http, base: &str) -> Option<Value> {
    match http.get(&format!("{base}/health")).await {
        Ok((200, v)) => Some(v),
        _ => None,
    }
}

/// Waits until `/health` says `role` (and, for a follower, that `leader` leads).
async fn role_is(http: &Http, c: &Central, role: &str, leader: &str, limit: Duration) -> Value {
    let got = poll(limit, Duration::from_millis(50), || async {
        health(http, &c.base())
            .await
            .filter(|h| h["role"] == role && h["leader"] == leader)
    })
    .await;
    match got {
        Some(h) => h,
        None => panic!(
            "{} never became {role} under {leader}: {:?}\n{}",
            c.base(),
            health(http, &c.base()).await,
            c.proc.log_tail(30)
        ),
    }
}

/// The job as `base` shows it (Null while it answers anything but 200).
async fn job(http: &Http, base: &str, id: &str) -> Value {
    match http.get(&format!("{base}/api/jobs/{id}")).await {
        Ok((200, v)) => v,
        _ => Value::Null,
    }
}

fn finished_ok(j: &Value, machines: usize, tokens: u64, repeats: usize) -> bool {
    j["status"] == "done"
        && j["machines"].as_array().is_some_and(|ms| {
            ms.len() == machines
                && ms.iter().all(|m| {
                    m["status"] == "done"
                        && m["repeats"].as_array().is_some_and(|r| {
                            r.len() == repeats && r.iter().all(|r| r["gen_tokens"] == tokens)
                        })
                })
        })
}

/// What both centrals must agree on (their own view times and ids left out).
fn comparable(j: &Value) -> Value {
    let mut j = j.clone();
    if let Some(o) = j.as_object_mut() {
        for k in ["regression", "fingerprint_changes"] {
            o.remove(k);
        }
    }
    j
}

/// Two centrals (not started) on `nats`, with these `central_id`s and a short lease, each in a
/// data dir of its own under the returned one.
fn two_centrals(nats: &NatsServer, a: &str, b: &str) -> (tempfile::TempDir, Central, Central) {
    let dir = tempfile::tempdir().unwrap();
    let central = |name: &str, id: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        Central::new(
            &d,
            &nats.url(),
            &format!("central_id: {id}\nleader_ttl_s: {TTL_S}\n"),
        )
    };
    let (ca, cb) = (central("a", a), central("b", b));
    (dir, ca, cb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_follower_takes_over_mid_race_and_both_agree() {
    let nats = NatsServer::start();
    let (_dir, mut ca, mut cb) = two_centrals(&nats, "ca", "cb");
    let http = Http::new(Duration::from_secs(20));

    ca.proc.spawn();
    role_is(&http, &ca, "leader", "ca", WAIT).await;
    cb.proc.spawn();
    role_is(&http, &cb, "follower", "ca", WAIT).await;

    // Three machines, a race of about 4 s (40 tokens/s, 2 x 80 tokens).
    let agents = [
        mock_agent("m1", "mock-7b", 40.0, &nats.url()).await,
        mock_agent("m2", "mock-7b", 40.0, &nats.url()).await,
        mock_agent("m3", "mock-7b", 40.0, &nats.url()).await,
    ];
    for c in [&ca, &cb] {
        assert!(
            procs::machines_online(&http, &c.base(), &["m1", "m2", "m3"], WAIT).await,
            "machines online on {}",
            c.base()
        );
    }

    // Submitted to the follower: forwarded to the leader, answered with its reply.
    let body = json!({"machines": ["m1", "m2", "m3"], "model": "mock-7b", "prompt": "race",
                      "max_tokens": 80, "repeat": 2, "warmup": 0});
    let (status, created) = http
        .post(&format!("{}/api/jobs", cb.base()), &body)
        .await
        .expect("POST to the follower");
    assert_eq!(status, 201, "{created}");
    let id = created["job_id"].as_str().expect("job_id").to_string();
    assert_eq!(
        created["machines"].as_array().map(Vec::len),
        Some(3),
        "{created}"
    );
    // Read your own write on the follower at once.
    assert_eq!(job(&http, &cb.base(), &id).await["job_id"], id.as_str());

    // SSE from the follower; the leader dies once the first tokens flowed.
    let mut sse = Sse::open(&format!("{}/api/jobs/{id}/events", cb.base()), None).await;
    assert_eq!(sse.status, 200);
    let mut frames = Vec::new();
    loop {
        let f = sse.next().await.expect("SSE frame before the kill");
        let token = f.event == "llm_token";
        frames.push(f);
        if token {
            break;
        }
    }
    assert!(ca.proc.kill9(), "the leader was running");
    let killed = Instant::now();

    // The follower's SSE goes on to the end, every event once, in stream order.
    let rest = common::within("SSE to the end after the kill", WAIT, sse.until_end()).await;
    frames.extend(rest);
    assert_eq!(
        frames.last().map(|f| f.event.as_str()),
        Some("end"),
        "SSE ended the job"
    );
    let ids: Vec<u64> = frames.iter().filter_map(|f| f.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "SSE ids strictly rising (no duplicate)"
    );
    let per_machine_seqs = |frames: &[common::Frame]| {
        let mut per: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for f in frames.iter().filter(|f| f.id.is_some()) {
            let v = f.json();
            if let (Some(m), Some(s)) = (v["machine_id"].as_str(), v["seq"].as_u64()) {
                per.entry(m.to_string()).or_default().push(s);
            }
        }
        per
    };
    for (m, seqs) in per_machine_seqs(&frames) {
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "SSE of {m}: every event once"
        );
    }

    // The complete race on the follower within 10 s of the kill.
    let done = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let j = job(&http, &cb.base(), &id).await;
            finished_ok(&j, 3, 80, 2).then_some(j)
        },
    )
    .await;
    let shown_after = killed.elapsed();
    let Some(done) = done else {
        panic!(
            "the follower did not show the complete race within 10 s: {}",
            job(&http, &cb.base(), &id).await
        )
    };
    println!("complete race on the follower {shown_after:?} after the kill");

    // It takes the lease over (the dead leader's ages out after TTL_S).
    let took = role_is(
        &http,
        &cb,
        "leader",
        "cb",
        Duration::from_secs_f64(TTL_S * 3.0),
    )
    .await;
    println!(
        "follower indexing {:?} after the kill: {took}",
        killed.elapsed()
    );
    let metrics = http
        .get(&format!("{}/metrics", cb.base()))
        .await
        .expect("metrics")
        .1;
    let text = metrics.as_str().unwrap_or_default();
    assert!(text.contains("bench_central_leader 1"), "{text}");
    assert!(text.contains("bench_central_takeovers_total 1"), "{text}");
    assert!(
        text.contains("bench_central_forwarded_writes_total 1"),
        "{text}"
    );

    // The killed central comes back (same id and port): it follows the new leader.
    ca.proc.spawn();
    role_is(&http, &ca, "follower", "cb", WAIT).await;

    // A second race submitted to the restarted one (a follower now) runs through the new leader.
    let (status, created2) = http
        .post(
            &format!("{}/api/jobs", ca.base()),
            &json!({"machines": ["m1", "m2"],
              "model": "mock-7b", "prompt": "second", "max_tokens": 16, "warmup": 0}),
        )
        .await
        .expect("POST to the restarted central");
    assert_eq!(status, 201, "{created2}");
    let id2 = created2["job_id"].as_str().unwrap().to_string();

    // Both agree on every job, once each has it complete.
    for (jid, machines, tokens, repeats) in [(&id, 3, 80, 2usize), (&id2, 2, 16, 1)] {
        let mut views = Vec::new();
        for c in [&ca, &cb] {
            let v = poll(WAIT, Duration::from_millis(50), || async {
                let j = job(&http, &c.base(), jid).await;
                finished_ok(&j, machines, tokens, repeats).then_some(j)
            })
            .await;
            let Some(v) = v else {
                panic!(
                    "{jid} complete on {}: {}",
                    c.base(),
                    job(&http, &c.base(), jid).await
                )
            };
            views.push(comparable(&v));
        }
        // The follower adopts the leader's last write: poll until the two are identical.
        let agreed = poll(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || async {
                let a = comparable(&job(&http, &ca.base(), jid).await);
                let b = comparable(&job(&http, &cb.base(), jid).await);
                first_diff(&a, &b, "$").is_none().then_some(())
            },
        )
        .await;
        assert!(
            agreed.is_some(),
            "both centrals agree on {jid}: {:?}",
            first_diff(
                &comparable(&job(&http, &ca.base(), jid).await),
                &comparable(&job(&http, &cb.base(), jid).await),
                "$"
            )
        );
    }
    let list = |c: &Central| {
        let (http, base) = (http.clone(), c.base());
        async move {
            let (_, v) = http.get(&format!("{base}/api/jobs")).await.expect("list");
            v["jobs"]
                .as_array()
                .map(|js| {
                    js.iter()
                        .map(|j| (j["job_id"].clone(), j["status"].clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    assert_eq!(list(&ca).await, list(&cb).await, "the same job list");
    assert_eq!(done["machines"].as_array().map(Vec::len), Some(3));
    drop(agents);
}

/// Two live centrals given the same `central_id`: the second sees the first renewing the lease
/// under that id, says so and follows (it does not take the lease as if it were the first
/// restarted); once the first is killed, the second takes the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_central_with_the_same_id_follows_until_the_first_is_gone() {
    let nats = NatsServer::start();
    let (_dir, mut ca, mut cb) = two_centrals(&nats, "dup", "dup");
    let http = Http::new(Duration::from_secs(20));

    ca.proc.spawn();
    role_is(&http, &ca, "leader", "dup", WAIT).await;
    cb.proc.spawn();
    let said = poll(WAIT, Duration::from_millis(50), || async {
        cb.proc
            .log_tail(200)
            .contains("another central runs with this central_id")
            .then_some(())
    })
    .await;
    assert!(
        said.is_some(),
        "no word of the duplicate id:\n{}",
        cb.proc.log_tail(30)
    );
    role_is(&http, &cb, "follower", "dup", WAIT).await;
    role_is(&http, &ca, "leader", "dup", WAIT).await;

    assert!(ca.proc.kill9(), "the first was running");
    role_is(&http, &cb, "leader", "dup", WAIT).await;
}
