// Browser test of fingerprints, live telemetry and energy per token, against a running bench-central:
// the test publishes a job's events into NATS itself, exactly as two agents would (one machine with a
// power sensor, one without), so what the page must show is known to the byte whatever the agents
// in the fleet report.
//
//   CENTRAL_URL=http://127.0.0.1:8080 NATS_URL=nats://127.0.0.1:4222 node --test web/tests/fingerprint.test.mjs
//
// Every wait has a timeout; nothing synchronises on a fixed sleep.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium, closeChromium } from './browser.mjs';
import { NatsPub } from './nats-pub.mjs';
import { stats } from '../js/state.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BASE = (process.env.CENTRAL_URL ?? '').replace(/\/+$/, '');
const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';
const T = Number(process.env.UI_TIMEOUT_S ?? 60) * 1000;
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? path.join(ROOT, 'artifacts', 'screenshots'));
if (!BASE) throw new Error('CENTRAL_URL is not set: point it at a running bench-central (see web/tests/run.sh)');

const example = (f) => JSON.parse(fs.readFileSync(path.join(ROOT, 'schemas', 'messages', f), 'utf8'));
const TAG = `${process.pid}-${Date.now()}`;
const LABEL = { gpu: 'FP GPU box', cpu: 'FP CPU box' };

function fingerprint(machine, build) {
  const gpu = machine === 'gpu';
  return {
    fingerprint_id: `fp-${gpu ? 'a' : 'b'}${build === 'b6000' ? '0' : '1'}00000000000000`,
    hardware: {
      cpu: gpu ? 'AMD EPYC 9654' : 'Intel Xeon 6430', cores: 16, memory_bytes: 128 * 2 ** 30, os: 'linux', arch: 'x86_64',
      os_version: 'Debian GNU/Linux 12', kernel_version: '6.1.0-27-amd64',
      gpus: gpu ? [{ index: 0, vendor: 'nvidia', name: 'NVIDIA H200', memory_bytes: 141 * 2 ** 30, driver_version: '570.86', source: 'nvml' }] : [],
    },
    engine: { kind: 'openai', server: 'llama.cpp', build: `${build}-abc1234` },
    model: { name: 'gemma-3-270m', quantization: 'Q4_K_M', parameter_size: '268M', parameter_count: 268098176, digest: 'sha256:abc' },
    settings: { mode: 'generate', num_ctx: 2048, max_tokens: 16, cache: 'cold', temperature: 0 },
  };
}

/** One machine's events of one job, numbered as an agent numbers them. */
class Agent {
  constructor(jobId, key, build) {
    this.jobId = jobId;
    this.machine = `ui-fp-${key}`;
    this.key = key;
    this.build = build;
    this.seq = 0;
    this.power = key === 'gpu';
  }

  ev(type, payload) {
    return { job_id: this.jobId, machine_id: this.machine, run_id: `uifp${TAG}-1`, seq: ++this.seq, ts_ms: Date.now(), type, payload };
  }

  start() {
    const job = { ...example('event_job_accepted.json').payload.job, job_id: this.jobId, model: 'gemma-3-270m', max_tokens: 16 };
    return [
      this.ev('job_accepted', { job, position: 0, engine: 'openai', engine_url: '', label: LABEL[this.key], agent_version: 'test', fingerprint: fingerprint(this.key, this.build) }),
      this.ev('job_started', { repeat_index: 0, warmup: false, fingerprint: fingerprint(this.key, this.build) }),
    ];
  }

  samples(n, from = 0) {
    return Array.from({ length: n }, (_, i) => this.ev('telemetry', {
      repeat_index: 0, t_ms: (from + i) * 250, cpu_pct: 20 + ((from + i) % 5) * 10, mem_used_bytes: (8 + i) * 2 ** 30,
      power_w: this.power ? 280 + i * 5 : undefined,
      gpus: this.power ? [{ index: 0, util_pct: 80 + (i % 3) * 5, power_w: 250 }] : [],
      sources: this.power ? { cpu: 'sysinfo', gpu: 'nvml', power: 'rapl+nvml' } : { cpu: 'sysinfo' },
    }));
  }

