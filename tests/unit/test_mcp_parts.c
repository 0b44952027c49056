/* test_mcp_parts.c — the MCP gateway's pure pieces: JSON-RPC classification and scanning,
 * session ids, cursors, event ids, tool globs, list merging and name splitting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sluice/mcp_parts.h"

static json_t *J(const char *s)
{
	json_error_t e;
	json_t *j = json_loads(s, 0, &e);
	if (j == NULL)
		fail_msg("bad JSON in test: %s: %s", s, e.text);
	return j;
}

static char method_seen[64];

static enum mcp_msg_kind kind(const char *s, const char **method)
{
	json_t *j = J(s);
	const char *m = NULL;
	enum mcp_msg_kind k = mcp_msg_classify(j, &m);
	snprintf(method_seen, sizeof(method_seen), "%s", m ? m : "");
	if (method != NULL)
		*method = method_seen; /* m points into j, which goes now */
	json_decref(j);
	return k;
}

static void test_classify(void **state)
{
	const char *m;
	assert_int_equal(kind("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}", &m),
	                 MCP_MSG_REQUEST);
	assert_string_equal(m, "ping");
	assert_int_equal(
	        kind("{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"method\":\"x\",\"params\":{}}", NULL),
	        MCP_MSG_REQUEST);
	assert_int_equal(kind("{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}", &m),
	                 MCP_MSG_NOTIFICATION);
	assert_int_equal(kind("{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}", NULL),
	                 MCP_MSG_RESPONSE);
	assert_int_equal(kind("{\"jsonrpc\":\"2.0\",\"id\":3,\"error\":{\"code\":1}}", NULL),
	                 MCP_MSG_RESPONSE);
	/* not JSON-RPC 2.0, null/float/object ids, both result and error, bad params */
	const char *bad[] = {
	        "{\"id\":1,\"method\":\"ping\"}",
	        "{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"ping\"}",
	        "{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"ping\"}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1.5,\"method\":\"ping\"}",
	        "{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"ping\"}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\"}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":7}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"params\":3}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{},\"error\":{}}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1}",
	        "{\"jsonrpc\":\"2.0\",\"result\":{}}",
	        "{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":\"x\"}",
	        "[1]",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (kind(bad[i], NULL) != MCP_MSG_INVALID)
			fail_msg("accepted %s", bad[i]);
	}
}

