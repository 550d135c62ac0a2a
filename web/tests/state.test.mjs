// Unit tests of the page's job state (web/js/state.js): no browser, no central.
//   node --test web/tests/state.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newJob, applyEvent, applySnapshot, liveRate, liveTokens, stats, clearWinner, machineStats, allTerminal, medianCi, separation, ciHalfWidthPct, MIN_CI_SAMPLES, TELEMETRY_KEPT } from '../js/state.js';

const ev = (machine_id, seq, type, payload) => ({ job_id: 'j1', machine_id, seq, ts_ms: 0, type, payload });
const metrics = (i, tps, ttft, warmup = false) => ({ repeat_index: i, warmup, ttft_ms: ttft, total_ms: 1000, gen_tokens: 10, token_count_source: 'mock', gen_tokens_per_s: tps });

test('a replayed event is applied once: text is never doubled', () => {
  const s = newJob('j1');
  const events = [
    ev('a', 1, 'job_accepted', { label: 'A', engine: 'mock', job: { model: 'm' } }),
    ev('a', 2, 'job_started', { repeat_index: 0, warmup: false }),
    ev('a', 3, 'llm_token', { repeat_index: 0, text: 'Hello', tokens: 1, t_ms: 20 }),
    ev('b', 1, 'job_started', { repeat_index: 0, warmup: false }),
    ev('a', 4, 'llm_token', { repeat_index: 0, text: ' world', tokens: 1, t_ms: 40 }),
  ];
  for (const e of events) applyEvent(s, e);
  // a reconnect replays from an earlier point
  for (const e of events.slice(1)) assert.equal(applyEvent(s, e), null);
  applyEvent(s, ev('a', 5, 'llm_token', { repeat_index: 0, text: '!', tokens: 1, t_ms: 60 }));
  assert.equal(s.machines.get('a').text, 'Hello world!');
  assert.equal(s.machines.get('a').label, 'A');
  assert.equal(s.machines.get('b').status, 'running');
  assert.equal(liveRate(s.machines.get('a')), 50); // 2 tokens after the first in 40 ms
});

test('without per-chunk counts the live rate is estimated from characters', () => {
  const s = newJob('j1');
  applyEvent(s, ev('a', 1, 'llm_token', { repeat_index: 0, text: 'abcd', t_ms: 100 }));
  applyEvent(s, ev('a', 2, 'llm_token', { repeat_index: 0, text: 'efghijklmnop', t_ms: 200 }));
  const m = s.machines.get('a');
  assert.equal(m.live.exact, false);
  assert.equal(liveTokens(m), 4);
  assert.equal(liveRate(m), 30); // 12 chars = 3 tokens in 100 ms
});

test('events of another job are ignored; a new run starts a fresh text', () => {
  const s = newJob('j1');
  assert.equal(applyEvent(s, { ...ev('a', 1, 'llm_token', { repeat_index: 0, text: 'x', t_ms: 1 }), job_id: 'other' }), null);
  applyEvent(s, ev('a', 1, 'job_started', { repeat_index: 0, warmup: true }));
  applyEvent(s, ev('a', 2, 'llm_token', { repeat_index: 0, text: 'warm', t_ms: 1 }));
  applyEvent(s, ev('a', 3, 'repeat_done', metrics(0, 99, 5, true)));
  applyEvent(s, ev('a', 4, 'job_started', { repeat_index: 1, warmup: false }));
  applyEvent(s, ev('a', 5, 'llm_token', { repeat_index: 1, text: 'real', t_ms: 1 }));
  const m = s.machines.get('a');
  assert.equal(m.text, 'real');
  assert.deepEqual(m.run, { index: 1, warmup: false, cold: false });
  assert.equal(machineStats(m).n, 0, 'warmups are not measured');
});

test('job_done carries the final output and metrics; a finished snapshot is taken as is', () => {
  const s = newJob('j1');
  applyEvent(s, ev('a', 1, 'llm_token', { repeat_index: 0, text: 'partial', t_ms: 1 }));
  applyEvent(s, ev('a', 2, 'job_done', { engine: 'mock', repeats: [metrics(0, 10, 20)], summary: {}, output_text: 'full text' }));
  assert.equal(s.machines.get('a').text, 'full text');
  assert.equal(s.machines.get('a').status, 'done');
  const t = newJob('j1');
  applySnapshot(t, { status: 'done', job: { model: 'm' }, machines: [{ machine_id: 'a', label: 'A', engine: 'mock', status: 'done', output_text: 'full', repeats: [metrics(0, 10, 20)], last_seq: 9 }] }, { withText: true });
  assert.equal(t.machines.get('a').text, 'full');
  assert.equal(applyEvent(t, ev('a', 9, 'llm_token', { repeat_index: 0, text: 'again', t_ms: 1 })), null);
  assert.ok(allTerminal(t));
});

