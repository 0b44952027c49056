"""test_quotas.py — consumers, key-auth and token quotas with the memory store (issue 4's
acceptance list; the Redis half is test_quotas_redis.py).

Every request's token cost is known exactly: the mock bills prompt_tokens = ceil(bytes of
the message contents / 4) and completion_tokens = min(mock tokens, max_tokens), and
quota_helpers.chat() builds bodies to order. Quota use is read three ways: the usage the
mock reported in each 200, the x-ratelimit-*-tokens headers, and the admin API
(GET /consumers/NAME, GET /instances).

  SeedScenarioTest     the case study's scenario 2: consumers A/B/C at 10,000/20,000/5,000
                       tokens on an instance with a 50,000 global quota; every consumer
                       refused once the instance is exhausted; fallback on `quota`
  FallbackQuotaTest    a failed attempt gives its reservation back; every candidate out of
                       quota → Retry-After is the soonest reset
  ConcurrencyTest      64 clients racing for a 10,000-token quota: overshoot ≤ one request
  StrategyWindowTest   prompt_tokens / completion_tokens strategies; fixed windows reset at
                       the boundary, sliding windows smooth; calendar-month windows
  StreamUsageTest      streams charged from the usage chunk, which is hidden from a client
                       that did not ask for it; no usage → an estimate, never zero
  KeyAuthTest          missing / wrong / hashed keys, the three key headers, route
                       allow-lists, key rotation by reload; keys never logged or forwarded
  TenantIsolationTest  requests-per-window limits and max_concurrent
  AbortChargeTest      a client that leaves after its request reached the upstream is still
                       charged: the request, and the prompt estimate plus what was produced
  ReservationSizeTest  a client's max_tokens / n cannot reserve more than max_reservation
  ReloadTest           counters survive SIGHUP, also when the limit's value changes
"""

import datetime
import json
import select
import threading
import time

import harness
import quota_helpers as qh
from harness import http_request, stream_request, wait_until
from quota_helpers import CHAT, REJECTED_MSG, bearer, chat, consumer, limit

INST_A = "qwen2.5-32b-instruct-ali-bailian"
INST_B = "qwen2.5-32b-instruct-b"

key = qh.make_key


