/* mcp_jsonrpc.c — JSON-RPC 2.0 messages: what a parsed message is, and a tree-free scan of an
 * object's top-level members for the stream events that pass through. */
#include <stdlib.h>
#include <string.h>

#include "sluice/mcp_parts.h"

const char *const mcp_versions[MCP_N_VERSIONS] = {"2025-11-25", "2025-06-18", "2025-03-26",
                                                  "2024-11-05"};

int mcp_version_index(const char *s, size_t len)
{
	for (int i = 0; s != NULL && i < MCP_N_VERSIONS; i++)
		if (strlen(mcp_versions[i]) == len && memcmp(mcp_versions[i], s, len) == 0)
			return i;
	return -1;
}

bool mcp_version_allows_batch(int version)
{
	/* Added in 2025-03-26, removed again in 2025-06-18. */
	return version >= 0 && version < MCP_N_VERSIONS &&
	       strcmp(mcp_versions[version], "2025-03-26") == 0;
}

static bool id_ok(const json_t *id)
{
	/* MCP: a string or an integer, never null. */
	return json_is_string(id) || json_is_integer(id);
}

enum mcp_msg_kind mcp_msg_classify(const json_t *m, const char **method)
{
	if (method != NULL)
		*method = NULL;
	if (!json_is_object(m))
		return MCP_MSG_INVALID;
	const json_t *v = json_object_get(m, "jsonrpc");
	if (!json_is_string(v) || strcmp(json_string_value(v), "2.0") != 0)
		return MCP_MSG_INVALID;
	const json_t *me = json_object_get(m, "method"), *id = json_object_get(m, "id");
	const json_t *res = json_object_get(m, "result"), *err = json_object_get(m, "error");
	if (me != NULL) {
		if (!json_is_string(me) || json_string_length(me) == 0 || res != NULL ||
		    err != NULL)
			return MCP_MSG_INVALID;
		const json_t *params = json_object_get(m, "params");
		if (params != NULL && !json_is_object(params) && !json_is_array(params))
			return MCP_MSG_INVALID;
		if (method != NULL)
			*method = json_string_value(me);
		if (id == NULL)
			return MCP_MSG_NOTIFICATION;
		return id_ok(id) ? MCP_MSG_REQUEST : MCP_MSG_INVALID;
	}
	if (id == NULL || !id_ok(id) || (res == NULL) == (err == NULL))
		return MCP_MSG_INVALID;
	if (err != NULL && !json_is_object(err))
		return MCP_MSG_INVALID;
	return MCP_MSG_RESPONSE;
}

enum mcp_batch_check mcp_batch_check(const json_t *arr, size_t max, size_t *answered)
{
	size_t n = json_array_size(arr), i, req = 0, resp = 0, notif = 0, bad = 0;
	const json_t *m;

	*answered = 0;
	if (n == 0)
		return MCP_BATCH_EMPTY;
	if (n > max)
		return MCP_BATCH_TOO_LARGE;
	json_array_foreach(arr, i, m)
	{
		switch (mcp_msg_classify(m, NULL)) {
		case MCP_MSG_REQUEST:
			req++;
			break;
		case MCP_MSG_NOTIFICATION:
			notif++;
			break;
		case MCP_MSG_RESPONSE:
			resp++;
			break;
		default:
			bad++;
			break;
		}
	}
	if (resp > 0 && req + notif > 0)
		return MCP_BATCH_MIXED;
	*answered = req + bad;
	return MCP_BATCH_OK;
}

/* ---------------------------------------------------------------- the scanner */

struct cur {
	const char *p, *end;
	int depth;
};

#define SCAN_MAX_DEPTH 64

static void ws(struct cur *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
		c->p++;
}

static bool skip_string(struct cur *c)
{
	if (c->p >= c->end || *c->p != '"')
		return false;
	for (c->p++; c->p < c->end; c->p++) {
		unsigned char ch = (unsigned char)*c->p;
		if (ch == '"') {
			c->p++;
			return true;
		}
		if (ch < 0x20)
			return false;
		if (ch == '\\') {
			if (++c->p >= c->end)
				return false;
		}
	}
	return false;
}

static bool skip_value(struct cur *c);

static bool skip_container(struct cur *c, char open, char close)
{
	if (++c->depth > SCAN_MAX_DEPTH)
		return false;
	c->p++; /* open */
	ws(c);
	if (c->p < c->end && *c->p == close) {
		c->p++;
		c->depth--;
		return true;
	}
	for (;;) {
		if (open == '{') {
			if (!skip_string(c))
				return false;
			ws(c);
			if (c->p >= c->end || *c->p != ':')
				return false;
			c->p++;
		}
		if (!skip_value(c))
			return false;
		ws(c);
		if (c->p >= c->end)
			return false;
		if (*c->p == ',') {
			c->p++;
			ws(c);
			continue;
		}
		if (*c->p != close)
			return false;
		c->p++;
		c->depth--;
		return true;
	}
}

static bool skip_literal(struct cur *c)
{
	/* numbers, true, false, null: a run of their characters */
	const char *s = c->p;
	while (c->p < c->end && strchr("0123456789+-.eEtruefalsn", *c->p) != NULL)
		c->p++;
	return c->p > s;
}

