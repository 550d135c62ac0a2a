// A FAKE bench-central for developing the UI without NATS or agents: it serves web/ and speaks
// the HTTP/SSE contract of central/API.md with two simulated machines. It is not the product and
// not what the browser test is meant to run against (that is the real central, via CENTRAL_URL);
// it exists so the page can be worked on, and so the test can be tried, before central is ready.
//
//   node web/tests/fake-central.mjs [port]      (prints "listening on http://127.0.0.1:<port>")
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
// The page's own statistics (a port of schemas::metrics: the exact 95% interval of the median).
import { stats, separation, ciHalfWidthPct, MIN_CI_SAMPLES } from '../js/state.js';

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const port = Number(process.argv[2] ?? process.env.PORT ?? 0);

const machines = [
  { machine_id: 'fast-box', label: 'Fast box (mock, 180 tok/s)', engine: 'mock', rate: 180, ttft: 25 },
  { machine_id: 'slow-box', label: 'Slow box (mock, 60 tok/s)', engine: 'mock', rate: 60, ttft: 70 },
].map((m) => ({ ...m, status: 'online', models: ['gemma-3-270m', 'mock'], current_job: null, loaded: false }));

const jobs = new Map(); // job_id -> {doc, events: [{id, ev}], listeners:Set}
const globalListeners = new Set();
let streamSeq = 0;
const WORDS = ' the quick brown fox jumps over a lazy dog while unified memory feeds tensor cores at full speed.'.split(/(?= )/);

function machineDoc(m) {
  const { rate, ttft, loaded, ...rest } = m;
  return { ...rest, last_seen_ms: Date.now(), hardware: { cpu: 'fake', cores: 2, memory_bytes: 0, os: 'linux', arch: 'x86_64' }, labels: {}, notes: null, version: 'fake' };
}

function sse(res, id, type, data) {
  if (id !== null) res.write(`id: ${id}\n`);
  res.write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
}

function broadcast(type, data) {
  for (const res of globalListeners) sse(res, null, type, data);
}

function listItem(j) {
  return { job_id: j.job_id, created_ms: j.created_ms, model: j.job.model, prompt: (j.job.prompt ?? '').slice(0, 200), profile: j.job.profile, status: j.status, source: 'central', machines: j.machines.map((m) => m.machine_id) };
}

function emit(j, jm, type, payload) {
  jm.seq += 1;
  const ev = { job_id: j.job_id, machine_id: jm.machine_id, seq: jm.seq, ts_ms: Date.now(), type, payload };
  const id = ++streamSeq;
  j.events.push({ id, ev });
  jm.last_seq = jm.seq;
  for (const res of j.listeners) sse(res, id, type, ev);
  if (['job_done', 'job_error', 'job_cancelled'].includes(type) && j.machines.every((m) => ['done', 'failed', 'cancelled'].includes(m.status))) {
    j.status = j.machines.every((m) => m.status === 'done') ? 'done' : 'partial';
    ranking(j);
    for (const res of j.listeners) { sse(res, null, 'end', { job_id: j.job_id, status: j.status }); res.end(); }
    j.listeners.clear();
    broadcast('job', listItem(j));
  }
}

function ranking(j) {
  const rows = j.machines.filter((m) => m.summary?.gen_tokens_per_s).sort((a, b) => b.summary.gen_tokens_per_s.median - a.summary.gen_tokens_per_s.median);
  j.ranking = rows.map((m, i) => {
    const s = m.summary;
    const next = rows[i + 1]?.summary.gen_tokens_per_s;
    const sep = next ? separation(s.gen_tokens_per_s, next) : null;
    const gap = next ? ((s.gen_tokens_per_s.median - next.median) / next.median) * 100 : 0;
    const verdict = !next ? (rows.length === 1 ? 'the only machine with a decode rate: nothing to compare' : `last of ${rows.length}`)
      : sep.overlap_pct === null ? `needs ${MIN_CI_SAMPLES} repeats per machine for a 95% interval`
      : sep.separated ? `${i === 0 ? 'clear winner: ' : ''}${gap.toFixed(1)}% faster than ${rows[i + 1].machine_id}, 95% intervals separated`
      : i === 0 ? `no clear winner: intervals overlap by ${sep.overlap_pct.toFixed(0)}%` : `not separated from ${rows[i + 1].machine_id}: intervals overlap by ${sep.overlap_pct.toFixed(0)}%`;
    return { rank: i + 1, machine_id: m.machine_id, gen_tokens_per_s: s.gen_tokens_per_s, ttft_ms: s.ttft_ms, total_ms: s.total_ms, ttfot_ms: s.ttfot_ms, pp_tokens_per_s: s.pp_tokens_per_s, tg_tokens_per_s: s.tg_tokens_per_s,
      delta_vs_baseline: null, separation: sep, verdict, clear_winner: i === 0 && !!sep?.separated };
  });
}

