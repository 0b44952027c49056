/* test_usage.c — usage from bodies and SSE chunks, never fooled by content; estimates. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/usage.h"

static bool body(const char *s, struct record_usage *u)
{
	return usage_from_body(s, strlen(s), u);
}

static void test_body_plain(void **state)
{
	struct record_usage u;
	assert_true(body(
	        "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"hi\"}}],"
	        "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}",
	        &u));
	assert_true(u.present);
	assert_false(u.estimated);
	assert_int_equal(u.prompt, 12);
	assert_int_equal(u.completion, 5);
	assert_int_equal(u.total, 17);
	assert_int_equal(u.cached, 0);
	assert_int_equal(u.reasoning, 0);
}

static void test_body_usage_in_content(void **state)
{
	struct record_usage u;
	/* "usage" inside content, escaped quotes, a nested object called usage, arrays: the
	 * real member is the last top-level one. */
	const char *s =
	        "{ \"choices\" : [ { \"message\" : { \"content\" : \"the \\\"usage\\\": "
	        "{\\\"prompt_tokens\\\": 999} is fake\","
	        " \"meta\": {\"usage\": {\"prompt_tokens\": 777, \"completion_tokens\": 1}} } } ],"
	        " \"x\": [1, 2, {\"usage\": {\"total_tokens\": 5}}, \"]}\"], \"n\": null, \"b\": "
	        "true, \"f\": -1.5e3,\n"
	        " \"usage\" : {\"prompt_tokens\": 3, \"completion_tokens\": 4} }";
	assert_true(body(s, &u));
	assert_int_equal(u.prompt, 3);
	assert_int_equal(u.completion, 4);
	assert_int_equal(u.total, 7);
}

static void test_body_usage_only_in_content(void **state)
{
	struct record_usage u;
	const char *s = "{\"choices\":[{\"message\":{\"content\":\"\\\"usage\\\":{\\\"prompt_"
	                "tokens\\\":9}\","
	                "\"usage\":{\"prompt_tokens\":9}}}]}";
	assert_false(body(s, &u));
	assert_false(u.present);
}

static void test_body_details(void **state)
{
	struct record_usage u;
	assert_true(body(
	        "{\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":50,\"total_tokens\":150,"
	        "\"prompt_tokens_details\":{\"cached_tokens\":64,\"audio_tokens\":0},"
	        "\"completion_tokens_details\":{\"reasoning_tokens\":30}}}",
	        &u));
	assert_int_equal(u.cached, 64);
	assert_int_equal(u.reasoning, 30);
	assert_int_equal(u.total, 150);
}

static void test_body_anthropic_and_responses(void **state)
{
	struct record_usage u;
	assert_true(
	        body("{\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":\"usage\"}],"
	             "\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":20,"
	             "\"cache_creation_input_tokens\":5,\"output_tokens\":7}}",
	             &u));
	assert_int_equal(u.prompt, 35);
	assert_int_equal(u.completion, 7);
	assert_int_equal(u.total, 42);
	assert_int_equal(u.cached, 20);

	assert_true(
	        body("{\"object\":\"response\",\"usage\":{\"input_tokens\":8,\"output_tokens\":9,"
	             "\"total_tokens\":17,\"input_tokens_details\":{\"cached_tokens\":4},"
	             "\"output_tokens_details\":{\"reasoning_tokens\":2}}}",
	             &u));
	assert_int_equal(u.prompt, 8);
	assert_int_equal(u.completion, 9);
	assert_int_equal(u.cached, 4);
	assert_int_equal(u.reasoning, 2);
}

static void test_body_absent(void **state)
{
	struct record_usage u;
	assert_false(body("{\"choices\":[]}", &u));
	assert_false(body("{\"usage\":null}", &u));
	assert_false(body("{\"usage\":{}}", &u));
	assert_false(body("{\"usage\":42}", &u));
	assert_false(body("{}", &u));
	assert_false(body("", &u));
	assert_false(body("[{\"usage\":{\"prompt_tokens\":1}}]", &u));
	assert_false(body("{\"usage\":{\"prompt_tokens\":1}", &u)); /* truncated */
	assert_false(body("{\"a\":\"unterminated", &u));
	assert_false(u.present);
	/* embeddings: prompt only */
	assert_true(body("{\"data\":[],\"usage\":{\"prompt_tokens\":6,\"total_tokens\":6}}", &u));
	assert_int_equal(u.prompt, 6);
	assert_int_equal(u.completion, 0);
	assert_int_equal(u.total, 6);
}

