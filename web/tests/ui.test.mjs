// Browser test of the bench-race UI: Debian's headless Chromium driven over CDP by playwright-core
// (executablePath, never a downloaded browser), against a running bench-central.
//
//   CENTRAL_URL=http://127.0.0.1:8080 node --test web/tests/ui.test.mjs
//
// Needs a fleet of at least two machines that both offer one model (web/tests/run.sh starts
// nats-server, central, a mock agent and a llama-server agent, then runs this). Optional env:
// TEST_MODEL (default: the model offered by the most machines), UI_TIMEOUT_S (default 120),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR (default artifacts/screenshots).
// The matrix test (max tokens 8,16 × concurrency 1,2,4 on two machines) also writes
// docs/screenshot-matrix.png (the README's picture of the matrix view).
// Every wait has a timeout; nothing synchronises on a fixed sleep.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium, closeChromium } from './browser.mjs';
import { rate, ms, num } from '../js/format.js';
import { hasCi } from '../js/state.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BASE = (process.env.CENTRAL_URL ?? '').replace(/\/+$/, '');
const T = Number(process.env.UI_TIMEOUT_S ?? 120) * 1000;
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? path.join(ROOT, 'artifacts', 'screenshots'));
const DOCS = path.join(ROOT, 'docs');
const XSS = '<img src=x onerror=window.__xss=1>';
const PROMPT = `Write one short sentence about fast computers. ${XSS}`;

if (!BASE) throw new Error('CENTRAL_URL is not set: point it at a running bench-central (see web/tests/run.sh)');

let ctx;
let page;
let profile;
const pageErrors = [];
const shots = [];
/** This test's screenshots: 01-fleet.png … 08-matrix-fleet-cell.png. */
const OWN_SHOT = /^\d\d[a-z]?-[\w-]+\.png$/;
/** Other tests' screenshots found at the start (kept). */
const othersShots = [];

async function shot(name, opts = {}) {
  fs.mkdirSync(SHOTS, { recursive: true });
  const file = path.join(SHOTS, name + '.png');
  await page.screenshot({ path: file, ...opts });
  shots.push(file);
  return file;
}

