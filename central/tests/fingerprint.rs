//! Fingerprints and telemetry through the real indexer (a real nats-server, typed events
//! published as an agent does): the newest fingerprint of a run lands in the record and the
//! exports; telemetry samples reach SSE (live and replayed) without a single record write; the
//! diff endpoint lists exactly what changed and refuses bad references; energy per token is
//! compared only where every racer has a power sensor.

mod common;

use async_nats::jetstream;
use bench_schemas::event::Started;
use bench_schemas::fingerprint::{EngineInfo, Fingerprint, Gpu, ModelInfo, Settings};
use bench_schemas::telemetry::{GpuSample, MeanPeak, Sample, TelemetrySummary};
use bench_schemas::{EventKind, Hardware, Job, Metrics};
use common::*;
use serde_json::Value;

fn fingerprint(build: &str, quant: &str) -> Fingerprint {
    Fingerprint {
        fingerprint_id: String::new(),
        hardware: Hardware {
            cpu: "AMD EPYC 9654".into(),
            cores: 16,
            memory_bytes: 128 << 30,
            os: "linux".into(),
            os_version: Some("Debian GNU/Linux 12".into()),
            kernel_version: Some("6.1.0-27-amd64".into()),
            arch: "x86_64".into(),
            gpus: vec![
                Gpu {
                    vendor: "nvidia".into(),
                    name: "NVIDIA H200".into(),
                    driver_version: Some("570.86".into()),
                    source: "nvml".into(),
                    ..Gpu::default()
                },
                Gpu {
                    index: 1,
                    vendor: "nvidia".into(),
                    name: "NVIDIA L4".into(),
                    source: "nvml".into(),
                    ..Gpu::default()
                },
            ],
            ..Hardware::default()
        },
        engine: EngineInfo {
            kind: "openai".into(),
            server: Some("llama.cpp".into()),
            build: Some(build.into()),
            ..EngineInfo::default()
        },
        model: ModelInfo {
            name: "m".into(),
            digest: Some("sha256:abc".into()),
            parameter_count: Some(268_098_176),
            quantization: Some(quant.into()),
            ..ModelInfo::default()
        },
        settings: Settings {
            mode: "generate".into(),
            num_ctx: 2048,
            max_tokens: 32,
            cache: "cold".into(),
            ..Settings::default()
        },
    }
    .with_id()
}

/// The fingerprint tests' events of one machine.
trait FingerprintRun {
    fn accepted(&mut self, label: &str, fp: Option<Fingerprint>) -> &mut Self;
    fn started(&mut self, i: u32, fp: Option<Fingerprint>) -> &mut Self;
    fn sample(&mut self, t_ms: f64, power: bool) -> &mut Self;
    fn repeat_done(&mut self, i: u32, jpt: Option<f64>) -> Metrics;
    fn done(&mut self, repeats: Vec<Metrics>, fp: Option<Fingerprint>) -> &mut Self;
}

impl FingerprintRun for RunEvents {
    fn accepted(&mut self, label: &str, fp: Option<Fingerprint>) -> &mut Self {
        let mut job = Job::new("m", "p");
        job.job_id = Some(self.job.clone());
        self.push(EventKind::JobAccepted(bench_schemas::event::Accepted {
            job,
            position: 0,
            engine: "openai".into(),
            engine_url: String::new(),
            label: label.into(),
            agent_version: "0".into(),
            fingerprint: fp,
        }))
    }

    fn started(&mut self, i: u32, fp: Option<Fingerprint>) -> &mut Self {
        self.push(EventKind::JobStarted(Started {
            cell: None,
            stream: None,
            repeat_index: i,
            warmup: false,
            cold: false,
            fingerprint: fp,
        }))
    }

