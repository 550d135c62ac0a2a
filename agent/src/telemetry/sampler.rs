//! The sampling thread. [`Telemetry`] owns the probes (built once per agent); each job's
//! [`Session`] runs one thread that reads every probe on a fixed schedule, hands each
//! [`Sample`] to the job's sink and keeps the readings in a bounded ring, from which
//! [`Session::summary`] builds a repeat's [`TelemetrySummary`].
//!
//! Energy: every power source keeps a cumulative joule count: its own counter where it has one
//! (RAPL `cpu_energy_j`, NVML `energy_j`), else its power integrated by the trapezoid rule. The
//! ring stores the running total at each reading, and the energy over a window `[a, b]` is
//! `E(b) - E(a)` with `E` interpolated linearly between the readings either side of `a` and of
//! `b`; `summary` takes a reading of its own when the newest one is older than the window's end,
//! so a window shorter than the interval is still bracketed.

use super::probe::{Probe, Reading};
use super::probes;
use super::TelemetryConfig;
use bench_schemas::{MeanPeak, Missing, Sample, TelemetrySummary};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Readings kept per job: 17 minutes at 4 Hz. Older ones are dropped, so memory is bounded
/// whatever the job's length; a run that outlasts the ring is summarised over its last part.
pub const RING_CAPACITY: usize = 4096;
/// How long `summary` waits for its own reading (a probe read is milliseconds; this only
/// guards against a wedged probe).
const FRESH_READING_TIMEOUT: Duration = Duration::from_secs(2);
/// `repeat_index` none, in the atomic.
const NO_REPEAT: u64 = u64::MAX;

/// The machine's telemetry sources, one per agent.
pub struct Telemetry {
    enabled: bool,
    interval: Duration,
    ring_capacity: usize,
    sources: BTreeMap<String, String>,
    missing: Vec<Missing>,
    /// Held by the running session's thread for the whole job: probes are `Send`, not `Sync`,
    /// and jobs run one at a time.
    probes: Arc<Mutex<Vec<Box<dyn Probe>>>>,
}

impl Telemetry {
    /// Builds the real probes ([`probes::build`]) once; none when telemetry is disabled.
    pub fn new(cfg: &TelemetryConfig) -> Self {
        let (probes, missing) = if cfg.enabled {
            probes::build(cfg)
        } else {
            (Vec::new(), Vec::new())
        };
        Self::with_probes(cfg, probes, missing)
    }

    /// With the given probes (tests, benches).
    pub fn with_probes(
        cfg: &TelemetryConfig,
        probes: Vec<Box<dyn Probe>>,
        missing: Vec<Missing>,
    ) -> Self {
        let mut probes = probes;
        // Nothing samples between jobs (a probe that had to start something to prove it
        // works stops it here; each session resumes it).
        for p in &mut probes {
            p.pause();
        }
        let sources = probes
            .iter()
            .flat_map(|p| p.sources())
            .map(|(group, source)| (group.to_string(), source))
            .collect();
        Self {
            enabled: cfg.enabled,
            interval: cfg.interval.max(Duration::from_millis(1)),
            ring_capacity: RING_CAPACITY,
            sources,
            missing,
            probes: Arc::new(Mutex::new(probes)),
        }
    }

    /// Which source gives each group of numbers (`cpu` -> `sysinfo`, `cpu_power` -> `rapl`).
    pub fn sources(&self) -> BTreeMap<String, String> {
        self.sources.clone()
    }

    /// The sources that could not be read, with why.
    pub fn missing(&self) -> Vec<Missing> {
        self.missing.clone()
    }

    /// Starts sampling for one job (None when disabled). Every sample goes to `sink`, called on
    /// the sampler thread; the sink must not block. One session at a time: a second one waits
    /// for the first to stop before it reads.
    pub fn start(&self, sink: Box<dyn FnMut(Sample) + Send>) -> Option<Session> {
        if !self.enabled {
            return None;
        }
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                seen: Seen::default(),
            }),
            repeat: AtomicU64::new(NO_REPEAT),
        });
        let (control, rx) = mpsc::channel();
        let sampler = Sampler {
            interval: self.interval,
            ring_capacity: self.ring_capacity,
            sources: self.sources.clone(),
            shared: Arc::clone(&shared),
            sink,
            acc: Accounting {
                min_power_span: self.interval / 2,
                ..Accounting::default()
            },
            seen: Seen::default(),
            spare: None,
            start: Instant::now(),
        };
        let probes = Arc::clone(&self.probes);
        let thread = std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || {
                let mut probes = probes.lock().unwrap_or_else(PoisonError::into_inner);
                for p in probes.iter_mut() {
                    p.resume();
                }
                sampler.run(&mut probes, &rx);
                for p in probes.iter_mut() {
                    p.pause();
                }
            });
        match thread {
            Ok(thread) => Some(Session {
                shared,
                control,
                thread: Some(thread),
                sources: self.sources.clone(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the telemetry thread; no telemetry for this job");
                None
            }
        }
    }
}