/** The summary of the warm measured runs (warmups and the cold run apart), as schemas::Summary::of. */
function summaryOf(repeats) {
  const measured = repeats.filter((m) => !m.warmup && !m.cold && !m.short_output);
  const over = (k) => stats(measured.map((m) => m[k]));
  const cold = repeats.find((m) => m.cold);
  return { repeats: measured.length, cold: cold ? { ttft_ms: cold.ttft_ms, total_ms: cold.total_ms, load_ms: cold.load_ms, gen_tokens_per_s: cold.gen_tokens_per_s } : undefined,
    ttft_ms: over('ttft_ms'), gen_tokens_per_s: over('gen_tokens_per_s'), total_ms: over('total_ms'), tpot_ms: over('tpot_ms'), gen_tokens: over('gen_tokens'), prompt_tokens_per_s: over('prompt_tokens_per_s'),
    ttfot_ms: over('ttfot_ms'), pp_tokens_per_s: over('pp_tokens_per_s'), tg_tokens_per_s: over('tg_tokens_per_s') };
}

async function runMachine(j, jm, spec) {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const fm = machines.find((m) => m.machine_id === jm.machine_id);
  fm.status = 'busy';
  broadcast('machine', machineDoc(fm));
  emit(j, jm, 'job_accepted', { job: { ...j.job, job_id: j.job_id }, position: 0, engine: 'mock', engine_url: '', label: fm.label, agent_version: 'fake' });
  const profile = /^pp(\d+)-tg(\d+)$/.exec(j.job.profile ?? '');
  const maxTokens = profile ? Number(profile[2]) : j.job.max_tokens;
  const promptTokens = profile ? Number(profile[1]) : j.job.prompt_tokens ?? j.job.prompt.split(/\s+/).length;
  const auto = j.job.repeat === 'auto';
  const maxRepeat = auto ? j.job.max_repeat ?? 20 : j.job.repeat;
  const target = j.job.target_ci_pct ?? 2;
  // The first request after a model load is cold; with no warmup to absorb it, it is an extra run.
  const extraCold = !fm.loaded && j.job.warmup === 0 ? 1 : 0;
  fm.loaded = true;
  let stopReason = 'count';
  for (let r = 0; !j.cancelled; r++) {
    const measuredSoFar = jm.repeats.filter((m) => !m.warmup && !m.cold);
    if (measuredSoFar.length >= maxRepeat) { stopReason = auto ? 'max_repeat' : 'count'; break; }
    if (auto && measuredSoFar.length >= MIN_CI_SAMPLES) {
      const hw = ciHalfWidthPct(stats(measuredSoFar.map((m) => m.gen_tokens_per_s)));
      if (hw !== null && hw <= target) { stopReason = 'precision'; break; }
    }
    const cold = r < extraCold;
    const warmup = !cold && r < extraCold + j.job.warmup;
    jm.status = 'running';
    emit(j, jm, 'job_started', cold ? { repeat_index: r, warmup: false, cold: true } : { repeat_index: r, warmup });
    const rate = spec.rate * (0.92 + Math.random() * 0.16);
    const t0 = Date.now();
    await sleep(spec.ttft);
    const ttft = Date.now() - t0;
    let text = '';
    let batch = '';
    let batchTokens = 0;
    let lastFlush = Date.now();
    for (let i = 0; i < maxTokens && !j.cancelled; i++) {
      if (i) await sleep(1000 / rate);
      const w = i === 3 && j.job.prompt.includes('<') ? ' <b>bold?</b> <img src=x onerror=window.__xss_out=1>' : WORDS[i % WORDS.length];
      text += w; batch += w; batchTokens++;
      if (batch.length >= 64 || Date.now() - lastFlush >= 100 || i === maxTokens - 1) {
        emit(j, jm, 'llm_token', { repeat_index: r, text: batch, tokens: batchTokens, t_ms: Date.now() - t0 });
        batch = ''; batchTokens = 0; lastFlush = Date.now();
      }
    }
    if (j.cancelled) break;
    const total = Date.now() - t0;
    const n = maxTokens;
    const tps = n > 1 ? ((n - 1) * 1000) / (total - ttft) : null;
    const pp = (promptTokens * 1000) / ttft;
    const metrics = { repeat_index: r, warmup, cold, ttft_ms: ttft, ttfot_ms: ttft, total_ms: total, gen_tokens: n, token_count_source: 'mock', streamed_tokens: n, gen_tokens_per_s: tps, tpot_ms: tps ? 1000 / tps : null, itl_ms: null,
      prompt_tokens: promptTokens, prompt_tokens_per_s: pp, prompt_evaluated: promptTokens, pp_tokens_per_s: pp, tg_tokens_per_s: tps, load_ms: cold ? 400 : null, engine_gen_tokens_per_s: null, engine_prompt_tokens_per_s: null, engine_gen_ms: null, engine_prompt_ms: null,
      engine_total_ms: null, chunks: n, output_chars: text.length, done_reason: 'length' };
    if (n < 2) metrics.null_reason = 'one token: no decode interval';
    jm.repeats.push(metrics);
    if (!warmup && !cold) jm.output_text = text;
    emit(j, jm, 'repeat_done', metrics);
  }
  if (j.cancelled) {
    jm.status = 'cancelled';
    emit(j, jm, 'job_cancelled', { reason: 'user' });
  } else {
    jm.summary = summaryOf(jm.repeats);
    jm.stop_reason = stopReason;
    jm.shape = { prompt_tokens: profile || j.job.prompt_tokens != null ? promptTokens : null, depth: j.job.depth ?? 0, max_tokens: maxTokens, ignore_eos: !!(profile || j.job.prompt_tokens != null) };
    jm.status = 'done';
    emit(j, jm, 'job_done', { model: j.job.model, engine: 'mock', ttft_ms: jm.summary.ttft_ms?.median ?? null, gen_tokens: maxTokens, gen_tokens_per_s: jm.summary.gen_tokens_per_s?.median ?? null,
      total_ms: jm.summary.total_ms?.median ?? null, token_count_source: 'mock', repeats: jm.repeats, summary: jm.summary, output_text: jm.output_text,
      pp_tokens_per_s: jm.summary.pp_tokens_per_s?.median ?? null, tg_tokens_per_s: jm.summary.tg_tokens_per_s?.median ?? null, shape: jm.shape, stop_reason: stopReason });
  }
  fm.status = 'online';
  broadcast('machine', machineDoc(fm));
}

