/* test_policy_chain.c — the runner (policy.c): the request chain in order and stopped by a
 * refusal; response text handed from policy to policy; the pivot chunk and completion helpers;
 * the final flush; decisions counted once per (policy, action); alerts; limits on choices. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

#define CARD "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"] }\n"

static void test_table(void **state)
{
	static const char *const names[] = {
	        "prompt_guard",   "prompt_decorator", "request_override", "request_limits",
	        "response_guard", "loop_guard",       "moderation",       "external"};
	for (size_t i = 0; i < PT_ARRAY_LEN(names); i++) {
		assert_non_null(policy_find(names[i]));
		assert_string_equal(policy_at(i)->name, names[i]);
	}
	assert_null(policy_at(PT_ARRAY_LEN(names)));
	assert_null(policy_find("nope"));
}

static void test_request_order(void **state)
{
	struct config *c = pt_load("      - prompt_decorator: { prepend: [{ role: system, content: "
	                           "S }] }\n"
	                           "      - request_override: { cap: { max_tokens: 10 } }\n");
	json_t *b = pt_json("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
	struct policy_run *run;
	assert_int_equal(pt_request(c, PROTO_CHAT, b, &run), POLICY_CONTINUE);
	pt_assert_json(b,
	               "{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\","
	               "\"content\":\"hi\"}],\"max_tokens\":10}");
	assert_true(policy_run_request_outcome(run)->changed);
	const struct policy_action *a;
	assert_int_equal(policy_run_actions(run, &a, NULL), 2);
	assert_string_equal(a[0].policy, "prompt_decorator");
	assert_string_equal(a[0].action, "decorated");
	assert_string_equal(a[1].policy, "request_override");
	assert_string_equal(a[1].action, "capped");
	policy_run_free(run);
	json_decref(b);
	config_unref(c);

	/* a refusal ends the chain: the override after the guard never runs */
	c = pt_load("      - prompt_guard: { deny: [forbidden] }\n"
	            "      - request_override: { set: { x: 1 } }\n");
	b = pt_json("{\"messages\":[{\"role\":\"user\",\"content\":\"forbidden\"}]}");
	assert_int_equal(pt_request(c, PROTO_CHAT, b, &run), POLICY_REFUSE);
	assert_null(json_object_get(b, "x"));
	assert_int_equal(policy_run_actions(run, &a, NULL), 1);
	policy_run_free(run);
	json_decref(b);
	config_unref(c);
}

