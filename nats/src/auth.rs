//! Least-privilege NATS accounts for a bench-race fleet: one account with JetStream, a user per
//! agent (nkey) that can only take its own jobs, the broadcast and cancels, publish events, write
//! its own registry key and make the JetStream calls it needs; a central user; a read-only
//! observer. [`render_accounts`] writes the server config block; `bench-auth` (a binary of this
//! crate, driven by `scripts/nats add-agent`) keeps the keys and the block on disk.

use bench_schemas::subjects;
use std::fmt::Write as _;

/// The account every bench-race user lives in.
pub const ACCOUNT: &str = "BENCH";

/// A user's nkey pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The seed (`SU...`): secret, goes into the client's `nkey_seed_file`.
    pub seed: String,
    /// The public key (`U...`): goes into the server config.
    pub public: String,
}

impl Identity {
    /// A new random user key.
    pub fn generate() -> Self {
        let kp = nkeys::KeyPair::new_user();
        Self {
            seed: kp.seed().expect("user seed"),
            public: kp.public_key(),
        }
    }

    /// The identity of an existing seed.
    pub fn from_seed(seed: &str) -> Result<Self, String> {
        let kp =
            nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| format!("not an nkey seed: {e}"))?;
        Ok(Self {
            seed: seed.trim().to_string(),
            public: kp.public_key(),
        })
    }
}

