// The concurrency sweep chart: per machine a throughput-against-latency line (x = output tokens/s
// over all streams, y = TTFT p99 across the requests), each point labelled with its concurrency,
// the SLO as a dashed line where it falls on the axis (scaled to the points; in words when it is
// far above them), and the capacity answer in words. Hand-drawn SVG, labels as text nodes.
import { h, s } from '../dom.js';
import { num } from '../format.js';
import { sweepPoints, capacityText } from '../matrix.js';
import { chartHead } from '../chart.js';

/** An axis top of 4 nice ticks (each a 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5 or 8 × a power of ten) at or above v. */
function niceMax(v) {
  if (!(v > 0)) return 1;
  const step = v / 4;
  const mag = 10 ** Math.floor(Math.log10(step));
  for (const k of [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8, 10]) if (k * mag >= step - 1e-9) return 4 * k * mag;
  return 40 * mag;
}

/** A tick's label: whole numbers without decimals, else one. */
const tick = (v) => num(v, Number.isInteger(Math.round(v * 1e6) / 1e6) ? 0 : 1);

/**
 * The y axis top: the highest point with headroom, so the points spread over the plot whatever
 * the SLO. An SLO a little above the points (up to 1.5× the highest) is taken in so its line shows;
 * one far above is stated in words instead of squashing every point onto the axis.
 */
export function sweepYMax(ys, slo) {
  const top = Math.max(0, ...ys);
  let yMax = niceMax(top * 1.15);
  if (Number.isFinite(slo) && slo > yMax && slo <= 1.5 * top) yMax = niceMax(slo * 1.05);
  return yMax;
}

/**
 * Places the concurrency labels so that none overlaps another label or a point: for each, the
 * first free spot among a few around its point (estimated text boxes, 10 px text).
 * pts: [{px, py, text}] -> [{x, y, anchor}]
 */
export function placeLabels(pts, { W, H, T, B, L, R }) {
  const CH = 6.2; // px per character of the 10 px tick font
  const LH = 10;
  const boxes = pts.map((p) => ({ x1: p.px - 4, x2: p.px + 4, y1: p.py - 4, y2: p.py + 4 })); // the points
  const hit = (a, b) => a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2;
  const out = [];
  for (const p of pts) {
    const w = CH * p.text.length;
    // [dx, dy, anchor]: text's baseline point relative to the point
    const spots = [[6, -6, 'start'], [6, 12, 'start'], [-6, -6, 'end'], [-6, 12, 'end'], [0, -10, 'middle'], [0, 18, 'middle'],
      [12, -16, 'start'], [-12, -16, 'end'], [12, 22, 'start'], [-12, 22, 'end'], [0, -22, 'middle'], [0, 30, 'middle']];
    let best = null;
    for (const [dx, dy, anchor] of spots) {
      const x = p.px + dx;
      const y = p.py + dy;
      const x1 = anchor === 'start' ? x : anchor === 'end' ? x - w : x - w / 2;
      const box = { x1: x1 - 1, x2: x1 + w + 1, y1: y - LH + 1, y2: y + 2 };
      const inside = box.x1 >= L - 4 && box.x2 <= W - R + 12 && box.y1 >= T - 12 && box.y2 <= H - B;
      if (!inside) continue;
      if (!boxes.some((b) => hit(b, box))) {
        best = { x, y, anchor, box };
        break;
      }
      best ??= { x, y, anchor, box };
    }
    best ??= { x: p.px + 6, y: p.py - 6, anchor: 'start', box: { x1: p.px + 6, x2: p.px + 6 + w, y1: p.py - 15, y2: p.py - 4 } };
    boxes.push(best.box);
    out.push({ x: best.x, y: best.y, anchor: best.anchor });
  }
  return out;
}

