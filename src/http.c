/* http.c — the client-facing HTTP/1.1 server: parsing, keep-alive, limits, streaming replies.
 *
 * Why not evhttp: libevent 2.1's evhttp answers its own errors (413, malformed
 * requests) with HTML pages that no OpenAI SDK can read, cannot count or cap
 * connections, stops reading the socket while a request is handled (so a client
 * that leaves is only noticed at the next write), and uses one timeout for
 * reading a request, for keep-alive idling and for gaps in a streamed response
 * (libevent issue 715: it cuts long pauses between tokens). This file is the
 * small server that does what a gateway needs and nothing else.
 *
 * Life of a connection: READ_HEAD → READ_BODY/READ_CHUNKED → HANDLING (the
 * handler owns the request; the socket is still watched for EOF) → back to
 * READ_HEAD when the reply is finished and the connection is kept alive.
 *
 * I/O: a TLS connection goes through libevent's OpenSSL bufferevent. A plain one has
 * its own two events instead, because a socket bufferevent costs syscalls per request
 * that a proxy does not need (issue 10): it asks the kernel how much is readable
 * (ioctl FIONREAD) before every read, and it adds and removes write interest around
 * every reply (two epoll_ctl). Here the read event stays registered for the
 * connection's life and reads into a buffer of known size; a reply is written from the
 * loop as soon as the current callback is done (one writev for head and body, or for
 * all the chunks of one upstream read), and write interest is registered only when
 * the kernel did not take everything.
 */
#include "sluice/http.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <errno.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/ssl.h>
#include <event2/event.h>
#include <event2/listener.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "sluice/log.h"

enum conn_state {
	CONN_READ_HEAD,
	CONN_READ_BODY,
	CONN_READ_CHUNKED,
	CONN_HANDLING,
	CONN_CLOSING, /* flushing the last response (then lingering, maybe), then close */
};

/* Response header lines and the reply head are put together in a stack buffer this big. */
#define HTTP_HEADER_LINE_BUF 512
/* A reply chunk up to about this size is framed on the stack and added in one call. */
#define HTTP_CHUNK_FRAME_BUF 1024
/* One read takes at most this much (a whole typical request); a larger one takes more reads. */
#define HTTP_READ_SIZE 4096

struct http_conn {
	struct http_server *srv;
	bool open;               /* the socket is open; false once it is closed */
	evutil_socket_t fd;
	struct bufferevent *bev; /* TLS: the connection; plain: NULL */
	struct event *rev, *wev; /* plain: read (kept registered), write (added while output waits) */
	struct evbuffer *in, *out; /* plain: ours; TLS: the bufferevent's */
	bool reading;            /* plain: rev is added */
	bool writing;            /* plain: wev is added */
	bool flush_queued;       /* plain: wev made active, to write from the loop */
	bool process_queued;     /* plain: rev made active, to handle input already read */
	struct event *timer;
	enum conn_state state;
	bool keepalive;
	bool handler_owns;  /* the handler has the request and has not finished it */
	bool reply_started;
	bool chunked;
	bool aborted;
	bool tls;
	bool linger;        /* input was left unread: linger after the last reply (conn_end) */
	bool lingering;     /* CLOSING: the reply is out, our side shut; waiting for the peer */
	bool request_timer; /* the client_timeout timer runs for this request */
	bool no_body;       /* the reply started has no body (HEAD, 204, 304): chunks are dropped */
	struct http_head_scan scan; /* READ_HEAD: how far the head's end was searched for */
	char *head;         /* the request head, parsed in place */
	char *body;
	size_t body_len;
	size_t body_need;   /* READ_BODY: bytes still expected */
	struct evbuffer *chunks; /* READ_CHUNKED: body so far */
	struct http_chunked chunk;    /* READ_CHUNKED: the decoder */
	struct evbuffer *out_headers; /* extra response headers */
	void (*abort_cb)(void *);
	void *abort_arg;
	void (*drain_cb)(void *);
	void *drain_arg;
	struct http_request req;
	char client_ip[INET6_ADDRSTRLEN];
	TAILQ_ENTRY(http_conn) link;
};

TAILQ_HEAD(conn_list, http_conn);

struct http_listener {
	struct http_server *srv;
	struct evconnlistener *l;
	SSL_CTX *tls;        /* one reference, or NULL */
	struct event *retry; /* re-enables l after a failed accept() (accept_error_cb) */
	bool paused;         /* l is disabled after a failed accept() */
};

struct http_server {
	struct event_base *base;
	struct http_listener *listeners;
	size_t n_listeners;
	struct http_limits limits;
	http_handler_fn handler;
	http_head_check_fn head_check; /* NULL: none */
	void *arg;
	struct conn_list conns;
	/* Written by the owning worker only; read by the main thread for status and
	 * gauges, hence relaxed atomics (no ordering is needed, just no torn reads). */
	atomic_size_t n_conns;
	atomic_size_t n_active;
	bool draining;
	uint64_t last_full_warn_us;
	/* accept() failures (out of descriptors or memory): counted (a metric) and logged
	 * once per episode, at most every HTTP_ACCEPT_WARN_MS; an episode ends with the next
	 * accepted connection. */
	atomic_uint_least64_t accept_errors;
	bool accept_failing;        /* in an episode */
	bool accept_warned;         /* this episode was logged */
	uint64_t accept_warn_us;    /* when an episode was last logged */
	uint64_t accept_fail_count; /* failures in this episode */
};

static void tls_read_cb(struct bufferevent *bev, void *arg);
static void tls_write_cb(struct bufferevent *bev, void *arg);
static void tls_event_cb(struct bufferevent *bev, short what, void *arg);
static void plain_read_cb(evutil_socket_t fd, short what, void *arg);
static void plain_write_cb(evutil_socket_t fd, short what, void *arg);
static void conn_event(struct http_conn *c, short what);
static void conn_write_done(struct http_conn *c);
static void conn_flush(struct http_conn *c);
static void conn_read_enable(struct http_conn *c, bool on);
static void conn_queue_process(struct http_conn *c);
static void conn_timer_cb(evutil_socket_t fd, short what, void *arg);
static void conn_process(struct http_conn *c);
static void conn_free(struct http_conn *c);
static void conn_error(struct http_conn *c, int status, const char *code, const char *msg);
static void conn_close_when_flushed(struct http_conn *c);
static void conn_end(struct http_conn *c);

uint64_t http_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static struct timeval ms_to_tv(uint64_t ms)
{
	struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
	return tv;
}

static void conn_arm_timer(struct http_conn *c, uint64_t ms)
{
	struct timeval tv = ms_to_tv(ms);
	event_add(c->timer, &tv);
}

/* ---------------------------------------------------------------- accept */

/* How long a listener rests after a failed accept() before it tries again, unless a
 * connection closes first (which gives a descriptor back). */
#define HTTP_ACCEPT_RETRY_MS 100
/* Episodes that follow each other (a freed descriptor taken by one connection, the next
 * accept failing again) are logged at most this often. */
#define HTTP_ACCEPT_WARN_MS 10000

static void listener_resume(struct http_listener *hl)
{
	if (!hl->paused)
		return;
	hl->paused = false;
	event_del(hl->retry);
	evconnlistener_enable(hl->l);
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	listener_resume(arg);
}

/*
 * accept() failed with an error that waiting cures (EMFILE, ENFILE, ENOBUFS, ENOMEM; libevent
 * retries EAGAIN, EINTR and ECONNABORTED itself). The pending connection is still in the
 * backlog and the socket stays readable, so a level-triggered listener would be called again
 * at once, forever: it rests instead, until a connection of ours closes or
 * HTTP_ACCEPT_RETRY_MS pass. Connections already open are served meanwhile.
 */
static void accept_error_cb(struct evconnlistener *l, void *arg)
{
	struct http_listener *hl = arg;
	struct http_server *srv = hl->srv;
	int err = EVUTIL_SOCKET_ERROR();
	struct timeval tv = ms_to_tv(HTTP_ACCEPT_RETRY_MS);

	atomic_fetch_add_explicit(&srv->accept_errors, 1, memory_order_relaxed);
	srv->accept_fail_count++;
	if (!srv->accept_failing) {
		uint64_t now = http_now_us();
		srv->accept_failing = true;
		srv->accept_warned = srv->accept_warn_us == 0 ||
		                     now - srv->accept_warn_us >= HTTP_ACCEPT_WARN_MS * 1000u;
		if (srv->accept_warned) {
			srv->accept_warn_us = now;
			log_warn("accept() failed: %s; new connections wait (retried every %d ms "
			         "and whenever a connection closes)",
			         evutil_socket_error_to_string(err), HTTP_ACCEPT_RETRY_MS);
		}
	}
	evconnlistener_disable(l);
	hl->paused = true;
	event_add(hl->retry, &tv);
}

