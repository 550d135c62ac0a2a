// The fleet: the registry's machines (GET /api/machines, live `machine` events on /api/events),
// the machine checkboxes and model list of the form, and the connection indicator.
import { api, Stream } from '../api.js';
import { h, replace, $ } from '../dom.js';
import { ui, colorOf, fleetStatus, scheduleRender, FINISHED } from '../ui.js';
import { loadForm, saveForm } from './form.js';
import { loadHistory, renderHistory } from './history.js';
import { scheduleRanking } from '../job.js';

export async function loadFleet() {
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

export function fleetChanged() {
  const n = ui.fleet.size;
  const up = [...ui.fleet.keys()].filter((id) => fleetStatus(id) !== 'offline').length;
  $('#fleet-count').textContent = `${up}/${n} machines online`;
  renderMachineChecks();
  renderModelOptions();
  scheduleRender();
}

export function renderMachineChecks() {
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

export function selectedMachines() {
  if ($('#f-all').checked) return [...ui.fleet.keys()];
  return [...document.querySelectorAll('#machine-checks input:checked')].map((i) => i.value);
}

export function renderModelOptions() {
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

export function updateModelNote() {
  const model = $('#f-model').value;
  const missing = selectedMachines().filter((id) => !(ui.fleet.get(id)?.models ?? []).includes(model));
  $('#model-note').textContent = model && missing.length
    ? `Not offered by: ${missing.map((id) => ui.fleet.get(id)?.label || id).join(', ')}`
    : '';
}

export function setConn(state, text) {
  const el = $('#conn');
  el.dataset.state = state;
  el.textContent = text;
}

/** Live fleet and job list: /api/events. */
export function followFleet() {
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
