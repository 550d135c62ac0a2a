//! The machine's facts, read once at agent start: sysinfo for CPU, cores, memory and OS on
//! every OS (CPU list and memory only: no process scan), then the GPUs: NVML (NVIDIA, any
//! OS), `system_profiler`/`sysctl` (macOS) and `amd-smi`/`rocm-smi` (when on PATH). Each
//! source that gives nothing is listed in `missing` with why.

use super::{amd, apple, nvidia};
use bench_schemas::{Hardware, Missing};
use std::path::PathBuf;
use std::process::Command;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

/// Facts about this machine. `accelerator` is the config's free-text label.
pub fn hardware(accelerator: Option<String>) -> Hardware {
    let mut sys = System::new();
    sys.refresh_cpu_list(CpuRefreshKind::nothing());
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let brand = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    let mut hw = Hardware {
        cpu: brand,
        cores: u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX),
        physical_cores: System::physical_core_count().and_then(|n| u32::try_from(n).ok()),
        memory_bytes: sys.total_memory(),
        os: std::env::consts::OS.to_string(),
        os_version: System::long_os_version(),
        kernel_version: System::kernel_version(),
        arch: std::env::consts::ARCH.to_string(),
        accelerator,
        ..Hardware::default()
    };
    if hw.cores == 0 {
        hw.missing.push(Missing::new("sysinfo", "no CPU listed"));
    }

    match nvidia::gpus() {
        Ok(g) => hw.gpus.extend(g),
        Err(m) => hw.missing.push(m),
    }
    if cfg!(target_os = "macos") {
        mac(&mut hw);
    }
    amd_gpus(&mut hw);
    hw
}

/// The first `name` in a `PATH` directory that is an executable file.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(p: &std::path::Path) -> bool {
    p.is_file()
}

/// Runs `prog args` and returns its stdout when it exits 0; the reason otherwise.
pub fn output_of(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{prog} {} exited with {}: {}",
            args.join(" "),
            out.status,
            err.trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// macOS: the brand string and memory as `sysctl` says (what Apple documents; sysinfo reads
/// the same keys, so this only fills in what it left empty) and the chip and GPUs from
/// `system_profiler`.
fn mac(hw: &mut Hardware) {
    if hw.cpu.is_empty() {
        match output_of("sysctl", &["-n", "machdep.cpu.brand_string"]) {
            Ok(s) => hw.cpu = apple::parse_brand_string(&s).unwrap_or_default(),
            Err(e) => hw.missing.push(Missing::new("sysctl", e)),
        }
    }
    if hw.memory_bytes == 0 {
        match output_of("sysctl", &["-n", "hw.memsize"]) {
            Ok(s) => hw.memory_bytes = apple::parse_memsize(&s).unwrap_or(0),
            Err(e) => hw.missing.push(Missing::new("sysctl", e)),
        }
    }
    let unified = (hw.memory_bytes > 0).then_some(hw.memory_bytes);
    match output_of("system_profiler", &["SPDisplaysDataType", "-json"])
        .and_then(|s| apple::parse_displays(&s, unified))
    {
        Ok(d) if !d.gpus.is_empty() => {
            hw.chip = d.chip;
            hw.gpus.extend(d.gpus);
        }
        Ok(_) => hw.missing.push(Missing::new(
            "system_profiler",
            "SPDisplaysDataType lists no GPU",
        )),
        Err(e) => hw.missing.push(Missing::new("system_profiler", e)),
    }
}

/// AMD GPUs, when `amd-smi` (preferred) or `rocm-smi` is installed. Neither installed is
/// not reported: most machines have no AMD GPU, and nothing is missing there.
fn amd_gpus(hw: &mut Hardware) {
    let (source, result) = if find_on_path("amd-smi").is_some() {
        (
            "amd-smi",
            output_of("amd-smi", &amd::AMD_SMI_ARGS).and_then(|s| amd::parse_amd_smi_static(&s)),
        )
    } else if find_on_path("rocm-smi").is_some() {
        (
            "rocm-smi",
            output_of("rocm-smi", &amd::ROCM_SMI_ARGS).and_then(|s| amd::parse_rocm_smi(&s)),
        )
    } else {
        return;
    };
    match result {
        Ok(g) if !g.is_empty() => hw.gpus.extend(g),
        Ok(_) => hw.missing.push(Missing::new(source, "lists no GPU")),
        Err(e) => hw.missing.push(Missing::new(source, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_lookup() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("no-such-tool-bench-race").is_none());
    }

    #[test]
    fn output_of_reports_failure() {
        assert_eq!(output_of("sh", &["-c", "echo hi"]).unwrap(), "hi\n");
        let e = output_of("sh", &["-c", "echo bad >&2; exit 3"]).unwrap_err();
        assert!(e.contains("bad"), "{e}");
        assert!(output_of("no-such-tool-bench-race", &[]).is_err());
    }
}
