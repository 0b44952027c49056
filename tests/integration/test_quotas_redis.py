"""test_quotas_redis.py — token quotas over a real redis-server (store.type: redis), started by
each test on a free loopback port (`--save '' --appendonly no`) and killed at the end.

  RedisQuotaTest    64 clients on two gateways sharing one Redis: one 10,000-token quota,
                    overshoot ≤ one request; two gateways alternating → one quota;
                    password, db and key prefix; the admin API's view of a Redis counter
  RedisOutageTest   Redis killed under traffic: on_error allow keeps serving on local
                    counts and warns once per outage; deny answers 503; Redis restarted on
                    the same port → shared counting resumes between two gateways; a
                    stalled Redis (SIGSTOP) is cut off by Sluice's own command timeout

The gateway's view of a counter is read from Redis itself (the keys are
<prefix><limit id>:<consumer>:<window start ms>); settlements are fire-and-forget, so
tests wait for the counter to reach the usage the mock reported.
"""

import re
import threading
import unittest

import harness
import quota_helpers as qh
from harness import http_request, wait_until
from quota_helpers import CHAT, bearer, chat, consumer, limit

key = qh.make_key

UNREACHABLE = r"redis unreachable"
REACHABLE = r"redis reachable again"


class RedisBase(qh.QuotaTestCase):

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 40)
        self.redis = self.start_redis()
        self.mock = self.start_mock()

    def gateways(self, n, quotas, on_error="allow", extra_consumers=(), **store):
        """n gateways with the same config: consumers {name: (key, quota)} with a 1h
        total_tokens limit each."""
        cons = [consumer(name, [k], [limit(q, "1h")]) for name, (k, q) in quotas.items()]
        cons += list(extra_consumers)
        store.setdefault("port", self.redis.port)
        return [self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=cons,
            routes=[qh.quota_route("chat", [CHAT], ["m"])],
            store=qh.redis_store(on_error=on_error, **store))
            for _ in range(n)]

    def redis_used(self, name):
        return self.redis.counter_sum("*consumer:%s:*" % name)

    def wait_redis_used(self, name, value):
        last = {}

        def check():
            last["v"] = self.redis_used(name)
            return last["v"] == value
        wait_until(check, message=lambda: "Redis counter of %s to reach %d (last %s)"
                   % (name, value, last.get("v")))

    def count_log(self, gw, pattern, since=0):
        return len(re.findall(pattern, gw.log_since(since)))


