//! Runs queued jobs one at a time: warmups then measured repeats, each streamed from the engine,
//! timed on a monotonic clock, batched into `llm_token` events and closed with `repeat_done`;
//! then `job_done`, or `job_error` / `job_cancelled` at the first failure or cancel. An event
//! that finds the event queue full stops the run with `event_queue_full` at once (the engine's
//! stream is never held up by NATS); the final event always has its reserved slot.

use crate::backend::{GenRequest, Item};
use crate::emit::JobCtx;
use crate::measure::{Measure, RunSpec};
use crate::publisher::{now_ms, QueueFull};
use crate::race::RaceWatch;
use crate::shape::Shaper;
use crate::telemetry::sampler::Session;
use crate::Shared;
use bench_schemas::event::{Cancelled, Done, Failed, Started, StopReason, Token};
use bench_schemas::{
    CacheMode, ErrorBody, ErrorCode, EventKind, Job, Metrics, Repeat, StartMode, Stats, Summary,
};
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

/// A run that stopped early, and in which repeat.
struct Early {
    stop: Stop,
    repeat_index: Option<u32>,
}

impl Early {
    fn at(stop: Stop, repeat_index: impl Into<Option<u32>>) -> Self {
        Self {
            stop,
            repeat_index: repeat_index.into(),
        }
    }
}

/// The error that stops a run whose events no longer fit in the event queue: better a clear
/// end than a stream with a silent hole.
fn event_queue_full(shared: &Shared) -> Stop {
    Stop::Failed(ErrorBody::new(
        ErrorCode::EventQueueFull,
        format!(
            "the agent's event queue is full ({} events, agent config limits.max_event_queue): NATS is not taking events as fast as this run produces them (unreachable or too slow), so the run was stopped rather than leave a gap in its events",
            shared.cfg.max_event_queue
        ),
    ))
}

/// The worker loop: until shutdown, take the next job and run it.
pub async fn worker(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let q = tokio::select! {
            _ = shutdown.cancelled() => return,
            q = shared.queue.pop() => q,
        };
        let job_id = q.ctx.job_id.clone();
        tracing::info!(%job_id, run_id = %q.ctx.run_id, model = %q.job.model, "job started");
        let backend = shared
            .backend_for(&q.job)
            .expect("backend checked at intake");
        {
            // Nothing else talks to the engine while it runs a benchmark (model lists come
            // from the cache meanwhile); waits for a list request already under way.
            let _engine = shared.models.lease(backend.kind()).await;
            run_job(&shared, &*backend, &q.job, &q.ctx, &q.cancel).await;
        }
        shared.queue.finish(&job_id);
    }
}

async fn run_job(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    job: &Job,
    ctx: &Arc<JobCtx>,
    cancel: &CancellationToken,
) {
    // The machine is sampled for as long as the job runs; samples that find the event queue
    // more than half full are dropped (counted), never a reason to stop the run.
    let session = {
        let ctx = ctx.clone();
        let mut dropped = 0u64;
        shared.telemetry.start(Box::new(move |sample| {
            if ctx.emit_spare(EventKind::Telemetry(sample)).is_err() {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(job_id = %ctx.job_id, dropped, "event queue busy: telemetry samples dropped");
                }
            }
        }))
    };
    let result = run_repeats(shared, backend, job, ctx, cancel, session.as_ref()).await;
    // Stopped (and its thread joined) before the final event: nothing follows job_done.
    if let Some(session) = session {
        session.stop();
    }
    let end = match result {
        Ok(done) => {
            tracing::info!(job_id = %ctx.job_id, run_id = %ctx.run_id, "job done");
            EventKind::JobDone(done)
        }
        Err(Early {
            stop: Stop::Cancelled(reason),
            repeat_index,
        }) => EventKind::JobCancelled(Cancelled {
            repeat_index,
            reason,
        }),
        Err(Early {
            stop: Stop::Failed(error),
            repeat_index,
        }) => {
            tracing::warn!(job_id = %ctx.job_id, run_id = %ctx.run_id, code = %error.code, message = %error.message, "job failed");
            EventKind::JobError(Failed {
                error,
                repeat_index,
            })
        }
    };
    ctx.finish(end);
}

