"""test_quota_faults.py — quota counters under Redis faults: a redis-server stopped (SIGSTOP)
while admissions and settlements are in flight, and resumed (SIGCONT), under a small load.

  RedisStallAccountingTest   with on_error allow and deny: once Redis is back and the
                             requests have finished, every Redis counter holds exactly what
                             the requests it admitted were charged — no reservation left over
                             (a late admission undone by its token, settlements that timed
                             out retried after the reconnect), no live member left in any
                             reservation set

Every request costs the same (quota_helpers.chat(4, 4): 8 tokens, one request), so a
counter's consistency is arithmetic: the consumer's token counter is 8 × its request
counter, and equals the instance's. A reservation left over breaks that (it holds the
estimate, 4 + 7 + 4 = 15 tokens, not 8) and stays until its lease ends (minutes), so waiting
for the counters to be consistent, with a deadline, fails on a leak.
"""

import re
import threading

import harness
import quota_helpers as qh
from harness import wait_until
from quota_helpers import CHAT, bearer, chat, consumer, limit

UNREACHABLE = r"redis unreachable"
REACHABLE = r"redis reachable again"
COST = 8  # chat(4, 4): 4 prompt + 4 completion tokens


class Load:
    """`threads` clients sending chat(4, 4) until stop(); every answer is kept, in order,
    with the phase it was sent in."""

    def __init__(self, test, port, key_, threads=4):
        self.port, self.key = port, key_
        self.phase = "before"
        self.lock = threading.Lock()
        self.results = []  # (phase, status or exception)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()
        test.addCleanup(self.stop)

    def _loop(self):
        c = qh.Client(self.port, bearer(self.key))
        try:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    r = c.post(chat(4, 4, mock={"ttft_ms": 5}))
                    out = r.status if r.status != 200 or qh.usage_of(r)[2] == COST else r
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    out = exc
                    c.close()
                with self.lock:
                    self.results.append((phase, out))
        finally:
            c.close()

    def count(self, status=None, phase=None):
        with self.lock:
            return sum(1 for p, s in self.results
                       if (status is None or s == status) and (phase is None or p == phase))

    def others(self, allowed):
        with self.lock:
            return [(p, s) for p, s in self.results if s not in allowed]

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(30)


class RedisStallAccountingTest(qh.QuotaTestCase):

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 60)
        self.redis = self.start_redis()
        self.mock = self.start_mock()

    def counters(self):
        r = self.redis
        return {"tokens": r.counter_sum("*consumer:st:*:total_tokens:1h:st:*"),
                "requests": r.counter_sum("*consumer:st:*:requests:1h:st:*"),
                "instance": r.counter_sum("*instance:m:total_tokens:1h:*")}

    def stall(self, on_error):
        """Load on one gateway; SIGSTOP Redis while it runs, until the gateway has cut it
        off and answered some requests without it; SIGCONT; more load once it is shared
        again; stop. Returns (gateway, load)."""
        k = qh.make_key("stall")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url(), limits=[limit(10 ** 12, "1h")])],
            consumers=[consumer("st", [k], [limit(10 ** 12, "1h"),
                                            limit(requests=10 ** 12, window="1h")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])],
            store=qh.redis_store(self.redis.port, on_error=on_error, timeout="300ms"))
        load = Load(self, gw.port, k)
        wait_until(lambda: load.count(200) >= 40, message="load to flow through Redis")
        off = gw.log_size()
        load.phase = "stalled"
        self.redis.pause()
        gw.wait_log(UNREACHABLE, since=off, message="sluice to cut the stalled Redis off")
        # Stalled long enough for reconnections, which the kernel accepts for the stopped
        # server and which time out in turn: their commands, too, wait in sockets that
        # Redis reads when it resumes.
        cut = gw.log_size()
        wait_until(lambda: len(re.findall(r"redis \S+: connecting", gw.log_since(cut))) >= 4,
                   message="sluice to try reconnecting to the stalled Redis")
        n = load.count(phase="stalled")
        wait_until(lambda: load.count(phase="stalled") >= n + 20,
                   message="answers while Redis is stalled")
        off2 = gw.log_size()
        load.phase = "resumed"
        self.redis.resume()
        gw.wait_log(REACHABLE, since=off2, timeout=harness.DEADLINE + 10,
                    message="every worker to reconnect to Redis")
        load.phase = "after"
        wait_until(lambda: load.count(200, phase="after") >= 40,
                   message="load to flow through Redis again")
        load.stop()
        return gw, load

    def wait_consistent(self, expect_requests=None):
        """Until the counters are consistent (settlements are fire-and-forget, and some
        were waiting for the reconnect) and no reservation is live."""
        last = {}

        def check():
            c = last["c"] = self.counters()
            last["live"] = self.redis.live_reservations()
            return (not last["live"] and c["tokens"] == COST * c["requests"] and
                    c["instance"] == c["tokens"] and
                    (expect_requests is None or c["requests"] == expect_requests))
        wait_until(check, message=lambda: "Redis counters to hold exactly what was charged "
                   "(expected %s requests × %d tokens): %r, live reservations: %r"
                   % (expect_requests, COST, last.get("c"), last.get("live")))
        return last["c"]

    def test_stall_with_on_error_deny(self):
        """deny: while Redis is stalled the requests that need a counter get 503; every 200
        was admitted by Redis, so its counters hold exactly the 200s."""
        gw, load = self.stall("deny")
        self.assertEqual(load.others({200, 503}), [], "unexpected answers")
        self.assertGreater(load.count(503), 0, "no request was refused while Redis stalled")
        ok = load.count(200)
        c = self.wait_consistent(expect_requests=ok)
        harness.note("deny: %d × 200, %d × 503; Redis: %r" % (ok, load.count(503), c))
        self.assertEqual(c["tokens"], COST * ok)

    def test_stall_with_on_error_allow(self):
        """allow: nothing fails; requests counted locally during the stall are not in
        Redis, but every request Redis admitted is charged there exactly once."""
        gw, load = self.stall("allow")
        self.assertEqual(load.others({200}), [], "requests failed (on_error: allow)")
        c = self.wait_consistent()
        shared = load.count(200, phase="before") + load.count(200, phase="after")
        harness.note("allow: %d × 200 (%d before and after the stall); Redis: %r"
                     % (load.count(200), shared, c))
        self.assertGreaterEqual(c["requests"], shared)
        self.assertLessEqual(c["requests"], load.count(200))


if __name__ == "__main__":
    harness.main()
