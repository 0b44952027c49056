/* fuzz_json_scan.c — libFuzzer target: the JSON request scanner against jansson on the same bytes.
 *
 * For every input: json_scan_body() and json_loadb(JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL)
 * must agree on accept or reject and on "an object or not"; for an object, every member the
 * scanner hands back must be the one jansson finds (presence, type, decoded string bytes,
 * integer value, and the span re-parsed by jansson equal to it), the member count, and
 * stream_options.include_usage must match, and the prompt estimate and completion budget
 * computed over the spans must equal usage.c's over the tree. TOO_COMPLEX (past the
 * scanner's fixed bounds) is the one answer that is not compared: request.c parses those
 * bodies with jansson.
 *
 * The one deliberate difference (json_scan.h): jansson drops a NUL byte that directly follows
 * a number or a literal (its lexer reads one byte ahead and "ungets" it into a buffer where
 * NUL means empty), so it takes {"a":1\0} for {"a":1}. The scanner refuses that byte. When
 * jansson accepts what the scanner refused, the refusal must be at such a NUL, and the same
 * input without that byte must pass the whole comparison.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/json_scan.h"
#include "sluice/usage.h"

static void check(int ok)
{
	if (!ok)
		abort();
}

static void check_member(const uint8_t *data, size_t size, const json_t *j,
                         const struct json_scan_value *v)
{
	if (j == NULL) {
		check(v->type == JSON_SCAN_ABSENT);
		return;
	}
	check(v->type != JSON_SCAN_ABSENT);
	check(v->p >= (const char *)data && v->len > 0 &&
	      v->p + v->len <= (const char *)data + size);
	switch (v->type) {
	case JSON_SCAN_NULL:
		check(json_is_null(j));
		break;
	case JSON_SCAN_TRUE:
		check(json_is_true(j));
		break;
	case JSON_SCAN_FALSE:
		check(json_is_false(j));
		break;
	case JSON_SCAN_INTEGER:
		check(json_is_integer(j) && json_integer_value(j) == v->integer);
		break;
	case JSON_SCAN_REAL:
		check(json_is_real(j));
		break;
	case JSON_SCAN_ARRAY:
		check(json_is_array(j));
		break;
	case JSON_SCAN_OBJECT:
		check(json_is_object(j));
		break;
	case JSON_SCAN_STRING: {
		check(json_is_string(j));
		size_t n = json_string_length(j);
		check(v->str_len == n);
		check(v->escaped || memcmp(v->p + 1, json_string_value(j), n) == 0);
		char *buf = malloc(n + 1);
		check(buf != NULL);
		check(json_scan_string(v, buf, n) == n);
		check(memcmp(buf, json_string_value(j), n) == 0);
		/* a short buffer still reports the whole length, and holds its prefix */
		if (n > 0) {
			char small[3];
			size_t cap = n < sizeof(small) ? n - 1 : sizeof(small);
			check(json_scan_string(v, small, cap) == n);
			check(memcmp(small, json_string_value(j), cap) == 0);
		}
		free(buf);
		break;
	}
	case JSON_SCAN_ABSENT:
		check(0);
		break;
	}
	/* The span is exactly the value: jansson reads it back as an equal value. */
	json_t *again = json_loadb(v->p, v->len,
	                           JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
	check(again != NULL && json_equal(again, j));
	json_decref(again);
}

static void compare(const uint8_t *data, size_t size);

/* jansson accepted, the scanner refused: only for a NUL right after a number or literal. */
static void nul_quirk(const uint8_t *data, size_t size, const struct json_scan *s)
{
	size_t at = s->error_pos;
	check(at > 0 && at < size && data[at] == 0);
	uint8_t prev = data[at - 1];
	check((prev >= '0' && prev <= '9') || prev == 'e' || prev == 'E' || prev == 'l');
	uint8_t *copy = malloc(size);
	check(copy != NULL);
	memcpy(copy, data, at);
	memcpy(copy + at, data + at + 1, size - at - 1);
	compare(copy, size - 1);
	free(copy);
}

static void compare(const uint8_t *data, size_t size)
{
	struct json_scan s;
	json_error_t err;
	enum json_scan_result r = json_scan_body((const char *)data, size, &s);
	json_t *j =
	        json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);

	if (r == JSON_SCAN_TOO_COMPLEX) {
		json_decref(j);
		return;
	}
	if (r == JSON_SCAN_INVALID)
		check(s.error != NULL && s.error_pos <= size && s.line >= 1 && s.column >= 1);
	if (r == JSON_SCAN_INVALID && j != NULL) {
		json_decref(j);
		nul_quirk(data, size, &s);
		return;
	}
	check((r == JSON_SCAN_INVALID) == (j == NULL));
	if (j == NULL)
		return;
	check((r == JSON_SCAN_OK) == json_is_object(j));
	if (r == JSON_SCAN_OK) {
		check(s.n_members == json_object_size(j));
		for (int m = 0; m < JSON_SCAN_N_MEMBERS; m++)
			check_member(data, size, json_object_get(j, json_scan_member_name(m)),
			             &s.member[m]);
		const json_t *so = json_object_get(j, "stream_options");
		check(s.include_usage == json_is_true(json_object_get(so, "include_usage")));
		check(json_scan_estimate_prompt(&s) == usage_estimate_prompt(j));
		check(json_scan_completion_budget(&s, USAGE_DEFAULT_COMPLETION_BUDGET) ==
		      usage_completion_budget(j, USAGE_DEFAULT_COMPLETION_BUDGET));
	}
	json_decref(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	compare(data, size);
	return 0;
}