test('a re-used job id is a new run: the pane starts afresh and the old run stays out', () => {
  const run = (machine_id, run_id, seq, type, payload) => ({ ...ev(machine_id, seq, type, payload), run_id });
  const s = newJob('j1');
  const first = [
    run('a', 'b1-1', 1, 'job_accepted', { label: 'A', engine: 'mock' }),
    run('a', 'b1-1', 2, 'job_started', { repeat_index: 0, warmup: false }),
    run('a', 'b1-1', 3, 'llm_token', { repeat_index: 0, text: 'one', t_ms: 1 }),
    run('a', 'b1-1', 4, 'job_done', { engine: 'mock', repeats: [metrics(0, 10, 20)], summary: {}, output_text: 'one' }),
  ];
  for (const e of first) applyEvent(s, e);
  assert.equal(s.machines.get('a').status, 'done');
  applyEvent(s, run('a', 'b1-2', 1, 'job_accepted', { label: 'A', engine: 'mock' }));
  applyEvent(s, run('a', 'b1-2', 2, 'job_started', { repeat_index: 0, warmup: false }));
  applyEvent(s, run('a', 'b1-2', 3, 'llm_token', { repeat_index: 0, text: 'two', t_ms: 1 }));
  const m = s.machines.get('a');
  assert.equal(m.text, 'two');
  assert.equal(m.status, 'running');
  assert.equal(m.repeats.length, 0);
  assert.deepEqual(m.earlierRuns, ['b1-1']);
  // A replay from the start does not bring the first run back.
  for (const e of first) assert.equal(applyEvent(s, e), null);
  assert.equal(s.machines.get('a').text, 'two');
  // A finished snapshot of the second run, then the whole replay: exactly the second run.
  const t = newJob('j1');
  applySnapshot(t, { status: 'done', machines: [{ machine_id: 'a', status: 'done', run_id: 'b1-2', earlier_runs: [{ run_id: 'b1-1' }], output_text: 'two', repeats: [], last_seq: 4 }] }, { withText: true });
  for (const e of first) assert.equal(applyEvent(t, e), null);
  assert.equal(t.machines.get('a').text, 'two');
  assert.equal(t.machines.get('a').status, 'done');
  // A refused re-submission is shown beside the run it leaves standing.
  applyEvent(t, { ...ev('a', 0, 'job_error', { code: 'queue_full', message: 'full' }), run_id: '' });
  assert.equal(t.machines.get('a').refused.code, 'queue_full');
  assert.equal(t.machines.get('a').status, 'done');
});

test('stats match schemas::Stats', () => {
  const st = stats([4, 1, 3, 2]);
  assert.deepEqual([st.n, st.median, st.mean, st.min, st.max], [4, 2.5, 2.5, 1, 4]);
  assert.ok(Math.abs(st.stdev - 1.2909944487358056) < 1e-12);
  assert.equal(stats([NaN, null]), null);
});

test('the median interval is the exact order-statistic one, as schemas::metrics::median_ci', () => {
  // The same table as the Rust test (Conover, table A3): 1-based ranks of the 95% interval.
  for (const [n, lo, hi] of [[6, 1, 6], [8, 1, 8], [9, 2, 8], [10, 2, 9], [12, 3, 10], [20, 6, 15], [50, 18, 33]]) {
    assert.deepEqual(medianCi(n), [lo - 1, hi - 1], `n = ${n}`);
  }
  assert.equal(MIN_CI_SAMPLES, 6);
  assert.equal(medianCi(5), null);
  assert.equal(medianCi(0), null);
  const st = stats(Array.from({ length: 20 }, (_, i) => i + 1));
  assert.deepEqual([st.ci_low, st.ci_high], [6, 15]);
  assert.ok(Math.abs(ciHalfWidthPct(st) - (4.5 / 10.5) * 100) < 1e-9);
  assert.equal(stats([1, 2, 3]).ci_low, null);
  assert.equal(ciHalfWidthPct(stats([1, 2, 3])), null);
});

test('separation matches schemas::Separation::of', () => {
  const a = stats([10.0, 10.1, 10.2, 10.3, 10.4, 10.5]);
  const b = stats([11.0, 11.1, 11.2, 11.3, 11.4, 11.5]);
  const c = stats([10.25, 10.35, 10.45, 10.55, 10.65, 10.75]);
  assert.deepEqual(separation(a, b), { separated: true, overlap_pct: 0 });
  const ac = separation(a, c);
  assert.equal(ac.separated, false);
  assert.ok(Math.abs(ac.overlap_pct - 50) < 1e-9, JSON.stringify(ac));
  assert.deepEqual(separation(a, stats([1, 2])), { separated: false, overlap_pct: null });
});

