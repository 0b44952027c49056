/* test_provider_responses.c — the OpenAI Responses codec: the stateless subset translated, the rest
 * refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "provider_harness.h"

static const struct proto_codec *resp(void)
{
	return proto_codec(PROTO_RESPONSES);
}

static const struct proto_codec *chat(void)
{
	return proto_codec(PROTO_CHAT);
}

static json_t *to_chat(const char *body, struct proto_error *err)
{
	json_t *b = load_json(body);
	json_t *out = resp()->request_to_chat(b, err);

	json_decref(b);
	return out;
}

/* ================================================================== Responses request → pivot */

static void test_request_string_input(void **state)
{
	struct proto_error err = {0};
	json_t *out =
	        to_chat("{\"model\":\"gpt-4.1\",\"input\":\"Tell me a joke\",\"instructions\":"
	                "\"Talk like a pirate.\",\"max_output_tokens\":200,\"temperature\":0.7,"
	                "\"store\":false,\"stream\":true}",
	                &err);

	assert_non_null(out);
	assert_json_equal(out, "{\"messages\":[{\"role\":\"system\",\"content\":\"Talk like a "
	                       "pirate.\"},{\"role\":\"user\",\"content\":\"Tell me a joke\"}],"
	                       "\"model\":\"gpt-4.1\",\"temperature\":0.7,\"max_tokens\":200,"
	                       "\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
	json_decref(out);
}

static void test_request_items(void **state)
{
	struct proto_error err = {0};
	json_t *out = to_chat(
	        "{\"model\":\"m\",\"input\":["
	        "{\"role\":\"developer\",\"content\":\"Use tools.\"},"
	        "{\"type\":\"message\",\"role\":\"user\",\"content\":[{\"type\":\"input_text\","
	        "\"text\":\"What is in this image?\"},{\"type\":\"input_image\",\"image_url\":"
	        "\"https://x/cat.jpg\",\"detail\":\"low\"}]},"
	        "{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_"
	        "text\","
	        "\"text\":\"A cat.\",\"annotations\":[]}]},"
	        "{\"type\":\"reasoning\",\"id\":\"rs_1\",\"summary\":[],\"encrypted_content\":"
	        "\"x\"},"
	        "{\"type\":\"function_call\",\"call_id\":\"call_1\",\"name\":\"get_weather\","
	        "\"arguments\":\"{\\\"city\\\":\\\"Oslo\\\"}\"},"
	        "{\"type\":\"function_call\",\"call_id\":\"call_2\",\"name\":\"get_time\","
	        "\"arguments\":\"{}\"},"
	        "{\"type\":\"function_call_output\",\"call_id\":\"call_1\",\"output\":\"-3C\"},"
	        "{\"type\":\"function_call_output\",\"call_id\":\"call_2\",\"output\":[{\"type\":"
	        "\"input_text\",\"text\":\"09:00\"}]},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"a\"},{"
	        "\"type\":"
	        "\"input_text\",\"text\":\"b\"}]}],"
	        "\"tools\":[{\"type\":\"function\",\"name\":\"get_weather\",\"description\":\"W\","
	        "\"parameters\":{\"type\":\"object\"},\"strict\":true}],"
	        "\"tool_choice\":{\"type\":\"function\",\"name\":\"get_weather\"},"
	        "\"parallel_tool_calls\":false,\"reasoning\":{\"effort\":\"low\"},"
	        "\"text\":{\"format\":{\"type\":\"json_schema\",\"name\":\"w\",\"schema\":{"
	        "\"type\":"
	        "\"object\"},\"strict\":true}}}",
	        &err);

	assert_non_null(out);
	assert_json_equal(
	        out,
	        "{\"messages\":["
	        "{\"role\":\"developer\",\"content\":\"Use tools.\"},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"What is in this "
	        "image?\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"https://x/cat.jpg\","
	        "\"detail\":\"low\"}}]},"
	        "{\"role\":\"assistant\",\"content\":\"A cat.\",\"tool_calls\":[{\"id\":\"call_1\","
	        "\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":"
	        "\"{\\\"city\\\":\\\"Oslo\\\"}\"}},{\"id\":\"call_2\",\"type\":\"function\","
	        "\"function\":{\"name\":\"get_time\",\"arguments\":\"{}\"}}]},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"-3C\"},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"call_2\",\"content\":\"09:00\"},"
	        "{\"role\":\"user\",\"content\":\"a\\nb\"}],"
	        "\"model\":\"m\",\"parallel_tool_calls\":false,\"reasoning_effort\":\"low\","
	        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
	        "\"description\":\"W\",\"parameters\":{\"type\":\"object\"},\"strict\":true}}],"
	        "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}},"
	        "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"w\","
	        "\"schema\":{\"type\":\"object\"},\"strict\":true}}}");
	json_decref(out);
}

static void test_request_refused(void **state)
{
	static const struct {
		const char *body, *code, *message;
	} cases[] = {
	        {"{\"input\":\"x\",\"previous_response_id\":\"resp_1\"}", "unsupported_on_instance",
	         "previous_response_id"},
	        {"{\"input\":\"x\",\"conversation\":\"conv_1\"}", "unsupported_on_instance",
	         "conversation"},
	        {"{\"input\":\"x\",\"prompt\":{\"id\":\"pmpt_1\"}}", "unsupported_on_instance",
	         "prompt"},
	        {"{\"input\":\"x\",\"background\":true}", "unsupported_on_instance", "background"},
	        {"{\"input\":\"x\",\"store\":true}", "unsupported_on_instance", "store"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"web_search\"}]}",
	         "unsupported_on_instance", "web_search"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"web_search_preview\"}]}",
	         "unsupported_on_instance", "web_search_preview"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"file_search\",\"vector_store_ids\":["
	         "\"v\"]}]}",
	         "unsupported_on_instance", "file_search"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"computer_use_preview\"}]}",
	         "unsupported_on_instance", "computer_use_preview"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"code_interpreter\",\"container\":{}}]}",
	         "unsupported_on_instance", "code_interpreter"},
	        {"{\"input\":\"x\",\"tools\":[{\"type\":\"mcp\",\"server_label\":\"s\"}]}",
	         "unsupported_on_instance", "mcp"},
	        {"{\"input\":[{\"type\":\"item_reference\",\"id\":\"msg_1\"}]}",
	         "unsupported_on_instance", "item_reference"},
	        {"{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_file\",\"file_id\":"
	         "\"f\"}]}]}",
	         "unsupported_on_instance", "input_file"},
	        {"{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_image\",\"file_"
	         "id\":"
	         "\"f\"}]}]}",
	         "unsupported_on_instance", "file_id"},
	        {"{\"input\":\"x\",\"tool_choice\":{\"type\":\"web_search_preview\"}}",
	         "unsupported_on_instance", "tool_choice"},
	        {"{\"input\":[{\"type\":\"web_search_call\",\"id\":\"ws_1\"}]}",
	         "unsupported_on_instance", "web_search_call"},
	        {"{\"model\":\"m\"}", "invalid_request", "input"},
	        {"{\"input\":5}", "invalid_request", "input"},
	        {"{\"input\":\"x\",\"max_output_tokens\":-1}", "invalid_request",
	         "max_output_tokens"},
	        {"{\"input\":[{\"role\":\"tool\",\"content\":\"x\"}]}", "invalid_request", "role"},
	        {"{\"input\":[{\"type\":\"function_call\",\"name\":\"f\"}]}", "invalid_request",
	         "call_id"},
	        {"{\"input\":[7]}", "invalid_request", "input[0]"},
	        {"[]", "invalid_request", "object"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct proto_error err = {0};
		json_t *out = to_chat(cases[i].body, &err);
		if (out != NULL)
			fail_msg("case %zu was accepted", i);
		assert_int_equal(err.status, 400);
		assert_string_equal(err.type, "invalid_request_error");
		assert_string_equal(err.code, cases[i].code);
		if (strstr(err.message, cases[i].message) == NULL)
			fail_msg("case %zu: \"%s\" does not say %s", i, err.message,
			         cases[i].message);
	}
	/* store: false and a reasoning item sent back are fine: nothing needs state */
	struct proto_error err = {0};
	json_t *ok = to_chat(
	        "{\"input\":[{\"type\":\"reasoning\",\"summary\":[]}],\"store\":false}", &err);
	assert_non_null(ok);
	json_decref(ok);
}

/* ================================================================== pivot → Responses request */

static void test_request_from_chat(void **state)
{
	struct proto_error err = {0};
	struct config_instance in = {.options = load_json("{\"service_tier\":\"flex\"}")};
	json_t *c = load_json(
	        "{\"model\":\"x\",\"max_tokens\":50,\"stream\":true,\"messages\":["
	        "{\"role\":\"system\",\"content\":\"S\"},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"look\"},{\"type\":"
	        "\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,AA\"}}]},"
	        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":"
	        "\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"done\"}],"
	        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{}}}"
	        "],"
	        "\"tool_choice\":\"auto\",\"response_format\":{\"type\":\"json_object\"}}");
	json_t *out = resp()->request_from_chat(c, &in, "gpt-4.1", &err);

	assert_non_null(out);
	assert_json_equal(
	        out,
	        "{\"input\":[{\"type\":\"message\",\"role\":\"system\",\"content\":\"S\"},"
	        "{\"type\":\"message\",\"role\":\"user\",\"content\":[{\"type\":\"input_text\","
	        "\"text\":\"look\"},{\"type\":\"input_image\",\"image_url\":\"data:image/"
	        "png;base64,"
	        "AA\"}]},{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":\"f\","
	        "\"arguments\":\"{}\"},{\"type\":\"function_call_output\",\"call_id\":\"c1\","
	        "\"output\":\"done\"}],\"model\":\"gpt-4.1\",\"max_output_tokens\":50,\"stream\":"
	        "true,"
	        "\"tools\":[{\"type\":\"function\",\"name\":\"f\",\"parameters\":{}}],"
	        "\"tool_choice\":\"auto\",\"text\":{\"format\":{\"type\":\"json_object\"}},"
	        "\"store\":false,\"service_tier\":\"flex\"}");
	json_decref(out);
	json_decref(c);
	/* stop has no Responses equivalent */
	c = load_json("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stop\":\"\\n\"}");
	assert_null(resp()->request_from_chat(c, NULL, "m", &err));
	assert_string_equal(err.code, "unsupported_on_instance");
	json_decref(c);
	json_decref(in.options);
}