/* A connection was accepted: a failing episode, if any, is over. */
static void accept_recovered(struct http_server *srv)
{
	if (!srv->accept_failing)
		return;
	if (srv->accept_warned)
		log_info("accepting connections again after %" PRIu64 " failed accept() calls in %" PRIu64
		         " ms",
		         srv->accept_fail_count, (http_now_us() - srv->accept_warn_us) / 1000);
	srv->accept_failing = false;
	srv->accept_fail_count = 0;
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen,
                      void *arg)
{
	struct http_listener *hl = arg;
	struct http_server *srv = hl->srv;
	struct http_conn *c;
	int one = 1;

	(void)l;
	accept_recovered(srv);
	if (srv->draining || (srv->limits.max_connections > 0 &&
	                      atomic_load_explicit(&srv->n_conns, memory_order_relaxed) >=
	                              (size_t)srv->limits.max_connections)) {
		uint64_t now = http_now_us();
		if (!srv->draining && now - srv->last_full_warn_us > 1000000) {
			log_warn("max_connections (%d) reached on this worker: refusing connections",
			         srv->limits.max_connections);
			srv->last_full_warn_us = now;
		}
		close(fd);
		return;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		close(fd);
		return;
	}
	c->srv = srv;
	c->fd = fd;
	c->tls = hl->tls != NULL;
	if (hl->tls) {
		SSL *ssl = SSL_new(hl->tls);
		c->bev = ssl ? bufferevent_openssl_socket_new(srv->base, fd, ssl,
		                                              BUFFEREVENT_SSL_ACCEPTING,
		                                              BEV_OPT_CLOSE_ON_FREE)
		             : NULL;
		if (c->bev == NULL && ssl)
			SSL_free(ssl);
		if (c->bev) {
			/* A peer that just closes is a normal end, not an error. */
			bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
			c->in = bufferevent_get_input(c->bev);
			c->out = bufferevent_get_output(c->bev);
		}
	} else {
		c->in = evbuffer_new();
		c->out = evbuffer_new();
		c->rev = event_new(srv->base, fd, EV_READ | EV_PERSIST, plain_read_cb, c);
		c->wev = event_new(srv->base, fd, EV_WRITE | EV_PERSIST, plain_write_cb, c);
	}
	c->timer = evtimer_new(srv->base, conn_timer_cb, c);
	if ((c->tls ? c->bev == NULL : c->in == NULL || c->out == NULL || c->rev == NULL ||
	                                       c->wev == NULL) ||
	    c->timer == NULL) {
		if (c->bev) {
			bufferevent_free(c->bev);
		} else {
			close(fd);
			if (c->in)
				evbuffer_free(c->in);
			if (c->out)
				evbuffer_free(c->out);
			if (c->rev)
				event_free(c->rev);
			if (c->wev)
				event_free(c->wev);
		}
		if (c->timer)
			event_free(c->timer);
		free(c);
		return;
	}
	c->open = true;
	if (sa->sa_family == AF_INET)
		inet_ntop(AF_INET, &((struct sockaddr_in *)sa)->sin_addr, c->client_ip,
		          sizeof(c->client_ip));
	else if (sa->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((struct sockaddr_in6 *)sa)->sin6_addr, c->client_ip,
		          sizeof(c->client_ip));
	(void)salen;
	c->state = CONN_READ_HEAD;
	c->keepalive = true;
	TAILQ_INSERT_TAIL(&srv->conns, c, link);
	atomic_fetch_add_explicit(&srv->n_conns, 1, memory_order_relaxed);

	if (c->bev) {
		struct timeval wtv = ms_to_tv(srv->limits.write_timeout);
		bufferevent_set_timeouts(c->bev, NULL, &wtv);
		bufferevent_setcb(c->bev, tls_read_cb, tls_write_cb, tls_event_cb, c);
		bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	} else {
		event_add(c->rev, NULL);
		c->reading = true;
	}
	/* A new connection gets client_timeout to send its first request. */
	conn_arm_timer(c, srv->limits.client_timeout);
}

struct http_server *http_server_new(struct event_base *base, const int *fds, size_t n_fds,
                                    const struct http_limits *limits, http_handler_fn handler,
                                    void *arg)
{
	struct http_server *srv = calloc(1, sizeof(*srv));
	if (srv == NULL)
		return NULL;
	srv->base = base;
	srv->limits = *limits;
	srv->handler = handler;
	srv->arg = arg;
	TAILQ_INIT(&srv->conns);
	srv->listeners = calloc(n_fds ? n_fds : 1, sizeof(*srv->listeners));
	if (srv->listeners == NULL)
		goto fail;
	for (size_t i = 0; i < n_fds; i++) {
		struct http_listener *hl = &srv->listeners[i];
		hl->srv = srv;
		hl->retry = evtimer_new(base, accept_retry_cb, hl);
		hl->l = hl->retry ? evconnlistener_new(base, accept_cb, hl, LEV_OPT_CLOSE_ON_FREE, -1,
		                                       fds[i])
		                  : NULL;
		if (hl->l == NULL) {
			if (hl->retry)
				event_free(hl->retry);
			goto fail;
		}
		evconnlistener_set_error_cb(hl->l, accept_error_cb);
		srv->n_listeners++;
	}
	return srv;
fail:
	http_server_free(srv);
	return NULL;
}

void http_server_set_head_check(struct http_server *srv, http_head_check_fn check)
{
	srv->head_check = check;
}

void http_server_set_limits(struct http_server *srv, const struct http_limits *limits)
{
	srv->limits = *limits;
}

void http_server_set_tls(struct http_server *srv, size_t i, SSL_CTX *ctx)
{
	if (i >= srv->n_listeners)
		return;
	if (ctx)
		SSL_CTX_up_ref(ctx);
	if (srv->listeners[i].tls)
		SSL_CTX_free(srv->listeners[i].tls);
	srv->listeners[i].tls = ctx;
}

static void listeners_close(struct http_server *srv)
{
	for (size_t i = 0; i < srv->n_listeners; i++) {
		evconnlistener_free(srv->listeners[i].l);
		event_free(srv->listeners[i].retry);
		srv->listeners[i].paused = false;
		if (srv->listeners[i].tls)
			SSL_CTX_free(srv->listeners[i].tls);
	}
	srv->n_listeners = 0;
}

size_t http_server_connections(const struct http_server *srv)
{
	return atomic_load_explicit(&((struct http_server *)srv)->n_conns, memory_order_relaxed);
}

uint64_t http_server_accept_errors(const struct http_server *srv)
{
	return atomic_load_explicit(&((struct http_server *)srv)->accept_errors,
	                            memory_order_relaxed);
}

size_t http_server_active(const struct http_server *srv)
{
	return atomic_load_explicit(&((struct http_server *)srv)->n_active, memory_order_relaxed);
}

void http_server_drain(struct http_server *srv)
{
	struct http_conn *c, *next;

	srv->draining = true;
	listeners_close(srv);
	/* Idle connections go now, once the reply they may still be sending has
	 * left; busy ones close after their response. */
	for (c = TAILQ_FIRST(&srv->conns); c != NULL; c = next) {
		next = TAILQ_NEXT(c, link);
		c->keepalive = false;
		if (c->state != CONN_READ_HEAD || c->request_timer)
			continue;
		size_t queued = c->open ? evbuffer_get_length(c->out) : 0;
		if (queued > 0)
			log_debug("drain: closing %s once %zu queued bytes are sent", c->client_ip,
			          queued);
		conn_close_when_flushed(c);
	}
}

void http_server_free(struct http_server *srv)
{
	struct http_conn *c;

	if (srv == NULL)
		return;
	if (srv->listeners)
		listeners_close(srv);
	free(srv->listeners);
	/* Connections still owned by a handler are the handler's to finish; the
	 * caller frees the server only when no request is active. */
	while ((c = TAILQ_FIRST(&srv->conns)) != NULL)
		conn_free(c);
	free(srv);
}

/* ---------------------------------------------------------------- parsing
 *
 * Pure functions over (bytes, length): nothing here treats received bytes as a
 * C string, since a NUL may sit anywhere in them. What they hand on (method,
 * path, header names and values) is terminated in place and holds no NUL, CR
 * or LF by construction.
 */

