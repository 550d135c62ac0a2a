// A FAKE bench-central for developing the UI without NATS or agents: it serves web/ and speaks
// the HTTP/SSE contract of central/API.md with two simulated machines. It is not the product and
// not what the browser test is meant to run against (that is the real central, via CENTRAL_URL);
// it exists so the page can be worked on, and so the test can be tried, before central is ready.
// It also runs matrix jobs (cells, cell_done, load cells with concurrent streams), and answers
// `cells`, `sweeps`, `regression` and GET /api/compare as central/API.md "Matrix races, sweeps,
// run against run" and "Compare runs" say. With FAKE_FIXTURES=1 it starts with finished jobs of
// known numbers (web/tests/fixtures.mjs), which web/tests/matrix.test.mjs asserts against.
//
//   node web/tests/fake-central.mjs [port]      (prints "listening on http://127.0.0.1:<port>")
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
// The page's own statistics (a port of schemas::metrics: the exact 95% interval of the median).
import { stats, separation, ciHalfWidthPct, MIN_CI_SAMPLES } from '../js/state.js';
import { cellsOf } from '../js/matrix.js';
import { seedFixtures } from './fixtures.mjs';

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const port = Number(process.argv[2] ?? process.env.PORT ?? 0);

const machines = [
  { machine_id: 'fast-box', label: 'Fast box (mock, 180 tok/s)', engine: 'mock', rate: 180, ttft: 25 },
  { machine_id: 'slow-box', label: 'Slow box (mock, 60 tok/s)', engine: 'mock', rate: 60, ttft: 70 },
].map((m) => ({ ...m, status: 'online', models: ['gemma-3-270m', 'mock'], current_job: null, loaded: false }));

const jobs = new Map(); // job_id -> {doc, events: [{id, ev}], listeners:Set}
const globalListeners = new Set();
let streamSeq = 0;
const WORDS = ' the quick brown fox jumps over a lazy dog while unified memory feeds tensor cores at full speed.'.split(/(?= )/);

function machineDoc(m) {
  const { rate, ttft, loaded, ...rest } = m;
  return { ...rest, last_seen_ms: Date.now(), hardware: { cpu: 'fake', cores: 2, memory_bytes: 0, os: 'linux', arch: 'x86_64' }, labels: {}, notes: null, version: 'fake' };
}

function sse(res, id, type, data) {
  if (id !== null) res.write(`id: ${id}\n`);
  res.write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
}

function broadcast(type, data) {
  for (const res of globalListeners) sse(res, null, type, data);
}

function listItem(j) {
  return { job_id: j.job_id, created_ms: j.created_ms, model: j.job.model, prompt: (j.job.prompt ?? '').slice(0, 200), profile: j.job.profile, status: j.status, source: 'central', machines: j.machines.map((m) => m.machine_id) };
}

function emit(j, jm, type, payload) {
  jm.seq += 1;
  const ev = { job_id: j.job_id, machine_id: jm.machine_id, seq: jm.seq, ts_ms: Date.now(), type, payload };
  const id = ++streamSeq;
  j.events.push({ id, ev });
  jm.last_seq = jm.seq;
  for (const res of j.listeners) sse(res, id, type, ev);
  if (['job_done', 'job_error', 'job_cancelled'].includes(type) && j.machines.every((m) => ['done', 'failed', 'cancelled'].includes(m.status))) {
    j.status = j.machines.every((m) => m.status === 'done') ? 'done' : 'partial';
    ranking(j);
    for (const res of j.listeners) { sse(res, null, 'end', { job_id: j.job_id, status: j.status }); res.end(); }
    j.listeners.clear();
    broadcast('job', listItem(j));
  }
}

function ranking(j) {
  j.ranking = rankingOf(j.machines);
}

