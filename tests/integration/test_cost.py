"""test_cost.py — cost budgets (issue 9): instance prices and `strategy: cost` limits, end to end
with the memory store and with a real redis-server shared by two gateways.

Every request's cost is known exactly: the mock bills prompt_tokens = ceil(content bytes / 4)
(+ its cache_read tokens, reported as cached) and completion_tokens = the tokens it is told to
produce, and the prices are chosen so that costs are short decimals:

  cloud    price { input: 1000, cached_input: 250, output: 2000 } per million tokens
           → 100 prompt + 400 completion tokens cost 0.1 + 0.8 = 0.9
  premium  price { input: 3000, output: 6000 } → the same request costs 0.3 + 2.4 = 2.7
  onprem   no price: not counted by cost limits

  CostBudgetTest   a consumer's budget of 2.5 a window: admitted while below it, then 429
                   (Retry-After, no x-ratelimit-*-tokens, limit_id in the access log), shown in
                   /consumers in price units; one budget across instances, each priced by its
                   own; an unpriced instance still serves; an instance's own cost limit; the
                   loader refuses a cost limit on an instance without a price; cached tokens
                   at cached_input; `cost` in the access log and sluice_cost_total.
  CostRedisTest    the same budget on one Redis for two gateways: one budget, counters in
                   micro-units.
"""

import os
import re
import subprocess
import unittest

import harness
import quota_helpers as qh
from harness import http_request, wait_until
from quota_helpers import CHAT, bearer, chat, consumer, limit

BUDGET_ID = "consumer:team:*:cost:1h"
PRICES = {
    "cloud": {"input": 1000, "cached_input": 250, "output": 2000},
    "premium": {"input": 3000, "output": 6000},
}
PROMPT, COMPLETION = 100, 400
COST = {"cloud": 0.9, "premium": 2.7}  # of one chat(PROMPT, COMPLETION)


def cost_limit(value, window="1h", instance=None):
    return limit(value, window, "cost", instance=instance)


def body(model, **kw):
    return chat(PROMPT, COMPLETION, model=model, **kw)


def metric_value(text, name, **labels):
    """The sample of name with exactly these labels, or None."""
    want = ",".join('%s="%s"' % (k, v) for k, v in labels.items())
    m = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(name), re.escape(want)), text, re.M)
    return float(m.group(1)) if m else None


class CostCase(qh.QuotaTestCase):

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 40)  # `window: 1h` is a clock-aligned hour
        self.key = qh.make_key("team")
        self.mock = self.start_mock()

    def instances(self, cloud_limits=None):
        out = []
        for name in ("cloud", "premium", "onprem"):
            extra = {}
            if name in PRICES:
                extra["price"] = dict(PRICES[name])
            out.append(qh.quota_instance(name, self.mock.url(),
                                         limits=cloud_limits if name == "cloud" else None,
                                         **extra))
        return out

    @staticmethod
    def routes():
        # One path; the requested model chooses the instance.
        return [qh.quota_route(name, [CHAT], [name], models=[name])
                for name in ("cloud", "premium", "onprem")]

    def gateway(self, budget=2.5, cloud_limits=None, **cfg):
        limits = [cost_limit(budget)] if budget is not None else []
        return self.start_gateway(instances=self.instances(cloud_limits), routes=self.routes(),
                                  consumers=[consumer("team", [self.key], limits)], **cfg)

    def client(self, gw):
        c = qh.Client(gw.port, bearer(self.key))
        self.addCleanup(c.close)
        return c

    def budget(self, gw):
        lims = qh.consumer_limits(gw.admin_port, "team")
        self.assertIn(BUDGET_ID, lims, repr(lims))
        return lims[BUDGET_ID]

    def assertCostRefusal(self, resp):
        # No token limit applies: the x-ratelimit-*-tokens headers stay away (they speak of
        # token limits only).
        self.assertQuotaRejection(resp, message=None, token_headers=False)
        for h in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"):
            self.assertIsNone(resp.header(h), repr(resp))
        self.assertEqual(resp.json()["error"]["code"], "quota_exceeded")

    def access_log(self, gw, n):
        """The chat requests' access-log lines, once there are n (the harness's readiness
        probes have lines too)."""
        def chats():
            return [e for e in qh.read_access_log(gw.access_log) if e["path"] == CHAT]
        wait_until(lambda: len(chats()) >= n, message="%d chat lines in the access log" % n)
        return chats()