def read_access_log(path):
    out = []
    for line in harness.read_text(path).splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class SeedScenarioTest(qh.QuotaTestCase):
    """The seed's scenario 2, with 500-token requests (prompt 100 + completion 400)."""

    PROMPT, COMPLETION = 100, 400
    COST = PROMPT + COMPLETION
    QUOTAS = {"consumer_a": 10000, "consumer_b": 20000, "consumer_c": 5000}

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 40)  # `window: 1h` is a clock-aligned hour
        self.keys = {}

    def consumers(self, quotas, instances=(INST_A,)):
        out = []
        for name, q in quotas.items():
            self.keys[name] = key(name)
            out.append(consumer(name, [self.keys[name]],
                                [limit(q, "1h", "total_tokens", instance=i) for i in instances],
                                rejected_code=429, rejected_msg=REJECTED_MSG))
        return out

    def client(self, gw, name):
        c = qh.Client(gw.port, bearer(self.keys[name]))
        self.addCleanup(c.close)
        return c

    def drive(self, c, path=CHAT, max_requests=200):
        """Requests until the first non-200. Returns (admitted tokens, [200 responses],
        the refusal)."""
        total, oks = 0, []
        for _ in range(max_requests):
            r = c.post(chat(self.PROMPT, self.COMPLETION), path)
            if r.status != 200:
                return total, oks, r
            p, comp, t = qh.usage_of(r)
            self.assertEqual((p, comp, t), (self.PROMPT, self.COMPLETION, self.COST),
                             "the mock's usage is not the cost the test relies on")
            total += t
            oks.append(r)
        self.fail("no refusal after %d requests" % max_requests)

    def test_each_consumer_stops_at_its_own_quota(self):
        mock = self.start_mock()
        gw = self.start_gateway(
            instances=[qh.quota_instance(INST_A, mock.url(), limits=[limit(50000, "1h")])],
            consumers=self.consumers(self.QUOTAS),
            routes=[qh.quota_route("qwen-quota", ["/anything", CHAT], [INST_A])])

        admitted_all = 0
        for name, quota in self.QUOTAS.items():
            c = self.client(gw, name)
            total, oks, refusal = self.drive(c)
            self.assertEqual(total, quota, "%s was admitted %d tokens with a quota of %d"
                             % (name, total, quota))
            self.assertEqual(len(oks), quota // self.COST)
            # Successful answers carry the tightest limit: the consumer's.
            self.assertEqual(oks[0].header("x-ratelimit-limit-tokens"), str(quota), repr(oks[0]))
            self.assertIsNotNone(oks[0].header("x-ratelimit-remaining-tokens"), repr(oks[0]))
            self.assertIsNotNone(oks[0].header("x-ratelimit-reset-tokens"), repr(oks[0]))
            self.assertQuotaRejection(refusal)
            self.assertEqual(refusal.header("x-ratelimit-limit-tokens"), str(quota), repr(refusal))
            reset = qh.parse_seconds(refusal.header("x-ratelimit-reset-tokens"))
            retry = qh.parse_seconds(refusal.header("retry-after"))
            self.assertLessEqual(reset, 3600)
            self.assertLessEqual(retry, 3600)
            self.assertLessEqual(abs(retry - reset), 2, "Retry-After %d vs reset %d" % (retry, reset))
            # It stays refused; another consumer is not affected (checked by the next loop).
            again = c.post(chat(self.PROMPT, self.COMPLETION))
            self.assertQuotaRejection(again)
            admitted_all += len(oks)
            self.assertEqual(self.used(gw, name), quota, "admin view of %s" % name)

        inst = qh.instance_limits(gw.admin_port, INST_A)
        self.assertEqual(inst["instance:%s:total_tokens:1h" % INST_A]["used"], 35000)
        # Nothing refused reached the upstream.
        self.assertEqual(mock.stats()["requests"], admitted_all)
        # The refusals name the consumer's limit (checked first) in the access log.
        refused = [e for e in read_access_log(gw.access_log) if e.get("status") == 429]
        self.assertEqual(len(refused), 2 * len(self.QUOTAS))
        self.assertEqual({e["limit_id"] for e in refused},
                         {"consumer:%s:%s:total_tokens:1h" % (n, INST_A) for n in self.QUOTAS})

    def test_instance_quota_refuses_every_consumer(self):
        """Consumer quotas summing past the instance's 50,000: once the instance total
        reaches 50,000, every consumer gets 429, also one that never spent anything."""
        mock = self.start_mock()
        quotas = dict(self.QUOTAS, consumer_d=20000, consumer_e=20000)
        gw = self.start_gateway(
            instances=[qh.quota_instance(INST_A, mock.url(), limits=[limit(50000, "1h")])],
            consumers=self.consumers(quotas),
            routes=[qh.quota_route("qwen-quota", ["/anything", CHAT], [INST_A])])

        spent = 0
        for name in ("consumer_a", "consumer_c", "consumer_b"):
            total, _, refusal = self.drive(self.client(gw, name))
            self.assertEqual(total, quotas[name])
            self.assertQuotaRejection(refusal)
            spent += total
        self.assertEqual(spent, 35000)
        # consumer_d has 20,000 of its own but the instance only 15,000 left.
        total, _, refusal = self.drive(self.client(gw, "consumer_d"))
        self.assertEqual(total, 15000, "consumer_d should stop where the instance is exhausted")
        self.assertQuotaRejection(refusal)
        self.assertEqual(refusal.header("x-ratelimit-limit-tokens"), "50000",
                         "the refusing (tightest) limit is the instance's: %r" % refusal)

        for name in quotas:
            r = self.client(gw, name).post(chat(self.PROMPT, self.COMPLETION))
            self.assertQuotaRejection(r)
        inst = qh.instance_limits(gw.admin_port, INST_A)
        self.assertEqual(inst["instance:%s:total_tokens:1h" % INST_A]["used"], 50000)
        self.assertEqual(self.used(gw, "consumer_d"), 15000)
        self.assertEqual(self.used(gw, "consumer_e"), 0)
        self.assertEqual(mock.stats()["requests"], 100)
        log = read_access_log(gw.access_log)
        e_refusals = [e for e in log if e.get("consumer") == "consumer_e"]
        self.assertEqual([e["limit_id"] for e in e_refusals],
                         ["instance:%s:total_tokens:1h" % INST_A])

    def test_fallback_to_other_instance_on_quota(self):
        """Two instances, A preferred (priority 5), B (priority 1), each with a 50,000
        quota and the consumers' quotas on both (as in the seed). With `quota` in
        fallback.on, an exhausted quota on A moves the request to B; without it, 429."""
        mock_a = self.start_mock(name="mock_a")
        mock_b = self.start_mock(name="mock_b")
        quotas = dict(self.QUOTAS, consumer_d=20000, consumer_e=20000)
        gw = self.start_gateway(
            instances=[qh.quota_instance(INST_A, mock_a.url(), limits=[limit(50000, "1h")]),
                       qh.quota_instance(INST_B, mock_b.url(), limits=[limit(50000, "1h")])],
            consumers=self.consumers(quotas, instances=(INST_A, INST_B)),
            routes=[qh.quota_route("qwen-fallback", [CHAT], [(INST_A, 5), (INST_B, 1)],
                                   fallback_on=["unhealthy", "quota"]),
                    qh.quota_route("qwen-strict", ["/strict/v1/chat/completions"],
                                   [(INST_A, 5), (INST_B, 1)],
                                   fallback_on=["unhealthy", "http_5xx"])])
        strict = "/strict/v1/chat/completions"

        def served_by(r, inst):
            self.assertEqual(r.status, 200, repr(r))
            self.assertEqual(r.header("x-sluice-instance"), inst, repr(r))

        # consumer_a spends its 10,000 on A, all served by A.
        ca = self.client(gw, "consumer_a")
        for _ in range(20):
            served_by(ca.post(chat(self.PROMPT, self.COMPLETION)), INST_A)
        # Its own quota on A is exhausted: strict → 429, fallback → B.
        self.assertQuotaRejection(ca.post(chat(self.PROMPT, self.COMPLETION), strict))
        mark = qh.marker()
        served_by(ca.post(chat(self.PROMPT, self.COMPLETION, mark)), INST_B)
        mock_b.wait_request(mark)
        self.assertIsNone(mock_a.find_request(mark))

        # consumer_b, consumer_c and consumer_d bring A's instance total to 50,000.
        for name, n in (("consumer_b", 40), ("consumer_c", 10), ("consumer_d", 30)):
            c = self.client(gw, name)
            for _ in range(n):
                served_by(c.post(chat(self.PROMPT, self.COMPLETION)), INST_A)
        inst = qh.instance_limits(gw.admin_port, INST_A)
        self.assertEqual(inst["instance:%s:total_tokens:1h" % INST_A]["used"], 50000)

        # A is out of quota for everyone: strict → 429 even for the fresh consumer_e;
        # fallback → B.
        for name in ("consumer_e", "consumer_d", "consumer_b"):
            c = self.client(gw, name)
            self.assertQuotaRejection(c.post(chat(self.PROMPT, self.COMPLETION), strict))
            mark = qh.marker()
            served_by(c.post(chat(self.PROMPT, self.COMPLETION, mark)), INST_B)
            mock_b.wait_request(mark)
        # consumer_c on B: 5,000 more, then both instances refuse it → 429.
        cc = self.client(gw, "consumer_c")
        n_b = 0
        while True:
            r = cc.post(chat(self.PROMPT, self.COMPLETION))
            if r.status != 200:
                break
            served_by(r, INST_B)
            n_b += 1
            self.assertLessEqual(n_b, 10, "consumer_c exceeded its 5,000 on B")
        self.assertEqual(n_b, 10)
        self.assertQuotaRejection(r)
        self.assertEqual(mock_a.stats()["requests"], 100)
        self.assertEqual(mock_b.stats()["requests"], 1 + 3 + 10)


class FallbackQuotaTest(qh.QuotaTestCase):
    """Reservations across the fallback loop."""

    def test_failed_attempt_releases_its_reservation(self):
        """A preferred instance answers 503; the request falls back to B. The reservation
        made for the failed attempt is given back: only B's real usage is charged."""
        qh.avoid_window_edge(3600, 40)
        mock_a = self.start_mock("--status", "503", name="mock_a")
        mock_b = self.start_mock(name="mock_b")
        k = key("fb")
        gw = self.start_gateway(
            instances=[qh.quota_instance("a", mock_a.url(), limits=[limit(100000, "1h")]),
                       qh.quota_instance("b", mock_b.url(), limits=[limit(100000, "1h")])],
            consumers=[consumer("fb", [k], [limit(100000, "1h"),
                                            limit(100000, "1h", instance="a")])],
            routes=[qh.quota_route("chat", [CHAT], [("a", 5), ("b", 1)])])
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for _ in range(3):
            r = c.post(chat(100, 400))
            self.assertEqual(r.status, 200, repr(r))
            self.assertEqual(r.header("x-sluice-instance"), "b", repr(r))
        self.assertEqual(mock_a.stats()["requests"], 3, "instance a was not tried first")
        lims = qh.consumer_limits(gw.admin_port, "fb")
        self.assertEqual(lims["consumer:fb:*:total_tokens:1h"]["used"], 1500,
                         "the failed attempts' reservations were not released")
        self.assertEqual(lims["consumer:fb:a:total_tokens:1h"]["used"], 0)
        self.assertEqual(qh.instance_limits(gw.admin_port, "a")["instance:a:total_tokens:1h"]
                         ["used"], 0)
        self.assertEqual(qh.instance_limits(gw.admin_port, "b")["instance:b:total_tokens:1h"]
                         ["used"], 1500)

    def test_retry_after_is_the_soonest_reset(self):
        """Every candidate out of quota: Retry-After is the soonest reset among them
        (issue 4: "with Retry-After (soonest reset)"). Instance a (preferred) has a 1h
        window, b a 1m window: once both are spent, the answer must say "retry within a
        minute", not "in up to an hour" (the first refusal's)."""
        qh.avoid_window_edge(3600, 120)
        qh.avoid_window_edge(60, 15)
        mock = self.start_mock()
        gw = self.start_gateway(
            instances=[qh.quota_instance("a", mock.url(), limits=[limit(100, "1h")]),
                       qh.quota_instance("b", mock.url(), limits=[limit(100, "1m")])],
            routes=[qh.quota_route("chat", [CHAT], [("a", 5), ("b", 1)], auth="none",
                                   fallback_on=["quota"])])
        c = qh.Client(gw.port)
        self.addCleanup(c.close)
        r = c.post(chat(50, 100))
        self.assertEqual((r.status, r.header("x-sluice-instance")), (200, "a"), repr(r))
        r = c.post(chat(50, 100))
        self.assertEqual((r.status, r.header("x-sluice-instance")), (200, "b"), repr(r))
        r = c.post(chat(1, 1))
        self.assertQuotaRejection(r, message=None)
        retry = qh.parse_seconds(r.header("retry-after"))
        self.assertLessEqual(retry, 60, "Retry-After %ds although instance b resets within "
                             "a minute" % retry)


class ConcurrencyTest(qh.QuotaTestCase):
    """64 threads race for one consumer's 10,000 tokens, 100-token requests (prompt 4 +
    max_tokens 96), each held 30 ms by the mock so that many are in flight at once."""

    QUOTA, THREADS = 10000, 64
    PROMPT, COMPLETION = 4, 96
    COST = PROMPT + COMPLETION

    def test_64_clients_memory_store(self):
        qh.avoid_window_edge(3600, 40)
        mock = self.start_mock()
        k = key("race")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[consumer("racer", [k], [limit(self.QUOTA, "1h")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])
        total, ok, bad = qh.race([gw.port], k, self.QUOTA, self.THREADS, self.PROMPT,
                                 self.COMPLETION)
        self.assertEqual(bad, [], "unexpected answers")
        harness.note("64 clients: %d admitted, %d tokens charged (quota %d)"
                     % (ok, total, self.QUOTA))
        self.assertLessEqual(total, self.QUOTA + self.COST,
                             "overshoot beyond one request: %d tokens for a %d quota"
                             % (total, self.QUOTA))
        self.assertEqual(self.used(gw, "racer"), total,
                         "the gateway's counter differs from the usage reported")
        self.assertEqual(mock.stats()["requests"], ok)
        # Reservations are given back at settlement: the rest of the quota is usable.
        total += qh.top_up(self, gw.port, k, self.QUOTA // self.COST + 2)
        self.assertGreaterEqual(total, self.QUOTA)
        self.assertLessEqual(total, self.QUOTA + self.COST)
        self.assertEqual(self.used(gw, "racer"), total)


class StrategyWindowTest(qh.QuotaTestCase):

    def test_prompt_and_completion_strategies(self):
        qh.avoid_window_edge(3600, 40)
        mock = self.start_mock()
        k_pc, k_p = key("pc"), key("p")
        pid = "consumer:pc:*:prompt_tokens:1h"
        cid = "consumer:pc:*:completion_tokens:1h"
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[
                consumer("pc", [k_pc], [limit(1000, "1h", "prompt_tokens"),
                                        limit(600, "1h", "completion_tokens")]),
                consumer("p", [k_p], [limit(300, "1h", "prompt_tokens")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])

        pc = qh.Client(gw.port, bearer(k_pc))
        self.addCleanup(pc.close)
        for _ in range(3):
            self.assertEqual(pc.post(chat(50, 10)).status, 200)
        self.assertEqual(self.used(gw, "pc", pid), 150)
        self.assertEqual(self.used(gw, "pc", cid), 30)
        # Completion-heavy requests exhaust the completion limit only.
        n = 0
        while True:
            r = pc.post(chat(2, 100))
            if r.status != 200:
                break
            n += 1
            self.assertLessEqual(n, 6)
        self.assertEqual(n, 6, "admitted while completion used < 600: 30, 130, ..., 530")
        self.assertQuotaRejection(r, message=None)
        self.assertEqual(r.header("x-ratelimit-limit-tokens"), "600", repr(r))
        self.assertEqual(self.used(gw, "pc", cid), 630)
        self.assertEqual(self.used(gw, "pc", pid), 162)
        refused = [e for e in read_access_log(gw.access_log) if e.get("status") == 429]
        self.assertEqual([e["limit_id"] for e in refused], [cid])

        # A prompt_tokens limit ignores completion tokens: 3 × (100 + 500) for 300.
        p = qh.Client(gw.port, bearer(k_p))
        self.addCleanup(p.close)
        for _ in range(3):
            r = p.post(chat(100, 500))
            self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(self.used(gw, "p"), 300)
        self.assertQuotaRejection(p.post(chat(1, 1)), message=None)

    # -- windows ------------------------------------------------------------------------

    BIG = (2, 3000)     # 3,002 tokens: three times the limit below, admitted on an empty counter
    SMALL = (2, 2)      # polls

    def charge_big(self, client, window_s):
        """Spend BIG early in a window, entirely inside it and with at least half of the
        window left for polls. Returns the window's end (epoch seconds). Retries (after two
        windows, so both buckets are empty again) when the request straddled a boundary or
        took so long (a loaded machine) that the window was nearly over."""
        for _ in range(5):
            qh.wait_window_start(window_s, 0.25 * window_s)
            t0 = time.time()
            r = client.post(chat(*self.BIG))
            t1 = time.time()
            self.assertEqual(r.status, 200, repr(r))
            if int(t0 // window_s) == int(t1 // window_s) and t1 % window_s < 0.5 * window_s:
                return (t0 // window_s) * window_s + window_s
            self.wait_windows_clear(t1, window_s)
        self.fail("could not place one request early inside one %ss window" % window_s)

    @staticmethod
    def wait_windows_clear(t, window_s):
        """Until two windows after the one holding t: both buckets are empty again."""
        end = (t // window_s) * window_s + 2 * window_s
        wait_until(lambda: time.time() >= end, 3 * window_s + 5, "two windows to pass",
                   interval=0.01)

    def poll_until_admitted(self, client, deadline_s):
        """Small requests one after another until one is admitted: [(sent, done, resp)]."""
        polls = []
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            t0 = time.time()
            r = client.post(chat(*self.SMALL))
            polls.append((t0, time.time(), r))
            if r.status == 200:
                return polls
            self.assertQuotaRejection(r, message=None)
            time.sleep(0.02)  # pacing between polls, not synchronisation
        self.fail("never admitted again within %ss: %r" % (deadline_s, polls[-3:]))

    def window_gateway(self, window, type_):
        mock = self.start_mock()
        k = key("w")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[consumer("w", [k], [limit(1000, window, type=type_)])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        return gw, c

    def test_fixed_window_resets_at_boundary(self):
        W = 2.0
        gw, c = self.window_gateway("2s", "fixed")
        boundary = self.charge_big(c, W)
        self.assertEqual(self.used(gw, "w"), 3002)
        polls = self.poll_until_admitted(c, 4 * W + 10)
        sent, done, first_ok = polls[-1]
        harness.note("fixed 2s: %d refusals, admitted %.3fs after the boundary"
                     % (len(polls) - 1, done - boundary))
        for t0, t1, r in polls[:-1]:
            self.assertLess(t0, boundary, "refused although sent after the window ended")
            reset = qh.parse_seconds(r.header("x-ratelimit-reset-tokens"))
            self.assertLessEqual(reset, 2, repr(r))
        self.assertGreaterEqual(done, boundary - 0.01, "admitted before the window ended")
        self.assertGreater(len(polls), 1, "no poll fell inside the exhausted window")
        # A fresh window: only this request's reservation (2 + 7 + 2) is counted.
        self.assertEqual(first_ok.header("x-ratelimit-remaining-tokens"), str(1000 - 11),
                         repr(first_ok))

    def test_sliding_window_smooths(self):
        """Sliding 3 s, limit 1,000, 3,002 tokens spent in one bucket. In the next bucket
        the previous one still counts for the part of it the window covers,
        3002 × (end - now) / 3 s, which falls below 1,000 only 2 s after the boundary.
        A fixed window would admit at the boundary."""
        W = 3.0
        gw, c = self.window_gateway("3s", "sliding")
        for _ in range(3):
            boundary = self.charge_big(c, W)
            polls = self.poll_until_admitted(c, 4 * W + 10)
            sent, done, first_ok = polls[-1]
            # What is checked needs polls close together (below) and the admission inside
            # the window after the boundary; a starved run (a poll stalled for a large part
            # of the window) proves neither: run it again on empty buckets.
            sends = [p[0] for p in polls]
            if done < boundary + W and max(
                    [b - a for a, b in zip(sends, sends[1:])] + [0]) < 0.5:
                break
            harness.note("sliding 3s: a starved run (admitted %.3fs after the boundary), "
                         "again" % (done - boundary))
            self.wait_windows_clear(done, W)
        else:
            self.fail("three starved runs: the polls never kept up with a 3 s window")
        harness.note("sliding 3s: %d refusals, admitted %.3fs after the boundary"
                     % (len(polls) - 1, done - boundary))
        smoothed = [p for p in polls[:-1] if p[0] >= boundary]
        self.assertTrue(smoothed, "no poll refused after the boundary: the window did not "
                        "smooth (polls: %r)" % [(round(a - boundary, 3), r.status)
                                                for a, _, r in polls])
        self.assertGreaterEqual(done, boundary + 2.0 - 0.02,
                                "admitted %.3fs after the boundary, while the previous "
                                "bucket still weighed more than the limit" % (done - boundary))
        for t0, t1, r in polls:
            if t0 >= boundary + W:
                self.assertEqual(r.status, 200, "refused although the previous bucket "
                                 "had left the window: %r" % r)
        # The admitted request saw the previous bucket's weighted share.
        remaining = int(first_ok.header("x-ratelimit-remaining-tokens"))
        self.assertLess(remaining, 1000 - 11, "the previous bucket did not count at all")

    def test_monthly_window(self):
        mock = self.start_mock()
        k1, k2, k3 = key("mo"), key("mo-small"), key("mo3")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[consumer("mo", [k1], [limit(100000, "1mo")]),
                       consumer("mo_small", [k2], [limit(50, "1mo")]),
                       consumer("mo3", [k3], [limit(100000, "3mo")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])

        r = http_request(gw.port, "POST", CHAT, headers=bearer(k1), json_body=chat(10, 10))
        expect = qh.seconds_to_next_month_utc()
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(r.header("x-ratelimit-limit-tokens"), "100000")
        reset = qh.parse_seconds(r.header("x-ratelimit-reset-tokens"))
        self.assertLessEqual(abs(reset - expect), 5,
                             "reset %ds, the first of next month UTC is in %.0fs" % (reset, expect))

        # Refused: Retry-After is the next month too.
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k2), json_body=chat(50, 50))
        self.assertEqual(r.status, 200, repr(r))
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k2), json_body=chat(1, 1))
        expect = qh.seconds_to_next_month_utc()
        self.assertQuotaRejection(r, message=None)
        self.assertLessEqual(abs(qh.parse_seconds(r.header("retry-after")) - expect), 5, repr(r))

        # 3mo: quarters counted from January 1970 (Jan, Apr, Jul, Oct).
        now = datetime.datetime.now(datetime.timezone.utc)
        q_month = (now.month - 1) // 3 * 3 + 3  # months since January of this year
        end = datetime.datetime(now.year + q_month // 12, q_month % 12 + 1, 1,
                                tzinfo=datetime.timezone.utc)
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k3), json_body=chat(10, 10))
        expect = (end - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        self.assertEqual(r.status, 200, repr(r))
        reset = qh.parse_seconds(r.header("x-ratelimit-reset-tokens"))
        self.assertLessEqual(abs(reset - expect), 5,
                             "3mo reset %ds, the next quarter starts in %.0fs" % (reset, expect))


class StreamUsageTest(qh.QuotaTestCase):

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(86400, 40)
        self.mock = self.start_mock()
        self.key = key("stream")
        self.gw = self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=[consumer("streamer", [self.key], [limit(1000000, "1d")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])

    def charged(self, fn):
        """Runs fn(); returns (its result, tokens the consumer was charged for it)."""
        before = self.used(self.gw, "streamer")
        out = fn()
        after = self.used(self.gw, "streamer")
        return out, after - before

    def stream(self, body):
        return stream_request(self.gw.port, CHAT, body, headers=bearer(self.key))

    def test_stream_charged_from_usage_chunk_hidden_unless_asked(self):
        # The client did not ask for usage.
        mark = qh.marker()
        (head, events, complete, rest), delta = self.charged(
            lambda: self.stream(chat(10, 20, mark, stream=True)))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertEqual(delta, 30, "a stream must be charged exactly its usage")
        self.assertEqual(head.header("x-ratelimit-limit-tokens"), "1000000", repr(head))
        self.assertFalse([e for e in events if e.is_usage_only()],
                         "usage chunk shown to a client that did not ask")
        self.assertFalse([e for e in events if b'"choices":[]' in e.raw.replace(b" ", b"")])
        text = "".join(e.content() or "" for e in events)
        self.assertEqual(len(text.split()), 20)
        up = json.loads(self.mock.wait_request(mark)["body"])
        self.assertIs(up.get("stream_options", {}).get("include_usage"), True,
                      "the gateway must ask the upstream for usage: %r" % up)

        # include_usage: false is not asking either.
        (head, events, complete, rest), delta = self.charged(
            lambda: self.stream(chat(10, 20, stream=True,
                                     stream_options={"include_usage": False})))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertEqual(delta, 30)
        self.assertFalse([e for e in events if e.is_usage_only()])

        # The client asked: it gets the usage chunk, once, before [DONE].
        (head, events, complete, rest), delta = self.charged(
            lambda: self.stream(chat(10, 20, stream=True,
                                     stream_options={"include_usage": True})))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertEqual(delta, 30)
        usage = [e for e in events if e.is_usage_only()]
        self.assertEqual(len(usage), 1, "expected one usage chunk: %r" % events)
        self.assertEqual(usage[0].json()["usage"],
                         {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30})
        self.assertTrue(events[-2].is_usage_only(), "the usage chunk comes last before [DONE]")

    def test_no_usage_is_charged_an_estimate(self):
        # Stream without any usage from the upstream.
        (head, events, complete, rest), delta = self.charged(
            lambda: self.stream(chat(10, 20, stream=True, mock={"no_usage": True})))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertFalse([e for e in events if e.is_usage_only()])
        self.assertGreater(delta, 0, "a stream without usage was charged nothing")
        harness.note("stream without usage (real 30) charged %d" % delta)
        # Non-stream without usage.
        r, delta2 = self.charged(lambda: http_request(
            self.gw.port, "POST", CHAT, headers=bearer(self.key),
            json_body=chat(10, 20, mock={"no_usage": True})))
        self.assertEqual(r.status, 200, repr(r))
        self.assertNotIn("usage", r.json())
        self.assertGreater(delta2, 0, "an answer without usage was charged nothing")
        # Both are marked as estimated in the access log, with what was charged.
        log = [e for e in read_access_log(self.gw.access_log) if e.get("path") == CHAT]
        self.assertEqual(len(log), 2)
        for e, d in zip(log, (delta, delta2)):
            self.assertTrue(e["usage"]["estimated"], repr(e))
            self.assertEqual(e["usage"]["total"], d, repr(e))

    def test_stream_cut_short_is_charged_what_was_produced(self):
        (head, events, complete, rest), delta = self.charged(
            lambda: self.stream(chat(10, 50, stream=True, mock={"disconnect_after": 5})))
        self.assertEqual(head.status, 200, repr(head))
        self.assertTrue(any(e.is_error for e in events), "no error event: %r" % events[-3:])
        self.assertGreater(delta, 0, "a cut stream was charged nothing")
        self.assertLess(delta, 10 + 7 + 50, "charged the whole reservation, not what was produced")


class KeyAuthTest(qh.QuotaTestCase):

    OTHER = "/other/v1/chat/completions"
    CUSTOM = "/custom/v1/chat/completions"
    OPEN = "/open/v1/chat/completions"

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.k_plain = key("plain")
        self.k_hashed = key("hashed")
        self.k_other = key("other")
        self.k_wrong = key("wrong")
        self.all_keys = [self.k_plain, self.k_hashed, self.k_other, self.k_wrong]

    def config(self, plain_keys):
        return dict(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=[
                consumer("plain", plain_keys, [limit(1000000, "1d")]),
                consumer("hashed", ["sha256:" + qh.sha256_hex(self.k_hashed).upper()]),
                consumer("other_only", [self.k_other], routes=["other"])],
            routes=[qh.quota_route("chat", [CHAT], ["m"]),
                    qh.quota_route("other", [self.OTHER], ["m"]),
                    qh.quota_route("custom", [self.CUSTOM], ["m"], key_headers=["x-team-key"]),
                    qh.quota_route("open", [self.OPEN], ["m"], auth="none")])

    def post(self, gw, headers, path=CHAT):
        return http_request(gw.port, "POST", path, headers=headers, json_body=chat(4, 4))

    def assertAuthError(self, r, status, code):
        self.assertOpenAIError(r, status)
        self.assertEqual(r.json()["error"]["code"], code, repr(r))

    def assertKeysNeverLeaked(self, gw, keys):
        """Not in sluice's log (debug level), not in the access log, not in anything the
        upstream received."""
        logs = {"stderr log": gw.log(), "access log": harness.read_text(gw.access_log)}
        for what, text in logs.items():
            self.assertTrue(text, "%s is empty: the check would prove nothing" % what)
            for k in keys:
                lines = [l for l in text.splitlines() if k in l]
                self.assertEqual(lines, [], "a key appears in the %s" % what)
        reqs = self.mock.requests()
        self.assertTrue(reqs)
        for q in reqs:
            blob = json.dumps(q.get("headers")) + (q.get("body") or "")
            for k in keys:
                self.assertFalse(k in blob, "a key reached the upstream: %r" % q)

    def test_keys_headers_and_allow_list(self):
        gw = self.start_gateway(**self.config([self.k_plain]))
        ok = 0
        # Missing, wrong, wrong scheme.
        self.assertAuthError(self.post(gw, None), 401, "missing_api_key")
        self.assertAuthError(self.post(gw, bearer(self.k_wrong)), 401, "invalid_api_key")
        self.assertAuthError(self.post(gw, {"Authorization": "Basic " + self.k_plain}), 401,
                             "missing_api_key")
        self.assertAuthError(self.post(gw, {"apikey": self.k_wrong}), 401, "invalid_api_key")
        # The three default key headers, and the Bearer scheme in any case.
        for h in (bearer(self.k_plain), {"authorization": "bearer " + self.k_plain},
                  {"apikey": self.k_plain}, {"x-api-key": self.k_plain},
                  {"X-Api-Key": self.k_plain}):
            r = self.post(gw, h)
            self.assertEqual(r.status, 200, "%r -> %r" % (list(h), r))
            ok += 1
        # A key configured as sha256:HEX works; the hash itself is not a key.
        r = self.post(gw, bearer(self.k_hashed))
        self.assertEqual(r.status, 200, repr(r))
        ok += 1
        self.assertAuthError(self.post(gw, bearer("sha256:" + qh.sha256_hex(self.k_hashed))),
                             401, "invalid_api_key")
        # A consumer limited to route "other": 403 here, 200 there.
        r = self.post(gw, bearer(self.k_other))
        self.assertOpenAIError(r, 403)
        r = self.post(gw, bearer(self.k_other), self.OTHER)
        self.assertEqual(r.status, 200, repr(r))
        ok += 1
        # A route with its own key header reads only that one.
        r = self.post(gw, {"x-team-key": self.k_plain}, self.CUSTOM)
        self.assertEqual(r.status, 200, repr(r))
        ok += 1
        self.assertAuthError(self.post(gw, bearer(self.k_plain), self.CUSTOM), 401,
                             "missing_api_key")
        # auth: none.
        r = self.post(gw, None, self.OPEN)
        self.assertEqual(r.status, 200, repr(r))
        ok += 1

        self.assertEqual(self.mock.stats()["requests"], ok, "a refused request reached the upstream")
        # The access log names the consumer and the key's fingerprint, never the key.
        log = read_access_log(gw.access_log)
        fps = {e.get("key_fingerprint") for e in log if e.get("consumer") == "plain"}
        self.assertEqual(fps, {qh.sha256_hex(self.k_plain)[:12]})
        self.assertKeysNeverLeaked(gw, self.all_keys)

    def test_model_list_needs_a_key(self):
        """GET /v1/models and /v1/models/{id}: a caller sees only the models of the routes it
        may use: with no key, those of auth: none routes (401 when there are none); with a
        valid key, its consumer's routes and the auth: none ones; a wrong key is 401."""
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=[consumer("plain", [self.k_plain]),
                       consumer("other_only", [self.k_other], routes=["other"])],
            routes=[qh.quota_route("chat", [CHAT], ["m"], models=["m-chat"]),
                    qh.quota_route("other", [self.OTHER], ["m"], models=["m-other"]),
                    qh.quota_route("custom", [self.CUSTOM], ["m"], models=["m-custom"],
                                   key_headers=["x-team-key"]),
                    qh.quota_route("open", [self.OPEN], ["m"], models=["m-open"],
                                   auth="none")])

        def models(headers, path="/v1/models"):
            return http_request(gw.port, "GET", path, headers=headers)

        for path in ("/v1/models", "/models", "/v1/models/m-open"):
            self.assertAuthError(models(bearer(self.k_wrong), path), 401, "invalid_api_key")
        r = models(None)
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual([m["id"] for m in r.json()["data"]], ["m-open"])
        self.assertAuthError(models(None, "/v1/models/m-chat"), 404, "model_not_found")
        r = models(bearer(self.k_plain))
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual([m["id"] for m in r.json()["data"]],
                         ["m-chat", "m-other", "m-custom", "m-open"])
        # Its own key header identifies the consumer too.
        r = models({"x-team-key": self.k_other})
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual([m["id"] for m in r.json()["data"]], ["m-other", "m-open"])
        r = models(bearer(self.k_other), "/v1/models/m-other")
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(r.json()["id"], "m-other")
        self.assertAuthError(models(bearer(self.k_other), "/v1/models/m-chat"), 404,
                             "model_not_found")
        r = models(bearer(self.k_plain), "/v1/models/m-chat")
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(self.mock.stats()["requests"], 0)
        self.assertKeysNeverLeaked_logs(gw, self.all_keys)

    def test_model_list_without_open_routes_needs_a_key(self):
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=[consumer("plain", [self.k_plain])],
            routes=[qh.quota_route("chat", [CHAT], ["m"], models=["m-chat"])])
        for path in ("/v1/models", "/v1/models/m-chat"):
            self.assertAuthError(http_request(gw.port, "GET", path), 401, "missing_api_key")
        r = http_request(gw.port, "GET", "/v1/models", headers=bearer(self.k_plain))
        self.assertEqual([m["id"] for m in r.json()["data"]], ["m-chat"])

    def assertKeysNeverLeaked_logs(self, gw, keys):
        for what, text in (("stderr log", gw.log()),
                           ("access log", harness.read_text(gw.access_log))):
            self.assertTrue(text, "%s is empty: the check would prove nothing" % what)
            for k in keys:
                self.assertFalse(k in text, "a key appears in the %s" % what)

    def test_key_rotation_by_reload(self):
        k_new = key("new")
        gw = self.start_gateway(**self.config([self.k_plain]))
        self.assertEqual(self.post(gw, bearer(self.k_plain)).status, 200)
        used = self.used(gw, "plain")
        self.assertGreater(used, 0)
        self.assertAuthError(self.post(gw, bearer(k_new)), 401, "invalid_api_key")

        self.reload_gateway(gw, **self.config([k_new]))
        wait_until(lambda: self.post(gw, bearer(self.k_plain)).status == 401, message=
                   "the old key to be refused after the reload")
        for _ in range(6):  # fresh connections: both workers
            self.assertAuthError(self.post(gw, bearer(self.k_plain)), 401, "invalid_api_key")
            r = self.post(gw, bearer(k_new))
            self.assertEqual(r.status, 200, repr(r))
        # Same consumer, same counters.
        self.assertEqual(self.used(gw, "plain"), used + 6 * 8)
        self.assertKeysNeverLeaked(gw, self.all_keys + [k_new])


class TenantIsolationTest(qh.QuotaTestCase):

    def test_request_rate_limit(self):
        qh.avoid_window_edge(60, 8)  # a 1m window is a clock-aligned minute
        mock = self.start_mock()
        k, k2, k3 = key("rate"), key("rate2"), key("rate3")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[consumer("rate", [k], [limit(requests=5, window="1m")]),
                       consumer("rate2", [k2], [limit(requests=5, window="1m")]),
                       consumer("rate3", [k3], [limit(requests=1, window="1m")],
                                rejected_code=402, rejected_msg="Buy more requests")],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for i in range(5):
            r = c.post(chat(4, 4))
            self.assertEqual(r.status, 200, "request %d: %r" % (i + 1, r))
        r = c.post(chat(4, 4))
        self.assertQuotaRejection(r, message=None, token_headers=False)
        self.assertLessEqual(qh.parse_seconds(r.header("retry-after")), 60)
        # Another tenant is not affected.
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k2), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, repr(r))
        # A consumer's own rejected_code and rejected_msg.
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k3), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, repr(r))
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k3), json_body=chat(4, 4))
        self.assertQuotaRejection(r, status=402, message="Buy more requests", token_headers=False)
        self.assertEqual(mock.stats()["requests"], 7)

    def test_max_concurrent(self):
        mock = self.start_mock()
        k, k2 = key("conc"), key("conc2")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url())],
            consumers=[consumer("conc", [k], max_concurrent=2),
                       consumer("conc2", [k2], max_concurrent=2)],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])
        results = {}

        def slow(i):
            results[i] = http_request(gw.port, "POST", CHAT, headers=bearer(k),
                                      json_body=chat(4, 4, mock={"ttft_ms": 2500}))

        threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        mock.wait_stats(lambda s: s["running"] == 2, "two slow requests in flight")
        obj = qh.admin_get(gw.admin_port, "/consumers/conc")
        self.assertEqual(obj["in_flight"], 2, repr(obj))
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k), json_body=chat(4, 4))
        self.assertOpenAIError(r, 429)
        self.assertEqual(r.json()["error"]["code"], "too_many_concurrent_requests", repr(r))
        # Another consumer has its own cap.
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k2), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, repr(r))
        for t in threads:
            t.join(30)
        self.assertEqual([results[i].status for i in range(2)], [200, 200])
        wait_until(lambda: qh.admin_get(gw.admin_port, "/consumers/conc")["in_flight"] == 0,
                   message="consumer conc's in-flight count to return to 0")
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, "the slots were not released: %r" % r)
        # A client that leaves gives its slot back too.
        conns = []
        for _ in range(2):
            hc = harness.HTTPConn(gw.port)
            self.addCleanup(hc.close)
            hc.send_request("POST", CHAT, headers=bearer(k),
                            json_body=chat(4, 4, mock={"hang": True}))
            conns.append(hc)
        mock.wait_stats(lambda s: s["running"] == 2, "two hanging requests in flight")
        self.assertEqual(http_request(gw.port, "POST", CHAT, headers=bearer(k),
                                      json_body=chat(4, 4)).status, 429)
        for hc in conns:
            hc.close()
        wait_until(lambda: qh.admin_get(gw.admin_port, "/consumers/conc")["in_flight"] == 0,
                   message="the slots of the clients that left to be released")
        r = http_request(gw.port, "POST", CHAT, headers=bearer(k), json_body=chat(4, 4))
        self.assertEqual(r.status, 200, repr(r))


