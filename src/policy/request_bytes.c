/* request_bytes.c — the readers of policy_bytes.h: a validated chat body's spans walked without
 * a tree. */
#include "sluice/policy_bytes.h"

#include <stdlib.h>
#include <string.h>

static const char *ws(const char *p, const char *e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* Past the string whose opening quote is at p; *escaped: it holds a backslash. */
static const char *string_end(const char *p, const char *e, bool *escaped)
{
	const char *start = ++p;

	for (;;) {
		const char *q = memchr(p, '"', (size_t)(e - p));
		if (q == NULL)
			return e; /* not in a validated span */
		size_t bs = 0;
		for (const char *b = q; b > start && b[-1] == '\\'; b--)
			bs++;
		if (bs % 2 == 0) {
			*escaped = memchr(start, '\\', (size_t)(q - start)) != NULL;
			return q + 1;
		}
		p = q + 1;
	}
}

/* Past the container opening at p. */
static const char *container_end(const char *p, const char *e)
{
	size_t depth = 0;
	bool esc;

	while (p < e) {
		char c = *p;
		if (c == '"') {
			p = string_end(p, e, &esc);
			continue;
		}
		p++;
		if (c == '[' || c == '{')
			depth++;
		else if ((c == ']' || c == '}') && --depth == 0)
			break;
	}
	return p;
}

static const char *read_value(const char *p, const char *e, struct json_scan_value *v)
{
	memset(v, 0, sizeof *v);
	v->p = p;
	switch (*p) {
	case '"': {
		const char *q = string_end(p, e, &v->escaped);
		v->type = JSON_SCAN_STRING;
		v->len = (size_t)(q - p);
		v->str_len = v->escaped ? 0 : v->len - 2;
		if (v->escaped) {
			char none;
			v->str_len = json_scan_string(v, &none, 0);
		}
		return q;
	}
	case '{':
	case '[': {
		const char *q = container_end(p, e);
		v->type = *p == '{' ? JSON_SCAN_OBJECT : JSON_SCAN_ARRAY;
		v->len = (size_t)(q - p);
		return q;
	}
	case 't':
		v->type = JSON_SCAN_TRUE;
		v->len = 4;
		return p + 4;
	case 'f':
		v->type = JSON_SCAN_FALSE;
		v->len = 5;
		return p + 5;
	case 'n':
		v->type = JSON_SCAN_NULL;
		v->len = 4;
		return p + 4;
	default: {
		const char *q = p;
		bool real = false;
		while (q < e && (*q == '-' || *q == '+' || *q == '.' || *q == 'e' || *q == 'E' ||
		                 (*q >= '0' && *q <= '9'))) {
			real |= *q == '.' || *q == 'e' || *q == 'E';
			q++;
		}
		v->type = real ? JSON_SCAN_REAL : JSON_SCAN_INTEGER;
		v->len = (size_t)(q - p);
		if (!real) {
			char buf[32];
			size_t n = v->len < sizeof buf - 1 ? v->len : sizeof buf - 1;
			memcpy(buf, p, n);
			buf[n] = '\0';
			v->integer = strtoll(buf, NULL, 10); /* json_scan: it fits int64_t */
		}
		return q;
	}
	}
}

void pb_begin(struct pb_iter *it, const struct json_scan_value *v)
{
	it->p = v->p + 1;
	it->e = v->p + v->len - 1; /* its closing bracket */
	it->known = NULL;
}

void pb_begin_body(struct pb_iter *it, const char *bytes, size_t len, const struct json_scan *scan)
{
	struct json_scan_value top = pb_body(bytes, len);
	pb_begin(it, &top);
	it->known = scan;
}

/* A top-level container the scan already measured. */
static bool known_value(const struct json_scan *js, const char *p, struct json_scan_value *v)
{
	for (size_t i = 0; i < JSON_SCAN_N_MEMBERS; i++) {
		if (js->member[i].p == p) {
			*v = js->member[i];
			return true;
		}
	}
	return false;
}

bool pb_next(struct pb_iter *it, struct json_scan_value *key, struct json_scan_value *val)
{
	const char *p = ws(it->p, it->e);
	if (p < it->e && *p == ',')
		p = ws(p + 1, it->e);
	if (p >= it->e)
		return false;
	if (key != NULL) {
		p = read_value(p, it->e, key);
		p = ws(p, it->e) + 1; /* the colon */
		p = ws(p, it->e);
	}
	if (it->known != NULL && (*p == '[' || *p == '{') && known_value(it->known, p, val)) {
		it->p = p + val->len;
		return true;
	}
	it->p = read_value(p, it->e, val);
	return true;
}

bool pb_string_is(const struct json_scan_value *v, const char *s)
{
	size_t n = strlen(s);
	if (v->type != JSON_SCAN_STRING)
		return false;
	if (!v->escaped)
		return v->str_len == n && memcmp(v->p + 1, s, n) == 0;
	char buf[64];
	if (n >= sizeof buf)
		return false; /* longer than any name the policies compare */
	size_t got = json_scan_string(v, buf, sizeof buf - 1);
	buf[got < sizeof buf - 1 ? got : sizeof buf - 1] = '\0';
	return strcmp(buf, s) == 0;
}

void pb_string_cstr(const struct json_scan_value *v, char *buf, size_t cap)
{
	size_t got = json_scan_string(v, buf, cap - 1);
	buf[got < cap - 1 ? got : cap - 1] = '\0';
}

double pb_number(const struct json_scan_value *v)
{
	if (v->type == JSON_SCAN_INTEGER)
		return (double)v->integer;
	char small[64], *buf = v->len < sizeof small ? small : malloc(v->len + 1);
	if (buf == NULL)
		return 0;
	memcpy(buf, v->p, v->len);
	buf[v->len] = '\0';
	double d = strtod(buf, NULL);
	if (buf != small)
		free(buf);
	return d;
}

size_t pb_depth(const char *bytes, size_t len)
{
	const char *p = bytes, *e = bytes + len;
	size_t depth = 0, max = 0;
	bool esc;

	while (p < e) {
		char c = *p;
		if (c == '"') {
			p = string_end(p, e, &esc);
			continue;
		}
		p++;
		if (c == '[' || c == '{') {
			if (++depth > max)
				max = depth;
		} else if (c == ']' || c == '}') {
			depth--;
		}
	}
	return max;
}

struct json_scan_value pb_body(const char *bytes, size_t len)
{
	struct json_scan_value top = {.type = JSON_SCAN_OBJECT, .p = bytes, .len = len};

	/* whitespace around the object */
	while (top.len > 0 && *top.p != '{')
		top.p++, top.len--;
	while (top.len > 0 && top.p[top.len - 1] != '}')
		top.len--;
	return top;
}

struct json_scan_value pb_member(const char *bytes, size_t len, const char *key)
{
	struct json_scan_value top = pb_body(bytes, len), k, v;
	struct pb_iter it;

	pb_begin(&it, &top);
	while (pb_next(&it, &k, &v))
		if (pb_string_is(&k, key))
			return v;
	return (struct json_scan_value){.type = JSON_SCAN_ABSENT};
}
