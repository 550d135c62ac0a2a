// The race view: the job's head (settings, status, exports) and one pane per machine (live output,
// its metrics with the 95% intervals, notes, fingerprint, telemetry, the regression flag). With a
// matrix cell chosen (ui.cell) every number is over that cell's runs only.
import { api } from '../api.js';
import { h, replace, $ } from '../dom.js';
import { num, ms, rate, int, pct, when } from '../format.js';
import { renderFingerprint } from '../fingerprint.js';
import { renderTelemetry, energyText } from '../telemetry.js';
import { liveRate, liveTokens, CHARS_PER_TOKEN, deltaPct, allTerminal, hasCi, ciHalfWidthPct, isMeasured } from '../state.js';
import { ui, colorOf, fleetStatus, labelOf, scheduleRender, repeatText, hasShape, shapeText, isMatrixJob, viewMachine, viewStats, viewJob, loadRunsText, isLoad, LS } from '../ui.js';
import { showCell } from '../job.js';

export function statusBadge(status, text) {
  return h('span', { class: `status status-${status}` }, text ?? status);
}

export function renderJobHead() {
  const job = ui.job;
  const meta = $('#job-meta');
  const stEl = $('#job-status');
  const exp = $('#exports');
  $('#close-job').hidden = !job;
  if (!job && ui.compareIds) {
    $('#job-h').textContent = 'Compare';
    stEl.hidden = true;
    exp.hidden = true;
    replace(meta, h('p', { class: 'note' }, 'Runs against runs: each machine (and cell) the jobs share, the first job as the baseline. A delta is "beyond the intervals" only where the two medians\' 95% intervals are separated.'));
    return;
  }
  if (!job) {
    $('#job-h').textContent = 'Fleet';
    stEl.hidden = true;
    exp.hidden = true;
    if (!meta.querySelector('.form-msg')) {
      replace(meta, h('p', { class: 'note' }, ui.fleet.size
        ? 'Choose a model and a prompt, then Run: every selected machine runs the same job and streams its output here.'
        : 'Waiting for agents to register…'));
    }
    return;
  }
  const matrix = isMatrixJob(job);
  $('#job-h').textContent = matrix ? (ui.cell !== null ? 'Matrix cell' : 'Matrix race') : 'Race';
  const running = !job.ended && !allTerminal(job);
  const st = running ? 'running' : (job.status === 'running' ? 'done' : job.status);
  stEl.hidden = false;
  stEl.className = `status status-${st}`;
  stEl.textContent = st + (job.streamState === 'reconnecting' && running ? ' · reconnecting…' : '');
  exp.hidden = false;
  replace(exp, h('span', { class: 'muted' }, 'Export'),
    ['csv', 'json', 'ndjson'].map((ext) => h('a', { href: api.exportUrl(job.job_id, ext), download: `${job.job_id}.${ext}`, class: 'export' }, ext.toUpperCase())));
  // a cell shown as a race: its own settings (its values over the job's), not the job's base ones
  const inCell = matrix && ui.cell !== null;
  const j = (inCell ? viewJob(job) : job.job) ?? {};
  const loadMatrix = !inCell && !!j.matrix?.concurrency?.length;
  const runs = j.repeat == null && !isLoad(j) ? null
    : (isLoad(j) ? loadRunsText(j) : loadMatrix ? `${j.requests ?? repeatText(j)} per stream` : repeatText(j)) + (j.warmup ? ` + ${j.warmup} warmup` : '');
  const kv = (k, v) => (v === undefined || v === null ? null : h('span', { class: 'kv', 'data-k': k }, h('span', { class: 'k' }, k), h('span', { class: 'v' }, String(v))));
  replace(meta,
    h('div', { class: 'kvs' },
      kv('model', j.matrix?.model?.length ? j.matrix.model.join(', ') : j.model),
      matrix ? kv('cells', (job.cells ?? []).length || null) : null,
      matrix && j.order && j.order !== 'sequential' ? kv('order', j.order) : null,
      j.slo?.ttft_p99_ms != null ? kv('slo', `TTFT p99 ≤ ${num(j.slo.ttft_p99_ms, 0)} ms`) : null,
      ui.baselineJob === job.job_id ? h('span', { class: 'tag tag-pin', title: 'This job is the pinned baseline: other jobs opened are compared with it' }, 'baseline job') : null,
      kv('shape', shapeText(j)),
      j.depth ? kv('depth', j.depth) : null,
      j.profile ? null : kv('max tokens', j.max_tokens),
      kv('ctx', j.num_ctx),
      isLoad(j) ? kv('concurrency', j.concurrency) : null,
      kv('temp', j.temperature),
      kv('runs', runs),
      j.seed != null ? kv('seed', j.seed) : null,
      kv('started', when(job.created_ms)),
      job.source === 'external' ? h('span', { class: 'tag', title: 'Submitted on NATS directly (e.g. the nats CLI), not through this page' }, 'nats CLI') : null,
      h('span', { class: 'kv' }, h('span', { class: 'k' }, 'job'), h('span', { class: 'v job-id' }, job.job_id))),
    ui.cell !== null ? cellBar(ui.cell) : null,
    h('p', { class: 'prompt', id: 'job-prompt', title: 'Prompt' }, j.prompt || (hasShape(j) ? 'prompt built by each agent to the exact size, from a fixed text' : '')));
}