static void test_scan(void **state)
{
	struct mcp_scan sc;
	const char *ev = " {\"jsonrpc\":\"2.0\",\"method\":\"sampling/createMessage\",\"id\":7,"
	                 "\"params\":{\"a\":[1,{\"id\":\"inner\"}],\"s\":\"x\\\"}\"}} ";
	assert_true(mcp_scan_object(ev, strlen(ev), &sc));
	assert_int_equal(sc.id.len, 1);
	assert_memory_equal(sc.id.p, "7", 1);
	assert_true(mcp_span_is(&sc.method, "sampling/createMessage"));
	assert_int_equal(sc.result.len, 0);
	const char *res = "{\"id\":\"x\",\"result\":{\"tools\":[]}}";
	assert_true(mcp_scan_object(res, strlen(res), &sc));
	assert_int_equal(sc.method.len, 0);
	assert_int_equal(sc.result.len, strlen("{\"tools\":[]}"));
	/* truncated, trailing garbage, not an object, control byte in a string, too deep */
	const char *bad[] = {"{\"id\":1", "{\"id\":1} x", "[1]", "{\"a\":\"\x01\"}",
	                     "{\"a\" 1}", "{\"a\":1,}",   "",    "{"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_false(mcp_scan_object(bad[i], strlen(bad[i]), &sc));
	char deep[300];
	size_t n = 0;
	deep[n++] = '{';
	memcpy(deep + n, "\"a\":", 4);
	n += 4;
	for (int i = 0; i < 100; i++)
		deep[n++] = '[';
	for (int i = 0; i < 100; i++)
		deep[n++] = ']';
	deep[n++] = '}';
	assert_false(mcp_scan_object(deep, n, &sc));
	/* embedded NUL: bytes with a length, never a C string */
	const char nul[] = "{\"id\":1,\"x\":\"a\0b\"}";
	assert_false(mcp_scan_object(nul, sizeof(nul) - 1, &sc));
}

static void test_glob(void **state)
{
	assert_true(mcp_glob_match("search__*", "search__find", 12));
	assert_true(mcp_glob_match("*", "", 0));
	assert_true(mcp_glob_match("*__delete_*", "tickets__delete_all", 19));
	assert_false(mcp_glob_match("tickets__delete_*", "tickets__del", 12));
	assert_true(mcp_glob_match("a?c", "abc", 3));
	assert_false(mcp_glob_match("a?c", "ac", 2));
	assert_true(mcp_glob_match("a\\*c", "a*c", 3));
	assert_false(mcp_glob_match("a\\*c", "abc", 3));
	assert_true(mcp_glob_match("*a*b*c*", "xxaxxbxxcxx", 11));
	assert_false(mcp_glob_match("*a*b*c", "xxaxxbxxcxx", 11));
	/* the length counts, not a NUL */
	assert_false(mcp_glob_match("ab", "abc", 3));
	assert_true(mcp_glob_match("ab", "abc", 2));
	char *allow[] = {"search__*"}, *deny[] = {"search__secret*"};
	struct mcp_tool_filter route = {.deny = deny, .n_deny = 1};
	struct mcp_tool_filter cons = {.allow = allow, .n_allow = 1};
	assert_true(mcp_tool_allowed(&route, &cons, "search__find", 12));
	assert_false(mcp_tool_allowed(&route, &cons, "search__secret_x", 16));
	assert_false(mcp_tool_allowed(&route, &cons, "tickets__x", 10));
	assert_true(mcp_tool_allowed(&route, NULL, "tickets__x", 10));
}

static struct mcp_crypto *crypto(void)
{
	static unsigned char key[32] = {1, 2, 3};
	mcp_crypto_set_key(key);
	struct mcp_crypto *c = mcp_crypto_new();
	assert_non_null(c);
	return c;
}

static void sample_session(struct mcp_session *s)
{
	memset(s, 0, sizeof(*s));
	s->generation = 42;
	s->route = 3;
	s->consumer = 7;
	s->version = 1;
	for (int i = 0; i < MCP_SID_BYTES; i++)
		s->sid[i] = (uint8_t)(i * 7);
	s->created_ms = 1700000000123ull;
	s->n = 2;
	s->up[0] = (struct mcp_upstream_session){.slot = 0, .version = 1, .caps = MCP_CAP_TOOLS};
	strcpy(s->up[0].sid, "0b5a7e4c-1111-2222-3333-444455556666");
	s->up[0].sid_len = (uint8_t)strlen(s->up[0].sid);
	s->up[1] = (struct mcp_upstream_session){.slot = 5, .version = 2, .caps = 0};
}

static void test_session_roundtrip_and_tamper(void **state)
{
	struct mcp_crypto *c = crypto();
	struct mcp_session s, d;
	char tok[MCP_TOKEN_MAX];
	sample_session(&s);
	assert_true(mcp_session_encode(c, &s, tok, sizeof(tok)));
	assert_true(mcp_header_token(tok, MCP_TOKEN_MAX));
	assert_true(mcp_session_decode(c, tok, strlen(tok), &d));
	assert_int_equal(d.generation, 42);
	assert_int_equal(d.route, 3);
	assert_int_equal(d.consumer, 7);
	assert_int_equal(d.created_ms, s.created_ms);
	assert_memory_equal(d.sid, s.sid, MCP_SID_BYTES);
	assert_int_equal(d.n, 2);
	assert_string_equal(d.up[0].sid, s.up[0].sid);
	assert_int_equal(d.up[0].caps, MCP_CAP_TOOLS);
	assert_int_equal(d.up[1].slot, 5);
	assert_int_equal(d.up[1].sid_len, 0);
	/* two encodings of one session differ (random nonce) and both decode */
	char tok2[MCP_TOKEN_MAX];
	assert_true(mcp_session_encode(c, &s, tok2, sizeof(tok2)));
	assert_string_not_equal(tok, tok2);
	/* every single-character change is refused */
	size_t n = strlen(tok);
	for (size_t i = 0; i < n; i++) {
		char t[MCP_TOKEN_MAX];
		memcpy(t, tok, n + 1);
		t[i] = t[i] == 'A' ? 'B' : 'A';
		if (mcp_session_decode(c, t, n, &d))
			fail_msg("a token changed at %zu still decodes", i);
	}
	/* truncated, extended, wrong prefix, another key */
	assert_false(mcp_session_decode(c, tok, n - 1, &d));
	assert_false(mcp_session_decode(c, tok, 3, &d));
	assert_false(mcp_session_decode(c, "s1.", 3, &d));
	assert_false(mcp_session_decode(c, tok + 1, n - 1, &d));
	unsigned char other[32] = {9};
	mcp_crypto_set_key(other);
	assert_false(mcp_session_decode(c, tok, n, &d));
	mcp_crypto_free(c);
	/* the hash that logs show is stable and short */
	char h1[13], h2[13];
	mcp_session_hash(s.sid, h1);
	mcp_session_hash(s.sid, h2);
	assert_string_equal(h1, h2);
	assert_int_equal(strlen(h1), 12);
}

static void test_cursor(void **state)
{
	struct mcp_crypto *c = crypto();
	uint8_t sid[MCP_SID_BYTES] = {1}, other[MCP_SID_BYTES] = {2};
	struct mcp_cursor_part in[2] = {{0, "page-2", 6}, {3, "opaque\"x", 8}},
	                       out[MCP_MAX_SERVERS];
	char tok[MCP_CURSOR_MAX], buf[MCP_CURSOR_MAX];
	size_t n;
	assert_true(mcp_cursor_encode(c, sid, MCP_LIST_TOOLS, in, 2, tok, sizeof(tok)));
	assert_true(mcp_cursor_decode(c, sid, MCP_LIST_TOOLS, tok, strlen(tok), out, &n, buf,
	                              sizeof(buf)));
	assert_int_equal(n, 2);
	assert_int_equal(out[1].slot, 3);
	assert_string_equal(out[0].cursor, "page-2");
	assert_string_equal(out[1].cursor, "opaque\"x");
	/* bound to the session and the list kind */
	assert_false(mcp_cursor_decode(c, other, MCP_LIST_TOOLS, tok, strlen(tok), out, &n, buf,
	                               sizeof(buf)));
	assert_false(mcp_cursor_decode(c, sid, MCP_LIST_PROMPTS, tok, strlen(tok), out, &n, buf,
	                               sizeof(buf)));
	assert_false(
	        mcp_cursor_decode(c, sid, MCP_LIST_TOOLS, "forged", 6, out, &n, buf, sizeof(buf)));
	/* too small a buffer for the decoded cursors */
	assert_false(mcp_cursor_decode(c, sid, MCP_LIST_TOOLS, tok, strlen(tok), out, &n, buf, 8));
	mcp_crypto_free(c);
}

static void test_event_ids(void **state)
{
	struct mcp_event_ids e = {0}, p;
	char out[1024];
	assert_false(mcp_event_ids_format(&e, out, sizeof(out)));
	assert_true(mcp_event_ids_set(&e, 1, "abc_7", 5));
	assert_true(mcp_event_ids_set(&e, 0, "x.y:z", 5));
	assert_true(mcp_event_ids_format(&e, out, sizeof(out)));
	assert_true(mcp_event_ids_parse(&p, out, strlen(out)));
	assert_string_equal(p.id[0], "x.y:z");
	assert_string_equal(p.id[1], "abc_7");
	assert_null(p.id[2]);
	mcp_event_ids_free(&p);
	const char *bad[] = {"", "1", "1:", ":YWJj", "99:YWJj", "1:YWJj.1:YWJj", "a:YWJj", "1:!!"};
	for (size_t i = 1; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (mcp_event_ids_parse(&p, bad[i], strlen(bad[i])))
			fail_msg("parsed %s", bad[i]);
	}
	mcp_event_ids_free(&e);
}

static void seen(void *arg, unsigned slot, const char *name)
{
	(*(int *)arg)++;
}

static void test_merge_list(void **state)
{
	json_t *a = J("{\"tools\":[{\"name\":\"find\",\"description\":\"d\"},{\"name\":\"secret\"},"
	              "{\"nope\":1},7],\"nextCursor\":\"c1\"}");
	json_t *b = J("{\"tools\":[{\"name\":\"delete_all\"},{\"name\":\"create\"}]}");
	struct mcp_list_part parts[2] = {{0, "search", a}, {2, "tickets", b}};
	const char *next[2];
	char *deny[] = {"*__delete_*", "search__secret"};
	struct mcp_tool_filter route = {.deny = deny, .n_deny = 2};
	int count = 0;
	json_t *m =
	        mcp_merge_list(MCP_LIST_TOOLS, parts, 2, "__", &route, NULL, next, seen, &count);
	assert_non_null(m);
	char *text = json_dumps(m, JSON_COMPACT | JSON_SORT_KEYS);
	assert_string_equal(text, "{\"tools\":[{\"description\":\"d\",\"name\":\"search__find\"},"
	                          "{\"name\":\"tickets__create\"}]}");
	free(text);
	assert_int_equal(count, 2);
	assert_string_equal(next[0], "c1");
	assert_null(next[1]);
	json_decref(m);
	/* resources: uri prefixed, no filtering */
	json_t *r = J("{\"resources\":[{\"uri\":\"file:///a\",\"name\":\"a\"}]}");
	struct mcp_list_part rp = {1, "docs", r};
	m = mcp_merge_list(MCP_LIST_RESOURCES, &rp, 1, "::", &route, NULL, NULL, NULL, NULL);
	assert_string_equal(json_string_value(json_object_get(
	                            json_array_get(json_object_get(m, "resources"), 0), "uri")),
	                    "docs::file:///a");
	json_decref(m);
	json_decref(r);
	json_decref(a);
	json_decref(b);
	/* the originals are untouched (items are copied) */
}

static void test_split_and_initialize(void **state)
{
	const char *names[] = {"search", "tickets", "se"};
	const char *rest = NULL;
	assert_int_equal(mcp_split_name("tickets__delete_all", 19, "__", names, 3, &rest), 1);
	assert_string_equal(rest, "delete_all");
	assert_int_equal(mcp_split_name("se__x__y", 8, "__", names, 3, &rest), 2);
	assert_string_equal(rest, "x__y");
	assert_int_equal(mcp_split_name("nosuch__x", 9, "__", names, 3, &rest), -1);
	assert_int_equal(mcp_split_name("search", 6, "__", names, 3, &rest), -1);
	json_t *r1 =
	        J("{\"capabilities\":{\"tools\":{\"listChanged\":true}},\"instructions\":\"A\"}");
	json_t *r2 = J("{\"capabilities\":{\"tools\":{},\"prompts\":{},\"experimental\":{}}}");
	const char *srv[] = {"a", "b"};
	const json_t *res[] = {r1, r2};
	json_t *m = mcp_merge_initialize("2025-06-18", srv, res, 2, "sluice/x");
	char *text = json_dumps(json_object_get(m, "capabilities"), JSON_COMPACT | JSON_SORT_KEYS);
	assert_string_equal(text, "{\"prompts\":{},\"tools\":{\"listChanged\":true}}");
	free(text);
	assert_string_equal(json_string_value(json_object_get(m, "instructions")), "a: A");
	assert_string_equal(json_string_value(json_object_get(m, "protocolVersion")), "2025-06-18");
	assert_int_equal(mcp_caps_of(json_object_get(r2, "capabilities")),
	                 MCP_CAP_TOOLS | MCP_CAP_PROMPTS);
	json_decref(m);
	json_decref(r1);
	json_decref(r2);
	assert_int_equal(mcp_version_index("2025-03-26", 10), 2);
	assert_true(mcp_version_allows_batch(2));
	assert_false(mcp_version_allows_batch(1));
	assert_int_equal(mcp_version_index("2025-03-2", 9), -1);
}

static void test_batch_check(void **state)
{
	size_t n = 99;
	json_t *a = J("[]");
	assert_int_equal(mcp_batch_check(a, 4, &n), MCP_BATCH_EMPTY);
	json_decref(a);
	a = J("[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"},"
	      "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/x\"},7,{\"id\":2}]");
	assert_int_equal(mcp_batch_check(a, 4, &n), MCP_BATCH_OK);
	assert_int_equal(n, 3); /* the request and the two that are no message */
	assert_int_equal(mcp_batch_check(a, 3, &n), MCP_BATCH_TOO_LARGE);
	json_decref(a);
	a = J("[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}},"
	      "{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":1}}]");
	assert_int_equal(mcp_batch_check(a, 4, &n), MCP_BATCH_OK);
	assert_int_equal(n, 0);
	json_decref(a);
	a = J("[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}},"
	      "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/x\"}]");
	assert_int_equal(mcp_batch_check(a, 4, &n), MCP_BATCH_MIXED);
	json_decref(a);
	assert_true(mcp_version_allows_batch(mcp_version_index("2025-03-26", 10)));
	assert_false(mcp_version_allows_batch(mcp_version_index("2025-06-18", 10)));
	assert_false(mcp_version_allows_batch(mcp_version_index("2024-11-05", 10)));
}

