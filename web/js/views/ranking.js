// The race's comparison card: the verdicts (a winner only where the 95% intervals separate), a
// bar chart per metric and the sortable table. With a matrix cell chosen, over that cell's runs
// and central's ranking of that cell; hidden on a matrix overview (the matrix view compares cells).
import { h, replace, $ } from '../dom.js';
import { num, rate, int } from '../format.js';
import { barChart, fitLabels } from '../chart.js';
import { energyVerdict } from '../telemetry.js';
import { deltaPct, clearWinner, allTerminal, MIN_CI_SAMPLES, hasCi } from '../state.js';
import { ui, colorOf, labelOf, isMatrixJob, viewMachine, viewStats, viewRanking } from '../ui.js';
import { baselineStats, deltaEl } from './race.js';

function compareRows() {
  const job = ui.job;
  const base = baselineStats();
  const serverRank = new Map((viewRanking(job) ?? []).map((r) => [r.machine_id, r]));
  return [...job.machines.values()].map((m) => {
    const st = viewStats(m);
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
      regressed: !!m.regression?.regressed && (m.regression.metrics ?? []).some((x) => x.worse && x.exceeds_ci && (ui.cell === null || (x.cell ?? '') === ui.cell)),
      regressionJob: m.regression?.job_id ?? null,
    };
  });
}

export function renderCompare() {
  const job = ui.job;
  const sec = $('#compare');
  if (!job || (isMatrixJob(job) && ui.cell === null) || ![...job.machines.values()].some((m) => viewMachine(m).repeats.some((r) => !r.warmup && !r.cold))) {
    sec.hidden = true;
    return;
  }
  sec.hidden = false;
  const rows = compareRows();
  // rebuilt only when something it shows changed (not on every streamed token: keeps focus and hover)
  const avail0 = $('#charts').clientWidth;
  const ranking = viewRanking(job);
  const sig = JSON.stringify([job.job_id, ui.cell, rows, ui.sort, ui.baseline, avail0, ranking, job.ended, allTerminal(job)]);
  if (sig === ui.compareSig) return;
  ui.compareSig = sig;
  const withTps = rows.filter((r) => r.tps);

  // verdicts: a winner only where the 95% intervals of the medians are separated
  const tpsW = clearWinner(rows.map((r) => ({ machine_id: r.id, stat: r.tps })), true);
  const rank1 = ranking?.find((r) => r.rank === 1);
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
          winners.has(r.id) ? h('span', { class: 'tag tag-win' }, 'winner') : null,
          r.regressed ? h('span', { class: 'tag tag-regressed', title: `slower than job ${r.regressionJob} beyond the intervals` }, 'regressed') : null);
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