class AbortChargeTest(qh.QuotaTestCase):
    """docs/quotas.md §3, "what an attempt costs": an attempt that reached the upstream is
    charged although the client left before its answer (issue 12, §1b item 4)."""

    def setUp(self):
        super().setUp()
        qh.avoid_window_edge(3600, 40)
        self.mock = self.start_mock()

    def gateway(self, consumers):
        return self.start_gateway(
            instances=[qh.quota_instance("m", self.mock.url())],
            consumers=consumers, routes=[qh.quota_route("chat", [CHAT], ["m"])])

    def send_and_leave(self, gw, key_, body):
        """Send body; when it reaches the upstream, close the connection and wait for the
        upstream transfer to be cancelled. Returns None then, or the response sluice sent
        before anything reached the upstream."""
        mark = body["messages"][0]["content"].split(" ", 1)[0]
        before = self.mock.stats()["cancelled"]
        hc = harness.HTTPConn(gw.port)
        self.addCleanup(hc.close)
        hc.send_request("POST", CHAT, headers=bearer(key_), json_body=body)

        def reached_or_answered():
            if self.mock.find_request(mark) is not None:
                return "reached"
            r, _, _ = select.select([hc.sock], [], [], 0)
            return "answered" if r else None
        what = wait_until(reached_or_answered,
                          message="the request to reach the upstream or be answered")
        if what == "answered":
            r = hc.read_response()
            hc.close()
            return r
        hc.close()
        self.mock.wait_stats(lambda s: s["cancelled"] == before + 1,
                             "the upstream transfer of the client that left to be cancelled")
        return None

    def test_six_aborts_on_a_two_request_limit(self):
        """Six requests on a `requests: 2` limit, each abandoned by its client once it
        reached the upstream (non-stream, and streams before their first content): only two
        reach the upstream, the others are refused, and so are the next two."""
        k = key("abort")
        gw = self.gateway([consumer("ab", [k], [limit(requests=2, window="1h")])])
        outcomes = []
        for i in range(6):
            m = qh.marker()
            body = chat(8, 4, mark=m, stream=(i % 2 == 1), mock={"hang": True})
            r = self.send_and_leave(gw, k, body)
            if r is None:
                outcomes.append("reached")
            else:
                self.assertQuotaRejection(r, message=None, token_headers=False)
                outcomes.append("refused")
        self.assertEqual(outcomes, ["reached"] * 2 + ["refused"] * 4)
        self.assertEqual(self.mock.stats()["requests"], 2)
        for _ in range(2):
            r = http_request(gw.port, "POST", CHAT, headers=bearer(k), json_body=chat(4, 4))
            self.assertQuotaRejection(r, message=None, token_headers=False)
        self.assertEqual(self.mock.stats()["requests"], 2)
        # Both requests were counted, none is still reserved.
        lid = "consumer:ab:*:requests:1h"
        self.assertEqual(qh.consumer_used(gw.admin_port, "ab", limit_id=lid), 2)

    def test_abandoned_requests_are_charged_the_prompt_estimate(self):
        """Tokens: what was produced, or, when that is unknown, the prompt estimate (10
        prompt tokens → 10 + 7, docs/quotas.md §4). A stream cut by its client after three
        tokens adds what it produced."""
        k = key("abtok")
        gw = self.gateway([consumer("abt", [k], [limit(10000, "1h")])])
        est = 10 + qh.EST_OVERHEAD_ONE_MESSAGE
        self.assertIsNone(self.send_and_leave(
            gw, k, chat(10, 20, mark=qh.marker(), mock={"hang": True})))
        self.assertEqual(self.used(gw, "abt"), est, "a non-stream request the client left")
        self.assertIsNone(self.send_and_leave(
            gw, k, chat(10, 20, mark=qh.marker(), stream=True, mock={"hang": True})))
        self.assertEqual(self.used(gw, "abt"), 2 * est, "a stream left before its content")
        # A stream left after some content: the prompt estimate and what it produced.
        before = self.mock.stats()["cancelled"]
        hc = harness.HTTPConn(gw.port)
        self.addCleanup(hc.close)
        hc.send_request("POST", CHAT, headers=bearer(k),
                        json_body=chat(10, 1000, stream=True, mock={"itl_ms": 200}))
        self.assertEqual(hc.read_head().status, 200)
        seen = 0
        for ev in hc.iter_events():
            if ev.content():
                seen += 1
            if seen == 3:
                break
        hc.close()
        self.mock.wait_stats(lambda s: s["cancelled"] == before + 1,
                             "the stream the client left to be cancelled")
        used = self.used(gw, "abt") - 2 * est
        self.assertGreater(used, est, "what the stream produced was not charged")
        self.assertLess(used, est + 1000, "the whole reservation was charged")
        self.assertEqual(self.mock.stats()["requests"], 3)


