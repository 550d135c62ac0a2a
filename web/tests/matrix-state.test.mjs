// Unit tests of the page's matrix model (web/js/matrix.js): no browser, no central.
//   node --test web/tests/matrix-state.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseList, readMatrixFields, cellsOf, cellCount, matrixRows, capacityText, sweepPoints, MAX_CELLS } from '../js/matrix.js';
import { newJob, applyEvent, applySnapshot } from '../js/state.js';

test('comma lists: words kept, whole numbers checked, repeats refused', () => {
  assert.deepEqual(parseList(' a, b:q8 ,', { name: 'Models', kind: 'text' }), ['a', 'b:q8']);
  assert.deepEqual(parseList('1, 2,4', { name: 'C' }), [1, 2, 4]);
  assert.deepEqual(parseList('', { name: 'C' }), []);
  assert.throws(() => parseList('1, 1', { name: 'C' }), /C lists 1 twice/);
  assert.throws(() => parseList('2, x', { name: 'C' }), /C: "x" is not a whole number/);
  assert.throws(() => parseList('0', { name: 'C', min: 1 }), /not a whole number ≥ 1/);
  assert.throws(() => parseList('65', { name: 'C', max: 64 }), /from 1 to 64/);
});

test('the form\'s matrix fields become the job\'s matrix, order, requests and slo', () => {
  assert.deepEqual(readMatrixFields({ model: '', max_tokens: '', num_ctx: '', concurrency: '', order: 'interleaved' }), {}, 'no list: no matrix, no order');
  const out = readMatrixFields({ model: 'a, b', max_tokens: '32,64', num_ctx: '', concurrency: '1,4', order: 'interleaved', requests: '3', slo_ttft_p99_ms: '1000' });
  assert.deepEqual(out, { matrix: { model: ['a', 'b'], max_tokens: [32, 64], concurrency: [1, 4] }, order: 'interleaved', requests: 3, slo: { ttft_p99_ms: 1000 } });
  assert.throws(() => readMatrixFields({ max_tokens: '8' }, { profile: true }), /A profile sets the generated tokens/);
  assert.throws(() => readMatrixFields({ concurrency: '2' }, { auto: true }), /needs a number of repeats/);
  assert.throws(() => readMatrixFields({ requests: '2' }), /Requests per stream is for load cells/);
  assert.throws(() => readMatrixFields({ model: 'a,b,c,d,e', max_tokens: '1,2,3,4', concurrency: '1,2,3,4' }), new RegExp(`80 cells; at most ${MAX_CELLS}`));
});

test('cells are the product in AXES order, the last axis fastest (schemas Job::cells)', () => {
  const m = { concurrency: [1, 2], model: ['a', 'b:q8'], temperature: [0.7] };
  assert.equal(cellCount(m), 4);
  assert.deepEqual(cellsOf(m).map((c) => c.cell), [
    'model=a,temperature=0.7,concurrency=1', 'model=a,temperature=0.7,concurrency=2',
    'model=b:q8,temperature=0.7,concurrency=1', 'model=b:q8,temperature=0.7,concurrency=2',
  ]);
  assert.deepEqual(cellsOf(m)[3].values, { model: 'b:q8', temperature: '0.7', concurrency: '2' });
  assert.deepEqual(cellsOf({}), []);
});

