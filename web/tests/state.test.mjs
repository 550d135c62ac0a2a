// Unit tests of the page's job state (web/js/state.js): no browser, no central.
//   node --test web/tests/state.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newJob, applyEvent, applySnapshot, liveRate, liveTokens, stats, clearWinner, machineStats, allTerminal } from '../js/state.js';

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
  assert.deepEqual(m.run, { index: 1, warmup: false });
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

test('a winner is called only when the gap is larger than the spread', () => {
  const a = { machine_id: 'a', stat: stats([100, 104, 98]) };
  const b = { machine_id: 'b', stat: stats([90, 97, 93]) };
  const c = { machine_id: 'c', stat: stats([99, 101]) };
  assert.deepEqual([clearWinner([a, b], true).winner, clearWinner([a, b], true).clear], ['a', true]);
  assert.deepEqual([clearWinner([a, c], true).winner, clearWinner([a, c], true).clear], ['a', false]);
  // lower is better (TTFT)
  assert.deepEqual([clearWinner([a, b], false).winner, clearWinner([a, b], false).clear], ['b', true]);
  assert.equal(clearWinner([a], true).clear, false);
  // a single repeat each: no spread, no verdict
  const one = { machine_id: 'one', stat: stats([200]) };
  const two = { machine_id: 'two', stat: stats([100]) };
  assert.equal(clearWinner([one, two], true).clear, false);
});