/// The inbox prefix an agent must use (its config's `nats.inbox_prefix`), so that it can only
/// read replies meant for it.
pub fn agent_inbox_prefix(machine_id: &str) -> String {
    format!("_INBOX_{machine_id}")
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Permissions of the agent `machine_id`.
pub fn agent_permissions(machine_id: &str) -> String {
    let kv = format!("KV_{}", subjects::AGENTS_BUCKET);
    let publish = vec![
        format!("{}.events.*", subjects::PREFIX),
        format!("$KV.{}.{machine_id}", subjects::AGENTS_BUCKET),
        format!("$JS.API.STREAM.INFO.{kv}"),
        format!("$JS.API.STREAM.INFO.{}", subjects::EVENTS_STREAM),
        "$JS.API.INFO".to_string(),
        // Named ephemeral ordered consumers that read a race's events (`repeat: "auto"`).
        // Not the legacy `CONSUMER.CREATE.<stream>` subject: a create there with a `name` in the
        // body updates the consumer of that name, central's included (tried on nats-server
        // 2.15: it rewrote the indexer's filter). Central's consumer is denied by name below.
        format!("$JS.API.CONSUMER.CREATE.{}.>", subjects::EVENTS_STREAM),
    ];
    let deny = indexer_consumer_deny();
    let subscribe = vec![
        subjects::jobs(machine_id),
        subjects::JOBS_ALL.to_string(),
        subjects::CANCEL_ALL.to_string(),
        format!("{}.>", agent_inbox_prefix(machine_id)),
        // The races it runs (`repeat: "auto"` stops once its result is apart from the others').
        format!("{}.events.*", subjects::PREFIX),
        // The micro service's discovery subjects (`nats micro ls|info|stats`).
        "$SRV.*".to_string(),
        format!("$SRV.*.{}", subjects::SERVICE_NAME),
        format!("$SRV.*.{}.*", subjects::SERVICE_NAME),
    ];
    format!(
        "permissions: {{ publish: {{ allow: {}, deny: {} }}, subscribe: {{ allow: {} }}, allow_responses: true }}",
        list(&publish),
        list(&deny),
        list(&subscribe)
    )
}

/// No JetStream API call on central's durable consumer, and no ack of its messages: pulling
/// from, acking or re-creating it would take events away from the indexer.
fn indexer_consumer_deny() -> Vec<String> {
    let (es, ic) = (subjects::EVENTS_STREAM, subjects::INDEXER_CONSUMER);
    vec![
        format!("$JS.API.CONSUMER.*.{es}.{ic}"),
        format!("$JS.API.CONSUMER.*.{es}.{ic}.>"),
        format!("$JS.API.CONSUMER.*.*.{es}.{ic}"),
        format!("$JS.ACK.{es}.{ic}.>"),
    ]
}

/// Permissions of central: dispatch, cancel, JetStream, its buckets, discovery.
pub fn central_permissions() -> String {
    let publish = vec![
        format!("{}.jobs.*", subjects::PREFIX),
        format!("{}.cancel.*", subjects::PREFIX),
        // API writes a follower forwards to the indexing central, and its answers.
        subjects::CENTRAL_API.to_string(),
        "$JS.API.>".to_string(),
        // The indexer acknowledges what it stored in the jobs bucket.
        "$JS.ACK.>".to_string(),
        "$KV.>".to_string(),
        "$SRV.>".to_string(),
    ];
    let subscribe = vec![
        "_INBOX.>".to_string(),
        subjects::CENTRAL_API.to_string(),
        format!("{}.events.>", subjects::PREFIX),
        "$KV.>".to_string(),
    ];
    // allow_responses: the indexing central answers a follower's forwarded write.
    format!(
        "permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }}, allow_responses: true }}",
        list(&publish),
        list(&subscribe)
    )
}

/// Permissions of a read-only observer: watch events and the registry, read the stream, list
/// the micro services; never submit or cancel a job, never write.
pub fn observer_permissions() -> String {
    let es = subjects::EVENTS_STREAM;
    let kv = format!("KV_{}", subjects::AGENTS_BUCKET);
    let publish = vec![
        "$JS.API.INFO".to_string(),
        "$JS.API.STREAM.NAMES".to_string(),
        "$JS.API.STREAM.LIST".to_string(),
        format!("$JS.API.STREAM.INFO.{es}"),
        format!("$JS.API.STREAM.INFO.{kv}"),
        format!("$JS.API.CONSUMER.CREATE.{es}.>"),
        format!("$JS.API.CONSUMER.CREATE.{kv}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{es}.>"),
        format!("$JS.API.DIRECT.GET.{kv}.>"),
        format!("$JS.API.STREAM.MSG.GET.{es}"),
        "$JS.ACK.>".to_string(),
        "$SRV.PING".to_string(),
        "$SRV.INFO".to_string(),
        "$SRV.STATS".to_string(),
        "$SRV.*.>".to_string(),
    ];
    // Reading the stream must not touch central's durable consumer.
    let deny = indexer_consumer_deny();
    let subscribe = vec![
        "_INBOX.>".to_string(),
        format!("{}.events.>", subjects::PREFIX),
        format!("$KV.{}.>", subjects::AGENTS_BUCKET),
    ];
    format!(
        "permissions: {{ publish: {{ allow: {}, deny: {} }}, subscribe: {{ allow: {} }} }}",
        list(&publish),
        list(&deny),
        list(&subscribe)
    )
}

/// The `accounts { ... }` block: the BENCH account with JetStream and every user.
pub fn render_accounts(agents: &[(String, String)], central: &str, observer: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by bench-auth (scripts/nats add-agent). Do not edit: rerun it."
    );
    let _ = writeln!(
        out,
        "accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: ["
    );
    let _ = writeln!(
        out,
        "      # central\n      {{ nkey: \"{central}\", {} }}",
        central_permissions()
    );
    let _ = writeln!(
        out,
        "      # observer (read-only)\n      {{ nkey: \"{observer}\", {} }}",
        observer_permissions()
    );
    for (id, public) in agents {
        let _ = writeln!(
            out,
            "      # agent {id}\n      {{ nkey: \"{public}\", {} }}",
            agent_permissions(id)
        );
    }
    let _ = writeln!(out, "    ]\n  }}\n}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_and_rendering() {
        let id = Identity::generate();
        assert!(id.seed.starts_with("SU") && id.public.starts_with('U'));
        assert_eq!(Identity::from_seed(&id.seed).unwrap(), id);
        assert!(Identity::from_seed("nope").is_err());
        let conf = render_accounts(&[("box-a".into(), id.public.clone())], "UC", "UO");
        assert!(
            conf.contains("\"bench.jobs.box-a\"") && conf.contains("\"$KV.bench_agents.box-a\"")
        );
        assert!(
            !conf.contains("bench.jobs.>\""),
            "no agent may read every machine's jobs"
        );
        assert!(conf.contains("_INBOX_box-a.>"));
    }

    /// NATS subject matching: `*` is one token, `>` the rest.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some(a), Some(b)) if a == "*" || a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// The quoted subjects of the `publish: { allow: [...]` list.
    fn publish_allow(perms: &str) -> Vec<String> {
        let list = perms
            .split_once("publish: { allow: [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(l, _)| l)
            .expect("a publish allow list");
        list.split(", ")
            .map(|s| s.trim_matches('"').to_string())
            .collect()
    }

    #[test]
    fn no_agent_can_write_central_s_signing_keys() {
        let allow = publish_allow(&agent_permissions("box-a"));
        let may = |subject: &str| allow.iter().any(|p| matches(p, subject));
        assert!(may("$KV.bench_agents.box-a"), "{allow:?}");
        assert!(!may("$KV.bench_agents.box-b"), "another machine's entry");
        let keys = subjects::KEYS_BUCKET;
        let stream = format!("KV_{keys}");
        for subject in [
            format!("$KV.{keys}.box-a"),
            format!("$KV.{keys}.box-b"),
            format!("$JS.API.STREAM.CREATE.{stream}"),
            format!("$JS.API.STREAM.UPDATE.{stream}"),
            format!("$JS.API.STREAM.PURGE.{stream}"),
            format!("$JS.API.STREAM.DELETE.{stream}"),
            format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
        ] {
            assert!(!may(&subject), "an agent may publish {subject}: {allow:?}");
        }
        assert!(matches("bench.events.*", "bench.events.j") && !matches("a.*", "a.b.c"));
    }
}
