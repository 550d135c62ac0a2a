// The job on screen: opening one (central's snapshot, then for a running job its event stream,
// replayed from the start), following it, closing it, and the URL hash that names what is shown:
//   #job=<id>                 a race (a matrix job: its matrix)
//   #job=<id>&cell=<key>      one cell of a matrix job, as a race
//   #compare=<id>,<id>[,...]  runs against runs (the first is the baseline)
import { api, Stream } from './api.js';
import { h, replace, $ } from './dom.js';
import { ui, LS, EVENT_TYPES, FINISHED, scheduleRender } from './ui.js';
import { newJob, machine, applySnapshot, applyEvent, TERMINAL } from './state.js';
import { formMsg } from './views/form.js';
import { markHistoryCurrent } from './views/history.js';
import { renderPanes } from './views/race.js';
import { loadBaselineDelta, closeCompare } from './views/compare.js';

const ID = '[A-Za-z0-9_-]{1,128}';

/** What the hash names: {job, cell} | {compare: [ids]} | {}. */
export function parseHash(hash = location.hash) {
  let m = new RegExp(`^#job=(${ID})(?:&cell=([^&]*))?$`).exec(hash);
  if (m) {
    let cell = null;
    if (m[2] !== undefined) {
      try {
        cell = decodeURIComponent(m[2]);
      } catch {
        cell = null;
      }
    }
    return { job: m[1], cell };
  }
  m = new RegExp(`^#compare=(${ID}(?:,${ID}){1,7})$`).exec(hash);
  if (m) return { compare: m[1].split(',') };
  return {};
}

export function hashJob() {
  return parseHash().job ?? null;
}

export function setHash(id, cell = null) {
  const want = id ? '#job=' + encodeURIComponent(id) + (cell !== null ? '&cell=' + encodeURIComponent(cell) : '') : '';
  if (location.hash !== want) history.replaceState(null, '', location.pathname + location.search + want);
}

/** Shows one cell of the open matrix job as a race (null: the whole matrix). */
export function showCell(cell) {
  if (!ui.job) return;
  ui.cell = cell;
  ui.compareSig = null;
  setHash(ui.job.job_id, cell);
  scheduleRender();
}

export async function openJob(id, { submitted, body, cell = null } = {}) {
  if (ui.job?.job_id === id && !submitted && ui.compareIds === null && cell !== ui.cell) {
    showCell(cell);
    return;
  }
  const token = ++ui.openSeq;
  closeCompare();
  ui.jobStream?.close();
  ui.jobStream = null;
  clearTimeout(ui.rankingTimer);
  const job = newJob(id);
  ui.job = job;
  ui.cell = cell;
  ui.panes.clear();
  replace($('#panes'));
  setHash(id, cell);
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
  loadBaselineDelta(job);
  scheduleRender();
}

export function closeJob() {
  ui.openSeq++;
  ui.jobStream?.close();
  ui.jobStream = null;
  ui.job = null;
  ui.cell = null;
  ui.panes.clear();
  replace($('#panes'));
  replace($('#job-meta'));
  setHash(null);
  localStorage.removeItem(LS.current);
  markHistoryCurrent();
  loadBaselineDelta(null);
  scheduleRender();
}

function followJob(job) {
  const handlers = {};
  for (const type of EVENT_TYPES) {
    handlers[type] = (ev) => {
      if (ui.job !== job) return;
      const m = applyEvent(job, ev);
      if (!m) return;
      // central's ranking (and a matrix cell's winner and sweep) is redone once a machine or a cell ended
      if (TERMINAL.has(ev.type) || ev.type === 'cell_done') scheduleRanking(job);
      scheduleRender(m.machine_id);
    };
  }
  handlers.end = async (data) => {
    if (ui.job !== job) return;
    job.status = data?.status ?? job.status;
    job.ended = true;
    if (localStorage.getItem(LS.current) === job.job_id) localStorage.removeItem(LS.current);
    await refreshSnapshot(job, true);
    loadBaselineDelta(job);
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

export async function refreshSnapshot(job, withText) {
  try {
    const doc = await api.job(job.job_id, ui.baseline);
    if (ui.job !== job) return;
    applySnapshot(job, doc, { withText: withText && FINISHED.has(doc.status) });
  } catch {
    /* keep what we have */
  }
  scheduleRender();
}

export function scheduleRanking(job) {
  clearTimeout(ui.rankingTimer);
  ui.rankingTimer = setTimeout(() => refreshSnapshot(job, false), 250);
}

export function showJobError(text) {
  ui.job = null;
  replace($('#job-meta'), h('p', { class: 'form-msg', 'data-kind': 'error' }, text));
  $('#job-h').textContent = 'Job';
  $('#compare').hidden = true;
  renderPanes();
}
