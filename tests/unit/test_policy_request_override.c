/* test_policy_request_override.c — request_override: configuration errors; remove, set (deep),
 * defaults (only where absent), cap (numbers, the output-cap family, set when absent); the
 * configured values are copied into bodies, never shared with them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - request_override: { set: { model: x, stream: true }, remove: [a, "
	        "stream], defaults: [] }\n",
	        "t.yaml:7:36: routes[0].plugins[0].request_override.set.model: model cannot "
	        "be overridden: the route and the kind of answer are chosen from it before "
	        "the policies run",
	        "t.yaml:7:46: routes[0].plugins[0].request_override.set.stream: stream "
	        "cannot be overridden: the route and the kind of answer are chosen from it "
	        "before the policies run",
	        "t.yaml:7:74: routes[0].plugins[0].request_override.remove[1]: stream "
	        "cannot be removed: the route and the kind of answer are chosen from it "
	        "before the policies run",
	        "t.yaml:7:93: routes[0].plugins[0].request_override.defaults: must be a "
	        "mapping, not a list");
	PT_EXPECT_ERRORS(
	        "      - request_override: { cap: { n: \"2\", top_p: .nan }, sett: {} }\n",
	        "t.yaml:7:39: routes[0].plugins[0].request_override.cap.n: must be a number",
	        "t.yaml:7:51: routes[0].plugins[0].request_override.cap.top_p: must be a "
	        "number",
	        "t.yaml:7:59: routes[0].plugins[0].request_override: unknown key \"sett\" "
	        "(did you mean \"set\"?)");
}

static json_t *apply(const char *plugins, enum proto proto, const char *body,
                     enum policy_verdict want, struct policy_request *out)
{
	struct config *c = pt_load(plugins);
	json_t *b = pt_json(body);
	struct policy_run *run;
	assert_int_equal(pt_request(c, proto, b, &run), want);
	if (out != NULL)
		*out = *policy_run_request_outcome(run);
	policy_run_free(run);
	config_unref(c);
	return b;
}

static void test_remove_set_defaults(void **state)
{
	struct policy_request out;
	json_t *b =
	        apply("      - request_override:\n"
	              "          remove: [logit_bias, absent]\n"
	              "          set: { repetition_penalty: 1.1, stream_options: { x: 1 } }\n"
	              "          defaults: { temperature: 0.2, top_p: 0.9, metadata: { a: 1, b: 2 "
	              "} }\n",
	              PROTO_CHAT,
	              "{\"model\":\"m\",\"logit_bias\":{\"1\":2},\"stream_options\":{\"include_"
	              "usage\":true},\"top_p\":null,\"temperature\":1,\"metadata\":{\"a\":0}}",
	              POLICY_CONTINUE, &out);
	pt_assert_json(b, "{\"model\":\"m\",\"repetition_penalty\":1.1,\"stream_options\":{"
	                  "\"include_usage\":true,\"x\":1},\"temperature\":1,\"top_p\":0.9,"
	                  "\"metadata\":{\"a\":0,\"b\":2}}");
	assert_true(out.changed);
	assert_string_equal(out.action, "rewritten");
	json_decref(b);
}

static void test_caps(void **state)
{
	struct policy_request out;
	const char *cap =
	        "      - request_override: { cap: { max_tokens: 4096, temperature: 0.7, n: "
	        "2 } }\n";

	json_t *b = apply(cap, PROTO_CHAT,
	                  "{\"max_tokens\":100000,\"temperature\":1.5,\"n\":1,\"max_completion_"
	                  "tokens\":9000}",
	                  POLICY_CONTINUE, &out);
	/* max_completion_tokens is one of the family: capped by the max_tokens cap */
	pt_assert_json(b,
	               "{\"max_tokens\":4096,\"temperature\":0.7,\"n\":1,\"max_completion_tokens\":"
	               "4096}");
	assert_string_equal(out.action, "capped");
	assert_string_equal(out.rule, "cap max_tokens");
	assert_true(json_is_integer(json_object_get(b, "max_tokens")));
	json_decref(b);

	/* under the caps: nothing changes */
	b = apply(cap, PROTO_CHAT, "{\"max_tokens\":10,\"temperature\":0.1}", POLICY_CONTINUE,
	          &out);
	pt_assert_json(b, "{\"max_tokens\":10,\"temperature\":0.1}");
	assert_null(out.action);
	assert_false(out.changed);
	json_decref(b);

	/* no output cap at all: the protocol's own is set */
	b = apply(cap, PROTO_CHAT, "{\"messages\":[]}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"messages\":[],\"max_tokens\":4096}");
	json_decref(b);
	b = apply(cap, PROTO_CHAT, "{\"max_tokens\":null}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"max_tokens\":4096}");
	json_decref(b);
	b = apply(cap, PROTO_MESSAGES, "{}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"max_tokens\":4096}");
	json_decref(b);
	b = apply(cap, PROTO_RESPONSES, "{\"max_output_tokens\":99999}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"max_output_tokens\":4096}");
	json_decref(b);
	b = apply(cap, PROTO_RESPONSES, "{}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"max_output_tokens\":4096}");
	json_decref(b);
	b = apply("      - request_override: { cap: { max_completion_tokens: 50, max_tokens: 80 } "
	          "}\n",
	          PROTO_CHAT, "{}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"max_completion_tokens\":50}");
	json_decref(b);
	/* other protocols have no output cap to set */
	b = apply(cap, PROTO_EMBEDDINGS, "{\"input\":\"x\"}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"input\":\"x\"}");
	json_decref(b);
}

static void test_cap_refuses_non_numbers(void **state)
{
	struct policy_request out;
	json_t *b = apply("      - request_override: { cap: { max_tokens: 10 } }\n", PROTO_CHAT,
	                  "{\"max_completion_tokens\":\"100000\"}", POLICY_REFUSE, &out);
	assert_int_equal(out.status, 400);
	assert_string_equal(out.code, "invalid_parameter");
	assert_string_equal(out.message, "\"max_completion_tokens\" must be a number");
	json_decref(b);
}

static void test_values_are_copied(void **state)
{
	struct config *c = pt_load("      - request_override: { set: { metadata: { tag: a } } }\n");
	for (int i = 0; i < 2; i++) {
		json_t *b = pt_json("{}");
		assert_int_equal(pt_request(c, PROTO_CHAT, b, NULL), POLICY_CONTINUE);
		pt_assert_json(b, "{\"metadata\":{\"tag\":\"a\"}}");
		/* what one request does to its body never reaches the configuration */
		json_object_set_new(json_object_get(b, "metadata"), "tag", json_string("changed"));
		json_decref(b);
	}
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test(test_remove_set_defaults),
	        cmocka_unit_test(test_caps),
	        cmocka_unit_test(test_cap_refuses_non_numbers),
	        cmocka_unit_test(test_values_are_copied),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
