/* test_http.c — the HTTP/1.1 parsers over bytes: head scan, head parse, chunked bodies. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/http.h"

/* ---------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------- */

/* Parse a copy of [s, s+len) in a buffer of exactly that size (ASan sees overreads). */
static enum http_head_result parse_n(const char *s, size_t len, struct http_request *r,
                                     const char **why)
{
	char *buf = malloc(len ? len : 1);
	assert_non_null(buf);
	memcpy(buf, s, len);
	memset(r, 0, sizeof(*r));
	*why = NULL;
	enum http_head_result res = http_parse_head(buf, len, r, why);
	if (res != HTTP_HEAD_OK) {
		assert_non_null(*why);
		free(buf);
	} else {
		/* The caller keeps buf for as long as r is used; tests leak it to the end. */
		static char *keep[64];
		static size_t n_keep;
		if (n_keep == 64)
			free(keep[--n_keep]);
		keep[n_keep++] = buf;
	}
	return res;
}

static enum http_head_result parse(const char *s, struct http_request *r, const char **why)
{
	return parse_n(s, strlen(s), r, why);
}

static void assert_refused(const char *s, enum http_head_result want, const char *reason)
{
	struct http_request r;
	const char *why;
	enum http_head_result res = parse(s, &r, &why);
	if (res != want || strcmp(why, reason) != 0)
		fail_msg("%s: got %d (%s), want %d (%s)", s, res, why ? why : "-", want, reason);
}

static const char *const GOOD_HEAD = "POST /v1/chat/completions?api-version=1 HTTP/1.1\r\n"
                                     "Host: gw:8080\r\n"
                                     "Content-Type:application/json \r\n"
                                     "X-Mixed-Case:  a b\tc  \r\n"
                                     "Content-Length: 42\r\n"
                                     "\r\n";

/* ---------------------------------------------------------------------------
 * http_parse_head
 * ------------------------------------------------------------------------- */

static void test_parse_good(void **state)
{
	struct http_request r;
	const char *why;

	assert_int_equal(parse(GOOD_HEAD, &r, &why), HTTP_HEAD_OK);
	assert_string_equal(r.method, "POST");
	assert_string_equal(r.path, "/v1/chat/completions");
	assert_string_equal(r.query, "api-version=1");
	assert_int_equal(r.minor, 1);
	assert_int_equal(r.n_headers, 4);
	assert_string_equal(r.headers[0].name, "host");
	assert_string_equal(r.headers[0].value, "gw:8080");
	assert_string_equal(r.headers[1].name, "content-type");
	assert_string_equal(r.headers[1].value, "application/json");
	assert_string_equal(r.headers[2].name, "x-mixed-case");
	assert_string_equal(r.headers[2].value, "a b\tc");
	assert_string_equal(http_request_header(&r, "X-Mixed-Case"), "a b\tc");
	assert_null(http_request_header(&r, "x-absent"));
	assert_false(r.chunked);
	assert_int_equal(r.content_length, 42);
}

static void test_parse_minimal_and_http10(void **state)
{
	struct http_request r;
	const char *why;

	assert_int_equal(parse("GET / HTTP/1.0\r\n\r\n", &r, &why), HTTP_HEAD_OK);
	assert_string_equal(r.method, "GET");
	assert_string_equal(r.path, "/");
	assert_null(r.query);
	assert_int_equal(r.minor, 0);
	assert_int_equal(r.n_headers, 0);
	assert_int_equal(r.content_length, 0);

	assert_int_equal(parse("GET /?x HTTP/1.1\r\nHost:\r\nX-Empty:   \r\n\r\n", &r, &why),
	                 HTTP_HEAD_OK);
	assert_string_equal(r.query, "x");
	assert_string_equal(r.headers[0].value, "");
	assert_string_equal(r.headers[1].value, "");

	/* obs-text in a value is kept as it is */
	assert_int_equal(parse("GET / HTTP/1.1\r\nHost: a\r\nX-U: caf\xc3\xa9\r\n\r\n", &r, &why),
	                 HTTP_HEAD_OK);
	assert_string_equal(r.headers[1].value, "caf\xc3\xa9");
}

