//! Sending a job to machines. An explicit list sends the same job (one `job_id`) to each
//! `bench.jobs.<id>` as a request, concurrently: no responders means offline, said at once.
//! `"all"` publishes once on `bench.jobs.all` with a reply inbox and gathers the answers for the
//! broadcast window (or until every machine heart-beating now has answered).

use crate::error::{ApiError, ErrorInfo};
use crate::record::{JobRecord, RunStatus};
use crate::{now_ms, Shared};
use async_nats::RequestErrorKind;
use bench_schemas::{subjects, validate_job_id, validate_machine_id, Job, JobLimits, JobReply};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Which machines a job goes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// These machines.
    List(Vec<String>),
    /// The whole fleet.
    All,
}

/// A machine's answer, as `POST /api/jobs` reports it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Queued by the agent.
    Accepted,
    /// Refused by the agent (the error says why).
    Rejected,
    /// Nobody answered.
    Offline,
}

/// One machine in the `POST /api/jobs` response.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MachineAnswer {
    /// The machine.
    pub machine_id: String,
    /// Its answer.
    pub status: Answer,
    /// The run an accept starts (`<boot_id>-<n>`, as its events will carry). Absent for other
    /// answers and from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Why not accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// The `POST /api/jobs` response.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Dispatched {
    /// The job's id.
    pub job_id: String,
    /// Each machine's answer.
    pub machines: Vec<MachineAnswer>,
}

/// Parses a `POST /api/jobs` body: the Job fields plus `machines`.
pub fn parse_request(body: &[u8]) -> Result<(Target, Job), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadJson(format!("the body is not valid JSON: {e}")))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(ApiError::BadJson("the body must be a JSON object".into()));
    };
    let target = match obj.remove("machines") {
        None => {
            return Err(ApiError::InvalidJob(
                "machines is required: a list of machine ids, or \"all\"".into(),
            ))
        }
        Some(serde_json::Value::String(s)) if s == "all" => Target::All,
        Some(serde_json::Value::Array(ids)) => {
            let mut list: Vec<String> = Vec::new();
            for id in ids {
                let serde_json::Value::String(id) = id else {
                    return Err(ApiError::InvalidJob(
                        "machines must contain machine id strings".into(),
                    ));
                };
                validate_machine_id(&id)?;
                if !list.contains(&id) {
                    list.push(id);
                }
            }
            if list.is_empty() {
                return Err(ApiError::InvalidJob(
                    "machines is empty: name at least one machine, or \"all\"".into(),
                ));
            }
            Target::List(list)
        }
        Some(_) => {
            return Err(ApiError::InvalidJob(
                "machines must be a list of machine ids or \"all\"".into(),
            ))
        }
    };
    if let Some(serde_json::Value::String(id)) = obj.get("job_id") {
        validate_job_id(id)?;
    }
    let job: Job = serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| ApiError::InvalidJob(format!("not a valid job: {e}")))?;
    // Only the shape is judged here: each agent's own limits decide what it runs.
    let any = JobLimits {
        max_prompt_bytes: usize::MAX,
        max_tokens: u32::MAX,
        max_runs: u32::MAX,
        max_num_ctx: u32::MAX,
    };
    job.validate(&any).map_err(|e| match e.code {
        bench_schemas::ErrorCode::InvalidId => ApiError::InvalidJob(e.message),
        _ => ApiError::InvalidJob(format!("{}: {}", e.code, e.message)),
    })?;
    Ok((target, job))
}

fn answer_of(reply: &JobReply) -> MachineAnswer {
    MachineAnswer {
        machine_id: reply.machine_id.clone(),
        status: if reply.accepted {
            Answer::Accepted
        } else {
            Answer::Rejected
        },
        // It becomes part of a record (and of the stall verdict, through its boot id): only a
        // well-formed one is kept.
        run_id: reply
            .run_id
            .clone()
            .filter(|r| reply.accepted && is_run_id(r)),
        error: reply.error.clone().map(Into::into),
    }
}

/// `<boot_id>-<n>` made of subject-token characters.
fn is_run_id(run_id: &str) -> bool {
    subjects::boot_of(run_id).is_some() && validate_job_id(run_id).is_ok()
}

