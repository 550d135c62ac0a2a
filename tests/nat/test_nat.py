"""An agent behind NAT: it runs in its own network namespace whose firewall admits only replies
to connections it opened (what a NAT gives a machine) and which can reach nothing on the host but
the NATS port. It is discovered, runs a job, and its results reach central, which never learns
the agent's address. Needs root (ip netns, iptables)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cli"))
from harness import ROOT, TARGET, free_port, read, wait_for  # noqa: E402

PID = os.getpid() % 10000
NS = f"brnat{PID}"
VETH_HOST, VETH_NS = f"brh{PID}", f"bra{PID}"
SUBNET = 100 + PID % 100
HOST_IP, NS_IP = f"10.213.{SUBNET}.1", f"10.213.{SUBNET}.2"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


class BehindNat(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root for ip netns / iptables")
        cls.procs, cls.tmp = [], tempfile.mkdtemp(prefix="bench-nat-")
        # The namespace and its link to the host.
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        sh("ip", "link", "set", VETH_NS, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        for args in (["addr", "add", f"{NS_IP}/30", "dev", VETH_NS], ["link", "set", VETH_NS, "up"],
                     ["link", "set", "lo", "up"], ["route", "add", "default", "via", HOST_IP]):
            sh("ip", "netns", "exec", NS, "ip", *args)
        # Inside: only replies come in (stateful, like NAT). Host side: the namespace may reach
        # the NATS port and nothing else.
        ns_fw = ["ip", "netns", "exec", NS, "iptables"]
        sh(*ns_fw, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        sh(*ns_fw, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh(*ns_fw, "-P", "INPUT", "DROP")
        cls.nats_port = free_port()
        cls.host_rules = [
            ["INPUT", "-i", VETH_HOST, "-p", "tcp", "--dport", str(cls.nats_port), "-j", "ACCEPT"],
            ["INPUT", "-i", VETH_HOST, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["INPUT", "-i", VETH_HOST, "-j", "DROP"],
        ]
        for rule in cls.host_rules:
            sh("iptables", "-A", *rule)

        # NATS on the host, listening on the link's host address only.
        nats_bin = os.environ.get("NATS_SERVER_BIN") or os.path.join(ROOT, ".tools/nats-server/nats-server")
        log = os.path.join(cls.tmp, "nats.log")
        cls.procs.append(subprocess.Popen([nats_bin, "-a", HOST_IP, "-p", str(cls.nats_port), "-js",
                                           "-sd", os.path.join(cls.tmp, "js"), "-l", log],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: "Server is ready" in read(log), "nats-server")
        nats_url = f"nats://{HOST_IP}:{cls.nats_port}"

        # Central on the host.
        cls.central_port = free_port()
        env = dict(os.environ, NATS_URL=nats_url, CENTRAL_HOST="127.0.0.1", CENTRAL_PORT=str(cls.central_port),
                   RUST_LOG="warn")
        central_cfg = os.path.join(cls.tmp, "machines.yaml")
        with open(central_cfg, "w") as f:
            f.write(f"results_dir: {os.path.join(cls.tmp, 'results')}\nweb_dir: {os.path.join(ROOT, 'web')}\n")
        cls.central_log = open(os.path.join(cls.tmp, "central.log"), "w")
        cls.procs.append(subprocess.Popen([os.path.join(TARGET, "debug", "bench-central"), "--config", central_cfg],
                                          env=env, stdout=cls.central_log, stderr=cls.central_log))
        cls.central = f"http://127.0.0.1:{cls.central_port}"
        wait_for(lambda: cls._get("/health"), "central health")

        # The agent, inside the namespace, dialling out.
        cls.agent_http = free_port()
        agent_cfg = os.path.join(cls.tmp, "agent.yaml")
        with open(agent_cfg, "w") as f:
            f.write(f"machine_id: natted\nlabel: Behind NAT\nengine: mock\nmock: {{tokens_per_s: 300, ttft_ms: 5}}\n"
                    f"llm_models: [mock-7b]\nbind_host: 0.0.0.0\nbind_port: {cls.agent_http}\nheartbeat_s: 1\n")
        cls.agent_log = open(os.path.join(cls.tmp, "agent.log"), "w")
        cls.procs.append(subprocess.Popen(["ip", "netns", "exec", NS, os.path.join(TARGET, "debug", "bench-agent"),
                                           "--config", agent_cfg], env=dict(os.environ, NATS_URL=nats_url, RUST_LOG="info"),
                                          stdout=cls.agent_log, stderr=cls.agent_log))

    @classmethod
    def _get(cls, path):
        try:
            return http("GET", cls.central + path)
        except OSError:
            return None

    @classmethod
    def tearDownClass(cls):
        for p in getattr(cls, "procs", []):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for rule in getattr(cls, "host_rules", []):
            sh("iptables", "-D", *rule, check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)
        sh("ip", "netns", "del", NS, check=False)

    def test_discovered_runs_and_reports_without_inbound_route(self):
        # Discovered through the registry.
        def online():
            m = self._get("/api/machines") or {"machines": []}
            return next((x for x in m["machines"] if x["machine_id"] == "natted" and x["status"] != "offline"), None)
        machine = wait_for(online, "the natted agent online in central", timeout=30)
        self.assertEqual(machine["label"], "Behind NAT")

        # Nothing can connect to it: its local port is unreachable from the host.
        with self.assertRaises(OSError):
            socket.create_connection((NS_IP, self.agent_http), timeout=2).close()

        # A race through central.
        created = http("POST", self.central + "/api/jobs",
                       {"machines": ["natted"], "model": "mock-7b", "prompt": "hello from behind NAT", "max_tokens": 16})
        self.assertEqual(created["machines"], [{"machine_id": "natted", "status": "accepted"}])
        job_id = created["job_id"]

        def finished():
            j = self._get(f"/api/jobs/{job_id}")
            return j if j and j["status"] == "done" else None
        job = wait_for(finished, "the job done in central", timeout=60)
        m = job["machines"][0]
        self.assertEqual(m["machine_id"], "natted")
        self.assertEqual(m["repeats"][0]["gen_tokens"], 16)
        self.assertTrue(m["output_text"])

        # Central never learned the agent's address: not in anything it serves.
        for path in ("/api/machines", f"/api/jobs/{job_id}", "/api/jobs"):
            self.assertNotIn(NS_IP, json.dumps(self._get(path)), path)


if __name__ == "__main__":
    unittest.main()