/** sweep: one entry of central's `sweeps`; opts: {width, colorOf, labelOf}. */
export function sweepChart(sweep, { width = 560, colorOf, labelOf }) {
  const W = Math.max(300, Math.round(width));
  const H = Math.round(Math.min(320, Math.max(220, W * 0.5)));
  const L = 52;
  const R = 16;
  const T = 14;
  const B = 34;
  const lines = (sweep.machines ?? []).map((m) => ({ m, pts: sweepPoints(m) })).filter((x) => x.pts.length);
  const slo = sweep.slo?.ttft_p99_ms;
  const all = lines.flatMap((x) => x.pts);
  const xMax = niceMax(Math.max(0, ...all.map((p) => p.x)) * 1.05);
  const yMax = sweepYMax(all.map((p) => p.y), slo);
  const x = (v) => L + (v / xMax) * (W - L - R);
  const y = (v) => H - B - (v / yMax) * (H - T - B);
  const title = sweep.group ? `Sweep ${sweep.group}` : 'Concurrency sweep';
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart sweep-chart', role: 'img', 'aria-label': `${title}: output tokens/s against TTFT p99, one point per concurrency`, preserveAspectRatio: 'xMinYMin meet' });
  const g = s('g', { class: 'chart-grid' });
  for (let i = 0; i <= 4; i++) {
    const xv = (xMax * i) / 4;
    const yv = (yMax * i) / 4;
    g.append(
      s('line', { x1: x(xv), x2: x(xv), y1: T, y2: H - B }),
      s('text', { x: x(xv), y: H - B + 14, 'text-anchor': 'middle', class: 'chart-tick' }, tick(xv)),
      s('line', { x1: L, x2: W - R, y1: y(yv), y2: y(yv) }),
      s('text', { x: L - 6, y: y(yv) + 3, 'text-anchor': 'end', class: 'chart-tick' }, tick(yv)));
  }
  g.append(
    s('text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle', class: 'chart-tick axis-label' }, 'output tokens/s (all streams)'),
    s('text', { x: 10, y: (T + H - B) / 2, 'text-anchor': 'middle', class: 'chart-tick axis-label', transform: `rotate(-90 10 ${(T + H - B) / 2})` }, 'TTFT p99 ms'));
  svg.append(g);
  // the SLO: a line where it falls on the axis, else in words under the chart
  let sloNote = null;
  if (Number.isFinite(slo)) {
    const text = `SLO: TTFT p99 ≤ ${num(slo, 0)} ms`;
    if (slo <= yMax) {
      svg.append(s('g', { class: 'sweep-slo' },
        s('line', { x1: L, x2: W - R, y1: y(slo), y2: y(slo), class: 'sweep-slo-line' }),
        s('text', { x: W - R, y: Math.max(T + 10, y(slo) - 4), 'text-anchor': 'end', class: 'chart-note' }, text)));
    } else {
      sloNote = h('p', { class: 'note sweep-slo sweep-slo-off' }, `${text}: above every point (off the chart, whose axis is scaled to the points)`);
    }
  }
  const labelSpots = placeLabels(lines.flatMap(({ pts }) => pts.map((p) => ({ px: x(p.x), py: y(p.y), text: String(p.concurrency) }))), { W, H, T, B, L, R });
  let k = 0;
  for (const { m, pts } of lines) {
    const color = colorOf(m.machine_id);
    const grp = s('g', { class: 'sweep-line', 'data-machine': m.machine_id });
    grp.append(s('title', {}, `${labelOf(m.machine_id)} (${m.machine_id})`));
    grp.append(s('polyline', { points: pts.map((p) => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(' '), class: 'sweep-path', stroke: color }));
    for (const p of pts) {
      const within = !Number.isFinite(slo) || p.y <= slo;
      const spot = labelSpots[k++];
      grp.append(
        s('circle', { cx: x(p.x), cy: y(p.y), r: 4, fill: color, class: 'sweep-point' + (within ? '' : ' is-over'), 'data-concurrency': p.concurrency, 'data-machine': m.machine_id },
          s('title', {}, `${labelOf(m.machine_id)}, ${p.concurrency} stream${p.concurrency === 1 ? '' : 's'}: ${num(p.x, 1)} tok/s, TTFT p99 ${num(p.y, 0)} ms${within ? '' : ' (over the SLO)'}`)),
        s('text', { x: spot.x, y: spot.y, 'text-anchor': spot.anchor, class: 'sweep-label chart-tick' }, String(p.concurrency)));
    }
    svg.append(grp);
  }
  const answers = (sweep.machines ?? []).map((m) => h('li', { class: 'capacity' + (m.capacity == null ? ' is-none' : ''), 'data-machine': m.machine_id },
    h('span', { class: 'swatch', style: { background: colorOf(m.machine_id) } }), ' ', capacityText(labelOf(m.machine_id), m, sweep.slo)));
  return h('figure', { class: 'chart-fig sweep-fig', 'data-group': sweep.group ?? '' }, chartHead(title, 'right and low is better · label = streams'), svg, sloNote, h('ul', { class: 'capacities' }, answers));
}
