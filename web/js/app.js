// bench-race web UI. Talks only to bench-central (same origin): REST for machines and jobs, SSE
// for live events. Everything that comes from the fleet or the user (prompts, outputs, model
// names, labels) is rendered with textContent / text nodes, never as HTML.
import { api, ApiError, Stream } from './api.js';
import { h, s, replace, $ } from './dom.js';
import { num, ms, rate, int, pct, when } from './format.js';
import { barChart, fitLabels } from './chart.js';
import { renderFingerprint, diffView } from './fingerprint.js';
import { renderTelemetry, energyText, energyVerdict } from './telemetry.js';
import {
  newJob, machine, applySnapshot, applyEvent, liveRate, liveTokens, CHARS_PER_TOKEN, machineStats, deltaPct, clearWinner, allTerminal, TERMINAL,
  MIN_CI_SAMPLES, hasCi, ciHalfWidthPct, isMeasured,
} from './state.js';

const LS = {
  form: 'bench-race.form',
  baseline: 'bench-race.baseline',
  current: 'bench-race.current-job',
};
const EVENT_TYPES = ['job_accepted', 'job_started', 'llm_token', 'repeat_done', 'job_done', 'job_error', 'job_cancelled', 'telemetry'];
const FINISHED = new Set(['done', 'failed', 'cancelled', 'partial']);
const PALETTE = ['#2f6fdf', '#e0702a', '#1f9d6b', '#b23fbf', '#c9a400', '#d6374f', '#2aa7b8', '#6b7a8f'];

const ui = {
  fleet: new Map(), // machine_id -> machine object from /api/machines
  colors: new Map(), // machine_id -> colour, stable for the session
  job: null, // state.js job state of the job on screen
  jobStream: null,
  panes: new Map(), // machine_id -> pane DOM refs
  history: new Map(), // job_id -> job list item
  historyNext: null,
  baseline: localStorage.getItem(LS.baseline) || null,
  sort: { key: 'tps', dir: 'desc' },
  renderQueued: false,
  rankingTimer: null,
  openSeq: 0,
};

// ---------------------------------------------------------------------------------------------
// Fleet

function colorOf(id) {
  if (!ui.colors.has(id)) ui.colors.set(id, PALETTE[ui.colors.size % PALETTE.length]);
  return ui.colors.get(id);
}

/** Registry status as the UI names it: idle / busy / offline. */
function fleetStatus(id) {
  const m = ui.fleet.get(id);
  if (!m) return 'unknown';
  const st = m.status;
  if (st === 'offline') return 'offline';
  if (st === 'busy') return 'busy';
  return 'idle'; // "online" / "idle"
}

function labelOf(id) {
  return ui.job?.machines.get(id)?.label || ui.fleet.get(id)?.label || id;
}

async function loadFleet() {
  try {
    const doc = await api.machines();
    ui.fleet.clear();
    for (const m of doc.machines ?? []) {
      ui.fleet.set(m.machine_id, m);
      colorOf(m.machine_id);
    }
    fleetChanged();
  } catch (e) {
    setConn('error', 'central unreachable');
  }
}

function fleetChanged() {
  const n = ui.fleet.size;
  const up = [...ui.fleet.keys()].filter((id) => fleetStatus(id) !== 'offline').length;
  $('#fleet-count').textContent = `${up}/${n} machines online`;
  renderMachineChecks();
  renderModelOptions();
  scheduleRender();
}

function renderMachineChecks() {
  const box = $('#machine-checks');
  const all = $('#f-all').checked;
  const prev = new Set([...box.querySelectorAll('input:checked')].map((i) => i.value));
  const saved = loadForm().machines;
  const wanted = prev.size ? prev : new Set(Array.isArray(saved) ? saved : []);
  replace(box, [...ui.fleet.values()].map((m) => {
    const st = fleetStatus(m.machine_id);
    const input = h('input', { type: 'checkbox', value: m.machine_id, name: 'machine' });
    input.checked = all || wanted.has(m.machine_id);
    input.disabled = all;
    input.addEventListener('change', () => { saveForm(); renderModelOptions(); });
    return h('label', { class: 'check' }, input,
      h('span', { class: 'swatch', style: { background: colorOf(m.machine_id) } }),
      h('span', { class: 'check-label' }, m.label || m.machine_id),
      h('span', { class: `badge badge-${st}` }, st));
  }));
  if (!ui.fleet.size) box.append(h('p', { class: 'note' }, 'No agents registered yet.'));
}

function selectedMachines() {
  if ($('#f-all').checked) return [...ui.fleet.keys()];
  return [...document.querySelectorAll('#machine-checks input:checked')].map((i) => i.value);
}

function renderModelOptions() {
  const sel = $('#f-model');
  const current = sel.value || loadForm().model || '';
  const chosen = selectedMachines();
  const counts = new Map();
  for (const id of chosen.length ? chosen : [...ui.fleet.keys()]) {
    for (const model of ui.fleet.get(id)?.models ?? []) counts.set(model, (counts.get(model) ?? 0) + 1);
  }
  const total = chosen.length || ui.fleet.size;
  const models = [...counts.keys()].sort((a, b) => counts.get(b) - counts.get(a) || a.localeCompare(b));
  if (current && !counts.has(current)) models.push(current);
  replace(sel, models.map((model) => {
    const c = counts.get(model) ?? 0;
    const opt = h('option', { value: model }, `${model}  (${c}/${total})`);
    return opt;
  }));
  if (!models.length) sel.append(h('option', { value: '' }, 'no models offered'));
  sel.value = models.includes(current) ? current : (models[0] ?? '');
  updateModelNote();
}

