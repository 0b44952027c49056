"""test_status_page.py — the live status page (issue 5) in headless Chromium: after known
traffic (successes, a stream, fallbacks, quota rejections, an instance made unhealthy), the
page at http://ADMIN/?key=testkey renders (<body data-loaded="1">), and its routes, instances
(health, in-flight, TTFT, attempts, tokens), consumers (requests, tokens, 429s, quota use) and
health transitions show the same numbers as the admin API and /metrics. A screenshot is
written to tests/output/test_status_page/<test>/status.png.

Chromium is driven by its command line only (--dump-dom, --screenshot); the tests are skipped
when it is not installed (scripts/deps.sh installs Debian's `chromium`). Helpers:
ops_helpers.py.
"""

import os
import unittest
import uuid

import harness
import ops_helpers as ops
from harness import Raw, http_request, stream_request, wait_until
from ops_helpers import CHAT, js_ms, js_num

SMALL_LIMIT = 10


class StatusPageCase(harness.SluiceTestCase):

    def setUp(self):
        if ops.chromium_bin() is None:
            self.skipTest("chromium is not installed (Debian package `chromium`; "
                          "scripts/deps.sh installs it)")
        super().setUp()
        self.alice_key = "sk-alice-" + uuid.uuid4().hex
        self.small_key = "sk-small-" + uuid.uuid4().hex
        self.port = harness.free_port()
        self.admin_port = harness.free_port()
        self.admin = ops.Admin(self.admin_port)
        self.url = "http://127.0.0.1:%d/?key=%s" % (self.admin_port, ops.ADMIN_KEY)

    def start(self):
        self.good = self.start_mock(name="mock-good")
        self.flaky = self.start_mock("--status", "503", name="mock-flaky")
        instances = [
            # a request held by the mock stays in flight while the page renders
            harness.instance("good", self.good.url(CHAT),
                             timeouts={"first_byte": "300s", "idle": "300s", "total": "600s"}),
            harness.instance("flaky", self.flaky.url(CHAT),
                             checks={"passive": {"enabled": False}}),
            # nothing listens there: two connect errors make it unhealthy (passive checks)
            harness.instance("dead", "http://127.0.0.1:%d%s" % (harness.closed_port(), CHAT),
                             checks={"passive": {"unhealthy": {"tcp_failures": 2},
                                                 "cooldown": Raw("1h")}}),
        ]
        consumers = [ops.consumer("alice", [self.alice_key]),
                     ops.consumer("small", [self.small_key],
                                  limits=[{"limit": SMALL_LIMIT, "window": Raw("1d")}])]
        routes = [ops.key_route("chat", ["m-chat"], [("good", 0)]),
                  ops.key_route("fb", ["m-fb"], [("flaky", 10), ("good", 5)],
                                fallback={"on": ["http_5xx"]}),
                  ops.key_route("down", ["m-down"], [("dead", 0)])]
        text = ops.ops_config(self.port, instances, routes, consumers,
                              admin_port=self.admin_port)
        self.gw = ops.start_gateway(self, text, self.port, self.admin_port)

    def chat(self, key, model, content, tokens, stream=False, **extra):
        body = ops.chat_body(model, content, tokens, stream=stream, **extra)
        headers = {"Authorization": "Bearer " + key}
        if stream:
            head, events, complete, rest = stream_request(self.port, CHAT, body, headers=headers)
            self.assertStreamComplete(head, events, complete, rest)
            return head
        return http_request(self.port, "POST", CHAT, headers=headers, json_body=body)

    def dump_dom(self):
        """The page's DOM once its first refresh has completed (<body data-loaded="1">)."""
        last = {}

        def loaded():
            rc, out, err = ops.run_chromium(["--dump-dom"], self.url)
            last["html"], last["rc"], last["err"] = out.decode("utf-8", "replace"), rc, err
            with open(os.path.join(self.workdir, "status.dom.html"), "w") as f:
                f.write(last["html"])
            body = ops.parse_dom(last["html"]).find("body")
            return body is not None and body.attrs.get("data-loaded") == "1" and body

        return wait_until(loaded, 90, lambda: "Chromium to render the status page with "
                          "<body data-loaded=\"1\"> (exit %s; DOM starts %r; stderr tail %r)" % (
                              last.get("rc"), last.get("html", "")[:300],
                              last.get("err", "")[-600:]))


