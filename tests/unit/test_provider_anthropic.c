/* test_provider_anthropic.c — the Messages codec both ways, and the anthropic provider. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "provider_harness.h"

static const struct proto_codec *msgs(void)
{
	return proto_codec(PROTO_MESSAGES);
}

static const struct proto_codec *chat(void)
{
	return proto_codec(PROTO_CHAT);
}

/* ================================================================== pivot → Messages request */

static json_t *from_chat(const char *body, const struct config_instance *in, const char *model,
                         struct proto_error *err)
{
	json_t *c = load_json(body);
	json_t *out = msgs()->request_from_chat(c, in, model, err);

	json_decref(c);
	return out;
}

static void test_request_from_chat_full(void **state)
{
	struct proto_error err = {0};
	json_t *out = from_chat(
	        "{\"model\":\"claude\",\"max_tokens\":300,\"temperature\":1.5,\"top_p\":0.9,"
	        "\"stop\":\"END\",\"user\":\"u-42\",\"stream\":true,"
	        "\"stream_options\":{\"include_usage\":true},\"messages\":["
	        "{\"role\":\"system\",\"content\":\"Be brief.\"},"
	        "{\"role\":\"developer\",\"content\":[{\"type\":\"text\",\"text\":\"Use "
	        "metric.\"}]},"
	        "{\"role\":\"user\",\"content\":\"Weather in Paris?\"},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"And this?\"},"
	        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/"
	        "png;base64,iVBORw0KGgo=\"}},"
	        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"https://example.com/a.jpg\"}}]},"
	        "{\"role\":\"assistant\",\"content\":\"Checking.\",\"tool_calls\":["
	        "{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
	        "\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}},"
	        "{\"id\":\"call_2\",\"type\":\"function\",\"function\":{\"name\":\"get_time\","
	        "\"arguments\":\"\"}}]},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"18C\"},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"call_2\",\"content\":[{\"type\":\"text\","
	        "\"text\":\"14:00\"}]},"
	        "{\"role\":\"user\",\"content\":\"Thanks\"}],"
	        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
	        "\"description\":\"Weather\",\"parameters\":{\"type\":\"object\",\"properties\":"
	        "{\"city\":{\"type\":\"string\"}}}}},{\"type\":\"function\",\"function\":{\"name\":"
	        "\"get_time\"}}],\"tool_choice\":\"required\",\"parallel_tool_calls\":false}",
	        NULL, "claude-sonnet-4-5", &err);

	assert_non_null(out);
	assert_json_equal(
	        out, "{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":300,"
	             "\"system\":[{\"type\":\"text\",\"text\":\"Be brief.\"},"
	             "{\"type\":\"text\",\"text\":\"Use metric.\"}],"
	             "\"messages\":["
	             "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Weather in "
	             "Paris?\"},{\"type\":\"text\",\"text\":\"And this?\"},"
	             "{\"type\":\"image\",\"source\":{\"type\":\"base64\",\"media_type\":"
	             "\"image/png\",\"data\":\"iVBORw0KGgo=\"}},"
	             "{\"type\":\"image\",\"source\":{\"type\":\"url\",\"url\":"
	             "\"https://example.com/a.jpg\"}}]},"
	             "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":"
	             "\"Checking.\"},{\"type\":\"tool_use\",\"id\":\"call_1\",\"name\":"
	             "\"get_weather\",\"input\":{\"city\":\"Paris\"}},{\"type\":\"tool_use\","
	             "\"id\":\"call_2\",\"name\":\"get_time\",\"input\":{}}]},"
	             "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":"
	             "\"call_1\",\"content\":\"18C\"},{\"type\":\"tool_result\",\"tool_use_id\":"
	             "\"call_2\",\"content\":[{\"type\":\"text\",\"text\":\"14:00\"}]},"
	             "{\"type\":\"text\",\"text\":\"Thanks\"}]}],"
	             "\"stop_sequences\":[\"END\"],\"temperature\":1.0,\"top_p\":0.9,"
	             "\"tools\":[{\"name\":\"get_weather\",\"description\":\"Weather\","
	             "\"input_schema\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":"
	             "\"string\"}}}},{\"name\":\"get_time\",\"input_schema\":{\"type\":"
	             "\"object\"}}],"
	             "\"tool_choice\":{\"type\":\"any\",\"disable_parallel_tool_use\":true},"
	             "\"metadata\":{\"user_id\":\"u-42\"},\"stream\":true}");
	json_decref(out);
}

static void test_request_from_chat_max_tokens(void **state)
{
	struct proto_error err = {0};
	struct config_instance in = {0};
	json_t *out;

	/* default */
	out = from_chat("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", NULL, "m", &err);
	assert_int_at(out, "max_tokens", PROTO_MESSAGES_DEFAULT_MAX_TOKENS);
	json_decref(out);
	/* options.max_tokens is the default; other options win over the request */
	in.options = load_json("{\"max_tokens\":1000,\"top_k\":5,\"temperature\":0.2}");
	out = from_chat(
	        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"temperature\":0.9}", &in,
	        "m", &err);
	assert_int_at(out, "max_tokens", 1000);
	assert_int_at(out, "top_k", 5);
	assert_true(json_real_value(at(out, "temperature")) == 0.2);
	json_decref(out);
	/* the request's own wins over options.max_tokens; max_completion_tokens first */
	out = from_chat("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":7,"
	                "\"max_completion_tokens\":9}",
	                &in, NULL, &err);
	assert_int_at(out, "max_tokens", 9);
	assert_absent(out, "model"); /* NULL model: none sent */
	json_decref(out);
	json_decref(in.options);
}

