/* fuzz_splice.c — libFuzzer target: the request body splice (body_splice) against jansson.
 *
 * Input: one options byte, then the body. Options: bit 0 want_usage; bits 1-3 pick the model
 * name put in (0: none, else one of a table with quotes, backslashes, control bytes, UTF-8,
 * an empty and a long name); bit 4 the caller's named_model for a body jansson refuses (for
 * one it accepts, named_model is what request.c passes: the body has a string "model").
 *
 * A body jansson accepts (JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, as request.c parses it)
 * that meets the caller's conditions (an object with at least one member, no stream_options,
 * a "model" that is a string if there is one) is spliced, and then:
 *   - the splice may refuse only when it was asked to replace a named model, and only when
 *     the body holds a backslash (the name written with escapes; request.c then rebuilds);
 *   - the output parses, and equals the input's tree with "model" set to the name (when
 *     one was given) and stream_options {"include_usage":true} added (when asked);
 *   - nothing else changed: the output is the input's bytes up to its first '{', then the
 *     usage member (when asked), then the input's bytes with one contiguous stretch
 *     replaced — the model's value, or nothing replaced and a "model" member added.
 * A body jansson refuses is spliced too (whatever the options say): the output, if any, is
 * refused as well. Bodies jansson accepts that the caller never splices are skipped.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/body_splice.h"
#include "sluice/json_scan.h"

#include "fuzz.h"

static const char usage_member[] = "\"stream_options\":{\"include_usage\":true},";

static const char *model_name(unsigned i)
{
	static char long_name[301];
	static const char *const names[] = {
	        NULL, "gpt-4o-mini", "", "a\"b\\c", "ctl\x01\x1f\n\t", "ünïcødé €", "}{,:[]\"", NULL};

	if (i == 7) {
		memset(long_name, 'm', sizeof(long_name) - 1);
		return long_name;
	}
	return names[i];
}

static json_t *parse(const char *p, size_t n)
{
	return json_loadb(p, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
}

/* The caller's conditions (request.c: a "model" that is not a string is refused with a
 * 400 before; shape_body splices only a non-empty object without stream_options). */
static bool splice_applies(const json_t *in)
{
	const json_t *m = json_object_get(in, "model");
	return json_is_object(in) && json_object_size(in) > 0 &&
	       json_object_get(in, "stream_options") == NULL && (m == NULL || json_is_string(m));
}

/* What the splice must mean: the input's tree with the model and usage request applied. */
static json_t *expected_tree(const json_t *in, const char *model, bool want_usage)
{
	json_t *e = json_deep_copy(in);
	FUZZ_CHECK(e != NULL);
	if (model != NULL)
		FUZZ_CHECK(json_object_set_new(e, "model", json_stringn(model, strlen(model))) == 0);
	if (want_usage)
		FUZZ_CHECK(json_object_set_new(e, "stream_options",
		                               json_pack("{s:b}", "include_usage", 1)) == 0);
	return e;
}

/* The length of the JSON string literal p starts with (quotes included), 0 if unended. */
static size_t literal_len(const char *p, size_t n)
{
	for (size_t i = 1; i < n; i++) {
		if (p[i] == '\\')
			i++;
		else if (p[i] == '"')
			return i + 1;
	}
	return 0;
}

/* out == in[0..brace] + (usage member) + rest, where rest differs from in[brace+1..] in one
 * contiguous stretch at most; and that stretch is the model's: without a model, none. */
