//! The real probes and [`build`], which picks those this machine can read: [`SysProbe`]
//! (sysinfo: CPU busy %, memory in use; every OS), [`RaplProbe`] (Linux powercap package
//! energy), the NVML probe ([`crate::fingerprint::nvidia::NvmlProbe`]) and, on macOS, Apple
//! power ([`crate::fingerprint::apple::ApplePowerProbe`]). A source that cannot be read is
//! returned as a [`Missing`] with the reason, and no probe is built for it.

use super::probe::{Probe, Reading};
use super::{ApplePower, TelemetryConfig};
use crate::fingerprint::apple::{ApplePowerProbe, PowerTool};
use crate::fingerprint::hardware::{find_on_path, output_of};
use crate::fingerprint::nvidia::NvmlProbe;
use bench_schemas::Missing;
use std::io;
use std::path::{Path, PathBuf};
use sysinfo::{MemoryRefreshKind, System};

/// The probes this machine can read under `cfg`, and the sources it tried that gave nothing.
/// Cheap enough to call once per sampler start (directories are enumerated here, once).
pub fn build(cfg: &TelemetryConfig) -> (Vec<Box<dyn Probe>>, Vec<Missing>) {
    let mut probes: Vec<Box<dyn Probe>> = vec![Box::new(SysProbe::new())];
    let mut missing = Vec::new();
    if cfg!(target_os = "linux") {
        match RaplProbe::open(&cfg.rapl_root) {
            Ok(p) => probes.push(Box::new(p)),
            Err(m) => missing.push(m),
        }
    }
    if cfg.nvml {
        match NvmlProbe::open() {
            Ok(p) => probes.push(Box::new(p)),
            Err(m) => missing.push(m),
        }
    }
    if cfg!(target_os = "macos") {
        match apple_power(cfg) {
            Ok(Some(p)) => probes.push(Box::new(p)),
            Ok(None) => {}
            Err(m) => missing.push(m),
        }
    }
    (probes, missing)
}

/// Whether the agent runs as root (`id -u` says 0), which `powermetrics` needs.
fn is_root() -> bool {
    output_of("id", &["-u"]).is_ok_and(|s| s.trim() == "0")
}

/// The Apple power tool `cfg.apple_power` asks for, started; None when it is off.
fn apple_power(cfg: &TelemetryConfig) -> Result<Option<ApplePowerProbe>, Missing> {
    let tool = match choose_apple_tool(cfg.apple_power, find_on_path("macmon").is_some(), is_root)?
    {
        Some(t) => t,
        None => return Ok(None),
    };
    ApplePowerProbe::spawn(tool, cfg.interval).map(Some)
}

/// Which Apple power tool to run: `Auto` takes macmon when installed, else powermetrics when
/// root, else says how to get either.
fn choose_apple_tool(
    want: ApplePower,
    has_macmon: bool,
    root: impl Fn() -> bool,
) -> Result<Option<PowerTool>, Missing> {
    const NO_MACMON: &str = "macmon is not on PATH (install it: `brew install macmon`)";
    const NOT_ROOT: &str = "powermetrics needs root and the agent is not running as root";
    match want {
        ApplePower::Off => Ok(None),
        ApplePower::Macmon if has_macmon => Ok(Some(PowerTool::Macmon)),
        ApplePower::Macmon => Err(Missing::new("macmon", NO_MACMON)),
        ApplePower::Powermetrics if root() => Ok(Some(PowerTool::Powermetrics)),
        ApplePower::Powermetrics => Err(Missing::new("powermetrics", NOT_ROOT)),
        ApplePower::Auto if has_macmon => Ok(Some(PowerTool::Macmon)),
        ApplePower::Auto if root() => Ok(Some(PowerTool::Powermetrics)),
        ApplePower::Auto => Err(Missing::new(
            "apple_power",
            format!("{NO_MACMON}, and {NOT_ROOT}"),
        )),
    }
}

/// CPU busy % over all logical CPUs and memory in use, from sysinfo. Refreshes only CPU
/// usage and RAM (no process scan), so a read costs two small `/proc` reads on Linux.
pub struct SysProbe {
    sys: System,
}

