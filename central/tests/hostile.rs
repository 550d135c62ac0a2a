//! Hostile input: a thousand malformed or malicious NATS messages, a few hundred forged events
//! straight into the stream, and a thousand bad HTTP requests, against real `bench-central` and
//! `bench-agent` processes on a real nats-server. Every request is answered (HTTP: a 4xx with
//! an error code, never a 5xx, each within a timeout; NATS requests: a coded refusal), every
//! process stays up, their memory returns to within a stated margin of its level after a
//! warm-up round of the same input, and the next real job runs to `done`.
//!
//! NATS requests go out two ways: every hostile kind with backpressure (at most [`WINDOW`]
//! answers outstanding), where each must be answered; then a flood as fast as the client writes,
//! where the agent's bounded buffer may drop some (counted), after which it must answer again.
//!
//! Memory: the resident set of each process must come back, within 15 s of the rounds, to within
//! 24 MiB + 50% of its level after the warm-up round. The warm-up holds the same bursts (the flood and the forged
//! events) and a tenth of the rest, so the allocator's high-water marks are in the baseline and
//! what is measured is growth from more of the same input. The input comes from a seeded RNG
//! (`HOSTILE_SEED` replays a run).

#[path = "common/procs.rs"]
mod procs;

use async_nats::HeaderMap;
use futures::StreamExt;
use procs::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

const MACHINE: &str = "target";
/// Every HTTP request and NATS reply is awaited at most this long.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Memory after the hostile rounds may exceed its level after the warm-up round by this many
/// KiB plus this fraction (allocator arenas, the index's list entries for the junk jobs that
/// refusals with valid ids create, and caches hold some of what a round used).
const RSS_MARGIN_KIB: u64 = 24 * 1024;
const RSS_MARGIN_FRACTION: f64 = 0.5;
/// How long memory may take to come back within the margin after the rounds.
const RSS_RETURN_WITHIN: Duration = Duration::from_secs(15);
/// Answers a well-behaved sender keeps outstanding (the agent buffers 256 messages per
/// subscription; bench_nats::connect::AGENT_SUBSCRIPTION_CAPACITY).
const WINDOW: usize = 64;
/// Requests in the flood (one in six of ~max_payload).
const FLOOD: usize = 600;
/// Forged events per round.
const FORGED: usize = 360;

// ---- NATS input ----

/// One hostile NATS message.
struct NatsMsg {
    kind: &'static str,
    subject: String,
    payload: Vec<u8>,
    /// Sent with a reply subject.
    reply: bool,
    /// The agent must answer it (a request on a subject it serves that no selector excludes).
    expect_reply: bool,
}

fn filler(rng: &mut Rng, n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 .*>{}[]\"\\";
    (0..n)
        .map(|_| ALPHABET[rng.range(0, ALPHABET.len() as u64 - 1) as usize] as char)
        .collect()
}

/// An id that is not a valid job id (nor machine id): subject wildcards and separators,
/// unicode, control characters, traversal, too long.
fn nasty_id(rng: &mut Rng) -> String {
    let ids = [
        "a.b",
        "*",
        ">",
        "a*b",
        "a>b",
        "bench.jobs.all",
        "ü",
        "日本語",
        "a b",
        "",
        "../../etc/passwd",
        "..",
        "a\u{0}b",
        "a\nb",
        "\u{202e}gnp.exe",
    ];
    if rng.chance(0.15) {
        return "x".repeat(rng.range(129, 4096) as usize);
    }
    rng.pick(&ids).to_string()
}

/// An id that is not a valid machine id: a bad job id, or one only a machine may not have.
fn nasty_machine_id(rng: &mut Rng) -> String {
    if rng.chance(0.3) {
        return rng
            .pick(&["all", "ALL", "Upper", "-lead", "x".repeat(65).as_str()])
            .to_string();
    }
    nasty_id(rng)
}

fn base_job() -> Value {
    json!({"model": "mock-7b", "prompt": "hostile", "max_tokens": 4})
}

fn with(mut v: Value, k: &str, x: Value) -> Value {
    v.as_object_mut().unwrap().insert(k.to_string(), x);
    v
}

