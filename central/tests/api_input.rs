//! The router in-process (`tower::ServiceExt::oneshot`, no socket) on a real nats-server: bad
//! input gets a 4xx with a stable code; an offline machine is reported at once.

mod common;

use axum::body::Body;
use axum::http::{header, Request};
use bench_central::config::MachineConfig;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tower::ServiceExt;

async fn call(app: &axum::Router, req: Request<Body>) -> (u16, Value) {
    let resp = within("oneshot", WAIT, app.clone().oneshot(req))
        .await
        .expect("infallible");
    let status = resp.status().as_u16();
    let bytes = within(
        "body",
        WAIT,
        axum::body::to_bytes(resp.into_body(), 1 << 20),
    )
    .await
    .expect("body");
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

fn post_raw(body: &str, content_type: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/api/jobs");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn bad_input_gets_4xx_with_a_code() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.machines = vec![MachineConfig {
        machine_id: "desk".into(),
        label: Some("Desk box".into()),
        notes: Some("under the desk".into()),
    }];
    let central = start_central(cfg).await;
    let app = bench_central::app(central.state());
    let job = |extra: Value| {
        let mut j = json!({"machines": ["desk"], "model": "m", "prompt": "hello", "max_tokens": 8});
        j.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        j.to_string()
    };
    let json_ct = Some("application/json");
    let cases: Vec<(&str, Request<Body>, u16, &str)> = vec![
        (
            "unknown machine",
            post_raw(&job(json!({"machines": ["ghost"]})), json_ct),
            400,
            "unknown_machine",
        ),
        (
            "invalid machine id",
            post_raw(&job(json!({"machines": ["a.b"]})), json_ct),
            400,
            "invalid_id",
        ),
        (
            "reserved machine id",
            post_raw(&job(json!({"machines": ["all", "desk"]})), json_ct),
            400,
            "invalid_id",
        ),
        (
            "invalid job id",
            post_raw(&job(json!({"job_id": "x>y"})), json_ct),
            400,
            "invalid_id",
        ),
        (
            "no machines",
            post_raw(&job(json!({"machines": []})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "empty prompt",
            post_raw(&job(json!({"prompt": ""})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "no model",
            post_raw(&job(json!({"model": ""})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "max_tokens beyond u32",
            post_raw(&job(json!({"max_tokens": 99_999_999_999u64})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "negative repeat",
            post_raw(&job(json!({"repeat": -1})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "absurd temperature",
            post_raw(&job(json!({"temperature": 1e9})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "unknown field",
            post_raw(&job(json!({"max_token": 5})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "wrong type",
            post_raw(&job(json!({"max_tokens": "many"})), json_ct),
            422,
            "invalid_job",
        ),
        (
            "malformed JSON",
            post_raw("{\"machines\": [", json_ct),
            400,
            "bad_json",
        ),
        ("not an object", post_raw("[1,2]", json_ct), 400, "bad_json"),
        (
            "wrong content type",
            post_raw(&job(json!({})), Some("text/plain")),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            post_raw(&job(json!({})), None),
            415,
            "unsupported_media_type",
        ),
        (
            "invalid job id in path",
            get_req("/api/jobs/a.b"),
            400,
            "invalid_id",
        ),
        (
            "space in job id",
            get_req("/api/jobs/a%20b"),
            400,
            "invalid_id",
        ),
        ("unknown job", get_req("/api/jobs/nope"), 404, "not_found"),
        (
            "unknown job events",
            get_req("/api/jobs/nope/events"),
            404,
            "not_found",
        ),
        (
            "bad Last-Event-ID",
            Request::get("/api/jobs/nope/events")
                .header("Last-Event-ID", "x")
                .body(Body::empty())
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            "unknown export",
            get_req("/api/jobs/nope/export.xml"),
            404,
            "not_found",
        ),
        (
            "bad limit",
            get_req("/api/jobs?limit=0"),
            400,
            "bad_request",
        ),
        (
            "non-numeric limit",
            get_req("/api/jobs?limit=many"),
            400,
            "bad_request",
        ),
        (
            "cancel unknown job",
            Request::post("/api/jobs/nope/cancel")
                .body(Body::empty())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            "delete unknown job",
            Request::delete("/api/jobs/nope")
                .body(Body::empty())
                .unwrap(),
            404,
            "not_found",
        ),
        (
            "unknown endpoint",
            get_req("/api/nothing"),
            404,
            "not_found",
        ),
    ];
    for (what, req, status, code) in cases {
        let (got, body) = call(&app, req).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
    assert_eq!(
        call(&app, get_req("/api/jobs")).await.1["jobs"],
        json!([]),
        "nothing was recorded"
    );

    // health, metrics, machines.yaml entries without an agent.
    let (s, health) = call(&app, get_req("/health")).await;
    assert_eq!(
        (s, &health["ok"], &health["nats"]),
        (200, &json!(true), &json!("connected"))
    );
    let resp = app.clone().oneshot(get_req("/metrics")).await.unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for name in [
        "bench_central_jobs{state=\"running\"}",
        "bench_central_events_ingested_total",
        "bench_central_sse_clients",
        "bench_central_nats_connected 1",
    ] {
        assert!(text.contains(name), "{name} in {text}");
    }
    let (_, machines) = call(&app, get_req("/api/machines")).await;
    assert_eq!(machines["machines"][0]["machine_id"], "desk");
    assert_eq!(machines["machines"][0]["label"], "Desk box");
    assert_eq!(machines["machines"][0]["status"], "offline");
    assert_eq!(machines["machines"][0]["notes"], "under the desk");

    // The web UI's files, but not its tooling.
    std::fs::create_dir_all(dir.path().join("web/tests")).unwrap();
    std::fs::write(dir.path().join("web/index.html"), "<h1>bench-race</h1>").unwrap();
    std::fs::write(dir.path().join("web/tests/secret.mjs"), "x").unwrap();
    let (s, page) = call(&app, get_req("/")).await;
    assert_eq!((s, page), (200, json!("<h1>bench-race</h1>")));
    assert_eq!(call(&app, get_req("/tests/secret.mjs")).await.0, 404);
    assert_eq!(
        call(&app, get_req("/te%73ts/secret.mjs")).await.0,
        404,
        "percent-encoded"
    );
    assert_eq!(call(&app, get_req("/missing.js")).await.0, 404);

    // A configured machine with no agent: no responders, reported offline at once.
    let started = Instant::now();
    let (s, out) = call(
        &app,
        post_raw(&job(json!({})), Some("application/json; charset=utf-8")),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "offline is said at once, took {:?}",
        started.elapsed()
    );
    assert_eq!(out["machines"][0]["status"], "offline");
    assert_eq!(out["machines"][0]["error"]["code"], "offline");
    let job_id = out["job_id"].as_str().unwrap().to_string();
    let (_, detail) = call(&app, get_req(&format!("/api/jobs/{job_id}"))).await;
    assert_eq!(detail["status"], "failed", "{detail}");
    assert_eq!(detail["machines"][0]["status"], "failed");
    assert_eq!(detail["source"], "central");
    let (s, body) = call(&app, get_req(&format!("/api/jobs/{job_id}?baseline=ghost"))).await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (400, &json!("unknown_machine"))
    );
    let (_, list) = call(&app, get_req("/api/jobs")).await;
    assert_eq!(list["jobs"][0]["job_id"], job_id.as_str());
    assert_eq!(list["jobs"][0]["status"], "failed");
    // Re-using the id of a finished job is a new run of it (tests/runs.rs has the whole story).
    let (s, body) = call(&app, post_raw(&job(json!({"job_id": job_id})), json_ct)).await;
    assert_eq!((s, &body["job_id"]), (201, &json!(job_id)), "{body}");
}

#[tokio::test]
async fn bearer_token_guards_changes_and_cors_is_closed_by_default() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.api_token = Some("s3cret-token-0123456789".into());
    let central = start_central(cfg).await;
    let app = bench_central::app(central.state());
    let body = json!({"machines": ["nobody"], "model": "m", "prompt": "hi"}).to_string();
    let with = |auth: Option<&str>| {
        let mut b = Request::post("/api/jobs").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::from(body.clone())).unwrap()
    };
    let (status, v) = call(&app, with(None)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (status, _) = call(&app, with(Some("Bearer wrong-token-0123456789"))).await;
    assert_eq!(status, 401);
    // With the token the request reaches the handler (which refuses the unknown machine).
    let (status, v) = call(&app, with(Some("Bearer s3cret-token-0123456789"))).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("unknown_machine")),
        "{v}"
    );
    let del = Request::delete("/api/jobs/some-job")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, del).await.0, 401);
    // Reads stay open.
    assert_eq!(call(&app, get_req("/api/jobs")).await.0, 200);

    // No CORS headers for a foreign origin, and a preflight grants nothing.
    let req = Request::get("/api/machines")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert!(resp
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
    let pre = Request::options("/api/jobs")
        .header(header::ORIGIN, "https://evil.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(pre).await.unwrap();
    assert!(resp
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = central_config(&nats.url(), dir.path());
    cfg.cors_origins = vec!["https://dash.example.org".into()];
    let central = start_central(cfg).await;
    let app = bench_central::app(central.state());
    let origin = |o: &'static str| {
        Request::get("/api/machines")
            .header(header::ORIGIN, o)
            .body(Body::empty())
            .unwrap()
    };
    let resp = app
        .clone()
        .oneshot(origin("https://dash.example.org"))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap()),
        Some("https://dash.example.org")
    );
    let resp = app
        .clone()
        .oneshot(origin("https://evil.example"))
        .await
        .unwrap();
    assert!(resp
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
}
