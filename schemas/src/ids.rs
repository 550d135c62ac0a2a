//! Identifier validation. Machine and job ids become NATS subject tokens, so `.`, `*`, `>`,
//! whitespace and anything else outside a small alphabet must never get through.

use std::fmt;

/// Longest accepted `machine_id`.
pub const MACHINE_ID_MAX: usize = 64;
/// Longest accepted `job_id`.
pub const JOB_ID_MAX: usize = 128;
/// Machine id reserved for the fleet broadcast subject `bench.jobs.all`.
pub const RESERVED_ALL: &str = "all";

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError {
    /// `machine_id` or `job_id`.
    pub field: &'static str,
    /// The offending value (truncated for display).
    pub value: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: {}",
            self.field, self.value, self.reason
        )
    }
}

impl std::error::Error for IdError {}

fn err(field: &'static str, value: &str, reason: impl Into<String>) -> IdError {
    let mut shown: String = value.chars().take(80).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    IdError {
        field,
        value: shown,
        reason: reason.into(),
    }
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`, and not the reserved `all`.
pub fn validate_machine_id(id: &str) -> Result<(), IdError> {
    const RULE: &str =
        "use 1-64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit";
    let bytes = id.as_bytes();
    if bytes.is_empty() || bytes.len() > MACHINE_ID_MAX {
        return Err(err("machine_id", id, RULE));
    }
    let ok_first = bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit();
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if !ok_first || !ok_rest {
        return Err(err("machine_id", id, RULE));
    }
    if id == RESERVED_ALL {
        return Err(err(
            "machine_id",
            id,
            "'all' is reserved for the fleet broadcast",
        ));
    }
    Ok(())
}

/// `^[A-Za-z0-9_-]{1,128}$`.
pub fn validate_job_id(id: &str) -> Result<(), IdError> {
    let bytes = id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= JOB_ID_MAX
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(err(
            "job_id",
            id,
            "use 1-128 characters from A-Z, a-z, 0-9, '_' and '-'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids() {
        for good in ["a", "mac-mini", "rtx_4090", "0box", &"x".repeat(64)] {
            assert!(validate_machine_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "all",
            "Mac",
            "a.b",
            "a*",
            "a>",
            "a b",
            "-a",
            "_a",
            "ü",
            &"x".repeat(65),
        ] {
            assert!(validate_machine_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_ids() {
        for good in [
            "j1",
            "A-b_C",
            "0b6c1e0e-3f3a-4c7e-9a53-0d4b1b8f7a11",
            &"x".repeat(128),
        ] {
            assert!(validate_job_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "*", ">", "a b", "a\tb", "ä", &"x".repeat(129)] {
            assert!(validate_job_id(bad).is_err(), "{bad}");
        }
    }
}
