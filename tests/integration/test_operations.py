"""test_operations.py — operations acceptance (issue 5): Prometheus metrics after a known
scripted mix of traffic (exact counts, histogram counts, gauges, promtool), the JSON access log
(fields, attempts and why they failed over, TTFT, tokens; keys never logged; payloads only with
log.payloads; SIGUSR1 reopens), and the admin API (the key is required everywhere but /healthz;
every endpoint; POST /reload refuses a broken file with its errors and keeps serving, then
applies a fixed one).

The status page is tested in test_status_page.py; sd_notify and TLS listeners in
test_tls_notify.py. Helpers: ops_helpers.py.
"""

import json
import os
import re
import signal
import stat
import unittest
import uuid

import harness
import ops_helpers as ops
from harness import Raw, http_request, stream_request, wait_until
from ops_helpers import CHAT

SMALL_LIMIT = 10
LIMIT_ID = "consumer:small:*:total_tokens:1d"
# docs/operations.md says an attempt's outcome is "http_<status>" (its example: "http_503");
# include/sluice/record.h and the fallback trigger names say "http_5xx". Either is accepted
# here (the mismatch is reported), but it must be the same in the log and the metrics.
FLAKY_OUTCOMES = ("http_503", "http_5xx")

ACCESS_FIELDS = ("time", "request_id", "method", "path", "client_ip", "route", "consumer",
                 "key_fingerprint", "model", "upstream_model", "instance", "stream", "status",
                 "upstream_status", "error_code", "limit_id", "attempts", "bytes_in",
                 "bytes_out", "ttft_ms", "total_ms", "upstream_ms", "overhead_ms", "usage")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

LATENCY_BOUNDS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
                  "20", "30", "60", "120", "+Inf"]
OVERHEAD_BOUNDS = ["0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
                   "0.025", "0.05", "0.1", "+Inf"]

FAMILY_TYPES = {
    "sluice_requests_total": "counter",
    "sluice_upstream_responses_total": "counter",
    "sluice_attempts_total": "counter",
    "sluice_fallbacks_total": "counter",
    "sluice_quota_rejections_total": "counter",
    "sluice_tokens_total": "counter",
    "sluice_request_duration_seconds": "histogram",
    "sluice_upstream_duration_seconds": "histogram",
    "sluice_time_to_first_token_seconds": "histogram",
    "sluice_time_per_output_token_seconds": "histogram",
    "sluice_gateway_overhead_seconds": "histogram",
    "sluice_health_transitions_total": "counter",
    "sluice_config_reloads_total": "counter",
    "sluice_config_last_reload_successful": "gauge",
    "sluice_config_last_reload_success_timestamp_seconds": "gauge",
    "sluice_store_errors_total": "counter",
    "sluice_upstream_healthy": "gauge",
    "sluice_upstream_inflight": "gauge",
    "sluice_open_connections": "gauge",
    "sluice_build_info": "gauge",
    "sluice_start_time_seconds": "gauge",
}


def L(**labels):
    return tuple(sorted(labels.items()))