    fn sample(&mut self, t_ms: f64, power: bool) -> &mut Self {
        self.push(EventKind::Telemetry(Sample {
            repeat_index: Some(0),
            t_ms,
            cpu_pct: Some(40.0 + t_ms / 100.0),
            mem_used_bytes: Some(8 << 30),
            power_w: power.then_some(300.0),
            gpus: vec![GpuSample {
                index: 0,
                util_pct: Some(90.0),
                ..GpuSample::default()
            }],
            ..Sample::default()
        }))
    }

    fn repeat_done(&mut self, i: u32, jpt: Option<f64>) -> Metrics {
        let mut m: Metrics =
            serde_json::from_str(include_str!("../../schemas/messages/metrics.json")).unwrap();
        m.repeat_index = i;
        m.telemetry = Some(TelemetrySummary {
            samples: 10,
            cpu_pct: Some(MeanPeak {
                mean: 42.5,
                peak: 61.0,
            }),
            gpu_util_pct: Some(MeanPeak {
                mean: 88.0,
                peak: 99.0,
            }),
            power_w: jpt.map(|_| MeanPeak {
                mean: 310.0,
                peak: 350.0,
            }),
            energy_j: jpt.map(|j| j * 156.0),
            joules_per_token: jpt,
            tokens_per_joule: jpt.map(|j| 1.0 / j),
            power_source: jpt.map(|_| "rapl+nvml".to_string()),
            ..TelemetrySummary::default()
        });
        self.push(EventKind::RepeatDone(m.clone()));
        m
    }

    fn done(&mut self, repeats: Vec<Metrics>, fp: Option<Fingerprint>) -> &mut Self {
        self.done_with(repeats, false, |d| {
            d.engine = "openai".into();
            d.gen_tokens = 156;
            d.pp_tokens_per_s = None;
            d.tg_tokens_per_s = None;
            d.output_text = "out".into();
            d.fingerprint = fp;
        })
    }
}

/// The job's KV revision and record as stored.
async fn stored(js: &jetstream::Context, job_id: &str) -> Option<(u64, Value)> {
    let kv = js
        .get_key_value(bench_schemas::subjects::JOBS_BUCKET)
        .await
        .ok()?;
    let e = kv.entry(job_id).await.ok()??;
    Some((e.revision, serde_json::from_slice(&e.value).ok()?))
}

/// The indexer's ack floor (stream sequence): acks follow the records' writes, so once it is at
/// or past an event, whatever that event would have made central write has been written.
async fn ack_floor(js: &jetstream::Context) -> u64 {
    let stream = js
        .get_stream(bench_schemas::subjects::EVENTS_STREAM)
        .await
        .unwrap();
    let mut c: jetstream::consumer::PullConsumer = stream
        .get_consumer(bench_schemas::subjects::INDEXER_CONSUMER)
        .await
        .unwrap();
    c.info().await.unwrap().ack_floor.stream_sequence
}

async fn last_stream_seq(js: &jetstream::Context) -> u64 {
    let mut s = js
        .get_stream(bench_schemas::subjects::EVENTS_STREAM)
        .await
        .unwrap();
    s.info().await.unwrap().state.last_sequence
}