function updateModelNote() {
  const model = $('#f-model').value;
  const missing = selectedMachines().filter((id) => !(ui.fleet.get(id)?.models ?? []).includes(model));
  $('#model-note').textContent = model && missing.length
    ? `Not offered by: ${missing.map((id) => ui.fleet.get(id)?.label || id).join(', ')}`
    : '';
}

// ---------------------------------------------------------------------------------------------
// Form

function loadForm() {
  try {
    return JSON.parse(localStorage.getItem(LS.form) || '{}') || {};
  } catch {
    return {};
  }
}

const FORM_FIELDS = ['shape', 'pp', 'tg', 'prompt_tokens', 'depth', 'prompt', 'max_tokens', 'num_ctx', 'temperature', 'repeat_mode', 'repeat', 'max_repeat', 'target_ci_pct', 'warmup', 'seed'];

function saveForm() {
  const f = $('#run-form');
  const v = {
    model: f.model.value,
    all: $('#f-all').checked,
    machines: [...document.querySelectorAll('#machine-checks input:checked')].map((i) => i.value),
  };
  for (const k of FORM_FIELDS) v[k] = f[k].value;
  localStorage.setItem(LS.form, JSON.stringify(v));
}

function restoreForm() {
  const v = loadForm();
  const f = $('#run-form');
  for (const k of FORM_FIELDS) {
    if (typeof v[k] !== 'string') continue;
    // a saved choice this page no longer offers is left at its default
    if (f[k].tagName === 'SELECT' && ![...f[k].options].some((o) => o.value === v[k])) continue;
    f[k].value = v[k];
  }
  if (typeof v.all === 'boolean') $('#f-all').checked = v.all;
  syncForm();
}

const SHAPE_HINTS = {
  free: 'Your prompt, as written; output stops where the model stops (or at max tokens).',
  profile: 'llama-bench\'s ppN-tgM: a prompt of exactly N tokens, then exactly M generated; reports pp and tg tokens/s.',
  tokens: 'A prompt of exactly N tokens (built by the agent for the model), then up to max tokens, run to the end.',
};

/** Shows the fields of the chosen shape and repeat mode only. */
function syncForm() {
  const f = $('#run-form');
  const shape = f.shape.value;
  const mode = f.repeat_mode.value;
  for (const el of f.querySelectorAll('[data-shape]')) el.hidden = !el.dataset.shape.split(' ').includes(shape);
  for (const el of f.querySelectorAll('[data-repeat]')) el.hidden = el.dataset.repeat !== mode;
  $('#shape-hint').textContent = SHAPE_HINTS[shape] ?? '';
}

function formMsg(text, kind = 'error') {
  const el = $('#form-msg');
  el.textContent = text;
  el.dataset.kind = kind;
}

/** The job as the form describes it: valid for schemas::Job (the same checks, said in the form's words). */
function readJob() {
  const f = $('#run-form');
  const label = (el) => el.labels[0].textContent.replace(/\(.*\)/, '').trim();
  const intIn = (el, min) => {
    const n = Number(el.value);
    if (el.value.trim() === '' || !Number.isInteger(n) || n < min) throw new Error(`${label(el)} must be a whole number ≥ ${min}`);
    return n;
  };
  const model = f.model.value;
  if (!model) throw new Error('Choose a model (no machine offers one yet).');
  const temperature = Number(f.temperature.value);
  if (f.temperature.value.trim() === '' || !Number.isFinite(temperature) || temperature < 0) throw new Error('Temperature must be a number ≥ 0');
  const body = { test_type: 'llm_generate', model, prompt: '', num_ctx: intIn(f.num_ctx, 1), temperature };
  const shape = f.shape.value;
  let promptTokens = null;
  if (shape === 'profile') {
    const pp = intIn(f.pp, 1);
    const tg = intIn(f.tg, 1);
    body.profile = `pp${pp}-tg${tg}`;
    body.max_tokens = tg;
    promptTokens = pp;
  } else if (shape === 'tokens') {
    promptTokens = intIn(f.prompt_tokens, 1);
    body.prompt_tokens = promptTokens;
    body.max_tokens = intIn(f.max_tokens, 1);
  } else {
    if (!f.prompt.value.trim()) throw new Error('Write a prompt.');
    body.prompt = f.prompt.value;
    body.max_tokens = intIn(f.max_tokens, 1);
  }
  const depth = intIn(f.depth, 0);
  if (depth > 0) body.depth = depth;
  if (promptTokens !== null && depth + promptTokens + body.max_tokens > body.num_ctx) {
    throw new Error(`Depth + prompt tokens + generated tokens is ${depth + promptTokens + body.max_tokens}, more than the context size ${body.num_ctx}: raise Context size.`);
  }
  if (f.repeat_mode.value === 'auto') {
    body.repeat = 'auto';
    body.max_repeat = intIn(f.max_repeat, MIN_CI_SAMPLES);
    const t = Number(f.target_ci_pct.value);
    if (f.target_ci_pct.value.trim() === '' || !Number.isFinite(t) || t <= 0 || t > 100) throw new Error('Target ±% must be a number above 0 and at most 100');
    body.target_ci_pct = t;
  } else {
    body.repeat = intIn(f.repeat, 1);
  }
  body.warmup = intIn(f.warmup, 0);
  if (f.seed.value.trim() !== '') body.seed = intIn(f.seed, 0);
  if ($('#f-all').checked) body.machines = 'all';
  else {
    const chosen = selectedMachines();
    if (!chosen.length) throw new Error('Choose at least one machine, or All machines.');
    body.machines = chosen;
  }
  return body;
}