static void test_parse_nul_anywhere(void **state)
{
	/* The packet, then a NUL in every position of a good head. */
	struct http_request r;
	const char *why;
	char buf[sizeof("GET /v1/models\0x HTTP/1.1\r\nHost: a\r\n\r\n")];
	memcpy(buf, "GET /v1/models\0x HTTP/1.1\r\nHost: a\r\n\r\n", sizeof(buf));
	assert_int_equal(parse_n(buf, sizeof(buf) - 1, &r, &why), HTTP_HEAD_BAD);
	assert_string_equal(why, "invalid byte in the request target");

	size_t len = strlen(GOOD_HEAD);
	for (size_t i = 0; i < len; i++) {
		char *h = strdup(GOOD_HEAD);
		assert_non_null(h);
		h[i] = '\0';
		enum http_head_result res = parse_n(h, len, &r, &why);
		if (res == HTTP_HEAD_OK)
			fail_msg("a NUL at %zu was accepted", i);
		/* and a bare LF or CR there is refused too */
		h[i] = '\n';
		if (parse_n(h, len, &r, &why) == HTTP_HEAD_OK && GOOD_HEAD[i] != '\n')
			fail_msg("a LF at %zu was accepted", i);
		h[i] = '\r';
		if (parse_n(h, len, &r, &why) == HTTP_HEAD_OK && GOOD_HEAD[i] != '\r')
			fail_msg("a CR at %zu was accepted", i);
		free(h);
	}
}

static void test_parse_request_line(void **state)
{
	assert_refused("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed request target");
	assert_refused(" GET / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD, "malformed method");
	assert_refused("G@T / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD, "malformed method");
	assert_refused("GET\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD, "malformed method");
	assert_refused("GET /\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in the request target");
	assert_refused("GET x HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed request target");
	assert_refused("GET * HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed request target");
	assert_refused("GET /a\x1b[0m HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in the request target");
	assert_refused("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in the request target");
	assert_refused("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in the request target");
	assert_refused("GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in the request target");
	assert_refused("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "unsupported HTTP version");
	assert_refused("GET / HTTP/2.0\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "unsupported HTTP version");
	assert_refused("GET / HTTP/1.x\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "unsupported HTTP version");
	assert_refused("GET / http/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "unsupported HTTP version");
	assert_refused("\r\n\r\n", HTTP_HEAD_BAD, "malformed method");
}

static void test_parse_line_ends(void **state)
{
	assert_refused("GET / HTTP/1.1\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "bare LF in the request head");
	assert_refused("GET / HTTP/1.1\r\nHost: a\n\r\n", HTTP_HEAD_BAD,
	               "bare LF in the request head");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\n\n", HTTP_HEAD_BAD,
	               "bare LF in the request head");
	assert_refused("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "bare LF in the request head");
	assert_refused("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in a header value");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\n", HTTP_HEAD_INCOMPLETE,
	               "request head not ended by an empty line");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\n\r", HTTP_HEAD_INCOMPLETE,
	               "request head not ended by an empty line");
	assert_refused("GET / HTTP/1.1", HTTP_HEAD_INCOMPLETE,
	               "request head not ended by an empty line");
	assert_refused("", HTTP_HEAD_INCOMPLETE, "request head not ended by an empty line");
}

static void test_parse_fields(void **state)
{
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", HTTP_HEAD_BAD,
	               "obsolete line folding in the request head");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\n\tc\r\n\r\n", HTTP_HEAD_BAD,
	               "obsolete line folding in the request head");
	assert_refused("GET / HTTP/1.1\r\nHost : a\r\n\r\n", HTTP_HEAD_BAD,
	               "whitespace before a header colon");
	assert_refused("GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", HTTP_HEAD_BAD,
	               "whitespace before a header colon");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", HTTP_HEAD_BAD,
	               "empty header name");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nX(b): c\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed header name");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nX\xe9: c\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed header name");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed header name");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n", HTTP_HEAD_BAD,
	               "malformed header name");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in a header value");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", HTTP_HEAD_BAD,
	               "invalid byte in a header value");
}

