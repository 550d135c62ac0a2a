"""A site behind NAT with its own NATS server: nats/conf/leaf.conf (or leaf-proxy.conf), as
shipped, runs in a network namespace whose firewall admits only replies to connections it opened
and which may reach one port on the host: the hub's leaf node port, or (LeafThroughProxy) only an
HTTP CONNECT proxy's. The hub (dev.conf plus a leafnodes listener with a password) and central run
on the host; a mock agent in the namespace talks only to the local leaf server. It is discovered
through the hub, runs a race through central, and its events are stored in the hub's BENCH_EVENTS
(the leaf has no JetStream: it forwards the agent's JetStream calls). Needs root."""

import os
import secrets
import socket
import socketserver
import threading
import unittest

from netlab import ROOT, Namespace, Stack, free_port, get, machine_online, nats_bin, race, read, require_root, wait_for

CONF = os.path.join(ROOT, "nats", "conf")
SITE_PORT = 4222  # leaf.conf's `listen`, inside the namespace


class ConnectProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that tunnels CONNECT and refuses every other request; it records each
    CONNECT target, and each refused request line."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr):
        self.targets, self.refused = [], []
        super().__init__(addr, _ConnectHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


class _ConnectHandler(socketserver.StreamRequestHandler):
    def handle(self):
        request = self.rfile.readline(8192).decode("latin-1").strip()
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass  # headers (the leaf sends Host and User-Agent)
        method, _, rest = request.partition(" ")
        target = rest.partition(" ")[0]
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or not host or not port.isdigit():
            self.server.refused.append(request)
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\n\r\n")
            return
        self.server.targets.append(target)
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        upstream.settimeout(None)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        back = threading.Thread(target=self._pipe_back, args=(upstream,), daemon=True)
        back.start()
        try:
            # read1 from rfile: it may already hold bytes read past the headers.
            while data := self.rfile.read1(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _shut(upstream)
            back.join(timeout=10)
            upstream.close()

    def _pipe_back(self, upstream):
        try:
            while data := upstream.recv(65536):
                self.connection.sendall(data)
        except OSError:
            pass
        finally:
            _shut(self.connection)


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _LeafSite:
    """The stack both tests share; through_proxy picks leaf-proxy.conf and the proxy."""

    through_proxy = False
    site, machine_id = "", ""

    @classmethod
    def setUpClass(cls):
        require_root()
        cls.hub_port, cls.leaf_port, cls.proxy_port, cls.hub_http = (free_port() for _ in range(4))
        # The namespace's one way out: the hub's leaf port, or only the proxy's.
        cls.ns = Namespace("lf" if not cls.through_proxy else "lp",
                           [cls.proxy_port if cls.through_proxy else cls.leaf_port], cls.addClassCleanup)
        host_ip = cls.ns.host_ip
        if cls.through_proxy:
            cls.proxy = ConnectProxy((host_ip, cls.proxy_port))
            cls.addClassCleanup(cls.proxy.close)
        cls.stack = Stack("bench-leaf-", cls.addClassCleanup)

        # The hub: dev.conf (its JetStream, pings, payload limit) with the JetStream domain that
        # leaf.conf's mappings address, plus a leaf node listener that wants a password. Clients
        # (central) on the link's host address too, which the namespace may not reach.
        dev = read(os.path.join(CONF, "dev.conf"))
        if "\njetstream {\n" not in dev:
            raise RuntimeError("nats/conf/dev.conf has no jetstream block to give the domain to")
        password = secrets.token_hex(8)
        with open(cls.stack.path("hub.conf"), "w") as f:
            f.write(dev.replace("\njetstream {\n", "\njetstream {\n  domain: hub\n")
                    + f'\nleafnodes {{\n  listen: "{host_ip}:{cls.leaf_port}"\n'
                    f'  authorization {{ user: site, password: "{password}" }}\n}}\n')
        hub_log = cls.stack.path("hub-server.log")
        cls.stack.start("hub", [nats_bin(), "-c", cls.stack.path("hub.conf"), "-a", host_ip, "-p", str(cls.hub_port),
                                "-m", str(cls.hub_http), "-sd", cls.stack.path("js"), "-l", hub_log])
        wait_for(lambda: cls.stack.alive("hub") and "Server is ready" in read(hub_log), "hub nats-server")
        cls.central = cls.stack.central(f"nats://{host_ip}:{cls.hub_port}")

        # The site's server, as shipped, inside the namespace; its settings from the environment.
        env = dict(os.environ, BENCH_SITE_NAME=cls.site,
                   BENCH_HUB_LEAF_URL=f"nats-leaf://site:{password}@{host_ip}:{cls.leaf_port}")
        if cls.through_proxy:
            env["BENCH_LEAF_PROXY_URL"] = f"http://{host_ip}:{cls.proxy_port}"
        conf = os.path.join(CONF, "leaf-proxy.conf" if cls.through_proxy else "leaf.conf")
        cls.leaf_log = cls.stack.path("leaf-server.log")
        cls.stack.start("leaf", cls.ns.argv(nats_bin(), "-c", conf, "-l", cls.leaf_log), env)
        wait_for(lambda: cls.stack.alive("leaf") and cls._leafs(), "the site's leaf connection on the hub")

        cls.agent_http = cls.stack.agent(cls.ns, f"nats://127.0.0.1:{SITE_PORT}", cls.machine_id, f"Site {cls.site}")

    @classmethod
    def _leafs(cls):
        return (get(f"http://127.0.0.1:{cls.hub_http}/leafz") or {}).get("leafs")

    def _events_on_hub(self):
        jsz = get(f"http://127.0.0.1:{self.hub_http}/jsz?streams=true") or {}
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] == "BENCH_EVENTS":
                    return stream["state"]["messages"]
        return 0

    def check_leaf(self):
        """The site server is a leaf of the hub, without JetStream of its own."""
        leafs = self._leafs()
        self.assertEqual(len(leafs), 1, leafs)
        self.assertEqual(leafs[0]["name"], self.site)
        self.assertNotIn("Starting JetStream", read(self.leaf_log))
        return leafs[0]

    def check_site_races(self):
        """Discovered through the hub, a race through central, its events in the hub's stream."""
        machine = machine_online(self.central, self.machine_id)
        self.assertEqual(machine["label"], f"Site {self.site}")
        before = self._events_on_hub()
        job = race(self, self.central, self.machine_id, f"hello from {self.site}")
        # The agent published them to the leaf; only the hub has a stream to keep them.
        wait_for(lambda: self._events_on_hub() > before, "the race's events in the hub's BENCH_EVENTS", timeout=10)
        return job

    def check_no_way_in(self):
        """Nothing on the host can open a connection into the namespace."""
        for port in (SITE_PORT, self.agent_http):
            with self.assertRaises(OSError, msg=f"{self.ns.ns_ip}:{port} reachable from the host"):
                socket.create_connection((self.ns.ns_ip, port), timeout=2).close()


class LeafNode(_LeafSite, unittest.TestCase):
    site, machine_id = "site_nat", "leafed"

    def test_site_behind_nat_through_a_leaf_node(self):
        leaf = self.check_leaf()
        self.assertEqual(leaf["ip"], self.ns.ns_ip)  # dialled straight out of the namespace
        self.check_site_races()
        self.check_no_way_in()
        # Out of the namespace, only the leaf port: not the hub's client port next to it.
        self.assertFalse(self.ns.reaches(self.ns.host_ip, self.hub_port))


class LeafThroughProxy(_LeafSite, unittest.TestCase):
    through_proxy = True
    site, machine_id = "site_proxy", "proxied"

    def test_site_behind_an_http_only_proxy(self):
        leaf = self.check_leaf()
        self.assertNotEqual(leaf["ip"], self.ns.ns_ip)  # the hub saw the proxy, not the site
        hub_leaf = f"{self.ns.host_ip}:{self.leaf_port}"
        self.assertEqual(set(self.proxy.targets), {hub_leaf})
        self.check_site_races()
        self.check_no_way_in()
        # The namespace cannot reach the hub's leaf port itself, only through the proxy.
        self.assertFalse(self.ns.reaches(self.ns.host_ip, self.leaf_port))
        # And the proxy tunnels nothing but CONNECT.
        with socket.create_connection((self.ns.host_ip, self.proxy_port), timeout=5) as s:
            s.sendall(f"GET http://{hub_leaf}/ HTTP/1.1\r\nHost: {hub_leaf}\r\n\r\n".encode())
            self.assertTrue(s.recv(4096).startswith(b"HTTP/1.1 405"))
        self.assertEqual(self.proxy.refused, [f"GET http://{hub_leaf}/ HTTP/1.1"])
        self.assertEqual(set(self.proxy.targets), {hub_leaf})


if __name__ == "__main__":
    unittest.main()