/* ================================================================== pivot answer → Response */

static void test_response_from_chat(void **state)
{
	json_t *req =
	        load_json("{\"model\":\"qwen\",\"input\":\"x\",\"instructions\":\"Be nice\","
	                  "\"max_output_tokens\":64,\"tools\":[{\"type\":\"function\",\"name\":"
	                  "\"f\"}],\"metadata\":{\"k\":\"v\"}}");
	struct proto_reply_ctx ctx = {
	        .model = "qwen", .request_id = "abc", .created = 1234, .request = req};
	json_t *c = load_json(
	        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":99,\"model\":"
	        "\"Qwen/Qwen2.5\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
	        "\"content\":\"Calling "
	        "f.\",\"tool_calls\":[{\"id\":\"call_7\",\"type\":\"function\","
	        "\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]},\"finish_"
	        "reason\":"
	        "\"tool_calls\"}],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":10,"
	        "\"total_tokens\":60,\"prompt_tokens_details\":{\"cached_tokens\":20},"
	        "\"completion_tokens_details\":{\"reasoning_tokens\":4}}}");
	json_t *r = resp()->response_from_chat(c, &ctx);

	assert_non_null(r);
	assert_json_equal(
	        r,
	        "{\"id\":\"resp_abc\",\"object\":\"response\",\"created_at\":1234,\"status\":"
	        "\"completed\",\"error\":null,\"incomplete_details\":null,\"instructions\":\"Be "
	        "nice\",\"max_output_tokens\":64,\"model\":\"qwen\",\"output\":[{\"id\":"
	        "\"msg_abc\",\"type\":\"message\",\"status\":\"completed\",\"content\":[{\"type\":"
	        "\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"Calling f.\"}],"
	        "\"role\":\"assistant\"},{\"id\":\"fc_abc_0\",\"type\":\"function_call\","
	        "\"status\":\"completed\",\"arguments\":\"{\\\"a\\\":1}\",\"call_id\":\"call_7\","
	        "\"name\":\"f\"}],\"parallel_tool_calls\":true,\"previous_response_id\":null,"
	        "\"reasoning\":{\"effort\":null,\"summary\":null},\"store\":false,"
	        "\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":"
	        "\"auto\",\"tools\":[{\"type\":\"function\",\"name\":\"f\"}],\"top_p\":1.0,"
	        "\"truncation\":\"disabled\",\"usage\":{\"input_tokens\":50,"
	        "\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":10,"
	        "\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":60},"
	        "\"user\":null,\"metadata\":{\"k\":\"v\"}}");
	json_decref(r);

	/* length → incomplete, max_output_tokens; tool calls only → no message item */
	json_object_set_new(at(c, "choices.0"), "finish_reason", json_string("length"));
	json_object_set_new(at(c, "choices.0.message"), "content", json_null());
	r = resp()->response_from_chat(c, &ctx);
	assert_str_at(r, "status", "incomplete");
	assert_str_at(r, "incomplete_details.reason", "max_output_tokens");
	assert_int_equal(json_array_size(at(r, "output")), 1);
	assert_str_at(r, "output.0.type", "function_call");
	json_decref(r);
	json_object_set_new(at(c, "choices.0"), "finish_reason", json_string("content_filter"));
	r = resp()->response_from_chat(c, &ctx);
	assert_str_at(r, "incomplete_details.reason", "content_filter");
	json_decref(r);
	json_decref(c);
	json_decref(req);
}

