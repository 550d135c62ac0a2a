//! Numbers that hold up, through the real indexer (a real nats-server, events published as an
//! agent does): a cold run and a short run are kept out of the summary and the text shown, the
//! ranking calls a winner only where the 95% intervals separate, and the CSV carries the
//! fidelity columns.

mod common;

use async_nats::jetstream;
use bench_schemas::event::{Started, StopReason, Token};
use bench_schemas::{EventKind, Job, Metrics, Repeat};
use common::*;

fn metrics(i: u32, rate: f64) -> Metrics {
    let mut m: Metrics =
        serde_json::from_str(include_str!("../../schemas/messages/metrics.json")).unwrap();
    m.repeat_index = i;
    m.gen_tokens_per_s = Some(rate);
    m.tg_tokens_per_s = Some(rate);
    m.pp_tokens_per_s = Some(rate * 10.0);
    m
}

/// The fidelity race's events of one machine.
trait FidelityRun {
    /// One repeat: started, one token batch, repeat_done.
    fn repeat(&mut self, m: Metrics, text: &str);
    fn done(&mut self, repeats: Vec<Metrics>, job: &Job, text: &str);
}

impl FidelityRun for RunEvents {
    fn repeat(&mut self, m: Metrics, text: &str) {
        self.push(EventKind::JobStarted(Started {
            cell: None,
            stream: None,
            repeat_index: m.repeat_index,
            warmup: m.warmup,
            cold: m.cold,
            fingerprint: None,
        }));
        self.push(EventKind::LlmToken(Token {
            repeat_index: m.repeat_index,
            text: text.into(),
            tokens: Some(1),
            t_ms: 1.0,
        }));
        self.push(EventKind::RepeatDone(m));
    }

    fn done(&mut self, repeats: Vec<Metrics>, job: &Job, text: &str) {
        self.done_with(repeats, job.include_short, |d| {
            d.output_text = text.into();
            d.shape = Some(job.shape());
            d.stop_reason = StopReason::Precision;
        });
    }
}