async fn run_repeats(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    job: &Job,
    ctx: &JobCtx,
    cancel: &CancellationToken,
    session: Option<&Session>,
) -> Result<Done, Early> {
    let expired =
        |what: &str| Early::at(Stop::Failed(ErrorBody::new(ErrorCode::Expired, what)), None);
    if job.expires_at.is_some_and(|t| t < now_ms()) {
        return Err(expired("the job expired while it waited in the queue"));
    }
    // What the runs are measured on, asked now that the engine is leased to this job and idle
    // (before a `together` start, so the start time is kept).
    let described = tokio::select! {
        _ = cancel.cancelled() => {
            return Err(Early::at(Stop::Cancelled("cancelled before start".into()), None));
        }
        d = shared.described.refresh(backend, &job.model, shared.cfg.engine_idle_timeout) => d,
    };
    let fingerprint =
        crate::fingerprint::fingerprint(&shared.hardware, described.0, described.1, job);
    if job.start == StartMode::Together {
        if let Some(at) = job.start_at_ms {
            let wait = Duration::from_millis(at.saturating_sub(now_ms()));
            tokio::select! {
                _ = cancel.cancelled() => {
                    return Err(Early::at(Stop::Cancelled("cancelled before start".into()), None));
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if job.expires_at.is_some_and(|t| t < now_ms()) {
                return Err(expired("the job expired before its start time"));
            }
        }
    }
    // Follow the race from the start, so that every racer that shows up is waited for.
    let race = match job.repeat {
        Repeat::Auto => Some(
            RaceWatch::start(
                &shared.client,
                &ctx.job_id,
                &ctx.machine_id,
                &ctx.run_id,
                job.include_short,
            )
            .await
            .map_err(|e| {
                Early::at(
                    Stop::Failed(ErrorBody::new(
                        ErrorCode::Internal,
                        format!(
                            "cannot follow the race on {}: {e}",
                            bench_schemas::subjects::events(&ctx.job_id)
                        ),
                    )),
                    None,
                )
            })?,
        ),
        Repeat::Count(_) => None,
    };
    let idle = shared.cfg.engine_idle_timeout;
    // Unmeasured preparation (tokenizer calls, probes, the depth prefix), bounded and
    // cancellable like a run.
    let prepare = async {
        let shaper = Shaper::prepare(backend, job).await?;
        shaper.prime(backend, job).await?;
        Ok::<_, ErrorBody>(shaper)
    };
    let mut shaper = tokio::select! {
        _ = cancel.cancelled() => {
            return Err(Early::at(Stop::Cancelled("cancelled while preparing the prompt".into()), None));
        }
        r = tokio::time::timeout(idle, prepare) => match r {
            Err(_) => return Err(Early::at(Stop::Failed(ErrorBody::new(ErrorCode::Timeout, format!("preparing the prompt took longer than {idle:?}"))), None)),
            Ok(r) => r.map_err(|e| Early::at(Stop::Failed(e), None))?,
        },
    };
    let engine_key = (backend.base_url().to_string(), job.model.clone());
    // Bounded like every engine call: a hung engine fails the run below with `timeout`.
    let loaded = tokio::select! {
        _ = cancel.cancelled() => {
            return Err(Early::at(Stop::Cancelled("cancel requested".into()), None));
        }
        r = tokio::time::timeout(idle, backend.model_loaded(&job.model)) => r.ok().flatten(),
    };
    let cold = match loaded {
        Some(loaded) => !loaded,
        None => shared.last_model.lock().expect("last model lock").as_ref() != Some(&engine_key),
    };
    let shape = job.shape();
    // The cold request is extra when the job has no warmup to absorb it.
    let extra_cold = u32::from(cold && job.warmup == 0);
    let unmeasured = extra_cold + job.warmup;
    let max = job.max_repeat();
    let mut runs: Vec<Metrics> = Vec::new();
    let mut last_output = String::new();
    let mut stop_reason = StopReason::Count;
    let mut index = 0u32;
    loop {
        let measured = index.saturating_sub(unmeasured);
        if index >= unmeasured && measured >= max {
            if job.repeat == Repeat::Auto {
                stop_reason = StopReason::MaxRepeat;
            }
            break;
        }
        let is_cold = cold && index == 0;
        let warmup = index >= extra_cold && index < unmeasured;
        let full = |_| Early::at(event_queue_full(shared), index);
        let failed = |e| Early::at(Stop::Failed(e), index);
        let (prompt, mut spec) = shaper.prompt(backend, index).await.map_err(failed)?;
        spec.cold = is_cold;
        spec.fixed_output = shape.ignore_eos.then_some(shape.max_tokens);
        let mut req = GenRequest::from(job);
        req.prompt = prompt;
        req.raw = shaper.shaped();
        req.cache_prompt = if job.cache == CacheMode::Warm || shape.depth > 0 {
            Some(true)
        } else if shaper.shaped() {
            Some(false)
        } else {
            None
        };
        ctx.emit(EventKind::JobStarted(Started {
            repeat_index: index,
            warmup,
            cold: is_cold,
            fingerprint: (index == 0).then(|| fingerprint.clone()),
            cell: None,
            stream: None,
        }))
        .map_err(full)?;
        if let Some(s) = session {
            s.set_repeat(Some(index));
        }
        let run = run_once(shared, backend, req, &spec, ctx, cancel, index, warmup).await;
        if let Some(s) = session {
            s.set_repeat(None);
        }
        let RunOut {
            mut metrics,
            output,
            started,
            ended,
            decode,
        } = run.map_err(|stop| Early::at(stop, index))?;
        if let Some(s) = session {
            // The tokens of the decode window are those the decode rate counts.
            let tokens = match (decode, metrics.gen_tokens_per_s) {
                (Some((a, b)), Some(rate)) => (rate * (b - a).as_secs_f64()).round() as u64,
                _ => 0,
            };
            metrics.telemetry = Some(s.summary(
                (started.into_std(), ended.into_std()),
                decode.map(|(a, b)| (a.into_std(), b.into_std())),
                tokens,
            ));
        }
        // A prompt the engine served partly from its cache is flagged (`prompt_cache_hit`),
        // not refused: engines that count only evaluated tokens (Ollama) report it that way.
        if !metrics.prompt_cache_hit {
            shaper
                .check(metrics.prompt_tokens, metrics.prompt_evaluated)
                .map_err(failed)?;
        }
        ctx.emit(EventKind::RepeatDone(metrics.clone()))
            .map_err(full)?;
        if index == 0 {
            *shared.last_model.lock().expect("last model lock") = Some(engine_key.clone());
        }
        let counted = !warmup && !is_cold;
        runs.push(metrics);
        if counted {
            last_output = output;
        }
        index += 1;
        if let (Some(race), true) = (&race, counted) {
            let own = Stats::from_samples(
                runs.iter()
                    .filter(|m| !m.warmup && !m.cold && (job.include_short || !m.short_output))
                    .filter_map(|m| m.gen_tokens_per_s),
            );
            if let Some(own) = own {
                if own
                    .ci_half_width_pct()
                    .is_some_and(|p| p <= job.target_ci_pct())
                {
                    stop_reason = StopReason::Precision;
                    break;
                }
                if race.decided(&own) {
                    stop_reason = StopReason::Decided;
                    break;
                }
            }
        }
    }
    let summary = Summary::of(&runs, job.include_short);
    let median = |s: Option<bench_schemas::Stats>| s.map(|s| s.median);
    let source = runs
        .last()
        .map(|m| m.token_count_source)
        .expect("at least one run");
    Ok(Done {
        model: job.model.clone(),
        engine: backend.kind().to_string(),
        ttft_ms: median(summary.ttft_ms).unwrap_or(f64::NAN),
        gen_tokens: median(summary.gen_tokens).unwrap_or(0.0).round() as u64,
        gen_tokens_per_s: median(summary.gen_tokens_per_s),
        total_ms: median(summary.total_ms).unwrap_or(f64::NAN),
        token_count_source: source,
        pp_tokens_per_s: median(summary.pp_tokens_per_s),
        tg_tokens_per_s: median(summary.tg_tokens_per_s),
        shape: Some(shape),
        stop_reason,
        fingerprint: Some(fingerprint),
        cells: Vec::new(),
        repeats: runs,
        summary,
        output_text: last_output,
    })
}

/// Buffered text waiting to be published as one `llm_token`.
struct Batch {
    text: String,
    tokens: Option<u64>,
    t_ms: f64,
    flush_at: Option<Instant>,
}

impl Batch {
    /// Publishes the buffered text; a full event queue is [`QueueFull`] (the run then stops).
    fn flush(&mut self, ctx: &JobCtx, index: u32) -> Result<(), QueueFull> {
        if self.text.is_empty() {
            return Ok(());
        }
        ctx.emit(EventKind::LlmToken(Token {
            repeat_index: index,
            text: std::mem::take(&mut self.text),
            tokens: self.tokens.replace(0),
            t_ms: self.t_ms,
        }))?;
        self.flush_at = None;
        Ok(())
    }

    /// Publishes what is left before the run stops with `stop`; text that no longer fits
    /// turns the stop into `event_queue_full` (the stream would otherwise miss it silently).
    fn end(&mut self, ctx: &JobCtx, index: u32, shared: &Shared, stop: Stop) -> Stop {
        match self.flush(ctx, index) {
            Ok(()) => stop,
            Err(QueueFull) => event_queue_full(shared),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    req: GenRequest,
    spec: &RunSpec,
    ctx: &JobCtx,
    cancel: &CancellationToken,
    index: u32,
    warmup: bool,
) -> Result<RunOut, Stop> {
    let idle = shared.cfg.engine_idle_timeout;
    let cancelled = || Stop::Cancelled("cancel requested".into());
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
    let mut stream = tokio::select! {
        _ = cancel.cancelled() => return Err(cancelled()),
        r = tokio::time::timeout(idle, backend.generate(req)) => match r {
            Err(_) => return Err(Stop::Failed(ErrorBody::new(ErrorCode::Timeout, format!("the engine did not answer within {idle:?}")))),
            Ok(Err(e)) => return Err(Stop::Failed(e)),
            Ok(Ok(s)) => s,
        },
    };
    let mut measure = Measure::default();
    let mut output = String::new();
    let mut first_chunk: Option<Instant> = None;
    let mut last_chunk: Option<Instant> = None;
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
                return Err(batch.end(ctx, index, shared, cancelled()));
            }
            _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                batch.flush(ctx, index).map_err(|_| event_queue_full(shared))?;
            }
            next = tokio::time::timeout(idle, stream.next()) => {
                let now = Instant::now();
                match next {
                    Err(_) => {
                        let stop = Stop::Failed(ErrorBody::new(ErrorCode::Timeout, format!("the engine sent nothing for {idle:?}")));
                        return Err(batch.end(ctx, index, shared, stop));
                    }
                    Ok(None) => {
                        let stop = Stop::Failed(ErrorBody::new(ErrorCode::StreamBroken, "the engine stream ended without a final message"));
                        return Err(batch.end(ctx, index, shared, stop));
                    }
                    Ok(Some(Err(e))) => {
                        return Err(batch.end(ctx, index, shared, Stop::Failed(e)));
                    }
                    Ok(Some(Ok(Item::Final(report)))) => break (report, ms(now)),
                    Ok(Some(Ok(Item::Text { text, tokens, reasoning }))) => {
                        if text.is_empty() {
                            continue;
                        }
                        let t = ms(now);
                        first_chunk.get_or_insert(now);
                        last_chunk = Some(now);
                        measure.chunk(t, &text, tokens, reasoning);
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
                            // A full queue stops the run here: the engine's stream is never
                            // held up waiting for NATS.
                            batch.flush(ctx, index).map_err(|_| event_queue_full(shared))?;
                        }
                    }
                }
            }
        }
    };
    batch
        .flush(ctx, index)
        .map_err(|_| event_queue_full(shared))?;
    let (report, total_ms) = report;
    Ok(RunOut {
        metrics: measure.finish(index, warmup, total_ms, &report, spec),
        output,
        started: t0,
        ended: Instant::now(),
        decode: first_chunk.zip(last_chunk).filter(|(a, b)| b > a),
    })
}

/// One finished run.
struct RunOut {
    metrics: Metrics,
    output: String,
    /// Request sent.
    started: Instant,
    /// Final message read.
    ended: Instant,
    /// First to last content chunk, when they differ.
    decode: Option<(Instant, Instant)>,
}
