/* fuzz_usage.c — libFuzzer target: the depth-1 usage scanner over arbitrary bytes.
 *
 * The input is copied to an exact-size heap block (no NUL after it), so any read
 * past the end is an ASan report. Beyond not crashing, the scanner must agree with
 * jansson where jansson can tell: when the input is a valid JSON object without
 * duplicate keys, a member the scanner finds is one jansson has, with an equal
 * value; and when no key is escaped, every member jansson has is found.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/usage.h"

#include "fuzz.h"

static const char *const names[] = {"usage", "choices", "model", "id", ""};

static void check_member(const char *buf, size_t len, const json_t *doc, bool no_escapes,
                         const char *name)
{
	const char *v;
	size_t vl;
	bool found = usage_scan_member(buf, len, name, &v, &vl);

	if (found)
		FUZZ_CHECK(v >= buf && vl <= len && (size_t)(v - buf) <= len - vl);
	if (doc == NULL)
		return;
	const json_t *want = json_object_get(doc, name);
	if (found) {
		FUZZ_CHECK(want != NULL);
		json_t *got = json_loadb(v, vl, JSON_DECODE_ANY, NULL);
		FUZZ_CHECK(got != NULL && json_equal(got, want));
		json_decref(got);
	} else if (no_escapes) {
		FUZZ_CHECK(want == NULL);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = fuzz_exact_copy(data, size);
	if (buf == NULL)
		return 0;

	struct record_usage u;
	bool ok = usage_from_body(buf, size, &u);
	FUZZ_CHECK(ok == u.present);
	if (ok)
		FUZZ_CHECK(!u.estimated);

	bool only;
	if (usage_from_sse_data(buf, size, &u, &only))
		FUZZ_CHECK(u.present && !u.estimated);
	usage_from_sse_data(buf, size, &u, NULL);

	/* Differential check against jansson, on valid objects only. */
	json_t *doc = json_loadb(buf, size, JSON_REJECT_DUPLICATES, NULL);
	if (doc != NULL && !json_is_object(doc)) {
		json_decref(doc);
		doc = NULL;
	}
	bool no_escapes = memchr(buf, '\\', size) == NULL;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		check_member(buf, size, doc, no_escapes, names[i]);
	/* Every key jansson found, looked up by its own name. */
	if (doc != NULL && no_escapes) {
		const char *k;
		json_t *val;
		json_object_foreach(doc, k, val)
		{
			check_member(buf, size, doc, no_escapes, k);
		}
	}
	json_decref(doc);
	free(buf);
	return 0;
}