class ReservationSizeTest(qh.QuotaTestCase):
    """A client's max_tokens and n cannot make one request reserve an instance's whole
    quota (issue 12, §1b item 7): the completion side of a reservation is at most the
    instance's max_reservation, and the arithmetic saturates instead of wrapping."""

    def test_huge_max_tokens_does_not_lock_out_others(self):
        qh.avoid_window_edge(3600, 40)
        mock = self.start_mock()
        kb, ks = key("big"), key("small")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url(), limits=[limit(100000, "1h")])],
            consumers=[consumer("big", [kb], [limit(10, "1h")]), consumer("small", [ks])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])])
        m = qh.marker()
        big = chat(10, 4, mark=m, mock={"hang": True})
        big["max_tokens"] = 9 * 10 ** 18
        big["n"] = 1000
        hc = harness.HTTPConn(gw.port)
        self.addCleanup(hc.close)
        hc.send_request("POST", CHAT, headers=bearer(kb), json_body=big)
        mock.wait_request(m)
        # Reserved on the instance: the prompt estimate + max_reservation (default 32768),
        # not 9e18 × 1000.
        held = 10 + qh.EST_OVERHEAD_ONE_MESSAGE + 32768
        lid = "instance:m:total_tokens:1h"
        self.assertEqual(qh.instance_limits(gw.admin_port, "m")[lid]["used"], held)
        for i in range(3):
            r = http_request(gw.port, "POST", CHAT, headers=bearer(ks), json_body=chat(4, 4))
            self.assertEqual(r.status, 200, "another consumer locked out: %r" % r)
        # The third one's header: after two settled requests (8 tokens each) and its own
        # reservation (prompt estimate 4 + 7, completion 4).
        self.assertEqual(r.header("x-ratelimit-remaining-tokens"),
                         str(100000 - held - 2 * 8 - (4 + qh.EST_OVERHEAD_ONE_MESSAGE + 4)),
                         repr(r))
        hc.close()
        mock.wait_stats(lambda s: s["cancelled"] == 1, "the big request to be cancelled")