async function submit(ev) {
  ev?.preventDefault();
  let body;
  try {
    body = readJob();
  } catch (e) {
    formMsg(e.message);
    return;
  }
  saveForm();
  const btn = $('#run-btn');
  btn.disabled = true;
  formMsg('Submitting…', 'info');
  try {
    const res = await api.submit(body);
    const refused = (res.machines ?? []).filter((m) => m.status !== 'accepted');
    formMsg(refused.length
      ? `Started; not running on: ${refused.map((m) => `${m.machine_id} (${m.error?.message || m.status})`).join(', ')}`
      : '', refused.length ? 'warn' : 'info');
    await openJob(res.job_id, { submitted: res, body });
  } catch (e) {
    formMsg(e instanceof ApiError ? `${e.message} [${e.code}]` : String(e.message || e));
  } finally {
    btn.disabled = false;
  }
}

async function cancel() {
  if (!ui.job) return;
  $('#cancel-btn').disabled = true;
  try {
    await api.cancel(ui.job.job_id);
    formMsg('Cancel sent.', 'info');
  } catch (e) {
    formMsg(`Cancel failed: ${e.message}`);
    $('#cancel-btn').disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Opening a job: snapshot + (for a running job) its event stream, replayed from the start

function setHash(id) {
  const want = id ? '#job=' + encodeURIComponent(id) : '';
  if (location.hash !== want) history.replaceState(null, '', location.pathname + location.search + want);
}

function hashJob() {
  const m = /^#job=([A-Za-z0-9_-]{1,128})$/.exec(location.hash);
  return m ? m[1] : null;
}

async function openJob(id, { submitted, body } = {}) {
  const token = ++ui.openSeq;
  ui.jobStream?.close();
  ui.jobStream = null;
  clearTimeout(ui.rankingTimer);
  const job = newJob(id);
  ui.job = job;
  ui.panes.clear();
  replace($('#panes'));
  setHash(id);
  localStorage.setItem(LS.current, id);
  if (!submitted) formMsg('');
  if (body) {
    const { machines, ...j } = body;
    job.job = j;
    job.created_ms = Date.now();
    job.source = 'central';
  }
  for (const sm of submitted?.machines ?? []) {
    const st = machine(job, sm.machine_id);
    if (sm.status !== 'accepted') {
      st.status = sm.status === 'offline' ? 'offline' : 'rejected';
      st.error = sm.error ?? { code: sm.status, message: `machine ${sm.status}` };
    }
  }
  markHistoryCurrent();
  scheduleRender();

  let doc = null;
  for (let attempt = 0; attempt < 5 && !doc; attempt++) {
    try {
      doc = await api.job(id, ui.baseline);
    } catch (e) {
      if (e.status === 404 && submitted && attempt < 4) {
        await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
        continue;
      }
      if (token !== ui.openSeq) return;
      if (!submitted) {
        showJobError(e.status === 404 ? `Job ${id} is not known to central.` : `Could not load job ${id}: ${e.message}`);
        return;
      }
      break;
    }
  }
  if (token !== ui.openSeq) return;
  const finished = doc && FINISHED.has(doc.status);
  if (doc) applySnapshot(job, doc, { withText: finished });
  if (finished) {
    job.ended = true;
    if (localStorage.getItem(LS.current) === id) localStorage.removeItem(LS.current);
  } else {
    followJob(job);
  }
  scheduleRender();
}

function closeJob() {
  ui.openSeq++;
  ui.jobStream?.close();
  ui.jobStream = null;
  ui.job = null;
  ui.panes.clear();
  replace($('#panes'));
  replace($('#job-meta'));
  setHash(null);
  localStorage.removeItem(LS.current);
  markHistoryCurrent();
  scheduleRender();
}

function followJob(job) {
  const handlers = {};
  for (const type of EVENT_TYPES) {
    handlers[type] = (ev) => {
      if (ui.job !== job) return;
      const m = applyEvent(job, ev);
      if (!m) return;
      if (TERMINAL.has(ev.type)) scheduleRanking(job);
      scheduleRender(m.machine_id);
    };
  }
  handlers.end = async (data) => {
    if (ui.job !== job) return;
    job.status = data?.status ?? job.status;
    job.ended = true;
    if (localStorage.getItem(LS.current) === job.job_id) localStorage.removeItem(LS.current);
    await refreshSnapshot(job, true);
  };
  ui.jobStream = new Stream(api.jobEventsUrl(job.job_id), {
    handlers,
    onState: (st) => {
      if (ui.job !== job) return;
      job.streamState = st;
      scheduleRender();
    },
  });
}

async function refreshSnapshot(job, withText) {
  try {
    const doc = await api.job(job.job_id, ui.baseline);
    if (ui.job !== job) return;
    applySnapshot(job, doc, { withText: withText && FINISHED.has(doc.status) });
  } catch {
    /* keep what we have */
  }
  scheduleRender();
}

function scheduleRanking(job) {
  clearTimeout(ui.rankingTimer);
  ui.rankingTimer = setTimeout(() => refreshSnapshot(job, false), 250);
}

function showJobError(text) {
  ui.job = null;
  replace($('#job-meta'), h('p', { class: 'form-msg', 'data-kind': 'error' }, text));
  $('#job-h').textContent = 'Job';
  $('#compare').hidden = true;
  renderPanes();
}

// ---------------------------------------------------------------------------------------------
// Rendering

function scheduleRender() {
  if (ui.renderQueued) return;
  ui.renderQueued = true;
  requestAnimationFrame(() => {
    ui.renderQueued = false;
    render();
  });
}

function render() {
  renderJobHead();
  renderPanes();
  renderCompare();
  const running = ui.job && !ui.job.ended && !allTerminal(ui.job);
  $('#cancel-btn').disabled = !running;
}

function statusBadge(status, text) {
  return h('span', { class: `status status-${status}` }, text ?? status);
}

function renderJobHead() {
  const job = ui.job;
  const meta = $('#job-meta');
  const stEl = $('#job-status');
  const exp = $('#exports');
  $('#close-job').hidden = !job;
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
  $('#job-h').textContent = 'Race';
  const running = !job.ended && !allTerminal(job);
  const st = running ? 'running' : (job.status === 'running' ? 'done' : job.status);
  stEl.hidden = false;
  stEl.className = `status status-${st}`;
  stEl.textContent = st + (job.streamState === 'reconnecting' && running ? ' · reconnecting…' : '');
  exp.hidden = false;
  replace(exp, h('span', { class: 'muted' }, 'Export'),
    ['csv', 'json', 'ndjson'].map((ext) => h('a', { href: api.exportUrl(job.job_id, ext), download: `${job.job_id}.${ext}`, class: 'export' }, ext.toUpperCase())));
  const j = job.job ?? {};
  const runs = j.repeat != null ? repeatText(j) + (j.warmup ? ` + ${j.warmup} warmup` : '') : null;
  const kv = (k, v) => (v === undefined || v === null ? null : h('span', { class: 'kv' }, h('span', { class: 'k' }, k), h('span', { class: 'v' }, String(v))));
  replace(meta,
    h('div', { class: 'kvs' },
      kv('model', j.model),
      kv('shape', shapeText(j)),
      j.depth ? kv('depth', j.depth) : null,
      j.profile ? null : kv('max tokens', j.max_tokens),
      kv('ctx', j.num_ctx),
      kv('temp', j.temperature),
      kv('runs', runs),
      j.seed != null ? kv('seed', j.seed) : null,
      kv('started', when(job.created_ms)),
      job.source === 'external' ? h('span', { class: 'tag', title: 'Submitted on NATS directly (e.g. the nats CLI), not through this page' }, 'nats CLI') : null,
      h('span', { class: 'kv' }, h('span', { class: 'k' }, 'job'), h('span', { class: 'v job-id' }, job.job_id))),
    h('p', { class: 'prompt', id: 'job-prompt', title: 'Prompt' }, j.prompt || (hasShape(j) ? 'prompt built by each agent to the exact size, from a fixed text' : '')));
}

/** The job's repeats in words: "3", or "auto (max 20)". */
function repeatText(j) {
  if (j.repeat === 'auto') return `auto (max ${j.max_repeat ?? 20}, ±${j.target_ci_pct ?? 2}%)`;
  return String(j.repeat ?? 1);
}

/** The job asks for a controlled size (a profile or prompt_tokens): pp/tg rates are meaningful. */
function hasShape(j) {
  return !!(j && (j.profile || j.prompt_tokens != null));
}

function shapeText(j) {
  if (j.profile) return j.profile;
  if (j.prompt_tokens != null) return `${j.prompt_tokens}-token prompt`;
  return 'free prompt';
}

/** Panes in the fleet's order (machines.yaml order, then by id), so a machine keeps its place. */
function paneIds() {
  if (!ui.job) return [...ui.fleet.keys()];
  const order = [...ui.fleet.keys()];
  const rank = (id) => (order.includes(id) ? order.indexOf(id) : order.length);
  return [...ui.job.machines.keys()].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function renderPanes() {
  const root = $('#panes');
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
    metrics,
    notes);
  return { id, el, title, fleetBadge, pin, jobState, live, out, jump, metrics, notes, info, fp, tele, err, shownRun: null, shownLen: 0 };
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
    renderFleetInfo(p, fm);
    replace(p.fp);
    p.tele.hidden = true;
    return;
  }
  renderFingerprint(p.fp, m);
  renderTelemetry(p.tele, m, ui.fleet.get(id));
  // state line
  const j = ui.job.job;
  let state = m.status;
  if (m.status === 'running' && m.run) {
    // Indices no longer say what a run is (a cold run may come first): its own flags do.
    if (m.run.cold) state = 'cold run · not counted';
    else if (m.run.warmup) state = `warmup ${m.repeats.filter((r) => r.warmup).length + 1}${j?.warmup ? '/' + j.warmup : ''}`;
    else {
      const k = m.repeats.filter((r) => !r.warmup && !r.cold).length + 1;
      state = `run ${k}${j ? '/' + repeatText(j) : ''}`;
    }
  } else if (m.status === 'done') {
    const n = m.repeats.filter((r) => isMeasured(r, !!j?.include_short)).length;
    state = `done · ${n} run${n === 1 ? '' : 's'}`;
  }
  // A re-used job id is a new run of the job on this machine: say which one is shown.
  if (m.earlierRuns.length) state = `run #${m.earlierRuns.length + 1} of this job · ${state}`;
  p.jobState.textContent = state;
  p.jobState.title = m.runId ? `run id ${m.runId}` : '';
  p.el.dataset.state = m.status;
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
  renderPaneMetrics(p, m);
  renderPaneNotes(p, m);
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

function baselineStats() {
  if (!ui.baseline || !ui.job) return null;
  const b = ui.job.machines.get(ui.baseline);
  return b ? machineStats(b, !!ui.job.job?.include_short) : null;
}

function deltaEl(v, betterWhenPositive) {
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
  const st = machineStats(m, !!j?.include_short);
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
  const j = ui.job?.job;
  const includeShort = !!j?.include_short;
  const st = machineStats(m, includeShort);
  const li = (cls, ...parts) => h('li', { class: cls }, ...parts);
  const items = [];
  if (st.cold) {
    const c = st.cold;
    items.push(li('note-cold', `cold run (first request after the model load), not counted: TTFT ${ms(c.ttft_ms)}`, c.load_ms != null ? `, load ${ms(c.load_ms)}` : ''));
  }
  const flagged = [];
  for (const r of m.repeats) {
    if (r.warmup || r.cold) continue;
    const what = [];
    if (r.short_output) what.push(`short output: ${int(r.gen_tokens)} tokens of ${int(m.shape?.max_tokens ?? j?.max_tokens)}${includeShort ? ' (included)' : ', not counted'}`);
    if (r.prompt_cache_hit) what.push(`prompt cache hit${r.prompt_evaluated != null ? `: ${int(r.prompt_evaluated)} of ${int(r.prompt_tokens)} prompt tokens evaluated` : ''}`);
    if (r.gen_tokens_per_s == null || !Number.isFinite(r.ttft_ms)) what.push(`no ${Number.isFinite(r.ttft_ms) ? 'decode rate' : 'TTFT or rate'}: ${r.null_reason ?? 'too few tokens'}`);
    if (what.length) flagged.push(li('note-flag', `repeat #${r.repeat_index}: ${what.join('; ')}`));
  }
  items.push(...flagged.slice(0, NOTES_MAX));
  if (flagged.length > NOTES_MAX) items.push(li('note-flag', `… and ${flagged.length - NOTES_MAX} more flagged runs (see the CSV export)`));
  if (m.status === 'done' && m.stopReason) items.push(li('note-stop', stopText(m.stopReason, st)));
  replace(p.notes, items);
  p.notes.hidden = !items.length;
}

function stopText(reason, st) {
  const hw = ciHalfWidthPct(st.gen_tokens_per_s);
  const at = hw === null ? '' : ` (decode ±${num(hw, 1)}%)`;
  switch (reason) {
    case 'precision': return `stopped: interval ±${num(hw, 1)}% reached`;
    case 'decided': return `stopped: decided, its interval separated from every other machine's${at}`;
    case 'max_repeat': return `stopped: max_repeat reached after ${st.n} runs${at}`;
    case 'count': return `stopped: ran the ${st.n} repeats asked for${at}`;
    default: return `stopped: ${reason}`;
  }
}

function tokenSource(m) {
  const src = m.repeats.find((r) => !r.warmup && !r.cold)?.token_count_source;
  return src === 'chunk_count' ? 'counted chunks (approx.)' : null;
}

function setBaseline(id) {
  ui.baseline = id;
  if (id) localStorage.setItem(LS.baseline, id);
  else localStorage.removeItem(LS.baseline);
  scheduleRender();
}

// ---------------------------------------------------------------------------------------------
// Comparison: verdict, chart, sortable table

function compareRows() {
  const job = ui.job;
  const base = baselineStats();
  const serverRank = new Map((job.ranking ?? []).map((r) => [r.machine_id, r]));
  return [...job.machines.values()].map((m) => {
    const st = machineStats(m, !!job.job?.include_short);
    const tps = st.gen_tokens_per_s;
    const ttft = st.ttft_ms;
    return {
      id: m.machine_id,
      label: m.label || ui.fleet.get(m.machine_id)?.label || m.machine_id,
      engine: m.engine ?? '',
      status: m.status,
      n: st.n,
      tps,
      ttft,
      total: st.total_ms,
      tokens: st.gen_tokens,
      dTps: base && ui.baseline !== m.machine_id ? deltaPct(tps?.median, base.gen_tokens_per_s?.median) : null,
      dTtft: base && ui.baseline !== m.machine_id ? deltaPct(ttft?.median, base.ttft_ms?.median) : null,
      rank: serverRank.get(m.machine_id)?.rank ?? null,
      energy: st.joules_per_token,
    };
  });
}

function renderCompare() {
  const job = ui.job;
  const sec = $('#compare');
  if (!job || ![...job.machines.values()].some((m) => m.repeats.some((r) => !r.warmup && !r.cold))) {
    sec.hidden = true;
    return;
  }
  sec.hidden = false;
  const rows = compareRows();
  // rebuilt only when something it shows changed (not on every streamed token: keeps focus and hover)
  const avail0 = $('#charts').clientWidth;
  const sig = JSON.stringify([job.job_id, rows, ui.sort, ui.baseline, avail0, job.ranking, job.ended, allTerminal(job)]);
  if (sig === ui.compareSig) return;
  ui.compareSig = sig;
  const withTps = rows.filter((r) => r.tps);

  // verdicts: a winner only where the 95% intervals of the medians are separated
  const tpsW = clearWinner(rows.map((r) => ({ machine_id: r.id, stat: r.tps })), true);
  const rank1 = job.ranking?.find((r) => r.rank === 1);
  if (rank1 && typeof rank1.clear_winner === 'boolean' && rank1.machine_id === tpsW.winner) tpsW.clear = rank1.clear_winner;
  const ttftW = clearWinner(rows.map((r) => ({ machine_id: r.id, stat: r.ttft })), false);
  const running = !job.ended && !allTerminal(job);
  replace($('#verdict'),
    verdictItem('Decode', tpsW, 'tok/s', true, (v) => num(v, 1), running),
    verdictItem('TTFT', ttftW, 'ms', false, (v) => num(v, v >= 100 ? 0 : 1), running),
    energyVerdict(rows));
  const winners = new Set([tpsW.clear && tpsW.winner].filter(Boolean));

  // chart
  const chartRows = (key) => rows.map((r) => ({
    id: r.id, label: r.label, color: colorOf(r.id), stat: r[key], baseline: r.id === ui.baseline, winner: key === 'tps' ? winners.has(r.id) : ttftW.clear && ttftW.winner === r.id,
  }));
  // drawn at the size shown, so text stays at its real pixel size in any window
  const avail = $('#charts').clientWidth || 900;
  const width = avail >= 2 * 380 + 24 ? (avail - 24) / 2 : avail;
  ui.chartWidth = width;
  replace($('#charts'),
    h('figure', { class: 'chart-fig', id: 'chart-tps' }, barChart(chartRows('tps'), { title: 'Decode tokens/s', unit: 'tok/s', better: 'higher', digits: 1, width })),
    h('figure', { class: 'chart-fig', id: 'chart-ttft' }, barChart(chartRows('ttft'), { title: 'Time to first token', unit: 'ms', better: 'lower', digits: 0, width })));
  fitLabels($('#charts'));

  // table
  const cols = [
    { key: 'label', label: 'Machine', get: (r) => r.label, text: true },
    { key: 'engine', label: 'Engine', get: (r) => r.engine, text: true },
    { key: 'n', label: 'Runs', get: (r) => r.n, fmt: (r) => String(r.n) },
    { key: 'tps', label: 'Decode tok/s', get: (r) => r.tps?.median, fmt: (r) => rate(r.tps?.median), range: (r) => rangeText(r.tps, 1), best: 'max' },
    { key: 'ttft', label: 'TTFT ms', get: (r) => r.ttft?.median, fmt: (r) => num(r.ttft?.median, 1), range: (r) => rangeText(r.ttft, 0), best: 'min' },
    { key: 'total', label: 'Total ms', get: (r) => r.total?.median, fmt: (r) => num(r.total?.median, 0), range: (r) => rangeText(r.total, 0), best: 'min' },
    { key: 'tokens', label: 'Tokens', get: (r) => r.tokens?.median, fmt: (r) => int(r.tokens?.median) },
    { key: 'dTps', label: 'Δ decode', get: (r) => r.dTps, delta: true, good: true },
    { key: 'dTtft', label: 'Δ TTFT', get: (r) => r.dTtft, delta: true, good: false },
  ];
  const { key, dir } = ui.sort;
  const col = cols.find((c) => c.key === key) ?? cols[3];
  const sorted = rows.slice().sort((a, b) => {
    const va = col.get(a);
    const vb = col.get(b);
    const na = va === null || va === undefined || va === '';
    const nb = vb === null || vb === undefined || vb === '';
    if (na !== nb) return na ? 1 : -1; // empty cells last either way
    const c = col.text ? String(va).localeCompare(String(vb)) : va - vb;
    return dir === 'asc' ? c : -c;
  });
  const bestOf = (c) => {
    const vals = withTps.length > 1 ? rows.map(c.get).filter((v) => Number.isFinite(v)) : [];
    if (vals.length < 2) return null;
    return c.best === 'max' ? Math.max(...vals) : Math.min(...vals);
  };
  const bests = new Map(cols.filter((c) => c.best).map((c) => [c.key, bestOf(c)]));
  const table = $('#cmp-table');
  replace(table.tHead, h('tr', {}, cols.map((c) => {
    const active = c.key === key;
    const btn = h('button', { type: 'button', class: 'sort' }, c.label, h('span', { class: 'arrow', 'aria-hidden': 'true' }, active ? (dir === 'asc' ? ' ▲' : ' ▼') : ''));
    btn.addEventListener('click', () => {
      ui.sort = { key: c.key, dir: active ? (dir === 'asc' ? 'desc' : 'asc') : c.text ? 'asc' : c.best === 'min' ? 'asc' : 'desc' };
      renderCompare();
      table.querySelector(`th[data-key="${c.key}"] button`)?.focus();
    });
    return h('th', { scope: 'col', 'data-key': c.key, class: c.text ? 'text' : 'num', 'aria-sort': active ? (dir === 'asc' ? 'ascending' : 'descending') : 'none' }, btn);
  })));
  replace(table.tBodies[0], sorted.map((r) => h('tr', { 'data-machine': r.id, class: (r.id === ui.baseline ? 'is-baseline' : '') + (winners.has(r.id) ? ' is-winner' : '') },
    cols.map((c) => {
      if (c.key === 'label') {
        return h('th', { scope: 'row', class: 'text machine-cell', title: `${r.label} (${r.id})` },
          h('span', { class: 'swatch', style: { background: colorOf(r.id) } }), h('span', { class: 'machine-name' }, r.label),
          r.id === ui.baseline ? h('span', { class: 'tag' }, 'baseline') : null,
          winners.has(r.id) ? h('span', { class: 'tag tag-win' }, 'winner') : null);
      }
      if (c.delta) {
        const v = c.get(r);
        return h('td', { class: 'num' }, r.id === ui.baseline ? h('span', { class: 'muted' }, 'base') : v === null ? '–' : deltaEl(v, c.good));
      }
      const v = c.get(r);
      const isBest = c.best && Number.isFinite(v) && bests.get(c.key) === v;
      const rg = c.range?.(r);
      return h('td', { class: (c.text ? 'text' : 'num') + (isBest ? ' best' : ''), 'data-key': c.key },
        h('span', { class: 'cell-val' }, c.fmt ? c.fmt(r) : String(v ?? '')),
        rg ? h('span', { class: 'cell-range', title: rg.ci ? '95% confidence interval of the median' : 'min–max over repeats (a 95% interval needs 6 runs)' }, rg.text) : null);
    }))));
  $('#baseline-note').textContent = ui.baseline
    ? (job.machines.has(ui.baseline) ? `Δ against baseline ${labelOf(ui.baseline)}` : `Baseline ${ui.baseline} is not in this race`)
    : 'Pin a machine as baseline to see deltas';
}

/** The spread shown under a table cell: the 95% interval when there is one, else min–max. */
function rangeText(st, digits) {
  if (!st) return null;
  if (hasCi(st)) return { ci: true, text: `${num(st.ci_low, digits)}–${num(st.ci_high, digits)}` };
  return st.n > 1 ? { ci: false, text: `${num(st.min, digits)}–${num(st.max, digits)}` } : null;
}

function verdictItem(name, w, unit, higher, f, running) {
  if (!w.winner) return h('li', { class: 'verdict-none' }, h('strong', {}, name + ': '), running ? 'waiting for results from at least two machines…' : 'needs results from at least two machines.');
  const a = w.best.stat;
  const b = w.next.stat;
  const gap = Math.abs(deltaPct(a.median, b.median) ?? 0);
  const wl = labelOf(w.winner);
  const rl = labelOf(w.runnerUp);
  if (w.clear) {
    return h('li', { class: 'verdict-win' }, h('strong', {}, name + ': '), h('span', { class: 'who' }, wl),
      ` wins — ${f(a.median)} vs ${f(b.median)} ${unit} (${num(gap, 1)}% ${higher ? 'faster' : 'lower'}); the 95% intervals of the medians are separated.`);
  }
  if (w.separation?.overlap_pct == null) {
    const counts = [[wl, a.n], [rl, b.n]].filter(([, n]) => n < MIN_CI_SAMPLES).map(([l, n]) => `${l} has ${n}`).join(', ');
    return h('li', { class: 'verdict-tie verdict-needs' }, h('strong', {}, name + ': '), 'no clear winner — ', h('span', { class: 'who' }, wl),
      ` leads ${rl} by ${num(gap, 1)}%, but a 95% interval needs ${MIN_CI_SAMPLES} runs per machine (${counts}): use repeat "auto" or ${MIN_CI_SAMPLES}+ repeats.`);
  }
  return h('li', { class: 'verdict-tie' }, h('strong', {}, name + ': '), 'no clear winner — ', h('span', { class: 'who' }, wl),
    ` leads ${rl} by ${num(gap, 1)}%, but their 95% intervals overlap by ${num(w.separation.overlap_pct, 0)}%.`);
}

// ---------------------------------------------------------------------------------------------
// History

async function loadHistory(more = false) {
  try {
    const doc = await api.jobs(more ? ui.historyNext : undefined);
    if (!more) ui.history.clear();
    for (const j of doc.jobs ?? []) ui.history.set(j.job_id, j);
    ui.historyNext = doc.next_before ?? null;
    renderHistory();
  } catch {
    /* the connection indicator says so */
  }
}

function renderHistory() {
  const list = $('#history-list');
  const items = [...ui.history.values()].sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0));
  replace(list, items.map((j) => {
    const btn = h('button', { type: 'button', class: 'hist-item', 'data-job': j.job_id },
      h('span', { class: 'hist-line' },
        h('span', { class: `dot dot-${j.status}`, title: j.status }),
        h('span', { class: 'hist-time mono' }, when(j.created_ms)),
        h('span', { class: 'hist-model' }, j.model ?? ''),
        j.source === 'external' ? h('span', { class: 'tag', title: 'Submitted on NATS directly' }, 'nats') : null,
        h('span', { class: 'spacer' }),
        (j.machines ?? []).length ? h('span', { class: 'hist-n mono', title: `machines: ${j.machines.join(', ')}` }, `${j.machines.length}×`) : null),
      h('span', { class: 'hist-prompt' }, (j.prompt || (j.profile ? `profile ${j.profile}` : '')).replace(/\s+/g, ' ').slice(0, 120)));
    btn.setAttribute('aria-label', `${j.status} job ${when(j.created_ms)}, ${j.model ?? ''}: ${(j.prompt ?? '').slice(0, 60)}`);
    btn.addEventListener('click', () => openJob(j.job_id));
    const diff = h('button', { type: 'button', class: 'hist-diff small', 'data-diff': j.job_id, title: 'Fingerprint differences between this job and the one open', 'aria-label': `Compare fingerprints of job ${j.job_id} with the open job` }, '⇄');
    diff.addEventListener('click', () => showFingerprintDiff(j));
    return h('li', { class: 'hist-row' }, btn, diff);
  }));
  $('#hist-empty').hidden = items.length > 0;
  $('#hist-more').hidden = !ui.historyNext;
  markHistoryCurrent();
}

