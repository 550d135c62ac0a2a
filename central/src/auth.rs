//! Who may call the API: with `api_token` set, every mutating call under `/api/` (POST, PUT,
//! PATCH, DELETE) needs `Authorization: Bearer <token>`; reads stay open so dashboards and the
//! UI's history work without it. No CORS headers unless `cors_origins` lists origins: by default
//! only pages served by central itself can call it from a browser.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Compares without an early exit, so response time says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer-token check.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = state.cfg.api_token.as_deref() else {
        return next.run(req).await;
    };
    let mutating = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if !mutating || !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::Unauthorized("wrong bearer token".into()).into_response(),
        None => ApiError::Unauthorized(
            "this central requires `Authorization: Bearer <token>` for changes (config api_token / CENTRAL_API_TOKEN)".into(),
        )
        .into_response(),
    }
}

/// CORS for the configured origins only (none by default).
pub fn cors(origins: &[String]) -> CorsLayer {
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("last-event-id"),
        ])
}