/* ================================================================== Response → pivot answer */

static void test_response_to_chat(void **state)
{
	json_t *body = load_json_file("responses_body.json");
	json_t *c = resp()->response_to_chat(body, NULL);
	struct record_usage u;

	assert_non_null(c);
	assert_str_at(c, "choices.0.message.content",
	              "Hi there! How can Ihelp you today — 今日は?");
	assert_str_at(c, "choices.0.message.reasoning_content", "Thinking briefly.");
	assert_str_at(c, "choices.0.message.tool_calls.0.id", "call_unLAR8MvFNptuiZK6K6HCy5k");
	assert_str_at(c, "choices.0.message.tool_calls.0.function.arguments",
	              "{\"location\":\"Paris, France\"}");
	assert_str_at(c, "choices.0.finish_reason", "tool_calls");
	assert_int_at(c, "created", 1741290958);
	assert_true(proto_usage_from_chat(c, &u));
	assert_int_equal(u.prompt, 37);
	assert_int_equal(u.cached, 16);
	assert_int_equal(u.completion, 11);
	json_decref(c);
	/* a failed response, or something else, is not an answer */
	json_object_set_new(body, "status", json_string("failed"));
	assert_null(resp()->response_to_chat(body, NULL));
	json_decref(body);
	body = load_json("{\"object\":\"list\",\"output\":[]}");
	assert_null(resp()->response_to_chat(body, NULL));
	json_decref(body);
}

