/* test_provider_table.c — the provider and protocol tables (provider.c) and their agreement with
 * the loader. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "provider_harness.h"

#include "sluice/config.h"

static enum proto of(const char *path)
{
	/* not NUL-terminated: the byte after the path is not a NUL */
	char buf[256];
	size_t n = strlen(path);

	assert_true(n + 1 < sizeof(buf));
	memcpy(buf, path, n);
	buf[n] = 'X';
	return proto_of_path(buf, n);
}

static void test_proto_of_path(void **state)
{
	assert_int_equal(of("/v1/chat/completions"), PROTO_CHAT);
	assert_int_equal(of("/openai/v1/chat/completions?x=1"), PROTO_CHAT);
	assert_int_equal(of("/v1/completions"), PROTO_COMPLETIONS);
	assert_int_equal(of("/v1/embeddings"), PROTO_EMBEDDINGS);
	assert_int_equal(of("/v1/responses"), PROTO_RESPONSES);
	assert_int_equal(of("/v1/messages"), PROTO_MESSAGES);
	assert_int_equal(of("/anthropic/v1/messages"), PROTO_MESSAGES);
	assert_int_equal(of("/v1/messages/count_tokens"), PROTO_COUNT_TOKENS);
	assert_int_equal(of("/v1/models"), PROTO_OTHER);
	assert_int_equal(of("/v1/chatcompletions"), PROTO_OTHER);
	assert_int_equal(of("/v1/xmessages"), PROTO_OTHER);
	assert_int_equal(of("/v1/messages/"), PROTO_OTHER);
	assert_int_equal(of(""), PROTO_OTHER);
	assert_int_equal(proto_of_path(NULL, 0), PROTO_OTHER);
	/* a query is not part of the path */
	assert_int_equal(of("/v1/models?q=/chat/completions"), PROTO_OTHER);
}

static void test_names_and_codecs(void **state)
{
	assert_string_equal(proto_name(PROTO_CHAT), "chat");
	assert_string_equal(proto_name(PROTO_MESSAGES), "messages");
	assert_string_equal(proto_name(PROTO_RESPONSES), "responses");
	assert_string_equal(proto_name(PROTO__COUNT), "?");
	for (int p = 0; p < PROTO__COUNT; p++) {
		const struct proto_codec *c = proto_codec((enum proto)p);
		bool translated = p == PROTO_CHAT || p == PROTO_MESSAGES || p == PROTO_RESPONSES;
		assert_int_equal(c != NULL, translated);
		if (c == NULL)
			continue;
		assert_int_equal(c->proto, p);
		assert_string_equal(c->name, proto_name((enum proto)p));
		/* every member is set */
		assert_non_null(c->request_to_chat);
		assert_non_null(c->request_from_chat);
		assert_non_null(c->response_to_chat);
		assert_non_null(c->response_from_chat);
		assert_non_null(c->decoder_new);
		assert_non_null(c->decode);
		assert_non_null(c->decoder_free);
		assert_non_null(c->encoder_new);
		assert_non_null(c->encode);
		assert_non_null(c->stream_end);
		assert_non_null(c->encoder_free);
		assert_non_null(c->error_to_openai);
		assert_non_null(c->error_body);
		assert_non_null(c->stream_error);
		assert_non_null(c->stream_usage);
		/* freeing nothing is fine */
		c->decoder_free(NULL);
		c->encoder_free(NULL);
	}
	assert_null(proto_codec(PROTO__COUNT));
}

/* The table and the loader agree: every provider the loader knows has an adapter of the
 * same name, and an instance without endpoint gets the adapter's default. */
static void test_agrees_with_loader(void **state)
{
	static const enum provider all[] = {PROVIDER_OPENAI,       PROVIDER_OPENAI_COMPATIBLE,
	                                    PROVIDER_AZURE_OPENAI, PROVIDER_DEEPSEEK,
	                                    PROVIDER_OPENROUTER,   PROVIDER_GEMINI,
	                                    PROVIDER_ANTHROPIC};
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
		const struct provider_ops *p = provider_ops(all[i]);
		char yaml[512];
		struct config_errors errs;
		struct config *c;

		assert_non_null(p);
		assert_int_equal(p->id, all[i]);
		assert_string_equal(p->name, config_provider_name(all[i]));
		assert_ptr_equal(provider_by_name(p->name), p);
		if (p->default_endpoint == NULL)
			continue;
		snprintf(yaml, sizeof(yaml),
		         "instances:\n  - name: a\n    provider: %s\nroutes:\n  - name: r\n"
		         "    paths: [/v1/chat/completions]\n    targets: [{ instance: a }]\n",
		         p->name);
		c = config_load_string(yaml, strlen(yaml), "t.yaml", &errs);
		if (c == NULL)
			fail_msg("%s: %s", p->name, errs.n ? errs.msgs[0] : "?");
		assert_string_equal(c->instances[0].endpoint, p->default_endpoint);
		config_unref(c);
	}
	assert_null(provider_by_name("bedrock"));
	assert_null(provider_by_name(NULL));
	assert_null(provider_ops((enum provider)99));
}

