/* fuzz_usage.c — libFuzzer target: the depth-1 usage scanner over arbitrary bytes.
 *
 * The input is copied to an exact-size heap block (no NUL after it), so any read
 * past the end is an ASan report. Beyond not crashing, the scanner must agree with
 * jansson where jansson can tell: when the input is a valid JSON object without
 * duplicate keys, a member the scanner finds is one jansson has, with an equal
 * value; and when no key is escaped, every member jansson has is found.
 *
 * The usage readers are also checked against a reference kept here: the way they read
 * usage before they walked the object in place (a jansson tree of the usage member, the
 * chunk found by memmem). The counts must be the same for every input, and the chunk
 * answer too, but for the one documented case: a chunk that repeats the top-level key
 * "usage" and ends with "usage":null.
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

/* ---- the reference: usage.c's reading before the in-place walk */

static bool ref_count_of(const json_t *obj, const char *key, uint64_t *out)
{
	const json_t *v = json_object_get(obj, key);
	if (json_is_integer(v)) {
		json_int_t i = json_integer_value(v);
		*out = i > 0 ? (uint64_t)i : 0;
		return true;
	}
	if (json_is_real(v)) {
		double d = json_real_value(v);
		*out = d > 0 && d < 1.8e19 ? (uint64_t)d : 0;
		return true;
	}
	return false;
}

static uint64_t ref_detail(const json_t *u, const char *details, const char *key)
{
	uint64_t v = 0;
	const json_t *d = json_object_get(u, details);
	if (json_is_object(d))
		ref_count_of(d, key, &v);
	return v;
}

static bool ref_fill(const json_t *u, struct record_usage *out)
{
	uint64_t v;
	memset(out, 0, sizeof(*out));
	if (!json_is_object(u))
		return false;
	bool hp = ref_count_of(u, "prompt_tokens", &out->prompt);
	bool hc = ref_count_of(u, "completion_tokens", &out->completion);
	if (!hp && ref_count_of(u, "input_tokens", &out->prompt)) {
		hp = true;
		if (ref_count_of(u, "cache_read_input_tokens", &v))
			out->prompt += v;
		if (ref_count_of(u, "cache_creation_input_tokens", &v))
			out->prompt += v;
	}
	if (!hc)
		hc = ref_count_of(u, "output_tokens", &out->completion);
	bool ht = ref_count_of(u, "total_tokens", &out->total);
	if (!hp && !hc && !ht)
		return false;
	if (!ht)
		out->total = out->prompt + out->completion;
	out->cached = ref_detail(u, "prompt_tokens_details", "cached_tokens");
	if (out->cached == 0)
		out->cached = ref_detail(u, "input_tokens_details", "cached_tokens");
	if (out->cached == 0 && ref_count_of(u, "cache_read_input_tokens", &v))
		out->cached = v;
	out->reasoning = ref_detail(u, "completion_tokens_details", "reasoning_tokens");
	if (out->reasoning == 0)
		out->reasoning = ref_detail(u, "output_tokens_details", "reasoning_tokens");
	out->present = true;
	return true;
}

static bool ref_from_member(const char *buf, size_t len, struct record_usage *out)
{
	const char *v;
	size_t vl;
	memset(out, 0, sizeof(*out));
	if (!usage_scan_member(buf, len, "usage", &v, &vl) || vl == 0 || v[0] != '{')
		return false;
	json_t *u = json_loadb(v, vl, JSON_DISABLE_EOF_CHECK, NULL);
	bool ok = ref_fill(u, out);
	json_decref(u);
	if (!ok)
		memset(out, 0, sizeof(*out));
	return ok;
}

static bool ref_from_sse(const char *data, size_t len, struct record_usage *out, bool *only)
{
	bool object = false;
	*only = false;
	for (const char *p = data, *end = data + len;
	     !object && (p = memmem(p, (size_t)(end - p), "\"usage\"", 7)) != NULL;) {
		p += 7;
		while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
			p++;
		if (p < end && *p == ':')
			p++;
		while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
			p++;
		object = p < end && *p == '{';
	}
	if (!object || !ref_from_member(data, len, out))
		return false;
	const char *c;
	size_t cl;
	if (usage_scan_member(data, len, "choices", &c, &cl) && c[0] == '[') {
		const char *p = c + 1, *e = c + cl;
		while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
			p++;
		*only = p < e && *p == ']';
	}
	return true;
}

static size_t occurrences(const char *buf, size_t len, const char *s)
{
	size_t n = 0, k = strlen(s);
	for (const char *p = buf; (p = memmem(p, len - (size_t)(p - buf), s, k)) != NULL; p += k)
		n++;
	return n;
}

static bool same_usage(const struct record_usage *a, const struct record_usage *b)
{
	return a->present == b->present && a->estimated == b->estimated &&
	       a->prompt == b->prompt && a->completion == b->completion && a->total == b->total &&
	       a->cached == b->cached && a->reasoning == b->reasoning;
}

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

	struct record_usage u, ref;
	bool ok = usage_from_body(buf, size, &u);
	FUZZ_CHECK(ok == u.present);
	if (ok)
		FUZZ_CHECK(!u.estimated);
	FUZZ_CHECK(ref_from_member(buf, size, &ref) == ok);
	FUZZ_CHECK(same_usage(&u, &ref));

	bool only, ref_only;
	memset(&u, 0, sizeof(u));
	memset(&ref, 0, sizeof(ref));
	bool got = usage_from_sse_data(buf, size, &u, &only);
	bool want = ref_from_sse(buf, size, &ref, &ref_only);
	if (got)
		FUZZ_CHECK(u.present && !u.estimated);
	if (got != want)
		FUZZ_CHECK(!got && occurrences(buf, size, "\"usage\"") >= 2);
	else if (got)
		FUZZ_CHECK(same_usage(&u, &ref) && only == ref_only);
	usage_from_sse_data(buf, size, &u, NULL);

	/* usage_find is memmem. */
	static const char *const needles[] = {"\"usage\"", "\"content\":\"", "\"text\":\"", "a", "ab"};
	for (size_t i = 0; i < sizeof(needles) / sizeof(needles[0]); i++) {
		size_t n = strlen(needles[i]);
		FUZZ_CHECK(usage_find(buf, size, needles[i], n) == memmem(buf, size, needles[i], n));
	}

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
