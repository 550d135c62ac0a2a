// The state of one job as the page sees it, built from central's snapshot (GET /api/jobs/{id})
// and the job's event stream. Pure: no DOM, so node's test runner checks it directly.
//
// Runs: every acceptance of the job on a machine is a run with its own `run_id` (a re-used job id
// is a new run). The first event of a new run starts the machine's pane afresh and remembers the
// old run; events of a run the machine has moved past are dropped.
//
// De-duplication: `seq` is 1-based and gapless per run, so an event whose seq is not above the
// last one applied for its run has been seen already (an SSE replay after a reconnect, or the
// snapshot already covering it) and is dropped. Text is never doubled.

export const TERMINAL = new Set(['job_done', 'job_error', 'job_cancelled']);

export function newJob(jobId) {
  return {
    job_id: jobId,
    status: 'running',
    source: null,
    created_ms: null,
    job: null, // the schemas Job
    machines: new Map(), // machine_id -> machine state
    ranking: null, // from central, when it has one
    cells: null, // a matrix job: central's cells (rows of the matrix table), else null
    sweeps: null, // a matrix job: central's concurrency sweeps
    ended: false,
  };
}

export function newMachine(id) {
  return {
    machine_id: id,
    label: null,
    engine: null,
    status: 'queued', // queued | running | done | failed | cancelled | rejected | offline
    runId: '', // the run shown
    earlierRuns: [], // run ids this machine has moved past, oldest first
    refused: null, // {code, message} of the last refused re-submission
    lastSeq: 0,
    run: null, // {index, warmup, cold} of the run streaming now
    text: '', // output of the current (or, when done, the last measured) run
    live: null, // {firstT, lastT, firstTokens, tokens, chunks, exact} of the current run
    repeats: [], // schemas Metrics, by repeat_index
    summary: null, // schemas Summary from job_done
    stopReason: null, // job_done's stop_reason: count | precision | decided | max_repeat
    shape: null, // job_done's shape: {prompt_tokens, depth, max_tokens, ignore_eos}
    error: null, // {code, message}
    fingerprint: null, // schemas Fingerprint: newest of job_accepted, the first job_started, job_done
    previous: null, // central's comparison with this machine's previous job ({job_id, same, changes})
    samples: [], // the last TELEMETRY_KEPT telemetry samples of this run, oldest first
    cellResults: new Map(), // matrix cell key -> schemas CellResult (cell_done, job_done.cells)
    regression: null, // central's comparison with this machine's newest earlier job of the same setup
  };
}

/** Telemetry samples kept per machine for the sparklines (60 s at 4 Hz). */
export const TELEMETRY_KEPT = 240;

/** Keeps one telemetry sample (bounded: the oldest go). */
export function pushSample(m, sample) {
  m.samples.push(sample);
  if (m.samples.length > TELEMETRY_KEPT) m.samples.splice(0, m.samples.length - TELEMETRY_KEPT);
}

export function machine(state, id) {
  let m = state.machines.get(id);
  if (!m) {
    m = newMachine(id);
    state.machines.set(id, m);
  }
  return m;
}

function upsertRepeat(m, metrics) {
  const i = m.repeats.findIndex((r) => r.repeat_index === metrics.repeat_index);
  if (i >= 0) m.repeats[i] = metrics;
  else m.repeats.push(metrics);
  m.repeats.sort((a, b) => a.repeat_index - b.repeat_index);
}

/**
 * Applies central's job document. With `withText` (a finished job) its outputs and last_seq
 * are taken as they are; for a running job only the metadata is taken and the text is rebuilt
 * from the replayed stream, which starts at the job's first event.
 */
