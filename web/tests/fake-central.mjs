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

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const port = Number(process.argv[2] ?? process.env.PORT ?? 0);

const machines = [
  { machine_id: 'fast-box', label: 'Fast box (mock, 180 tok/s)', engine: 'mock', rate: 180, ttft: 25 },
  { machine_id: 'slow-box', label: 'Slow box (mock, 60 tok/s)', engine: 'mock', rate: 60, ttft: 70 },
].map((m) => ({ ...m, status: 'online', models: ['gemma-3-270m', 'mock'], current_job: null }));

const jobs = new Map(); // job_id -> {doc, events: [{id, ev}], listeners:Set}
const globalListeners = new Set();
let streamSeq = 0;
const WORDS = ' the quick brown fox jumps over a lazy dog while unified memory feeds tensor cores at full speed.'.split(/(?= )/);

function machineDoc(m) {
  const { rate, ttft, ...rest } = m;
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
  return { job_id: j.job_id, created_ms: j.created_ms, model: j.job.model, prompt: j.job.prompt.slice(0, 200), status: j.status, source: 'central', machines: j.machines.map((m) => m.machine_id) };
}

function stats(v) {
  v = v.filter(Number.isFinite).sort((a, b) => a - b);
  if (!v.length) return null;
  const n = v.length;
  const mean = v.reduce((a, b) => a + b, 0) / n;
  return { n, median: n % 2 ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2, mean, stdev: 0, min: v[0], max: v[n - 1] };
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
  j.ranking = rows.map((m, i) => ({ rank: i + 1, machine_id: m.machine_id, gen_tokens_per_s: m.summary.gen_tokens_per_s, ttft_ms: m.summary.ttft_ms, total_ms: m.summary.total_ms, delta_vs_baseline: null,
    clear_winner: i === 0 && rows.length > 1 ? m.summary.gen_tokens_per_s.min > rows[1].summary.gen_tokens_per_s.max : false }));
}

async function runMachine(j, jm, spec) {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const fm = machines.find((m) => m.machine_id === jm.machine_id);
  fm.status = 'busy';
  broadcast('machine', machineDoc(fm));
  emit(j, jm, 'job_accepted', { job: { ...j.job, job_id: j.job_id }, position: 0, engine: 'mock', engine_url: '', label: fm.label, agent_version: 'fake' });
  const runs = j.job.warmup + j.job.repeat;
  for (let r = 0; r < runs && !j.cancelled; r++) {
    const warmup = r < j.job.warmup;
    jm.status = 'running';
    emit(j, jm, 'job_started', { repeat_index: r, warmup });
    const rate = spec.rate * (0.92 + Math.random() * 0.16);
    const t0 = Date.now();
    await sleep(spec.ttft);
    const ttft = Date.now() - t0;
    let text = '';
    let batch = '';
    let batchTokens = 0;
    let lastFlush = Date.now();
    for (let i = 0; i < j.job.max_tokens && !j.cancelled; i++) {
      if (i) await sleep(1000 / rate);
      const w = i === 3 && j.job.prompt.includes('<') ? ' <b>bold?</b> <img src=x onerror=window.__xss_out=1>' : WORDS[i % WORDS.length];
      text += w; batch += w; batchTokens++;
      if (batch.length >= 64 || Date.now() - lastFlush >= 100 || i === j.job.max_tokens - 1) {
        emit(j, jm, 'llm_token', { repeat_index: r, text: batch, tokens: batchTokens, t_ms: Date.now() - t0 });
        batch = ''; batchTokens = 0; lastFlush = Date.now();
      }
    }
    if (j.cancelled) break;
    const total = Date.now() - t0;
    const n = j.job.max_tokens;
    const tps = n > 1 ? ((n - 1) * 1000) / (total - ttft) : null;
    const metrics = { repeat_index: r, warmup, ttft_ms: ttft, total_ms: total, gen_tokens: n, token_count_source: 'mock', gen_tokens_per_s: tps, tpot_ms: tps ? 1000 / tps : null, itl_ms: null,
      prompt_tokens: j.job.prompt.split(/\s+/).length, prompt_tokens_per_s: null, load_ms: null, engine_gen_tokens_per_s: null, engine_prompt_tokens_per_s: null, engine_gen_ms: null, engine_prompt_ms: null,
      engine_total_ms: null, chunks: n, output_chars: text.length, done_reason: 'length' };
    jm.repeats.push(metrics);
    if (!warmup) jm.output_text = text;
    emit(j, jm, 'repeat_done', metrics);
  }
  const measured = jm.repeats.filter((m) => !m.warmup);
  if (j.cancelled) {
    jm.status = 'cancelled';
    emit(j, jm, 'job_cancelled', { reason: 'user' });
  } else {
    jm.summary = { repeats: measured.length, ttft_ms: stats(measured.map((m) => m.ttft_ms)), gen_tokens_per_s: stats(measured.map((m) => m.gen_tokens_per_s)), total_ms: stats(measured.map((m) => m.total_ms)), tpot_ms: null, gen_tokens: stats(measured.map((m) => m.gen_tokens)), prompt_tokens_per_s: null };
    jm.status = 'done';
    emit(j, jm, 'job_done', { model: j.job.model, engine: 'mock', ttft_ms: jm.summary.ttft_ms.median, gen_tokens: j.job.max_tokens, gen_tokens_per_s: jm.summary.gen_tokens_per_s.median,
      total_ms: jm.summary.total_ms.median, token_count_source: 'mock', repeats: jm.repeats, summary: jm.summary, output_text: jm.output_text });
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
    const j = { job_id: crypto.randomUUID(), created_ms: Date.now(), status: 'running', job: { repeat: 1, warmup: 0, ...job }, events: [], listeners: new Set(),
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
