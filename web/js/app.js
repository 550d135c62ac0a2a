// bench-race web UI. Talks only to bench-central (same origin): REST for machines and jobs, SSE
// for live events. Everything that comes from the fleet or the user (prompts, outputs, model
// names, labels) is rendered with textContent / text nodes, never as HTML.
//
// This file is the bootstrap and router; each view is a module of its own:
//   views/form.js     the New race form (matrix fieldset included)
//   views/fleet.js    the registry: machine checks, model list, /api/events
//   views/history.js  the job list, "compare with…", "pin as baseline", fingerprint ⇄
//   views/race.js     the job head and a pane per machine (a matrix cell's runs when one is chosen)
//   views/ranking.js  the race's verdicts, charts and table
//   views/matrix.js   a matrix job: cells × machines, charts per metric, sweeps (views/sweep.js)
//   views/compare.js  runs against runs (/api/compare) and the pinned baseline job
//   job.js            opening and following a job; the hash (#job=, &cell=, #compare=)
import { $ } from './dom.js';
import { allTerminal } from './state.js';
import { ui, LS, scheduleRender } from './ui.js';
import { restoreForm, saveForm, syncForm, submit, cancel } from './views/form.js';
import { loadFleet, followFleet, renderMachineChecks, renderModelOptions, updateModelNote } from './views/fleet.js';
import { loadHistory } from './views/history.js';
import { renderJobHead, renderPanes } from './views/race.js';
import { renderCompare } from './views/ranking.js';
import { renderMatrix } from './views/matrix.js';
import { renderPinned, renderBaselineDelta, openCompare } from './views/compare.js';
import { openJob, closeJob, parseHash } from './job.js';

function render() {
  renderJobHead();
  renderPanes();
  renderMatrix();
  renderCompare();
  renderBaselineDelta();
  const running = ui.job && !ui.job.ended && !allTerminal(ui.job);
  $('#cancel-btn').disabled = !running;
}

/** Shows what the hash names (a job, a cell of it, or a comparison). */
function route() {
  const r = parseHash();
  if (r.compare) {
    if (ui.compareIds?.join(',') !== r.compare.join(',')) openCompare(r.compare);
    return true;
  }
  if (r.job) {
    if (r.job !== ui.job?.job_id || (r.cell ?? null) !== ui.cell || ui.compareIds) openJob(r.job, { cell: r.cell ?? null });
    return true;
  }
  return false;
}

function init() {
  ui.render = render;
  restoreForm();
  const form = $('#run-form');
  form.addEventListener('submit', submit);
  form.addEventListener('change', (e) => {
    if (e.target.id === 'f-all') renderMachineChecks();
    if (e.target.id === 'f-model') updateModelNote();
    if (e.target.id === 'f-all') renderModelOptions();
    syncForm();
    saveForm();
  });
  form.addEventListener('input', () => {
    syncForm();
    saveForm();
  });
  $('#matrix-box').addEventListener('toggle', saveForm);
  $('#f-prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  $('#cancel-btn').addEventListener('click', cancel);
  $('#close-job').addEventListener('click', closeJob);
  $('#runs-close').addEventListener('click', closeJob);
  $('#hist-refresh').addEventListener('click', () => loadHistory());
  $('#hist-more').addEventListener('click', () => loadHistory(true));
  $('#fp-diff-close').addEventListener('click', () => { $('#fp-diff').hidden = true; });
  window.addEventListener('hashchange', route);

  new ResizeObserver(() => {
    const avail = $('#charts').clientWidth;
    const width = avail >= 2 * 380 + 24 ? (avail - 24) / 2 : avail;
    if (avail && Math.abs(width - (ui.chartWidth ?? 0)) > 8) scheduleRender();
  }).observe($('#compare'));
  new ResizeObserver(() => {
    ui.matrixSig = null;
    scheduleRender();
  }).observe($('#matrix'));
  renderJobHead();
  renderPanes();
  renderPinned();
  loadFleet().then(() => {
    if (route()) return;
    const id = localStorage.getItem(LS.current);
    if (id) openJob(id);
  });
  loadHistory().then(renderPinned);
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