static void test_policy_body(void **state)
{
	json_t *args =
	        J("{\"q\":\"one\",\"n\":3,\"o\":{\"deep\":[true,\"two\",{\"k\":\"three\"}]}}");
	size_t n = 0;
	json_t *b = mcp_policy_body(args, &n);
	assert_non_null(b);
	assert_int_equal(n, 3);
	char *text = json_dumps(b, JSON_COMPACT);
	assert_string_equal(text, "{\"messages\":[{\"role\":\"user\",\"content\":["
	                          "{\"type\":\"text\",\"text\":\"one\"},"
	                          "{\"type\":\"text\",\"text\":\"two\"},"
	                          "{\"type\":\"text\",\"text\":\"three\"}]}]}");
	free(text);
	/* the parts are the arguments' own strings: a rewrite in place rewrites the argument */
	json_t *part = json_object_get(
	        json_array_get(json_object_get(json_array_get(json_object_get(b, "messages"), 0),
	                                       "content"),
	                       0),
	        "text");
	assert_ptr_equal(part, json_object_get(args, "q"));
	json_string_setn(part, "ONE", 3);
	assert_string_equal(json_string_value(json_object_get(args, "q")), "ONE");
	json_decref(b);
	json_decref(args);
	/* no arguments: an empty message */
	b = mcp_policy_body(NULL, &n);
	assert_int_equal(n, 0);
	json_decref(b);
	/* deeper than the policies look: refused */
	char deep[2 * (MCP_POLICY_MAX_DEPTH + 2) + 8];
	size_t o = 0;
	for (int i = 0; i < MCP_POLICY_MAX_DEPTH + 2; i++)
		deep[o++] = '[';
	deep[o++] = '"';
	deep[o++] = 'x';
	deep[o++] = '"';
	for (int i = 0; i < MCP_POLICY_MAX_DEPTH + 2; i++)
		deep[o++] = ']';
	deep[o] = '\0';
	args = J(deep);
	assert_null(mcp_policy_body(args, &n));
	json_decref(args);
}

