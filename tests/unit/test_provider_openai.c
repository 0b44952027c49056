/* test_provider_openai.c — the chat codec and the OpenAI-compatible providers (openai.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "provider_harness.h"

static const struct proto_codec *chat(void)
{
	return proto_codec(PROTO_CHAT);
}

static void test_requests(void **state)
{
	struct proto_error err = {0};
	struct config_instance in = {.options = load_json("{\"temperature\":0.1,\"top_k\":20}")};
	json_t *body = load_json("{\"model\":\"qwen\",\"messages\":[{\"role\":\"user\",\"content\":"
	                         "\"hi\"}],\"temperature\":0.9,\"stream\":false}");
	json_t *pivot = chat()->request_to_chat(body, &err);
	json_t *up;

	assert_non_null(pivot);
	assert_true(json_equal(pivot, body));
	up = chat()->request_from_chat(pivot, &in, "Qwen/Qwen2.5-32B-Instruct", &err);
	assert_json_equal(up, "{\"model\":\"Qwen/Qwen2.5-32B-Instruct\",\"messages\":[{\"role\":"
	                      "\"user\",\"content\":\"hi\"}],\"temperature\":0.1,\"stream\":false,"
	                      "\"top_k\":20}");
	json_decref(up);
	/* no model: none sent (azure deployments) */
	up = chat()->request_from_chat(pivot, NULL, NULL, &err);
	assert_absent(up, "model");
	json_decref(up);
	/* the client's body is untouched */
	assert_str_at(body, "model", "qwen");
	json_decref(pivot);
	json_decref(body);
	json_decref(in.options);

	body = load_json("{\"model\":\"x\"}");
	assert_null(chat()->request_to_chat(body, &err));
	assert_int_equal(err.status, 400);
	json_decref(body);
	body = load_json("[1]");
	assert_null(chat()->request_to_chat(body, &err));
	assert_null(chat()->request_from_chat(body, NULL, "m", &err));
	json_decref(body);
}

static void test_responses(void **state)
{
	struct proto_reply_ctx ctx = {.model = "public-name"};
	json_t *body = load_json("{\"id\":\"c\",\"object\":\"chat.completion\",\"model\":\"up\","
	                         "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
	                         "\"content\":\"x\"},\"finish_reason\":\"stop\"}]}");
	json_t *p = chat()->response_to_chat(body, NULL);
	json_t *out;

	assert_true(json_equal(p, body));
	out = chat()->response_from_chat(p, &ctx);
	assert_str_at(out, "model", "public-name");
	assert_str_at(body, "model", "up");
	json_decref(out);
	out = chat()->response_from_chat(p, NULL);
	assert_str_at(out, "model", "up");
	json_decref(out);
	json_decref(p);
	json_decref(body);
	body = load_json("{\"error\":{}}");
	assert_null(chat()->response_to_chat(body, NULL));
	json_decref(body);
}