async function api(p, init) {
  const res = await fetch(BASE + p, init);
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

/** The job id in the page's URL hash, waited for (and other than `not`). */
async function currentJobId(not = null) {
  await page.waitForFunction((old) => /^#job=[A-Za-z0-9_-]+$/.test(location.hash) && location.hash !== '#job=' + old, not, { timeout: T });
  return page.evaluate(() => decodeURIComponent(location.hash.slice(5)));
}

/** Resolves when every pane of the job on screen has reached a final state. */
async function waitAllFinished(states = ['done']) {
  await page.waitForFunction((want) => {
    const panes = [...document.querySelectorAll('#panes .pane')];
    return panes.length >= 1 && panes.every((p) => want.includes(p.dataset.state));
  }, states, { timeout: T, polling: 100 });
}

async function paneOutputs() {
  return page.evaluate(() => Object.fromEntries([...document.querySelectorAll('#panes .pane')].map((p) => [p.dataset.machine, p.querySelector('.output').textContent])));
}

/** Watches every pane from inside the page: records each distinct output length seen while the pane is running. */
async function installStreamWatch() {
  await page.evaluate(() => {
    const seen = {};
    window.__streamSeen = seen;
    const look = () => {
      for (const p of document.querySelectorAll('#panes .pane')) {
        const id = p.dataset.machine;
        seen[id] ??= { lengths: [], live: [] };
        const len = p.querySelector('.output').textContent.length;
        const s = seen[id];
        if (p.dataset.state === 'running' && len > 0 && s.lengths[s.lengths.length - 1] !== len) s.lengths.push(len);
        const live = p.querySelector('.pane-live').textContent;
        if (live && s.live[s.live.length - 1] !== live) s.live.push(live);
      }
    };
    new MutationObserver(look).observe(document.getElementById('panes'), { subtree: true, childList: true, characterData: true, attributes: true });
  });
}

async function chooseModel() {
  const options = await page.$$eval('#f-model option', (os) => os.map((o) => o.value).filter(Boolean));
  assert.ok(options.length > 0, 'the model list offers the fleet\'s models');
  const model = process.env.TEST_MODEL ?? options[0];
  assert.ok(options.includes(model), `model ${model} is offered (offered: ${options.join(', ')})`);
  await page.selectOption('#f-model', model);
  return model;
}

async function fillForm({ prompt, maxTokens, repeat, warmup = 0 }) {
  await page.selectOption('#f-shape', 'free');
  await page.selectOption('#f-repeat-mode', 'count');
  await page.fill('#f-depth', '0');
  await page.fill('#f-prompt', prompt);
  await page.fill('#f-max', String(maxTokens));
  await page.fill('#f-ctx', '2048');
  await page.fill('#f-temp', '0');
  await page.fill('#f-repeat', String(repeat));
  await page.fill('#f-warmup', String(warmup));
  await page.fill('#f-seed', '');
  if (!(await page.isChecked('#f-all'))) await page.check('#f-all');
}

describe('bench-race web UI in headless Chromium', () => {
  before(async () => {
    // this test's earlier screenshots only (NN-name.png); the other tests' (matrix.test.mjs's mx-*)
    // stay, whichever ran first
    if (fs.existsSync(SHOTS)) {
      for (const f of fs.readdirSync(SHOTS)) {
        if (!f.endsWith('.png')) continue;
        if (OWN_SHOT.test(f)) fs.rmSync(path.join(SHOTS, f));
        else othersShots.push(f);
      }
    }
    ({ ctx, page, profile } = await launchChromium('ui-', { timeout: T, pageErrors, viewport: { width: 1280, height: 800 } }));
  });

  after(async () => {
    await closeChromium({ ctx, profile });
    if (shots.length) console.log('screenshots:\n  ' + shots.join('\n  '));
  });

  let raceJob;
  let raceOutputs;

  it('loads the page and shows the fleet: two machines with live status', async () => {
    await page.goto(BASE + '/', { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => document.querySelectorAll('#panes .pane').length >= 2, null, { timeout: T });
    await page.waitForFunction(() => document.getElementById('conn').dataset.state === 'live', null, { timeout: T });
    const badges = await page.$$eval('#panes .pane .badge', (bs) => bs.map((b) => b.textContent));
    assert.ok(badges.length >= 2);
    for (const b of badges) assert.ok(['idle', 'busy', 'offline'].includes(b), `status badge is idle/busy/offline, got ${b}`);
    assert.ok(badges.filter((b) => b !== 'offline').length >= 2, `two machines online, got ${badges.join(', ')}`);
    // every form control is labelled (once the fleet's machine list has settled: it is re-rendered
    // as heartbeats arrive; seen once in CI with both machine checkboxes momentarily unlabelled)
    const SEL = '#run-form input, #run-form select, #run-form textarea';
    await page.waitForFunction((sel) => [...document.querySelectorAll(sel)].every((e) => e.labels && e.labels.length > 0), SEL, { timeout: 10000, polling: 100 }).catch(() => {});
    const unlabelled = await page.$$eval('#run-form input, #run-form select, #run-form textarea', (els) => els.filter((e) => !e.labels || e.labels.length === 0).map((e) => e.id || e.name || e.outerHTML.slice(0, 60)));
    assert.deepEqual(unlabelled, [], 'every control has a label');
    await shot('01-fleet');
  });

  it('runs a race: tokens stream into both panes, then metrics, chart and table', async () => {
    const model = await chooseModel();
    await fillForm({ prompt: PROMPT, maxTokens: 64, repeat: 3, warmup: 1 });
    await installStreamWatch();
    // Ctrl+Enter in the prompt runs it
    await page.focus('#f-prompt');
    await page.keyboard.press('Control+Enter');
    raceJob = await currentJobId();
    await page.waitForFunction(() => document.querySelectorAll('#panes .pane').length >= 2, null, { timeout: T });
    // a moment where both stream at once makes the best picture; not required (one may be much faster)
    const streaming = (n) => page.waitForFunction((k) => [...document.querySelectorAll('#panes .pane')]
      .filter((p) => p.dataset.state === 'running' && p.querySelector('.output').textContent.length > 20).length >= k, n, { timeout: 10000, polling: 50 });
    await streaming(2).then(() => shot('02-streaming'), () => streaming(1).then(() => shot('02-streaming-one'), () => {}));
    await waitAllFinished(['done']);
    const seen = await page.evaluate(() => window.__streamSeen);
    const ids = Object.keys(seen);
    assert.ok(ids.length >= 2, 'two panes watched');
    for (const id of ids) {
      assert.ok(seen[id].lengths.length >= 2, `${id}: output grew while streaming (lengths seen: ${seen[id].lengths.join(',')})`);
      assert.ok(seen[id].live.some((l) => /tok\/s live/.test(l)), `${id}: live tokens/s shown while streaming (${seen[id].live.slice(0, 3).join(' | ')})`);
    }
    // final metrics in every pane
    const metrics = await page.$$eval('#panes .pane', (ps) => ps.map((p) => ({
      id: p.dataset.machine,
      vals: Object.fromEntries([...p.querySelectorAll('.metric')].map((m) => [m.querySelector('dt').textContent, m.querySelector('.val').textContent])),
    })));
    for (const m of metrics) {
      assert.match(m.vals['TTFT'], /\d.* ms|\d.* s/, `${m.id}: TTFT shown`);
      assert.match(m.vals['decode tok/s'], /\d/, `${m.id}: decode tok/s shown`);
      assert.match(m.vals['total'], /\d/, `${m.id}: total shown`);
      assert.match(m.vals['tokens'], /\d/, `${m.id}: tokens shown`);
      assert.notEqual(m.vals['engine'], '–', `${m.id}: engine shown`);
    }
    // chart: a bar per machine in both charts, whiskers over 3 repeats, and the table
    await page.waitForSelector('#compare:not([hidden])', { timeout: T });
    const bars = await page.$$eval('#chart-tps .chart-bar', (b) => b.length);
    const ttftBars = await page.$$eval('#chart-ttft .chart-bar', (b) => b.length);
    assert.ok(bars >= 2 && ttftBars >= 2, `bars in both charts (${bars}, ${ttftBars})`);
    const rows = await page.$$eval('#cmp-table tbody tr', (r) => r.length);
    assert.ok(rows >= 2, 'a table row per machine');
    // 3 repeats: ranges, but no 95% interval of the median (it needs 6 runs), so no winner is
    // called however far apart the machines are; the page says what it would take.
    const verdict = await page.textContent('#verdict');
    assert.match(verdict, /Decode: no clear winner — .*a 95% interval needs 6 runs per machine .*repeat "auto"/, `the decode verdict asks for 6 runs (${verdict})`);
    assert.equal(await page.$$eval('#cmp-table tbody tr.is-winner', (r) => r.length), 0, 'no winner marked');
    assert.match(await page.textContent('#chart-tps .chart-note'), /whisker = min–max/, 'the whisker is min–max without an interval');
    const rank1 = (await api(`/api/jobs/${raceJob}`)).body.ranking[0];
    assert.equal(rank1.clear_winner, false);
    assert.match(rank1.verdict, /^needs 6 repeats per machine/);
    // the page shows what central stored, text for text (no doubled or lost tokens)
    raceOutputs = await paneOutputs();
    const doc = (await api(`/api/jobs/${raceJob}`)).body;
    assert.equal(doc.job.model, model);
    for (const m of doc.machines) {
      assert.equal(m.status, 'done', `${m.machine_id} done in central`);
      assert.ok(m.output_text.length > 0, `${m.machine_id} produced text`);
      assert.equal(raceOutputs[m.machine_id], m.output_text, `${m.machine_id}: pane text equals central's output_text`);
    }
    await page.evaluate(() => window.scrollTo(0, 0));
    await shot('03-race-done');
    await shot('03-race-done-full', { fullPage: true });
  });

  it('races a pp32-tg16 profile with repeat "auto": pp/tg rates, 95% intervals, a verdict on them and why each stopped', async () => {
    const prev = await page.evaluate(() => decodeURIComponent(location.hash.slice(5)));
    await page.selectOption('#f-shape', 'profile');
    assert.equal(await page.isVisible('#f-prompt'), false, 'a profile needs no prompt');
    assert.equal(await page.isVisible('#f-max'), false, 'a profile sets the output length');
    await page.fill('#f-pp', '32');
    await page.fill('#f-tg', '16');
    await page.fill('#f-depth', '0');
    await page.fill('#f-ctx', '2048');
    await page.selectOption('#f-repeat-mode', 'auto');
    assert.equal(await page.isVisible('#f-repeat'), false);
    await page.fill('#f-max-repeat', '8');
    await page.fill('#f-target-ci', '2');
    await page.fill('#f-warmup', '1');
    if (!(await page.isChecked('#f-all'))) await page.check('#f-all');
    // a max_repeat below 6 can give no interval: refused in the form, nothing sent
    await page.fill('#f-max-repeat', '5');
    await page.click('#run-btn');
    await page.waitForFunction(() => /Max repeats must be a whole number ≥ 6/.test(document.getElementById('form-msg').textContent), null, { timeout: T });
    await page.fill('#f-max-repeat', '8');
    await page.click('#run-btn');
    const id = await currentJobId(prev);
    await waitAllFinished(['done']);
    const doc = (await api(`/api/jobs/${id}`)).body;
    assert.equal(doc.job.profile, 'pp32-tg16');
    assert.equal(doc.job.repeat, 'auto');
    assert.equal(doc.job.max_repeat, 8);
    assert.equal(doc.job.prompt, '');
    assert.match(await page.textContent('#job-meta'), /pp32-tg16/);
    assert.match(await page.textContent('#job-meta'), /auto \(max 8, ±2%\)/);
    for (const m of doc.machines) {
      assert.equal(m.status, 'done', JSON.stringify(m.error));
      assert.ok(['precision', 'decided', 'max_repeat'].includes(m.stop_reason), `${m.machine_id}: stop_reason ${m.stop_reason}`);
      const n = m.summary.repeats;
      assert.ok(n >= 6 && n <= 8, `${m.machine_id}: ${n} measured runs`);
      const pane = page.locator(`#panes .pane[data-machine="${m.machine_id}"]`);
      const vals = Object.fromEntries(await pane.locator('.metric').evaluateAll((ms) => ms.map((x) => [x.querySelector('dt').textContent, x.querySelector('.val').textContent])));
      assert.match(vals['pp tok/s'], /\d/, `${m.machine_id}: pp shown`);
      assert.match(vals['tg tok/s'], /\d/, `${m.machine_id}: tg shown`);
      const notes = await pane.locator('.pane-notes').textContent();
      const want = { precision: /stopped: interval ±[\d.]+% reached/, decided: /stopped: decided/, max_repeat: /stopped: max_repeat reached/ }[m.stop_reason];
      assert.match(notes, want, `${m.machine_id}: ${notes}`);
      if (m.summary.cold) assert.match(notes, /cold run .*not counted/);
      assert.match(await pane.locator('.metric.key .sub').textContent(), /95% CI/, `${m.machine_id}: the decode rate's interval shown`);
    }
    // the verdict follows the intervals, as central's ranking does
    const rank1 = doc.ranking[0];
    const verdict = await page.textContent('#verdict');
    assert.ok(rank1.separation && rank1.separation.overlap_pct !== null, JSON.stringify(rank1));
    if (rank1.clear_winner) {
      assert.match(verdict, /Decode: .* wins — .*95% intervals of the medians are separated/, verdict);
      assert.match(rank1.verdict, /^clear winner: /);
    } else {
      assert.match(verdict, /Decode: no clear winner — .*95% intervals overlap by \d+%/, verdict);
      assert.match(rank1.verdict, /^no clear winner: intervals overlap by \d+%/);
    }
    assert.match(await page.textContent('#chart-tps .chart-note'), /whisker = 95% CI/);
    await shot('03b-profile-auto');
    // the CSV carries the shape
    const csv = await (await fetch(`${BASE}/api/jobs/${id}/export.csv`)).text();
    // RFC 4180 cells: labels such as "llama.cpp, gemma" are quoted and hold commas
    const cells = (l) => [...l.matchAll(/("(?:[^"]|"")*"|[^,]*)(?:,|$)/g)].map((m) => m[1]).slice(0, -1);
    const [head, row] = csv.trim().split('\n').map(cells);
    assert.equal(row[head.indexOf('profile')], 'pp32-tg16');
    assert.equal(row[head.indexOf('job_prompt_tokens')], '32');
    // back to the first race for the tests below
    await page.goto(BASE + '/#job=' + raceJob, { waitUntil: 'domcontentloaded' });
    await waitAllFinished(['done']);
  });

  it('renders the prompt and outputs as text: <img onerror> runs nothing', async () => {
    const promptText = await page.textContent('#job-prompt');
    assert.ok(promptText.includes(XSS), 'the prompt is shown literally');
    assert.equal(await page.evaluate(() => document.querySelectorAll('img').length), 0, 'no <img> element was created');
    assert.equal(await page.evaluate(() => typeof window.__xss), 'undefined');
    assert.equal(await page.evaluate(() => typeof window.__xss_out), 'undefined');
    const hist = await page.textContent(`#history-list [data-job="${raceJob}"]`);
    assert.ok(hist.includes('<img src=x'), 'history shows the prompt as text');
  });

  it('sorts the table and pins a baseline', async () => {
    const header = page.locator('#cmp-table th[data-key="ttft"] button');
    await header.click();
    assert.equal(await page.getAttribute('#cmp-table th[data-key="ttft"]', 'aria-sort'), 'ascending');
    const ttfts = await page.$$eval('#cmp-table tbody tr', (rs) => rs.map((r) => r.querySelector('td[data-key="ttft"] .cell-val').textContent));
    const nums = ttfts.map((t) => Number(t.replace(/,/g, '')));
    assert.deepEqual(nums, [...nums].sort((a, b) => a - b), 'sorted by TTFT ascending');
    await header.press('Enter'); // keyboard works on the header too
    assert.equal(await page.getAttribute('#cmp-table th[data-key="ttft"]', 'aria-sort'), 'descending');
    const first = await page.getAttribute('#panes .pane >> nth=0', 'data-machine');
    await page.click('#panes .pane >> nth=0 >> .pin');
    await page.waitForFunction(() => document.querySelector('#panes .pane .pin').getAttribute('aria-pressed') === 'true', null, { timeout: T });
    await page.waitForFunction(() => document.querySelectorAll('#panes .pane .delta').length > 0, null, { timeout: T });
    const dTable = await page.$$eval('#cmp-table tbody td .delta', (d) => d.length);
    assert.ok(dTable >= 1, 'table shows deltas against the baseline');
    assert.match(await page.textContent('#baseline-note'), /baseline/);
    await shot('04-baseline');
    assert.ok(first);
  });

  it('after a reload the job is in history, and opening it shows the same output and metrics', async () => {
    await page.goto(BASE + '/', { waitUntil: 'domcontentloaded' });
    await page.evaluate(() => localStorage.removeItem('bench-race.current-job'));
    await page.reload({ waitUntil: 'domcontentloaded' });
    const item = page.locator(`#history-list [data-job="${raceJob}"]`);
    await item.waitFor({ timeout: T });
    await item.click();
    await currentJobId();
    await waitAllFinished(['done']);
    assert.deepEqual(await paneOutputs(), raceOutputs, 'replayed outputs are the same');
    await page.waitForSelector('#compare:not([hidden]) #chart-tps .chart-bar', { timeout: T });
    assert.equal(await page.getAttribute(`#history-list [data-job="${raceJob}"]`, 'aria-current'), 'true');
    await shot('05-history-open');
  });

  it('a reload and a reconnect mid-run show the run in progress and end with the text exactly once', async () => {
    await fillForm({ prompt: 'Count from one to fifty in words, separated by commas.', maxTokens: 300, repeat: 1 });
    await page.press('#f-max', 'Enter'); // Enter in a field runs
    const id = await currentJobId(raceJob);
    await page.waitForFunction(() => [...document.querySelectorAll('#panes .pane')].some((p) => p.querySelector('.output').textContent.length > 0), null, { timeout: T, polling: 50 });
    await page.reload({ waitUntil: 'domcontentloaded' });
    assert.equal(await currentJobId(), id, 'the job id survives the reload');
    await page.waitForFunction(() => document.querySelectorAll('#panes .pane').length >= 2, null, { timeout: T });
    await shot('06-after-reload-mid-run');
    // a network blip: the stream reconnects from the very start, replaying every event again
    const stillRunning = await page.evaluate(() => [...document.querySelectorAll('#panes .pane')].some((p) => p.dataset.state === 'running'));
    await page.evaluate(() => window.__benchRace.dropStreams(true));
    if (!stillRunning) console.log('note: the job finished before the simulated blip; the replay-from-start check was not exercised');
    await waitAllFinished(['done']);
    const outs = await paneOutputs();
    const doc = (await api(`/api/jobs/${id}`)).body;
    for (const m of doc.machines) assert.equal(outs[m.machine_id], m.output_text, `${m.machine_id}: no doubled or missing text after the reload`);
  });

  it('Cancel stops a running job', async () => {
    await fillForm({ prompt: 'Write a very long story about a lighthouse keeper.', maxTokens: 2000, repeat: 1 });
    const prev = await page.evaluate(() => decodeURIComponent(location.hash.slice(5)));
    await page.click('#run-btn');
    const id = await currentJobId(prev);
    await page.waitForFunction(() => [...document.querySelectorAll('#panes .pane')].some((p) => p.dataset.state === 'running'), null, { timeout: T, polling: 50 });
    await page.waitForFunction(() => !document.getElementById('cancel-btn').disabled, null, { timeout: T });
    await page.click('#cancel-btn');
    await waitAllFinished(['cancelled', 'done', 'failed']);
    const states = await page.$$eval('#panes .pane', (ps) => ps.map((p) => p.dataset.state));
    assert.ok(states.includes('cancelled'), `at least one machine was cancelled (${states.join(', ')})`);
    const doc = (await api(`/api/jobs/${id}`)).body;
    assert.ok(['cancelled', 'partial', 'done', 'failed'].includes(doc.status), `central's status ${doc.status}`);
  });

  it('running a finished job id again is a new run, shown as run #2 with its own output', async () => {
    const before = (await api(`/api/jobs/${raceJob}`)).body;
    const machines = before.machines.map((m) => m.machine_id);
    const again = await api('/api/jobs', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...before.job, job_id: raceJob, machines, max_tokens: 8, repeat: 1, warmup: 0 }),
    });
    assert.equal(again.status, 201, JSON.stringify(again.body));
    await page.goto(BASE + '/#job=' + raceJob, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction((n) => {
      const panes = [...document.querySelectorAll('#panes .pane')];
      return panes.length === n && panes.every((p) => p.dataset.state === 'done' && /run #2 of this job/.test(p.querySelector('.pane-state').textContent));
    }, machines.length, { timeout: T, polling: 100 });
    const doc = (await api(`/api/jobs/${raceJob}`)).body;
    const outs = await paneOutputs();
    for (const m of doc.machines) {
      assert.equal(m.earlier_runs.length, 1, `${m.machine_id}: the first run is kept`);
      assert.notEqual(m.run_id, m.earlier_runs[0].run_id);
      assert.equal(outs[m.machine_id], m.output_text, `${m.machine_id}: the pane shows the new run's text only`);
    }
  });

  it('is readable in a narrow window', async () => {
    await page.setViewportSize({ width: 420, height: 900 });
    await page.goto(BASE + '/#job=' + raceJob, { waitUntil: 'domcontentloaded' });
    await waitAllFinished(['done']);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `no horizontal page scroll (overflow ${overflow}px)`);
    await shot('07-narrow', { fullPage: true });
    await page.locator('#compare').screenshot({ path: path.join(SHOTS, '07-narrow-compare.png') });
    shots.push(path.join(SHOTS, '07-narrow-compare.png'));
    await page.setViewportSize({ width: 1280, height: 800 });
  });

  it('runs a max tokens 8,16 × concurrency 1,2,4 matrix on two machines: 6 load cells, a sweep per max tokens with capacity, a cell as a race', async () => {
    const MX_T = 180000;
    await page.setViewportSize({ width: 1280, height: 900 });
    await page.goto(BASE + '/', { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => document.querySelectorAll('#machine-checks input').length >= 2 && document.querySelectorAll('#f-model option').length > 0, null, { timeout: T });
    const model = await chooseModel();
    // the two machines: run.sh's mock and llama-server agents where present, else the first two online with the model
    const fleet = (await api('/api/machines')).body.machines.filter((m) => m.status !== 'offline' && (m.models ?? []).includes(model));
    const pref = ['ui-mock', 'ui-llama'];
    const machines = pref.every((id) => fleet.some((m) => m.machine_id === id)) ? pref : fleet.slice(0, 2).map((m) => m.machine_id);
    assert.equal(machines.length, 2, `two online machines offer ${model} (${fleet.map((m) => m.machine_id).join(', ')})`);
    await fillForm({ prompt: 'Say hello in five words.', maxTokens: 8, repeat: 2, warmup: 0 });
    await page.uncheck('#f-all');
    for (const box of await page.$$('#machine-checks input')) {
      const want = machines.includes(await box.getAttribute('value'));
      if (want !== (await box.isChecked())) await (want ? box.check() : box.uncheck());
    }
    assert.deepEqual((await page.$$eval('#machine-checks input:checked', (i) => i.map((x) => x.value))).sort(), [...machines].sort());
    if (!(await page.$eval('#matrix-box', (d) => d.open))) await page.click('#matrix-box > summary');
    await page.fill('#f-mx-model', '');
    await page.fill('#f-mx-max', '8, 16');
    await page.fill('#f-mx-ctx', '');
    await page.fill('#f-mx-conc', '1, 2, 4');
    await page.selectOption('#f-mx-order', 'sequential');
    await page.fill('#f-mx-requests', '');
    await page.fill('#f-mx-slo', '60000');
    await page.waitForFunction(() => document.getElementById('matrix-note').textContent === '6 cells per machine', null, { timeout: T });
    const prev = await page.evaluate(() => decodeURIComponent(location.hash.slice(5)));
    await page.click('#run-btn');
    const id = await currentJobId(prev);
    const t0 = Date.now();
    // bounded: every cell done on both machines, both sweeps drawn with their capacities
    try {
      await page.waitForFunction((n) => {
        const tds = [...document.querySelectorAll('#matrix-table tbody td.mx-cell')];
        return document.querySelectorAll('#matrix-table tbody tr').length === 6 && tds.length === 6 * n && tds.every((td) => td.dataset.status === 'done')
          && document.querySelectorAll('#sweeps:not([hidden]) .sweep-point').length === 6 * n
          && document.querySelectorAll('#sweeps .capacity').length === 2 * n;
      }, machines.length, { timeout: MX_T, polling: 250 });
    } catch (e) {
      const state = await page.$$eval('#matrix-table tbody td', (tds) => tds.map((td) => `${td.closest('tr').dataset.cell}|${td.dataset.machine ?? ''}|${td.dataset.status ?? ''}`).join(' '));
      throw new Error(`the matrix did not finish within ${MX_T / 1000} s: ${state} · ${await page.textContent('#matrix-summary')}`, { cause: e });
    }
    console.log(`matrix job ${id}: 6 cells × 2 machines done in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const doc = (await api(`/api/jobs/${id}`)).body;
    assert.deepEqual(doc.job.matrix, { max_tokens: [8, 16], concurrency: [1, 2, 4] });
    assert.deepEqual(doc.job.slo, { ttft_p99_ms: 60000 });
    assert.equal(doc.job.repeat, 2);
    assert.equal(doc.job.model, model);
    assert.deepEqual(doc.machines.map((m) => m.machine_id).sort(), [...machines].sort());
    // the table: 6 rows in the matrix's order, a column per machine, every cell a number for both
    const keys = [8, 16].flatMap((t) => [1, 2, 4].map((c) => `max_tokens=${t},concurrency=${c}`));
    assert.deepEqual(await page.$$eval('#matrix-table tbody tr', (rs) => rs.map((r) => r.dataset.cell)), keys);
    assert.deepEqual((await page.$$eval('#matrix-table thead th[data-machine]', (ths) => ths.map((t) => t.dataset.machine))).sort(), [...machines].sort(), 'a column per machine');
    assert.match(await page.textContent('#matrix-summary'), /^6 cells × 2 machines · 12\/12 finished/);
    for (const key of keys) {
      assert.equal(await page.$$eval(`#matrix-table tr[data-cell="${key}"] th.cell-key .tag`, (t) => t.map((x) => x.textContent).join()), 'load', `${key}: a load cell`);
      const cell = doc.cells.find((c) => c.cell === key);
      assert.ok(cell, `${key} in central's cells`);
      for (const mid of machines) {
        const td = `#matrix-table tr[data-cell="${key}"] td[data-machine="${mid}"]`;
        const val = await page.textContent(`${td} .cell-val`);
        const range = await page.textContent(`${td} .cell-range`);
        assert.match(val, /^\d[\d,]*(\.\d)? tok\/s$/, `${key} ${mid}: output tokens/s shown (${val})`);
        assert.match(range, /^TTFT p99 \d[\d,]*(\.\d+)? (ms|s)$/, `${key} ${mid}: TTFT p99 shown (${range})`);
        const load = cell.machines.find((m) => m.machine_id === mid)?.load;
        assert.ok(load && load.output_tokens_per_s > 0, `${key} ${mid}: central has a load with output tokens/s > 0 (${JSON.stringify(load)})`);
        assert.equal(val, `${rate(load.output_tokens_per_s)} tok/s`, `${key} ${mid}: the page shows central's output tokens/s`);
        assert.equal(range, `TTFT p99 ${ms(load.ttft_ms.p99)}`, `${key} ${mid}: the page shows central's TTFT p99`);
        // and the per-stream decode rate (median): what central's winner is judged on
        const ps = cell.machines.find((m) => m.machine_id === mid)?.summary?.gen_tokens_per_s ?? load.per_stream_tokens_per_s;
        assert.ok(ps && ps.median > 0, `${key} ${mid}: central has a per-stream decode rate`);
        const want = `per-stream decode ${rate(ps.median)} tok/s${hasCi(ps) ? ` (95% CI ${num(ps.ci_low, 1)}–${num(ps.ci_high, 1)})` : ''}`;
        assert.equal(await page.textContent(`${td} .cell-stream`), want, `${key} ${mid}: the per-stream decode shown`);
        // a winner exactly where central names one, its tag saying what it is judged on
        const isWin = await page.$eval(td, (e) => e.classList.contains('is-winner'));
        assert.equal(isWin, cell.winner === mid, `${key} ${mid}: winner as central says (${cell.winner})`);
        if (isWin) {
          assert.equal(await page.textContent(`${td} .tag-win`), 'winner · per-stream decode');
          assert.match(await page.getAttribute(`${td} .tag-win`, 'title'), /judged on the per-stream decode rate .*95% intervals separated/);
        }
      }
    }
    assert.match(await page.textContent('#matrix-summary'), /a winner only where the 95% intervals of the per-stream decode rate separate/);
    // each chart's title and its note lie apart (the long "Output tokens/s per load cell (all streams)" included)
    const heads = await page.$$eval('#matrix .chart-fig', (fs) => fs.map((f) => {
      const box = (e) => { const r = e.getBoundingClientRect(); return { x1: r.left, x2: r.right, y1: r.top, y2: r.bottom }; };
      return { fig: f.dataset.metric ?? f.dataset.group, title: box(f.querySelector('.chart-title')), note: box(f.querySelector('.chart-note')) };
    }));
    assert.deepEqual(heads.map((x) => x.fig), ['output_tokens_per_s', 'ttft_p99_ms', 'per_stream_tokens_per_s', 'max_tokens=8', 'max_tokens=16']);
    for (const { fig, title: a, note: b } of heads) assert.ok(!(a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2), `${fig}: title and note overlap ${JSON.stringify([a, b])}`);
    // the sweeps: one per max tokens (the cells differing only in concurrency), a point per
    // concurrency per machine, the SLO line, and each machine's capacity in words
    assert.deepEqual(await page.$$eval('#sweeps-body .sweep-fig', (f) => f.map((x) => x.dataset.group)), ['max_tokens=8', 'max_tokens=16']);
    for (const group of ['max_tokens=8', 'max_tokens=16']) {
      const fig = `#sweeps-body .sweep-fig[data-group="${group}"]`;
      const sw = doc.sweeps.find((x) => x.group === group);
      assert.ok(sw, `central has the sweep ${group}`);
      assert.match(await page.textContent(`${fig} .sweep-slo`), /SLO: TTFT p99 ≤ 60,000 ms/);
      // the axis is scaled to the points (well under 60 s): the SLO stated in words, no line; the
      // points spread over the plot instead of lying flat on the axis
      assert.equal(await page.$$eval(`${fig} .sweep-slo-line`, (l) => l.length), 0, `${group}: no SLO line off the axis`);
      assert.match(await page.textContent(`${fig} .sweep-slo-off`), /^SLO: TTFT p99 ≤ 60,000 ms: above every point/);
      const geo = await page.$eval(fig, (f) => {
        const grid = [...f.querySelectorAll('.chart-grid line')].map((l) => Number(l.getAttribute('y1')));
        return { plot: Math.max(...grid) - Math.min(...grid), cys: [...f.querySelectorAll('.sweep-point')].map((c) => Number(c.getAttribute('cy'))) };
      });
      const spread = Math.max(...geo.cys) - Math.min(...geo.cys);
      assert.ok(spread > geo.plot * 0.3, `${group}: the points use the plot's height (spread ${spread.toFixed(1)} of ${geo.plot.toFixed(1)} px)`);
      // the concurrency labels do not overlap one another
      const boxes = await page.$$eval(`${fig} .sweep-label`, (ts) => ts.map((x) => { const r = x.getBoundingClientRect(); return { t: x.textContent, x1: r.left, x2: r.right, y1: r.top, y2: r.bottom }; }));
      for (let i = 0; i < boxes.length; i++) {
        for (let k = i + 1; k < boxes.length; k++) {
          const [a, b] = [boxes[i], boxes[k]];
          assert.ok(!(a.x1 < b.x2 - 0.5 && b.x1 < a.x2 - 0.5 && a.y1 < b.y2 - 0.5 && b.y1 < a.y2 - 0.5), `${group}: labels "${a.t}" and "${b.t}" overlap ${JSON.stringify([a, b])}`);
        }
      }
      for (const mid of machines) {
        const conc = await page.$$eval(`${fig} .sweep-point[data-machine="${mid}"]`, (c) => c.map((x) => Number(x.dataset.concurrency)));
        assert.deepEqual(conc, [1, 2, 4], `${group} ${mid}: a point per concurrency`);
        assert.deepEqual(await page.$$eval(`${fig} .sweep-line[data-machine="${mid}"] .sweep-label`, (t) => t.map((x) => x.textContent)), ['1', '2', '4']);
        assert.equal(await page.$$eval(`${fig} .sweep-point.is-over[data-machine="${mid}"]`, (c) => c.length), 0, `${group} ${mid}: no point over a 60 s SLO`);
        const cap = await page.textContent(`${fig} .capacity[data-machine="${mid}"]`);
        assert.match(cap, /^ .+ sustains 4 streams within TTFT p99 ≤ 60000 ms$/, `${group} ${mid}: ${cap}`);
        assert.equal(sw.machines.find((m) => m.machine_id === mid)?.capacity, 4, `${group} ${mid}: central's capacity`);
      }
    }
    // the matrix overview shows no machine-level comparison (it would mix cells)
    assert.equal(await page.isVisible('#compare'), false);
    // scrollIntoView leaves the matrix heading visible under the sticky top bar (scroll-padding-top)
    await page.$eval('#matrix', (e) => e.scrollIntoView({ block: 'start' }));
    const under = await page.$eval('#matrix-h', (e) => ({ top: e.getBoundingClientRect().top, bar: document.querySelector('.topbar').getBoundingClientRect().bottom }));
    assert.ok(under.top >= under.bar, `the matrix heading (top ${under.top} px) is below the top bar (bottom ${under.bar} px)`);
    const mxShot = await shot('08-matrix-fleet');
    fs.mkdirSync(DOCS, { recursive: true });
    fs.copyFileSync(mxShot, path.join(DOCS, 'screenshot-matrix.png'));
    const swShot = path.join(SHOTS, '08-matrix-fleet-sweeps.png');
    await page.locator('#sweeps').screenshot({ path: swShot });
    shots.push(swShot);
    // a row opened as a race: both machines' panes with that cell's numbers
    const key = 'max_tokens=16,concurrency=2';
    await page.click(`#matrix-table tr[data-cell="${key}"] .cell-open`);
    await page.waitForFunction((h) => location.hash === h, `#job=${id}&cell=${encodeURIComponent(key)}`, { timeout: T });
    assert.equal(await page.textContent('#cell-key'), key);
    assert.equal(await page.isVisible('#matrix'), false);
    // the head shows the cell's own settings (its values over the job's max tokens 8) and its runs
    const kv = (k) => page.textContent(`#job-meta .kv[data-k="${k}"] .v`);
    assert.equal(await kv('max tokens'), '16', 'the cell\'s max tokens, not the job\'s 8');
    assert.equal(await kv('concurrency'), '2');
    assert.equal(await kv('runs'), '2 requests per stream × 2 streams');
    await page.waitForFunction((n) => {
      const panes = [...document.querySelectorAll('#panes .pane')];
      return panes.length === n && panes.every((p) => p.dataset.state === 'done' && /\d/.test(p.querySelector('.metric.key .val')?.textContent ?? ''));
    }, machines.length, { timeout: T, polling: 100 });
    for (const mid of machines) {
      const pane = page.locator(`#panes .pane[data-machine="${mid}"]`);
      const vals = Object.fromEntries(await pane.locator('.metric').evaluateAll((xs) => xs.map((x) => [x.querySelector('dt').textContent, x.querySelector('.val').textContent])));
      assert.match(vals['TTFT'], /^\d[\d,.]* (ms|s)$/, `${mid}: TTFT (${vals['TTFT']})`);
      assert.match(vals['decode tok/s'], /^\d[\d,.]*$/, `${mid}: decode tok/s (${vals['decode tok/s']})`);
      assert.match(vals['total'], /^\d[\d,.]* (ms|s)$/, `${mid}: total (${vals['total']})`);
      assert.match(vals['tokens'], /^\d+$/, `${mid}: tokens (${vals['tokens']})`);
      assert.ok(Number(vals['tokens']) >= 1 && Number(vals['tokens']) <= 16, `${mid}: at most the cell's 16 tokens (${vals['tokens']})`);
      const runs = Number(/done · (\d+) runs?/.exec(await pane.locator('.pane-state').textContent())?.[1]);
      assert.ok(runs >= 2, `${mid}: the cell's runs counted (${runs})`);
      // why it stopped, said for a load cell; the fingerprint as the cell ran, without the job-level
      // change since the previous job (it is not this cell's)
      assert.match(await pane.locator('.note-stop').textContent(), /^stopped: ran 2 requests per stream × 2 streams/);
      assert.equal(await pane.locator('.fp-prev').count(), 0, `${mid}: no job-level fingerprint change in the cell view`);
      const fpTitle = (await pane.locator('.pane-fp').getAttribute('title')) ?? '';
      assert.doesNotMatch(fpTitle, /\bmax 8\b/, `${mid}: not the job's max tokens in the cell's fingerprint`);
      if (/settings: .*max \d/.test(fpTitle)) assert.match(fpTitle, /\bmax 16\b/, `${mid}: the cell's max tokens in its fingerprint`);
    }
    await page.evaluate(() => window.scrollTo(0, 0));
    await shot('08-matrix-fleet-cell');
    await page.click('#cell-back');
    await page.waitForSelector('#matrix:not([hidden]) #matrix-table tbody tr', { timeout: T });
    await page.setViewportSize({ width: 1280, height: 800 });
  });

  it('kept the other tests\' screenshots', () => {
    const gone = othersShots.filter((f) => !fs.existsSync(path.join(SHOTS, f)));
    assert.deepEqual(gone, [], 'screenshots of other tests (e.g. matrix.test.mjs\'s mx-*) are not deleted');
  });

  it('raised no page errors', () => {
    assert.deepEqual(pageErrors, []);
  });
});