static void test_request_from_chat_tool_choice(void **state)
{
	static const struct {
		const char *choice, *want;
	} cases[] = {
	        {"\"auto\"", "{\"type\":\"auto\"}"},
	        {"\"none\"", "{\"type\":\"none\"}"},
	        {"\"required\"", "{\"type\":\"any\"}"},
	        {"{\"type\":\"function\",\"function\":{\"name\":\"f\"}}",
	         "{\"type\":\"tool\",\"name\":\"f\"}"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char body[512];
		struct proto_error err = {0};
		snprintf(body, sizeof(body),
		         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{"
		         "\"type\":"
		         "\"function\",\"function\":{\"name\":\"f\"}}],\"tool_choice\":%s}",
		         cases[i].choice);
		json_t *out = from_chat(body, NULL, "m", &err);
		assert_non_null(out);
		assert_json_equal(at(out, "tool_choice"), cases[i].want);
		json_decref(out);
	}
}

static void test_request_from_chat_refused(void **state)
{
	static const struct {
		const char *body, *code, *in_message;
	} cases[] = {
	        {"{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c\",\"type\":"
	         "\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{not json\"}}]}]}",
	         "invalid_request", "arguments"},
	        {"{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c\",\"type\":"
	         "\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"[1,2]\"}}]}]}",
	         "invalid_request", "not a JSON object"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":2}",
	         "unsupported_on_instance", "n:"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"response_format\":"
	         "{\"type\":\"json_object\"}}",
	         "unsupported_on_instance", "response_format"},
	        {"{\"messages\":[{\"role\":\"function\",\"content\":\"x\"}]}", "invalid_request",
	         "role"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_audio\"}]}]}",
	         "unsupported_on_instance", "input_audio"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
	         "\"image_url\":{\"url\":\"ftp://x/y.png\"}}]}]}",
	         "invalid_request", "data: or http(s)"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
	         "\"image_url\":{\"url\":\"data:image/png,rawbytes\"}}]}]}",
	         "invalid_request", "base64"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":"
	         "\"web_search\"}]}",
	         "unsupported_on_instance", "tools[0]"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":\"10\"}",
	         "invalid_request", "max_tokens"},
	        {"{\"messages\":{}}", "invalid_request", "messages"},
	        {"[]", "invalid_request", "messages"},
	        {"{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", "invalid_request",
	         "tool_call_id"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stop\":[1]}",
	         "invalid_request", "stop[0]"},
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":\"maybe\"}",
	         "invalid_request", "tool_choice"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct proto_error err = {0};
		json_t *out = from_chat(cases[i].body, NULL, "m", &err);
		if (out != NULL)
			fail_msg("case %zu was accepted", i);
		assert_int_equal(err.status, 400);
		assert_string_equal(err.code, cases[i].code);
		if (strstr(err.message, cases[i].in_message) == NULL)
			fail_msg("case %zu: \"%s\" does not say %s", i, err.message,
			         cases[i].in_message);
	}
}

/* ================================================================== Messages answer → pivot */

static void test_response_to_chat(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	json_t *body = load_json_file("anthropic_body.json");
	json_t *c = msgs()->response_to_chat(body, &ctx);

	assert_non_null(c);
	assert_json_equal(
	        c,
	        "{\"id\":\"msg_01Aq9w938a90dw8q\",\"object\":\"chat.completion\",\"created\":"
	        "1700000000,\"model\":\"claude-sonnet-4-5-20250929\",\"choices\":[{\"index\":0,"
	        "\"message\":{\"role\":\"assistant\",\"content\":\"I'll check the weather for "
	        "you.\",\"tool_calls\":[{\"id\":\"toolu_01A09q90qw90lq917835lq9\",\"type\":"
	        "\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":"
	        "\"{\\\"location\\\":\\\"San Francisco, CA\\\",\\\"unit\\\":\\\"celsius\\\"}\"}}],"
	        "\"reasoning_content\":\"The user wants the weather.\"},\"finish_reason\":"
	        "\"tool_calls\"}],\"usage\":{\"prompt_tokens\":3078,\"completion_tokens\":55,"
	        "\"total_tokens\":3133,\"prompt_tokens_details\":{\"cached_tokens\":2048}}}");
	/* the pivot's usage reads back as quotas will charge it */
	struct record_usage u;
	assert_true(proto_usage_from_chat(c, &u));
	assert_int_equal(u.prompt, 3078);
	assert_int_equal(u.cached, 2048);
	assert_int_equal(u.completion, 55);
	assert_int_equal(u.total, 3133);
	json_decref(c);
	json_decref(body);
}

static void test_stop_reasons(void **state)
{
	static const struct {
		const char *stop, *finish;
	} cases[] = {
	        {"end_turn", "stop"},
	        {"stop_sequence", "stop"},
	        {"max_tokens", "length"},
	        {"tool_use", "tool_calls"},
	        {"refusal", "content_filter"},
	        {"pause_turn", "stop"},
	        {"model_context_window_exceeded", "length"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char body[256];
		snprintf(body, sizeof(body),
		         "{\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":\"x\"}],"
		         "\"stop_reason\":\"%s\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}"
		         "}",
		         cases[i].stop);
		json_t *b = load_json(body);
		json_t *c = msgs()->response_to_chat(b, NULL);
		assert_non_null(c);
		assert_str_at(c, "choices.0.finish_reason", cases[i].finish);
		json_decref(c);
		json_decref(b);
	}
}

static void test_response_to_chat_broken(void **state)
{
	static const char *const bodies[] = {
	        "{}",
	        "[]",
	        "{\"type\":\"message\",\"content\":{}}",
	        "{\"type\":\"error\",\"error\":{}}",
	        "{\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":5}]}",
	        "{\"type\":\"message\",\"content\":[{\"type\":\"tool_use\",\"id\":\"x\",\"name\":"
	        "\"f\","
	        "\"input\":\"{}\"}]}",
	};
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
		json_t *b = load_json(bodies[i]);
		json_t *c = msgs()->response_to_chat(b, NULL);
		if (c != NULL)
			fail_msg("body %zu was taken", i);
		json_decref(b);
	}
}