static void check_bytes(const char *in, size_t n, const char *out, size_t out_n,
                        const char *model, bool named, bool want_usage)
{
	const char *brace = memchr(in, '{', n);
	FUZZ_CHECK(brace != NULL);
	size_t head = (size_t)(brace + 1 - in), u = want_usage ? sizeof(usage_member) - 1 : 0;
	FUZZ_CHECK(out_n >= head + u && memcmp(out, in, head) == 0);
	FUZZ_CHECK(memcmp(out + head, usage_member, u) == 0);

	const char *a = in + head, *b = out + head + u;
	size_t an = n - head, bn = out_n - head - u;
	if (model == NULL) {
		FUZZ_CHECK(an == bn && memcmp(a, b, an) == 0);
		return;
	}
	if (!named) {
		/* "model":<name>, then the input's members as they were. */
		FUZZ_CHECK(bn > an + 8 && memcmp(b, "\"model\":", 8) == 0);
		FUZZ_CHECK(memcmp(b + bn - an, a, an) == 0 && b[bn - an - 1] == ',');
		json_t *lit = json_loadb(b + 8, bn - an - 9, JSON_DECODE_ANY, NULL);
		FUZZ_CHECK(json_is_string(lit) && strcmp(json_string_value(lit), model) == 0);
		json_decref(lit);
		return;
	}
	/* The input's bytes up to a string literal (the old value), the new literal where it
	 * was, then the input's bytes again. Both literals start with '"', so the first
	 * difference is inside them: the old one starts at or before it. */
	size_t pre = 0;
	while (pre < an && pre < bn && a[pre] == b[pre])
		pre++;
	bool found = false;
	for (size_t s = pre + 1; s-- > 0 && !found;) {
		if (s >= an || s >= bn || a[s] != '"' || b[s] != '"')
			continue;
		size_t old = literal_len(a + s, an - s), lit = literal_len(b + s, bn - s);
		if (old == 0 || lit == 0 || an - s - old != bn - s - lit ||
		    memcmp(a + s + old, b + s + lit, an - s - old) != 0)
			continue;
		json_t *ov = json_loadb(a + s, old, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
		json_t *nv = json_loadb(b + s, lit, JSON_DECODE_ANY, NULL);
		found = json_is_string(ov) && json_is_string(nv) &&
		        strcmp(json_string_value(nv), model) == 0;
		json_decref(ov);
		json_decref(nv);
	}
	FUZZ_CHECK(found);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	unsigned opt = data[0];
	bool want_usage = opt & 1;
	const char *model = model_name((opt >> 1) & 7);
	char *body = fuzz_exact_copy(data + 1, size - 1);
	size_t n = size - 1;
	if (body == NULL)
		return 0;

	json_t *in = parse(body, n);
	char *out = NULL;
	size_t out_n = 0;
	if (in == NULL) {
		/* Bytes that are not JSON stay not JSON, whatever is put in. */
		bool named = opt & 16;
		if (body_splice(body, n, model, named, NULL, 0, want_usage, &out, &out_n)) {
			FUZZ_CHECK(out[out_n] == '\0');
			json_t *o = parse(out, out_n);
			FUZZ_CHECK(o == NULL);
			free(out);
		}
		free(body);
		return 0;
	}
	if (!splice_applies(in)) {
		json_decref(in);
		free(body);
		return 0;
	}
	bool named = json_is_string(json_object_get(in, "model"));
	/* As request.c calls it: the model's span from the validating scanner, when it has one. */
	const char *span = NULL;
	size_t span_len = 0;
	struct json_scan scan;
	if ((opt & 32) && json_scan_body(body, n, &scan) == JSON_SCAN_OK &&
	    scan.member[JSON_SCAN_MODEL].type == JSON_SCAN_STRING) {
		span = scan.member[JSON_SCAN_MODEL].p;
		span_len = scan.member[JSON_SCAN_MODEL].len;
	}
	if (!body_splice(body, n, model, named, span, span_len, want_usage, &out, &out_n)) {
		/* Only a named model not found in the bytes: its name was written with escapes. */
		FUZZ_CHECK(span == NULL && model != NULL && named && memchr(body, '\\', n) != NULL);
		json_decref(in);
		free(body);
		return 0;
	}
	FUZZ_CHECK(out[out_n] == '\0' && strlen(out) <= out_n);
	json_t *o = parse(out, out_n);
	FUZZ_CHECK(o != NULL);
	json_t *e = expected_tree(in, model, want_usage);
	FUZZ_CHECK(json_equal(o, e));
	check_bytes(body, n, out, out_n, model, named, want_usage);
	json_decref(e);
	json_decref(o);
	json_decref(in);
	free(out);
	free(body);
	return 0;
}