static bool sse(const char *s, struct record_usage *u, bool *only)
{
	return usage_from_sse_data(s, strlen(s), u, only);
}

static void test_sse_chunks(void **state)
{
	struct record_usage u;
	bool only = true;

	assert_false(sse("{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}", &u, &only));
	assert_false(only);
	assert_false(
	        sse("{\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}", &u, &only));
	assert_false(sse("{\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\" is\"}}]}", &u,
	                 &only));
	assert_false(sse("[DONE]", &u, &only));

	assert_true(sse("{\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_"
	                "tokens\":16,"
	                "\"total_tokens\":21}}",
	                &u, &only));
	assert_true(only);
	assert_int_equal(u.total, 21);

	assert_true(sse("{\"id\":\"c\",\"choices\":[ "
	                "],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}",
	                &u, &only));
	assert_true(only);

	/* vLLM's continuous usage: usage on a chunk that also carries a delta */
	assert_true(
	        sse("{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],"
	            "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}",
	            &u, &only));
	assert_false(only);
	assert_int_equal(u.completion, 2);

	/* usage_only may be NULL */
	assert_true(sse("{\"choices\":[],\"usage\":{\"prompt_tokens\":1}}", &u, NULL));

	/* A chunk that ends with a top-level "usage":null is refused from its last bytes:
	 * also with whitespace, and whatever nested "usage" object it holds. */
	assert_false(sse("{\"choices\":[{\"delta\":{\"usage\":{\"prompt_tokens\":1}}}] , "
	                 "\"usage\" : null }\n",
	                 &u, &only));
	/* ... but only a member's: here "usage":null} is the tail of a string value. */
	assert_true(sse("{\"usage\":{\"prompt_tokens\":3},\"x\":\"a\\\",\\\"usage\\\":null}\"}", &u,
	                &only));
	assert_int_equal(u.prompt, 3);
	/* The documented difference: a repeated top-level "usage" that ends null is no usage. */
	assert_false(sse("{\"usage\":{\"prompt_tokens\":3},\"choices\":[],\"usage\":null}", &u,
	                 &only));
}

/* The usage object is read in place when it is plain, by jansson otherwise: the same counts. */
static void test_usage_object_forms(void **state)
{
	struct record_usage u;

	assert_true(body("{\"usage\":{\"prompt_tokens\":2.9,\"completion_tokens\":-4,"
	                 "\"prompt_tokens_details\":{\"cached_tokens\":1e1},"
	                 "\"completion_tokens_details\":{\"reasoning_tokens\":\"7\"}}}",
	                 &u));
	assert_int_equal(u.prompt, 2);
	assert_int_equal(u.completion, 0);
	assert_int_equal(u.total, 2);
	assert_int_equal(u.cached, 10);
	assert_int_equal(u.reasoning, 0);
	/* escaped key, repeated key (jansson: the last wins), NUL in a string (jansson refuses) */
	assert_true(body("{\"usage\":{\"prompt_\\u0074okens\":4}}", &u));
	assert_int_equal(u.prompt, 4);
	assert_true(body("{\"usage\":{\"prompt_tokens\":1,\"prompt_tokens\":2}}", &u));
	assert_int_equal(u.prompt, 2);
	assert_false(body("{\"usage\":{\"prompt_tokens\":1,\"x\":\"\\u0000\"}}", &u));
	assert_false(body("{\"usage\":{\"prompt_tokens\":1,}}", &u));
}

static json_t *parse(const char *s)
{
	json_t *j = json_loads(s, 0, NULL);
	assert_non_null(j);
	return j;
}