/* ================================================================== pivot stream → Responses */

static void encode_chat_stream(const char *file, const struct proto_reply_ctx *ctx, struct run *r)
{
	size_t len;
	char *s = read_data(file, &len);

	run_every_split(r, chat(), resp(), ctx, s, len);
	assert_true(r->ok);
	assert_false(r->encode_failed);
	free(s);
}

static void assert_numbered(const struct client_events *ev)
{
	for (int i = 0; i < ev->n; i++) {
		/* every event: the event line names its type; sequence_number counts from 0 */
		assert_str_at(ev->data[i], "type", ev->names[i]);
		assert_int_at(ev->data[i], "sequence_number", i);
	}
}

static void test_encode_tools(void **state)
{
	json_t *req = load_json("{\"model\":\"qwen\",\"input\":\"x\",\"tools\":[]}");
	struct proto_reply_ctx ctx = {
	        .created = HARNESS_CREATED, .request_id = "r9", .model = "qwen", .request = req};
	struct run r, back;
	struct client_events ev;
	struct pivot_summary s;
	static const char *const want[] = {
	        "response.created",
	        "response.in_progress",
	        "response.output_item.added",
	        "response.content_part.added",
	        "response.output_text.delta",
	        "response.output_text.delta",
	        "response.output_text.done",
	        "response.content_part.done",
	        "response.output_item.done",
	        "response.output_item.added",
	        "response.function_call_arguments.delta",
	        "response.function_call_arguments.delta",
	        "response.function_call_arguments.delta",
	        "response.function_call_arguments.done",
	        "response.output_item.done",
	        "response.output_item.added",
	        "response.function_call_arguments.delta",
	        "response.function_call_arguments.done",
	        "response.output_item.done",
	        "response.completed",
	};

	encode_chat_stream("chat_tools.sse", &ctx, &r);
	parse_client(r.out, &ev);
	assert_int_equal(ev.n, sizeof(want) / sizeof(want[0]));
	for (int i = 0; i < ev.n; i++)
		assert_string_equal(ev.names[i], want[i]);
	assert_numbered(&ev);
	assert_str_at(ev.data[0], "response.id", "resp_r9");
	assert_str_at(ev.data[0], "response.status", "in_progress");
	assert_str_at(ev.data[2], "item.type", "message");
	assert_str_at(ev.data[6], "text", "Let me check the weather.");
	assert_str_at(ev.data[7], "part.text", "Let me check the weather.");
	assert_str_at(ev.data[9], "item.type", "function_call");
	assert_str_at(ev.data[9], "item.call_id", "call_abc123");
	assert_int_at(ev.data[9], "output_index", 1);
	assert_str_at(ev.data[13], "arguments", "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
	assert_str_at(ev.data[13], "name", "get_weather");
	assert_int_at(ev.data[15], "output_index", 2);
	assert_str_at(ev.data[19], "response.status", "completed");
	assert_int_equal(json_array_size(at(ev.data[19], "response.output")), 3);
	assert_str_at(ev.data[19], "response.output.2.name", "get_time");
	assert_int_at(ev.data[19], "response.usage.input_tokens", 120);
	assert_int_at(ev.data[19], "response.usage.input_tokens_details.cached_tokens", 64);
	assert_int_at(ev.data[19], "response.usage.output_tokens", 30);
	assert_int_at(ev.data[19], "response.usage.total_tokens", 150);
	client_free(&ev);

	/* read back by the Responses decoder: the same answer */
	reparse(r.out, resp(), &back);
	assert_true(back.ok);
	summarize(back.chunks, &s);
	assert_string_equal(s.text, "Let me check the weather.");
	assert_int_equal(s.n_tools, 2);
	assert_string_equal(s.tool_ids[1], "call_def456");
	assert_string_equal(s.tool_args[0], "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
	assert_string_equal(s.finish, "tool_calls");
	assert_int_equal(s.prompt, 120);
	assert_int_equal(s.cached, 64);
	run_free(&back);
	run_free(&r);
	json_decref(req);
}

static void test_encode_incomplete(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct client_events ev;

	encode_chat_stream("chat_text.sse", &ctx, &r);
	parse_client(r.out, &ev);
	assert_numbered(&ev);
	assert_string_equal(ev.names[ev.n - 1], "response.incomplete");
	assert_str_at(ev.data[ev.n - 1], "response.status", "incomplete");
	assert_str_at(ev.data[ev.n - 1], "response.incomplete_details.reason", "max_output_tokens");
	assert_str_at(ev.data[ev.n - 1], "response.output.0.content.0.text", "Bonjour à vous, ami");
	assert_str_at(ev.data[ev.n - 1], "response.output.0.status", "incomplete");
	assert_int_at(ev.data[ev.n - 1], "response.usage.output_tokens_details.reasoning_tokens",
	              5);
	/* the upstream's model, when the client's is not known */
	assert_str_at(ev.data[0], "response.model", "deepseek-reasoner");
	client_free(&ev);
	run_free(&r);
}

static void test_stream_error(void **state)
{
	const struct proto_codec *c = resp();
	struct proto_encoder *e = c->encoder_new(NULL);
	struct evbuffer *out = evbuffer_new();
	struct proto_error_out err = {.status = 502, .code = "upstream_error", .message = "cut"};
	struct client_events ev;
	json_t *chunk = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}");

	assert_true(c->encode(e, chunk, out));
	c->stream_error(e, &err, out);
	parse_client(out, &ev);
	assert_string_equal(ev.names[ev.n - 1], "error");
	assert_int_at(ev.data[ev.n - 1], "sequence_number", ev.n - 1);
	assert_str_at(ev.data[ev.n - 1], "code", "upstream_error");
	assert_str_at(ev.data[ev.n - 1], "message", "cut");
	/* the OpenAI error object too: the SDKs raise on it */
	assert_str_at(ev.data[ev.n - 1], "error.type", "server_error");
	client_free(&ev);
	c->encoder_free(e);
	json_decref(chunk);
	evbuffer_free(out);
}

/* Calls all at index 0 with their own ids (Gemini): one function_call item each. */
static void test_encode_same_index(void **state)
{
	const struct proto_codec *c = resp();
	struct proto_encoder *e = c->encoder_new(NULL);
	struct evbuffer *out = evbuffer_new();
	struct client_events ev;
	json_t *two = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":["
	                        "{\"index\":0,\"id\":\"a\",\"function\":{\"name\":\"f\","
	                        "\"arguments\":\"{}\"}},{\"index\":0,\"id\":\"b\",\"function\":"
	                        "{\"name\":\"g\",\"arguments\":\"[]\"}}]},\"finish_reason\":"
	                        "\"tool_calls\"}]}");

	assert_true(c->encode(e, two, out));
	c->stream_end(e, NULL, out);
	parse_client(out, &ev);
	assert_numbered(&ev);
	assert_string_equal(ev.names[ev.n - 1], "response.completed");
	assert_int_equal(json_array_size(at(ev.data[ev.n - 1], "response.output")), 2);
	assert_str_at(ev.data[ev.n - 1], "response.output.0.call_id", "a");
	assert_str_at(ev.data[ev.n - 1], "response.output.1.call_id", "b");
	assert_str_at(ev.data[ev.n - 1], "response.output.1.arguments", "[]");
	client_free(&ev);
	c->encoder_free(e);
	json_decref(two);
	evbuffer_free(out);
}

