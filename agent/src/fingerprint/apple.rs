//! Apple Silicon: parsers for `sysctl`, `system_profiler SPDisplaysDataType -json`, `macmon
//! pipe` and `powermetrics` text (compiled and tested on every OS against recorded samples in
//! `tests/fixtures/recorded/`), and the telemetry [`ApplePowerProbe`], which runs one of the
//! two power tools as a child process for as long as it lives. The tools themselves are only
//! run on macOS.

use crate::telemetry::probe::{GpuReading, Probe, Reading};
use bench_schemas::{Gpu, GpuSample, Missing};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `sysctl -n machdep.cpu.brand_string` (`Apple M4 Max`); None when empty.
pub fn parse_brand_string(out: &str) -> Option<String> {
    let s = out.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// `sysctl -n hw.memsize`: physical memory in bytes.
pub fn parse_memsize(out: &str) -> Option<u64> {
    out.trim().parse().ok()
}

/// What `system_profiler SPDisplaysDataType -json` says about the GPUs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Displays {
    /// The Apple Silicon chip (`Apple M4 Max`), from the Apple GPU's `sppci_model`.
    pub chip: Option<String>,
    /// Every GPU listed.
    pub gpus: Vec<Gpu>,
}

#[derive(Deserialize)]
struct SpDisplays {
    #[serde(rename = "SPDisplaysDataType", default)]
    items: Vec<SpGpu>,
}

#[derive(Deserialize)]
struct SpGpu {
    #[serde(default)]
    sppci_model: Option<String>,
    #[serde(default, rename = "_name")]
    name: Option<String>,
    #[serde(default)]
    sppci_cores: Option<serde_json::Value>,
    #[serde(default)]
    spdisplays_vendor: Option<String>,
}

/// `spdisplays_vendor` (`sppci_vendor_Apple`, `sppci_vendor_amd`, or a plain name) as the
/// fingerprint's vendor (`apple`, `amd`, ...).
fn vendor_of(raw: &str) -> String {
    raw.strip_prefix("sppci_vendor_")
        .unwrap_or(raw)
        .split_whitespace()
        .next()
        .unwrap_or(raw)
        .to_ascii_lowercase()
}

/// Parses `system_profiler SPDisplaysDataType -json`. Apple's unified memory is the machine's
/// memory, so `memory_bytes` is `unified_memory` for Apple GPUs (None otherwise: the JSON
/// has no VRAM figure for them that this parser trusts).
pub fn parse_displays(json: &str, unified_memory: Option<u64>) -> Result<Displays, String> {
    let sp: SpDisplays =
        serde_json::from_str(json).map_err(|e| format!("system_profiler JSON: {e}"))?;
    let mut out = Displays::default();
    for (i, g) in sp.items.into_iter().enumerate() {
        let Some(name) = g.sppci_model.or(g.name) else {
            continue;
        };
        let vendor = g.spdisplays_vendor.as_deref().map(vendor_of);
        let apple = vendor.as_deref() == Some("apple") || name.starts_with("Apple ");
        let cores = match g.sppci_cores {
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        };
        if apple && out.chip.is_none() {
            out.chip = Some(name.clone());
        }
        out.gpus.push(Gpu {
            index: i as u32,
            vendor: if apple {
                "apple".into()
            } else {
                vendor.unwrap_or_default()
            },
            name,
            memory_bytes: if apple { unified_memory } else { None },
            cores,
            source: "system_profiler".into(),
            ..Gpu::default()
        });
    }
    Ok(out)
}

/// The latest power figures from either tool. Watts; GPU busy as %.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PowerValues {
    /// CPU clusters.
    pub cpu_w: Option<f64>,
    /// GPU.
    pub gpu_w: Option<f64>,
    /// Neural Engine.
    pub ane_w: Option<f64>,
    /// CPU + GPU + ANE, as the tool sums it (macmon `all_power`, powermetrics `Combined
    /// Power`).
    pub combined_w: Option<f64>,
    /// GPU busy %, 0-100.
    pub gpu_util_pct: Option<f64>,
    /// GPU clock, MHz.
    pub gpu_mhz: Option<u32>,
    /// GPU temperature, °C (macmon only).
    pub gpu_temp_c: Option<f64>,
}

#[derive(Deserialize)]
struct MacmonLine {
    cpu_power: Option<f64>,
    gpu_power: Option<f64>,
    ane_power: Option<f64>,
    all_power: Option<f64>,
    /// `[MHz, busy ratio 0-1]`.
    gpu_usage: Option<(f64, f64)>,
    temp: Option<MacmonTemp>,
}

#[derive(Deserialize)]
struct MacmonTemp {
    gpu_temp_avg: Option<f64>,
}

