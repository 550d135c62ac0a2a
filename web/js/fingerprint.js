// What a machine's results were measured on (schemas Fingerprint), shown compactly in its pane with
// the whole fingerprint on expand; its changes since the machine's previous job; and the differences
// between two runs (GET /api/fingerprints/diff). Text only, never markup.
import { h, replace } from './dom.js';
import { num, when } from './format.js';

function gib(bytes) {
  return Number.isFinite(bytes) && bytes > 0 ? `${num(bytes / 2 ** 30, 0)} GiB` : null;
}

/** The short line: chip or CPU · GPU(s) · memory · engine server+version/build · quantisation and size. */
export function fingerprintLine(fp) {
  const hw = fp.hardware ?? {};
  const e = fp.engine ?? {};
  const m = fp.model ?? {};
  const gpus = (hw.gpus ?? []).map((g) => g.name).filter(Boolean);
  const engine = [e.server ?? e.kind, e.version, e.build].filter(Boolean).join(' ');
  const model = [m.quantization, m.parameter_size ?? (Number.isFinite(m.parameter_count) ? `${num(m.parameter_count / 1e9, 2)}B` : null)].filter(Boolean).join(' · ');
  return [hw.chip || hw.cpu, gpus.length ? gpus.join(' + ') : null, gib(hw.memory_bytes), engine || null, model || null].filter(Boolean);
}

/** Every part of the fingerprint, as schemas Fingerprint::parts names them (for the expanded view and hover). */
export function fingerprintParts(fp) {
  const hw = fp.hardware ?? {};
  const out = [
    ['cpu', hw.cpu], ['chip', hw.chip], ['cores', hw.cores], ['physical_cores', hw.physical_cores],
    ['memory', gib(hw.memory_bytes)], ['os', [hw.os, hw.arch].filter(Boolean).join('/')], ['os_version', hw.os_version], ['kernel_version', hw.kernel_version],
  ];
  (hw.gpus ?? []).forEach((g, i) => {
    out.push([`gpu${i}`, [g.name, gib(g.memory_bytes), g.driver_version ? `driver ${g.driver_version}` : null, g.cuda_version ? `CUDA ${g.cuda_version}` : null,
      g.pcie_gen_max ? `PCIe ${g.pcie_gen_max}×${g.pcie_width_max ?? '?'}` : null, g.cores ? `${g.cores} cores` : null].filter(Boolean).join(' · ')]);
  });
  const e = fp.engine ?? {};
  out.push(['engine', [e.kind, e.server].filter(Boolean).join(' / ')], ['engine.version', e.version], ['engine.build', e.build]);
  const m = fp.model ?? {};
  out.push(['model', m.name], ['model.digest', m.digest], ['model.parameters', Number.isFinite(m.parameter_count) ? m.parameter_count.toLocaleString('en-US') : m.parameter_size],
    ['model.quantization', m.quantization], ['model.family', m.family], ['model.format', m.format], ['model.context_length', m.context_length]);
  const st = fp.settings ?? {};
  out.push(['settings', [st.mode, st.num_ctx != null ? `ctx ${st.num_ctx}` : null, st.max_tokens != null ? `max ${st.max_tokens}` : null,
    st.prompt_tokens != null ? `prompt ${st.prompt_tokens}` : null, st.depth ? `depth ${st.depth}` : null, st.ignore_eos ? 'ignore_eos' : null,
    st.cache, st.temperature != null ? `temp ${st.temperature}` : null, st.seed != null ? `seed ${st.seed}` : null].filter(Boolean).join(' · ')]);
  const missing = [...(hw.missing ?? []), ...(e.missing ?? []), ...(m.missing ?? [])].map((x) => `${x.source}: ${x.reason}`);
  if (missing.length) out.push(['not available', missing.join('; ')]);
  return out.filter(([, v]) => v !== undefined && v !== null && v !== '');
}

function changeList(changes, max = 12) {
  const items = changes.slice(0, max).map((c) => h('li', {}, h('span', { class: 'mono' }, c.field), ': ',
    h('span', { class: 'fp-before' }, c.before || '(none)'), ' → ', h('span', { class: 'fp-after' }, c.after || '(none)')));
  if (changes.length > max) items.push(h('li', {}, `… and ${changes.length - max} more`));
  return h('ul', { class: 'fp-changes' }, items);
}

/**
 * A fingerprint as one cell of a matrix job ran: the cell's settings (`j`: the cell's job, its
 * values over the job's) over the job-level ones, and a model part only where it is the cell's model.
 */
export function cellFingerprint(fp, j, fingerprintId = null) {
  const st = { ...(fp.settings ?? {}) };
  for (const k of ['num_ctx', 'max_tokens', 'prompt_tokens', 'depth', 'temperature']) if (j[k] !== undefined && j[k] !== null) st[k] = j[k];
  // the job-level id is not this cell's: the cell's own where central gave one, else none
  const out = { ...fp, settings: st, fingerprint_id: fingerprintId ?? null };
  if (j.model && fp.model?.name && fp.model.name !== j.model) out.model = { name: j.model };
  return out;
}

/**
 * Fills `el` with the machine's fingerprint (or says there is none yet) and its changes since its
 * previous job. opts.settings (a matrix cell's job): the fingerprint as that cell ran, and no
 * changes since the previous job (central compares job-level fingerprints, not this cell's).
 */
export function renderFingerprint(el, m, opts = {}) {
  const fp0 = m?.fingerprint;
  const fp = fp0 && opts.settings ? cellFingerprint(fp0, opts.settings, opts.fingerprintId) : fp0;
  if (!fp) {
    replace(el, h('span', { class: 'muted' }, 'fingerprint: not reported yet'));
    el.removeAttribute('title');
    return;
  }
  const parts = fingerprintParts(fp);
  const prev = opts.settings ? null : m.previous;
  const sig = JSON.stringify([fp, prev]);
  if (el.dataset.sig === sig) return;
  el.dataset.sig = sig;
  el.title = parts.map(([k, v]) => `${k}: ${v}`).join('\n');
  const prevEl = !prev ? null : prev.same
    ? h('p', { class: 'fp-prev fp-same' }, `same fingerprint as the previous job on this machine (${prev.job_id}, ${when(prev.created_ms)})`)
    : h('div', { class: 'fp-prev fp-changed' },
      h('p', {}, `${prev.changes.length} change${prev.changes.length === 1 ? '' : 's'} since the previous job on this machine (${prev.job_id}, ${when(prev.created_ms)}):`),
      changeList(prev.changes));
  const open = el.querySelector('details')?.open ?? false;
  const details = h('details', { class: 'fp-details' },
    h('summary', { class: 'fp-summary' }, fingerprintLine(fp).join(' · '), ' ', h('span', { class: 'fp-id mono' }, fp.fingerprint_id)),
    h('dl', { class: 'fp-parts' }, parts.map(([k, v]) => h('div', { class: 'info-row' }, h('dt', {}, k), h('dd', {}, String(v))))));
  details.open = open;
  replace(el, details, prevEl);
}

/** The differences between two runs, as GET /api/fingerprints/diff answers. */
export function diffView(d, labelOf) {
  const side = (s) => `${labelOf(s.machine_id)} in ${s.job_id} (${when(s.created_ms)}, ${s.fingerprint_id})`;
  return h('div', { class: 'fp-diff-item', 'data-machine': d.b.machine_id },
    h('p', {}, h('strong', {}, d.same ? 'Same fingerprint' : `${d.changes.length} difference${d.changes.length === 1 ? '' : 's'}`), `: ${side(d.a)} → ${side(d.b)}`),
    d.same ? null : changeList(d.changes, 40));
}