/* ================================================================== Responses stream → pivot */

static void test_decode_streams(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct pivot_summary s;
	size_t len;
	char *txt = read_data("responses_text.sse", &len);

	run_every_split(&r, resp(), NULL, &ctx, txt, len);
	assert_true(r.ok);
	summarize(r.chunks, &s);
	assert_true(s.role);
	assert_string_equal(s.text, "Hi there! How can Ihelp you today — 今日は?");
	assert_string_equal(s.finish, "stop");
	assert_int_equal(s.prompt, 37);
	assert_int_equal(s.cached, 16);
	assert_int_equal(s.completion, 11);
	run_free(&r);
	free(txt);

	txt = read_data("responses_tools.sse", &len);
	run_every_split(&r, resp(), NULL, &ctx, txt, len);
	assert_true(r.ok);
	summarize(r.chunks, &s);
	assert_int_equal(s.n_tools, 1);
	assert_string_equal(s.tool_ids[0], "call_unLAR8MvFNptuiZK6K6HCy5k");
	assert_string_equal(s.tool_names[0], "get_current_weather");
	assert_string_equal(s.tool_args[0], "{\"location\":\"Paris, France\"}");
	assert_string_equal(s.finish, "tool_calls");
	assert_int_equal(s.prompt, 291);
	run_free(&r);
	free(txt);
}

