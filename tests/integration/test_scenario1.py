"""test_scenario1.py — the case study's scenario 1 (issue 3): on-prem instances take the traffic,
the cloud is Plan B; when on-prem dies traffic moves with no error reaching the client, when it
comes back traffic returns by itself, and operators learn of it only through alerts.

  * FailoverUnderLoadTest: the seed's three instances (priorities 10/5/1, active probes on the
    two on-prem ones) under continuous load from 3 threads; SIGKILL the priority-10 mock, then
    the priority-5 one, then restart both on their ports. Zero client-visible errors; each
    health transition is one WARN line and one webhook POST.
  * ExampleConfigTest: conf/examples/scenario1-fallback.yaml, with its environment variables
    pointed at local mocks, passes `sluice -t` and behaves as the article describes.
"""

import json
import os
import re
import subprocess
import time

import harness
from harness import free_port, http_request
from sched_support import (CHAT, SANITIZED, LoadGen, WebhookReceiver, active_checks, body,
                           chat, config, inst, kill_mock, marker, restart_mock, rte,
                           wait_health)

SLACK = 6.0 if SANITIZED else 2.0   # on top of the configured recovery bound


def load_body():
    """Each request spends 20 ms in the mock before its answer, so a SIGKILL usually finds
    some of them in flight: those must fail over too."""
    return body(mock={"tokens": 2, "ttft_ms": 20})


def transitions_in_log(log, name):
    """[(from, to)] of the instance's WARN transition lines, in order."""
    return re.findall(r"\[warn\] instance %s: (healthy|unhealthy) -> (healthy|unhealthy) "
                      % re.escape(name), log)


class FailoverUnderLoadTest(harness.SluiceTestCase):

    def test_kill_and_restart_on_prem_under_load(self):
        ma, mb, mc = (self.start_mock(name=n) for n in ("onprem-a", "onprem-b", "cloud"))
        hook = WebhookReceiver()
        self.addCleanup(hook.close)
        admin, port = free_port(), free_port()
        interval_s, successes = 0.2, 1
        checks = {"active": active_checks(interval="200ms", successes=successes, failures=1,
                                          timeout="1s")}
        gw = self.start_sluice(config(
            port,
            [inst("qwen-a", ma, checks=checks), inst("qwen-b", mb, checks=checks),
             inst("cloud", mc)],
            [rte("qwen", [CHAT], [("qwen-a", 10), ("qwen-b", 5), ("cloud", 1)],
                 fallback={"on": ["unhealthy", "quota", "http_429", "http_5xx", "timeout",
                                  "connect_error"], "max_attempts": 3})],
            admin_port=admin, webhook_port=hook.port), port=port)
        for name in ("qwen-a", "qwen-b", "cloud"):
            wait_health(admin, name, True)

        load = LoadGen(gw.port, threads=3, body_fn=load_body).start()
        self.addCleanup(load.stop)
        t = time.monotonic()
        load.wait_all_from("qwen-a", t, n=20)

        # The priority-10 instance dies: priority 5 takes over, nobody notices.
        t_kill_a = time.monotonic()
        kill_mock(ma)
        load.wait_all_from("qwen-b", t_kill_a, n=20)
        gw.wait_log(r"instance qwen-a: healthy -> unhealthy")

        # Priority 5 dies too: the cloud.
        t_kill_b = time.monotonic()
        kill_mock(mb)
        load.wait_all_from("cloud", t_kill_b, n=20)
        gw.wait_log(r"instance qwen-b: healthy -> unhealthy")

        # Both come back on their ports: traffic returns to priority 10 by itself.
        t_back = time.monotonic()
        restart_mock(self, mb)
        restart_mock(self, ma)
        t_restart_a = time.monotonic()
        bound = interval_s * successes + 1.0
        load.wait_all_from("qwen-a", t_back, n=20, timeout=harness.DEADLINE)
        first_a = min(r.t1 for r in load.since(t_restart_a) if r.instance == "qwen-a")
        harness.note("traffic back on qwen-a %.2f s after its restart (bound %.1f s)"
                     % (first_a - t_restart_a, bound))
        self.assertLessEqual(first_a - t_restart_a, bound + SLACK,
                             "traffic took too long to return to the recovered instance")
        gw.wait_log(r"instance qwen-a: unhealthy -> healthy")
        gw.wait_log(r"instance qwen-b: unhealthy -> healthy")
        load.stop()

        results = load.snapshot()
        harness.note("%d requests, %s" % (len(results), {n: sum(r.instance == n for r in results)
                                                         for n in ("qwen-a", "qwen-b", "cloud")}))
        harness.note("failovers: %d" % gw.log().count("failing over from"))
        self.assertEqual(load.errors(), [], "client-visible errors during fallback")
        phase1 = {r.instance for r in results if t_kill_a <= r.t0 and r.t1 < t_kill_b}
        self.assertNotIn("cloud", phase1, "traffic skipped priority 5 while it was healthy")
        phase2 = {r.instance for r in results if t_kill_b <= r.t0 and r.t1 < t_back}
        self.assertNotIn("qwen-a", phase2, "a dead instance served requests")

        # Each transition: once in the log, once at the webhook, in order per instance.
        expected = {"qwen-a": [("healthy", "unhealthy"), ("unhealthy", "healthy")],
                    "qwen-b": [("healthy", "unhealthy"), ("unhealthy", "healthy")]}
        log = gw.log()
        for name, trans in expected.items():
            self.assertEqual(transitions_in_log(log, name), trans, "log lines of %s" % name)
        self.assertEqual(transitions_in_log(log, "cloud"), [])
        events = hook.wait_health_events(4)
        for e in events:
            self.assertTrue({"instance", "from", "to"} <= set(e), e)
        for name, trans in expected.items():
            got = [(e["from"], e["to"]) for e in events if e["instance"] == name]
            self.assertEqual(got, trans, "webhook events of %s: %r" % (name, events))
        self.assertEqual(len(events), 4, "unexpected webhook events: %r" % events)
        self.assertEqual(len(hook.health_events()), 4)


