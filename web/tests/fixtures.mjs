// Finished jobs of known numbers for the fake central (FAKE_FIXTURES=1), in its in-memory shape;
// the fake answers GET /api/jobs/{id} (cells, sweeps, regression) and /api/compare over them as
// central/API.md says, so web/tests/matrix.test.mjs knows what the page must show.
//
//   fx-race-1   a plain race, 6 runs each: fast-box 100..105 tok/s, slow-box 60..65
//   fx-race-2   the same setup later: fast-box 90..95 (slower beyond the intervals: a regression),
//               slow-box 60.5..65.5 (within the intervals)
//   fx-matrix   model × max_tokens, 4 cells: a winner only in the first (the intervals separate);
//               the second overlaps; qwen3-0.6b is not on slow-box (model_not_found)
//   fx-sweep    concurrency 1, 2, 4, 8 with slo TTFT p99 ≤ 1000 ms: fast-box sustains 4 streams,
//               slow-box 1; the per-stream decode rates separate at 4 and 8 (fast-box wins)
//   fx-load     max_tokens 8, 16 × concurrency 1, 2 (the job's max_tokens 8, repeat 2: 2 requests
//               per stream) with slo TTFT p99 ≤ 60000 ms, far above every point (30..420 ms);
//               fast-box's two points lie close together; both machines carry a fingerprint of the
//               job's settings (max 8) and a change since their previous job
import { cellsOf } from '../js/matrix.js';

const HOUR = 3600 * 1000;
const range = (from, n = 6, step = 1) => Array.from({ length: n }, (_, i) => from + i * step);

export const FIX = {
  race1: 'fx-race-1',
  race2: 'fx-race-2',
  matrix: 'fx-matrix',
  sweep: 'fx-sweep',
  load: 'fx-load',
  // per machine, by concurrency 1, 2 (the same in both max_tokens groups)
  loadLoad: {
    'fast-box': { ttft_p99: [30, 33], out: [150, 156] },
    'slow-box': { ttft_p99: [300, 420], out: [40, 60] },
  },
  sweepLoad: {
    'fast-box': { ttft_p99: [120, 300, 800, 1600], out: [150, 280, 480, 560] },
    'slow-box': { ttft_p99: [400, 1200, 2500, 4000], out: [60, 100, 130, 140] },
  },
};