/* RFC 9110 §5.6.2: tchar. */
static bool is_tchar(unsigned char ch)
{
	/* A bit per byte: digits, letters and "!#$%&'*+-.^_`|~" (every header name byte of
	 * every request goes through here). */
	static const uint32_t tchar[8] = {0, 0x03ff6cfa, 0xc7fffffe, 0x57ffffff};

	return tchar[ch >> 5] >> (ch & 31) & 1;
}

const char *http_token_end(const char *p, const char *e)
{
	while (p < e && is_tchar((unsigned char)*p))
		p++;
	return p;
}

/* A header name byte lower-cased, or 0 for a byte that is not a tchar (0x00–0x1f and
 * 0x80–0xff are all 0): one load per byte of every header name. */
static const unsigned char tchar_lower[256] = {
        /* 0x20 */ [0x20] = 0x00, 0x21, 0x00, 0x23, 0x24, 0x25, 0x26, 0x27,
        /* 0x28 */ 0x00, 0x00, 0x2a, 0x2b, 0x00, 0x2d, 0x2e, 0x00,
        /* 0x30 */ 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37,
        /* 0x38 */ 0x38, 0x39, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        /* 0x40 */ 0x00, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67,
        /* 0x48 */ 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f,
        /* 0x50 */ 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77,
        /* 0x58 */ 0x78, 0x79, 0x7a, 0x00, 0x00, 0x00, 0x5e, 0x5f,
        /* 0x60 */ 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67,
        /* 0x68 */ 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f,
        /* 0x70 */ 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77,
        /* 0x78 */ 0x78, 0x79, 0x7a, 0x00, 0x7c, 0x00, 0x7e, 0x00,
};

/* A byte a field value may hold (RFC 9110 §5.5: VCHAR, SP, HTAB, obs-text). */
static bool is_field_byte(unsigned char ch)
{
	return ch == '\t' || (ch >= 0x20 && ch != 0x7f);
}

/* The first byte in [b, e) a field value may not hold, or e. Sixteen at a time where SSE2 is
 * there: as signed bytes, obs-text is negative, so a bad byte is one in [0, 0x20) but HTAB,
 * or DEL. */
const char *http_field_value_end(const char *b, const char *e)
{
#if defined(__SSE2__)
	const __m128i sp = _mm_set1_epi8(0x20), neg = _mm_set1_epi8(-1), tab = _mm_set1_epi8('\t'),
	              del = _mm_set1_epi8(0x7f);
	while (e - b >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)b);
		__m128i ctl = _mm_and_si128(_mm_cmplt_epi8(v, sp), _mm_cmpgt_epi8(v, neg));
		__m128i bad = _mm_or_si128(_mm_andnot_si128(_mm_cmpeq_epi8(v, tab), ctl),
		                           _mm_cmpeq_epi8(v, del));
		unsigned m = (unsigned)_mm_movemask_epi8(bad);
		if (m != 0)
			return b + __builtin_ctz(m);
		b += 16;
	}
#endif
	while (b < e && is_field_byte((unsigned char)*b))
		b++;
	return b;
}

static bool is_ows(char ch)
{
	return ch == ' ' || ch == '\t';
}

int http_head_status(enum http_head_result res)
{
	switch (res) {
	case HTTP_HEAD_URI_TOO_LONG:
		return 414;
	case HTTP_HEAD_TOO_LARGE:
		return 431;
	case HTTP_HEAD_OK:
		return 200;
	default:
		return 400;
	}
}

enum http_head_result http_head_scan(struct http_head_scan *s, const char *p, size_t len,
                                     size_t *head_len)
{
	const char *q = p, *end = p + len, *lf;
	size_t base = s->pos;

	while (q < end && (lf = memchr(q, '\n', (size_t)(end - q))) != NULL) {
		size_t at = base + (size_t)(lf - p);
		char before = lf > p ? lf[-1] : s->prev;
		if (at == 0 || before != '\r')
			return HTTP_HEAD_BAD;
		size_t line_len = at - 1 - s->line_start;
		if (s->lines == 0 && line_len > HTTP_MAX_REQUEST_LINE)
			return HTTP_HEAD_URI_TOO_LONG;
		s->lines++;
		s->line_start = at + 1;
		q = lf + 1;
		if (line_len == 0 && s->lines > 1) {
			s->pos = at + 1;
			s->prev = '\n';
			*head_len = at + 1;
			return HTTP_HEAD_OK;
		}
	}
	s->pos = base + len;
	if (len > 0)
		s->prev = end[-1];
	/* An unended request line: its CR may be the byte after the limit. */
	if (s->lines == 0 && s->pos - s->line_start > HTTP_MAX_REQUEST_LINE + 1)
		return HTTP_HEAD_URI_TOO_LONG;
	return HTTP_HEAD_INCOMPLETE;
}

/* The line at *p, ended by CRLF before end: [*p, *cr). Moves *p past the LF. */
static enum http_head_result next_line(char **p, char *end, char **cr, const char **why)
{
	char *lf = memchr(*p, '\n', (size_t)(end - *p));

	if (lf == NULL) {
		*why = "request head not ended by an empty line";
		return HTTP_HEAD_INCOMPLETE;
	}
	if (lf == *p || lf[-1] != '\r') {
		*why = "bare LF in the request head";
		return HTTP_HEAD_BAD;
	}
	*cr = lf - 1;
	return HTTP_HEAD_OK;
}

static enum http_head_result parse_request_line(char *p, char *cr, struct http_request *r,
                                                const char **why)
{
	char *m = p, *t, *v;

	if ((size_t)(cr - p) > HTTP_MAX_REQUEST_LINE) {
		*why = "request line too long";
		return HTTP_HEAD_URI_TOO_LONG;
	}
	while (m < cr && is_tchar((unsigned char)*m))
		m++;
	if (m == p || m == cr || *m != ' ') {
		*why = "malformed method";
		return HTTP_HEAD_BAD;
	}
	t = m + 1;
	/* Visible ASCII only: a control byte here (LF, ESC...) would reach the logs. */
	for (v = t; v < cr && (unsigned char)*v > 0x20 && (unsigned char)*v < 0x7f; v++)
		;
	if (v == t || t[0] != '/') {
		*why = "malformed request target";
		return HTTP_HEAD_BAD;
	}
	if (v == cr || *v != ' ') {
		*why = "invalid byte in the request target";
		return HTTP_HEAD_BAD;
	}
	char *ver = v + 1;
	if (cr - ver != 8 || memcmp(ver, "HTTP/1.", 7) != 0 || ver[7] < '0' || ver[7] > '9') {
		*why = "unsupported HTTP version";
		return HTTP_HEAD_BAD;
	}
	*m = '\0';
	*v = '\0';
	*cr = '\0';
	r->method = p;
	r->minor = ver[7] - '0';
	char *q = memchr(t, '?', (size_t)(v - t));
	if (q != NULL) {
		*q = '\0';
		r->query = q + 1;
	}
	r->path = t;
	return HTTP_HEAD_OK;
}

/* One field line [p, cr): name lower-cased, value without its surrounding blanks. */
static enum http_head_result parse_field(char *p, char *cr, struct http_request *r,
                                         const char **why)
{
	char *n = p;

	if (is_ows(*p)) {
		*why = "obsolete line folding in the request head";
		return HTTP_HEAD_BAD;
	}
	for (unsigned char lc; n < cr && (lc = tchar_lower[(unsigned char)*n]) != 0; n++)
		*n = (char)lc;
	if (n == cr || *n != ':') {
		char *w = n;
		while (w < cr && is_ows(*w))
			w++;
		*why = w > n && w < cr && *w == ':' ? "whitespace before a header colon"
		                                    : "malformed header name";
		return HTTP_HEAD_BAD;
	}
	if (n == p) {
		*why = "empty header name";
		return HTTP_HEAD_BAD;
	}
	char *v = n + 1, *e = cr;
	while (v < e && is_ows(*v))
		v++;
	while (e > v && is_ows(e[-1]))
		e--;
	if (http_field_value_end(v, e) != e) {
		*why = "invalid byte in a header value";
		return HTTP_HEAD_BAD;
	}
	if (r->n_headers == HTTP_MAX_HEADERS) {
		*why = "too many header fields";
		return HTTP_HEAD_TOO_LARGE;
	}
	*n = '\0';
	*e = '\0';
	r->headers[r->n_headers].name = p;
	r->headers[r->n_headers].value = v;
	r->n_headers++;
	return HTTP_HEAD_OK;
}

