// The "New race" form: the job it describes (schemas Job, checked as central checks it, said in
// the form's words), its matrix fieldset (cells, order, SLO), saving it across reloads, Run and Cancel.
import { api, ApiError } from '../api.js';
import { $ } from '../dom.js';
import { ui, LS } from '../ui.js';
import { MIN_CI_SAMPLES } from '../state.js';
import { readMatrixFields, cellCount } from '../matrix.js';
import { selectedMachines } from './fleet.js';
import { openJob } from '../job.js';

export function loadForm() {
  try {
    return JSON.parse(localStorage.getItem(LS.form) || '{}') || {};
  } catch {
    return {};
  }
}

const FORM_FIELDS = ['shape', 'pp', 'tg', 'prompt_tokens', 'depth', 'prompt', 'max_tokens', 'num_ctx', 'temperature', 'repeat_mode', 'repeat', 'max_repeat', 'target_ci_pct', 'warmup', 'seed',
  'mx_model', 'mx_max_tokens', 'mx_num_ctx', 'mx_concurrency', 'mx_order', 'mx_requests', 'mx_slo'];

export function saveForm() {
  const f = $('#run-form');
  const v = {
    model: f.model.value,
    all: $('#f-all').checked,
    machines: [...document.querySelectorAll('#machine-checks input:checked')].map((i) => i.value),
    matrix_open: $('#matrix-box').open,
  };
  for (const k of FORM_FIELDS) v[k] = f[k].value;
  localStorage.setItem(LS.form, JSON.stringify(v));
}

export function restoreForm() {
  const v = loadForm();
  const f = $('#run-form');
  for (const k of FORM_FIELDS) {
    if (typeof v[k] !== 'string') continue;
    // a saved choice this page no longer offers is left at its default
    if (f[k].tagName === 'SELECT' && ![...f[k].options].some((o) => o.value === v[k])) continue;
    f[k].value = v[k];
  }
  if (typeof v.all === 'boolean') $('#f-all').checked = v.all;
  if (v.matrix_open) $('#matrix-box').open = true;
  syncForm();
}

const SHAPE_HINTS = {
  free: 'Your prompt, as written; output stops where the model stops (or at max tokens).',
  profile: 'llama-bench\'s ppN-tgM: a prompt of exactly N tokens, then exactly M generated; reports pp and tg tokens/s.',
  tokens: 'A prompt of exactly N tokens (built by the agent for the model), then up to max tokens, run to the end.',
};

/** The matrix fields as readMatrixFields takes them. */
function matrixFields(f) {
  return { model: f.mx_model.value, max_tokens: f.mx_max_tokens.value, num_ctx: f.mx_num_ctx.value, concurrency: f.mx_concurrency.value, order: f.mx_order.value, requests: f.mx_requests.value, slo_ttft_p99_ms: f.mx_slo.value };
}

/** Shows the fields of the chosen shape and repeat mode only; says how many cells the matrix has. */
export function syncForm() {
  const f = $('#run-form');
  const shape = f.shape.value;
  const mode = f.repeat_mode.value;
  for (const el of f.querySelectorAll('[data-shape]')) el.hidden = !el.dataset.shape.split(' ').includes(shape);
  for (const el of f.querySelectorAll('[data-repeat]')) el.hidden = el.dataset.repeat !== mode;
  $('#shape-hint').textContent = SHAPE_HINTS[shape] ?? '';
  let note = '';
  let sum = '';
  try {
    const n = cellCount(readMatrixFields(matrixFields(f), { profile: shape === 'profile', auto: mode === 'auto' }).matrix);
    if (n) {
      note = `${n} cell${n === 1 ? '' : 's'} per machine`;
      sum = ` · ${n} cell${n === 1 ? '' : 's'}`;
    }
  } catch (e) {
    note = e.message;
    sum = ' · check the lists';
  }
  $('#matrix-note').textContent = note;
  $('#matrix-sum').textContent = sum;
}

export function formMsg(text, kind = 'error') {
  const el = $('#form-msg');
  el.textContent = text;
  el.dataset.kind = kind;
}

/** The job as the form describes it: valid for schemas::Job (the same checks, said in the form's words). */
export function readJob() {
  const f = $('#run-form');
  const label = (el) => el.labels[0].textContent.replace(/\(.*\)/, '').trim();
  const intIn = (el, min) => {
    const n = Number(el.value);
    if (el.value.trim() === '' || !Number.isInteger(n) || n < min) throw new Error(`${label(el)} must be a whole number ≥ ${min}`);
    return n;
  };
  const shape = f.shape.value;
  const mx = readMatrixFields(matrixFields(f), { profile: shape === 'profile', auto: f.repeat_mode.value === 'auto' });
  const model = mx.matrix?.model?.[0] ?? f.model.value;
  if (!model) throw new Error('Choose a model (no machine offers one yet).');
  const temperature = Number(f.temperature.value);
  if (f.temperature.value.trim() === '' || !Number.isFinite(temperature) || temperature < 0) throw new Error('Temperature must be a number ≥ 0');
  const body = { test_type: 'llm_generate', model, prompt: '', num_ctx: intIn(f.num_ctx, 1), temperature };
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
  if (promptTokens !== null) {
    // every cell must fit its context: the largest output in the smallest context
    const outMax = Math.max(body.max_tokens, ...(mx.matrix?.max_tokens ?? []));
    const ctxMin = Math.min(body.num_ctx, ...(mx.matrix?.num_ctx ?? []));
    const ctx = mx.matrix?.num_ctx ? ctxMin : body.num_ctx;
    const out = mx.matrix?.max_tokens ? outMax : body.max_tokens;
    if (depth + promptTokens + out > ctx) {
      throw new Error(`Depth + prompt tokens + generated tokens is ${depth + promptTokens + out}, more than the context size ${ctx}: raise Context size.`);
    }
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
  Object.assign(body, mx);
  if ($('#f-all').checked) body.machines = 'all';
  else {
    const chosen = selectedMachines();
    if (!chosen.length) throw new Error('Choose at least one machine, or All machines.');
    body.machines = chosen;
  }
  return body;
}

export async function submit(ev) {
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

export async function cancel() {
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