/** The cell shown as a race, and the way back to the whole matrix. */
function cellBar(cell) {
  const back = h('button', { type: 'button', class: 'small', id: 'cell-back' }, '← all cells');
  back.addEventListener('click', () => showCell(null));
  return h('div', { class: 'cell-bar' }, h('span', { class: 'k muted' }, 'cell'), h('span', { class: 'v mono', id: 'cell-key' }, cell || '(no matrix)'), back);
}

/** Panes in the fleet's order (machines.yaml order, then by id), so a machine keeps its place. */
function paneIds() {
  if (!ui.job) return [...ui.fleet.keys()];
  const order = [...ui.fleet.keys()];
  const rank = (id) => (order.includes(id) ? order.indexOf(id) : order.length);
  return [...ui.job.machines.keys()].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

export function renderPanes() {
  const root = $('#panes');
  root.hidden = !!ui.compareIds;
  const ids = paneIds();
  for (const [id, p] of ui.panes) {
    if (!ids.includes(id)) {
      p.el.remove();
      ui.panes.delete(id);
    }
  }
  if (!ids.length) {
    if (!root.querySelector('.empty')) replace(root, h('p', { class: 'empty note' }, 'No machines yet. Start an agent: target/debug/bench-agent --config agent/config/agent.yaml'));
    return;
  }
  root.querySelector('.empty')?.remove();
  ids.forEach((id, i) => {
    let p = ui.panes.get(id);
    if (!p) {
      p = createPane(id);
      ui.panes.set(id, p);
    }
    if (root.children[i] !== p.el) root.insertBefore(p.el, root.children[i] ?? null);
    updatePane(p);
  });
}

function createPane(id) {
  const title = h('h3', { class: 'pane-title' });
  const mid = h('span', { class: 'pane-id mono' }, id);
  const fleetBadge = h('span', { class: 'badge' });
  const pin = h('button', { type: 'button', class: 'pin small', 'aria-pressed': 'false' }, 'Baseline');
  pin.addEventListener('click', () => setBaseline(ui.baseline === id ? null : id));
  const jobState = h('span', { class: 'pane-state mono' });
  const live = h('span', { class: 'pane-live mono', 'aria-live': 'off' });
  const out = h('pre', { class: 'output', tabindex: '0', role: 'log', 'aria-label': `Output of ${id}` });
  const jump = h('button', { type: 'button', class: 'jump small', hidden: true }, '↓ follow');
  jump.addEventListener('click', () => {
    out.scrollTop = out.scrollHeight;
    jump.hidden = true;
  });
  out.addEventListener('scroll', () => {
    if (atBottom(out)) jump.hidden = true;
  });
  const metrics = h('dl', { class: 'metrics' });
  const notes = h('ul', { class: 'pane-notes', hidden: true });
  const info = h('dl', { class: 'fleet-info' });
  const fp = h('div', { class: 'pane-fp' });
  const tele = h('div', { class: 'pane-tele', hidden: true, 'aria-label': `Live telemetry of ${id}` });
  const err = h('p', { class: 'pane-error', role: 'alert', hidden: true });
  const regr = h('p', { class: 'pane-regression', hidden: true });
  const el = h('article', { class: 'pane', 'data-machine': id, 'aria-label': `Machine ${id}` },
    h('header', { class: 'pane-head' },
      h('span', { class: 'swatch', style: { background: colorOf(id) } }),
      h('div', { class: 'pane-names' }, title, mid),
      h('span', { class: 'spacer' }),
      fleetBadge, pin),
    h('div', { class: 'pane-bar' }, jobState, h('span', { class: 'spacer' }), live),
    info,
    fp,
    tele,
    h('div', { class: 'output-wrap' }, out, jump),
    err,
    regr,
    metrics,
    notes);
  return { id, el, title, fleetBadge, pin, jobState, live, out, jump, metrics, notes, info, fp, tele, err, regr, shownRun: null, shownLen: 0 };
}

/** central's entry of the chosen cell for a machine (API.md `cells[].machines[]`), if any. */
function cellEntry(id) {
  return (ui.job?.cells ?? []).find((c) => c.cell === ui.cell)?.machines?.find((x) => x.machine_id === id) ?? null;
}

/** The repeats of the cell the machine runs now (all of them without a matrix). */
function runRepeats(m) {
  const cell = m.run?.cell;
  return cell === undefined ? m.repeats : m.repeats.filter((r) => r.cell === cell);
}

function atBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 6;
}

