//! bench-auth: keeps a fleet's NATS nkeys and the generated accounts config in one folder.
//!
//!   bench-auth add-agent <machine_id> <dir>   create <dir>/agent-<id>.nk (once), regenerate
//!                                             <dir>/accounts.conf, print the agent's nats: block
//!   bench-auth render <dir>                   regenerate <dir>/accounts.conf
//!
//! central.nk and observer.nk are created on first use. Seeds are written 0600.

use bench_nats::auth::{agent_inbox_prefix, render_accounts, Identity};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn load_or_create(path: &Path) -> Result<Identity, String> {
    if path.exists() {
        let seed = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Identity::from_seed(&seed).map_err(|e| format!("{}: {e}", path.display()));
    }
    let id = Identity::generate();
    write_secret(path, &id.seed)?;
    Ok(id)
}

fn write_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn render(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let central = load_or_create(&dir.join("central.nk"))?;
    let observer = load_or_create(&dir.join("observer.nk"))?;
    let mut agents = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(id) = name
            .strip_prefix("agent-")
            .and_then(|n| n.strip_suffix(".nk"))
        {
            agents.push((id.to_string(), load_or_create(&path)?.public));
        }
    }
    let text = render_accounts(&agents, &central.public, &observer.public);
    std::fs::write(dir.join("accounts.conf"), text).map_err(|e| format!("accounts.conf: {e}"))
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, id, dir] if cmd == "add-agent" => {
            bench_schemas::validate_machine_id(id).map_err(|e| e.to_string())?;
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let seed_file = dir.join(format!("agent-{id}.nk"));
            load_or_create(&seed_file)?;
            render(&dir)?;
            let abs = std::fs::canonicalize(&seed_file).map_err(|e| e.to_string())?;
            println!(
                "# add to agent {id}'s config (and copy {} to that machine):",
                abs.display()
            );
            println!(
                "nats:\n  nkey_seed_file: \"{}\"\n  inbox_prefix: \"{}\"",
                abs.display(),
                agent_inbox_prefix(id)
            );
            Ok(())
        }
        [cmd, dir] if cmd == "render" => render(Path::new(dir)),
        _ => Err("usage: bench-auth add-agent <machine_id> <dir> | bench-auth render <dir>".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-auth: {e}");
            ExitCode::from(2)
        }
    }
}
