//! Every checked-in example in `schemas/messages/` parses as its type, and survives a
//! round trip unchanged (the examples are the contract's documentation).

use bench_schemas::{AgentInfo, Event, EventKind, Job, JobLimits, JobReply, Metrics};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

fn load<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("messages")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    // Round trip through JSON text and compare as values, and as typed values.
    let again: T = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
    assert_eq!(value, again, "{name}");
    let raw: Value = serde_json::from_str(&text).unwrap();
    let emitted: Value = serde_json::to_value(&value).unwrap();
    for (k, v) in raw.as_object().unwrap() {
        assert_eq!(
            emitted.get(k),
            Some(v),
            "{name}: field {k} changed in the round trip"
        );
    }
    value
}

#[test]
fn jobs() {
    let j: Job = load("job.json");
    assert_eq!(
        (j.repeat, j.warmup, j.max_tokens),
        (bench_schemas::Repeat::Count(3), 1, 128)
    );
    j.validate(&JobLimits::default()).unwrap();
    let b: Job = load("job_broadcast.json");
    b.validate(&JobLimits::default()).unwrap();
    assert!(b.selector.is_some());
    let p: Job = load("job_profile.json");
    p.validate(&JobLimits::default()).unwrap();
    assert_eq!(p.repeat, bench_schemas::Repeat::Auto);
    let m: Job = load("job_matrix.json");
    m.validate(&JobLimits::default()).unwrap();
    let cells = m.cells();
    assert_eq!(cells.len(), 6);
    assert_eq!(cells[5].key, "model=gemma-3-270m-q8,concurrency=4");
    assert!(cells[5].job.is_load());
    let shape = p.shape();
    assert_eq!(
        (shape.prompt_tokens, shape.max_tokens, shape.ignore_eos),
        (Some(512), 128, true)
    );
}

#[test]
fn replies() {
    let a: JobReply = load("reply_accepted.json");
    assert!(a.accepted && a.error.is_none());
    let run_id = a.run_id.as_deref().expect("an accept names its run");
    assert_eq!(
        bench_schemas::subjects::boot_of(run_id),
        Some("3f9a0c27d1e4")
    );
    let r: JobReply = load("reply_rejected.json");
    assert_eq!(r.run_id, None);
    assert_eq!(r.error.unwrap().code.as_str(), "invalid_max_tokens");
}

#[test]
fn events() {
    let names = [
        ("event_job_accepted.json", "job_accepted"),
        ("event_job_started.json", "job_started"),
        ("event_llm_token.json", "llm_token"),
        ("event_repeat_done.json", "repeat_done"),
        ("event_job_done.json", "job_done"),
        ("event_job_error.json", "job_error"),
        ("event_job_cancelled.json", "job_cancelled"),
        ("event_job_started_first.json", "job_started"),
        ("event_telemetry.json", "telemetry"),
        ("event_cell_done.json", "cell_done"),
    ];
    for (file, ty) in names {
        let e: Event = load(file);
        assert_eq!(e.kind.name(), ty, "{file}");
        assert_eq!(
            e.kind.is_terminal(),
            matches!(ty, "job_done" | "job_error" | "job_cancelled")
        );
    }
    let done: Event = load("event_job_done.json");
    let EventKind::JobDone(d) = done.kind else {
        panic!()
    };
    assert_eq!(d.summary.repeats, d.repeats.len() as u32);
    // The first job_started's fingerprint (recorded from the demo engine): its id is the hash of
    // its parts.
    let first: Event = load("event_job_started_first.json");
    let EventKind::JobStarted(s) = first.kind else {
        panic!()
    };
    let fp = s.fingerprint.expect("fingerprint");
    assert_eq!(fp.clone().with_id().fingerprint_id, fp.fingerprint_id);
    assert_eq!(fp.model.quantization.as_deref(), Some("Q4_K_M"));
    let t: Event = load("event_telemetry.json");
    let EventKind::Telemetry(t) = t.kind else {
        panic!()
    };
    assert_eq!(t.gpus[0].power_w, Some(323.2));
    let c: Event = load("event_cell_done.json");
    let EventKind::CellDone(c) = c.kind else {
        panic!()
    };
    let slo = bench_schemas::Slo {
        ttft_p99_ms: Some(1000.0),
    };
    assert!(slo.met_by(c.load.as_ref().expect("load")));
}

#[test]
fn metrics_and_registry() {
    let m: Metrics = load("metrics.json");
    assert!(m.ttft_ms < m.total_ms);
    let a: AgentInfo = load("agent_info.json");
    assert_eq!(a.machine_id, "macbook");
    assert!(a.signing_key.as_deref().is_some_and(|k| k.starts_with('U')));
    assert_eq!(a.hardware.gpus[0].cores, Some(40));
    let t = m.telemetry.expect("telemetry summary");
    assert_eq!(t.power_source.as_deref(), Some("rapl+nvml"));
}
