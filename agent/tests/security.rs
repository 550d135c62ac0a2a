//! Least privilege on a real nats-server with the generated accounts (nats/src/auth.rs): per-agent
//! nkey users, a central user, a read-only observer; no anonymous access; and TLS with a
//! generated self-signed CA, end to end.

mod common;

use async_nats::{ConnectOptions, Event as NatsEvent};
use bench_nats::auth::{agent_inbox_prefix, render_accounts, Identity};
use bench_nats::streams;
use bench_schemas::{subjects, AgentInfo, EventKind};
use common::*;
use futures::StreamExt;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

struct Fleet {
    dir: tempfile::TempDir,
    central: Identity,
    observer: Identity,
    a: Identity,
    b: Identity,
}

impl Fleet {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            central: Identity::generate(),
            observer: Identity::generate(),
            a: Identity::generate(),
            b: Identity::generate(),
        }
    }
    fn conf(&self) -> String {
        render_accounts(
            &[
                ("sec-a".into(), self.a.public.clone()),
                ("sec-b".into(), self.b.public.clone()),
            ],
            &self.central.public,
            &self.observer.public,
        )
    }
    fn seed_file(&self, name: &str, id: &Identity) -> String {
        let p = self.dir.path().join(format!("{name}.nk"));
        std::fs::write(&p, &id.seed).unwrap();
        p.display().to_string()
    }
}

/// A client as `id`, with the server's error notices (permission violations) on a channel.
async fn connect_as(
    url: &str,
    id: &Identity,
    inbox: Option<String>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut opts = ConnectOptions::with_nkey(id.seed.clone()).event_callback(move |e| {
        let tx = tx.clone();
        async move {
            if let NatsEvent::ServerError(err) = e {
                let _ = tx.send(err.to_string());
            }
        }
    });
    if let Some(p) = inbox {
        opts = opts.custom_inbox_prefix(p);
    }
    let c = within("connect", WAIT, opts.connect(url))
        .await
        .expect("authorised connect");
    (c, rx)
}

async fn violation(rx: &mut mpsc::UnboundedReceiver<String>, needle: &str) {
    let msg = within("permissions violation", WAIT, async {
        loop {
            let m = rx.recv().await.expect("error channel open");
            if m.to_lowercase().contains("permissions violation") && m.contains(needle) {
                return m;
            }
        }
    })
    .await;
    assert!(msg.contains(needle), "{msg}");
}

fn agent_yaml(id: &str, seed_file: &str) -> String {
    format!(
        "machine_id: {id}\nengine: mock\nllm_models: [mock-7b]\nmock: {{tokens_per_s: 500, ttft_ms: 1}}\nnats: {{nkey_seed_file: \"{seed_file}\", inbox_prefix: \"{}\"}}\n",
        agent_inbox_prefix(id)
    )
}

