//! `run --nats URL`: no central. The job goes to `bench.jobs.<id>` (a request per machine) or
//! `bench.jobs.all` (one publish, answers gathered on a reply inbox), the way central's
//! dispatch sends it; the events are read from `BENCH_EVENTS` (an ordered consumer filtered to
//! `bench.events.<job_id>`) into central's own [`JobRecord`], and the document printed is
//! central's own [`compare::detail`] of it, so the table is the one central would give.

use crate::args::{self, RunArgs};
use crate::progress::View;
use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::RequestErrorKind;
use bench_central::compare;
use bench_central::error::ErrorInfo;
use bench_central::record::JobRecord;
use bench_central::registry::Registry;
use bench_schemas::{subjects, Event, Job, JobReply};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// Bound of each setup step (connect, stream lookup, consumer).
const STEP: Duration = Duration::from_secs(10);
/// How long one machine has to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn step<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(STEP, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!("{what}: no answer within {STEP:?}")),
    }
}

fn answer(machine_id: &str, status: &str, error: Option<ErrorInfo>) -> Value {
    let mut v = json!({"machine_id": machine_id, "status": status});
    if let Some(e) = error {
        v["error"] = json!({"code": e.code, "message": e.message});
    }
    v
}

fn answer_of(r: &JobReply) -> Value {
    let mut v = answer(
        &r.machine_id,
        if r.accepted { "accepted" } else { "rejected" },
        r.error.clone().map(Into::into),
    );
    if let Some(run_id) = r.run_id.as_deref().filter(|_| r.accepted) {
        v["run_id"] = run_id.into();
    }
    v
}

async fn request_one(client: &async_nats::Client, id: &str, payload: bytes::Bytes) -> Value {
    let req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(REQUEST_TIMEOUT));
    match client.send_request(subjects::jobs(id), req).await {
        Ok(msg) => match serde_json::from_slice::<JobReply>(&msg.payload) {
            Ok(r) => {
                // Under the id asked, whatever the answer calls itself.
                let mut v = answer_of(&r);
                v["machine_id"] = id.into();
                v
            }
            Err(e) => answer(
                id,
                "rejected",
                Some(ErrorInfo::new("bad_reply", format!("not a job reply: {e}"))),
            ),
        },
        Err(e) if e.kind() == RequestErrorKind::NoResponders => answer(
            id,
            "offline",
            Some(ErrorInfo::new(
                "offline",
                format!("no agent listens on {}", subjects::jobs(id)),
            )),
        ),
        Err(e) if e.kind() == RequestErrorKind::TimedOut => answer(
            id,
            "offline",
            Some(ErrorInfo::new(
                "timeout",
                format!("no answer within {REQUEST_TIMEOUT:?}"),
            )),
        ),
        Err(e) => answer(
            id,
            "offline",
            Some(ErrorInfo::new("nats_unavailable", e.to_string())),
        ),
    }
}