static void decode_one(const char *stream, bool want_ok, int status, const char *in_message)
{
	struct run r;

	run_feed(&r, resp(), NULL, NULL, stream, strlen(stream), NULL, 0);
	if (r.ok != want_ok)
		fail_msg("stream %s: ok=%d", stream, r.ok);
	if (!want_ok) {
		assert_int_equal(r.err.status, status);
		if (strstr(r.err.message, in_message) == NULL)
			fail_msg("\"%s\" does not say %s", r.err.message, in_message);
	}
	run_free(&r);
}

static void test_decode_broken(void **state)
{
	decode_one("event: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n", false, 0,
	           "outside the response");
	decode_one("event: error\ndata: {\"type\":\"error\",\"code\":\"rate_limit_exceeded\","
	           "\"message\":\"slow down\",\"param\":null,\"sequence_number\":3}\n\n",
	           false, 429, "slow down");
	decode_one("event: response.created\ndata: {\"response\":{\"id\":\"r\"}}\n\n"
	           "event: response.failed\ndata: {\"response\":{\"status\":\"failed\",\"error\":"
	           "{\"code\":\"server_error\",\"message\":\"model crashed\"}}}\n\n",
	           false, 502, "model crashed");
	decode_one("event: response.created\ndata: {\"response\":{\"id\":\"r\"}}\n\n"
	           "event: response.function_call_arguments.delta\ndata: {\"output_index\":0,"
	           "\"delta\":\"{\"}\n\n",
	           false, 0, "unknown item");
	decode_one(
	        "data: {\"type\":\"response.created\",\"response\":{}}\n\n"
	        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"no event lines\"}\n\n",
	        true, 0, NULL);
	decode_one("event: response.created\ndata: nope\n\n", false, 0, "not a JSON object");
}