static void test_parse_limits(void **state)
{
	struct http_request r;
	const char *why;
	size_t fixed = strlen("GET  HTTP/1.1");
	size_t n = HTTP_MAX_REQUEST_LINE + 64;
	char *h = malloc(n + 64);
	assert_non_null(h);

	/* exactly at the limit: parsed; one more byte: 414 */
	memcpy(h, "GET /", 5);
	memset(h + 5, 'a', HTTP_MAX_REQUEST_LINE - fixed - 1);
	strcpy(h + 5 + HTTP_MAX_REQUEST_LINE - fixed - 1, " HTTP/1.1\r\nHost: a\r\n\r\n");
	assert_int_equal(parse(h, &r, &why), HTTP_HEAD_OK);
	assert_int_equal(strlen(r.path), HTTP_MAX_REQUEST_LINE - fixed);
	memset(h + 5, 'a', HTTP_MAX_REQUEST_LINE - fixed);
	strcpy(h + 5 + HTTP_MAX_REQUEST_LINE - fixed, " HTTP/1.1\r\nHost: a\r\n\r\n");
	assert_int_equal(parse(h, &r, &why), HTTP_HEAD_URI_TOO_LONG);
	assert_int_equal(http_head_status(HTTP_HEAD_URI_TOO_LONG), 414);
	/* an unended line past the limit is too long already */
	memset(h + 5, 'a', n - 5);
	assert_int_equal(parse_n(h, n, &r, &why), HTTP_HEAD_URI_TOO_LONG);
	free(h);

	/* HTTP_MAX_HEADERS fields: fine; one more: 431 */
	char *big = malloc(64 + (HTTP_MAX_HEADERS + 1) * 16);
	assert_non_null(big);
	size_t o = (size_t)sprintf(big, "GET / HTTP/1.1\r\nHost: a\r\n");
	for (int i = 1; i < HTTP_MAX_HEADERS; i++)
		o += (size_t)sprintf(big + o, "X-%d: v\r\n", i);
	strcpy(big + o, "\r\n");
	assert_int_equal(parse(big, &r, &why), HTTP_HEAD_OK);
	assert_int_equal(r.n_headers, HTTP_MAX_HEADERS);
	o += (size_t)sprintf(big + o, "X-last: v\r\n");
	strcpy(big + o, "\r\n");
	assert_int_equal(parse(big, &r, &why), HTTP_HEAD_TOO_LARGE);
	assert_string_equal(why, "too many header fields");
	assert_int_equal(http_head_status(HTTP_HEAD_TOO_LARGE), 431);
	assert_int_equal(http_head_status(HTTP_HEAD_BAD), 400);
	free(big);
}

static void test_parse_framing(void **state)
{
	struct http_request r;
	const char *why;

	assert_int_equal(
	        parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n", &r, &why),
	        HTTP_HEAD_OK);
	assert_true(r.chunked);
	assert_int_equal(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n"
	                       "Content-Length: 007\r\n\r\n",
	                       &r, &why),
	                 HTTP_HEAD_OK);
	assert_int_equal(r.content_length, 7);
	assert_int_equal(
	        parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n",
	              &r, &why),
	        HTTP_HEAD_OK);
	assert_int_equal(r.content_length, UINT64_MAX);
	assert_int_equal(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: "
	                       "99999999999999999999999\r\n\r\n",
	                       &r, &why),
	                 HTTP_HEAD_OK);
	assert_int_equal(r.content_length, UINT64_MAX); /* saturated: over any max_body_size */

	assert_refused(
	        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n",
	        HTTP_HEAD_BAD, "conflicting content-length values");
	assert_refused(
	        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 07\r\n\r\n",
	        HTTP_HEAD_BAD, "conflicting content-length values");
	const char *bad_cl[] = {"+1", "-1", "0x1", "1 1", "1,1", "", "a", "1.0"};
	for (size_t i = 0; i < sizeof(bad_cl) / sizeof(bad_cl[0]); i++) {
		char h[128];
		snprintf(h, sizeof(h), "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %s\r\n\r\n",
		         bad_cl[i]);
		assert_refused(h, HTTP_HEAD_BAD, "malformed content-length");
	}
	assert_refused("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
	               "Content-Length: 5\r\n\r\n",
	               HTTP_HEAD_BAD, "content-length with transfer-encoding");
	assert_refused("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
	               "Transfer-Encoding: chunked\r\n\r\n",
	               HTTP_HEAD_BAD, "repeated transfer-encoding");
	const char *bad_te[] = {"gzip, chunked", "chunked, chunked", "identity", "chunked;x=1", ""};
	for (size_t i = 0; i < sizeof(bad_te) / sizeof(bad_te[0]); i++) {
		char h[128];
		snprintf(h, sizeof(h),
		         "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n", bad_te[i]);
		assert_refused(h, HTTP_HEAD_BAD, "unsupported transfer-encoding");
	}
	assert_refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HTTP_HEAD_BAD,
	               "transfer-encoding in an HTTP/1.0 request");
	assert_refused("GET / HTTP/1.1\r\n\r\n", HTTP_HEAD_BAD, "missing host");
	assert_refused("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", HTTP_HEAD_BAD,
	               "repeated host");
	assert_refused("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", HTTP_HEAD_BAD,
	               "repeated host");
}