export function applySnapshot(state, doc, { withText = false } = {}) {
  state.status = doc.status ?? state.status;
  state.source = doc.source ?? state.source;
  state.created_ms = doc.created_ms ?? state.created_ms;
  if (doc.job) state.job = doc.job;
  if (Array.isArray(doc.ranking)) state.ranking = doc.ranking;
  if (Array.isArray(doc.cells)) state.cells = doc.cells;
  if (Array.isArray(doc.sweeps)) state.sweeps = doc.sweeps;
  for (const dm of doc.machines ?? []) {
    const m = machine(state, dm.machine_id);
    if (dm.label) m.label = dm.label;
    if (dm.engine) m.engine = dm.engine;
    if (Array.isArray(dm.earlier_runs)) {
      for (const r of dm.earlier_runs) if (r?.run_id && !m.earlierRuns.includes(r.run_id)) m.earlierRuns.push(r.run_id);
    }
    if (dm.refused) m.refused = dm.refused;
    if (dm.fingerprint && (!m.fingerprint || withText || m.lastSeq === 0)) m.fingerprint = dm.fingerprint;
    if (dm.previous !== undefined) m.previous = dm.previous;
    if (dm.regression !== undefined) m.regression = dm.regression;
    if (Array.isArray(dm.cells) && (withText || m.lastSeq === 0 || (dm.run_id ?? '') === m.runId)) {
      for (const c of dm.cells) if (c?.cell !== undefined && !m.cellResults.has(c.cell)) m.cellResults.set(c.cell, c);
    }
    if (dm.run_id && dm.run_id !== m.runId && m.lastSeq === 0) m.runId = dm.run_id;
    if (withText || m.lastSeq === 0) {
      if (dm.status) m.status = dm.status;
      if (dm.error) m.error = dm.error;
    }
    if (withText && dm.run_id && dm.run_id !== m.runId && !m.earlierRuns.includes(dm.run_id)) {
      // The snapshot is of a newer run than the events applied so far.
      if (m.runId) m.earlierRuns.push(m.runId);
      m.runId = dm.run_id;
      m.lastSeq = 0;
    }
    if (withText && (dm.run_id ?? '') === m.runId && (dm.last_seq ?? 0) >= m.lastSeq) {
      m.lastSeq = dm.last_seq ?? m.lastSeq;
      m.text = dm.output_text ?? m.text;
      if (Array.isArray(dm.repeats)) m.repeats = dm.repeats.slice().sort((a, b) => a.repeat_index - b.repeat_index);
      m.summary = dm.summary ?? m.summary;
      m.stopReason = dm.stop_reason ?? m.stopReason;
      m.shape = dm.shape ?? m.shape;
      m.run = null;
      m.live = null;
    }
  }
  return state;
}

/**
 * Applies one event envelope. Returns the machine state it changed, or null when the event
 * was a duplicate or belongs to another job.
 */
export function applyEvent(state, ev) {
  if (!ev || ev.job_id !== state.job_id || typeof ev.machine_id !== 'string') return null;
  const m = machine(state, ev.machine_id);
  const p = ev.payload ?? {};
  const runId = ev.run_id ?? '';
  if (ev.seq === 0) {
    // A refusal belongs to no run: after a run it is a refused re-submission beside it.
    if (ev.type !== 'job_error') return null;
    if (m.runId) {
      m.refused = { code: p.code ?? 'error', message: p.message ?? '' };
      return m;
    }
    if (m.lastSeq > 0 || ['failed', 'rejected'].includes(m.status)) return null;
    m.status = 'rejected';
    m.error = { code: p.code ?? 'error', message: p.message ?? '' };
    return m;
  }
  if (runId !== m.runId) {
    if (m.earlierRuns.includes(runId)) return null;
    if (m.runId) m.earlierRuns.push(m.runId);
    const fresh = newMachine(m.machine_id);
    Object.assign(m, fresh, { label: m.label, engine: m.engine, earlierRuns: m.earlierRuns, refused: m.refused, regression: m.regression, runId });
  }
  if (!(ev.seq > m.lastSeq)) return null;
  m.lastSeq = ev.seq;
  if (p.fingerprint && ['job_accepted', 'job_started', 'job_done'].includes(ev.type)) m.fingerprint = p.fingerprint;
  switch (ev.type) {
    case 'job_accepted':
      if (p.label) m.label = p.label;
      if (p.engine) m.engine = p.engine;
      if (p.job && !state.job) state.job = p.job;
      if (['offline', 'rejected', 'failed'].includes(m.status) && !m.repeats.length) {
        m.status = 'queued';
        m.error = null;
      }
      break;
    case 'job_started':
      m.status = 'running';
      m.run = { index: p.repeat_index, warmup: !!p.warmup, cold: !!p.cold };
      if (p.cell !== undefined) m.run.cell = p.cell;
      m.text = '';
      m.live = null;
      break;
    case 'llm_token': {
      if (!m.run || m.run.index !== p.repeat_index) {
        m.run = { index: p.repeat_index, warmup: false, cold: false };
        m.text = '';
        m.live = null;
      }
      m.status = 'running';
      m.text += p.text ?? '';
      const toks = Number.isFinite(p.tokens) ? p.tokens : null;
      const chars = (p.text ?? '').length;
      if (!m.live) {
        m.live = { firstT: p.t_ms, lastT: p.t_ms, firstTokens: toks ?? 0, tokens: toks ?? 0, firstChars: chars, chars, chunks: 1, exact: toks !== null };
      } else {
        m.live.lastT = p.t_ms;
        m.live.tokens += toks ?? 0;
        m.live.chars += chars;
        m.live.chunks += 1;
        if (toks === null) m.live.exact = false;
      }
      break;
    }
    case 'repeat_done':
      upsertRepeat(m, p);
      break;
    case 'telemetry':
      pushSample(m, p);
      break;
    case 'cell_done':
      if (typeof p.cell === 'string') m.cellResults.set(p.cell, p);
      break;
    case 'job_done':
      m.status = 'done';
      if (Array.isArray(p.repeats)) m.repeats = p.repeats.slice().sort((a, b) => a.repeat_index - b.repeat_index);
      m.summary = p.summary ?? null;
      m.stopReason = p.stop_reason ?? null;
      m.shape = p.shape ?? null;
      if (typeof p.output_text === 'string') m.text = p.output_text;
      if (p.engine) m.engine = p.engine;
      for (const c of Array.isArray(p.cells) ? p.cells : []) if (typeof c?.cell === 'string') m.cellResults.set(c.cell, c);
      m.run = null;
      break;
    case 'job_error':
      m.status = 'failed';
      m.error = { code: p.code ?? 'error', message: p.message ?? '' };
      m.run = null;
      break;
    case 'job_cancelled':
      m.status = 'cancelled';
      m.error = { code: 'cancelled', message: p.reason ?? 'cancelled' };
      m.run = null;
      break;
    default:
      break;
  }
  return m;
}

