"""Real processes for the nats-CLI-equivalent tests: a nats-server with JetStream on a free
port and bench-agent binaries, each killed at the end. nats-py stands in for the Go `nats` CLI
(not installable here): every test sends exactly what the README's `nats` commands send."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class NatsServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-nats-")
        self.port = free_port()
        binary = os.environ.get("NATS_SERVER_BIN") or os.path.join(ROOT, ".tools/nats-server/nats-server")
        if not os.path.exists(binary):
            raise RuntimeError("nats-server missing: run scripts/nats install")
        self.log = os.path.join(self.dir, "nats.log")
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", os.path.join(self.dir, "js"), "-l", self.log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: "Server is ready" in read(self.log), "nats-server")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Agent:
    """A bench-agent process with the mock engine (the engine is not what these tests check)."""

    def __init__(self, nats_url: str, machine_id: str, extra: str = "", tokens_per_s: int = 200, heartbeat_s=1):
        self.dir = tempfile.mkdtemp(prefix=f"bench-agent-{machine_id}-")
        self.http_port = free_port()
        cfg = os.path.join(self.dir, "agent.yaml")
        with open(cfg, "w") as f:
            f.write(
                f"machine_id: {machine_id}\nlabel: CLI test {machine_id}\nengine: mock\n"
                f"mock: {{tokens_per_s: {tokens_per_s}, ttft_ms: 5}}\nllm_models: [mock-7b]\n"
                f"bind_port: {self.http_port}\n{extra}"
                + (f"heartbeat_s: {heartbeat_s}\n" if heartbeat_s is not None else "")
            )
        binary = os.path.join(TARGET, "debug", "bench-agent")
        if not os.path.exists(binary):
            raise RuntimeError(f"{binary} missing: run cargo build -p bench-agent")
        env = dict(os.environ, NATS_URL=nats_url, RUST_LOG="warn")
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc = subprocess.Popen([binary, "--config", cfg], env=env, stdout=self.log, stderr=self.log)
        wait_for(self._healthy, f"agent {machine_id} health")

    def _healthy(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited: {read(self.log.name)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1) as r:
                return json.load(r)["ok"]
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
