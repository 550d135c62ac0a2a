//! Runs queued jobs one at a time: warmups then measured repeats, each streamed from the engine,
//! timed on a monotonic clock, batched into `llm_token` events and closed with `repeat_done`;
//! then `job_done`, or `job_error` / `job_cancelled` at the first failure or cancel.

use crate::backend::{GenRequest, Item};
use crate::emit::JobCtx;
use crate::measure::Measure;
use crate::publisher::now_ms;
use crate::Shared;
use bench_schemas::event::{Cancelled, Done, Failed, Started, Token};
use bench_schemas::{ErrorBody, ErrorCode, EventKind, Job, Metrics, StartMode, Summary};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a run stopped early.
enum Stop {
    Cancelled(String),
    Failed(ErrorBody),
}

/// The worker loop: until shutdown, take the next job and run it.
pub async fn worker(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let q = tokio::select! {
            _ = shutdown.cancelled() => return,
            q = shared.queue.pop() => q,
        };
        let job_id = q.ctx.job_id.clone();
        tracing::info!(%job_id, model = %q.job.model, "job started");
        run_job(&shared, &q.job, &q.ctx, &q.cancel).await;
        shared.queue.finish(&job_id);
    }
}

async fn run_job(shared: &Shared, job: &Job, ctx: &JobCtx, cancel: &CancellationToken) {
    let backend = shared.backend_for(job).expect("backend checked at intake");
    if job.expires_at.is_some_and(|t| t < now_ms()) {
        ctx.emit(EventKind::JobError(Failed {
            error: ErrorBody::new(
                ErrorCode::Expired,
                "the job expired while it waited in the queue",
            ),
            repeat_index: None,
        }));
        return;
    }
    if job.start == StartMode::Together {
        if let Some(at) = job.start_at_ms {
            let wait = Duration::from_millis(at.saturating_sub(now_ms()));
            tokio::select! {
                _ = cancel.cancelled() => {
                    ctx.emit(EventKind::JobCancelled(Cancelled { repeat_index: None, reason: "cancelled before start".into() }));
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if job.expires_at.is_some_and(|t| t < now_ms()) {
                ctx.emit(EventKind::JobError(Failed {
                    error: ErrorBody::new(
                        ErrorCode::Expired,
                        "the job expired before its start time",
                    ),
                    repeat_index: None,
                }));
                return;
            }
        }
    }
    let mut runs: Vec<Metrics> = Vec::new();
    let mut last_output = String::new();
    for index in 0..job.warmup + job.repeat {
        let warmup = index < job.warmup;
        ctx.emit(EventKind::JobStarted(Started {
            repeat_index: index,
            warmup,
        }));
        match run_once(shared, &*backend, job, ctx, cancel, index, warmup).await {
            Ok((metrics, output)) => {
                ctx.emit(EventKind::RepeatDone(metrics.clone()));
                runs.push(metrics);
                if !warmup {
                    last_output = output;
                }
            }
            Err(Stop::Cancelled(reason)) => {
                ctx.emit(EventKind::JobCancelled(Cancelled {
                    repeat_index: Some(index),
                    reason,
                }));
                return;
            }
            Err(Stop::Failed(error)) => {
                tracing::warn!(job_id = %ctx.job_id, code = %error.code, message = %error.message, "job failed");
                ctx.emit(EventKind::JobError(Failed {
                    error,
                    repeat_index: Some(index),
                }));
                return;
            }
        }
    }
    let summary = Summary::of(&runs);
    let median = |s: Option<bench_schemas::Stats>| s.map(|s| s.median);
    let source = runs
        .last()
        .map(|m| m.token_count_source)
        .expect("at least one run");
    ctx.emit(EventKind::JobDone(Done {
        model: job.model.clone(),
        engine: backend.kind().to_string(),
        ttft_ms: median(summary.ttft_ms).unwrap_or(0.0),
        gen_tokens: median(summary.gen_tokens).unwrap_or(0.0).round() as u64,
        gen_tokens_per_s: median(summary.gen_tokens_per_s),
        total_ms: median(summary.total_ms).unwrap_or(0.0),
        token_count_source: source,
        repeats: runs,
        summary,
        output_text: last_output,
    }));
    tracing::info!(job_id = %ctx.job_id, "job done");
}

/// Buffered text waiting to be published as one `llm_token`.
struct Batch {
    text: String,
    tokens: Option<u64>,
    t_ms: f64,
    flush_at: Option<Instant>,
}

impl Batch {
    fn flush(&mut self, ctx: &JobCtx, index: u32) {
        if self.text.is_empty() {
            return;
        }
        ctx.emit(EventKind::LlmToken(Token {
            repeat_index: index,
            text: std::mem::take(&mut self.text),
            tokens: self.tokens.replace(0),
            t_ms: self.t_ms,
        }));
        self.flush_at = None;
    }
}

async fn run_once(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    job: &Job,
    ctx: &JobCtx,
    cancel: &CancellationToken,
    index: u32,
    warmup: bool,
) -> Result<(Metrics, String), Stop> {
    let idle = shared.cfg.engine_idle_timeout;
    let cancelled = || Stop::Cancelled("cancel requested".into());
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
    let mut stream = tokio::select! {
        _ = cancel.cancelled() => return Err(cancelled()),
        r = tokio::time::timeout(idle, backend.generate(GenRequest::from(job))) => match r {
            Err(_) => return Err(Stop::Failed(ErrorBody::new(ErrorCode::Timeout, format!("the engine did not answer within {idle:?}")))),
            Ok(Err(e)) => return Err(Stop::Failed(e)),
            Ok(Ok(s)) => s,
        },
    };
    let mut measure = Measure::default();
    let mut output = String::new();
    let mut batch = Batch {
        text: String::new(),
        tokens: Some(0),
        t_ms: 0.0,
        flush_at: None,
    };
    let report = loop {
        let flush_at = batch.flush_at;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                batch.flush(ctx, index);
                return Err(cancelled());
            }
            _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                batch.flush(ctx, index);
            }
            next = tokio::time::timeout(idle, stream.next()) => {
                let now = Instant::now();
                match next {
                    Err(_) => {
                        batch.flush(ctx, index);
                        return Err(Stop::Failed(ErrorBody::new(ErrorCode::Timeout, format!("the engine sent nothing for {idle:?}"))));
                    }
                    Ok(None) => {
                        batch.flush(ctx, index);
                        return Err(Stop::Failed(ErrorBody::new(ErrorCode::StreamBroken, "the engine stream ended without a final message")));
                    }
                    Ok(Some(Err(e))) => {
                        batch.flush(ctx, index);
                        return Err(Stop::Failed(e));
                    }
                    Ok(Some(Ok(Item::Final(report)))) => break (report, ms(now)),
                    Ok(Some(Ok(Item::Text { text, tokens }))) => {
                        if text.is_empty() {
                            continue;
                        }
                        let t = ms(now);
                        measure.chunk(t, &text, tokens);
                        output.push_str(&text);
                        batch.text.push_str(&text);
                        batch.tokens = match (batch.tokens, tokens) {
                            (Some(a), Some(b)) => Some(a + b),
                            _ => None,
                        };
                        batch.t_ms = t;
                        if batch.flush_at.is_none() {
                            batch.flush_at = Some(now + shared.cfg.flush_interval);
                        }
                        if batch.text.len() >= shared.cfg.flush_chars {
                            batch.flush(ctx, index);
                        }
                    }
                }
            }
        }
    };
    batch.flush(ctx, index);
    let (report, total_ms) = report;
    Ok((measure.finish(index, warmup, total_ms, &report), output))
}
