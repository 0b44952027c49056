/* http.h — the client-facing HTTP/1.1 server: one per worker, on libevent bufferevents. */
#ifndef SLUICE_HTTP_H
#define SLUICE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct evbuffer;
struct http_server;
struct http_conn;

/* Fixed protocol limits (docs/configuration.md, server). More header fields than this → 431. */
#define HTTP_MAX_HEADERS 100
/* A request line longer than this (bytes, without its CRLF) → 414; nginx's default is 8k too. */
#define HTTP_MAX_REQUEST_LINE (8 * 1024)
/* A chunk-size line (size and extensions) longer than this → 400. */
#define HTTP_MAX_CHUNK_LINE 1024
/* Hex digits in a chunk size: 16 hold any uint64, far beyond any max_body_size. */
#define HTTP_MAX_CHUNK_DIGITS 16
/* After refusing a request whose bytes were left unread: how long (ms) to go on reading
 * and discarding them, so that closing does not reset the connection under the answer. */
#define HTTP_LINGER_MS 5000

struct http_header {
	const char *name; /* lower-cased */
	const char *value;
};

/*
 * One parsed request. The strings point into the connection's buffers and stay
 * valid until the request is finished (replied to, or abandoned after an abort).
 * Every string is NUL-terminated and holds no NUL, CR or LF (the parser refuses
 * a head with one), so the rest of the program may treat them as C strings.
 */
struct http_request {
	const char *method;
	const char *path;  /* without the query string */
	const char *query; /* NULL when absent */
	int minor;         /* HTTP/1.minor */
	struct http_header headers[HTTP_MAX_HEADERS];
	size_t n_headers;
	bool chunked;            /* Transfer-Encoding: chunked */
	uint64_t content_length; /* when !chunked; 0 when absent, UINT64_MAX when too large */
	const char *body;  /* NUL-terminated; "" when empty */
	size_t body_len;
	const char *client_ip;
	uint64_t start_us; /* monotonic time the request's first byte arrived */
	struct http_conn *conn; /* private */
};

struct http_limits {
	uint64_t max_header_size;
	uint64_t max_body_size;
	uint64_t client_timeout;    /* ms: to receive one request's headers and body */
	uint64_t keepalive_timeout; /* ms: an idle connection between requests */
	uint64_t write_timeout;     /* ms: a client that accepts no bytes for this long is dropped */
	int max_connections;        /* per server (worker) */
};

/*
 * The handler owns the request from the call until it finishes it with
 * http_reply(), http_reply_end() or, after an abort, http_request_abandon().
 */
typedef void (*http_handler_fn)(struct http_request *req, void *arg);

/*
 * Optional head hook: runs when a head has arrived whose client waits for "100 Continue"
 * (Expect: 100-continue on HTTP/1.1, with a body to send), before the body is read.
 * req->body is "" then. Return true to let the request go on: 100 Continue is sent, the
 * body read, and the handler runs as for any request. Or answer now with http_reply*()
 * and return false: the body is never read and the connection closes after the answer.
 * Only these clients are asked: any other client sends its body without waiting, so
 * refusing early would save nothing and cost a second route and key check per request.
 * arg is the handler's.
 */
typedef bool (*http_head_check_fn)(struct http_request *req, void *arg);

struct http_server *http_server_new(struct event_base *base, const int *fds, size_t n_fds,
                                    const struct http_limits *limits, http_handler_fn handler,
                                    void *arg);
void http_server_set_head_check(struct http_server *srv, http_head_check_fn check);
void http_server_set_limits(struct http_server *srv, const struct http_limits *limits);
/* Serve TLS on listener i (its index in fds) with ctx from now on; NULL = plain.
 * The server takes a reference (SSL_CTX_up_ref); connections already open keep
 * theirs, so certificates can be replaced on reload. */
typedef struct ssl_ctx_st SSL_CTX;
void http_server_set_tls(struct http_server *srv, size_t i, SSL_CTX *ctx);
/* Stop accepting, close idle connections, and close the others once their
 * current response is done. */
void http_server_drain(struct http_server *srv);
size_t http_server_connections(const struct http_server *srv);
size_t http_server_active(const struct http_server *srv); /* requests being handled */
/* accept() calls that failed (out of descriptors or memory) since the server started. */
uint64_t http_server_accept_errors(const struct http_server *srv);
void http_server_free(struct http_server *srv);

/* Case-insensitive lookup; NULL when absent. */
const char *http_request_header(const struct http_request *req, const char *lower_name);

/* The client went away while the handler owned the request: cb runs once, from
 * the event loop. After it, replies are discarded; the handler must still
 * finish the request (usually with http_request_abandon()). */
void http_request_on_abort(struct http_request *req, void (*cb)(void *arg), void *arg);
bool http_request_aborted(const struct http_request *req);
void http_request_abandon(struct http_request *req);

/* Headers added before the reply starts. name and value are copied. */
void http_response_header(struct http_request *req, const char *name, const char *value);
/* Whole header lines ("Name: value\r\n" …, len bytes) that the caller wrote from fixed
 * names and digits: added as they are, without http_response_header()'s byte checks. */
void http_response_header_lines(struct http_request *req, const char *lines, size_t len);
/* RFC 9110 byte classes, for bytes from elsewhere: the first byte in [p, e) that is not a
 * tchar (a header name byte), or e; the first a field value may not hold (a control byte but
 * HTAB, or DEL; SP and obs-text are lawful), or e. */