/* 1*DIGIT, saturating at UINT64_MAX (which no max_body_size admits). */
static bool parse_decimal(const char *s, uint64_t *out)
{
	uint64_t n = 0;

	if (*s == '\0')
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return false;
		unsigned d = (unsigned)(*s - '0');
		n = n > (UINT64_MAX - d) / 10 ? UINT64_MAX : n * 10 + d;
	}
	*out = n;
	return true;
}

/* RFC 9112 §6.1–6.3 and §3.2: what frames the body, and Host. */
static enum http_head_result check_framing(struct http_request *r, const char **why)
{
	const char *cl = NULL, *te = NULL;
	size_t n_host = 0;

	for (size_t i = 0; i < r->n_headers; i++) {
		const char *name = r->headers[i].name, *value = r->headers[i].value;
		if (name[0] != 'c' && name[0] != 't' && name[0] != 'h')
			continue; /* none of the three: no compare */
		if (strcmp(name, "content-length") == 0) {
			/* Repeated with the same digits (a client or proxy adding it twice) is
			 * one value; different ones are a smuggling attempt. A list in one
			 * field ("5, 5") has no honest sender and is refused as malformed. */
			if (cl != NULL && strcmp(cl, value) != 0) {
				*why = "conflicting content-length values";
				return HTTP_HEAD_BAD;
			}
			if (!parse_decimal(value, &r->content_length)) {
				*why = "malformed content-length";
				return HTTP_HEAD_BAD;
			}
			cl = value;
		} else if (strcmp(name, "transfer-encoding") == 0) {
			if (te != NULL) {
				*why = "repeated transfer-encoding";
				return HTTP_HEAD_BAD;
			}
			te = value;
		} else if (strcmp(name, "host") == 0) {
			n_host++;
		}
	}
	if (te != NULL) {
		if (strcasecmp(te, "chunked") != 0) {
			*why = "unsupported transfer-encoding";
			return HTTP_HEAD_BAD;
		}
		if (cl != NULL) {
			*why = "content-length with transfer-encoding";
			return HTTP_HEAD_BAD;
		}
		if (r->minor == 0) {
			*why = "transfer-encoding in an HTTP/1.0 request";
			return HTTP_HEAD_BAD;
		}
		r->chunked = true;
	}
	if (n_host > 1 || (n_host == 0 && r->minor >= 1)) {
		*why = n_host ? "repeated host" : "missing host";
		return HTTP_HEAD_BAD;
	}
	return HTTP_HEAD_OK;
}

enum http_head_result http_parse_head(char *buf, size_t len, struct http_request *out,
                                      const char **why)
{
	char *p = buf, *end = buf + len, *cr;
	enum http_head_result res;

	out->method = out->path = out->query = NULL;
	out->minor = 0;
	out->n_headers = 0;
	out->chunked = false;
	out->content_length = 0;

	if ((res = next_line(&p, end, &cr, why)) != HTTP_HEAD_OK) {
		/* An unended line: 414 decides on the length, whatever comes later. */
		if (res == HTTP_HEAD_INCOMPLETE && len > HTTP_MAX_REQUEST_LINE + 1) {
			*why = "request line too long";
			return HTTP_HEAD_URI_TOO_LONG;
		}
		return res;
	}
	/* Validate the whole line before using its bytes, so a NUL cannot hide
	 * anything behind it: the checks below refuse every byte under 0x20. */
	char *next = cr + 2;
	if ((res = parse_request_line(p, cr, out, why)) != HTTP_HEAD_OK)
		return res;
	for (p = next;; p = next) {
		if (p == end) {
			*why = "request head not ended by an empty line";
			return HTTP_HEAD_INCOMPLETE;
		}
		if ((res = next_line(&p, end, &cr, why)) != HTTP_HEAD_OK)
			return res;
		next = cr + 2;
		if (cr == p)
			break; /* the empty line */
		if ((res = parse_field(p, cr, out, why)) != HTTP_HEAD_OK)
			return res;
	}
	return check_framing(out, why);
}

/* ---------------------------------------------------------------- chunked bodies */

enum chunk_state {
	CH_SIZE,    /* hex digits of a chunk size */
	CH_EXT,     /* after ';': extensions, skipped up to the CR */
	CH_SIZE_LF, /* the LF ending the size line */
	CH_DATA,    /* chunk data: ch->size bytes left */
	CH_DATA_CR, /* the CRLF after the data */
	CH_DATA_LF,
	CH_TRAILER,    /* the start of a trailer line, or of the final CRLF */
	CH_TRAILER_IN, /* inside a trailer line */
	CH_TRAILER_LF, /* the LF ending a trailer line */
	CH_FINAL_LF,   /* the LF of the empty line ending the body */
	CH_DONE,
};