/// One line of `macmon pipe` (one JSON object per sample; `gpu_usage` is `[MHz, ratio]`).
pub fn parse_macmon_line(line: &str) -> Option<PowerValues> {
    let m: MacmonLine = serde_json::from_str(line.trim()).ok()?;
    Some(PowerValues {
        cpu_w: m.cpu_power,
        gpu_w: m.gpu_power,
        ane_w: m.ane_power,
        combined_w: m.all_power,
        gpu_util_pct: m.gpu_usage.map(|(_, r)| (r * 100.0).clamp(0.0, 100.0)),
        gpu_mhz: m
            .gpu_usage
            .and_then(|(f, _)| (f.is_finite() && f >= 0.0).then_some(f.round() as u32)),
        gpu_temp_c: m.temp.and_then(|t| t.gpu_temp_avg),
    })
}

/// The number before `unit` after `label:` on a powermetrics line (`CPU Power: 1234 mW`).
fn value_after(line: &str, label: &str, unit: &str) -> Option<f64> {
    let rest = line.trim().strip_prefix(label)?.trim_start();
    let num = rest.strip_suffix(unit).unwrap_or(rest).trim();
    num.parse().ok()
}

/// Folds one line of `powermetrics --samplers cpu_power,gpu_power` text into `v`; true when
/// it completed a sample (the `Combined Power` line, which closes the power block).
pub fn parse_powermetrics_line(line: &str, v: &mut PowerValues) -> bool {
    let mw = |label| value_after(line, label, "mW").map(|x| x / 1e3);
    if let Some(w) = mw("Combined Power (CPU + GPU + ANE):") {
        v.combined_w = Some(w);
        return true;
    }
    if let Some(w) = mw("CPU Power:") {
        v.cpu_w = Some(w);
    } else if let Some(w) = mw("GPU Power:") {
        v.gpu_w = Some(w);
    } else if let Some(w) = mw("ANE Power:") {
        v.ane_w = Some(w);
    } else if let Some(rest) = line.trim().strip_prefix("GPU HW active residency:") {
        v.gpu_util_pct = rest.split('%').next().and_then(|p| p.trim().parse().ok());
    } else if let Some(mhz) = value_after(line, "GPU HW active frequency:", "MHz") {
        v.gpu_mhz = Some(mhz.round() as u32);
    }
    false
}

/// Every complete sample in a powermetrics text stream, in order.
pub fn parse_powermetrics(text: &str) -> Vec<PowerValues> {
    let mut v = PowerValues::default();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("*** Sampled system activity") && v.combined_w.is_some() {
            out.push(v);
            v = PowerValues::default();
        }
        parse_powermetrics_line(line, &mut v);
    }
    if v.combined_w.is_some() {
        out.push(v);
    }
    out
}

/// Which tool an [`ApplePowerProbe`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerTool {
    /// `macmon pipe` (no root needed).
    Macmon,
    /// `powermetrics` (root only).
    Powermetrics,
}

impl PowerTool {
    /// Its name as a telemetry source.
    pub fn name(self) -> &'static str {
        match self {
            PowerTool::Macmon => "macmon",
            PowerTool::Powermetrics => "powermetrics",
        }
    }

    fn command(self, interval: Duration) -> Command {
        let ms = interval.as_millis().max(1).to_string();
        match self {
            PowerTool::Macmon => {
                let mut c = Command::new("macmon");
                c.args(["pipe", "-i", &ms]);
                c
            }
            PowerTool::Powermetrics => {
                let mut c = Command::new("powermetrics");
                // -b 1: line-buffered, so each sample arrives when taken, not per 4 KiB.
                c.args(["--samplers", "cpu_power,gpu_power", "-i", &ms, "-b", "1"]);
                c
            }
        }
    }
}

#[derive(Default)]
struct Latest {
    values: PowerValues,
    at: Option<Instant>,
}

/// Apple power (CPU, GPU, ANE and combined) from `macmon pipe` or `powermetrics`, run as a
/// child while a job is sampled (started once at build to prove it runs, then stopped until a
/// session resumes it). A reader thread parses its output and keeps the latest
/// sample; [`Probe::read`] copies that out (a short lock, nothing blocking under it). Values
/// older than a few intervals (the tool stalled or died) are not reported. The child is
/// killed when the session pauses the probe, and when it is dropped.
pub struct ApplePowerProbe {
    tool: PowerTool,
    interval: Duration,
    /// Runs only while a job is sampled ([`Probe::resume`] .. [`Probe::pause`]).
    child: Option<Child>,
    latest: Arc<Mutex<Latest>>,
    stale_after: Duration,
}

impl ApplePowerProbe {
    /// Starts `tool` sampling every `interval`; the reason when it cannot be started.
    pub fn spawn(tool: PowerTool, interval: Duration) -> Result<Self, Missing> {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let child = Self::start(tool, interval, &latest)?;
        Ok(Self {
            tool,
            interval,
            child: Some(child),
            latest,
            stale_after: (interval * 4).max(Duration::from_secs(2)),
        })
    }

