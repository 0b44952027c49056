"""test_mockllm.py — sluice-mockllm itself, driven directly over sockets: the Anthropic Messages
API, the OpenAI Responses API and moderations wire formats (event order, fields, usage), the
output controls (content, chunks, repeat, tool calls, cache tokens, mid-stream errors), the
disconnect accounting in /_mock/requests and /_mock/stats, and the fault modes (reset, stall,
garbage, junk SSE, one huge event, endless headers, close on accept)."""

import json
import math
import socket

import harness
from harness import HTTPConn, http_request, stream_request

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"
ANTHROPIC = {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-test"}
MiB = 1024 * 1024

WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
         "exercitation ullamco laboris nisi aliquip ex ea").split()
MOD_CATEGORIES = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                  "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent",
                  "sexual", "sexual/minors", "violence", "violence/graphic"]


def lorem_pieces(n):
    return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(n)]


def lorem(n):
    return "".join(lorem_pieces(n))


def tokens_of(*texts):
    """The mock's prompt estimate: ceil(bytes / 4), at least 1."""
    return max(1, math.ceil(sum(len(t.encode()) for t in texts) / 4))


def msg_body(prompt="hello there", stream=False, max_tokens=256, **mock):
    b = {"model": "claude-test", "max_tokens": max_tokens, "stream": stream,
         "messages": [{"role": "user", "content": prompt}]}
    if mock:
        b["mock"] = mock
    return b


def resp_body(inp="hello there", stream=False, **mock):
    b = {"model": "gpt-test", "input": inp, "stream": stream}
    if mock:
        b["mock"] = mock
    return b


