/* test_policy_request_limits.c — request_limits: configuration errors, and each limit's refusal
 * (status, code) and the requests just under it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - request_limits: { max_messages: 0, max_n: 129, max_tools: -1, "
	        "deny_params: [logit_bias, n], allow_params: [n], max_prompt: 5 }\n",
	        "t.yaml:7:41: routes[0].plugins[0].request_limits.max_messages: must be an "
	        "integer from 1 to 1000000",
	        "t.yaml:7:51: routes[0].plugins[0].request_limits.max_n: must be an integer "
	        "from 1 to 128",
	        "t.yaml:7:67: routes[0].plugins[0].request_limits.max_tools: must be an "
	        "integer from 0 to 1000000",
	        "t.yaml:7:97: routes[0].plugins[0].request_limits.deny_params[1]: \"n\" is "
	        "also in allow_params",
	        "t.yaml:7:120: routes[0].plugins[0].request_limits: unknown key "
	        "\"max_prompt\"");
}

static const char *limits = "      - request_limits:\n"
                            "          max_messages: 3\n"
                            "          max_prompt_tokens: 100\n"
                            "          max_tools: 1\n"
                            "          max_stop: 2\n"
                            "          max_n: 2\n"
                            "          max_body_depth: 5\n"
                            "          deny_params: [logit_bias]\n";

/* The code of the refusal, or "" when the request passes. */
static const char *check(const char *plugins, enum proto proto, const char *body, char *code)
{
	struct config *c = pt_load(plugins);
	json_t *b = pt_json(body);
	struct policy_run *run;
	enum policy_verdict v = pt_request(c, proto, b, &run);
	const struct policy_request *out = policy_run_request_outcome(run);
	strcpy(code, v == POLICY_REFUSE ? out->code : "");
	if (v == POLICY_REFUSE)
		assert_int_equal(out->status, 400);
	policy_run_free(run);
	json_decref(b);
	config_unref(c);
	return code;
}

static void test_limits(void **state)
{
	char code[64];
	const char *m3 =
	        "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\","
	        "\"content\":\"b\"},{\"role\":\"user\",\"content\":\"c\"}]";

	char body[1024];
	snprintf(body, sizeof body, "%s}", m3);
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "");
	assert_string_equal(
	        check(limits, PROTO_CHAT,
	              "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"user\","
	              "\"content\":\"a\"},{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"user\","
	              "\"content\":\"a\"}]}",
	              code),
	        "max_messages_exceeded");
	assert_string_equal(check(limits, PROTO_RESPONSES, "{\"input\":[{},{},{},{}]}", code),
	                    "max_messages_exceeded");
	assert_string_equal(check(limits, PROTO_RESPONSES, "{\"input\":\"one\"}", code), "");

	/* 100 tokens at 4 bytes each: 500 bytes of text are too many */
	char big[700];
	memset(big, 'x', 500);
	big[500] = '\0';
	snprintf(body, sizeof body, "{\"prompt\":\"%s\"}", big);
	assert_string_equal(check(limits, PROTO_COMPLETIONS, body, code),
	                    "max_prompt_tokens_exceeded");

	snprintf(body, sizeof body, "%s,\"tools\":[{},{}]}", m3);
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "max_tools_exceeded");
	snprintf(body, sizeof body, "%s,\"tools\":[{}],\"stop\":[\"a\",\"b\"]}", m3);
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "");
	snprintf(body, sizeof body, "%s,\"stop_sequences\":[\"a\",\"b\",\"c\"]}", m3);
	assert_string_equal(check(limits, PROTO_MESSAGES, body, code), "max_stop_exceeded");
	snprintf(body, sizeof body, "%s,\"n\":3}", m3);
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "max_n_exceeded");
	snprintf(body, sizeof body, "%s,\"logit_bias\":{}}", m3);
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "param_denied");
	/* depth: the body is 1, messages 2, a message 3, its content 4, a part 5 */
	snprintf(body, sizeof body,
	         "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	         "\"a\"}]}]}");
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "");
	snprintf(body, sizeof body, "{\"metadata\":{\"a\":{\"b\":{\"c\":[[1]]}}}}");
	assert_string_equal(check(limits, PROTO_CHAT, body, code), "max_body_depth_exceeded");
}

static void test_allow_params(void **state)
{
	char code[64];
	const char *allow = "      - request_limits: { allow_params: [temperature] }\n";

	/* model, stream and the prompt keys are always allowed */
	assert_string_equal(
	        check(allow, PROTO_CHAT,
	              "{\"model\":\"m\",\"stream\":true,\"messages\":[],\"temperature\":1}", code),
	        "");
	assert_string_equal(check(allow, PROTO_CHAT, "{\"messages\":[],\"top_p\":1}", code),
	                    "param_not_allowed");
	assert_string_equal(check("      - request_limits: { allow_params: [] }\n", PROTO_RESPONSES,
	                          "{\"input\":\"x\",\"instructions\":\"y\",\"temperature\":1}",
	                          code),
	                    "param_not_allowed");
	assert_string_equal(check("      - request_limits: { max_tools: 0 }\n", PROTO_CHAT,
	                          "{\"tools\":[{}]}", code),
	                    "max_tools_exceeded");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test(test_limits),
	        cmocka_unit_test(test_allow_params),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
