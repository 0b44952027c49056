/* test_json_scan.c — the request scanner: jansson's verdict on every rule, members, decoding,
 * estimates. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/json_scan.h"
#include "sluice/usage.h"

static enum json_scan_result scan_n(const char *s, size_t n, struct json_scan *out)
{
	return json_scan_body(s, n, out);
}

static enum json_scan_result scan(const char *s, struct json_scan *out)
{
	return scan_n(s, strlen(s), out);
}

/* jansson's own verdict, for the same bytes. */
static bool jansson_ok(const char *s, size_t n)
{
	json_t *j = json_loadb(s, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
	json_decref(j);
	return j != NULL;
}

/* Both agree: valid (an object or not) or invalid. */
static void agree_n(const char *s, size_t n, bool valid)
{
	struct json_scan sc;
	enum json_scan_result r = scan_n(s, n, &sc);
	if (jansson_ok(s, n) != valid)
		fail_msg("jansson does not say %s for: %.*s", valid ? "valid" : "invalid", (int)n,
		         s);
	if ((r != JSON_SCAN_INVALID) != valid)
		fail_msg("scanner says %d for: %.*s", r, (int)n, s);
	assert_int_not_equal(r, JSON_SCAN_TOO_COMPLEX);
}

static void agree(const char *s, bool valid)
{
	agree_n(s, strlen(s), valid);
}

static void test_structure(void **state)
{
	agree("{}", true);
	agree(" \t\r\n{ } \n", true);
	agree("[]", true);
	agree("[1,\"a\",true,false,null,{},[]]", true);
	agree("", false);
	agree("   ", false);
	agree("1", false);
	agree("\"a\"", false);
	agree("null", false);
	agree("{} x", false);
	agree("{}{}", false);
	agree("{\"a\":1,}", false);
	agree("[1,]", false);
	agree("[,1]", false);
	agree("{\"a\" 1}", false);
	agree("{\"a\":}", false);
	agree("{1:2}", false);
	agree("{\"a\":1", false);
	agree("[1 2]", false);
	agree("\xef\xbb\xbf{}", false); /* a BOM */
	agree("{\"a\":tru}", false);
	agree("{\"a\":truex}", false);
	agree("{\"a\":true1}", false);
	agree("{\"a\":NaN}", false);
	agree("{\"a\":Infinity}", false);
	agree("{/*c*/}", false);
	agree_n("{}\0", 3, false);
}

static void test_strings(void **state)
{
	agree("{\"a\":\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9\"}", true);
	agree("{\"a\":\"\\x\"}", false);
	agree("{\"a\":\"\\u12\"}", false);
	agree("{\"a\":\"\\u12G4\"}", false);
	agree("{\"a\":\"\\ud800\\udc00\"}", true);
	agree("{\"a\":\"\\uDBFF\\uDFFF\"}", true);
	agree("{\"a\":\"\\ud800\"}", false);
	agree("{\"a\":\"\\ud800x\"}", false);
	agree("{\"a\":\"\\ud800\\u0041\"}", false);
	agree("{\"a\":\"\\ud800\\n\"}", false);
	agree("{\"a\":\"\\udc00\"}", false);
	agree("{\"a\":\"\\u0000\"}", true); /* JSON_ALLOW_NUL */
	agree("{\"\\u0000\":1}", false);    /* but never in a key */
	agree("{\"a\\u0000b\":1}", false);
	agree("{\"a\":\"\x7f\"}", true);
	agree("{\"a\":\"\x1f\"}", false);
	agree("{\"a\":\"\t\"}", false);
	agree_n("{\"a\":\"x\0y\"}", 11, false);
	agree("{\"a\":\"unterminated}", false);
	/* UTF-8 as jansson checks it */
	agree("{\"a\":\"\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\"}", true);
	agree("{\"a\":\"\xc0\x80\"}", false);         /* overlong */
	agree("{\"a\":\"\xe0\x80\x80\"}", false);     /* overlong */
	agree("{\"a\":\"\xed\xa0\x80\"}", false);     /* an encoded surrogate */
	agree("{\"a\":\"\xf4\x90\x80\x80\"}", false); /* past U+10FFFF */
	agree("{\"a\":\"\xf5\x80\x80\x80\"}", false);
	agree("{\"a\":\"\x80\"}", false);
	agree("{\"a\":\"\xff\"}", false);
	agree("{\"a\":\"\xc3\"}", false); /* truncated */
	agree("{\"\xc3\xa9\":1}", true);
	agree("{\"a\":1}\xc3\xa9", false);
}

static void test_numbers(void **state)
{
	agree("{\"a\":-0}", true);
	agree("{\"a\":0}", true);
	agree("{\"a\":0.0e-0}", true);
	agree("{\"a\":1E5}", true);
	agree("{\"a\":1e+5}", true);
	agree("{\"a\":01}", false);
	agree("{\"a\":-01}", false);
	agree("{\"a\":00}", false);
	agree("{\"a\":1.}", false);
	agree("{\"a\":.5}", false);
	agree("{\"a\":1e}", false);
	agree("{\"a\":1e+}", false);
	agree("{\"a\":-}", false);
	agree("{\"a\":+1}", false);
	agree("{\"a\":0x10}", false);
	agree("{\"a\":1e1.5}", false);
	agree("{\"a\":9223372036854775807}", true);
	agree("{\"a\":9223372036854775808}", false);
	agree("{\"a\":-9223372036854775808}", true);
	agree("{\"a\":-9223372036854775809}", false);
	agree("{\"a\":99999999999999999999999}", false);
	agree("{\"a\":9223372036854775808.0}", true); /* a real */
	agree("{\"a\":1e308}", true);
	agree("{\"a\":1e309}", false);
	agree("{\"a\":-1e309}", false);
	agree("{\"a\":1e-400}", true);
	agree("{\"a\":0.00000000000000000000001e330}", true);
	agree("{\"a\":0.0001e313}", false);
	agree("{\"a\":1.7976931348623157e308}", true);
	agree("{\"a\":1.7976931348623158e308}", true);
	agree("{\"a\":1.7976931348623158079e308}", true); /* just under the rounding boundary */
	agree("{\"a\":1.7976931348623159e308}", false);
	agree("{\"a\":1e99999999999999999999999999}", false);
	agree("{\"a\":1e-99999999999999999999999999}", true);
	agree("{\"a\":0e99999999999999999999999999}", true);
}

/* Reals at DBL_MAX's rounding boundary (2^1024 - 2^970, 309 digits): strtod rounds it up to
 * infinity, one unit less down to DBL_MAX, however many digits follow. */
static void test_real_boundary(void **state)
{
	static const char mid[] = "1797693134862315807937289714053034150799341327100378269361737789"
	                          "80444968292764750946"
	                          "6490179775872070963302864166928879109465555478519404026306574886"
	                          "71505820681908902000"
	                          "7083836762738548458177115317644757302700698555713669596228429148"
	                          "19860834936475292719"
	                          "074168444365510704342711559699508093042880177904174497792";
	char *b = malloc(4096);
	size_t n;

	assert_non_null(b);
	/* "{"a":D.DDD…<tail>e308}" from the boundary's digits with the last one lowered by lower */
#define REAL(lower, tail)                                                                          \
	do {                                                                                       \
		n = (size_t)snprintf(b, 4096, "{\"a\":%c.%.*s%c%se308}", mid[0],                   \
		                     (int)(sizeof(mid) - 3), mid + 1,                              \
		                     (char)(mid[sizeof(mid) - 2] - (lower)), (tail));              \
	} while (0)
	REAL(0, "");
	agree_n(b, n, false); /* exactly the boundary: rounds to even, up */
	REAL(1, "");
	agree_n(b, n, true);
	char tail[900];
	memset(tail, '9', 850);
	tail[850] = '\0';
	REAL(1, tail); /* past the 780 digits kept: the sticky digit still keeps it under */
	agree_n(b, n, true);
	memset(tail, '0', 850);
	tail[849] = '1';
	REAL(0, tail);
	agree_n(b, n, false);
	REAL(1, tail);
	agree_n(b, n, true);
	tail[849] = '0';
	REAL(0, tail);
	agree_n(b, n, false);
#undef REAL
	free(b);
}

static void test_depth(void **state)
{
	char *b = malloc(2 * JSON_SCAN_MAX_DEPTH + 8);
	size_t n = 0;

	assert_non_null(b);
	for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = '[';
	for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = ']';
	agree_n(b, n, true); /* 2048 empty levels */
	n = 0;
	for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = '[';
	b[n++] = '1'; /* a scalar counts one level too */
	for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = ']';
	agree_n(b, n, false);
	n = 0;
	for (int i = 0; i <= JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = '[';
	for (int i = 0; i <= JSON_SCAN_MAX_DEPTH; i++)
		b[n++] = ']';
	agree_n(b, n, false);
	free(b);
}

static void test_duplicates(void **state)
{
	struct json_scan s;

	agree("{\"a\":1,\"a\":2}", false);
	agree("{\"a\":1,\"\\u0061\":2}", false); /* the same key once decoded */
	agree("{\"x\":{\"a\":1,\"a\":2}}", false);
	agree("{\"x\":[{\"a\":1},{\"a\":2}],\"a\":{\"a\":{\"a\":3}}}", true);
	agree("{\"a\":{\"b\":1},\"b\":2}", true);
	agree("{\"ab\":1,\"a\\u0062\":2}", false);
	agree("{\"\xc3\xa9\":1,\"\\u00e9\":2}", false);
	agree("{\"\\ud83d\\ude00\":1,\"\xf0\x9f\x98\x80\":2}", false);
	agree("{\"a\":1,\"b\":2,\"A\":3}", true);
	assert_int_equal(scan("{\"model\":\"a\",\"mod\\u0065l\":\"b\"}", &s), JSON_SCAN_INVALID);
	assert_string_equal(s.error, "duplicate object key");
	assert_int_equal(s.error_pos, 13);
}

/* Past the fixed bounds: TOO_COMPLEX, never a wrong verdict. */
static void test_bounds(void **state)
{
	struct json_scan s;
	size_t cap = 16 * (JSON_SCAN_MAX_OPEN_KEYS + 2) + 16, n = 0;
	char *b = malloc(cap);

	assert_non_null(b);
	b[n++] = '{';
	for (int i = 0; i <= JSON_SCAN_MAX_OPEN_KEYS; i++)
		n += (size_t)snprintf(b + n, cap - n, "%s\"k%d\":0", i ? "," : "", i);
	b[n++] = '}';
	assert_true(jansson_ok(b, n));
	assert_int_equal(scan_n(b, n, &s), JSON_SCAN_TOO_COMPLEX);
	/* one key fewer fits */
	n = 0;
	b[n++] = '{';
	for (int i = 0; i < JSON_SCAN_MAX_OPEN_KEYS; i++)
		n += (size_t)snprintf(b + n, cap - n, "%s\"k%d\":0", i ? "," : "", i);
	b[n++] = '}';
	assert_int_equal(scan_n(b, n, &s), JSON_SCAN_OK);
	assert_int_equal(s.n_members, JSON_SCAN_MAX_OPEN_KEYS);
	/* objects nested deeper than the segment stack */
	n = 0;
	for (int i = 0; i <= JSON_SCAN_MAX_OBJECT_DEPTH; i++)
		n += (size_t)snprintf(b + n, cap - n, "{\"a\":");
	b[n++] = '1';
	for (int i = 0; i <= JSON_SCAN_MAX_OBJECT_DEPTH; i++)
		b[n++] = '}';
	assert_true(jansson_ok(b, n));
	assert_int_equal(scan_n(b, n, &s), JSON_SCAN_TOO_COMPLEX);
	free(b);
}

static void test_members(void **state)
{
	struct json_scan s;
	const char *body = "{\"model\":\"gpt-4o\",\"stream\":true,\"n\":2,\"max_tokens\":100,"
	                   "\"temperature\":0.2,\"stream_options\":{\"include_usage\":true},"
	                   "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

	assert_int_equal(scan(body, &s), JSON_SCAN_OK);
	assert_int_equal(s.n_members, 7);
	const struct json_scan_value *m = &s.member[JSON_SCAN_MODEL];
	assert_int_equal(m->type, JSON_SCAN_STRING);
	assert_false(m->escaped);
	assert_int_equal(m->str_len, 6);
	assert_memory_equal(m->p, "\"gpt-4o\"", 8);
	assert_int_equal(m->len, 8);
	assert_int_equal(s.member[JSON_SCAN_STREAM].type, JSON_SCAN_TRUE);
	assert_int_equal(s.member[JSON_SCAN_N].type, JSON_SCAN_INTEGER);
	assert_int_equal(s.member[JSON_SCAN_N].integer, 2);
	assert_int_equal(s.member[JSON_SCAN_MAX_TOKENS].integer, 100);
	assert_int_equal(s.member[JSON_SCAN_MAX_COMPLETION_TOKENS].type, JSON_SCAN_ABSENT);
	assert_int_equal(s.member[JSON_SCAN_STREAM_OPTIONS].type, JSON_SCAN_OBJECT);
	assert_memory_equal(s.member[JSON_SCAN_STREAM_OPTIONS].p, "{\"include_usage\":true}", 22);
	assert_int_equal(s.member[JSON_SCAN_STREAM_OPTIONS].len, 22);
	assert_true(s.include_usage);
	assert_int_equal(s.member[JSON_SCAN_MESSAGES].type, JSON_SCAN_ARRAY);
	assert_int_equal(s.member[JSON_SCAN_MESSAGES].len, 32);
	assert_int_equal(json_scan_completion_budget(&s, 512), 200);

	/* a nested include_usage, or one that is not true, is not the one we look for */
	assert_int_equal(scan("{\"stream_options\":{\"x\":{\"include_usage\":true}}}", &s),
	                 JSON_SCAN_OK);
	assert_false(s.include_usage);
	assert_int_equal(scan("{\"stream_options\":{\"include_usage\":1}}", &s), JSON_SCAN_OK);
	assert_false(s.include_usage);
	assert_int_equal(scan("{\"x\":{\"include_usage\":true}}", &s), JSON_SCAN_OK);
	assert_false(s.include_usage);
	/* names inside other members are not top-level members */
	assert_int_equal(scan("{\"meta\":{\"model\":\"x\",\"stream\":true}}", &s), JSON_SCAN_OK);
	assert_int_equal(s.member[JSON_SCAN_MODEL].type, JSON_SCAN_ABSENT);
	assert_int_equal(s.member[JSON_SCAN_STREAM].type, JSON_SCAN_ABSENT);
	assert_int_equal(s.n_members, 1);
	/* types as they are */
	assert_int_equal(
	        scan("{\"model\":null,\"stream\":\"yes\",\"n\":1.0,\"max_tokens\":-3}", &s),
	        JSON_SCAN_OK);
	assert_int_equal(s.member[JSON_SCAN_MODEL].type, JSON_SCAN_NULL);
	assert_int_equal(s.member[JSON_SCAN_STREAM].type, JSON_SCAN_STRING);
	assert_int_equal(s.member[JSON_SCAN_N].type, JSON_SCAN_REAL);
	assert_int_equal(s.member[JSON_SCAN_MAX_TOKENS].integer, -3);
	assert_int_equal(json_scan_completion_budget(&s, 512), 512);
	/* an array at the top: valid, but not an object, and no members */
	assert_int_equal(scan("[{\"model\":\"x\"}]", &s), JSON_SCAN_NOT_OBJECT);
	assert_int_equal(s.member[JSON_SCAN_MODEL].type, JSON_SCAN_ABSENT);
}

static void test_escaped_names_and_values(void **state)
{
	struct json_scan s;
	char buf[64];

	assert_int_equal(
	        scan("{\"mod\\u0065l\":\"gpt\\u002d4\\ud83d\\ude00\\n\",\"str\\u0065am\":false}",
	             &s),
	        JSON_SCAN_OK);
	const struct json_scan_value *m = &s.member[JSON_SCAN_MODEL];
	assert_int_equal(m->type, JSON_SCAN_STRING);
	assert_true(m->escaped);
	assert_int_equal(m->str_len, 10);
	assert_int_equal(json_scan_string(m, buf, sizeof(buf)), 10);
	assert_memory_equal(buf, "gpt-4\xf0\x9f\x98\x80\n", 10);
	assert_int_equal(json_scan_string(m, buf, 3), 10); /* too small: the length, a prefix */
	assert_memory_equal(buf, "gpt", 3);
	assert_int_equal(s.member[JSON_SCAN_STREAM].type, JSON_SCAN_FALSE);
	/* a NUL decoded in a value is allowed, and counted */
	assert_int_equal(scan("{\"model\":\"a\\u0000b\"}", &s), JSON_SCAN_OK);
	assert_int_equal(s.member[JSON_SCAN_MODEL].str_len, 3);
	assert_int_equal(json_scan_string(&s.member[JSON_SCAN_MODEL], buf, sizeof(buf)), 3);
	assert_memory_equal(buf, "a\0b", 3);
	assert_int_equal(json_scan_string(&s.member[JSON_SCAN_STREAM], buf, sizeof(buf)), 0);
}

static void test_error_location(void **state)
{
	struct json_scan s;

	assert_int_equal(scan("{\n  \"a\": 1,\n  \"b\": x\n}", &s), JSON_SCAN_INVALID);
	assert_int_equal(s.line, 3);
	assert_int_equal(s.column, 8);
	assert_int_equal(s.error_pos, 19);
	assert_non_null(s.error);
	/* jansson's one lenience the scanner does not share (json_scan.h) */
	assert_true(jansson_ok("{\"a\":1\0}", 8));
	assert_int_equal(scan_n("{\"a\":1\0}", 8, &s), JSON_SCAN_INVALID);
	assert_int_equal(s.error_pos, 6);
}

/* The estimate over spans equals usage.c's over jansson's tree. */
static void same_estimate(const char *body)
{
	struct json_scan s;
	json_t *j = json_loads(body, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);

	assert_non_null(j);
	assert_int_equal(scan(body, &s), JSON_SCAN_OK);
	assert_int_equal(json_scan_estimate_prompt(&s), usage_estimate_prompt(j));
	assert_int_equal(json_scan_completion_budget(&s, 77), usage_completion_budget(j, 77));
	json_decref(j);
}

static void test_estimates(void **state)
{
	same_estimate("{}");
	same_estimate("{\"messages\":[]}");
	same_estimate("{\"messages\":\"not an array\",\"max_tokens\":5}");
	same_estimate("{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"You are "
	              "brief.\"},"
	              "{\"role\":\"user\",\"content\":\"Summarise why a gateway "
	              "helps.\",\"name\":\"x\"}]}");
	same_estimate(
	        "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	        "\"look\"},"
	        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,AAAA\"}}]},"
	        "{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\","
	        "\"arguments\":"
	        "\"{\\\"a\\\":1}\"}}]},\"bare string\",42,[\"x\",1,2]]}");
	same_estimate("{\"messages\":[{\"image_url\":\"x\",\"ro\\u006ce\":\"user\"}]}");
	same_estimate(
	        "{\"prompt\":[[1,2,3],[4,-5],\"text\",1.5,[1e2,7]],\"n\":4,\"max_tokens\":10}");
	same_estimate("{\"input\":[\"one\",\"two\",[\"three\"],{\"x\":\"y\",\"image\":\"zzz\"}]}");
	same_estimate(
	        "{\"system\":[{\"type\":\"text\",\"text\":\"sys\"}],\"instructions\":\"be "
	        "\\u00e9\","
	        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get\",\"parameters\":"
	        "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}}}}}],"
	        "\"functions\":[{\"name\":\"f\",\"description\":\"d\",\"image_url\":\"counted\"}]"
	        "}");
	same_estimate("{\"messages\":[{\"role\":\"user\",\"content\":"
	              "\"a\\u0000\\ud83d\\ude00\\t\\\"\"}]}");
	same_estimate("{\"max_completion_tokens\":3,\"max_tokens\":9,\"n\":129}");
	same_estimate("{\"max_completion_tokens\":-1,\"max_tokens\":9,\"n\":128}");
	same_estimate("{\"max_output_tokens\":0}");
	same_estimate("{\"prompt\":\"\"}");

	/* deeper than the 64 levels that count */
	char deep[600];
	size_t n = (size_t)snprintf(deep, sizeof(deep), "{\"input\":");
	for (int i = 0; i < 70; i++)
		deep[n++] = '[';
	n += (size_t)snprintf(deep + n, sizeof(deep) - n, "\"hidden text\",5");
	for (int i = 0; i < 70; i++)
		deep[n++] = ']';
	deep[n++] = '}';
	deep[n] = '\0';
	same_estimate(deep);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_structure),
	        cmocka_unit_test(test_strings),
	        cmocka_unit_test(test_numbers),
	        cmocka_unit_test(test_real_boundary),
	        cmocka_unit_test(test_depth),
	        cmocka_unit_test(test_duplicates),
	        cmocka_unit_test(test_bounds),
	        cmocka_unit_test(test_members),
	        cmocka_unit_test(test_escaped_names_and_values),
	        cmocka_unit_test(test_error_location),
	        cmocka_unit_test(test_estimates),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
