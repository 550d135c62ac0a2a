//! `hardware(None)` on this Linux machine, checked against the OS's own sources: every fact
//! either matches what `/proc`, `uname` and `os-release` say, or is listed in `missing`; a
//! GPU is never invented.
#![cfg(target_os = "linux")]

use bench_agent::fingerprint::hardware::hardware;
use std::process::Command;

fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().expect(prog);
    assert!(out.status.success(), "{prog} {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn cpuinfo() -> String {
    std::fs::read_to_string("/proc/cpuinfo").unwrap()
}

/// The value of the first `key : value` line of /proc/cpuinfo with this key.
fn cpuinfo_field(key: &str) -> Option<String> {
    cpuinfo().lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

#[test]
fn cpu_matches_proc_cpuinfo() {
    let hw = hardware(None);
    // x86 names it `model name`; some ARM kernels have none (sysinfo then derives the name
    // from `CPU implementer`/`CPU part`, which this test does not second-guess).
    if let Some(model) = cpuinfo_field("model name") {
        assert_eq!(hw.cpu, model);
    } else {
        assert!(!hw.cpu.is_empty());
    }
    let processors = cpuinfo()
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count() as u32;
    assert_eq!(hw.cores, processors, "logical CPUs = processor entries");
    // nproc counts the CPUs this process may run on (affinity, cgroup cpusets): never more.
    let nproc: u32 = sh("nproc", &[]).parse().unwrap();
    assert!(nproc <= hw.cores, "nproc {nproc} > cores {}", hw.cores);
    if let Some(p) = hw.physical_cores {
        assert!(p >= 1 && p <= hw.cores, "physical {p} of {}", hw.cores);
    }
}

#[test]
fn memory_is_memtotal_in_bytes() {
    let hw = hardware(None);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    // /proc/meminfo says kB and means KiB; sysinfo multiplies by 1024: exact.
    assert_eq!(hw.memory_bytes, kib * 1024);
}

#[test]
fn os_kernel_and_arch_match_uname_and_os_release() {
    let hw = hardware(None);
    assert_eq!(hw.os, "linux");
    assert_eq!(
        hw.kernel_version.as_deref(),
        Some(sh("uname", &["-r"]).as_str())
    );
    assert_eq!(hw.arch, sh("uname", &["-m"]));
    if let Ok(rel) = std::fs::read_to_string("/etc/os-release") {
        let name = rel
            .lines()
            .find_map(|l| l.strip_prefix("NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .expect("NAME in os-release");
        let v = hw.os_version.clone().expect("os_version");
        assert!(v.contains(&name), "{v:?} does not name {name:?}");
    }
}

#[test]
fn gpus_come_from_a_source_or_are_missing() {
    let hw = hardware(None);
    assert_eq!(hw.accelerator, None);
    assert_eq!(
        hardware(Some("RTX 4090".into())).accelerator.as_deref(),
        Some("RTX 4090")
    );
    let nvidia_driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
    let nvml_missing = hw.missing.iter().find(|m| m.source == "nvml");
    if nvidia_driver {
        assert!(hw.gpus.iter().any(|g| g.source == "nvml"), "{hw:?}");
        assert!(nvml_missing.is_none());
    } else {
        // No NVIDIA driver here: NVML is listed as missing, with the loader's reason, and no
        // NVIDIA GPU is reported.
        let m = nvml_missing.unwrap_or_else(|| panic!("nvml not in missing: {:?}", hw.missing));
        assert!(!m.reason.is_empty());
        assert!(
            hw.gpus.iter().all(|g| g.vendor != "nvidia"),
            "{:?}",
            hw.gpus
        );
    }
    // Not a Mac: nothing from system_profiler, and no chip.
    assert_eq!(hw.chip, None);
    assert!(hw.gpus.iter().all(|g| g.source != "system_profiler"));
    for g in &hw.gpus {
        assert!(!g.name.is_empty() && !g.source.is_empty(), "{g:?}");
    }
}