/// Records the run an accept named, unless the machine's events already did: the machine is
/// then a run with an id from its answer on, so one that dies before its first event is
/// stored gets the exact verdict (`agent_restarted`, by the run's boot id), not an anonymous
/// stall.
fn record_accepted_run(m: &mut crate::record::MachineRun, run_id: &str) {
    if m.run_id == run_id || m.earlier_runs.iter().any(|r| r.run_id == run_id) {
        return;
    }
    if m.run_id.is_empty() && m.last_seq == 0 {
        m.run_id = run_id.to_string();
    } else if m.status.is_terminal() {
        // A broadcast re-run: the machine's last run ended; this one starts now.
        m.begin_run(run_id);
    }
}

async fn request_one(shared: &Shared, machine_id: &str, payload: bytes::Bytes) -> MachineAnswer {
    let req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(shared.cfg.request_timeout));
    let offline = |code: &str, message: String| MachineAnswer {
        machine_id: machine_id.to_string(),
        status: Answer::Offline,
        run_id: None,
        error: Some(ErrorInfo::new(code, message)),
    };
    match shared
        .client
        .send_request(subjects::jobs(machine_id), req)
        .await
    {
        Ok(msg) => match serde_json::from_slice::<JobReply>(&msg.payload) {
            Ok(reply) => MachineAnswer {
                machine_id: machine_id.to_string(),
                ..answer_of(&reply)
            },
            Err(e) => MachineAnswer {
                machine_id: machine_id.to_string(),
                status: Answer::Rejected,
                run_id: None,
                error: Some(ErrorInfo::new(
                    "bad_reply",
                    format!("the agent's answer is not a job reply: {e}"),
                )),
            },
        },
        Err(e) if e.kind() == RequestErrorKind::NoResponders => offline(
            "offline",
            format!("no agent listens on {}", subjects::jobs(machine_id)),
        ),
        Err(e) if e.kind() == RequestErrorKind::TimedOut => offline(
            "timeout",
            format!("no answer within {:?}", shared.cfg.request_timeout),
        ),
        Err(e) => offline("nats_unavailable", e.to_string()),
    }
}

async fn gather_all(
    shared: &Shared,
    payload: bytes::Bytes,
) -> Result<Vec<MachineAnswer>, ApiError> {
    let expected = shared.registry.online_ids(now_ms());
    let inbox = shared.client.new_inbox();
    let mut replies = shared
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(ApiError::nats)?;
    shared
        .client
        .publish_with_reply(subjects::JOBS_ALL, inbox, payload)
        .await
        .map_err(ApiError::nats)?;
    shared.client.flush().await.map_err(ApiError::nats)?;
    let deadline = tokio::time::Instant::now() + shared.cfg.broadcast_window;
    let mut answers: Vec<MachineAnswer> = Vec::new();
    loop {
        let got_everyone = !expected.is_empty()
            && expected
                .iter()
                .all(|id| answers.iter().any(|a| &a.machine_id == id));
        if got_everyone {
            break;
        }
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(msg)) => match serde_json::from_slice::<JobReply>(&msg.payload) {
                Ok(reply) if !answers.iter().any(|a| a.machine_id == reply.machine_id) => {
                    answers.push(answer_of(&reply))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "unreadable broadcast answer"),
            },
            Ok(None) | Err(_) => break,
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(answers)
}