class OpsCase(harness.SluiceTestCase):
    """Two mocks: `good`, and `flaky` (every answer 503, passive checks off so it stays
    healthy and every fallback looks the same). Consumers: `alice` (no limits) and `small`
    (10 tokens a day). Routes on the chat path: `chat` (model m-chat → good) and `fb`
    (model m-fb → flaky at priority 10, good at priority 5, fallback on http_5xx)."""

    def setUp(self):
        super().setUp()
        self.alice_key = "sk-alice-" + uuid.uuid4().hex
        self.small_key = "sk-small-" + uuid.uuid4().hex
        self.admin_key = ops.ADMIN_KEY
        self.port = harness.free_port()
        self.admin_port = harness.free_port()

    def start_upstreams(self):
        self.good = self.start_mock(name="mock-good")
        self.flaky = self.start_mock("--status", "503", name="mock-flaky")

    def instances(self):
        return [harness.instance("good", self.good.url(CHAT)),
                harness.instance("flaky", self.flaky.url(CHAT),
                                 checks={"passive": {"enabled": False}})]

    def consumers(self):
        return [ops.consumer("alice", [self.alice_key]),
                ops.consumer("small", [self.small_key],
                             limits=[{"limit": SMALL_LIMIT, "window": Raw("1d")}])]

    def routes(self, extra=()):
        return [ops.key_route("chat", ["m-chat"], [("good", 0)]),
                ops.key_route("fb", ["m-fb"], [("flaky", 10), ("good", 5)],
                              fallback={"on": ["http_5xx"]})] + list(extra)

    def config(self, routes=None, admin_key=None, **kw):
        return ops.ops_config(self.port, self.instances(), routes or self.routes(),
                              self.consumers(), admin_port=self.admin_port,
                              admin_key=admin_key or self.admin_key, **kw)

    def start(self, **kw):
        self.start_upstreams()
        self.gw = ops.start_gateway(self, self.config(**kw), self.port, self.admin_port,
                                    admin_key=self.admin_key)
        self.admin = ops.Admin(self.admin_port, self.admin_key)
        return self.gw

    def chat(self, key, model, content, tokens, stream=False, rid=None, **extra):
        """One request; returns (response or stream head, events, body sent)."""
        headers = {"Authorization": "Bearer " + key}
        if rid:
            headers["x-request-id"] = rid
        body = ops.chat_body(model, content, tokens, stream=stream, **extra)
        if stream:
            head, events, complete, rest = stream_request(self.port, CHAT, body, headers=headers)
            self.assertStreamComplete(head, events, complete, rest)
            return head, events, body
        return http_request(self.port, "POST", CHAT, headers=headers, json_body=body), None, body

    def all_logs(self):
        text = harness.read_text(self.gw.stderr_path) + harness.read_text(self.gw.stdout_path)
        return text


# ---------------------------------------------------------------------------------------
# 1. Metrics
# ---------------------------------------------------------------------------------------