/** Characters per token assumed when the engine does not count tokens per chunk (a rough English average). */
export const CHARS_PER_TOKEN = 4;

/** Tokens streamed so far in the current run: the engine's count, or an estimate from characters (`exact` false). */
export function liveTokens(m) {
  const l = m.live;
  if (!l) return null;
  return l.exact ? l.tokens : l.chars / CHARS_PER_TOKEN;
}

/**
 * Live decode rate of the run streaming now: tokens after the first batch over the time since it.
 * Estimated from characters when the engine gives no per-chunk counts (then `m.live.exact` is false).
 */
export function liveRate(m) {
  const l = m.live;
  if (!l || !(l.lastT > l.firstT)) return null;
  const after = l.exact ? l.tokens - l.firstTokens : (l.chars - l.firstChars) / CHARS_PER_TOKEN;
  return (after * 1000) / (l.lastT - l.firstT);
}

/** Fewest samples with a 95% interval of the median (schemas::metrics::MIN_CI_SAMPLES). */
export const MIN_CI_SAMPLES = 6;

/**
 * The exact 95% confidence interval of the median of n sorted samples, as 0-based indices
 * [lo, hi]: the order statistics x(k) and x(n+1-k) with the largest k such that
 * P(Binomial(n, 1/2) < k) <= 2.5%. A port of schemas::metrics::median_ci, step for step
 * (log space, so it stays finite at any n). null below MIN_CI_SAMPLES.
 */
export function medianCi(n) {
  if (!(n >= MIN_CI_SAMPLES)) return null;
  const lnHalfN = n * Math.log(0.5);
  let lnC = 0; // ln C(n, j)
  let cdf = 0;
  let k = 0; // largest k with P(B <= k-1) <= 0.025
  for (let j = 0; j < n; j++) {
    if (j > 0) lnC += Math.log(n - j + 1) - Math.log(j);
    cdf += Math.exp(lnC + lnHalfN);
    if (cdf <= 0.025) k = j + 1;
    else break;
  }
  k = Math.max(k, 1);
  return [k - 1, n - k];
}

/** median, mean, stdev (sample), min, max, n, ci_low, ci_high: the same definition as schemas::Stats. */
export function stats(samples) {
  const v = samples.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  const n = v.length;
  if (!n) return null;
  const mean = v.reduce((a, b) => a + b, 0) / n;
  const median = n % 2 ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  const stdev = n > 1 ? Math.sqrt(v.reduce((a, x) => a + (x - mean) ** 2, 0) / (n - 1)) : 0;
  const ci = medianCi(n);
  return { n, median, mean, stdev, min: v[0], max: v[n - 1], ci_low: ci ? v[ci[0]] : null, ci_high: ci ? v[ci[1]] : null };
}