class StatusPageTest(StatusPageCase):

    def test_page_renders_and_matches_the_api(self):
        self.start()
        for i in range(3):
            r = self.chat(self.alice_key, "m-chat", "page %d %s" % (i, "q" * 9 * i), 3 + i)
            self.assertEqual(r.status, 200, r)
        self.chat(self.alice_key, "m-chat", "page stream", 6, stream=True)
        for i in range(2):
            r = self.chat(self.alice_key, "m-fb", "page fallback %d" % i, 4)
            self.assertEqual(r.status, 200, r)
        r = self.chat(self.small_key, "m-chat", "exhaust the small consumer quota", 8,
                      max_tokens=8)
        self.assertEqual(r.status, 200, r)
        for i in range(2):
            self.assertOpenAIError(self.chat(self.small_key, "m-chat", "refused", 8,
                                             max_tokens=8), 429)
        for i in range(2):
            self.assertOpenAIError(self.chat(self.alice_key, "m-down", "nobody home", 2), 502)
        n_requests = 3 + 1 + 2 + 1 + 2 + 2
        wait_until(lambda: [i for i in self.admin.json("/instances")
                            if i["name"] == "dead" and not i["healthy"]], harness.DEADLINE,
                   "instance dead to be marked unhealthy after two connect errors")
        self.admin.wait_metrics(
            lambda m: m.value("sluice_gateway_overhead_seconds_count") == n_requests and
            m.sum("sluice_upstream_inflight") == 0, "all %d requests to be counted" % n_requests)

        # one request held in flight by the mock (hang) while the page renders
        hold = harness.HTTPConn(self.port)
        self.addCleanup(hold.close)
        held = ops.chat_body("m-chat", "held in flight", 2)
        held["mock"]["hang"] = True
        hold.send_request("POST", CHAT, headers={"Authorization": "Bearer " + self.alice_key},
                          json_body=held)
        self.admin.wait_metrics(lambda m: m.value("sluice_upstream_inflight", upstream="good")
                                == 1, "the held request to be in flight to good")

        def snapshot():
            return {"status": self.admin.json("/status"),
                    "instances": self.admin.json("/instances"),
                    "consumers": self.admin.json("/consumers"),
                    "routes": self.admin.json("/routes"),
                    "transitions": self.admin.json("/transitions"),
                    "metrics": self.admin.metrics()}

        def stable(s):
            """What the page shows and must not change while it renders (no traffic)."""
            return (s["status"]["version"], s["status"]["workers"],
                    [(i["name"], i["healthy"], i["inflight"], i["ewma_ttft_ms"])
                     for i in s["instances"]],
                    [(c["name"], [(l["id"], l["used"], l["limit"]) for l in c["limits"]])
                     for c in s["consumers"]],
                    s["routes"], s["metrics"].summary().count("\n"))

        api = snapshot()
        body = self.dump_dom()
        after = snapshot()
        self.assertEqual(stable(api), stable(after), "the API changed while the page rendered")
        M = api["metrics"]
        page = lambda id_: body.find(id=id_).text().strip()

        mismatches = []

        def same(what, shown, expected):
            if shown != expected:
                mismatches.append("%s: the page shows %r, the API says %r" % (what, shown,
                                                                              expected))

        same("ready pill", page("ready"), "ready")
        same("version", page("version"), api["status"]["version"])
        same("workers", page("workers"), str(api["status"]["workers"]))
        banner = body.find(id="banner")
        self.assertIn("display: none", banner.attrs.get("style", ""),
                      "error banner shown: %r" % banner.text())

        insts = {i["name"]: i for i in api["instances"]}
        same("instances healthy tile", page("t-health"), "%d / %d" % (
            sum(1 for i in insts.values() if i["healthy"]), len(insts)))
        same("quota rejections tile", page("t-quota"),
             js_num(M.sum("sluice_quota_rejections_total")))

        attempts = M.sum("sluice_attempts_total", by="upstream",
                         where=lambda l: l["outcome"] not in ("unhealthy", "quota"))
        tokens = M.sum("sluice_tokens_total", by="upstream")
        requests = M.sum("sluice_requests_total", by="route")
        sections = body.find_all("section", data_route=True)
        same("routes, in order", [s.attrs["data-route"] for s in sections],
             [r["name"] for r in api["routes"]])
        for sec, route in zip(sections, api["routes"]):
            name = route["name"]
            title = sec.find("h2").text()
            if "%s requests" % js_num(requests.get(name, 0)) not in title:
                mismatches.append("route %s title %r lacks '%s requests'" % (
                    name, title, js_num(requests.get(name, 0))))
            targets = sorted(route["targets"], key=lambda t: -t["priority"])
            rows = sec.find_all("tr", data_instance=True)
            same("route %s: instances by priority" % name,
                 [r.attrs["data-instance"] for r in rows], [t["instance"] for t in targets])
            for row in rows:
                inst = insts[row.attrs["data-instance"]]
                w = "route %s, instance %s: " % (name, inst["name"])
                same(w + "health", row.field("healthy"),
                     "healthy" if inst["healthy"] else "unhealthy")
                dot = row.find("span", **{"class": "dot ok" if inst["healthy"] else "dot bad"})
                if dot is None:
                    mismatches.append(w + "health dot colour")
                same(w + "in-flight", row.field("inflight"), js_num(inst["inflight"]))
                same(w + "TTFT", row.field("ttft"), js_ms(inst["ewma_ttft_ms"]))
                same(w + "attempts", row.field("attempts"),
                     js_num(attempts.get(inst["name"], 0)))
                same(w + "tokens", row.field("tokens"), js_num(tokens.get(inst["name"], 0)))
        self.assertFalse(insts["dead"]["healthy"])
        self.assertEqual(insts["good"]["inflight"], 1, "the held request, per GET /instances")
        self.assertTrue(insts["good"]["healthy"] and insts["flaky"]["healthy"])

        c_req = M.sum("sluice_requests_total", by="consumer")
        c_tok = M.sum("sluice_tokens_total", by="consumer")
        c_429 = M.sum("sluice_quota_rejections_total", by="consumer")
        rows = body.find_all("tr", data_consumer=True)
        same("consumers, in order", [r.attrs["data-consumer"] for r in rows],
             [c["name"] for c in api["consumers"]])
        for row, cons in zip(rows, api["consumers"]):
            w = "consumer %s: " % cons["name"]
            same(w + "requests", row.field("requests"), js_num(c_req.get(cons["name"], 0)))
            same(w + "tokens", row.field("tokens"), js_num(c_tok.get(cons["name"], 0)))
            same(w + "quota 429s", row.field("quota_rejections"),
                 js_num(c_429.get(cons["name"], 0)))
            same(w + "limits", [q.attrs["data-limit"] for q in row.find_all(data_limit=True)],
                 [l["id"] for l in cons["limits"]])
            for lim in cons["limits"]:
                q = row.find(data_limit=lim["id"])
                if q is None:
                    continue
                same(w + lim["id"] + " used", q.field("used"), js_num(lim["used"]))
                same(w + lim["id"] + " limit", q.field("limit"), js_num(lim["limit"]))
                pct = min(100.0, 100.0 * lim["used"] / lim["limit"])
                bar = q.find("i")
                same(w + lim["id"] + " bar", bar.attrs.get("style"), "width:%s%%" %
                     ops.js_fixed(pct, 1))
                same(w + lim["id"] + " bar colour", bar.attrs.get("class"),
                     "bad" if pct >= 90 else "warn" if pct >= 70 else "")
        small = [c for c in api["consumers"] if c["name"] == "small"][0]
        self.assertGreaterEqual(small["limits"][0]["used"], SMALL_LIMIT)

        tr_rows = [r.text() for r in body.find(id="transitions").find_all("tr")[1:]]
        same("health transitions shown", len(tr_rows), len(api["transitions"]))
        if not any("dead" in t and "unhealthy" in t for t in tr_rows):
            mismatches.append("no 'dead became unhealthy' row in the transitions: %r" % tr_rows)

        self.assertEqual(mismatches, [], "the status page disagrees with the API:\n  " +
                         "\n  ".join(mismatches))
        harness.note("page checked: %d routes, %d instances, %d consumers, %d transitions" % (
            len(sections), len(insts), len(rows), len(tr_rows)))

        # the held request ends when its client leaves: the gateway cancels it upstream
        hold.close()
        self.good.wait_stats(lambda st: st["cancelled"] == 1, "the held request to be cancelled")
        self.admin.wait_metrics(lambda m: m.sum("sluice_upstream_inflight") == 0,
                                "nothing in flight once the held request's client left")

        # the screenshot
        png = os.path.join(self.workdir, "status.png")
        rc, _, err = ops.run_chromium(["--screenshot=" + png, "--window-size=1280,900"],
                                      self.url)
        self.assertTrue(os.path.exists(png), "no screenshot written (exit %s): %s" % (
            rc, err[-1000:]))
        with open(png, "rb") as f:
            data = f.read()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n", "status.png is not a PNG")
        self.assertGreater(len(data), 10 * 1024, "status.png is suspiciously small")
        harness.note("screenshot: %s (%d bytes)" % (png, len(data)))

    def test_without_key_the_page_asks_for_it(self):
        self.start()
        self.url = "http://127.0.0.1:%d/" % self.admin_port
        rc, out, err = ops.run_chromium(["--dump-dom"], self.url)
        dom = ops.parse_dom(out.decode("utf-8", "replace"))
        form = dom.find("form")
        self.assertIsNotNone(form, "no key form: %r" % out[:500])
        self.assertIsNotNone(form.find("input", type="password"), "no password field in the form")
        self.assertNotIn(ops.ADMIN_KEY, out.decode("utf-8", "replace"))
        self.assertIsNone(dom.find(data_route=True), "routes shown without a key")

    def test_header_latency_and_consumer_inflight_match_the_api(self):
        """Known bug: the page reads fields the admin API does not return, and shows "–":
        /status has config_generation and open_connections (the page reads generation and
        connections), /consumers has in_flight (the page reads inflight), /instances has
        ewma_total_ms (the page reads ewma_latency_ms, the name docs/operations.md gives)."""
        self.start()
        r = self.chat(self.alice_key, "m-chat", "latency please", 3)
        self.assertEqual(r.status, 200, r)
        self.admin.wait_metrics(lambda m: m.value("sluice_gateway_overhead_seconds_count") == 1
                                and m.value("sluice_open_connections") == 0,
                                "the request to be counted and its connection closed")
        st = self.admin.json("/status")
        insts = {i["name"]: i for i in self.admin.json("/instances")}
        cons = self.admin.json("/consumers")
        body = self.dump_dom()
        mismatches = []
        for what, shown, want in (
                ("generation", body.find(id="generation").text().strip(),
                 str(st["config_generation"])),
                ("connections", body.find(id="connections").text().strip(),
                 js_num(st["open_connections"]))):
            if shown != want:
                mismatches.append("%s: page %r, API %r" % (what, shown, want))
        for row in body.find_all("tr", data_instance=True):
            i = insts[row.attrs["data-instance"]]
            want = js_ms(i.get("ewma_latency_ms", i.get("ewma_total_ms")))
            if row.field("latency") != want:
                mismatches.append("instance %s latency: page %r, API %r" % (
                    i["name"], row.field("latency"), want))
        for row, c in zip(body.find_all("tr", data_consumer=True), cons):
            want = js_num(c.get("in_flight", c.get("inflight")))
            if row.field("inflight") != want:
                mismatches.append("consumer %s in-flight: page %r, API %r" % (
                    c["name"], row.field("inflight"), want))
        self.assertEqual(mismatches, [])


if __name__ == "__main__":
    harness.main()
