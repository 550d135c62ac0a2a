//! What signed events cost per event (not a test): the agent's signature (ed25519 by its nkey
//! over the payload, base64url into `Bench-Sig`) and central's check ([`Keys::verify`]: one
//! map look-up, a stack decode, an ed25519 verify), set beside central's own per-event work in
//! the same run (parse the envelope and apply it to the in-memory index, what `Ingest::apply`
//! does for every `llm_token`).
//!
//!   cargo bench -p bench-central --bench signing -- [N]   (scripts/bench signing [N])
//!
//! Numbers, not pass/fail. The verify cost is shown with one key known for the machine (the
//! usual case), with all [`MAX_KEYS`] known and the signer's the oldest (the worst a genuine
//! event pays), and for a forged event (every key tried).

use async_nats::HeaderMap;
use bench_central::index::{Index, Ingested};
use bench_central::signing::{Keys, SignatureMode, Verdict, MAX_KEYS};
use bench_schemas::{subjects, Event};
use std::hint::black_box;
use std::time::Instant;

fn token_event(seq: u64) -> Vec<u8> {
    let text = "x".repeat(64);
    format!(
        r#"{{"job_id":"bench-job","machine_id":"m","run_id":"b-1","seq":{seq},"ts_ms":1764340000000,"type":"llm_token","payload":{{"repeat_index":0,"text":"{text}","tokens":12,"t_ms":{seq}.5}}}}"#
    )
    .into_bytes()
}

fn sign(kp: &nkeys::KeyPair, payload: &[u8]) -> HeaderMap {
    let sig = data_encoding::BASE64URL_NOPAD.encode(&kp.sign(payload).expect("seed"));
    let mut h = HeaderMap::new();
    h.insert(subjects::SIGNATURE_HEADER, sig.as_str());
    h
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
    let agent = nkeys::KeyPair::new_user();
    let payloads: Vec<Vec<u8>> = (1..=n as u64).map(token_event).collect();
    let bytes = payloads[0].len();

    let sign_us = per_call(n, |i| {
        black_box(sign(&agent, &payloads[i % n]));
    });
    let headers: Vec<HeaderMap> = payloads.iter().map(|p| sign(&agent, p)).collect();

    let one = Keys::new(SignatureMode::Verify);
    one.learn("m", &agent.public_key(), 0);
    let verify_us = per_call(n, |i| {
        let v = one.verify("m", &payloads[i], Some(&headers[i]), 1);
        assert_eq!(v, Verdict::Signed);
    });
    let eight = Keys::new(SignatureMode::Verify);
    eight.learn("m", &agent.public_key(), 0);
    for _ in 1..MAX_KEYS {
        eight.learn("m", &nkeys::KeyPair::new_user().public_key(), 0);
    }
    let oldest_us = per_call(n, |i| {
        let v = eight.verify("m", &payloads[i], Some(&headers[i]), 1);
        assert_eq!(v, Verdict::Signed);
    });
    let forger = nkeys::KeyPair::new_user();
    let forged: Vec<HeaderMap> = payloads
        .iter()
        .take(2000)
        .map(|p| sign(&forger, p))
        .collect();
    let forged_us = per_call(forged.len(), |i| {
        let v = eight.verify("m", &payloads[i], Some(&forged[i]), 1);
        assert!(matches!(v, Verdict::Forged(_)));
    });
    let unknown_us = per_call(n, |i| {
        black_box(one.verify("nobody", &payloads[i], None, 1));
    });

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

    println!("signed events: {n} llm_token events of {bytes} bytes (release build)");
    println!("  agent  sign + base64url header          {sign_us:8.2} us/event");
    println!("  central verify, 1 key known              {verify_us:8.2} us/event");
    println!("  central verify, {MAX_KEYS} keys, signer oldest     {oldest_us:8.2} us/event");
    println!("  central verify, forged ({MAX_KEYS} keys tried)     {forged_us:8.2} us/event");
    println!("  central verify, machine with no key      {unknown_us:8.2} us/event");
    println!("  central parse + apply to index (ingest)  {ingest_us:8.2} us/event");
    println!(
        "  verify / ingest: {:.2}x; a core verifies ~{:.0} events/s",
        verify_us / ingest_us,
        1e6 / verify_us
    );
}
