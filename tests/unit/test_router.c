/* test_router.c — route matching and the /v1/models list, tested on hand-built configs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/router.h"

/*
 * The snapshots are built by hand rather than with config_load so that these
 * tests exercise the router alone. Only the fields the router reads are set.
 */

#define N(a) (sizeof(a) / sizeof((a)[0]))

static struct config_instance instances[] = {
        {.name = "onprem-qwen", .index = 0, .model = "qwen2.5-72b-instruct"},
        {.name = "cloud-qwen", .index = 1, .model = "qwen-max"},
        {.name = "openai", .index = 2, .model = NULL}, /* keeps the client's model */
        {.name = "onprem-qwen-b", .index = 3, .model = "qwen2.5-72b-instruct"},
};

static char *chat_paths[] = {"/v1/chat/completions", "/chat/completions"};
static char *embed_paths[] = {"/v1/embeddings/"}; /* written with a trailing slash */
static char *root_paths[] = {"/"};

static char *gpt_models[] = {"gpt-4o", "gpt-4o-mini"};
static char *claude_models[] = {"claude-sonnet-4", "gpt-4o"}; /* gpt-4o listed twice */
static char *embed_models[] = {"text-embedding-3-small"};

static struct config_target qwen_targets[] = {
        {.instance = &instances[0], .priority = 10, .weight = 100},
        {.instance = &instances[3], .priority = 10, .weight = 100}, /* same model again */
        {.instance = &instances[1], .priority = 0, .weight = 100},
        {.instance = &instances[2], .priority = 0, .weight = 100}, /* no model: not listed */
};
static struct config_target openai_targets[] = {
        {.instance = &instances[2], .priority = 0, .weight = 100},
};