/* ================================================================== Messages request → pivot */

static json_t *to_chat(const char *body, struct proto_error *err)
{
	json_t *b = load_json(body);
	json_t *out = msgs()->request_to_chat(b, err);

	json_decref(b);
	return out;
}

static void test_request_to_chat_full(void **state)
{
	struct proto_error err = {0};
	json_t *out = to_chat(
	        "{\"model\":\"qwen\",\"max_tokens\":1024,\"stream\":true,\"temperature\":0.5,"
	        "\"top_k\":40,\"stop_sequences\":[\"\\n\\nHuman:\"],"
	        "\"metadata\":{\"user_id\":\"user-7\"},"
	        "\"system\":[{\"type\":\"text\",\"text\":\"You are Claude Code.\","
	        "\"cache_control\":{\"type\":\"ephemeral\"}},{\"type\":\"text\",\"text\":\"Be "
	        "careful.\"}],"
	        "\"messages\":["
	        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"<reminder>\"},"
	        "{\"type\":\"text\",\"text\":\"List files.\"}]},"
	        "{\"role\":\"assistant\",\"content\":[{\"type\":\"thinking\",\"thinking\":\"hm\","
	        "\"signature\":\"sig\"},{\"type\":\"text\",\"text\":\"Running ls.\"},"
	        "{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"Bash\",\"input\":{"
	        "\"command\":"
	        "\"ls\"}}]},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":"
	        "\"toolu_1\",\"content\":[{\"type\":\"text\",\"text\":\"a.c\"},{\"type\":\"text\","
	        "\"text\":\"b.c\"}]},{\"type\":\"tool_result\",\"tool_use_id\":\"toolu_2\","
	        "\"content\":\"ok\",\"is_error\":true},{\"type\":\"text\",\"text\":\"And now?\"}]},"
	        "{\"role\":\"assistant\",\"content\":[{\"type\":\"tool_use\",\"id\":\"toolu_3\","
	        "\"name\":\"Read\",\"input\":{}}]},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":"
	        "\"toolu_3\",\"content\":[{\"type\":\"image\",\"source\":{\"type\":\"base64\","
	        "\"media_type\":\"image/png\",\"data\":\"AAAA\"}}]},{\"type\":\"image\",\"source\":"
	        "{\"type\":\"url\",\"url\":\"https://x/y.png\"}}]}],"
	        "\"tools\":[{\"name\":\"Bash\",\"description\":\"Run\",\"input_schema\":{\"type\":"
	        "\"object\",\"properties\":{\"command\":{\"type\":\"string\"}}}}],"
	        "\"tool_choice\":{\"type\":\"any\",\"disable_parallel_tool_use\":true}}",
	        &err);

	assert_non_null(out);
	assert_json_equal(
	        out,
	        "{\"messages\":["
	        "{\"role\":\"system\",\"content\":\"You are Claude Code.\\n\\nBe careful.\"},"
	        "{\"role\":\"user\",\"content\":\"<reminder>\\nList files.\"},"
	        "{\"role\":\"assistant\",\"content\":\"Running ls.\",\"tool_calls\":[{\"id\":"
	        "\"toolu_1\",\"type\":\"function\",\"function\":{\"name\":\"Bash\",\"arguments\":"
	        "\"{\\\"command\\\":\\\"ls\\\"}\"}}]},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"toolu_1\",\"content\":\"a.c\\nb.c\"},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"toolu_2\",\"content\":\"ok\"},"
	        "{\"role\":\"user\",\"content\":\"And now?\"},"
	        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"toolu_3\","
	        "\"type\":\"function\",\"function\":{\"name\":\"Read\",\"arguments\":\"{}\"}}]},"
	        "{\"role\":\"tool\",\"tool_call_id\":\"toolu_3\",\"content\":\"\"},"
	        "{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{\"url\":"
	        "\"data:image/png;base64,AAAA\"}},{\"type\":\"image_url\",\"image_url\":{\"url\":"
	        "\"https://x/y.png\"}}]}],"
	        "\"model\":\"qwen\",\"max_tokens\":1024,\"stop\":[\"\\n\\nHuman:\"],"
	        "\"temperature\":0.5,\"user\":\"user-7\","
	        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"Bash\",\"description\":"
	        "\"Run\",\"parameters\":{\"type\":\"object\",\"properties\":{\"command\":{\"type\":"
	        "\"string\"}}}}}],\"tool_choice\":\"required\",\"parallel_tool_calls\":false,"
	        "\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
	json_decref(out);
}

static void test_request_to_chat_tool_choice(void **state)
{
	static const struct {
		const char *choice, *want;
	} cases[] = {
	        {"{\"type\":\"auto\"}", "\"auto\""},
	        {"{\"type\":\"any\"}", "\"required\""},
	        {"{\"type\":\"none\"}", "\"none\""},
	        {"{\"type\":\"tool\",\"name\":\"Bash\"}",
	         "{\"type\":\"function\",\"function\":{\"name\":\"Bash\"}}"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char body[512];
		struct proto_error err = {0};
		snprintf(body, sizeof(body),
		         "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
		         "\"tool_choice\":%s}",
		         cases[i].choice);
		json_t *out = to_chat(body, &err);
		assert_non_null(out);
		assert_json_equal(at(out, "tool_choice"), cases[i].want);
		json_decref(out);
	}
}

static void test_request_to_chat_refused(void **state)
{
	static const struct {
		const char *body, *code, *message;
	} cases[] = {
	        /* Anthropic's own words for a missing max_tokens */
	        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", "invalid_request",
	         "max_tokens: Field required"},
	        {"{\"max_tokens\":0,\"messages\":[]}", "invalid_request", "max_tokens: must be"},
	        {"{\"max_tokens\":10}", "invalid_request", "messages: Field required"},
	        {"{\"max_tokens\":10,\"messages\":[{\"role\":\"system\",\"content\":\"x\"}]}",
	         "invalid_request", "messages[0].role"},
	        {"{\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
	         "\"document\",\"source\":{\"type\":\"base64\",\"media_type\":\"application/pdf\","
	         "\"data\":\"JVBE\"}}]}]}",
	         "unsupported_on_instance", "document"},
	        {"{\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
	         "\"tools\":"
	         "[{\"type\":\"web_search_20250305\",\"name\":\"web_search\"}]}",
	         "unsupported_on_instance", "web_search_20250305"},
	        {"{\"max_tokens\":10,\"messages\":[],\"mcp_servers\":[{}]}",
	         "unsupported_on_instance", "mcp_servers"},
	        {"{\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
	         "\"image\",\"source\":{\"type\":\"file\",\"file_id\":\"f\"}}]}]}",
	         "invalid_request", "image source"},
	        {"{\"max_tokens\":10,\"messages\":[{\"role\":\"assistant\",\"content\":[{\"type\":"
	         "\"tool_use\",\"id\":\"x\",\"name\":\"f\",\"input\":[]}]}]}",
	         "invalid_request", "input object"},
	        {"{\"max_tokens\":10,\"messages\":[],\"system\":[{\"type\":\"image\"}]}",
	         "invalid_request", "system[0]"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct proto_error err = {0};
		json_t *out = to_chat(cases[i].body, &err);
		if (out != NULL)
			fail_msg("case %zu was accepted", i);
		assert_int_equal(err.status, 400);
		assert_string_equal(err.code, cases[i].code);
		if (strstr(err.message, cases[i].message) == NULL)
			fail_msg("case %zu: \"%s\" does not say %s", i, err.message,
			         cases[i].message);
	}
}

/* ================================================================== pivot answer → Message */

static void test_response_from_chat(void **state)
{
	json_t *req = load_json("{\"max_tokens\":10,\"messages\":[],\"thinking\":{\"type\":"
	                        "\"enabled\",\"budget_tokens\":2000}}");
	struct proto_reply_ctx ctx = {.model = "qwen", .request_id = "req42", .request = req};
	json_t *c = load_json(
	        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":"
	        "\"Qwen/Qwen2.5\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
	        "\"content\":\"Let me "
	        "look.\",\"reasoning_content\":\"think\",\"tool_calls\":[{\"id\":"
	        "\"call_9\",\"type\":\"function\",\"function\":{\"name\":\"Read\",\"arguments\":"
	        "\"{\\\"path\\\":\\\"a.c\\\"}\"}}]},\"finish_reason\":\"tool_calls\"}],\"usage\":"
	        "{\"prompt_tokens\":100,\"completion_tokens\":20,\"total_tokens\":120,"
	        "\"prompt_tokens_details\":{\"cached_tokens\":60}}}");
	json_t *m = msgs()->response_from_chat(c, &ctx);

	assert_non_null(m);
	assert_json_equal(m, "{\"id\":\"msg_req42\",\"type\":\"message\",\"role\":\"assistant\","
	                     "\"model\":\"qwen\",\"content\":[{\"type\":\"thinking\",\"thinking\":"
	                     "\"think\",\"signature\":\"\"},{\"type\":\"text\",\"text\":\"Let me "
	                     "look.\"},{\"type\":\"tool_use\",\"id\":\"call_9\",\"name\":\"Read\","
	                     "\"input\":{\"path\":\"a.c\"}}],\"stop_reason\":\"tool_use\","
	                     "\"stop_sequence\":null,\"usage\":{\"input_tokens\":40,"
	                     "\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":60,"
	                     "\"output_tokens\":20}}");
	json_decref(m);
	/* without thinking asked for, no thinking block */
	ctx.request = NULL;
	m = msgs()->response_from_chat(c, &ctx);
	assert_str_at(m, "content.0.type", "text");
	json_decref(m);
	/* finish reasons */
	static const struct {
		const char *finish, *stop;
	} cases[] = {{"stop", "end_turn"},
	             {"length", "max_tokens"},
	             {"content_filter", "refusal"},
	             {"tool_calls", "tool_use"}};
	for (size_t i = 0; i < 4; i++) {
		json_object_set_new(at(c, "choices.0"), "finish_reason",
		                    json_string(cases[i].finish));
		m = msgs()->response_from_chat(c, &ctx);
		assert_str_at(m, "stop_reason", cases[i].stop);
		json_decref(m);
	}
	/* arguments that are not an object cannot be a tool_use input */
	json_object_set_new(at(c, "choices.0.message.tool_calls.0.function"), "arguments",
	                    json_string("{\"path\":"));
	assert_null(msgs()->response_from_chat(c, &ctx));
	json_decref(c);
	json_decref(req);
}

/* ================================================================== Messages streams → pivot */

static void stream_of(const char *file, struct run *r, const struct proto_codec *enc,
                      const struct proto_reply_ctx *ctx)
{
	size_t len, len2;
	char *s = read_data(file, &len);
	char *s2 = crlf(s, len, &len2);
	struct run r2;

	run_every_split(r, msgs(), enc, ctx, s, len);
	/* the same events with CRLF line ends decode to the same chunks */
	run_feed(&r2, msgs(), enc, ctx, s2, len2, NULL, 0);
	assert_true(same_buffers(r->chunks, r2.chunks));
	assert_true(same_buffers(r->out, r2.out));
	run_free(&r2);
	free(s);
	free(s2);
}

static void test_decode_text(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct pivot_summary s;

	stream_of("anthropic_text.sse", &r, NULL, &ctx);
	assert_true(r.ok);
	summarize(r.chunks, &s);
	assert_true(s.role);
	assert_string_equal(s.text, "Hello, wörld! 👋\nSecond line.");
	assert_string_equal(s.finish, "stop");
	assert_int_equal(s.n_finish, 1);
	assert_int_equal(s.n_usage, 1);
	/* input + cache reads + cache writes; cached = reads */
	assert_int_equal(s.prompt, 2125);
	assert_int_equal(s.cached, 2000);
	assert_int_equal(s.completion, 15);
	/* role, 2 text pieces, finish, usage: one chunk per event that says something */
	assert_int_equal(s.n_chunks, 5);
	run_free(&r);
}

static void test_decode_tools(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct pivot_summary s;

	stream_of("anthropic_tools.sse", &r, NULL, &ctx);
	assert_true(r.ok);
	summarize(r.chunks, &s);
	assert_string_equal(s.text, "Okay, let's check the weather for San Francisco:");
	assert_int_equal(s.n_tools, 2);
	assert_string_equal(s.tool_ids[0], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
	assert_string_equal(s.tool_names[0], "get_weather");
	assert_string_equal(s.tool_args[0],
	                    "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}");
	assert_string_equal(s.tool_names[1], "get_time");
	assert_string_equal(s.tool_args[1], "{\"tz\": \"PST\"}");
	assert_string_equal(s.finish, "tool_calls");
	assert_int_equal(s.prompt, 472);
	assert_int_equal(s.completion, 89);
	run_free(&r);
}

static void test_decode_thinking(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct pivot_summary s;

	stream_of("anthropic_thinking.sse", &r, NULL, &ctx);
	assert_true(r.ok);
	summarize(r.chunks, &s);
	assert_string_equal(s.reasoning, "I need to find the GCD of 1071 and 462 using the "
	                                 "Euclidean algorithm.\n\n1071 = 2 × 462 + 147\n462 = 3 × "
	                                 "147 + 21\n147 = 7 × 21 + 0");
	assert_string_equal(s.text, "The greatest common divisor of 1071 and 462 is **21**.");
	assert_string_equal(s.finish, "length");
	assert_int_equal(s.completion, 260);
	run_free(&r);
}

static void test_decode_overloaded(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	struct run r;
	struct pivot_summary s;

	stream_of("anthropic_overloaded.sse", &r, NULL, &ctx);
	assert_false(r.ok);
	assert_int_equal(r.err.status, 529);
	assert_string_equal(r.err.code, "upstream_overloaded");
	assert_string_equal(r.err.type, "server_error");
	assert_string_equal(r.err.message, "Overloaded");
	assert_true(provider_ops(PROVIDER_ANTHROPIC)->is_overload(529));
	assert_false(provider_ops(PROVIDER_ANTHROPIC)->is_overload(500));
	/* what came before the error was emitted as it arrived */
	summarize(r.chunks, &s);
	assert_string_equal(s.text, "Partial");
	run_free(&r);
}

static void decode_one(const char *stream, bool want_ok, const char *in_message)
{
	struct run r;
	struct proto_reply_ctx ctx = {0};

	run_feed(&r, msgs(), NULL, &ctx, stream, strlen(stream), NULL, 0);
	if (r.ok != want_ok)
		fail_msg("stream %s: ok=%d", stream, r.ok);
	if (!want_ok && strstr(r.err.message, in_message) == NULL)
		fail_msg("\"%s\" does not say %s", r.err.message, in_message);
	run_free(&r);
}

static void test_decode_broken(void **state)
{
	static const char start[] = "event: message_start\ndata: {\"type\":\"message_start\","
	                            "\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{}}}\n\n";
	char buf[1024];

	decode_one("event: content_block_delta\ndata: {\"index\":0,\"delta\":{\"type\":"
	           "\"text_delta\",\"text\":\"x\"}}\n\n",
	           false, "outside a message");
	decode_one("event: message_start\ndata: {not json\n\n", false, "not a JSON object");
	decode_one("event: message_start\ndata: [1]\n\n", false, "not a JSON object");
	snprintf(buf, sizeof(buf), "%s%s", start, start);
	decode_one(buf, false, "out of order");
	snprintf(buf, sizeof(buf),
	         "%sevent: content_block_delta\ndata: {\"index\":3,\"delta\":{\"type\":"
	         "\"text_delta\",\"text\":\"x\"}}\n\n",
	         start);
	decode_one(buf, false, "not started");
	snprintf(buf, sizeof(buf),
	         "%sevent: content_block_start\ndata: {\"index\":99999999,\"content_block\":{"
	         "\"type\":\"text\"}}\n\n",
	         start);
	decode_one(buf, false, "valid index");
	snprintf(buf, sizeof(buf),
	         "%sevent: content_block_start\ndata: {\"index\":0,\"content_block\":{\"type\":"
	         "\"text\"}}\n\nevent: content_block_delta\ndata: {\"index\":0,\"delta\":{\"type\":"
	         "\"input_json_delta\",\"partial_json\":\"{\"}}\n\n",
	         start);
	decode_one(buf, false, "outside a tool_use");
	snprintf(buf, sizeof(buf),
	         "%sevent: content_block_start\ndata: {\"index\":0,\"content_block\":{\"type\":"
	         "\"tool_use\",\"name\":\"f\"}}\n\n",
	         start);
	decode_one(buf, false, "without id");
	/* pings, comments, unknown events and events without data say nothing */
	snprintf(buf, sizeof(buf),
	         "%s: comment\n\nevent: ping\ndata: {}\n\nevent: brand_new_event\ndata: {}\n\n"
	         "event: message_stop\n\n",
	         start);
	decode_one(buf, true, NULL);
	/* an error event of a type the gateway does not know is still an error */
	decode_one("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"new_error\","
	           "\"message\":\"boom\"}}\n\n",
	           false, "boom");
}

/* ================================================================== pivot stream → Messages */

/* A chat stream (decoded by the chat codec) encoded as Messages events. */
static void encode_chat_stream(const char *file, const struct proto_reply_ctx *ctx, struct run *r)
{
	size_t len;
	char *s = read_data(file, &len);

	run_every_split(r, chat(), msgs(), ctx, s, len);
	assert_true(r->ok);
	assert_false(r->encode_failed);
	free(s);
}

static void test_encode_tools(void **state)
{
	struct proto_reply_ctx ctx = {
	        .created = HARNESS_CREATED, .request_id = "r1", .model = "qwen"};
	struct run r, back;
	struct client_events ev;
	struct pivot_summary s;
	static const char *const want[] = {
	        "message_start",       "content_block_start", "ping",
	        "content_block_delta", "content_block_delta", "content_block_stop",
	        "content_block_start", "content_block_delta", "content_block_delta",
	        "content_block_delta", "content_block_stop",  "content_block_start",
	        "content_block_delta", "content_block_stop",  "message_delta",
	        "message_stop",
	};

	encode_chat_stream("chat_tools.sse", &ctx, &r);
	parse_client(r.out, &ev);
	assert_int_equal(ev.n, sizeof(want) / sizeof(want[0]));
	for (int i = 0; i < ev.n; i++) {
		assert_string_equal(ev.names[i], want[i]);
		/* the event: line names the data's type */
		assert_str_at(ev.data[i], "type", want[i]);
	}
	assert_str_at(ev.data[0], "message.id", "msg_r1");
	assert_str_at(ev.data[0], "message.model", "qwen");
	assert_str_at(ev.data[1], "content_block.type", "text");
	assert_int_at(ev.data[1], "index", 0);
	assert_str_at(ev.data[6], "content_block.type", "tool_use");
	assert_str_at(ev.data[6], "content_block.id", "call_abc123");
	assert_str_at(ev.data[6], "content_block.name", "get_weather");
	assert_int_at(ev.data[6], "index", 1);
	assert_str_at(ev.data[7], "delta.type", "input_json_delta");
	assert_int_at(ev.data[12], "index", 2);
	assert_str_at(ev.data[14], "delta.stop_reason", "tool_use");
	assert_int_at(ev.data[14], "usage.input_tokens", 56);
	assert_int_at(ev.data[14], "usage.cache_read_input_tokens", 64);
	assert_int_at(ev.data[14], "usage.output_tokens", 30);
	client_free(&ev);

	/* the Messages events read back give the same answer */
	reparse(r.out, msgs(), &back);
	assert_true(back.ok);
	summarize(back.chunks, &s);
	assert_string_equal(s.text, "Let me check the weather.");
	assert_int_equal(s.n_tools, 2);
	assert_string_equal(s.tool_args[0], "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
	assert_string_equal(s.tool_args[1], "{\"tz\":\"CET\"}");
	assert_string_equal(s.finish, "tool_calls");
	assert_int_equal(s.prompt, 120);
	assert_int_equal(s.cached, 64);
	assert_int_equal(s.completion, 30);
	run_free(&back);
	run_free(&r);
}

static void test_encode_thinking(void **state)
{
	json_t *req = load_json("{\"thinking\":{\"type\":\"enabled\",\"budget_tokens\":1024}}");
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED, .request = req};
	struct run r, back;
	struct pivot_summary s;
	struct client_events ev;

	encode_chat_stream("chat_text.sse", &ctx, &r);
	parse_client(r.out, &ev);
	assert_str_at(ev.data[1], "content_block.type", "thinking");
	assert_str_at(ev.data[ev.n - 2], "delta.stop_reason", "max_tokens");
	client_free(&ev);
	reparse(r.out, msgs(), &back);
	summarize(back.chunks, &s);
	assert_string_equal(s.reasoning, "The user greets; answer briefly.");
	assert_string_equal(s.text, "Bonjour à vous, ami");
	assert_string_equal(s.finish, "length");
	run_free(&back);
	run_free(&r);
	/* not asked for: no thinking block */
	ctx.request = NULL;
	encode_chat_stream("chat_text.sse", &ctx, &r);
	parse_client(r.out, &ev);
	assert_str_at(ev.data[1], "content_block.type", "text");
	client_free(&ev);
	run_free(&r);
	json_decref(req);
}

static void test_encode_cut_and_empty(void **state)
{
	struct proto_reply_ctx ctx = {.created = HARNESS_CREATED};
	const struct proto_codec *m = msgs();
	struct proto_encoder *e = m->encoder_new(&ctx);
	struct evbuffer *out = evbuffer_new();
	struct client_events ev;
	json_t *c = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"abc\"}}]}");

	assert_true(m->encode(e, c, out));
	m->stream_end(e, "length", out); /* the gateway cut it */
	parse_client(out, &ev);
	assert_int_equal(ev.n, 7);
	assert_string_equal(ev.names[4], "content_block_stop");
	assert_str_at(ev.data[5], "delta.stop_reason", "max_tokens");
	assert_string_equal(ev.names[6], "message_stop");
	client_free(&ev);
	m->encoder_free(e);
	json_decref(c);

	/* nothing at all: still a whole, valid message */
	evbuffer_drain(out, evbuffer_get_length(out));
	e = m->encoder_new(&ctx);
	m->stream_end(e, NULL, out);
	parse_client(out, &ev);
	assert_int_equal(ev.n, 3);
	assert_string_equal(ev.names[0], "message_start");
	assert_str_at(ev.data[1], "delta.stop_reason", "end_turn");
	client_free(&ev);
	m->encoder_free(e);
	evbuffer_free(out);
}

static void test_encode_interleaved_tools(void **state)
{
	const struct proto_codec *m = msgs();
	struct proto_encoder *e = m->encoder_new(NULL);
	struct evbuffer *out = evbuffer_new();
	json_t *a =
	        load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
	                  "\"id\":\"a\",\"function\":{\"name\":\"f\",\"arguments\":\"{\"}}]}}]}");
	json_t *b =
	        load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,"
	                  "\"id\":\"b\",\"function\":{\"name\":\"g\",\"arguments\":\"{\"}}]}}]}");
	json_t *a2 = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,"
	                       "\"function\":{\"arguments\":\"}\"}}]}}]}");

	assert_true(m->encode(e, a, out));
	assert_true(m->encode(e, b, out));
	/* a piece of a call whose block is closed cannot be expressed in Messages */
	assert_false(m->encode(e, a2, out));
	m->encoder_free(e);
	evbuffer_free(out);
	json_decref(a);
	json_decref(b);
	json_decref(a2);
}

