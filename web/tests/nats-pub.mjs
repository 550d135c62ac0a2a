// A minimal NATS client for the browser tests: publishes event envelopes into JetStream as an agent
// does (subject bench.events.<job_id>, header Nats-Msg-Id <job>.<machine>.<run>.<seq>) and waits for
// each JetStream ack. The NATS text protocol over node:net, so the tests need no client package.
import net from 'node:net';

export class NatsPub {
  static async connect(url, timeoutMs = 10000) {
    const u = new URL(url.replace(/^nats:/, 'http:'));
    const c = new NatsPub();
    c.sock = net.connect(Number(u.port || 4222), u.hostname);
    c.buf = Buffer.alloc(0);
    c.waiters = new Map(); // reply subject -> {resolve, reject, timer}
    c.pong = null;
    c.sock.on('data', (d) => {
      c.buf = Buffer.concat([c.buf, d]);
      c.parse();
    });
    c.sock.on('error', (e) => c.failAll(e));
    c.inbox = `_INBOX.uitest${process.pid}${Date.now()}`;
    c.n = 0;
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`NATS ${url}: no answer within ${timeoutMs} ms`)), timeoutMs);
      c.pong = () => { clearTimeout(t); resolve(); };
      c.sock.once('connect', () => {
        c.sock.write('CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"lang":"node-test","version":"0"}\r\n');
        c.sock.write(`SUB ${c.inbox}.* 1\r\nPING\r\n`);
      });
      c.sock.once('error', reject);
    });
    return c;
  }

  failAll(e) {
    for (const w of this.waiters.values()) { clearTimeout(w.timer); w.reject(e); }
    this.waiters.clear();
  }

  parse() {
    for (;;) {
      const nl = this.buf.indexOf('\r\n');
      if (nl < 0) return;
      const line = this.buf.subarray(0, nl).toString();
      if (line.startsWith('MSG ') || line.startsWith('HMSG ')) {
        const parts = line.split(' ');
        const total = Number(parts[parts.length - 1]);
        if (this.buf.length < nl + 2 + total + 2) return;
        const body = this.buf.subarray(nl + 2, nl + 2 + total).toString();
        this.buf = this.buf.subarray(nl + 2 + total + 2);
        const w = this.waiters.get(parts[1]);
        if (w) {
          this.waiters.delete(parts[1]);
          clearTimeout(w.timer);
          const json = body.slice(body.indexOf('{'));
          let ack = null;
          try { ack = JSON.parse(json); } catch { /* a status-only reply */ }
          if (ack && ack.seq) w.resolve(ack);
          else w.reject(new Error(`JetStream did not store the event: ${body}`));
        }
        continue;
      }
      this.buf = this.buf.subarray(nl + 2);
      if (line === 'PING') this.sock.write('PONG\r\n');
      else if (line === 'PONG') this.pong?.();
      else if (line.startsWith('-ERR')) this.failAll(new Error(`NATS: ${line}`));
    }
  }

  /** Publishes one event envelope; resolves with JetStream's ack ({stream, seq}). */
  publish(ev, timeoutMs = 10000) {
    const reply = `${this.inbox}.${++this.n}`;
    const payload = Buffer.from(JSON.stringify(ev));
    const hdr = `NATS/1.0\r\nNats-Msg-Id: ${ev.job_id}.${ev.machine_id}.${ev.run_id}.${ev.seq}\r\n\r\n`;
    const hlen = Buffer.byteLength(hdr);
    const p = new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.waiters.delete(reply); reject(new Error(`no JetStream ack for ${ev.type} seq ${ev.seq} within ${timeoutMs} ms`)); }, timeoutMs);
      this.waiters.set(reply, { resolve, reject, timer });
    });
    this.sock.write(`HPUB bench.events.${ev.job_id} ${reply} ${hlen} ${hlen + payload.length}\r\n`);
    this.sock.write(hdr);
    this.sock.write(payload);
    this.sock.write('\r\n');
    return p;
  }

  /** Publishes in order, each acked before the next. */
  async publishAll(evs) {
    for (const ev of evs) await this.publish(ev);
  }

  close() {
    this.sock.end();
  }
}
