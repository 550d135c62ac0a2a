// Browser test of matrix races, concurrency sweeps and run-against-run comparison, in Debian's
// headless Chromium (playwright-core), against the fake central (web/tests/fake-central.mjs with
// FAKE_FIXTURES=1) that this file starts itself: its fixture jobs (web/tests/fixtures.mjs) have
// known numbers, shaped as central/API.md says, so what the page must show is known exactly.
// It needs no CENTRAL_URL and no fleet (web/tests/run.sh runs it with the others).
//
//   node --test web/tests/matrix.test.mjs
//
// Every wait has a timeout; nothing synchronises on a fixed sleep.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium, closeChromium } from './browser.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const T = Number(process.env.UI_TIMEOUT_S ?? 30) * 1000;
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? path.join(ROOT, 'artifacts', 'screenshots'));
const FAST = 'Fast box (mock, 180 tok/s)';
const SLOW = 'Slow box (mock, 60 tok/s)';
const CELL1 = 'model=gemma-3-270m,max_tokens=32';
const CELL2 = 'model=gemma-3-270m,max_tokens=64';

let fake;
let BASE;
let ctx;
let page;
let profile;
const pageErrors = [];

/** Starts the fake central on a free port; resolves with its URL once it listens (bounded). */
function startFake() {
  return new Promise((resolve, reject) => {
    fake = spawn(process.execPath, [path.join(HERE, 'fake-central.mjs'), '0'], { env: { ...process.env, FAKE_FIXTURES: '1' }, stdio: ['ignore', 'pipe', 'inherit'] });
    const timer = setTimeout(() => reject(new Error('the fake central did not start within 10 s')), 10000);
    let out = '';
    fake.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    fake.on('exit', (code) => reject(new Error(`the fake central exited (${code})`)));
  });
}

async function shot(name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, name + '.png'), fullPage: true });
}

/** Every chart's title and note on the page lie apart (no overlap of their boxes). */
async function assertHeadsApart() {
  const heads = await page.$$eval('.chart-fig', (fs) => fs.map((f) => {
    const box = (e) => { const r = e?.getBoundingClientRect(); return r && { x1: r.left, x2: r.right, y1: r.top, y2: r.bottom }; };
    return { fig: f.dataset.metric ?? f.dataset.group ?? f.id, title: box(f.querySelector('.chart-title')), note: box(f.querySelector('.chart-note')), text: f.querySelector('.chart-title')?.textContent };
  }));
  assert.ok(heads.length > 0);
  for (const hd of heads) {
    assert.ok(hd.title && hd.note, `${hd.fig}: a title and a note`);
    const { title: a, note: b } = hd;
    const overlap = a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2;
    assert.ok(!overlap, `${hd.fig}: the title "${hd.text}" overlaps its note (${JSON.stringify(hd)})`);
  }
}

const cellTd = (cell, machine) => `#matrix-table tbody tr[data-cell="${cell}"] td[data-machine="${machine}"]`;

async function open(hash) {
  await page.goto(BASE + '/' + hash, { waitUntil: 'domcontentloaded' });
}