function updatePane(p) {
  const id = p.id;
  const m = ui.job?.machines.get(id) ?? null;
  p.title.textContent = labelOf(id);
  p.title.title = labelOf(id);
  const fs = fleetStatus(id);
  p.fleetBadge.className = `badge badge-${fs}`;
  p.fleetBadge.textContent = fs;
  p.fleetBadge.title = `Registry status of ${id}`;
  const isBase = ui.baseline === id;
  p.pin.setAttribute('aria-pressed', String(isBase));
  p.pin.textContent = isBase ? 'Baseline ✓' : 'Baseline';
  p.pin.title = isBase ? 'Unpin baseline' : 'Pin as the baseline for deltas';
  p.el.classList.toggle('is-baseline', isBase);

  p.el.classList.toggle('is-fleet', !m);
  if (!m) {
    const fm = ui.fleet.get(id);
    p.jobState.textContent = fs === 'offline' ? 'offline' : fs === 'busy' ? 'busy with another job' : 'ready';
    p.el.dataset.state = fs === 'offline' ? 'offline' : 'ready';
    p.live.textContent = fm?.last_seen_ms ? `seen ${when(fm.last_seen_ms)}` : '';
    setOutput(p, null, '');
    replace(p.metrics);
    replace(p.notes);
    p.notes.hidden = true;
    p.err.hidden = true;
    p.regr.hidden = true;
    renderFleetInfo(p, fm);
    replace(p.fp);
    p.tele.hidden = true;
    return;
  }
  // in a cell view: the cell's settings over the fingerprint's, and no "changes since the previous
  // job" (central compares the machine's job-level fingerprint, which is not this cell's)
  renderFingerprint(p.fp, m, ui.cell !== null && isMatrixJob() ? { settings: viewJob(), fingerprintId: cellEntry(id)?.fingerprint_id } : {});
  renderTelemetry(p.tele, m, ui.fleet.get(id));
  // state line
  const j = viewJob();
  let state = m.status;
  if (m.status === 'running' && m.run) {
    // Indices no longer say what a run is (a cold run may come first): its own flags do.
    if (m.run.cold) state = 'cold run · not counted';
    else if (m.run.warmup) state = `warmup ${runRepeats(m).filter((r) => r.warmup).length + 1}${j?.warmup ? '/' + j.warmup : ''}`;
    else {
      const k = runRepeats(m).filter((r) => !r.warmup && !r.cold).length + 1;
      state = `run ${k}${j ? '/' + (isLoad(j) ? loadRunsText(j) : repeatText(j)) : ''}`;
    }
  } else if (m.status === 'done') {
    const n = viewMachine(m).repeats.filter((r) => isMeasured(r, !!j?.include_short)).length;
    state = `done · ${n} run${n === 1 ? '' : 's'}`;
  }
  // A re-used job id is a new run of the job on this machine: say which one is shown.
  if (m.earlierRuns.length) state = `run #${m.earlierRuns.length + 1} of this job · ${state}`;
  // A matrix job: the cell running now (its runs say which).
  if (ui.cell === null && isMatrixJob() && m.status === 'running') {
    const cell = m.run?.cell ?? m.repeats[m.repeats.length - 1]?.cell;
    if (cell) state += ` · ${cell}`;
  }
  p.jobState.textContent = state;
  p.jobState.title = m.runId ? `run id ${m.runId}` : '';
  p.el.dataset.state = m.status;
  // A matrix overview: the numbers are per cell, in the matrix table (a row opens its race).
  const overview = ui.cell === null && isMatrixJob();
  p.el.classList.toggle('is-matrix', overview);
  if (overview && m.status === 'done') {
    const n = m.cellResults.size;
    p.jobState.textContent = `done · ${n} cell${n === 1 ? '' : 's'}` + (m.earlierRuns.length ? ` · run #${m.earlierRuns.length + 1} of this job` : '');
  }
  if (m.status === 'running' && m.live) {
    const r = liveRate(m);
    const approx = m.live.exact ? '' : '≈';
    p.live.textContent = `${approx}${int(liveTokens(m))} tok · ${r === null ? '–' : approx + rate(r)} tok/s live`;
    p.live.title = m.live.exact
      ? 'Live, from the engine\'s per-chunk token counts; the final decode rate uses the engine\'s total count'
      : `Estimated live from characters (~${CHARS_PER_TOKEN} per token): this engine reports no per-chunk token counts; the final numbers use its own total count`;
  } else {
    p.live.textContent = '';
  }
  setOutput(p, m.status === 'done' ? 'final' : (m.run ? `run${m.run.index}` : 'none'), m.text);
  const notes = [];
  if (m.error) notes.push(`${m.error.code}: ${m.error.message}`);
  if (m.refused) notes.push(`a re-submission was refused: ${m.refused.code}: ${m.refused.message}`);
  p.err.hidden = !notes.length;
  p.err.textContent = notes.join(' · ');
  renderRegression(p, m);
  renderPaneMetrics(p, m);
  renderPaneNotes(p, m);
}