async fn gather_all(
    client: &async_nats::Client,
    expected: &[String],
    payload: bytes::Bytes,
    window: Duration,
) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies = step(
        "subscribing to the reply inbox",
        client.subscribe(inbox.clone()),
    )
    .await?;
    step(
        "publishing the job",
        client.publish_with_reply(subjects::JOBS_ALL, inbox, payload),
    )
    .await?;
    step("flushing", client.flush()).await?;
    let deadline = Instant::now() + window;
    let mut answers: Vec<Value> = Vec::new();
    loop {
        let everyone = !expected.is_empty()
            && expected
                .iter()
                .all(|id| answers.iter().any(|a| a["machine_id"] == id.as_str()));
        if everyone {
            break;
        }
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(msg)) => {
                if let Ok(r) = serde_json::from_slice::<JobReply>(&msg.payload) {
                    if !answers
                        .iter()
                        .any(|a| a["machine_id"] == r.machine_id.as_str())
                    {
                        answers.push(answer_of(&r));
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(answers)
}

/// Runs the job through NATS and returns central's document of it.
pub async fn run(
    url: &str,
    job: &Job,
    machines: &str,
    a: &RunArgs,
    timeout_s: u64,
) -> Result<Value> {
    let cfg = bench_nats::NatsConfig {
        url: Some(url.to_string()),
        ..Default::default()
    };
    let client = step(
        "connecting to NATS",
        bench_nats::connect(&cfg, "bench-race"),
    )
    .await?;
    if !bench_nats::wait_connected(&client, STEP).await {
        bail!("NATS at {url} did not answer within {STEP:?}");
    }
    let js = jetstream::new(client.clone());
    let stream = step(
        &format!(
            "the {} stream (bench-central creates it on its first start)",
            subjects::EVENTS_STREAM
        ),
        js.get_stream(subjects::EVENTS_STREAM),
    )
    .await?;
    let mut job = job.clone();
    let job_id = job
        .job_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    job.job_id = Some(job_id.clone());
    // Reading from the start of the job's subject: nothing it publishes can be missed.
    let consumer = step(
        "creating the event consumer",
        stream.create_consumer(OrderedConfig {
            filter_subject: subjects::events(&job_id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        }),
    )
    .await?;
    let mut messages = step("reading events", consumer.messages()).await?;

    // Who is online (to end a broadcast's gather early) and their labels: central's registry.
    let registry = Registry::new(Vec::new());
    if let Ok(kv) = step(
        "the agents bucket",
        js.get_key_value(subjects::AGENTS_BUCKET),
    )
    .await
    {
        let _ = tokio::time::timeout(STEP, registry.load(&kv)).await;
    }
    let payload: bytes::Bytes = serde_json::to_vec(&job)?.into();
    eprintln!("job {job_id}");
    let answers = match args::machine_list(machines).as_slice() {
        [] => {
            let expected = registry.online_ids(bench_central::now_ms());
            gather_all(
                &client,
                &expected,
                payload,
                Duration::from_secs_f64(a.window_s.max(0.1)),
            )
            .await?
        }
        ids => {
            futures::future::join_all(
                ids.iter()
                    .map(|id| request_one(&client, id, payload.clone())),
            )
            .await
        }
    };
    crate::report_answers(&answers);
    if !answers.iter().any(|m| m["status"] == "accepted") {
        bail!("nobody accepted job {job_id}");
    }

    // As central records a job: a listed machine from the start, a broadcast's machines as
    // their events come (stream order, so the table's order is the one central shows).
    let listed = args::machine_list(machines);
    let mut record = JobRecord::dispatched(&job_id, job.clone(), &listed, bench_central::now_ms());
    record.dispatching = false;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|m| m["status"] == "accepted")
        .filter_map(|m| m["machine_id"].as_str().map(str::to_string))
        .collect();
    let refused = |record: &mut JobRecord| {
        for m in &answers {
            if m["status"] != "accepted" {
                let id = m["machine_id"].as_str().unwrap_or_default();
                let e = &m["error"];
                let run = record.machine_mut(id);
                if !run.status.is_terminal() && run.run_id.is_empty() {
                    run.fail(ErrorInfo::new(
                        e["code"].as_str().unwrap_or("rejected"),
                        e["message"].as_str().unwrap_or("refused"),
                    ));
                }
            }
        }
    };
    if !listed.is_empty() {
        refused(&mut record);
    }
    let ended = |record: &JobRecord| {
        accepted
            .iter()
            .all(|id| record.machine(id).is_some_and(|m| m.status.is_terminal()))
    };

    let mut view = View::new(Some(job.clone()));
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while !ended(&record) {
        let msg = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(anyhow!("reading events of job {job_id}: {e}")),
            Ok(None) => bail!("the event stream of job {job_id} ended"),
            Err(_) => bail!("job {job_id} did not end within {timeout_s} s"),
        };
        let info = msg.info().map_err(|e| anyhow!("event metadata: {e}"))?;
        let (seq, published_ms) = (
            info.stream_sequence,
            (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
        );
        let Ok(ev) = serde_json::from_slice::<Event>(&msg.payload) else {
            continue;
        };
        record.apply(&ev, seq, published_ms);
        view.on_event(&ev);
    }
    refused(&mut record);
    record.refresh_status(bench_central::now_ms());
    view.finish();
    let detail = compare::detail(&record, &registry, None).map_err(|e| anyhow!("{e}"))?;
    let mut doc = serde_json::to_value(&detail).context("the job document")?;
    // Each machine's raw cell results, where the document does not carry them already.
    if let Some(ms) = doc["machines"].as_array_mut() {
        for m in ms {
            if m.get("cells").is_none() {
                let id = m["machine_id"].as_str().unwrap_or_default().to_string();
                if let Some(run) = record.machine(&id) {
                    m["cells"] = serde_json::to_value(&run.cells)?;
                }
            }
        }
    }
    let _ = tokio::time::timeout(STEP, client.drain()).await;
    Ok(doc)
}