static void test_text_through_the_chain(void **state)
{
	/* the loop guard sees what the response guard let out: repeated masks are a loop */
	struct config *c = pt_load(CARD "      - loop_guard: { max_repeats: 8, window: 512 }\n");
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	struct evbuffer *out = evbuffer_new();
	enum policy_verdict v = POLICY_CONTINUE;
	/* card numbers cut in two, over and over */
	for (int i = 0; i < 20 && v == POLICY_CONTINUE; i++) {
		v = policy_run_text(run, 0, "12345678", 8, false, out);
		if (v == POLICY_CONTINUE)
			v = policy_run_text(run, 0, "12345678 ", 9, false, out);
	}
	assert_int_equal(v, POLICY_STOP);
	assert_string_equal(policy_run_stopped(run), "length");
	evbuffer_add(out, "", 1);
	const char *s = (const char *)evbuffer_pullup(out, -1);
	assert_null(strstr(s, "1234"));
	assert_non_null(strstr(s, "[redacted] [redacted] "));
	const struct policy_action *a;
	assert_int_equal(policy_run_actions(run, &a, NULL), 2);
	assert_string_equal(a[0].action, "masked");
	assert_true(a[0].count >= 8);
	assert_string_equal(a[1].action, "cut");
	/* alerts go out once (without a webhook they are dropped) */
	policy_run_emit_alerts(run, json_pack("{s:s}", "instance", "a"));
	assert_true(a[1].alerted);
	assert_false(a[0].alerted);
	policy_run_emit_alerts(run, NULL);
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

static void test_chat_chunks(void **state)
{
	struct config *c = pt_load(CARD);
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	json_t *c1 = pt_json("{\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
	                     "\"content\":\"card 12345678\"},\"finish_reason\":null}]}");
	json_t *c2 = pt_json("{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"12345678.\"},"
	                     "\"finish_reason\":null}]}");
	json_t *c3 =
	        pt_json("{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}");
	json_t *usage = pt_json("{\"choices\":[],\"usage\":{\"prompt_tokens\":1}}");
	assert_int_equal(policy_run_chat_chunk(run, c1), POLICY_CONTINUE);
	pt_assert_json(c1,
	               "{\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":"
	               "\"card \"},\"finish_reason\":null}]}");
	assert_int_equal(policy_run_chat_chunk(run, c2), POLICY_CONTINUE);
	pt_assert_json(c2, "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"[redacted].\"},"
	                   "\"finish_reason\":null}]}");
	/* nothing held: the finish adds nothing */
	assert_int_equal(policy_run_chat_chunk(run, c3), POLICY_CONTINUE);
	pt_assert_json(c3, "{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}");
	json_t *c4 = pt_json("{\"choices\":[{\"index\":1,\"delta\":{\"content\":\"no 1234\"}}]}");
	json_t *c5 =
	        pt_json("{\"choices\":[{\"index\":1,\"delta\":{},\"finish_reason\":\"length\"}]}");
	assert_int_equal(policy_run_chat_chunk(run, c4), POLICY_CONTINUE);
	pt_assert_json(c4, "{\"choices\":[{\"index\":1,\"delta\":{\"content\":\"no \"}}]}");
	/* held text is released into the chunk that finishes its choice */
	assert_int_equal(policy_run_chat_chunk(run, c5), POLICY_CONTINUE);
	pt_assert_json(c5, "{\"choices\":[{\"index\":1,\"delta\":{\"content\":\"1234\"},"
	                   "\"finish_reason\":\"length\"}]}");
	json_decref(c4);
	json_decref(c5);
	assert_int_equal(policy_run_chat_chunk(run, usage), POLICY_CONTINUE);
	pt_assert_json(usage, "{\"choices\":[],\"usage\":{\"prompt_tokens\":1}}");
	json_decref(c1);
	json_decref(c2);
	json_decref(c3);
	json_decref(usage);
	policy_run_free(run);

	/* block: the stopped chunk keeps the text before the match, no upstream finish */
	config_unref(c);
	c = pt_load("      - response_guard: { deny: [secret], action: block }\n");
	run = policy_run_new(pt_route(c), &pt_env, true);
	c1 = pt_json("{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"the secret is\"},"
	             "\"finish_reason\":\"stop\"}]}");
	assert_int_equal(policy_run_chat_chunk(run, c1), POLICY_STOP);
	pt_assert_json(c1, "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"the \"},"
	                   "\"finish_reason\":null}]}");
	assert_string_equal(policy_run_stopped(run), "content_filter");
	json_decref(c1);
	policy_run_free(run);
	config_unref(c);
}

static void test_chat_completion(void **state)
{
	struct config *c = pt_load("      - response_guard: { deny: [secret], action: block }\n");
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, false);
	json_t *comp =
	        pt_json("{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
	                "\"content\":\"all fine\"},\"finish_reason\":\"stop\"},{\"index\":1,"
	                "\"message\":{\"role\":\"assistant\",\"content\":\"a secret!\"},"
	                "\"finish_reason\":\"stop\"},{\"index\":2,\"message\":{\"role\":"
	                "\"assistant\",\"content\":null,\"tool_calls\":[]},\"finish_reason\":"
	                "\"tool_calls\"}]}");
	assert_int_equal(policy_run_chat_completion(run, comp), POLICY_STOP);
	/* only the choice that matched is cut */
	pt_assert_json(comp, "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
	                     "\"content\":\"all fine\"},\"finish_reason\":\"stop\"},{\"index\":1,"
	                     "\"message\":{\"role\":\"assistant\",\"content\":\"a \"},"
	                     "\"finish_reason\":\"content_filter\"},{\"index\":2,\"message\":{"
	                     "\"role\":\"assistant\",\"content\":null,\"tool_calls\":[]},"
	                     "\"finish_reason\":\"tool_calls\"}]}");
	assert_null(policy_run_finish_reason(run, 0));
	assert_string_equal(policy_run_finish_reason(run, 1), "content_filter");
	assert_int_equal(policy_run_done(run, NULL, NULL), POLICY_CONTINUE);
	json_decref(comp);
	policy_run_free(run);
	config_unref(c);
}

