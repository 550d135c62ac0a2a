//! The agent's immediate answer to a job sent as a request.

use crate::error::ErrorBody;
use serde::{Deserialize, Serialize};

/// `{"accepted":true,"job_id","machine_id","run_id","position"}` or
/// `{"accepted":false,"machine_id","error":{"code","message"}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobReply {
    /// Whether the job was queued.
    pub accepted: bool,
    /// The job's id (assigned by the agent when the job had none). Absent when the job could
    /// not be parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The answering agent.
    pub machine_id: String,
    /// The run this acceptance starts (`<boot_id>-<n>`, as every event of it carries). Known
    /// at once, so a machine that dies before its first event is stored is still a run with an
    /// id (and its boot). Absent on a refusal, and from agents older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Jobs ahead of this one (0 = runs now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Why the job was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl JobReply {
    /// An accept.
    pub fn accepted(job_id: &str, machine_id: &str, run_id: &str, position: u32) -> Self {
        Self {
            accepted: true,
            job_id: Some(job_id.to_string()),
            machine_id: machine_id.to_string(),
            run_id: Some(run_id.to_string()),
            position: Some(position),
            error: None,
        }
    }

    /// A refusal.
    pub fn rejected(job_id: Option<&str>, machine_id: &str, error: ErrorBody) -> Self {
        Self {
            accepted: false,
            job_id: job_id.map(str::to_string),
            machine_id: machine_id.to_string(),
            run_id: None,
            position: None,
            error: Some(error),
        }
    }
}
