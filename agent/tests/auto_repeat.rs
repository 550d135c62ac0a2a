//! `repeat: "auto"` on a real nats-server with mock engines of known pace: a machine stops once
//! its decode rate's 95% interval is narrower than `target_ci_pct` (precision), once its
//! interval is apart from every other racer's (decided: each agent follows the race on the
//! job's own subject, no central involved), or at `max_repeat`, and says which.

mod common;

use bench_schemas::event::{Done, StopReason};
use bench_schemas::{subjects, EventKind};
use common::*;
use serde_json::json;

fn mock(id: &str, rate: f64, ttft_ms: f64) -> String {
    format!("machine_id: {id}\nengine: mock\nmock: {{tokens_per_s: {rate}, ttft_ms: {ttft_ms}}}\nllm_models: [mock-7b]\n")
}

/// Waits until every machine in `ids` has finished; returns their job_done in that order.
async fn all_done(ev: &mut Events, ids: &[&str]) -> Vec<Done> {
    let done = |ev: &Events, id: &str| {
        ev.seen.iter().find_map(|e| match &e.kind {
            EventKind::JobDone(d) if e.machine_id == id => Some(d.clone()),
            k if e.machine_id == id && k.is_terminal() => panic!("{id} ended with {k:?}"),
            _ => None,
        })
    };
    while ids.iter().any(|id| done(ev, id).is_none()) {
        ev.next().await;
    }
    ids.iter().map(|id| done(ev, id).unwrap()).collect()
}

fn measured(d: &Done) -> usize {
    d.repeats.iter().filter(|m| !m.warmup && !m.cold).count()
}

#[tokio::test]
async fn auto_repeat_stops_on_precision_on_a_decided_race_or_at_max() {
    let nats = NatsServer::start();
    let _fast = start_agent(config(&mock("fast", 150.0, 2.0), &nats.url()), &nats.url()).await;
    let _slow = start_agent(config(&mock("slow", 100.0, 2.0), &nats.url()), &nats.url()).await;
    let _crawl = start_agent(
        config(&mock("crawl", 50.0, 800.0), &nats.url()),
        &nats.url(),
    )
    .await;
    let c = client(&nats.url()).await;

    // Three machines apart in decode rate, a precision target no run can reach: each stops once
    // its 95% interval (6 runs at least) is apart from both others'. "crawl" takes 800 ms to
    // its first token, so fast and slow have 6 runs each before crawl finishes one: they must
    // wait for it (it accepted the job: every agent reads the race from the stream's start),
    // not decide between the two of them.
    let mut ev = Events::watch(&c, "auto-race").await;
    let job = job_json(
        "mock-7b",
        json!({"job_id": "auto-race", "max_tokens": 16, "repeat": "auto", "target_ci_pct": 1e-9, "max_repeat": 90}),
    );
    c.publish(subjects::JOBS_ALL, job.into()).await.unwrap();
    let done = all_done(&mut ev, &["fast", "slow", "crawl"]).await;
    let sixth_of_crawl = ev
        .seen
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.machine_id == "crawl"
                && matches!(&e.kind, EventKind::RepeatDone(m) if !m.warmup && !m.cold)
        })
        .nth(5)
        .map(|(i, _)| i)
        .expect("crawl ran 6 times");
    let fast_done = ev
        .seen
        .iter()
        .position(|e| e.machine_id == "fast" && e.kind.is_terminal())
        .unwrap();
    assert!(
        fast_done > sixth_of_crawl,
        "fast decided before crawl had an interval"
    );
    for d in &done {
        assert_eq!(d.stop_reason, StopReason::Decided, "{:?}", d.summary);
        let n = measured(d);
        assert!((6..90).contains(&n), "decided after {n} runs");
        let s = d.summary.gen_tokens_per_s.unwrap();
        assert!(s.ci_low.is_some() && s.ci_high.is_some());
    }
    let (f, s) = (
        done[0].summary.gen_tokens_per_s.unwrap(),
        done[1].summary.gen_tokens_per_s.unwrap(),
    );
    assert!(f.ci_low.unwrap() > s.ci_high.unwrap(), "{f:?} {s:?}");

    // The same job id again, on fast alone: the first race's results are an earlier race, not
    // racers to decide against, so fast runs on to max_repeat.
    let job = job_json(
        "mock-7b",
        json!({"job_id": "auto-race", "max_tokens": 16, "repeat": "auto", "target_ci_pct": 1e-9, "max_repeat": 8}),
    );
    let mut ev = Events::watch(&c, "auto-race").await;
    let r = request(&c, subjects::jobs("fast"), job).await;
    assert!(r.accepted, "{r:?}");
    let d = &all_done(&mut ev, &["fast"]).await[0];
    assert_eq!(d.stop_reason, StopReason::MaxRepeat);
    assert_eq!(measured(d), 8);

    // One machine, a reachable target: a steady mock is within 50% after the first 6 runs.
    let mut ev = Events::watch(&c, "auto-prec").await;
    let job = job_json(
        "mock-7b",
        json!({"job_id": "auto-prec", "max_tokens": 12, "repeat": "auto", "target_ci_pct": 50.0}),
    );
    let r = request(&c, subjects::jobs("fast"), job).await;
    assert!(r.accepted, "{r:?}");
    let d = &all_done(&mut ev, &["fast"]).await[0];
    assert_eq!(d.stop_reason, StopReason::Precision);
    assert_eq!(measured(d), 6);
    assert!(
        d.summary
            .gen_tokens_per_s
            .unwrap()
            .ci_half_width_pct()
            .unwrap()
            <= 50.0
    );

    // Alone with an unreachable target: max_repeat.
    let mut ev = Events::watch(&c, "auto-max").await;
    let job = job_json(
        "mock-7b",
        json!({"job_id": "auto-max", "max_tokens": 4, "repeat": "auto", "target_ci_pct": 1e-9, "max_repeat": 7, "warmup": 1}),
    );
    let r = request(&c, subjects::jobs("slow"), job).await;
    assert!(r.accepted, "{r:?}");
    let d = &all_done(&mut ev, &["slow"]).await[0];
    assert_eq!(d.stop_reason, StopReason::MaxRepeat);
    assert_eq!((measured(d), d.repeats.len()), (7, 8));

    // A max_repeat that can never give a 95% interval is refused up front.
    let r = request(
        &c,
        subjects::jobs("slow"),
        job_json("mock-7b", json!({"repeat": "auto", "max_repeat": 5})),
    )
    .await;
    assert!(!r.accepted);
    assert!(r.error.unwrap().message.contains("max_repeat"));
}
