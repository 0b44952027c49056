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
 */
#include "sluice/http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/ssl.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "sluice/log.h"

enum conn_state {
	CONN_READ_HEAD,
	CONN_READ_BODY,
	CONN_READ_CHUNKED,
	CONN_HANDLING,
	CONN_CLOSING, /* flushing the last response, then close */
};

struct http_conn {
	struct http_server *srv;
	struct bufferevent *bev; /* NULL once the socket is closed */
	struct event *timer;
	enum conn_state state;
	bool keepalive;
	bool handler_owns;  /* the handler has the request and has not finished it */
	bool reply_started;
	bool chunked;
	bool aborted;
	bool request_timer; /* the client_timeout timer runs for this request */
	char *head;         /* the request head, parsed in place */
	char *body;
	size_t body_len;
	size_t body_need;   /* READ_BODY: bytes still expected */
	struct evbuffer *chunks; /* READ_CHUNKED: body so far */
	size_t chunk_left;  /* READ_CHUNKED: bytes left in the current chunk, 0 = expect size line */
	bool chunk_trailer;
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
	SSL_CTX *tls; /* one reference, or NULL */
};

struct http_server {
	struct event_base *base;
	struct http_listener *listeners;
	size_t n_listeners;
	struct http_limits limits;
	http_handler_fn handler;
	void *arg;
	struct conn_list conns;
	/* Written by the owning worker only; read by the main thread for status and
	 * gauges, hence relaxed atomics (no ordering is needed, just no torn reads). */
	atomic_size_t n_conns;
	atomic_size_t n_active;
	bool draining;
	uint64_t last_full_warn_us;
};

static void conn_read_cb(struct bufferevent *bev, void *arg);
static void conn_write_cb(struct bufferevent *bev, void *arg);
static void conn_event_cb(struct bufferevent *bev, short what, void *arg);
static void conn_timer_cb(evutil_socket_t fd, short what, void *arg);
static void conn_process(struct http_conn *c);
static void conn_free(struct http_conn *c);
static void conn_error(struct http_conn *c, int status, const char *code, const char *msg);

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

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen,
                      void *arg)
{
	struct http_listener *hl = arg;
	struct http_server *srv = hl->srv;
	struct http_conn *c;
	int one = 1;

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
	if (hl->tls) {
		SSL *ssl = SSL_new(hl->tls);
		c->bev = ssl ? bufferevent_openssl_socket_new(srv->base, fd, ssl,
		                                              BUFFEREVENT_SSL_ACCEPTING,
		                                              BEV_OPT_CLOSE_ON_FREE)
		             : NULL;
		if (c->bev == NULL && ssl)
			SSL_free(ssl);
		if (c->bev)
			/* A peer that just closes is a normal end, not an error. */
			bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
	} else {
		c->bev = bufferevent_socket_new(srv->base, fd, BEV_OPT_CLOSE_ON_FREE);
	}
	c->timer = evtimer_new(srv->base, conn_timer_cb, c);
	if (c->bev == NULL || c->timer == NULL) {
		if (c->bev)
			bufferevent_free(c->bev);
		else
			close(fd);
		if (c->timer)
			event_free(c->timer);
		free(c);
		return;
	}
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

	struct timeval wtv = ms_to_tv(srv->limits.write_timeout);
	bufferevent_set_timeouts(c->bev, NULL, &wtv);
	bufferevent_setcb(c->bev, conn_read_cb, conn_write_cb, conn_event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
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
		hl->l = evconnlistener_new(base, accept_cb, hl, LEV_OPT_CLOSE_ON_FREE, -1, fds[i]);
		if (hl->l == NULL)
			goto fail;
		srv->n_listeners++;
	}
	return srv;
fail:
	http_server_free(srv);
	return NULL;
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
		if (srv->listeners[i].tls)
			SSL_CTX_free(srv->listeners[i].tls);
	}
	srv->n_listeners = 0;
}