/**
 * The fingerprint differences between a job from the history and the one open, per machine the two
 * share (else their first machines), from GET /api/fingerprints/diff.
 */
async function showFingerprintDiff(other) {
  const sec = $('#fp-diff');
  const body = $('#fp-diff-body');
  sec.hidden = false;
  const job = ui.job;
  if (!job) {
    replace(body, h('p', { class: 'note' }, 'Open a job first: its machines are compared with the same machines in the job chosen here.'));
    return;
  }
  if (other.job_id === job.job_id) {
    replace(body, h('p', { class: 'note' }, 'Choose another job than the one open.'));
    return;
  }
  const theirs = other.machines ?? [];
  const ours = [...job.machines.keys()];
  let pairs = ours.filter((id) => theirs.includes(id)).map((id) => [id, id]);
  if (!pairs.length && theirs.length && ours.length) pairs = [[theirs[0], ours[0]]];
  replace(body, h('p', { class: 'note' }, `Comparing ${other.job_id} → ${job.job_id}…`));
  const parts = await Promise.all(pairs.map(async ([a, b]) => {
    try {
      return diffView(await api.fingerprintDiff(`${other.job_id}:${a}`, `${job.job_id}:${b}`), labelOf);
    } catch (e) {
      return h('p', { class: 'form-msg', 'data-kind': 'warn' }, `${labelOf(b)}: ${e.message}`);
    }
  }));
  if (ui.job !== job) return;
  replace(body, parts.length ? parts : h('p', { class: 'note' }, 'The two jobs have no machines to compare.'));
}

