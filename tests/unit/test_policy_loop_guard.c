/* test_policy_loop_guard.c — loop_guard: configuration errors; repetitive output cut (where, with
 * which finish reason, action and alert) in whole answers and in streams of small pieces; short
 * periods only when they fill the window; max_output_chars; no false positive on the
 * project's own prose (markdown with tables and code). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "policy_helpers.h"

#define SOURCE_DIR TEST_DATA_DIR "/../../.."

static void test_config_errors(void **state)
{
	PT_EXPECT_ERRORS(
	        "      - loop_guard: { max_repeats: 1, window: 70000, min_period: 0, "
	        "max_output_chars: 0 }\n",
	        "t.yaml:7:36: routes[0].plugins[0].loop_guard.max_repeats: must be an "
	        "integer from 2 to 1000000",
	        "t.yaml:7:47: routes[0].plugins[0].loop_guard.window: must be an integer "
	        "from 1 to 65536",
	        "t.yaml:7:66: routes[0].plugins[0].loop_guard.min_period: must be an "
	        "integer from 1 to 65536",
	        "t.yaml:7:87: routes[0].plugins[0].loop_guard.max_output_chars: must be an "
	        "integer from 1 to 1000000000");
	PT_EXPECT_ERRORS(
	        "      - loop_guard: { max_repeats: 10, window: 50 }\n",
	        "t.yaml:7:48: routes[0].plugins[0].loop_guard.window: window (50) must hold "
	        "max_repeats × min_period = 80 characters");
}

/* Feeds text in pieces of `piece` bytes (0: whole, non-stream); returns how many bytes of it
 * went out before the stop (or strlen when there was none), the verdict in *v. */
static size_t run_text(const struct config *c, const char *text, size_t piece,
                       enum policy_verdict *v, struct policy_run **keep)
{
	bool streaming = piece != 0;
	struct policy_run *run = policy_run_new(pt_route(c), &pt_env, streaming);
	struct evbuffer *out = evbuffer_new();
	size_t len = strlen(text), off = 0;
	enum policy_verdict r = POLICY_CONTINUE;

	if (!streaming)
		r = policy_run_text(run, 0, text, len, true, out);
	while (streaming && r == POLICY_CONTINUE && off < len) {
		size_t n = len - off < piece ? len - off : piece;
		r = policy_run_text(run, 0, text + off, n, false, out);
		off += n;
	}
	if (streaming && r == POLICY_CONTINUE)
		r = policy_run_text(run, 0, "", 0, true, out);
	size_t emitted = evbuffer_get_length(out);
	assert_memory_equal(evbuffer_pullup(out, -1), text, emitted);
	evbuffer_free(out);
	*v = r;
	if (keep != NULL)
		*keep = run;
	else
		policy_run_free(run);
	return emitted;
}

static char *repeat(const char *prefix, const char *span, size_t times)
{
	size_t pl = strlen(prefix), sl = strlen(span);
	char *s = malloc(pl + sl * times + 1);
	assert_non_null(s);
	memcpy(s, prefix, pl);
	for (size_t i = 0; i < times; i++)
		memcpy(s + pl + i * sl, span, sl);
	s[pl + sl * times] = '\0';
	return s;
}

static void test_loop_cut(void **state)
{
	struct config *c = pt_load("      - loop_guard: { max_repeats: 8, window: 512 }\n");
	const char *prefix = "Here is the answer you asked for. ";
	char *text = repeat(prefix, "I am sorry, ", 100); /* a 12-character span */
	enum policy_verdict v;
	struct policy_run *run;

	for (size_t piece = 0; piece <= 7; piece += 7) {
		size_t out = run_text(c, text, piece, &v, &run);
		assert_int_equal(v, POLICY_STOP);
		assert_string_equal(policy_run_finish_reason(run, 0), "length");
		/* eight repeats are enough; the block that finds them starts within
		 * window / max_repeats characters of the loop */
		size_t pl = strlen(prefix);
		assert_true(out >= pl + 8 * 12);
		assert_true(out <= pl + 512 / 8 + 12 + 8 * 12);
		const struct policy_action *a;
		assert_int_equal(policy_run_actions(run, &a, NULL), 1);
		assert_string_equal(a[0].policy, "loop_guard");
		assert_string_equal(a[0].action, "cut");
		assert_string_equal(a[0].alert, "loop_detected");
		assert_string_equal(a[0].rule, "a span of 12 characters repeated 8 times");
		policy_run_free(run);
	}
	free(text);

	/* seven repeats are not a loop */
	text = repeat(prefix, "I am sorry, ", 7);
	run_text(c, text, 3, &v, NULL);
	assert_int_equal(v, POLICY_CONTINUE);
	free(text);
	config_unref(c);
}

