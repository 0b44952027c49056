/* test_mcp_config.c — the MCP keys: mcp_servers, a route's mcp section, a consumer's
 * mcp_tools; defaults, and every refusal with its file:line:col and key path. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "sluice/mcp.h"
#include "sluice/policy.h"

static const char good[] =
        "mcp_servers:\n"
        "  - name: search\n"
        "    endpoint: http://127.0.0.1:3000/mcp\n"
        "    auth: { header: { Authorization: \"Bearer k\" } }\n"
        "    timeouts: { connect: 2s, first_byte: 30s, idle: 5m }\n"
        "    checks: { active: { interval: 10s, timeout: 2s } }\n"
        "    limits: [{ requests: 100, window: 1m }]\n"
        "  - name: tickets\n"
        "    endpoint: https://tickets.example/mcp\n"
        "consumers:\n"
        "  - name: a\n"
        "    keys: [k1]\n"
        "    mcp_tools: { allow: [\"search__*\"], deny: [], limits: [{ requests: 5, window: 1h, "
        "server: search }] }\n"
        "routes:\n"
        "  - name: tools\n"
        "    type: mcp\n"
        "    paths: [/mcp]\n"
        "    mcp:\n"
        "      servers: [search, tickets]\n"
        "      tools: { allow: [], deny: [\"tickets__delete_*\"] }\n";

static void test_contract_loads(void **state)
{
	struct config_errors e;
	struct config *c = config_load_string(good, strlen(good), "t.yaml", &e);
	for (size_t i = 0; c == NULL && i < e.n; i++)
		print_error("%s\n", e.msgs[i]);
	assert_non_null(c);
	assert_int_equal(c->mcp->n_servers, 2);
	const struct mcp_server_conf *s = &c->mcp->servers[0];
	assert_string_equal(s->name, "search");
	assert_int_equal(s->timeouts.connect, 2000);
	assert_int_equal(s->timeouts.idle, 300000);
	assert_true(s->check.enabled);
	assert_int_equal(s->check.interval, 10000);
	assert_int_equal(s->n_auth_headers, 1);
	assert_int_equal(s->as_instance.n_limits, 1);
	assert_string_equal(s->as_instance.limits[0].id, "mcp_server:search:requests:1m");
	assert_string_equal(s->as_instance.name, "mcp:search");
	/* defaults */
	const struct mcp_server_conf *t = &c->mcp->servers[1];
	assert_false(t->check.enabled);
	assert_int_equal(t->timeouts.connect, 5000);
	assert_int_equal(t->timeouts.first_byte, 60000);
	assert_true(t->tls_verify);
	const struct config_route *r = &c->routes[0];
	assert_int_equal(r->type, ROUTE_TYPE_MCP);
	assert_int_equal(r->auth, ROUTE_AUTH_KEY);
	assert_int_equal(r->mcp->n_servers, 2);
	assert_string_equal(r->mcp->separator, "__");
	assert_int_equal(r->mcp->session_idle_timeout, 3600000);
	assert_int_equal(r->mcp->tools.n_deny, 1);
	const struct mcp_consumer_conf *mc = c->consumers[0].mcp;
	assert_int_equal(mc->tools.n_allow, 1);
	assert_int_equal(mc->as_consumer.n_limits, 1);
	assert_string_equal(mc->as_consumer.limits[0].id, "mcp_consumer:a:search:requests:1h");
	assert_ptr_equal(mc->as_consumer.limits[0].instance, &c->mcp->servers[0].as_instance);
	config_unref(c);
}