function markHistoryCurrent() {
  for (const b of document.querySelectorAll('.hist-item')) {
    if (ui.job && b.dataset.job === ui.job.job_id) b.setAttribute('aria-current', 'true');
    else b.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------------------------------------
// Live fleet and job list: /api/events

function setConn(state, text) {
  const el = $('#conn');
  el.dataset.state = state;
  el.textContent = text;
}

function followFleet() {
  return new Stream('/api/events', {
    terminal: null,
    handlers: {
      machine: (m) => {
        if (!m?.machine_id) return;
        const prev = ui.fleet.get(m.machine_id);
        ui.fleet.set(m.machine_id, { ...prev, ...m });
        colorOf(m.machine_id);
        fleetChanged();
      },
      job: (j) => {
        if (!j?.job_id) return;
        const prev = ui.history.get(j.job_id);
        const item = { ...prev, ...j };
        // central's creation event names no machines yet; keep what the list already knows
        if (!(j.machines ?? []).length && prev?.machines?.length) item.machines = prev.machines;
        ui.history.set(j.job_id, item);
        renderHistory();
        if (ui.job?.job_id === j.job_id && FINISHED.has(j.status) && !ui.job.ended) scheduleRanking(ui.job);
      },
    },
    onState: (st) => {
      if (st === 'open') {
        setConn('live', 'live');
        // anything missed while disconnected
        loadFleet();
        loadHistory();
      } else if (st === 'reconnecting') setConn('reconnecting', 'reconnecting…');
    },
  });
}

// ---------------------------------------------------------------------------------------------
// Wiring

function init() {
  restoreForm();
  const form = $('#run-form');
  form.addEventListener('submit', submit);
  form.addEventListener('change', (e) => {
    if (e.target.id === 'f-all') renderMachineChecks();
    if (e.target.id === 'f-model') updateModelNote();
    if (e.target.id === 'f-all') renderModelOptions();
    if (e.target.id === 'f-shape' || e.target.id === 'f-repeat-mode') syncForm();
    saveForm();
  });
  form.addEventListener('input', saveForm);
  $('#f-prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  $('#cancel-btn').addEventListener('click', cancel);
  $('#close-job').addEventListener('click', closeJob);
  $('#hist-refresh').addEventListener('click', () => loadHistory());
  $('#hist-more').addEventListener('click', () => loadHistory(true));
  $('#fp-diff-close').addEventListener('click', () => { $('#fp-diff').hidden = true; });
  window.addEventListener('hashchange', () => {
    const id = hashJob();
    if (id && id !== ui.job?.job_id) openJob(id);
  });

  new ResizeObserver(() => {
    const avail = $('#charts').clientWidth;
    const width = avail >= 2 * 380 + 24 ? (avail - 24) / 2 : avail;
    if (avail && Math.abs(width - (ui.chartWidth ?? 0)) > 8) scheduleRender();
  }).observe($('#compare'));
  renderJobHead();
  renderPanes();
  loadFleet().then(() => {
    const id = hashJob() || localStorage.getItem(LS.current);
    if (id) openJob(id);
  });
  loadHistory();
  ui.fleetStream = followFleet();
  // For tests and debugging: simulate a network blip. The job stream reconnects either from the
  // last event id (as EventSource does) or from the very start, which replays every event again;
  // both must end with each machine's text exactly once.
  window.__benchRace = Object.freeze({
    dropStreams(fromStart = false) {
      for (const st of [ui.jobStream, ui.fleetStream]) {
        if (!st || st.closed) continue;
        if (fromStart) st.lastId = null;
        st.retry(0);
      }
    },
  });
  // the registry's offline verdict also arrives as `machine` events; this is a slow safety net
  setInterval(() => {
    if (document.visibilityState === 'visible') loadFleet();
  }, 15000);
}

init();