static int hex_value(unsigned char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

enum http_chunked_result http_chunked_feed(struct http_chunked *ch, const char *p, size_t len,
                                           size_t *used, size_t *data, const char **why)
{
	size_t i = 0;

	*data = 0;
	while (i < len) {
		unsigned char b = (unsigned char)p[i];
		switch ((enum chunk_state)ch->state) {
		case CH_SIZE: {
			int d = hex_value(b);
			if (b == '\n') {
				*why = "chunk size line not ended by CRLF";
				goto bad;
			}
			if (d >= 0) {
				if (++ch->digits > HTTP_MAX_CHUNK_DIGITS) {
					*why = "chunk size has too many digits";
					goto bad;
				}
				ch->size = ch->size << 4 | (uint64_t)d;
			} else if (ch->digits > 0 && b == ';') {
				ch->state = CH_EXT;
			} else if (ch->digits > 0 && b == '\r') {
				ch->state = CH_SIZE_LF;
			} else {
				*why = "malformed chunk size";
				goto bad;
			}
			ch->line_len++;
			i++;
			break;
		}
		case CH_EXT:
			if (b == '\n') {
				*why = "chunk size line not ended by CRLF";
				goto bad;
			}
			if (b == '\r') {
				ch->state = CH_SIZE_LF;
			} else if (!is_field_byte(b)) {
				*why = "invalid byte in a chunk extension";
				goto bad;
			}
			if (++ch->line_len > HTTP_MAX_CHUNK_LINE) {
				*why = "chunk size line too long";
				goto bad;
			}
			i++;
			break;
		case CH_SIZE_LF:
			if (b != '\n') {
				*why = "chunk size line not ended by CRLF";
				goto bad;
			}
			i++;
			ch->line_len = 0;
			ch->digits = 0;
			if (ch->size == 0) {
				ch->state = CH_TRAILER;
				break;
			}
			/* total <= max_body always holds, so this cannot wrap. */
			if (ch->size > ch->max_body - ch->total) {
				*used = i;
				*why = "chunked body over max_body_size";
				return HTTP_CHUNKED_TOO_LARGE;
			}
			ch->state = CH_DATA;
			break;
		case CH_DATA: {
			size_t take = len - i;
			if (take > ch->size)
				take = (size_t)ch->size;
			ch->size -= take;
			ch->total += take;
			if (ch->size == 0)
				ch->state = CH_DATA_CR;
			*used = i;
			*data = take;
			return HTTP_CHUNKED_MORE;
		}
		case CH_DATA_CR:
		case CH_DATA_LF:
			if (b != (ch->state == CH_DATA_CR ? '\r' : '\n')) {
				*why = "chunk data not followed by CRLF";
				goto bad;
			}
			ch->state = ch->state == CH_DATA_CR ? CH_DATA_LF : CH_SIZE;
			i++;
			break;
		case CH_TRAILER:
		case CH_TRAILER_IN:
		case CH_TRAILER_LF:
		case CH_FINAL_LF:
			if (++ch->line_len > ch->max_trailer) {
				*used = i;
				*why = "chunked trailer section over max_header_size";
				return HTTP_CHUNKED_TRAILER_TOO_LARGE;
			}
			if (ch->state == CH_TRAILER_LF || ch->state == CH_FINAL_LF) {
				if (b != '\n') {
					*why = "bare CR in the chunked trailer section";
					goto bad;
				}
				i++;
				if (ch->state == CH_FINAL_LF) {
					ch->state = CH_DONE;
					*used = i;
					return HTTP_CHUNKED_DONE;
				}
				ch->state = CH_TRAILER;
				break;
			}
			if (b == '\r') {
				ch->state = ch->state == CH_TRAILER ? CH_FINAL_LF : CH_TRAILER_LF;
			} else if (b == '\n' || !is_field_byte(b) ||
			           (ch->state == CH_TRAILER && is_ows((char)b))) {
				*why = "malformed chunked trailer section";
				goto bad;
			} else {
				ch->state = CH_TRAILER_IN;
			}
			i++;
			break;
		case CH_DONE:
			*used = i;
			return HTTP_CHUNKED_DONE;
		}
	}
	*used = i;
	return ch->state == CH_DONE ? HTTP_CHUNKED_DONE : HTTP_CHUNKED_MORE;
bad:
	*used = i;
	return HTTP_CHUNKED_BAD;
}

/* ---------------------------------------------------------------- reading requests */

static void conn_reset_request(struct http_conn *c)
{
	free(c->head);
	c->head = NULL;
	free(c->body);
	c->body = NULL;
	c->body_len = 0;
	if (c->chunks)
		evbuffer_drain(c->chunks, evbuffer_get_length(c->chunks));
	memset(&c->chunk, 0, sizeof(c->chunk));
	memset(&c->scan, 0, sizeof(c->scan));
	if (c->out_headers)
		evbuffer_drain(c->out_headers, evbuffer_get_length(c->out_headers));
	c->reply_started = false;
	c->chunked = false;
	c->no_body = false;
	c->abort_cb = NULL;
	c->drain_cb = NULL;
	c->request_timer = false;
	memset(&c->req, 0, sizeof(c->req));
}

const char *http_request_header(const struct http_request *req, const char *lower_name)
{
	/* Names are stored lower-cased; the lookup name may come from configuration
	 * as the user wrote it (X-Session-Id), hence strcasecmp. Its first byte, lower-cased
	 * as the C locale's strcasecmp does, rules out most names without a call. */
	unsigned char first = (unsigned char)lower_name[0];
	if (first >= 'A' && first <= 'Z')
		first = (unsigned char)(first | 0x20);
	for (size_t i = 0; i < req->n_headers; i++)
		if ((unsigned char)req->headers[i].name[0] == first &&
		    strcasecmp(req->headers[i].name, lower_name) == 0)
			return req->headers[i].value;
	return NULL;
}

/* value is a parsed header value: terminated, no NUL inside. */
static bool header_has_token(const char *value, const char *token)
{
	size_t tl = strlen(token);
	for (const char *p = value; p && *p;) {
		while (*p == ' ' || *p == '\t' || *p == ',')
			p++;
		if (strncasecmp(p, token, tl) == 0 &&
		    (p[tl] == '\0' || p[tl] == ',' || p[tl] == ' ' || p[tl] == '\t'))
			return true;
		p = strchr(p, ',');
	}
	return false;
}

/* A refusal of the server's own (framing, limits): logged once with a short
 * reason (never the client's bytes), answered, and the connection closed. */
static void conn_refuse(struct http_conn *c, int status, const char *code, const char *why)
{
	log_info("%d from %s: %s", status, c->client_ip, why);
	conn_error(c, status, code, why);
}

static void conn_refuse_head(struct http_conn *c, enum http_head_result res, const char *why)
{
	int status = http_head_status(res);
	conn_refuse(c, status,
	            status == 414   ? "uri_too_long"
	            : status == 431 ? "headers_too_large"
	                            : "bad_request",
	            why);
}

static void conn_dispatch(struct http_conn *c)
{
	struct http_server *srv = c->srv;

	event_del(c->timer);
	c->request_timer = false;
	c->req.body = c->body ? c->body : "";
	c->req.body_len = c->body_len;
	c->req.conn = c;
	c->req.client_ip = c->client_ip;
	c->state = CONN_HANDLING;
	c->handler_owns = true;
	atomic_fetch_add_explicit(&srv->n_active, 1, memory_order_relaxed);
	srv->handler(&c->req, srv->arg);
}

/* The head hook, for a client that waits for 100 Continue. false: it answered. */
static bool conn_head_check(struct http_conn *c)
{
	struct http_server *srv = c->srv;
	bool keepalive = c->keepalive;

	c->req.body = "";
	c->req.body_len = 0;
	c->req.conn = c;
	c->req.client_ip = c->client_ip;
	/* An answer now leaves the body unread: the connection cannot be reused. */
	c->keepalive = false;
	c->linger = true;
	if (!srv->head_check(&c->req, srv->arg))
		return false;
	c->linger = false;
	c->keepalive = keepalive;
	return true;
}

/* The head is complete at [0, head_len) of the input: parse it and decide how to read the body. */
static void conn_begin_request(struct http_conn *c, size_t head_len)
{
	struct http_server *srv = c->srv;
	struct evbuffer *in = c->in;
	const char *why = NULL;
	enum http_head_result res;

	c->head = malloc(head_len);
	if (c->head == NULL) {
		conn_error(c, 503, "out_of_memory", "out of memory");
		return;
	}
	evbuffer_remove(in, c->head, head_len);
	if ((res = http_parse_head(c->head, head_len, &c->req, &why)) != HTTP_HEAD_OK) {
		conn_refuse_head(c, res, why);
		return;
	}
	const char *conn_hdr = http_request_header(&c->req, "connection");
	if (c->req.minor == 0)
		c->keepalive = conn_hdr && header_has_token(conn_hdr, "keep-alive");
	else
		c->keepalive = !(conn_hdr && header_has_token(conn_hdr, "close"));
	/* keepalive_timeout 0 closes after each response: say so in the response. */
	if (srv->draining || srv->limits.keepalive_timeout == 0)
		c->keepalive = false;

	if (c->req.chunked) {
		if (c->chunks == NULL && (c->chunks = evbuffer_new()) == NULL) {
			conn_error(c, 503, "out_of_memory", "out of memory");
			return;
		}
		c->chunk.max_body = srv->limits.max_body_size;
		c->chunk.max_trailer = srv->limits.max_header_size;
		c->state = CONN_READ_CHUNKED;
	} else if (c->req.content_length > 0) {
		if (c->req.content_length > srv->limits.max_body_size) {
			log_info("413 from %s: body of %" PRIu64
			         " bytes over max_body_size %" PRIu64,
			         c->client_ip, c->req.content_length, srv->limits.max_body_size);
			conn_error(c, 413, "request_too_large",
			           "request body is larger than the gateway's max_body_size");
			return;
		}
		c->body_need = (size_t)c->req.content_length;
		c->state = CONN_READ_BODY;
	} else {
		conn_dispatch(c);
		return;
	}
	const char *expect = http_request_header(&c->req, "expect");
	if (expect && strcasecmp(expect, "100-continue") == 0 && c->req.minor >= 1) {
		if (srv->head_check && !conn_head_check(c))
			return;
		evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
		conn_flush(c);
	}
}

/* Decode chunked body data from the input; true when the body is complete. */
static bool conn_read_chunked(struct http_conn *c)
{
	struct evbuffer *in = c->in;
	const char *why = NULL;

	while (evbuffer_get_length(in) > 0) {
		struct evbuffer_iovec v;
		size_t used, data;
		if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
			return false;
		enum http_chunked_result res =
		        http_chunked_feed(&c->chunk, v.iov_base, v.iov_len, &used, &data, &why);
		evbuffer_drain(in, used);
		if (data > 0 && evbuffer_remove_buffer(in, c->chunks, data) != (int)data) {
			conn_error(c, 503, "out_of_memory", "out of memory");
			return false;
		}
		switch (res) {
		case HTTP_CHUNKED_MORE:
			continue;
		case HTTP_CHUNKED_DONE:
			return true;
		case HTTP_CHUNKED_TOO_LARGE:
			log_info("413 from %s: %s", c->client_ip, why);
			conn_error(c, 413, "request_too_large",
			           "request body is larger than the gateway's max_body_size");
			return false;
		case HTTP_CHUNKED_TRAILER_TOO_LARGE:
			conn_refuse(c, 431, "headers_too_large", why);
			return false;
		case HTTP_CHUNKED_BAD:
			conn_refuse(c, 400, "bad_request", why);
			return false;
		}
	}
	return false;
}

/* Feed the input from where the last scan stopped up to `to` bytes to the head scanner. */
static enum http_head_result conn_scan_head(struct http_conn *c, struct evbuffer *in, size_t to,
                                            size_t *head_len)
{
	while (c->scan.pos < to) {
		struct evbuffer_ptr at;
		struct evbuffer_iovec v;
		if (evbuffer_ptr_set(in, &at, c->scan.pos, EVBUFFER_PTR_SET) != 0 ||
		    evbuffer_peek(in, -1, &at, &v, 1) < 1)
			break;
		size_t n = v.iov_len < to - c->scan.pos ? v.iov_len : to - c->scan.pos;
		enum http_head_result res = http_head_scan(&c->scan, v.iov_base, n, head_len);
		if (res != HTTP_HEAD_INCOMPLETE)
			return res;
	}
	return HTTP_HEAD_INCOMPLETE;
}

static void conn_process(struct http_conn *c)
{
	struct evbuffer *in;

	while (c->open) {
		in = c->in;
		size_t avail = evbuffer_get_length(in);
		switch (c->state) {
		case CONN_READ_HEAD: {
			if (c->scan.pos == 0) {
				/* Tolerate CRLFs between requests (RFC 9112 §2.2). */
				unsigned char two[2];
				ev_ssize_t got;
				while ((got = evbuffer_copyout(in, two, 2)) == 2 &&
				       two[0] == '\r' && two[1] == '\n')
					evbuffer_drain(in, 2);
				if (got == 1 && two[0] == '\r')
					return; /* the first half of a CRLF, maybe */
				avail = evbuffer_get_length(in);
			}
			if (avail == 0)
				return;
			if (!c->request_timer) {
				c->request_timer = true;
				c->req.start_us = http_now_us();
				conn_arm_timer(c, c->srv->limits.client_timeout);
			}
			uint64_t max = c->srv->limits.max_header_size;
			size_t head_len = 0;
			enum http_head_result res =
			        conn_scan_head(c, in, avail < max ? avail : (size_t)max, &head_len);
			if (res == HTTP_HEAD_INCOMPLETE) {
				if (avail <= max)
					return;
				/* A request line that alone fills max_header_size is a long URI. */
				res = c->scan.lines == 0 ? HTTP_HEAD_URI_TOO_LONG
				                         : HTTP_HEAD_TOO_LARGE;
				conn_refuse_head(c, res,
				                 res == HTTP_HEAD_TOO_LARGE
				                         ? "request head over max_header_size"
				                         : "request line too long");
				return;
			}
			if (res != HTTP_HEAD_OK) {
				conn_refuse_head(c, res,
				                 res == HTTP_HEAD_BAD
				                         ? "bare LF in the request head"
				                         : "request line too long");
				return;
			}
			conn_begin_request(c, head_len);
			/* Dispatched (maybe finished already) or failed: the loop or a
			 * deferred read picks up from here; don't touch c again. */
			if (c->state != CONN_READ_BODY && c->state != CONN_READ_CHUNKED)
				return;
			break;
		}
		case CONN_READ_BODY:
			if (avail < c->body_need)
				return;
			c->body = malloc(c->body_need + 1);
			if (c->body == NULL) {
				conn_error(c, 503, "out_of_memory", "out of memory");
				return;
			}
			evbuffer_remove(in, c->body, c->body_need);
			c->body[c->body_need] = '\0';
			c->body_len = c->body_need;
			conn_dispatch(c);
			return;
		case CONN_READ_CHUNKED:
			if (!conn_read_chunked(c))
				return;
			c->body_len = evbuffer_get_length(c->chunks);
			c->body = malloc(c->body_len + 1);
			if (c->body == NULL) {
				conn_error(c, 503, "out_of_memory", "out of memory");
				return;
			}
			evbuffer_remove(c->chunks, c->body, c->body_len);
			c->body[c->body_len] = '\0';
			conn_dispatch(c);
			return;
		case CONN_HANDLING:
			/* Pipelined bytes wait until the current reply is done; stop
			 * reading if a client floods us meanwhile. */
			if (avail > c->srv->limits.max_header_size)
				conn_read_enable(c, false);
			return;
		case CONN_CLOSING:
			evbuffer_drain(in, avail);
			return;
		}
	}
}

/* ---------------------------------------------------------------- socket I/O */

static void tls_read_cb(struct bufferevent *bev, void *arg)
{
	conn_process(arg);
}

static void tls_write_cb(struct bufferevent *bev, void *arg)
{
	conn_write_done(arg);
}

static void tls_event_cb(struct bufferevent *bev, short what, void *arg)
{
	conn_event(arg, what);
}

/* One read of at most HTTP_READ_SIZE into the input (no FIONREAD first): a request that
 * did not fit comes in the next turns, as the socket stays readable. */
static void plain_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;
	struct evbuffer_iovec v;

	if (c->process_queued) { /* input already read, left for the loop (conn_finish) */
		c->process_queued = false;
		conn_process(c);
		return;
	}
	if (evbuffer_reserve_space(c->in, HTTP_READ_SIZE, &v, 1) < 1) {
		conn_event(c, BEV_EVENT_READING | BEV_EVENT_ERROR);
		return;
	}
	ssize_t n = read(fd, v.iov_base, v.iov_len < HTTP_READ_SIZE ? v.iov_len : HTTP_READ_SIZE);
	if (n > 0) {
		v.iov_len = (size_t)n;
		evbuffer_commit_space(c->in, &v, 1);
		conn_process(c);
	} else if (n == 0) {
		conn_event(c, BEV_EVENT_READING | BEV_EVENT_EOF);
	} else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
		conn_event(c, BEV_EVENT_READING | BEV_EVENT_ERROR);
	}
}

