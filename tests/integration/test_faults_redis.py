"""test_faults_redis.py — the Redis counter store failing under load (issue 12 §3): a real
redis-server killed (SIGKILL) and restarted, or SIGSTOPped (it accepts, never answers) and
SIGCONTed, while a bounded load of streams and non-streams runs, with store.on_error allow
and deny.

  allow: every request is served (local counts), the outage is warned about once;
  deny:  requests that need a counter get 503 quota_store_unavailable and never reach the
         upstream; a consumer without limits is still served;
  both:  no crash (sluice exits 0 at teardown), nothing left in flight, no fd beyond the
         baseline; once Redis is back, Redis counts again, and its counter is consistent:
           - after a restart (an empty Redis) it equals the usage of the requests admitted
             since, exactly;
           - after a stall it never exceeds the usage of every request the consumer was
             ever served (each request reserves 50,000 tokens of max_tokens, so one
             reservation left behind by a late admission script, or by a settlement dropped
             during the stall, shows at once).

Redis's command timeout in these gateways is 300 ms; requests are held 10–20 ms by the mock.
"""

import re
import unittest

import harness
import quota_helpers as qh
from fault_helpers import (CONSUMER, KEY, SLOW, BoundedLoad, FaultCase, auth, chat_body,
                           fault_consumers, fault_instance, fault_route)
from harness import wait_until

UNREACHABLE = r"redis unreachable"
REACHABLE = r"redis reachable again"
FREE_KEY = "sk-free-" + KEY[-12:]