struct flushed {
	char text[64];
	unsigned choice;
	int calls;
};

static void on_flush(void *arg, unsigned choice, const char *text, size_t len)
{
	struct flushed *f = arg;
	snprintf(f->text, sizeof f->text, "%.*s", (int)len, text);
	f->choice = choice;
	f->calls++;
}

/* One document through policy_run_chat_bytes; expect: NULL = unchanged, else the bytes the
 * client gets (exactly). */
static enum policy_verdict bytes_through(struct policy_run *run, bool chunk, const char *doc,
                                         const char *expect)
{
	struct evbuffer *out = evbuffer_new();
	struct policy_chat_bytes res;
	enum policy_verdict v = policy_run_chat_bytes(run, doc, strlen(doc), chunk, out, &res);

	assert_true(res.read);
	if (expect == NULL) {
		assert_false(res.changed);
		assert_int_equal(evbuffer_get_length(out), 0);
	} else {
		assert_true(res.changed);
		evbuffer_add(out, "", 1);
		assert_string_equal((const char *)evbuffer_pullup(out, -1), expect);
	}
	evbuffer_free(out);
	return v;
}

static void test_chat_bytes(void **state)
{
	struct config *c = pt_load(CARD);
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);

	/* untouched text: the upstream's bytes stand, no copy */
	assert_int_equal(bytes_through(run, true,
	                               "{\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":"
	                               "{\"content\":\"hello \\\"you\\\"\"}}]}",
	                               NULL),
	                 POLICY_CONTINUE);
	/* escapes decoded for the guard (\u0031 is a digit, \n a word boundary), the held and
	 * the masked text spliced back as JSON strings; the rest of the bytes as they were */
	assert_int_equal(bytes_through(run, true,
	                               "{\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":"
	                               "{\"content\":\"x\\n\\u003123456\"} , \"n\":1}]}",
	                               "{\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":"
	                               "{\"content\":\"x\\n\"} , \"n\":1}]}"),
	                 POLICY_CONTINUE);
	/* the rest of the number: masked across the two events */
	assert_int_equal(bytes_through(run, true,
	                               "{\"choices\":[{\"index\":0,\"delta\":{\"content\":"
	                               "\"7890123456\\u002e\"}}]}",
	                               "{\"choices\":[{\"index\":0,\"delta\":{\"content\":"
	                               "\"[redacted].\"}}]}"),
	                 POLICY_CONTINUE);
	policy_run_free(run);
	/* the finish releases what is held: into a delta that had no content */
	run = policy_run_new(pt_route(c), &pt_env, true);
	assert_int_equal(bytes_through(run, true,
	                               "{\"choices\":[{\"index\":0,\"delta\":{\"content\":"
	                               "\"a 12\"}}]}",
	                               "{\"choices\":[{\"index\":0,\"delta\":{\"content\":"
	                               "\"a \"}}]}"),
	                 POLICY_CONTINUE);
	assert_int_equal(bytes_through(run, true,
	                               "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,"
	                               "\"delta\":{\"role\":\"assistant\"}}]}",
	                               "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,"
	                               "\"delta\":{\"content\":\"12\",\"role\":\"assistant\"}}]}"),
	                 POLICY_CONTINUE);
	policy_run_free(run);

	/* what the reader declines, having run nothing: the tree path decides */
	run = policy_run_new(pt_route(c), &pt_env, true);
	static const char *const declined[] = {
	        "{\"choices\":[{\"delta\":{\"content\":\"1\",\"content\":\"2\"}}]}",
	        "{\"choices\":[{\"delta\":{\"c\\u006fntent\":\"1234567812345678\"}}]}",
	        "{\"choices\":[],\"choices\":[{\"delta\":{\"content\":\"x\"}}]}",
	        "{\"error\":{\"message\":\"overloaded\"}}",
	        "{\"object\":\"error\",\"message\":\"x\"}",
	        "{\"choices\":[{\"delta\":{\"content\":\"\\ud800\"}}]}",
	        "{\"choices\":[{\"delta\":{\"content\":\"\xc3\"}}]}",
	        "{\"choices\":[{\"delta\":{\"content\":\"a\"}}]} x",
	        "[1]",
	};
	for (size_t i = 0; i < sizeof declined / sizeof declined[0]; i++) {
		struct evbuffer *out = evbuffer_new();
		struct policy_chat_bytes res;
		policy_run_chat_bytes(run, declined[i], strlen(declined[i]), true, out, &res);
		assert_false(res.read);
		assert_false(policy_chat_bytes_readable(declined[i], strlen(declined[i]), true));
		evbuffer_free(out);
	}
	policy_run_free(run);
	config_unref(c);

	/* a non-stream answer cut by a block: the text before the match, the gateway's finish
	 * reason replacing the upstream's */
	c = pt_load("      - response_guard: { deny: [secret], action: block }\n");
	run = policy_run_new(pt_route(c), &pt_env, false);
	assert_int_equal(bytes_through(run, false,
	                               "{\"choices\":[{\"index\":0,\"message\":{\"role\":"
	                               "\"assistant\",\"content\":\"the \\\"s\\u0065cret\\\"\"},"
	                               "\"finish_reason\":\"stop\"}]}",
	                               "{\"choices\":[{\"index\":0,\"message\":{\"role\":"
	                               "\"assistant\",\"content\":\"the \\\"\"},"
	                               "\"finish_reason\":\"content_filter\"}]}"),
	                 POLICY_STOP);
	policy_run_free(run);
	config_unref(c);
}

