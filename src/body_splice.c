/* body_splice.c — the request body an instance receives, as a splice of the client's bytes
 * (body_splice.h). Moved out of request.c as it was, so that a fuzz target can reach it. */
#include "sluice/body_splice.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "sluice/usage.h"

/* Append s as a JSON string literal (with quotes). */
static char *put_json_string(char *o, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	*o++ = '"';
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\') {
			*o++ = '\\';
			*o++ = (char)ch;
		} else if (ch < 0x20) {
			memcpy(o, "\\u00", 4);
			o[4] = hex[ch >> 4];
			o[5] = hex[ch & 15];
			o += 6;
		} else {
			*o++ = (char)ch;
		}
	}
	*o++ = '"';
	return o;
}

/* Exactly one JSON string literal, as jansson reads it. usage_scan_member() is a lenient
 * scanner: over bytes that are not JSON it may hand back a span that is not a string, or that
 * runs over the next member ({"model":\0"model":"b"}), and replacing that would turn bytes
 * that are not JSON into JSON. The value of a body request.c parsed always passes. */
static bool is_string_literal(const char *p, size_t n)
{
	if (n < 2 || p[0] != '"' || p[n - 1] != '"')
		return false;
	json_t *v = json_loadb(p, n, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
	bool ok = json_is_string(v);
	json_decref(v);
	return ok;
}

bool body_splice(const char *body, size_t len, const char *model, bool named_model,
                 const char *model_val, size_t model_val_len, bool want_usage, char **out_body,
                 size_t *out_len)
{
	static const char usage_member[] = "\"stream_options\":{\"include_usage\":true},";
	const char *end = body + len;
	const char *val = model_val, *brace = memchr(body, '{', len);
	size_t val_len = model_val_len;

	if (brace == NULL)
		return false;
	if (model && named_model && val == NULL &&
	    (!usage_scan_member(body, len, "model", &val, &val_len) || !is_string_literal(val, val_len)))
		return false;
	char *out = malloc(len + (model ? strlen(model) * 6 + 16 : 0) + sizeof(usage_member) + 1);
	if (out == NULL)
		return false;
	char *o = out;
	const char *p = brace + 1;
	memcpy(o, body, (size_t)(p - body));
	o += p - body;
	if (want_usage) {
		memcpy(o, usage_member, sizeof(usage_member) - 1);
		o += sizeof(usage_member) - 1;
	}
	if (model && val == NULL) { /* the client named no model: add one */
		memcpy(o, "\"model\":", 8);
		o = put_json_string(o + 8, model);
		*o++ = ',';
	}
	if (model && val != NULL) {
		memcpy(o, p, (size_t)(val - p));
		o = put_json_string(o + (val - p), model);
		p = val + val_len;
	}
	memcpy(o, p, (size_t)(end - p));
	o += end - p;
	*o = '\0';
	*out_body = out;
	*out_len = (size_t)(o - out);
	return true;
}