impl SysProbe {
    /// A probe with its CPU baseline taken now (sysinfo's busy % is the change since the
    /// previous refresh, so the first [`Probe::read`] already covers the time since this).
    pub fn new() -> Self {
        let mut sys = System::new();
        sys.refresh_cpu_usage();
        Self { sys }
    }
}

impl Default for SysProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe for SysProbe {
    fn sources(&self) -> Vec<(&'static str, String)> {
        vec![("cpu", "sysinfo".into()), ("mem", "sysinfo".into())]
    }

    fn read(&mut self, r: &mut Reading) {
        self.sys.refresh_cpu_usage();
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let pct = f64::from(self.sys.global_cpu_usage());
        if pct.is_finite() && !self.sys.cpus().is_empty() {
            r.cpu_pct = Some(pct.clamp(0.0, 100.0));
        }
        if self.sys.total_memory() > 0 {
            r.mem_used_bytes = Some(self.sys.used_memory());
        }
    }
}

/// One RAPL package zone.
#[derive(Debug)]
struct Zone {
    energy_path: PathBuf,
    /// The counter wraps to 0 after this many µJ.
    max_uj: u64,
    /// Raw counter at the previous good read.
    last_uj: u64,
    /// µJ counted since the probe was opened, wrap-arounds undone.
    total_uj: u128,
}

impl Zone {
    /// Reads the counter (fresh, by path: a file replaced by rename between reads is read
    /// whole) and adds what it advanced since the last good read.
    fn advance(&mut self) -> io::Result<()> {
        let now = read_u64(&self.energy_path)?;
        self.total_uj += u128::from(wrapped_delta(self.last_uj, now, self.max_uj));
        self.last_uj = now;
        Ok(())
    }
}

/// What a counter that runs 0..=`max` advanced from `before` to `now`, read at most one
/// wrap apart (at 4 Hz a wrap takes hours: 2^32 µJ at 500 W is 2.4 h).
fn wrapped_delta(before: u64, now: u64, max: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        max.saturating_sub(before).saturating_add(now)
    }
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {s:?} is not a number: {e}", path.display()),
        )
    })
}

/// Whether a powercap directory is a top-level RAPL zone: `intel-rapl:0`, `amd-rapl:1`
/// (`<driver>-rapl:<N>`), not a subzone (`intel-rapl:0:1`: core, uncore, dram are inside the
/// package) and not the MMIO interface (`intel-rapl-mmio:0`, a second view of package 0:
/// counting it would count the package twice).
fn is_package_dir(name: &str) -> bool {
    let Some((prefix, n)) = name.split_once(':') else {
        return false;
    };
    prefix.ends_with("-rapl") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}

/// The reason for an `energy_uj` that cannot be read, with what to do about it.
fn unreadable_reason(path: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied {
        format!(
            "cannot read {}: {e}; since Linux 5.10 (CVE-2020-8694) energy_uj is readable by \
             root only: run the agent as root, or allow it with \
             `sudo chmod a+r /sys/class/powercap/*-rapl:*/energy_uj` (reset at boot: a udev \
             rule or systemd-tmpfiles line makes it last)",
            path.display()
        )
    } else {
        format!("cannot read {}: {e}", path.display())
    }
}

/// CPU package energy from Linux powercap (RAPL): the sum over every top-level package zone
/// under the root of `energy_uj`, cumulative since the probe was opened, wrap-around undone.
/// Zones are found once, at [`RaplProbe::open`]; each read opens each `energy_uj` afresh.
#[derive(Debug)]
pub struct RaplProbe {
    zones: Vec<Zone>,
}

