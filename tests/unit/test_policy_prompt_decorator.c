/* test_policy_prompt_decorator.c — prompt_decorator: configuration errors, the messages added in
 * each protocol, the estimate that quotas reserve growing with them, and the refusal of a
 * request that has no message list. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"
#include "sluice/usage.h"

#define DECORATE                                                                                   \
	"      - prompt_decorator:\n"                                                              \
	"          prepend: [{ role: system, content: \"Answer in French.\" }]\n"                  \
	"          append: [{ role: user, content: \"(be brief)\" }]\n"

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - prompt_decorator: { prepend: [{ role: tool, content: x }, { content: "
	        "y }, z], apend: [] }\n",
	        "t.yaml:7:47: routes[0].plugins[0].prompt_decorator.prepend[0].role: "
	        "unknown role \"tool\"",
	        "t.yaml:7:67: routes[0].plugins[0].prompt_decorator.prepend[1]: missing "
	        "required key \"role\"",
	        "t.yaml:7:83: routes[0].plugins[0].prompt_decorator.prepend[2]: must be a "
	        "mapping, not a string",
	        "t.yaml:7:87: routes[0].plugins[0].prompt_decorator: unknown key \"apend\" "
	        "(did you mean \"append\"?)");
	PT_EXPECT_ERRORS(
	        "      - prompt_decorator: { append: [{ role: user, content: [a], name: b "
	        "}] }\n",
	        "t.yaml:7:61: routes[0].plugins[0].prompt_decorator.append[0].content: "
	        "must be a string, not a list",
	        "t.yaml:7:66: routes[0].plugins[0].prompt_decorator.append[0]: unknown key "
	        "\"name\"");
}

static json_t *decorate(enum proto proto, const char *body, enum policy_verdict want,
                        struct policy_request *out)
{
	struct config *c = pt_load(DECORATE);
	json_t *b = pt_json(body);
	struct policy_run *run;
	assert_int_equal(pt_request(c, proto, b, &run), want);
	if (out != NULL)
		*out = *policy_run_request_outcome(run);
	policy_run_free(run);
	config_unref(c);
	return b;
}

static void test_chat(void **state)
{
	struct policy_request out;
	const char *body =
	        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
	json_t *orig = pt_json(body);
	json_t *b = decorate(PROTO_CHAT, body, POLICY_CONTINUE, &out);

	pt_assert_json(b, "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":"
	                  "\"Answer in French.\"},{\"role\":\"user\",\"content\":\"hi\"},{\"role\":"
	                  "\"user\",\"content\":\"(be brief)\"}]}");
	assert_true(out.changed);
	assert_string_equal(out.action, "decorated");
	assert_string_equal(out.rule, "prepend 1, append 1");
	/* the estimate quotas reserve counts the added messages */
	assert_true(usage_estimate_prompt(b) > usage_estimate_prompt(orig));
	json_decref(b);
	json_decref(orig);
}

static void test_messages_and_responses(void **state)
{
	json_t *b =
	        decorate(PROTO_MESSAGES,
	                 "{\"system\":\"Be kind.\",\"messages\":[{\"role\":\"user\",\"content\":"
	                 "\"hi\"}]}",
	                 POLICY_CONTINUE, NULL);
	pt_assert_json(b,
	               "{\"system\":[{\"type\":\"text\",\"text\":\"Answer in French.\"},{\"type\":"
	               "\"text\",\"text\":\"Be kind.\"}],\"messages\":[{\"role\":\"user\","
	               "\"content\":[{\"type\":\"text\",\"text\":\"hi\"},{\"type\":\"text\","
	               "\"text\":\"(be brief)\"}]}]}");
	json_decref(b);
	b = decorate(PROTO_RESPONSES, "{\"input\":\"hi\"}", POLICY_CONTINUE, NULL);
	pt_assert_json(b, "{\"instructions\":\"Answer in French.\",\"input\":[{\"role\":\"user\","
	                  "\"content\":\"hi\"},{\"role\":\"user\",\"content\":\"(be brief)\"}]}");
	json_decref(b);
}

static void test_refused_without_messages(void **state)
{
	struct policy_request out;
	json_t *b = decorate(PROTO_COMPLETIONS, "{\"prompt\":\"hi\"}", POLICY_REFUSE, &out);
	assert_int_equal(out.status, 400);
	assert_string_equal(out.code, "prompt_decoration_failed");
	pt_assert_json(b, "{\"prompt\":\"hi\"}");
	json_decref(b);
	b = decorate(PROTO_CHAT, "{\"messages\":{}}", POLICY_REFUSE, &out);
	assert_string_equal(out.code, "prompt_decoration_failed");
	json_decref(b);
}

static void test_empty_lists(void **state)
{
	struct config *c = pt_load("      - prompt_decorator:\n");
	json_t *b = pt_json("{\"prompt\":\"x\"}");
	struct policy_run *run;
	assert_int_equal(pt_request(c, PROTO_COMPLETIONS, b, &run), POLICY_CONTINUE);
	assert_false(policy_run_request_outcome(run)->changed);
	policy_run_free(run);
	json_decref(b);
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test(test_chat),
	        cmocka_unit_test(test_messages_and_responses),
	        cmocka_unit_test(test_refused_without_messages),
	        cmocka_unit_test(test_empty_lists),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