class ReloadTest(qh.QuotaTestCase):

    def test_counters_survive_reload(self):
        qh.avoid_window_edge(3600, 40)
        mock = self.start_mock()
        k = key("reload")
        lid = "consumer:rl:m:total_tokens:1h"
        iid = "instance:m:total_tokens:1h"

        def cfg(quota):
            return dict(
                instances=[qh.quota_instance("m", mock.url(), limits=[limit(100000, "1h")])],
                consumers=[consumer("rl", [k], [limit(quota, "1h", instance="m")],
                                    rejected_msg=REJECTED_MSG)],
                routes=[qh.quota_route("chat", [CHAT], ["m"])])

        gw = self.start_gateway(**cfg(10000))
        c = qh.Client(gw.port, bearer(k))
        self.addCleanup(c.close)
        for _ in range(12):  # 60 %
            self.assertEqual(c.post(chat(100, 400)).status, 200)
        self.assertEqual(self.used(gw, "rl"), 6000)

        # Same limits.
        self.reload_gateway(gw, **cfg(10000))
        c.close()
        self.assertEqual(self.used(gw, "rl"), 6000)
        self.assertEqual(qh.instance_limits(gw.admin_port, "m")[iid]["used"], 6000)
        r = c.post(chat(100, 400))
        self.assertEqual(r.status, 200, repr(r))
        # remaining after this request's reservation (107 + 400) on 6,000 used
        self.assertEqual(r.header("x-ratelimit-remaining-tokens"), str(10000 - 6000 - 507))
        self.assertEqual(self.used(gw, "rl"), 6500)

        # A changed value keeps what was used.
        self.reload_gateway(gw, **cfg(8000))
        c.close()
        lims = qh.consumer_limits(gw.admin_port, "rl")
        self.assertEqual((lims[lid]["limit"], lims[lid]["used"]), (8000, 6500))
        n = 0
        while True:
            r = c.post(chat(100, 400))
            if r.status != 200:
                break
            n += 1
            self.assertLessEqual(n, 3)
        self.assertEqual(n, 3, "8,000 - 6,500 leaves three 500-token requests")
        self.assertQuotaRejection(r)
        self.assertEqual(r.header("x-ratelimit-limit-tokens"), "8000", repr(r))
        self.assertEqual(self.used(gw, "rl"), 8000)
        self.assertEqual(qh.instance_limits(gw.admin_port, "m")[iid]["used"], 8000)


if __name__ == "__main__":
    harness.main()