/* ---------------------------------------------------------------------------
 * http_head_scan
 * ------------------------------------------------------------------------- */

static enum http_head_result scan_pieces(const char *s, size_t len, size_t step, size_t *head_len)
{
	struct http_head_scan sc;
	enum http_head_result res = HTTP_HEAD_INCOMPLETE;

	memset(&sc, 0, sizeof(sc));
	for (size_t i = 0; i < len && res == HTTP_HEAD_INCOMPLETE; i += step) {
		size_t n = len - i < step ? len - i : step;
		res = http_head_scan(&sc, s + i, n, head_len);
	}
	return res;
}

static void test_scan(void **state)
{
	const char *two = "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n";
	size_t want = strlen("GET / HTTP/1.1\r\nHost: a\r\n\r\n");

	for (size_t step = 1; step <= strlen(two); step++) {
		size_t head_len = 0;
		assert_int_equal(scan_pieces(two, strlen(two), step, &head_len), HTTP_HEAD_OK);
		assert_int_equal(head_len, want);
	}
	size_t head_len;
	assert_int_equal(scan_pieces("GET / HTTP/1.1\r\nHost: a\r\n", 25, 3, &head_len),
	                 HTTP_HEAD_INCOMPLETE);
	for (size_t step = 1; step < 8; step++) {
		assert_int_equal(
		        scan_pieces("GET / HTTP/1.1\nHost: a\r\n\r\n", 26, step, &head_len),
		        HTTP_HEAD_BAD);
		assert_int_equal(
		        scan_pieces("GET / HTTP/1.1\r\nHost: a\r\n\n", 26, step, &head_len),
		        HTTP_HEAD_BAD);
		assert_int_equal(scan_pieces("\n", 1, step, &head_len), HTTP_HEAD_BAD);
	}
	/* a request line past the limit, ended or not */
	size_t n = HTTP_MAX_REQUEST_LINE + 2;
	char *h = malloc(n + 2);
	assert_non_null(h);
	memset(h, 'a', n);
	assert_int_equal(scan_pieces(h, n, 1000, &head_len), HTTP_HEAD_URI_TOO_LONG);
	memcpy(h + HTTP_MAX_REQUEST_LINE + 1, "\r\n", 2);
	assert_int_equal(scan_pieces(h, HTTP_MAX_REQUEST_LINE + 1, 1000, &head_len),
	                 HTTP_HEAD_INCOMPLETE); /* its CR may still come */
	assert_int_equal(scan_pieces(h, HTTP_MAX_REQUEST_LINE + 3, 1000, &head_len),
	                 HTTP_HEAD_URI_TOO_LONG);
	memcpy(h + HTTP_MAX_REQUEST_LINE, "\r\n", 2);
	assert_int_equal(scan_pieces(h, HTTP_MAX_REQUEST_LINE + 2, 7, &head_len),
	                 HTTP_HEAD_INCOMPLETE); /* at the limit: fine */
	free(h);
}

/* ---------------------------------------------------------------------------
 * http_chunked_feed
 * ------------------------------------------------------------------------- */

struct decoded {
	enum http_chunked_result res;
	char body[4096];
	size_t body_len;
	size_t consumed; /* input bytes taken, body included */
	const char *why;
};

