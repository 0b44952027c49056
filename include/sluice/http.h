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

#define HTTP_MAX_HEADERS 100

struct http_header {
	const char *name; /* lower-cased */
	const char *value;
};

/*
 * One parsed request. The strings point into the connection's buffers and stay
 * valid until the request is finished (replied to, or abandoned after an abort).
 */
struct http_request {
	const char *method;
	const char *path;  /* without the query string */
	const char *query; /* NULL when absent */
	int minor;         /* HTTP/1.minor */
	struct http_header headers[HTTP_MAX_HEADERS];
	size_t n_headers;
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

struct http_server *http_server_new(struct event_base *base, const int *fds, size_t n_fds,
                                    const struct http_limits *limits, http_handler_fn handler,
                                    void *arg);
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

#endif
