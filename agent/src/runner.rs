//! Runs queued jobs one at a time: warmups then measured repeats, each streamed from the engine,
//! timed on a monotonic clock, batched into `llm_token` events and closed with `repeat_done`;
//! then `job_done`, or `job_error` / `job_cancelled` at the first failure or cancel. An event
//! that finds the event queue full stops the run with `event_queue_full` at once (the engine's
//! stream is never held up by NATS); the final event always has its reserved slot.
//!
//! A matrix job runs its cells one at a time (or one measured repeat of each per round with
//! `order: interleaved`), each closed by `cell_done`; a cell that cannot run (its model is not
//! here, the engine failed it) is reported failed and the next one runs. A load cell runs its
//! warmups alone, then `concurrency` closed-loop streams at once.

use crate::backend::{DynBackend, GenRequest, Item};
use crate::emit::JobCtx;
use crate::measure::{Measure, RunSpec};
use crate::publisher::{now_ms, QueueFull};
use crate::race::RaceWatch;
use crate::shape::Shaper;
use crate::telemetry::sampler::Session;
use crate::Shared;
use bench_schemas::event::{Cancelled, Done, Failed, Started, StopReason, Token};
use bench_schemas::{
    CacheMode, Cell, CellResult, CellStatus, ErrorBody, ErrorCode, EventKind, Fingerprint, Job,
    Load, Metrics, Order, Repeat, StartMode, Stats, Summary,
};
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
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

    /// Whether the whole job ends here (a cancel, a full event queue) rather than one cell.
    fn ends_job(&self) -> bool {
        match &self.stop {
            Stop::Cancelled(_) => true,
            Stop::Failed(e) => e.code == ErrorCode::EventQueueFull,
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

/// The backend kinds a job's cells use, each once, in a fixed order (so leases are always
/// taken in the same order).
fn engine_kinds(shared: &Shared, job: &Job) -> Vec<&'static str> {
    if job.matrix.is_none() {
        return shared
            .backend_for(job)
            .map(|b| b.kind())
            .into_iter()
            .collect();
    }
    let mut kinds: Vec<&'static str> = job
        .cells()
        .iter()
        .filter_map(|c| shared.backend_for(&c.job).ok())
        .map(|b| b.kind())
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
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
        {
            // Nothing else talks to the engines while they run a benchmark (model lists come
            // from the cache meanwhile); waits for a list request already under way.
            let mut leases = Vec::new();
            for kind in engine_kinds(&shared, &q.job) {
                leases.push(shared.models.lease(kind).await);
            }
            run_job(&shared, &q.job, &q.ctx, &q.cancel).await;
        }
        shared.queue.finish(&job_id);
    }
}

async fn run_job(shared: &Shared, job: &Job, ctx: &Arc<JobCtx>, cancel: &CancellationToken) {
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
    let result = run_cells(shared, job, ctx, cancel, session.as_ref()).await;
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

/// What the cells of one job share while it runs.
struct JobRun<'a> {
    shared: &'a Shared,
    ctx: &'a JobCtx,
    cancel: &'a CancellationToken,
    session: Option<&'a Session>,
    /// The next `repeat_index`: unique over the whole job, cells included.
    next_index: AtomicU32,
    /// A matrix or load job: its cells are reported (`cell_done`) and one failing is not the end.
    by_cell: bool,
}

impl JobRun<'_> {
    fn take_index(&self) -> u32 {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }
}

