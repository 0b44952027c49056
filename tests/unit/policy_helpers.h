/* policy_helpers.h — shared by tests/unit/test_policy_*.c: a route with plugins from YAML, and
 * the runner's calls with their results as plain strings. Include after <cmocka.h>. */
#ifndef SLUICE_TEST_POLICY_HELPERS_H
#define SLUICE_TEST_POLICY_HELPERS_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "sluice/config.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"

#define PT_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* One route "chat" whose plugins: list is `plugins` (YAML lines, indented by 6): the first
 * plugin line is line 7 of "t.yaml". */
static inline char *pt_yaml(const char *plugins)
{
	char *s = NULL;
	if (asprintf(&s,
	             "instances: [{ name: a, provider: openai }]\n"
	             "routes:\n"
	             "  - name: chat\n"
	             "    paths: [/v1/chat/completions]\n"
	             "    targets: [{ instance: a }]\n"
	             "    plugins:\n"
	             "%s",
	             plugins) < 0)
		abort();
	return s;
}

static inline struct config *pt_load(const char *plugins)
{
	struct config_errors e;
	char *yaml = pt_yaml(plugins);
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	free(yaml);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("the plugins did not load");
	}
	return c;
}

/* The load must fail with exactly these messages (the first plugin line is t.yaml:7). */
static inline void pt_expect_errors_(const char *plugins, const char *const *want, size_t n,
                                     const char *file, int line)
{
	struct config_errors e;
	char *yaml = pt_yaml(plugins);
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	bool same = c == NULL && e.n == n;

	free(yaml);
	for (size_t i = 0; same && i < n; i++)
		same = strcmp(e.msgs[i], want[i]) == 0;
	if (!same) {
		print_error("%s:%d: errors differ\n  got:\n", file, line);
		for (size_t i = 0; i < e.n; i++)
			print_error("    %s\n", e.msgs[i]);
		print_error("  want:\n");
		for (size_t i = 0; i < n; i++)
			print_error("    %s\n", want[i]);
	}
	config_unref(c);
	config_errors_free(&e);
	if (!same)
		_fail(file, line);
}

#define PT_EXPECT_ERRORS(plugins, ...)                                                             \
	do {                                                                                       \
		const char *const want_[] = {__VA_ARGS__};                                         \
		pt_expect_errors_((plugins), want_, PT_ARRAY_LEN(want_), __FILE__, __LINE__);      \
	} while (0)

static inline const struct config_route *pt_route(const struct config *c)
{
	return &c->routes[0];
}

static inline json_t *pt_json(const char *text)
{
	json_error_t err;
	json_t *j = json_loads(text, JSON_ALLOW_NUL, &err);
	if (j == NULL)
		fail_msg("bad test JSON: %s: %s", err.text, text);
	return j;
}

/* Compact JSON text of j (the caller frees). */
static inline char *pt_dump(const json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	assert_non_null(s);
	return s;
}

static inline void pt_assert_json(const json_t *got, const char *want_text)
{
	json_t *want = pt_json(want_text);
	if (!json_equal(got, want)) {
		char *g = pt_dump(got), *w = pt_dump(want);
		print_error("JSON differs\n  got:  %s\n  want: %s\n", g, w);
		free(g);
		free(w);
		json_decref(want);
		fail();
	}
	json_decref(want);
}

static const struct policy_env pt_env = {
        .request_id = "req-1",
        .route = "chat",
        .consumer = "team",
};

/* The request phase of c's route over body (a synchronous chain: no PENDING expected). */
static inline enum policy_verdict pt_request(const struct config *c, enum proto proto, json_t *body,
                                             struct policy_run **out)
{
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, false);
	assert_non_null(run);
	enum policy_verdict v = policy_run_request(run, proto, body, NULL, NULL);
	assert_int_not_equal(v, POLICY_PENDING);
	if (out != NULL)
		*out = run;
	else
		policy_run_free(run);
	return v;
}

/* The first decision of the run: "policy:action", or "" when none. */
static inline const char *pt_action(const struct policy_run *run, char *buf, size_t len)
{
	const struct policy_action *a;
	size_t n = policy_run_actions(run, &a, NULL);
	if (n == 0)
		snprintf(buf, len, "%s", "");
	else
		snprintf(buf, len, "%s:%s", a[0].policy, a[0].action);
	return buf;
}

/* Texts of one choice through the response chain, as pieces (NULL-terminated), the last
 * one final; returns everything let out (the caller frees) and the last verdict in *v. */
static inline char *pt_stream(struct policy_run *run, unsigned choice, const char *const *pieces,
                              bool final, enum policy_verdict *v)
{
	struct evbuffer *out = evbuffer_new();
	enum policy_verdict last = POLICY_CONTINUE;
	size_t n = 0;

	while (pieces[n] != NULL)
		n++;
	for (size_t i = 0; i < n && last == POLICY_CONTINUE; i++)
		last = policy_run_text(run, choice, pieces[i], strlen(pieces[i]),
		                       final && i == n - 1, out);
	if (n == 0 && final)
		last = policy_run_text(run, choice, "", 0, true, out);
	size_t len = evbuffer_get_length(out);
	char *s = malloc(len + 1);
	assert_non_null(s);
	evbuffer_remove(out, s, len);
	s[len] = '\0';
	evbuffer_free(out);
	if (v != NULL)
		*v = last;
	return s;
}

#endif