/* Feed [s, s+len) in pieces of `step` bytes. */
static void decode(const char *s, size_t len, size_t step, uint64_t max_body, uint64_t max_trailer,
                   struct decoded *d)
{
	struct http_chunked ch;
	memset(&ch, 0, sizeof(ch));
	ch.max_body = max_body;
	ch.max_trailer = max_trailer;
	memset(d, 0, sizeof(*d));
	d->res = HTTP_CHUNKED_MORE;
	size_t off = 0;
	while (off < len && d->res == HTTP_CHUNKED_MORE) {
		size_t n = len - off < step ? len - off : step;
		size_t done = 0;
		while (done < n && d->res == HTTP_CHUNKED_MORE) {
			size_t used, data;
			d->res = http_chunked_feed(&ch, s + off + done, n - done, &used, &data,
			                           &d->why);
			assert_true(used + data <= n - done);
			assert_true(d->body_len + data <= sizeof(d->body));
			memcpy(d->body + d->body_len, s + off + done + used, data);
			d->body_len += data;
			done += used + data;
			if (d->res == HTTP_CHUNKED_MORE && used + data == 0)
				break;
		}
		off += done;
		if (done < n && d->res == HTTP_CHUNKED_MORE)
			fail_msg("the decoder stopped without a result");
	}
	d->consumed = off;
	assert_int_equal(ch.total, d->body_len);
}

static void assert_chunked(const char *s, enum http_chunked_result want, const char *body,
                           const char *reason)
{
	size_t len = strlen(s);
	for (size_t step = 1; step <= len; step++) {
		struct decoded d;
		decode(s, len, step, 1 << 20, 1024, &d);
		if (d.res != want)
			fail_msg("%s (step %zu): got %d (%s), want %d", s, step, d.res,
			         d.why ? d.why : "-", want);
		if (body != NULL &&
		    (d.body_len != strlen(body) || memcmp(d.body, body, d.body_len)))
			fail_msg("%s (step %zu): body %.*s", s, step, (int)d.body_len, d.body);
		if (reason != NULL && strcmp(d.why, reason) != 0)
			fail_msg("%s: reason %s, want %s", s, d.why, reason);
	}
}

static void test_chunked_good(void **state)
{
	assert_chunked("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", HTTP_CHUNKED_DONE, "hello world",
	               NULL);
	assert_chunked("0\r\n\r\n", HTTP_CHUNKED_DONE, "", NULL);
	assert_chunked("000\r\n\r\n", HTTP_CHUNKED_DONE, "", NULL);
	assert_chunked("A;name=value;x\r\n0123456789\r\n0;last\r\n\r\n", HTTP_CHUNKED_DONE,
	               "0123456789", NULL);
	assert_chunked("a\r\n0123456789\r\n0\r\nX-T: 1\r\nX-U: v w\r\n\r\n", HTTP_CHUNKED_DONE,
	               "0123456789", NULL);
	assert_chunked("000000000000000a\r\n0123456789\r\n0\r\n\r\n", HTTP_CHUNKED_DONE,
	               "0123456789", NULL);
	assert_chunked("2\r\nab\r\n", HTTP_CHUNKED_MORE, "ab", NULL);

	/* the decoder stops at the end of the body: what follows is the next request */
	const char *two = "3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
	struct decoded d;
	decode(two, strlen(two), strlen(two), 100, 100, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_DONE);
	assert_int_equal(d.consumed, strlen("3\r\nabc\r\n0\r\n\r\n"));
}