class RedisFaultTest(FaultCase):

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 60)
        self.redis = self.start_redis()
        self.mock = self.start_mock()

    def gateway(self, on_error):
        consumers = fault_consumers([{"name": "free", "keys": [FREE_KEY]}])
        self.gw = self.start_gateway(
            [fault_instance("m", self.mock.url(), pool=4)],
            [fault_route("chat", ["m"], [("m", 10)])], consumers=consumers,
            store=qh.redis_store(self.redis.port, on_error=on_error, timeout="300ms"))
        self.wait_no_clients(self.gw)
        self.ports = (self.mock.port, self.redis.port)
        self.baseline = self.census(self.gw, self.ports)
        return self.gw

    def redis_used(self):
        return self.redis.counter_sum("*consumer:%s:*" % CONSUMER)

    def wait_redis_used(self, value):
        last = {}

        def check():
            last["v"] = self.redis_used()
            return last["v"] == value
        wait_until(check, message=lambda: "the Redis counter to reach %d (last %s)"
                   % (value, last.get("v")))

    def sequential(self, n):
        """n requests one after the other; all must be 200. Returns their usage."""
        total = 0
        c = qh.Client(self.gw.port, auth())
        try:
            for _ in range(n):
                r = c.post(chat_body("m", tokens=4, max_tokens=50000))
                self.assertEqual(r.status, 200, repr(r))
                total += r.json()["usage"]["total_tokens"]
        finally:
            c.close()
        return total

    def load(self, threads=4, per_thread=None):
        per_thread = per_thread or (400 if SLOW else 1500)
        ld = BoundedLoad(self.gw.port, threads=threads, per_thread=per_thread, pause=0.005,
                         body_fn=lambda t, i: chat_body("m", stream=(i % 2 == 1), tokens=4,
                                                        usage=True, ttft_ms=10))
        self.addCleanup(ld.stop)
        return ld.start()

    def wait_more(self, ld, n, what):
        start = ld.count()
        wait_until(lambda: ld.count() >= start + n, harness.DEADLINE + 20,
                   lambda: "%d more requests %s (%d done)" % (n, what, ld.count() - start))

    def count_log(self, pattern, since):
        return len(re.findall(pattern, self.gw.log_since(since)))

    def served_total(self, results):
        bad = [r for r in results if r.kind == "ok" and r.usage is None]
        self.assertEqual(bad, [], "answers without usage")
        return sum(r.usage for r in results if r.kind == "ok")

    def settle(self):
        self.assertSettled(self.gw, self.baseline, pooled_ports=self.ports, pool_bound=8)

    # -- killed and restarted --------------------------------------------------------
    def test_kill_restart_under_load_allow(self):
        gw = self.gateway("allow")
        self.wait_redis_used(self.sequential(5))
        ld = self.load()
        self.wait_more(ld, 20, "before the kill")
        off = gw.log_size()
        self.redis.kill()
        gw.wait_log(UNREACHABLE, since=off)
        self.wait_more(ld, 60, "while Redis is down")
        results = ld.stop()
        self.assertEqual(ld.failures(), [], "on_error allow: every request is served")
        self.assertEqual(self.count_log(UNREACHABLE, off), 1,
                         "one warning per outage:\n" + self.gw.log_since(off)[-3000:])
        self.assertRegex(gw.log_since(off), r"\[warn\] " + UNREACHABLE)

        off2 = gw.log_size()
        self.redis.start()
        gw.wait_log(REACHABLE, since=off2, timeout=harness.DEADLINE + 10)
        self.assertEqual(self.redis_used(), 0, "an empty Redis was charged before any request")
        ld2 = self.load(threads=2, per_thread=20)
        results2 = ld2.join()
        self.assertEqual(ld2.failures(), [])
        self.settle()
        # Shared counting again, and exact.
        self.wait_redis_used(self.served_total(results2))
        del results

    def test_kill_restart_under_load_deny(self):
        gw = self.gateway("deny")
        self.wait_redis_used(self.sequential(3))
        ld = self.load()
        self.wait_more(ld, 20, "before the kill")
        off = gw.log_size()
        self.redis.kill()
        gw.wait_log(UNREACHABLE, since=off)
        # Requests admitted just before the kill may still be served: wait for refusals.
        wait_until(lambda: sum(1 for r in ld.snapshot() if r.kind != "ok") >= 40,
                   harness.DEADLINE + 20, "40 refusals while Redis is down")
        # A consumer without limits needs no counter.
        r = harness.http_request(gw.port, "POST", "/v1/chat/completions", headers=auth(FREE_KEY),
                                 json_body=chat_body("m"))
        self.assertEqual(r.status, 200, repr(r))
        results = ld.stop()
        refused = [r for r in results if r.kind != "ok"]
        self.assertGreaterEqual(len(refused), 40, "deny: requests must be refused")
        for r in refused:
            self.assertEqual((r.kind, r.status, r.error_code),
                             ("http", 503, "quota_store_unavailable"), repr(r))
        served = sum(1 for r in results if r.kind == "ok")
        self.mock.wait_stats(lambda s: s["requests"] == 3 + served + 1,
                             "the upstream to have seen only the admitted requests")
        self.assertEqual(self.count_log(UNREACHABLE, off), 1)

        off2 = gw.log_size()
        self.redis.start()
        gw.wait_log(REACHABLE, since=off2, timeout=harness.DEADLINE + 10)
        ld2 = self.load(threads=2, per_thread=20)
        results2 = ld2.join()
        self.assertEqual(ld2.failures(), [], "still refused after Redis came back")
        self.settle()
        self.wait_redis_used(self.served_total(results2))

    # -- stalled (SIGSTOP) and resumed ---------------------------------------------------
    def stall(self, on_error):
        """Load, SIGSTOP Redis until the stall is noticed and load went on through it,
        SIGCONT, load again. Returns (all results, results during the stall)."""
        gw = self.gateway(on_error)
        first = self.sequential(3)
        self.wait_redis_used(first)
        ld = self.load()
        self.wait_more(ld, 20, "before the stall")
        off = gw.log_size()
        self.redis.pause()
        try:
            gw.wait_log(UNREACHABLE, since=off)
            at = ld.count()
            self.wait_more(ld, 40, "while Redis stalls")
            during = ld.snapshot()[at:]
        finally:
            self.redis.resume()
        gw.wait_log(REACHABLE, since=off, timeout=harness.DEADLINE + 10)
        self.wait_more(ld, 40, "after Redis resumed")
        results = ld.stop()
        self.assertEqual(self.count_log(UNREACHABLE, off), 1,
                         "one warning per stall:\n" + gw.log_since(off)[-3000:])
        tail = self.load(threads=2, per_thread=20).join()
        self.settle()
        self.served = first + self.served_total(results) + self.served_total(tail)
        self.tail = tail
        return results, during

    def assert_counter_consistent(self):
        """Redis counts again, and never more than the consumer was served."""
        wait_until(lambda: self.redis_used() >= self.served_total(self.tail), message=lambda:
                   "Redis to count the requests after the stall (%d)" % self.redis_used())
        self.assertLessEqual(self.redis_used(), self.served,
                             "the Redis counter holds more than every request served: a "
                             "reservation was left behind by the stall")

    def test_stall_under_load_allow(self):
        results, during = self.stall("allow")
        self.assertEqual([r for r in results if r.kind != "ok"], [],
                         "on_error allow: every request is served through the stall")
        self.assertGreaterEqual(len(during), 40)

    def test_stall_under_load_allow_counter_consistent(self):
        # Issue 12 §1, §1b.6: admissions that time out while Redis is stopped may still run
        # when it resumes; their reservation token makes them undo themselves, and
        # settlements sent during the stall wait for the next connection.
        self.stall("allow")
        self.assert_counter_consistent()

    def test_stall_under_load_deny(self):
        results, during = self.stall("deny")
        refused = [r for r in during if r.kind != "ok"]
        self.assertGreaterEqual(len(refused), 20, "deny: requests must be refused in a stall")
        for r in [r for r in results if r.kind != "ok"]:
            self.assertEqual((r.kind, r.status, r.error_code),
                             ("http", 503, "quota_store_unavailable"), repr(r))
        self.assertEqual([r for r in self.tail if r.kind != "ok"], [],
                         "still refused after Redis resumed")

    def test_stall_under_load_deny_counter_consistent(self):
        # As test_stall_under_load_allow_counter_consistent — with deny, the late admissions
        # are of requests that were answered 503 and never served.
        self.stall("deny")
        self.assert_counter_consistent()


if __name__ == "__main__":
    harness.main()