static bool usage_event(void *arg, const struct sse_event *ev)
{
	resp()->stream_usage(ev, arg);
	return true;
}

static void test_stream_usage(void **state)
{
	size_t len;
	char *s = read_data("responses_text.sse", &len);
	struct record_usage u = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, s, len, usage_event, &u));
	sse_parser_free(&p);
	assert_true(u.present);
	assert_int_equal(u.prompt, 37);
	assert_int_equal(u.cached, 16);
	assert_int_equal(u.completion, 11);
	assert_int_equal(u.total, 48);
	free(s);
}

static void test_errors(void **state)
{
	struct proto_error err = {0};
	struct proto_error_out e = {.status = 400,
	                            .code = "unsupported_on_instance",
	                            .message = "previous_response_id: no"};
	struct evbuffer *out = evbuffer_new();
	const char *b =
	        "{\"error\":{\"message\":\"Invalid 'input'\",\"type\":"
	        "\"invalid_request_error\",\"param\":\"input\",\"code\":\"invalid_value\"}}";
	char *s;
	json_t *v;

	assert_true(resp()->error_to_openai(b, strlen(b), 400, &err));
	assert_string_equal(err.code, "invalid_value");
	assert_string_equal(err.message, "Invalid 'input'");
	resp()->error_body(&e, out);
	s = buffer_string(out);
	v = load_json(s);
	assert_json_equal(v, "{\"error\":{\"message\":\"previous_response_id: no\",\"type\":"
	                     "\"invalid_request_error\",\"param\":null,\"code\":"
	                     "\"unsupported_on_instance\"}}");
	json_decref(v);
	free(s);
	evbuffer_free(out);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_request_string_input),
	        cmocka_unit_test(test_request_items),
	        cmocka_unit_test(test_request_refused),
	        cmocka_unit_test(test_request_from_chat),
	        cmocka_unit_test(test_response_from_chat),
	        cmocka_unit_test(test_response_to_chat),
	        cmocka_unit_test(test_encode_tools),
	        cmocka_unit_test(test_encode_incomplete),
	        cmocka_unit_test(test_stream_error),
	        cmocka_unit_test(test_encode_same_index),
	        cmocka_unit_test(test_decode_streams),
	        cmocka_unit_test(test_decode_broken),
	        cmocka_unit_test(test_stream_usage),
	        cmocka_unit_test(test_errors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