const char *http_token_end(const char *p, const char *e);
const char *http_field_value_end(const char *p, const char *e);
/* v in decimal at o (at most 20 bytes, not terminated); returns the length. */
size_t http_put_decimal(char *o, uint64_t v);

/* A whole response with Content-Length. Finishes the request. */
void http_reply(struct http_request *req, int status, const char *content_type, const char *body,
                size_t len);
/* An OpenAI-shaped error: {"error":{"message","type","param":null,"code"}}. Finishes.
 * Returns the body's length. */
size_t http_reply_error(struct http_request *req, int status, const char *type, const char *code,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* A streamed response (chunked on HTTP/1.1). */
void http_reply_start(struct http_request *req, int status, const char *content_type);
void http_reply_chunk(struct http_request *req, const void *data, size_t len);
/* One chunk of everything in buf (moved, not copied; buf is left empty). */
void http_reply_chunk_buffer(struct http_request *req, struct evbuffer *buf);
void http_reply_end(struct http_request *req); /* finishes */

/* Bytes queued for the client and not yet written to the socket. */
size_t http_reply_pending(const struct http_request *req);
/* cb runs once, from the loop, when everything queued has been written. */
void http_reply_on_drain(struct http_request *req, void (*cb)(void *arg), void *arg);

const char *http_status_text(int status);

/* Append s to buf as the inside of a JSON string (no quotes). */
struct evbuffer;
void http_json_escape(struct evbuffer *buf, const char *s, size_t len);

uint64_t http_now_us(void); /* monotonic microseconds */

/* ---------------------------------------------------------------------------
 * The parsers: pure functions over bytes with a length (never C strings), used
 * by the server and exported for the unit tests and the fuzz target.
 * ------------------------------------------------------------------------- */

enum http_head_result {
	HTTP_HEAD_OK,
	HTTP_HEAD_INCOMPLETE,   /* the head's end (an empty line) is not in the bytes yet */
	HTTP_HEAD_BAD,          /* 400 */
	HTTP_HEAD_URI_TOO_LONG, /* 414: request line over HTTP_MAX_REQUEST_LINE */
	HTTP_HEAD_TOO_LARGE,    /* 431: more than HTTP_MAX_HEADERS fields */
};

/* The HTTP status for a failed parse (400, 414, 431). */
int http_head_status(enum http_head_result res);

/*
 * Finding the end of a head in bytes that arrive in pieces: feed each new piece
 * (the bytes following those already fed); the scan resumes where it stopped, so
 * a head trickled byte by byte costs linear time. OK: *head_len is the head's
 * length, counted from the first byte fed. BAD: a bare LF. URI_TOO_LONG: the
 * request line is over HTTP_MAX_REQUEST_LINE, ended or not. Start zeroed.
 */
struct http_head_scan {
	size_t pos;        /* bytes scanned */
	size_t line_start; /* offset of the current line */
	size_t lines;      /* complete lines so far */
	char prev;         /* the last byte scanned */
};
enum http_head_result http_head_scan(struct http_head_scan *s, const char *p, size_t len,
                                     size_t *head_len);

/*
 * Parse one request head (request line, header fields, the empty line) in
 * buf[0, len), in place: names are lower-cased and every string of out is
 * terminated inside buf. Refused (RFC 9112): a NUL, a bare CR or LF, obs-fold,
 * whitespace before a colon, a header name that is not a token, a control byte
 * in the target or a value, a repeated Transfer-Encoding or one that is not
 * exactly "chunked", Transfer-Encoding with Content-Length or on HTTP/1.0, a
 * Content-Length that is not digits, two Content-Length fields that differ
 * (identical ones are folded), HTTP/1.1 without exactly one Host. *why gets a
 * short static reason, never input bytes. out's other fields are left alone.
 */
enum http_head_result http_parse_head(char *buf, size_t len, struct http_request *out,
                                      const char **why);

enum http_chunked_result {
	HTTP_CHUNKED_MORE,              /* everything given was taken: feed what follows */
	HTTP_CHUNKED_DONE,              /* the body and its trailer section are complete */
	HTTP_CHUNKED_BAD,               /* 400 */
	HTTP_CHUNKED_TOO_LARGE,         /* 413: the body would pass max_body */
	HTTP_CHUNKED_TRAILER_TOO_LARGE, /* 431: the trailer section passes max_trailer */
};

/* A chunked body decoder. Zero it, set the two limits, feed it. */
struct http_chunked {
	uint64_t max_body;    /* data bytes allowed in all */
	uint64_t max_trailer; /* bytes allowed in the trailer section */
	uint64_t total;       /* data bytes so far */
	uint64_t size;        /* the chunk being read: its size, then what is left of it */
	uint64_t line_len;    /* bytes of the size line, or of the trailer section */
	int state;
	unsigned digits;
};

/*
 * Decode framing from p[0, len). It stops at the end of the input, at chunk data, at the
 * end of the body, or at an error. *used: framing bytes taken from p. *data: the number of
 * body bytes at p + *used, which the caller takes (they count as consumed); the next call
 * starts at p + *used + *data. *why: a short static reason for BAD / TOO_LARGE.
 * Sizes are hex digits only (no sign, "0x" or blanks), at most HTTP_MAX_CHUNK_DIGITS;
 * chunk extensions after ';' are skipped.
 */
enum http_chunked_result http_chunked_feed(struct http_chunked *ch, const char *p, size_t len,
                                           size_t *used, size_t *data, const char **why);

#endif
