/* test_auth.c — key-auth: header order, Bearer parsing, hashed keys, allow-lists, fingerprints. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sluice/auth.h"
#include "sluice/config.h"

/* sha256("foo") = 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae */
static const char yaml[] =
        "instances: [{ name: a, provider: openai }]\n"
        "consumers:\n"
        "  - { name: alice, keys: [alice-key-1, alice-key-2] }\n"
        "  - { name: bob, keys: "
        "[\"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\"] }\n"
        "  - { name: carol, keys: [carol-key], routes: [chat] }\n"
        "routes:\n"
        "  - { name: chat, paths: [/v1/chat/completions], targets: [{ instance: a }] }\n"
        "  - { name: emb, paths: [/v1/embeddings], targets: [{ instance: a }] }\n"
        "  - { name: open, paths: [/open], auth: none, targets: [{ instance: a }] }\n"
        "  - { name: custom, paths: [/custom], key_headers: [x-team-key, authorization], "
        "targets: [{ instance: a }] }\n";

struct headers {
	const char *names[8];
	const char *values[8];
	int n;
	int asked;
};

static const char *get_header(void *arg, const char *name)
{
	struct headers *h = arg;
	h->asked++;
	for (int i = 0; i < h->n; i++)
		if (strcasecmp(h->names[i], name) == 0)
			return h->values[i];
	return NULL;
}

static struct config *load(void)
{
	struct config_errors e;
	struct config *c = config_load_string(yaml, strlen(yaml), "t.yaml", &e);
	if (c == NULL) {
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		config_errors_free(&e);
		fail_msg("the YAML did not load");
	}
	return c;
}

static int setup(void **state)
{
	*state = load();
	return 0;
}

static int teardown(void **state)
{
	config_unref(*state);
	return 0;
}

static enum auth_result check(struct config *c, const char *route, struct headers *h,
                              const struct config_consumer **who, char fp[13])
{
	const struct config_route *r = config_find_route(c, route);
	assert_non_null(r);
	return auth_check(c, r, get_header, h, who, fp);
}

static void test_bearer(void **state)
{
	struct config *c = *state;
	struct headers h = {{"Authorization"}, {"Bearer alice-key-2"}, 1, 0};
	const struct config_consumer *who;
	char fp[13];

	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "alice");
	assert_int_equal(strlen(fp), 12);
	/* the scheme is case-insensitive, blanks around the key are ignored */
	h.values[0] = "  bearer   alice-key-1  ";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "alice");
	/* not Bearer: no key from this header */
	h.values[0] = "Basic YWxpY2U6eA==";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_MISSING);
	assert_null(who);
	assert_string_equal(fp, "");
	h.values[0] = "Bearer ";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_MISSING);
	h.values[0] = "Beareralice-key-1";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_MISSING);
}