    /// Runs the tool with a reader thread that keeps its latest values in `latest`.
    fn start(
        tool: PowerTool,
        interval: Duration,
        latest: &Arc<Mutex<Latest>>,
    ) -> Result<Child, Missing> {
        let mut child = tool
            .command(interval)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Missing::new(tool.name(), format!("cannot start {}: {e}", tool.name())))?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let shared = Arc::clone(latest);
        let reader = std::thread::Builder::new()
            .name(format!("{}-reader", tool.name()))
            .spawn(move || read_tool(tool, BufReader::new(stdout), &shared));
        if let Err(e) = reader {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Missing::new(
                tool.name(),
                format!("cannot start a reader thread: {e}"),
            ));
        }
        Ok(child)
    }

    /// Whether the tool is running now.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // What it said before is not a reading of the next job.
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).at = None;
    }
}

/// Runs until the tool's stdout closes (it exited or was killed).
fn read_tool(tool: PowerTool, out: impl BufRead, latest: &Mutex<Latest>) {
    let mut acc = PowerValues::default();
    for line in out.lines() {
        let Ok(line) = line else { break };
        let done = match tool {
            PowerTool::Macmon => parse_macmon_line(&line).map(|v| acc = v).is_some(),
            PowerTool::Powermetrics => parse_powermetrics_line(&line, &mut acc),
        };
        if done {
            let mut l = latest.lock().unwrap_or_else(|p| p.into_inner());
            l.values = acc;
            l.at = Some(Instant::now());
        }
    }
}

/// Puts `v` into `r`: CPU power, combined power, and GPU 0 (the Apple GPU).
pub fn apply(v: &PowerValues, r: &mut Reading) {
    r.cpu_power_w = v.cpu_w;
    r.combined_power_w = v.combined_w;
    if v.gpu_w.is_some() || v.gpu_util_pct.is_some() {
        r.gpus.push(GpuReading {
            sample: GpuSample {
                index: 0,
                util_pct: v.gpu_util_pct,
                power_w: v.gpu_w,
                temp_c: v.gpu_temp_c,
                clock_mhz: v.gpu_mhz,
                ..GpuSample::default()
            },
            energy_j: None,
        });
    }
}

impl Probe for ApplePowerProbe {
    fn sources(&self) -> Vec<(&'static str, String)> {
        let n = self.tool.name().to_string();
        vec![("power", n.clone()), ("cpu_power", n.clone()), ("gpu", n)]
    }

    fn read(&mut self, r: &mut Reading) {
        let (values, at) = {
            let l = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            (l.values, l.at)
        };
        if at.is_some_and(|at| r.at.saturating_duration_since(at) <= self.stale_after) {
            apply(&values, r);
        }
    }

    fn resume(&mut self) {
        if self.child.is_none() {
            match Self::start(self.tool, self.interval, &self.latest) {
                Ok(child) => self.child = Some(child),
                Err(m) => {
                    tracing::warn!(source = %m.source, reason = %m.reason, "no Apple power for this job")
                }
            }
        }
    }

    fn pause(&mut self) {
        self.stop_child();
    }
}