/// `n` hostile messages for the job and cancel subjects; `big` is the largest payload to send.
fn nats_messages(rng: &mut Rng, n: usize, big: usize) -> Vec<NatsMsg> {
    let mut out = Vec::with_capacity(n);
    let direct = bench_schemas::subjects::jobs(MACHINE);
    let all = bench_schemas::subjects::JOBS_ALL.to_string();
    for i in 0..n {
        let subject = if rng.chance(0.6) {
            direct.clone()
        } else {
            all.clone()
        };
        let reply = rng.chance(0.8);
        let unusable_id = format!("hostile-{}", rng.next_u64() % 64);
        let (kind, payload): (&'static str, Vec<u8>) = match i % 16 {
            0 => ("not json", filler(rng, 40).into_bytes()),
            1 => ("invalid utf-8", vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}']),
            2 => {
                let v = *rng.pick(&["", "{", "null", "[]", "\"job\"", "1e999999", "{\"model\":", "{}}"]);
                ("truncated or not an object", v.as_bytes().to_vec())
            }
            3 => ("nested 100k deep", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
            4 => {
                let v = rng.pick(&[
                    json!({"model": 5, "prompt": []}),
                    json!({"model": "mock-7b", "prompt": "p", "max_tokens": "many"}),
                    json!({"model": "mock-7b", "prompt": "p", "repeat": -1}),
                    json!({"model": "mock-7b", "prompt": "p", "job_id": 5}),
                    json!({"model": "mock-7b", "prompt": "p", "temperature": "hot"}),
                    json!({"model": "mock-7b", "prompt": "p", "selector": 7}),
                    json!({"model": "mock-7b", "prompt": "p", "max_token": 5}),
                ])
                .clone();
                ("wrong types", v.to_string().into_bytes())
            }
            5 => ("bad job id", with(base_job(), "job_id", json!(nasty_id(rng))).to_string().into_bytes()),
            6 => (
                "bad selector id",
                with(base_job(), "selector", json!([nasty_machine_id(rng)])).to_string().into_bytes(),
            ),
            7 => (
                "huge prompt",
                with(with(base_job(), "job_id", json!(unusable_id)), "prompt", json!(filler(rng, big / 2)))
                    .to_string()
                    .into_bytes(),
            ),
            8 => ("huge model name", with(base_job(), "model", json!("m".repeat(big / 3))).to_string().into_bytes()),
            9 => ("max payload garbage", {
                let mut b = vec![b'{'; 1];
                b.extend(filler(rng, big - 1).into_bytes());
                b
            }),
            10 => {
                let v = rng.pick(&[
                    json!({"model": "nope", "prompt": "p"}),
                    json!({"model": "mock-7b", "prompt": "p", "max_tokens": 0}),
                    json!({"model": "mock-7b", "prompt": "p", "max_tokens": 4_000_000_000u64}),
                    json!({"model": "mock-7b", "prompt": "p", "repeat": 100_000}),
                    json!({"model": "mock-7b", "prompt": "p", "expires_at": 1}),
                    json!({"model": "mock-7b", "prompt": "p", "start": "together", "start_at_ms": 99_999_999_999_999u64}),
                    json!({"model": "mock-7b", "prompt": "p", "backend": "ollama"}),
                    json!({"model": "mock-7b", "prompt": "p", "test_type": "sdxl"}),
                    json!({"model": "mock-7b", "prompt": "", "job_id": "empty-prompt"}),
                    json!({"model": "mock-7b", "prompt": "p", "num_ctx": 4_000_000_000u64}),
                ])
                .clone();
                ("refused by the agent's rules", v.to_string().into_bytes())
            }
            11 => (
                "unicode everywhere",
                json!({"model": "模型-🚀", "prompt": "\u{202e}\u{0}\u{feff}", "run_label": "ü".repeat(1000)})
                    .to_string()
                    .into_bytes(),
            ),
            12 => (
                "huge run_label and many fields",
                {
                    let mut v = with(base_job(), "run_label", json!(filler(rng, big / 4)));
                    for k in 0..200 {
                        v = with(v, &format!("extra_{k}"), json!(k));
                    }
                    v.to_string().into_bytes()
                },
            ),
            13 => (
                "selector of 20k labels",
                {
                    let sel: serde_json::Map<String, Value> = (0..20_000)
                        .map(|k| (format!("k{k}"), json!("v")))
                        .collect();
                    with(base_job(), "selector", Value::Object(sel)).to_string().into_bytes()
                },
            ),
            _ => ("cancel", Vec::new()),
        };
        if kind == "cancel" {
            // bench.cancel.*: tokens nobody runs, unicode tokens, payloads that mean nothing.
            let token = match rng.range(0, 3) {
                0 => format!("nobody-{}", rng.next_u64()),
                1 => rng
                    .pick(&["ü", "日本語", "hostile-1", "a-b_c", "%2e%2e"])
                    .to_string(),
                2 => "x".repeat(rng.range(1, 2000) as usize),
                _ => "warmup-job".to_string(),
            };
            let payload = if rng.chance(0.1) {
                filler(rng, big - 64).into_bytes()
            } else {
                let n = rng.range(0, 200) as usize;
                filler(rng, n).into_bytes()
            };
            out.push(NatsMsg {
                kind: "cancel",
                subject: bench_schemas::subjects::cancel(&token),
                payload,
                reply: false,
                expect_reply: false,
            });
            continue;
        }
        let mut payload = payload;
        payload.truncate(big);
        // A selector that does not name this agent may leave it silent (as it should); those
        // are sent with a reply subject too, but no answer is required.
        let may_be_silent = matches!(kind, "bad selector id" | "selector of 20k labels");
        out.push(NatsMsg {
            kind,
            subject,
            payload,
            reply,
            expect_reply: reply && !may_be_silent,
        });
    }
    out
}

/// Forged events published straight into `BENCH_EVENTS`, past any agent.
fn forged_events(rng: &mut Rng, n: usize, big: usize, real_job: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(n);
    let ev = |job: &str, machine: &str, run: &str, seq: u64, kind: &str, payload: Value| {
        json!({"job_id": job, "machine_id": machine, "run_id": run, "seq": seq, "ts_ms": 1,
               "type": kind, "payload": payload})
    };
    for i in 0..n {
        let job = format!("forged-{}", i % 7);
        let subject = bench_schemas::subjects::events(&job);
        let (subject, body): (String, Vec<u8>) = match i % 12 {
            0 => (subject, filler(rng, 100).into_bytes()),
            1 => (subject, b"[1,2,3]".to_vec()),
            2 => (
                subject,
                ev(
                    "someone-else",
                    "ghost",
                    "g-1",
                    1,
                    "job_cancelled",
                    json!({"reason": "x"}),
                )
                .to_string()
                .into_bytes(),
            ),
            3 => (
                subject,
                ev(
                    &nasty_id(rng),
                    "ghost",
                    "g-1",
                    1,
                    "job_cancelled",
                    json!({"reason": "x"}),
                )
                .to_string()
                .into_bytes(),
            ),
            4 => (
                subject,
                ev(
                    &job,
                    &nasty_id(rng),
                    "g-1",
                    1,
                    "job_cancelled",
                    json!({"reason": "x"}),
                )
                .to_string()
                .into_bytes(),
            ),
            5 => (
                subject,
                ev(&job, "ghost", "g-1", 1, "no_such_type", json!({}))
                    .to_string()
                    .into_bytes(),
            ),
            6 => (
                subject,
                ev(
                    &job,
                    "ghost",
                    "g-1",
                    u64::MAX,
                    "llm_token",
                    json!({"repeat_index": 0, "text": "x", "t_ms": 1.0}),
                )
                .to_string()
                .into_bytes(),
            ),
            7 => (
                subject,
                ev(
                    &job,
                    "ghost",
                    "g-1",
                    i as u64 + 1,
                    "llm_token",
                    json!({"repeat_index": 0, "text": filler(rng, big / 2), "t_ms": 1.0}),
                )
                .to_string()
                .into_bytes(),
            ),
            8 => (
                subject,
                ev(
                    &job,
                    "ghost",
                    "g-1",
                    i as u64 + 1,
                    "job_error",
                    json!({"error": {"code": "engine_error", "message": filler(rng, big / 2)}}),
                )
                .to_string()
                .into_bytes(),
            ),
            9 => {
                let mut job_v = base_job();
                job_v = with(job_v, "prompt", json!(filler(rng, big / 2)));
                (
                    subject,
                    ev(
                        &job,
                        "ghost",
                        &format!("g-{i}"),
                        1,
                        "job_accepted",
                        json!({"job": job_v, "position": 0, "engine": "mock", "engine_url": "",
                              "label": "ü".repeat(500), "agent_version": "0"}),
                    )
                    .to_string()
                    .into_bytes(),
                )
            }
            10 => (
                // The real job, from a machine that never ran it (the known limit: agents may
                // forge events naming other machines; central must still stay up).
                bench_schemas::subjects::events(real_job),
                ev(
                    real_job,
                    "ghost",
                    "g-1",
                    1,
                    "job_cancelled",
                    json!({"reason": filler(rng, 2000)}),
                )
                .to_string()
                .into_bytes(),
            ),
            _ => (
                subject,
                ev(
                    &job,
                    "ghost",
                    "g-1",
                    2,
                    "job_started",
                    json!({"repeat_index": "zero"}),
                )
                .to_string()
                .into_bytes(),
            ),
        };
        let mut body = body;
        body.truncate(big);
        out.push((subject, body));
    }
    out
}

#[derive(Default, Debug)]
struct NatsTally {
    sent: usize,
    by_kind: BTreeMap<&'static str, usize>,
    replies: BTreeMap<String, usize>,
    expected: usize,
    missing_replies: usize,
    publish_refused: usize,
    forged_stored: usize,
}

/// Sends `msgs` and collects the agent's answers. With `window`, at most that many answers are
/// outstanding at a time, as a sender that respects backpressure keeps them (the agent buffers
/// 256 messages per subscription and drops what comes beyond): then every request must be
/// answered. Without, the messages go out as fast as the client writes them (a flood), and what
/// the agent dropped is counted.
async fn nats_round(
    nc: &async_nats::Client,
    msgs: &[NatsMsg],
    t: &mut NatsTally,
    window: Option<usize>,
) {
    let inbox = nc.new_inbox();
    let mut sub = within(
        "subscribe inbox",
        ANSWER_WITHIN,
        nc.subscribe(format!("{inbox}.>")),
    )
    .await
    .expect("inbox");
    let mut expected: std::collections::HashSet<String> = Default::default();
    let mut got: HashMap<String, Value> = HashMap::new();
    let mut stalled = false;
    for (i, m) in msgs.iter().enumerate() {
        *t.by_kind.entry(m.kind).or_default() += 1;
        if let Some(w) = window {
            while !stalled && expected.iter().filter(|k| !got.contains_key(*k)).count() >= w {
                within("flush", ANSWER_WITHIN, nc.flush())
                    .await
                    .expect("flush");
                match tokio::time::timeout(ANSWER_WITHIN, sub.next()).await {
                    Ok(Some(msg)) => {
                        let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                        got.insert(msg.subject.to_string(), v);
                    }
                    // No answer in time: counted as missing below.
                    _ => stalled = true,
                }
            }
        }
        let reply_to = format!(
            "{inbox}.{}.{i}",
            if m.expect_reply { "must" } else { "may" }
        );
        let payload = bytes::Bytes::from(m.payload.clone());
        let sent = if m.reply {
            within(
                "publish",
                ANSWER_WITHIN,
                nc.publish_with_reply(m.subject.clone(), reply_to.clone(), payload),
            )
            .await
        } else {
            within(
                "publish",
                ANSWER_WITHIN,
                nc.publish(m.subject.clone(), payload),
            )
            .await
        };
        match sent {
            Ok(()) => {
                t.sent += 1;
                if m.expect_reply {
                    expected.insert(reply_to);
                }
            }
            Err(e) => {
                t.publish_refused += 1;
                eprintln!(
                    "client refused to publish {} ({} bytes): {e}",
                    m.kind,
                    m.payload.len()
                );
            }
        }
        // Keep the client's outgoing buffer bounded under 1 MiB payloads.
        if i % 32 == 31 {
            within("flush", ANSWER_WITHIN, nc.flush())
                .await
                .expect("flush");
        }
    }
    within("flush", ANSWER_WITHIN, nc.flush())
        .await
        .expect("flush");
    while !expected.iter().all(|k| got.contains_key(k)) {
        match tokio::time::timeout(ANSWER_WITHIN, sub.next()).await {
            Ok(Some(msg)) => {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                got.insert(msg.subject.to_string(), v);
            }
            _ => break,
        }
    }
    t.expected += expected.len();
    t.missing_replies += expected.iter().filter(|k| !got.contains_key(*k)).count();
    for v in got.values() {
        let code = if v["accepted"] == true {
            "accepted".to_string()
        } else {
            v["error"]["code"]
                .as_str()
                .unwrap_or("unreadable reply")
                .to_string()
        };
        *t.replies.entry(code).or_default() += 1;
    }
}

/// A flood: max_payload garbage and small bad JSON, every one a request, as fast as possible.
fn flood_messages(rng: &mut Rng, n: usize, big: usize) -> Vec<NatsMsg> {
    (0..n)
        .map(|i| {
            let payload = if i % 6 == 0 {
                let mut b = vec![b'{'];
                b.extend(filler(rng, big - 1).into_bytes());
                b
            } else {
                filler(rng, 30).into_bytes()
            };
            NatsMsg {
                kind: "flood",
                subject: bench_schemas::subjects::jobs(MACHINE),
                payload,
                reply: true,
                expect_reply: true,
            }
        })
        .collect()
}

async fn forge_round(
    js: &async_nats::jetstream::Context,
    evs: &[(String, Vec<u8>)],
    t: &mut NatsTally,
) {
    for (subject, body) in evs {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
        let ack = within(
            "forged publish",
            ANSWER_WITHIN,
            js.publish_with_headers(subject.clone(), h, body.clone().into()),
        )
        .await;
        match ack {
            Ok(ack) => match within("forged ack", ANSWER_WITHIN, ack.into_future()).await {
                Ok(_) => t.forged_stored += 1,
                Err(e) => eprintln!("forged event not stored: {e}"),
            },
            Err(e) => eprintln!("forged event refused by the client: {e}"),
        }
    }
}

// ---- HTTP input ----

/// One bad request: method, path (sent as written, on a raw socket when `raw`), headers, body.
struct BadReq {
    kind: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Under `/api/`: the answer must be `{"error":{"code","message"}}`.
    api: bool,
}

fn req(kind: &'static str, method: &'static str, path: impl Into<String>, body: Vec<u8>) -> BadReq {
    let path = path.into();
    BadReq {
        kind,
        method,
        api: path.starts_with("/api/"),
        headers: vec![("Content-Type".into(), "application/json".into())],
        path,
        body,
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn http_requests(rng: &mut Rng, n: usize, real_job: &str) -> Vec<BadReq> {
    let mut out = Vec::with_capacity(n);
    let job = |extra: Value| {
        let mut j =
            json!({"machines": [MACHINE], "model": "mock-7b", "prompt": "p", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            j.as_object_mut().unwrap().insert(k.clone(), v.clone());
        }
        j.to_string().into_bytes()
    };
    for i in 0..n {
        let r = match i % 14 {
            0 => {
                let b = *rng.pick(&[
                    "{",
                    "",
                    "null",
                    "[]",
                    "{\"machines\":",
                    "\u{feff}{}",
                    "{'a':1}",
                    "1e999999",
                ]);
                req("bad JSON", "POST", "/api/jobs", b.as_bytes().to_vec())
            }
            1 => req(
                "garbage bytes",
                "POST",
                "/api/jobs",
                (0..rng.range(1, 300))
                    .map(|_| rng.next_u64() as u8)
                    .collect(),
            ),
            2 => {
                let extra = rng
                    .pick(&[
                        json!({"machines": "some"}),
                        json!({"machines": [1, 2]}),
                        json!({"machines": []}),
                        json!({"machines": ["ghost"]}),
                        json!({"max_tokens": "many"}),
                        json!({"repeat": -3}),
                        json!({"temperature": 1e300}),
                        json!({"prompt": ""}),
                        json!({"model": 7}),
                        json!({"max_token": 5}),
                        json!({"selector": "x"}),
                        json!({"mode": "poetry"}),
                    ])
                    .clone();
                req("invalid job", "POST", "/api/jobs", job(extra))
            }
            3 => req(
                "bad ids in the body",
                "POST",
                "/api/jobs",
                if rng.chance(0.5) {
                    job(json!({"machines": [nasty_machine_id(rng)]}))
                } else {
                    job(json!({"job_id": nasty_id(rng)}))
                },
            ),
            4 => {
                // Over the body limit, or under it but refused (unknown machine; bad JSON at the
                // end).
                let size = *rng.pick(&[3 << 20, 1 << 20, 512 << 10]);
                let mut b = job(json!({"machines": ["ghost"], "prompt": "x".repeat(size)}));
                if rng.chance(0.3) {
                    b.pop();
                }
                req("huge body", "POST", "/api/jobs", b)
            }
            5 => {
                let mut r = req("wrong content type", "POST", "/api/jobs", job(json!({})));
                let ct = rng.pick(&[
                    "text/plain",
                    "",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "application/jsonx",
                    "text/json",
                ]);
                r.headers = vec![("Content-Type".into(), ct.to_string())];
                r
            }
            6 => {
                let p = rng.pick(&[
                    "/../../../../etc/passwd",
                    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                    "/..%2f..%2f..%2fetc%2fpasswd",
                    "/..%5c..%5c..%5cetc%5cpasswd",
                    "/%252e%252e/%252e%252e/etc/passwd",
                    "/web/../../Cargo.toml",
                    "/./.././../etc/shadow",
                    "/.git/config",
                    "/%2egit/config",
                    "/node_modules/x.js",
                    "/tests/../tests/x",
                    "//etc/passwd",
                    "/api/jobs/..%2f..%2fetc%2fpasswd",
                    "/api/jobs/%2e%2e/export.json",
                    "/api/jobs/x/..%2f..%2f..%2fCargo.toml",
                    "/api/../api/../../etc/passwd",
                ]);
                req("path traversal", "GET", p.to_string(), Vec::new())
            }
            7 => {
                let id = pct(&nasty_id(rng));
                let p = rng
                    .pick(&[
                        format!("/api/jobs/{id}"),
                        format!("/api/jobs/{id}/events"),
                        format!("/api/jobs/{id}/export.csv"),
                        format!("/api/jobs/{id}/export.ndjson"),
                        "/api/jobs/%FF%FE".to_string(),
                        "/api/jobs/%00".to_string(),
                        format!("/api/jobs/{}", "y".repeat(129)),
                    ])
                    .clone();
                req("bad id in the path", "GET", p, Vec::new())
            }
            8 => {
                let id = pct(&nasty_id(rng));
                if rng.chance(0.5) {
                    req(
                        "bad id, mutating",
                        "POST",
                        format!("/api/jobs/{id}/cancel"),
                        Vec::new(),
                    )
                } else {
                    req(
                        "bad id, mutating",
                        "DELETE",
                        format!("/api/jobs/{id}"),
                        Vec::new(),
                    )
                }
            }
            9 => {
                let (m, p) = *rng.pick(&[
                    ("PUT", "/api/jobs"),
                    ("PATCH", "/api/jobs"),
                    ("DELETE", "/api/jobs"),
                    ("POST", "/api/machines"),
                    ("DELETE", "/api/machines"),
                    ("PUT", "/api/jobs/x"),
                    ("PATCH", "/api/jobs/x/cancel"),
                    ("PUT", "/api/jobs/x/cancel"),
                    ("POST", "/api/events"),
                    ("POST", "/api/jobs/x/events"),
                    ("POST", "/api/jobs/x/export.json"),
                    ("TRACE", "/api/jobs"),
                    ("PUT", "/api/nothing"),
                ]);
                req("wrong method", m, p.to_string(), Vec::new())
            }
            10 => {
                let q = rng
                    .pick(&[
                        "/api/jobs?limit=abc",
                        "/api/jobs?limit=-1",
                        "/api/jobs?limit=0",
                        "/api/jobs?limit=501",
                        "/api/jobs?limit=99999999999999999999999",
                        "/api/jobs?before=yesterday",
                        "/api/jobs?before=-5",
                        "/api/jobs?limit=1&limit=2",
                        "/api/jobs?limit=%FF",
                        "/api/jobs?limit=1%00",
                    ])
                    .to_string();
                let with_job = [
                    format!("/api/jobs/{real_job}?baseline=a.b"),
                    format!("/api/jobs/{real_job}?baseline=nobody-here"),
                    format!("/api/jobs/{real_job}?baseline=%FF"),
                    format!("/api/jobs/{real_job}?baseline={}", "z".repeat(300)),
                ];
                let p = if rng.chance(0.4) {
                    rng.pick(&with_job).clone()
                } else {
                    q
                };
                req("bad query", "GET", p, Vec::new())
            }
            11 => {
                let id = rng.pick(&[
                    "abc",
                    "-1",
                    "1.5",
                    "99999999999999999999999",
                    "0x10",
                    "1 2",
                    "１２",
                    "NaN",
                ]);
                let mut r = if rng.chance(0.5) {
                    req(
                        "bad Last-Event-ID",
                        "GET",
                        format!("/api/jobs/{real_job}/events"),
                        Vec::new(),
                    )
                } else {
                    req(
                        "bad Last-Event-ID",
                        "GET",
                        "/api/jobs/nobody-job/events",
                        Vec::new(),
                    )
                };
                if rng.chance(0.3) {
                    r.path = format!("{}?last_event_id={}", r.path, pct(id));
                } else {
                    r.headers.push(("Last-Event-ID".into(), id.to_string()));
                }
                r
            }
            12 => {
                let p = rng.pick(&[
                    "/api/nothing",
                    "/api/jobs/x/y/z",
                    "/api/",
                    "/api",
                    "/api/jobs/x/export.exe",
                    "/api/events/extra",
                ]);
                req("unknown endpoint", "GET", p.to_string(), Vec::new())
            }
            _ => {
                // A header too big to be a real one.
                // Refused by the HTTP parser before any handler: a 4xx, not necessarily JSON.
                let mut r = req("huge header", "GET", "/api/jobs/nobody-job", Vec::new());
                r.headers.push((
                    "X-Pad".into(),
                    "p".repeat(rng.range(64, 200) as usize * 1024),
                ));
                r.api = false;
                r
            }
        };
        out.push(r);
    }
    out
}

#[derive(Default, Debug)]
struct HttpTally {
    sent: usize,
    by_status: BTreeMap<u16, usize>,
    by_code: BTreeMap<String, usize>,
    problems: Vec<String>,
    slowest: Duration,
}

/// One request on a raw socket (paths are sent exactly as written: no client normalises `..`),
/// answered within [`ANSWER_WITHIN`]. Returns the status and the body.
async fn raw_http(port: u16, r: &BadReq) -> Result<(u16, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n",
            r.method, r.path
        );
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // The server may answer (413) before reading the whole body and close: that is fine.
        let _ = s.write_all(&r.body).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| {
                format!(
                    "no HTTP answer ({} bytes: {:?})",
                    buf.len(),
                    String::from_utf8_lossy(&buf[..buf.len().min(80)])
                )
            })?;
        let head = String::from_utf8_lossy(&buf[..text_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        let mut body = buf[text_end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok((status, body))
    };
    tokio::time::timeout(ANSWER_WITHIN, fut)
        .await
        .map_err(|_| format!("no answer within {ANSWER_WITHIN:?}"))?
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 2 + size + 2).min(b.len())..];
    }
    out
}

async fn http_round(port: u16, reqs: &[BadReq], t: &mut HttpTally) {
    type Answered = (usize, Duration, Result<(u16, Vec<u8>), String>);
    let results: Vec<Answered> =
        futures::stream::iter(reqs.iter().enumerate().map(|(i, r)| async move {
            let t0 = Instant::now();
            let a = raw_http(port, r).await;
            (i, t0.elapsed(), a)
        }))
        .buffer_unordered(8)
        .collect()
        .await;
    for (i, took, a) in results {
        let r = &reqs[i];
        t.sent += 1;
        t.slowest = t.slowest.max(took);
        let what = format!(
            "{} {} {}",
            r.kind,
            r.method,
            r.path.chars().take(80).collect::<String>()
        );
        let (status, body) = match a {
            Ok(x) => x,
            Err(e) => {
                t.problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        *t.by_status.entry(status).or_default() += 1;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let code = v["error"]["code"].as_str().map(str::to_string);
        *t.by_code
            .entry(code.clone().unwrap_or_else(|| "(no JSON error)".into()))
            .or_default() += 1;
        if !(400..500).contains(&status) {
            let what = match r.headers.iter().find(|h| h.0 == "Last-Event-ID") {
                Some((_, v)) => format!("{what} (Last-Event-ID: {v:?})"),
                None => what,
            };
            t.problems.push(format!(
                "{what}: answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
            continue;
        }
        if r.api && (code.is_none() || v["error"]["message"].as_str().is_none_or(str::is_empty)) {
            t.problems.push(format!(
                "{what}: {status} without an error code: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(120)])
            ));
        }
        let text = String::from_utf8_lossy(&body);
        if text.contains("root:") || text.contains("[workspace]") || text.contains("[core]") {
            t.problems
                .push(format!("{what}: served a file from outside web/"));
        }
    }
}

// ---- the test ----

async fn stream_last_seq(js: &async_nats::jetstream::Context) -> u64 {
    let mut s = within(
        "stream",
        ANSWER_WITHIN,
        js.get_stream(bench_schemas::subjects::EVENTS_STREAM),
    )
    .await
    .expect("stream");
    within("stream info", ANSWER_WITHIN, s.info())
        .await
        .expect("info")
        .state
        .last_sequence
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Waits until central has indexed everything the stream holds.
async fn caught_up(http: &Http, base: &str, js: &async_nats::jetstream::Context) -> bool {
    let last = stream_last_seq(js).await;
    poll(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let (_, v) = http.get(&format!("{base}/metrics")).await.ok()?;
            (metric(v.as_str()?, "bench_central_last_stream_seq")? >= last).then_some(())
        },
    )
    .await
    .is_some()
}

async fn real_job_done(http: &Http, base: &str, job_id: &str) -> Value {
    let (s, out) = http
        .post(
            &format!("{base}/api/jobs"),
            &json!({"job_id": job_id, "machines": [MACHINE], "model": "mock-7b", "prompt": "a real job", "max_tokens": 24, "repeat": 2}),
        )
        .await
        .expect("POST a real job");
    assert_eq!(s, 201, "{out}");
    assert_eq!(out["machines"][0]["status"], "accepted", "{out}");
    poll(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let (s, v) = http.get(&format!("{base}/api/jobs/{job_id}")).await.ok()?;
            (s == 200 && v["status"] != "running").then_some(v)
        },
    )
    .await
    .unwrap_or_else(|| panic!("job {job_id} did not finish within 30 s"))
}

/// The lowest RSS of each process seen while sampling every 200 ms for `over`, ending early once
/// both are at or under `enough`.
async fn settled_rss(
    central: &Central,
    agent: &Proc,
    over: Duration,
    enough: Option<(u64, u64)>,
) -> (u64, u64) {
    let deadline = Instant::now() + over;
    let mut low = rss(central, agent);
    loop {
        if enough.is_some_and(|(c, a)| low.0 <= c && low.1 <= a) || Instant::now() >= deadline {
            return low;
        }
        // Sampling memory, not waiting for an event.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss(central, agent);
        low = (low.0.min(now.0), low.1.min(now.1));
    }
}

fn rss(central: &Central, agent: &Proc) -> (u64, u64) {
    (
        central.proc.rss_kib().expect("central RSS"),
        agent.rss_kib().expect("agent RSS"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_leaves_everything_up() {
    let seed = seed_from_env("HOSTILE_SEED");
    eprintln!("hostile seed: {seed} (replay with HOSTILE_SEED={seed})");
    let t0 = Instant::now();
    let mut rng = Rng::new(seed);
    let dir = tempfile::Builder::new()
        .prefix("hostile-")
        .tempdir()
        .unwrap();
    let nats = NatsServer::start();
    let url = nats.url();
    let mut central = Central::new(
        dir.path(),
        &url,
        "stall_timeout_s: 5\nrequest_timeout_s: 3\nbroadcast_window_s: 1\n",
    );
    let agent_port = free_port();
    let mut agent = agent(dir.path(), MACHINE, &url, 400.0, 5, agent_port);
    // glibc's malloc raises its mmap threshold as large blocks are freed and then keeps freed
    // large buffers in the heap: RSS would show the high-water mark of the last burst, not what
    // is held. A fixed threshold hands them back, so RSS follows what the process keeps.
    for p in [&mut central.proc, &mut agent] {
        p.set_env("MALLOC_MMAP_THRESHOLD_", "131072");
        p.set_env("MALLOC_TRIM_THRESHOLD_", "131072");
    }
    central.proc.spawn();
    agent.spawn();
    let http = Http::new(ANSWER_WITHIN);
    let base = central.base();
    assert!(
        central_healthy(&http, &base, Duration::from_secs(30)).await,
        "central: {}",
        central.proc.log_tail(20)
    );
    assert!(
        machines_online(&http, &base, &[MACHINE], Duration::from_secs(30)).await,
        "agent: {}",
        agent.log_tail(20)
    );
    let nc = bench_nats::harness::client(&url).await;
    let js = async_nats::jetstream::new(nc.clone());
    let big = nc.server_info().max_payload - 4096;
    eprintln!(
        "server max_payload {} bytes; largest hostile payload {big}",
        nc.server_info().max_payload
    );

    let first = real_job_done(&http, &base, "warmup-job").await;
    assert_eq!(first["status"], "done", "{first}");

    // Warm-up: the same bursts and a tenth of the rest, so that what stays allocated after one
    // round (arenas, buffers, caches, high-water marks) is in the baseline.
    let mut nt = NatsTally::default();
    let mut ft = NatsTally::default();
    let mut ht = HttpTally::default();
    nats_round(
        &nc,
        &nats_messages(&mut rng, 100, big),
        &mut nt,
        Some(WINDOW),
    )
    .await;
    nats_round(&nc, &flood_messages(&mut rng, FLOOD, big), &mut ft, None).await;
    forge_round(
        &js,
        &forged_events(&mut rng, FORGED, big, "warmup-job"),
        &mut nt,
    )
    .await;
    http_round(
        central.port,
        &http_requests(&mut rng, 100, "warmup-job"),
        &mut ht,
    )
    .await;
    assert!(
        caught_up(&http, &base, &js).await,
        "central did not index the warm-up round"
    );
    let again = real_job_done(&http, &base, "warmup-job-2").await;
    assert_eq!(again["status"], "done", "{again}");
    // The level it settles at: the lowest of a few samples over two seconds (RSS moves as the
    // allocator hands memory back).
    let before = settled_rss(&central, &agent, Duration::from_secs(2), None).await;
    eprintln!(
        "RSS after warm-up: central {} KiB, agent {} KiB",
        before.0, before.1
    );

    // The rounds.
    let mut nt = NatsTally::default();
    let mut ft = NatsTally::default();
    let mut ht = HttpTally::default();
    let msgs = nats_messages(&mut rng, 1000, big);
    let flood = flood_messages(&mut rng, FLOOD, big);
    let forged = forged_events(&mut rng, FORGED, big, "warmup-job");
    let reqs = http_requests(&mut rng, 1000, "warmup-job");
    let t_rounds = Instant::now();
    // Every hostile kind, with backpressure: each must be answered.
    nats_round(&nc, &msgs, &mut nt, Some(WINDOW)).await;
    let mut phases = vec![("NATS messages", rss(&central, &agent))];
    // Then a flood, as a hostile publisher would send it: the agent may drop what its bounded
    // buffer cannot hold, but must stay up, bounded, and answer again afterwards.
    nats_round(&nc, &flood, &mut ft, None).await;
    phases.push(("flood", rss(&central, &agent)));
    let mut probe = NatsTally::default();
    nats_round(
        &nc,
        &nats_messages(&mut rng, 16, 256),
        &mut probe,
        Some(WINDOW),
    )
    .await;
    forge_round(&js, &forged, &mut nt).await;
    assert!(
        caught_up(&http, &base, &js).await,
        "central did not index the forged events"
    );
    let mid = rss(&central, &agent);
    phases.push(("forged events", mid));
    http_round(central.port, &reqs, &mut ht).await;
    let rounds_took = t_rounds.elapsed();
    phases.push(("HTTP requests", rss(&central, &agent)));
    assert!(
        caught_up(&http, &base, &js).await,
        "central did not index the hostile events"
    );

    // Everything up, and the next real job runs.
    let mut problems: Vec<String> = ht.problems.clone();
    if nt.missing_replies > 0 {
        // Say why, if the server or the agent logged it: a slow consumer cut off, a reconnect.
        let server: Vec<String> = nats
            .log_text()
            .lines()
            .filter(|l| l.contains("Slow Consumer") || l.contains("Maximum Payload"))
            .take(3)
            .map(str::to_string)
            .collect();
        let agent_log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let reconnects = agent_log
            .lines()
            .filter(|l| l.contains("nats disconnected"))
            .count();
        problems.push(format!(
            "{} NATS job requests got no reply within {ANSWER_WITHIN:?} (agent disconnected from NATS {reconnects}x; nats-server: {server:?})",
            nt.missing_replies
        ));
    }
    if probe.missing_replies > 0 {
        problems.push(format!(
            "after the flood, {} of {} requests got no reply: the agent did not recover",
            probe.missing_replies, probe.expected
        ));
    }
    if let Some(st) = central.proc.exited() {
        problems.push(format!("central exited: {st}"));
    }
    if let Some(st) = agent.exited() {
        problems.push(format!("agent exited: {st}"));
    }
    if nc.connection_state() != async_nats::connection::State::Connected {
        problems.push("the test's NATS connection is down: nats-server went away".into());
    }
    let health = http.get(&format!("{base}/health")).await;
    if !matches!(&health, Ok((200, v)) if v["ok"] == true) {
        problems.push(format!("central /health after the rounds: {health:?}"));
    }
    let agent_health = http
        .get(&format!("http://127.0.0.1:{agent_port}/health"))
        .await;
    if !matches!(&agent_health, Ok((200, v)) if v["ok"] == true) {
        problems.push(format!("agent /health after the rounds: {agent_health:?}"));
    }
    let next = real_job_done(&http, &base, "after-the-storm").await;
    if next["status"] != "done" || next["machines"][0]["status"] != "done" {
        problems.push(format!(
            "the next real job ended {}: {next}",
            next["status"]
        ));
    }
    let allowed = |b: u64| b + RSS_MARGIN_KIB + (b as f64 * RSS_MARGIN_FRACTION) as u64;
    // Memory must come back within the margin, within RSS_RETURN_WITHIN.
    let after = settled_rss(
        &central,
        &agent,
        RSS_RETURN_WITHIN,
        Some((allowed(before.0), allowed(before.1))),
    )
    .await;
    let (_, m) = http.get(&format!("{base}/metrics")).await.expect("metrics");
    let invalid = metric(
        m.as_str().unwrap_or(""),
        "bench_central_events_invalid_total",
    )
    .unwrap_or(0);
    let jobs = metric(
        m.as_str().unwrap_or(""),
        "bench_central_index_records{kind=\"known\"}",
    )
    .unwrap_or(0);
    let cached = metric(
        m.as_str().unwrap_or(""),
        "bench_central_index_records{kind=\"in_memory\"}",
    )
    .unwrap_or(0);
    for (name, b, a) in [("central", before.0, after.0), ("agent", before.1, after.1)] {
        if a > allowed(b) {
            problems.push(format!(
                "{name} RSS still {a} KiB {RSS_RETURN_WITHIN:?} after the rounds, more than {b} KiB after warm-up + {} KiB + {:.0}%",
                RSS_MARGIN_KIB,
                RSS_MARGIN_FRACTION * 100.0
            ));
        }
    }
    for (name, log) in [("central", &central.proc.log), ("agent", &agent.log)] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            problems.push(format!("{name} panicked: {line}"));
        }
    }

    eprintln!(
        "---- hostile input, seed {seed}, {:.1} s (rounds {:.1} s) ----",
        t0.elapsed().as_secs_f64(),
        rounds_took.as_secs_f64()
    );
    eprintln!(
        "NATS: {} messages on bench.jobs.{MACHINE} / bench.jobs.all / bench.cancel.* ({} refused by the client library), kinds {:?}",
        nt.sent, nt.publish_refused, nt.by_kind
    );
    eprintln!(
        "NATS replies by code: {:?}; missing replies {} of {}",
        nt.replies, nt.missing_replies, nt.expected
    );
    eprintln!(
        "flood: {} requests as fast as the client writes ({} of ~{} KiB), {} answered, {} dropped by the agent's bounded buffer; afterwards {} of {} probe requests answered",
        ft.sent,
        ft.sent.div_ceil(6),
        big / 1024,
        ft.expected - ft.missing_replies,
        ft.missing_replies,
        probe.expected - probe.missing_replies,
        probe.expected
    );
    eprintln!(
        "forged events stored in BENCH_EVENTS: {} (central counts {invalid} invalid events in all)",
        nt.forged_stored
    );
    eprintln!(
        "HTTP: {} requests, by status {:?}, by code {:?}, slowest answer {:?}",
        ht.sent, ht.by_status, ht.by_code, ht.slowest
    );
    eprintln!("central: {jobs} jobs known ({cached} records in memory), mostly refusals the agent published");
    eprintln!(
        "RSS central: {} KiB after warm-up, {} KiB between the rounds, {} KiB after (allowed {}); agent: {} / {} / {} KiB (allowed {})",
        before.0, mid.0, after.0, allowed(before.0), before.1, mid.1, after.1, allowed(before.1)
    );
    let mut last = before;
    for (phase, r) in &phases {
        eprintln!(
            "  RSS after {phase:<14} central {:>7} KiB ({:+}), agent {:>7} KiB ({:+})",
            r.0,
            r.0 as i64 - last.0 as i64,
            r.1,
            r.1 as i64 - last.1 as i64
        );
        last = *r;
    }
    if !problems.is_empty() {
        eprintln!(
            "---- central log (tail) ----\n{}",
            central.proc.log_tail(30)
        );
        eprintln!("---- agent log (tail) ----\n{}", agent.log_tail(15));
        panic!(
            "hostile seed {seed}: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
}