/* Gemini gives every call index 0; some servers repeat the id on every piece. */
static void test_encode_tool_quirks(void **state)
{
	const struct proto_codec *m = msgs();
	struct proto_encoder *e = m->encoder_new(NULL);
	struct evbuffer *out = evbuffer_new();
	struct client_events ev;
	json_t *two = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":["
	                        "{\"index\":0,\"id\":\"a\",\"function\":{\"name\":\"f\","
	                        "\"arguments\":\"{}\"}},{\"index\":0,\"id\":\"b\",\"function\":"
	                        "{\"name\":\"g\",\"arguments\":\"{\\\"x\\\":1}\"}}]}}]}");
	json_t *rep1 = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	                         "\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"h\","
	                         "\"arguments\":\"{\\\"y\\\":\"}}]}}]}");
	json_t *rep2 = load_json("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{"
	                         "\"index\":0,\"id\":\"c\",\"function\":{\"arguments\":"
	                         "\"2}\"}}]}}]}");

	assert_true(m->encode(e, two, out));
	m->stream_end(e, NULL, out);
	parse_client(out, &ev);
	/* message_start, [start a, ping, delta, stop], [start b, delta, stop], message_delta,
	 * message_stop */
	assert_int_equal(ev.n, 10);
	assert_str_at(ev.data[1], "content_block.id", "a");
	assert_str_at(ev.data[5], "content_block.id", "b");
	assert_int_at(ev.data[5], "index", 1);
	assert_str_at(ev.data[6], "delta.partial_json", "{\"x\":1}");
	client_free(&ev);
	m->encoder_free(e);

	evbuffer_drain(out, evbuffer_get_length(out));
	e = m->encoder_new(NULL);
	assert_true(m->encode(e, rep1, out));
	assert_true(m->encode(e, rep2, out));
	m->stream_end(e, NULL, out);
	parse_client(out, &ev);
	/* one block: message_start, start, ping, delta, delta, stop, message_delta, stop */
	assert_int_equal(ev.n, 8);
	assert_str_at(ev.data[4], "delta.partial_json", "2}");
	client_free(&ev);
	m->encoder_free(e);
	evbuffer_free(out);
	json_decref(two);
	json_decref(rep1);
	json_decref(rep2);
}