static void test_decode_every_split(void **state)
{
	static const char *const files[] = {"chat_tools.sse", "chat_text.sse"};

	for (size_t i = 0; i < 2; i++) {
		size_t len, len2;
		char *s = read_data(files[i], &len);
		char *s2 = crlf(s, len, &len2);
		struct run r, r2;
		struct pivot_summary sum;

		run_every_split(&r, chat(), chat(), NULL, s, len);
		assert_true(r.ok);
		summarize(r.chunks, &sum);
		if (i == 0) {
			assert_string_equal(sum.text, "Let me check the weather.");
			assert_string_equal(sum.tool_args[0],
			                    "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
			assert_int_equal(sum.prompt, 120);
		} else {
			assert_string_equal(sum.reasoning, "The user greets; answer briefly.");
			assert_string_equal(sum.finish, "length");
		}
		/* [DONE] and the comment are not chunks; every data event is */
		assert_int_equal(sum.n_chunks, i == 0 ? 10 : 7);
		run_feed(&r2, chat(), chat(), NULL, s2, len2, NULL, 0);
		assert_true(same_buffers(r.chunks, r2.chunks));
		run_free(&r2);
		run_free(&r);
		free(s);
		free(s2);
	}
}

static void test_encode(void **state)
{
	struct proto_reply_ctx ctx = {.include_usage = false};
	size_t len;
	char *s = read_data("chat_tools.sse", &len);
	struct run r;
	struct client_events ev;

	/* a client that did not ask for usage gets no usage chunk */
	run_feed(&r, chat(), chat(), &ctx, s, len, NULL, 0);
	parse_client(r.out, &ev);
	assert_int_equal(ev.n, 10); /* 9 chunks + [DONE] */
	assert_null(ev.data[9]);
	for (int i = 0; i < 9; i++)
		assert_absent(ev.data[i], "usage");
	client_free(&ev);
	run_free(&r);
	/* one that did gets it, byte for byte as the upstream sent it */
	ctx.include_usage = true;
	run_feed(&r, chat(), chat(), &ctx, s, len, NULL, 0);
	parse_client(r.out, &ev);
	assert_int_equal(ev.n, 11);
	assert_int_at(ev.data[9], "usage.total_tokens", 150);
	client_free(&ev);
	run_free(&r);
	/* the client's model name in every chunk */
	ctx.model = "qwen";
	run_feed(&r, chat(), chat(), &ctx, s, len, NULL, 0);
	parse_client(r.out, &ev);
	for (int i = 0; i < 10; i++)
		assert_str_at(ev.data[i], "model", "qwen");
	client_free(&ev);
	run_free(&r);
	free(s);
}

static void test_stream_end_cut(void **state)
{
	struct proto_reply_ctx ctx = {.request_id = "rq", .created = HARNESS_CREATED};
	struct proto_encoder *e = chat()->encoder_new(&ctx);
	struct evbuffer *out = evbuffer_new();
	struct client_events ev;
	json_t *c = load_json("{\"id\":\"chatcmpl-up\",\"model\":\"m\",\"object\":"
	                      "\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{"
	                      "\"content\":\"a\"}}]}");

	assert_true(chat()->encode(e, c, out));
	chat()->stream_end(e, "content_filter", out);
	parse_client(out, &ev);
	assert_int_equal(ev.n, 3);
	assert_str_at(ev.data[1], "id", "chatcmpl-up");
	assert_str_at(ev.data[1], "choices.0.finish_reason", "content_filter");
	assert_null(ev.data[2]); /* [DONE] */
	client_free(&ev);
	chat()->encoder_free(e);
	json_decref(c);
	evbuffer_free(out);
}

static void decode_error(const char *stream, int status, const char *message)
{
	struct run r;

	run_feed(&r, chat(), NULL, NULL, stream, strlen(stream), NULL, 0);
	assert_false(r.ok);
	assert_int_equal(r.err.status, status);
	assert_string_equal(r.err.message, message);
	run_free(&r);
}

static void test_decode_errors(void **state)
{
	decode_error("data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n", 502,
	             "boom");
	/* vLLM's older shape, with a numeric code */
	decode_error("data: {\"object\":\"error\",\"message\":\"too long\",\"type\":"
	             "\"BadRequestError\",\"param\":null,\"code\":400}\n\n",
	             400, "too long");
	decode_error("event: error\ndata: {\"error\":{\"message\":\"limit\",\"type\":"
	             "\"rate_limit_error\"}}\n\n",
	             429, "limit");
	decode_error("data: {\"id\":\n\n", 0,
	             "the upstream sent an event that is not a JSON object");
}

static void test_error_to_openai(void **state)
{
	static const struct {
		const char *body;
		int status;
		const char *type, *code, *message;
	} cases[] = {
	        {"{\"error\":{\"message\":\"This model's maximum context length is 8192\",\"type\":"
	         "\"invalid_request_error\",\"param\":\"messages\",\"code\":"
	         "\"context_length_exceeded\"}}",
	         400, "invalid_request_error", "context_length_exceeded",
	         "This model's maximum context length is 8192"},
	        /* OpenRouter: a numeric code */
	        {"{\"error\":{\"code\":402,\"message\":\"Insufficient credits\",\"metadata\":{}}}",
	         402, "invalid_request_error", "invalid_request", "Insufficient credits"},
	        {"{\"error\":{\"message\":\"Rate limit\",\"type\":\"requests\",\"code\":"
	         "\"rate_limit_exceeded\"}}",
	         429, "rate_limit_error", "rate_limit_exceeded", "Rate limit"},
	        {"{\"object\":\"error\",\"message\":\"bad\",\"type\":\"BadRequestError\",\"code\":"
	         "400}",
	         400, "invalid_request_error", "invalid_request", "bad"},
	        {"{\"error\":{\"message\":\"Incorrect API key\",\"type\":\"invalid_request_error\","
	         "\"code\":\"weird_new_code\"}}",
	         401, "invalid_request_error", "invalid_api_key", "Incorrect API key"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct proto_error err = {0};
		assert_true(chat()->error_to_openai(cases[i].body, strlen(cases[i].body),
		                                    cases[i].status, &err));
		assert_int_equal(err.status, cases[i].status);
		assert_string_equal(err.type, cases[i].type);
		assert_string_equal(err.code, cases[i].code);
		assert_string_equal(err.message, cases[i].message);
	}
	struct proto_error err;
	assert_false(chat()->error_to_openai("Bad Gateway", 11, 502, &err));
	assert_false(chat()->error_to_openai("{\"detail\":\"x\"}", 14, 422, &err));
	assert_false(chat()->error_to_openai(NULL, 0, 500, &err));
}

static void test_gemini_errors(void **state)
{
	const struct provider_ops *g = provider_ops(PROVIDER_GEMINI);
	const char *arr = "[{\"error\":{\"code\":400,\"message\":\"API key not valid.\",\"status\":"
	                  "\"INVALID_ARGUMENT\"}}]";
	const char *obj = "{\"error\":{\"code\":429,\"message\":\"Quota exceeded\",\"status\":"
	                  "\"RESOURCE_EXHAUSTED\"}}";
	const char *odd = "{\"error\":{\"code\":500,\"message\":\"x\",\"status\":\"NEW_STATUS\"}}";
	struct proto_error err = {0};

	assert_true(g->error_to_openai(arr, strlen(arr), 400, &err));
	assert_string_equal(err.type, "invalid_request_error");
	assert_string_equal(err.message, "API key not valid.");
	assert_true(g->error_to_openai(obj, strlen(obj), 429, &err));
	assert_string_equal(err.code, "rate_limit_exceeded");
	assert_true(g->error_to_openai(odd, strlen(odd), 500, &err));
	assert_string_equal(err.type, "server_error");
	/* OpenAI's shape is not Gemini's: the codec reads it */
	const char *oai = "{\"error\":{\"message\":\"m\",\"type\":\"invalid_request_error\"}}";
	assert_false(g->error_to_openai(oai, strlen(oai), 400, &err));
}

static void test_error_events(void **state)
{
	struct proto_error_out e = {.status = 502,
	                            .type = "upstream_error",
	                            .code = "upstream_error",
	                            .message = "the upstream went away"};
	struct evbuffer *out = evbuffer_new();
	char *s;

	chat()->error_body(&e, out);
	s = buffer_string(out);
	assert_string_equal(s, "{\"error\":{\"message\":\"the upstream went away\",\"type\":"
	                       "\"upstream_error\",\"param\":null,\"code\":\"upstream_error\"}}");
	free(s);
	evbuffer_drain(out, evbuffer_get_length(out));
	/* the same event the identity path writes (request.c's stream_error_event) */
	chat()->stream_error(NULL, &e, out);
	s = buffer_string(out);
	assert_string_equal(s, "event: error\ndata: {\"error\":{\"message\":\"the upstream went "
	                       "away\",\"type\":\"upstream_error\",\"param\":null,\"code\":"
	                       "\"upstream_error\"}}\n\n");
	free(s);
	evbuffer_free(out);
}

static bool usage_event(void *arg, const struct sse_event *ev)
{
	chat()->stream_usage(ev, arg);
	return true;
}

static void test_stream_usage(void **state)
{
	size_t len;
	char *s = read_data("chat_text.sse", &len);
	struct record_usage u = {0};
	struct sse_parser p;

	sse_parser_init(&p, 0);
	assert_true(sse_feed(&p, s, len, usage_event, &u));
	sse_parser_free(&p);
	assert_int_equal(u.prompt, 14);
	assert_int_equal(u.completion, 8);
	assert_int_equal(u.reasoning, 5);
	free(s);
}

static void test_providers(void **state)
{
	static const struct {
		enum provider id;
		const char *name, *endpoint;
	} cases[] = {
	        {PROVIDER_OPENAI, "openai", "https://api.openai.com/v1/chat/completions"},
	        {PROVIDER_OPENAI_COMPATIBLE, "openai-compatible", NULL},
	        {PROVIDER_DEEPSEEK, "deepseek", "https://api.deepseek.com/chat/completions"},
	        {PROVIDER_OPENROUTER, "openrouter",
	         "https://openrouter.ai/api/v1/chat/completions"},
	        {PROVIDER_GEMINI, "gemini",
	         "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct provider_ops *p = provider_ops(cases[i].id);
		assert_int_equal(p->id, cases[i].id);
		assert_string_equal(p->name, cases[i].name);
		assert_int_equal(p->upstream, PROTO_CHAT);
		if (cases[i].endpoint)
			assert_string_equal(p->default_endpoint, cases[i].endpoint);
		else
			assert_null(p->default_endpoint);
		assert_null(p->drop_model);
		assert_null(p->is_overload);
	}
	assert_string_equal(provider_ops(PROVIDER_OPENAI)->default_responses_endpoint,
	                    "https://api.openai.com/v1/responses");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_requests),           cmocka_unit_test(test_responses),
	        cmocka_unit_test(test_decode_every_split), cmocka_unit_test(test_encode),
	        cmocka_unit_test(test_stream_end_cut),     cmocka_unit_test(test_decode_errors),
	        cmocka_unit_test(test_error_to_openai),    cmocka_unit_test(test_gemini_errors),
	        cmocka_unit_test(test_error_events),       cmocka_unit_test(test_stream_usage),
	        cmocka_unit_test(test_providers),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
