//! Every NATS subject, stream and bucket name of the contract. No other module writes a
//! `.`-separated subject literal.

/// Root of every subject.
pub const PREFIX: &str = "bench";
/// Fleet broadcast: every agent runs a job published here.
pub const JOBS_ALL: &str = "bench.jobs.all";
/// Every event of every job (the `BENCH_EVENTS` stream's subject).
pub const EVENTS_ALL: &str = "bench.events.>";
/// Every cancel request.
pub const CANCEL_ALL: &str = "bench.cancel.*";
/// JetStream stream holding every event.
pub const EVENTS_STREAM: &str = "BENCH_EVENTS";
/// KV bucket an agent heart-beats into (key = machine_id).
pub const AGENTS_BUCKET: &str = "bench_agents";
/// Central's durable consumer on `BENCH_EVENTS` (nobody else may pull from or ack it).
pub const INDEXER_CONSUMER: &str = "bench-central-indexer";
/// KV bucket central keeps its job index in.
pub const JOBS_BUCKET: &str = "bench_jobs";
/// KV bucket of central's indexing lease (key [`LEADER_KEY`]): with several centrals on one
/// NATS, the holder indexes and the others follow.
pub const CENTRAL_BUCKET: &str = "bench_central";
/// The lease's key in [`CENTRAL_BUCKET`].
pub const LEADER_KEY: &str = "indexer";
/// Where a central that does not hold the lease forwards API writes (the holder answers).
pub const CENTRAL_API: &str = "bench.central.api";
/// NATS micro service name every agent registers under.
pub const SERVICE_NAME: &str = "bench-agent";
/// KV bucket central keeps every machine's signing keys in (key = machine_id, value: the keys
/// it has seen in that machine's registry entries). Central's alone: no agent may write it.
pub const KEYS_BUCKET: &str = "bench_keys";
/// Header on every event an agent publishes: the ed25519 signature, by the agent's nkey, over
/// the exact payload bytes, base64url without padding. The payload names job, machine, run and
/// seq, so a signed event cannot be re-aimed at another job or machine.
pub const SIGNATURE_HEADER: &str = "Bench-Sig";
/// Header beside [`SIGNATURE_HEADER`]: which of the machine's keys signed it, as the 8
/// characters after the leading `U` of the nkey public key. Central verifies under that key
/// only; an event without it (older agents) is tried under each key the machine announced.
pub const KEY_HEADER: &str = "Bench-Key";

/// `bench.jobs.<machine_id>`; `jobs("all")` is the broadcast subject.
pub fn jobs(machine_id: &str) -> String {
    format!("{PREFIX}.jobs.{machine_id}")
}

/// `bench.events.<job_id>`.
pub fn events(job_id: &str) -> String {
    format!("{PREFIX}.events.{job_id}")
}

/// Whether `subject` is `bench.events.<job_id>` (without building it: the indexer asks this
/// for every event).
pub fn is_events_of(subject: &str, job_id: &str) -> bool {
    subject
        .strip_prefix(PREFIX)
        .and_then(|s| s.strip_prefix(".events."))
        == Some(job_id)
}

/// `bench.cancel.<job_id>`.
pub fn cancel(job_id: &str) -> String {
    format!("{PREFIX}.cancel.{job_id}")
}

/// The `Nats-Msg-Id` of one event: `<job_id>.<machine_id>.<run_id>.<seq>` (a signed event
/// adds the start of its signature: [`signed_msg_id`]). JetStream drops a
/// retried publish (same run, same seq) inside the duplicate window, while a new run of the same
/// job (a re-used `job_id`) has its own `run_id` and is never mistaken for a retry.
pub fn msg_id(job_id: &str, machine_id: &str, run_id: &str, seq: u64) -> String {
    format!("{job_id}.{machine_id}.{run_id}.{seq}")
}

/// Characters of an event's `Bench-Sig` at the end of its `Nats-Msg-Id` (66 bits).
pub const MSG_ID_SIG_CHARS: usize = 11;

/// The `Nats-Msg-Id` of a signed event: [`msg_id`], a dot, and the first
/// [`MSG_ID_SIG_CHARS`] characters of its `Bench-Sig`. Everything else in a message id is
/// public (job, machine, run and seq can be guessed), so without this an agent could publish
/// first under another machine's next id and have JetStream drop that machine's real event as
/// a duplicate; nobody without the machine's key can make this end. A retried publish of the
/// same bytes has the same signature, so it is still dropped as a retry.
pub fn signed_msg_id(msg_id: &str, signature: &str) -> String {
    let end = signature.get(..MSG_ID_SIG_CHARS).unwrap_or(signature);
    format!("{msg_id}.{end}")
}

/// A run's id: `<boot_id>-<n>`, the agent process's boot id and the n-th job it accepted since
/// it started (1-based). Unique per acceptance, and it names the agent process that ran it.
pub fn run_id(boot_id: &str, n: u64) -> String {
    format!("{boot_id}-{n}")
}

/// The boot id a run id was minted by (None when it is not of the form `<boot_id>-<n>`).
pub fn boot_of(run_id: &str) -> Option<&str> {
    let (boot, n) = run_id.rsplit_once('-')?;
    (!boot.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(boot)
}

/// The last token of a subject (`bench.events.J` -> `J`).
pub fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// True for the broadcast subject.
pub fn is_broadcast(subject: &str) -> bool {
    subject == JOBS_ALL
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RESERVED_ALL;

    #[test]
    fn builders() {
        assert_eq!(jobs("m1"), "bench.jobs.m1");
        assert_eq!(jobs(RESERVED_ALL), JOBS_ALL);
        assert_eq!(events("j"), "bench.events.j");
        assert!(is_events_of(&events("j"), "j"));
        assert!(!is_events_of(&events("j"), "k") && !is_events_of("bench.jobs.j", "j"));
        assert_eq!(cancel("j"), "bench.cancel.j");
        assert_eq!(msg_id("j", "m", "b1-3", 7), "j.m.b1-3.7");
        assert_eq!(run_id("a1b2", 3), "a1b2-3");
        assert_eq!(boot_of("a1b2-3"), Some("a1b2"));
        assert_eq!(boot_of("a-1b2-30"), Some("a-1b2"));
        for bad in ["", "-3", "a1b2-", "a1b2-x", "a1b2"] {
            assert_eq!(boot_of(bad), None, "{bad}");
        }
        assert_eq!(last_token("bench.events.abc"), "abc");
        assert!(is_broadcast(JOBS_ALL));
        assert!(!is_broadcast(&jobs("m1")));
    }
}
