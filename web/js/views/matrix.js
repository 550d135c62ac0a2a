// The matrix view of a matrix job: a table with a row per cell and a column per machine (decode
// tokens/s median and its 95% interval; a load cell's output tokens/s, TTFT p99 and per-stream
// decode rate), the row's winner marked only where central names one (`winner`: judged on the
// per-request decode rate, its 95% intervals separated; in a load cell that is the per-stream
// rate, not the output tokens/s shown first, and the tag says so), failed cells with their error
// code; a chart per metric; the concurrency sweeps. Any row opens as a race of that cell.
import { h, replace, $ } from '../dom.js';
import { num, rate, ms } from '../format.js';
import { barChart, fitLabels } from '../chart.js';
import { hasCi } from '../state.js';
import { matrixRows, variedAxes, pointStat } from '../matrix.js';
import { ui, colorOf, labelOf, isMatrixJob } from '../ui.js';
import { showCell } from '../job.js';
import { sweepChart } from './sweep.js';

/** The machines' columns: the fleet's order, then by id (as the panes). */
function machineIds(rows) {
  const ids = new Set();
  for (const r of rows) for (const id of r.machines.keys()) ids.add(id);
  const order = [...ui.fleet.keys()];
  const rank = (id) => (order.includes(id) ? order.indexOf(id) : order.length);
  return [...ids].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function cellLabel(values, axes) {
  return axes.filter((a) => a in values).map((a) => `${a}=${values[a]}`).join(' · ') || '(no matrix)';
}

export function renderMatrix() {
  const sec = $('#matrix');
  const job = ui.job;
  if (!job || !isMatrixJob(job) || ui.cell !== null) {
    sec.hidden = true;
    ui.matrixSig = null;
    return;
  }
  sec.hidden = false;
  const rows = matrixRows(job);
  const ids = machineIds(rows);
  const avail = $('#matrix-charts').clientWidth || 900;
  const sig = JSON.stringify([job.job_id, rows.map((r) => [r.cell, r.winner, [...r.machines]]), ids.map(labelOf), job.sweeps, avail]);
  if (sig === ui.matrixSig) return;
  ui.matrixSig = sig;
  const axes = variedAxes(rows);
  const done = rows.reduce((n, r) => n + [...r.machines.values()].filter((e) => e.status === 'done' || e.status === 'failed').length, 0);
  const total = rows.reduce((n, r) => n + r.machines.size, 0);
  $('#matrix-summary').textContent = `${rows.length} cell${rows.length === 1 ? '' : 's'} × ${ids.length} machine${ids.length === 1 ? '' : 's'} · ${done}/${total} finished · a winner only where the 95% intervals of the ${rows.some((r) => r.load) ? 'per-stream ' : ''}decode rate separate`;

  // table
  const table = $('#matrix-table');
  replace(table.tHead, h('tr', {},
    h('th', { scope: 'col', class: 'text' }, 'Cell'),
    ids.map((id) => h('th', { scope: 'col', class: 'num', 'data-machine': id, title: id }, h('span', { class: 'swatch', style: { background: colorOf(id) } }), ' ', h('span', { class: 'machine-name' }, labelOf(id)))),
    h('th', { scope: 'col', class: 'text' }, h('span', { class: 'sr-only' }, 'Open')),
  ));
  replace(table.tBodies[0], rows.map((r) => {
    const open = h('button', { type: 'button', class: 'small cell-open', 'aria-label': `Open cell ${r.cell} as a race` }, 'race ›');
    open.addEventListener('click', () => showCell(r.cell));
    return h('tr', { 'data-cell': r.cell, class: r.winner ? 'has-winner' : '' },
      h('th', { scope: 'row', class: 'text cell-key' }, cellLabel(r.values, axes), r.load ? h('span', { class: 'tag', title: 'A load cell: concurrent closed-loop streams' }, 'load') : null),
      ids.map((id) => cellTd(r, id)),
      h('td', { class: 'text' }, open));
  }));

  // charts, one per metric, a bar per (cell, machine)
  const width = avail >= 2 * 380 + 24 ? (avail - 24) / 2 : avail;
  // central's winner is on the decode rate: marked in that chart only
  const bars = (pick, onlyLoad, markWinner = false) => rows.filter((r) => r.load === onlyLoad).flatMap((r) => ids.filter((id) => r.machines.has(id)).map((id) => ({
    id: `${r.cell} · ${labelOf(id)}`, label: `${axes.map((a) => r.values[a]).filter((v) => v !== undefined).join(' ')} · ${id}`, color: colorOf(id), stat: pick(r.machines.get(id)), baseline: false, winner: markWinner && r.winner === id,
  })));
  const figs = [];
  const fig = (key, rowsOf, opts) => {
    if (!rowsOf.some((x) => x.stat)) return;
    figs.push(h('figure', { class: 'chart-fig', 'data-metric': key }, barChart(rowsOf, { ...opts, width })));
  };
  if (rows.some((r) => !r.load)) {
    fig('gen_tokens_per_s', bars((e) => e.summary?.gen_tokens_per_s ?? null, false, true), { title: 'Decode tokens/s per cell', unit: 'tok/s', better: 'higher', digits: 1 });
    fig('ttft_ms', bars((e) => e.summary?.ttft_ms ?? null, false), { title: 'Time to first token per cell', unit: 'ms', better: 'lower', digits: 0 });
  }
  if (rows.some((r) => r.load)) {
    fig('output_tokens_per_s', bars((e) => pointStat(e.load?.output_tokens_per_s), true), { title: 'Output tokens/s per load cell (all streams)', unit: 'tok/s', better: 'higher', digits: 1 });
    fig('ttft_p99_ms', bars((e) => pointStat(e.load?.ttft_ms?.p99), true), { title: 'TTFT p99 per load cell', unit: 'ms', better: 'lower', digits: 0 });
    // what central's winner of a load cell is judged on: each request's decode rate
    fig('per_stream_tokens_per_s', bars(perStream, true, true), { title: 'Per-stream decode tokens/s per load cell (the winner\'s basis)', unit: 'tok/s', better: 'higher', digits: 1 });
  }
  replace($('#matrix-charts'), figs);
  fitLabels($('#matrix-charts'));

  // sweeps
  const sweeps = (job.sweeps ?? []).filter((sw) => (sw.machines ?? []).some((m) => (m.points ?? []).length));
  $('#sweeps').hidden = !sweeps.length;
  // drawn at the column's size (style.css .sweeps: two columns from 2 × 420 px), so its text and
  // the point labels stay at their real pixel size
  const swWidth = Math.min(720, sweeps.length > 1 && avail >= 2 * 420 + 24 ? (avail - 24) / 2 : avail);
  replace($('#sweeps-body'), sweeps.map((sw) => sweepChart(sw, { width: swWidth, colorOf, labelOf })));
}

/** A load cell's per-request decode rate (Stats): the cell's summary, as central's ranking takes it, else the load's. */
function perStream(e) {
  return e.summary?.gen_tokens_per_s ?? e.load?.per_stream_tokens_per_s ?? null;
}

/** The winner tag: what central judged it on. */
function winnerTag(load) {
  return load
    ? h('span', { class: 'tag tag-win', 'data-basis': 'per_stream_decode', title: 'Central\'s winner of this cell: judged on the per-stream decode rate (each request\'s tok/s), 95% intervals separated; not on the output tok/s or TTFT p99 above' }, 'winner · per-stream decode')
    : h('span', { class: 'tag tag-win', 'data-basis': 'decode', title: 'Central\'s winner of this cell: judged on the decode rate, 95% intervals separated' }, 'winner');
}

/** One machine's result for one cell. */
function cellTd(r, id) {
  const e = r.machines.get(id);
  if (!e) return h('td', { class: 'num muted', 'data-machine': id, 'data-status': 'none' }, '–');
  const win = r.winner === id;
  const attrs = { class: 'num mx-cell' + (win ? ' is-winner' : ''), 'data-machine': id, 'data-status': e.status };
  if (e.status === 'failed') {
    const code = e.error?.code ?? 'failed';
    return h('td', { ...attrs, title: e.error?.message ?? '' }, h('span', { class: 'cell-error', 'data-code': code }, code));
  }
  const parts = [];
  if (r.load || e.load) {
    const l = e.load;
    parts.push(h('span', { class: 'cell-val' }, l ? `${rate(l.output_tokens_per_s)} tok/s` : '–'));
    parts.push(h('span', { class: 'cell-range' }, l ? `TTFT p99 ${ms(l.ttft_ms?.p99)}` : e.status));
    const ps = perStream(e);
    if (ps) {
      const spread = hasCi(ps) ? ` (95% CI ${num(ps.ci_low, 1)}–${num(ps.ci_high, 1)})` : '';
      parts.push(h('span', { class: 'cell-stream', title: `Each request's decode rate, median of ${ps.n}: what one stream sees, and what the winner is judged on` }, `per-stream decode ${rate(ps.median)} tok/s${spread}`));
    }
  } else {
    const st = e.summary?.gen_tokens_per_s;
    parts.push(h('span', { class: 'cell-val' }, st ? `${rate(st.median)} tok/s` : '–'));
    const spread = st ? (hasCi(st) ? `95% CI ${num(st.ci_low, 1)}–${num(st.ci_high, 1)}` : `${st.n} run${st.n === 1 ? '' : 's'}, no interval`) : null;
    parts.push(h('span', { class: 'cell-range' }, spread ?? e.status));
  }
  if (e.status === 'running' || e.status === 'pending') parts.push(h('span', { class: 'cell-state' }, e.status === 'running' ? 'running…' : 'pending'));
  if (win) parts.push(winnerTag(r.load || !!e.load));
  return h('td', attrs, parts);
}