class RedisQuotaTest(RedisBase):

    QUOTA, COST = 10000, 100

    def test_64_clients_two_gateways_one_redis(self):
        k = key("race")
        gws = self.gateways(2, {"racer": (k, self.QUOTA)})
        total, ok, bad = qh.race([g.port for g in gws], k, self.QUOTA, threads=64,
                                 prompt=4, completion=96)
        self.assertEqual(bad, [], "unexpected answers")
        harness.note("64 clients on 2 gateways: %d admitted, %d tokens charged (quota %d)"
                     % (ok, total, self.QUOTA))
        self.assertLessEqual(total, self.QUOTA + self.COST,
                             "overshoot beyond one request: %d for %d" % (total, self.QUOTA))
        self.assertEqual(self.mock.stats()["requests"], ok)
        self.wait_redis_used("racer", total)
        # One connection, one request at a time: the rest of the quota is usable.
        total += qh.top_up(self, gws[0].port, k, self.QUOTA // self.COST + 2)
        self.assertGreaterEqual(total, self.QUOTA)
        self.assertLessEqual(total, self.QUOTA + self.COST)
        self.wait_redis_used("racer", total)

    def test_two_gateways_one_quota(self):
        k = key("pair")
        g1, g2 = self.gateways(2, {"pair": (k, 3000)})
        clients = [qh.Client(g.port, bearer(k)) for g in (g1, g2)]
        for c in clients:
            self.addCleanup(c.close)
        total, refused, i = 0, set(), 0
        while len(refused) < 2:
            self.assertLess(i, 80, "no end to admissions: %d tokens so far" % total)
            c = clients[i % 2]
            r = c.post(chat(20, 80))
            if r.status == 200:
                total += qh.usage_of(r)[2]
            else:
                self.assertQuotaRejection(r, message=None)
                refused.add(i % 2)
            i += 1
        harness.note("two gateways admitted %d tokens of 3000" % total)
        self.assertLessEqual(total, 3000 + 100, "the gateways did not share one quota")
        self.assertGreaterEqual(total, 3000 - 107)
        self.wait_redis_used("pair", total)

    def test_admin_consumer_view_with_redis(self):
        """GET /consumers shows the use of a Redis-backed counter (docs/operations.md: "every
        limit with used, remaining and reset"): the main thread refreshes a shared view from
        Redis every second, so the admin figure converges on the Redis counter."""
        k = key("view")
        gw, = self.gateways(1, {"view": (k, 1000)})
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for _ in range(10):
            self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.assertEqual(c.post(chat(20, 80)).status, 429)
        self.wait_redis_used("view", 1000)
        wait_until(lambda: self.used(gw, "view") == 1000,
                   message=lambda: "the admin API to show the Redis counter's 1000 (shows %s)"
                   % self.used(gw, "view"))


    def test_password_db_and_prefix(self):
        """store.redis.password, db and prefix: the counters land in that database under
        that prefix; the default database stays empty."""
        secured = self.start_redis(password="s3cret-redis")
        k = key("sec")
        gw, = self.gateways(1, {"sec": (k, 1000)}, port=secured.port, password="s3cret-redis",
                            db=3, prefix="qt:")
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for _ in range(10):
            self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.assertQuotaRejection(c.post(chat(20, 80)), message=None)
        wait_until(lambda: secured.counter_sum("qt:consumer:sec:*", db=3) == 1000,
                   message="the counter in db 3 under prefix qt: to reach 1000")
        self.assertEqual(secured.keys(db=0), [])
        self.assertTrue(all(x.startswith("qt:") for x in secured.keys(db=3)))
        self.assertEqual(self.count_log(gw, UNREACHABLE), 0)


class RedisOutageTest(RedisBase):

    def background(self, port, key_):
        """Clients sending requests continuously (a consumer with a large quota) until
        stop() is called. Returns (stop, statuses)."""
        stop = threading.Event()
        statuses = []

        def loop():
            c = qh.Client(port, bearer(key_))
            try:
                while not stop.is_set():
                    r = c.post(chat(4, 4, mock={"ttft_ms": 10}))
                    statuses.append(200 if r.status == 200 else r)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                statuses.append(exc)
            finally:
                c.close()

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()

        def stop_all():
            stop.set()
            for t in threads:
                t.join(30)
        self.addCleanup(stop_all)
        return stop_all, statuses

    def test_allow_serves_on_local_counts_and_warns_once(self):
        k, k_bg = key("allow"), key("bg")
        gw, = self.gateways(1, {"al": (k, 2000), "bg": (k_bg, 10 ** 9)})
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for _ in range(5):
            self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.wait_redis_used("al", 500)
        self.assertEqual(self.count_log(gw, UNREACHABLE), 0)

        # Redis dies under traffic.
        stop_bg, bg = self.background(gw.port, k_bg)
        wait_until(lambda: len(bg) >= 20, message="background traffic to flow")
        off = gw.log_size()
        self.redis.kill()
        n = len(bg)
        # Served, and counted on this node: its local counter starts empty, so the consumer
        # gets its 2,000 tokens again here, and not more.
        local = 0
        for i in range(25):
            r = c.post(chat(20, 80))
            if r.status != 200:
                break
            local += qh.usage_of(r)[2]
        self.assertGreaterEqual(local, 1000, "not serving while Redis is down: %r" % r)
        self.assertEqual(local, 2000, "local counting while Redis is down")
        self.assertQuotaRejection(r, message=None)
        for _ in range(5):  # more traffic during the same outage
            self.assertEqual(c.post(chat(20, 80)).status, 429)
        wait_until(lambda: len(bg) >= n + 40, message="background traffic during the outage")
        gw.wait_log(UNREACHABLE, since=off)
        self.assertEqual(self.count_log(gw, UNREACHABLE, off), 1,
                         "one warning per outage:\n%s" % "\n".join(
                             l for l in gw.log_since(off).splitlines() if "redis" in l))
        self.assertRegex(gw.log_since(off), r"\[warn\] " + UNREACHABLE)

        # Back: shared counting resumes (a fresh, empty Redis).
        off2 = gw.log_size()
        self.redis.start()
        gw.wait_log(REACHABLE, since=off2, timeout=harness.DEADLINE + 10)
        n = len(bg)
        wait_until(lambda: len(bg) >= n + 20, message="background traffic after the outage")
        stop_bg()
        self.assertEqual([s for s in bg if s != 200], [],
                         "requests failed around the outage (on_error: allow)")
        r = c.post(chat(20, 80))
        self.assertEqual(r.status, 200, repr(r))
        self.wait_redis_used("al", 100)
        # A second outage is warned about again, once.
        off3 = gw.log_size()
        self.redis.kill()
        self.assertEqual(c.post(chat(20, 80)).status, 429)  # the local counter is still spent
        gw.wait_log(UNREACHABLE, since=off3)
        for _ in range(5):
            c.post(chat(20, 80))
        self.assertEqual(self.count_log(gw, UNREACHABLE, off3), 1)

    def test_stalled_redis_times_out(self):
        """A Redis that accepts connections but never answers (SIGSTOP): Sluice's own
        command timeout (store.redis.timeout; hiredis 0.14 has none) ends each wait, and
        on_error: allow serves on local counts, with one warning. Resumed (SIGCONT): the
        connection comes back and Redis counts again."""
        k = key("stall")
        gw, = self.gateways(1, {"st": (k, 100000)}, timeout="300ms")
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.wait_redis_used("st", 100)
        off = gw.log_size()
        self.redis.pause()
        for _ in range(5):
            r = c.post(chat(20, 80))
            self.assertEqual(r.status, 200, "not served while Redis stalls: %r" % r)
        gw.wait_log(UNREACHABLE, since=off)
        self.assertEqual(self.count_log(gw, UNREACHABLE, off), 1)
        self.assertRegex(gw.log_since(off), r"no reply within 300 ms|handshake timed out")
        self.assertEqual(self.count_log(gw, REACHABLE, off), 0)
        off2 = gw.log_size()
        self.redis.resume()
        gw.wait_log(REACHABLE, since=off2, timeout=harness.DEADLINE + 10)
        before = self.redis_used("st")
        self.assertEqual(c.post(chat(20, 80)).status, 200)
        wait_until(lambda: self.redis_used("st") > before,
                   message="Redis to count again after the stall")

    def test_deny_answers_503(self):
        k, k_free = key("deny"), key("free")
        gw, = self.gateways(1, {"dn": (k, 100000)}, on_error="deny",
                            extra_consumers=[consumer("free", [k_free])])
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.wait_redis_used("dn", 100)

        off = gw.log_size()
        self.redis.kill()
        for _ in range(5):
            r = c.post(chat(20, 80))
            self.assertOpenAIError(r, 503)
            self.assertEqual(r.json()["error"]["code"], "quota_store_unavailable", repr(r))
        before = self.mock.stats()["requests"]
        # A consumer without limits needs no counter.
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k_free), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(self.mock.stats()["requests"], before + 1,
                         "a 503 request reached the upstream")
        gw.wait_log(UNREACHABLE, since=off)
        self.assertEqual(self.count_log(gw, UNREACHABLE, off), 1)

        self.redis.start()
        wait_until(lambda: c.post(chat(20, 80)).status == 200, harness.DEADLINE + 10,
                   "requests to be admitted again once Redis is back")
        self.wait_redis_used("dn", 100)

    def test_restart_resumes_shared_counting(self):
        k = key("shared")
        g1, g2 = self.gateways(2, {"sh": (k, 3000)})
        clients = [qh.Client(g.port, bearer(k)) for g in (g1, g2)]
        for c in clients:
            self.addCleanup(c.close)
        for c in clients:
            self.assertEqual(c.post(chat(20, 80)).status, 200)
        self.wait_redis_used("sh", 200)

        offs = [g.log_size() for g in (g1, g2)]
        self.redis.kill()
        for c in clients:  # each on its own local counts
            for _ in range(3):
                self.assertEqual(c.post(chat(20, 80)).status, 200)
        for g, off in zip((g1, g2), offs):
            g.wait_log(UNREACHABLE, since=off)

        offs = [g.log_size() for g in (g1, g2)]
        self.redis.start()
        for g, off in zip((g1, g2), offs):
            g.wait_log(REACHABLE, since=off, timeout=harness.DEADLINE + 10)
        self.assertEqual(self.redis_used("sh"), 0)

        # One quota again: alternate until both refuse.
        total, refused, i = 0, set(), 0
        while len(refused) < 2:
            self.assertLess(i, 80, "no end to admissions: %d tokens so far" % total)
            r = clients[i % 2].post(chat(20, 80))
            if r.status == 200:
                total += qh.usage_of(r)[2]
            else:
                self.assertQuotaRejection(r, message=None)
                refused.add(i % 2)
            i += 1
        harness.note("after the restart two gateways admitted %d tokens of 3000" % total)
        self.assertLessEqual(total, 3000 + 100, "the gateways did not share one quota again")
        self.assertGreaterEqual(total, 3000 - 107)
        self.wait_redis_used("sh", total)


if __name__ == "__main__":
    harness.main()