  finish(jpt) {
    const m = { ...example('metrics.json'), repeat_index: 0, gen_tokens_per_s: this.power ? 120 : 60, tg_tokens_per_s: this.power ? 120 : 60 };
    m.telemetry = {
      samples: 8, cpu_pct: { mean: 35, peak: 60 },
      ...(jpt ? { power_w: { mean: 300, peak: 320 }, energy_j: jpt * m.gen_tokens, joules_per_token: jpt, tokens_per_joule: 1 / jpt, power_source: 'rapl+nvml' } : {}),
    };
    const done = example('event_job_done.json').payload;
    const over = (f) => stats([f(m)].filter((v) => v !== undefined && v !== null));
    const summary = { ...done.summary, gen_tokens_per_s: over((r) => r.gen_tokens_per_s), tg_tokens_per_s: over((r) => r.tg_tokens_per_s) };
    if (jpt) Object.assign(summary, { joules_per_token: over((r) => r.telemetry.joules_per_token), tokens_per_joule: over((r) => r.telemetry.tokens_per_joule), power_w: over((r) => r.telemetry.power_w.mean) });
    return [
      this.ev('repeat_done', m),
      this.ev('job_done', { ...done, model: 'gemma-3-270m', engine: 'openai', repeats: [m], summary, output_text: 'ok', stop_reason: 'count', fingerprint: fingerprint(this.key, this.build) }),
    ];
  }
}

let ctx;
let page;
let profile;
let nats;
const pageErrors = [];

const pane = (key) => `#panes .pane[data-machine="ui-fp-${key}"]`;