#[tokio::test]
async fn cold_and_short_runs_stay_apart_and_intervals_decide_the_winner() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);

    let mut job = Job::new("m", "");
    job.job_id = Some("fid-1".into());
    job.profile = Some("pp512-tg128".into());
    job.depth = 64;
    job.repeat = Repeat::Auto;
    job.max_repeat = Some(8);
    let accepted = |label: &str| {
        EventKind::JobAccepted(bench_schemas::event::Accepted {
            job: job.clone(),
            position: 0,
            engine: "mock".into(),
            engine_url: String::new(),
            label: label.into(),
            agent_version: "0".into(),
            fingerprint: None,
        })
    };

    // Machine a: a cold run at index 0 (warmup 0, model not loaded), then a short run, then
    // six measured ones around 100 tok/s.
    let mut a = RunEvents::new("fid-1", "a");
    a.push(accepted("A"));
    let mut cold = metrics(0, 5.0);
    cold.cold = true;
    cold.load_ms = Some(900.0);
    cold.ttft_ms = 950.0;
    a.repeat(cold.clone(), "cold text");
    let mut short = metrics(1, 500.0);
    short.short_output = true;
    a.repeat(short.clone(), "short text");
    publish_events(&js, &a.events).await;
    let v = job_when(&base, "fid-1", "a's first two runs", |v| {
        v["machines"][0]["repeats"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let m = &v["machines"][0];
    // Neither run is measured: nothing summarised, the cold run reported apart, and the text
    // shown is not the cold run's.
    assert_eq!(m["summary"]["repeats"], 0, "{m:#}");
    assert_eq!(m["summary"]["excluded_short"], 1, "{m:#}");
    assert_eq!(m["summary"]["cold"]["load_ms"], 900.0, "{m:#}");
    assert_eq!(m["summary"]["cold"]["ttft_ms"], 950.0, "{m:#}");
    assert_ne!(m["output_text"], "cold text");
    assert_eq!(v["job"]["repeat"], "auto");
    assert_eq!(v["job"]["profile"], "pp512-tg128");

    let mut runs_a = vec![cold, short];
    a.events.clear();
    for (i, rate) in [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
        .into_iter()
        .enumerate()
    {
        let r = metrics(2 + i as u32, rate);
        a.repeat(r.clone(), &format!("warm {i}"));
        runs_a.push(r);
    }
    publish_events(&js, &a.events).await;
    let v = job_when(&base, "fid-1", "a's measured runs", |v| {
        v["machines"][0]["summary"]["repeats"] == 6
    })
    .await;
    let s = &v["machines"][0]["summary"];
    assert_eq!(s["gen_tokens_per_s"]["median"], 102.5, "{s:#}");
    // n = 6: the interval of the median is ranks 1..6, here min..max.
    assert_eq!(
        (
            s["gen_tokens_per_s"]["ci_low"].clone(),
            s["gen_tokens_per_s"]["ci_high"].clone()
        ),
        (serde_json::json!(100.0), serde_json::json!(105.0))
    );
    assert_eq!(s["excluded_short"], 1);
    assert_eq!(v["machines"][0]["output_text"], "warm 5");

    // Machine b: three measured runs only, well below a. Ranges apart, but no interval yet.
    let mut b = RunEvents::new("fid-1", "b");
    b.push(accepted("B"));
    let mut runs_b = Vec::new();
    for (i, rate) in [50.0, 51.0, 52.0].into_iter().enumerate() {
        let r = metrics(i as u32, rate);
        b.repeat(r.clone(), "b");
        runs_b.push(r);
    }
    publish_events(&js, &b.events).await;
    let v = job_when(&base, "fid-1", "b's runs", |v| {
        v["ranking"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let r0 = &v["ranking"][0];
    assert_eq!(r0["machine_id"], "a");
    assert_eq!(r0["clear_winner"], false, "{r0:#}");
    assert!(
        r0["verdict"]
            .as_str()
            .unwrap()
            .starts_with("needs 6 repeats per machine for a 95% interval"),
        "{r0:#}"
    );
    assert_eq!(r0["separation"]["overlap_pct"], serde_json::Value::Null);

    // Three more for b: six each, intervals apart: a is the winner.
    b.events.clear();
    for (i, rate) in [53.0, 54.0, 55.0].into_iter().enumerate() {
        let r = metrics(3 + i as u32, rate);
        b.repeat(r.clone(), "b");
        runs_b.push(r);
    }
    b.done(runs_b, &job, "b");
    a.events.clear();
    a.done(runs_a, &job, "warm 5");
    publish_events(&js, &b.events).await;
    publish_events(&js, &a.events).await;
    let v = job_finished(&base, "fid-1").await;
    assert_eq!(v["status"], "done", "{v:#}");
    let r0 = &v["ranking"][0];
    assert_eq!(
        (r0["machine_id"].as_str(), r0["clear_winner"].as_bool()),
        (Some("a"), Some(true)),
        "{r0:#}"
    );
    assert_eq!(r0["separation"]["separated"], true);
    assert_eq!(r0["separation"]["overlap_pct"], 0.0);
    assert!(
        r0["verdict"]
            .as_str()
            .unwrap()
            .starts_with("clear winner: "),
        "{r0:#}"
    );
    assert_eq!(r0["pp_tokens_per_s"]["median"], 1025.0);
    assert_eq!(r0["tg_tokens_per_s"]["n"], 6);
    let ma = &v["machines"][0];
    assert_eq!(ma["stop_reason"], "precision");
    assert_eq!(ma["shape"]["prompt_tokens"], 512);
    assert_eq!(ma["shape"]["depth"], 64);
    assert_eq!(ma["summary"]["cold"]["load_ms"], 900.0);
    let (_, vs) = get(&base, "/api/jobs/fid-1?baseline=b").await;
    let d = &vs["ranking"][0]["delta_vs_baseline"];
    assert_eq!(d["gen_tokens_per_s_exceeds_ci"], true, "{d}");

    // The CSV: one row per run with the fidelity columns; the JSON export carries the rest.
    let csv = csv_export(&base, "fid-1").await;
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    for col in [
        "cold",
        "ttfot_ms",
        "streamed_tokens",
        "pp_tokens_per_s",
        "tg_tokens_per_s",
        "prompt_evaluated",
        "prompt_cache_hit",
        "short_output",
        "null_reason",
        "profile",
        "job_prompt_tokens",
        "depth",
    ] {
        assert!(head.contains(&col), "{col} in {head:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 8 + 6, "{csv}");
    let col = |row: &Vec<&str>, name: &str| {
        row[head.iter().position(|h| *h == name).unwrap()].to_string()
    };
    let of_a: Vec<&Vec<&str>> = rows.iter().filter(|r| r[1] == "a").collect();
    assert_eq!(col(of_a[0], "cold"), "true");
    assert_eq!(col(of_a[0], "short_output"), "false");
    assert_eq!(col(of_a[1], "short_output"), "true");
    assert_eq!(col(of_a[2], "cold"), "false");
    assert_eq!(col(of_a[2], "pp_tokens_per_s"), "1000");
    assert_eq!(col(of_a[2], "streamed_tokens"), "156");
    assert_eq!(
        (
            col(of_a[2], "profile"),
            col(of_a[2], "job_prompt_tokens"),
            col(of_a[2], "depth")
        ),
        (
            "pp512-tg128".to_string(),
            "512".to_string(),
            "64".to_string()
        )
    );
    let (_, json) = get(&base, "/api/jobs/fid-1/export.json").await;
    assert_eq!(json["machines"][0]["repeats"][0]["cold"], true);
    assert_eq!(json["machines"][0]["repeats"][1]["short_output"], true);
    assert_eq!(json["machines"][0]["summary"]["excluded_short"], 1);
    assert_eq!(json["ranking"][0]["verdict"], r0["verdict"]);
}