static void test_header_order(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who;
	char fp[13];

	/* apikey alone, x-api-key alone */
	struct headers h1 = {{"apikey"}, {"alice-key-1"}, 1, 0};
	assert_int_equal(check(c, "chat", &h1, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "alice");
	struct headers h2 = {{"x-api-key"}, {"carol-key"}, 1, 0};
	assert_int_equal(check(c, "chat", &h2, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "carol");

	/* Authorization wins over apikey, apikey over x-api-key */
	struct headers h3 = {{"x-api-key", "apikey", "authorization"},
	                     {"carol-key", "foo", "Bearer alice-key-1"},
	                     3,
	                     0};
	assert_int_equal(check(c, "chat", &h3, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "alice");
	struct headers h4 = {{"x-api-key", "apikey"}, {"carol-key", "foo"}, 2, 0};
	assert_int_equal(check(c, "chat", &h4, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "bob");
	/* an Authorization that is not Bearer falls through to the next header */
	struct headers h5 = {{"authorization", "x-api-key"}, {"Basic abc", "carol-key"}, 2, 0};
	assert_int_equal(check(c, "chat", &h5, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "carol");

	/* a route's own key_headers, in its order; the defaults are not consulted */
	struct headers h6 = {{"authorization", "x-team-key"}, {"Bearer alice-key-1", "foo"}, 2, 0};
	assert_int_equal(check(c, "custom", &h6, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "bob");
	struct headers h7 = {{"apikey"}, {"alice-key-1"}, 1, 0};
	assert_int_equal(check(c, "custom", &h7, &who, fp), AUTH_MISSING);
}

static void test_wrong_and_missing(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who = (void *)1;
	char fp[13] = "junk";
	unsigned char sha[32];
	char want[13];

	struct headers none = {{"content-type"}, {"application/json"}, 1, 0};
	assert_int_equal(check(c, "chat", &none, &who, fp), AUTH_MISSING);
	assert_null(who);
	assert_string_equal(fp, "");
	assert_int_equal(auth_http_status(AUTH_MISSING), 401);

	struct headers wrong = {{"authorization"}, {"Bearer alice-key-3"}, 1, 0};
	assert_int_equal(check(c, "chat", &wrong, &who, fp), AUTH_UNKNOWN);
	assert_null(who);
	/* the fingerprint of what was presented, for the log */
	auth_hash_key("alice-key-3", strlen("alice-key-3"), sha, want);
	assert_string_equal(fp, want);
	assert_int_equal(auth_http_status(AUTH_UNKNOWN), 401);
	assert_string_equal(auth_error_code(AUTH_UNKNOWN), "invalid_api_key");

	/* a prefix or an extension of a valid key is not it */
	struct headers pre = {{"authorization"}, {"Bearer alice-key-"}, 1, 0};
	assert_int_equal(check(c, "chat", &pre, &who, fp), AUTH_UNKNOWN);
	struct headers ext = {{"authorization"}, {"Bearer alice-key-11"}, 1, 0};
	assert_int_equal(check(c, "chat", &ext, &who, fp), AUTH_UNKNOWN);
	/* the stored hash itself is not a key */
	struct headers hash = {{"apikey"},
	                       {"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"},
	                       1,
	                       0};
	assert_int_equal(check(c, "chat", &hash, &who, fp), AUTH_UNKNOWN);
}

static void test_hashed_key(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who;
	char fp[13];

	struct headers h = {{"authorization"}, {"Bearer foo"}, 1, 0};
	assert_int_equal(check(c, "emb", &h, &who, fp), AUTH_OK);
	assert_string_equal(who->name, "bob");
	assert_string_equal(fp, "2c26b46b68ff");
	assert_string_equal(fp, config_find_consumer(c, "bob")->keys[0].fingerprint);
}

static void test_forbidden_route(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who;
	char fp[13];

	struct headers h = {{"authorization"}, {"Bearer carol-key"}, 1, 0};
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_int_equal(check(c, "emb", &h, &who, fp), AUTH_FORBIDDEN);
	assert_string_equal(who->name, "carol"); /* known, for the log */
	assert_int_equal(strlen(fp), 12);
	assert_int_equal(auth_http_status(AUTH_FORBIDDEN), 403);
	assert_string_equal(auth_error_code(AUTH_FORBIDDEN), "consumer_not_allowed");
	/* alice has no allow-list: every route */
	struct headers a = {{"authorization"}, {"Bearer alice-key-1"}, 1, 0};
	assert_int_equal(check(c, "emb", &a, &who, fp), AUTH_OK);
}

static void test_auth_none(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who = (void *)1;
	char fp[13] = "x";
	struct headers h = {{"authorization"}, {"Bearer nonsense"}, 1, 0};

	assert_int_equal(check(c, "open", &h, &who, fp), AUTH_NONE_REQUIRED);
	assert_null(who);
	assert_string_equal(fp, "");
	assert_int_equal(h.asked, 0); /* headers not even read */
	assert_int_equal(auth_http_status(AUTH_NONE_REQUIRED), 0);
}

static void test_fingerprint_never_the_key(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who;
	char fp[13];
	const char *keys[] = {"alice-key-1", "foo",          "carol-key",
	                      "abc",         "0123456789ab", "0123456789abcdef"};

	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		struct headers h = {{"apikey"}, {keys[i]}, 1, 0};
		enum auth_result r = check(c, "chat", &h, &who, fp);
		assert_true(r == AUTH_OK || r == AUTH_UNKNOWN);
		assert_int_equal(strlen(fp), 12);
		assert_null(strstr(fp, keys[i]));
		assert_null(strstr(keys[i], fp));
		for (size_t k = 0; k < 12; k++)
			assert_non_null(strchr("0123456789abcdef", fp[k]));
	}
	/* NULL outputs are allowed */
	struct headers h = {{"apikey"}, {"foo"}, 1, 0};
	assert_int_equal(auth_check(c, config_find_route(c, "chat"), get_header, &h, NULL, NULL),
	                 AUTH_OK);
}

/* The loader's fingerprints and auth's agree for plain keys too. */
static void test_loader_agrees(void **state)
{
	struct config *c = *state;
	unsigned char sha[32];
	char fp[13];
	const struct config_consumer *alice = config_find_consumer(c, "alice");

	auth_hash_key("alice-key-1", 11, sha, fp);
	assert_memory_equal(sha, alice->keys[0].sha256, 32);
	assert_string_equal(fp, alice->keys[0].fingerprint);
}

/* A published snapshot (generation ≠ 0) remembers the keys that matched, and only those;
 * the answer from the cache is the full check's; a new generation misses every old entry. */
static void test_cache(void **state)
{
	struct config *c = *state;
	const struct config_consumer *who;
	char fp[13], want[13];
	unsigned char sha[32];
	size_t hits;

	c->generation = 7;
	struct headers h = {{"apikey"}, {"alice-key-2"}, 1, 0};
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	hits = auth_cache_hits();
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_int_equal(auth_cache_hits(), hits + 1);
	assert_string_equal(who->name, "alice");
	auth_hash_key("alice-key-2", 11, sha, want);
	assert_string_equal(fp, want);

	/* a prefix, an extension, a one-byte change: never from the cache, never OK */
	const char *near[] = {"alice-key-", "alice-key-22", "alice-key-3", "Alice-key-2", ""};
	for (size_t i = 0; i < sizeof(near) / sizeof(near[0]); i++) {
		h.values[0] = near[i];
		hits = auth_cache_hits();
		enum auth_result r = check(c, "chat", &h, &who, fp);
		assert_true(r == AUTH_UNKNOWN || r == AUTH_MISSING);
		assert_null(who);
		assert_int_equal(auth_cache_hits(), hits);
	}
	/* unknown keys are not remembered: the second try is the full check again */
	h.values[0] = "nobody-key";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_UNKNOWN);
	hits = auth_cache_hits();
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_UNKNOWN);
	assert_int_equal(auth_cache_hits(), hits);

	/* the route rule still applies to a remembered key */
	h.values[0] = "carol-key";
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	hits = auth_cache_hits();
	assert_int_equal(check(c, "emb", &h, &who, fp), AUTH_FORBIDDEN);
	assert_int_equal(auth_cache_hits(), hits + 1);
	assert_string_equal(who->name, "carol");

	/* a reload without alice-key-2: the new snapshot refuses it */
	static const char reloaded[] =
	        "instances: [{ name: a, provider: openai }]\n"
	        "consumers: [{ name: alice, keys: [alice-key-1] }]\n"
	        "routes: [{ name: chat, paths: [/v1/chat/completions], targets: [{ instance: a }] }]\n";
	struct config_errors e;
	struct config *c2 = config_load_string(reloaded, strlen(reloaded), "t2.yaml", &e);
	assert_non_null(c2);
	c2->generation = 8;
	h.values[0] = "alice-key-2";
	hits = auth_cache_hits();
	assert_int_equal(check(c2, "chat", &h, &who, fp), AUTH_UNKNOWN);
	assert_null(who);
	assert_int_equal(auth_cache_hits(), hits);
	/* and the old snapshot, still held by requests in flight, still knows it */
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_int_equal(auth_cache_hits(), hits + 1);
	config_unref(c2);

	/* an unpublished snapshot (generation 0) is never cached */
	c->generation = 0;
	hits = auth_cache_hits();
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_int_equal(check(c, "chat", &h, &who, fp), AUTH_OK);
	assert_int_equal(auth_cache_hits(), hits);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup_teardown(test_bearer, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_header_order, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_wrong_and_missing, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_hashed_key, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_forbidden_route, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_auth_none, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_fingerprint_never_the_key, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_loader_agrees, setup, teardown),
	        cmocka_unit_test_setup_teardown(test_cache, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
