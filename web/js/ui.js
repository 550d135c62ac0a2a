// The page's shared state and the helpers every view uses. Views render from `ui`; they ask for
// a redraw with scheduleRender(), which app.js wires to its render() (one per animation frame).
import { machineStats } from './state.js';
import { cellsOf } from './matrix.js';

export const LS = {
  form: 'bench-race.form',
  baseline: 'bench-race.baseline', // the machine pinned as baseline for deltas in a race
  baselineJob: 'bench-race.baseline-job', // the job pinned as baseline for run-against-run deltas
  current: 'bench-race.current-job',
};
export const EVENT_TYPES = ['job_accepted', 'job_started', 'llm_token', 'repeat_done', 'cell_done', 'job_done', 'job_error', 'job_cancelled', 'telemetry'];
export const FINISHED = new Set(['done', 'failed', 'cancelled', 'partial']);
const PALETTE = ['#2f6fdf', '#e0702a', '#1f9d6b', '#b23fbf', '#c9a400', '#d6374f', '#2aa7b8', '#6b7a8f'];

export const ui = {
  fleet: new Map(), // machine_id -> machine object from /api/machines
  colors: new Map(), // machine_id -> colour, stable for the session
  job: null, // state.js job state of the job on screen
  cell: null, // the matrix cell shown as a race (null: the whole job / its matrix)
  compareIds: null, // the job ids of the compare view (#compare=a,b), null when not shown
  jobStream: null,
  fleetStream: null,
  panes: new Map(), // machine_id -> pane DOM refs
  history: new Map(), // job_id -> job list item
  historyNext: null,
  baseline: localStorage.getItem(LS.baseline) || null,
  baselineJob: localStorage.getItem(LS.baselineJob) || null,
  sort: { key: 'tps', dir: 'desc' },
  renderQueued: false,
  rankingTimer: null,
  openSeq: 0,
  render: () => {},
};

export function scheduleRender() {
  if (ui.renderQueued) return;
  ui.renderQueued = true;
  requestAnimationFrame(() => {
    ui.renderQueued = false;
    ui.render();
  });
}

export function colorOf(id) {
  if (!ui.colors.has(id)) ui.colors.set(id, PALETTE[ui.colors.size % PALETTE.length]);
  return ui.colors.get(id);
}

/** Registry status as the UI names it: idle / busy / offline. */
export function fleetStatus(id) {
  const m = ui.fleet.get(id);
  if (!m) return 'unknown';
  const st = m.status;
  if (st === 'offline') return 'offline';
  if (st === 'busy') return 'busy';
  return 'idle'; // "online" / "idle"
}

export function labelOf(id) {
  return ui.job?.machines.get(id)?.label || ui.fleet.get(id)?.label || id;
}

/** The job's repeats in words: "3", or "auto (max 20)". */
export function repeatText(j) {
  if (j.repeat === 'auto') return `auto (max ${j.max_repeat ?? 20}, ±${j.target_ci_pct ?? 2}%)`;
  return String(j.repeat ?? 1);
}

/** The job asks for a controlled size (a profile or prompt_tokens): pp/tg rates are meaningful. */
export function hasShape(j) {
  return !!(j && (j.profile || j.prompt_tokens != null));
}

export function shapeText(j) {
  if (j.profile) return j.profile;
  if (j.prompt_tokens != null) return `${j.prompt_tokens}-token prompt`;
  return 'free prompt';
}

/** Whether the job on screen is a matrix job (cells from central, or a matrix in its settings). */
export function isMatrixJob(job = ui.job) {
  if (!job) return false;
  if (Array.isArray(job.cells) && job.cells.length) return true;
  const m = job.job?.matrix;
  return !!m && Object.values(m).some((v) => Array.isArray(v) && v.length);
}

/**
 * A machine as the race view shows it: with a matrix cell chosen, only that cell's runs (every
 * Metrics names its cell). The same object otherwise.
 */
export function viewMachine(m) {
  if (ui.cell === null || !m) return m;
  return { ...m, repeats: m.repeats.filter((r) => (r.cell ?? '') === ui.cell) };
}

/** The statistics a race view shows for a machine: over its warm measured runs (of the cell chosen). */
export function viewStats(m) {
  return machineStats(viewMachine(m), !!ui.job?.job?.include_short);
}

/** Central's ranking for what is shown: the chosen cell's, else the job's. */
export function viewRanking(job = ui.job) {
  if (!job) return null;
  if (ui.cell !== null) return (job.cells ?? []).find((c) => c.cell === ui.cell)?.ranking ?? null;
  return job.ranking;
}

/** The axes whose cell values are text (the others are numbers in the job). */
const TEXT_AXES = new Set(['model', 'backend', 'profile']);

/** The values of a cell of the job on screen ({} when unknown): central's cells, else the matrix's. */
export function cellValues(cell, job = ui.job) {
  if (cell === null || !job) return {};
  const c = (job.cells ?? []).find((x) => x.cell === cell) ?? cellsOf(job.job?.matrix).find((x) => x.cell === cell);
  return c?.values ?? {};
}

/** A cell's own settings: its values applied over the job's (schemas Job::cells), the matrix left out. */
export function cellJob(j, values) {
  const c = { ...(j ?? {}) };
  delete c.matrix;
  for (const [k, v] of Object.entries(values ?? {})) c[k] = TEXT_AXES.has(k) ? v : Number(v);
  if ('profile' in (values ?? {})) delete c.max_tokens; // a profile sets the generated tokens
  return c;
}

/** The settings of what the race view shows: the chosen cell's, else the job's. */
export function viewJob(job = ui.job) {
  if (!job) return null;
  return ui.cell === null ? job.job ?? null : cellJob(job.job, cellValues(ui.cell, job));
}

/** A load's requests in words: "2 requests per stream × 2 streams" (or "for 30 s × 4 streams"). */
export function loadRunsText(j) {
  const c = j.concurrency ?? 1;
  const streams = `${c} stream${c === 1 ? '' : 's'}`;
  if (j.duration_s != null) return `for ${j.duration_s} s × ${streams}`;
  const per = j.requests ?? (Number.isInteger(j.repeat) ? j.repeat : 1);
  return `${per} request${per === 1 ? '' : 's'} per stream × ${streams}`;
}

/** Whether a job (or cell) is a load: concurrent closed-loop streams. */
export function isLoad(j) {
  return j?.concurrency != null;
}
