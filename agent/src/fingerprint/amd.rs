//! AMD GPUs for the fingerprint, from `amd-smi static --json` (ROCm 6.1+) or, where only the
//! older tool is installed, `rocm-smi --showproductname --showmeminfo vram --json`. Fingerprint
//! only: there is no AMD telemetry probe (busy %, power and clocks of AMD GPUs are not
//! sampled during jobs).

use bench_schemas::Gpu;
use serde_json::Value;

/// The `amd-smi`/`rocm-smi` arguments that give what the parsers read.
pub const AMD_SMI_ARGS: [&str; 2] = ["static", "--json"];
/// See [`AMD_SMI_ARGS`].
pub const ROCM_SMI_ARGS: [&str; 5] = [
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--json",
    "--showdriverversion",
];

/// A real value: not absent, not `N/A`, not empty.
fn text(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!s.is_empty() && s != "N/A").then_some(s)
}

/// An amd-smi size: `{"value": 16368, "unit": "MB"}` (newer), `"16368 MB"` (older) or a bare
/// number of MB. amd-smi's `MB` is MiB (the driver counts in 2^20 bytes).
fn size_bytes(v: Option<&Value>) -> Option<u64> {
    let (num, unit) = match v? {
        Value::Object(o) => (
            o.get("value").and_then(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })?,
            o.get("unit")
                .and_then(Value::as_str)
                .unwrap_or("MB")
                .to_string(),
        ),
        Value::Number(n) => (n.as_f64()?, "MB".to_string()),
        Value::String(s) => {
            let mut it = s.split_whitespace();
            let num = it.next()?.parse().ok()?;
            (num, it.next().unwrap_or("MB").to_string())
        }
        _ => return None,
    };
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "B" => 1.0,
        "KB" | "KIB" => 1024.0,
        "MB" | "MIB" => 1024.0 * 1024.0,
        "GB" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (num.is_finite() && num >= 0.0).then(|| (num * scale).round() as u64)
}

/// Parses `amd-smi static --json`: a list of GPUs, bare (older) or under `gpu_data` (ROCm 7).
pub fn parse_amd_smi_static(json: &str) -> Result<Vec<Gpu>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("amd-smi JSON: {e}"))?;
    let list = match &v {
        Value::Array(a) => a,
        Value::Object(o) => o
            .get("gpu_data")
            .and_then(Value::as_array)
            .ok_or("amd-smi JSON has no gpu_data list")?,
        _ => return Err("amd-smi JSON is neither a list nor an object".into()),
    };
    let mut out = Vec::new();
    for (i, g) in list.iter().enumerate() {
        let Some(name) = text(g.pointer("/asic/market_name")) else {
            continue;
        };
        let index = g
            .get("gpu")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(i as u32);
        out.push(Gpu {
            index,
            vendor: "amd".into(),
            name,
            memory_bytes: size_bytes(g.pointer("/vram/size")),
            driver_version: text(g.pointer("/driver/version")),
            pcie_width_max: g
                .pointer("/bus/max_pcie_width")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
            uuid: None,
            source: "amd-smi".into(),
            ..Gpu::default()
        });
    }
    Ok(out)
}

/// Parses `rocm-smi --showproductname --showmeminfo vram --json`: `{"card0": {...}, ...}`
/// (a `system` entry, when `--showdriverversion` is given, holds the driver version).
pub fn parse_rocm_smi(json: &str) -> Result<Vec<Gpu>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("rocm-smi JSON: {e}"))?;
    let o = v.as_object().ok_or("rocm-smi JSON is not an object")?;
    let driver = o.get("system").and_then(|s| text(s.get("Driver version")));
    let mut cards: Vec<(u32, &Value)> = o
        .iter()
        .filter_map(|(k, c)| Some((k.strip_prefix("card")?.parse().ok()?, c)))
        .collect();
    cards.sort_by_key(|(i, _)| *i);
    Ok(cards
        .into_iter()
        .filter_map(|(index, c)| {
            let name = text(c.get("Card Series")).or_else(|| text(c.get("Device Name")))?;
            Some(Gpu {
                index,
                vendor: "amd".into(),
                name,
                memory_bytes: text(c.get("VRAM Total Memory (B)")).and_then(|s| s.parse().ok()),
                driver_version: driver.clone(),
                source: "rocm-smi".into(),
                ..Gpu::default()
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_smi_static_recorded() {
        let g = parse_amd_smi_static(include_str!(
            "../../tests/fixtures/recorded/amd-smi_static.json"
        ))
        .unwrap();
        assert_eq!(
            g,
            vec![Gpu {
                index: 0,
                vendor: "amd".into(),
                name: "AMD Radeon RX 7800 XT".into(),
                memory_bytes: Some(16368 << 20),
                driver_version: Some("6.16.5-201.fc42.x86_64".into()),
                pcie_width_max: Some(16),
                source: "amd-smi".into(),
                ..Gpu::default()
            }]
        );
    }

    #[test]
    fn amd_smi_older_shapes() {
        let json = r#"[{"gpu": 1, "asic": {"market_name": "AMD Instinct MI300X"},
            "vram": {"size": "196592 MB"}, "driver": {"version": "N/A"}}]"#;
        let g = parse_amd_smi_static(json).unwrap();
        assert_eq!(g[0].index, 1);
        assert_eq!(g[0].memory_bytes, Some(196_592 << 20));
        assert_eq!(g[0].driver_version, None);
        assert!(parse_amd_smi_static("{}").is_err());
        assert_eq!(size_bytes(Some(&serde_json::json!(8))), Some(8 << 20));
        assert_eq!(
            size_bytes(Some(&serde_json::json!({"value": 1, "unit": "GB"}))),
            Some(1 << 30)
        );
        assert_eq!(
            size_bytes(Some(&serde_json::json!({"value": 1, "unit": "parsec"}))),
            None
        );
    }

    #[test]
    fn rocm_smi_recorded() {
        let g =
            parse_rocm_smi(include_str!("../../tests/fixtures/recorded/rocm-smi.json")).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "Radeon RX 7900 XT");
        assert_eq!(g[0].memory_bytes, Some(21_458_059_264));
        assert_eq!(g[0].source, "rocm-smi");
        let with_driver = r#"{"card1": {"Card Series": "B"}, "card0": {"Card Series": "A"},
            "system": {"Driver version": "6.3.6"}}"#;
        let g = parse_rocm_smi(with_driver).unwrap();
        assert_eq!((g[0].name.as_str(), g[1].index), ("A", 1));
        assert_eq!(g[1].driver_version.as_deref(), Some("6.3.6"));
    }
}