/* Write what is queued: from the loop right after a reply was queued (flush_queued), or
 * when the socket takes bytes again. Write interest stays registered only while bytes
 * wait; its timeout is write_timeout. */
static void plain_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;

	c->flush_queued = false;
	if (what & EV_TIMEOUT) {
		conn_event(c, BEV_EVENT_WRITING | BEV_EVENT_TIMEOUT);
		return;
	}
	if (evbuffer_get_length(c->out) > 0 && evbuffer_write(c->out, fd) < 0 && errno != EAGAIN &&
	    errno != EWOULDBLOCK && errno != EINTR) {
		conn_event(c, BEV_EVENT_WRITING | BEV_EVENT_ERROR);
		return;
	}
	if (evbuffer_get_length(c->out) > 0) {
		if (!c->writing) {
			struct timeval tv = ms_to_tv(c->srv->limits.write_timeout);
			event_add(c->wev, &tv);
			c->writing = true;
		}
		return;
	}
	if (c->writing) {
		event_del(c->wev);
		c->writing = false;
	}
	conn_write_done(c);
}

static void conn_read_enable(struct http_conn *c, bool on)
{
	if (!c->open)
		return;
	if (c->bev) {
		if (on)
			bufferevent_enable(c->bev, EV_READ);
		else
			bufferevent_disable(c->bev, EV_READ);
		return;
	}
	if (on && !c->reading)
		event_add(c->rev, NULL);
	else if (!on && c->reading)
		event_del(c->rev);
	c->reading = on;
}

/* Output was queued: write it from the loop, once the callback that queued it is done
 * (what one callback queues goes out in one writev). Never from here: a failed write
 * must not free the connection under its caller. */
static void conn_flush(struct http_conn *c)
{
	if (!c->open || c->bev || c->flush_queued || c->writing)
		return;
	c->flush_queued = true;
	event_active(c->wev, EV_WRITE, 1);
}

/* Input is buffered already: handle it from the loop. */
static void conn_queue_process(struct http_conn *c)
{
	if (c->bev) {
		bufferevent_trigger(c->bev, EV_READ, BEV_TRIG_IGNORE_WATERMARKS | BEV_TRIG_DEFER_CALLBACKS);
		return;
	}
	c->process_queued = true;
	event_active(c->rev, EV_READ, 1);
}

/* ---------------------------------------------------------------- teardown */

static void conn_close_socket(struct http_conn *c)
{
	if (c->open) {
		if (c->bev) {
			bufferevent_free(c->bev);
			c->bev = NULL;
			c->in = c->out = NULL;
		} else {
			event_free(c->rev);
			event_free(c->wev);
			c->rev = c->wev = NULL;
			close(c->fd);
			evbuffer_free(c->in);
			evbuffer_free(c->out);
			c->in = c->out = NULL;
		}
		c->open = false;
		c->fd = -1;
	}
	event_del(c->timer);
}

static void conn_free(struct http_conn *c)
{
	struct http_server *srv = c->srv;

	conn_close_socket(c);
	event_free(c->timer);
	TAILQ_REMOVE(&srv->conns, c, link);
	atomic_fetch_sub_explicit(&srv->n_conns, 1, memory_order_relaxed);
	free(c->head);
	free(c->body);
	if (c->chunks)
		evbuffer_free(c->chunks);
	if (c->out_headers)
		evbuffer_free(c->out_headers);
	free(c);
	/* A descriptor is free again: a listener resting after a failed accept() tries now. */
	for (size_t i = 0; i < srv->n_listeners; i++)
		listener_resume(&srv->listeners[i]);
}