impl RaplProbe {
    /// Finds the package zones under `root` (`/sys/class/powercap`) and takes each counter's
    /// baseline. `psys` (platform energy, which includes the packages) is left out so nothing
    /// is counted twice. Fails with the reason when there is no zone or one cannot be read.
    pub fn open(root: &Path) -> Result<Self, Missing> {
        let entries = std::fs::read_dir(root).map_err(|e| {
            Missing::new(
                "rapl",
                format!(
                    "no powercap tree at {}: {e} (not Linux, intel_rapl driver not loaded, \
                     or a VM without RAPL)",
                    root.display()
                ),
            )
        })?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(is_package_dir))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        let mut zones = Vec::new();
        for dir in dirs {
            let name = std::fs::read_to_string(dir.join("name")).unwrap_or_default();
            if name.trim() == "psys" {
                continue;
            }
            let energy_path = dir.join("energy_uj");
            let last_uj = read_u64(&energy_path)
                .map_err(|e| Missing::new("rapl", unreadable_reason(&energy_path, &e)))?;
            let range_path = dir.join("max_energy_range_uj");
            let max_uj = read_u64(&range_path)
                .map_err(|e| Missing::new("rapl", unreadable_reason(&range_path, &e)))?;
            zones.push(Zone {
                energy_path,
                max_uj,
                last_uj,
                total_uj: 0,
            });
        }
        if zones.is_empty() {
            return Err(Missing::new(
                "rapl",
                format!(
                    "no RAPL package zone (<driver>-rapl:<N>) under {}",
                    root.display()
                ),
            ));
        }
        Ok(Self { zones })
    }

    /// How many package zones it sums.
    pub fn zones(&self) -> usize {
        self.zones.len()
    }
}

impl Probe for RaplProbe {
    fn sources(&self) -> Vec<(&'static str, String)> {
        vec![("cpu_power", "rapl".into())]
    }

