"""test_faults_upstream.py — upstream faults at the byte level (issue 12 §3), against a real
sluice, the real sluice-mockllm and faulty_upstream.FaultyUpstream (a raw-socket server for
what a well-behaved mock cannot send), and the mock SIGSTOPped / SIGCONTed under load.

  ByteFaultTest   one fault per test: refused, closed on accept, reset (before and after the
                  first event), hang after the headers, garbage instead of HTTP, a 2xx
                  text/event-stream that holds no event, one 10 MiB event (over the 4 MiB
                  cap), endless headers, slower than first_byte. Each is met by
                    - route `fb` (faulty instance `bad` at priority 10, the mock `good` at 5):
                      before the first byte the client gets a complete answer from `good`,
                      unseen; after it, one `event: error` and no [DONE];
                    - route `solo` (`bad` only): the status (502/504) in the OpenAI error
                      shape, or the error event;
                  while route `chat` (`good` only) carries background traffic that must not
                  see a single failure. Then: the attempt's outcome in /metrics
                  (sluice_attempts_total, sluice_fallbacks_total, sluice_requests_total) and
                  in each request's access-log line; and nothing left over — no request in
                  flight, no client or upstream connection, no fd beyond the baseline
                  census (/proc/<pid>/fd), no reservation (each request reserves 50,000
                  tokens of max_tokens; the consumer's use must stay far below that).
  StopTest        the primary mock SIGSTOPped under a bounded load of streams and
                  non-streams: requests fall back to the second mock (first_byte), the
                  primary is marked unhealthy; SIGCONT: traffic returns to it; no HTTP
                  error at all, only streams caught mid-flight may end with an error event.

Every fault test runs with passive health checks off on `bad`, so each request meets the
fault. Timeouts on `bad`: first_byte 2 s, idle 2 s; the slow upstream waits 15 s, the
hanging one up to 60 s.
"""

import signal
import threading
import unittest

import harness
from fault_helpers import (CHAT, CONSUMER, RESERVE, SLOW, BoundedLoad, FaultCase, auth,
                           chat_body, delta, fault_instance, fault_route, marker)
from faulty_upstream import FaultyUpstream
from harness import HTTPConn, wait_until

FIRST_BYTE = "2s"
IDLE = "2s"
SLOW_DELAY = 15.0
# Quota use after settling must stay far below one request's reservation.
MAX_USED = RESERVE // 2


