//! What both programs need around their config and lifetime: the config error that names file,
//! key and fix; the environment passed in explicitly (so tests never touch the process's); and
//! the one shutdown signal.

use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

/// A configuration problem, naming where and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    /// The file (or `environment (<file>)` for a variable).
    pub file: String,
    /// The key or variable (`-` for the whole file).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

/// Environment a config reads, passed in so tests don't touch the process environment.
pub type Env = BTreeMap<String, String>;

/// The process environment as an [`Env`].
pub fn process_env() -> Env {
    std::env::vars().collect()
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}

/// What a program's command line asks for.
#[derive(Debug, PartialEq)]
pub enum CommandLine {
    /// Run with this config file (None: the program's default).
    Run(Option<std::path::PathBuf>),
    /// Print the version and exit.
    Version,
    /// Print the usage and exit with status 2.
    Usage,
}

/// Parses `[--config|-c <file>] | --version|-V`; `--config` falls back to `env_path` (the
/// program's `*_CONFIG` variable).
pub fn parse_command_line(
    args: impl IntoIterator<Item = String>,
    env_path: Option<std::path::PathBuf>,
) -> CommandLine {
    let mut args = args.into_iter();
    let mut path = env_path;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(p.into()),
                None => return CommandLine::Usage,
            },
            "--version" | "-V" => return CommandLine::Version,
            _ => return CommandLine::Usage,
        }
    }
    CommandLine::Run(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: Option<&str>) -> CommandLine {
        parse_command_line(args.iter().map(|s| s.to_string()), env.map(Into::into))
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&[], None), CommandLine::Run(None));
        assert_eq!(
            parse(&[], Some("e.yaml")),
            CommandLine::Run(Some("e.yaml".into()))
        );
        assert_eq!(
            parse(&["-c", "a.yaml"], Some("e.yaml")),
            CommandLine::Run(Some("a.yaml".into()))
        );
        assert_eq!(parse(&["--config"], None), CommandLine::Usage);
        assert_eq!(parse(&["--bogus"], None), CommandLine::Usage);
        assert_eq!(parse(&["-V"], None), CommandLine::Version);
    }
}
