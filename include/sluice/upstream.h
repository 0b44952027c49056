/* upstream.h — HTTP(S) transfers to model instances: libcurl multi handles on a worker's event loop. */
#ifndef SLUICE_UPSTREAM_H
#define SLUICE_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>

struct event_base;
struct event;
struct evbuffer;
struct upstream;
struct upstream_shard;

/* Request header lines a transfer holds without allocating (upstream_xfer_header): nodes,
 * and bytes for the copied lines. More, or longer, lines are allocated. */
#define UPSTREAM_HEADER_NODES 8
#define UPSTREAM_HEADER_BYTES 384

enum upstream_result {
	UPSTREAM_OK,
	UPSTREAM_CONNECT_ERROR, /* refused, unreachable, DNS, TLS handshake */
	UPSTREAM_TIMEOUT,       /* connect, first_byte, idle or total: see detail */
	UPSTREAM_ERROR,         /* reset, truncated, protocol error */
	UPSTREAM_ABORTED,       /* the owner stopped it from on_head/on_body */
};

/* Returned by on_body to hold the transfer until upstream_resume(). */
#define UPSTREAM_PAUSE CURL_WRITEFUNC_PAUSE

struct upstream_ops {
	/* The response head is complete. Return false to abort the transfer. */
	bool (*on_head)(void *arg, long status);
	/* Body bytes: return len when consumed, UPSTREAM_PAUSE to be called again
	 * with the same bytes after upstream_resume(), 0 to abort. */
	size_t (*on_body)(void *arg, const char *data, size_t len);
	/* The transfer is over and its handle is back in the pool. Called from the
	 * event loop, never from inside libcurl: the owner may start another. */
	void (*on_done)(void *arg, enum upstream_result res, const char *detail);
};

struct upstream_timeouts {
	uint64_t connect, first_byte, idle, total; /* ms */
};

/*
 * One transfer, embedded in its owner (the request). Fields marked "out" are
 * filled while it runs; the rest is private.
 */
struct upstream_xfer {
	/* out */
	long status;
	bool head_done;
	bool body_started;
	char content_type[128];
	struct evbuffer *headers; /* passed-through response header lines "Name: value\r\n" */
	uint64_t start_us, head_us, first_body_us;
	/* private */
	struct upstream *up;
	struct upstream_shard *shard; /* the multi handle carrying it, while running */
	CURL *easy;
	struct curl_slist *req_headers; /* the list handed to libcurl: nodes below, or allocated */
	struct curl_slist *req_tail;
	struct curl_slist hdr_node[UPSTREAM_HEADER_NODES];
	size_t n_hdr_nodes;
	char hdr_bytes[UPSTREAM_HEADER_BYTES];
	size_t hdr_used;
	struct upstream_url *url; /* borrowed for the next start; held while running */
	const struct upstream_ops *ops;
	void *arg;
	struct event *timer;
	struct upstream_timeouts to;
	uint64_t last_activity_us;
	bool running;
	bool paused;
	char errbuf[CURL_ERROR_SIZE];
};

struct upstream *upstream_new(struct event_base *base);
/* Cap on cached connections (sum of the instances' keepalive pools). */
void upstream_set_maxconnects(struct upstream *up, long n);
void upstream_free(struct upstream *up);
/* An empty evbuffer from the worker's pool of transfer buffers, else a new one (NULL when out
 * of memory); and one handed back: drained, kept while the pool has room, else freed. */
struct evbuffer *upstream_buf_get(struct upstream *up);
void upstream_buf_put(struct upstream *up, struct evbuffer *b);

void upstream_xfer_init(struct upstream_xfer *x, struct upstream *up, const struct upstream_ops *ops,
                        void *arg);
/* Add a request header ("Name: value"), copied; before upstream_xfer_start. */
bool upstream_xfer_header(struct upstream_xfer *x, const char *line);
/* The same without the copy: line must outlive the transfer (a literal, or a line formatted
 * once per configuration snapshot). */
bool upstream_xfer_header_static(struct upstream_xfer *x, const char *line);
/* Send method (NULL: POST) with body (not copied: it must outlive the transfer;
 * NULL: none) to url. A connection idle longer than keepalive_idle_s is not reused; with
 * keepalive_idle_s < 0 (an instance's keepalive.pool: 0) it is closed after the transfer. */
bool upstream_xfer_start(struct upstream_xfer *x, const char *method, const char *url,
                         const char *body, size_t len, const struct upstream_timeouts *to,
                         bool tls_verify, long keepalive_idle_s);
/* Use a pre-parsed URL for the next upstream_xfer_start (parsing it costs ~10%
 * of a small request); NULL: parse the url string. u must belong to this
 * thread; the transfer holds it until it ends, so u may be released meanwhile. */
void upstream_xfer_curlu(struct upstream_xfer *x, struct upstream_url *u);
void upstream_xfer_resume(struct upstream_xfer *x);
/* Stop a running transfer; on_done is not called. Not from inside on_head/on_body. */
void upstream_xfer_cancel(struct upstream_xfer *x);
/* Release what the transfer holds (after on_done or cancel); it can be started again. Its
 * response header buffer and timer go back to the upstream's pools, so a fallback attempt
 * or the next request reuses them instead of allocating. */
void upstream_xfer_cleanup(struct upstream_xfer *x);

/* The value of the first passed-through response header called name (any case),
 * as bytes (not NUL-terminated), surrounding whitespace removed: valid until the
 * transfer is started again or cleaned up. False when there is none. */
bool upstream_xfer_find_header(const struct upstream_xfer *x, const char *name, const char **val,
                               size_t *val_len);

const char *upstream_result_name(enum upstream_result r);

/*
 * A pre-parsed upstream URL (a CURLU), shared by the transfers of one thread.
 * libcurl reads the handle again after the start (to reconnect, on a retry over
 * a dead reused connection), so it must outlive every transfer started with it:
 * each running transfer counts as one holder, and upstream_url_release only
 * marks it released; the last of the owner and the transfers frees it. The
 * count is a plain integer: everything happens on the owning thread.
 */
struct upstream_url;
/* NULL when url does not parse (or out of memory): use the url string instead. */
struct upstream_url *upstream_url_new(const char *url);
/* The owner's reference; NULL is ignored. */
void upstream_url_release(struct upstream_url *u);

#endif