#[tokio::test]
async fn newest_fingerprint_is_kept_and_telemetry_is_forwarded_without_a_record_write() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    let cached = fingerprint("b6000-aaaa", "Q4_K_M");
    let fresh = fingerprint("b6100-bbbb", "Q4_K_M");
    assert_ne!(cached.fingerprint_id, fresh.fingerprint_id);

    // The agent's cached fingerprint in job_accepted is shown first...
    let mut a = RunEvents::new("fp-1", "a");
    a.accepted("A", Some(cached.clone()));
    publish_events(&js, &a.take()).await;
    job_when(&base, "fp-1", "the accepted fingerprint", |v| {
        v["machines"][0]["fingerprint"]["fingerprint_id"] == cached.fingerprint_id.as_str()
    })
    .await;
    // ...and the fresh one of the first job_started replaces it, in memory and in KV.
    a.started(0, Some(fresh.clone()));
    publish_events(&js, &a.take()).await;
    job_when(&base, "fp-1", "the started fingerprint", |v| {
        v["machines"][0]["fingerprint"]["fingerprint_id"] == fresh.fingerprint_id.as_str()
    })
    .await;
    let state = central.state();
    let (revision, _) = until("the started record in KV, nothing unwritten", || async {
        let (rev, rec) = stored(&js, "fp-1").await?;
        let ok = rec["machines"][0]["fingerprint"]["fingerprint_id"]
            == fresh.fingerprint_id.as_str()
            && state.index.dirty_ids().is_empty()
            && ack_floor(&js).await == last_stream_seq(&js).await;
        ok.then_some((rev, rec))
    })
    .await;
    let writes = state
        .jobs_kv
        .writes
        .load(std::sync::atomic::Ordering::Relaxed);

    // 40 samples (10 s at 4 Hz): each reaches the browser; together they cost at most a couple
    // of record writes (the regular flush), never one each.
    let mut live = Sse::open(&format!("{base}/api/jobs/fp-1/events"), None).await;
    let mut seen_before = 0;
    while seen_before < 2 {
        let f = live.next().await.expect("replayed frame");
        assert_ne!(f.event, "telemetry");
        seen_before += 1;
    }
    for i in 0..40 {
        a.sample(f64::from(i) * 250.0, true);
    }
    publish_events(&js, &a.take()).await;
    let last = last_stream_seq(&js).await;
    let mut samples = Vec::new();
    while samples.len() < 40 {
        let f = live.next().await.expect("live telemetry frame");
        assert_eq!(f.event, "telemetry", "{f:?}");
        samples.push(f.json());
    }
    assert_eq!(samples[0]["payload"]["t_ms"], 0.0);
    assert_eq!(samples[39]["payload"]["t_ms"], 9750.0);
    assert_eq!(samples[39]["payload"]["gpus"][0]["util_pct"], 90.0);
    // Acknowledged only once their counts are stored: a central that crashed now would not
    // see acknowledged samples as a gap.
    let (_, rec) = until(
        "the samples acknowledged and their counts stored",
        || async {
            let (rev, rec) = stored(&js, "fp-1").await?;
            (ack_floor(&js).await >= last && rev > revision && rec["machines"][0]["last_seq"] == 42)
                .then_some((rev, rec))
        },
    )
    .await;
    assert_eq!(rec["machines"][0]["gaps"], 0);
    let extra = state
        .jobs_kv
        .writes
        .load(std::sync::atomic::Ordering::Relaxed)
        - writes;
    assert!(
        (1..=3).contains(&extra),
        "40 samples cost {extra} record writes (one per flush expected)"
    );
    assert_eq!(
        state
            .metrics
            .events_sampled
            .load(std::sync::atomic::Ordering::Relaxed),
        40
    );
    // They still count in the run's sequence: no gap once the next events come.
    let (_, v) = get(&base, "/api/jobs/fp-1").await;
    assert_eq!(v["machines"][0]["last_seq"], 42, "{v:#}");
    assert_eq!(v["machines"][0]["gaps"], 0);

    // job_done without a fingerprint keeps the fresh one.
    let r0 = a.repeat_done(0, Some(0.5));
    a.done(vec![r0], None);
    publish_events(&js, &a.take()).await;
    let v = job_finished(&base, "fp-1").await;
    let m = &v["machines"][0];
    assert_eq!(
        m["fingerprint"]["fingerprint_id"],
        fresh.fingerprint_id.as_str()
    );
    assert_eq!(m["fingerprint"]["engine"]["build"], "b6100-bbbb");
    assert_eq!(
        (m["last_seq"].clone(), m["gaps"].clone()),
        (44.into(), 0.into())
    );
    let (_, rec) = stored(&js, "fp-1").await.unwrap();
    assert_eq!(rec["machines"][0]["gaps"], 0);
    assert!(
        !rec.to_string().contains("\"t_ms\":9750"),
        "no sample in the stored record"
    );

    // A reload replays every sample in order.
    let mut replay = Sse::open(&format!("{base}/api/jobs/fp-1/events"), None).await;
    let frames = replay.until_end().await;
    let t: Vec<f64> = frames
        .iter()
        .filter(|f| f.event == "telemetry")
        .map(|f| f.json()["payload"]["t_ms"].as_f64().unwrap())
        .collect();
    assert_eq!(t, (0..40).map(|i| f64::from(i) * 250.0).collect::<Vec<_>>());

    // Exports: the CSV's fingerprint and telemetry columns, the whole fingerprint in JSON.
    let csv = csv_export(&base, "fp-1").await;
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(head.len(), row.len(), "{csv}");
    assert_eq!(head[..3], ["job_id", "machine_id", "label"]);
    let cell = |name: &str| row[head.iter().position(|h| *h == name).expect(name)];
    for (col, want) in [
        ("fingerprint_id", fresh.fingerprint_id.as_str()),
        ("cpu", "AMD EPYC 9654"),
        ("gpu", "NVIDIA H200+NVIDIA L4"),
        ("memory_bytes", "137438953472"),
        ("os_version", "Debian GNU/Linux 12"),
        ("kernel_version", "6.1.0-27-amd64"),
        ("engine_server", "llama.cpp"),
        ("engine_version", ""),
        ("engine_build", "b6100-bbbb"),
        ("model_digest", "sha256:abc"),
        ("model_quantization", "Q4_K_M"),
        ("model_parameter_count", "268098176"),
        ("cpu_pct_mean", "42.5"),
        ("cpu_pct_peak", "61"),
        ("gpu_util_pct_mean", "88"),
        ("power_w_mean", "310"),
        ("power_w_peak", "350"),
        ("energy_j", "78"),
        ("joules_per_token", "0.5"),
        ("tokens_per_joule", "2"),
        ("power_source", "rapl+nvml"),
    ] {
        assert_eq!(cell(col), want, "{col} in {csv}");
    }
    let (_, json) = get(&base, "/api/jobs/fp-1/export.json").await;
    let fp: Fingerprint =
        serde_json::from_value(json["machines"][0]["fingerprint"].clone()).unwrap();
    assert_eq!(fp, fresh);
}