/* ================================================================== errors and usage */

static void test_error_to_openai(void **state)
{
	static const struct {
		const char *type;
		int status;
		const char *otype, *code;
	} cases[] = {
	        {"invalid_request_error", 400, "invalid_request_error", "invalid_request"},
	        {"authentication_error", 401, "authentication_error", "invalid_api_key"},
	        {"permission_error", 403, "permission_error", "permission_denied"},
	        {"not_found_error", 404, "invalid_request_error", "not_found"},
	        {"request_too_large", 413, "invalid_request_error", "request_too_large"},
	        {"rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"},
	        {"api_error", 500, "server_error", "upstream_error"},
	        {"overloaded_error", 529, "server_error", "upstream_overloaded"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char body[256];
		struct proto_error err = {0};
		int n = snprintf(
		        body, sizeof(body),
		        "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"m%zu\"},"
		        "\"request_id\":\"req_1\"}",
		        cases[i].type, i);
		assert_true(msgs()->error_to_openai(body, (size_t)n, cases[i].status, &err));
		assert_int_equal(err.status, cases[i].status);
		assert_string_equal(err.type, cases[i].otype);
		assert_string_equal(err.code, cases[i].code);
	}
	/* not Anthropic's shape: the caller passes it through */
	struct proto_error err;
	{
		const char *b = "{\"error\":{\"message\":\"x\"}}";
		assert_false(msgs()->error_to_openai(b, strlen(b), 400, &err));
	}
	assert_false(msgs()->error_to_openai("<html>", 6, 502, &err));
	/* a length, not a NUL: the body stops where len says */
	assert_false(msgs()->error_to_openai("{\"type\":\"error\"", 5, 400, &err));
}

static void test_error_body(void **state)
{
	static const struct {
		int status;
		const char *type;
	} cases[] = {{400, "invalid_request_error"},
	             {401, "authentication_error"},
	             {403, "permission_error"},
	             {404, "not_found_error"},
	             {413, "request_too_large"},
	             {429, "rate_limit_error"},
	             {500, "api_error"},
	             {502, "api_error"},
	             {503, "overloaded_error"},
	             {529, "overloaded_error"}};
	struct evbuffer *out = evbuffer_new();

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct proto_error_out e = {.status = cases[i].status,
		                            .code = "quota_exceeded",
		                            .message = "no \"more\""};
		char *s;
		json_t *v;
		evbuffer_drain(out, evbuffer_get_length(out));
		msgs()->error_body(&e, out);
		s = buffer_string(out);
		v = load_json(s);
		assert_str_at(v, "type", "error");
		assert_str_at(v, "error.type", cases[i].type);
		assert_str_at(v, "error.message", "no \"more\"");
		assert_str_at(v, "error.code", "quota_exceeded"); /* OpenAI's member too */
		json_decref(v);
		free(s);
	}
	/* mid-stream: an error event with the same object */
	struct proto_error_out e = {.status = 502, .code = "upstream_error", .message = "cut"};
	struct client_events ev;
	evbuffer_drain(out, evbuffer_get_length(out));
	msgs()->stream_error(NULL, &e, out);
	parse_client(out, &ev);
	assert_int_equal(ev.n, 1);
	assert_string_equal(ev.names[0], "error");
	assert_str_at(ev.data[0], "error.type", "api_error");
	client_free(&ev);
	evbuffer_free(out);
}