/// Validates the targets, records the job, sends it and records the answers.
pub async fn dispatch(
    shared: &Shared,
    target: Target,
    mut job: Job,
) -> Result<Dispatched, ApiError> {
    if let Target::List(ids) = &target {
        if let Some(unknown) = ids.iter().find(|id| !shared.registry.is_known(id)) {
            return Err(ApiError::UnknownMachine(unknown.clone()));
        }
    }
    shared.require_nats()?;
    let job_id = match &job.job_id {
        // A deleted id stays taken: its late events are dropped, so a new job under it would
        // never see its own.
        Some(id) if shared.index.was_deleted(id) => {
            return Err(ApiError::BadRequest(format!(
                "job_id {id:?} was deleted; omit job_id to get a new one"
            )))
        }
        Some(id) => id.clone(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    // A re-used id is a new run of the job on each machine (recorded beside the earlier runs);
    // while it still runs, the agents would refuse it as a duplicate, so refuse it here.
    let existing = shared.record(&job_id).await?;
    if existing.as_ref().is_some_and(|r| !r.is_finished()) {
        return Err(ApiError::BadRequest(format!(
            "job {job_id:?} is still running; wait for it to finish (or cancel it) before running it again"
        )));
    }
    job.job_id = Some(job_id.clone());
    let payload: bytes::Bytes = serde_json::to_vec(&job)
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .into();
    let listed = match &target {
        Target::List(ids) => ids.clone(),
        Target::All => Vec::new(),
    };
    // Record first: agents' job_accepted may be indexed before their answers come back. The
    // deadline ends a dispatch that never completes (central killed, NATS gone).
    let now = now_ms();
    let deadline = now + shared.cfg.http_timeout().as_millis() as u64;
    let fresh = JobRecord::dispatched(&job_id, job.clone(), &listed, now);
    shared
        .update_record(&job_id, |old| {
            let mut r = match old {
                // A new run: each listed machine's last run moves to its earlier runs now, so
                // the job is running (not still "done") from this moment on.
                Some(mut r) => {
                    r.job = Some(job.clone());
                    r.dispatching = true;
                    for id in &listed {
                        r.machine_mut(id).begin_run("");
                    }
                    r
                }
                None => fresh,
            };
            r.dispatch_deadline_ms = Some(deadline);
            Some(r)
        })
        .await?;
    shared
        .metrics
        .jobs_dispatched
        .fetch_add(1, Ordering::Relaxed);

    let answers = match &target {
        Target::List(ids) => {
            futures::future::join_all(
                ids.iter()
                    .map(|id| request_one(shared, id, payload.clone())),
            )
            .await
        }
        Target::All => match gather_all(shared, payload).await {
            Ok(a) => a,
            Err(e) => {
                let _ = shared
                    .update_record(&job_id, |r| {
                        r.map(|r| JobRecord {
                            dispatching: false,
                            dispatch_deadline_ms: None,
                            ..r
                        })
                    })
                    .await;
                return Err(e);
            }
        },
    };
    let by_id: HashMap<&str, &MachineAnswer> =
        answers.iter().map(|a| (a.machine_id.as_str(), a)).collect();
    shared
        .update_record(&job_id, |r| {
            let mut r = r?;
            for (id, a) in &by_id {
                let m = r.machine_mut(id);
                if let Some(run_id) = &a.run_id {
                    record_accepted_run(m, run_id);
                }
                if a.status != Answer::Accepted
                    && m.status == RunStatus::Queued
                    && m.last_seq == 0
                    && m.run_id.is_empty()
                {
                    m.fail(
                        a.error
                            .clone()
                            .unwrap_or_else(|| ErrorInfo::new("rejected", "refused")),
                    );
                }
            }
            r.dispatching = false;
            r.dispatch_deadline_ms = None;
            Some(r)
        })
        .await?;
    tracing::info!(%job_id, machines = answers.len(), accepted = answers.iter().filter(|a| a.status == Answer::Accepted).count(), "job dispatched");
    Ok(Dispatched {
        job_id,
        machines: answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::MachineRun;

    #[test]
    fn an_accepted_run_is_recorded_once() {
        // A listed machine: begun without an id at dispatch, the answer names it.
        let mut m = MachineRun::new("a");
        record_accepted_run(&mut m, "b1-1");
        assert_eq!((m.run_id.as_str(), m.status), ("b1-1", RunStatus::Queued));
        // The run's events were indexed first: nothing changes.
        m.status = RunStatus::Done;
        record_accepted_run(&mut m, "b1-1");
        assert_eq!((m.run_id.as_str(), m.earlier_runs.len()), ("b1-1", 0));
        // A broadcast re-run after that run ended: a new run, the old one kept.
        record_accepted_run(&mut m, "b1-2");
        assert_eq!((m.run_id.as_str(), m.status), ("b1-2", RunStatus::Queued));
        assert_eq!(m.earlier_runs[0].run_id, "b1-1");
        // A late answer for an earlier run, or one arriving while another run still goes:
        // left to the events.
        record_accepted_run(&mut m, "b1-1");
        record_accepted_run(&mut m, "b1-3");
        assert_eq!((m.run_id.as_str(), m.earlier_runs.len()), ("b1-2", 1));
    }

    #[test]
    fn only_an_accept_with_a_well_formed_run_id_names_a_run() {
        let ok = JobReply::accepted("j", "a", "3f9a0c27d1e4-1", 0);
        assert_eq!(answer_of(&ok).run_id.as_deref(), Some("3f9a0c27d1e4-1"));
        for bad in ["", "noboot", "b-x", "a.b-1", "b 1-1"] {
            let r = JobReply {
                run_id: Some(bad.into()),
                ..ok.clone()
            };
            assert_eq!(answer_of(&r).run_id, None, "{bad:?}");
        }
        let refused = JobReply {
            accepted: false,
            ..ok
        };
        assert_eq!(answer_of(&refused).run_id, None);
    }

    fn code(body: &str) -> &'static str {
        parse_request(body.as_bytes()).unwrap_err().code()
    }

    #[test]
    fn request_bodies() {
        let (t, j) =
            parse_request(br#"{"machines":["a","b","a"],"model":"m","prompt":"p","max_tokens":8}"#)
                .unwrap();
        assert_eq!(t, Target::List(vec!["a".into(), "b".into()]));
        assert_eq!(j.max_tokens, 8);
        assert_eq!(
            parse_request(br#"{"machines":"all","model":"m","prompt":"p"}"#)
                .unwrap()
                .0,
            Target::All
        );
        assert_eq!(code("{"), "bad_json");
        assert_eq!(code("[]"), "bad_json");
        assert_eq!(code(r#"{"model":"m","prompt":"p"}"#), "invalid_job");
        assert_eq!(
            code(r#"{"machines":[],"model":"m","prompt":"p"}"#),
            "invalid_job"
        );
        assert_eq!(
            code(r#"{"machines":["a.b"],"model":"m","prompt":"p"}"#),
            "invalid_id"
        );
        assert_eq!(
            code(r#"{"machines":["a"],"model":"m","prompt":""}"#),
            "invalid_job"
        );
        assert_eq!(
            code(r#"{"machines":["a"],"model":"m","prompt":"p","max_tokens":99999999999}"#),
            "invalid_job"
        );
        // Limits are the agents' to judge (each answers with its own code), not central's.
        let (_, big) = parse_request(
            br#"{"machines":["a"],"model":"m","prompt":"p","max_tokens":20000,"repeat":500}"#,
        )
        .unwrap();
        assert_eq!(
            (big.max_tokens, big.repeat),
            (20000, bench_schemas::Repeat::Count(500))
        );
        // repeat "auto" and the shapes pass through as the agents will read them.
        let (_, auto) = parse_request(
            br#"{"machines":["a"],"model":"m","profile":"pp512-tg128","depth":64,"repeat":"auto","max_repeat":12,"target_ci_pct":1.5}"#,
        )
        .unwrap();
        assert_eq!(
            (auto.repeat, auto.max_repeat(), auto.shape().prompt_tokens),
            (bench_schemas::Repeat::Auto, 12, Some(512))
        );
        for bad in [
            r#"{"machines":["a"],"model":"m","prompt":"p","repeat":"many"}"#,
            r#"{"machines":["a"],"model":"m","prompt":"p","repeat":"auto","max_repeat":5}"#,
            r#"{"machines":["a"],"model":"m","prompt":"p","repeat":3,"max_repeat":9}"#,
            r#"{"machines":["a"],"model":"m","profile":"pp512"}"#,
        ] {
            assert_eq!(code(bad), "invalid_job", "{bad}");
        }
        assert_eq!(
            code(r#"{"machines":["a"],"model":"m","prompt":"p","max_token":5}"#),
            "invalid_job"
        );
        assert_eq!(
            code(r#"{"machines":["a"],"model":"m","prompt":"p","job_id":"x y"}"#),
            "invalid_id"
        );
    }
}