async fn run_cells(
    shared: &Shared,
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
    let cells = job.cells();
    let run = JobRun {
        shared,
        ctx,
        cancel,
        session,
        next_index: AtomicU32::new(0),
        by_cell: !cells[0].key.is_empty() || job.is_load(),
    };
    let mut results: Vec<(CellResult, Option<CellRun>)> = Vec::with_capacity(cells.len());
    let mut first = true;
    let interleaved = job.order == Order::Interleaved && cells.len() > 1;
    // Sequential: prepare and run each cell in turn. Interleaved: prepare them all, then
    // rounds of one measured repeat each (a load cell runs whole in the first round).
    let mut pending: Vec<CellRun> = Vec::new();
    for cell in cells {
        let prepared = CellRun::prepare(&run, cell.clone(), std::mem::take(&mut first)).await;
        let mut c = match prepared {
            Ok(c) => c,
            Err(e) if e.ends_job() || !run.by_cell => return Err(e),
            Err(e) => {
                let failed = cell_failed(&cell, e, None);
                run.emit_cell(&failed)?;
                results.push((failed, None));
                continue;
            }
        };
        if interleaved {
            pending.push(c);
            continue;
        }
        let outcome = if c.job.is_load() {
            c.run_load(&run).await
        } else {
            c.run_all(&run).await
        };
        let result = run.close_cell(&mut c, outcome)?;
        results.push((result, Some(c)));
    }
    if interleaved {
        let mut active: Vec<Option<CellRun>> = pending.into_iter().map(Some).collect();
        let mut outcomes: Vec<Option<Result<(), Early>>> =
            (0..active.len()).map(|_| None).collect();
        loop {
            let mut any = false;
            for (i, slot) in active.iter_mut().enumerate() {
                let Some(c) = slot.as_mut() else { continue };
                if outcomes[i].is_some() {
                    continue;
                }
                any = true;
                let step = if c.job.is_load() {
                    c.run_load(&run).await.map(|()| false)
                } else {
                    c.step(&run).await
                };
                match step {
                    Ok(true) => {}
                    Ok(false) => outcomes[i] = Some(Ok(())),
                    Err(e) if e.ends_job() => return Err(e),
                    Err(e) => outcomes[i] = Some(Err(e)),
                }
            }
            if !any {
                break;
            }
        }
        for (slot, outcome) in active.iter_mut().zip(outcomes) {
            let mut c = slot.take().expect("every prepared cell");
            let result = run.close_cell(&mut c, outcome.expect("every cell ended"))?;
            results.push((result, Some(c)));
        }
        // Reported in cell order, as the job lists them.
        let order: Vec<String> = job.cells().into_iter().map(|c| c.key).collect();
        results.sort_by_key(|(r, _)| order.iter().position(|k| *k == r.cell));
    }
    run.done(job, results)
}

/// The result of a cell that could not run or stopped.
fn cell_failed(cell: &Cell, e: Early, fingerprint_id: Option<String>) -> CellResult {
    let error = match e.stop {
        Stop::Failed(e) => e,
        Stop::Cancelled(reason) => ErrorBody::new(ErrorCode::Internal, reason),
    };
    CellResult {
        cell: cell.key.clone(),
        values: cell.values.clone(),
        status: CellStatus::Failed,
        error: Some(error),
        summary: None,
        load: None,
        stop_reason: StopReason::Count,
        fingerprint_id,
        repeat_range: None,
    }
}