class MetricsTest(OpsCase):

    def test_scripted_mix_exact_counts(self):
        self.start()
        N, S, M, K = 5, 3, 3, 4
        tokens = {}

        def add(consumer, usage):
            for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
                tokens[(consumer, kind)] = tokens.get((consumer, kind), 0) + usage[field]

        # N successes (alice), S streams (alice), M fallbacks (alice), interleaved
        for i in range(max(N, S, M)):
            if i < N:
                r, _, _ = self.chat(self.alice_key, "m-chat", "success %d %s" % (i, "y" * 7 * i),
                                    2 + i)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("x-sluice-instance"), "good", r)
                self.assertEqual(r.json()["usage"]["completion_tokens"], 2 + i)
                add("alice", r.json()["usage"])
            if i < S:
                head, events, _ = self.chat(self.alice_key, "m-chat", "stream %d" % i, 3 + i,
                                            stream=True)
                u = ops.stream_usage(events)
                self.assertEqual(u["completion_tokens"], 3 + i)
                add("alice", u)
            if i < M:
                r, _, _ = self.chat(self.alice_key, "m-fb", "fallback %d %s" % (i, "z" * 5 * i),
                                    2 + i)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("x-sluice-instance"), "good",
                                 "the fallback should be answered by good: %r" % r)
                add("alice", r.json()["usage"])
        # small: one success that uses its whole 10-token quota, then K refusals
        r, _, _ = self.chat(self.small_key, "m-chat", "exhaust the small consumer quota", 8,
                            max_tokens=8)
        self.assertEqual(r.status, 200, r)
        self.assertGreaterEqual(r.json()["usage"]["total_tokens"], SMALL_LIMIT)
        add("small", r.json()["usage"])
        for i in range(K):
            r, _, _ = self.chat(self.small_key, "m-chat", "refused %d" % i, 8, max_tokens=8)
            self.assertOpenAIError(r, 429)
            self.assertEqual(r.json()["error"]["code"], "quota_exceeded", r)

        total = N + S + M + 1 + K
        ok_good = N + S + M + 1

        def expected(m):
            outs = [dict(k)["outcome"] for k in m.series("sluice_attempts_total")
                    if dict(k).get("upstream") == "flaky"]
            reason = outs[0] if len(outs) == 1 else "http_5xx"
            exp = {
                "sluice_requests_total": {
                    L(route="chat", consumer="alice", code="200"): N + S,
                    L(route="fb", consumer="alice", code="200"): M,
                    L(route="chat", consumer="small", code="200"): 1,
                    L(route="chat", consumer="small", code="429"): K},
                "sluice_upstream_responses_total": {
                    L(upstream="good", code="200"): ok_good,
                    L(upstream="flaky", code="503"): M},
                "sluice_attempts_total": {
                    L(upstream="good", outcome="ok"): ok_good,
                    L(upstream="good", outcome="quota"): K,
                    L(upstream="flaky", outcome=reason): M},
                "sluice_fallbacks_total": {L(route="fb", upstream="flaky", reason=reason): M},
                "sluice_quota_rejections_total": {L(consumer="small", limit=LIMIT_ID): K},
                "sluice_tokens_total": {
                    L(consumer=c, upstream="good", kind=k, estimated="false"): v
                    for (c, k), v in tokens.items()},
                "sluice_request_duration_seconds_count": {
                    L(route="chat"): N + S + 1 + K, L(route="fb"): M},
                "sluice_upstream_duration_seconds_count": {
                    L(upstream="good"): ok_good, L(upstream="flaky"): M},
                "sluice_time_to_first_token_seconds_count": {L(upstream="good"): S},
                "sluice_time_per_output_token_seconds_count": {L(upstream="good"): S},
                "sluice_gateway_overhead_seconds_count": {(): total},
                "sluice_health_transitions_total": {},
                "sluice_config_reloads_total": {},
                "sluice_store_errors_total": {},
                "sluice_upstream_healthy": {L(upstream="good"): 1, L(upstream="flaky"): 1},
                "sluice_upstream_inflight": {L(upstream="good"): 0, L(upstream="flaky"): 0},
                "sluice_open_connections": {(): 0},
                "sluice_config_last_reload_successful": {(): 1},
            }
            return exp, reason

        def mismatches(m):
            exp, _ = expected(m)
            out = []
            for name, want in exp.items():
                got = m.series(name)
                want = {k: float(v) for k, v in want.items()}
                if got != want:
                    out.append("%s:\n      expected %r\n      got      %r" % (name, want, got))
            return out

        last = {}

        def settled():
            last["m"] = self.admin.metrics()
            last["bad"] = mismatches(last["m"])
            return not last["bad"]

        wait_until(settled, harness.DEADLINE, lambda: "/metrics to show exactly the scripted "
                   "mix (%d requests); mismatches:\n    %s" % (total, "\n    ".join(last["bad"])))
        m = last["m"]
        _, reason = expected(m)
        self.assertIn(reason, FLAKY_OUTCOMES, "outcome label of the 503 attempts")
        harness.note("mix: %d ok, %d streams, %d fallbacks (reason %s), %d quota 429s; tokens %r"
                     % (N + 1, S, M, reason, K, tokens))

        # the upstreams saw exactly that traffic
        self.assertEqual(self.good.stats()["completed"], ok_good)
        self.assertEqual(self.flaky.stats()["errors"], M)

        # every documented family is announced with its type
        for fam, typ in FAMILY_TYPES.items():
            self.assertEqual(m.types.get(fam), typ, "# TYPE of %s" % fam)
            self.assertTrue(m.helps.get(fam), "# HELP of %s" % fam)
        status = self.admin.json("/status")
        self.assertEqual(m.series("sluice_build_info"), {L(version=status["version"]): 1.0})
        self.assertEqual(len(m.series("sluice_start_time_seconds")), 1)
        self.assertEqual(len(m.series("sluice_config_last_reload_success_timestamp_seconds")), 1)

        # histograms: documented buckets, cumulative, +Inf == _count
        for fam in ("sluice_request_duration_seconds", "sluice_upstream_duration_seconds",
                    "sluice_time_to_first_token_seconds", "sluice_time_per_output_token_seconds",
                    "sluice_gateway_overhead_seconds"):
            counts = m.series(fam + "_count")
            sums = m.series(fam + "_sum")
            self.assertEqual(set(sums), set(counts), fam)
            for key, count in counts.items():
                buckets = [(l["le"], v) for n, l, v in m.samples if n == fam + "_bucket"
                           and L(**{k: x for k, x in l.items() if k != "le"}) == key]
                les = [b[0] for b in buckets]
                if fam == "sluice_gateway_overhead_seconds":
                    self.assertEqual(les, OVERHEAD_BOUNDS, fam)
                elif fam == "sluice_time_per_output_token_seconds":
                    self.assertEqual((les[0], les[-2], les[-1]), ("0.001", "1", "+Inf"), fam)
                else:
                    self.assertEqual(les, LATENCY_BOUNDS, fam)
                values = [b[1] for b in buckets]
                self.assertEqual(values, sorted(values), "%s%r buckets not cumulative" % (fam, key))
                self.assertEqual(values[-1], count, "%s%r: +Inf bucket != _count" % (fam, key))
                self.assertGreaterEqual(sums[key], 0)

        with self.subTest("promtool check metrics"):
            if ops.promtool_bin() is None:
                self.skipTest("promtool not installed (Debian package prometheus; "
                              "scripts/deps.sh installs it)")
            with open(os.path.join(self.workdir, "metrics.txt"), "w") as f:
                f.write(m.text)
            rc, out = ops.run_promtool(m.text)
            self.assertEqual(rc, 0, "promtool check metrics refused the exposition:\n" + out)
            self.assertEqual(out.strip(), "", "promtool lint findings:\n" + out)


