//! Live progress per machine: indicatif bars (runs done, live tokens/s) when stderr is a
//! terminal, plain lines otherwise. Everything goes to stderr: stdout holds only the results.

use bench_schemas::event::EventKind;
use bench_schemas::{Event, Job, Repeat};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;

struct Machine {
    bar: Option<ProgressBar>,
    done: u64,
    total: u64,
    /// Tokens streamed in the current run and the last chunk's time (ms since its request).
    tokens: u64,
    t_ms: f64,
    cell: Option<String>,
    last_rate: Option<f64>,
    finished: bool,
}

/// The progress display.
pub struct View {
    multi: Option<MultiProgress>,
    machines: BTreeMap<String, Machine>,
    expected: u64,
}

/// Runs each machine is expected to make (a guess the bar grows past when it is short).
fn expected_runs(job: &Job) -> u64 {
    job.cells()
        .iter()
        .map(|c| {
            let j = &c.job;
            let measured = match j.repeat {
                Repeat::Count(n) => n as u64,
                Repeat::Auto => j.max_repeat() as u64,
            };
            let measured = if j.is_load() {
                j.concurrency.unwrap_or(1) as u64 * j.requests.map(u64::from).unwrap_or(measured)
            } else {
                measured
            };
            measured + j.warmup as u64
        })
        .sum::<u64>()
        .max(1)
}

impl View {
    /// Bars when stderr is a terminal (and `NO_COLOR`/`TERM=dumb` do not say otherwise).
    pub fn new(job: Option<Job>) -> Self {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let multi = (std::io::stderr().is_terminal() && !dumb)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            multi,
            machines: BTreeMap::new(),
            expected: job.as_ref().map(expected_runs).unwrap_or(1),
        }
    }

    fn machine(&mut self, id: &str) -> &mut Machine {
        if !self.machines.contains_key(id) {
            let bar = self.multi.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(self.expected));
                b.set_style(
                    ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b.set_prefix(id.to_string());
                b
            });
            self.machines.insert(
                id.to_string(),
                Machine {
                    bar,
                    done: 0,
                    total: self.expected,
                    tokens: 0,
                    t_ms: 0.0,
                    cell: None,
                    last_rate: None,
                    finished: false,
                },
            );
        }
        self.machines.get_mut(id).expect("inserted")
    }

    fn line(&self, s: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    /// Shows one event.
    pub fn on_event(&mut self, ev: &Event) {
        let id = ev.machine_id.clone();
        let bars = self.multi.is_some();
        let m = self.machine(&id);
        let mut say: Option<String> = None;
        match &ev.kind {
            EventKind::JobAccepted(a) => {
                say = Some(format!("{id}: queued ({} ahead)", a.position));
            }
            EventKind::JobStarted(s) => {
                m.tokens = 0;
                m.t_ms = 0.0;
                m.cell = s.cell.clone().filter(|c| !c.is_empty());
                if let Some(b) = &m.bar {
                    let what = if s.warmup { "warmup" } else { "run" };
                    b.set_message(format!(
                        "{what} {}{}",
                        s.repeat_index + 1,
                        m.cell
                            .as_ref()
                            .map(|c| format!(" [{c}]"))
                            .unwrap_or_default()
                    ));
                }
            }
            EventKind::LlmToken(t) => {
                m.tokens += t.tokens.unwrap_or(1);
                m.t_ms = t.t_ms;
                if let Some(b) = &m.bar {
                    if m.t_ms > 0.0 {
                        b.set_message(format!(
                            "{:.1} tok/s{}",
                            m.tokens as f64 * 1000.0 / m.t_ms,
                            m.cell
                                .as_ref()
                                .map(|c| format!(" [{c}]"))
                                .unwrap_or_default()
                        ));
                    }
                }
            }
            EventKind::RepeatDone(r) => {
                m.done += 1;
                if m.done > m.total {
                    m.total = m.done;
                }
                m.last_rate = r.gen_tokens_per_s;
                let rate = r
                    .gen_tokens_per_s
                    .map(|x| format!("{x:.1} tok/s"))
                    .unwrap_or_else(|| "no decode rate".into());
                let ttft = if r.ttft_ms.is_finite() {
                    format!(", ttft {:.0} ms", r.ttft_ms)
                } else {
                    String::new()
                };
                let kind = if r.warmup {
                    " (warmup)"
                } else if r.cold {
                    " (cold)"
                } else {
                    ""
                };
                let cell = r
                    .cell
                    .as_ref()
                    .filter(|c| !c.is_empty())
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                match &m.bar {
                    Some(b) => {
                        b.set_length(m.total);
                        b.set_position(m.done);
                        b.set_message(format!("{rate}{ttft}{cell}"));
                    }
                    None => {
                        say = Some(format!(
                            "{id}: run {}/{}{kind} done: {rate}{ttft}{cell}",
                            m.done, m.total
                        ))
                    }
                }
            }
            EventKind::CellDone(c) => {
                let how = match &c.error {
                    Some(e) => format!("failed: {}: {}", e.code, e.message),
                    None => "done".into(),
                };
                say = Some(format!("{id}: cell {} {how}", c.cell));
            }
            EventKind::JobDone(d) => {
                m.finished = true;
                let rate = d
                    .gen_tokens_per_s
                    .map(|x| format!(": median {x:.1} tok/s"))
                    .unwrap_or_default();
                match &m.bar {
                    Some(b) => {
                        b.set_length(m.done.max(1));
                        b.finish_with_message(format!("done{rate}"));
                    }
                    None => say = Some(format!("{id}: done{rate}")),
                }
            }
            EventKind::JobError(f) => {
                m.finished = true;
                let text = format!("failed: {}: {}", f.error.code, f.error.message);
                match &m.bar {
                    Some(b) => b.abandon_with_message(text),
                    None => say = Some(format!("{id}: {text}")),
                }
            }
            EventKind::JobCancelled(c) => {
                m.finished = true;
                let text = format!("cancelled: {}", c.reason);
                match &m.bar {
                    Some(b) => b.abandon_with_message(text),
                    None => say = Some(format!("{id}: {text}")),
                }
            }
            EventKind::Telemetry(_) => {}
        }
        if let Some(s) = say {
            if !bars || matches!(ev.kind, EventKind::CellDone(_) | EventKind::JobAccepted(_)) {
                self.line(s);
            }
        }
    }

    /// Ends every bar still drawn (they stay on screen, the cursor below them).
    pub fn finish(&mut self) {
        for m in self.machines.values() {
            if let Some(b) = &m.bar {
                if !m.finished {
                    b.abandon();
                }
            }
        }
        if self.multi.take().is_some() && !self.machines.is_empty() {
            eprintln!();
        }
    }
}