static char *splice(const char *body, const char *sub, const char *field, const char *value,
                    size_t cut)
{
	char *out = NULL;
	size_t len = 0;
	if (!mcp_splice_param(body, strlen(body), sub, field, value, strlen(value), cut, &out,
	                      &len))
		return NULL;
	assert_int_equal(strlen(out), len);
	return out;
}

static void test_splice(void **state)
{
	struct mcp_span sp;
	const char *o = "{ \"a\" : [1,{\"name\":\"x\"}], \"name\" : \"y\" }";
	assert_true(mcp_scan_member(o, strlen(o), "name", &sp));
	assert_int_equal(sp.len, 3);
	assert_memory_equal(sp.p, "\"y\"", 3);
	assert_false(mcp_scan_member(o, strlen(o), "nope", &sp));
	assert_false(mcp_scan_member("{\"name\":1", 9, "name", &sp));
	assert_false(mcp_scan_member("[]", 2, "name", &sp));

	/* the prefix goes; everything else keeps its bytes */
	char *s = splice("{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/call\",\"params\":{"
	                 "\"arguments\":{\"name\":\"search__decoy\"}, \"name\":\"search__find\"}}",
	                 NULL, "name", "search__find", 8);
	assert_string_equal(s,
	                    "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/call\",\"params\":{"
	                    "\"arguments\":{\"name\":\"search__decoy\"}, \"name\":\"find\"}}");
	free(s);
	s = splice("{\"params\":{\"ref\":{\"type\":\"ref/resource\",\"uri\":\"docs__file:///a\"}}}",
	           "ref", "uri", "docs__file:///a", 6);
	assert_string_equal(
	        s, "{\"params\":{\"ref\":{\"type\":\"ref/resource\",\"uri\":\"file:///a\"}}}");
	free(s);
	/* left to the encoder: escapes, a value the bytes do not hold, no such member */
	assert_null(splice("{\"params\":{\"name\":\"search__\\u0066ind\"}}", NULL, "name",
	                   "search__find", 8));
	assert_null(splice("{\"params\":{\"name\":\"search__find\"}}", NULL, "name",
	                   "search__other", 8));
	assert_null(splice("{\"params\":{\"na\\u006de\":\"search__find\"}}", NULL, "name",
	                   "search__find", 8));
	assert_null(splice("{\"params\":{\"name\":\"s__f\"}}", NULL, "name", "s__f", 5));
	assert_null(splice("{\"params\":[]}", NULL, "name", "s__f", 3));
	/* not inside a UTF-8 sequence (found by fuzz_mcp) */
	assert_null(splice("{\"params\":{\"name\":\"\xd2\x86\"}}", NULL, "name", "\xd2\x86", 1));
	s = splice("{\"params\":{\"name\":\"a\xd2\x86\"}}", NULL, "name", "a\xd2\x86", 1);
	assert_string_equal(s, "{\"params\":{\"name\":\"\xd2\x86\"}}");
	free(s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_classify),
	        cmocka_unit_test(test_scan),
	        cmocka_unit_test(test_glob),
	        cmocka_unit_test(test_session_roundtrip_and_tamper),
	        cmocka_unit_test(test_cursor),
	        cmocka_unit_test(test_event_ids),
	        cmocka_unit_test(test_merge_list),
	        cmocka_unit_test(test_split_and_initialize),
	        cmocka_unit_test(test_batch_check),
	        cmocka_unit_test(test_policy_body),
	        cmocka_unit_test(test_splice),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
