//! REST handlers (see `central/API.md`). Every failure is an [`ApiError`], which renders as
//! `{"error":{"code","message"}}` with its status.

use crate::compare;
use crate::dispatch::{self, Dispatched};
use crate::error::ApiError;
use crate::registry::MachineView;
use crate::{now_ms, replay, AppState};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bench_schemas::{subjects, validate_job_id};
use serde::Deserialize;
use serde_json::json;

/// Largest `limit` of `GET /api/jobs`.
pub const MAX_PAGE: usize = 500;
/// Default `limit`.
pub const DEFAULT_PAGE: usize = 50;

/// The `{id}` of a path, or a 400 saying what is wrong with it.
pub fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::BadRequest(format!("bad path: {}", e.body_text())))?;
    validate_job_id(&id)?;
    Ok(id)
}

/// `405` with an error body, for a method a path does not take.
pub async fn method_not_allowed(req: axum::extract::Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}; see central/API.md",
        req.method(),
        req.uri().path()
    ))
}

/// `GET /health`.
pub async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    let connected = state.client.connection_state() == async_nats::connection::State::Connected;
    Json(json!({
        "ok": connected,
        "nats": if connected { "connected" } else { "disconnected" },
        "version": crate::VERSION,
        "central_id": state.role.id,
        "role": if state.role.is_leader() { "leader" } else { "follower" },
        "leader": state.role.holder().map(|h| h.central_id),
    }))
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state),
    )
}

/// `GET /api/machines`.
pub async fn machines(State(state): State<AppState>) -> Json<serde_json::Value> {
    let machines: Vec<MachineView> = state.registry.machines(now_ms());
    Json(json!({ "machines": machines }))
}

/// `POST /api/jobs`.
pub async fn create_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Dispatched>), ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
            "the job is larger than central takes: {}",
            e.body_text()
        )),
        _ => ApiError::BadRequest(format!("reading the body: {}", e.body_text())),
    })?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" {
        return Err(ApiError::UnsupportedMediaType(format!(
            "send the job as Content-Type: application/json (got {:?})",
            ct
        )));
    }
    let (target, job) = dispatch::parse_request(&body)?;
    let out = dispatch::dispatch(&state, target, job).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /api/jobs` query.
#[derive(Deserialize, Debug)]
pub struct ListParams {
    /// Page size.
    pub limit: Option<usize>,
    /// Only jobs created before this unix ms.
    pub before: Option<u64>,
}

/// `GET /api/jobs`.
pub async fn list_jobs(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let (jobs, more) = state.index.list(limit, p.before);
    let next_before = if more {
        jobs.last().map(|j| j.created_ms)
    } else {
        None
    };
    Ok(Json(json!({ "jobs": jobs, "next_before": next_before })))
}

/// `GET /api/jobs/{id}` query.
#[derive(Deserialize, Debug)]
pub struct DetailParams {
    /// Machine to compare against.
    pub baseline: Option<String>,
}

async fn detail_of(
    state: &AppState,
    job_id: &str,
    baseline: Option<&str>,
) -> Result<compare::JobDetail, ApiError> {
    validate_job_id(job_id)?;
    if let Some(b) = baseline {
        bench_schemas::validate_machine_id(b)?;
    }
    let r = state
        .record(job_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {job_id}")))?;
    compare::detail(&r, &state.registry, baseline)
}

/// `GET /api/jobs/{id}`.
pub async fn get_job(
    State(state): State<AppState>,
    job_id: Result<Path<String>, PathRejection>,
    params: Result<Query<DetailParams>, QueryRejection>,
) -> Result<Json<compare::JobDetail>, ApiError> {
    let job_id = path_id(job_id)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut d = detail_of(
        &state,
        &job_id,
        p.baseline.as_deref().filter(|b| !b.is_empty()),
    )
    .await?;
    crate::fingerprints::previous(&state, &mut d).await;
    crate::regression::regression(&state, &mut d).await;
    Ok(Json(d))
}

/// `POST /api/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(state): State<AppState>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let job_id = path_id(job_id)?;
    if !state.index.contains(&job_id) {
        return Err(ApiError::NotFound(format!("no job {job_id}")));
    }
    state.require_nats()?;
    state
        .client
        .publish(subjects::cancel(&job_id), Bytes::new())
        .await
        .map_err(ApiError::nats)?;
    state.client.flush().await.map_err(ApiError::nats)?;
    tracing::info!(%job_id, "cancel sent");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job_id, "cancel_sent": true})),
    ))
}

