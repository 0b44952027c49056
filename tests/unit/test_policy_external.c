/* test_policy_external.c — external plugins through the real loader: the example plugin
 * (examples/plugins/redact.c, built by CMake) loaded with dlopen and run on request bodies of
 * each protocol, and the configuration errors a bad path, a missing symbol, another ABI
 * version or a refused config give, with file:line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

#define REDACT PLUGIN_DIR "/redact.so"

static void test_redact_chat(void **state)
{
	struct config *c =
	        pt_load("      - external: { path: " REDACT ", config: { fields: [email, "
	                "ipv4] } }\n");
	const struct config_route *r = pt_route(c);
	assert_int_equal(r->n_plugins, 1);
	assert_string_equal(r->plugins[0].name, "redact");
	assert_int_equal(r->plugins[0].phases, POLICY_PHASE_REQUEST);
	assert_int_equal(r->plugin_phases, POLICY_PHASE_REQUEST);

	json_t *b = pt_json("{\"messages\":[{\"role\":\"system\",\"content\":\"ops@example.com\"},{"
	                    "\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Mail "
	                    "jane.doe+x@mail.example.org. or call 10.0.0.12, not 1.2.3 or "
	                    "999.1.1.1\"}]}]}");
	struct policy_run *run;
	assert_int_equal(pt_request(c, PROTO_CHAT, b, &run), POLICY_CONTINUE);
	pt_assert_json(b,
	               "{\"messages\":[{\"role\":\"system\",\"content\":\"[email]\"},{\"role\":"
	               "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Mail [email]. or call "
	               "[ipv4], not 1.2.3 or 999.1.1.1\"}]}]}");
	const struct policy_request *out = policy_run_request_outcome(run);
	assert_true(out->changed);
	char buf[64];
	assert_string_equal(pt_action(run, buf, sizeof buf), "redact:redacted");
	const struct policy_action *a;
	policy_run_actions(run, &a, NULL);
	assert_string_equal(a[0].rule, "2 e-mail, 1 ipv4");
	policy_run_free(run);
	json_decref(b);

	/* nothing to redact: the body is left alone */
	b = pt_json("{\"messages\":[{\"role\":\"user\",\"content\":\"at @ home\"}]}");
	assert_int_equal(pt_request(c, PROTO_CHAT, b, &run), POLICY_CONTINUE);
	assert_false(policy_run_request_outcome(run)->changed);
	policy_run_free(run);
	json_decref(b);
	config_unref(c);
}

static void test_redact_other_protocols(void **state)
{
	struct config *c =
	        pt_load("      - external: { path: " REDACT ", config: { fields: [email] } "
	                "}\n");
	json_t *b = pt_json("{\"system\":\"a@b.cd\",\"messages\":[{\"role\":\"user\",\"content\":[{"
	                    "\"type\":\"tool_result\",\"content\":\"x@y.zz\"}]}]}");
	assert_int_equal(pt_request(c, PROTO_MESSAGES, b, NULL), POLICY_CONTINUE);
	pt_assert_json(b, "{\"system\":\"[email]\",\"messages\":[{\"role\":\"user\",\"content\":[{"
	                  "\"type\":\"tool_result\",\"content\":\"[email]\"}]}]}");
	json_decref(b);
	b = pt_json("{\"instructions\":\"i@j.kl\",\"input\":\"me: m@n.op, 1.2.3.4\"}");
	assert_int_equal(pt_request(c, PROTO_RESPONSES, b, NULL), POLICY_CONTINUE);
	pt_assert_json(b, "{\"instructions\":\"[email]\",\"input\":\"me: [email], 1.2.3.4\"}");
	json_decref(b);
	config_unref(c);
}

static void test_chain_with_builtins(void **state)
{
	/* the plugin runs in its place in the chain: the guard after it sees the redacted text */
	struct config *c =
	        pt_load("      - external: { path: " REDACT ", config: { fields: [email] } "
	                "}\n"
	                "      - prompt_guard: { deny: [\"@example\\\\.com\"] }\n");
	json_t *b = pt_json("{\"messages\":[{\"role\":\"user\",\"content\":\"x@example.com\"}]}");
	assert_int_equal(pt_request(c, PROTO_CHAT, b, NULL), POLICY_CONTINUE);
	json_decref(b);
	config_unref(c);
}

static void test_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - external: { path: redact.so }\n",
	        "t.yaml:7:27: routes[0].plugins[0].external.path: must be an absolute path "
	        "(a bare name would be searched for in the system's library directories)");
	PT_EXPECT_ERRORS("      - external: { path: " PLUGIN_DIR "/test_no_symbol.so }\n",
	                 "t.yaml:7:27: routes[0].plugins[0].external.path: " PLUGIN_DIR
	                 "/test_no_symbol.so has no sluice_plugin() function: is it a Sluice "
	                 "plugin?");
	PT_EXPECT_ERRORS("      - external: { path: " PLUGIN_DIR "/test_bad_abi.so }\n",
	                 "t.yaml:7:27: routes[0].plugins[0].external.path: " PLUGIN_DIR
	                 "/test_bad_abi.so was built for plugin ABI 99; this Sluice speaks version "
	                 "1");
	PT_EXPECT_ERRORS("      - external: { path: " REDACT ",\n"
	                 "                    config: { fields: [email, phone] } }\n",
	                 "t.yaml:8:29: routes[0].plugins[0].external.config: plugin redact refused "
	                 "its config: config.fields[1]: unknown field (email, ipv4)");
	PT_EXPECT_ERRORS("      - external: { path: " REDACT " }\n",
	                 "t.yaml:7:19: routes[0].plugins[0].external: plugin redact refused its "
	                 "config: config.fields must list what to redact: email, ipv4");
	PT_EXPECT_ERRORS("      - external: { path: " REDACT ", config: { fields: [email] } }\n"
	                 "      - external: { path: " REDACT ", config: { fields: [ipv4] } }\n",
	                 "t.yaml:8:9: routes[0].plugins[1]: plugin redact is already configured on "
	                 "this route");
	PT_EXPECT_ERRORS("      - external:\n",
	                 "t.yaml:7:9: routes[0].plugins[0].external: needs a path: external: { "
	                 "path: /path/to/plugin.so }");
}

static void test_missing_file(void **state)
{
	struct config_errors e;
	char *yaml = pt_yaml("      - external: { path: /nonexistent/sluice-plugin.so }\n");
	assert_null(config_load_string(yaml, strlen(yaml), "t.yaml", &e));
	assert_int_equal(e.n, 1);
	/* dlerror's own words follow */
	const char *want =
	        "t.yaml:7:27: routes[0].plugins[0].external.path: cannot load the plugin: "
	        "/nonexistent/sluice-plugin.so: ";
	assert_memory_equal(e.msgs[0], want, strlen(want));
	config_errors_free(&e);
	free(yaml);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_redact_chat),
	        cmocka_unit_test(test_redact_other_protocols),
	        cmocka_unit_test(test_chain_with_builtins),
	        cmocka_unit_test(test_errors),
	        cmocka_unit_test(test_missing_file),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
