"""test_protocols.py — the provider adapters through the real daemon (docs/providers.md).

One sluice-mockllm speaks every protocol (chat at …/chat/completions, Anthropic Messages at
…/messages, Responses at …/responses), so each path below is a real translation between
real processes: the client talks one protocol to Sluice, the mock records what the upstream
received, and the client gets an answer in its own protocol.

  * chat clients on an Anthropic instance (stream and not, tools, errors, mid-stream errors);
  * Messages clients on an OpenAI-compatible instance, and on an Anthropic one (identity:
    the client's anthropic-version / anthropic-beta forwarded, the instance's key set);
  * Responses clients on a chat-only instance (translated; previous_response_id refused)
    and on an instance with a responses_endpoint (passed through, usage charged);
  * count_tokens answered by the gateway's estimate on a chat instance;
  * gateway-made errors in the Messages shape on Messages paths;
  * model aliases (a route's public names, targets[].model) and the model lists;
  * Azure deployments (no model in the body, api-key);
  * fallback between providers, invisible to the client (the case study: on-prem Qwen on
    OpenAI protocol failing over to a Claude instance), stream and non-stream, both ways;
  * quotas charge the same tokens whichever protocol served the request.
"""

import json
import os
import uuid

import harness
import quota_helpers
from harness import Raw, wait_until

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
COUNT = "/v1/messages/count_tokens"
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore").split()
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}
MSG_TOOL = {"name": "get_weather", "description": "weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def words(n):
    return " ".join(LOREM[:n])


def marker():
    return "mk-" + uuid.uuid4().hex[:12]


def chat_body(mark, model="qwen", stream=False, tokens=3, **extra):
    b = {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": mark + " hello"}],
         "mock": {"tokens": tokens}}
    if stream:
        b["stream"] = True
    b.update(extra)
    return b


def msg_body(mark, model="qwen", stream=False, tokens=3, **extra):
    b = {"model": model, "max_tokens": 64, "system": "be brief",
         "messages": [{"role": "user", "content": mark + " hello"}], "mock": {"tokens": tokens}}
    if stream:
        b["stream"] = True
    b.update(extra)
    return b


def anthropic(name, endpoint, model="claude-up", **extra):
    inst = harness.instance(name, endpoint, model=model,
                            auth_header={"x-api-key": "sk-ant-" + name}, **extra)
    inst["provider"] = Raw("anthropic")
    return inst


def chat_instance(name, endpoint, model="qwen-up", **extra):
    return harness.instance(name, endpoint, model=model,
                            auth_header={"Authorization": "Bearer up-" + name}, **extra)


def rte(name, paths, targets, models=None, **extra):
    r = {"name": name, "paths": list(paths)}
    if models is not None:
        r["models"] = list(models)
    r["auth"] = Raw("none")
    r["targets"] = [t if isinstance(t, dict) else {"instance": t} for t in targets]
    r.update(extra)
    return r


def sse_json(events, name=None):
    """The JSON data of the events (named name, when given), [DONE] left out."""
    out = []
    for e in events:
        if e.data is None or e.data == "[DONE]":
            continue
        if name is not None and e.event != name:
            continue
        out.append(json.loads(e.data))
    return out


class ProtocolCase(harness.SluiceTestCase):

    def gateway(self, instances, routes, consumers=None, admin=False):
        port = harness.free_port()
        self.access_log = os.path.join(self.workdir, "access.log")
        self.admin_port = harness.free_port() if admin else None
        text = quota_helpers.quota_config(port, instances, routes, consumers=consumers,
                                          admin_port=self.admin_port,
                                          access_log=self.access_log)
        gw = self.start_sluice(text, port=port)
        if admin:
            quota_helpers.wait_admin(self.admin_port)
        return gw

    def access(self, request_id):
        def find():
            for e in quota_helpers.read_access_log(self.access_log):
                if e["request_id"] == request_id:
                    return e
            return None
        return wait_until(find, message="the access-log line of %s" % request_id)

    def post(self, gw, path, body, headers=None):
        return harness.http_request(gw.port, "POST", path, headers=headers, json_body=body)

    def stream(self, gw, path, body, headers=None):
        head, events, complete, rest = harness.stream_request(gw.port, path, body,
                                                              headers=headers)
        self.assertEqual(head.status, 200, repr(head))
        self.assertTrue(complete, "the chunked body was not terminated")
        self.assertEqual(rest.strip(), b"", "bytes after the last event: %r" % rest[:200])
        return head, events

    def upstream(self, mock, mark, path=None):
        q = mock.wait_request(mark, path)
        return q, json.loads(q["body"])


# ---------------------------------------------------------------------------------------
# Chat clients on an Anthropic instance
# ---------------------------------------------------------------------------------------

class ChatOnAnthropicTest(ProtocolCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.gw = self.gateway(
            [anthropic("claude", self.mock.url(MESSAGES), options={"max_tokens": 100})],
            [rte("chat", [CHAT], ["claude"])])

    def test_non_stream(self):
        mark = marker()
        r = self.post(self.gw, CHAT, chat_body(mark, stop=["zzz"], temperature=0.5))
        self.assertEqual(r.status, 200, repr(r))
        body = r.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "qwen", "the client's model name")
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant",
                                                         "content": words(3)})
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        p = body["usage"]["prompt_tokens"]
        self.assertEqual(body["usage"]["completion_tokens"], 3)
        self.assertEqual(body["usage"]["total_tokens"], p + 3)
        # What the Anthropic upstream received.
        q, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertEqual(q["headers"]["x-api-key"], "sk-ant-claude")
        self.assertEqual(q["headers"]["anthropic-version"], "2023-06-01")
        self.assertNotIn("authorization", q["headers"])
        self.assertEqual(up["model"], "claude-up")
        self.assertEqual(up["system"], [{"type": "text", "text": "be brief"}])
        self.assertEqual(up["messages"], [{"role": "user", "content": [
            {"type": "text", "text": mark + " hello"}]}])
        self.assertEqual(up["max_tokens"], 100, "the instance's options.max_tokens, a default")
        self.assertEqual(up["stop_sequences"], ["zzz"])
        self.assertEqual(up["temperature"], 0.5)
        self.assertEqual(up["mock"], {"tokens": 3}, "the mock object is carried across")
        e = self.access(r.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 3)
        self.assertFalse(e["usage"]["estimated"])
        self.assertEqual(e["upstream_model"], "claude-up")

    def test_auth_header_replaces_the_providers_extra_header(self):
        mock = self.start_mock(name="own-version")
        inst = anthropic("pinned", mock.url(MESSAGES))
        inst["auth"]["header"]["anthropic-version"] = "2099-01-01"
        gw = self.gateway([inst], [rte("chat", [CHAT], ["pinned"])])
        mark = marker()
        r = self.post(gw, CHAT, chat_body(mark))
        self.assertEqual(r.status, 200, repr(r))
        q = mock.wait_request(mark)
        self.assertEqual(q["headers"]["anthropic-version"], "2099-01-01",
                         "one header, the instance's (a repeated one would be joined)")

    def test_client_max_tokens_wins_over_the_default(self):
        mark = marker()
        r = self.post(self.gw, CHAT, chat_body(mark, max_tokens=2))
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(r.json()["choices"][0]["finish_reason"], "length")
        _, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertEqual(up["max_tokens"], 2)

    def test_stream(self):
        mark = marker()
        head, events = self.stream(self.gw, CHAT, chat_body(
            mark, stream=True, tokens=4, stream_options={"include_usage": True}))
        self.assertEqual(head.header("content-type"), "text/event-stream")
        self.assertTrue(events[-1].is_done, repr(events[-3:]))
        chunks = sse_json(events)
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        text = "".join((c["choices"][0]["delta"].get("content") or "")
                       for c in chunks if c["choices"])
        self.assertEqual(text, words(4))
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                    and c["choices"][0].get("finish_reason")]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual(chunks[-1]["choices"], [], "the usage chunk the client asked for")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 4)
        _, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertTrue(up["stream"])
        self.assertNotIn("stream_options", up)

    def test_stream_without_usage_hides_it(self):
        mark = marker()
        head, events = self.stream(self.gw, CHAT, chat_body(mark, stream=True))
        chunks = sse_json(events)
        self.assertFalse([c for c in chunks if c.get("usage")], "no usage chunk: %r" % chunks)
        e = self.access(head.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 3, "usage is still what is charged")

    def test_tools(self):
        mark = marker()
        call = {"name": "get_weather", "arguments": {"city": "Paris"}}
        body = chat_body(mark, tools=[TOOL], tool_choice="auto")
        body["mock"]["tool_call"] = call
        r = self.post(self.gw, CHAT, body)
        self.assertEqual(r.status, 200, repr(r))
        ch = r.json()["choices"][0]
        self.assertEqual(ch["finish_reason"], "tool_calls")
        tc = ch["message"]["tool_calls"]
        self.assertEqual(len(tc), 1)
        self.assertEqual(tc[0]["function"]["name"], "get_weather")
        self.assertEqual(json.loads(tc[0]["function"]["arguments"]), {"city": "Paris"})
        _, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertEqual(up["tools"][0]["name"], "get_weather")
        self.assertEqual(up["tool_choice"], {"type": "auto"})

        # streamed: the arguments arrive in pieces, as tool_calls deltas
        mark = marker()
        body = chat_body(mark, stream=True, tools=[TOOL])
        body["mock"]["tool_call"] = call
        head, events = self.stream(self.gw, CHAT, body)
        chunks = sse_json(events)
        args = "".join(d["function"].get("arguments", "")
                       for c in chunks if c["choices"]
                       for d in (c["choices"][0]["delta"].get("tool_calls") or []))
        self.assertEqual(json.loads(args), {"city": "Paris"})
        self.assertIn("tool_calls", [c["choices"][0]["finish_reason"] for c in chunks
                                     if c["choices"]])

        # the tool result goes back as a tool_result block
        mark = marker()
        body = {"model": "qwen", "tools": [TOOL], "mock": {"tokens": 2}, "messages": [
            {"role": "user", "content": mark + " weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}
        r = self.post(self.gw, CHAT, body)
        self.assertEqual(r.status, 200, repr(r))
        _, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertEqual(up["messages"][1]["content"][0]["type"], "tool_use")
        self.assertEqual(up["messages"][2]["content"][0],
                         {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"})

    def test_upstream_error_translated(self):
        mark = marker()
        body = chat_body(mark)
        body["mock"]["status"] = 400
        r = self.post(self.gw, CHAT, body)
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.json()["error"]["type"], "invalid_request_error")

    def test_request_it_cannot_express(self):
        r = self.post(self.gw, CHAT, chat_body(marker(), n=2))
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.json()["error"]["code"], "unsupported_on_instance")
        self.assertEqual(self.mock.stats()["requests"], 0, "nothing was sent upstream")

    def test_mid_stream_error(self):
        body = chat_body(marker(), stream=True, tokens=6)
        body["mock"]["stream_error_after"] = 2
        head, events, complete, rest = harness.stream_request(self.gw.port, CHAT, body)
        self.assertEqual(head.status, 200)
        self.assertTrue(events[-1].is_error, repr(events[-3:]))
        self.assertTrue(harness.is_openai_error(events[-1].data), events[-1].raw)
        self.assertFalse(any(e.is_done for e in events))
        self.assertEqual([e.content() for e in events if e.content()], ["lorem", " ipsum"])
        self.assertTrue(complete)


# ---------------------------------------------------------------------------------------
# Messages clients
# ---------------------------------------------------------------------------------------

class MessagesTest(ProtocolCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        self.gw = self.gateway(
            [chat_instance("qwen", self.mock.url(CHAT)),
             anthropic("claude", self.mock.url(MESSAGES))],
            [rte("on-chat", [MESSAGES], [{"instance": "qwen"}], models=["qwen"]),
             rte("on-claude", [MESSAGES], [{"instance": "claude", "model": "claude-alias-up"}],
                 models=["claude"]),
             rte("count", [COUNT], ["qwen"])])

    def test_on_a_chat_instance(self):
        mark = marker()
        r = self.post(self.gw, MESSAGES, msg_body(mark, stop_sequences=["zzz"]),
                      headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 200, repr(r))
        m = r.json()
        self.assertEqual(m["type"], "message")
        self.assertEqual(m["role"], "assistant")
        self.assertEqual(m["model"], "qwen")
        self.assertEqual(m["content"], [{"type": "text", "text": words(3)}])
        self.assertEqual(m["stop_reason"], "end_turn")
        self.assertEqual(m["usage"]["output_tokens"], 3)
        q, up = self.upstream(self.mock, mark, CHAT)
        self.assertEqual(up["model"], "qwen-up")
        self.assertEqual(up["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual(up["max_tokens"], 64)
        self.assertEqual(up["stop"], ["zzz"])
        self.assertEqual(q["headers"]["authorization"], "Bearer up-qwen")
        self.assertNotIn("anthropic-version", q["headers"])

    def test_stream_on_a_chat_instance(self):
        mark = marker()
        head, events = self.stream(self.gw, MESSAGES, msg_body(mark, stream=True, tokens=4),
                                   headers=ANTHROPIC_HEADERS)
        names = [e.event for e in events]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        text = "".join(d["delta"]["text"] for d in sse_json(events, "content_block_delta"))
        self.assertEqual(text, words(4))
        delta = sse_json(events, "message_delta")[0]
        self.assertEqual(delta["delta"]["stop_reason"], "end_turn")
        self.assertEqual(delta["usage"]["output_tokens"], 4)
        _, up = self.upstream(self.mock, mark, CHAT)
        self.assertEqual(up["stream_options"], {"include_usage": True})
        e = self.access(head.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 4)
        self.assertFalse(e["usage"]["estimated"])

    def test_tools_on_a_chat_instance(self):
        mark = marker()
        body = msg_body(mark, tools=[MSG_TOOL], tool_choice={"type": "any"})
        body["mock"]["tool_call"] = {"name": "get_weather", "arguments": {"city": "Oslo"}}
        r = self.post(self.gw, MESSAGES, body, headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 200, repr(r))
        m = r.json()
        self.assertEqual(m["stop_reason"], "tool_use")
        blocks = [b for b in m["content"] if b["type"] == "tool_use"]
        self.assertEqual(blocks[0]["name"], "get_weather")
        self.assertEqual(blocks[0]["input"], {"city": "Oslo"})
        _, up = self.upstream(self.mock, mark, CHAT)
        self.assertEqual(up["tool_choice"], "required")
        self.assertEqual(up["tools"][0]["function"]["name"], "get_weather")

        mark = marker()
        body = msg_body(mark, stream=True, tools=[MSG_TOOL])
        body["mock"]["tool_call"] = {"name": "get_weather", "arguments": {"city": "Oslo"}}
        head, events = self.stream(self.gw, MESSAGES, body, headers=ANTHROPIC_HEADERS)
        starts = sse_json(events, "content_block_start")
        self.assertEqual(starts[-1]["content_block"]["type"], "tool_use")
        args = "".join(d["delta"]["partial_json"] for d in sse_json(events, "content_block_delta")
                       if d["delta"]["type"] == "input_json_delta")
        self.assertEqual(json.loads(args), {"city": "Oslo"})
        self.assertEqual(sse_json(events, "message_delta")[0]["delta"]["stop_reason"],
                         "tool_use")

    def test_identity_on_an_anthropic_instance(self):
        mark = marker()
        headers = {"anthropic-version": "2023-01-01", "anthropic-beta": "tools-2024-05-16",
                   "x-api-key": "client-key"}
        r = self.post(self.gw, MESSAGES, msg_body(mark, model="claude"), headers=headers)
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(r.json()["model"], "claude-alias-up", "the upstream's answer, as it came")
        q, up = self.upstream(self.mock, mark, MESSAGES)
        self.assertEqual(up["model"], "claude-alias-up", "targets[].model")
        self.assertEqual(q["headers"]["anthropic-version"], "2023-01-01",
                         "the client's version, not the default")
        self.assertEqual(q["headers"]["anthropic-beta"], "tools-2024-05-16")
        self.assertEqual(q["headers"]["x-api-key"], "sk-ant-claude", "the instance's key")

        mark = marker()
        head, events = self.stream(self.gw, MESSAGES, msg_body(mark, model="claude",
                                                               stream=True, tokens=5),
                                   headers=ANTHROPIC_HEADERS)
        self.assertEqual(events[0].event, "message_start")
        self.assertEqual(events[-1].event, "message_stop")
        e = self.access(head.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 5, "usage read from message_delta")
        self.assertGreater(e["usage"]["prompt"], 0, "and from message_start")
        self.assertFalse(e["usage"]["estimated"])

    def test_identity_mid_stream_error_passes_through(self):
        body = msg_body(marker(), model="claude", stream=True, tokens=6)
        body["mock"]["stream_error_after"] = 2
        head, events, complete, rest = harness.stream_request(self.gw.port, MESSAGES, body,
                                                              headers=ANTHROPIC_HEADERS)
        self.assertEqual(head.status, 200)
        self.assertEqual(events[-1].event, "error")
        self.assertEqual(json.loads(events[-1].data)["error"]["type"], "overloaded_error")

    def test_mid_stream_error_in_messages_shape(self):
        body = msg_body(marker(), stream=True, tokens=6)
        body["mock"]["stream_error_after"] = 2
        head, events, complete, rest = harness.stream_request(self.gw.port, MESSAGES, body,
                                                              headers=ANTHROPIC_HEADERS)
        self.assertEqual(head.status, 200)
        self.assertEqual(events[-1].event, "error", repr(events[-3:]))
        err = json.loads(events[-1].data)
        self.assertEqual(err["type"], "error")
        self.assertIn(err["error"]["type"], ("api_error", "overloaded_error"))
        self.assertTrue(complete)

    def test_gateway_errors_in_messages_shape(self):
        r = self.post(self.gw, MESSAGES, msg_body(marker(), model="nope"),
                      headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 404, repr(r))
        e = r.json()
        self.assertEqual(e["type"], "error")
        self.assertEqual(e["error"]["type"], "not_found_error")
        self.assertEqual(e["error"]["code"], "model_not_found", "OpenAI's code is kept")
        r = self.post(self.gw, MESSAGES, {"model": "qwen", "messages": [
            {"role": "user", "content": "hi"}]}, headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 400, repr(r))
        self.assertEqual(r.json()["error"]["message"], "max_tokens: Field required")
        r = harness.http_request(self.gw.port, "POST", MESSAGES, body=b"{nope",
                                 headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["error"]["type"], "invalid_request_error")

    def test_count_tokens_estimated_on_a_chat_instance(self):
        body = {"model": "qwen", "messages": [{"role": "user", "content": "x" * 40}]}
        r = self.post(self.gw, COUNT, body, headers=ANTHROPIC_HEADERS)
        self.assertEqual(r.status, 200, repr(r))
        n = r.json()["input_tokens"]
        self.assertGreaterEqual(n, 10)
        self.assertEqual(self.mock.stats()["requests"], 0, "answered by the gateway")

    def test_model_lists(self):
        r = harness.http_request(self.gw.port, "GET", "/v1/models")
        self.assertEqual(r.status, 200)
        ids = [m["id"] for m in r.json()["data"]]
        self.assertEqual(ids[:2], ["qwen", "claude"], "the routes' public names")
        r = harness.http_request(self.gw.port, "GET", "/v1/models", headers=ANTHROPIC_HEADERS)
        a = r.json()
        self.assertEqual([m["type"] for m in a["data"]], ["model"] * len(a["data"]))
        self.assertEqual([m["id"] for m in a["data"]][:2], ["qwen", "claude"])
        self.assertFalse(a["has_more"])
        self.assertEqual(a["first_id"], "qwen")


# ---------------------------------------------------------------------------------------
# Responses clients
# ---------------------------------------------------------------------------------------

class ResponsesTest(ProtocolCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()
        served = chat_instance("vllm", self.mock.url(CHAT),
                               responses_endpoint=self.mock.url(RESPONSES))
        self.gw = self.gateway(
            [chat_instance("qwen", self.mock.url(CHAT)), served],
            [rte("translated", [RESPONSES], ["qwen"], models=["qwen"]),
             rte("passed", [RESPONSES], ["vllm"], models=["vllm"])])

    def test_translated(self):
        mark = marker()
        r = self.post(self.gw, RESPONSES, {"model": "qwen", "input": mark + " hi",
                                           "instructions": "be brief",
                                           "max_output_tokens": 50, "mock": {"tokens": 3}})
        self.assertEqual(r.status, 200, repr(r))
        resp = r.json()
        self.assertEqual(resp["object"], "response")
        self.assertEqual(resp["status"], "completed")
        self.assertEqual(resp["output"][0]["content"][0]["text"], words(3))
        self.assertEqual(resp["usage"]["output_tokens"], 3)
        _, up = self.upstream(self.mock, mark, CHAT)
        self.assertEqual(up["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual(up["max_tokens"], 50)

    def test_translated_stream(self):
        mark = marker()
        head, events = self.stream(self.gw, RESPONSES, {"model": "qwen", "input": mark,
                                                        "stream": True, "mock": {"tokens": 4}})
        names = [e.event for e in events]
        self.assertEqual(names[0], "response.created")
        self.assertEqual(names[-1], "response.completed")
        text = "".join(d["delta"] for d in sse_json(events, "response.output_text.delta"))
        self.assertEqual(text, words(4))
        done = sse_json(events, "response.completed")[0]
        self.assertEqual(done["response"]["usage"]["output_tokens"], 4)
        seq = [json.loads(e.data)["sequence_number"] for e in events if e.data]
        self.assertEqual(seq, list(range(len(seq))))

    def test_stateful_request_refused(self):
        r = self.post(self.gw, RESPONSES, {"model": "qwen", "input": "hi",
                                           "previous_response_id": "resp_1"})
        self.assertOpenAIError(r, 400)
        self.assertEqual(r.json()["error"]["code"], "unsupported_on_instance")
        self.assertIn("previous_response_id", r.json()["error"]["message"])
        self.assertEqual(self.mock.stats()["requests"], 0)

    def test_passed_through_where_served(self):
        mark = marker()
        body = {"model": "vllm", "input": mark + " hi", "previous_response_id": "resp_9",
                "mock": {"tokens": 3}}
        r = self.post(self.gw, RESPONSES, body)
        self.assertEqual(r.status, 200, repr(r))
        q, up = self.upstream(self.mock, mark, RESPONSES)
        self.assertEqual(up["previous_response_id"], "resp_9", "the identity keeps everything")
        self.assertEqual(up["model"], "qwen-up")
        e = self.access(r.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 3)
        self.assertFalse(e["usage"]["estimated"])
        mark = marker()
        head, events = self.stream(self.gw, RESPONSES, {"model": "vllm", "input": mark,
                                                        "stream": True, "mock": {"tokens": 5}})
        self.assertEqual(events[-1].event, "response.completed")
        e = self.access(head.header("x-request-id"))
        self.assertEqual(e["usage"]["completion"], 5, "usage read from response.completed")
        self.assertFalse(e["usage"]["estimated"])


# ---------------------------------------------------------------------------------------
# Azure
# ---------------------------------------------------------------------------------------

class AzureTest(ProtocolCase):

    def test_deployment_url(self):
        mock = self.start_mock()
        inst = harness.instance(
            "az", mock.url("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            model="ignored", auth_header={"api-key": "az-key"})
        inst["provider"] = Raw("azure-openai")
        gw = self.gateway([inst], [rte("chat", [CHAT], ["az"])])
        mark = marker()
        r = self.post(gw, CHAT, chat_body(mark))
        self.assertEqual(r.status, 200, repr(r))
        q, up = self.upstream(mock, mark)
        self.assertNotIn("model", up, "a deployment URL names the model")
        self.assertEqual(q["headers"]["api-key"], "az-key")
        self.assertEqual(q["query"], "api-version=2024-10-21")
        # Azure's own error shape becomes OpenAI's.
        body = chat_body(marker())
        body["mock"]["status"] = 404
        r = self.post(gw, CHAT, body)
        self.assertOpenAIError(r, 404)


# ---------------------------------------------------------------------------------------
# Fallback between providers
# ---------------------------------------------------------------------------------------

class CrossProviderFallbackTest(ProtocolCase):
    """The case study: the on-prem Qwen (OpenAI protocol) fails, a Claude instance takes
    over, and the client — speaking chat — cannot tell."""

    def setUp(self):
        super().setUp()
        self.down = self.start_mock("--status", "503", name="onprem")
        self.claude = self.start_mock(name="claude")
        self.gw = self.gateway(
            [chat_instance("qwen-onprem", self.down.url(CHAT),
                           checks={"passive": {"enabled": False}}),
             anthropic("claude", self.claude.url(MESSAGES), model="claude-sonnet",
                       checks={"passive": {"enabled": False}})],
            [rte("chat", [CHAT], [{"instance": "qwen-onprem", "priority": 10},
                                  {"instance": "claude", "priority": 1,
                                   "model": "claude-haiku"}], models=["qwen"]),
             rte("messages", [MESSAGES], [{"instance": "claude", "priority": 10},
                                          {"instance": "qwen-onprem", "priority": 1}],
                 models=["qwen"])])

    def test_non_stream(self):
        mark = marker()
        r = self.post(self.gw, CHAT, chat_body(mark))
        self.assertEqual(r.status, 200, repr(r))
        self.assertEqual(r.header("x-sluice-instance"), "claude")
        body = r.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "qwen")
        self.assertEqual(body["choices"][0]["message"]["content"], words(3))
        self.down.wait_request(mark)
        _, up = self.upstream(self.claude, mark, MESSAGES)
        self.assertEqual(up["model"], "claude-haiku")
        e = self.access(r.header("x-request-id"))
        self.assertEqual([(a["instance"], a["outcome"]) for a in e["attempts"]],
                         [("qwen-onprem", "http_5xx"), ("claude", "ok")])

    def test_stream(self):
        mark = marker()
        head, events = self.stream(self.gw, CHAT, chat_body(mark, stream=True, tokens=5))
        self.assertEqual(head.header("x-sluice-instance"), "claude")
        self.assertTrue(events[-1].is_done)
        self.assertEqual("".join(e.content() or "" for e in events), words(5))
        self.assertFalse(any(e.is_error for e in events))
        self.down.wait_request(mark)

    def test_messages_client_overloaded_claude_falls_back_to_chat(self):
        # Anthropic's 529 overloaded_error fails over like a 503.
        mark = marker()
        body = msg_body(mark)
        body["mock"]["status"] = 529
        r = self.post(self.gw, MESSAGES, body, headers=ANTHROPIC_HEADERS)
        # the 503 instance answers the second attempt: every candidate failed
        self.assertEqual(r.status, 502, repr(r))
        self.assertEqual(r.json()["type"], "error")
        e = self.access(r.header("x-request-id"))
        self.assertEqual([a["instance"] for a in e["attempts"]], ["claude", "qwen-onprem"])


class FallbackToChatTest(ProtocolCase):

    def test_overloaded_anthropic_to_chat(self):
        claude = self.start_mock("--status", "529", name="claude")
        qwen = self.start_mock(name="qwen")
        gw = self.gateway(
            [anthropic("claude", claude.url(MESSAGES), checks={"passive": {"enabled": False}}),
             chat_instance("qwen", qwen.url(CHAT))],
            [rte("messages", [MESSAGES], [{"instance": "claude", "priority": 10},
                                          {"instance": "qwen", "priority": 1}])])
        for stream in (False, True):
            with self.subTest(stream=stream):
                mark = marker()
                if stream:
                    head, events = self.stream(gw, MESSAGES, msg_body(mark, stream=True),
                                               headers=ANTHROPIC_HEADERS)
                    self.assertEqual(head.header("x-sluice-instance"), "qwen")
                    self.assertEqual(events[-1].event, "message_stop")
                else:
                    r = self.post(gw, MESSAGES, msg_body(mark), headers=ANTHROPIC_HEADERS)
                    self.assertEqual(r.status, 200, repr(r))
                    self.assertEqual(r.header("x-sluice-instance"), "qwen")
                    self.assertEqual(r.json()["content"][0]["text"], words(3))
                claude.wait_request(mark)
                qwen.wait_request(mark)


# ---------------------------------------------------------------------------------------
# Quotas charge the same tokens whichever protocol served
# ---------------------------------------------------------------------------------------

class SameTokensTest(ProtocolCase):

    def test_each_protocol_charges_the_same(self):
        mock = self.start_mock()
        key = "sk-" + uuid.uuid4().hex
        gw = self.gateway(
            [chat_instance("qwen", mock.url(CHAT)), anthropic("claude", mock.url(MESSAGES))],
            [dict(rte("chat-qwen", [CHAT], ["qwen"], models=["q"]), auth=Raw("key-auth")),
             dict(rte("chat-claude", [CHAT], ["claude"], models=["c"]), auth=Raw("key-auth")),
             dict(rte("msg-qwen", [MESSAGES], ["qwen"], models=["q"]), auth=Raw("key-auth")),
             dict(rte("msg-claude", [MESSAGES], ["claude"], models=["c"]),
                  auth=Raw("key-auth"))],
            consumers=[{"name": "team", "keys": [key], "limits": [
                {"strategy": Raw("total_tokens"), "limit": 1000000, "window": Raw("1d")}]}],
            admin=True)
        auth = {"Authorization": "Bearer " + key}
        prompt = "x" * 400  # 100 tokens at the mock's 4 bytes per token
        cases = [
            (CHAT, {"model": "q", "messages": [{"role": "user", "content": prompt}]}, False),
            (CHAT, {"model": "c", "messages": [{"role": "user", "content": prompt}]}, False),
            (MESSAGES, {"model": "q", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}, False),
            (MESSAGES, {"model": "c", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}, False),
            (CHAT, {"model": "q", "messages": [{"role": "user", "content": prompt}]}, True),
            (CHAT, {"model": "c", "messages": [{"role": "user", "content": prompt}]}, True),
            (MESSAGES, {"model": "q", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}, True),
            (MESSAGES, {"model": "c", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}, True),
        ]
        charged = []
        for path, body, stream in cases:
            body = dict(body, mock={"tokens": 7})
            if stream:
                body["stream"] = True
            before = quota_helpers.consumer_used(self.admin_port, "team")
            if stream:
                head, events = self.stream(gw, path, body, headers=auth)
                rid = head.header("x-request-id")
            else:
                r = self.post(gw, path, body, headers=auth)
                self.assertEqual(r.status, 200, repr(r))
                rid = r.header("x-request-id")
            e = self.access(rid)
            # The memory store settles before the access-log line is written.
            after = quota_helpers.consumer_used(self.admin_port, "team")
            charged.append((e["route"], stream, e["usage"]["prompt"],
                            e["usage"]["completion"], e["usage"]["estimated"], after - before))
        self.assertEqual({c[2:] for c in charged}, {(100, 7, False, 107)}, charged)


if __name__ == "__main__":
    harness.main()
