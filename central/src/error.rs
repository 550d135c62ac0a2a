//! Errors: [`ApiError`] for HTTP handlers (one `IntoResponse` maps each variant to a status code
//! and a stable code), [`StartError`] for start-up.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// `{"code","message"}` as central writes it (codes are strings: central has its own, such as
/// `offline` and `stalled`, beside the agents').
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorInfo {
    /// Stable code.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

/// Longest error message kept (a hostile event may carry a megabyte of it).
pub const MESSAGE_MAX: usize = 2048;

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
pub fn truncated(mut s: String, max: usize) -> String {
    if bench_schemas::truncate_utf8(&mut s, max) {
        s.push('…');
    }
    s
}

impl ErrorInfo {
    /// Builds one (the message cut to [`MESSAGE_MAX`]).
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: truncated(code.into(), 64),
            message: truncated(message.into(), MESSAGE_MAX),
        }
    }
}

impl From<bench_schemas::ErrorBody> for ErrorInfo {
    fn from(e: bench_schemas::ErrorBody) -> Self {
        Self::new(e.code.as_str(), e.message)
    }
}

/// Why a request failed. Each variant is one stable code in `central/API.md`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed query or parameters.
    #[error("{0}")]
    BadRequest(String),
    /// The body is not JSON.
    #[error("{0}")]
    BadJson(String),
    /// Not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A machine or job id that cannot be a subject token.
    #[error(transparent)]
    InvalidId(#[from] bench_schemas::IdError),
    /// The job is JSON but not a valid job.
    #[error("{0}")]
    InvalidJob(String),
    /// A machine central has never heard of.
    #[error("unknown machine {0:?}: it is neither in machines.yaml nor in the agent registry")]
    UnknownMachine(String),
    /// A mutating call without the configured bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// No such job.
    #[error("{0}")]
    NotFound(String),
    /// NATS did not answer.
    #[error("NATS: {0}")]
    Nats(String),
    /// The method is not one the path takes.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than central takes.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request took longer than central's bound.
    #[error("{0}")]
    Timeout(String),
    /// A bug or an unexpected state.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::BadJson(_) => "bad_json",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::InvalidId(_) => "invalid_id",
            Self::InvalidJob(_) => "invalid_job",
            Self::UnknownMachine(_) => "unknown_machine",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::Nats(_) => "nats_unavailable",
            Self::Timeout(_) => "timeout",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::BadJson(_)
            | Self::InvalidId(_)
            | Self::UnknownMachine(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidJob(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Nats(_) | Self::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Wraps any displayable NATS failure.
    pub fn nats(e: impl std::fmt::Display) -> Self {
        Self::Nats(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let body = serde_json::json!({"error": ErrorInfo::new(self.code(), self.to_string())});
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Why central would not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// NATS never answered.
    #[error("NATS at {url} did not answer within {secs:.0} s: start it (scripts/nats start) or set NATS_URL")]
    NatsUnreachable {
        /// Where we looked.
        url: String,
        /// How long.
        secs: f64,
    },
    /// The server is older than 2.11.
    #[error("nats-server {version} is too old: bench-central needs >= {min} (KV, multi-filter consumers and message TTLs); install the pinned one with scripts/nats install")]
    ServerTooOld {
        /// What it reported.
        version: String,
        /// What we need.
        min: &'static str,
    },
    /// JetStream is not enabled.
    #[error("JetStream is not enabled on the NATS server ({0}): start nats-server with -js (scripts/nats start does)")]
    JetStreamOff(String),
    /// Creating the stream, buckets or consumer failed.
    #[error("setting up {what}: {detail}")]
    Setup {
        /// Which asset.
        what: String,
        /// The error.
        detail: String,
    },
    /// Binding or reading the HTTP listener.
    #[error("HTTP listener: {0}")]
    Io(#[from] std::io::Error),
}