static void test_short_periods_fill_the_window(void **state)
{
	struct config *c = pt_load("      - loop_guard: { max_repeats: 8, window: 512 }\n");
	enum policy_verdict v;

	/* a rule of 500 '=' is ordinary; 600 are a loop, cut at 512 */
	char *text = repeat("", "=", 500);
	run_text(c, text, 0, &v, NULL);
	assert_int_equal(v, POLICY_CONTINUE);
	free(text);
	text = repeat("", "=", 600);
	assert_int_equal(run_text(c, text, 0, &v, NULL), 512);
	assert_int_equal(v, POLICY_STOP);
	free(text);
	/* "the the the ...": a 4-character span, under min_period: only a whole window */
	text = repeat("", "the ", 200);
	assert_int_equal(run_text(c, text, 5, &v, NULL), 512);
	free(text);
	text = repeat("x ", "|---", 30);
	run_text(c, text, 0, &v, NULL);
	assert_int_equal(v, POLICY_CONTINUE);
	free(text);
	config_unref(c);
}

static void test_utf8(void **state)
{
	/* characters, not bytes: a 9-character span of 3-byte characters */
	struct config *c = pt_load("      - loop_guard: { max_repeats: 4, window: 64 }\n");
	char *text = repeat("开始。", "我们再试一次吧。", 20);
	enum policy_verdict v;
	size_t out = run_text(c, text, 5, &v, NULL); /* pieces cut inside characters */
	assert_int_equal(v, POLICY_STOP);
	assert_true(out >= strlen("开始。") + 4 * strlen("我们再试一次吧。"));
	assert_true(out < strlen(text));
	free(text);
	config_unref(c);
}

static void test_max_output_chars(void **state)
{
	struct config *c = pt_load("      - loop_guard: { max_output_chars: 10 }\n");
	enum policy_verdict v;
	struct policy_run *run;
	assert_int_equal(run_text(c, "héllo wörld and more", 4, &v, &run), strlen("héllo wörl"));
	assert_int_equal(v, POLICY_STOP);
	const struct policy_action *a;
	policy_run_actions(run, &a, NULL);
	assert_string_equal(a[0].rule, "max_output_chars 10");
	policy_run_free(run);
	run_text(c, "0123456789", 0, &v, NULL);
	assert_int_equal(v, POLICY_CONTINUE);
	config_unref(c);
}

static char *read_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *s = malloc((size_t)n + 1);
	assert_non_null(s);
	assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
	s[n] = '\0';
	fclose(f);
	return s;
}

static void test_prose_is_not_a_loop(void **state)
{
	static const char *const files[] = {SOURCE_DIR "/docs/architecture.md",
	                                    SOURCE_DIR "/docs/configuration.md",
	                                    SOURCE_DIR "/README.md", SOURCE_DIR "/src/config.c"};
	struct config *c = pt_load("      - loop_guard:\n");
	for (size_t i = 0; i < PT_ARRAY_LEN(files); i++) {
		char *text = read_file(files[i]);
		enum policy_verdict v;
		assert_true(strlen(text) > 4000);
		size_t out = run_text(c, text, 17, &v, NULL);
		if (v != POLICY_CONTINUE)
			fail_msg("%s: cut after %zu bytes: ...%.80s", files[i], out,
			         text + (out > 80 ? out - 80 : 0));
		free(text);
	}
	config_unref(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_config_errors),
	        cmocka_unit_test(test_loop_cut),
	        cmocka_unit_test(test_short_periods_fill_the_window),
	        cmocka_unit_test(test_utf8),
	        cmocka_unit_test(test_max_output_chars),
	        cmocka_unit_test(test_prose_is_not_a_loop),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