function jobDoc(j) {
  return { job_id: j.job_id, created_ms: j.created_ms, status: j.status, source: 'central', job: j.job,
    machines: j.machines.map(({ seq, ...m }) => m), ranking: j.ranking ?? [], baseline: null };
}

function send(res, code, body, headers = {}) {
  res.writeHead(code, { 'Content-Type': 'application/json', ...headers });
  res.end(body === null ? '' : JSON.stringify(body));
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.png': 'image/png', '.svg': 'image/svg+xml' };

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname;
  let m;
  if (p === '/api/machines') return send(res, 200, { machines: machines.map(machineDoc) });
  if (p === '/health') return send(res, 200, { ok: true, nats: 'connected', version: 'fake' });
  if (p === '/api/events') {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    res.write(': hi\n\n');
    globalListeners.add(res);
    req.on('close', () => globalListeners.delete(res));
    return;
  }
  if (p === '/api/jobs' && req.method === 'POST') {
    let body = '';
    for await (const c of req) body += c;
    let b;
    try { b = JSON.parse(body); } catch { return send(res, 400, { error: { code: 'bad_json', message: 'bad json' } }); }
    const { machines: want, ...job } = b;
    const ids = want === 'all' ? machines.map((x) => x.machine_id) : want;
    const j = { job_id: crypto.randomUUID(), created_ms: Date.now(), status: 'running', job: { repeat: 1, warmup: 0, prompt: '', ...job }, events: [], listeners: new Set(),
      machines: ids.map((id) => ({ machine_id: id, label: machines.find((x) => x.machine_id === id)?.label ?? id, engine: 'mock', status: 'queued', output_text: '', repeats: [], summary: null, error: null, last_seq: 0, seq: 0 })) };
    jobs.set(j.job_id, j);
    broadcast('job', listItem(j));
    for (const jm of j.machines) runMachine(j, jm, machines.find((x) => x.machine_id === jm.machine_id));
    return send(res, 201, { job_id: j.job_id, machines: ids.map((id) => ({ machine_id: id, status: 'accepted' })) });
  }
  if (p === '/api/jobs') {
    const list = [...jobs.values()].sort((a, b) => b.created_ms - a.created_ms).map(listItem);
    return send(res, 200, { jobs: list, next_before: null });
  }
  if ((m = /^\/api\/jobs\/([A-Za-z0-9_-]+)(\/events|\/cancel|\/export\.(json|csv|ndjson))?$/.exec(p))) {
    const j = jobs.get(m[1]);
    if (!j) return send(res, 404, { error: { code: 'not_found', message: 'no such job' } });
    if (!m[2]) return send(res, 200, jobDoc(j));
    if (m[2] === '/cancel') { j.cancelled = true; return send(res, 202, { job_id: j.job_id, cancel_sent: true }); }
    if (m[3] === 'json') return send(res, 200, jobDoc(j), { 'Content-Disposition': `attachment; filename="${j.job_id}.json"` });
    if (m[3]) { res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Disposition': `attachment; filename="${j.job_id}.${m[3]}"` }); return res.end('fake export\n'); }
    const last = Number(req.headers['last-event-id'] ?? url.searchParams.get('last_event_id') ?? 0);
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    for (const { id, ev } of j.events) if (id > last) sse(res, id, ev.type, ev);
    if (j.status !== 'running') { sse(res, null, 'end', { job_id: j.job_id, status: j.status }); return res.end(); }
    j.listeners.add(res);
    req.on('close', () => j.listeners.delete(res));
    return;
  }
  // static
  const rel = p === '/' ? 'index.html' : decodeURIComponent(p).replace(/^\/+/, '');
  const file = path.resolve(WEB, rel);
  if (!file.startsWith(WEB + path.sep) || file.includes('node_modules') || file.includes(path.sep + 'tests' + path.sep)) return send(res, 404, { error: { code: 'not_found', message: 'not found' } });
  fs.readFile(file, (err, data) => {
    if (err) return send(res, 404, { error: { code: 'not_found', message: 'not found' } });
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
    res.end(data);
  });
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