# ---------------------------------------------------------------------------------------
# 2. Access log
# ---------------------------------------------------------------------------------------

class AccessLogTest(OpsCase):

    def setUp(self):
        super().setUp()
        self.admin_key = "adm-" + uuid.uuid4().hex
        self.log_path = os.path.join(self.workdir, "access.log")

    def lines_by_id(self, n):
        lines = ops.wait_lines(self.log_path, n, "one access-log line per request")
        out = {}
        for i, line in enumerate(lines):
            try:
                obj = json.loads(line)
            except ValueError as exc:
                self.fail("access-log line %d is not JSON (%s): %r" % (i + 1, exc, line))
            self.assertIsInstance(obj, dict, line)
            self.assertNotIn(obj.get("request_id"), out, "request_id twice: %r" % line)
            out[obj.get("request_id")] = obj
        return lines, out

    def check_common(self, rec):
        for f in ACCESS_FIELDS:
            self.assertIn(f, rec, "access-log field %r missing: %r" % (f, rec))
        self.assertRegex(rec["time"], TIME_RE)
        self.assertEqual(rec["client_ip"], "127.0.0.1")
        self.assertEqual(rec["path"], CHAT)
        self.assertEqual(rec["method"], "POST")
        for f in ("total_ms", "upstream_ms", "overhead_ms"):
            self.assertIsInstance(rec[f], (int, float), "%s: %r" % (f, rec))
            self.assertGreaterEqual(rec[f], 0)
        self.assertIsInstance(rec["attempts"], list)
        for a in rec["attempts"]:
            self.assertEqual(set(a), {"instance", "outcome", "status", "latency_ms"}, a)
            self.assertIsInstance(a["latency_ms"], (int, float), a)
        self.assertNotIn("prompt", rec, "payload logged without log.payloads: %r" % rec)
        self.assertNotIn("output", rec, "payload logged without log.payloads: %r" % rec)

    def usage_of(self, u):
        return {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"],
                "total": u["total_tokens"], "cached": 0, "reasoning": 0, "estimated": False}

    def test_lines_fields_attempts_and_no_keys(self):
        self.start(access_log=self.log_path)
        mark = "secret-prompt-" + uuid.uuid4().hex
        wrong_key = "sk-wrong-" + uuid.uuid4().hex

        ok, _, ok_body = self.chat(self.alice_key, "m-chat", mark + " ok", 4, rid="ops-ok")
        self.assertEqual(ok.status, 200, ok)
        head, events, st_body = self.chat(self.alice_key, "m-chat", mark + " stream", 5,
                                          stream=True, rid="ops-stream")
        fb, _, fb_body = self.chat(self.alice_key, "m-fb", mark + " fallback", 3, rid="ops-fb")
        self.assertEqual(fb.status, 200, fb)
        small, _, _ = self.chat(self.small_key, "m-chat", mark + " exhaust the quota", 8,
                                rid="ops-small", max_tokens=8)
        self.assertEqual(small.status, 200, small)
        quota, _, _ = self.chat(self.small_key, "m-chat", mark + " refused", 8, rid="ops-quota",
                                max_tokens=8)
        self.assertOpenAIError(quota, 429)
        bad, _, _ = self.chat(wrong_key, "m-chat", mark + " bad key", 2, rid="ops-badkey")
        self.assertOpenAIError(bad, 401)

        lines, recs = self.lines_by_id(6)
        self.assertEqual(len(lines), 6, "exactly one line per request:\n" + "\n".join(lines))
        self.assertEqual(set(recs), {"ops-ok", "ops-stream", "ops-fb", "ops-small", "ops-quota",
                                     "ops-badkey"})
        for rec in recs.values():
            self.check_common(rec)

        r = recs["ops-ok"]
        self.assertEqual((r["route"], r["consumer"], r["key_fingerprint"]),
                         ("chat", "alice", ops.fingerprint(self.alice_key)))
        self.assertEqual((r["model"], r["upstream_model"], r["instance"], r["stream"]),
                         ("m-chat", "m-chat", "good", False))
        self.assertEqual((r["status"], r["upstream_status"], r["error_code"], r["limit_id"]),
                         (200, 200, None, None))
        self.assertEqual([(a["instance"], a["outcome"], a["status"]) for a in r["attempts"]],
                         [("good", "ok", 200)])
        self.assertEqual(r["bytes_in"], len(json.dumps(ok_body).encode()))
        self.assertEqual(r["bytes_out"], len(ok.body))
        self.assertIsInstance(r["ttft_ms"], (int, float))
        self.assertEqual(r["usage"], self.usage_of(ok.json()["usage"]))

        r = recs["ops-stream"]
        self.assertEqual((r["route"], r["consumer"], r["instance"], r["stream"], r["status"]),
                         ("chat", "alice", "good", True, 200))
        self.assertEqual([(a["instance"], a["outcome"], a["status"]) for a in r["attempts"]],
                         [("good", "ok", 200)])
        self.assertIsInstance(r["ttft_ms"], (int, float), "a stream's ttft_ms: %r" % r)
        self.assertGreater(r["ttft_ms"], 0)
        self.assertLessEqual(r["ttft_ms"], r["total_ms"])
        self.assertEqual(r["usage"], self.usage_of(ops.stream_usage(events)))
        self.assertEqual(r["bytes_out"], sum(len(e.raw) for e in events),
                         "a stream's bytes_out: the SSE bytes the client received")

        r = recs["ops-fb"]
        self.assertEqual((r["route"], r["consumer"], r["instance"], r["status"],
                          r["upstream_status"]), ("fb", "alice", "good", 200, 200))
        att = [(a["instance"], a["outcome"], a["status"]) for a in r["attempts"]]
        self.assertEqual(len(att), 2, "a fallback shows two attempts: %r" % r["attempts"])
        self.assertEqual((att[0][0], att[0][2]), ("flaky", 503), att)
        self.assertIn(att[0][1], FLAKY_OUTCOMES, "why the first attempt failed over: %r" % att)
        self.assertEqual(att[1], ("good", "ok", 200))
        self.assertEqual(r["usage"], self.usage_of(fb.json()["usage"]))

        r = recs["ops-small"]
        self.assertEqual((r["consumer"], r["key_fingerprint"], r["status"]),
                         ("small", ops.fingerprint(self.small_key), 200))
        self.assertEqual(r["usage"], self.usage_of(small.json()["usage"]))

        r = recs["ops-quota"]
        self.assertEqual((r["route"], r["consumer"], r["status"], r["error_code"],
                          r["limit_id"]), ("chat", "small", 429, "quota_exceeded", LIMIT_ID))
        self.assertEqual([(a["instance"], a["outcome"], a["status"]) for a in r["attempts"]],
                         [("good", "quota", None)])
        self.assertEqual((r["instance"], r["upstream_status"], r["usage"]), (None, None, None))

        r = recs["ops-badkey"]
        self.assertEqual((r["route"], r["consumer"], r["key_fingerprint"], r["status"],
                          r["error_code"], r["attempts"]),
                         ("chat", None, ops.fingerprint(wrong_key), 401, "invalid_api_key", []))

        text = harness.read_text(self.log_path)
        logs = self.all_logs()
        for name, key in (("alice", self.alice_key), ("small", self.small_key),
                          ("wrong", wrong_key), ("admin", self.admin_key)):
            self.assertNotIn(key, text, "the %s key appears in the access log" % name)
            self.assertNotIn(key, logs, "the %s key appears in sluice's error log" % name)
        self.assertNotIn(mark, text, "a prompt appears in the access log without log.payloads")
        self.assertNotIn("lorem", text, "an output appears in the access log without "
                         "log.payloads")

    def test_payloads_logged_with_log_payloads(self):
        self.start(access_log=self.log_path, payloads=True)
        mark = "payload-" + uuid.uuid4().hex
        ok, _, ok_body = self.chat(self.alice_key, "m-chat", mark + " plain", 4, rid="p-ok")
        self.assertEqual(ok.status, 200, ok)
        head, events, st_body = self.chat(self.alice_key, "m-chat", mark + " stream", 5,
                                          stream=True, rid="p-stream")
        _, recs = self.lines_by_id(2)

        r = recs["p-ok"]
        self.assertIn("prompt", r, "log.payloads: true but no prompt: %r" % r)
        self.assertIn("output", r, "log.payloads: true but no output: %r" % r)
        self.assertEqual(json.loads(r["prompt"]), ok_body, "the prompt is the client's body")
        self.assertIn(ok.json()["choices"][0]["message"]["content"], r["output"])

        r = recs["p-stream"]
        self.assertEqual(json.loads(r["prompt"]), st_body)
        content = "".join(e.content() or "" for e in events)
        self.assertTrue(content.startswith("lorem"), content)
        self.assertIn(content, r["output"], "the streamed text is the logged output")

        text = harness.read_text(self.log_path)
        for key in (self.alice_key, self.admin_key):
            self.assertNotIn(key, text, "a key appears in the access log")
            self.assertNotIn(key, self.all_logs(), "a key appears in sluice's error log")

    def test_sigusr1_reopens_the_file(self):
        gw = self.start(access_log=self.log_path)
        rotated = self.log_path + ".1"

        def send(rid):
            r, _, _ = self.chat(self.alice_key, "m-chat", "rotate " + rid, 2, rid=rid)
            self.assertEqual(r.status, 200, r)

        send("before-rename")
        ops.wait_lines(self.log_path, 1, "the first request's line")
        mode = stat.S_IMODE(os.stat(self.log_path).st_mode)
        self.assertEqual(mode & ~0o640, 0, "access log created with mode %o (> 0640)" % mode)
        os.rename(self.log_path, rotated)
        send("after-rename")  # still written through the open descriptor: the rotated file
        ops.wait_lines(rotated, 2, "the line written after the rename (old descriptor)")
        self.assertFalse(os.path.exists(self.log_path))

        off = gw.log_size()
        os.kill(gw.pid, signal.SIGUSR1)
        gw.wait_log(r"SIGUSR1: log files reopened", since=off)
        send("after-reopen")
        new = ops.wait_lines(self.log_path, 1, "a new line in a fresh file at the configured path")
        self.assertEqual([json.loads(l)["request_id"] for l in new], ["after-reopen"])
        old = [json.loads(l)["request_id"] for l in ops.read_lines(rotated)]
        self.assertEqual(old, ["before-rename", "after-rename"])

    def test_error_answers_count_bytes_out(self):
        """Known bug: a gateway-made error (429, 401, ...) is logged with bytes_out 0 although
        its JSON body was sent (request.c reply_error() never sets rec.bytes_out)."""
        self.start(access_log=self.log_path)
        bad, _, _ = self.chat("sk-nobody", "m-chat", "who am i", 2, rid="e-401")
        self.assertOpenAIError(bad, 401)
        _, recs = self.lines_by_id(1)
        self.assertEqual(recs["e-401"]["bytes_out"], len(bad.body))