class ExampleConfigTest(harness.SluiceTestCase):
    """conf/examples/scenario1-fallback.yaml as shipped passes `sluice -t`; a copy with only
    the fixed addresses (listener 0.0.0.0:8080, admin 127.0.0.1:9180, the DashScope endpoint)
    pointed at loopback and the 30 s probe interval shortened to 1 s runs the scenario."""

    EXAMPLE = os.path.join(harness.SOURCE_DIR, "conf", "examples", "scenario1-fallback.yaml")
    NLB, HOST1, CLOUD = ("qwen2.5-32b-instruct-c", "qwen2.5-32b-instruct-b",
                         "qwen2.5-32b-instruct-ali-bailian")

    def env(self, c, b):
        return {"SLUICE_ADMIN_KEY": "admin-key-for-tests", "ALIYUN_API_KEY": "sk-aliyun",
                "CUSTOM_API_KEY": "sk-custom", "CUSTOM_HOST_1": "127.0.0.1",
                "CUSTOM_PORT_1": str(b.port), "NLB_API_KEY": "sk-nlb",
                "CUSTOM_NLB_HOST": "127.0.0.1", "CUSTOM_NLB_PORT": str(c.port)}

    def start_with_env(self, text, port, env):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)   # the harness spawns with a copy of os.environ
        try:
            return self.start_sluice(text, port=port)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_example_loads_and_behaves_as_the_article_describes(self):
        mc = self.start_mock(name="nlb-c")
        mb = self.start_mock(name="host1-b")
        cloud = self.start_mock(name="cloud")
        env = self.env(mc, mb)

        p = subprocess.run([harness.sluice_bin(), "-t", "-c", self.EXAMPLE],
                           env=dict(harness.sanitizer_env(), **env), capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("valid (3 instances, 1 routes", p.stdout + p.stderr)

        port, admin = free_port(), free_port()
        text = open(self.EXAMPLE).read()
        for old, new, n in (("0.0.0.0:8080", "127.0.0.1:%d" % port, 1),
                            ("listen: 127.0.0.1:9180", "listen: 127.0.0.1:%d" % admin, 1),
                            ("https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions",
                             cloud.url(CHAT), 1),
                            ("interval: 30,", "interval: 1,", 4)):
            self.assertEqual(text.count(old), n, "the example changed: %r" % old)
            text = text.replace(old, new)
        gw = self.start_with_env(text, port, env)
        key = env["SLUICE_ADMIN_KEY"]
        self.assertEqual(http_request(admin, "GET", "/instances").status, 401)
        for name in (self.NLB, self.HOST1, self.CLOUD):
            wait_health(admin, name, True, key=key)

        # Probes at boot, with the case study's request.
        for m in (mc, mb):
            q = harness.wait_until(lambda: [q for q in m.requests() if "max_tokens" in q["body"]],
                                   message="a probe of %s" % m.name)[0]
            self.assertEqual((q["method"], q["path"]), ("POST", CHAT))
            self.assertEqual(q["body"], '{"model":"Qwen/Qwen2.5-32B-Instruct","messages":'
                             '[{"role":"user","content":"0"}],"stream":false,"max_tokens":1}')

        # By default everything goes to priority 10, as that instance's model and key.
        for path in ("/anything", CHAT):
            mark = marker()
            r = chat(gw.port, mark, path=path)
            self.assertEqual((r.status, r.header("x-sluice-instance")), (200, self.NLB), r)
            q = mc.wait_request(mark)
            self.assertEqual(q["headers"].get("authorization"), "Bearer sk-nlb")
            self.assertEqual(json.loads(q["body"])["model"], "Qwen/Qwen2.5-32B-Instruct")

        load = LoadGen(gw.port, threads=3, path="/anything", body_fn=load_body).start()
        self.addCleanup(load.stop)
        t_kill_c = time.monotonic()
        kill_mock(mc)
        load.wait_all_from(self.HOST1, t_kill_c, n=20)
        t_kill_b = time.monotonic()
        kill_mock(mb)
        load.wait_all_from(self.CLOUD, t_kill_b, n=20)
        mark = marker()
        r = chat(gw.port, mark, path="/anything")
        self.assertEqual((r.status, r.header("x-sluice-instance")), (200, self.CLOUD), r)
        q = cloud.wait_request(mark)
        self.assertEqual(q["headers"].get("authorization"), "Bearer sk-aliyun")
        self.assertEqual(json.loads(q["body"])["model"], "qwen2.5-32b-instruct")
        wait_health(admin, self.NLB, False, key=key)

        # On-prem recovers: traffic reverts by itself.
        t_back = time.monotonic()
        restart_mock(self, mb)
        restart_mock(self, mc)
        load.wait_all_from(self.NLB, t_back, n=20)
        wait_health(admin, self.NLB, True, key=key)
        load.stop()
        self.assertEqual(load.errors(), [], "client-visible errors during fallback")
        log = gw.log()
        for name in (self.NLB, self.HOST1):
            self.assertEqual(transitions_in_log(log, name),
                             [("healthy", "unhealthy"), ("unhealthy", "healthy")], name)


if __name__ == "__main__":
    harness.main()