#[tokio::test]
async fn the_diff_lists_what_changed_and_each_machine_is_compared_with_its_previous_job() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);
    let before = fingerprint("b6000-aaaa", "Q4_K_M");
    let mut after = fingerprint("b6100-bbbb", "Q8_0");
    after.hardware.gpus[0].driver_version = Some("575.51".into());
    let after = after.with_id();

    let mut one = RunEvents::new("diff-1", "a");
    one.accepted("A", Some(before.clone()));
    publish_events(&js, &one.take()).await;
    let mut other = RunEvents::new("diff-1", "nofp");
    other.accepted("No FP", None);
    publish_events(&js, &other.take()).await;
    job_when(&base, "diff-1", "job 1", |v| {
        v["machines"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let mut two = RunEvents::new("diff-2", "a");
    two.accepted("A", Some(after.clone()));
    publish_events(&js, &two.take()).await;
    job_when(&base, "diff-2", "job 2", |v| {
        v["machines"][0]["fingerprint"].is_object()
    })
    .await;

    let (s, d) = get(&base, "/api/fingerprints/diff?a=diff-1:a&b=diff-2:a").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["same"], false);
    assert_eq!(d["a"]["fingerprint_id"], before.fingerprint_id.as_str());
    assert_eq!(d["b"]["fingerprint_id"], after.fingerprint_id.as_str());
    assert_eq!(d["b"]["fingerprint"]["engine"]["build"], "b6100-bbbb");
    let changes: Vec<(String, String, String)> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let t = |k: &str| c[k].as_str().unwrap().to_string();
            (t("field"), t("before"), t("after"))
        })
        .collect();
    let want = |f: &str, b: &str, a: &str| (f.to_string(), b.to_string(), a.to_string());
    assert_eq!(
        changes,
        [
            want("gpu0.driver_version", "570.86", "575.51"),
            want("engine.build", "b6000-aaaa", "b6100-bbbb"),
            want("model.quantization", "Q4_K_M", "Q8_0"),
        ]
    );
    let (s, same) = get(&base, "/api/fingerprints/diff?a=diff-2:a&b=diff-2:a").await;
    assert_eq!(s, 200);
    assert_eq!(
        (same["same"].clone(), same["changes"].clone()),
        (true.into(), serde_json::json!([]))
    );

    // The job view: machine a compared with its previous job, the same three changes.
    let (_, v) = get(&base, "/api/jobs/diff-2").await;
    let prev = &v["machines"][0]["previous"];
    assert_eq!(prev["job_id"], "diff-1", "{v:#}");
    assert_eq!(prev["fingerprint_id"], before.fingerprint_id.as_str());
    assert_eq!(prev["same"], false);
    assert_eq!(prev["changes"].as_array().unwrap().len(), 3);
    assert_eq!(prev["changes"][1]["field"], "engine.build");
    let (_, v) = get(&base, "/api/jobs/diff-1").await;
    assert!(
        v["machines"][0]["previous"].is_null(),
        "no earlier job: {v:#}"
    );

    // Refusals: each names what is wrong.
    for (query, status, code) in [
        ("a=diff-1:a", 400, "bad_request"),
        ("b=diff-1:a", 400, "bad_request"),
        ("a=diff-1&b=diff-2:a", 400, "bad_request"),
        ("a=diff.1:a&b=diff-2:a", 400, "invalid_id"),
        ("a=diff-1:A!&b=diff-2:a", 400, "invalid_id"),
        ("a=diff-1:a&b=nope:a", 404, "not_found"),
        ("a=diff-1:zz&b=diff-2:a", 404, "not_found"),
        ("a=diff-1:nofp&b=diff-2:a", 404, "not_found"),
    ] {
        let (s, e) = get(&base, &format!("/api/fingerprints/diff?{query}")).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {e}"
        );
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn energy_per_token_is_ranked_only_where_every_racer_has_a_sensor() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    let js = jetstream::new(client(&nats.url()).await);

    let race = |job: &str, jpts: &[(&str, Option<f64>)]| {
        let mut evs = Vec::new();
        for (machine, jpt) in jpts {
            let mut r = RunEvents::new(job, machine);
            r.accepted(&format!("Label {machine}"), None);
            r.started(0, None).sample(0.0, jpt.is_some());
            let m = r.repeat_done(0, *jpt);
            r.done(vec![m], None);
            evs.extend(r.take());
        }
        evs
    };
    publish_events(&js, &race("en-1", &[("p", Some(0.4)), ("q", None)])).await;
    let v = job_finished(&base, "en-1").await;
    assert_eq!(v["ranking"].as_array().unwrap().len(), 2, "{v:#}");
    assert_eq!(v["energy"]["available"], false, "{v:#}");
    assert_eq!(v["energy"]["reason"], "no sensor on Label q");
    assert_eq!(v["energy"]["ranking"], serde_json::json!([]));

    publish_events(&js, &race("en-2", &[("p", Some(0.4)), ("q", Some(0.25))])).await;
    let v = job_finished(&base, "en-2").await;
    let e = &v["energy"];
    assert_eq!(e["available"], true, "{v:#}");
    assert!(e.get("reason").is_none());
    let order: Vec<&str> = e["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["machine_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["q", "p"], "least energy per token first");
    assert_eq!(e["ranking"][0]["joules_per_token"]["median"], 0.25);
    assert_eq!(e["ranking"][0]["tokens_per_joule"]["median"], 4.0);
    assert_eq!(e["ranking"][0]["power_source"], "rapl+nvml");
    assert_eq!(e["ranking"][0]["rank"], 1);
}
