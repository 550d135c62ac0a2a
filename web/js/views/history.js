// History: the jobs central knows, newest first. Each row opens its job, and has three tools:
// fingerprint differences with the open job (⇄), "compare with…" another job (the compare view),
// and "pin as baseline" (kept in localStorage, a badge in the top bar: every job opened after is
// compared with it).
import { api } from '../api.js';
import { h, replace, $ } from '../dom.js';
import { when } from '../format.js';
import { diffView } from '../fingerprint.js';
import { ui, labelOf } from '../ui.js';
import { openJob } from '../job.js';
import { pinBaselineJob, openCompare } from './compare.js';

export async function loadHistory(more = false) {
  try {
    const doc = await api.jobs(more ? ui.historyNext : undefined);
    if (!more) ui.history.clear();
    for (const j of doc.jobs ?? []) ui.history.set(j.job_id, j);
    ui.historyNext = doc.next_before ?? null;
    renderHistory();
  } catch {
    /* the connection indicator says so */
  }
}

/** A job in a few words, for labels and choices. */
export function jobWords(j) {
  if (!j) return '';
  return `${when(j.created_ms)} ${j.model ?? ''}${j.profile ? ' ' + j.profile : ''}`.trim();
}

export function renderHistory() {
  const list = $('#history-list');
  const items = [...ui.history.values()].sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0));
  replace(list, items.map((j) => {
    const pinned = ui.baselineJob === j.job_id;
    const btn = h('button', { type: 'button', class: 'hist-item', 'data-job': j.job_id },
      h('span', { class: 'hist-line' },
        h('span', { class: `dot dot-${j.status}`, title: j.status }),
        h('span', { class: 'hist-time mono' }, when(j.created_ms)),
        h('span', { class: 'hist-model' }, j.model ?? ''),
        j.source === 'external' ? h('span', { class: 'tag', title: 'Submitted on NATS directly' }, 'nats') : null,
        pinned ? h('span', { class: 'tag tag-pin', title: 'The pinned baseline job' }, 'baseline') : null,
        h('span', { class: 'spacer' }),
        (j.machines ?? []).length ? h('span', { class: 'hist-n mono', title: `machines: ${j.machines.join(', ')}` }, `${j.machines.length}×`) : null),
      h('span', { class: 'hist-prompt' }, (j.prompt || (j.profile ? `profile ${j.profile}` : '')).replace(/\s+/g, ' ').slice(0, 120)));
    btn.setAttribute('aria-label', `${j.status} job ${when(j.created_ms)}, ${j.model ?? ''}: ${(j.prompt ?? '').slice(0, 60)}`);
    btn.addEventListener('click', () => openJob(j.job_id));
    const diff = h('button', { type: 'button', class: 'hist-diff small', 'data-diff': j.job_id, title: 'Fingerprint differences between this job and the one open', 'aria-label': `Compare fingerprints of job ${j.job_id} with the open job` }, '⇄');
    diff.addEventListener('click', () => showFingerprintDiff(j));
    const vs = h('button', { type: 'button', class: 'hist-vs small', 'data-compare': j.job_id, 'aria-expanded': 'false', title: 'Compare this job\'s runs with another job\'s', 'aria-label': `Compare job ${j.job_id} with…` }, 'vs');
    const pin = h('button', { type: 'button', class: 'hist-pin small', 'data-pin': j.job_id, 'aria-pressed': String(pinned), title: pinned ? 'Unpin this baseline job' : 'Pin as the baseline job: jobs opened later show their deltas against it', 'aria-label': `${pinned ? 'Unpin' : 'Pin'} job ${j.job_id} as baseline` }, pinned ? '★' : '☆');
    pin.addEventListener('click', () => pinBaselineJob(pinned ? null : j.job_id));
    const row = h('li', { class: 'hist-row', 'data-row': j.job_id }, btn, diff, vs, pin);
    vs.addEventListener('click', () => toggleChooser(row, j, vs));
    return row;
  }));
  $('#hist-empty').hidden = items.length > 0;
  $('#hist-more').hidden = !ui.historyNext;
  markHistoryCurrent();
}

/** "compare with…": a choice of another job under the row, then the compare view of the two. */
function toggleChooser(row, j, vs) {
  const open = row.nextElementSibling?.classList.contains('hist-chooser') ? row.nextElementSibling : null;
  for (const el of document.querySelectorAll('#history-list .hist-chooser')) el.remove();
  for (const b of document.querySelectorAll('#history-list .hist-vs')) b.setAttribute('aria-expanded', 'false');
  if (open) return;
  const others = [...ui.history.values()].filter((o) => o.job_id !== j.job_id).sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0));
  const id = 'cmp-with-' + j.job_id;
  const sel = h('select', { id, class: 'cmp-with' }, others.map((o) => h('option', { value: o.job_id }, `${jobWords(o)} · ${o.job_id.slice(0, 8)}`)));
  if (ui.job && ui.job.job_id !== j.job_id && others.some((o) => o.job_id === ui.job.job_id)) sel.value = ui.job.job_id;
  const go = h('button', { type: 'button', class: 'small primary cmp-go' }, 'Compare');
  go.disabled = !others.length;
  go.addEventListener('click', () => {
    if (sel.value) openCompare([j.job_id, sel.value]);
  });
  const close = h('button', { type: 'button', class: 'small' }, 'Cancel');
  close.addEventListener('click', () => toggleChooser(row, j, vs));
  const box = h('li', { class: 'hist-chooser' },
    h('label', { for: id }, `Compare ${jobWords(j)} (baseline) with`),
    others.length ? sel : h('p', { class: 'note' }, 'No other job to compare with.'),
    h('div', { class: 'actions' }, go, close));
  row.after(box);
  vs.setAttribute('aria-expanded', 'true');
  if (others.length) sel.focus();
}

/**
 * The fingerprint differences between a job from the history and the one open, per machine the two
 * share (else their first machines), from GET /api/fingerprints/diff.
 */
async function showFingerprintDiff(other) {
  const sec = $('#fp-diff');
  const body = $('#fp-diff-body');
  sec.hidden = false;
  const job = ui.job;
  if (!job) {
    replace(body, h('p', { class: 'note' }, 'Open a job first: its machines are compared with the same machines in the job chosen here.'));
    return;
  }
  if (other.job_id === job.job_id) {
    replace(body, h('p', { class: 'note' }, 'Choose another job than the one open.'));
    return;
  }
  const theirs = other.machines ?? [];
  const ours = [...job.machines.keys()];
  let pairs = ours.filter((id) => theirs.includes(id)).map((id) => [id, id]);
  if (!pairs.length && theirs.length && ours.length) pairs = [[theirs[0], ours[0]]];
  replace(body, h('p', { class: 'note' }, `Comparing ${other.job_id} → ${job.job_id}…`));
  const parts = await Promise.all(pairs.map(async ([a, b]) => {
    try {
      return diffView(await api.fingerprintDiff(`${other.job_id}:${a}`, `${job.job_id}:${b}`), labelOf);
    } catch (e) {
      return h('p', { class: 'form-msg', 'data-kind': 'warn' }, `${labelOf(b)}: ${e.message}`);
    }
  }));
  if (ui.job !== job) return;
  replace(body, parts.length ? parts : h('p', { class: 'note' }, 'The two jobs have no machines to compare.'));
}

export function markHistoryCurrent() {
  for (const b of document.querySelectorAll('.hist-item')) {
    if (ui.job && b.dataset.job === ui.job.job_id) b.setAttribute('aria-current', 'true');
    else b.removeAttribute('aria-current');
  }
}