class ByteFaultTest(FaultCase):

    def gateway(self, mode, **fu_opts):
        self.mock = self.start_mock()
        self.fu = FaultyUpstream(mode, delay=SLOW_DELAY, hold_max=60, **fu_opts)
        self.addCleanup(self.fu.close)
        instances = [
            fault_instance("bad", self.fu.url(), first_byte=FIRST_BYTE, idle=IDLE),
            fault_instance("good", self.mock.url(), pool=4),
        ]
        routes = [
            fault_route("fb", ["m-fb"], [("bad", 10), ("good", 5)]),
            fault_route("solo", ["m-solo"], [("bad", 10)]),
            fault_route("chat", ["m-chat"], [("good", 10)]),
        ]
        self.gw = self.start_gateway(instances, routes)
        self.ports = (self.fu.port,)
        self.pooled = (self.mock.port,)
        # The readiness probes' connections are closed by the client; wait until sluice
        # has closed its side before taking the baseline.
        self.wait_no_clients(self.gw)
        self.baseline = self.census(self.gw, self.ports + self.pooled)
        self.rss0 = self.gw.rss_kib()
        return self.gw

    # -- one request ---------------------------------------------------------------------
    def send(self, model, stream):
        """One request with its own x-request-id; (id, response or head, stream part): the
        stream part is (events, complete, rest) for a 200 stream, else None."""
        rid = marker()
        body = chat_body(model, stream=stream, mark=rid, tokens=3)
        with HTTPConn(self.gw.port, timeout=harness.DEADLINE + 60) as c:
            c.send_request("POST", CHAT, headers=auth(request_id=rid), json_body=body)
            head = c.read_head()
            if head.status != 200 or not stream:
                return rid, c.read_body(), None
            events = list(c.iter_events())
            return rid, head, (events, c.body_state.get("complete", False), c.sse_rest)

    def assertFallback(self, rid, resp, stream_part):
        self.assertEqual(resp.status, 200, "fallback did not hide the fault: %r" % resp)
        self.assertEqual(resp.header("x-sluice-instance"), "good", repr(resp))
        if stream_part is None:
            self.assertEqual(resp.json()["choices"][0]["message"]["content"],
                             "lorem ipsum dolor", repr(resp))
        else:
            events, complete, rest = stream_part
            self.assertStreamComplete(resp, events, complete, rest)
            self.assertEqual("".join(e.content() or "" for e in events), "lorem ipsum dolor")
        self.mock.wait_request(rid)

    def assertErrorEvent(self, resp, stream_part, n_content):
        self.assertEqual(resp.status, 200, repr(resp))
        events, complete, rest = stream_part
        self.assertEqual(rest.strip(), b"", "bytes after the last event: %r" % rest[:200])
        self.assertEqual(sum(1 for e in events if e.content()), n_content,
                         "content events before the error: %r" % events)
        self.assertFalse(any(e.is_done for e in events), "data: [DONE] after a fault: %r"
                         % events[-3:])
        self.assertTrue(events and events[-1].is_error,
                        "the stream did not end with an `event: error`: %r" % events[-3:])
        self.assertEqual(sum(1 for e in events if e.is_error), 1, repr(events))
        self.assertTrue(harness.is_openai_error(events[-1].data),
                        "error event data is not an OpenAI error: %r" % events[-1].raw)
        self.assertTrue(complete, "the chunked body was not terminated after the error event")

    def assertErrorReply(self, resp, status, codes):
        self.assertOpenAIError(resp, status)
        codes = (codes,) if isinstance(codes, str) else codes
        self.assertIn(resp.json()["error"]["code"], codes, repr(resp))
        self.assertIsNotNone(resp.header("x-request-id"), repr(resp))

    # -- the whole case ------------------------------------------------------------------
    def run_fault(self, mode, stream, fb, solo, outcomes, n_content=2, fu_opts=None,
                  counts=True, peer_closes=False):
        """fb: "fallback" or "error_event"; solo: (status, code) or "error_event";
        outcomes: accepted outcomes of the `bad` attempt (the first is the one asserted in
        the access log and metrics when counts is True; all of them are accepted when it is
        False); peer_closes: sluice must close the faulty connections itself (it gave up)."""
        gw = self.gateway(mode, **(fu_opts or {}))
        m0 = self.metrics(gw)
        load = BoundedLoad(gw.port, threads=2, per_thread=12, body_fn=lambda t, i: chat_body(
            "m-chat", stream=(i % 2 == 1), tokens=4, ttft_ms=20)).start()
        results = {}

        def one(key, model):
            results[key] = self.send(model, stream)

        threads = [threading.Thread(target=one, args=(k, m), daemon=True)
                   for k, m in (("fb1", "m-fb"), ("fb2", "m-fb"), ("solo", "m-solo"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(harness.DEADLINE + 90)
            self.assertFalse(t.is_alive(), "a fault request never ended")
        load.join()
        self.assertEqual(load.failures(), [], "background traffic failed during the fault")

        for key in ("fb1", "fb2"):
            rid, resp, sp = results[key]
            if fb == "fallback":
                self.assertFallback(rid, resp, sp)
            else:
                self.assertErrorEvent(resp, sp, n_content)
        rid, resp, sp = results["solo"]
        if solo == "error_event":
            self.assertErrorEvent(resp, sp, n_content)
        else:
            self.assertErrorReply(resp, *solo)

        # Nothing left over; the faulty upstream's connections are closed.
        self.assertSettled(gw, self.baseline, upstream_ports=self.ports,
                           pooled_ports=self.pooled, pool_bound=8, max_used=MAX_USED)
        wait_until(lambda: self.fu.counts()["open"] == 0,
                   message=lambda: "the faulty upstream's connections to close (%r)"
                   % self.fu.counts())
        if peer_closes:
            self.assertEqual(self.fu.counts()["peer_closed"], 3,
                             "sluice did not close the connections it gave up on: %r"
                             % self.fu.counts())

        # Counted: each fault request's access-log line and the metrics.
        solo_status = 200 if solo == "error_event" else solo[0]
        entries = {k: self.access_entry(gw, results[k][0]) for k in results}
        for key, e in entries.items():
            attempts = e["attempts"]
            self.assertEqual(attempts[0]["instance"], "bad", repr(e))
            self.assertIn(attempts[0]["outcome"], outcomes, "outcome of the faulty attempt: %r" % e)
            if counts:
                self.assertEqual(attempts[0]["outcome"], outcomes[0], repr(e))
            want = [("bad", attempts[0]["outcome"])]
            if key != "solo" and fb == "fallback":
                want.append(("good", "ok"))
            self.assertEqual([(a["instance"], a["outcome"]) for a in attempts], want, repr(e))
            status = solo_status if key == "solo" else 200
            self.assertEqual(e["status"], status, repr(e))
            self.assertEqual(e["consumer"], CONSUMER)
            if fb == "error_event" or (key == "solo" and solo == "error_event"):
                self.assertEqual(e["error_code"], "upstream_stream_error", repr(e))
        outcome = entries["solo"]["attempts"][0]["outcome"]
        m1 = gw.admin.wait_metrics(
            lambda m: delta(m0, m, "sluice_requests_total", route="solo", consumer=CONSUMER,
                            code=str(solo_status)) == 1 and
            delta(m0, m, "sluice_requests_total", route="fb", consumer=CONSUMER,
                  code="200") >= 2,
            "the fault requests to be counted")
        self.assertEqual(delta(m0, m1, "sluice_attempts_total", upstream="bad", outcome=outcome),
                         3, m1.summary())
        self.assertEqual(m1.sum("sluice_attempts_total", where=lambda l: l["upstream"] == "bad")
                         - m0.sum("sluice_attempts_total", where=lambda l: l["upstream"] == "bad"),
                         3, "attempts at `bad` counted under another outcome:\n" + m1.summary())
        fallbacks = delta(m0, m1, "sluice_fallbacks_total", route="fb", upstream="bad",
                          reason=outcome)
        self.assertEqual(fallbacks, 2 if fb == "fallback" else 0, m1.summary())
        if counts:
            self.assertEqual(outcome, outcomes[0])
        # And it keeps serving.
        self.assertServing(gw, "m-chat", instance="good")
        if fb == "fallback":
            self.assertServing(gw, "m-fb", instance="good")

    # -- before the first byte: fallback -------------------------------------------------
    def test_refused(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("refuse", stream, "fallback", (502, "upstream_connect_error"),
                               ("connect_error",))

    def test_close_on_accept(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("close_on_accept", stream, "fallback", (502, "upstream_error"),
                               ("upstream_error",))

    def test_reset_before_first_event(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("reset", stream, "fallback", (502, "upstream_error"),
                               ("upstream_error",), fu_opts={"events": 0})

    def test_hang_after_headers(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("hang_after_headers", stream, "fallback",
                               (504, "upstream_timeout"), ("timeout",), peer_closes=True)

    def test_garbage_instead_of_http(self):
        # The connection was made and the request sent; the instance answered bytes that
        # are not HTTP (libcurl: CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9 when not
        # allowed"). That is the instance failing (upstream_error), not a connect error
        # (upstream.c, classify()).
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("garbage", stream, "fallback", (502, "upstream_error"),
                               ("upstream_error",))

    def test_garbage_on_a_reused_connection(self):
        # The same bytes on a pooled connection that first carried a good answer: the
        # request was sent on a connection made earlier (libcurl reports no connect time
        # for it), and it is still the instance failing, not a connect error.
        gw = self.gateway("garbage_on_reuse")
        a0 = self.fu.counts()["accepted"]
        # One client connection, so one worker (each has its own upstream pool).
        with HTTPConn(gw.port, timeout=harness.DEADLINE) as c:
            first = c.request("POST", CHAT, headers=auth(),
                              json_body=chat_body("m-solo", tokens=3))
            self.assertEqual(first.status, 200, repr(first))
            rid = marker()
            second = c.request("POST", CHAT, headers=auth(request_id=rid),
                               json_body=chat_body("m-solo", mark=rid, tokens=3))
        self.assertErrorReply(second, 502, "upstream_error")
        counts = self.fu.counts()
        self.assertEqual((counts["accepted"] - a0, counts["requests"]), (1, 2),
                         "the second request did not go on the first one's connection: %r"
                         % counts)
        e = self.access_entry(gw, rid)
        self.assertEqual([(a["instance"], a["outcome"]) for a in e["attempts"]],
                         [("bad", "upstream_error")], repr(e))
        self.assertServing(gw, "m-chat", instance="good")

    def test_endless_headers(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("endless_headers", stream, "fallback", (502, "upstream_error"),
                               ("upstream_error",))
                # The header flood is cut (libcurl's 300 KB cap), not held.
                self.assertLess(self.gw.rss_kib() - self.rss0, 32 * 1024)

    def test_slower_than_first_byte(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.run_fault("slow", stream, "fallback", (504, "upstream_timeout"),
                               ("timeout",), peer_closes=True)
                self.assertEqual(self.fu.counts()["bytes_sent"], 0)

    def test_event_stream_without_events_falls_back(self):
        # A 200 text/event-stream whose body is an HTML error page (blank lines, no `data:`
        # field) is no answer: the client's stream starts only at the first event with
        # data, and one that ends without any fails over (request.c, identity_event).
        self.run_fault("not_sse", True, "fallback", (502, "upstream_error"),
                       ("upstream_error",))

    def test_huge_event_before_first_byte_falls_back(self):
        # One SSE event over the 4 MiB cap, before anything reached the client: the
        # refusal is the upstream failing (upstream_error, passive health, fallback), not
        # the client leaving (request.c records that it refused the body).
        self.run_fault("huge_event", True, "fallback", (502, "upstream_error"),
                       ("upstream_error",), fu_opts={"events": 0})

    def test_huge_event_after_first_byte_error_event(self):
        # The outcome is asserted in test_huge_event_after_first_byte_counted.
        self.run_fault("huge_event", True, "error_event", "error_event",
                       ("upstream_error", "client_gone"), fu_opts={"events": 2}, counts=False)
        # The oversized event is refused at the cap, never held whole.
        self.assertLess(self.gw.rss_kib() - self.rss0, 32 * 1024)

    def test_huge_event_after_first_byte_counted(self):
        # The same refusal after the first byte: the attempt is an upstream_error, not
        # client_gone, and the stream ends with an error event.
        self.run_fault("huge_event", True, "error_event", "error_event", ("upstream_error",),
                       fu_opts={"events": 2})

    # -- after the first byte: the error event -------------------------------------------
    def test_reset_mid_stream(self):
        self.run_fault("reset", True, "error_event", "error_event", ("upstream_error",),
                       fu_opts={"events": 2})


class StopTest(FaultCase):

    def test_mock_sigstop_sigcont_under_load(self):
        primary = self.start_mock(name="primary")
        second = self.start_mock(name="second")
        instances = [
            fault_instance("primary", primary.url(), first_byte=FIRST_BYTE, idle=IDLE,
                           passive=True, cooldown="1s", pool=4),
            fault_instance("second", second.url(), pool=4),
        ]
        gw = self.start_gateway(instances, [
            fault_route("fb", ["m-fb"], [("primary", 10), ("second", 5)])])
        self.wait_no_clients(gw)
        ports = (primary.port, second.port)
        baseline = self.census(gw, ports)

        per_thread = 600 if SLOW else 2000
        load = BoundedLoad(gw.port, threads=4, per_thread=per_thread, pause=0.005,
                           body_fn=lambda t, i: chat_body("m-fb", stream=(t % 2 == 1), tokens=5,
                                                          itl_ms=10, max_tokens=100)).start()
        self.addCleanup(load.stop)

        def served_by(name, since, n):
            rs = load.snapshot()[since:]
            return sum(1 for r in rs if r.instance == name) >= n

        wait_until(lambda: served_by("primary", 0, 20), message="traffic on the primary")
        at_stop = len(load.snapshot())
        primary.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: served_by("second", at_stop, 40), harness.DEADLINE + 20,
                       lambda: "traffic to move to the second mock (%r)" % load.snapshot()[-5:])
            wait_until(lambda: not self.instances(gw)["primary"]["healthy"],
                       message="the stopped primary to be marked unhealthy")
        finally:
            primary.proc.send_signal(signal.SIGCONT)
        at_cont = len(load.snapshot())
        wait_until(lambda: served_by("primary", at_cont, 40), harness.DEADLINE + 20,
                   lambda: "traffic to return to the primary (%r)" % load.snapshot()[-5:])
        results = load.stop()

        streams_cut = [r for r in results if r.kind == "error_event"]
        other = [r for r in results if r.kind not in ("ok", "error_event")]
        harness.note("%d requests; %d streams cut by the stop (error event); %d on second"
                     % (len(results), len(streams_cut),
                        sum(1 for r in results if r.instance == "second")))
        self.assertEqual(other, [], "requests failed around SIGSTOP/SIGCONT")
        # Only a stream already under way when the primary stopped may be cut, with the
        # idle timeout's error event; at most one per stream thread.
        self.assertLessEqual(len(streams_cut), 2, repr(streams_cut))
        for r in streams_cut:
            self.assertEqual(r.error_code, "upstream_timeout", repr(r))

        self.assertSettled(gw, baseline, pooled_ports=ports, pool_bound=8, max_used=None)
        # Every request was counted once, with the status the client saw.
        m = gw.admin.wait_metrics(
            lambda m: m.sum("sluice_requests_total", where=lambda l: l["route"] == "fb")
            == len(results), "every load request to be counted")
        self.assertEqual(m.value("sluice_requests_total", route="fb", consumer=CONSUMER,
                                 code="200"), len(results), m.summary())
        self.assertEqual(len([e for e in self.access_lines(gw) if e.get("route") == "fb"]),
                         len(results))
        # The requests sluice abandoned while the primary was stopped are gone there too.
        primary.wait_stats(lambda s: s["active"] == 0, "the primary to finish or drop "
                           "every request it held while stopped")


if __name__ == "__main__":
    harness.main()