const METRIC_NAMES = { gen_tokens_per_s: ['decode', 'tok/s', 1], ttft_ms: ['TTFT', 'ms', 0] };

/**
 * central's regression flag: this machine against its newest earlier job of the same setup. Said
 * only where it is beyond the 95% intervals ("slower than job X beyond the intervals"); the
 * metrics are those of the cell shown (every cell in a matrix overview).
 */
function renderRegression(p, m) {
  const rg = m.regression;
  if (!rg || !rg.job_id) {
    p.regr.hidden = true;
    return;
  }
  const metrics = (rg.metrics ?? []).filter((x) => ui.cell === null || (x.cell ?? '') === ui.cell);
  const bad = metrics.filter((x) => x.worse && x.exceeds_ci);
  p.regr.hidden = false;
  p.regr.classList.toggle('is-regressed', bad.length > 0);
  p.regr.dataset.job = rg.job_id;
  if (!bad.length) {
    replace(p.regr, `Same setup as job ${rg.job_id} (${when(rg.created_ms)}): no change beyond the intervals.`);
    return;
  }
  const what = bad.map((x) => {
    const [name, unit, d] = METRIC_NAMES[x.metric] ?? [x.metric, '', 1];
    const cell = ui.cell === null && x.cell ? ` [${x.cell}]` : '';
    return `${name}${cell} ${num(x.before, d)} → ${num(x.after, d)} ${unit} (${pct(x.pct)})`;
  });
  const slower = bad.some((x) => x.metric === 'gen_tokens_per_s') ? 'slower' : 'worse';
  const link = h('a', { href: '#job=' + encodeURIComponent(rg.job_id), class: 'regr-job' }, `job ${rg.job_id}`);
  replace(p.regr, h('strong', {}, 'Regression: '), `${slower} than `, link, ' beyond the intervals — ', what.join('; '));
}

function renderFleetInfo(p, fm) {
  if (!fm) {
    replace(p.info);
    return;
  }
  const hw = fm.hardware ?? {};
  const gib = hw.memory_bytes ? `${num(hw.memory_bytes / 2 ** 30, 0)} GiB` : null;
  const row = (k, v) => (v ? h('div', { class: 'info-row' }, h('dt', {}, k), h('dd', {}, v)) : null);
  replace(p.info,
    row('engine', fm.engine),
    row('models', (fm.models ?? []).join(', ') || '–'),
    row('hardware', [hw.cpu, hw.cores ? `${hw.cores} cores` : null, gib, [hw.os, hw.arch].filter(Boolean).join('/')].filter(Boolean).join(' · ')),
    row('agent', fm.version),
    row('notes', fm.notes));
}

