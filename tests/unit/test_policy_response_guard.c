/* test_policy_response_guard.c — response_guard: configuration errors, the hold computed from the
 * patterns, mask and block on whole answers, and streams split at every position: the output
 * is the same as for the whole text, and held text is released as soon as it cannot start a
 * match. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

/* The module itself, for its pattern reading (static functions). */
#include "../../src/policy/response_guard.c"

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - response_guard: { deny: [\"a\\\\Gb\", \"(\"], action: block, mask: "
	        "x, hold: 70000, held: 1 }\n",
	        "t.yaml:7:34: routes[0].plugins[0].response_guard.deny[0]: \\G cannot be "
	        "used here: the output arrives in pieces",
	        "t.yaml:7:43: routes[0].plugins[0].response_guard.deny[1]: invalid regular "
	        "expression: missing closing parenthesis at offset 1",
	        "t.yaml:7:70: routes[0].plugins[0].response_guard.mask: has no effect with "
	        "action: block",
	        "t.yaml:7:79: routes[0].plugins[0].response_guard.hold: must be an integer "
	        "from 0 to 65536",
	        "t.yaml:7:86: routes[0].plugins[0].response_guard: unknown key \"held\" "
	        "(did you mean \"hold\"?)");
}

static long reach(const char *re)
{
	bool g;
	return pattern_reach(re, &g);
}

static void test_pattern_reach(void **state)
{
	assert_int_equal(reach("\\b\\d{16}\\b"), 16);
	assert_int_equal(reach("\\d{4}[ -]?\\d{4}[ -]?\\d{4}[ -]?\\d{4}"), 19);
	assert_int_equal(reach("\\d{13,19}(?!\\d)"), 20);
	assert_int_equal(reach("(?i)password|secret"), 8);
	assert_int_equal(reach("(?<=card )\\d{4}"), 4);
	assert_int_equal(reach("[a-z\\]]{3}"), 3);
	assert_int_equal(reach("\\Qa.b\\E"), 3);
	assert_int_equal(reach("(ab){2}c?"), 5);
	assert_int_equal(reach("日本"), 2);
	assert_int_equal(reach("a\\r\\nb|\\R"), 4);
	assert_int_equal(reach("(?:x(?=yz))"), 3);
	assert_int_equal(reach("a{,3}"), 5); /* PCRE2 10.42: {,3} is literal */
	assert_int_equal(reach("(?#note)ab"), 2);
	/* not bounded here: the default cap applies */
	assert_true(reach("\\d+") >= REACH_INF);
	assert_true(reach("a.*b") >= REACH_INF);
	assert_true(reach("(a)\\1") >= REACH_INF);
	assert_true(reach("(?x) a b") >= REACH_INF);
	assert_true(reach("(?R)") >= REACH_INF);
	assert_true(reach("\\X") >= REACH_INF);

	struct config *c =
	        pt_load("      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\", \"(?<=ab)c\"] "
	                "}\n      - loop_guard:\n");
	const struct rguard_conf *g = pt_route(c)->plugins[0].conf;
	assert_int_equal(g->hold, 16);
	assert_int_equal(g->lookbehind, 2);
	assert_false(g->block);
	assert_string_equal(g->mask, "[redacted]");
	config_unref(c);
	c = pt_load("      - response_guard: { deny: [\"secret\\\\S+\"], action: block }\n");
	g = pt_route(c)->plugins[0].conf;
	assert_int_equal(g->hold, RESPONSE_GUARD_HOLD_DEFAULT_CAP);
	assert_int_equal(g->lookbehind, 1);
	assert_true(g->block);
	config_unref(c);
}

/* The whole text, non-stream. */
static char *whole(const struct config *c, const char *text, enum policy_verdict *v)
{
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, false);
	const char *pieces[] = {text, NULL};
	char *out = pt_stream(run, 0, pieces, true, v);
	policy_run_free(run);
	return out;
}