static void test_chunked_bad(void **state)
{
	assert_chunked("+5\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked("-0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked("0x5\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked(" 5\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked("5 \r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked("5 ;x\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "malformed chunk size");
	assert_chunked("\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked(";x\r\n", HTTP_CHUNKED_BAD, NULL, "malformed chunk size");
	assert_chunked("5\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk size line not ended by CRLF");
	assert_chunked("5;x\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk size line not ended by CRLF");
	assert_chunked("5\rhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk size line not ended by CRLF");
	assert_chunked("5;a\x01\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "invalid byte in a chunk extension");
	assert_chunked("00000000000000005\r\nhello\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk size has too many digits");
	assert_chunked("5\r\nhelloX\r\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk data not followed by CRLF");
	assert_chunked("5\r\nhello\n0\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "chunk data not followed by CRLF");
	assert_chunked("0\r\nX: a\rb\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "bare CR in the chunked trailer section");
	assert_chunked("0\r\nX: a\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "malformed chunked trailer section");
	assert_chunked("0\r\n\n", HTTP_CHUNKED_BAD, NULL, "malformed chunked trailer section");
	assert_chunked("0\r\n folded\r\n\r\n", HTTP_CHUNKED_BAD, NULL,
	               "malformed chunked trailer section");

	/* a size line may not grow without end */
	char line[HTTP_MAX_CHUNK_LINE + 16];
	memset(line, 'e', sizeof(line));
	memcpy(line, "5;", 2);
	struct decoded d;
	decode(line, sizeof(line), 100, 1 << 20, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_BAD);
	assert_string_equal(d.why, "chunk size line too long");
}

static void test_chunked_nul(void **state)
{
	const char s[] = "5\r\nhel\0o\r\n0\r\nX: a\0b\r\n\r\n";
	struct decoded d;
	decode(s, sizeof(s) - 1, 1, 100, 100, &d);
	assert_int_equal(d.res,
	                 HTTP_CHUNKED_BAD); /* NUL in data is data; in the trailer it is not */
	assert_int_equal(d.body_len, 5);
	assert_memory_equal(d.body, "hel\0o", 5);
	const char t[] = "5\0\r\nhello\r\n0\r\n\r\n";
	decode(t, sizeof(t) - 1, 3, 100, 100, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_BAD);
}

static void test_chunked_limits(void **state)
{
	struct decoded d;
	/* The bypass: after 16 bytes, a size that wraps total + size. */
	const char *wrap = "10\r\n0123456789abcdef\r\nfffffffffffffff0\r\nxx";
	for (size_t step = 1; step <= strlen(wrap); step++) {
		decode(wrap, strlen(wrap), step, 1 << 20, 1024, &d);
		assert_int_equal(d.res, HTTP_CHUNKED_TOO_LARGE);
		assert_int_equal(d.body_len, 16);
	}
	decode("ffffffffffffffff\r\n", 18, 4, UINT64_MAX - 1, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_TOO_LARGE);
	decode("ffffffffffffffff\r\n", 18, 4, UINT64_MAX, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_MORE);
	/* exactly max_body: fine; one byte more: too large, before its data */
	decode("4\r\nabcd\r\n0\r\n\r\n", 14, 2, 4, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_DONE);
	decode("4\r\nabcd\r\n1\r\nx\r\n0\r\n\r\n", 20, 2, 4, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_TOO_LARGE);
	assert_int_equal(d.body_len, 4);
	/* the trailer section is bounded, even as one endless line */
	char t[2048];
	memcpy(t, "0\r\nX: ", 6);
	memset(t + 6, 'a', sizeof(t) - 6);
	decode(t, sizeof(t), 64, 100, 1024, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_TRAILER_TOO_LARGE);
	assert_true(d.consumed <= 3 + 1024 + 64);
	decode("0\r\nX: 123\r\n\r\n", 13, 1, 100, 10, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_DONE); /* "X: 123\r\n\r\n" is 10 bytes */
	decode("0\r\nX: 123\r\n\r\n", 13, 1, 100, 9, &d);
	assert_int_equal(d.res, HTTP_CHUNKED_TRAILER_TOO_LARGE);
}

/* http_put_decimal agrees with printf for every digit count, at both ends of each. */
static void test_put_decimal(void **state)
{
	(void)state;
	uint64_t v = 1;
	char got[24], want[24];

	for (int digits = 1; digits <= 20; digits++) {
		uint64_t cases[] = {v, v - 1, v + 7, v * 9 + (v - 1), UINT64_MAX};
		for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
			size_t n = http_put_decimal(got, cases[i]);
			got[n] = '\0';
			snprintf(want, sizeof(want), "%llu", (unsigned long long)cases[i]);
			assert_string_equal(got, want);
		}
		if (digits < 20)
			v *= 10;
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_parse_good),
	        cmocka_unit_test(test_put_decimal),
	        cmocka_unit_test(test_parse_minimal_and_http10),
	        cmocka_unit_test(test_parse_nul_anywhere),
	        cmocka_unit_test(test_parse_request_line),
	        cmocka_unit_test(test_parse_line_ends),
	        cmocka_unit_test(test_parse_fields),
	        cmocka_unit_test(test_parse_limits),
	        cmocka_unit_test(test_parse_framing),
	        cmocka_unit_test(test_scan),
	        cmocka_unit_test(test_chunked_good),
	        cmocka_unit_test(test_chunked_bad),
	        cmocka_unit_test(test_chunked_nul),
	        cmocka_unit_test(test_chunked_limits),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
