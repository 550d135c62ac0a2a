//! Real nats-server, real agents: the real llama-server (gemma-3-270m) and a mock race one job;
//! the comparison, the exports and the results folder. And a fleet broadcast ("all").

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn llama_and_mock_race_one_job() {
    let fleet = LlamaRace::start("", 500.0).await;
    let base = fleet.central.base();

    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["llama", "mock"], "test_type": "llm_generate", "model": ENGINE_MODEL,
                "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0, "num_ctx": 2048,
                "repeat": 2, "warmup": 1, "seed": 7}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    let statuses: Vec<_> = out["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["machine_id"].clone(), m["status"].clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (json!("llama"), json!("accepted")),
            (json!("mock"), json!("accepted"))
        ]
    );
    let job_id = out["job_id"].as_str().unwrap().to_string();

    let done = job_finished(&base, &job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    for m in done["machines"].as_array().unwrap() {
        let id = m["machine_id"].as_str().unwrap();
        assert_eq!(m["status"], "done", "{id}");
        let repeats = m["repeats"].as_array().unwrap();
        assert_eq!(repeats.len(), 3, "{id}: warmup + 2 measured");
        assert_eq!(repeats.iter().filter(|r| r["warmup"] == true).count(), 1);
        for r in repeats {
            assert!(r["ttft_ms"].as_f64().unwrap() > 0.0, "{id}: {r}");
            assert!(r["total_ms"].as_f64().unwrap() >= r["ttft_ms"].as_f64().unwrap());
            assert!(r["gen_tokens"].as_u64().unwrap() > 1, "{id}: {r}");
        }
        assert_eq!(m["summary"]["repeats"], 2);
        assert!(m["summary"]["gen_tokens_per_s"]["median"].as_f64().unwrap() > 0.0);
        assert!(
            !m["output_text"].as_str().unwrap().is_empty(),
            "{id} has its output text"
        );
    }
    let llama = machine_in(&done, "llama");
    assert_eq!(llama["engine"], "openai");
    assert_eq!(llama["label"], "Real llama.cpp");
    assert_eq!(
        llama["repeats"][1]["token_count_source"],
        "llamacpp_timings"
    );
    let ranking = done["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 2);
    assert_eq!(
        (ranking[0]["rank"].clone(), ranking[1]["rank"].clone()),
        (json!(1), json!(2))
    );
    assert!(
        ranking[0]["gen_tokens_per_s"]["median"].as_f64()
            >= ranking[1]["gen_tokens_per_s"]["median"].as_f64()
    );
    assert!(ranking.iter().all(|r| r["delta_vs_baseline"].is_null()));

    // Deltas against a chosen baseline.
    let (_, vs) = get(&base, &format!("/api/jobs/{job_id}?baseline=llama")).await;
    assert_eq!(vs["baseline"], "llama");
    for r in vs["ranking"].as_array().unwrap() {
        let d = &r["delta_vs_baseline"]["gen_tokens_per_s_pct"];
        if r["machine_id"] == "llama" {
            assert_eq!(d.as_f64(), Some(0.0));
        } else {
            assert!(d.as_f64().is_some(), "{r}");
        }
    }

    // Exports.
    let csv = reqwest::get(format!("{base}/api/jobs/{job_id}/export.csv"))
        .await
        .unwrap();
    assert!(csv.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let csv = csv.text().await.unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 6,
        "header + 2 machines x 3 runs:\n{csv}"
    );
    assert!(csv.starts_with("job_id,machine_id,label,engine,model,repeat_index,warmup,"));
    let ndjson = reqwest::get(format!("{base}/api/jobs/{job_id}/export.ndjson"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<bench_schemas::Event> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let counts = assert_exactly_once(&events);
    assert_eq!(counts.len(), 2);

    // Results folder, written once the job finished.
    let run = fleet.dir.path().join("runs").join(&job_id);
    until("results written", || async {
        run.join("metadata.json").exists().then_some(())
    })
    .await;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["status"], "done");
    assert_eq!(meta["events"].as_u64(), Some(events.len() as u64));
    assert_eq!(results_events(fleet.dir.path(), &job_id), events);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["ranking"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn broadcast_to_all_gathers_every_accept() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.broadcast_window = std::time::Duration::from_secs(10);
    let central = start_central(cfg).await;
    let base = central.base();
    let _a = mock_agent("a", "mock-7b", 400.0, &nats.url()).await;
    let _b = mock_agent("b", "mock-7b", 300.0, &nats.url()).await;
    machines_online(&base, &["a", "b"]).await;
    let started = std::time::Instant::now();
    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": "all", "model": "mock-7b", "prompt": "hi", "max_tokens": 8}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    // Every online machine answered, so the window did not have to run out.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut ids: Vec<_> = out["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["machine_id"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("a".into(), "accepted".into()),
            ("b".into(), "accepted".into())
        ]
    );
    let job_id = out["job_id"].as_str().unwrap();
    let done = job_finished(&base, job_id).await;
    assert_eq!(done["status"], "done", "{done:#}");
    assert_eq!(done["machines"].as_array().unwrap().len(), 2);
    // The fleet view says who ran it.
    let (_, list) = get(&base, "/api/jobs").await;
    assert_eq!(list["jobs"][0]["job_id"], job_id);
    assert_eq!(list["jobs"][0]["machines"].as_array().unwrap().len(), 2);
}