size_t http_server_connections(const struct http_server *srv)
{
	return atomic_load_explicit(&((struct http_server *)srv)->n_conns, memory_order_relaxed);
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
	/* Idle connections go now; busy ones close after their response. */
	for (c = TAILQ_FIRST(&srv->conns); c != NULL; c = next) {
		next = TAILQ_NEXT(c, link);
		c->keepalive = false;
		if (c->state == CONN_READ_HEAD && !c->request_timer)
			conn_free(c);
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

/* ---------------------------------------------------------------- parsing */

static void conn_reset_request(struct http_conn *c)
{
	free(c->head);
	c->head = NULL;
	free(c->body);
	c->body = NULL;
	c->body_len = 0;
	if (c->chunks)
		evbuffer_drain(c->chunks, evbuffer_get_length(c->chunks));
	c->chunk_left = 0;
	c->chunk_trailer = false;
	if (c->out_headers)
		evbuffer_drain(c->out_headers, evbuffer_get_length(c->out_headers));
	c->reply_started = false;
	c->chunked = false;
	c->abort_cb = NULL;
	c->drain_cb = NULL;
	c->request_timer = false;
	memset(&c->req, 0, sizeof(c->req));
}

static bool token_char(int ch)
{
	return ch > 32 && ch < 127 && strchr("()<>@,;:\\\"/[]?={}", ch) == NULL;
}

/* Parse the head in c->head (NUL-terminated, ends with CRLFCRLF) in place. */
static bool parse_head(struct http_conn *c, const char **why)
{
	char *p = c->head, *line_end;
	struct http_request *r = &c->req;

	/* request line: METHOD SP target SP HTTP/1.x */
	line_end = strstr(p, "\r\n");
	*line_end = '\0';
	char *sp1 = strchr(p, ' ');
	if (sp1 == NULL || sp1 == p) {
		*why = "malformed request line";
		return false;
	}
	*sp1 = '\0';
	for (char *m = p; *m; m++)
		if (!token_char((unsigned char)*m)) {
			*why = "malformed method";
			return false;
		}
	r->method = p;
	char *target = sp1 + 1;
	char *sp2 = strchr(target, ' ');
	if (sp2 == NULL || sp2 == target || target[0] != '/') {
		*why = "malformed request target";
		return false;
	}
	*sp2 = '\0';
	const char *ver = sp2 + 1;
	if (strncmp(ver, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)ver[7]) || ver[8] != '\0') {
		*why = "unsupported HTTP version";
		return false;
	}
	r->minor = ver[7] - '0';
	char *q = strchr(target, '?');
	if (q) {
		*q = '\0';
		r->query = q + 1;
	}
	r->path = target;

	/* header fields */
	p = line_end + 2;
	while (*p != '\r') {
		line_end = strstr(p, "\r\n");
		*line_end = '\0';
		char *colon = strchr(p, ':');
		if (colon == NULL || colon == p) {
			*why = "malformed header line";
			return false;
		}
		for (char *n = p; n < colon; n++) {
			if (!token_char((unsigned char)*n)) {
				*why = "malformed header name";
				return false;
			}
			*n = (char)tolower((unsigned char)*n);
		}
		*colon = '\0';
		char *v = colon + 1;
		while (*v == ' ' || *v == '\t')
			v++;
		char *e = line_end;
		while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
			*--e = '\0';
		if (r->n_headers == HTTP_MAX_HEADERS) {
			*why = "too many header fields";
			return false;
		}
		r->headers[r->n_headers].name = p;
		r->headers[r->n_headers].value = v;
		r->n_headers++;
		p = line_end + 2;
	}
	return true;
}

const char *http_request_header(const struct http_request *req, const char *lower_name)
{
	/* Names are stored lower-cased; the lookup name may come from configuration
	 * as the user wrote it (X-Session-Id), hence strcasecmp. */
	for (size_t i = 0; i < req->n_headers; i++)
		if (strcasecmp(req->headers[i].name, lower_name) == 0)
			return req->headers[i].value;
	return NULL;
}

static bool header_has_token(const char *value, const char *token)
{
	size_t tl = strlen(token);
	for (const char *p = value; p && *p;) {
		while (*p == ' ' || *p == ',')
			p++;
		if (strncasecmp(p, token, tl) == 0 && (p[tl] == '\0' || p[tl] == ',' || p[tl] == ' '))
			return true;
		p = strchr(p, ',');
	}
	return false;
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

/* The head is complete at [0, head_len): parse it and decide how to read the body. */
static void conn_begin_request(struct http_conn *c, size_t head_len)
{
	const char *why = NULL;
	struct evbuffer *in = bufferevent_get_input(c->bev);

	c->head = malloc(head_len + 1);
	if (c->head == NULL) {
		conn_error(c, 503, "out_of_memory", "out of memory");
		return;
	}
	evbuffer_remove(in, c->head, head_len);
	c->head[head_len] = '\0';
	if (!parse_head(c, &why)) {
		log_info("400 from %s: %s", c->client_ip, why);
		conn_error(c, 400, "bad_request", why);
		return;
	}
	const char *conn_hdr = http_request_header(&c->req, "connection");
	if (c->req.minor == 0)
		c->keepalive = conn_hdr && header_has_token(conn_hdr, "keep-alive");
	else
		c->keepalive = !(conn_hdr && header_has_token(conn_hdr, "close"));
	if (c->srv->draining)
		c->keepalive = false;

	const char *te = http_request_header(&c->req, "transfer-encoding");
	const char *cl = http_request_header(&c->req, "content-length");
	if (te != NULL) {
		if (cl != NULL || strcasecmp(te, "chunked") != 0) {
			log_info("400 from %s: unsupported transfer-encoding", c->client_ip);
			conn_error(c, 400, "bad_request", "unsupported transfer-encoding");
			return;
		}
		if (c->chunks == NULL)
			c->chunks = evbuffer_new();
		c->state = CONN_READ_CHUNKED;
	} else if (cl != NULL) {
		char *end;
		errno = 0;
		unsigned long long n = strtoull(cl, &end, 10);
		if (errno || end == cl || *end != '\0' || cl[0] == '-') {
			log_info("400 from %s: bad content-length", c->client_ip);
			conn_error(c, 400, "bad_request", "malformed content-length");
			return;
		}
		if (n > c->srv->limits.max_body_size) {
			log_info("413 from %s: body of %llu bytes over max_body_size %" PRIu64,
			         c->client_ip, n, c->srv->limits.max_body_size);
			conn_error(c, 413, "request_too_large",
			           "request body is larger than the gateway's max_body_size");
			return;
		}
		c->body_need = (size_t)n;
		c->state = CONN_READ_BODY;
	} else {
		conn_dispatch(c);
		return;
	}
	const char *expect = http_request_header(&c->req, "expect");
	if (expect && strcasecmp(expect, "100-continue") == 0 && c->req.minor >= 1)
		bufferevent_write(c->bev, "HTTP/1.1 100 Continue\r\n\r\n", 25);
}

/* Read chunked body data; returns true when the body is complete. */
static bool conn_read_chunked(struct http_conn *c, bool *failed)
{
	struct evbuffer *in = bufferevent_get_input(c->bev);

	for (;;) {
		if (c->chunk_trailer) {
			size_t n;
			char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
			if (line == NULL)
				return false;
			free(line);
			if (n == 0)
				return true; /* end of trailers */
			continue;
		}
		if (c->chunk_left == 0) {
			size_t n;
			char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
			if (line == NULL) {
				if (evbuffer_get_length(in) > 1024)
					goto bad;
				return false;
			}
			char *end;
			errno = 0;
			unsigned long long size = strtoull(line, &end, 16);
			bool ok = end != line && (*end == '\0' || *end == ';') && !errno;
			free(line);
			if (!ok)
				goto bad;
			if (size == 0) {
				c->chunk_trailer = true;
				continue;
			}
			if (evbuffer_get_length(c->chunks) + size > c->srv->limits.max_body_size) {
				log_info("413 from %s: chunked body over max_body_size", c->client_ip);
				conn_error(c, 413, "request_too_large",
				           "request body is larger than the gateway's max_body_size");
				*failed = true;
				return false;
			}
			c->chunk_left = (size_t)size + 2; /* data + CRLF */
		}
		size_t avail = evbuffer_get_length(in);
		if (avail == 0)
			return false;
		if (c->chunk_left > 2) {
			size_t take = c->chunk_left - 2 < avail ? c->chunk_left - 2 : avail;
			evbuffer_remove_buffer(in, c->chunks, take);
			c->chunk_left -= take;
			continue;
		}
		if (avail < c->chunk_left)
			return false;
		char crlf[2];
		evbuffer_remove(in, crlf, c->chunk_left);
		if (c->chunk_left == 2 && (crlf[0] != '\r' || crlf[1] != '\n'))
			goto bad;
		c->chunk_left = 0;
	}
bad:
	log_info("400 from %s: malformed chunked body", c->client_ip);
	conn_error(c, 400, "bad_request", "malformed chunked request body");
	*failed = true;
	return false;
}

static void conn_process(struct http_conn *c)
{
	struct evbuffer *in;

	while (c->bev != NULL) {
		in = bufferevent_get_input(c->bev);
		size_t avail = evbuffer_get_length(in);
		switch (c->state) {
		case CONN_READ_HEAD: {
			if (avail == 0)
				return;
			/* Tolerate CRLFs between requests (RFC 9112 §2.2). */
			unsigned char first[2];
			while (evbuffer_copyout(in, first, 1) == 1 && (first[0] == '\r' || first[0] == '\n'))
				evbuffer_drain(in, 1);
			avail = evbuffer_get_length(in);
			if (avail == 0)
				return;
			if (!c->request_timer) {
				c->request_timer = true;
				c->req.start_us = http_now_us();
				conn_arm_timer(c, c->srv->limits.client_timeout);
			}
			struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
			if (end.pos < 0) {
				if (avail > c->srv->limits.max_header_size) {
					log_info("431 from %s: request head over max_header_size",
					         c->client_ip);
					conn_error(c, 431, "headers_too_large",
					           "request headers are larger than max_header_size");
				}
				return;
			}
			size_t head_len = (size_t)end.pos + 4;
			if (head_len > c->srv->limits.max_header_size) {
				log_info("431 from %s: request head over max_header_size", c->client_ip);
				conn_error(c, 431, "headers_too_large",
				           "request headers are larger than max_header_size");
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
		case CONN_READ_CHUNKED: {
			bool failed = false;
			if (!conn_read_chunked(c, &failed))
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
		}
		case CONN_HANDLING:
			/* Pipelined bytes wait until the current reply is done; stop
			 * reading if a client floods us meanwhile. */
			if (avail > c->srv->limits.max_header_size)
				bufferevent_disable(c->bev, EV_READ);
			return;
		case CONN_CLOSING:
			evbuffer_drain(in, avail);
			return;
		}
	}
}

static void conn_read_cb(struct bufferevent *bev, void *arg)
{
	conn_process(arg);
}

/* ---------------------------------------------------------------- teardown */

static void conn_close_socket(struct http_conn *c)
{
	if (c->bev) {
		bufferevent_free(c->bev);
		c->bev = NULL;
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
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct http_conn *c = arg;

	/* A TLS listener reports the end of its handshake as CONNECTED: not an end. */
	if (what == BEV_EVENT_CONNECTED)
		return;
	if (!c->handler_owns) {
		conn_free(c);
		return;
	}
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
		conn_free(c); /* idle keep-alive connection */
		return;
	}
	if (c->state == CONN_READ_HEAD || c->state == CONN_READ_BODY ||
	    c->state == CONN_READ_CHUNKED) {
		log_info("408 from %s: request not received within client_timeout", c->client_ip);
		conn_error(c, 408, "request_timeout", "request not received within client_timeout");
		return;
	}
	if (c->state == CONN_CLOSING)
		conn_free(c);
}

/* Called when the handler finishes a request. */
static void conn_finish(struct http_conn *c)
{
	struct http_server *srv = c->srv;

	if (c->handler_owns) {
		c->handler_owns = false;
		atomic_fetch_sub_explicit(&srv->n_active, 1, memory_order_relaxed);
	}
	if (c->bev == NULL) {
		conn_free(c);
		return;
	}
	if (!c->keepalive) {
		c->state = CONN_CLOSING;
		conn_arm_timer(c, srv->limits.write_timeout);
		if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
			conn_free(c);
		return;
	}
	conn_reset_request(c);
	c->state = CONN_READ_HEAD;
	bufferevent_enable(c->bev, EV_READ);
	conn_arm_timer(c, srv->limits.keepalive_timeout);
	/* Pipelined input: handle it from the loop, not from inside this call. */
	if (evbuffer_get_length(bufferevent_get_input(c->bev)) > 0)
		bufferevent_trigger(c->bev, EV_READ, BEV_TRIG_IGNORE_WATERMARKS | BEV_TRIG_DEFER_CALLBACKS);
}

static void conn_write_cb(struct bufferevent *bev, void *arg)
{
	struct http_conn *c = arg;

	if (c->state == CONN_CLOSING) {
		conn_free(c);
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
	return req->conn->bev == NULL;
}

void http_request_abandon(struct http_request *req)
{
	struct http_conn *c = req->conn;
	if (c->bev != NULL)
		c->keepalive = false; /* a half-sent reply must not be followed by another */
	conn_finish(c);
}

void http_response_header(struct http_request *req, const char *name, const char *value)
{
	struct http_conn *c = req->conn;
	if (c->out_headers == NULL)
		c->out_headers = evbuffer_new();
	evbuffer_add_printf(c->out_headers, "%s: %s\r\n", name, value);
}

static void write_head(struct http_conn *c, int status, const char *content_type,
                       long long content_length)
{
	struct evbuffer *out = bufferevent_get_output(c->bev);
	char line[256];
	int n = snprintf(line, sizeof(line), "HTTP/1.%d %d %s\r\n", c->req.minor ? 1 : 0, status,
	                 http_status_text(status));
	evbuffer_add(out, line, (size_t)n);
	if (content_type)
		evbuffer_add_printf(out, "Content-Type: %s\r\n", content_type);
	if (content_length >= 0)
		evbuffer_add_printf(out, "Content-Length: %lld\r\n", content_length);
	else if (c->chunked)
		evbuffer_add(out, "Transfer-Encoding: chunked\r\n", 28);
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

	if (c->bev != NULL && !c->reply_started) {
		write_head(c, status, content_type, (long long)len);
		if (len && strcmp(req->method, "HEAD") != 0)
			evbuffer_add(bufferevent_get_output(c->bev), body, len);
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
	const char *type = status == 413 || status == 431 || status == 400 ? "invalid_request_error"
	                                                                     : "server_error";
	c->keepalive = false;
	bufferevent_disable(c->bev, EV_READ);
	if (c->req.method == NULL)
		c->req.method = "GET"; /* for http_reply's HEAD check */
	c->req.conn = c;
	c->handler_owns = false;
	http_reply_error(&c->req, status, type, code, "%s", msg);
}

void http_reply_start(struct http_request *req, int status, const char *content_type)
{
	struct http_conn *c = req->conn;
	if (c->bev == NULL || c->reply_started)
		return;
	c->chunked = c->req.minor >= 1;
	if (!c->chunked)
		c->keepalive = false; /* HTTP/1.0: the end of the stream is the close */
	write_head(c, status, content_type, -1);
}

void http_reply_chunk(struct http_request *req, const void *data, size_t len)
{
	struct http_conn *c = req->conn;
	if (c->bev == NULL || len == 0)
		return;
	struct evbuffer *out = bufferevent_get_output(c->bev);
	if (c->chunked) {
		char size[24];
		int n = snprintf(size, sizeof(size), "%zx\r\n", len);
		evbuffer_add(out, size, (size_t)n);
		evbuffer_add(out, data, len);
		evbuffer_add(out, "\r\n", 2);
	} else {
		evbuffer_add(out, data, len);
	}
}

void http_reply_chunk_buffer(struct http_request *req, struct evbuffer *buf)
{
	struct http_conn *c = req->conn;
	size_t len = evbuffer_get_length(buf);
	if (c->bev == NULL || len == 0) {
		evbuffer_drain(buf, len);
		return;
	}
	struct evbuffer *out = bufferevent_get_output(c->bev);
	if (c->chunked) {
		char size[24];
		int n = snprintf(size, sizeof(size), "%zx\r\n", len);
		evbuffer_add(out, size, (size_t)n);
		evbuffer_add_buffer(out, buf);
		evbuffer_add(out, "\r\n", 2);
	} else {
		evbuffer_add_buffer(out, buf);
	}
}

void http_reply_end(struct http_request *req)
{
	struct http_conn *c = req->conn;
	if (c->bev != NULL && c->chunked)
		evbuffer_add(bufferevent_get_output(c->bev), "0\r\n\r\n", 5);
	conn_finish(c);
}

size_t http_reply_pending(const struct http_request *req)
{
	const struct http_conn *c = req->conn;
	return c->bev ? evbuffer_get_length(bufferevent_get_output(c->bev)) : 0;
}

void http_reply_on_drain(struct http_request *req, void (*cb)(void *arg), void *arg)
{
	struct http_conn *c = req->conn;
	c->drain_cb = cb;
	c->drain_arg = arg;
}