/* The text in two stream pieces cut at byte `cut` (then the final flush). */
static char *split2(const struct config *c, const char *text, size_t cut, enum policy_verdict *v,
                    char **first)
{
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	struct evbuffer *out = evbuffer_new();
	size_t len = strlen(text);
	enum policy_verdict r = policy_run_text(run, 0, text, cut, false, out);
	if (first != NULL) {
		*first = strndup((const char *)evbuffer_pullup(out, -1), evbuffer_get_length(out));
	}
	if (r == POLICY_CONTINUE)
		r = policy_run_text(run, 0, text + cut, len - cut, false, out);
	if (r == POLICY_CONTINUE)
		r = policy_run_text(run, 0, "", 0, true, out);
	*v = r;
	char *s = strndup((const char *)evbuffer_pullup(out, -1), evbuffer_get_length(out));
	evbuffer_free(out);
	policy_run_free(run);
	return s;
}

#define CARD "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"] }\n"

static void test_mask_whole(void **state)
{
	struct config *c = pt_load(CARD);
	enum policy_verdict v;
	char *out = whole(c, "card 1234567812345678 and 12345678123456789, 1111222233334444.", &v);
	assert_int_equal(v, POLICY_CONTINUE);
	assert_string_equal(out, "card [redacted] and 12345678123456789, [redacted].");
	free(out);

	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, false);
	const char *pieces[] = {"1234567812345678", NULL};
	free(pt_stream(run, 0, pieces, true, &v));
	char buf[64];
	assert_string_equal(pt_action(run, buf, sizeof buf), "response_guard:masked");
	policy_run_free(run);
	config_unref(c);

	c = pt_load("      - response_guard: { deny: [\"(?i)secret\"], mask: \"***\" }\n");
	out = whole(c, "a Secret, a SECRET", &v);
	assert_string_equal(out, "a ***, a ***");
	free(out);
	config_unref(c);
}

static void test_block_whole(void **state)
{
	struct config *c =
	        pt_load("      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"], action: "
	                "block }\n");
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, false);
	const char *pieces[] = {"your card is 1234567812345678, keep it", NULL};
	enum policy_verdict v;
	char *out = pt_stream(run, 0, pieces, true, &v);
	assert_int_equal(v, POLICY_STOP);
	assert_string_equal(out, "your card is ");
	assert_string_equal(policy_run_finish_reason(run, 0), "content_filter");
	free(out);
	policy_run_free(run);
	config_unref(c);
}

/* Every cut of every text gives the whole-text output; what the first piece lets out is
 * never held longer than needed. */
static void check_all_splits(const char *plugins, const char *text)
{
	struct config *c = pt_load(plugins);
	enum policy_verdict vw, vs;
	char *want = whole(c, text, &vw);
	for (size_t cut = 0; cut <= strlen(text); cut++) {
		if (((unsigned char)text[cut] & 0xC0) == 0x80)
			continue; /* pieces are whole UTF-8 strings */
		char *got = split2(c, text, cut, &vs, NULL);
		if (strcmp(got, want) != 0 || vs != vw)
			fail_msg("cut at %zu: got \"%s\" (%d), want \"%s\" (%d)", cut, got, vs,
			         want, vw);
		free(got);
	}
	free(want);
	config_unref(c);
}

static void test_stream_every_split(void **state)
{
	check_all_splits(CARD, "pay with 4111111111111111 today, or 5555444433332222");
	check_all_splits(CARD, "1234567812345678");
	check_all_splits(CARD, "x12345678123456789 1234567812345678x 1234567812345678");
	check_all_splits("      - response_guard: { deny: [\"\\\\d{4}[ -]?\\\\d{4}[ -]?\\\\d{4}[ "
	                 "-]?\\\\d{4}\"] }\n",
	                 "a 1234 5678 9012 3456 b 1234-5678-9012-3456 c");
	check_all_splits(
	        "      - response_guard: { deny: [\"(?<=card )\\\\d{4}\", \"(?i)pass(word)?\"] "
	        "}\n",
	        "card 1234, not 5678; password: passw");
	check_all_splits("      - response_guard: { deny: [\"密码\\\\d{3}\"], mask: \"＊\" }\n",
	                 "这是密码123和密码45与密码678");
	check_all_splits("      - response_guard: { deny: [\"(?m)^secret\"] }\n",
	                 "secret\nno secret\nsecret here");
	check_all_splits(
	        "      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"], action: block }\n",
	        "ok 1234 then 1234567812345678 end");
}

