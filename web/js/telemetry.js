// Live telemetry in a pane: small inline SVG sparklines of CPU %, memory used, GPU util and power,
// fed by the job stream's `telemetry` events (state.js keeps the last samples per machine), and
// the energy per token comparison. A number no source gives is shown as "no sensor", never as 0.
import { h, s, replace } from './dom.js';
import { num } from './format.js';

const W = 96;
const H = 18;

/** What each sparkline shows: how to read it from a sample, and how to print its latest value. */
const SERIES = [
  { key: 'cpu', label: 'CPU', get: (x) => x.cpu_pct, fmt: (v) => `${num(v, 0)}%`, max: () => 100 },
  { key: 'mem', label: 'mem', get: (x) => x.mem_used_bytes, fmt: (v) => `${num(v / 2 ** 30, 1)} GiB` },
  { key: 'gpu', label: 'GPU', get: (x) => maxOf((x.gpus ?? []).map((g) => g.util_pct)), fmt: (v) => `${num(v, 0)}%`, max: () => 100 },
  { key: 'power', label: 'power', get: (x) => x.power_w, fmt: (v) => `${num(v, 0)} W` },
];

function maxOf(vals) {
  const ok = vals.filter((v) => Number.isFinite(v));
  return ok.length ? Math.max(...ok) : undefined;
}

function spark(points, max) {
  const svg = s('svg', { class: 'spark-svg', viewBox: `0 0 ${W} ${H}`, width: W, height: H, 'aria-hidden': 'true' });
  if (points.length < 2) return svg;
  const t0 = points[0][0];
  const span = Math.max(1, points[points.length - 1][0] - t0);
  const top = Math.max(max ?? 0, ...points.map((p) => p[1])) || 1;
  const xy = points.map(([t, v]) => `${((t - t0) / span * (W - 2) + 1).toFixed(1)},${(H - 1 - (v / top) * (H - 2)).toFixed(1)}`);
  svg.append(s('polyline', { points: xy.join(' '), class: 'spark-line' }));
  return svg;
}

/**
 * Fills `el` with one sparkline per series from the machine's samples. `fleet` is the machine's
 * registry entry: its `telemetry` sources say whether a power sensor exists before any sample does.
 */
export function renderTelemetry(el, m, fleet) {
  const samples = m?.samples ?? [];
  const sensors = fleet?.telemetry ?? null;
  if (!samples.length && !(sensors && Object.keys(sensors).length)) {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  const last = samples[samples.length - 1];
  const sig = `${samples.length}:${last?.t_ms}:${JSON.stringify(sensors)}`;
  if (el.dataset.sig === sig) return;
  el.dataset.sig = sig;
  replace(el, SERIES.map((k) => {
    const pts = samples.map((x) => [x.t_ms, k.get(x)]).filter(([t, v]) => Number.isFinite(t) && Number.isFinite(v));
    const none = !pts.length;
    const noSensor = none && (samples.length > 0 || (k.key === 'power' && sensors && !sensors.power));
    const noGpu = k.key === 'gpu' && m?.fingerprint && !(m.fingerprint.hardware?.gpus ?? []).length;
    const value = none ? (noGpu ? 'no GPU' : noSensor ? 'no sensor' : '–') : k.fmt(pts[pts.length - 1][1]);
    const src = last?.sources?.[k.key === 'mem' ? 'cpu' : k.key] ?? sensors?.[k.key === 'mem' ? 'cpu' : k.key];
    return h('div', { class: 'spark' + (noSensor ? ' no-sensor' : ''), 'data-k': k.key, title: `${k.label}${src ? ` (from ${src})` : ''}: the last ${pts.length} samples` },
      h('span', { class: 'spark-k' }, k.label), none ? h('span', { class: 'spark-svg spark-empty' }) : spark(pts, k.max?.()), h('span', { class: 'spark-v mono' }, value));
  }));
}

/** "0.42 J/tok" with tokens per joule under it, or "no sensor" where the runs carry no energy. */
export function energyText(st) {
  const jpt = st?.joules_per_token;
  if (!jpt) return { value: 'no sensor', sub: null };
  const tpj = st.tokens_per_joule?.median;
  return { value: `${num(jpt.median, jpt.median < 1 ? 3 : 2)} J/tok`, sub: Number.isFinite(tpj) ? `${num(tpj, 1)} tok/J` : null };
}

/**
 * The energy comparison: rows [{id, label, energy: Stats|null, tps: Stats|null}]. Ranked only when
 * every racer (every machine with a decode rate) has energy per token; otherwise who has no sensor.
 */
export function energyVerdict(rows) {
  const racers = rows.filter((r) => r.tps);
  if (!racers.length) return null;
  const missing = racers.filter((r) => !r.energy);
  if (missing.length) {
    return h('li', { class: 'verdict-none verdict-energy' }, h('strong', {}, 'Energy: '), `no sensor on ${missing.map((r) => r.label).join(', ')}; energy per token is compared only where every machine measures power.`);
  }
  const sorted = racers.slice().sort((a, b) => a.energy.median - b.energy.median);
  const [best, next] = sorted;
  const f = (v) => num(v, v < 1 ? 3 : 2);
  if (!next) return h('li', { class: 'verdict-energy' }, h('strong', {}, 'Energy: '), `${best.label}: ${f(best.energy.median)} J/tok`);
  const pctLess = ((next.energy.median - best.energy.median) / next.energy.median) * 100;
  return h('li', { class: 'verdict-energy' }, h('strong', {}, 'Energy: '), h('span', { class: 'who' }, best.label),
    ` uses the least energy per token — ${f(best.energy.median)} vs ${f(next.energy.median)} J/tok (${num(pctLess, 1)}% less than ${next.label}).`);
}