static bool skip_value(struct cur *c)
{
	ws(c);
	if (c->p >= c->end)
		return false;
	switch (*c->p) {
	case '"':
		return skip_string(c);
	case '{':
		return skip_container(c, '{', '}');
	case '[':
		return skip_container(c, '[', ']');
	default:
		return skip_literal(c);
	}
}

static bool key_is(const char *k, size_t klen, const char *name)
{
	size_t n = strlen(name);
	return klen == n + 2 && memcmp(k + 1, name, n) == 0;
}

bool mcp_scan_object(const char *data, size_t len, struct mcp_scan *out)
{
	struct cur c = {data, data + len, 0};

	memset(out, 0, sizeof(*out));
	ws(&c);
	if (c.p >= c.end || *c.p != '{')
		return false;
	c.p++;
	c.depth = 1;
	ws(&c);
	if (c.p < c.end && *c.p == '}') {
		c.p++;
		goto tail;
	}
	for (;;) {
		const char *k = c.p;
		if (!skip_string(&c))
			return false;
		size_t klen = (size_t)(c.p - k);
		ws(&c);
		if (c.p >= c.end || *c.p != ':')
			return false;
		c.p++;
		ws(&c);
		const char *v = c.p;
		if (!skip_value(&c))
			return false;
		struct mcp_span sp = {v, (size_t)(c.p - v)};
		if (key_is(k, klen, "id"))
			out->id = sp;
		else if (key_is(k, klen, "method"))
			out->method = sp;
		else if (key_is(k, klen, "result"))
			out->result = sp;
		else if (key_is(k, klen, "error"))
			out->error = sp;
		ws(&c);
		if (c.p >= c.end)
			return false;
		if (*c.p == ',') {
			c.p++;
			ws(&c);
			continue;
		}
		if (*c.p != '}')
			return false;
		c.p++;
		break;
	}
tail:
	ws(&c);
	return c.p == c.end;
}

bool mcp_scan_member(const char *obj, size_t len, const char *key, struct mcp_span *out)
{
	struct cur c = {obj, obj + len, 0};

	out->p = NULL;
	out->len = 0;
	ws(&c);
	if (c.p >= c.end || *c.p != '{')
		return false;
	c.p++;
	c.depth = 1;
	ws(&c);
	if (c.p < c.end && *c.p == '}')
		return false;
	for (;;) {
		const char *k = c.p;
		if (!skip_string(&c))
			return false;
		size_t klen = (size_t)(c.p - k);
		ws(&c);
		if (c.p >= c.end || *c.p != ':')
			return false;
		c.p++;
		ws(&c);
		const char *v = c.p;
		if (!skip_value(&c))
			return false;
		if (out->p == NULL && key_is(k, klen, key)) {
			out->p = v;
			out->len = (size_t)(c.p - v);
		}
		ws(&c);
		if (c.p >= c.end)
			return false;
		if (*c.p == ',') {
			c.p++;
			ws(&c);
			continue;
		}
		if (*c.p != '}')
			return false;
		c.p++;
		break;
	}
	ws(&c);
	return c.p == c.end && out->p != NULL;
}

bool mcp_splice_param(const char *body, size_t blen, const char *sub, const char *field,
                      const char *value, size_t vlen, size_t cut, char **out, size_t *out_len)
{
	struct mcp_span params, inner, lit;

	if (cut > vlen || !mcp_scan_member(body, blen, "params", &params))
		return false;
	if (sub != NULL) {
		if (!mcp_scan_member(params.p, params.len, sub, &inner))
			return false;
		params = inner;
	}
	if (!mcp_scan_member(params.p, params.len, field, &lit))
		return false;
	/* A literal without escapes holds the value's bytes as they are: the splice is the
	 * rewrite. Anything else (escapes, another type) is left to the JSON encoder. */
	if (lit.len < 2 || lit.p[0] != '"' || lit.len - 2 != vlen ||
	    memchr(lit.p + 1, '\\', vlen) != NULL || memcmp(lit.p + 1, value, vlen) != 0)
		return false;
	/* Never inside a UTF-8 sequence: what is left must still be text (a prefix of server
	 * name and separator is ASCII, so this only refuses what no caller asks). */
	if (cut < vlen && ((unsigned char)value[cut] & 0xC0) == 0x80)
		return false;
	size_t head = (size_t)(lit.p + 1 - body), n = blen - cut;
	char *b = malloc(n + 1);
	if (b == NULL)
		return false;
	memcpy(b, body, head);
	memcpy(b + head, body + head + cut, blen - head - cut);
	b[n] = '\0';
	*out = b;
	*out_len = n;
	return true;
}

bool mcp_span_is(const struct mcp_span *sp, const char *s)
{
	size_t n = strlen(s);
	return sp->len == n + 2 && sp->p[0] == '"' && memcmp(sp->p + 1, s, n) == 0 &&
	       sp->p[n + 1] == '"';
}

bool mcp_header_token(const char *s, size_t max)
{
	size_t n = 0;
	if (s == NULL)
		return false;
	for (; s[n] != '\0'; n++)
		if (n >= max || (unsigned char)s[n] < 0x21 || (unsigned char)s[n] > 0x7e)
			return false;
	return n > 0;
}