/// One job's sampling. Stops (and joins its thread) on [`Session::stop`] or drop.
pub struct Session {
    shared: Arc<Shared>,
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    sources: BTreeMap<String, String>,
}

impl Session {
    /// Which run the next samples belong to (None between runs).
    pub fn set_repeat(&self, index: Option<u32>) {
        let v = index.map_or(NO_REPEAT, u64::from);
        self.shared.repeat.store(v, Ordering::Relaxed);
    }

    /// One run: means and peaks over the readings taken within `run` (start, end), energy over
    /// `decode` (first to last content chunk) for `decode_tokens` tokens generated in it.
    pub fn summary(
        &self,
        run: (Instant, Instant),
        decode: Option<(Instant, Instant)>,
        decode_tokens: u64,
    ) -> TelemetrySummary {
        let end = decode.map_or(run.1, |d| d.1.max(run.1));
        let newest = self.shared.ring().entries.back().map(|e| e.reading.at);
        if newest.is_none_or(|at| at < end) {
            self.fresh_reading();
        }
        let ring = self.shared.ring();
        let entries = &ring.entries;
        let lo = entries.partition_point(|e| e.reading.at < run.0);
        let hi = entries.partition_point(|e| e.reading.at <= run.1);
        let window = || entries.range(lo..hi.max(lo));
        let mut s = TelemetrySummary {
            samples: u32::try_from(hi.saturating_sub(lo)).unwrap_or(u32::MAX),
            cpu_pct: MeanPeak::of(window().filter_map(|e| e.reading.cpu_pct)),
            mem_used_bytes: MeanPeak::of(
                window().filter_map(|e| e.reading.mem_used_bytes.map(|b| b as f64)),
            ),
            gpu_util_pct: MeanPeak::of(window().filter_map(|e| {
                e.reading
                    .gpus
                    .iter()
                    .filter_map(|g| g.sample.util_pct)
                    .reduce(f64::max)
            })),
            gpu_mem_used_bytes: MeanPeak::of(window().filter_map(|e| {
                e.reading
                    .gpus
                    .iter()
                    .filter_map(|g| g.sample.mem_used_bytes)
                    .reduce(|a, b| a + b)
                    .map(|b| b as f64)
            })),
            gpu_temp_c: MeanPeak::of(window().filter_map(|e| {
                e.reading
                    .gpus
                    .iter()
                    .filter_map(|g| g.sample.temp_c)
                    .reduce(f64::max)
            })),
            power_w: MeanPeak::of(window().filter_map(|e| e.power_w)),
            decode_window_ms: decode
                .map(|(a, b)| b.saturating_duration_since(a).as_secs_f64() * 1e3),
            power_source: ring.seen.power_source(&self.sources),
            ..TelemetrySummary::default()
        };
        if s.power_source.is_some() {
            s.energy_j =
                decode.and_then(|(a, b)| Some(energy_at(entries, b)? - energy_at(entries, a)?));
            if let Some(j) = s.energy_j.filter(|_| decode_tokens > 0) {
                let tokens = decode_tokens as f64;
                s.joules_per_token = Some(j / tokens);
                s.tokens_per_joule = (j > 0.0).then(|| tokens / j);
            }
        }
        s
    }

    /// Stops sampling and joins the thread (what dropping the session does).
    pub fn stop(self) {
        drop(self);
    }

    /// Asks the thread for a reading now and waits for it to be in the ring.
    fn fresh_reading(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.control.send(Control::ReadNow(tx)).is_ok() {
            // A dead thread drops the sender: Err either way means "no fresh reading".
            let _ = rx.recv_timeout(FRESH_READING_TIMEOUT);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the telemetry thread panicked");
            }
        }
    }
}

