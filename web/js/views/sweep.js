// The concurrency sweep chart: per machine a throughput-against-latency line (x = output tokens/s
// over all streams, y = TTFT p99 across the requests), each point labelled with its concurrency,
// the SLO as a dashed line, and the capacity answer in words. Hand-drawn SVG, labels as text nodes.
import { h, s } from '../dom.js';
import { num } from '../format.js';
import { sweepPoints, capacityText } from '../matrix.js';

function niceMax(v) {
  if (!(v > 0)) return 1;
  const mag = 10 ** Math.floor(Math.log10(v));
  for (const k of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (k * mag >= v) return k * mag;
  return 10 * mag;
}

/** sweep: one entry of central's `sweeps`; opts: {width, colorOf, labelOf}. */
export function sweepChart(sweep, { width = 560, colorOf, labelOf }) {
  const W = Math.max(300, Math.round(width));
  const H = Math.round(Math.min(320, Math.max(220, W * 0.5)));
  const L = 52;
  const R = 16;
  const T = 24;
  const B = 34;
  const lines = (sweep.machines ?? []).map((m) => ({ m, pts: sweepPoints(m) })).filter((x) => x.pts.length);
  const slo = sweep.slo?.ttft_p99_ms;
  const xMax = niceMax(Math.max(0, ...lines.flatMap((x) => x.pts.map((p) => p.x))) * 1.05);
  const yMax = niceMax(Math.max(Number.isFinite(slo) ? slo * 1.1 : 0, ...lines.flatMap((x) => x.pts.map((p) => p.y))) * 1.05);
  const x = (v) => L + (v / xMax) * (W - L - R);
  const y = (v) => H - B - (v / yMax) * (H - T - B);
  const title = sweep.group ? `Sweep ${sweep.group}` : 'Concurrency sweep';
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart sweep-chart', role: 'img', 'aria-label': `${title}: output tokens/s against TTFT p99, one point per concurrency`, preserveAspectRatio: 'xMinYMin meet' });
  svg.append(s('text', { x: 0, y: 14, class: 'chart-title' }, title), s('text', { x: W, y: 14, class: 'chart-note', 'text-anchor': 'end' }, 'right and low is better · label = streams'));
  const g = s('g', { class: 'chart-grid' });
  for (let i = 0; i <= 4; i++) {
    const xv = (xMax * i) / 4;
    const yv = (yMax * i) / 4;
    g.append(
      s('line', { x1: x(xv), x2: x(xv), y1: T, y2: H - B }),
      s('text', { x: x(xv), y: H - B + 14, 'text-anchor': 'middle', class: 'chart-tick' }, num(xv, xMax < 10 ? 1 : 0)),
      s('line', { x1: L, x2: W - R, y1: y(yv), y2: y(yv) }),
      s('text', { x: L - 6, y: y(yv) + 3, 'text-anchor': 'end', class: 'chart-tick' }, num(yv, yMax < 10 ? 1 : 0)));
  }
  g.append(
    s('text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle', class: 'chart-tick axis-label' }, 'output tokens/s (all streams)'),
    s('text', { x: 10, y: (T + H - B) / 2, 'text-anchor': 'middle', class: 'chart-tick axis-label', transform: `rotate(-90 10 ${(T + H - B) / 2})` }, 'TTFT p99 ms'));
  svg.append(g);
  if (Number.isFinite(slo)) {
    svg.append(s('g', { class: 'sweep-slo' },
      s('line', { x1: L, x2: W - R, y1: y(slo), y2: y(slo), class: 'sweep-slo-line' }),
      s('text', { x: W - R, y: y(slo) - 4, 'text-anchor': 'end', class: 'chart-note' }, `SLO: TTFT p99 ≤ ${num(slo, 0)} ms`)));
  }
  for (const { m, pts } of lines) {
    const color = colorOf(m.machine_id);
    const grp = s('g', { class: 'sweep-line', 'data-machine': m.machine_id });
    grp.append(s('title', {}, `${labelOf(m.machine_id)} (${m.machine_id})`));
    grp.append(s('polyline', { points: pts.map((p) => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(' '), class: 'sweep-path', stroke: color }));
    for (const p of pts) {
      const within = !Number.isFinite(slo) || p.y <= slo;
      grp.append(
        s('circle', { cx: x(p.x), cy: y(p.y), r: 4, fill: color, class: 'sweep-point' + (within ? '' : ' is-over'), 'data-concurrency': p.concurrency, 'data-machine': m.machine_id },
          s('title', {}, `${labelOf(m.machine_id)}, ${p.concurrency} stream${p.concurrency === 1 ? '' : 's'}: ${num(p.x, 1)} tok/s, TTFT p99 ${num(p.y, 0)} ms${within ? '' : ' (over the SLO)'}`)),
        s('text', { x: x(p.x) + 6, y: y(p.y) - 6, class: 'sweep-label chart-tick' }, String(p.concurrency)));
    }
    svg.append(grp);
  }
  const answers = (sweep.machines ?? []).map((m) => h('li', { class: 'capacity' + (m.capacity == null ? ' is-none' : ''), 'data-machine': m.machine_id },
    h('span', { class: 'swatch', style: { background: colorOf(m.machine_id) } }), ' ', capacityText(labelOf(m.machine_id), m, sweep.slo)));
  return h('figure', { class: 'chart-fig sweep-fig', 'data-group': sweep.group ?? '' }, svg, h('ul', { class: 'capacities' }, answers));
}