    fn read(&mut self, r: &mut Reading) {
        // A zone that fails this once keeps its last good value, so the next good read counts
        // the whole gap; this reading has no energy rather than a sum that is short.
        let mut all = true;
        for z in &mut self.zones {
            if z.advance().is_err() {
                all = false;
            }
        }
        if all {
            let uj: u128 = self.zones.iter().map(|z| z.total_uj).sum();
            r.cpu_energy_j = Some(uj as f64 / 1e6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn zone(root: &Path, dir: &str, name: &str, energy: u64, max: u64) {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    /// As a test harness would: write a new file and rename it over the old one.
    fn set_energy(root: &Path, dir: &str, energy: u64) {
        let tmp = root.join(format!("{dir}.tmp"));
        std::fs::write(&tmp, format!("{energy}\n")).unwrap();
        std::fs::rename(&tmp, root.join(dir).join("energy_uj")).unwrap();
    }

    fn energy(p: &mut RaplProbe) -> Option<f64> {
        let mut r = Reading::new(Instant::now());
        p.read(&mut r);
        r.cpu_energy_j
    }

    #[test]
    fn package_dirs_only() {
        assert!(is_package_dir("intel-rapl:0"));
        assert!(is_package_dir("intel-rapl:12"));
        assert!(is_package_dir("amd-rapl:1"));
        assert!(!is_package_dir("intel-rapl:0:0"));
        assert!(!is_package_dir("intel-rapl-mmio:0"));
        assert!(!is_package_dir("intel-rapl"));
        assert!(!is_package_dir("intel-rapl:"));
        assert!(!is_package_dir("dtpm"));
    }

    #[test]
    fn rapl_sums_packages_and_counts_joules() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        zone(
            root,
            "intel-rapl:0",
            "package-0",
            1_000_000,
            262_143_328_850,
        );
        zone(
            root,
            "intel-rapl:1",
            "package-1",
            5_000_000,
            262_143_328_850,
        );
        // Inside package 0, and a second view of it: neither is counted.
        zone(root, "intel-rapl:0:0", "core", 0, 262_143_328_850);
        zone(root, "intel-rapl-mmio:0", "package-0", 0, 262_143_328_850);
        zone(root, "intel-rapl:2", "psys", 0, 262_143_328_850);
        let mut p = RaplProbe::open(root).unwrap();
        assert_eq!(p.zones(), 2);
        assert_eq!(energy(&mut p), Some(0.0));
        set_energy(root, "intel-rapl:0", 3_500_000);
        set_energy(root, "intel-rapl:1", 6_000_000);
        set_energy(root, "intel-rapl:0:0", 99_000_000);
        assert_eq!(energy(&mut p), Some(3.5));
        set_energy(root, "intel-rapl:0", 4_000_000);
        assert_eq!(energy(&mut p), Some(4.0));
        assert_eq!(p.sources(), vec![("cpu_power", "rapl".to_string())]);
    }

    #[test]
    fn rapl_undoes_wrap_around() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let max = 10_000_000;
        zone(root, "intel-rapl:0", "package-0", 9_000_000, max);
        let mut p = RaplProbe::open(root).unwrap();
        set_energy(root, "intel-rapl:0", 9_500_000);
        assert_eq!(energy(&mut p), Some(0.5));
        // 9.5 J -> wraps at 10 J -> 2 J: 0.5 + 2 more.
        set_energy(root, "intel-rapl:0", 2_000_000);
        assert_eq!(energy(&mut p), Some(3.0));
        assert_eq!(wrapped_delta(5, 7, 10), 2);
        assert_eq!(wrapped_delta(8, 1, 10), 3);
    }

    #[test]
    fn rapl_gap_is_counted_once_the_file_is_back() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        zone(root, "intel-rapl:0", "package-0", 0, 1 << 32);
        let mut p = RaplProbe::open(root).unwrap();
        std::fs::remove_file(root.join("intel-rapl:0/energy_uj")).unwrap();
        assert_eq!(energy(&mut p), None);
        set_energy(root, "intel-rapl:0", 2_000_000);
        assert_eq!(energy(&mut p), Some(2.0));
    }

    #[test]
    fn rapl_missing_says_why() {
        let t = tempfile::tempdir().unwrap();
        let m = RaplProbe::open(&t.path().join("nope")).unwrap_err();
        assert_eq!(m.source, "rapl");
        assert!(m.reason.contains("no powercap tree"), "{}", m.reason);
        let m = RaplProbe::open(t.path()).unwrap_err();
        assert!(m.reason.contains("no RAPL package zone"), "{}", m.reason);
        zone(t.path(), "intel-rapl:0", "package-0", 0, 1);
        std::fs::write(t.path().join("intel-rapl:0/energy_uj"), "x").unwrap();
        let m = RaplProbe::open(t.path()).unwrap_err();
        assert!(m.reason.contains("not a number"), "{}", m.reason);
        // Root reads a 0400 file anyway, so the permission text is checked directly.
        let e = io::Error::from(io::ErrorKind::PermissionDenied);
        let why = unreadable_reason(Path::new("/sys/class/powercap/intel-rapl:0/energy_uj"), &e);
        assert!(
            why.contains("root only") && why.contains("chmod a+r"),
            "{why}"
        );
    }

    #[test]
    fn sys_probe_reads_cpu_and_memory() {
        let mut p = SysProbe::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let mut r = Reading::new(Instant::now());
        p.read(&mut r);
        let pct = r.cpu_pct.expect("cpu %");
        assert!((0.0..=100.0).contains(&pct), "{pct}");
        assert!(r.mem_used_bytes.expect("memory") > 0);
    }

    #[test]
    fn apple_tool_choice() {
        let yes = || true;
        let no = || false;
        let pick = |w, m, r: &dyn Fn() -> bool| choose_apple_tool(w, m, r);
        assert_eq!(pick(ApplePower::Off, true, &yes), Ok(None));
        assert_eq!(
            pick(ApplePower::Auto, true, &no),
            Ok(Some(PowerTool::Macmon))
        );
        assert_eq!(
            pick(ApplePower::Auto, false, &yes),
            Ok(Some(PowerTool::Powermetrics))
        );
        let m = pick(ApplePower::Auto, false, &no).unwrap_err();
        assert!(m.reason.contains("brew install macmon") && m.reason.contains("root"));
        assert_eq!(
            pick(ApplePower::Macmon, false, &yes).unwrap_err().source,
            "macmon"
        );
        assert_eq!(
            pick(ApplePower::Powermetrics, true, &no)
                .unwrap_err()
                .source,
            "powermetrics"
        );
        assert_eq!(
            pick(ApplePower::Powermetrics, false, &yes),
            Ok(Some(PowerTool::Powermetrics))
        );
    }

    #[test]
    fn build_always_has_sysinfo() {
        let t = tempfile::tempdir().unwrap();
        let cfg = TelemetryConfig {
            rapl_root: t.path().to_path_buf(),
            nvml: false,
            ..TelemetryConfig::default()
        };
        let (probes, missing) = build(&cfg);
        assert_eq!(probes[0].sources()[0], ("cpu", "sysinfo".to_string()));
        if cfg!(target_os = "linux") {
            assert!(missing.iter().any(|m| m.source == "rapl"), "{missing:?}");
        }
    }
}
