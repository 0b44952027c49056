"""test_proxy.py — non-stream round trips through sluice: what the upstream receives (instance
model and options applied, client credentials stripped, instance auth set), what the client
gets back (the upstream's status and body unchanged, x-request-id, x-sluice-instance),
GET /v1/models, keep-alive."""

import json
import threading
import uuid

import harness
from harness import HTTPConn, http_request, instance, route

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
UPSTREAM_AUTH = {"Authorization": "Bearer upstream-secret"}


def marker():
    return "m-" + uuid.uuid4().hex


class ProxyTest(harness.SluiceTestCase):
    """Routes for chat, completions and embeddings, each to the mock through a recording tap
    so the test sees the exact bytes the upstream answered."""

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.tap = self.start_tap(self.mock.port)
        self.sluice = self.start_sluice(
            instances=[
                instance("mock", self.tap.url(CHAT), model="mock-upstream-model",
                         options={"temperature": 0.5}, auth_header=UPSTREAM_AUTH),
                instance("mock-completions", self.tap.url(COMPLETIONS),
                         model="mock-completions-model", options={"temperature": 0.25},
                         auth_header=UPSTREAM_AUTH),
                # no model, no options, no auth: the client's body goes up as it came
                instance("mock-embeddings", self.tap.url(EMBEDDINGS)),
            ],
            routes=[
                route("chat", [CHAT], "mock"),
                route("completions", [COMPLETIONS], "mock-completions"),
                route("embeddings", [EMBEDDINGS], "mock-embeddings"),
            ])
        self.port = self.sluice.port

    # -- helpers -------------------------------------------------------------------------
    def upstream_request(self, mark, path):
        """The request the mock recorded for the client request carrying mark."""
        q = self.mock.wait_request(mark, path)
        return q, json.loads(q["body"])

    def check_passthrough(self, resp, mark, instance_name):
        """The client got the upstream's status and body byte for byte, plus our headers."""
        _, up = self.tap.wait_exchange(mark)
        self.assertEqual(resp.status, up.status, "status not passed through")
        self.assertEqual(resp.body, up.body, "body differs from the upstream's")
        self.assertEqual(resp.header("x-sluice-instance"), instance_name)
        self.assertTrue(resp.header("x-request-id"), "no x-request-id in %r" % resp)
        self.assertTrue((resp.header("content-type") or "").startswith("application/json"),
                        "content-type: %r" % resp.header("content-type"))

    # -- round trips ---------------------------------------------------------------------
    def test_chat_non_stream_round_trip(self):
        m = marker()
        body = {"model": "client-model", "messages": [{"role": "user", "content": "hello " + m}],
                "temperature": 1.0, "max_tokens": 7, "user": "u-1",
                "mock": {"tokens": 7}}
        r = http_request(self.port, "POST", CHAT, json_body=body)
        self.assertEqual(r.status, 200, r)
        obj = r.json()
        self.assertEqual(obj["object"], "chat.completion", obj)
        self.assertTrue(obj["choices"][0]["message"]["content"], obj)
        self.check_passthrough(r, m, "mock")

        q, sent = self.upstream_request(m, CHAT)
        expected = dict(body, model="mock-upstream-model", temperature=0.5)
        self.assertEqual(sent, expected, "body sent upstream: model replaced, options merged "
                         "(instance wins), everything else unchanged")
        self.assertEqual(q["method"], "POST")
        self.assertEqual(q["headers"].get("authorization"), "Bearer upstream-secret")
        self.assertTrue(q["headers"].get("content-type", "").startswith("application/json"),
                        q["headers"])

    def test_completions_non_stream_round_trip(self):
        m = marker()
        body = {"model": "client-model", "prompt": "once upon a time " + m, "max_tokens": 5,
                "mock": {"tokens": 5}}
        r = http_request(self.port, "POST", COMPLETIONS, json_body=body)
        self.assertEqual(r.status, 200, r)
        obj = r.json()
        self.assertEqual(obj["object"], "text_completion", obj)
        self.assertIn("text", obj["choices"][0], obj)
        self.check_passthrough(r, m, "mock-completions")

        q, sent = self.upstream_request(m, COMPLETIONS)
        self.assertEqual(sent, dict(body, model="mock-completions-model", temperature=0.25))
        self.assertEqual(q["headers"].get("authorization"), "Bearer upstream-secret")

    def test_embeddings_non_stream_round_trip(self):
        m = marker()
        body = {"model": "client-embed-model", "input": ["first " + m, "second"]}
        r = http_request(self.port, "POST", EMBEDDINGS, json_body=body)
        self.assertEqual(r.status, 200, r)
        obj = r.json()
        self.assertEqual(obj["object"], "list", obj)
        self.assertEqual(len(obj["data"]), 2, obj)
        self.assertTrue(all(isinstance(x, float) or isinstance(x, int)
                            for x in obj["data"][0]["embedding"]), obj)
        self.check_passthrough(r, m, "mock-embeddings")

        q, sent = self.upstream_request(m, EMBEDDINGS)
        self.assertEqual(sent, body, "an instance without model/options forwards the body as is")
        self.assertNotIn("authorization", q["headers"],
                         "an instance without auth must not send an Authorization header")

    def test_upstream_error_status_passed_through(self):
        for status in (400, 422):
            m = marker()
            body = {"model": "x", "messages": [{"role": "user", "content": m}],
                    "mock": {"status": status}}
            r = http_request(self.port, "POST", CHAT, json_body=body)
            self.assertEqual(r.status, status, r)
            _, up = self.tap.wait_exchange(m)
            self.assertEqual(up.status, status)
            self.assertEqual(r.body, up.body, "upstream error body not passed through unchanged")

    # -- credentials ---------------------------------------------------------------------
    def test_client_credentials_not_forwarded(self):
        variants = [
            {"Authorization": "Bearer client-secret-A", "apikey": "client-secret-B",
             "x-api-key": "client-secret-C"},
            {"AUTHORIZATION": "Bearer client-secret-D", "ApiKey": "client-secret-E",
             "X-API-KEY": "client-secret-F"},
        ]
        for headers in variants:
            for path, inst_auth in ((CHAT, "Bearer upstream-secret"), (EMBEDDINGS, None)):
                m = marker()
                if path == CHAT:
                    body = {"model": "c", "messages": [{"role": "user", "content": m}]}
                else:
                    body = {"model": "c", "input": m}
                r = http_request(self.port, "POST", path, headers=headers, json_body=body)
                self.assertEqual(r.status, 200, r)
                q, _ = self.upstream_request(m, path)
                h = q["headers"]
                self.assertEqual(h.get("authorization"), inst_auth,
                                 "upstream Authorization must be the instance's (or absent)")
                self.assertNotIn("apikey", h)
                self.assertNotIn("x-api-key", h)
                recorded = json.dumps(q)
                req, _ = self.tap.wait_exchange(m)
                raw_headers = json.dumps(req.header_list)
                for secret in headers.values():
                    token = secret.split()[-1]
                    self.assertNotIn(token, recorded, "client credential reached the upstream")
                    self.assertNotIn(token, raw_headers, "client credential reached the upstream")

    # -- request ids ---------------------------------------------------------------------
    def test_request_id_propagated(self):
        rid = "itest-" + uuid.uuid4().hex
        r = http_request(self.port, "POST", CHAT, headers={"X-Request-Id": rid},
                         json_body={"model": "c", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-request-id"), rid)

    def test_request_id_generated_and_unique(self):
        ids = set()
        for _ in range(5):
            r = http_request(self.port, "POST", CHAT,
                             json_body={"model": "c", "messages": [{"role": "user", "content": "x"}]})
            self.assertEqual(r.status, 200, r)
            rid = r.header("x-request-id")
            self.assertTrue(rid, "no generated x-request-id: %r" % r)
            ids.add(rid)
        self.assertEqual(len(ids), 5, "generated request ids are not unique: %r" % ids)

    def test_request_id_on_gateway_errors(self):
        rid = "itest-err-" + uuid.uuid4().hex
        r = http_request(self.port, "POST", CHAT, headers={"x-request-id": rid}, body=b"{nope")
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.header("x-request-id"), rid)

    # -- connections ---------------------------------------------------------------------
    def test_keepalive_many_requests_one_connection(self):
        with HTTPConn(self.port) as c:
            local = c.sock.getsockname()
            for i in range(60):
                if i % 10 == 9:
                    c.send_request("POST", CHAT, json_body={
                        "model": "c", "stream": True, "messages": [{"role": "user", "content": "s"}],
                        "mock": {"tokens": 4, "itl_ms": 0}})
                    head = c.read_head()
                    self.assertEqual(head.status, 200, head)
                    events = list(c.iter_events())
                    self.assertTrue(c.body_state.get("complete"), "stream %d truncated" % i)
                    self.assertTrue(events and events[-1].is_done, events[-3:])
                else:
                    r = c.request("POST", CHAT, json_body={
                        "model": "c", "messages": [{"role": "user", "content": "n%d" % i}],
                        "mock": {"tokens": 2}})
                    self.assertEqual(r.status, 200, "request %d: %r" % (i, r))
                    self.assertTrue(r.complete)
                    r.json()
                self.assertTrue(c.keeps_alive, "request %d: server closed keep-alive: %r"
                                % (i, c.head))
            # and the connection is still the same, still open
            r = c.request("GET", "/v1/models")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(c.sock.getsockname(), local)
        self.assertEqual(self.mock.stats()["completed"], 60)

    def test_concurrent_clients(self):
        errors = []

        def client(n):
            try:
                with HTTPConn(self.port) as c:
                    for i in range(10):
                        r = c.request("POST", CHAT, json_body={
                            "model": "c", "messages": [{"role": "user", "content": "%d-%d" % (n, i)}],
                            "mock": {"tokens": 3}})
                        if r.status != 200:
                            errors.append(r)
                        r.json()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(harness.DEADLINE * 3)
        self.assertFalse(any(t.is_alive() for t in threads), "clients did not finish")
        self.assertEqual(errors, [])
        self.assertEqual(self.mock.stats()["completed"], 80)


class UserAgentTest(harness.SluiceTestCase):
    """Sluice names itself to upstreams (a header line of its own, not libcurl's), and an
    instance that sets its own User-Agent sends that one alone."""

    def test_user_agent(self):
        mock = self.start_mock()
        gw = self.start_sluice(
            instances=[instance("plain", mock.url(CHAT)),
                       instance("own", mock.url(CHAT), auth_header={"User-Agent": "custom/1"})],
            routes=[route("plain", [CHAT], "plain", models=["p"]),
                    route("own", [CHAT], "own", models=["o"])])
        for model, want in (("p", None), ("o", "custom/1")):
            m = marker()
            r = http_request(gw.port, "POST", CHAT, json_body={
                "model": model, "messages": [{"role": "user", "content": m}]})
            self.assertEqual(r.status, 200, r)
            ua = mock.wait_request(m)["headers"].get("user-agent", "")
            if want is None:
                self.assertTrue(ua.startswith("sluice/"), repr(ua))
            else:  # ours would come after the instance's, and be the one recorded
                self.assertEqual(ua, want)


class ModelsTest(harness.SluiceTestCase):
    """GET /v1/models lists what the routes expose; route matching by model."""

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.sluice = self.start_sluice(
            instances=[
                instance("a", self.mock.url(CHAT), model="upstream-a"),
                instance("b", self.mock.url(CHAT), model="upstream-b"),
                instance("c", self.mock.url(COMPLETIONS), model="upstream-c"),
            ],
            routes=[
                route("chat-a", [CHAT], "a", models=["alpha", "alpha-2"]),
                route("chat-b", [CHAT], "b", models=["beta"]),
                route("completions", [COMPLETIONS], "c", models=["gamma"]),
            ])
        self.port = self.sluice.port

    def test_models_list(self):
        r = http_request(self.port, "GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        obj = r.json()
        self.assertEqual(obj.get("object"), "list", obj)
        ids = [m.get("id") for m in obj["data"]]
        self.assertEqual(sorted(ids), ["alpha", "alpha-2", "beta", "gamma"], obj)
        for m in obj["data"]:
            self.assertEqual(m.get("object"), "model", m)

    def test_model_is_spliced_into_the_clients_bytes(self):
        """Changing only the model does not re-serialise the body: the instance receives the
        client's bytes (spacing, key order, escapes) with just the model's value replaced."""
        m = marker()
        raw = ('{ "model" : "beta",\n  "messages": [{"content": "%s \\u00e9", "role": "user"}],'
               ' "temperature" : 0.50 }' % m)
        r = http_request(self.port, "POST", CHAT, body=raw.encode())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.mock.wait_request(m)["body"], raw.replace('"beta"', '"upstream-b"'))

    def test_escaped_member_name_is_spliced(self):
        """The body is read by a validating scan that decodes member names: "mod\\u0065l"
        is the model, and its value is replaced in the client's bytes (no rebuild)."""
        m = marker()
        raw = '{"mod\\u0065l":"beta","messages":[{"role":"user","content":"%s"}]}' % m
        r = http_request(self.port, "POST", CHAT, body=raw.encode())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.mock.wait_request(m)["body"], raw.replace('"beta"', '"upstream-b"'))

    def test_model_with_a_nul_is_refused(self):
        """"beta\\u0000x" is not the model "beta" (a C string would stop at the NUL)."""
        raw = b'{"model":"beta\\u0000x","messages":[{"role":"user","content":"x"}]}'
        r = http_request(self.port, "POST", CHAT, body=raw)
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.json()["error"]["code"], "invalid_model", r)
        self.assertEqual(self.mock.stats()["requests"], 0, "the request reached the mock")

    def test_bodies_past_the_scanners_bounds(self):
        """A valid body the scanner cannot decide in its fixed memory (more keys open at
        once than it keeps, objects nested deeper than it tracks) is parsed by jansson
        instead, and served the same way; one with a duplicate key deep inside is still
        refused."""
        many = ",".join('"k%d":%d' % (i, i) for i in range(600))
        deep = '{"a":' * 140 + "1" + "}" * 140
        for extra in (many, '"deep":' + deep):
            m = marker()
            raw = '{"model":"beta","messages":[{"role":"user","content":"%s"}],%s}' % (m, extra)
            r = http_request(self.port, "POST", CHAT, body=raw.encode())
            self.assertEqual(r.status, 200, r)
            self.assertEqual(self.mock.wait_request(m)["body"],
                             raw.replace('"beta"', '"upstream-b"'))
        bad = '{"model":"beta","x":%s}' % ('{"a":' * 140 + '{"b":1,"b":2}' + "}" * 140)
        r = http_request(self.port, "POST", CHAT, body=bad.encode())
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.json()["error"]["code"], "invalid_json", r)

    def test_model_retrieve(self):
        """GET /v1/models/{id} (the SDKs' models.retrieve) returns that entry, or 404."""
        r = http_request(self.port, "GET", "/v1/models/beta")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json().get("id"), "beta", r)
        self.assertEqual(r.json().get("object"), "model", r)
        r = http_request(self.port, "GET", "/v1/models/no-such-model")
        self.assertOpenAIError(r, 404)
        self.assertEqual(r.json()["error"]["code"], "model_not_found", r)

    def test_route_by_model(self):
        for model, inst, upstream in (("alpha", "a", "upstream-a"), ("alpha-2", "a", "upstream-a"),
                                      ("beta", "b", "upstream-b")):
            m = marker()
            r = http_request(self.port, "POST", CHAT, json_body={
                "model": model, "messages": [{"role": "user", "content": m}]})
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("x-sluice-instance"), inst)
            sent = json.loads(self.mock.wait_request(m)["body"])
            self.assertEqual(sent["model"], upstream)

    def test_unknown_model_is_404(self):
        r = http_request(self.port, "POST", CHAT, json_body={
            "model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
        self.assertOpenAIError(r, 404)
        self.assertEqual(self.mock.stats()["requests"], 0, "an unrouted request reached the mock")
        # the model name of the other path's route does not match here either
        r = http_request(self.port, "POST", CHAT, json_body={
            "model": "gamma", "messages": [{"role": "user", "content": "x"}]})
        self.assertOpenAIError(r, 404)


if __name__ == "__main__":
    harness.main()