static void test_prompts_resources_plugins(void **state)
{
	static const char y[] =
	        "mcp_servers: [{ name: s, endpoint: http://h/mcp }]\n"
	        "consumers:\n"
	        "  - name: a\n"
	        "    keys: [k1]\n"
	        "    mcp_tools: { deny: [\"s__x\"], prompts: { allow: [\"s__p*\"] },\n"
	        "                 resources: { deny: [\"s__file:///secret/*\"] } }\n"
	        "routes:\n"
	        "  - name: tools\n"
	        "    type: mcp\n"
	        "    paths: [/mcp]\n"
	        "    mcp: { servers: [s], prompts: { deny: [\"*__admin*\"] },\n"
	        "           resources: { allow: [\"s__*\"], deny: [\"*.key\"] } }\n"
	        "    plugins:\n"
	        "      - prompt_guard: { deny: [\"(?i)drop table\"] }\n"
	        "      - request_limits: { max_prompt_tokens: 1000 }\n"
	        "      - moderation: { endpoint: \"http://m/v1/moderations\", on: [request] }\n";
	struct config_errors e;
	struct config *c = config_load_string(y, strlen(y), "t.yaml", &e);
	for (size_t i = 0; c == NULL && i < e.n; i++)
		print_error("%s\n", e.msgs[i]);
	assert_non_null(c);
	const struct mcp_route_conf *rc = c->routes[0].mcp;
	assert_int_equal(rc->prompts.n_deny, 1);
	assert_int_equal(rc->resources.n_allow, 1);
	assert_int_equal(rc->resources.n_deny, 1);
	assert_int_equal(rc->tools.n_allow + rc->tools.n_deny, 0);
	const struct mcp_consumer_conf *mc = c->consumers[0].mcp;
	assert_int_equal(mc->tools.n_deny, 1);
	assert_int_equal(mc->prompts.n_allow, 1);
	assert_int_equal(mc->resources.n_deny, 1);
	assert_int_equal(c->routes[0].n_plugins, 3);
	assert_int_equal(c->routes[0].plugin_phases, POLICY_PHASE_REQUEST);
	config_unref(c);
}

static void expect_(const char *yaml, const char *want, const char *file, int line)
{
	struct config_errors e;
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	bool found = false;
	for (size_t i = 0; c == NULL && i < e.n; i++)
		found = found || strcmp(e.msgs[i], want) == 0;
	if (!found) {
		print_error("%s:%d: wanted: %s\n got:\n", file, line, want);
		for (size_t i = 0; i < e.n; i++)
			print_error("  %s\n", e.msgs[i]);
	}
	config_errors_free(&e);
	config_unref(c);
	assert_true(found);
}
#define expect(y, w) expect_(y, w, __FILE__, __LINE__)

#define ROUTE(extra)                                                                               \
	"mcp_servers: [{ name: s, endpoint: http://h/mcp }]\n"                                     \
	"routes:\n"                                                                                \
	"  - name: r\n"                                                                            \
	"    type: mcp\n"                                                                          \
	"    paths: [/mcp]\n" extra

