// Matrix races and concurrency sweeps, as the page sees them (central/API.md "Matrix races,
// sweeps, run against run"). Pure: no DOM, so node's test runner checks it directly.
import { machineStats } from './state.js';

/** The axes a matrix may vary, in the order cell keys name them (schemas::matrix::AXES). */
export const AXES = ['model', 'backend', 'num_ctx', 'prompt_tokens', 'profile', 'max_tokens', 'depth', 'temperature', 'concurrency'];
/** The most cells one job may have (schemas::matrix::MAX_CELLS). */
export const MAX_CELLS = 64;
/** The most concurrent streams of one cell (schemas::matrix::MAX_CONCURRENCY). */
export const MAX_CONCURRENCY = 64;

/**
 * A comma list as the form takes it: `kind` 'text' keeps the words, 'int' wants whole numbers ≥ min.
 * An empty field is an empty list. Throws with the field's name on a bad or repeated value.
 */
export function parseList(text, { name, kind = 'int', min = 1, max = Infinity } = {}) {
  const parts = String(text ?? '').split(',').map((x) => x.trim()).filter((x) => x !== '');
  const seen = new Set();
  return parts.map((p) => {
    let v = p;
    if (kind === 'int') {
      v = Number(p);
      if (!/^\d+$/.test(p) || !Number.isSafeInteger(v) || v < min || v > max) throw new Error(`${name}: "${p}" is not a whole number ${max < Infinity ? `from ${min} to ${max}` : `≥ ${min}`}`);
    }
    if (seen.has(v)) throw new Error(`${name} lists ${p} twice`);
    seen.add(v);
    return v;
  });
}

/**
 * The matrix part of a job from the form's fields: {model, max_tokens, num_ctx, concurrency}
 * as comma lists, `order`, `requests` (per stream, load cells), `slo_ttft_p99_ms`. Returns the
 * fields to merge into the job body ({} when no list is given). `ctx` says what else the form
 * asks: {profile: bool, auto: bool}.
 */
export function readMatrixFields(f, ctx = {}) {
  const matrix = {};
  const model = parseList(f.model, { name: 'Matrix models', kind: 'text' });
  const maxTokens = parseList(f.max_tokens, { name: 'Matrix max tokens', min: 1 });
  const numCtx = parseList(f.num_ctx, { name: 'Matrix context sizes', min: 1 });
  const conc = parseList(f.concurrency, { name: 'Matrix concurrency', min: 1, max: MAX_CONCURRENCY });
  if (model.length) matrix.model = model;
  if (numCtx.length) matrix.num_ctx = numCtx;
  if (maxTokens.length) matrix.max_tokens = maxTokens;
  if (conc.length) matrix.concurrency = conc;
  const out = {};
  const n = cellCount(matrix);
  if (Object.keys(matrix).length) {
    if (n > MAX_CELLS) throw new Error(`The matrix has ${n} cells; at most ${MAX_CELLS}`);
    if (maxTokens.length && ctx.profile) throw new Error('A profile sets the generated tokens: vary Max tokens with another test shape, or leave the matrix list empty');
    out.matrix = matrix;
    if (f.order && f.order !== 'sequential') out.order = f.order;
  }
  const requests = String(f.requests ?? '').trim();
  if (requests !== '') {
    const r = Number(requests);
    if (!Number.isInteger(r) || r < 1) throw new Error('Requests per stream must be a whole number ≥ 1');
    if (!conc.length) throw new Error('Requests per stream is for load cells: give a Concurrency list');
    out.requests = r;
  }
  if (conc.length && ctx.auto) throw new Error('Repeats "auto" stops on one stream\'s interval; a concurrency sweep needs a number of repeats (or Requests per stream)');
  const slo = String(f.slo_ttft_p99_ms ?? '').trim();
  if (slo !== '') {
    const v = Number(slo);
    if (!Number.isFinite(v) || v <= 0) throw new Error('SLO TTFT p99 must be a number of ms above 0');
    out.slo = { ttft_p99_ms: v };
  }
  return out;
}

/** How many cells a matrix has. */
export function cellCount(matrix) {
  const lists = AXES.map((a) => matrix?.[a]).filter((v) => Array.isArray(v) && v.length);
  return lists.length ? lists.reduce((n, v) => n * v.length, 1) : 0;
}

/** A value as the cell key writes it (Rust's shortest form: 0.7, 1). */
function keyValue(v) {
  return typeof v === 'number' ? String(v) : String(v);
}

/** The cells of a matrix in order, the last axis fastest: [{cell, values}] (schemas Job::cells). */
export function cellsOf(matrix) {
  const axes = AXES.filter((a) => Array.isArray(matrix?.[a]) && matrix[a].length).map((a) => [a, matrix[a].map(keyValue)]);
  if (!axes.length) return [];
  let out = [{ parts: [], values: {} }];
  for (const [axis, vals] of axes) {
    out = out.flatMap((c) => vals.map((v) => ({ parts: [...c.parts, `${axis}=${v}`], values: { ...c.values, [axis]: v } })));
  }
  return out.slice(0, MAX_CELLS).map((c) => ({ cell: c.parts.join(','), values: c.values }));
}