/** Ranking rows (API.md) over [{machine_id, summary}]: by median decode rate, separation with the next row. */
function rankingOf(list) {
  const rows = list.filter((m) => m.summary?.gen_tokens_per_s).sort((a, b) => b.summary.gen_tokens_per_s.median - a.summary.gen_tokens_per_s.median);
  return rows.map((m, i) => {
    const s = m.summary;
    const next = rows[i + 1]?.summary.gen_tokens_per_s;
    const sep = next ? separation(s.gen_tokens_per_s, next) : null;
    const gap = next ? ((s.gen_tokens_per_s.median - next.median) / next.median) * 100 : 0;
    const verdict = !next ? (rows.length === 1 ? 'the only machine with a decode rate: nothing to compare' : `last of ${rows.length}`)
      : sep.overlap_pct === null ? `needs ${MIN_CI_SAMPLES} repeats per machine for a 95% interval`
      : sep.separated ? `${i === 0 ? 'clear winner: ' : ''}${gap.toFixed(1)}% faster than ${rows[i + 1].machine_id}, 95% intervals separated`
      : i === 0 ? `no clear winner: intervals overlap by ${sep.overlap_pct.toFixed(0)}%` : `not separated from ${rows[i + 1].machine_id}: intervals overlap by ${sep.overlap_pct.toFixed(0)}%`;
    return { rank: i + 1, machine_id: m.machine_id, gen_tokens_per_s: s.gen_tokens_per_s, ttft_ms: s.ttft_ms, total_ms: s.total_ms, ttfot_ms: s.ttfot_ms, pp_tokens_per_s: s.pp_tokens_per_s, tg_tokens_per_s: s.tg_tokens_per_s,
      delta_vs_baseline: null, separation: sep, verdict, clear_winner: i === 0 && !!sep?.separated };
  });
}

