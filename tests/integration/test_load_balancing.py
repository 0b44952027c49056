#!/usr/bin/env python3
"""balancer.algorithm: load — requests avoid the instance whose own queue is long (its
vLLM-style /metrics, scraped by Sluice) and come back once it drains."""

import threading

import harness

CHAT = "/v1/chat/completions"
from harness import SluiceTestCase, http_request, instance, route, wait_until


def chat(marker="x"):
    return {"model": "m", "messages": [{"role": "user", "content": marker}]}


class LoadBalancingTest(SluiceTestCase):
    def setUp(self):
        super().setUp()
        # One generation slot each: extra requests wait in the mock's queue, which its
        # /metrics reports as vllm:num_requests_waiting.
        self.a = self.start_mock("--max-concurrency", "1", "--queue", "50", name="a")
        self.b = self.start_mock("--max-concurrency", "1", "--queue", "50", name="b")
        insts = [instance(n, m.url(CHAT), load={"metrics_url": m.url("/metrics"),
                                                "interval": harness.Raw("100ms")})
                 for n, m in (("a", self.a), ("b", self.b))]
        rt = route("chat", [CHAT], "a", balancer={"algorithm": harness.Raw("load")})
        rt["targets"] = [{"instance": "a"}, {"instance": "b"}]
        self.admin_port = harness.free_port()
        port = harness.free_port()
        text = harness.gateway_config(port, insts, [rt], server={"workers": 1})
        text += "admin:\n  listen: 127.0.0.1:%d\n  key: none\n" % self.admin_port
        self.sluice = self.start_sluice(text, port=port)

    def load_of(self, name):
        """The load Sluice has scraped for an instance (GET /instances), or None."""
        r = http_request(self.admin_port, "GET", "/instances")
        self.assertEqual(r.status, 200, r)
        for i in r.json():
            if i["name"] == name:
                return i.get("load")
        raise AssertionError("no instance %s in %r" % (name, r.json()))

    def served_by(self):
        r = http_request(self.sluice.port, "POST", CHAT, json_body=chat())
        self.assertEqual(r.status, 200, r)
        return r.header("x-sluice-instance")

    def test_long_queue_is_avoided_until_it_drains(self):
        # Both idle: ties are shared, so both get traffic.
        seen = {self.served_by() for _ in range(10)}
        self.assertEqual(seen, {"a", "b"})

        # Fill a's queue directly (not through Sluice): 1 running, 3 waiting.
        busy = [threading.Thread(target=http_request, daemon=True,
                                 args=(self.a.port, "POST", CHAT),
                                 kwargs={"json_body": dict(chat(), mock={"ttft_ms": 1200}),
                                         "timeout": 60})
                for _ in range(4)]
        for t in busy:
            t.start()
        wait_until(lambda: self.a.stats()["waiting"] >= 3, message="a's queue to fill")
        wait_until(lambda: (self.load_of("a") or {}).get("waiting", 0) >= 3,
                   message=lambda: "Sluice to scrape a's queue (sees %r)" % self.load_of("a"))

        # Every request goes to b while a's queue is long (round robin would alternate).
        run = [self.served_by() for _ in range(10)]
        self.assertEqual(run, ["b"] * 10)

        # When a has drained, it gets traffic again.
        for t in busy:
            t.join(60)
        wait_until(lambda: self.served_by() == "a", message="traffic to return to a")


if __name__ == "__main__":
    harness.main()
