// Number formatting. Every number in the UI goes through here so they line up (tabular-nums).

export function num(v, digits = 1) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Milliseconds: 0 decimals from 100 ms, 1 below. Seconds from 10 s. */
export function ms(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  if (v >= 10000) return num(v / 1000, 2) + ' s';
  return num(v, v >= 100 ? 0 : 1) + ' ms';
}

export function rate(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return num(v, v >= 1000 ? 0 : 1);
}

export function int(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return Math.round(v).toLocaleString('en-US');
}

/** Signed percentage, e.g. "+12.5%". */
export function pct(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  const sign = v > 0 ? '+' : v < 0 ? '−' : '±';
  return sign + num(Math.abs(v), 1) + '%';
}

export function when(msSinceEpoch) {
  if (!msSinceEpoch) return '–';
  const d = new Date(msSinceEpoch);
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  const t = d.toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  if (sameDay) return t;
  return d.toLocaleDateString('en-CA') + ' ' + t.slice(0, 5);
}