const TERMINAL_CELL = new Set(['done', 'failed']);

/**
 * The matrix table's rows: central's `cells` (or the job's matrix before central answered),
 * each machine's entry brought up to date with what the job stream said since: `cell_done`
 * (m.cellResults) ends a cell, a run of it (`repeat_done` with its `cell`, or the run streaming
 * now) makes it running. A machine that failed or was cancelled fails its unfinished cells.
 * -> [{cell, values, winner, ranking, load: bool, machines: Map(id -> {status, error, summary, load, runs})}]
 */
export function matrixRows(job) {
  const base = Array.isArray(job.cells) && job.cells.length ? job.cells : cellsOf(job.job?.matrix).map((c) => ({ ...c, machines: [], ranking: [], winner: null }));
  const includeShort = !!job.job?.include_short;
  return base.map((c) => {
    const machines = new Map();
    const ids = new Set([...(c.machines ?? []).map((x) => x.machine_id), ...job.machines.keys()]);
    for (const id of ids) {
      const snap = (c.machines ?? []).find((x) => x.machine_id === id) ?? null;
      const m = job.machines.get(id);
      let e = snap ? { status: snap.status, error: snap.error ?? null, summary: snap.summary ?? null, load: snap.load ?? null, runs: snap.runs ?? 0 } : { status: 'pending', error: null, summary: null, load: null, runs: 0 };
      const live = m?.cellResults?.get(c.cell);
      const runs = m ? m.repeats.filter((r) => (r.cell ?? '') === c.cell) : [];
      if (live) {
        e = { status: live.status, error: live.error ?? null, summary: live.summary ?? e.summary, load: live.load ?? e.load, runs: Math.max(e.runs, runs.length) };
      } else if (!TERMINAL_CELL.has(e.status) && m) {
        if (runs.length || m.run?.cell === c.cell) {
          const st = machineStats({ repeats: runs }, includeShort);
          e = { ...e, status: 'running', runs: Math.max(e.runs, runs.length), summary: st.n ? summaryFromStats(st) : e.summary };
        }
        if (['failed', 'cancelled', 'rejected', 'offline'].includes(m.status)) {
          e = { ...e, status: 'failed', error: m.error ?? { code: m.status, message: m.status } };
        }
      }
      if (!snap && !m) continue;
      machines.set(id, e);
    }
    const load = c.values && 'concurrency' in c.values ? true : [...machines.values()].some((e) => e.load);
    return { cell: c.cell, values: c.values ?? {}, winner: c.winner ?? null, ranking: c.ranking ?? [], load, machines };
  });
}

function summaryFromStats(st) {
  return { repeats: st.n, gen_tokens_per_s: st.gen_tokens_per_s, ttft_ms: st.ttft_ms, total_ms: st.total_ms, tg_tokens_per_s: st.tg_tokens_per_s, pp_tokens_per_s: st.pp_tokens_per_s };
}

/** The axes a job's cells vary (for the table's row headings), in AXES order. */
export function variedAxes(rows) {
  return AXES.filter((a) => rows.some((r) => a in (r.values ?? {})));
}

/** A number as a one-run Stats, for the bar chart (load figures have no interval). */
export function pointStat(v) {
  return Number.isFinite(v) ? { n: 1, median: v, mean: v, min: v, max: v, stdev: 0, ci_low: null, ci_high: null } : null;
}

/**
 * The capacity answer of one machine's sweep, in words: "m1 sustains 4 streams within TTFT
 * p99 ≤ 1000 ms" (central's `capacity`, schemas matrix::capacity).
 */
export function capacityText(label, sweepMachine, slo) {
  const limit = slo?.ttft_p99_ms;
  if (!Number.isFinite(limit)) return `${label}: no SLO set (give SLO TTFT p99 for a capacity)`;
  const within = `within TTFT p99 ≤ ${fmtMs(limit)} ms`;
  const c = sweepMachine.capacity;
  if (c === null || c === undefined) {
    const first = (sweepMachine.points ?? [])[0];
    return first ? `${label} misses TTFT p99 ≤ ${fmtMs(limit)} ms already at ${first.concurrency} stream${first.concurrency === 1 ? '' : 's'}` : `${label}: no load results yet`;
  }
  return `${label} sustains ${c} stream${c === 1 ? '' : 's'} ${within}`;
}

function fmtMs(v) {
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

/** The points of a sweep chart for one machine: [{x: output tok/s, y: TTFT p99 ms, concurrency, cell}], usable ones only. */
export function sweepPoints(sweepMachine) {
  return (sweepMachine.points ?? [])
    .map((p) => ({ x: p.load?.output_tokens_per_s, y: p.load?.ttft_ms?.p99, concurrency: p.concurrency, cell: p.cell }))
    .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y))
    .sort((a, b) => a.concurrency - b.concurrency);
}