test('a winner is called only where the 95% intervals separate', () => {
  // Three repeats each with ranges far apart: the old min/max rule called it; now it needs 6 runs.
  const a3 = { machine_id: 'a', stat: stats([100, 104, 98]) };
  const b3 = { machine_id: 'b', stat: stats([90, 97, 93]) };
  const three = clearWinner([a3, b3], true);
  assert.deepEqual([three.winner, three.clear, three.needs], ['a', false, 6]);
  // Six each, separated: a winner (and for lower-is-better the other one).
  const a = { machine_id: 'a', stat: stats([100, 101, 102, 103, 104, 105]) };
  const b = { machine_id: 'b', stat: stats([90, 91, 92, 93, 94, 95]) };
  assert.deepEqual([clearWinner([a, b], true).winner, clearWinner([a, b], true).clear], ['a', true]);
  assert.deepEqual([clearWinner([a, b], false).winner, clearWinner([a, b], false).clear], ['b', true]);
  // Six each, overlapping by half: no clear winner, and by how much.
  const c = { machine_id: 'c', stat: stats([102.5, 103.5, 104.5, 105.5, 106.5, 107.5]) };
  const ac = clearWinner([a, c], true);
  assert.deepEqual([ac.winner, ac.clear], ['c', false]);
  assert.ok(Math.abs(ac.overlapPct - 50) < 1e-9, String(ac.overlapPct));
  assert.equal(clearWinner([a], true).clear, false);
  // a single repeat each: no interval, no verdict
  const one = { machine_id: 'one', stat: stats([200]) };
  const two = { machine_id: 'two', stat: stats([100]) };
  assert.equal(clearWinner([one, two], true).clear, false);
});

test('the cold run, warmups and short runs stay out of the measured stats', () => {
  const s = newJob('j1');
  const cold = { ...metrics(0, 5, 900), cold: true, load_ms: 850 };
  const short = { ...metrics(1, 500, 10), short_output: true };
  applyEvent(s, ev('a', 1, 'job_started', { repeat_index: 0, warmup: false, cold: true }));
  applyEvent(s, ev('a', 2, 'llm_token', { repeat_index: 0, text: 'cold', t_ms: 1 }));
  const m = s.machines.get('a');
  assert.deepEqual(m.run, { index: 0, warmup: false, cold: true });
  applyEvent(s, ev('a', 3, 'repeat_done', cold));
  applyEvent(s, ev('a', 4, 'repeat_done', short));
  for (let i = 2; i < 8; i++) applyEvent(s, ev('a', 3 + i, 'repeat_done', metrics(i, 100 + i, 20)));
  const st = machineStats(m);
  assert.equal(st.n, 6);
  assert.equal(st.excluded_short, 1);
  assert.equal(st.cold.load_ms, 850);
  assert.equal(st.gen_tokens_per_s.max, 107);
  assert.equal(st.gen_tokens_per_s.ci_low, 102);
  assert.equal(machineStats(m, true).n, 7);
  applyEvent(s, ev('a', 20, 'job_done', { engine: 'mock', repeats: m.repeats, summary: {}, output_text: 'x', stop_reason: 'precision', shape: { prompt_tokens: 512, depth: 0, max_tokens: 128, ignore_eos: true } }));
  assert.equal(m.stopReason, 'precision');
  assert.equal(m.shape.prompt_tokens, 512);
});

test('the newest fingerprint wins; telemetry samples are kept bounded, once each, and energy per token is summarised', () => {
  const s = newJob('j1');
  const fp = (id) => ({ fingerprint_id: id, hardware: {}, engine: {}, model: {}, settings: {} });
  applyEvent(s, { ...ev('a', 1, 'job_accepted', { label: 'A', fingerprint: fp('fp-cached') }), run_id: 'r1' });
  assert.equal(s.machines.get('a').fingerprint.fingerprint_id, 'fp-cached');
  applyEvent(s, { ...ev('a', 2, 'job_started', { repeat_index: 0, fingerprint: fp('fp-fresh') }), run_id: 'r1' });
  applyEvent(s, { ...ev('a', 3, 'job_started', { repeat_index: 1 }), run_id: 'r1' });
  assert.equal(s.machines.get('a').fingerprint.fingerprint_id, 'fp-fresh', 'a started event without one keeps it');
  for (let i = 0; i < TELEMETRY_KEPT + 10; i++) applyEvent(s, { ...ev('a', 4 + i, 'telemetry', { t_ms: i * 250, cpu_pct: i % 100 }), run_id: 'r1' });
  // a replay does not add them again
  applyEvent(s, { ...ev('a', 5, 'telemetry', { t_ms: 250, cpu_pct: 1 }), run_id: 'r1' });
  const m = s.machines.get('a');
  assert.equal(m.samples.length, TELEMETRY_KEPT);
  assert.equal(m.samples[m.samples.length - 1].t_ms, (TELEMETRY_KEPT + 9) * 250);
  const withEnergy = (i, jpt) => ({ ...metrics(i, 50, 10), telemetry: jpt === null ? undefined : { samples: 4, joules_per_token: jpt, tokens_per_joule: 1 / jpt, power_w: { mean: 100, peak: 120 } } });
  m.repeats = [withEnergy(0, 0.5), withEnergy(1, 0.25)];
  assert.equal(machineStats(m).joules_per_token.median, 0.375);
  m.repeats = [withEnergy(0, null)];
  assert.equal(machineStats(m).joules_per_token, null, 'no sensor: no energy stats, never 0');
});
