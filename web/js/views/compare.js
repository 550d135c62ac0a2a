// Runs against runs (GET /api/compare): the compare view (#compare=a,b: History's "compare
// with…"), and the pinned baseline job (localStorage, a badge in the top bar): every job opened while
// one is pinned shows its deltas against it. A delta is called "beyond the intervals" only where
// central says the two medians' 95% intervals are separated (`exceeds_ci`).
import { api } from '../api.js';
import { h, replace, $ } from '../dom.js';
import { num, pct, when } from '../format.js';
import { ui, LS, colorOf, scheduleRender } from '../ui.js';
import { closeJob } from '../job.js';
import { renderHistory, jobWords, markHistoryCurrent } from './history.js';

/** What a group's table shows, in this order; each only where some entry has it. */
const METRICS = [
  { key: 'gen_tokens_per_s', label: 'Decode tok/s', digits: 1, get: (e) => e.summary?.gen_tokens_per_s?.median },
  { key: 'ttft_ms', label: 'TTFT ms', digits: 1, get: (e) => e.summary?.ttft_ms?.median },
  { key: 'total_ms', label: 'Total ms', digits: 0, get: (e) => e.summary?.total_ms?.median },
  { key: 'pp_tokens_per_s', label: 'pp tok/s', digits: 0, get: (e) => e.summary?.pp_tokens_per_s?.median },
  { key: 'tg_tokens_per_s', label: 'tg tok/s', digits: 1, get: (e) => e.summary?.tg_tokens_per_s?.median },
  { key: 'joules_per_token', label: 'J/token', digits: 3, get: (e) => e.summary?.joules_per_token?.median },
  { key: 'output_tokens_per_s', label: 'Output tok/s', digits: 1, get: (e) => e.load?.output_tokens_per_s },
  { key: 'ttft_p99_ms', label: 'TTFT p99 ms', digits: 0, get: (e) => e.load?.ttft_ms?.p99 },
];

// ---------------------------------------------------------------------------------------------
// The pinned baseline job

export function pinBaselineJob(id) {
  ui.baselineJob = id;
  if (id) localStorage.setItem(LS.baselineJob, id);
  else localStorage.removeItem(LS.baselineJob);
  renderPinned();
  renderHistory();
  loadBaselineDelta(ui.job);
  scheduleRender();
}

/** The badge in the top bar: which job is pinned, and Unpin. */
export function renderPinned() {
  const el = $('#pinned');
  const id = ui.baselineJob;
  el.hidden = !id;
  if (!id) {
    replace(el);
    return;
  }
  const j = ui.history.get(id);
  const unpin = h('button', { type: 'button', class: 'small', id: 'unpin', 'aria-label': `Unpin baseline job ${id}` }, 'Unpin');
  unpin.addEventListener('click', () => pinBaselineJob(null));
  const open = h('a', { href: '#job=' + encodeURIComponent(id), class: 'pinned-job mono', title: id }, j ? jobWords(j) : id.slice(0, 12));
  replace(el, h('span', { class: 'tag tag-pin' }, 'baseline'), ' ', open, ' ', unpin);
}

/** Fetches the open job's comparison with the pinned one (none when it is the pinned one). */
export async function loadBaselineDelta(job) {
  const pinned = ui.baselineJob;
  ui.vsBaseline = null;
  ui.vsBaselineSig = null;
  if (!job || !pinned || job.job_id === pinned) {
    scheduleRender();
    return;
  }
  const want = `${pinned},${job.job_id}`;
  ui.vsBaseline = { key: want, doc: null, error: null };
  scheduleRender();
  let doc = null;
  let error = null;
  try {
    doc = await api.compareJobs([pinned, job.job_id]);
  } catch (e) {
    error = e;
  }
  if (ui.vsBaseline?.key !== want) return;
  ui.vsBaseline = { key: want, doc, error };
  scheduleRender();
}

/** The card under the race: this job's deltas against the pinned one (the cell shown only, in a matrix cell). */
export function renderBaselineDelta() {
  const sec = $('#vs-baseline');
  const v = ui.vsBaseline;
  if (!v || !ui.job || ui.compareIds) {
    sec.hidden = true;
    return;
  }
  sec.hidden = false;
  const sig = JSON.stringify([v.key, !!v.doc, v.error?.message, ui.cell]);
  if (sig === ui.vsBaselineSig) return;
  ui.vsBaselineSig = sig;
  const [pinned] = v.key.split(',');
  const pj = ui.history.get(pinned);
  replace($('#vsb-note'), `baseline job ${pj ? jobWords(pj) + ' · ' : ''}${pinned}`);
  const link = $('#vsb-open');
  link.href = '#compare=' + v.key;
  const body = $('#vsb-body');
  if (v.error) {
    replace(body, h('p', { class: 'note' }, v.error.status === 404 ? `Nothing to compare: ${v.error.message}` : `Could not compare: ${v.error.message}`));
    return;
  }
  if (!v.doc) {
    replace(body, h('p', { class: 'note' }, 'Comparing with the baseline job…'));
    return;
  }
  const groups = (v.doc.groups ?? []).filter((g) => ui.cell === null || g.cell === null || g.cell === ui.cell);
  replace(body, groups.length ? groups.map(groupView) : h('p', { class: 'note' }, 'The baseline job has no run of this cell.'));
}