#[tokio::test]
async fn per_agent_permissions_central_observer_and_no_anonymous() {
    let fleet = Fleet::new();
    let nats = NatsServer::start_with_config(Some(&fleet.conf()));
    let url = nats.url();

    // Anonymous clients are refused.
    let anon = tokio::time::timeout(WAIT, async_nats::connect(&url))
        .await
        .expect("answer");
    assert!(anon.is_err(), "an unauthenticated client must be refused");

    // Central defines the stream and the registry bucket.
    let (central, _central_errs) = connect_as(&url, &fleet.central, None).await;
    let js = async_nats::jetstream::new(central.clone());
    streams::ensure_events_stream(&js, &Default::default(), 1)
        .await
        .expect("central creates the stream");
    let kv = streams::ensure_agents_bucket(&js, Duration::from_secs(15), 1)
        .await
        .expect("central creates the bucket");

    let _a = start_agent(
        config(&agent_yaml("sec-a", &fleet.seed_file("a", &fleet.a)), &url),
        &url,
    )
    .await;
    let _b = start_agent(
        config(&agent_yaml("sec-b", &fleet.seed_file("b", &fleet.b)), &url),
        &url,
    )
    .await;

    // The whole path works under least privilege; the observer watches it.
    let (observer, mut observer_errs) = connect_as(&url, &fleet.observer, None).await;
    let mut watch = observer
        .subscribe(subjects::events("sec-job"))
        .await
        .unwrap();
    observer.flush().await.unwrap();
    let r = request(
        &central,
        subjects::jobs("sec-a"),
        job_json("mock-7b", json!({"job_id": "sec-job", "max_tokens": 5})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    loop {
        let msg = within("observer sees events", WAIT, watch.next())
            .await
            .unwrap();
        let e: bench_schemas::Event = serde_json::from_slice(&msg.payload).unwrap();
        if e.kind.is_terminal() {
            assert!(matches!(e.kind, EventKind::JobDone(_)), "{e:?}");
            break;
        }
    }
    // Agent b's registry entry exists (written by b itself).
    let before: AgentInfo = within("b heartbeat", WAIT, async {
        loop {
            if let Ok(Some(v)) = kv.get("sec-b").await {
                break serde_json::from_slice(&v).unwrap();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;

    // Agent a's credentials can't read b's jobs ...
    let (as_a, mut a_errs) = connect_as(&url, &fleet.a, Some(agent_inbox_prefix("sec-a"))).await;
    let _sub = as_a.subscribe(subjects::jobs("sec-b")).await.unwrap();
    violation(&mut a_errs, "bench.jobs.sec-b").await;
    // ... nor every machine's jobs, nor other clients' replies ...
    let _sub = as_a.subscribe("_INBOX.>").await.unwrap();
    violation(&mut a_errs, "_INBOX.>").await;
    // ... nor write b's registry key.
    as_a.publish(
        format!("$KV.{}.sec-b", subjects::AGENTS_BUCKET),
        r#"{"forged":true}"#.into(),
    )
    .await
    .unwrap();
    violation(&mut a_errs, "$KV.bench_agents.sec-b").await;
    as_a.flush().await.unwrap();
    let after: AgentInfo =
        serde_json::from_slice(&kv.get("sec-b").await.unwrap().unwrap()).unwrap();
    assert_eq!(
        after.machine_id, before.machine_id,
        "b's entry is still b's own"
    );

    // ... nor re-create central's consumer to change what it reads: not through the legacy
    // ephemeral subject (there a `name` in the body updates that consumer), not by name.
    let es = subjects::EVENTS_STREAM;
    let rewrite = json!({"stream_name": es, "config": {"name": subjects::INDEXER_CONSUMER,
        "ack_policy": "explicit", "filter_subject": "bench.events.nothing"}});
    let legacy = format!("$JS.API.CONSUMER.CREATE.{es}");
    as_a.publish(legacy.clone(), rewrite.to_string().into())
        .await
        .unwrap();
    violation(&mut a_errs, &legacy).await;
    let named = format!(
        "$JS.API.CONSUMER.CREATE.{es}.{}.bench.events.nothing",
        subjects::INDEXER_CONSUMER
    );
    as_a.publish(named.clone(), rewrite.to_string().into())
        .await
        .unwrap();
    violation(&mut a_errs, &named).await;

    // A repeat "auto" job runs under least privilege (the agent reads the race from the stream
    // with a named ephemeral consumer of its own).
    let mut auto = Events::watch(&observer, "sec-auto").await;
    let r = request(
        &central,
        subjects::jobs("sec-a"),
        job_json(
            "mock-7b",
            json!({"job_id": "sec-auto", "max_tokens": 5, "repeat": "auto", "max_repeat": 6}),
        ),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    let EventKind::JobDone(d) = auto.terminal("sec-a").await.kind else {
        panic!("{:?}", auto.types())
    };
    assert_eq!(d.summary.repeats, 6);

    // The observer is read-only: it cannot submit or cancel.
    observer
        .publish(
            subjects::jobs("sec-a"),
            job_json("mock-7b", json!({})).into(),
        )
        .await
        .unwrap();
    violation(&mut observer_errs, "bench.jobs.sec-a").await;
    observer
        .publish(subjects::cancel("sec-job"), "".into())
        .await
        .unwrap();
    violation(&mut observer_errs, "bench.cancel.sec-job").await;
    // ... nor pull from or ack central's durable consumer (that would steal events from it).
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        subjects::EVENTS_STREAM,
        subjects::INDEXER_CONSUMER
    );
    observer.publish(next.clone(), "1".into()).await.unwrap();
    violation(&mut observer_errs, &next).await;
    let ack = format!(
        "$JS.ACK.{}.{}.1.5.5.0.0",
        subjects::EVENTS_STREAM,
        subjects::INDEXER_CONSUMER
    );
    observer.publish(ack.clone(), "".into()).await.unwrap();
    violation(&mut observer_errs, &ack).await;
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_with_a_generated_self_signed_ca_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bench-race test CA",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let p = |f: &str| d.join(f).display().to_string();
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", timeout: 5 }}\n",
        p("server.pem"),
        p("server-key.pem")
    );
    let nats = NatsServer::start_with_config(Some(&conf));
    let url = format!("tls://127.0.0.1:{}", nats.port());

    // Without the CA the server's certificate is not trusted.
    let untrusted = tokio::time::timeout(WAIT, async_nats::connect(&url))
        .await
        .expect("answer");
    assert!(
        untrusted.is_err(),
        "a client without the CA must not connect"
    );

    let yaml = format!(
        "machine_id: tls-a\nengine: mock\nllm_models: [mock-7b]\nnats: {{tls_ca_file: \"{}\", tls_required: true}}\n",
        p("ca.pem")
    );
    let _agent = start_agent(config(&yaml, &url), &url).await;
    let c = within(
        "tls connect",
        WAIT,
        ConnectOptions::new()
            .add_root_certificates(d.join("ca.pem"))
            .require_tls(true)
            .connect(&url),
    )
    .await
    .expect("client with the CA connects");
    let mut ev = Events::watch(&c, "tls-job").await;
    let r = request(
        &c,
        subjects::jobs("tls-a"),
        job_json("mock-7b", json!({"job_id": "tls-job", "max_tokens": 4})),
    )
    .await;
    assert!(r.accepted, "{r:?}");
    assert!(matches!(
        ev.terminal("tls-a").await.kind,
        EventKind::JobDone(_)
    ));
}