/// `DELETE /api/jobs/{id}`: cancels it if running, and removes it from the index, the stream
/// and `results/runs/`.
pub async fn delete_job(
    State(state): State<AppState>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let job_id = path_id(job_id)?;
    let Some((status, _)) = state.index.progress(&job_id) else {
        return Err(ApiError::NotFound(format!("no job {job_id}")));
    };
    state.require_nats()?;
    if status == crate::record::JobStatus::Running {
        let _ = state
            .client
            .publish(subjects::cancel(&job_id), Bytes::new())
            .await;
    }
    state.index.remove(&job_id);
    state.jobs_kv.purge(&job_id).await.map_err(ApiError::nats)?;
    state
        .stream
        .purge()
        .filter(subjects::events(&job_id))
        .await
        .map_err(ApiError::nats)?;
    let dir = crate::results::run_dir(&state.cfg.results_dir, &job_id);
    if dir.exists() {
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(|e| ApiError::Internal(format!("removing {}: {e}", dir.display())))?;
    }
    tracing::info!(%job_id, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn attachment(
    job_id: &str,
    ext: &str,
    content_type: &str,
    body: impl Into<axum::body::Body>,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"bench-{job_id}.{ext}\""),
            ),
        ],
        body.into(),
    )
        .into_response()
}

/// `GET /api/jobs/{id}/export.json|.csv|.ndjson`.
pub async fn export(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((job_id, file)) =
        path.map_err(|e| ApiError::BadRequest(format!("bad path: {}", e.body_text())))?;
    let ext = match file.as_str() {
        "export.json" => "json",
        "export.csv" => "csv",
        "export.ndjson" => "ndjson",
        _ => {
            return Err(ApiError::NotFound(format!(
                "no {file}: use export.json, export.csv or export.ndjson"
            )))
        }
    };
    let mut detail = detail_of(&state, &job_id, None).await?;
    Ok(match ext {
        "json" => {
            crate::fingerprints::previous(&state, &mut detail).await;
            crate::regression::regression(&state, &mut detail).await;
            let body = serde_json::to_vec_pretty(&detail)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            attachment(&job_id, ext, "application/json", body)
        }
        "csv" => attachment(
            &job_id,
            ext,
            "text/csv; charset=utf-8",
            compare::csv(&detail),
        ),
        _ => {
            state.require_nats()?;
            let mut body = Vec::new();
            for (_, payload) in replay::read_all(&state.stream, state.registry.keys(), &job_id)
                .await
                .map_err(ApiError::nats)?
            {
                body.extend_from_slice(&payload);
                body.push(b'\n');
            }
            attachment(&job_id, ext, "application/x-ndjson", body)
        }
    })
}

/// Any other `/api/...` path.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint; see central/API.md".into())
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything else: the web UI's files from `web_dir` (its tooling folders excepted).
pub async fn static_files(State(state): State<AppState>, req: axum::extract::Request) -> Response {
    // Judge the path as ServeDir will see it: percent-decoded (`/te%73ts/` is `/tests/`).
    let hidden = req.uri().path().split('/').any(|seg| {
        let seg = percent_decode(seg);
        seg == "node_modules" || seg == "tests" || seg.starts_with('.')
    });
    if hidden {
        return ApiError::NotFound(format!("no file {}", req.uri().path())).into_response();
    }
    let files = tower_http::services::ServeDir::new(&state.cfg.web_dir)
        .append_index_html_on_directories(true);
    match tower::ServiceExt::oneshot(files, req).await {
        Ok(resp) => resp.into_response(),
        Err(e) => ApiError::Internal(format!("serving a file: {e}")).into_response(),
    }
}