/** The summary of the warm measured runs (warmups and the cold run apart), as schemas::Summary::of. */
function summaryOf(repeats) {
  const measured = repeats.filter((m) => !m.warmup && !m.cold && !m.short_output);
  const over = (k) => stats(measured.map((m) => m[k]));
  const cold = repeats.find((m) => m.cold);
  return { repeats: measured.length, cold: cold ? { ttft_ms: cold.ttft_ms, total_ms: cold.total_ms, load_ms: cold.load_ms, gen_tokens_per_s: cold.gen_tokens_per_s } : undefined,
    ttft_ms: over('ttft_ms'), gen_tokens_per_s: over('gen_tokens_per_s'), total_ms: over('total_ms'), tpot_ms: over('tpot_ms'), gen_tokens: over('gen_tokens'), prompt_tokens_per_s: over('prompt_tokens_per_s'),
    ttfot_ms: over('ttfot_ms'), pp_tokens_per_s: over('pp_tokens_per_s'), tg_tokens_per_s: over('tg_tokens_per_s') };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A cell's job: the matrix values applied (schemas Job::cells). */
function cellJob(job, values) {
  const c = { ...job, matrix: undefined };
  for (const [k, v] of Object.entries(values)) c[k] = ['model', 'backend', 'profile'].includes(k) ? v : Number(v);
  return c;
}

async function runMachine(j, jm, spec) {
  const fm = machines.find((m) => m.machine_id === jm.machine_id);
  fm.status = 'busy';
  broadcast('machine', machineDoc(fm));
  emit(j, jm, 'job_accepted', { job: { ...j.job, job_id: j.job_id }, position: 0, engine: 'mock', engine_url: '', label: fm.label, agent_version: 'fake' });
  const cells = cellsOf(j.job.matrix);
  if (!cells.length) return runCell(j, jm, spec, j.job, null);
  const results = [];
  jm.status = 'running';
  for (const c of cells) {
    if (j.cancelled) break;
    const cj = cellJob(j.job, c.values);
    let res;
    if (!fm.models.includes(cj.model)) {
      await sleep(30);
      res = { cell: c.cell, values: c.values, status: 'failed', error: { code: 'model_not_found', message: `${jm.machine_id} does not offer ${cj.model}` }, stop_reason: 'count' };
    } else if (cj.concurrency) {
      res = await runLoad(j, jm, spec, cj, c);
    } else {
      const before = jm.repeats.length;
      await runCell(j, jm, spec, cj, c.cell);
      const mine = jm.repeats.slice(before);
      res = { cell: c.cell, values: c.values, status: 'done', summary: summaryOf(mine), stop_reason: 'count', repeat_range: [mine[0]?.repeat_index ?? 0, mine[mine.length - 1]?.repeat_index ?? 0] };
    }
    if (j.cancelled) break;
    jm.cellResults.set(c.cell, res);
    results.push(res);
    emit(j, jm, 'cell_done', res);
  }
  finishMachine(j, jm, fm, { cells: results, stopReason: 'count', first: results.find((r) => r.status === 'done') });
}

/** A load cell: C closed-loop streams, each running `requests` (else `repeat`) requests; no tokens streamed. */
async function runLoad(j, jm, spec, cj, c) {
  const conc = cj.concurrency;
  const per = cj.requests ?? (cj.repeat === 'auto' ? 3 : cj.repeat);
  const t0 = Date.now();
  const runs = [];
  const stream = async (k) => {
    for (let i = 0; i < per && !j.cancelled; i++) {
      const index = jm.nextIndex++;
      const start = Date.now() - t0;
      emit(j, jm, 'job_started', { repeat_index: index, warmup: false, cell: c.cell, stream: k });
      const ttft = spec.ttft * (1 + 0.6 * (conc - 1)) * (0.9 + Math.random() * 0.2);
      const tokens = cj.max_tokens;
      const decode = (tokens * 1000) / (spec.rate / Math.sqrt(conc));
      await sleep(Math.min(60, ttft / 4 + decode / 40));
      const total = ttft + decode;
      const m = { repeat_index: index, warmup: false, cold: false, ttft_ms: ttft, ttfot_ms: ttft, total_ms: total, gen_tokens: tokens, token_count_source: 'mock', streamed_tokens: tokens,
        gen_tokens_per_s: ((tokens - 1) * 1000) / decode, tpot_ms: decode / tokens, prompt_tokens: 8, cell: c.cell, stream: k, start_ms: start };
      jm.repeats.push(m);
      runs.push(m);
      emit(j, jm, 'repeat_done', m);
    }
  };
  await Promise.all(Array.from({ length: conc }, (_, k) => stream(k)));
  return { cell: c.cell, values: c.values, status: 'done', summary: summaryOf(runs), load: loadOf(conc, runs), stop_reason: 'count', repeat_range: [runs[0]?.repeat_index ?? 0, runs[runs.length - 1]?.repeat_index ?? 0] };
}

/** schemas Load::of over the measured requests (ITL left out). */
export function loadOf(concurrency, runs) {
  if (!runs.length) return null;
  const start = Math.min(...runs.map((m) => m.start_ms ?? 0));
  const end = Math.max(...runs.map((m) => (m.start_ms ?? 0) + m.total_ms));
  const wall = Math.max(0, end - start);
  const out = runs.reduce((n, m) => n + m.gen_tokens, 0);
  const per = (x) => (wall > 0 ? x / (wall / 1000) : 0);
  const pcts = (v) => {
    const x = v.filter(Number.isFinite).sort((a, b) => a - b);
    if (!x.length) return undefined;
    const q = (p) => x[Math.min(x.length - 1, Math.ceil((p / 100) * x.length) - 1)];
    return { p50: q(50), p90: q(90), p99: q(99) };
  };
  return { concurrency, requests: runs.length, wall_ms: wall, output_tokens: out, output_tokens_per_s: per(out), requests_per_s: per(runs.length),
    ttft_ms: pcts(runs.map((m) => m.ttft_ms)), per_stream_tokens_per_s: stats(runs.map((m) => m.gen_tokens_per_s)) ?? undefined };
}

/** One cell (or a job without a matrix): repeats streamed token by token; `cell` null without a matrix. */
async function runCell(j, jm, spec, job, cell) {
  const fm = machines.find((m) => m.machine_id === jm.machine_id);
  const tag = cell === null ? {} : { cell };
  const profile = /^pp(\d+)-tg(\d+)$/.exec(job.profile ?? '');
  const maxTokens = profile ? Number(profile[2]) : job.max_tokens;
  const promptTokens = profile ? Number(profile[1]) : job.prompt_tokens ?? job.prompt.split(/\s+/).length;
  const auto = job.repeat === 'auto';
  const maxRepeat = auto ? job.max_repeat ?? 20 : job.repeat;
  const target = job.target_ci_pct ?? 2;
  // The first request after a model load is cold; with no warmup to absorb it, it is an extra run.
  const extraCold = !fm.loaded && job.warmup === 0 ? 1 : 0;
  fm.loaded = true;
  let stopReason = 'count';
  const mine = [];
  for (let r = 0; !j.cancelled; r++) {
    const measuredSoFar = mine.filter((m) => !m.warmup && !m.cold);
    if (measuredSoFar.length >= maxRepeat) { stopReason = auto ? 'max_repeat' : 'count'; break; }
    if (auto && measuredSoFar.length >= MIN_CI_SAMPLES) {
      const hw = ciHalfWidthPct(stats(measuredSoFar.map((m) => m.gen_tokens_per_s)));
      if (hw !== null && hw <= target) { stopReason = 'precision'; break; }
    }
    const cold = r < extraCold;
    const warmup = !cold && r < extraCold + job.warmup;
    jm.status = 'running';
    const index = jm.nextIndex++;
    emit(j, jm, 'job_started', { ...(cold ? { repeat_index: index, warmup: false, cold: true } : { repeat_index: index, warmup }), ...tag });
    const rate = spec.rate * (0.92 + Math.random() * 0.16);
    const t0 = Date.now();
    await sleep(spec.ttft);
    const ttft = Date.now() - t0;
    let text = '';
    let batch = '';
    let batchTokens = 0;
    let lastFlush = Date.now();
    for (let i = 0; i < maxTokens && !j.cancelled; i++) {
      if (i) await sleep(1000 / rate);
      const w = i === 3 && job.prompt.includes('<') ? ' <b>bold?</b> <img src=x onerror=window.__xss_out=1>' : WORDS[i % WORDS.length];
      text += w; batch += w; batchTokens++;
      if (batch.length >= 64 || Date.now() - lastFlush >= 100 || i === maxTokens - 1) {
        emit(j, jm, 'llm_token', { repeat_index: index, text: batch, tokens: batchTokens, t_ms: Date.now() - t0 });
        batch = ''; batchTokens = 0; lastFlush = Date.now();
      }
    }
    if (j.cancelled) break;
    const total = Date.now() - t0;
    const n = maxTokens;
    const tps = n > 1 ? ((n - 1) * 1000) / (total - ttft) : null;
    const pp = (promptTokens * 1000) / ttft;
    const metrics = { ...tag, repeat_index: index, warmup, cold, ttft_ms: ttft, ttfot_ms: ttft, total_ms: total, gen_tokens: n, token_count_source: 'mock', streamed_tokens: n, gen_tokens_per_s: tps, tpot_ms: tps ? 1000 / tps : null, itl_ms: null,
      prompt_tokens: promptTokens, prompt_tokens_per_s: pp, prompt_evaluated: promptTokens, pp_tokens_per_s: pp, tg_tokens_per_s: tps, load_ms: cold ? 400 : null, engine_gen_tokens_per_s: null, engine_prompt_tokens_per_s: null, engine_gen_ms: null, engine_prompt_ms: null,
      engine_total_ms: null, chunks: n, output_chars: text.length, done_reason: 'length' };
    if (n < 2) metrics.null_reason = 'one token: no decode interval';
    jm.repeats.push(metrics);
    mine.push(metrics);
    if (!warmup && !cold) jm.output_text = text;
    emit(j, jm, 'repeat_done', metrics);
  }
  if (cell !== null) return;
  jm.summary = summaryOf(jm.repeats);
  jm.shape = { prompt_tokens: profile || job.prompt_tokens != null ? promptTokens : null, depth: job.depth ?? 0, max_tokens: maxTokens, ignore_eos: !!(profile || job.prompt_tokens != null) };
  finishMachine(j, jm, fm, { stopReason, maxTokens });
}

/** The machine's last event: job_cancelled, or job_done (a matrix job's with every cell). */
function finishMachine(j, jm, fm, { cells, stopReason, maxTokens, first }) {
  if (j.cancelled) {
    jm.status = 'cancelled';
    emit(j, jm, 'job_cancelled', { reason: 'user' });
  } else {
    if (cells) jm.summary = first?.summary ?? null;
    jm.stop_reason = stopReason;
    jm.status = 'done';
    emit(j, jm, 'job_done', { model: j.job.model, engine: 'mock', ttft_ms: jm.summary?.ttft_ms?.median ?? null, gen_tokens: maxTokens ?? j.job.max_tokens, gen_tokens_per_s: jm.summary?.gen_tokens_per_s?.median ?? null,
      total_ms: jm.summary?.total_ms?.median ?? null, token_count_source: 'mock', repeats: jm.repeats, summary: jm.summary, output_text: jm.output_text,
      pp_tokens_per_s: jm.summary?.pp_tokens_per_s?.median ?? null, tg_tokens_per_s: jm.summary?.tg_tokens_per_s?.median ?? null, shape: jm.shape, stop_reason: stopReason, ...(cells ? { cells } : {}) });
  }
  fm.status = 'online';
  broadcast('machine', machineDoc(fm));
}

function jobDoc(j) {
  const cells = matrixCells(j);
  const doc = { job_id: j.job_id, created_ms: j.created_ms, status: j.status, source: 'central', job: j.job,
    machines: j.machines.map(({ seq, nextIndex, cellResults, ...m }) => {
      const out = { ...m };
      if (cells) out.cells = [...cellResults.values()];
      const rg = regressionOf(j, m.machine_id);
      if (rg) out.regression = rg;
      return out;
    }),
    ranking: cells ? cells[0]?.ranking ?? [] : j.ranking ?? [], baseline: null };
  if (cells) {
    doc.cells = cells;
    doc.sweeps = sweepsOf(j, cells);
  }
  return doc;
}

/** The runs of one machine in one cell ('' without a matrix). */
const runsOf = (jm, cell) => jm.repeats.filter((r) => (r.cell ?? '') === cell);

/** A machine's entry of one cell (API.md `cells[].machines[]`). */
function cellEntry(j, jm, c) {
  const res = jm.cellResults.get(c.cell);
  const runs = runsOf(jm, c.cell);
  let status = res ? res.status : runs.length ? 'running' : 'pending';
  let error = res?.error ?? null;
  if (!res && ['failed', 'cancelled'].includes(jm.status)) {
    status = 'failed';
    error = jm.error ?? { code: jm.status, message: jm.status };
  }
  return { machine_id: jm.machine_id, status, error, summary: res?.summary ?? (runs.length ? summaryOf(runs) : null), load: res?.load ?? null, runs: runs.length, fingerprint_id: null };
}

/** API.md `cells`: one per cell of the matrix, with each machine's entry, its ranking and winner. */
function matrixCells(j) {
  const cells = cellsOf(j.job.matrix);
  if (!cells.length) return null;
  return cells.map((c) => {
    const ms = j.machines.map((jm) => cellEntry(j, jm, c));
    const rk = rankingOf(ms.filter((e) => e.summary));
    return { cell: c.cell, values: c.values, machines: ms, ranking: rk, winner: rk[0]?.clear_winner ? rk[0].machine_id : null };
  });
}

/** API.md `sweeps`: cells that differ only in concurrency, per machine its load points and capacity. */
function sweepsOf(j, cells) {
  const groups = new Map();
  for (const c of cells) {
    if (!('concurrency' in c.values)) continue;
    const key = c.cell.split(',').filter((p) => !p.startsWith('concurrency=')).join(',');
    if (!groups.has(key)) groups.set(key, { group: key, values: Object.fromEntries(Object.entries(c.values).filter(([k]) => k !== 'concurrency')), cells: [] });
    groups.get(key).cells.push(c);
  }
  const slo = j.job.slo ?? null;
  return [...groups.values()].map((g) => ({ group: g.group, values: g.values, slo,
    machines: j.machines.map((jm) => {
      const points = g.cells.map((c) => ({ concurrency: Number(c.values.concurrency), cell: c.cell, load: c.machines.find((e) => e.machine_id === jm.machine_id)?.load ?? null }))
        .filter((p) => p.load).sort((a, b) => a.concurrency - b.concurrency);
      let capacity = null;
      if (slo?.ttft_p99_ms != null) {
        for (const p of points) {
          if (!(p.load.ttft_ms?.p99 <= slo.ttft_p99_ms)) break;
          capacity = p.concurrency;
        }
      }
      return { machine_id: jm.machine_id, points, capacity };
    }) }));
}

/** The medians' comparison of one metric (API.md compare `vs_baseline` entries). */
function vs(b, v, higherBetter, sb, sv) {
  if (!Number.isFinite(b) || !Number.isFinite(v)) return undefined;
  const sep = sb && sv ? separation(sb, sv) : { separated: false };
  return { baseline: b, value: v, delta: v - b, ratio: b !== 0 ? v / b : null, pct: b !== 0 ? ((v - b) / b) * 100 : null, exceeds_ci: sep.separated, worse: higherBetter ? v < b : v > b };
}

const SUMMARY_METRICS = [['gen_tokens_per_s', true], ['ttft_ms', false], ['total_ms', false], ['pp_tokens_per_s', true], ['tg_tokens_per_s', true], ['joules_per_token', false]];

/** API.md `regression`: this machine against its newest earlier job of the same setup. */
function regressionOf(j, id) {
  const jm = j.machines.find((m) => m.machine_id === id);
  const same = (a, b) => a.model === b.model && a.max_tokens === b.max_tokens && (a.profile ?? null) === (b.profile ?? null) && (a.prompt_tokens ?? null) === (b.prompt_tokens ?? null) && JSON.stringify(a.matrix ?? null) === JSON.stringify(b.matrix ?? null);
  const earlier = [...jobs.values()].filter((o) => o.created_ms < j.created_ms && same(o.job, j.job) && o.machines.some((m) => m.machine_id === id)).sort((a, b) => b.created_ms - a.created_ms)[0];
  if (!earlier) return null;
  const om = earlier.machines.find((m) => m.machine_id === id);
  const keys = cellsOf(j.job.matrix).map((c) => c.cell);
  const metrics = [];
  for (const cell of keys.length ? keys : ['']) {
    const a = summaryOf(runsOf(om, cell));
    const b = summaryOf(runsOf(jm, cell));
    for (const [k, higher] of [['gen_tokens_per_s', true], ['ttft_ms', false]]) {
      const d = vs(a[k]?.median, b[k]?.median, higher, a[k], b[k]);
      if (d) metrics.push({ cell, metric: k, before: d.baseline, after: d.value, pct: d.pct, exceeds_ci: d.exceeds_ci, worse: d.worse });
    }
  }
  if (!metrics.length) return null;
  return { job_id: earlier.job_id, created_ms: earlier.created_ms, regressed: metrics.some((m) => m.worse && m.exceeds_ci), metrics };
}

/** GET /api/compare?jobs=a,b[,...] (the `run=` form: one group of the given runs). */
function compare(url) {
  const bad = (code, message, status = 400) => ({ status, body: { error: { code, message } } });
  const ids = url.searchParams.get('jobs')?.split(',').filter(Boolean);
  const refs = url.searchParams.getAll('run');
  const entry = (j, jm, cell) => {
    const runs = runsOf(jm, cell);
    const res = jm.cellResults.get(cell);
    return { ref: `${j.job_id}:${jm.machine_id}${cell ? ':' + cell : ''}`, job_id: j.job_id, machine_id: jm.machine_id, cell, label: jm.label, created_ms: j.created_ms,
      model: cell ? cellJob(j.job, cellsOf(j.job.matrix).find((c) => c.cell === cell)?.values ?? {}).model : j.job.model, status: jm.status, fingerprint_id: null,
      summary: res?.summary ?? (runs.length ? summaryOf(runs) : null), load: res?.load ?? null };
  };
  const against = (base, e) => {
    const out = {};
    for (const [k, higher] of SUMMARY_METRICS) {
      const d = vs(base.summary?.[k]?.median, e.summary?.[k]?.median, higher, base.summary?.[k], e.summary?.[k]);
      if (d) out[k] = d;
    }
    const o = vs(base.load?.output_tokens_per_s, e.load?.output_tokens_per_s, true);
    if (o) out.output_tokens_per_s = o;
    const p = vs(base.load?.ttft_ms?.p99, e.load?.ttft_ms?.p99, false);
    if (p) out.ttft_p99_ms = p;
    return out;
  };
  const finish = (group) => {
    const [base, ...rest] = group.entries;
    base.vs_baseline = null;
    for (const e of rest) e.vs_baseline = against(base, e);
    return group;
  };
  if (refs.length && ids) return bad('bad_request', 'give run= or jobs=, not both');
  if (refs.length) {
    if (refs.length < 2 || refs.length > 8) return bad('bad_request', 'give 2 to 8 runs');
    const entries = [];
    for (const r of refs) {
      const [jid, mid, ...rest] = r.split(':');
      if (mid === undefined) return bad('bad_request', `run ${r} has no ':'`);
      const j = jobs.get(jid);
      const jm = j?.machines.find((m) => m.machine_id === mid);
      if (!jm) return bad('not_found', `no run ${r}`, 404);
      entries.push(entry(j, jm, rest.join(':')));
    }
    const one = (k) => (entries.every((e) => e[k] === entries[0][k]) ? entries[0][k] : null);
    return { status: 200, body: { baseline: entries[0].ref, groups: [finish({ machine_id: one('machine_id'), cell: one('cell'), entries })] } };
  }
  if (!ids || ids.length < 2 || ids.length > 8) return bad('bad_request', 'give 2 to 8 jobs');
  const js = ids.map((id) => jobs.get(id));
  const missing = ids.find((id, i) => !js[i]);
  if (missing) return bad('not_found', `no job ${missing}`, 404);
  const groups = [];
  for (const bm of js[0].machines) {
    const keys = cellsOf(js[0].job.matrix).map((c) => c.cell);
    for (const cell of keys.length ? keys : ['']) {
      if (!runsOf(bm, cell).length && !bm.cellResults.get(cell)?.load) continue;
      const entries = [entry(js[0], bm, cell)];
      for (const o of js.slice(1)) {
        const om = o.machines.find((m) => m.machine_id === bm.machine_id);
        if (om && (runsOf(om, cell).length || om.cellResults.get(cell)?.load)) entries.push(entry(o, om, cell));
      }
      if (entries.length > 1) groups.push(finish({ machine_id: bm.machine_id, cell, entries }));
    }
  }
  if (!groups.length) return bad('not_found', `jobs ${ids.join(', ')} have no machine and cell in common`, 404);
  return { status: 200, body: { baseline: ids[0], groups } };
}

function send(res, code, body, headers = {}) {
  res.writeHead(code, { 'Content-Type': 'application/json', ...headers });
  res.end(body === null ? '' : JSON.stringify(body));
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.png': 'image/png', '.svg': 'image/svg+xml' };

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname;
  let m;
  if (p === '/api/machines') return send(res, 200, { machines: machines.map(machineDoc) });
  if (p === '/health') return send(res, 200, { ok: true, nats: 'connected', version: 'fake' });
  if (p === '/api/events') {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    res.write(': hi\n\n');
    globalListeners.add(res);
    req.on('close', () => globalListeners.delete(res));
    return;
  }
  if (p === '/api/jobs' && req.method === 'POST') {
    let body = '';
    for await (const c of req) body += c;
    let b;
    try { b = JSON.parse(body); } catch { return send(res, 400, { error: { code: 'bad_json', message: 'bad json' } }); }
    const { machines: want, ...job } = b;
    const ids = want === 'all' ? machines.map((x) => x.machine_id) : want;
    const j = { job_id: crypto.randomUUID(), created_ms: Date.now(), status: 'running', job: { repeat: 1, warmup: 0, prompt: '', ...job }, events: [], listeners: new Set(),
      machines: ids.map((id) => ({ machine_id: id, label: machines.find((x) => x.machine_id === id)?.label ?? id, engine: 'mock', status: 'queued', output_text: '', repeats: [], summary: null, error: null, last_seq: 0, seq: 0, nextIndex: 0, cellResults: new Map() })) };
    jobs.set(j.job_id, j);
    broadcast('job', listItem(j));
    for (const jm of j.machines) runMachine(j, jm, machines.find((x) => x.machine_id === jm.machine_id));
    return send(res, 201, { job_id: j.job_id, machines: ids.map((id) => ({ machine_id: id, status: 'accepted' })) });
  }
  if (p === '/api/compare') {
    const r = compare(url);
    return send(res, r.status, r.body);
  }
  if (p === '/api/jobs') {
    const list = [...jobs.values()].sort((a, b) => b.created_ms - a.created_ms).map(listItem);
    return send(res, 200, { jobs: list, next_before: null });
  }
  if ((m = /^\/api\/jobs\/([A-Za-z0-9_-]+)(\/events|\/cancel|\/export\.(json|csv|ndjson))?$/.exec(p))) {
    const j = jobs.get(m[1]);
    if (!j) return send(res, 404, { error: { code: 'not_found', message: 'no such job' } });
    if (!m[2]) return send(res, 200, jobDoc(j));
    if (m[2] === '/cancel') { j.cancelled = true; return send(res, 202, { job_id: j.job_id, cancel_sent: true }); }
    if (m[3] === 'json') return send(res, 200, jobDoc(j), { 'Content-Disposition': `attachment; filename="${j.job_id}.json"` });
    if (m[3]) { res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Disposition': `attachment; filename="${j.job_id}.${m[3]}"` }); return res.end('fake export\n'); }
    const last = Number(req.headers['last-event-id'] ?? url.searchParams.get('last_event_id') ?? 0);
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    for (const { id, ev } of j.events) if (id > last) sse(res, id, ev.type, ev);
    if (j.status !== 'running') { sse(res, null, 'end', { job_id: j.job_id, status: j.status }); return res.end(); }
    j.listeners.add(res);
    req.on('close', () => j.listeners.delete(res));
    return;
  }
  // static
  const rel = p === '/' ? 'index.html' : decodeURIComponent(p).replace(/^\/+/, '');
  const file = path.resolve(WEB, rel);
  if (!file.startsWith(WEB + path.sep) || file.includes('node_modules') || file.includes(path.sep + 'tests' + path.sep)) return send(res, 404, { error: { code: 'not_found', message: 'not found' } });
  fs.readFile(file, (err, data) => {
    if (err) return send(res, 404, { error: { code: 'not_found', message: 'not found' } });
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
    res.end(data);
  });
});

if (process.env.FAKE_FIXTURES === '1') seedFixtures({ jobs, machines, summaryOf, loadOf, rankingOf });
for (const j of jobs.values()) ranking(j);

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