static void test_flush_and_limits(void **state)
{
	struct config *c = pt_load(CARD);
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	struct evbuffer *out = evbuffer_new();
	struct flushed f = {.calls = 0};

	assert_int_equal(policy_run_text(run, 3, "ends with 1234", 14, false, out),
	                 POLICY_CONTINUE);
	assert_int_equal(evbuffer_get_length(out), strlen("ends with "));
	/* the upstream ended without a finish for choice 3: its held text comes out */
	assert_int_equal(policy_run_flush(run, on_flush, &f), POLICY_CONTINUE);
	assert_int_equal(f.calls, 1);
	assert_int_equal(f.choice, 3);
	assert_string_equal(f.text, "1234");
	/* a choice index past the limit cannot be filtered: the answer ends */
	assert_int_equal(policy_run_text(run, POLICY_MAX_CHOICES, "x", 1, false, out),
	                 POLICY_REFUSE);
	json_t *chunk = pt_json("{\"choices\":[{\"index\":100000,\"delta\":{\"content\":\"x\"}}]}");
	assert_int_equal(policy_run_chat_chunk(run, chunk), POLICY_REFUSE);
	json_decref(chunk);
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

static void test_governance_example(void **state)
{
	struct config_errors e;
	setenv("SLUICE_ADMIN_KEY", "admin", 1);
	setenv("APP_TEAM_KEY", "team", 1);
	setenv("MODERATION_API_KEY", "mod", 1);
	setenv("ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook", 1);
	struct config *c = config_load(TEST_DATA_DIR "/../../../conf/examples/governance.yaml", &e);
	for (size_t i = 0; c == NULL && i < e.n; i++)
		print_error("%s\n", e.msgs[i]);
	assert_non_null(c);
	static const char *const chat[] = {"request_limits",   "prompt_guard",    "moderation",
	                                   "prompt_decorator", "request_override", "response_guard",
	                                   "loop_guard"};
	const struct config_route *r = config_find_route(c, "chat");
	assert_int_equal(r->n_plugins, PT_ARRAY_LEN(chat));
	for (size_t i = 0; i < PT_ARRAY_LEN(chat); i++)
		assert_string_equal(r->plugins[i].name, chat[i]);
	assert_int_equal(r->plugin_phases, POLICY_PHASE_REQUEST | POLICY_PHASE_RESPONSE);
	assert_int_equal(config_find_route(c, "messages")->n_plugins, 6);
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_table),
	        cmocka_unit_test(test_request_order),
	        cmocka_unit_test(test_text_through_the_chain),
	        cmocka_unit_test(test_chat_chunks),
	        cmocka_unit_test(test_chat_completion),
	        cmocka_unit_test(test_chat_bytes),
	        cmocka_unit_test(test_flush_and_limits),
	        cmocka_unit_test(test_governance_example),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