impl Drop for ApplePowerProbe {
    fn drop(&mut self) {
        self.stop_child();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISPLAYS: &str =
        include_str!("../../tests/fixtures/recorded/system_profiler_SPDisplaysDataType_m4max.json");
    const MACMON: &str = include_str!("../../tests/fixtures/recorded/macmon_pipe.jsonl");
    const POWERMETRICS: &str = include_str!("../../tests/fixtures/recorded/powermetrics.txt");

    #[test]
    fn sysctl_outputs() {
        let brand =
            include_str!("../../tests/fixtures/recorded/sysctl_machdep.cpu.brand_string.txt");
        assert_eq!(parse_brand_string(brand).as_deref(), Some("Apple M4 Max"));
        assert_eq!(parse_brand_string("\n"), None);
        let mem = include_str!("../../tests/fixtures/recorded/sysctl_hw.memsize.txt");
        assert_eq!(parse_memsize(mem), Some(128 << 30));
        assert_eq!(parse_memsize("x"), None);
    }

    #[test]
    fn system_profiler_m4_max() {
        let d = parse_displays(DISPLAYS, Some(128 << 30)).unwrap();
        assert_eq!(d.chip.as_deref(), Some("Apple M4 Max"));
        assert_eq!(
            d.gpus,
            vec![Gpu {
                index: 0,
                vendor: "apple".into(),
                name: "Apple M4 Max".into(),
                memory_bytes: Some(128 << 30),
                cores: Some(40),
                source: "system_profiler".into(),
                ..Gpu::default()
            }]
        );
        assert!(parse_displays("{", None).is_err());
        assert_eq!(parse_displays("{}", None).unwrap(), Displays::default());
    }

    #[test]
    fn system_profiler_discrete_gpu_is_not_the_chip() {
        let json = r#"{"SPDisplaysDataType":[{"_name":"AMD Radeon Pro 5500M",
            "sppci_model":"AMD Radeon Pro 5500M","spdisplays_vendor":"sppci_vendor_amd",
            "sppci_cores":24}]}"#;
        let d = parse_displays(json, Some(1)).unwrap();
        assert_eq!(d.chip, None);
        assert_eq!(d.gpus[0].vendor, "amd");
        assert_eq!(d.gpus[0].cores, Some(24));
        assert_eq!(d.gpus[0].memory_bytes, None);
    }

    #[test]
    fn macmon_lines() {
        let v: Vec<_> = MACMON.lines().map(parse_macmon_line).collect();
        let a = v[0].unwrap();
        assert_eq!(a.cpu_w, Some(0.20486385));
        assert_eq!(a.gpu_w, Some(0.017451683));
        assert_eq!(a.ane_w, Some(0.0));
        assert_eq!(a.combined_w, Some(0.22231553));
        assert_eq!(a.gpu_mhz, Some(461));
        assert!((a.gpu_util_pct.unwrap() - 2.1497859).abs() < 1e-9);
        assert_eq!(a.gpu_temp_c, Some(36.95167));
        let b = v[1].unwrap();
        assert_eq!((b.cpu_w, b.combined_w), (Some(14.02), Some(14.05)));
        assert!(parse_macmon_line("not json").is_none());
    }

    #[test]
    fn powermetrics_text() {
        let s = parse_powermetrics(POWERMETRICS);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].cpu_w, Some(14.021));
        assert_eq!(s[0].gpu_w, Some(0.031));
        assert_eq!(s[0].combined_w, Some(14.052));
        assert_eq!(s[0].gpu_util_pct, Some(0.96));
        assert_eq!(s[0].gpu_mhz, Some(354));
        assert_eq!(s[1].gpu_w, Some(38.712));
        assert_eq!(s[1].combined_w, Some(40.922));
        assert_eq!(s[1].gpu_util_pct, Some(97.42));
    }

    #[test]
    fn apply_fills_power_and_gpu0() {
        let v = parse_macmon_line(MACMON.lines().nth(1).unwrap()).unwrap();
        let mut r = Reading::new(Instant::now());
        apply(&v, &mut r);
        assert_eq!(r.cpu_power_w, Some(14.02));
        assert_eq!(r.combined_power_w, Some(14.05));
        assert_eq!(r.gpus[0].sample.power_w, Some(0.0306));
        assert_eq!(r.gpus[0].sample.temp_c, Some(73.5));
    }

    #[test]
    fn reader_keeps_the_latest_sample() {
        let latest = Mutex::new(Latest::default());
        read_tool(PowerTool::Powermetrics, POWERMETRICS.as_bytes(), &latest);
        let l = latest.lock().unwrap();
        assert_eq!(l.values.combined_w, Some(40.922));
        assert!(l.at.is_some());
    }

    /// The probe against a stand-in tool: `sh` printing one recorded macmon line then
    /// sleeping, so spawn, reader thread, read and kill-on-drop are exercised for real.
    #[cfg(unix)]
    #[test]
    fn probe_reads_a_child_and_kills_it_on_drop() {
        let line = MACMON.lines().next().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", &format!("echo '{line}'; exec sleep 30")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let latest = Arc::new(Mutex::new(Latest::default()));
        let shared = Arc::clone(&latest);
        std::thread::spawn(move || read_tool(PowerTool::Macmon, BufReader::new(stdout), &shared));
        let mut p = ApplePowerProbe {
            tool: PowerTool::Macmon,
            interval: Duration::from_millis(250),
            child: Some(child),
            latest,
            stale_after: Duration::from_secs(2),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut r = Reading::new(Instant::now());
        while r.combined_power_w.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            r = Reading::new(Instant::now());
            p.read(&mut r);
        }
        assert_eq!(r.combined_power_w, Some(0.22231553));
        assert_eq!(p.sources()[0], ("power", "macmon".to_string()));
        let pid = p.child.as_ref().unwrap().id();
        // The job's sampling ends: the tool does not run between jobs, and what it said is
        // not reported any more.
        p.pause();
        assert!(!p.running());
        let mut after = Reading::new(Instant::now());
        p.read(&mut after);
        assert_eq!(after.combined_power_w, None);
        drop(p);
        // Reaped by pause: the pid no longer names our child.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .map(|c| !c.contains("sleep"))
                    .unwrap_or(true)
        );
    }
}
