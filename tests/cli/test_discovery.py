"""Live discovery through central: an agent killed with SIGKILL shows offline within 15 s (no
goodbye: only its heartbeats stop), and online again when it returns. Default heartbeat (3 s)."""

import json
import os
import signal
import subprocess
import tempfile
import time
import unittest
import urllib.request

from harness import Agent, NatsServer, TARGET, free_port, wait_for


class Central:
    def __init__(self, nats_url: str):
        self.dir = tempfile.mkdtemp(prefix="bench-central-")
        self.port = free_port()
        cfg = os.path.join(self.dir, "machines.yaml")
        with open(cfg, "w") as f:
            f.write(f"results_dir: {os.path.join(self.dir, 'results')}\n")
        env = dict(os.environ, NATS_URL=nats_url, CENTRAL_HOST="127.0.0.1", CENTRAL_PORT=str(self.port), RUST_LOG="warn")
        self.log = open(os.path.join(self.dir, "central.log"), "w")
        self.proc = subprocess.Popen([os.path.join(TARGET, "debug", "bench-central"), "--config", cfg], env=env,
                                     stdout=self.log, stderr=self.log)
        wait_for(lambda: self.get("/health"), "central health")

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return json.load(r)
        except OSError:
            return None

    def status(self, machine_id):
        m = self.get("/api/machines") or {"machines": []}
        return next((x["status"] for x in m["machines"] if x["machine_id"] == machine_id), None)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self.log.close()


class Discovery(unittest.TestCase):
    def test_kill_9_goes_offline_within_15s_and_comes_back(self):
        server = NatsServer()
        central = Central(server.url)
        try:
            agent = Agent(server.url, "disc-a", heartbeat_s=None)
            wait_for(lambda: central.status("disc-a") == "online", "online", timeout=20)
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait()
            killed = time.monotonic()
            wait_for(lambda: central.status("disc-a") == "offline", "offline after kill -9", timeout=15)
            took = time.monotonic() - killed
            print(f"\noffline {took:.1f} s after kill -9")
            self.assertLess(took, 15.0)
            agent.stop()
            again = Agent(server.url, "disc-a", heartbeat_s=None)
            wait_for(lambda: central.status("disc-a") == "online", "online again", timeout=15)
            again.stop()
        finally:
            central.stop()
            server.stop()


if __name__ == "__main__":
    unittest.main()