/** Shows text in a pane: appends what is new (keeping the reader's scroll), replaces on a new run. */
function setOutput(p, runKey, text) {
  const out = p.out;
  const follow = atBottom(out);
  if (p.shownRun !== runKey || text.length < p.shownLen || (p.shownText !== undefined && !text.startsWith(p.shownText))) {
    out.textContent = text;
    p.shownRun = runKey;
  } else if (text.length > p.shownLen) {
    out.appendChild(document.createTextNode(text.slice(p.shownLen)));
  }
  p.shownLen = text.length;
  p.shownText = text.length < 20000 ? text : undefined;
  out.classList.toggle('is-empty', !text);
  if (follow) out.scrollTop = out.scrollHeight;
  else if (text.length) p.jump.hidden = false;
}

export function baselineStats() {
  if (!ui.baseline || !ui.job) return null;
  const b = ui.job.machines.get(ui.baseline);
  return b ? viewStats(b) : null;
}

export function deltaEl(v, betterWhenPositive) {
  if (v === null) return null;
  const good = betterWhenPositive ? v > 0 : v < 0;
  const cls = Math.abs(v) < 0.05 ? 'delta' : good ? 'delta better' : 'delta worse';
  return h('span', { class: cls, title: 'vs. baseline' }, pct(v));
}

/** "95% CI a–b" when the stats have an interval, else "min–max" over more than one run. */
function spreadText(x, f) {
  if (!x) return null;
  if (hasCi(x)) return `95% CI ${f(x.ci_low)}–${f(x.ci_high)}`;
  return x.n > 1 ? `${f(x.min)}–${f(x.max)}` : null;
}

function renderPaneMetrics(p, m) {
  const j = ui.job?.job;
  const st = viewStats(m);
  const base = baselineStats();
  const isBase = ui.baseline === m.machine_id;
  const med = (x) => x?.median ?? null;
  const item = (label, value, sub, delta, cls) => h('div', { class: 'metric' + (cls ? ' ' + cls : '') },
    h('dt', {}, label),
    h('dd', {}, h('span', { class: 'val' }, value)),
    sub || (delta && !isBase) ? h('dd', { class: 'sub' }, sub ?? '', delta && !isBase ? delta : null) : null);
  const shaped = hasShape(j);
  if (!st.n) {
    const liveTtft = m.status === 'running' && m.live && !m.run?.warmup && !m.run?.cold ? m.live.firstT : null;
    replace(p.metrics,
      item('TTFT', liveTtft === null ? '–' : ms(liveTtft), liveTtft === null ? null : 'first token, live'), item('decode tok/s', '–'), item('total', '–'), item('tokens', '–'),
      shaped ? item('pp tok/s', '–') : null, shaped ? item('tg tok/s', '–') : null,
      item('engine', m.engine ?? '–', null, null, 'text'));
    return;
  }
  replace(p.metrics,
    item('TTFT', ms(med(st.ttft_ms)), spreadText(st.ttft_ms, (v) => num(v, 0)), base ? deltaEl(deltaPct(med(st.ttft_ms), med(base.ttft_ms)), false) : null),
    item('decode tok/s', rate(med(st.gen_tokens_per_s)), spreadText(st.gen_tokens_per_s, (v) => num(v, 1)), base ? deltaEl(deltaPct(med(st.gen_tokens_per_s), med(base.gen_tokens_per_s)), true) : null, 'key'),
    item('total', ms(med(st.total_ms)), spreadText(st.total_ms, (v) => num(v, 0)), base ? deltaEl(deltaPct(med(st.total_ms), med(base.total_ms)), false) : null),
    item('tokens', int(med(st.gen_tokens)), tokenSource(m)),
    shaped ? item('pp tok/s', rate(med(st.pp_tokens_per_s)), spreadText(st.pp_tokens_per_s, (v) => num(v, 0)), base ? deltaEl(deltaPct(med(st.pp_tokens_per_s), med(base.pp_tokens_per_s)), true) : null) : null,
    shaped ? item('tg tok/s', rate(med(st.tg_tokens_per_s)), spreadText(st.tg_tokens_per_s, (v) => num(v, 1)), base ? deltaEl(deltaPct(med(st.tg_tokens_per_s), med(base.tg_tokens_per_s)), true) : null) : null,
    energyItem(item, st),
    item('engine', m.engine ?? '–', st.n > 1 ? `median of ${st.n}` : null, null, 'text'));
}