static bool usage_event(void *arg, const struct sse_event *ev)
{
	msgs()->stream_usage(ev, arg);
	return true;
}

static void test_stream_usage(void **state)
{
	static const struct {
		const char *file;
		uint64_t prompt, cached, completion;
	} cases[] = {{"anthropic_text.sse", 2125, 2000, 15},
	             {"anthropic_tools.sse", 472, 0, 89},
	             {"anthropic_thinking.sse", 12, 0, 260}};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t len;
		char *s = read_data(cases[i].file, &len);
		struct record_usage u = {0};
		struct sse_parser p;
		sse_parser_init(&p, 0);
		assert_true(sse_feed(&p, s, len, usage_event, &u));
		sse_parser_free(&p);
		assert_true(u.present);
		assert_int_equal(u.prompt, cases[i].prompt);
		assert_int_equal(u.cached, cases[i].cached);
		assert_int_equal(u.completion, cases[i].completion);
		assert_int_equal(u.total, cases[i].prompt + cases[i].completion);
		free(s);
	}
}

static void test_provider_ops(void **state)
{
	const struct provider_ops *a = provider_ops(PROVIDER_ANTHROPIC);

	assert_int_equal(a->upstream, PROTO_MESSAGES);
	assert_string_equal(a->default_endpoint, "https://api.anthropic.com/v1/messages");
	assert_string_equal(a->extra_headers[0], "anthropic-version: 2023-06-01");
	assert_null(a->extra_headers[1]);
	assert_null(a->drop_model);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_request_from_chat_full),
	        cmocka_unit_test(test_request_from_chat_max_tokens),
	        cmocka_unit_test(test_request_from_chat_tool_choice),
	        cmocka_unit_test(test_request_from_chat_refused),
	        cmocka_unit_test(test_response_to_chat),
	        cmocka_unit_test(test_stop_reasons),
	        cmocka_unit_test(test_response_to_chat_broken),
	        cmocka_unit_test(test_request_to_chat_full),
	        cmocka_unit_test(test_request_to_chat_tool_choice),
	        cmocka_unit_test(test_request_to_chat_refused),
	        cmocka_unit_test(test_response_from_chat),
	        cmocka_unit_test(test_decode_text),
	        cmocka_unit_test(test_decode_tools),
	        cmocka_unit_test(test_decode_thinking),
	        cmocka_unit_test(test_decode_overloaded),
	        cmocka_unit_test(test_decode_broken),
	        cmocka_unit_test(test_encode_tools),
	        cmocka_unit_test(test_encode_thinking),
	        cmocka_unit_test(test_encode_cut_and_empty),
	        cmocka_unit_test(test_encode_interleaved_tools),
	        cmocka_unit_test(test_encode_tool_quirks),
	        cmocka_unit_test(test_error_to_openai),
	        cmocka_unit_test(test_error_body),
	        cmocka_unit_test(test_stream_usage),
	        cmocka_unit_test(test_provider_ops),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
