// bench-central's HTTP API (central/API.md). Same origin: the page is served by central.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// A central started with api_token wants `Authorization: Bearer <token>` on changes. The page
// asks for it once (on the first 401) and keeps it in localStorage.
const TOKEN_KEY = 'bench-race.api-token';

async function call(method, path, body, retried = false) {
  const init = { method, headers: { Accept: 'application/json' } };
  const token = localStorage.getItem(TOKEN_KEY);
  if (method !== 'GET' && token) init.headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', 'central is unreachable (' + e.message + ')');
  }
  if (res.status === 401 && method !== 'GET' && !retried) {
    const given = window.prompt('This central requires an API token for changes (its api_token):');
    if (given) {
      localStorage.setItem(TOKEN_KEY, given.trim());
      return call(method, path, body, true);
    }
  }
  if (res.status === 204) return null;
  let doc = null;
  try {
    doc = await res.json();
  } catch {
    /* not JSON */
  }
  if (!res.ok) {
    const err = doc?.error ?? {};
    throw new ApiError(res.status, err.code ?? 'http_' + res.status, err.message ?? res.statusText);
  }
  return doc;
}

const enc = encodeURIComponent;

export const api = {
  machines: () => call('GET', '/api/machines'),
  jobs: (before) => call('GET', '/api/jobs?limit=50' + (before ? '&before=' + enc(before) : '')),
  job: (id, baseline) => call('GET', '/api/jobs/' + enc(id) + (baseline ? '?baseline=' + enc(baseline) : '')),
  submit: (body) => call('POST', '/api/jobs', body),
  cancel: (id) => call('POST', '/api/jobs/' + enc(id) + '/cancel', {}),
  remove: (id) => call('DELETE', '/api/jobs/' + enc(id)),
  health: () => call('GET', '/health'),
  fingerprintDiff: (a, b) => call('GET', '/api/fingerprints/diff?a=' + enc(a) + '&b=' + enc(b)),
  compareJobs: (ids) => call('GET', '/api/compare?jobs=' + ids.map(enc).join(',')),
  compareRuns: (refs) => call('GET', '/api/compare?' + refs.map((r) => 'run=' + enc(r)).join('&')),
  exportUrl: (id, ext) => '/api/jobs/' + enc(id) + '/export.' + ext,
  jobEventsUrl: (id) => '/api/jobs/' + enc(id) + '/events',
};

/**
 * An EventSource that survives central restarts. The browser reconnects by itself (sending
 * Last-Event-ID) after a dropped connection; when it gives up (an HTTP error while central is
 * restarting) or central says `lagged`, we reconnect ourselves with ?last_event_id= after a
 * backoff. `onState` gets 'open' | 'reconnecting' | 'closed'.
 */
export class Stream {
  constructor(url, { handlers, onState, terminal = 'end' }) {
    this.url = url;
    this.handlers = handlers; // { type: (data, messageEvent) => void }
    this.onState = onState ?? (() => {});
    this.terminal = terminal;
    this.lastId = null;
    this.es = null;
    this.closed = false;
    this.backoff = 500;
    this.timer = null;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    let url = this.url;
    if (this.lastId !== null) url += (url.includes('?') ? '&' : '?') + 'last_event_id=' + encodeURIComponent(this.lastId);
    const es = new EventSource(url);
    this.es = es;
    es.onopen = () => {
      this.backoff = 500;
      this.onState('open');
    };
    es.onerror = () => {
      if (this.closed) return;
      if (es.readyState === EventSource.CLOSED) this.retry();
      else this.onState('reconnecting');
    };
    for (const type of Object.keys(this.handlers)) {
      es.addEventListener(type, (e) => {
        if (e.lastEventId) this.lastId = e.lastEventId;
        let data = null;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        this.handlers[type](data, e);
        if (type === this.terminal) this.close();
      });
    }
    es.addEventListener('lagged', () => {
      es.close();
      this.retry(0);
    });
  }

  retry(delay) {
    if (this.closed) return;
    this.es?.close();
    this.onState('reconnecting');
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay ?? this.backoff);
    this.backoff = Math.min(this.backoff * 2, 8000);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.es?.close();
    this.onState('closed');
  }
}
