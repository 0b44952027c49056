"""test_quota_faults.py — quota counters under Redis faults, and what hostile or failing
peers make of a request (issue 12): a redis-server stopped (SIGSTOP) while admissions and
settlements are in flight, and resumed (SIGCONT), under a small load; request bodies and
upstream answers the byte-level code must survive.

  RedisStallAccountingTest   with on_error allow and deny: once Redis is back and the
                             requests have finished, every Redis counter holds exactly what
                             the requests it admitted were charged — no reservation left over
                             (a late admission undone by its token, settlements that timed
                             out retried after the reconnect), no live member left in any
                             reservation set

  RequestFaultTest           a member name written with escapes ("mod\u0065l") is
                             still found and replaced; an SSE event whose data ends in a
                             backslash is counted to its end, not past it; errors sent to
                             clients name the instance and a generic reason, never the
                             upstream's address or libcurl's text (those go to the error
                             log, with the request id)

Every request costs the same (quota_helpers.chat(4, 4): 8 tokens, one request), so a
counter's consistency is arithmetic: the consumer's token counter is 8 × its request
counter, and equals the instance's. A reservation left over breaks that (it holds the
estimate, 4 + 7 + 4 = 15 tokens, not 8) and stays until its lease ends (minutes), so waiting
for the counters to be consistent, with a deadline, fails on a leak.
"""

import json
import re
import threading

import harness
import quota_helpers as qh
from sched_support import FixedUpstream
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


class RequestFaultTest(qh.QuotaTestCase):

    def test_escaped_member_names_are_understood(self):
        """JSON allows a member name written with escapes. The body splice that replaces
        "model" scans the raw bytes; a name it cannot recognise there must not make the
        request fail (it used to: 500) — the body is rebuilt instead."""
        mock = self.start_mock()
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", mock.url(), model="up-model")],
            routes=[qh.quota_route("chat", [CHAT], ["m"], auth="none")])
        for stream in (False, True):
            m = qh.marker()
            raw = ('{"mod\\u0065l":"client-model","messages":[{"role":"user","content":'
                   '"%s"}],"mock":{"tokens":3}%s}' % (m, ',"stream":true' if stream else ""))
            with harness.HTTPConn(gw.port) as c:
                c.send_request("POST", CHAT, body=raw.encode())
                r = c.read_response()
            self.assertEqual(r.status, 200, "stream=%s: %r" % (stream, r))
            sent = json.loads(mock.wait_request(m)["body"])
            self.assertEqual(sent["model"], "up-model", repr(sent))
            self.assertEqual(sent["messages"][0]["content"], m)
            if stream:
                self.assertTrue(r.body.rstrip().endswith(b"data: [DONE]"), repr(r.body[-80:]))
                self.assertEqual(sent["stream_options"], {"include_usage": True})

    def test_sse_data_ending_in_a_backslash(self):
        """An event whose data ends inside a string escape ("...\\" then the end of the
        line): the text scan for the usage estimate stops at the end of the data. The
        logged output is exactly the event's text, and the estimate counts its 4 bytes
        (1 token), not one past them."""
        up = FixedUpstream(200, body=b'data: {"choices":[{"index":0,"delta":{"content":"abc\\'
                           b'\n\ndata: [DONE]\n\n', content_type="text/event-stream")
        self.addCleanup(up.close)
        k = qh.make_key("bs")
        gw = self.start_gateway(
            instances=[qh.quota_instance("m", up.url())],
            consumers=[consumer("bs", [k], [limit(100000, "1h")])],
            routes=[qh.quota_route("chat", [CHAT], ["m"])], payloads=True)
        rid = "bs-" + qh.marker()
        head, events, complete, rest = harness.stream_request(
            gw.port, CHAT, chat(4, 4, stream=True), headers=dict(bearer(k), **{"x-request-id": rid}))
        self.assertEqual(head.status, 200, repr(head))
        self.assertTrue(complete)
        entry = wait_until(lambda: next((e for e in qh.read_access_log(gw.access_log)
                                         if e.get("request_id") == rid), None),
                           message="the stream's access-log line")
        self.assertEqual(entry["usage"]["completion"], 1, repr(entry))
        self.assertTrue(entry["usage"]["estimated"])
        self.assertEqual(entry["output"], "abc\\", repr(entry))

    def test_errors_do_not_show_upstream_details(self):
        """What failed is the client's business (the instance, a reason), how it failed is
        the operator's: the upstream's address and libcurl's messages go to the error log
        with the request id, not to the client — as a JSON error, as the message of an
        every-candidate-failed 502, or inside a stream's error event."""
        dead1, dead2 = harness.closed_port(), harness.closed_port()
        mock = self.start_mock()
        gw = self.start_gateway(
            instances=[qh.quota_instance("dead1", "http://127.0.0.1:%d/v1/chat/completions" % dead1),
                       qh.quota_instance("dead2", "http://127.0.0.1:%d/v1/chat/completions" % dead2),
                       qh.quota_instance("live", mock.url())],
            routes=[qh.quota_route("one", ["/one" + CHAT], ["dead1"], auth="none",
                                   fallback_on=[]),
                    qh.quota_route("two", ["/two" + CHAT], [("dead1", 2), ("dead2", 1)],
                                   auth="none"),
                    qh.quota_route("cut", [CHAT], ["live"], auth="none")])
        leaks = ["127.0.0.1", str(dead1), str(dead2), str(mock.port), "Failed to connect",
                 "Connection refused", "Couldn't connect", "curl", "transfer closed",
                 "port "]

        def assertClean(text, what, instance):
            for bad in leaks:
                self.assertNotIn(bad, text, "%s shows %r: %s" % (what, bad, text))
            self.assertIn(instance, text, what)

        for path, code, inst in (("/one" + CHAT, "upstream_connect_error", "dead1"),
                                 ("/two" + CHAT, "upstream_connect_error", "dead2")):
            rid = "err-" + qh.marker()
            r = harness.http_request(gw.port, "POST", path, json_body=chat(4, 4),
                                     headers={"x-request-id": rid})
            self.assertOpenAIError(r, 502)
            self.assertEqual(r.json()["error"]["code"], code, repr(r))
            assertClean(r.json()["error"]["message"], path, inst)
            # The operator still gets the details, with the request id.
            gw.wait_log(r"\[%s\] .*%s.*(Connection refused|Failed to connect|"
                        r"Couldn't connect)" % (re.escape(rid), inst))
        rid = "cut-" + qh.marker()
        head, events, complete, rest = harness.stream_request(
            gw.port, CHAT, chat(4, 50, stream=True, mock={"disconnect_after": 3}),
            headers={"x-request-id": rid})
        self.assertEqual(head.status, 200, repr(head))
        errors = [e for e in events if e.is_error]
        self.assertEqual(len(errors), 1, repr(events[-3:]))
        assertClean(errors[0].data, "the stream's error event", "live")
        gw.wait_log(r"\[%s\] instance live: stream failed after the first byte: \S"
                    % re.escape(rid))


if __name__ == "__main__":
    harness.main()