impl JobRun<'_> {
    fn emit_cell(&self, result: &CellResult) -> Result<(), Early> {
        if !self.by_cell {
            return Ok(());
        }
        self.ctx
            .emit(EventKind::CellDone(result.clone()))
            .map(|_| ())
            .map_err(|_| Early::at(event_queue_full(self.shared), None))
    }

    /// Ends a cell that ran: its result, published as `cell_done` in a matrix job. An error
    /// that ends the job, or any error of a job without a matrix, is passed on.
    fn close_cell(&self, c: &mut CellRun, outcome: Result<(), Early>) -> Result<CellResult, Early> {
        c.race = None;
        let result = match outcome {
            Ok(()) => c.result(),
            Err(e) if e.ends_job() || !self.by_cell => return Err(e),
            Err(e) => {
                tracing::warn!(job_id = %self.ctx.job_id, cell = %c.cell.key, "cell failed");
                let mut r = cell_failed(&c.cell, e, Some(c.fingerprint.fingerprint_id.clone()));
                r.repeat_range = c.range();
                r
            }
        };
        self.emit_cell(&result)?;
        Ok(result)
    }

    /// `job_done` from every cell's result; a job whose every cell failed is a `job_error`
    /// with the first cell's error.
    fn done(&self, job: &Job, results: Vec<(CellResult, Option<CellRun>)>) -> Result<Done, Early> {
        let lead = results
            .iter()
            .position(|(r, c)| r.status == CellStatus::Done && c.is_some());
        let Some(lead) = lead else {
            let first = results
                .first()
                .and_then(|(r, _)| r.error.clone())
                .unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "the job has no cells"));
            let n = results.len();
            return Err(Early::at(
                Stop::Failed(ErrorBody::new(
                    first.code,
                    format!("every cell failed ({n}); the first: {}", first.message),
                )),
                None,
            ));
        };
        let mut repeats = Vec::new();
        let mut last_output = String::new();
        for (_, c) in &results {
            if let Some(c) = c {
                repeats.extend(c.runs.iter().cloned());
                if !c.last_output.is_empty() {
                    last_output = c.last_output.clone();
                }
            }
        }
        // In the order they ran (interleaved cells alternate).
        repeats.sort_by_key(|m| m.repeat_index);
        let (lead_result, lead_cell) = &results[lead];
        let lead_cell = lead_cell.as_ref().expect("checked");
        let summary = Summary::of(&lead_cell.runs, job.include_short);
        let median = |s: Option<Stats>| s.map(|s| s.median);
        let source = lead_cell
            .runs
            .last()
            .map(|m| m.token_count_source)
            .expect("a finished cell has runs");
        Ok(Done {
            model: lead_cell.job.model.clone(),
            engine: lead_cell.backend.kind().to_string(),
            ttft_ms: median(summary.ttft_ms).unwrap_or(f64::NAN),
            gen_tokens: median(summary.gen_tokens).unwrap_or(0.0).round() as u64,
            gen_tokens_per_s: median(summary.gen_tokens_per_s),
            total_ms: median(summary.total_ms).unwrap_or(f64::NAN),
            token_count_source: source,
            pp_tokens_per_s: median(summary.pp_tokens_per_s),
            tg_tokens_per_s: median(summary.tg_tokens_per_s),
            shape: Some(lead_cell.job.shape()),
            stop_reason: lead_result.stop_reason,
            fingerprint: Some(lead_cell.fingerprint.clone()),
            cells: if self.by_cell {
                results.into_iter().map(|(r, _)| r).collect()
            } else {
                Vec::new()
            },
            repeats,
            summary,
            output_text: last_output,
        })
    }
}

/// One cell of the job as this machine runs it: its engine, prompt builder and runs.
struct CellRun {
    cell: Cell,
    job: Job,
    backend: DynBackend,
    fingerprint: Fingerprint,
    shaper: Shaper,
    race: Option<RaceWatch>,
    engine_key: (String, String),
    /// The next run is the first after a model load.
    cold_pending: bool,
    /// Whether the cell's first run has started (it carries the fingerprint).
    started: bool,
    warmups_left: u32,
    measured: u32,
    runs: Vec<Metrics>,
    last_output: String,
    stop_reason: StopReason,
    load: Option<Load>,
}