static void test_upstream_proto(void **state)
{
	struct config_kv q = {.name = "key", .value = "v"};
	struct config_instance oai = {.provider = PROVIDER_OPENAI,
	                              .endpoint = "https://api.openai.com/v1/chat/completions",
	                              .url = "https://api.openai.com/v1/chat/completions"};
	struct config_instance vllm = {.provider = PROVIDER_OPENAI_COMPATIBLE,
	                               .endpoint = "http://10.0.0.11:8000/v1/chat/completions",
	                               .url = "http://10.0.0.11:8000/v1/chat/completions"};
	struct config_instance claude = {.provider = PROVIDER_ANTHROPIC,
	                                 .endpoint = "https://api.anthropic.com/v1/messages",
	                                 .url = "https://api.anthropic.com/v1/messages"};
	struct config_instance proxy = {.provider = PROVIDER_ANTHROPIC,
	                                .endpoint = "https://llm-proxy.corp/anthropic/v1/messages",
	                                .url = "https://llm-proxy.corp/anthropic/v1/messages"};
	const char *url;

	/* identity: the same protocol, the instance's own URL */
	assert_int_equal(provider_upstream_proto(&vllm, PROTO_CHAT, &url), PROTO_CHAT);
	assert_string_equal(url, vllm.url);
	assert_int_equal(provider_upstream_proto(&vllm, PROTO_EMBEDDINGS, &url), PROTO_EMBEDDINGS);
	assert_int_equal(provider_upstream_proto(&claude, PROTO_MESSAGES, &url), PROTO_MESSAGES);
	/* translations */
	assert_int_equal(provider_upstream_proto(&vllm, PROTO_MESSAGES, &url), PROTO_CHAT);
	assert_string_equal(url, vllm.url);
	assert_int_equal(provider_upstream_proto(&claude, PROTO_CHAT, &url), PROTO_MESSAGES);
	assert_int_equal(provider_upstream_proto(&claude, PROTO_RESPONSES, &url), PROTO_MESSAGES);
	assert_int_equal(provider_upstream_proto(&vllm, PROTO_RESPONSES, &url), PROTO_CHAT);
	/* OpenAI on its own endpoint serves the Responses API itself */
	assert_int_equal(provider_upstream_proto(&oai, PROTO_RESPONSES, &url), PROTO_RESPONSES);
	assert_string_equal(url, "https://api.openai.com/v1/responses");
	oai.auth_query = &q;
	oai.n_auth_query = 1;
	assert_int_equal(provider_upstream_proto(&oai, PROTO_RESPONSES, &url), PROTO_CHAT);
	/* count_tokens: Anthropic's own endpoint only */
	assert_int_equal(provider_upstream_proto(&claude, PROTO_COUNT_TOKENS, &url),
	                 PROTO_COUNT_TOKENS);
	assert_string_equal(url, "https://api.anthropic.com/v1/messages/count_tokens");
	assert_int_equal(provider_upstream_proto(&proxy, PROTO_COUNT_TOKENS, &url), PROTO__COUNT);
	assert_null(url);
	assert_int_equal(provider_upstream_proto(&vllm, PROTO_COUNT_TOKENS, &url), PROTO__COUNT);
	/* what an Anthropic instance cannot serve at all */
	assert_int_equal(provider_upstream_proto(&claude, PROTO_EMBEDDINGS, &url), PROTO__COUNT);
	assert_int_equal(provider_upstream_proto(&claude, PROTO_COMPLETIONS, &url), PROTO__COUNT);
	assert_int_equal(provider_upstream_proto(&claude, PROTO_OTHER, &url), PROTO__COUNT);
	assert_int_equal(provider_upstream_proto(NULL, PROTO_CHAT, &url), PROTO__COUNT);
}

static void test_helpers(void **state)
{
	struct record_usage u = {0};
	json_t *c = load_json("{\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,"
	                      "\"prompt_tokens_details\":{\"cached_tokens\":4},"
	                      "\"completion_tokens_details\":{\"reasoning_tokens\":2}}}");
	struct evbuffer *out = evbuffer_new();
	char *s;

	assert_true(proto_usage_from_chat(c, &u));
	assert_int_equal(u.total, 15);
	assert_int_equal(u.cached, 4);
	assert_int_equal(u.reasoning, 2);
	assert_true(u.present);
	json_decref(c);
	c = load_json("{\"usage\":null}");
	u.prompt = 77;
	assert_false(proto_usage_from_chat(c, &u));
	assert_int_equal(u.prompt, 77); /* untouched */
	json_decref(c);
	c = load_json("{\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":1e300}}");
	assert_true(proto_usage_from_chat(c, &u));
	assert_int_equal(u.prompt, 0);
	assert_int_equal(u.completion, PROTO_USAGE_MAX); /* clamped: sums cannot wrap */
	json_decref(c);

	c = load_json("{\"a\":\"é\\n\"}");
	assert_true(proto_sse_append(out, "x", c));
	assert_true(proto_sse_append(out, NULL, c));
	s = buffer_string(out);
	assert_string_equal(s, "event: x\ndata: {\"a\":\"é\\n\"}\n\ndata: {\"a\":\"é\\n\"}\n\n");
	free(s);
	json_decref(c);
	evbuffer_free(out);

	struct proto_error err;
	proto_error_set(&err, 418, "t", "c", "%s-%d", "x", 7);
	assert_int_equal(err.status, 418);
	assert_string_equal(err.message, "x-7");
	assert_string_equal(proto_type_for_status(401), "authentication_error");
	assert_string_equal(proto_type_for_status(403), "permission_error");
	assert_string_equal(proto_type_for_status(429), "rate_limit_error");
	assert_string_equal(proto_type_for_status(503), "server_error");
	assert_string_equal(proto_type_for_status(422), "invalid_request_error");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_proto_of_path),
	        cmocka_unit_test(test_names_and_codecs),
	        cmocka_unit_test(test_agrees_with_loader),
	        cmocka_unit_test(test_upstream_proto),
	        cmocka_unit_test(test_helpers),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