/* The socket ended (EOF), failed, or stalled past write_timeout (BEV_EVENT_* flags). */
static void conn_event(struct http_conn *c, short what)
{
	/* A TLS listener reports the end of its handshake as CONNECTED: not an end. */
	if (what == BEV_EVENT_CONNECTED)
		return;
	conn_read_enable(c, false); /* an EOF stays readable: stop watching it */
	if (!c->handler_owns) {
		/* A client that half-closed after its request still gets the answer
		 * already queued (printf ... | nc -N); an error or timeout ends it. */
		if ((what & BEV_EVENT_EOF) && !(what & (BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)))
			conn_close_when_flushed(c);
		else
			conn_free(c);
		return;
	}
	/* A half-close (shutdown(SHUT_WR)) looks the same as a close here: the kernel
	 * tells them apart only when we send, and before the first byte of a reply we
	 * have nothing to send. Treating EOF as an abort is what cancels the upstream
	 * at once for a client that is really gone (docs/architecture.md §3a). */
	/* The client left (or stalled past write_timeout) while the handler works:
	 * close the socket now, keep the request for the handler to finish. The
	 * abort callback is the last thing we do here: it may finish the request. */
	log_debug("client %s went away during %s %s", c->client_ip, c->req.method, c->req.path);
	conn_close_socket(c);
	c->aborted = true;
	if (c->abort_cb) {
		void (*cb)(void *) = c->abort_cb;
		c->abort_cb = NULL;
		cb(c->abort_arg);
	}
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;

	if (c->state == CONN_READ_HEAD && !c->request_timer) {
		/* Idle past keepalive_timeout; the last reply may still be on its way
		 * to a slow reader, and it must not be cut. */
		size_t queued = c->open ? evbuffer_get_length(c->out) : 0;
		if (queued > 0)
			log_debug(
			        "keep-alive timeout for %s: closing once %zu queued bytes are sent",
			        c->client_ip, queued);
		conn_close_when_flushed(c);
		return;
	}
	if (c->state == CONN_READ_HEAD || c->state == CONN_READ_BODY ||
	    c->state == CONN_READ_CHUNKED)
		conn_refuse(c, 408, "request_timeout", "request not received in client_timeout");
	else if (c->state == CONN_CLOSING)
		conn_free(c); /* lingered long enough */
}

/* Close once everything queued has reached the socket: a reply in the output
 * buffer is never cut (a slow reader at SIGTERM or at keep-alive expiry). The
 * bufferevent's write timeout (write_timeout) drops a client that stops taking
 * bytes, so this is bounded. */
static void conn_close_when_flushed(struct http_conn *c)
{
	c->keepalive = false;
	c->state = CONN_CLOSING;
	event_del(c->timer);
	if (!c->open || evbuffer_get_length(c->out) == 0)
		conn_end(c);
	else
		conn_flush(c);
}

/*
 * The last reply is out. Closing a socket whose receive queue holds unread bytes makes
 * the kernel send a RST, and a RST can destroy the reply before the client has read it:
 * a 413 or 400 answered while the client is still sending would reach it as "connection
 * reset". So when input was left unread, shut our side (FIN after the reply), go on
 * reading and discarding, and close at the peer's EOF or after HTTP_LINGER_MS.
 */
static void conn_end(struct http_conn *c)
{
	evutil_socket_t fd = c->open ? c->fd : -1;

	/* TLS: a bare shutdown would cut the session; its close_notify is enough. */
	if (!c->linger || c->lingering || fd < 0 || c->tls || shutdown(fd, SHUT_WR) != 0) {
		conn_free(c);
		return;
	}
	c->lingering = true;
	conn_read_enable(c, true);
	conn_arm_timer(c, HTTP_LINGER_MS);
}

/* Called when the handler finishes a request. */
static void conn_finish(struct http_conn *c)
{
	struct http_server *srv = c->srv;

	if (c->handler_owns) {
		c->handler_owns = false;
		atomic_fetch_sub_explicit(&srv->n_active, 1, memory_order_relaxed);
	}
	if (!c->open) {
		conn_free(c);
		return;
	}
	if (!c->keepalive) {
		conn_close_when_flushed(c);
		return;
	}
	conn_reset_request(c);
	c->state = CONN_READ_HEAD;
	conn_read_enable(c, true);
	conn_arm_timer(c, srv->limits.keepalive_timeout);
	/* Pipelined input: handle it from the loop, not from inside this call. */
	if (evbuffer_get_length(c->in) > 0)
		conn_queue_process(c);
}

/* Everything queued has reached the socket. */
static void conn_write_done(struct http_conn *c)
{
	if (c->state == CONN_CLOSING) {
		if (!c->lingering)
			conn_end(c);
		return;
	}
	if (c->drain_cb) {
		void (*cb)(void *) = c->drain_cb;
		c->drain_cb = NULL;
		cb(c->drain_arg);
	}
}

/* ---------------------------------------------------------------- replies */

const char *http_status_text(int status)
{
	switch (status) {
	case 100: return "Continue";
	case 200: return "OK";
	case 201: return "Created";
	case 202: return "Accepted";
	case 204: return "No Content";
	case 301: return "Moved Permanently";
	case 302: return "Found";
	case 304: return "Not Modified";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 409: return "Conflict";
	case 413: return "Content Too Large";
	case 414: return "URI Too Long";
	case 415: return "Unsupported Media Type";
	case 422: return "Unprocessable Content";
	case 429: return "Too Many Requests";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
	}
}

void http_request_on_abort(struct http_request *req, void (*cb)(void *arg), void *arg)
{
	req->conn->abort_cb = cb;
	req->conn->abort_arg = arg;
}

bool http_request_aborted(const struct http_request *req)
{
	return !req->conn->open;
}

void http_request_abandon(struct http_request *req)
{
	struct http_conn *c = req->conn;
	if (c->open)
		c->keepalive = false; /* a half-sent reply must not be followed by another */
	conn_finish(c);
}

/* What goes into a response header must not end it early: a CR or LF in a
 * value passed through from an upstream would start a header of its own. */
static bool header_value_ok(const char *v)
{
	for (; *v; v++)
		if (!is_field_byte((unsigned char)*v))
			return false;
	return true;
}

static bool header_name_ok(const char *n)
{
	if (*n == '\0')
		return false;
	for (; *n; n++)
		if (!is_tchar((unsigned char)*n))
			return false;
	return true;
}

void http_response_header(struct http_request *req, const char *name, const char *value)
{
	struct http_conn *c = req->conn;
	if (!header_name_ok(name) || !header_value_ok(value)) {
		log_warn("dropped a response header with a control byte or a malformed name");
		return;
	}
	if (c->out_headers == NULL && (c->out_headers = evbuffer_new()) == NULL)
		return;
	size_t nl = strlen(name), vl = strlen(value);
	char line[HTTP_HEADER_LINE_BUF];
	if (nl + vl + 4 <= sizeof(line)) { /* the usual short header: one copy, one add */
		memcpy(line, name, nl);
		memcpy(line + nl, ": ", 2);
		memcpy(line + nl + 2, value, vl);
		memcpy(line + nl + 2 + vl, "\r\n", 2);
		evbuffer_add(c->out_headers, line, nl + vl + 4);
		return;
	}
	evbuffer_add(c->out_headers, name, nl);
	evbuffer_add(c->out_headers, ": ", 2);
	evbuffer_add(c->out_headers, value, vl);
	evbuffer_add(c->out_headers, "\r\n", 2);
}

void http_response_header_lines(struct http_request *req, const char *lines, size_t len)
{
	struct http_conn *c = req->conn;
	if (c->out_headers == NULL && (c->out_headers = evbuffer_new()) == NULL)
		return;
	evbuffer_add(c->out_headers, lines, len);
}

size_t http_put_decimal(char *o, uint64_t v)
{
	/* Two digits per division, written from the end of a scratch buffer. */
	static const char pairs[] = "00010203040506070809101112131415161718192021222324"
	                            "25262728293031323334353637383940414243444546474849"
	                            "50515253545556575859606162636465666768697071727374"
	                            "75767778798081828384858687888990919293949596979899";
	char tmp[20];
	size_t i = sizeof(tmp);

	while (v >= 100) {
		unsigned d = (unsigned)(v % 100) * 2;
		v /= 100;
		tmp[--i] = pairs[d + 1];
		tmp[--i] = pairs[d];
	}
	if (v >= 10) {
		unsigned d = (unsigned)v * 2;
		tmp[--i] = pairs[d + 1];
		tmp[--i] = pairs[d];
	} else {
		tmp[--i] = (char)('0' + v);
	}
	memcpy(o, tmp + i, sizeof(tmp) - i);
	return sizeof(tmp) - i;
}

