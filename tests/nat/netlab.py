"""What the NAT tests share: a network namespace behind a stateful firewall, real processes that
are stopped at the end, and the checks through central. Every resource is registered for cleanup
as soon as it exists (unittest's class cleanups run even when setUpClass fails half-way), and its
names carry this process's pid and a tag, so tests can run next to each other. Needs root."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cli"))
from harness import ROOT, TARGET, free_port, read, wait_for  # noqa: E402,F401

PID = os.getpid() % 10000


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def http(method, url, body=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def get(url):
    """The JSON at url, or None while it cannot be had (a server still starting)."""
    try:
        return http("GET", url)
    except OSError:
        return None


def nats_bin():
    binary = os.environ.get("NATS_SERVER_BIN") or os.path.join(ROOT, ".tools/nats-server/nats-server")
    if not os.path.exists(binary):
        raise RuntimeError(f"{binary} missing: run scripts/nats install")
    return binary


def require_root():
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root for ip netns / iptables")


def _free_subnet():
    """A 10.213.N.0/30 no interface on this host uses yet (another test process may hold one)."""
    used = sh("ip", "-o", "-4", "addr", "show").stdout
    for k in range(100):
        n = 100 + (PID + k) % 100
        if f"10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/30 subnet for the test namespace")


class Namespace:
    """A network namespace joined to the host by a veth pair. Inside, only replies to connections
    it opened come in (what a NAT gives a machine); on the host, it may open connections to
    `allow_ports` on its host-side address and to nothing else."""

    def __init__(self, tag, allow_ports, cleanups):
        self.name = f"br{tag}{PID}"
        self.veth_host, self.veth_ns = f"br{tag}h{PID}", f"br{tag}a{PID}"
        if len(self.veth_host) > 15:
            raise ValueError(f"interface name {self.veth_host} longer than 15 characters: shorten the tag")
        subnet = _free_subnet()
        self.host_ip, self.ns_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.host_rules = []
        cleanups(self.down)
        # A namespace of this name is a leftover of a killed run with the same pid.
        self.down()
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        sh("ip", "link", "set", self.veth_ns, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        for args in (["addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns], ["link", "set", self.veth_ns, "up"],
                     ["link", "set", "lo", "up"], ["route", "add", "default", "via", self.host_ip]):
            sh(*self.argv("ip", *args))
        ns_fw = self.argv("iptables")
        sh(*ns_fw, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        sh(*ns_fw, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh(*ns_fw, "-P", "INPUT", "DROP")
        rules = [["INPUT", "-i", self.veth_host, "-p", "tcp", "--dport", str(p), "-j", "ACCEPT"] for p in allow_ports]
        rules += [["INPUT", "-i", self.veth_host, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                  ["INPUT", "-i", self.veth_host, "-j", "DROP"]]
        for rule in rules:
            sh("iptables", "-A", *rule)
            self.host_rules.append(rule)

    def argv(self, *cmd):
        return ["ip", "netns", "exec", self.name, *cmd]

    def reaches(self, host, port, timeout=2):
        """Whether a TCP connection from inside the namespace to host:port is established."""
        probe = (f"import socket; socket.create_connection(({host!r}, {port}), timeout={timeout}).close()")
        return subprocess.run(self.argv(sys.executable, "-c", probe), capture_output=True,
                              timeout=timeout + 10).returncode == 0

    def down(self):
        for rule in self.host_rules:
            sh("iptables", "-D", *rule, check=False)
        self.host_rules = []
        # Deleting the host end removes its peer; deleting the namespace removes its firewall.
        sh("ip", "link", "del", self.veth_host, check=False)
        sh("ip", "netns", "del", self.name, check=False)


class Stack:
    """Processes (in start order) and a temp dir; stop() ends them in reverse order."""

    def __init__(self, prefix, cleanups):
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.procs = []
        cleanups(self.stop)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def start(self, name, argv, env=None):
        log = open(self.path(f"{name}.log"), "w")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        self.procs.append((name, proc, log))
        return proc

    def log(self, name):
        return read(self.path(f"{name}.log"))

    def alive(self, name):
        """Raises with the process's log when it has exited (a wait for it would only time out)."""
        for n, proc, _ in self.procs:
            if n == name and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-4000:]}")
        return True

    def stop(self):
        for _, proc, log in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        self.procs = []
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def central(self, nats_url):
        """bench-central on the host's loopback, connected to nats_url; returns its base URL."""
        port = free_port()
        cfg = self.path("machines.yaml")
        with open(cfg, "w") as f:
            f.write(f"results_dir: {self.path('results')}\nweb_dir: {os.path.join(ROOT, 'web')}\n")
        env = dict(os.environ, NATS_URL=nats_url, CENTRAL_HOST="127.0.0.1", CENTRAL_PORT=str(port), RUST_LOG="warn")
        self.start("central", [os.path.join(TARGET, "debug", "bench-central"), "--config", cfg], env)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self.alive("central") and get(url + "/health"), "central health")
        return url

    def agent(self, ns, nats_url, machine_id, label):
        """bench-agent (mock engine) inside the namespace; returns its HTTP port there."""
        http_port = free_port()
        cfg = self.path("agent.yaml")
        with open(cfg, "w") as f:
            f.write(f"machine_id: {machine_id}\nlabel: {label}\nengine: mock\nmock: {{tokens_per_s: 300, ttft_ms: 5}}\n"
                    f"llm_models: [mock-7b]\nbind_host: 0.0.0.0\nbind_port: {http_port}\nheartbeat_s: 1\n")
        self.start("agent", ns.argv(os.path.join(TARGET, "debug", "bench-agent"), "--config", cfg),
                   dict(os.environ, NATS_URL=nats_url, RUST_LOG="info"))
        return http_port


def machine_online(central, machine_id, timeout=30):
    def online():
        m = get(central + "/api/machines") or {"machines": []}
        return next((x for x in m["machines"] if x["machine_id"] == machine_id and x["status"] != "offline"), None)
    return wait_for(online, f"{machine_id} online in central", timeout=timeout)


def accepted_run(test, created, machine_id):
    """The POST /api/jobs answer accepted the job on this one machine; returns the run it named."""
    test.assertEqual(len(created["machines"]), 1, created)
    answer = created["machines"][0]
    test.assertRegex(answer.get("run_id", ""), r"^[0-9a-f]{12}-[0-9]+$", "an accept names its run")
    test.assertEqual(answer, {"machine_id": machine_id, "status": "accepted", "run_id": answer["run_id"]})
    return answer["run_id"]


def race(test, central, machine_id, prompt, max_tokens=16, timeout=60):
    """Starts a job for one machine through central, waits for it to be done and checks its result."""
    created = http("POST", central + "/api/jobs",
                   {"machines": [machine_id], "model": "mock-7b", "prompt": prompt, "max_tokens": max_tokens})
    run_id = accepted_run(test, created, machine_id)
    job_id = created["job_id"]

    def finished():
        j = get(f"{central}/api/jobs/{job_id}")
        return j if j and j["status"] == "done" else None
    job = wait_for(finished, f"job {job_id} done in central", timeout=timeout)
    m = job["machines"][0]
    test.assertEqual(m["machine_id"], machine_id)
    test.assertEqual(m["run_id"], run_id, "the run the accept named is the one that ran")
    test.assertEqual(m["repeats"][0]["gen_tokens"], max_tokens)
    test.assertTrue(m["output_text"])
    return job