// ---------------------------------------------------------------------------------------------
// The compare view

export async function openCompare(ids) {
  closeJob();
  ui.compareIds = ids;
  const want = '#compare=' + ids.join(',');
  if (location.hash !== want) history.replaceState(null, '', location.pathname + location.search + want);
  markHistoryCurrent();
  const sec = $('#runs');
  sec.hidden = false;
  $('#runs-note').textContent = `baseline ${ids[0]}`;
  replace($('#runs-body'), h('p', { class: 'note' }, 'Comparing…'));
  scheduleRender();
  try {
    const doc = await api.compareJobs(ids);
    if (ui.compareIds !== ids) return;
    renderCompareDoc($('#runs-body'), doc, ids);
  } catch (e) {
    if (ui.compareIds !== ids) return;
    replace($('#runs-body'), h('p', { class: 'form-msg', 'data-kind': 'error' }, `Could not compare ${ids.join(' and ')}: ${e.message}${e.code ? ` [${e.code}]` : ''}`));
  }
}

export function closeCompare() {
  if (ui.compareIds === null) return;
  ui.compareIds = null;
  $('#runs').hidden = true;
  replace($('#runs-body'));
}

export function renderCompareDoc(el, doc, ids) {
  const jobs = ids.map((id) => ui.history.get(id));
  replace(el,
    h('p', { class: 'note runs-jobs' }, ids.map((id, i) => [i ? ' vs ' : '', h('a', { href: '#job=' + encodeURIComponent(id), class: 'mono' }, jobs[i] ? `${jobWords(jobs[i])} (${id.slice(0, 8)})` : id), i === 0 ? ' (baseline)' : ''])),
    (doc.groups ?? []).length ? doc.groups.map(groupView) : h('p', { class: 'note' }, 'Nothing in common to compare.'));
}

/** One (machine, cell) group: a row per run, the baseline first; deltas, ratio and whether beyond the intervals. */
export function groupView(g) {
  const entries = g.entries ?? [];
  const cols = METRICS.filter((m) => entries.some((e) => Number.isFinite(m.get(e)) || e.vs_baseline?.[m.key]));
  const title = [g.machine_id ? (entries[0]?.label || g.machine_id) : 'runs', g.cell ? g.cell : null].filter(Boolean).join(' · ');
  const head = h('tr', {}, h('th', { scope: 'col', class: 'text' }, 'Run'), cols.map((c) => h('th', { scope: 'col', class: 'num' }, c.label)));
  const rows = entries.flatMap((e) => {
    const base = !e.vs_baseline;
    const tr = h('tr', { 'data-ref': e.ref, class: base ? 'is-baseline' : '' },
      h('th', { scope: 'row', class: 'text' },
        g.machine_id ? null : h('span', { class: 'swatch', style: { background: colorOf(e.machine_id) } }),
        h('span', { class: 'mono' }, `${e.job_id.slice(0, 12)}`), ' ', h('span', { class: 'muted' }, when(e.created_ms)),
        base ? h('span', { class: 'tag' }, 'baseline') : null,
        e.status && e.status !== 'done' ? h('span', { class: 'tag' }, e.status) : null),
      cols.map((c) => {
        const d = e.vs_baseline?.[c.key];
        const v = d?.value ?? c.get(e);
        return h('td', { class: 'num', 'data-metric': c.key },
          h('span', { class: 'cell-val' }, num(v, c.digits)),
          d ? deltaView(d) : null);
      }));
    const out = [tr];
    if (e.changes?.length) {
      out.push(h('tr', { class: 'runs-changes' }, h('td', { colspan: cols.length + 1, class: 'text' },
        `fingerprint changed: ${e.changes.map((x) => `${x.field}: ${x.before || '∅'} → ${x.after || '∅'}`).join('; ')}`)));
    }
    return out;
  });
  return h('div', { class: 'runs-group', 'data-machine': g.machine_id ?? '', 'data-cell': g.cell ?? '' },
    h('h3', { class: 'runs-title' }, g.machine_id ? h('span', { class: 'swatch', style: { background: colorOf(g.machine_id) } }) : null, ' ', title),
    h('div', { class: 'table-wrap' }, h('table', { class: 'cmp-table runs-table' },
      h('caption', { class: 'sr-only' }, `${title}: each run against the baseline run`),
      h('thead', {}, head), h('tbody', {}, rows))));
}

/** "−3.1% ×0.969", red when worse, green when better, and "beyond the intervals" where they separate. */
function deltaView(d) {
  const cls = !Number.isFinite(d.pct) || Math.abs(d.pct) < 0.05 ? 'delta' : d.worse ? 'delta worse' : 'delta better';
  return h('span', { class: 'cell-range runs-delta' },
    h('span', { class: cls, title: `${num(d.baseline, 2)} → ${num(d.value, 2)} (Δ ${num(d.delta, 2)})` }, pct(d.pct)),
    Number.isFinite(d.ratio) ? h('span', { class: 'ratio' }, ` ×${num(d.ratio, 3)}`) : null,
    d.exceeds_ci ? h('span', { class: 'tag tag-beyond', title: 'The two medians\' 95% intervals are separated: more than the run-to-run spread' }, 'beyond the intervals') : null);
}