class CostBudgetTest(CostCase):

    def test_budget_spent_then_refused(self):
        """0.9 a request on a budget of 2.5: three are admitted (the third while 1.8 < 2.5),
        the fourth and later are refused without reaching the upstream; the unpriced
        instance still serves."""
        gw = self.gateway()
        c = self.client(gw)
        for i in range(3):
            r = c.post(body("cloud"))
            self.assertEqual(r.status, 200, repr(r))
            self.assertEqual(qh.usage_of(r), (PROMPT, COMPLETION, PROMPT + COMPLETION))
            self.assertAlmostEqual(self.budget(gw)["used"], 0.9 * (i + 1), places=6)
        for _ in range(2):
            self.assertCostRefusal(c.post(body("cloud")))
        self.assertEqual(self.mock.stats()["requests"], 3)
        b = self.budget(gw)
        self.assertEqual(b["kind"], "cost")
        self.assertAlmostEqual(b["limit"], 2.5, places=6)
        self.assertAlmostEqual(b["used"], 2.7, places=6)
        self.assertEqual(b["remaining"], 0)
        self.assertTrue(0 < b["reset_s"] <= 3600, repr(b))

        r = c.post(body("onprem"))
        self.assertEqual(r.status, 200, repr(r))
        self.assertAlmostEqual(self.budget(gw)["used"], 2.7, places=6)

        entries = self.access_log(gw, 6)
        refused = [e for e in entries if e["status"] == 429]
        self.assertEqual([e["limit_id"] for e in refused], [BUDGET_ID] * 2)
        self.assertEqual([e["error_code"] for e in refused], ["quota_exceeded"] * 2)

    def test_one_budget_across_instances(self):
        """Each attempt is priced by its own instance: one premium request (2.7) spends the
        whole budget, for the cloud instance too."""
        gw = self.gateway()
        c = self.client(gw)
        r = c.post(body("cloud"))
        self.assertEqual(r.status, 200, repr(r))
        r = c.post(body("premium"))
        self.assertEqual(r.status, 200, repr(r))
        self.assertAlmostEqual(self.budget(gw)["used"], COST["cloud"] + COST["premium"], places=6)
        self.assertCostRefusal(c.post(body("cloud")))
        self.assertCostRefusal(c.post(body("premium")))
        self.assertEqual(c.post(body("onprem")).status, 200)
        self.assertEqual(self.mock.stats()["requests"], 3)

    def test_instance_cost_limit(self):
        """An instance's own cost limit counts every consumer together and is checked after
        the consumer's; the consumer here has no budget of its own."""
        gw = self.gateway(budget=None, cloud_limits=[cost_limit(1.5)])
        c = self.client(gw)
        self.assertEqual(c.post(body("cloud")).status, 200)
        self.assertEqual(c.post(body("cloud")).status, 200)  # 0.9 < 1.5
        self.assertCostRefusal(c.post(body("cloud")))
        self.assertEqual(c.post(body("premium")).status, 200)
        lims = qh.instance_limits(gw.admin_port, "cloud")
        self.assertAlmostEqual(lims["instance:cloud:cost:1h"]["used"], 1.8, places=6)
        refused = [e for e in self.access_log(gw, 4) if e["status"] == 429]
        self.assertEqual([e["limit_id"] for e in refused], ["instance:cloud:cost:1h"])

    def test_cost_limit_without_a_price_is_refused(self):
        """`sluice -t` refuses a cost limit that could never count: on an instance without a
        price, with file:line:col and the key path."""
        text = qh.quota_config(
            harness.free_port(),
            instances=self.instances(),
            routes=self.routes(),
            consumers=[consumer("team", [self.key], [cost_limit(2, instance="onprem")])])
        path = os.path.join(self.workdir, "bad.yaml")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([harness.sluice_bin(), "-t", "-c", path], capture_output=True,
                           timeout=30)
        self.assertNotEqual(p.returncode, 0)
        err = p.stderr.decode()
        self.assertRegex(err, r"%s:\d+:\d+: consumers\[0\]\.limits\[0\]: strategy cost needs "
                              r"a price: instance \"onprem\" has none" % re.escape(path))

    def test_cached_tokens_at_the_cached_price(self):
        """The mock reports 60 of 160 prompt tokens as read from the cache: they cost
        cached_input, 60 x 250 per million = 0.015, not 0.06."""
        gw = self.gateway()
        r = self.client(gw).post(body("cloud", mock={"cache_read": 60}))
        self.assertEqual(r.status, 200, repr(r))
        u = r.json()["usage"]
        self.assertEqual((u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]),
                         (PROMPT + 60, 60))
        self.assertAlmostEqual(self.budget(gw)["used"], 0.1 + 0.015 + 0.8, places=6)

    def test_access_log_cost(self):
        """`cost` in the access log, in price units, where the answering instance has a
        price; none on the unpriced instance."""
        gw = self.gateway(budget=100)
        c = self.client(gw)
        for model in ("cloud", "premium", "onprem"):
            self.assertEqual(c.post(body(model)).status, 200)
        r = c.post(body("cloud", mock={"cache_read": 60}))
        self.assertEqual(r.status, 200)
        by_instance = [(e["instance"], e.get("cost")) for e in self.access_log(gw, 4)]
        self.assertEqual(by_instance, [("cloud", 0.9), ("premium", 2.7), ("onprem", None),
                                       ("cloud", 0.915)])
        self.assertNotIn("cost", self.access_log(gw, 4)[2])

    def test_cost_metric(self):
        """sluice_cost_total{route,instance,consumer} adds each answered request's cost."""
        gw = self.gateway(budget=100)
        c = self.client(gw)
        for model in ("cloud", "cloud", "premium", "onprem"):
            self.assertEqual(c.post(body(model)).status, 200)
        last = {}

        def counted():
            last["text"] = http_request(gw.admin_port, "GET", "/metrics").body.decode()
            return metric_value(last["text"], "sluice_requests_total", route="onprem",
                                consumer="team", code="200") == 1
        wait_until(counted, message="the four requests to be counted")
        text = last["text"]
        self.assertAlmostEqual(metric_value(text, "sluice_cost_total", route="cloud",
                                            instance="cloud", consumer="team"), 1.8, places=6)
        self.assertAlmostEqual(metric_value(text, "sluice_cost_total", route="premium",
                                            instance="premium", consumer="team"), 2.7, places=6)
        self.assertIsNone(metric_value(text, "sluice_cost_total", route="onprem",
                                       instance="onprem", consumer="team"))


class CostRedisTest(CostCase):

    def test_one_budget_on_two_gateways(self):
        """Two gateways on one Redis enforce one budget: three requests (alternating) are
        admitted, then both refuse; Redis holds the budget's counter in micro-units."""
        redis = self.start_redis()
        gws = [self.gateway(store=qh.redis_store(redis.port, on_error="deny"))
               for _ in range(2)]
        clients = [self.client(gw) for gw in gws]
        for i in range(3):
            r = clients[i % 2].post(body("cloud"))
            self.assertEqual(r.status, 200, repr(r))
        for c in clients:
            self.assertCostRefusal(c.post(body("cloud")))
        self.assertEqual(self.mock.stats()["requests"], 3)
        wait_until(lambda: redis.counter_sum("*%s:team:*" % BUDGET_ID) == 2700000,
                   message=lambda: "the Redis budget counter to hold 2,700,000 micro-units "
                   "(has %d)" % redis.counter_sum("*%s:team:*" % BUDGET_ID))
        self.assertEqual(redis.live_reservations(), {})
        for gw in gws:
            wait_until(lambda: abs(self.budget(gw)["used"] - 2.7) < 1e-9,
                       message="the shared view of the budget on every gateway")


if __name__ == "__main__":
    harness.main()
