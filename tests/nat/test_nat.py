"""An agent behind NAT: it runs in its own network namespace whose firewall admits only replies
to connections it opened (what a NAT gives a machine) and which can reach nothing on the host but
the NATS port. It is discovered, runs a job, and its results reach central, which never learns
the agent's address. Needs root (ip netns, iptables)."""

import json
import socket
import unittest

from netlab import Namespace, Stack, accepted_run, free_port, get, http, nats_bin, read, require_root, wait_for


class BehindNat(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_root()
        # The namespace may reach the NATS port on the host and nothing else.
        cls.nats_port = free_port()
        cls.ns = Namespace("nat", [cls.nats_port], cls.addClassCleanup)
        host_ip = cls.ns.host_ip
        cls.stack = Stack("bench-nat-", cls.addClassCleanup)

        # NATS on the host, listening on the link's host address only.
        log = cls.stack.path("nats-server.log")
        cls.stack.start("nats", [nats_bin(), "-a", host_ip, "-p", str(cls.nats_port), "-js",
                                 "-sd", cls.stack.path("js"), "-l", log])
        wait_for(lambda: cls.stack.alive("nats") and "Server is ready" in read(log), "nats-server")
        nats_url = f"nats://{host_ip}:{cls.nats_port}"

        # Central on the host; the agent inside the namespace, dialling out.
        cls.central = cls.stack.central(nats_url)
        cls.agent_http = cls.stack.agent(cls.ns, nats_url, "natted", "Behind NAT")

    @classmethod
    def _get(cls, path):
        return get(cls.central + path)

    def test_discovered_runs_and_reports_without_inbound_route(self):
        # Discovered through the registry.
        def online():
            m = self._get("/api/machines") or {"machines": []}
            return next((x for x in m["machines"] if x["machine_id"] == "natted" and x["status"] != "offline"), None)
        machine = wait_for(online, "the natted agent online in central", timeout=30)
        self.assertEqual(machine["label"], "Behind NAT")

        # Nothing can connect to it: its local port is unreachable from the host.
        with self.assertRaises(OSError):
            socket.create_connection((self.ns.ns_ip, self.agent_http), timeout=2).close()

        # A race through central.
        created = http("POST", self.central + "/api/jobs",
                       {"machines": ["natted"], "model": "mock-7b", "prompt": "hello from behind NAT", "max_tokens": 16})
        run_id = accepted_run(self, created, "natted")
        job_id = created["job_id"]

        def finished():
            j = self._get(f"/api/jobs/{job_id}")
            return j if j and j["status"] == "done" else None
        job = wait_for(finished, "the job done in central", timeout=60)
        m = job["machines"][0]
        self.assertEqual(m["machine_id"], "natted")
        self.assertEqual(m["run_id"], run_id, "the run the accept named is the one that ran")
        self.assertEqual(m["repeats"][0]["gen_tokens"], 16)
        self.assertTrue(m["output_text"])

        # Central never learned the agent's address: not in anything it serves.
        for path in ("/api/machines", f"/api/jobs/{job_id}", "/api/jobs"):
            self.assertNotIn(self.ns.ns_ip, json.dumps(self._get(path)), path)


if __name__ == "__main__":
    unittest.main()