/** True when the stats carry a 95% interval. */
export function hasCi(st) {
  return !!st && Number.isFinite(st.ci_low) && Number.isFinite(st.ci_high);
}

/**
 * Whether two results' intervals are separated, and their overlap as a percentage of the
 * narrower interval (0 when separated; null when either has no interval): schemas::Separation::of.
 */
export function separation(a, b) {
  if (!hasCi(a) || !hasCi(b)) return { separated: false, overlap_pct: null };
  const [al, ah, bl, bh] = [a.ci_low, a.ci_high, b.ci_low, b.ci_high];
  const overlap = Math.max(0, Math.min(ah, bh) - Math.max(al, bl));
  const narrower = Math.min(ah - al, bh - bl);
  const separated = al > bh || bl > ah;
  const pct = separated ? 0 : narrower > 0 ? Math.min(100, (overlap / narrower) * 100) : 100;
  return { separated, overlap_pct: pct };
}

/** Half the interval's width as a percentage of the median (what repeat "auto" aims at). */
export function ciHalfWidthPct(st) {
  if (!hasCi(st) || !(Math.abs(st.median) > 0)) return null;
  return ((st.ci_high - st.ci_low) / 2 / Math.abs(st.median)) * 100;
}

/** A run that counts in the warm statistics: not a warmup, not the cold run, not short (unless included). */
export function isMeasured(r, includeShort = false) {
  return !r.warmup && !r.cold && (includeShort || !r.short_output);
}

/** Stats over the warm measured repeats of a machine (warmups, the cold run and short runs apart, as schemas::Summary::of). */
export function machineStats(m, includeShort = false) {
  const warm = m.repeats.filter((r) => !r.warmup && !r.cold);
  const measured = warm.filter((r) => includeShort || !r.short_output);
  const over = (k) => stats(measured.map((r) => r[k]));
  return {
    n: measured.length,
    excluded_short: warm.length - measured.length,
    cold: m.repeats.find((r) => r.cold) ?? null,
    gen_tokens_per_s: over('gen_tokens_per_s'),
    ttft_ms: over('ttft_ms'),
    ttfot_ms: over('ttfot_ms'),
    total_ms: over('total_ms'),
    gen_tokens: over('gen_tokens'),
    tpot_ms: over('tpot_ms'),
    pp_tokens_per_s: over('pp_tokens_per_s'),
    tg_tokens_per_s: over('tg_tokens_per_s'),
    joules_per_token: stats(measured.map((r) => r.telemetry?.joules_per_token)),
    tokens_per_joule: stats(measured.map((r) => r.telemetry?.tokens_per_joule)),
    power_w: stats(measured.map((r) => r.telemetry?.power_w?.mean)),
  };
}

/** Percent change of `v` against `base` (positive: larger). */
export function deltaPct(v, base) {
  if (!Number.isFinite(v) || !Number.isFinite(base) || base === 0) return null;
  return ((v - base) / base) * 100;
}

/**
 * The winner on one metric, called only where the best machine's 95% interval of the median
 * and the runner-up's are separated. Without an interval (fewer than MIN_CI_SAMPLES runs) there
 * is no verdict: `needs` says how many runs it takes.
 * rows: [{machine_id, stat}] ; higherIsBetter.
 */
export function clearWinner(rows, higherIsBetter) {
  const ok = rows.filter((r) => r.stat);
  if (ok.length < 2) return { winner: null, runnerUp: null, clear: false, reason: 'fewer than two machines have results' };
  ok.sort((a, b) => (higherIsBetter ? b.stat.median - a.stat.median : a.stat.median - b.stat.median));
  const [best, next] = ok;
  const sep = separation(best.stat, next.stat);
  const base = { winner: best.machine_id, runnerUp: next.machine_id, best, next, separation: sep };
  if (sep.overlap_pct === null) {
    return { ...base, clear: false, needs: MIN_CI_SAMPLES, reason: `a 95% interval needs ${MIN_CI_SAMPLES} runs per machine` };
  }
  return { ...base, clear: sep.separated, overlapPct: sep.overlap_pct };
}

/** True when every machine of the job has sent its last event. */
export function allTerminal(state) {
  if (!state.machines.size) return false;
  for (const m of state.machines.values()) {
    if (!['done', 'failed', 'cancelled', 'rejected', 'offline'].includes(m.status)) return false;
  }
  return true;
}
