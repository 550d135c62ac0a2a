//! Fingerprint and telemetry on a real run: the demo llama.cpp engine, a real nats-server, two
//! agents racing. Agent "watt" reads a fake RAPL powercap tree (`rapl_root`) whose package
//! counter a thread here advances at exactly 25 W; agent "dark" has no power source. Checked
//! against known truth: energy = 25 W x the decode window, J/token = 25 W / the decode rate,
//! the model digest = `sha256sum` of the file llama-server names, the CPU = /proc/cpuinfo.

mod common;

use bench_schemas::{subjects, AgentInfo, Event, EventKind, Fingerprint, Metrics};
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WATTS: f64 = 25.0;
const INTERVAL_MS: u64 = 100;

/// A powercap tree with one package zone whose `energy_uj` rises at exactly [`WATTS`]; each
/// value is written whole (temp file + rename), every 2 ms.
struct FakeRapl {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRapl {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let zone = dir.path().join("intel-rapl:0");
        std::fs::create_dir(&zone).unwrap();
        std::fs::write(zone.join("name"), "package-0\n").unwrap();
        std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").unwrap();
        std::fs::write(zone.join("energy_uj"), "0\n").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let tmp = zone.join(".energy_uj.tmp");
                while !stop.load(Ordering::Relaxed) {
                    let uj = (t0.elapsed().as_secs_f64() * WATTS * 1e6) as u64;
                    std::fs::write(&tmp, format!("{uj}\n")).unwrap();
                    std::fs::rename(&tmp, zone.join("energy_uj")).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            dir,
            stop,
            thread: Some(thread),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FakeRapl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU busy % of this machine over `d`, from /proc/stat (the test's own reading).
fn cpu_busy_pct(d: Duration) -> f64 {
    let read = || {
        let s = std::fs::read_to_string("/proc/stat").unwrap();
        let v: Vec<u64> = s.lines().next().unwrap()[3..]
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let idle = v[3] + v[4];
        (v.iter().sum::<u64>(), idle)
    };
    let (t1, i1) = read();
    std::thread::sleep(d);
    let (t2, i2) = read();
    100.0 * (1.0 - (i2 - i1) as f64 / (t2 - t1).max(1) as f64)
}

fn sha256sum(path: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

fn measured(d: &bench_schemas::event::Done) -> Vec<&Metrics> {
    d.repeats.iter().filter(|m| !m.warmup && !m.cold).collect()
}

async fn registry_entry(c: &async_nats::Client, machine_id: &str) -> AgentInfo {
    let js = async_nats::jetstream::new(c.clone());
    let kv = within(
        "agents bucket",
        WAIT,
        js.get_key_value(subjects::AGENTS_BUCKET),
    )
    .await
    .expect("bucket");
    within("registry entry", WAIT, async {
        loop {
            if let Ok(Some(v)) = kv.get(machine_id).await {
                let info: AgentInfo = serde_json::from_slice(&v).unwrap();
                if info.engine_info.is_some() {
                    return info;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn telemetry_of<'a>(events: &'a [Event], machine: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.machine_id == machine && matches!(e.kind, EventKind::Telemetry(_)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_and_telemetry_on_the_demo_engine() {
    let engine = LlamaServer::start();
    let nats = NatsServer::start();
    let rapl = FakeRapl::start();
    let empty = tempfile::tempdir().unwrap();
    let agent = |id: &str, root: &Path| {
        config(
            &format!(
                "machine_id: {id}\nengine: openai\nopenai_base_url: {}\ntelemetry:\n  interval_ms: {INTERVAL_MS}\n  rapl_root: {}\n  nvml: false\n",
                engine.url(),
                root.display()
            ),
            &nats.url(),
        )
    };
    let _watt = start_agent(agent("watt", rapl.root()), &nats.url()).await;
    let _dark = start_agent(agent("dark", empty.path()), &nats.url()).await;
    let c = client(&nats.url()).await;

    // The registry: engine identity, and which telemetry sources each agent reads.
    let watt_info = registry_entry(&c, "watt").await;
    let dark_info = registry_entry(&c, "dark").await;
    let engine_info = watt_info.engine_info.as_ref().unwrap();
    assert_eq!(engine_info.server.as_deref(), Some("llama.cpp"));
    assert!(engine_info.build.is_some(), "{engine_info:?}");
    assert_eq!(
        watt_info.telemetry.get("cpu").map(String::as_str),
        Some("sysinfo")
    );
    assert!(
        watt_info.telemetry.values().any(|s| s == "rapl"),
        "{:?}",
        watt_info.telemetry
    );
    assert!(
        !dark_info.telemetry.values().any(|s| s == "rapl"),
        "{:?}",
        dark_info.telemetry
    );

    let idle = tokio::task::spawn_blocking(|| cpu_busy_pct(Duration::from_millis(1000)))
        .await
        .unwrap();

    // A race: pp64-tg64, 3 measured runs each.
    let job = |id: &str, tg: u32| {
        serde_json::to_vec(&json!({
            "job_id": id, "model": ENGINE_MODEL, "profile": format!("pp64-tg{tg}"),
            "repeat": 3, "warmup": 1, "temperature": 0.0, "seed": 1
        }))
        .unwrap()
    };
    let mut ev = Events::watch(&c, "tl-1").await;
    let sent = Instant::now();
    c.publish(subjects::JOBS_ALL, job("tl-1", 64).into())
        .await
        .unwrap();
    let mut done = std::collections::HashMap::new();
    while done.len() < 2 {
        let e = ev.until(|e| e.kind.is_terminal()).await;
        let EventKind::JobDone(d) = e.kind else {
            panic!("{e:?}")
        };
        done.insert(e.machine_id.clone(), d);
    }
    let job_s = sent.elapsed().as_secs_f64();
    let js = async_nats::jetstream::new(c.clone());
    let stored = stored_events(&js, "tl-1", 2).await;

    // Fingerprint: from the first job_started and in job_done, checked against the OS and the
    // engine's own file.
    let fp_started = |m: &str| -> Fingerprint {
        stored
            .iter()
            .filter(|e| e.machine_id == m)
            .find_map(|e| match &e.kind {
                EventKind::JobStarted(s) => s.fingerprint.clone(),
                _ => None,
            })
            .expect("the first job_started carries the fingerprint")
    };
    let fp = fp_started("watt");
    assert_eq!(done["watt"].fingerprint.as_ref(), Some(&fp));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let model_name = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap();
    assert_eq!(fp.hardware.cpu, model_name);
    let props: Value = reqwest::get(format!("{}/props", engine.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = props["model_path"].as_str().unwrap().to_string();
    let want = tokio::task::spawn_blocking(move || sha256sum(&path))
        .await
        .unwrap();
    assert_eq!(fp.model.digest.as_deref(), Some(want.as_str()));
    assert_eq!(fp.model.quantization.as_deref(), Some("Q4_K_M"));
    assert_eq!(fp.model.parameter_count, Some(268_098_176));
    assert_eq!(fp.engine.server.as_deref(), Some("llama.cpp"));
    assert_eq!(
        (fp.settings.prompt_tokens, fp.settings.max_tokens),
        (Some(64), 64)
    );
    assert_eq!(fp, fp.clone().with_id(), "id is the hash of the parts");
    // Both agents run on the same machine and engine: the same fingerprint.
    assert_eq!(fp_started("dark").fingerprint_id, fp.fingerprint_id);

    // Telemetry events: at the configured rate, between acceptance and the end, with the
    // sources named; the sampler stopped before the final event (nothing stored after it).
    for m in ["watt", "dark"] {
        let own: Vec<&Event> = stored.iter().filter(|e| e.machine_id == m).collect();
        assert_gapless(&own);
        let samples = telemetry_of(&stored, m);
        let last = own.last().unwrap();
        assert!(last.kind.is_terminal(), "nothing after the terminal event");
        let span_ms = samples.last().map(|e| match &e.kind {
            EventKind::Telemetry(s) => s.t_ms,
            _ => unreachable!(),
        });
        let span_ms = span_ms.expect("samples arrived");
        let expected = span_ms / INTERVAL_MS as f64;
        let n = samples.len() as f64;
        assert!(
            // +1 for the sample at 0 ms, and a summary may take one fresh reading per run.
            n >= expected * 0.8 && n <= expected + 1.0 + 8.0,
            "{m}: {n} samples over {span_ms} ms at {INTERVAL_MS} ms"
        );
        assert!(span_ms <= job_s * 1000.0 + 500.0);
        let EventKind::Telemetry(first) = &samples[0].kind else {
            unreachable!()
        };
        assert_eq!(
            first.sources.get("cpu").map(String::as_str),
            Some("sysinfo")
        );
        assert!(first.mem_used_bytes.is_some_and(|b| b > 0));
    }

    // CPU rises during decode (the engine computes on every core).
    let run_cpu: Vec<f64> = measured(&done["watt"])
        .iter()
        .map(|m| m.telemetry.as_ref().unwrap().cpu_pct.unwrap().mean)
        .collect();
    let busy = run_cpu.iter().sum::<f64>() / run_cpu.len() as f64;
    assert!(
        busy > idle + 10.0,
        "CPU during runs {busy:.1}% vs idle {idle:.1}% ({run_cpu:?})"
    );

    // Energy: present exactly where a power source is, and equal to the known power x the
    // decode window; J/token = power / decode rate.
    for m in measured(&done["watt"]) {
        let t = m.telemetry.as_ref().unwrap();
        let window_s = t.decode_window_ms.unwrap() / 1000.0;
        let energy = t.energy_j.expect("energy with a power source");
        assert!(
            (energy / (WATTS * window_s) - 1.0).abs() < 0.05,
            "energy {energy} J over {window_s} s at {WATTS} W"
        );
        let jpt = t.joules_per_token.unwrap();
        let rate = m.gen_tokens_per_s.unwrap();
        assert!(
            (jpt / (WATTS / rate) - 1.0).abs() < 0.05,
            "{jpt} J/token at {rate} tok/s and {WATTS} W"
        );
        assert!((t.tokens_per_joule.unwrap() * jpt - 1.0).abs() < 1e-9);
        assert_eq!(t.power_source.as_deref(), Some("rapl"));
        let p = t.power_w.unwrap();
        assert!((p.mean / WATTS - 1.0).abs() < 0.1, "mean power {p:?}");
    }
    let s = &done["watt"].summary;
    assert!(s.joules_per_token.is_some() && s.power_w.is_some());
    for m in measured(&done["dark"]) {
        let t = m.telemetry.as_ref().unwrap();
        assert!(t.samples > 0);
        assert_eq!(
            (t.energy_j, t.joules_per_token, t.power_source.as_deref()),
            (None, None, None)
        );
    }
    assert!(done["dark"].summary.joules_per_token.is_none());

    // A second job on "watt" alone: job_accepted now carries the fingerprint from the cache;
    // another output length is another fingerprint, and the difference is named.
    let mut ev2 = Events::watch(&c, "tl-2").await;
    let r = request(&c, subjects::jobs("watt"), job("tl-2", 32)).await;
    assert!(r.accepted, "{r:?}");
    let accepted = ev2
        .until(|e| matches!(e.kind, EventKind::JobAccepted(_)))
        .await;
    let EventKind::JobAccepted(a) = accepted.kind else {
        unreachable!()
    };
    let fp2 = a.fingerprint.expect("cached fingerprint in job_accepted");
    assert_ne!(fp2.fingerprint_id, fp.fingerprint_id);
    let changes: Vec<String> = fp.diff(&fp2).into_iter().map(|c| c.field).collect();
    assert_eq!(changes, ["settings.max_tokens"]);
    ev2.terminal("watt").await;
    // No sample of the first job was stored after it ended, although the machine was sampled
    // again for the second one.
    let again = stored_events(&js, "tl-1", 2).await;
    assert_eq!(again.len(), stored.len(), "tl-1 grew after its end");
    assert!(!telemetry_of(&stored_events(&js, "tl-2", 1).await, "watt").is_empty());
}