function energyItem(item, st) {
  const e = energyText(st);
  return item('energy/token', e.value, e.sub, null, 'energy' + (st.joules_per_token ? '' : ' no-sensor'));
}

/** Most flagged runs listed per pane (the rest are counted). */
const NOTES_MAX = 8;

/** What the numbers above leave out or qualify: the cold run, flagged runs, null rates, why it stopped. */
function renderPaneNotes(p, m) {
  const j = viewJob();
  const includeShort = !!j?.include_short;
  const st = viewStats(m);
  const li = (cls, ...parts) => h('li', { class: cls }, ...parts);
  const items = [];
  if (st.cold) {
    const c = st.cold;
    items.push(li('note-cold', `cold run (first request after the model load), not counted: TTFT ${ms(c.ttft_ms)}`, c.load_ms != null ? `, load ${ms(c.load_ms)}` : ''));
  }
  const flagged = [];
  for (const r of viewMachine(m).repeats) {
    if (r.warmup || r.cold) continue;
    const what = [];
    if (r.short_output) what.push(`short output: ${int(r.gen_tokens)} tokens of ${int((ui.cell !== null ? j?.max_tokens : null) ?? m.shape?.max_tokens ?? j?.max_tokens)}${includeShort ? ' (included)' : ', not counted'}`);
    if (r.prompt_cache_hit) what.push(`prompt cache hit${r.prompt_evaluated != null ? `: ${int(r.prompt_evaluated)} of ${int(r.prompt_tokens)} prompt tokens evaluated` : ''}`);
    if (r.gen_tokens_per_s == null || !Number.isFinite(r.ttft_ms)) what.push(`no ${Number.isFinite(r.ttft_ms) ? 'decode rate' : 'TTFT or rate'}: ${r.null_reason ?? 'too few tokens'}`);
    if (what.length) flagged.push(li('note-flag', `repeat #${r.repeat_index}: ${what.join('; ')}`));
  }
  items.push(...flagged.slice(0, NOTES_MAX));
  if (flagged.length > NOTES_MAX) items.push(li('note-flag', `… and ${flagged.length - NOTES_MAX} more flagged runs (see the CSV export)`));
  // why it stopped: in a cell view the cell's own reason (its cell_done), said for its kind of run
  const cellRes = ui.cell !== null ? m.cellResults?.get(ui.cell) : null;
  const reason = ui.cell !== null && isMatrixJob() ? cellRes?.stop_reason ?? null : m.stopReason;
  if (m.status === 'done' && reason) items.push(li('note-stop', stopText(reason, st, j)));
  replace(p.notes, items);
  p.notes.hidden = !items.length;
}

function stopText(reason, st, j) {
  const hw = ciHalfWidthPct(st.gen_tokens_per_s);
  const at = hw === null ? '' : ` (decode ±${num(hw, 1)}%)`;
  if (isLoad(j) && (reason === 'count' || reason === 'duration')) {
    const c = j.concurrency ?? 1;
    const asked = j.duration_s == null ? (j.requests ?? (Number.isInteger(j.repeat) ? j.repeat : 1)) * c : null;
    const measured = asked === null || asked !== st.n ? ` (${st.n} measured)` : '';
    return `stopped: ran ${loadRunsText(j)}${measured}${at}`;
  }
  switch (reason) {
    case 'precision': return `stopped: interval ±${num(hw, 1)}% reached`;
    case 'decided': return `stopped: decided, its interval separated from every other machine's${at}`;
    case 'max_repeat': return `stopped: max_repeat reached after ${st.n} runs${at}`;
    case 'count': return `stopped: ran the ${st.n} repeats asked for${at}`;
    default: return `stopped: ${reason}`;
  }
}

function tokenSource(m) {
  const src = viewMachine(m).repeats.find((r) => !r.warmup && !r.cold)?.token_count_source;
  return src === 'chunk_count' ? 'counted chunks (approx.)' : null;
}

export function setBaseline(id) {
  ui.baseline = id;
  if (id) localStorage.setItem(LS.baseline, id);
  else localStorage.removeItem(LS.baseline);
  scheduleRender();
}
