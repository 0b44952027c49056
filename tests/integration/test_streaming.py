"""test_streaming.py — SSE streams through sluice: events byte-identical to the upstream's and
ending in data: [DONE]; forwarded as they arrive; client disconnect cancels the upstream;
a client that stops reading does not make sluice buffer the stream (bounded RSS);
long pauses between events do not cut a stream."""

import json
import threading
import time
import uuid

import harness
from harness import HTTPConn, http_request, instance, parse_sse, route, stream_request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MiB = 1024 * 1024


def marker():
    return "m-" + uuid.uuid4().hex


def chat_body(mark="", stream=True, usage=None, **mock):
    b = {"model": "client-model", "messages": [{"role": "user", "content": "hi " + mark}],
         "stream": stream}
    if usage is not None:
        b["stream_options"] = {"include_usage": usage}
    if mock:
        b["mock"] = mock
    return b


def content_events(events):
    return [e for e in events if e.content()]


class StreamTest(harness.SluiceTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.tap = self.start_tap(self.mock.port)
        self.sluice = self.start_sluice(
            instances=[
                instance("mock", self.tap.url(CHAT), model="mock-upstream-model",
                         options={"temperature": 0.5},
                         auth_header={"Authorization": "Bearer upstream-secret"}),
                instance("mock-completions", self.tap.url(COMPLETIONS), model="mock-completions"),
            ],
            routes=[route("chat", [CHAT], "mock"),
                    route("completions", [COMPLETIONS], "mock-completions")])
        self.port = self.sluice.port

    def upstream_events(self, mark):
        _, up = self.tap.wait_exchange(mark)
        self.assertEqual(up.status, 200, up)
        return up, parse_sse(up.body)

    # -- round trips ---------------------------------------------------------------------
    def test_stream_byte_identical_with_usage(self):
        m = marker()
        head, events, complete, rest = stream_request(
            self.port, CHAT, chat_body(m, usage=True, tokens=12, itl_ms=0))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertTrue(head.header("content-type", "").startswith("text/event-stream"), head)
        self.assertEqual(head.header("x-sluice-instance"), "mock")
        self.assertTrue(head.header("x-request-id"))
        self.assertEqual(head.header("cache-control"), "no-cache", head)
        self.assertEqual(len(content_events(events)), 12, events)
        self.assertTrue(any(e.is_usage_only() for e in events),
                        "include_usage was asked for but no usage chunk arrived")

        up, up_events = self.upstream_events(m)
        self.assertEqual([e.raw for e in events], [e.raw for e in up_events],
                         "client events differ from the upstream's")
        self.assertEqual(b"".join(e.raw for e in events), up.body)
        sent = json.loads(self.mock.wait_request(m)["body"])
        self.assertEqual(sent["model"], "mock-upstream-model")
        self.assertEqual(sent["temperature"], 0.5)
        self.assertIs(sent["stream"], True)

    def test_stream_without_usage_request(self):
        """The client did not ask for usage: it sees the upstream's events minus any usage-only
        chunk the gateway may have asked for on its own behalf — never a usage chunk."""
        m = marker()
        head, events, complete, rest = stream_request(
            self.port, CHAT, chat_body(m, tokens=8, itl_ms=0))
        self.assertStreamComplete(head, events, complete, rest)
        self.assertFalse([e for e in events if e.is_usage_only()],
                         "a usage chunk the client did not ask for")
        _, up_events = self.upstream_events(m)
        expected = [e.raw for e in up_events if not e.is_usage_only()]
        self.assertEqual([e.raw for e in events], expected)
        self.assertEqual(len(content_events(events)), 8)

    def test_completions_stream_byte_identical(self):
        m = marker()
        body = {"model": "c", "prompt": "p " + m, "stream": True,
                "stream_options": {"include_usage": True}, "mock": {"tokens": 6, "itl_ms": 0}}
        head, events, complete, rest = stream_request(self.port, COMPLETIONS, body)
        self.assertStreamComplete(head, events, complete, rest)
        self.assertEqual(len(content_events(events)), 6, events)
        _, up_events = self.upstream_events(m)
        self.assertEqual([e.raw for e in events], [e.raw for e in up_events])

    def test_events_arrive_incrementally(self):
        """The first content event reaches the client while the upstream is still streaming
        (the mock has not completed the request yet): no buffering of the whole stream."""
        tokens = 20
        with HTTPConn(self.port) as c:
            c.send_request("POST", CHAT, json_body=chat_body(tokens=tokens, itl_ms=300))
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            it = c.iter_events()
            seen = []
            for ev in it:
                seen.append(ev)
                if ev.content():
                    break
            self.assertTrue(seen and seen[-1].content(), "no content event: %r" % seen)
            st = self.mock.stats()
            self.assertEqual(st["completed"], 0,
                             "the upstream had already finished when the first event arrived: "
                             "sluice buffered the stream (stats %r)" % st)
            self.assertGreaterEqual(st["active"], 1, st)
            seen.extend(it)
            self.assertStreamComplete(head, seen, c.body_state.get("complete"), c.sse_rest)
            self.assertEqual(len(content_events(seen)), tokens)
        self.mock.wait_stats(lambda s: s["completed"] == 1, "the mock to complete the stream")

    def test_many_concurrent_streams(self):
        results = {}

        def client(n):
            try:
                results[n] = stream_request(self.port, CHAT, chat_body(
                    "c%d" % n, usage=True, tokens=15, itl_ms=20), timeout=60)
            except Exception as exc:  # noqa: BLE001
                results[n] = exc

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        self.assertEqual(len(results), 16, "streams did not finish")
        for n, res in sorted(results.items()):
            self.assertNotIsInstance(res, Exception, "stream %d: %r" % (n, res))
            head, events, complete, rest = res
            self.assertStreamComplete(head, events, complete, rest)
            self.assertEqual(len(content_events(events)), 15, "stream %d" % n)
        self.assertEqual(self.mock.stats()["completed"], 16)

    # -- cancellation --------------------------------------------------------------------
    def test_client_disconnect_mid_stream_cancels_upstream(self):
        c = HTTPConn(self.port)
        try:
            c.send_request("POST", CHAT, json_body=chat_body(tokens=1000, itl_ms=100))
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            for ev in c.iter_events():
                if ev.content():
                    break
            else:
                self.fail("stream ended before the first content event")
            self.assertEqual(self.mock.stats()["cancelled"], 0)
        finally:
            c.close()
        # 1000 tokens at 100 ms would take 100 s: the cancel must come from sluice
        st = self.mock.wait_stats(lambda s: s["cancelled"] == 1 and s["active"] == 0,
                                  "the mock to see the upstream transfer cancelled", timeout=15)
        self.assertEqual(st["completed"], 0, st)
        # and the gateway keeps serving
        head, events, complete, rest = stream_request(self.port, CHAT, chat_body(tokens=3, itl_ms=0))
        self.assertStreamComplete(head, events, complete, rest)

    def test_client_disconnect_before_first_byte_cancels_upstream(self):
        c = HTTPConn(self.port)
        try:
            c.send_request("POST", CHAT, json_body=chat_body(tokens=5, ttft_ms=60000))
            self.mock.wait_stats(lambda s: s["requests"] == 1 and s["active"] == 1,
                                 "the request to reach the mock")
        finally:
            c.close()
        st = self.mock.wait_stats(lambda s: s["cancelled"] == 1 and s["active"] == 0,
                                  "the mock to see the upstream request cancelled", timeout=15)
        self.assertEqual(st["completed"], 0, st)

    # -- back-pressure -------------------------------------------------------------------
    def test_slow_reader_bounded_memory(self):
        """A client that stops reading: sluice pauses the upstream instead of buffering, so it
        stops pulling bytes from the upstream (counted by the tap) and its RSS stays bounded;
        once the client reads again the whole stream arrives intact.

        (The mock's `completed` counter cannot be used here: the mock queues its whole reply in
        its own output buffer and counts it complete; the tap's byte count is what shows how
        much sluice actually read.)"""
        # warm up: threads, curl handles, buffers touched once
        for _ in range(3):
            m = marker()
            head, events, complete, rest = stream_request(
                self.port, CHAT, chat_body(m, tokens=2000, itl_ms=0), timeout=60)
            self.assertStreamComplete(head, events, complete, rest)
        per_stream = len(self.tap.wait_exchange(m)[1].body) / 2000.0
        tokens = 300000
        total = per_stream * tokens
        self.assertGreater(total, 40 * MiB, "stream too small to prove anything")
        self.mock.clear()
        base_rss = self.sluice.rss_kib()
        base_down = self.tap.bytes_down()

        c = HTTPConn(self.port, rcvbuf=16384, timeout=120)
        try:
            c.send_request("POST", CHAT, json_body=chat_body(tokens=tokens, itl_ms=0))
            # do not read anything; watch how much sluice pulls from the upstream
            peak_rss = base_rss
            last = -1
            last_change = time.monotonic()
            deadline = time.monotonic() + 90
            stable_for = 3.0
            while True:
                down = self.tap.bytes_down() - base_down
                peak_rss = max(peak_rss, self.sluice.rss_kib())
                now = time.monotonic()
                if down != last:
                    last, last_change = down, now
                if down >= total * 0.9:
                    self.fail("sluice pulled %.1f MiB of the %.1f MiB stream for a client that "
                              "read nothing: no back-pressure" % (down / MiB, total / MiB))
                if down > 0 and now - last_change >= stable_for:
                    break  # the upstream is paused
                if now > deadline:
                    self.fail("the upstream never paused: %.1f MiB pulled so far" % (down / MiB))
                time.sleep(0.1)
            grown = (peak_rss - base_rss) / 1024.0
            harness.note("stream %.1f MiB; sluice pulled %.1f MiB then paused; RSS %d -> peak %d KiB"
                         % (total / MiB, last / MiB, base_rss, peak_rss))
            self.assertLess(grown, 20, "sluice RSS grew by %.1f MiB while the client did not read "
                            "(base %d KiB, peak %d KiB)" % (grown, base_rss, peak_rss))
            self.assertLess(last, total / 2, "sluice pulled %.1f MiB of %.1f MiB from the upstream "
                            "for a client that read nothing" % (last / MiB, total / MiB))

            # resume: the rest of the stream arrives, intact
            head = c.read_head()
            self.assertEqual(head.status, 200, head)
            tail = b""
            n_data = 0
            size = 0
            for piece in c.iter_body():
                size += len(piece)
                n_data += (tail[-5:] + piece).count(b"data: ")
                tail = (tail + piece)[-64:]
            self.assertTrue(c.body_state.get("complete"), "stream truncated after resuming")
            self.assertTrue(tail.endswith(b"data: [DONE]\n\n") or
                            tail.endswith(b"data: [DONE]\r\n\r\n"), tail)
            self.assertGreaterEqual(n_data, tokens + 1, "events lost: %d data lines" % n_data)
            self.assertGreater(size, total * 0.9)
        finally:
            c.close()
        self.mock.wait_stats(lambda s: s["completed"] == 1, "the mock to complete the stream")


class LongPauseTest(harness.SluiceTestCase):
    """libevent's evhttp timeout (client_timeout / keepalive_timeout) must not cut a stream
    whose events are further apart than it, nor a slow non-stream reply."""

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.sluice = self.start_sluice(
            instances=[instance("mock", self.mock.url(CHAT),
                                timeouts={"first_byte": "20s", "idle": "20s", "total": "60s"})],
            routes=[route("chat", [CHAT], "mock")],
            server={"client_timeout": "1s", "keepalive_timeout": "1s"})
        self.port = self.sluice.port

    def test_long_pauses_between_events(self):
        head, events, complete, rest = stream_request(
            self.port, CHAT, chat_body(tokens=3, ttft_ms=2500, itl_ms=3000), timeout=60)
        self.assertStreamComplete(head, events, complete, rest)
        self.assertEqual(len(content_events(events)), 3, events)

    def test_slow_non_stream_reply(self):
        r = http_request(self.port, "POST", CHAT, json_body=chat_body(stream=False, tokens=3,
                                                                      ttft_ms=3000), timeout=60)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.json()["choices"][0]["message"]["content"])


if __name__ == "__main__":
    harness.main()