impl CellRun {
    /// Everything before the first run: the engine and model described (engine leased, idle),
    /// a `together` start waited for (`first` cell only), the race followed, the prompt
    /// prepared, and whether the model is loaded.
    async fn prepare(run: &JobRun<'_>, cell: Cell, first: bool) -> Result<Self, Early> {
        let (shared, cancel) = (run.shared, run.cancel);
        let job = cell.job.clone();
        let failed = |e: ErrorBody| Early::at(Stop::Failed(e), None);
        let backend = shared.backend_for(&job).map_err(failed)?;
        if run.by_cell {
            // Checked at intake for the job as a whole; each cell's model here (the list comes
            // from the cache while the engine is leased).
            shared
                .models
                .check(&*backend, &shared.cfg.llm_models, &job.model)
                .await
                .map_err(failed)?;
        }
        // What the runs are measured on, asked now that the engine is leased to this job and
        // idle (before a `together` start, so the start time is kept).
        let described = tokio::select! {
            _ = cancel.cancelled() => {
                return Err(Early::at(Stop::Cancelled("cancelled before start".into()), None));
            }
            d = shared.described.refresh(&*backend, &job.model, shared.cfg.engine_idle_timeout) => d,
        };
        // Mostly what the engine said before: then the fingerprint job_accepted carried.
        let fingerprint = match shared
            .described
            .fingerprint_of(&shared.hardware, &*backend, &job)
        {
            Some(f) if f.engine == described.0 && f.model == described.1 => f,
            _ => crate::fingerprint::fingerprint(&shared.hardware, described.0, described.1, &job),
        };
        if first && job.start == StartMode::Together {
            if let Some(at) = job.start_at_ms {
                let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                tokio::select! {
                    _ = cancel.cancelled() => {
                        return Err(Early::at(Stop::Cancelled("cancelled before start".into()), None));
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                if job.expires_at.is_some_and(|t| t < now_ms()) {
                    return Err(failed(ErrorBody::new(
                        ErrorCode::Expired,
                        "the job expired before its start time",
                    )));
                }
            }
        }
        let ctx = run.ctx;
        let key = (!cell.key.is_empty()).then(|| cell.key.clone());
        // Follow the race from the start, so that every racer that shows up is waited for.
        let race = match job.repeat {
            Repeat::Auto => Some(
                RaceWatch::start(
                    &shared.client,
                    &ctx.job_id,
                    &ctx.machine_id,
                    &ctx.run_id,
                    job.include_short,
                    key,
                )
                .await
                .map_err(|e| {
                    failed(ErrorBody::new(
                        ErrorCode::Internal,
                        format!(
                            "cannot follow the race on {}: {e}",
                            bench_schemas::subjects::events(&ctx.job_id)
                        ),
                    ))
                })?,
            ),
            Repeat::Count(_) => None,
        };
        let idle = shared.cfg.engine_idle_timeout;
        // Unmeasured preparation (tokenizer calls, probes, the depth prefix), bounded and
        // cancellable like a run.
        let prepare = async {
            let shaper = Shaper::prepare(&*backend, &job).await?;
            shaper.prime(&*backend, &job).await?;
            Ok::<_, ErrorBody>(shaper)
        };
        let shaper = tokio::select! {
            _ = cancel.cancelled() => {
                return Err(Early::at(Stop::Cancelled("cancelled while preparing the prompt".into()), None));
            }
            r = tokio::time::timeout(idle, prepare) => match r {
                Err(_) => return Err(failed(ErrorBody::new(ErrorCode::Timeout, format!("preparing the prompt took longer than {idle:?}")))),
                Ok(r) => r.map_err(failed)?,
            },
        };
        let engine_key = (backend.base_url().to_string(), job.model.clone());
        let cold = is_cold(shared, &*backend, &job.model, &engine_key, cancel).await?;
        Ok(Self {
            warmups_left: job.warmup,
            cell,
            job,
            backend,
            fingerprint,
            shaper,
            race,
            engine_key,
            cold_pending: cold,
            started: false,
            measured: 0,
            runs: Vec::new(),
            last_output: String::new(),
            stop_reason: StopReason::Count,
            load: None,
        })
    }

    /// First and last repeat index of its runs.
    fn range(&self) -> Option<(u32, u32)> {
        Some((
            self.runs.first()?.repeat_index,
            self.runs.last()?.repeat_index,
        ))
    }

    fn result(&self) -> CellResult {
        CellResult {
            cell: self.cell.key.clone(),
            values: self.cell.values.clone(),
            status: CellStatus::Done,
            error: None,
            summary: Some(Summary::of(&self.runs, self.job.include_short)),
            load: self.load.clone(),
            stop_reason: self.stop_reason,
            fingerprint_id: Some(self.fingerprint.fingerprint_id.clone()),
            repeat_range: self.range(),
        }
    }

    /// Runs every repeat of the cell.
    async fn run_all(&mut self, run: &JobRun<'_>) -> Result<(), Early> {
        while self.step(run).await? {}
        Ok(())
    }

    /// The next measured repeat, after the unmeasured runs due before it (a cold run, the
    /// warmups). False once the cell has run all it needs.
    async fn step(&mut self, run: &JobRun<'_>) -> Result<bool, Early> {
        let shared = run.shared;
        // Interleaved with other models: a model the engine says it unloaded meanwhile loads
        // again, and that run is cold (an engine that cannot say serves its models as loaded).
        let last = shared.last_model.lock().expect("last model lock").clone();
        if self.started && last.as_ref() != Some(&self.engine_key) {
            let loaded =
                engine_says_loaded(shared, &*self.backend, &self.job.model, run.cancel).await?;
            self.cold_pending |= loaded == Some(false);
        }
        loop {
            let max = self.job.max_repeat();
            if self.measured >= max && !self.cold_pending && self.warmups_left == 0 {
                if self.job.repeat == Repeat::Auto {
                    self.stop_reason = StopReason::MaxRepeat;
                }
                return Ok(false);
            }
            let (counted, output) = self.run_next(run).await?;
            if !counted {
                continue;
            }
            self.last_output = output;
            self.measured += 1;
            if let Some(race) = &self.race {
                let own = Stats::from_samples(
                    self.runs
                        .iter()
                        .filter(|m| {
                            !m.warmup && !m.cold && (self.job.include_short || !m.short_output)
                        })
                        .filter_map(|m| m.gen_tokens_per_s),
                );
                if let Some(own) = own {
                    if own
                        .ci_half_width_pct()
                        .is_some_and(|p| p <= self.job.target_ci_pct())
                    {
                        self.stop_reason = StopReason::Precision;
                        return Ok(false);
                    }
                    if race.decided(&own) {
                        self.stop_reason = StopReason::Decided;
                        return Ok(false);
                    }
                }
            }
            if self.measured >= max {
                if self.job.repeat == Repeat::Auto {
                    self.stop_reason = StopReason::MaxRepeat;
                }
                return Ok(false);
            }
            return Ok(true);
        }
    }

    /// The next run due, from `job_started` to `repeat_done`: the cold one, else a warmup,
    /// else a measured one. Whether it was measured, and its text.
    async fn run_next(&mut self, run: &JobRun<'_>) -> Result<(bool, String), Early> {
        let is_cold = std::mem::take(&mut self.cold_pending);
        let warmup = self.warmups_left > 0;
        if warmup {
            self.warmups_left -= 1;
        }
        let index = run.take_index();
        let (prompt, spec) = self.next_prompt(index, is_cold).await?;
        let first = !self.started;
        let (metrics, output) = self
            .send(run, index, warmup, is_cold, first, prompt, spec, None, None)
            .await?;
        self.started = true;
        self.runs.push(metrics);
        Ok((!warmup && !is_cold, output))
    }

    /// The prompt of run `index` and what it should show.
    async fn next_prompt(&mut self, index: u32, is_cold: bool) -> Result<(String, RunSpec), Early> {
        let (prompt, mut spec) = self
            .shaper
            .prompt(&*self.backend, index)
            .await
            .map_err(|e| Early::at(Stop::Failed(e), index))?;
        let shape = self.job.shape();
        spec.cold = is_cold;
        spec.fixed_output = shape.ignore_eos.then_some(shape.max_tokens);
        Ok((prompt, spec))
    }

    /// Sends one prepared prompt and measures it (`first`: the cell's first run, which carries
    /// its fingerprint; `load`: its stream and when the load began).
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        run: &JobRun<'_>,
        index: u32,
        warmup: bool,
        is_cold: bool,
        first: bool,
        prompt: String,
        spec: RunSpec,
        load: Option<(u32, Instant)>,
        itl: Option<&Mutex<Vec<f64>>>,
    ) -> Result<(Metrics, String), Early> {
        let (shared, ctx, job) = (run.shared, run.ctx, &self.job);
        let shape = job.shape();
        let full = |_| Early::at(event_queue_full(shared), index);
        let failed = |e| Early::at(Stop::Failed(e), index);
        let mut req = GenRequest::from(job);
        req.prompt = prompt;
        req.raw = self.shaper.shaped();
        req.cache_prompt = if job.cache == CacheMode::Warm || shape.depth > 0 {
            Some(true)
        } else if self.shaper.shaped() {
            Some(false)
        } else {
            None
        };
        let cell = (!self.cell.key.is_empty()).then(|| self.cell.key.clone());
        ctx.emit(EventKind::JobStarted(Started {
            repeat_index: index,
            warmup,
            cold: is_cold,
            fingerprint: first.then(|| self.fingerprint.clone()),
            cell: cell.clone(),
            stream: load.map(|l| l.0),
        }))
        .map_err(full)?;
        if load.is_none() {
            if let Some(s) = run.session {
                s.set_repeat(Some(index));
            }
        }
        let out = run_once(
            shared,
            &*self.backend,
            req,
            &spec,
            ctx,
            run.cancel,
            index,
            warmup,
        )
        .await;
        if load.is_none() {
            if let Some(s) = run.session {
                s.set_repeat(None);
            }
        }
        let RunOut {
            mut metrics,
            output,
            started,
            ended,
            decode,
            itl: gaps,
        } = out.map_err(|stop| Early::at(stop, index))?;
        metrics.cell = cell;
        if let Some((stream, began)) = load {
            metrics.stream = Some(stream);
            metrics.start_ms = Some(started.duration_since(began).as_secs_f64() * 1000.0);
            if let Some(itl) = itl {
                if !warmup && !is_cold {
                    itl.lock().expect("itl lock").extend(gaps);
                }
            }
        } else if let Some(s) = run.session {
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
            self.shaper
                .check(metrics.prompt_tokens, metrics.prompt_evaluated)
                .map_err(failed)?;
        }
        ctx.emit(EventKind::RepeatDone(metrics.clone()))
            .map_err(full)?;
        if first || load.is_none() {
            *shared.last_model.lock().expect("last model lock") = Some(self.engine_key.clone());
        }
        Ok((metrics, output))
    }

    /// A load cell: its unmeasured runs alone, then `concurrency` closed-loop streams, each
    /// sending its next request as soon as the previous one ends, for `requests` each (or
    /// until `duration_s` is over, at most `max_runs` requests in all). Every prompt is built
    /// before the load starts, so tokenizer calls never sit between a stream's requests.
    async fn run_load(&mut self, run: &JobRun<'_>) -> Result<(), Early> {
        while self.cold_pending || self.warmups_left > 0 {
            self.run_next(run).await?;
        }
        let c = self.job.concurrency.unwrap_or(1);
        let total = match self.job.duration_s {
            Some(_) => run.shared.cfg.limits.max_runs,
            None => c * self.job.requests_per_stream(),
        };
        let mut prompts = Vec::with_capacity(total as usize);
        // Up to max_runs prompts, each perhaps a few tokenizer calls: cancellable and bounded
        // like a run, so a cancel (or a stalled engine) is not held up until all are built.
        let idle = run.shared.cfg.engine_idle_timeout;
        for _ in 0..total {
            let index = run.next_index.load(Ordering::Relaxed) + prompts.len() as u32;
            let built = tokio::select! {
                _ = run.cancel.cancelled() => {
                    return Err(Early::at(Stop::Cancelled("cancel requested".into()), None));
                }
                r = tokio::time::timeout(idle, self.next_prompt(index, false)) => match r {
                    Err(_) => {
                        let e = ErrorBody::new(
                            ErrorCode::Timeout,
                            format!("building a load prompt took longer than {idle:?}"),
                        );
                        return Err(Early::at(Stop::Failed(e), None));
                    }
                    Ok(r) => r?,
                },
            };
            prompts.push(built);
        }
        let prompts = Mutex::new(prompts.into_iter());
        let runs = Mutex::new(Vec::<(Metrics, String)>::new());
        let itl = Mutex::new(Vec::<f64>::new());
        let began = Instant::now();
        let deadline = self
            .job
            .duration_s
            .map(|d| began + Duration::from_secs(u64::from(d)));
        let per_stream = self.job.requests_per_stream();
        // Without warmups the first request of the load is the cell's first run: whichever
        // stream sends it carries the fingerprint.
        let first = AtomicBool::new(!self.started);
        let this = &*self;
        let stream = |s: u32| {
            let (prompts, runs, itl, first) = (&prompts, &runs, &itl, &first);
            async move {
                let mut sent = 0u32;
                loop {
                    if deadline.map_or(sent >= per_stream, |d| Instant::now() >= d) {
                        return Ok::<_, Early>(());
                    }
                    let next = prompts.lock().expect("prompts lock").next();
                    let Some((prompt, spec)) = next else {
                        return Ok(());
                    };
                    let index = run.take_index();
                    let out = this
                        .send(
                            run,
                            index,
                            false,
                            false,
                            first.swap(false, Ordering::Relaxed),
                            prompt,
                            spec,
                            Some((s, began)),
                            Some(itl),
                        )
                        .await?;
                    runs.lock().expect("runs lock").push(out);
                    sent += 1;
                }
            }
        };
        let outcome = futures::future::try_join_all((0..c).map(stream)).await;
        self.started = true;
        // The requests that finished are the cell's runs even when a stream failed (their
        // repeat_done went out): the failed cell's repeat_range covers them.
        let mut done = runs.into_inner().expect("runs lock");
        done.sort_by_key(|(m, _)| m.repeat_index);
        if let Some((_, text)) = done.last() {
            self.last_output = text.clone();
        }
        self.runs.extend(done.into_iter().map(|(m, _)| m));
        outcome?;
        self.measured = self.runs.iter().filter(|m| !m.warmup && !m.cold).count() as u32;
        let measured: Vec<&Metrics> = self
            .runs
            .iter()
            .filter(|m| !m.warmup && !m.cold && m.stream.is_some())
            .collect();
        self.load = Load::of(c, &measured, &itl.into_inner().expect("itl lock"));
        Ok(())
    }
}

/// Whether the engine has the model loaded, when it can say (bounded like every engine call,
/// cancellable).
async fn engine_says_loaded(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    model: &str,
    cancel: &CancellationToken,
) -> Result<Option<bool>, Early> {
    let idle = shared.cfg.engine_idle_timeout;
    tokio::select! {
        _ = cancel.cancelled() => Err(Early::at(Stop::Cancelled("cancel requested".into()), None)),
        r = tokio::time::timeout(idle, backend.model_loaded(model)) => Ok(r.ok().flatten()),
    }
}

/// Whether the next request to this model is its first after a load: the engine says when
/// it can (bounded like every engine call), else whether another model ran last.
async fn is_cold(
    shared: &Shared,
    backend: &dyn crate::backend::Backend,
    model: &str,
    engine_key: &(String, String),
    cancel: &CancellationToken,
) -> Result<bool, Early> {
    Ok(
        match engine_says_loaded(shared, backend, model, cancel).await? {
            Some(loaded) => !loaded,
            None => shared.last_model.lock().expect("last model lock").as_ref() != Some(engine_key),
        },
    )
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
        itl: measure.itl_gaps(&report),
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
    /// Every inter-token gap, ms (kept by load cells for their ITL percentiles).
    itl: Vec<f64>,
}