/* Catch-all first, model-specific routes after it. */
static struct config_route routes_catch_all_first[] = {
        {.name = "default",
         .index = 0,
         .paths = chat_paths,
         .n_paths = N(chat_paths),
         .targets = qwen_targets,
         .n_targets = N(qwen_targets)},
        {.name = "gpt",
         .index = 1,
         .paths = chat_paths,
         .n_paths = N(chat_paths),
         .models = gpt_models,
         .n_models = N(gpt_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "claude",
         .index = 2,
         .paths = chat_paths,
         .n_paths = 1,
         .models = claude_models,
         .n_models = N(claude_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "embed",
         .index = 3,
         .paths = embed_paths,
         .n_paths = N(embed_paths),
         .models = embed_models,
         .n_models = N(embed_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
};
static struct config cfg_catch_all_first = {
        .instances = instances,
        .n_instances = N(instances),
        .routes = routes_catch_all_first,
        .n_routes = N(routes_catch_all_first),
};

/* The same routes with the catch-all last. */
static struct config_route routes_catch_all_last[] = {
        {.name = "gpt",
         .index = 0,
         .paths = chat_paths,
         .n_paths = N(chat_paths),
         .models = gpt_models,
         .n_models = N(gpt_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "claude",
         .index = 1,
         .paths = chat_paths,
         .n_paths = 1,
         .models = claude_models,
         .n_models = N(claude_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "default",
         .index = 2,
         .paths = chat_paths,
         .n_paths = N(chat_paths),
         .targets = qwen_targets,
         .n_targets = N(qwen_targets)},
        {.name = "embed",
         .index = 3,
         .paths = embed_paths,
         .n_paths = N(embed_paths),
         .models = embed_models,
         .n_models = N(embed_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
};
static struct config cfg_catch_all_last = {
        .instances = instances,
        .n_instances = N(instances),
        .routes = routes_catch_all_last,
        .n_routes = N(routes_catch_all_last),
};

/* Only model-specific routes; two catch-alls on "/" to check first-wins. */
static struct config_route routes_models_only[] = {
        {.name = "gpt",
         .index = 0,
         .paths = chat_paths,
         .n_paths = N(chat_paths),
         .models = gpt_models,
         .n_models = N(gpt_models),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "root-a",
         .index = 1,
         .paths = root_paths,
         .n_paths = N(root_paths),
         .targets = openai_targets,
         .n_targets = N(openai_targets)},
        {.name = "root-b",
         .index = 2,
         .paths = root_paths,
         .n_paths = N(root_paths),
         .targets = qwen_targets,
         .n_targets = N(qwen_targets)},
};
static struct config cfg_models_only = {
        .instances = instances,
        .n_instances = N(instances),
        .routes = routes_models_only,
        .n_routes = N(routes_models_only),
};

static struct config cfg_empty = {0};

/* Match and return the route's name, or NULL; checks the result code too. */
static const char *match(const struct config *c, const char *path, const char *model,
                         enum router_result want)
{
	static const struct config_route sentinel;
	const struct config_route *r = &sentinel; /* must be overwritten, also on failure */
	enum router_result got = router_match(c, path, model, &r);

	assert_int_equal(got, want);
	if (want == ROUTER_OK) {
		assert_non_null(r);
		return r->name;
	}
	assert_null(r);
	return NULL;
}

/* ---------------------------------------------------------------------------
 * router_match
 * ------------------------------------------------------------------------- */

static void test_exact_path(void **state)
{
	const struct config *c = &cfg_catch_all_first;

	assert_string_equal(match(c, "/v1/chat/completions", "qwen", ROUTER_OK), "default");
	assert_string_equal(match(c, "/chat/completions", "qwen", ROUTER_OK), "default");
	/* No prefix, suffix or case-insensitive matching. */
	match(c, "/v1/chat", "qwen", ROUTER_NO_PATH);
	match(c, "/v1/chat/completion", "qwen", ROUTER_NO_PATH);
	match(c, "/v1/chat/completionss", "qwen", ROUTER_NO_PATH);
	match(c, "/v1/chat/completions/x", "qwen", ROUTER_NO_PATH);
	match(c, "/V1/chat/completions", "qwen", ROUTER_NO_PATH);
	match(c, "v1/chat/completions", "qwen", ROUTER_NO_PATH);
	match(c, "", "qwen", ROUTER_NO_PATH);
	match(c, "/", "qwen", ROUTER_NO_PATH);
	match(c, NULL, "qwen", ROUTER_NO_PATH);
	match(&cfg_empty, "/v1/chat/completions", "qwen", ROUTER_NO_PATH);
	/* out may be NULL when only the result matters. */
	assert_int_equal(router_match(c, "/v1/chat/completions", "gpt-4o", NULL), ROUTER_OK);
	assert_int_equal(router_match(c, "/nope", "gpt-4o", NULL), ROUTER_NO_PATH);
}

static void test_trailing_slash(void **state)
{
	const struct config *c = &cfg_catch_all_first;

	assert_string_equal(match(c, "/v1/chat/completions/", "qwen", ROUTER_OK), "default");
	/* Configured with a trailing slash, requested with or without. */
	assert_string_equal(match(c, "/v1/embeddings", "text-embedding-3-small", ROUTER_OK),
	                    "embed");
	assert_string_equal(match(c, "/v1/embeddings/", "text-embedding-3-small", ROUTER_OK),
	                    "embed");
	/* Only one slash is forgiven. */
	match(c, "/v1/chat/completions//", "qwen", ROUTER_NO_PATH);
	/* "/" is a path of its own, not the empty path. */
	assert_string_equal(match(&cfg_models_only, "/", "x", ROUTER_OK), "root-a");
	match(&cfg_models_only, "", "x", ROUTER_NO_PATH);
	/* "//" is "/" plus a trailing slash. */
	assert_string_equal(match(&cfg_models_only, "//", "x", ROUTER_OK), "root-a");
}

static void test_query_excluded(void **state)
{
	const struct config *c = &cfg_catch_all_first;

	assert_string_equal(
	        match(c, "/v1/chat/completions?api-version=2024-06-01", "qwen", ROUTER_OK),
	        "default");
	assert_string_equal(match(c, "/v1/chat/completions/?x=1", "gpt-4o", ROUTER_OK), "gpt");
	assert_string_equal(match(c, "/v1/chat/completions?", "qwen", ROUTER_OK), "default");
	assert_string_equal(match(c, "/v1/embeddings?a=/b/", "text-embedding-3-small", ROUTER_OK),
	                    "embed");
	match(c, "/v1/chat?/completions", "qwen", ROUTER_NO_PATH);
	match(c, "?/v1/chat/completions", "qwen", ROUTER_NO_PATH);
}

/* A route naming the model wins over a catch-all, in either order. */
static void test_model_route_beats_catch_all(void **state)
{
	const struct config *both[] = {&cfg_catch_all_first, &cfg_catch_all_last};

	for (size_t i = 0; i < N(both); i++) {
		const struct config *c = both[i];
		assert_string_equal(match(c, "/v1/chat/completions", "gpt-4o", ROUTER_OK), "gpt");
		assert_string_equal(match(c, "/chat/completions", "gpt-4o-mini", ROUTER_OK), "gpt");
		assert_string_equal(match(c, "/v1/chat/completions", "claude-sonnet-4", ROUTER_OK),
		                    "claude");
		/* "claude" serves only the first chat path. */
		assert_string_equal(match(c, "/chat/completions", "claude-sonnet-4", ROUTER_OK),
		                    "default");
		/* Unlisted models, and exact model names only. */
		assert_string_equal(match(c, "/v1/chat/completions", "qwen-max", ROUTER_OK),
		                    "default");
		assert_string_equal(match(c, "/v1/chat/completions", "GPT-4o", ROUTER_OK),
		                    "default");
		assert_string_equal(match(c, "/v1/chat/completions", "gpt-4", ROUTER_OK),
		                    "default");
		assert_string_equal(match(c, "/v1/chat/completions", "", ROUTER_OK), "default");
	}
}

/* With two routes naming the same model, or two catch-alls, the first in the
 * configuration wins. */
static void test_config_order_breaks_ties(void **state)
{
	/* gpt-4o is listed by both "gpt" and "claude". */
	assert_string_equal(
	        match(&cfg_catch_all_first, "/v1/chat/completions", "gpt-4o", ROUTER_OK), "gpt");
	assert_string_equal(match(&cfg_models_only, "/", "anything", ROUTER_OK), "root-a");
	assert_string_equal(match(&cfg_models_only, "/", NULL, ROUTER_OK), "root-a");
}

static void test_no_path_vs_no_model(void **state)
{
	const struct config *c = &cfg_models_only;

	assert_string_equal(match(c, "/v1/chat/completions", "gpt-4o", ROUTER_OK), "gpt");
	/* The path is served, just not for this model. */
	match(c, "/v1/chat/completions", "qwen-max", ROUTER_NO_MODEL);
	match(c, "/chat/completions/", "claude-sonnet-4", ROUTER_NO_MODEL);
	match(&cfg_catch_all_first, "/v1/embeddings", "gpt-4o", ROUTER_NO_MODEL);
	/* The path is not served at all, whatever the model. */
	match(c, "/v1/completions", "gpt-4o", ROUTER_NO_PATH);
	match(c, "/v1/completions", "qwen-max", ROUTER_NO_PATH);
	match(c, "/v1/completions", NULL, ROUTER_NO_PATH);
}

static void test_null_model(void **state)
{
	/* Only routes without a model list match a request without a model. */
	assert_string_equal(match(&cfg_catch_all_first, "/v1/chat/completions", NULL, ROUTER_OK),
	                    "default");
	assert_string_equal(match(&cfg_catch_all_last, "/v1/chat/completions", NULL, ROUTER_OK),
	                    "default");
	match(&cfg_models_only, "/v1/chat/completions", NULL, ROUTER_NO_MODEL);
	match(&cfg_catch_all_first, "/v1/embeddings", NULL, ROUTER_NO_MODEL);
}

/* ---------------------------------------------------------------------------
 * router_models_json
 * ------------------------------------------------------------------------- */

/* The dump of router_models_json, byte for byte: the ids in this order, each
 * in OpenAI's model shape, inside OpenAI's list shape. */
static void assert_models_json(const struct config *c, const char *const *ids, size_t n)
{
	char want[2048];
	size_t off = (size_t)snprintf(want, sizeof(want), "{\"object\":\"list\",\"data\":[");
	for (size_t i = 0; i < n; i++)
		off += (size_t)snprintf(want + off, sizeof(want) - off,
		                        "%s{\"id\":\"%s\",\"object\":\"model\",\"created\":0,"
		                        "\"owned_by\":\"sluice\"}",
		                        i ? "," : "", ids[i]);
	snprintf(want + off, sizeof(want) - off, "]}");
	assert_true(off < sizeof(want) - 2);

	json_t *j = router_models_json(c);
	assert_non_null(j);
	char *got = json_dumps(j, JSON_COMPACT);
	assert_non_null(got);
	assert_string_equal(got, want);
	free(got);
	json_decref(j);
}

static void test_models_json_dedup_and_order(void **state)
{
	/* default: the catch-all's pinned instance models (qwen2.5 once, although
	 * two instances pin it; the pass-through instance adds nothing), then the
	 * listed models of each route in order, gpt-4o only once. */
	static const char *const first[] = {
	        "qwen2.5-72b-instruct", "qwen-max",        "gpt-4o",
	        "gpt-4o-mini",          "claude-sonnet-4", "text-embedding-3-small"};
	assert_models_json(&cfg_catch_all_first, first, N(first));

	/* Same routes, other order: the list follows the configuration. */
	static const char *const last[] = {"gpt-4o",          "gpt-4o-mini",
	                                   "claude-sonnet-4", "qwen2.5-72b-instruct",
	                                   "qwen-max",        "text-embedding-3-small"};
	assert_models_json(&cfg_catch_all_last, last, N(last));

	/* Stable: a second call gives the same bytes. */
	assert_models_json(&cfg_catch_all_last, last, N(last));
}

static void test_models_json_shape(void **state)
{
	json_t *j = router_models_json(&cfg_models_only);
	assert_non_null(j);
	assert_string_equal(json_string_value(json_object_get(j, "object")), "list");
	json_t *data = json_object_get(j, "data");
	assert_true(json_is_array(data));
	/* gpt's two models, then root-a's pass-through adds none, root-b's qwens. */
	assert_int_equal(json_array_size(data), 4);
	const char *want[] = {"gpt-4o", "gpt-4o-mini", "qwen2.5-72b-instruct", "qwen-max"};
	for (size_t i = 0; i < N(want); i++) {
		json_t *m = json_array_get(data, i);
		assert_int_equal(json_object_size(m), 4);
		assert_string_equal(json_string_value(json_object_get(m, "id")), want[i]);
		assert_string_equal(json_string_value(json_object_get(m, "object")), "model");
		assert_int_equal(json_integer_value(json_object_get(m, "created")), 0);
		assert_true(json_is_integer(json_object_get(m, "created")));
		assert_string_equal(json_string_value(json_object_get(m, "owned_by")), "sluice");
	}
	json_decref(j);

	assert_models_json(&cfg_empty, NULL, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_exact_path),
	        cmocka_unit_test(test_trailing_slash),
	        cmocka_unit_test(test_query_excluded),
	        cmocka_unit_test(test_model_route_beats_catch_all),
	        cmocka_unit_test(test_config_order_breaks_ties),
	        cmocka_unit_test(test_no_path_vs_no_model),
	        cmocka_unit_test(test_null_model),
	        cmocka_unit_test(test_models_json_dedup_and_order),
	        cmocka_unit_test(test_models_json_shape),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
