// Hand-drawn SVG bar chart: one bar per machine at the median, a whisker over the 95% confidence
// interval of the median where there is one (6+ runs), else from min to max over the measured
// repeats. Labels are SVG text nodes (textContent), never markup.
import { h, s } from './dom.js';
import { num } from './format.js';

function niceStep(max, ticks) {
  const raw = max / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
}

function truncate(text, max) {
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/** The note over a chart: what is better and what the whisker is (the 95% interval, or min–max below 6 runs). */
function chartNote(W, better, anyCi, anyRange) {
  const whisker = anyCi ? (anyRange ? '95% CI (min–max below 6 runs)' : '95% CI') : 'min–max';
  if (W >= 560) return `${better} is better · bar = median, whisker = ${whisker}`;
  if (W >= 360) return `${better} is better · whisker = ${anyCi ? '95% CI' : 'min–max'}`;
  return `${better} is better`;
}

/**
 * A chart's title and its note as HTML over the SVG (a figcaption): the two wrap onto two lines
 * where they do not fit side by side (style.css .chart-head), instead of overlapping as two SVG
 * texts at fixed places would.
 */
export function chartHead(title, note) {
  return h('figcaption', { class: 'chart-head' }, h('span', { class: 'chart-title' }, title), note ? h('span', { class: 'chart-note' }, note) : null);
}

/**
 * rows: [{id, label, color, stat: {median,min,max,n,ci_low,ci_high} | null, baseline: bool, winner: bool}]
 * opts: {title, unit, better: 'higher' | 'lower', digits}
 * -> [figcaption, svg], for a <figure>.
 */
export function barChart(rows, opts) {
  const W = Math.max(280, Math.round(opts.width ?? 560));
  const labelW = Math.round(Math.min(178, W * 0.3));
  const valueW = Math.round(Math.min(84, W * 0.22));
  const rowH = 26;
  const top = 10;
  const axisH = 22;
  const plotW = W - labelW - valueW;
  const H = top + rows.length * rowH + axisH;
  const whisker = (st) => (Number.isFinite(st.ci_low) && Number.isFinite(st.ci_high) ? { ci: true, lo: st.ci_low, hi: st.ci_high } : { ci: false, lo: st.min, hi: st.max });
  const anyCi = rows.some((r) => r.stat && whisker(r.stat).ci);
  const anyRange = rows.some((r) => r.stat && !whisker(r.stat).ci && r.stat.n > 1);
  const max = Math.max(0, ...rows.filter((r) => r.stat).map((r) => Math.max(r.stat.max, whisker(r.stat).hi)));
  const step = niceStep(max > 0 ? max : 1, 4);
  const axisMax = Math.max(step, Math.ceil((max > 0 ? max : 1) / step) * step);
  const x = (v) => labelW + (Math.max(0, v) / axisMax) * plotW;

  const svg = s('svg', {
    viewBox: `0 0 ${W} ${H}`,
    class: 'chart',
    role: 'img',
    'aria-label': `${opts.title}, ${opts.better} is better`,
    preserveAspectRatio: 'xMinYMin meet',
  });
  // grid + axis
  const g = s('g', { class: 'chart-grid' });
  for (let v = 0; v <= axisMax + 1e-9; v += step) {
    const gx = x(v);
    g.append(
      s('line', { x1: gx, x2: gx, y1: top - 4, y2: top + rows.length * rowH }),
      s('text', { x: gx, y: top + rows.length * rowH + 15, 'text-anchor': 'middle', class: 'chart-tick' }, num(v, step < 1 ? 1 : 0)),
    );
  }
  svg.append(g);

  rows.forEach((r, i) => {
    const y = top + i * rowH;
    const cy = y + rowH / 2;
    const row = s('g', { class: 'chart-row' + (r.winner ? ' is-winner' : '') + (r.baseline ? ' is-baseline' : '') });
    row.append(s('title', {}, `${r.label} (${r.id})`));
    row.append(s('text', { x: labelW - 8, y: cy + 4, 'text-anchor': 'end', class: 'chart-label', 'data-max': labelW - 12 }, truncate(r.label, Math.max(8, Math.floor(labelW / 6)))));
    if (r.stat) {
      const bx = x(0);
      row.append(s('rect', { x: bx, y: y + 5, width: Math.max(1, x(r.stat.median) - bx), height: rowH - 10, rx: 1.5, fill: r.color, class: 'chart-bar' }));
      const wk = whisker(r.stat);
      if (r.stat.n > 1 && wk.hi > wk.lo) {
        const x1 = x(wk.lo);
        const x2 = x(wk.hi);
        const cls = 'chart-whisker' + (wk.ci ? ' is-ci' : '');
        row.append(
          s('line', { x1, x2, y1: cy, y2: cy, class: cls }),
          s('line', { x1, x2: x1, y1: cy - 6, y2: cy + 6, class: cls }),
          s('line', { x1: x2, x2, y1: cy - 6, y2: cy + 6, class: cls }),
        );
      }
      row.append(s('text', { x: W, y: cy + 4, 'text-anchor': 'end', class: 'chart-value' }, num(r.stat.median, opts.digits) + ' ' + opts.unit));
      if (r.stat.n > 1) {
        const ci = wk.ci ? `, 95% interval ${num(wk.lo, opts.digits)}–${num(wk.hi, opts.digits)}` : '';
        row.querySelector('title').textContent = `${r.label} (${r.id}): median ${num(r.stat.median, opts.digits)}${ci}, min ${num(r.stat.min, opts.digits)}, max ${num(r.stat.max, opts.digits)} ${opts.unit} over ${r.stat.n} runs`;
      }
    } else {
      row.append(s('text', { x: labelW + 4, y: cy + 4, class: 'chart-empty' }, 'no result yet'));
    }
    svg.append(row);
  });
  return [chartHead(opts.title, chartNote(W, opts.better, anyCi, anyRange)), svg];
}

/** Once a chart is in the document: shortens labels that do not fit their column (measured). */
export function fitLabels(root) {
  for (const el of root.querySelectorAll('text.chart-label[data-max]')) {
    const max = Number(el.dataset.max);
    let text = el.textContent;
    while (text.length > 4 && el.getComputedTextLength() > max) {
      text = text.slice(0, -2) + '…';
      el.textContent = text;
      text = text.slice(0, -1);
    }
  }
}