static void test_errors(void **state)
{
	expect(ROUTE("    mcp: { servers: [nope] }\n"),
	       "t.yaml:6:22: routes[0].mcp.servers[0]: unknown MCP server \"nope\" (declare it "
	       "under "
	       "mcp_servers)");
	expect(ROUTE(""), "t.yaml:3:5: routes[0]: missing required key \"mcp\" (mcp: { servers: "
	                  "[...] })");
	expect(ROUTE("    mcp: { servers: [s], tolls: {} }\n"),
	       "t.yaml:6:26: routes[0].mcp: unknown key \"tolls\" (known: servers, tools, "
	       "prompts, resources, separator, session_idle_timeout)");
	expect(ROUTE("    mcp: { servers: [s], prompts: { alow: [] } }\n"),
	       "t.yaml:6:37: routes[0].mcp.prompts: unknown key \"alow\" (known: allow, deny)");
	expect("consumers: [{ name: a, keys: [k], mcp_tools: { resources: { deny: [\"\"] } } }]\n",
	       "t.yaml:1:68: consumers[0].mcp_tools.resources.deny[0]: must be a non-empty pattern "
	       "without control characters");
	/* plugins: request policies over tool arguments; the rest means nothing there */
	expect(ROUTE("    mcp: { servers: [s] }\n    plugins: [{ response_guard: { deny: [x] } "
	             "}]\n"),
	       "t.yaml:7:17: routes[0].plugins[0].response_guard: does not apply to a route with "
	       "type: mcp: it reads model output; MCP routes run request policies only");
	expect(ROUTE("    mcp: { servers: [s] }\n"
	             "    plugins: [{ prompt_guard: { deny: [x], roles: [system] } }]\n"),
	       "t.yaml:7:44: routes[0].plugins[0].prompt_guard.roles: does not apply on a route "
	       "with type: mcp, where prompt_guard reads the text of a tool call's string "
	       "arguments as one user message");
	expect(ROUTE("    mcp: { servers: [s] }\n"
	             "    plugins: [{ moderation: { endpoint: \"http://m/v1/moderations\" } }]\n"),
	       "t.yaml:7:17: routes[0].plugins[0].moderation: runs on model output too; on a route "
	       "with type: mcp policies run over tool arguments only: set on: [request]");
	expect(ROUTE("    mcp: { servers: [s] }\n    plugins: [{ prompt_decorator: {} }]\n"),
	       "t.yaml:7:17: routes[0].plugins[0].prompt_decorator: does not apply to a route with "
	       "type: mcp: it adds messages to a model request; tool arguments have none");
	expect(ROUTE("    mcp: { servers: [s] }\n    targets: []\n"),
	       "t.yaml:7:5: routes[0]: key \"targets\" does not apply to a route with type: mcp");
	expect(ROUTE("    mcp: { servers: [s], separator: \"\" }\n"),
	       "t.yaml:6:37: routes[0].mcp.separator: must be 1 to 8 visible characters");
	expect("mcp_servers: [{ name: a__b, endpoint: http://h/mcp }]\n"
	       "routes: [{ name: r, type: mcp, paths: [/mcp], mcp: { servers: [a__b] } }]\n",
	       "t.yaml:2:64: routes[0].mcp.servers[0]: server name \"a__b\" contains the separator "
	       "\"__\": tool names could not be split back");
	expect("mcp_servers: [{ name: s, endpoint: ftp://h/mcp }]\n",
	       "t.yaml:1:36: mcp_servers[0].endpoint: must be an http:// or https:// URL");
	expect("mcp_servers: [{ name: s }]\n",
	       "t.yaml:1:15: mcp_servers[0]: missing required key \"endpoint\"");
	expect("mcp_servers: [{ name: s, endpoint: http://h, checks: { active: { intervall: 1s } } "
	       "}]\n",
	       "t.yaml:1:66: mcp_servers[0].checks.active: unknown key \"intervall\" (known: "
	       "interval, "
	       "timeout, successes, failures)");
	expect("mcp_servers: [{ name: s, endpoint: http://h, limits: [{ limit: 5, window: 1m }] "
	       "}]\n",
	       "t.yaml:1:57: mcp_servers[0].limits[0]: unknown key \"limit\" (known: requests, "
	       "window, "
	       "type)");
	expect("mcp_servers: [{ name: s, endpoint: http://h }, { name: s, endpoint: http://i }]\n",
	       "t.yaml:1:56: mcp_servers[1].name: duplicate MCP server name \"s\" "
	       "(mcp_servers[0])");
	expect("consumers: [{ name: a, keys: [k], mcp_tools: { limits: [{ requests: 1, window: 1m, "
	       "server: x }] } }]\n",
	       "t.yaml:1:92: consumers[0].mcp_tools.limits[0].server: unknown MCP server \"x\"");
	expect("routes: [{ name: r, paths: [/x], mcp: {}, targets: [] }]\n",
	       "t.yaml:1:34: routes[0]: key \"mcp\" needs type: mcp");
	expect("mcp_servers: [{ name: s, endpoint: http://h/mcp }]\n"
	       "instances: [{ name: i, provider: openai }]\n"
	       "routes:\n"
	       "  - { name: a, type: mcp, paths: [/x], mcp: { servers: [s] } }\n"
	       "  - { name: b, paths: [/x], models: [m], targets: [{ instance: i }] }\n",
	       "t.yaml:5:24: routes[1].paths[0]: path \"/x\" is already served by route \"a\" for "
	       "the "
	       "same models");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_contract_loads),
	        cmocka_unit_test(test_errors),
	        cmocka_unit_test(test_prompts_resources_plugins),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