static void test_stream_release_early(void **state)
{
	struct config *c = pt_load(CARD);
	enum policy_verdict v;
	char *first;
	/* "abc 1234" : the digits may start a card number and wait; "abc " does not */
	char *out = split2(c, "abc 12345678 xyz", 8, &v, &first);
	assert_string_equal(first, "abc ");
	assert_string_equal(out, "abc 12345678 xyz");
	free(first);
	free(out);
	/* nothing held when nothing can start a match */
	out = split2(c, "no digits here at all", 5, &v, &first);
	assert_string_equal(first, "no di");
	free(first);
	free(out);
	config_unref(c);
}

static void test_stream_block(void **state)
{
	struct config *c =
	        pt_load("      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"], action: "
	                "block }\n");
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	struct evbuffer *out = evbuffer_new();
	const char *a = "your number: 12345678", *b = "12345678 is it";
	assert_int_equal(policy_run_text(run, 0, a, strlen(a), false, out), POLICY_CONTINUE);
	assert_int_equal(policy_run_text(run, 0, b, strlen(b), false, out), POLICY_STOP);
	assert_string_equal(policy_run_stopped(run), "content_filter");
	/* everything after the stop is dropped */
	assert_int_equal(policy_run_text(run, 0, "more", 4, false, out), POLICY_STOP);
	evbuffer_add(out, "", 1);
	assert_string_equal((const char *)evbuffer_pullup(out, -1), "your number: ");
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

static void test_hold_cap(void **state)
{
	/* with hold: 4, a card number cut in the middle is let through (documented) */
	struct config *c =
	        pt_load("      - response_guard: { deny: [\"\\\\b\\\\d{16}\\\\b\"], hold: 4 "
	                "}\n");
	enum policy_verdict v;
	char *first;
	char *out = split2(c, "1234567812345678 end", 10, &v, &first);
	assert_string_equal(first, "123456");
	assert_string_equal(out, "1234567812345678 end");
	free(first);
	free(out);
	/* the same text whole is masked */
	out = whole(c, "1234567812345678 end", &v);
	assert_string_equal(out, "[redacted] end");
	free(out);
	config_unref(c);
}

static void test_many_pieces(void **state)
{
	/* one character per event */
	struct config *c = pt_load(CARD);
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, true);
	struct evbuffer *out = evbuffer_new();
	const char *text = "a 1234567812345678 b 12345678123456789 c";
	for (size_t i = 0; text[i] != '\0'; i++)
		assert_int_equal(policy_run_text(run, 0, text + i, 1, false, out), POLICY_CONTINUE);
	assert_int_equal(policy_run_text(run, 0, "", 0, true, out), POLICY_CONTINUE);
	evbuffer_add(out, "", 1);
	assert_string_equal((const char *)evbuffer_pullup(out, -1),
	                    "a [redacted] b 12345678123456789 c");
	evbuffer_free(out);
	policy_run_free(run);
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test(test_pattern_reach),
	        cmocka_unit_test(test_mask_whole),
	        cmocka_unit_test(test_block_whole),
	        cmocka_unit_test(test_stream_every_split),
	        cmocka_unit_test(test_stream_release_early),
	        cmocka_unit_test(test_stream_block),
	        cmocka_unit_test(test_hold_cap),
	        cmocka_unit_test(test_many_pieces),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