test('matrix rows: central\'s cells brought up to date by cell_done and by runs of a cell', () => {
  const s = newJob('j1');
  applySnapshot(s, {
    status: 'running', job: { model: 'a', matrix: { model: ['a', 'b'] } },
    machines: [{ machine_id: 'm1', status: 'running' }, { machine_id: 'm2', status: 'running' }],
    cells: [
      { cell: 'model=a', values: { model: 'a' }, machines: [{ machine_id: 'm1', status: 'pending', runs: 0 }, { machine_id: 'm2', status: 'pending', runs: 0 }], ranking: [], winner: null },
      { cell: 'model=b', values: { model: 'b' }, machines: [{ machine_id: 'm1', status: 'pending', runs: 0 }, { machine_id: 'm2', status: 'pending', runs: 0 }], ranking: [], winner: null },
    ],
  });
  const ev = (machine_id, seq, type, payload) => ({ job_id: 'j1', machine_id, run_id: 'r', seq, ts_ms: 0, type, payload });
  applyEvent(s, ev('m1', 1, 'job_started', { repeat_index: 0, warmup: false, cell: 'model=a' }));
  assert.equal(s.machines.get('m1').run.cell, 'model=a');
  let rows = matrixRows(s);
  assert.equal(rows[0].machines.get('m1').status, 'running', 'the run streaming now makes its cell running');
  assert.equal(rows[1].machines.get('m1').status, 'pending');
  applyEvent(s, ev('m1', 2, 'repeat_done', { repeat_index: 0, warmup: false, ttft_ms: 10, total_ms: 100, gen_tokens: 8, gen_tokens_per_s: 80, cell: 'model=a' }));
  rows = matrixRows(s);
  assert.equal(rows[0].machines.get('m1').summary.gen_tokens_per_s.median, 80, 'the live summary of the cell\'s runs');
  applyEvent(s, ev('m1', 3, 'cell_done', { cell: 'model=a', values: { model: 'a' }, status: 'done', summary: { repeats: 1, gen_tokens_per_s: { n: 1, median: 81 } }, stop_reason: 'count' }));
  applyEvent(s, ev('m2', 1, 'cell_done', { cell: 'model=a', values: { model: 'a' }, status: 'failed', error: { code: 'model_not_found', message: 'no a' }, stop_reason: 'count' }));
  rows = matrixRows(s);
  assert.equal(rows[0].machines.get('m1').status, 'done');
  assert.equal(rows[0].machines.get('m1').summary.gen_tokens_per_s.median, 81, 'cell_done\'s summary wins');
  assert.equal(rows[0].machines.get('m2').error.code, 'model_not_found');
  // a replayed cell_done is not applied twice; a machine that fails fails its unfinished cells
  assert.equal(applyEvent(s, ev('m1', 3, 'cell_done', { cell: 'model=a', status: 'failed' })), null);
  applyEvent(s, ev('m2', 2, 'job_error', { code: 'stalled', message: 'gone' }));
  rows = matrixRows(s);
  assert.equal(rows[1].machines.get('m2').status, 'failed');
  assert.equal(rows[1].machines.get('m2').error.code, 'stalled');
  assert.equal(rows[0].machines.get('m2').error.code, 'model_not_found', 'a cell that ended keeps its own error');
});

test('the capacity answer in words, and the sweep\'s points in rising concurrency', () => {
  const pts = [2, 1, 4].map((c) => ({ concurrency: c, cell: `concurrency=${c}`, load: { output_tokens_per_s: c * 10, ttft_ms: { p50: 1, p90: 2, p99: c * 100 } } }));
  assert.equal(capacityText('m1', { capacity: 4, points: pts }, { ttft_p99_ms: 1000 }), 'm1 sustains 4 streams within TTFT p99 ≤ 1000 ms');
  assert.equal(capacityText('m1', { capacity: 1, points: pts }, { ttft_p99_ms: 250.5 }), 'm1 sustains 1 stream within TTFT p99 ≤ 250.5 ms');
  assert.equal(capacityText('m1', { capacity: null, points: sweepPoints({ points: pts }) }, { ttft_p99_ms: 50 }), 'm1 misses TTFT p99 ≤ 50 ms already at 1 stream');
  assert.match(capacityText('m1', { capacity: null, points: pts }, null), /no SLO set/);
  assert.deepEqual(sweepPoints({ points: pts }).map((p) => [p.concurrency, p.x, p.y]), [[1, 10, 100], [2, 20, 200], [4, 40, 400]]);
});