static void test_estimate_prompt(void **state)
{
	json_t *b;

	/* two messages, 4 + 8 bytes → 1 + 2 tokens, + 2 × 4 + 3 */
	b = parse("{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"abcd\"},"
	          "{\"role\":\"user\",\"content\":\"abcdefgh\"}]}");
	assert_int_equal(usage_estimate_prompt(b),
	                 (4 + 8) / 4 + 2 * USAGE_TOKENS_PER_MESSAGE + USAGE_TOKENS_PER_REPLY);
	json_decref(b);

	/* content parts: text counts, an image counts as a fixed amount, not its base64 bytes */
	b = parse("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
	          "\"12345\"},"
	          "{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/"
	          "png;base64,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}}]}]}");
	uint64_t n = usage_estimate_prompt(b);
	assert_true(n >= USAGE_TOKENS_PER_IMAGE + 2 + USAGE_TOKENS_PER_MESSAGE);
	assert_true(n < USAGE_TOKENS_PER_IMAGE + 20);
	json_decref(b);

	/* completions prompt and token ids */
	b = parse("{\"prompt\":\"abcdefghi\"}");
	assert_int_equal(usage_estimate_prompt(b), 3);
	json_decref(b);
	b = parse("{\"prompt\":[1,2,3,4,5]}");
	assert_int_equal(usage_estimate_prompt(b), 5);
	json_decref(b);
	b = parse("{\"input\":[\"abcd\",\"efgh\"]}");
	assert_int_equal(usage_estimate_prompt(b), 2);
	json_decref(b);

	/* tools add their text, names included */
	json_t *a = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
	b = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"tools\":[{\"type\":"
	          "\"function\","
	          "\"function\":{\"name\":\"get_weather\",\"description\":\"Weather of a city\","
	          "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":"
	          "\"string\"}}}}}]}");
	assert_true(usage_estimate_prompt(b) > usage_estimate_prompt(a) + 10);
	json_decref(a);
	json_decref(b);

	/* never zero */
	b = parse("{}");
	assert_int_equal(usage_estimate_prompt(b), 1);
	json_decref(b);
	assert_int_equal(usage_estimate_prompt(NULL), 1);
}

/* The mock upstream counts ceil(content bytes / 4): the estimate must not be below it. */
static void test_estimate_covers_mock(void **state)
{
	char buf[4096];
	for (int len = 0; len < 300; len += 7) {
		char text[400];
		memset(text, 'a', (size_t)len);
		text[len] = '\0';
		snprintf(buf, sizeof(buf),
		         "{\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]}", text);
		json_t *b = parse(buf);
		assert_true(usage_estimate_prompt(b) >= (uint64_t)(len + 3) / 4);
		json_decref(b);
	}
}

static void test_completion_budget(void **state)
{
	json_t *b;

	b = parse("{\"max_tokens\":100}");
	assert_int_equal(usage_completion_budget(b, 512), 100);
	json_decref(b);
	b = parse("{\"max_tokens\":100,\"max_completion_tokens\":40}");
	assert_int_equal(usage_completion_budget(b, 512), 40);
	json_decref(b);
	b = parse("{\"max_output_tokens\":70}");
	assert_int_equal(usage_completion_budget(b, 512), 70);
	json_decref(b);
	b = parse("{\"messages\":[]}");
	assert_int_equal(usage_completion_budget(b, 512), 512);
	json_decref(b);
	b = parse("{\"max_tokens\":-5}");
	assert_int_equal(usage_completion_budget(b, 300), 300);
	json_decref(b);
	b = parse("{\"max_tokens\":10,\"n\":3}");
	assert_int_equal(usage_completion_budget(b, 512), 30);
	json_decref(b);
	assert_int_equal(usage_completion_budget(NULL, 9), 9);
}

static void test_estimate_text(void **state)
{
	struct record_usage u;

	assert_int_equal(usage_estimate_text(0), 0);
	assert_int_equal(usage_estimate_text(1), 1);
	assert_int_equal(usage_estimate_text(4), 1);
	assert_int_equal(usage_estimate_text(5), 2);
	usage_set_estimate(&u, 10, 3);
	assert_true(u.present);
	assert_true(u.estimated);
	assert_int_equal(u.total, 13);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_body_plain),
	        cmocka_unit_test(test_body_usage_in_content),
	        cmocka_unit_test(test_body_usage_only_in_content),
	        cmocka_unit_test(test_body_details),
	        cmocka_unit_test(test_body_anthropic_and_responses),
	        cmocka_unit_test(test_body_absent),
	        cmocka_unit_test(test_sse_chunks),
	        cmocka_unit_test(test_usage_object_forms),
	        cmocka_unit_test(test_estimate_prompt),
	        cmocka_unit_test(test_estimate_covers_mock),
	        cmocka_unit_test(test_completion_budget),
	        cmocka_unit_test(test_estimate_text),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