export function seedFixtures({ jobs, machines, summaryOf }) {
  const now = Date.now();
  const label = (id) => machines.find((m) => m.machine_id === id)?.label ?? id;
  const metric = (index, tps, ttft, cell, extra = {}) => ({
    repeat_index: index, warmup: false, cold: false, ttft_ms: ttft, ttfot_ms: ttft, total_ms: ttft + (31 * 1000) / tps, gen_tokens: 32, token_count_source: 'mock', streamed_tokens: 32,
    gen_tokens_per_s: tps, tpot_ms: 1000 / tps, prompt_tokens: 12, ...(cell ? { cell } : {}), ...extra,
  });
  const machine = (id) => ({ machine_id: id, label: label(id), engine: 'mock', status: 'done', output_text: `fixture output of ${id}`, repeats: [], summary: null, error: null,
    last_seq: 0, seq: 0, nextIndex: 0, cellResults: new Map(), stop_reason: 'count', run_id: `${id}-fx-1` });
  const add = (m, cell, tpsList, ttftList) => {
    const runs = tpsList.map((tps, i) => metric(m.nextIndex++, tps, ttftList[i], cell));
    m.repeats.push(...runs);
    return runs;
  };
  const job = (id, created, spec, ms) => {
    const j = { job_id: id, created_ms: created, status: 'done', job: { test_type: 'llm_generate', prompt: 'Fixture prompt.', num_ctx: 2048, temperature: 0, repeat: 6, warmup: 0, ...spec },
      events: [], listeners: new Set(), machines: ms };
    jobs.set(id, j);
    return j;
  };

  // two plain races of the same setup
  for (const [id, created, fast, slow] of [[FIX.race1, now - 3 * HOUR, 100, 60], [FIX.race2, now - 2 * HOUR, 90, 60.5]]) {
    const f = machine('fast-box');
    const s = machine('slow-box');
    add(f, null, range(fast), range(20));
    add(s, null, range(slow), range(50));
    for (const m of [f, s]) m.summary = summaryOf(m.repeats);
    job(id, created, { model: 'gemma-3-270m', max_tokens: 32 }, [f, s]);
  }

  // a matrix of model × max_tokens
  {
    const matrix = { model: ['gemma-3-270m', 'qwen3-0.6b'], max_tokens: [32, 64] };
    const cells = cellsOf(matrix);
    const f = machine('fast-box');
    const s = machine('slow-box');
    const plan = {
      'fast-box': [[range(100), range(20)], [range(100), range(21)], [range(80), range(30)], [range(79), range(31)]],
      'slow-box': [[range(60), range(50)], [range(102.5), range(45)], null, null],
    };
    for (const m of [f, s]) {
      cells.forEach((c, i) => {
        const p = plan[m.machine_id][i];
        if (!p) {
          m.cellResults.set(c.cell, { cell: c.cell, values: c.values, status: 'failed', error: { code: 'model_not_found', message: `${m.machine_id} does not offer ${c.values.model}` }, stop_reason: 'count' });
          return;
        }
        const runs = add(m, c.cell, ...p);
        m.cellResults.set(c.cell, { cell: c.cell, values: c.values, status: 'done', summary: summaryOf(runs), stop_reason: 'count', repeat_range: [runs[0].repeat_index, runs[runs.length - 1].repeat_index] });
      });
      m.summary = m.cellResults.get(cells[0].cell).summary;
    }
    job(FIX.matrix, now - HOUR, { model: 'gemma-3-270m', max_tokens: 32, matrix }, [f, s]);
  }

  // a concurrency sweep against an SLO
  {
    const matrix = { concurrency: [1, 2, 4, 8] };
    const cells = cellsOf(matrix);
    const ms = ['fast-box', 'slow-box'].map((id) => {
      const m = machine(id);
      const plan = FIX.sweepLoad[id];
      cells.forEach((c, i) => {
        const conc = Number(c.values.concurrency);
        const p99 = plan.ttft_p99[i];
        // two requests per stream; their TTFTs topped by the p99
        const runs = Array.from({ length: 2 * conc }, (_, k) => metric(m.nextIndex++, plan.out[i] / conc, p99 * (0.6 + (0.4 * k) / Math.max(1, 2 * conc - 1)), c.cell, { stream: k % conc, start_ms: Math.floor(k / conc) * 400 }));
        m.repeats.push(...runs);
        const load = { concurrency: conc, requests: runs.length, wall_ms: 800, output_tokens: runs.length * 32, output_tokens_per_s: plan.out[i], requests_per_s: runs.length / 0.8,
          ttft_ms: { p50: p99 * 0.8, p90: p99 * 0.95, p99 }, per_stream_tokens_per_s: summaryOf(runs).gen_tokens_per_s };
        m.cellResults.set(c.cell, { cell: c.cell, values: c.values, status: 'done', summary: summaryOf(runs), load, stop_reason: 'count', repeat_range: [runs[0].repeat_index, runs[runs.length - 1].repeat_index] });
      });
      m.summary = m.cellResults.get(cells[0].cell).summary;
      return m;
    });
    job(FIX.sweep, now - HOUR / 2, { model: 'gemma-3-270m', max_tokens: 32, repeat: 2, matrix, slo: { ttft_p99_ms: 1000 } }, ms);
  }

  // load cells of max_tokens × concurrency, an SLO far above every point
  {
    const matrix = { max_tokens: [8, 16], concurrency: [1, 2] };
    const cells = cellsOf(matrix);
    const ms = ['fast-box', 'slow-box'].map((id) => {
      const m = machine(id);
      const plan = FIX.loadLoad[id];
      cells.forEach((c) => {
        const conc = Number(c.values.concurrency);
        const maxTokens = Number(c.values.max_tokens);
        const i = conc === 1 ? 0 : 1;
        const p99 = plan.ttft_p99[i];
        const runs = Array.from({ length: 2 * conc }, (_, k) => metric(m.nextIndex++, plan.out[i] / conc + k * 0.5, p99 * (0.7 + (0.3 * k) / Math.max(1, 2 * conc - 1)), c.cell,
          { stream: k % conc, start_ms: Math.floor(k / conc) * 300, gen_tokens: maxTokens, streamed_tokens: maxTokens }));
        m.repeats.push(...runs);
        const load = { concurrency: conc, requests: runs.length, wall_ms: 600, output_tokens: runs.length * maxTokens, output_tokens_per_s: plan.out[i], requests_per_s: runs.length / 0.6,
          ttft_ms: { p50: p99 * 0.8, p90: p99 * 0.95, p99 }, per_stream_tokens_per_s: summaryOf(runs).gen_tokens_per_s };
        m.cellResults.set(c.cell, { cell: c.cell, values: c.values, status: 'done', summary: summaryOf(runs), load, stop_reason: 'count', repeat_range: [runs[0].repeat_index, runs[runs.length - 1].repeat_index] });
      });
      m.summary = m.cellResults.get(cells[0].cell).summary;
      // the job-level fingerprint (the job's settings: max 8) and its change since the previous job
      m.fingerprint = { fingerprint_id: `fp-${id}-job`, hardware: { cpu: 'Fake CPU', cores: 8, memory_bytes: 16 * 2 ** 30, os: 'linux', arch: 'x86_64' },
        engine: { kind: 'mock', server: 'mock', version: '1.0' }, model: { name: 'gemma-3-270m', quantization: 'Q4_K_M' },
        settings: { mode: 'generate', num_ctx: 2048, max_tokens: 8, temperature: 0 } };
      m.previous = { job_id: FIX.race2, created_ms: now - 2 * HOUR, same: false, changes: [{ field: 'settings.max_tokens', before: '32', after: '8' }] };
      return m;
    });
    job(FIX.load, now - HOUR / 4, { model: 'gemma-3-270m', max_tokens: 8, repeat: 2, matrix, slo: { ttft_p99_ms: 60000 } }, ms);
  }
}
