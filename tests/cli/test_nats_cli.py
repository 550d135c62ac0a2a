"""Every `nats` CLI form the README documents, sent with an independent client (nats-py) to real
bench-agent processes on a real nats-server; each checks the documented reply and events."""

import asyncio
import json
import unittest
import uuid

import nats

from harness import Agent, NatsServer

TIMEOUT = 30

JOB = {"model": "mock-7b", "prompt": "The capital of France is", "max_tokens": 8}


class CliForms(unittest.IsolatedAsyncioTestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = NatsServer()
        cls.a = Agent(cls.server.url, "cli-a")
        cls.b = Agent(cls.server.url, "cli-b", extra="labels: {accelerator: nvidia}\n")

    @classmethod
    def tearDownClass(cls):
        cls.a.stop()
        cls.b.stop()
        cls.server.stop()

    async def asyncSetUp(self):
        self.nc = await nats.connect(self.server.url)

    async def asyncTearDown(self):
        await self.nc.drain()

    async def collect(self, subject, until_terminal_from, sub=None):
        """Events on `subject` until every machine in `until_terminal_from` sent its last event."""
        sub = sub or await self.nc.subscribe(subject)
        events, pending = [], set(until_terminal_from)
        while pending:
            msg = await asyncio.wait_for(sub.next_msg(timeout=TIMEOUT), TIMEOUT)
            e = json.loads(msg.data)
            self.assertIn("Nats-Msg-Id", msg.headers or {}, "every event carries its dedup id")
            # <job>.<machine>.<run>.<seq>, then the start of the event's signature (unguessable).
            sig = msg.headers.get("Bench-Sig", "")
            self.assertEqual(msg.headers["Nats-Msg-Id"], f"{e['job_id']}.{e['machine_id']}.{e['run_id']}.{e['seq']}.{sig[:11]}")
            self.assertEqual(len(sig), 86, "a signed event")
            events.append(e)
            if e["type"] in ("job_done", "job_error", "job_cancelled"):
                pending.discard(e["machine_id"])
        await sub.unsubscribe()
        return events

    async def test_request_reply_with_job_id(self):
        # nats req bench.jobs.cli-a '{"job_id":"...",...}'
        job_id = f"cli-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        msg = await self.nc.request("bench.jobs.cli-a", json.dumps(dict(JOB, job_id=job_id)).encode(), timeout=TIMEOUT)
        reply = json.loads(msg.data)
        run_id = reply.get("run_id", "")
        self.assertRegex(run_id, r"^[0-9a-f]{12}-[0-9]+$", "the accept names its run")
        self.assertEqual(reply, {"accepted": True, "job_id": job_id, "machine_id": "cli-a", "run_id": run_id, "position": 0})
        events = await self.collect(None, {"cli-a"}, sub)
        self.assertEqual({e["run_id"] for e in events}, {run_id}, "every event is of the run the reply named")
        types = [e["type"] for e in events]
        self.assertEqual(types[0], "job_accepted")
        self.assertEqual(types[-1], "job_done")
        self.assertIn("llm_token", types)
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(events[-1]["payload"]["gen_tokens"], 8)

    async def test_publish_without_job_id(self):
        # nats pub bench.jobs.cli-a '{...}'   (no reply, no job_id: the agent assigns a UUID)
        sub = await self.nc.subscribe("bench.events.>")
        await self.nc.publish("bench.jobs.cli-a", json.dumps(JOB).encode())
        while True:
            e = json.loads((await asyncio.wait_for(sub.next_msg(timeout=TIMEOUT), TIMEOUT)).data)
            if e["type"] == "job_accepted" and e["machine_id"] == "cli-a":
                break
        job_id = e["job_id"]
        self.assertEqual(str(uuid.UUID(job_id)), job_id)
        self.assertEqual(e["payload"]["job"]["job_id"], job_id)
        while e["type"] != "job_done":
            e = json.loads((await asyncio.wait_for(sub.next_msg(timeout=TIMEOUT), TIMEOUT)).data)
            self.assertEqual(e["job_id"], job_id)
        await sub.unsubscribe()

    async def test_publish_with_job_id(self):
        job_id = f"cli-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        await self.nc.publish("bench.jobs.cli-b", json.dumps(dict(JOB, job_id=job_id)).encode())
        events = await self.collect(None, {"cli-b"}, sub)
        self.assertEqual(events[-1]["type"], "job_done")

    async def test_publishing_the_same_job_id_again_is_a_new_run_stored_in_full(self):
        # nats pub bench.jobs.cli-b '{"job_id":"race-1",...}'  twice: both runs stored, never dropped
        job_id = f"rerun-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        await self.nc.publish("bench.jobs.cli-b", json.dumps(dict(JOB, job_id=job_id)).encode())
        first = await self.collect(None, {"cli-b"}, sub)
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        await self.nc.publish("bench.jobs.cli-b", json.dumps(dict(JOB, job_id=job_id)).encode())
        second = await self.collect(None, {"cli-b"}, sub)
        runs = [{e["run_id"] for e in first}, {e["run_id"] for e in second}]
        self.assertEqual([len(r) for r in runs], [1, 1])
        self.assertNotEqual(runs[0], runs[1], "a new run id, not a retry")
        for events in (first, second):
            self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
            self.assertEqual(events[-1]["type"], "job_done")
        # JetStream kept both: what `nats stream view BENCH_EVENTS` would show.
        js = self.nc.jetstream()
        stored = []
        psub = await js.subscribe(f"bench.events.{job_id}", ordered_consumer=True)
        while len(stored) < len(first) + len(second):
            msg = await psub.next_msg(timeout=TIMEOUT)
            stored.append(json.loads(msg.data))
        await psub.unsubscribe()
        self.assertEqual(sorted((e["run_id"], e["seq"]) for e in stored),
                         sorted((e["run_id"], e["seq"]) for e in first + second))

    async def test_broadcast_reaches_every_agent_under_one_job_id(self):
        # nats pub bench.jobs.all '{"job_id":"race-1",...}'
        job_id = f"race-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        await self.nc.publish("bench.jobs.all", json.dumps(dict(JOB, job_id=job_id)).encode())
        events = await self.collect(None, {"cli-a", "cli-b"}, sub)
        done = {e["machine_id"] for e in events if e["type"] == "job_done"}
        self.assertEqual(done, {"cli-a", "cli-b"})

    async def test_broadcast_request_without_job_id_shares_one_id(self):
        # nats req bench.jobs.all '{...}' --replies=0 : every agent answers on the same inbox and,
        # having no job_id, derives the same one from it.
        inbox = self.nc.new_inbox()
        replies = await self.nc.subscribe(inbox)
        await self.nc.publish("bench.jobs.all", json.dumps(JOB).encode(), reply=inbox)
        got = [json.loads((await replies.next_msg(timeout=TIMEOUT)).data) for _ in range(2)]
        self.assertEqual({r["machine_id"] for r in got}, {"cli-a", "cli-b"})
        self.assertTrue(all(r["accepted"] for r in got))
        self.assertEqual(len({r["job_id"] for r in got}), 1, got)

    async def test_broadcast_profile_with_auto_repeats(self):
        # nats req --replies 0 bench.jobs.all '{"job_id":"pp-race","profile":"pp512-tg128","repeat":"auto",...}'
        job_id = f"pp-{uuid.uuid4().hex[:8]}"
        inbox = self.nc.new_inbox()
        replies = await self.nc.subscribe(inbox)
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        job = {"job_id": job_id, "model": "mock-7b", "profile": "pp512-tg128", "num_ctx": 4096,
               "repeat": "auto", "max_repeat": 8, "warmup": 1}
        await self.nc.publish("bench.jobs.all", json.dumps(job).encode(), reply=inbox)
        got = [json.loads((await replies.next_msg(timeout=TIMEOUT)).data) for _ in range(2)]
        self.assertTrue(all(r["accepted"] for r in got), got)
        events = await self.collect(None, {"cli-a", "cli-b"}, sub)
        for d in (e["payload"] for e in events if e["type"] == "job_done"):
            self.assertIn(d["stop_reason"], ("precision", "decided", "max_repeat"))
            self.assertEqual(d["shape"], {"prompt_tokens": 512, "depth": 0, "max_tokens": 128, "ignore_eos": True})
            measured = [m for m in d["repeats"] if not m["warmup"] and not m.get("cold")]
            self.assertTrue(6 <= len(measured) <= 8, len(measured))
            for m in d["repeats"]:
                self.assertEqual((m["prompt_tokens"], m["gen_tokens"]), (512, 128))
            tg = d["summary"]["tg_tokens_per_s"]
            self.assertLessEqual(tg["ci_low"], tg["median"])
            self.assertLessEqual(tg["median"], tg["ci_high"])

    async def test_broadcast_matrix_with_a_concurrency_sweep(self):
        # nats pub bench.jobs.all '{"job_id":"mx-1","model":"mock-7b","matrix":{"max_tokens":[4,8],"concurrency":[1,2]},...}'
        job_id = f"mx-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        job = dict(JOB, job_id=job_id, repeat=2,
                   matrix={"max_tokens": [4, 8], "concurrency": [1, 2]}, slo={"ttft_p99_ms": 10000})
        await self.nc.publish("bench.jobs.all", json.dumps(job).encode())
        events = await self.collect(None, {"cli-a", "cli-b"}, sub)
        keys = ["max_tokens=4,concurrency=1", "max_tokens=4,concurrency=2",
                "max_tokens=8,concurrency=1", "max_tokens=8,concurrency=2"]
        for machine in ("cli-a", "cli-b"):
            mine = [e for e in events if e["machine_id"] == machine]
            self.assertEqual([e["payload"]["cell"] for e in mine if e["type"] == "cell_done"], keys)
            done = mine[-1]
            self.assertEqual(done["type"], "job_done")
            cells = done["payload"]["cells"]
            self.assertEqual([c["cell"] for c in cells], keys)
            for c in cells:
                self.assertEqual(c["status"], "done")
                conc = int(c["values"]["concurrency"])
                self.assertEqual((c["load"]["concurrency"], c["load"]["requests"]), (conc, 2 * conc))
                self.assertEqual(c["load"]["output_tokens"], 2 * conc * int(c["values"]["max_tokens"]))
            runs = [m for m in done["payload"]["repeats"] if not m["warmup"]]
            self.assertEqual(len(runs), 2 * (2 + 4))
            self.assertEqual({m["cell"] for m in runs}, set(keys))

    async def test_depth_needs_an_engine_tokenizer(self):
        # nats req bench.jobs.local '{"prompt_tokens":256,"depth":2048,...}' on an engine without
        # /tokenize: accepted, then a coded failure rather than a shape that is not what it says.
        job_id = f"depth-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        job = {"job_id": job_id, "model": "mock-7b", "prompt_tokens": 256, "depth": 2048,
               "max_tokens": 64, "num_ctx": 4096, "repeat": 6}
        msg = await self.nc.request("bench.jobs.cli-a", json.dumps(job).encode(), timeout=TIMEOUT)
        self.assertTrue(json.loads(msg.data)["accepted"])
        events = await self.collect(None, {"cli-a"}, sub)
        self.assertEqual(events[-1]["type"], "job_error")
        self.assertEqual(events[-1]["payload"]["code"], "unsupported")

    async def test_broadcast_with_selector(self):
        job_id = f"sel-{uuid.uuid4().hex[:8]}"
        inbox = self.nc.new_inbox()
        replies = await self.nc.subscribe(inbox)
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        job = dict(JOB, job_id=job_id, selector={"accelerator": "nvidia"})
        await self.nc.publish("bench.jobs.all", json.dumps(job).encode(), reply=inbox)
        reply = json.loads((await replies.next_msg(timeout=TIMEOUT)).data)
        self.assertEqual(reply["machine_id"], "cli-b")
        events = await self.collect(None, {"cli-b"}, sub)
        self.assertEqual({e["machine_id"] for e in events}, {"cli-b"}, "cli-a stays silent")

    async def test_cancel(self):
        # nats pub bench.cancel.<job_id> ''
        job_id = f"cxl-{uuid.uuid4().hex[:8]}"
        sub = await self.nc.subscribe(f"bench.events.{job_id}")
        job = dict(JOB, job_id=job_id, max_tokens=4000)
        reply = json.loads((await self.nc.request("bench.jobs.cli-a", json.dumps(job).encode(), timeout=TIMEOUT)).data)
        self.assertTrue(reply["accepted"])
        while True:
            e = json.loads((await asyncio.wait_for(sub.next_msg(timeout=TIMEOUT), TIMEOUT)).data)
            if e["type"] == "llm_token":
                break
        await self.nc.publish(f"bench.cancel.{job_id}", b"")
        events = await self.collect(None, {"cli-a"}, sub)
        self.assertEqual(events[-1]["type"], "job_cancelled")

    async def test_bad_job_reply(self):
        msg = await self.nc.request("bench.jobs.cli-a", b'{"model": "mock-7b", "prompt": "x", "job_id": "a.b"}', timeout=TIMEOUT)
        reply = json.loads(msg.data)
        self.assertFalse(reply["accepted"])
        self.assertEqual(reply["error"]["code"], "invalid_id")

    async def test_registry_and_micro_service(self):
        # nats kv ls bench_agents ; nats micro ls bench-agent
        js = self.nc.jetstream()
        kv = await js.key_value("bench_agents")
        keys = set(await kv.keys())
        self.assertTrue({"cli-a", "cli-b"} <= keys, keys)
        entry = json.loads((await kv.get("cli-b")).value)
        self.assertEqual(entry["labels"], {"accelerator": "nvidia"})
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        await self.nc.publish("$SRV.INFO.bench-agent", b"", reply=inbox)
        infos = [json.loads((await sub.next_msg(timeout=TIMEOUT)).data) for _ in range(2)]
        self.assertEqual({i["metadata"]["machine_id"] for i in infos}, {"cli-a", "cli-b"})
        self.assertTrue(all(i["name"] == "bench-agent" for i in infos))


if __name__ == "__main__":
    unittest.main()
