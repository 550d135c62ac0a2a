//! What signed events cost per event (not a test): the agent's signature (its `Signer`:
//! ed25519 by its nkey over the payload, base64url into `Bench-Sig`, its key id in
//! `Bench-Key`) and central's check ([`Keys::verify`]: one map look-up, a stack decode, at most
//! one ed25519 verify when the key is named; [`Keys::check_batch`]: a batch's signatures
//! verified together, as ingestion and replay do), set beside central's own per-event work in
//! the same run (parse the envelope and apply it to the in-memory index, what `Ingest::apply`
//! does for every `llm_token`).
//!
//!   cargo bench -p bench-central --bench signing -- [N]   (scripts/bench signing [N])
//!
//! Numbers, not pass/fail. The verify cost is shown with one key known for the machine (the
//! usual case), with all [`MAX_KEYS`] known and the signer's the oldest (named, and not named as
//! by agents before `Bench-Key`), for forged events (with the machine's key id, with a key id
//! it never announced, and without one: every key tried), and per event of a batch (a core's
//! CPU, and wall time over this machine's cores), also with one forged event per chunk.

use async_nats::HeaderMap;
use bench_agent::publisher::Signer;
use bench_central::index::{Index, Ingested};
use bench_central::ingest::BATCH_MAX;
use bench_central::signing::{Item, Keys, SignatureMode, Verdict, CHUNK_MAX, MAX_KEYS};
use bench_schemas::{subjects, Event};
use bytes::Bytes;
use std::hint::black_box;
use std::time::Instant;

fn token_event(seq: u64) -> Vec<u8> {
    let text = "x".repeat(64);
    format!(
        r#"{{"job_id":"bench-job","machine_id":"m","run_id":"b-1","seq":{seq},"ts_ms":1764340000000,"type":"llm_token","payload":{{"repeat_index":0,"text":"{text}","tokens":12,"t_ms":{seq}.5}}}}"#
    )
    .into_bytes()
}

/// The headers the agent adds (`Outgoing::signed`).
fn sign(signer: &Signer, payload: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        subjects::SIGNATURE_HEADER,
        signer.signature(payload).as_str(),
    );
    h.insert(subjects::KEY_HEADER, signer.key_id());
    h
}

/// Without `Bench-Key` (agents before it).
fn unnamed(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    out.insert(
        subjects::SIGNATURE_HEADER,
        h.get(subjects::SIGNATURE_HEADER).expect("signed").as_str(),
    );
    out
}

/// This process's CPU seconds (user + system) from /proc (None elsewhere).
fn cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// Wall and CPU µs per event of checking `payloads` in batches of `batch` (as ingestion
/// does), asserting each verdict.
fn batched(
    rt: &tokio::runtime::Runtime,
    keys: &Keys,
    payloads: &[Bytes],
    headers: &[HeaderMap],
    batch: usize,
    want: impl Fn(usize) -> bool,
) -> (f64, Option<f64>) {
    let run = || {
        rt.block_on(async {
            for (at, (p, h)) in payloads
                .chunks(batch)
                .zip(headers.chunks(batch))
                .enumerate()
            {
                let items: Vec<Item<'_>> = p
                    .iter()
                    .zip(h)
                    .map(|(p, h)| Item {
                        machine: "m",
                        payload: p,
                        headers: Some(h),
                        stored_ms: 1,
                    })
                    .collect();
                for (i, v) in keys.check_batch(&items).await.into_iter().enumerate() {
                    assert_eq!(v == Verdict::Signed, want(at * batch + i), "event {i}");
                }
            }
        })
    };
    run();
    let (t, cpu) = (Instant::now(), cpu_s());
    run();
    let n = payloads.len() as f64;
    let wall = t.elapsed().as_secs_f64() * 1e6 / n;
    (wall, cpu.zip(cpu_s()).map(|(a, b)| (b - a) * 1e6 / n))
}