# ---------------------------------------------------------------------------------------
# 3. Admin API
# ---------------------------------------------------------------------------------------

ADMIN_ENDPOINTS = [("GET", "/"), ("GET", "/status"), ("GET", "/instances"),
                   ("GET", "/consumers"), ("GET", "/consumers/alice"),
                   ("GET", "/consumers/nobody"), ("GET", "/routes"), ("GET", "/transitions"),
                   ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/reload"),
                   ("GET", "/no-such-endpoint")]


def broken_config(text):
    """Two errors at known lines: an unknown key under server (line 2) and a route target
    naming an unknown instance. Returns (text, line of the unknown key, line of the target)."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "server:", lines[0]
    lines.insert(1, "  bogus_key: 1")
    idx = next(i for i, l in enumerate(lines) if l.strip() == "- instance: flaky")
    lines[idx] = lines[idx].replace("instance: flaky", "instance: no-such-instance")
    return "\n".join(lines) + "\n", 2, idx + 1


class AdminTest(OpsCase):

    def assert_401(self, r, what):
        self.assertOpenAIError(r, 401)
        self.assertEqual(r.json()["error"]["code"], "invalid_api_key", "%s: %r" % (what, r))

    def test_key_required_everywhere_but_healthz(self):
        self.start()
        wrong_auth = [None, "Bearer wrong-key", "Bearer " + self.admin_key.upper(),
                      "Bearer " + self.admin_key + "x", "Basic " + self.admin_key,
                      self.admin_key, "Bearer "]
        for method, path in ADMIN_ENDPOINTS:
            for auth in wrong_auth:
                headers = {"Authorization": auth} if auth is not None else {}
                r = self.admin.request(method, path, key=None, headers=headers)
                self.assert_401(r, "%s %s with Authorization %r" % (method, path, auth))
        r = self.admin.request("GET", "/?key=wrong-key", key=None)
        self.assert_401(r, "the status page with a wrong ?key=")
        r = self.admin.request("GET", "/healthz", key=None)
        self.assertEqual((r.status, r.body), (200, b"ok\n"), r)
        # none of the refused POSTs reloaded anything
        self.assertEqual(self.admin.json("/status")["config_generation"], 1)
        self.assertEqual(self.admin.metrics().series("sluice_config_reloads_total"), {})
        # and with the key, every known endpoint answers
        for method, path in ADMIN_ENDPOINTS:
            if method == "GET" and path not in ("/consumers/nobody", "/no-such-endpoint"):
                r = self.admin.get(path)
                self.assertEqual(r.status, 200, "GET %s with the key: %r" % (path, r))
        self.assertOpenAIError(self.admin.get("/no-such-endpoint"), 404)

    def test_endpoints_after_traffic(self):
        gw = self.start()
        r, _, _ = self.chat(self.alice_key, "m-chat", "hello admin", 3)
        self.assertEqual(r.status, 200, r)
        small, _, _ = self.chat(self.small_key, "m-chat", "exhaust the small quota now", 8,
                                max_tokens=8)
        self.assertEqual(small.status, 200, small)
        used = small.json()["usage"]["total_tokens"]
        self.admin.wait_metrics(lambda m: m.sum("sluice_requests_total") == 2,
                                "both requests to be counted")

        st = self.admin.json("/status")
        with open(gw.config_path, "rb") as f:
            sha = ops.sha256_hex(f.read())
        self.assertEqual((st["config_generation"], st["config_sha256"], st["config_file"],
                          st["workers"]), (1, sha, gw.config_path, 2), st)
        self.assertIsInstance(st["version"], str)
        self.assertIsInstance(st["uptime_s"], int)
        self.assertGreaterEqual(st["uptime_s"], 0)
        self.assertIsInstance(st["open_connections"], int)

        inst = {i["name"]: i for i in self.admin.json("/instances")}
        self.assertEqual(list(inst), ["good", "flaky"])
        for name, i in inst.items():
            self.assertEqual((i["provider"], i["healthy"], i["inflight"]),
                             ("openai-compatible", True, 0), i)
            self.assertEqual(i["limits"], [], i)
        self.assertGreater(inst["good"]["ewma_ttft_ms"], 0, inst["good"])

        cons = self.admin.json("/consumers")
        self.assertEqual([c["name"] for c in cons], ["alice", "small"])
        self.assertEqual(cons[0]["limits"], [])
        (lim,) = cons[1]["limits"]
        self.assertEqual((lim["id"], lim["limit"], lim["used"], lim["remaining"]),
                         (LIMIT_ID, SMALL_LIMIT, used, max(0, SMALL_LIMIT - used)), lim)
        self.assertTrue(0 < lim["reset_s"] <= 86400, lim)
        one = self.admin.json("/consumers/small")
        self.assertEqual(one["name"], "small")
        strip = lambda c: [{k: v for k, v in l.items() if k != "reset_s"} for l in c["limits"]]
        self.assertEqual(strip(one), strip(cons[1]))
        nobody = self.admin.get("/consumers/nobody")
        self.assertOpenAIError(nobody, 404)

        self.assertEqual(self.admin.json("/routes"), [
            {"name": "chat", "type": "llm", "paths": [CHAT], "models": ["m-chat"],
             "targets": [{"instance": "good", "priority": 0, "weight": 100}]},
            {"name": "fb", "type": "llm", "paths": [CHAT], "models": ["m-fb"],
             "targets": [{"instance": "flaky", "priority": 10, "weight": 100},
                         {"instance": "good", "priority": 5, "weight": 100}]}])
        r = self.admin.get("/readyz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.admin.json("/transitions"), [])
        r = self.admin.get("/metrics")
        self.assertTrue(r.header("content-type", "").startswith("text/plain; version=0.0.4"), r)
        r = self.admin.get("/")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("content-type", "").startswith("text/html"), r)
        self.assertEqual(r.header("referrer-policy"), "no-referrer")
        self.assertNotRegex(r.body.decode(), r"<(script|link|img)[^>]+(src|href)=\"?https?:",
                            "the status page loads something from elsewhere")
        r = self.admin.get("/reload")
        self.assertOpenAIError(r, 405)

    def test_reload_broken_file_then_fixed(self):
        gw = self.start()
        good_text = harness.read_text(gw.config_path)
        bad_text, key_line, target_line = broken_config(good_text)
        gw.write_config(bad_text)

        r = self.admin.reload()
        self.assertEqual(r.status, 400, r)
        body = r.json()
        self.assertIs(body["ok"], False, body)
        errors = body["errors"]
        path = re.escape(gw.config_path)
        self.assertTrue(any(re.match(r"^%s:%d:\d+: .*bogus_key" % (path, key_line), e)
                            for e in errors), errors)
        self.assertTrue(any(re.match(r"^%s:%d:\d+: routes\[1\]\.targets\[0\]\.instance: .*"
                                     r"no-such-instance" % (path, target_line), e)
                            for e in errors), errors)
        for e in errors:
            self.assertRegex(e, r"^%s:\d+:\d+: " % path)

        # still serving the old configuration
        st = self.admin.json("/status")
        self.assertEqual((st["config_generation"], st["config_sha256"]),
                         (1, ops.sha256_hex(good_text)), st)
        self.assertEqual([x["name"] for x in self.admin.json("/routes")], ["chat", "fb"])
        for model in ("m-chat", "m-fb"):
            r, _, _ = self.chat(self.alice_key, model, "still serving", 2)
            self.assertEqual(r.status, 200, r)
        m = self.admin.metrics()
        self.assertEqual(m.series("sluice_config_reloads_total"), {L(result="error"): 1.0})
        self.assertEqual(m.value("sluice_config_last_reload_successful"), 0)

        # a fixed file: one more route, and a new admin key
        fixed = self.config(routes=self.routes(
            [ops.key_route("extra", ["m-extra"], [("good", 0)])]), admin_key="testkey2")
        gw.write_config(fixed)
        r = self.admin.reload()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"ok": True, "generation": 2})
        self.assert_401(self.admin.get("/status"), "the old admin key after the reload")
        self.admin.key = "testkey2"
        st = self.admin.json("/status")
        self.assertEqual((st["config_generation"], st["config_sha256"]),
                         (2, ops.sha256_hex(fixed)), st)
        self.assertEqual([x["name"] for x in self.admin.json("/routes")],
                         ["chat", "fb", "extra"])

        def extra_serves():
            r, _, _ = self.chat(self.alice_key, "m-extra", "new route", 2)
            return r.status == 200

        wait_until(extra_serves, harness.DEADLINE, "the reloaded route to serve m-extra")
        m = self.admin.metrics()
        self.assertEqual(m.series("sluice_config_reloads_total"),
                         {L(result="error"): 1.0, L(result="ok"): 1.0})
        self.assertEqual(m.value("sluice_config_last_reload_successful"), 1)

    def test_instances_documented_fields(self):
        """Known bug: docs/operations.md §6 documents GET /instances with
        "last_transition": {healthy, reason, time} and "ewma_latency_ms"; server.c
        hook_instances() returns last_reason / last_source / last_transition_unix_ms and
        ewma_total_ms instead (and the status page reads the documented names)."""
        self.start()
        r, _, _ = self.chat(self.alice_key, "m-chat", "latency", 2)
        self.assertEqual(r.status, 200, r)
        for i in self.admin.json("/instances"):
            for field in ("name", "provider", "healthy", "last_transition", "inflight",
                          "ewma_latency_ms", "ewma_ttft_ms", "limits"):
                self.assertIn(field, i, "GET /instances: %r" % i)
            self.assertTrue(set(i["last_transition"]) >= {"healthy", "reason", "time"}, i)


if __name__ == "__main__":
    harness.main()