/// E(t): the cumulative energy interpolated between the readings either side of `t`; None when
/// `t` is outside the kept readings that carry energy.
fn energy_at(entries: &VecDeque<Entry>, t: Instant) -> Option<f64> {
    let i = entries.partition_point(|e| e.reading.at <= t);
    let before = entries
        .range(..i)
        .rev()
        .find_map(|e| Some((e.reading.at, e.energy_j?)))?;
    if before.0 == t {
        return Some(before.1);
    }
    let after = entries
        .range(i..)
        .find_map(|e| Some((e.reading.at, e.energy_j?)))?;
    let span = after.0.duration_since(before.0).as_secs_f64();
    if span <= 0.0 {
        return Some(before.1);
    }
    let f = t.duration_since(before.0).as_secs_f64() / span;
    Some(before.1 + (after.1 - before.1) * f)
}

enum Control {
    Stop,
    /// Take a reading now; answer once it is in the ring.
    ReadNow(SyncSender<()>),
}

struct Shared {
    ring: Mutex<Ring>,
    repeat: AtomicU64,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Ring {
    entries: VecDeque<Entry>,
    seen: Seen,
}

/// One reading and what the sampler derived from it.
struct Entry {
    reading: Reading,
    /// Every power source together at this reading.
    power_w: Option<f64>,
    /// Joules since the first reading with power, all sources together; None before it and at
    /// readings that carried no power number.
    energy_j: Option<f64>,
}

/// Which kinds of power source the job's readings carried.
#[derive(Default, Clone, Copy)]
struct Seen {
    cpu: bool,
    gpu: bool,
    combined: bool,
}

impl Seen {
    fn power_source(self, sources: &BTreeMap<String, String>) -> Option<String> {
        let name = |groups: &[&str], fallback: &str| {
            groups
                .iter()
                .find_map(|g| sources.get(*g))
                .map_or_else(|| fallback.to_string(), Clone::clone)
        };
        if self.combined {
            // Apple's combined figure already holds the CPU and GPU parts.
            return Some(name(&["power"], "power"));
        }
        let mut parts: Vec<String> = Vec::new();
        if self.cpu {
            parts.push(name(&["cpu_power"], "cpu_power"));
        }
        if self.gpu {
            let gpu = name(&["gpu_power", "gpu"], "gpu_power");
            if !parts.contains(&gpu) {
                parts.push(gpu);
            }
        }
        (!parts.is_empty()).then(|| parts.join("+"))
    }
}

/// Per-source state for the running energy total.
#[derive(Default)]
struct Accounting {
    /// The shortest span a counter's power is taken over (half the sampling interval).
    min_power_span: Duration,
    cpu_counter: Counter,
    cpu_power: Option<(Instant, f64)>,
    combined: Option<(Instant, f64)>,
    gpus: Vec<GpuAccounting>,
    total_j: Option<f64>,
}

struct GpuAccounting {
    index: u32,
    counter: Counter,
    power: Option<(Instant, f64)>,
}

/// What one reading adds.
struct Derived {
    cpu_power_w: Option<f64>,
    power_w: Option<f64>,
    energy_j: Option<f64>,
}

impl Accounting {
    fn add(&mut self, r: &Reading, seen: &mut Seen) -> Derived {
        let t = r.at;
        let mut parts_j = 0.0;
        let mut parts_w = 0.0;
        let mut parts_w_known = true;
        let mut any_part = false;

        let cpu_power_w = if let Some(e) = r.cpu_energy_j {
            seen.cpu = true;
            any_part = true;
            let d = self.cpu_counter.step(t, e, self.min_power_span);
            parts_j += d.map_or(0.0, |d| d.0);
            r.cpu_power_w.or(d.map(|d| d.1))
        } else if let Some(p) = r.cpu_power_w {
            seen.cpu = true;
            any_part = true;
            parts_j += trapezoid_step(&mut self.cpu_power, t, p);
            Some(p)
        } else {
            None
        };
        if any_part {
            match cpu_power_w {
                Some(p) => parts_w += p,
                None => parts_w_known = false,
            }
        }

        for g in &r.gpus {
            let i = match self.gpus.iter().position(|a| a.index == g.sample.index) {
                Some(i) => i,
                None => {
                    self.gpus.push(GpuAccounting {
                        index: g.sample.index,
                        counter: Counter::default(),
                        power: None,
                    });
                    self.gpus.len() - 1
                }
            };
            let acc = &mut self.gpus[i];
            let power = if let Some(e) = g.energy_j {
                let d = acc.counter.step(t, e, self.min_power_span);
                parts_j += d.map_or(0.0, |d| d.0);
                g.sample.power_w.or(d.map(|d| d.1))
            } else if let Some(p) = g.sample.power_w {
                parts_j += trapezoid_step(&mut acc.power, t, p);
                Some(p)
            } else {
                continue;
            };
            seen.gpu = true;
            any_part = true;
            match power {
                Some(p) => parts_w += p,
                None => parts_w_known = false,
            }
        }

        let (step_j, power_w, carried) = if let Some(p) = r.combined_power_w {
            seen.combined = true;
            let step = if self.combined.is_some() {
                trapezoid_step(&mut self.combined, t, p)
            } else {
                self.combined = Some((t, p));
                parts_j
            };
            (step, Some(p), true)
        } else {
            let w = (any_part && parts_w_known).then_some(parts_w);
            (parts_j, w, any_part)
        };
        if carried {
            self.total_j = Some(self.total_j.unwrap_or(0.0) + step_j);
        }
        Derived {
            cpu_power_w,
            power_w,
            energy_j: if carried { self.total_j } else { None },
        }
    }
}

/// A cumulative energy counter (RAPL, NVML) as read so far.
#[derive(Default)]
struct Counter {
    /// The previous reading: each step's joules are counted from it.
    last: Option<(Instant, f64)>,
    /// The reading the latest power figure was taken from, and the one before it.
    anchor: Option<(Instant, f64)>,
    before: Option<(Instant, f64)>,
}

impl Counter {
    /// (joules since the previous reading, watts); None at the first reading. The watts are
    /// taken over at least `min_span` where two readings allow it: a counter moves in steps
    /// (RAPL's about every millisecond, NVML's coarser), so a reading right after another (the
    /// fresh one a summary asks for, then the next scheduled one) would divide one step by a
    /// fraction of a millisecond (a 25 W counter read as 168 W). Such a reading's watts are
    /// taken from the power reading before the latest, and it moves no anchor.
    fn step(&mut self, t: Instant, e: f64, min_span: Duration) -> Option<(f64, f64)> {
        let prev = self.last.replace((t, e))?;
        // A counter never runs backwards (the probe undoes wrap-around); a reset counts as
        // nothing, and later watts are taken from it, not from readings before it.
        if e < prev.1 {
            (self.anchor, self.before) = (Some((t, e)), None);
            return Some((0.0, 0.0));
        }
        let j = e - prev.1;
        let anchor = self.anchor.unwrap_or(prev);
        let long = t.saturating_duration_since(anchor.0) >= min_span;
        let base = match self.before {
            Some(before) if !long => before,
            _ => anchor,
        };
        if long || self.anchor.is_none() {
            self.before = Some(anchor);
            self.anchor = Some((t, e));
        }
        let dt = t.saturating_duration_since(base.0).as_secs_f64();
        let w = if dt > 0.0 {
            (e - base.1).max(0.0) / dt
        } else {
            0.0
        };
        Some((j, w))
    }
}

/// Power integrated since its previous value, trapezoid rule; 0 at the first.
fn trapezoid_step(last: &mut Option<(Instant, f64)>, t: Instant, p: f64) -> f64 {
    match last.replace((t, p)) {
        Some((t0, p0)) => (p0 + p) / 2.0 * t.saturating_duration_since(t0).as_secs_f64(),
        None => 0.0,
    }
}

/// The thread's state.
struct Sampler {
    interval: Duration,
    ring_capacity: usize,
    sources: BTreeMap<String, String>,
    shared: Arc<Shared>,
    sink: Box<dyn FnMut(Sample) + Send>,
    acc: Accounting,
    seen: Seen,
    /// The reading dropped from a full ring, reused so a long job allocates no readings.
    spare: Option<Reading>,
    start: Instant,
}

impl Sampler {
    fn run(mut self, probes: &mut [Box<dyn Probe>], control: &Receiver<Control>) {
        self.start = Instant::now();
        let mut deadline = self.start;
        loop {
            self.read(probes);
            // A fixed schedule: the next deadline is the previous one plus the interval, so
            // the time spent reading never accumulates as drift. Ticks missed by a slow read
            // are skipped rather than taken in a burst.
            deadline += self.interval;
            let now = Instant::now();
            if deadline < now {
                let behind = now.duration_since(deadline).as_nanos() / self.interval.as_nanos();
                deadline += self.interval * (u32::try_from(behind).unwrap_or(u32::MAX - 1) + 1);
            }
            loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                match control.recv_timeout(wait) {
                    Ok(Control::ReadNow(reply)) => {
                        self.read(probes);
                        let _ = reply.try_send(());
                    }
                    Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
        }
    }

    /// Reads every probe once, sends the sample, keeps the reading.
    fn read(&mut self, probes: &mut [Box<dyn Probe>]) {
        let now = Instant::now();
        let mut r = match self.spare.take() {
            Some(mut r) => {
                r.reset(now);
                r
            }
            None => Reading::new(now),
        };
        for p in probes.iter_mut() {
            p.read(&mut r);
        }
        let d = self.acc.add(&r, &mut self.seen);
        let repeat = self.shared.repeat.load(Ordering::Relaxed);
        let sample = Sample {
            repeat_index: u32::try_from(repeat).ok(),
            t_ms: r.at.saturating_duration_since(self.start).as_secs_f64() * 1e3,
            cpu_pct: r.cpu_pct,
            mem_used_bytes: r.mem_used_bytes,
            cpu_power_w: d.cpu_power_w,
            power_w: d.power_w,
            gpus: r.gpus.iter().map(|g| g.sample.clone()).collect(),
            sources: self.sources.clone(),
        };
        {
            let mut ring = self.shared.ring();
            ring.seen = self.seen;
            if ring.entries.len() >= self.ring_capacity {
                self.spare = ring.entries.pop_front().map(|e| e.reading);
            }
            ring.entries.push_back(Entry {
                reading: r,
                power_w: d.power_w,
                energy_j: d.energy_j,
            });
        }
        (self.sink)(sample);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::probe::GpuReading;
    use bench_schemas::GpuSample;

    /// A RAPL-like source: a cumulative counter that is exactly `watts` × time since `t0`.
    struct FakeRapl {
        t0: Instant,
        watts: f64,
    }

    impl Probe for FakeRapl {
        fn sources(&self) -> Vec<(&'static str, String)> {
            vec![("cpu_power", "fake-rapl".into())]
        }
        fn read(&mut self, r: &mut Reading) {
            r.cpu_energy_j = Some(1e6 + self.watts * r.at.duration_since(self.t0).as_secs_f64());
        }
    }

    /// A power-only GPU (no counter) at a constant draw.
    struct FakeGpu {
        watts: f64,
    }

    impl Probe for FakeGpu {
        fn sources(&self) -> Vec<(&'static str, String)> {
            vec![("gpu", "fake-gpu".into())]
        }
        fn read(&mut self, r: &mut Reading) {
            for (index, util) in [(0, 30.0), (1, 70.0)] {
                r.gpus.push(GpuReading {
                    sample: GpuSample {
                        index,
                        util_pct: Some(util),
                        mem_used_bytes: Some(1000),
                        power_w: Some(self.watts / 2.0),
                        temp_c: Some(40.0 + util / 10.0),
                        ..GpuSample::default()
                    },
                    energy_j: None,
                });
            }
        }
    }

    /// CPU and memory only: no power.
    struct FakeCpu {
        n: u32,
    }

    impl Probe for FakeCpu {
        fn sources(&self) -> Vec<(&'static str, String)> {
            vec![("cpu", "fake-sysinfo".into())]
        }
        fn read(&mut self, r: &mut Reading) {
            self.n += 1;
            r.cpu_pct = Some(if self.n.is_multiple_of(2) { 20.0 } else { 10.0 });
            r.mem_used_bytes = Some(4096);
        }
    }

    /// Apple-like: CPU and GPU parts and a combined figure that already holds them; the GPU
    /// also has an NVML-like counter, which must not be added on top of the combined figure.
    struct FakeApple {
        t0: Instant,
    }

    impl Probe for FakeApple {
        fn sources(&self) -> Vec<(&'static str, String)> {
            let n = "fake-macmon".to_string();
            vec![("power", n.clone()), ("cpu_power", n.clone()), ("gpu", n)]
        }
        fn read(&mut self, r: &mut Reading) {
            r.cpu_power_w = Some(10.0);
            r.combined_power_w = Some(16.0);
            r.gpus.push(GpuReading {
                sample: GpuSample {
                    index: 0,
                    power_w: Some(5.0),
                    ..GpuSample::default()
                },
                energy_j: Some(5.0 * r.at.duration_since(self.t0).as_secs_f64()),
            });
        }
    }

    fn cfg(interval_ms: u64) -> TelemetryConfig {
        TelemetryConfig {
            interval: Duration::from_millis(interval_ms),
            ..TelemetryConfig::default()
        }
    }

    /// A session whose samples arrive on the returned channel.
    fn start(t: &Telemetry) -> (Session, Receiver<Sample>) {
        let (tx, rx) = mpsc::channel();
        let session = t
            .start(Box::new(move |s| {
                let _ = tx.send(s);
            }))
            .expect("enabled");
        (session, rx)
    }

    fn next(rx: &Receiver<Sample>) -> Sample {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a sample within 10 s")
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn energy_over_a_window_is_watts_times_time() {
        let t0 = Instant::now();
        let t = Telemetry::with_probes(
            &cfg(20),
            vec![
                Box::new(FakeRapl { t0, watts: 20.0 }),
                Box::new(FakeGpu { watts: 50.0 }),
            ],
            Vec::new(),
        );
        assert_eq!(t.sources()["cpu_power"], "fake-rapl");
        let (session, rx) = start(&t);
        session.set_repeat(Some(3));
        let first = next(&rx);
        assert_eq!(first.repeat_index, Some(3));
        // Taken at t=0: the counter's baseline, no CPU power yet, so no total either.
        assert_eq!((first.cpu_power_w, first.power_w), (None, None));
        let run_start = Instant::now();
        let mut samples = Vec::new();
        while samples.len() < 15 {
            samples.push(next(&rx));
        }
        let s = &samples[samples.len() - 1];
        assert!(close(s.cpu_power_w.unwrap(), 20.0, 0.01), "{s:?}");
        assert!(close(s.power_w.unwrap(), 70.0, 0.01), "{s:?}");
        assert_eq!(s.sources["gpu"], "fake-gpu");
        assert_eq!(s.gpus.len(), 2);

        // A decode window that starts and ends between readings.
        let decode_start = run_start + Duration::from_millis(35);
        let decode_end = Instant::now() - Duration::from_millis(7);
        let run = (run_start, Instant::now());
        let summary = session.summary(run, Some((decode_start, decode_end)), 100);
        let secs = (decode_end - decode_start).as_secs_f64();
        let j = summary.energy_j.expect("energy");
        assert!(close(j, 70.0 * secs, 0.01), "{j} J over {secs} s");
        assert!(close(summary.joules_per_token.unwrap(), j / 100.0, 1e-9));
        assert!(close(summary.tokens_per_joule.unwrap(), 100.0 / j, 1e-9));
        assert!(close(summary.decode_window_ms.unwrap(), secs * 1e3, 1e-9));
        assert_eq!(summary.power_source.as_deref(), Some("fake-rapl+fake-gpu"));
        let power = summary.power_w.unwrap();
        assert!(close(power.mean, 70.0, 0.01) && close(power.peak, 70.0, 0.01));
        assert!(summary.samples >= 14, "{summary:?}");
        assert_eq!(summary.gpu_util_pct.unwrap().peak, 70.0, "busiest GPU");
        assert_eq!(
            summary.gpu_mem_used_bytes.unwrap().mean,
            2000.0,
            "sum of GPUs"
        );
        assert_eq!(summary.gpu_temp_c.unwrap().peak, 47.0, "hottest GPU");

        // No tokens: energy, but nothing per token.
        let none = session.summary(run, Some((decode_start, decode_end)), 0);
        assert!(none.energy_j.is_some());
        assert_eq!((none.joules_per_token, none.tokens_per_joule), (None, None));
        session.stop();
    }

    #[test]
    fn a_window_shorter_than_the_interval_is_bracketed_by_a_fresh_reading() {
        let t0 = Instant::now();
        // 10 s between samples: only the reading at t=0 exists when the window closes.
        let t = Telemetry::with_probes(
            &cfg(10_000),
            vec![Box::new(FakeRapl { t0, watts: 20.0 })],
            Vec::new(),
        );
        let (session, rx) = start(&t);
        next(&rx);
        let a = Instant::now();
        // Makes the window (not synchronisation): 30 ms of decode.
        std::thread::sleep(Duration::from_millis(30));
        let b = Instant::now();
        let s = session.summary((a, b), Some((a, b)), 3);
        let secs = (b - a).as_secs_f64();
        let j = s.energy_j.expect("bracketed by the reading summary took");
        assert!(close(j, 20.0 * secs, 0.01), "{j} J over {secs} s");
        assert_eq!(s.power_source.as_deref(), Some("fake-rapl"));
        // The fresh reading went to the sink too, well before the next scheduled one.
        let fresh = next(&rx);
        assert!(fresh.t_ms < 5_000.0, "{fresh:?}");
        assert!(close(fresh.cpu_power_w.unwrap(), 20.0, 0.01), "{fresh:?}");
    }

    #[test]
    fn a_window_older_than_the_ring_has_no_energy() {
        let mut t =
            Telemetry::with_probes(&cfg(5), vec![Box::new(FakeGpu { watts: 50.0 })], Vec::new());
        t.ring_capacity = 8;
        let before = Instant::now();
        let (session, rx) = start(&t);
        let first = next(&rx);
        assert!(first.t_ms < 1.0, "{first:?}");
        // Between the first readings: bracketed while they were kept.
        let early = (
            before + Duration::from_millis(10),
            before + Duration::from_millis(20),
        );
        for _ in 0..20 {
            next(&rx);
        }
        let late_a = Instant::now();
        next(&rx);
        next(&rx);
        let late_b = Instant::now();
        let s = session.summary((before, late_b), Some(early), 10);
        assert_eq!(s.energy_j, None, "the window's readings were dropped");
        assert_eq!(s.joules_per_token, None);
        assert_eq!(s.power_source.as_deref(), Some("fake-gpu"), "power exists");
        assert!(s.samples <= 9, "bounded ring: {}", s.samples);
        let s = session.summary((late_a, late_b), Some((late_a, late_b)), 10);
        let secs = (late_b - late_a).as_secs_f64();
        assert!(close(s.energy_j.unwrap(), 50.0 * secs, 0.01), "{s:?}");
    }

    #[test]
    fn a_counter_read_right_after_a_reading_gives_power_over_a_longer_span() {
        // A 25 W counter that moves in 2 ms steps of 50 mJ, read every 100 ms, and once 0.3 ms
        // after a scheduled reading, just as a step lands.
        let min = Duration::from_millis(50);
        let t0 = Instant::now();
        let at = |ms: f64| t0 + Duration::from_secs_f64(ms / 1e3);
        let mut c = Counter::default();
        assert_eq!(c.step(at(0.0), 0.0, min), None);
        let (j, w) = c.step(at(100.0), 2.5, min).unwrap();
        assert!(close(j, 2.5, 1e-9) && close(w, 25.0, 1e-9), "{j} J, {w} W");
        // One step over 0.3 ms would read as 166.7 W; over the span from 0 ms it is 25.4 W.
        let (j, w) = c.step(at(100.3), 2.55, min).unwrap();
        assert!(close(j, 0.05, 1e-9), "{j} J");
        assert!(close(w, 2.55 / 0.1003, 1e-9), "{w} W");
        // The next scheduled reading takes its power from 100 ms, where the anchor stayed.
        let (j, w) = c.step(at(200.0), 5.0, min).unwrap();
        assert!(close(j, 2.45, 1e-9) && close(w, 25.0, 1e-9), "{j} J, {w} W");
        // Joules are still counted from each previous reading: 2.5 + 0.05 + 2.45.
        let (j, w) = c.step(at(200.4), 5.05, min).unwrap();
        assert!(close(j, 0.05, 1e-9), "{j} J");
        assert!(close(w, 2.55 / 0.1004, 1e-9), "{w} W");
        // A reset counts as nothing, not as negative power, even at a reading right after
        // another; the next scheduled reading takes its watts from the reset.
        let (j, w) = c.step(at(200.6), 0.1, min).unwrap();
        assert_eq!((j, w), (0.0, 0.0));
        let (j, w) = c.step(at(300.0), 2.585, min).unwrap();
        assert!(
            close(j, 2.485, 1e-9) && close(w, 2.485 / 0.0994, 1e-9),
            "{j} J, {w} W"
        );
    }

    #[test]
    fn samples_keep_a_fixed_schedule() {
        let t = Telemetry::with_probes(&cfg(20), vec![Box::new(FakeCpu { n: 0 })], Vec::new());
        let began = Instant::now();
        let (session, rx) = start(&t);
        let samples: Vec<Sample> = (0..50).map(|_| next(&rx)).collect();
        let took = began.elapsed();
        // 49 intervals after the first sample at t=0: 980 ms on an idle machine.
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(2000)).contains(&took),
            "{took:?}"
        );
        for (k, s) in samples.iter().enumerate() {
            // Never early: each sample is at or after its deadline k × 20 ms.
            assert!(
                s.t_ms >= k as f64 * 20.0 - 0.5,
                "sample {k} at {} ms",
                s.t_ms
            );
        }
        // Lateness does not accumulate (a sleep of 20 ms after each read would drift).
        let last = samples[49].t_ms;
        assert!(last < 980.0 + 200.0, "sample 49 at {last} ms");
        session.stop();
    }

    #[test]
    fn a_combined_figure_is_not_added_to_its_parts() {
        let t0 = Instant::now();
        let t = Telemetry::with_probes(&cfg(20), vec![Box::new(FakeApple { t0 })], Vec::new());
        let (session, rx) = start(&t);
        next(&rx);
        let a = Instant::now();
        let samples: Vec<Sample> = (0..5).map(|_| next(&rx)).collect();
        let b = Instant::now();
        assert!(
            samples.iter().all(|s| s.power_w == Some(16.0)),
            "{samples:?}"
        );
        assert!(samples.iter().all(|s| s.cpu_power_w == Some(10.0)));
        let s = session.summary((a, b), Some((a, b)), 1);
        let secs = (b - a).as_secs_f64();
        assert!(
            close(s.energy_j.unwrap(), 16.0 * secs, 0.01),
            "{s:?} over {secs} s"
        );
        assert_eq!(s.power_source.as_deref(), Some("fake-macmon"));
    }

    /// Counts the session hooks; reads only while resumed.
    struct FakeChild {
        running: Arc<std::sync::atomic::AtomicBool>,
        reads_while_paused: Arc<std::sync::atomic::AtomicU32>,
    }

    impl Probe for FakeChild {
        fn sources(&self) -> Vec<(&'static str, String)> {
            vec![("power", "fake-child".into())]
        }
        fn read(&mut self, _r: &mut Reading) {
            if !self.running.load(Ordering::SeqCst) {
                self.reads_while_paused.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn resume(&mut self) {
            self.running.store(true, Ordering::SeqCst);
        }
        fn pause(&mut self) {
            self.running.store(false, Ordering::SeqCst);
        }
    }

    #[test]
    fn probes_run_only_while_a_job_is_sampled() {
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let paused_reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let probe = FakeChild {
            running: running.clone(),
            reads_while_paused: paused_reads.clone(),
        };
        let t = Telemetry::with_probes(&cfg(20), vec![Box::new(probe)], Vec::new());
        assert!(!running.load(Ordering::SeqCst), "paused once built");
        let (session, rx) = start(&t);
        next(&rx);
        assert!(running.load(Ordering::SeqCst), "resumed for the job");
        session.stop();
        assert!(!running.load(Ordering::SeqCst), "paused when the job ends");
        assert_eq!(paused_reads.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn stop_is_prompt() {
        let t = Telemetry::with_probes(&cfg(10_000), vec![Box::new(FakeCpu { n: 0 })], Vec::new());
        let (session, rx) = start(&t);
        next(&rx);
        let asked = Instant::now();
        session.stop();
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        // The probes are free for the next job.
        let (session, rx) = start(&t);
        next(&rx);
        drop(session);
    }

    #[test]
    fn without_power_there_is_no_energy() {
        let t = Telemetry::with_probes(
            &cfg(10),
            vec![Box::new(FakeCpu { n: 0 })],
            vec![Missing {
                source: "rapl".into(),
                reason: "none".into(),
            }],
        );
        assert_eq!(t.missing().len(), 1);
        let a = Instant::now();
        let (session, rx) = start(&t);
        for _ in 0..6 {
            let s = next(&rx);
            assert_eq!((s.power_w, s.cpu_power_w), (None, None));
            assert_eq!(s.sources["cpu"], "fake-sysinfo");
        }
        let b = Instant::now();
        let s = session.summary((a, b), Some((a, b)), 10);
        assert_eq!(
            (
                s.energy_j,
                s.joules_per_token,
                s.tokens_per_joule,
                s.power_source.as_deref()
            ),
            (None, None, None, None)
        );
        assert_eq!(s.power_w, None);
        assert!(s.samples >= 6, "{s:?}");
        let cpu = s.cpu_pct.unwrap();
        assert!(
            (10.0..=20.0).contains(&cpu.mean) && cpu.peak == 20.0,
            "{cpu:?}"
        );
        assert_eq!(s.mem_used_bytes.unwrap().peak, 4096.0);
    }

    #[test]
    fn disabled_starts_nothing() {
        let cfg = TelemetryConfig {
            enabled: false,
            ..TelemetryConfig::default()
        };
        let t = Telemetry::new(&cfg);
        assert!(t.start(Box::new(|_| {})).is_none());
        assert!(t.sources().is_empty());
    }
}