describe('fingerprints, live telemetry and energy per token in headless Chromium', () => {
  before(async () => {
    nats = await NatsPub.connect(NATS_URL);
    ({ ctx, page, profile } = await launchChromium('fp-', { timeout: T, pageErrors, dialogs: false }));
  });

  after(async () => {
    await closeChromium({ ctx, profile });
    nats?.close();
  });

  const job1 = `ui-fp-1-${TAG}`;
  const job2 = `ui-fp-2-${TAG}`;

  it('shows each pane\'s fingerprint, then live sparklines from telemetry events, "no sensor" without power', async () => {
    const gpu = new Agent(job1, 'gpu', 'b6000');
    const cpu = new Agent(job1, 'cpu', 'b6000');
    await nats.publishAll([...gpu.start(), ...cpu.start()]);
    await page.goto(`${BASE}/#job=${job1}`, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction((sel) => /NVIDIA H200/.test(document.querySelector(sel)?.textContent ?? ''), `${pane('gpu')} .fp-summary`, { timeout: T });
    const summary = await page.textContent(`${pane('gpu')} .fp-summary`);
    for (const want of ['AMD EPYC 9654', 'NVIDIA H200', '128 GiB', 'llama.cpp b6000-abc1234', 'Q4_K_M', '268M', fingerprint('gpu', 'b6000').fingerprint_id]) {
      assert.ok(summary.includes(want), `fingerprint line has ${want}: ${summary}`);
    }
    assert.match(await page.getAttribute(`${pane('gpu')} .pane-fp`, 'title'), /model\.digest: sha256:abc/, 'the whole fingerprint on hover');
    await page.click(`${pane('gpu')} .fp-summary`);
    assert.match(await page.textContent(`${pane('gpu')} .fp-parts`), /driver 570\.86/, 'and on expand');
    assert.equal(await page.$$eval(`${pane('gpu')} .spark-line`, (l) => l.length), 0, 'no sparkline before any sample');

    // live: the samples arrive while the page is open
    await nats.publishAll([...gpu.samples(8), ...cpu.samples(8)]);
    for (const k of ['cpu', 'mem', 'gpu', 'power']) {
      await page.waitForSelector(`${pane('gpu')} .spark[data-k="${k}"] polyline.spark-line`, { timeout: T });
    }
    await page.waitForSelector(`${pane('cpu')} .spark[data-k="cpu"] polyline.spark-line`, { timeout: T });
    assert.equal(await page.textContent(`${pane('cpu')} .spark[data-k="power"] .spark-v`), 'no sensor');
    assert.equal(await page.$$eval(`${pane('cpu')} .spark[data-k="power"] polyline`, (l) => l.length), 0, 'no line for a missing sensor');
    assert.equal(await page.textContent(`${pane('gpu')} .spark[data-k="power"] .spark-v`), '315 W', 'the latest power');
    const points = await page.getAttribute(`${pane('gpu')} .spark[data-k="cpu"] polyline`, 'points');
    assert.equal(points.trim().split(/\s+/).length, 8, 'one point per sample');
    fs.mkdirSync(SHOTS, { recursive: true });
    await page.screenshot({ path: path.join(SHOTS, 'fp-01-live-telemetry.png') });

    // a reload rebuilds the sparklines from the replayed stream
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForFunction((sel) => (document.querySelector(sel)?.getAttribute('points') ?? '').trim().split(/\s+/).length === 8, `${pane('gpu')} .spark[data-k="cpu"] polyline`, { timeout: T });

    // results: energy per token where there is power, "no sensor" where not; no energy ranking
    await nats.publishAll([...gpu.finish(0.5), ...cpu.finish(null)]);
    await page.waitForFunction(() => [...document.querySelectorAll('#panes .pane')].every((p) => p.dataset.state === 'done'), null, { timeout: T });
    const energyOf = (k) => page.textContent(`${pane(k)} .metric.energy .val`);
    assert.equal(await energyOf('gpu'), '0.500 J/tok');
    assert.equal(await energyOf('cpu'), 'no sensor');
    await page.waitForSelector('#verdict .verdict-energy', { timeout: T });
    assert.match(await page.textContent('#verdict .verdict-energy'), /Energy: no sensor on FP CPU box/);
    const doc = await (await fetch(`${BASE}/api/jobs/${job1}`)).json();
    assert.equal(doc.energy.available, false);
    assert.equal(doc.energy.reason, 'no sensor on FP CPU box');
  });

  it('ranks energy per token when every racer has power, and lists fingerprint changes against the previous job and a chosen one', async () => {
    const gpu = new Agent(job2, 'gpu', 'b6100');
    const cpu = new Agent(job2, 'cpu', 'b6000');
    cpu.power = true; // a sensor on both this time
    await nats.publishAll([...gpu.start(), ...cpu.start(), ...gpu.samples(4), ...cpu.samples(4), ...gpu.finish(0.5), ...cpu.finish(0.8)]);
    await page.goto(`${BASE}/#job=${job2}`, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => [...document.querySelectorAll('#panes .pane')].length === 2 && [...document.querySelectorAll('#panes .pane')].every((p) => p.dataset.state === 'done'), null, { timeout: T });
    await page.waitForFunction(() => /uses the least energy per token/.test(document.querySelector('#verdict .verdict-energy')?.textContent ?? ''), null, { timeout: T });
    assert.match(await page.textContent('#verdict .verdict-energy'), /Energy: FP GPU box uses the least energy per token — 0\.500 vs 0\.800 J\/tok \(37\.5% less than FP CPU box\)/);
    // the GPU box's engine build changed since job 1: said in its pane; the CPU box's did not
    await page.waitForSelector(`${pane('gpu')} .fp-changed`, { timeout: T });
    const changed = await page.textContent(`${pane('gpu')} .fp-changed`);
    assert.match(changed, new RegExp(`1 change since the previous job on this machine \\(${job1}`), changed);
    assert.match(changed, /engine\.build: b6000-abc1234 → b6100-abc1234/, changed);
    assert.match(await page.textContent(`${pane('cpu')} .fp-same`), /same fingerprint as the previous job/);
    // history: compare the open job with job 1
    const diffBtn = page.locator(`#history-list [data-diff="${job1}"]`);
    await diffBtn.waitFor({ timeout: T });
    await diffBtn.click();
    await page.waitForFunction(() => document.querySelectorAll('#fp-diff-body .fp-diff-item').length === 2, null, { timeout: T });
    const gpuDiff = await page.textContent('#fp-diff-body .fp-diff-item[data-machine="ui-fp-gpu"]');
    assert.match(gpuDiff, /1 difference: FP GPU box in ui-fp-1-/, gpuDiff);
    assert.match(gpuDiff, /engine\.build: b6000-abc1234 → b6100-abc1234/, gpuDiff);
    assert.match(await page.textContent('#fp-diff-body .fp-diff-item[data-machine="ui-fp-cpu"]'), /^Same fingerprint/);
    await page.screenshot({ path: path.join(SHOTS, 'fp-02-energy-and-diff.png'), fullPage: true });
  });

  it('raised no page errors', () => {
    assert.deepEqual(pageErrors, []);
  });
});