def chat_body(prompt="hello", stream=False, **mock):
    b = {"model": "chat-test", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    if mock:
        b["mock"] = mock
    return b


TOOLS_ANTHROPIC = [{"name": "get_weather", "description": "weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOLS_OPENAI = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
TOOLS_RESPONSES = [{"type": "function", "name": "get_weather", "parameters": {}}]
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TOOL_ARGS = json.dumps(TOOL_CALL["arguments"], separators=(",", ":"))


class MockTestCase(harness.SluiceTestCase):

    def post(self, mock, path, body, headers=None):
        return http_request(mock.port, "POST", path, headers=headers, json_body=body)

    def stream(self, mock, path, body, headers=None):
        head, events, complete, rest = stream_request(mock.port, path, body, headers=headers)
        self.assertEqual(head.status, 200, head)
        self.assertTrue(complete, "stream body did not end cleanly: %r" % events[-3:])
        self.assertEqual(rest.strip(), b"")
        return head, events

    def last_record(self, mock, path):
        recs = mock.requests(path)
        self.assertTrue(recs, "no record for %s" % path)
        return recs[-1]

    def assertNamedEvents(self, events):
        """Every event has an `event:` line equal to its data's "type"."""
        for e in events:
            self.assertIsNotNone(e.event, "event without an event: line: %r" % e.raw)
            self.assertEqual(e.json()["type"], e.event, e.raw)


# ---------------------------------------------------------------------------------------
# Anthropic Messages API
# ---------------------------------------------------------------------------------------

class MessagesTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock("--tokens", "5")

    def test_non_stream_reply_shape_and_usage(self):
        body = {"model": "claude-test", "max_tokens": 100, "system": "be brief",
                "messages": [{"role": "user", "content": "hello there"},
                             {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "user", "content": [{"type": "text", "text": "again"}]}]}
        r = self.post(self.mock, MESSAGES, body, ANTHROPIC)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("content-type").startswith("application/json"))
        m = r.json()
        self.assertEqual(list(m), ["id", "type", "role", "model", "content", "stop_reason",
                                   "stop_sequence", "usage"])
        self.assertTrue(m["id"].startswith("msg_"), m)
        self.assertEqual((m["type"], m["role"], m["model"]), ("message", "assistant", "claude-test"))
        self.assertEqual(m["content"], [{"type": "text", "text": lorem(5)}])
        self.assertEqual((m["stop_reason"], m["stop_sequence"]), ("end_turn", None))
        self.assertEqual(m["usage"], {
            "input_tokens": tokens_of("be brief", "hello there", "hi", "again"),
            "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0})
        rec = self.last_record(self.mock, MESSAGES)
        self.assertEqual(rec["headers"]["x-api-key"], "sk-ant-test")
        self.assertEqual(rec["headers"]["anthropic-version"], "2023-06-01")
        self.assertEqual(rec["outcome"], "completed")

    def test_auth_is_whatever_arrives(self):
        r = self.post(self.mock, MESSAGES, msg_body(),
                      {"anthropic-version": "2023-06-01", "Authorization": "Bearer tok"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.last_record(self.mock, MESSAGES)["headers"]["authorization"],
                         "Bearer tok")

    def assertAnthropicError(self, r, status, etype):
        self.assertEqual(r.status, status, r)
        self.assertTrue(r.header("content-type").startswith("application/json"))
        e = r.json()
        self.assertEqual(list(e), ["type", "error"])
        self.assertEqual(e["type"], "error")
        self.assertEqual(e["error"]["type"], etype, e)
        self.assertIsInstance(e["error"]["message"], str)
        self.assertTrue(e["error"]["message"])

    def test_max_tokens_and_version_are_required(self):
        body = msg_body()
        del body["max_tokens"]
        r = self.post(self.mock, MESSAGES, body, ANTHROPIC)
        self.assertAnthropicError(r, 400, "invalid_request_error")
        self.assertIn("max_tokens", r.json()["error"]["message"])
        r = self.post(self.mock, MESSAGES, msg_body(), {"x-api-key": "k"})
        self.assertAnthropicError(r, 400, "invalid_request_error")
        self.assertIn("anthropic-version", r.json()["error"]["message"])
        r = self.post(self.mock, MESSAGES, "{not json", ANTHROPIC)
        self.assertAnthropicError(r, 400, "invalid_request_error")
        self.assertEqual([q["outcome"] for q in self.mock.requests(MESSAGES)], ["invalid"] * 3)

    def test_max_tokens_cuts_the_reply(self):
        m = self.post(self.mock, MESSAGES, msg_body(max_tokens=2), ANTHROPIC).json()
        self.assertEqual(m["content"][0]["text"], lorem(2))
        self.assertEqual(m["stop_reason"], "max_tokens")
        self.assertEqual(m["usage"]["output_tokens"], 2)

    def test_stop_sequences(self):
        body = msg_body()
        body["stop_sequences"] = ["nope", "sit"]
        m = self.post(self.mock, MESSAGES, body, ANTHROPIC).json()
        self.assertEqual(m["content"][0]["text"], lorem(3))  # "lorem ipsum dolor", not "sit"
        self.assertEqual((m["stop_reason"], m["stop_sequence"]), ("stop_sequence", "sit"))
        self.assertEqual(m["usage"]["output_tokens"], 3)
        body["stream"] = True
        _, events = self.stream(self.mock, MESSAGES, body, ANTHROPIC)
        delta = [e.json() for e in events if e.event == "message_delta"][0]
        self.assertEqual(delta["delta"], {"stop_reason": "stop_sequence", "stop_sequence": "sit"})
        self.assertEqual(delta["usage"], {"output_tokens": 3})

    def test_stream_event_sequence(self):
        head, events = self.stream(self.mock, MESSAGES, msg_body(stream=True), ANTHROPIC)
        self.assertTrue(head.header("content-type").startswith("text/event-stream"))
        self.assertNamedEvents(events)
        self.assertEqual([e.event for e in events],
                         ["message_start", "content_block_start", "ping"] +
                         ["content_block_delta"] * 5 +
                         ["content_block_stop", "message_delta", "message_stop"])
        self.assertFalse(any(e.data == "[DONE]" for e in events))
        start = events[0].json()["message"]
        self.assertTrue(start["id"].startswith("msg_"))
        self.assertEqual((start["type"], start["role"], start["model"], start["content"],
                          start["stop_reason"], start["stop_sequence"]),
                         ("message", "assistant", "claude-test", [], None, None))
        self.assertEqual(start["usage"], {"input_tokens": tokens_of("hello there"),
                                          "cache_creation_input_tokens": 0,
                                          "cache_read_input_tokens": 0, "output_tokens": 1})
        self.assertEqual(events[1].json(), {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        deltas = [e.json() for e in events[3:8]]
        self.assertEqual(deltas, [{"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": p}}
                                  for p in lorem_pieces(5)])
        self.assertEqual(events[8].json(), {"type": "content_block_stop", "index": 0})
        self.assertEqual(events[9].json(), {"type": "message_delta",
                                            "delta": {"stop_reason": "end_turn",
                                                      "stop_sequence": None},
                                            "usage": {"output_tokens": 5}})
        self.assertEqual(events[10].json(), {"type": "message_stop"})
        rec = self.last_record(self.mock, MESSAGES)
        self.assertEqual((rec["outcome"], rec["deltas_written"]), ("completed", 5))

    def test_tool_use_non_stream(self):
        body = msg_body(tool_call=TOOL_CALL)
        body["tools"] = TOOLS_ANTHROPIC
        m = self.post(self.mock, MESSAGES, body, ANTHROPIC).json()
        self.assertEqual(m["stop_reason"], "tool_use")
        self.assertEqual(len(m["content"]), 1)
        block = m["content"][0]
        self.assertEqual(list(block), ["type", "id", "name", "input"])
        self.assertEqual(block["type"], "tool_use")
        self.assertTrue(block["id"].startswith("toolu_"), block)
        self.assertEqual((block["name"], block["input"]), ("get_weather", TOOL_CALL["arguments"]))
        # Without tools in the request the control does nothing.
        m = self.post(self.mock, MESSAGES, msg_body(tool_call=TOOL_CALL), ANTHROPIC).json()
        self.assertEqual((m["stop_reason"], m["content"][0]["type"]), ("end_turn", "text"))

    def test_tool_use_stream_after_text(self):
        body = msg_body(stream=True, tool_call=TOOL_CALL, content="Let me look.")
        body["tools"] = TOOLS_ANTHROPIC
        _, events = self.stream(self.mock, MESSAGES, body, ANTHROPIC)
        self.assertNamedEvents(events)
        names = [e.event for e in events]
        self.assertEqual(names[:3], ["message_start", "content_block_start", "ping"])
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        text = [e.json()["delta"]["text"] for e in events
                if e.event == "content_block_delta" and e.json()["index"] == 0]
        self.assertEqual(text, ["Let", " me", " look."])
        i = names.index("content_block_stop")
        self.assertEqual(events[i].json()["index"], 0)
        tool_start = events[i + 1].json()
        self.assertEqual(tool_start["type"], "content_block_start")
        self.assertEqual(tool_start["index"], 1)
        cb = tool_start["content_block"]
        self.assertEqual((cb["type"], cb["name"], cb["input"]), ("tool_use", "get_weather", {}))
        self.assertTrue(cb["id"].startswith("toolu_"))
        pieces = [e.json()["delta"] for e in events[i + 2:]
                  if e.event == "content_block_delta"]
        self.assertTrue(all(p["type"] == "input_json_delta" for p in pieces), pieces)
        parts = [p["partial_json"] for p in pieces]
        self.assertEqual(parts[0], "")  # the real API opens the input with an empty piece
        self.assertGreaterEqual(len([p for p in parts if p]), 3, parts)
        self.assertEqual("".join(parts), TOOL_ARGS)
        self.assertEqual(json.loads("".join(parts)), TOOL_CALL["arguments"])
        self.assertEqual(names[-3], "content_block_stop")
        self.assertEqual(events[-3].json()["index"], 1)
        delta = events[-2].json()
        self.assertEqual(delta["delta"]["stop_reason"], "tool_use")
        self.assertEqual(delta["usage"]["output_tokens"], 3 + len([p for p in parts if p]))

    def test_tool_call_header(self):
        body = msg_body()
        body["tools"] = TOOLS_ANTHROPIC
        h = dict(ANTHROPIC)
        h["x-mock-tool-call"] = json.dumps({"name": "lookup", "arguments": {"q": 1}})
        m = self.post(self.mock, MESSAGES, body, h).json()
        self.assertEqual(m["content"][0]["name"], "lookup")
        self.assertEqual(m["content"][0]["input"], {"q": 1})

    def test_cache_tokens(self):
        m = self.post(self.mock, MESSAGES, msg_body(cache_read=7, cache_creation=3), ANTHROPIC).json()
        self.assertEqual(m["usage"]["cache_read_input_tokens"], 7)
        self.assertEqual(m["usage"]["cache_creation_input_tokens"], 3)
        self.assertEqual(m["usage"]["input_tokens"], tokens_of("hello there"))
        _, events = self.stream(self.mock, MESSAGES,
                                msg_body(stream=True, cache_read=7, cache_creation=3), ANTHROPIC)
        u = events[0].json()["message"]["usage"]
        self.assertEqual((u["cache_read_input_tokens"], u["cache_creation_input_tokens"]), (7, 3))

    def test_forced_errors_in_anthropic_shape(self):
        h = dict(ANTHROPIC, **{"x-mock-status": "529"})
        self.assertAnthropicError(self.post(self.mock, MESSAGES, msg_body(), h), 529,
                                  "overloaded_error")
        r = self.post(self.mock, MESSAGES, msg_body(status=429, retry_after=7), ANTHROPIC)
        self.assertAnthropicError(r, 429, "rate_limit_error")
        self.assertEqual(r.header("retry-after"), "7")
        for status, etype in ((401, "authentication_error"), (403, "permission_error"),
                              (404, "not_found_error"), (413, "request_too_large"),
                              (500, "api_error"), (503, "api_error")):
            self.assertAnthropicError(self.post(self.mock, MESSAGES, msg_body(status=status),
                                                ANTHROPIC), status, etype)
        self.assertEqual(self.last_record(self.mock, MESSAGES)["outcome"], "error")

    def test_mid_stream_overloaded_error(self):
        _, events = self.stream(self.mock, MESSAGES,
                                msg_body(stream=True, stream_error_after=2), ANTHROPIC)
        self.assertNamedEvents(events)
        self.assertEqual([e.event for e in events],
                         ["message_start", "content_block_start", "ping",
                          "content_block_delta", "content_block_delta", "error"])
        self.assertEqual(events[-1].json(), {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})
        rec = self.last_record(self.mock, MESSAGES)
        self.assertEqual((rec["outcome"], rec["deltas_written"]), ("stream_error", 2))
        self.assertEqual(self.mock.stats()["errors"], 1)

    def test_count_tokens(self):
        body = {"model": "claude-test", "system": [{"type": "text", "text": "sys prompt"}],
                "messages": [{"role": "user", "content": "count these words please"}]}
        r = self.post(self.mock, COUNT, body, ANTHROPIC)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"input_tokens": tokens_of("sys prompt",
                                                              "count these words please")})
        self.assertEqual(self.post(self.mock, COUNT, body, {"x-api-key": "k"}).status, 400)


# ---------------------------------------------------------------------------------------
# OpenAI Responses API
# ---------------------------------------------------------------------------------------

RESPONSE_KEYS = ["id", "object", "created_at", "status", "background", "error",
                 "incomplete_details", "instructions", "max_output_tokens", "model", "output",
                 "parallel_tool_calls", "previous_response_id", "temperature", "text",
                 "tool_choice", "tools", "top_p", "truncation", "usage", "metadata"]


class ResponsesTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock("--tokens", "4")

    def test_non_stream_string_input(self):
        body = resp_body()
        body["instructions"] = "be brief"
        r = self.post(self.mock, RESPONSES, body)
        self.assertEqual(r.status, 200, r)
        o = r.json()
        self.assertEqual(list(o), RESPONSE_KEYS)
        self.assertTrue(o["id"].startswith("resp_"), o)
        self.assertEqual((o["object"], o["status"], o["model"], o["error"],
                          o["incomplete_details"], o["previous_response_id"]),
                         ("response", "completed", "gpt-test", None, None, None))
        self.assertEqual(len(o["output"]), 1)
        item = o["output"][0]
        self.assertTrue(item["id"].startswith("msg_"))
        self.assertEqual((item["type"], item["status"], item["role"]),
                         ("message", "completed", "assistant"))
        self.assertEqual(item["content"], [{"type": "output_text", "annotations": [],
                                            "logprobs": [], "text": lorem(4)}])
        p = tokens_of("be brief", "hello there")
        self.assertEqual(o["usage"], {"input_tokens": p,
                                      "input_tokens_details": {"cached_tokens": 0},
                                      "output_tokens": 4,
                                      "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": p + 4})

    def test_array_input_and_cache_tokens(self):
        inp = [{"role": "user", "content": "first"},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "second part"}]},
               {"type": "function_call_output", "call_id": "c1", "output": "tool said"}]
        o = self.post(self.mock, RESPONSES, resp_body(inp, cache_read=5)).json()
        p = tokens_of("first", "second part", "tool said")
        self.assertEqual(o["usage"]["input_tokens"], p + 5)
        self.assertEqual(o["usage"]["input_tokens_details"], {"cached_tokens": 5})

    def test_max_output_tokens_is_incomplete(self):
        body = resp_body()
        body["max_output_tokens"] = 2
        o = self.post(self.mock, RESPONSES, body).json()
        self.assertEqual(o["status"], "incomplete")
        self.assertEqual(o["incomplete_details"], {"reason": "max_output_tokens"})
        self.assertEqual(o["max_output_tokens"], 2)
        self.assertEqual(o["output"][0]["status"], "incomplete")
        self.assertEqual(o["output"][0]["content"][0]["text"], lorem(2))
        self.assertEqual(o["usage"]["output_tokens"], 2)
        body["stream"] = True
        _, events = self.stream(self.mock, RESPONSES, body)
        self.assertEqual(events[-1].event, "response.incomplete")
        self.assertEqual(events[-1].json()["response"]["status"], "incomplete")

    def test_previous_response_id_is_accepted_and_recorded(self):
        body = resp_body()
        body["previous_response_id"] = "resp_earlier"
        o = self.post(self.mock, RESPONSES, body).json()
        self.assertEqual((o["status"], o["previous_response_id"]), ("completed", "resp_earlier"))
        rec = self.last_record(self.mock, RESPONSES)
        self.assertEqual(json.loads(rec["body"])["previous_response_id"], "resp_earlier")

    def test_stream_event_sequence(self):
        head, events = self.stream(self.mock, RESPONSES, resp_body(stream=True))
        self.assertTrue(head.header("content-type").startswith("text/event-stream"))
        self.assertNamedEvents(events)
        self.assertEqual([e.event for e in events],
                         ["response.created", "response.in_progress",
                          "response.output_item.added", "response.content_part.added"] +
                         ["response.output_text.delta"] * 4 +
                         ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"])
        data = [e.json() for e in events]
        self.assertEqual([d["sequence_number"] for d in data], list(range(len(data))))
        created = data[0]["response"]
        self.assertEqual(list(created), RESPONSE_KEYS)
        self.assertEqual((created["status"], created["output"], created["usage"]),
                         ("in_progress", [], None))
        self.assertEqual(data[1]["response"]["status"], "in_progress")
        added = data[2]
        item_id = added["item"]["id"]
        self.assertEqual(added["output_index"], 0)
        self.assertEqual(added["item"], {"id": item_id, "type": "message", "status": "in_progress",
                                         "content": [], "role": "assistant"})
        self.assertEqual(data[3], {"type": "response.content_part.added", "sequence_number": 3,
                                   "item_id": item_id, "output_index": 0, "content_index": 0,
                                   "part": {"type": "output_text", "annotations": [],
                                            "logprobs": [], "text": ""}})
        for i, piece in enumerate(lorem_pieces(4)):
            self.assertEqual(data[4 + i], {"type": "response.output_text.delta",
                                           "sequence_number": 4 + i, "item_id": item_id,
                                           "output_index": 0, "content_index": 0,
                                           "delta": piece, "logprobs": []})
        self.assertEqual(data[8]["text"], lorem(4))
        self.assertEqual(data[9]["part"]["text"], lorem(4))
        self.assertEqual(data[10]["item"]["status"], "completed")
        self.assertEqual(data[10]["item"]["content"][0]["text"], lorem(4))
        final = data[11]["response"]
        self.assertEqual(final["id"], created["id"])
        self.assertEqual(final["status"], "completed")
        self.assertEqual(final["output"], [data[10]["item"]])
        self.assertEqual(final["usage"]["output_tokens"], 4)
        self.assertEqual(final["usage"]["input_tokens"], tokens_of("hello there"))

    def test_function_call(self):
        body = resp_body(tool_call=TOOL_CALL)
        body["tools"] = TOOLS_RESPONSES
        o = self.post(self.mock, RESPONSES, body).json()
        self.assertEqual(o["status"], "completed")
        self.assertEqual(len(o["output"]), 1)
        fc = o["output"][0]
        self.assertEqual(list(fc), ["id", "type", "status", "arguments", "call_id", "name"])
        self.assertEqual((fc["type"], fc["name"], fc["status"]),
                         ("function_call", "get_weather", "completed"))
        self.assertTrue(fc["call_id"].startswith("call_") and fc["id"].startswith("fc_"), fc)
        self.assertEqual(json.loads(fc["arguments"]), TOOL_CALL["arguments"])

        body["stream"] = True
        _, events = self.stream(self.mock, RESPONSES, body)
        self.assertNamedEvents(events)
        names = [e.event for e in events]
        n = names.count("response.function_call_arguments.delta")
        self.assertGreaterEqual(n, 3)
        self.assertEqual(names, ["response.created", "response.in_progress",
                                 "response.output_item.added"] +
                         ["response.function_call_arguments.delta"] * n +
                         ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"])
        data = [e.json() for e in events]
        added = data[2]["item"]
        self.assertEqual((added["type"], added["arguments"], added["status"]),
                         ("function_call", "", "in_progress"))
        args = "".join(d["delta"] for d in data[3:3 + n])
        self.assertEqual(args, TOOL_ARGS)
        self.assertTrue(all(d["item_id"] == added["id"] for d in data[3:3 + n + 1]))
        self.assertEqual(data[3 + n]["arguments"], TOOL_ARGS)
        self.assertEqual(data[-1]["response"]["output"][0]["arguments"], TOOL_ARGS)

    def test_mid_stream_error(self):
        _, events = self.stream(self.mock, RESPONSES, resp_body(stream=True, stream_error_after=1))
        names = [e.event for e in events]
        self.assertEqual(names[-2:], ["error", "response.failed"])
        self.assertEqual(names.count("response.output_text.delta"), 1)
        err = events[-2].json()
        self.assertEqual(sorted(err), ["code", "message", "param", "sequence_number", "type"])
        self.assertEqual(events[-1].json()["response"]["status"], "failed")

    def test_openai_error_shape(self):
        r = self.post(self.mock, RESPONSES, resp_body(status=503))
        self.assertOpenAIError(r, 503)


# ---------------------------------------------------------------------------------------
# Moderations
# ---------------------------------------------------------------------------------------

class ModerationsTest(MockTestCase):

    def assertResult(self, res, flagged_categories, score=0.99):
        self.assertEqual(list(res), ["flagged", "categories", "category_scores",
                                     "category_applied_input_types"])
        self.assertEqual(res["flagged"], bool(flagged_categories))
        self.assertEqual(sorted(k for k, v in res["categories"].items() if v),
                         sorted(flagged_categories))
        for k, v in res["category_scores"].items():
            if k in flagged_categories:
                self.assertEqual(v, score)
            else:
                self.assertLess(v, 0.01)
        self.assertEqual(list(res["categories"]), list(res["category_scores"]))

    def test_default_words(self):
        mock = self.start_mock()
        r = self.post(mock, MODERATIONS, {"model": "omni-moderation-latest",
                                          "input": "I will KILL it."})
        self.assertEqual(r.status, 200, r)
        o = r.json()
        self.assertEqual(list(o), ["id", "model", "results"])
        self.assertTrue(o["id"].startswith("modr-"))
        self.assertEqual(o["model"], "omni-moderation-latest")
        self.assertEqual(len(o["results"]), 1)
        self.assertEqual(list(o["results"][0]["categories"]), MOD_CATEGORIES)
        self.assertResult(o["results"][0], ["violence"])
        # One result per string; a word inside a longer word does not match.
        o = self.post(mock, MODERATIONS, {"input": ["a skill", "fine", "suicide attack"]}).json()
        self.assertEqual(len(o["results"]), 3)
        self.assertResult(o["results"][0], [])
        self.assertResult(o["results"][1], [])
        self.assertResult(o["results"][2], ["self-harm", "violence"])
        # Content parts make one result.
        o = self.post(mock, MODERATIONS, {"input": [{"type": "text", "text": "ok"},
                                                    {"type": "text", "text": "shoot"}]}).json()
        self.assertEqual(len(o["results"]), 1)
        self.assertResult(o["results"][0], ["violence"])
        self.assertEqual(self.post(mock, MODERATIONS, {"input": 5}).status, 400)

    def test_configured_words_and_score(self):
        mock = self.start_mock("--moderation-words",
                               "violence=stab, maim;self-harm=hurt;spam=buy now",
                               "--moderation-score", "0.6")
        o = self.post(mock, MODERATIONS, {"input": ["Buy now and MAIM", "kill", "hurt"]}).json()
        self.assertEqual(list(o["results"][0]["categories"]), MOD_CATEGORIES + ["spam"])
        self.assertResult(o["results"][0], ["spam", "violence"], 0.6)
        self.assertResult(o["results"][1], [], 0.6)  # the built-in words are replaced
        self.assertResult(o["results"][2], ["self-harm"], 0.6)
        o = self.post(mock, MODERATIONS, {"input": "stab", "mock": {"moderation_score": 0.3}}).json()
        self.assertResult(o["results"][0], ["violence"], 0.3)

    def test_status_ttft_and_hang(self):
        mock = self.start_mock()
        r = http_request(mock.port, "POST", MODERATIONS, headers={"x-mock-status": "500"},
                         json_body={"input": "x"})
        self.assertOpenAIError(r, 500)
        r = self.post(mock, MODERATIONS, {"input": "x", "mock": {"ttft_ms": 50}})
        self.assertEqual(r.status, 200)
        with HTTPConn(mock.port) as c:
            c.send_request("POST", MODERATIONS, headers={"x-mock-hang": "1"},
                           json_body={"input": "x"})
            mock.wait_stats(lambda s: s["running"] == 1, "the moderation request to hang")
        mock.wait_stats(lambda s: s["client_disconnects"] == 1 and s["running"] == 0,
                        "the hung moderation request to be counted as a client disconnect")


# ---------------------------------------------------------------------------------------
# Output controls, on every protocol
# ---------------------------------------------------------------------------------------

def text_deltas(path, events):
    """The text deltas of a stream, whatever its protocol."""
    out = []
    for e in events:
        if path == CHAT:
            if e.data and e.data != "[DONE]":
                ch = e.json().get("choices") or []
                if ch and ch[0]["delta"].get("content"):
                    out.append(ch[0]["delta"]["content"])
        elif path == MESSAGES:
            if e.event == "content_block_delta" and e.json()["delta"]["type"] == "text_delta":
                out.append(e.json()["delta"]["text"])
        elif e.event == "response.output_text.delta":
            out.append(e.json()["delta"])
    return out


def reply_text(path, obj):
    if path == CHAT:
        return obj["choices"][0]["message"]["content"]
    if path == MESSAGES:
        return obj["content"][0]["text"]
    return obj["output"][0]["content"][0]["text"]


def completion_tokens(path, obj):
    if path == CHAT:
        return obj["usage"]["completion_tokens"]
    return obj["usage"]["output_tokens"]


class OutputControlsTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()

    def body(self, path, stream, **mock):
        if path == CHAT:
            b = chat_body(stream=stream, **mock)
            b["stream_options"] = {"include_usage": True}
            return b
        if path == MESSAGES:
            return msg_body(stream=stream, **mock)
        return resp_body(stream=stream, **mock)

    def usage_of_stream(self, path, events):
        if path == CHAT:
            return [e.json()["usage"]["completion_tokens"] for e in events if e.is_usage_only()][0]
        if path == MESSAGES:
            return [e.json()["usage"]["output_tokens"] for e in events
                    if e.event == "message_delta"][0]
        return events[-1].json()["response"]["usage"]["output_tokens"]

    def check(self, mock_ctl, deltas, text=None):
        text = "".join(deltas) if text is None else text
        for path in (CHAT, MESSAGES, RESPONSES):
            with self.subTest(path=path):
                h = ANTHROPIC if path == MESSAGES else None
                o = self.post(self.mock, path, self.body(path, False, **mock_ctl), h).json()
                self.assertEqual(reply_text(path, o), text)
                self.assertEqual(completion_tokens(path, o), len(deltas))
                _, events = self.stream(self.mock, path, self.body(path, True, **mock_ctl), h)
                self.assertEqual(text_deltas(path, events), [d for d in deltas if d])
                self.assertEqual(self.usage_of_stream(path, events), len(deltas))

    def test_content(self):
        self.check({"content": "The quick  brown fox."},
                   ["The", " quick", " ", " brown", " fox."])

    def test_chunks_split_a_card_number(self):
        self.check({"chunks": ["card 4111 1111", " 1111 1111 ok"]},
                   ["card 4111 1111", " 1111 1111 ok"])

    def test_repeat(self):
        self.check({"repeat": "loop! ", "times": 6}, ["loop! "] * 6)

    def test_content_header(self):
        r = http_request(self.mock.port, "POST", CHAT, headers={"x-mock-content": "from header"},
                         json_body=chat_body())
        self.assertEqual(reply_text(CHAT, r.json()), "from header")

    def test_body_wins_over_flag(self):
        mock = self.start_mock("--content", "from flag")
        self.assertEqual(reply_text(CHAT, self.post(mock, CHAT, chat_body()).json()), "from flag")
        o = self.post(mock, CHAT, chat_body(chunks=["a", "b"])).json()
        self.assertEqual(reply_text(CHAT, o), "ab")

    def test_chat_tool_calls(self):
        body = chat_body(tool_call=[TOOL_CALL, {"name": "second", "arguments": "{\"x\":1}"}])
        body["tools"] = TOOLS_OPENAI
        o = self.post(self.mock, CHAT, body).json()
        ch = o["choices"][0]
        self.assertEqual(ch["finish_reason"], "tool_calls")
        self.assertIsNone(ch["message"]["content"])
        calls = ch["message"]["tool_calls"]
        self.assertEqual([(c["type"], c["function"]["name"]) for c in calls],
                         [("function", "get_weather"), ("function", "second")])
        self.assertEqual(json.loads(calls[0]["function"]["arguments"]), TOOL_CALL["arguments"])
        self.assertEqual(calls[1]["function"]["arguments"], "{\"x\":1}")
        self.assertTrue(calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"])

        body["stream"] = True
        _, events = self.stream(self.mock, CHAT, body)
        self.assertTrue(events[-1].is_done)
        chunks = [e.json()["choices"][0] for e in events[:-1]]
        self.assertEqual(chunks[-1]["finish_reason"], "tool_calls")
        tcs = [c["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["delta"]]
        firsts = [t for t in tcs if "id" in t]
        self.assertEqual([(t["index"], t["type"], t["function"]["name"], t["function"]["arguments"])
                          for t in firsts],
                         [(0, "function", "get_weather", ""), (1, "function", "second", "")])
        self.assertTrue(all(t["id"].startswith("call_") for t in firsts))
        self.assertNotEqual(firsts[0]["id"], firsts[1]["id"])
        for idx, call in enumerate(calls):
            parts = [t["function"]["arguments"] for t in tcs if t["index"] == idx and "id" not in t]
            self.assertGreaterEqual(len(parts), 3)
            self.assertEqual("".join(parts), call["function"]["arguments"])

    def test_chat_stop_and_legacy_completions(self):
        body = chat_body(content="one two three four")
        body["stop"] = "three"
        o = self.post(self.mock, CHAT, body).json()
        self.assertEqual(reply_text(CHAT, o), "one two")
        self.assertEqual((o["choices"][0]["finish_reason"], o["usage"]["completion_tokens"]),
                         ("stop", 2))
        body = {"model": "m", "prompt": "abc", "stream": True, "mock": {"chunks": ["x", "yz"]}}
        _, events = self.stream(self.mock, "/v1/completions", body)
        self.assertEqual([e.content() for e in events if e.content()], ["x", "yz"])

    def test_chat_cache_read_tokens(self):
        o = self.post(self.mock, CHAT, chat_body(cache_read=4)).json()
        self.assertEqual(o["usage"]["prompt_tokens_details"], {"cached_tokens": 4})
        self.assertEqual(o["usage"]["prompt_tokens"], tokens_of("hello") + 4)
        self.assertNotIn("prompt_tokens_details", self.post(self.mock, CHAT, chat_body()).json()["usage"])

    def test_chat_mid_stream_error(self):
        _, events = self.stream(self.mock, CHAT, chat_body(stream=True, stream_error_after=2))
        self.assertEqual(len([e for e in events if e.content()]), 2)
        self.assertFalse(events[-1].is_done)
        err = events[-1].json()
        self.assertTrue(harness.is_openai_error(events[-1].data))
        self.assertEqual(err["error"]["code"], "stream_error")


# ---------------------------------------------------------------------------------------
# Disconnect accounting
# ---------------------------------------------------------------------------------------

class DisconnectTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()

    def read_then_close(self, path, body, k, headers=None):
        """Read k text deltas of a stream, then close the connection."""
        c = HTTPConn(self.mock.port)
        c.send_request("POST", path, headers, json_body=body)
        self.assertEqual(c.read_head().status, 200)
        got = 0
        for e in c.iter_events():
            if text_deltas(path, [e]):
                got += 1
                if got == k:
                    break
        c.close()

    def test_stream_disconnect_counts_written_deltas(self):
        # With 300 ms between deltas, the close after the 3rd arrives long before the 4th is
        # written: the mock counts 3 (4 would still be "within one event").
        for path in (CHAT, MESSAGES, RESPONSES):
            with self.subTest(path=path):
                self.mock.clear()
                body = {CHAT: chat_body, MESSAGES: msg_body, RESPONSES: resp_body}[path](
                    stream=True, tokens=40, itl_ms=300)
                self.read_then_close(path, body, 3, ANTHROPIC if path == MESSAGES else None)
                s = self.mock.wait_stats(lambda s: s["client_disconnects"] == 1,
                                         "the mock to see the client leave")
                rec = self.last_record(self.mock, path)
                self.assertEqual(rec["outcome"], "client_disconnect")
                self.assertTrue(rec["client_disconnected"])
                self.assertIn(rec["deltas_written"], (3, 4), rec)
                self.assertEqual(s["last_disconnect_deltas"], rec["deltas_written"])
                self.assertEqual((s["cancelled"], s["completed"]), (1, 0))

    def test_delayed_streams_on_one_connection_all_complete(self):
        # Each delta is written to the socket as it is made; that write must never be
        # taken for a client that left (a curl client would then re-send the request).
        with HTTPConn(self.mock.port) as c:
            for path in (CHAT, MESSAGES, RESPONSES) * 8:
                body = {CHAT: chat_body, MESSAGES: msg_body, RESPONSES: resp_body}[path](
                    stream=True, tokens=3, itl_ms=1)
                c.send_request("POST", path, ANTHROPIC if path == MESSAGES else None,
                               json_body=body)
                r = c.read_response()
                self.assertEqual((r.status, r.complete), (200, True), r)
                self.assertEqual(len(text_deltas(path, harness.parse_sse(r.body))), 3)
        s = self.mock.stats()
        self.assertEqual((s["completed"], s["client_disconnects"]), (24, 0), s)
        self.assertEqual({q["outcome"] for q in self.mock.requests()}, {"completed"})

    def test_disconnect_before_first_byte(self):
        with HTTPConn(self.mock.port) as c:
            c.send_request("POST", CHAT, json_body=chat_body(ttft_ms=60000))
            self.mock.wait_stats(lambda s: s["running"] == 1, "the request to start")
        self.mock.wait_stats(lambda s: s["client_disconnects"] == 1, "the client to be seen leaving")
        rec = self.last_record(self.mock, CHAT)
        self.assertEqual((rec["outcome"], rec["client_disconnected"], rec["deltas_written"]),
                         ("client_disconnect", True, 0))

    def test_complete_streams_are_not_disconnects(self):
        self.stream(self.mock, CHAT, chat_body(stream=True, tokens=5, itl_ms=1))
        rec = self.last_record(self.mock, CHAT)
        self.assertEqual((rec["outcome"], rec["client_disconnected"], rec["deltas_written"]),
                         ("completed", False, 5))
        s = self.mock.stats()
        self.assertEqual((s["client_disconnects"], s["last_disconnect_deltas"]), (0, -1))
        # Records keep their own sequence numbers.
        recs = self.mock.requests()
        self.assertEqual([r["seq"] for r in recs], sorted(r["seq"] for r in recs))


# ---------------------------------------------------------------------------------------
# Fault modes
# ---------------------------------------------------------------------------------------

def raw_exchange(port, body, headers=None, path=CHAT, limit=None, timeout=harness.DEADLINE):
    """Send one request on a raw socket; return (bytes received, how it ended: "eof",
    "reset" or "limit")."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = json.dumps(body).encode()
    head = "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path
    for k, v in (headers or {}).items():
        head += "%s: %s\r\n" % (k, v)
    head += "Content-Length: %d\r\n\r\n" % len(data)
    s.sendall(head.encode() + data)
    got = b""
    try:
        while limit is None or len(got) < limit:
            piece = s.recv(65536)
            if not piece:
                return got, "eof"
            got += piece
        return got, "limit"
    except ConnectionResetError:
        return got, "reset"
    finally:
        s.close()


class FaultTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.mock = self.start_mock()

    def test_reset_mid_stream(self):
        c = HTTPConn(self.mock.port)
        c.send_request("POST", CHAT, json_body=chat_body(stream=True, tokens=10, itl_ms=20,
                                                         fault="reset", fault_after=3))
        self.assertEqual(c.read_head().status, 200)
        got = []
        with self.assertRaises(ConnectionResetError):
            for e in c.iter_events():
                if e.content():
                    got.append(e.content())
        c.close()
        self.assertEqual(got, lorem_pieces(3))
        rec = self.last_record(self.mock, CHAT)
        self.assertEqual((rec["outcome"], rec["deltas_written"]), ("fault", 3))
        self.assertEqual(self.mock.stats()["faults"], 1)

    def test_reset_without_a_reply(self):
        got, how = raw_exchange(self.mock.port, chat_body(fault="reset"))
        self.assertEqual((got, how), (b"", "reset"))
        got, how = raw_exchange(self.mock.port, msg_body(stream=True), path=MESSAGES,
                                headers=dict(ANTHROPIC, **{"x-mock-fault": "reset"}))
        self.assertEqual(how, "reset")
        self.assertTrue(got.startswith(b"HTTP/1.1 200"), got)
        self.assertNotIn(b"event:", got)  # fault_after 0: the head only

    def test_stall_after_headers(self):
        c = HTTPConn(self.mock.port, timeout=0.5)
        c.send_request("POST", CHAT, json_body=chat_body(stream=True, fault="stall"))
        head = c.read_head()
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-type"), "text/event-stream")
        with self.assertRaises(socket.timeout):
            c.reader.fill()  # nothing after the head, not even the role chunk
        self.assertEqual(c.reader.buf, b"")
        self.mock.wait_stats(lambda s: s["running"] == 1, "the stalled request to hold its slot")
        c.close()
        self.mock.wait_stats(lambda s: s["client_disconnects"] == 1 and s["running"] == 0,
                             "the client's leaving to end the stall")

    def test_stall_after_deltas_and_non_stream(self):
        c = HTTPConn(self.mock.port, timeout=0.5)
        c.send_request("POST", MESSAGES, ANTHROPIC,
                       json_body=msg_body(stream=True, fault="stall", fault_after=2))
        self.assertEqual(c.read_head().status, 200)
        names = []
        with self.assertRaises(socket.timeout):
            for e in c.iter_events():
                names.append(e.event)
        self.assertEqual(names, ["message_start", "content_block_start", "ping",
                                 "content_block_delta", "content_block_delta"])
        c.close()
        c = HTTPConn(self.mock.port, timeout=0.5)
        c.send_request("POST", CHAT, json_body=chat_body(fault="stall"))
        head = c.read_head()
        self.assertEqual((head.status, head.header("content-type")), (200, "application/json"))
        with self.assertRaises(socket.timeout):
            c.reader.fill()
        c.close()
        self.mock.wait_stats(lambda s: s["client_disconnects"] == 2, "both stalls to end")

    def test_garbage(self):
        got, how = raw_exchange(self.mock.port, chat_body(fault="garbage"))
        self.assertEqual(how, "eof")
        self.assertEqual(len(got), 256)
        self.assertFalse(got.startswith(b"HTTP"), got[:40])
        self.assertNotIn(b"\n", got)
        self.assertEqual(self.last_record(self.mock, CHAT)["outcome"], "fault")

    def test_junk_sse(self):
        for mock_ctl, size in (({"fault": "junk_sse"}, 4096),
                               ({"fault": "junk_sse", "fault_bytes": 100000}, 100000)):
            r = self.post(self.mock, CHAT, chat_body(stream=True, **mock_ctl))
            self.assertEqual(r.status, 200)
            self.assertEqual(r.header("content-type"), "text/event-stream")
            self.assertTrue(r.complete)
            self.assertEqual(len(r.body), size)
            self.assertNotIn(b"\n", r.body)
            self.assertNotIn(b"\r", r.body)
            self.assertIn(b"\0", r.body)

    def test_big_event(self):
        head, events = self.stream(self.mock, CHAT, chat_body(stream=True, fault="big_event"))
        content = [e for e in events if e.content()]
        self.assertEqual(len(content), 1)
        self.assertEqual(content[0].content(), "x" * (10 * MiB))
        self.assertGreater(len(content[0].raw), 10 * MiB)
        self.assertTrue(events[-1].is_done)
        _, events = self.stream(self.mock, MESSAGES,
                                msg_body(stream=True, fault="big_event", fault_bytes=70000),
                                ANTHROPIC)
        self.assertEqual([len(t) for t in text_deltas(MESSAGES, events)], [70000])

    def test_endless_headers(self):
        got, how = raw_exchange(self.mock.port, chat_body(fault="endless_headers"), limit=MiB)
        self.assertEqual(how, "limit")
        self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got[:40])
        self.assertNotIn(b"\r\n\r\n", got)
        self.assertGreater(got.count(b"\r\nX-Mock-Filler-"), 1000)
        self.mock.wait_stats(lambda s: s["client_disconnects"] == 1 and s["active"] == 0,
                             "the mock to stop writing headers once the client left")

    def test_fault_flag_applies_to_every_request(self):
        mock = self.start_mock("--fault", "garbage")
        for path, body, h in ((CHAT, chat_body(), None), (MESSAGES, msg_body(), ANTHROPIC),
                              (RESPONSES, resp_body(), None), (MODERATIONS, {"input": "x"}, None)):
            got, how = raw_exchange(mock.port, body, h, path=path)
            self.assertEqual((len(got), how), (256, "eof"), path)
        # The per-request control turns it off.
        r = http_request(mock.port, "POST", CHAT, headers={"x-mock-fault": "none"},
                         json_body=chat_body())
        self.assertEqual(r.status, 200)
        self.assertEqual(mock.stats()["faults"], 4)

    def test_close_on_accept(self):
        mock = self.start_mock("--close-on-accept")
        for _ in range(3):
            try:
                got, how = raw_exchange(mock.port, chat_body())
            except (BrokenPipeError, ConnectionResetError):
                got, how = b"", "reset"
            self.assertEqual(got, b"")
            self.assertIn(how, ("eof", "reset"))


if __name__ == "__main__":
    harness.main()
