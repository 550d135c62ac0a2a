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