/// µs per call of `f` over `n` calls.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    // Warm up caches and the branch predictor.
    for i in 0..n.min(1000) {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// µs per call of `f` over `n` calls, without a warm-up (calls that must not repeat).
fn per_call_once(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let agent = Signer::ephemeral();
    let payloads: Vec<Bytes> = (1..=n as u64).map(|s| token_event(s).into()).collect();
    let bytes = payloads[0].len();

    let sign_us = per_call(n, |i| {
        black_box(sign(&agent, &payloads[i % n]));
    });
    let headers: Vec<HeaderMap> = payloads.iter().map(|p| sign(&agent, p)).collect();
    let bare: Vec<HeaderMap> = headers.iter().map(unnamed).collect();

    let one = Keys::new(SignatureMode::Verify);
    one.learn("m", agent.public_key(), 0);
    let verify_us = per_call(n, |i| {
        let v = one.verify("m", &payloads[i], Some(&headers[i]), 1);
        assert_eq!(v, Verdict::Signed);
    });
    let eight = Keys::new(SignatureMode::Verify);
    eight.learn("m", agent.public_key(), 0);
    for _ in 1..MAX_KEYS {
        eight.learn("m", Signer::ephemeral().public_key(), 0);
    }
    let oldest_us = per_call(n, |i| {
        let v = eight.verify("m", &payloads[i], Some(&headers[i]), 1);
        assert_eq!(v, Verdict::Signed);
    });
    let few = n.min(2000);
    let oldest_bare_us = per_call(few, |i| {
        let v = eight.verify("m", &payloads[i], Some(&bare[i]), 1);
        assert_eq!(v, Verdict::Signed);
    });
    let forger = Signer::ephemeral();
    // Signed by a key of its own, under the id of the machine's key (which anyone can read).
    let forged: Vec<HeaderMap> = payloads
        .iter()
        .take(few)
        .map(|p| {
            let mut h = sign(&forger, p);
            h.insert(subjects::KEY_HEADER, agent.key_id());
            h
        })
        .collect();
    let forged_us = per_call(few, |i| {
        let v = eight.verify("m", &payloads[i], Some(&forged[i]), 1);
        assert!(matches!(v, Verdict::Forged(_)));
    });
    let forged_own: Vec<HeaderMap> = payloads
        .iter()
        .take(few)
        .map(|p| sign(&forger, p))
        .collect();
    let forged_own_us = per_call(few, |i| {
        let v = eight.verify("m", &payloads[i], Some(&forged_own[i]), 1);
        assert!(matches!(v, Verdict::Forged(_)));
    });
    let forged_bare: Vec<HeaderMap> = forged_own.iter().map(unnamed).collect();
    let forged_bare_us = per_call(few, |i| {
        let v = eight.verify("m", &payloads[i], Some(&forged_bare[i]), 1);
        assert!(matches!(v, Verdict::Forged(_)));
    });
    let unknown_us = per_call(n, |i| {
        black_box(one.verify("nobody", &payloads[i], None, 1));
    });

    // A batch's signatures at once, as ingestion checks them (central runs a multi-thread
    // runtime); and with one forged event per chunk (the chunk verified again one by one).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (batch_wall, batch_cpu) = batched(&rt, &one, &payloads, &headers, BATCH_MAX, |_| true);
    let (chunk_wall, chunk_cpu) = batched(&rt, &one, &payloads, &headers, CHUNK_MAX, |_| true);
    let mut one_forged = headers.clone();
    for (i, h) in one_forged.iter_mut().enumerate() {
        if i % CHUNK_MAX == CHUNK_MAX / 2 {
            *h = forged[i % few].clone();
        }
    }
    let (mixed_wall, mixed_cpu) = batched(&rt, &one, &payloads, &one_forged, BATCH_MAX, |i| {
        i % CHUNK_MAX != CHUNK_MAX / 2
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The batch verification alone, one thread, by batch size (what CHUNK_MAX trades against
    // the cost of a forged event in a chunk).
    let key = ed25519_dalek::VerifyingKey::from_bytes(
        &nkeys::from_public_key(agent.public_key()).expect("key").1,
    )
    .expect("key");
    let sigs: Vec<ed25519_dalek::Signature> = headers
        .iter()
        .map(|h| {
            let raw = data_encoding::BASE64URL_NOPAD
                .decode(
                    h.get(subjects::SIGNATURE_HEADER)
                        .expect("signed")
                        .as_str()
                        .as_bytes(),
                )
                .expect("base64");
            ed25519_dalek::Signature::from_slice(&raw).expect("64 bytes")
        })
        .collect();
    let raw_batch: Vec<(usize, f64)> = [16usize, 64, 256, 1024]
        .into_iter()
        .filter(|b| *b <= n)
        .map(|b| {
            let msgs: Vec<&[u8]> = payloads[..b].iter().map(|p| &p[..]).collect();
            let keys = vec![key; b];
            let rounds = (n / b).max(1);
            let us = per_call(rounds, |_| {
                ed25519_dalek::verify_batch(&msgs, &sigs[..b], &keys).expect("verifies");
            });
            (b, us / b as f64)
        })
        .collect();

    // Central's own work per token event: parse, apply to the in-memory record.
    let index = Index::new(500);
    let accepted = {
        let mut job = bench_schemas::Job::new("m", "p");
        job.job_id = Some("bench-job".into());
        Event {
            job_id: "bench-job".into(),
            machine_id: "m".into(),
            run_id: "b-1".into(),
            seq: 0,
            ts_ms: 1,
            kind: bench_schemas::EventKind::JobAccepted(bench_schemas::event::Accepted {
                job,
                position: 0,
                engine: "mock".into(),
                engine_url: String::new(),
                label: "m".into(),
                agent_version: "0".into(),
                fingerprint: None,
            }),
        }
    };
    let _ = index.apply_event(&accepted, 1, 1, 1);
    let ingest_us = per_call_once(n, |i| {
        // Each payload once (seq 1..=n after the accept's 0): a replayed seq would be a
        // (cheaper) duplicate.
        let ev: Event = serde_json::from_slice(&payloads[i]).expect("event");
        match index.apply_event(&ev, 2 + i as u64, 1, 1) {
            Ingested::Applied(a, _) => {
                black_box(a);
            }
            Ingested::NotLoaded => unreachable!("in memory"),
        }
    });

    let cpu = |c: Option<f64>| c.map_or("?".to_string(), |c| format!("{c:.2}"));
    println!(
        "signed events: {n} llm_token events of {bytes} bytes (release build, {threads} cores)"
    );
    println!("  agent  sign + base64url header + key id   {sign_us:8.2} us/event");
    println!("  central verify, 1 key known                {verify_us:8.2} us/event");
    println!("  central verify, {MAX_KEYS} keys, signer oldest, named {oldest_us:8.2} us/event");
    println!("  central verify, {MAX_KEYS} keys, signer oldest, no id {oldest_bare_us:8.2} us/event  (agents before Bench-Key)");
    println!(
        "  central verify, forged, machine's key id   {forged_us:8.2} us/event  (1 verification)"
    );
    println!("  central verify, forged, unknown key id     {forged_own_us:8.2} us/event  (none)");
    println!("  central verify, forged, no key id          {forged_bare_us:8.2} us/event  ({MAX_KEYS} keys tried)");
    println!("  central verify, machine with no key        {unknown_us:8.2} us/event");
    println!(
        "  central batch check, {BATCH_MAX} per batch          {batch_wall:8.2} us/event wall, {} us CPU",
        cpu(batch_cpu)
    );
    println!(
        "  central batch check, {CHUNK_MAX} per batch            {chunk_wall:8.2} us/event wall, {} us CPU",
        cpu(chunk_cpu)
    );
    println!(
        "  central batch check, 1 forged per {CHUNK_MAX}         {mixed_wall:8.2} us/event wall, {} us CPU",
        cpu(mixed_cpu)
    );
    for (b, us) in &raw_batch {
        println!("  ed25519 batch verification alone, {b:4} sigs {us:8.2} us/event (1 thread)");
    }
    println!("  central parse + apply to index (ingest)    {ingest_us:8.2} us/event");
    println!(
        "  verify / ingest: {:.2}x single, {:.2}x batched (CPU); a core checks ~{:.0} events/s batched",
        verify_us / ingest_us,
        batch_cpu.unwrap_or(batch_wall) / ingest_us,
        1e6 / batch_cpu.unwrap_or(batch_wall)
    );
}