describe('matrix races, sweeps and compare in headless Chromium (fake central)', () => {
  before(async () => {
    BASE = await startFake();
    ({ ctx, page, profile } = await launchChromium('mx-', { timeout: T, pageErrors }));
  });

  after(async () => {
    await closeChromium({ ctx, profile });
    fake?.kill();
  });

  it('matrix table: a row per cell, the winner marked only where central names one, failed cells with their code', async () => {
    await open('#job=fx-matrix');
    await page.waitForFunction(() => document.querySelectorAll('#matrix-table tbody tr').length === 4, null, { timeout: T });
    assert.equal(await page.textContent('#job-h'), 'Matrix race');
    // one winner in the whole table: the first cell's fast-box (its interval 100–105 is apart from 60–65)
    const winners = await page.$$eval('#matrix-table td.is-winner', (tds) => tds.map((td) => [td.closest('tr').dataset.cell, td.dataset.machine]));
    assert.deepEqual(winners, [[CELL1, 'fast-box']]);
    assert.match(await page.textContent(cellTd(CELL1, 'fast-box')), /102\.5 tok\/s.*95% CI 100\.0–105\.0.*winner/i);
    // the second cell: slow-box has the higher median (105.0 vs 102.5) but the intervals overlap: no winner
    assert.match(await page.textContent(cellTd(CELL2, 'slow-box')), /105\.0 tok\/s/);
    assert.equal(await page.$$eval(`#matrix-table tr[data-cell="${CELL2}"] .tag-win`, (t) => t.length), 0, 'no winner where winner is null');
    // qwen3-0.6b is not on slow-box: failed with model_not_found, fast-box alone (no runner-up, no winner)
    for (const cell of ['model=qwen3-0.6b,max_tokens=32', 'model=qwen3-0.6b,max_tokens=64']) {
      assert.equal(await page.getAttribute(cellTd(cell, 'slow-box'), 'data-status'), 'failed');
      assert.equal(await page.textContent(`${cellTd(cell, 'slow-box')} .cell-error`), 'model_not_found');
      assert.match(await page.getAttribute(cellTd(cell, 'slow-box'), 'title'), /does not offer qwen3-0\.6b/);
      assert.equal(await page.getAttribute(cellTd(cell, 'fast-box'), 'data-status'), 'done');
    }
    // a chart per metric, a bar per (cell, machine) with a result: 4 on fast-box + 2 on slow-box
    assert.equal(await page.$$eval('#matrix-charts figure[data-metric="gen_tokens_per_s"] .chart-bar', (b) => b.length), 6);
    assert.equal(await page.$$eval('#matrix-charts figure[data-metric="ttft_ms"] .chart-bar', (b) => b.length), 6);
    assert.equal(await page.$$eval('#matrix-charts .chart-row.is-winner', (r) => r.length), 1, 'one winner bar in the decode chart');
    // the machine-level comparison of the whole job would mix cells: not shown on the matrix
    assert.equal(await page.isVisible('#compare'), false);
    assert.equal(await page.isVisible('#panes .pane .metrics'), false);
    await shot('mx-01-matrix');
  });

  it('a row opens as the race of that cell: only its runs counted, and back to all cells', async () => {
    await page.click(`#matrix-table tr[data-cell="${CELL1}"] .cell-open`);
    await page.waitForFunction((c) => location.hash === '#job=fx-matrix&cell=' + encodeURIComponent(c), CELL1, { timeout: T });
    assert.equal(await page.textContent('#cell-key'), CELL1);
    assert.equal(await page.isVisible('#matrix'), false);
    await page.waitForSelector('#compare:not([hidden]) #cmp-table tbody tr', { timeout: T });
    // the cell's 6 runs (100..105), not the fast box's 24 over every cell (median 92.5)
    const decode = await page.textContent('#panes .pane[data-machine="fast-box"] .metric.key .val');
    assert.equal(decode, '102.5');
    assert.match(await page.textContent('#panes .pane[data-machine="fast-box"] .pane-state'), /done · 6 runs/);
    assert.match(await page.textContent('#verdict'), /Decode: .*wins — .*95% intervals of the medians are separated/);
    // a reload keeps the cell
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => document.getElementById('cell-key')?.textContent.length > 0, null, { timeout: T });
    assert.equal(await page.textContent('#cell-key'), CELL1);
    await page.click('#cell-back');
    await page.waitForSelector('#matrix:not([hidden]) #matrix-table tbody tr', { timeout: T });
    assert.equal(await page.evaluate(() => location.hash), '#job=fx-matrix');
  });

  it('sweep chart: a point per concurrency per machine, the SLO line, and the capacity answer', async () => {
    await open('#job=fx-sweep');
    await page.waitForSelector('#sweeps:not([hidden]) .sweep-chart', { timeout: T });
    for (const id of ['fast-box', 'slow-box']) {
      const conc = await page.$$eval(`.sweep-point[data-machine="${id}"]`, (c) => c.map((x) => Number(x.dataset.concurrency)));
      assert.deepEqual(conc, [1, 2, 4, 8], `${id}: a point per concurrency`);
    }
    const labels = await page.$$eval('.sweep-line[data-machine="fast-box"] .sweep-label', (t) => t.map((x) => x.textContent));
    assert.deepEqual(labels, ['1', '2', '4', '8'], 'points labelled by concurrency');
    // the line runs left to right by throughput: x grows with the output tokens/s (150, 280, 480, 560)
    const xs = await page.$$eval('.sweep-point[data-machine="fast-box"]', (c) => c.map((x) => Number(x.getAttribute('cx'))));
    assert.deepEqual(xs, [...xs].sort((a, b) => a - b));
    assert.equal(await page.$$eval('.sweep-slo-line', (l) => l.length), 1, 'the SLO line');
    assert.match(await page.textContent('.sweep-slo'), /SLO: TTFT p99 ≤ 1,000 ms/);
    const over = await page.$$eval('.sweep-point.is-over', (c) => c.map((x) => `${x.dataset.machine}:${x.dataset.concurrency}`));
    assert.deepEqual(over.sort(), ['fast-box:8', 'slow-box:2', 'slow-box:4', 'slow-box:8']);
    assert.equal(await page.textContent('.capacity[data-machine="fast-box"]'), ` ${FAST} sustains 4 streams within TTFT p99 ≤ 1000 ms`);
    assert.equal(await page.textContent('.capacity[data-machine="slow-box"]'), ` ${SLOW} sustains 1 stream within TTFT p99 ≤ 1000 ms`);
    // load cells in the table: output tokens/s and TTFT p99, and the per-stream decode rate that
    // central's winner is judged on (each request's 120 tok/s at 4 streams: 480 / 4)
    assert.match(await page.textContent(cellTd('concurrency=4', 'fast-box')), /480\.0 tok\/s.*TTFT p99 800 ms/);
    assert.equal(await page.textContent(`${cellTd('concurrency=4', 'fast-box')} .cell-stream`), 'per-stream decode 120.0 tok/s (95% CI 120.0–120.0)');
    assert.equal(await page.textContent(`${cellTd('concurrency=4', 'slow-box')} .cell-stream`), 'per-stream decode 32.5 tok/s (95% CI 32.5–32.5)');
    assert.equal(await page.textContent(`${cellTd('concurrency=1', 'slow-box')} .cell-stream`), 'per-stream decode 60.0 tok/s');
    // the winner (at 4 and 8 streams, where the per-stream intervals separate) says what it is judged on
    const winners = await page.$$eval('#matrix-table td.is-winner', (tds) => tds.map((td) => [td.closest('tr').dataset.cell, td.dataset.machine]));
    assert.deepEqual(winners, [['concurrency=4', 'fast-box'], ['concurrency=8', 'fast-box']]);
    const tag = `${cellTd('concurrency=4', 'fast-box')} .tag-win`;
    assert.equal(await page.textContent(tag), 'winner · per-stream decode');
    assert.match(await page.getAttribute(tag, 'title'), /judged on the per-stream decode rate .*95% intervals separated; not on the output tok\/s or TTFT p99/);
    assert.match(await page.textContent('#matrix-summary'), /a winner only where the 95% intervals of the per-stream decode rate separate/);
    assert.deepEqual(await page.$$eval('#matrix-charts figure', (f) => f.map((x) => x.dataset.metric)), ['output_tokens_per_s', 'ttft_p99_ms', 'per_stream_tokens_per_s']);
    // the winner's bar is marked in the chart of its basis only
    assert.equal(await page.$$eval('#matrix-charts figure[data-metric="per_stream_tokens_per_s"] .chart-row.is-winner', (r) => r.length), 2);
    assert.equal(await page.$$eval('#matrix-charts figure:not([data-metric="per_stream_tokens_per_s"]) .chart-row.is-winner', (r) => r.length), 0);
    await assertHeadsApart();
    await shot('mx-02-sweep');
  });

  it('sweep chart with an SLO far above every point: the axis fits the points, the SLO in words, labels apart', async () => {
    await open('#job=fx-load');
    await page.waitForSelector('#sweeps:not([hidden]) .sweep-chart', { timeout: T });
    // The previous view's sweep may still be on screen for a moment: wait for this job's groups.
    await page.waitForFunction(() => [...document.querySelectorAll('#sweeps-body .sweep-fig')].map((x) => x.dataset.group).join() === 'max_tokens=8,max_tokens=16', null, { timeout: T });
    assert.deepEqual(await page.$$eval('#sweeps-body .sweep-fig', (f) => f.map((x) => x.dataset.group)), ['max_tokens=8', 'max_tokens=16']);
    for (const group of ['max_tokens=8', 'max_tokens=16']) {
      const fig = `#sweeps-body .sweep-fig[data-group="${group}"]`;
      // the points spread over the plot (30 to 420 ms), not flat on the axis of a 60 s scale
      const geo = await page.$eval(fig, (f) => {
        const grid = [...f.querySelectorAll('.chart-grid line')].map((l) => Number(l.getAttribute('y1')));
        const cys = [...f.querySelectorAll('.sweep-point')].map((c) => Number(c.getAttribute('cy')));
        return { plot: Math.max(...grid) - Math.min(...grid), cys };
      });
      const spread = Math.max(...geo.cys) - Math.min(...geo.cys);
      assert.ok(spread > geo.plot * 0.5, `${group}: the points use the plot's height (spread ${spread.toFixed(1)} of ${geo.plot.toFixed(1)} px)`);
      // the SLO is off the chart: no line, said in words; every point within it, capacity 2
      assert.equal(await page.$$eval(`${fig} .sweep-slo-line`, (l) => l.length), 0, `${group}: no SLO line off the axis`);
      assert.equal(await page.textContent(`${fig} .sweep-slo`), 'SLO: TTFT p99 ≤ 60,000 ms: above every point (off the chart, whose axis is scaled to the points)');
      assert.equal(await page.$$eval(`${fig} .sweep-point.is-over`, (c) => c.length), 0);
      assert.equal(await page.textContent(`${fig} .capacity[data-machine="fast-box"]`), ` ${FAST} sustains 2 streams within TTFT p99 ≤ 60000 ms`);
      // fast-box's two points lie 6 tok/s and 3 ms apart: their labels (and all others) do not overlap
      const boxes = await page.$$eval(`${fig} .sweep-label`, (ts) => ts.map((x) => { const r = x.getBoundingClientRect(); return { t: x.textContent, x1: r.left, x2: r.right, y1: r.top, y2: r.bottom }; }));
      assert.equal(boxes.length, 4);
      for (let i = 0; i < boxes.length; i++) {
        for (let k = i + 1; k < boxes.length; k++) {
          const [a, b] = [boxes[i], boxes[k]];
          const overlap = a.x1 < b.x2 - 0.5 && b.x1 < a.x2 - 0.5 && a.y1 < b.y2 - 0.5 && b.y1 < a.y2 - 0.5;
          assert.ok(!overlap, `${group}: labels "${a.t}" and "${b.t}" overlap (${JSON.stringify([a, b])})`);
        }
      }
    }
    // with the SLO on the axis (fx-sweep, 1000 ms among the points) the line is drawn: checked above
    await assertHeadsApart();
    await shot('mx-02b-sweep-far-slo');
  });

  it('a load cell opened as a race shows that cell\'s settings and runs, not the job\'s', async () => {
    const cell = 'max_tokens=16,concurrency=2';
    await open('#job=fx-load&cell=' + encodeURIComponent(cell));
    await page.waitForFunction(() => document.getElementById('cell-key')?.textContent.length > 0, null, { timeout: T });
    await page.waitForSelector('#panes .pane[data-machine="fast-box"][data-state="done"] .note-stop', { timeout: T });
    const kv = (k) => page.textContent(`#job-meta .kv[data-k="${k}"] .v`);
    assert.equal(await kv('max tokens'), '16', 'the cell\'s max_tokens, not the job\'s 8');
    assert.equal(await kv('concurrency'), '2');
    assert.equal(await kv('ctx'), '2048');
    assert.equal(await kv('runs'), '2 requests per stream × 2 streams');
    for (const id of ['fast-box', 'slow-box']) {
      const pane = `#panes .pane[data-machine="${id}"]`;
      assert.match(await page.textContent(`${pane} .pane-state`), /done · 4 runs/);
      assert.equal(await page.textContent(`${pane} .note-stop`), 'stopped: ran 2 requests per stream × 2 streams');
      // the fingerprint as the cell ran (max 16), no job-level id, and no "change since the previous job" (max_tokens 32 → 8 is the job's)
      assert.match(await page.getAttribute(`${pane} .pane-fp`, 'title'), /settings: generate · ctx 2048 · max 16 · temp 0/);
      assert.equal(await page.$$eval(`${pane} .fp-prev`, (x) => x.length), 0, `${id}: no job-level fingerprint change in the cell view`);
      assert.equal(await page.$$eval(`${pane} .fp-id`, (x) => x.map((e) => e.textContent).join('')), '');
    }
    await shot('mx-02c-load-cell');
    // the whole job: the job's settings, its fingerprint with the change since the previous job
    await page.click('#cell-back');
    await page.waitForSelector('#matrix:not([hidden]) #matrix-table tbody tr', { timeout: T });
    assert.equal(await kv('max tokens'), '8');
    assert.equal(await kv('runs'), '2 per stream');
    assert.match(await page.textContent('#panes .pane[data-machine="fast-box"] .fp-prev'), /1 change since the previous job/);
  });

  it('the sticky top bar leaves a heading brought into view visible', async () => {
    await open('#job=fx-load');
    await page.waitForSelector('#sweeps:not([hidden]) .sweep-chart', { timeout: T });
    for (const sel of ['#matrix-h', '#sweeps .sub-h']) {
      await page.$eval(sel, (e) => e.scrollIntoView({ block: 'start' }));
      const { top, bar } = await page.$eval(sel, (e) => ({ top: e.getBoundingClientRect().top, bar: document.querySelector('.topbar').getBoundingClientRect().bottom }));
      assert.ok(top >= bar, `${sel}: its top ${top.toFixed(0)} px is below the top bar's bottom ${bar.toFixed(0)} px`);
    }
  });

  it('compare with… from History: deltas, ratio, and "beyond the intervals" only where they separate', async () => {
    await open('');
    const vs = page.locator('#history-list [data-compare="fx-race-1"]');
    await vs.waitFor({ timeout: T });
    await vs.click();
    await page.selectOption('#cmp-with-fx-race-1', 'fx-race-2');
    await page.click('#history-list .hist-chooser .cmp-go');
    await page.waitForFunction(() => location.hash === '#compare=fx-race-1,fx-race-2', null, { timeout: T });
    await page.waitForSelector('#runs:not([hidden]) .runs-group', { timeout: T });
    assert.equal(await page.textContent('#job-h'), 'Compare');
    assert.equal(await page.isVisible('#panes'), false);
    const fast = '#runs .runs-group[data-machine="fast-box"]';
    assert.match(await page.textContent(`${fast} tr[data-ref="fx-race-1:fast-box"]`), /baseline/i);
    const dec = await page.textContent(`${fast} tr[data-ref="fx-race-2:fast-box"] td[data-metric="gen_tokens_per_s"]`);
    assert.match(dec, /^92\.5−9\.8% ×0\.902beyond the intervals$/, dec);
    assert.equal(await page.getAttribute(`${fast} tr[data-ref="fx-race-2:fast-box"] td[data-metric="gen_tokens_per_s"] .delta`, 'class'), 'delta worse');
    const ttft = await page.textContent(`${fast} tr[data-ref="fx-race-2:fast-box"] td[data-metric="ttft_ms"]`);
    assert.doesNotMatch(ttft, /beyond/, 'same TTFT: not beyond the intervals');
    const slow = await page.textContent('#runs .runs-group[data-machine="slow-box"] tr[data-ref="fx-race-2:slow-box"] td[data-metric="gen_tokens_per_s"]');
    assert.match(slow, /^63\.0\+0\.8% ×1\.008$/, `within the intervals: no mark (${slow})`);
    // a reload keeps the comparison
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#runs:not([hidden]) .runs-group[data-machine="fast-box"] .tag-beyond', { timeout: T });
    await shot('mx-03-compare');
  });

  it('the race view flags a machine slower than its earlier job of the same setup beyond the intervals', async () => {
    await open('#job=fx-race-2');
    const regr = '#panes .pane[data-machine="fast-box"] .pane-regression';
    await page.waitForSelector(`${regr}.is-regressed`, { timeout: T });
    const text = await page.textContent(regr);
    assert.match(text, /^Regression: slower than job fx-race-1 beyond the intervals — decode 102\.5 → 92\.5 tok\/s \(−9\.8%\)$/, text);
    const other = '#panes .pane[data-machine="slow-box"] .pane-regression';
    assert.equal(await page.$eval(other, (e) => e.classList.contains('is-regressed')), false);
    assert.match(await page.textContent(other), /no change beyond the intervals/);
    await page.waitForSelector('#cmp-table tr[data-machine="fast-box"] .tag-regressed', { timeout: T });
    assert.equal(await page.$$eval('#cmp-table tr[data-machine="slow-box"] .tag-regressed', (t) => t.length), 0);
  });

  it('pin as baseline: a badge that survives a reload, deltas on every job opened, unpin clears it', async () => {
    await open('');
    await page.locator('#history-list [data-pin="fx-race-1"]').click();
    await page.waitForSelector('#pinned:not([hidden])', { timeout: T });
    assert.match(await page.textContent('#pinned'), /baseline.*gemma-3-270m.*Unpin/i);
    assert.equal(await page.evaluate(() => localStorage.getItem('bench-race.baseline-job')), 'fx-race-1');
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#pinned:not([hidden])', { timeout: T });
    await page.waitForSelector('#history-list [data-pin="fx-race-1"][aria-pressed="true"]', { timeout: T });
    // another job opened now shows its deltas against the pinned one
    await page.locator('#history-list .hist-item[data-job="fx-race-2"]').click();
    await page.waitForSelector('#vs-baseline:not([hidden]) .runs-group[data-machine="fast-box"]', { timeout: T });
    assert.match(await page.textContent('#vs-baseline .runs-group[data-machine="fast-box"] tr[data-ref="fx-race-2:fast-box"] td[data-metric="gen_tokens_per_s"]'), /−9\.8%.*beyond the intervals/);
    assert.match(await page.textContent('#vsb-note'), /fx-race-1/);
    assert.equal(await page.getAttribute('#vsb-open', 'href'), '#compare=fx-race-1,fx-race-2');
    // the pinned job itself: no deltas against itself, and it says it is the baseline
    await page.locator('#history-list .hist-item[data-job="fx-race-1"]').click();
    await page.waitForFunction(() => location.hash === '#job=fx-race-1' && document.getElementById('vs-baseline').hidden, null, { timeout: T });
    await page.waitForSelector('#job-meta .tag-pin', { timeout: T });
    await shot('mx-04-pinned');
    // unpin: gone, and stays gone after a reload
    await page.click('#unpin');
    await page.waitForSelector('#pinned', { state: 'hidden', timeout: T });
    assert.equal(await page.evaluate(() => localStorage.getItem('bench-race.baseline-job')), null);
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#history-list [data-pin="fx-race-1"][aria-pressed="false"]', { timeout: T });
    assert.equal(await page.isVisible('#pinned'), false);
    await page.locator('#history-list .hist-item[data-job="fx-race-2"]').click();
    await page.waitForSelector('#panes .pane[data-machine="fast-box"][data-state="done"]', { timeout: T });
    assert.equal(await page.isVisible('#vs-baseline'), false);
  });

  it('the form sends a matrix; its cells fill in live from the job stream, model_not_found where a model is missing', async () => {
    await open('');
    await page.waitForFunction(() => document.querySelectorAll('#f-model option').length > 0 && document.getElementById('f-model').value, null, { timeout: T });
    await page.selectOption('#f-shape', 'free');
    await page.selectOption('#f-repeat-mode', 'count');
    await page.fill('#f-prompt', 'Say hello.');
    await page.fill('#f-max', '8');
    await page.fill('#f-repeat', '1');
    await page.fill('#f-warmup', '0');
    await page.click('#matrix-box > summary');
    // checked in the form, nothing sent
    await page.fill('#f-mx-max', '4, 4');
    await page.click('#run-btn');
    await page.waitForFunction(() => /Matrix max tokens lists 4 twice/.test(document.getElementById('form-msg').textContent), null, { timeout: T });
    await page.fill('#f-mx-model', 'gemma-3-270m, no-such-model');
    await page.fill('#f-mx-max', '4, 6');
    await page.selectOption('#f-mx-order', 'interleaved');
    await page.waitForFunction(() => document.getElementById('matrix-note').textContent === '4 cells per machine', null, { timeout: T });
    // the cell statuses the page shows while the job runs, recorded from inside the page
    await page.evaluate(() => {
      window.__cellSeen = [];
      new MutationObserver(() => {
        for (const td of document.querySelectorAll('#matrix-table td.mx-cell')) {
          const k = `${td.closest('tr').dataset.cell}|${td.dataset.machine}|${td.dataset.status}`;
          if (!window.__cellSeen.includes(k) && document.getElementById('job-status').textContent.startsWith('running')) window.__cellSeen.push(k);
        }
      }).observe(document.getElementById('matrix'), { subtree: true, childList: true, attributes: true });
    });
    const before = await page.evaluate(() => location.hash);
    await page.click('#run-btn');
    await page.waitForFunction((b) => /^#job=[A-Za-z0-9_-]+$/.test(location.hash) && location.hash !== b, before, { timeout: T });
    const id = await page.evaluate(() => decodeURIComponent(location.hash.slice(5)));
    await page.waitForFunction(() => document.querySelectorAll('#matrix-table tbody tr').length === 4, null, { timeout: T });
    await page.waitForFunction(() => document.getElementById('job-status').textContent === 'done', null, { timeout: T, polling: 100 });
    await page.waitForFunction(() => [...document.querySelectorAll('#matrix-table td.mx-cell')].every((td) => ['done', 'failed'].includes(td.dataset.status)), null, { timeout: T });
    const doc = await (await fetch(`${BASE}/api/jobs/${id}`)).json();
    assert.deepEqual(doc.job.matrix, { model: ['gemma-3-270m', 'no-such-model'], max_tokens: [4, 6] });
    assert.equal(doc.job.order, 'interleaved');
    for (const cell of ['model=no-such-model,max_tokens=4', 'model=no-such-model,max_tokens=6']) {
      for (const m of ['fast-box', 'slow-box']) assert.equal(await page.textContent(`${cellTd(cell, m)} .cell-error`), 'model_not_found');
    }
    assert.match(await page.textContent(cellTd('model=gemma-3-270m,max_tokens=6', 'fast-box')), /\d tok\/s/);
    // live: while the job ran, a cell was shown done (a cell_done) before the job ended
    const seen = await page.evaluate(() => window.__cellSeen);
    assert.ok(seen.some((k) => k.endsWith('|done')), `a cell finished while the job ran: ${seen.join(', ')}`);
    assert.ok(seen.some((k) => /\|(running|pending)$/.test(k)), `a cell was seen before it finished: ${seen.join(', ')}`);
    await shot('mx-05-live-matrix');
  });

  it('the matrix, sweep and compare views are readable in a narrow window', async () => {
    await page.setViewportSize({ width: 420, height: 900 });
    try {
      for (const [hash, sel] of [['#job=fx-matrix', '#matrix-table tbody tr'], ['#job=fx-sweep', '.sweep-point'], ['#job=fx-load', '.sweep-point'], ['#compare=fx-race-1,fx-race-2', '#runs .runs-group']]) {
        await open(hash);
        await page.waitForSelector(sel, { timeout: T });
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
        assert.ok(overflow <= 1, `${hash}: no horizontal page scroll (overflow ${overflow}px)`);
      }
    } finally {
      await page.setViewportSize({ width: 1280, height: 900 });
    }
  });

  it('every control is labelled, the matrix fields and History\'s compare choice included', async () => {
    await page.locator('#history-list [data-compare="fx-race-2"]').click();
    await page.waitForSelector('#cmp-with-fx-race-2', { timeout: T });
    const unlabelled = await page.$$eval('#run-form input, #run-form select, #run-form textarea, #history select', (els) => els.filter((e) => !e.labels || e.labels.length === 0).map((e) => e.id || e.name));
    assert.deepEqual(unlabelled, []);
    assert.ok(await page.$$eval('#run-form #f-mx-model, #run-form #f-mx-slo', (e) => e.length) === 2);
  });

  it('raised no page errors', () => {
    assert.deepEqual(pageErrors, []);
  });
});
