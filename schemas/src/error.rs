//! Stable error codes. Clients branch on the code, never on the message text.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A machine-readable reason a job was refused or failed.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was not valid JSON or not a valid job object.
    BadJson,
    /// A `job_id` or `machine_id` that cannot be a subject token.
    InvalidId,
    /// A field is missing or out of range (the message names it).
    InvalidJob,
    /// `test_type` is not one this agent runs.
    UnknownTestType,
    /// The job names no model.
    MissingModel,
    /// The engine does not have the model.
    ModelNotFound,
    /// `max_tokens` is 0 or above the agent's limit.
    InvalidMaxTokens,
    /// The prompt is larger than the agent's configured limit.
    PromptTooLarge,
    /// The job asks for a backend this agent has not configured.
    UnknownBackend,
    /// The job's `expires_at` has passed.
    Expired,
    /// The agent's queue is full.
    QueueFull,
    /// The job id is already queued or running on this agent.
    DuplicateJob,
    /// Nothing answers at the engine's address.
    EngineUnreachable,
    /// The engine answered with an error status.
    EngineError,
    /// The engine's stream ended or broke before its final message.
    StreamBroken,
    /// The engine sent nothing for longer than the configured timeout.
    Timeout,
    /// The agent produced events faster than NATS took them and its bounded event queue filled
    /// up (the run is stopped rather than leaving a silent gap).
    EventQueueFull,
    /// The engine counted a different prompt size than the job asked for (`prompt_tokens`,
    /// `depth`), or did not keep the depth prefix cached: the shape would not be what it says.
    PromptMismatch,
    /// The job asks for something this engine cannot do (the message says what and why).
    Unsupported,
    /// A bug or an unexpected state inside the agent.
    Internal,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::InvalidId => "invalid_id",
            Self::InvalidJob => "invalid_job",
            Self::UnknownTestType => "unknown_test_type",
            Self::MissingModel => "missing_model",
            Self::ModelNotFound => "model_not_found",
            Self::InvalidMaxTokens => "invalid_max_tokens",
            Self::PromptTooLarge => "prompt_too_large",
            Self::UnknownBackend => "unknown_backend",
            Self::Expired => "expired",
            Self::QueueFull => "queue_full",
            Self::DuplicateJob => "duplicate_job",
            Self::EngineUnreachable => "engine_unreachable",
            Self::EngineError => "engine_error",
            Self::StreamBroken => "stream_broken",
            Self::Timeout => "timeout",
            Self::EventQueueFull => "event_queue_full",
            Self::PromptMismatch => "prompt_mismatch",
            Self::Unsupported => "unsupported",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code", "message"}`: the error object in replies and `job_error` events.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail, naming the field and the fix where there is one.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}