/* v in lower-case hex at o (at most 16 bytes); returns the length. */
static size_t put_hex(char *o, uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	char tmp[16];
	size_t n = 0;
	do {
		tmp[n++] = digits[v & 15];
		v >>= 4;
	} while (v != 0);
	for (size_t i = 0; i < n; i++)
		o[i] = tmp[n - 1 - i];
	return n;
}

/* RFC 9110 §6.4.1: these never have content, whatever their framing would say. */
static bool status_has_body(int status)
{
	return status >= 200 && status != 204 && status != 304;
}

static void write_head(struct http_conn *c, int status, const char *content_type,
                       long long content_length)
{
	struct evbuffer *out = c->out;
	/* Status line, Content-Type and framing put together here, then added at once (no
	 * printf per reply). A Content-Type too long for the buffer goes in its own add. */
	char head[HTTP_HEADER_LINE_BUF];
	const char *text = http_status_text(status);
	size_t tl = strlen(text), n = 0;
	memcpy(head, "HTTP/1.1 ", 9);
	head[7] = c->req.minor ? '1' : '0';
	n = 9 + http_put_decimal(head + 9, (uint64_t)(status >= 0 && status < 1000 ? status : 500));
	head[n++] = ' ';
	memcpy(head + n, text, tl); /* the longest status text is 31 bytes */
	n += tl;
	memcpy(head + n, "\r\n", 2);
	n += 2;
	if (content_type && !header_value_ok(content_type)) {
		log_warn("dropped a response Content-Type with a control byte");
		content_type = NULL;
	}
	if (content_type) {
		size_t cl = strlen(content_type);
		if (n + 14 + cl + 2 + 40 <= sizeof(head)) {
			memcpy(head + n, "Content-Type: ", 14);
			memcpy(head + n + 14, content_type, cl);
			memcpy(head + n + 14 + cl, "\r\n", 2);
			n += 14 + cl + 2;
		} else {
			evbuffer_add(out, head, n);
			n = 0;
			evbuffer_add(out, "Content-Type: ", 14);
			evbuffer_add(out, content_type, cl);
			evbuffer_add(out, "\r\n", 2);
		}
	}
	if (content_length >= 0) {
		memcpy(head + n, "Content-Length: ", 16);
		n += 16 + http_put_decimal(head + n + 16, (uint64_t)content_length);
		memcpy(head + n, "\r\n", 2);
		n += 2;
	} else if (c->chunked) {
		memcpy(head + n, "Transfer-Encoding: chunked\r\n", 28);
		n += 28;
	}
	evbuffer_add(out, head, n);
	if (c->out_headers)
		evbuffer_add_buffer(out, c->out_headers);
	if (!c->keepalive)
		evbuffer_add(out, "Connection: close\r\n", 19);
	else if (c->req.minor == 0)
		evbuffer_add(out, "Connection: keep-alive\r\n", 24);
	evbuffer_add(out, "\r\n", 2);
	c->reply_started = true;
}

void http_reply(struct http_request *req, int status, const char *content_type, const char *body,
                size_t len)
{
	struct http_conn *c = req->conn;

	if (c->open && !c->reply_started) {
		if (!status_has_body(status)) {
			c->chunked = false;
			write_head(c, status, content_type, -1);
		} else {
			write_head(c, status, content_type, (long long)len);
			if (len && strcmp(req->method, "HEAD") != 0)
				evbuffer_add(c->out, body, len);
		}
		conn_flush(c);
	}
	conn_finish(c);
}

void http_json_escape(struct evbuffer *buf, const char *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	size_t run = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch >= 0x20 && ch != '"' && ch != '\\')
			continue;
		evbuffer_add(buf, s + run, i - run);
		run = i + 1;
		switch (ch) {
		case '"': evbuffer_add(buf, "\\\"", 2); break;
		case '\\': evbuffer_add(buf, "\\\\", 2); break;
		case '\n': evbuffer_add(buf, "\\n", 2); break;
		case '\r': evbuffer_add(buf, "\\r", 2); break;
		case '\t': evbuffer_add(buf, "\\t", 2); break;
		default: {
			char u[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
			evbuffer_add(buf, u, 6);
		}
		}
	}
	evbuffer_add(buf, s + run, len - run);
}

size_t http_reply_error(struct http_request *req, int status, const char *type, const char *code,
                        const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = sizeof(msg) - 1;

	struct evbuffer *b = evbuffer_new();
	evbuffer_add_printf(b, "{\"error\":{\"message\":\"");
	http_json_escape(b, msg, (size_t)n);
	evbuffer_add_printf(b, "\",\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}\n", type, code);
	size_t len = evbuffer_get_length(b);
	http_reply(req, status, "application/json", (const char *)evbuffer_pullup(b, -1), len);
	evbuffer_free(b);
	return len;
}

/* An error the server itself answers (bad framing, limits): reply and close,
 * since the rest of the input cannot be trusted to start a new request. */
static void conn_error(struct http_conn *c, int status, const char *code, const char *msg)
{
	const char *type = status < 500 ? "invalid_request_error" : "server_error";
	/* What follows is read and thrown away (CLOSING), never parsed. */
	c->keepalive = false;
	c->linger = true;
	if (c->req.method == NULL) {
		/* No request line was read (a 408 on a partial head, a malformed line): the
		 * answer is in our own version (RFC 9110 §2.5), not HTTP/1.0. */
		c->req.minor = 1;
		c->req.method = "GET"; /* for http_reply's HEAD check */
	}
	c->req.conn = c;
	c->handler_owns = false;
	http_reply_error(&c->req, status, type, code, "%s", msg);
}

void http_reply_start(struct http_request *req, int status, const char *content_type)
{
	struct http_conn *c = req->conn;
	if (!c->open || c->reply_started)
		return;
	c->no_body = !status_has_body(status) || strcmp(req->method, "HEAD") == 0;
	c->chunked = c->req.minor >= 1 && status_has_body(status);
	if (!c->chunked && !c->no_body)
		c->keepalive = false; /* HTTP/1.0: the end of the stream is the close */
	write_head(c, status, content_type, -1);
}

void http_reply_chunk(struct http_request *req, const void *data, size_t len)
{
	struct http_conn *c = req->conn;
	if (!c->open || len == 0 || c->no_body)
		return;
	struct evbuffer *out = c->out;
	if (c->chunked) {
		/* Size line, data and CRLF in one add: framed in a stack buffer when the chunk is
		 * small (a stream calls this once per event), else added in three parts. */
		char frame[HTTP_CHUNK_FRAME_BUF];
		size_t n = put_hex(frame, len);
		memcpy(frame + n, "\r\n", 2);
		if (len <= sizeof(frame) - n - 4) {
			memcpy(frame + n + 2, data, len);
			memcpy(frame + n + 2 + len, "\r\n", 2);
			evbuffer_add(out, frame, n + 2 + len + 2);
		} else {
			evbuffer_expand(out, n + 2 + len + 2); /* one buffer for the three */
			evbuffer_add(out, frame, n + 2);
			evbuffer_add(out, data, len);
			evbuffer_add(out, "\r\n", 2);
		}
	} else {
		evbuffer_add(out, data, len);
	}
	conn_flush(c);
}

void http_reply_chunk_buffer(struct http_request *req, struct evbuffer *buf)
{
	struct http_conn *c = req->conn;
	size_t len = evbuffer_get_length(buf);
	if (!c->open || len == 0 || c->no_body) {
		evbuffer_drain(buf, len);
		return;
	}
	struct evbuffer *out = c->out;
	if (c->chunked) {
		char size[24];
		size_t n = put_hex(size, len);
		memcpy(size + n, "\r\n", 2);
		evbuffer_add(out, size, n + 2);
		evbuffer_add_buffer(out, buf);
		evbuffer_add(out, "\r\n", 2);
	} else {
		evbuffer_add_buffer(out, buf);
	}
	conn_flush(c);
}

void http_reply_end(struct http_request *req)
{
	struct http_conn *c = req->conn;
	if (c->open && c->chunked && !c->no_body) {
		evbuffer_add(c->out, "0\r\n\r\n", 5);
		conn_flush(c);
	}
	conn_finish(c);
}

size_t http_reply_pending(const struct http_request *req)
{
	const struct http_conn *c = req->conn;
	return c->open ? evbuffer_get_length(c->out) : 0;
}

void http_reply_on_drain(struct http_request *req, void (*cb)(void *arg), void *arg)
{
	struct http_conn *c = req->conn;
	c->drain_cb = cb;
	c->drain_arg = arg;
}
