/* server.c — request handling of sluice-mockllm: dispatch, admission, timing, streams, faults.
 *
 * A request that needs no delay (no ttft/itl, no hang, no disconnect, no fault) and gets a
 * concurrency slot at once is answered synchronously from the evhttp callback, without
 * any allocation of ours. Everything else gets a struct mock_ctx driven by one timer.
 * What a reply says comes from its plan (plan.c); how it is written, from the endpoint's
 * protocol table (proto_*.c, moderation.c).
 *
 * Client-close detection: evhttp disables reading on the connection before it calls the
 * request callback (evhttp_handle_request) and enables it again only once a reply is
 * being written (evhttp_send_reply_start / _chunk / evhttp_send_reply). So while a
 * request is queued, in its ttft delay or hanging, evhttp does not notice that the
 * client went away. We add our own EV_READ|EV_PERSIST event on the connection's socket
 * for those phases; it peeks for EOF (recv MSG_PEEK) and, on EOF or error, frees the
 * connection, which runs our close callback. Once streaming has started, evhttp's own
 * read side sees the EOF: it detaches the request from the connection (req->evcon =
 * NULL, the request is then ours to free), frees the connection and runs the close
 * callback.
 *
 * Disconnect accounting: a stream with an inter-token delay writes each content delta to
 * the socket as soon as it is generated (ctx_flush), so the count of deltas written when
 * the mock learns of the client's close is exact up to what was on the wire: the close is
 * seen when its FIN/RST arrives, or at the latest when the next write fails.
 */
#include "mockllm.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/event_struct.h>

/* Bytes of header lines queued per write by the endless-headers fault. */
#define RAW_BATCH 16384

enum state { ST_QUEUED, ST_ADMITTED, ST_TTFT, ST_STREAM, ST_HANG, ST_CLOSING, ST_RAW };
enum outcome { OUT_COMPLETED, OUT_CANCELLED, OUT_DISCONNECTED, OUT_FAULT, OUT_STREAM_ERROR };

struct mock_ctx {
	struct mock_worker *w;
	struct evhttp_request *req;
	struct evhttp_connection *evcon;
	struct mock_ctx *prev, *next;   /* worker's list */
	struct mock_ctx *qprev, *qnext; /* app wait queue */
	struct event timer;
	struct event watch; /* peer close while evhttp is not reading */
	struct event raw;   /* endless headers: the socket is writable */
	int watching, raw_on;
	int state;      /* ST_QUEUED -> ST_ADMITTED is written under the app lock */
	int holds_slot; /* written under the app lock */
	int reset;      /* ST_CLOSING ends with a RST */
	long sent;      /* content deltas written */
	uint64_t rec_seq;
	uint64_t raw_line;
	struct evbuffer *body; /* prebuilt non-stream reply; endless headers' staging */
	struct gen g;          /* owns g.own; g.prefix and g.model point into copy */
	char copy[];
};

static void timer_cb(evutil_socket_t fd, short what, void *arg);
static void watch_cb(evutil_socket_t fd, short what, void *arg);
static void close_cb(struct evhttp_connection *evcon, void *arg);
static void ctx_start(struct mock_ctx *c);

/* ------------------------------------------------------------------ replies */

static void add_ctype(struct evhttp_request *req, const char *ctype)
{
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", ctype);
}

static const char *reason_phrase(int code)
{
	switch (code) {
	case 400:
		return "Bad Request";
	case 401:
		return "Unauthorized";
	case 402:
		return "Payment Required";
	case 403:
		return "Forbidden";
	case 404:
		return "Not Found";
	case 408:
		return "Request Timeout";
	case 409:
		return "Conflict";
	case 413:
		return "Payload Too Large";
	case 422:
		return "Unprocessable Entity";
	case 429:
		return "Too Many Requests";
	case 500:
		return "Internal Server Error";
	case 501:
		return "Not Implemented";
	case 502:
		return "Bad Gateway";
	case 503:
		return "Service Unavailable";
	case 504:
		return "Gateway Timeout";
	case 529:
		return "Overloaded";
	default:
		return NULL; /* evhttp's generic phrase */
	}
}

/* An error in the endpoint's shape. code_str NULL gives "code": null (OpenAI). */
static void send_error(struct mock_worker *w, struct evhttp_request *req, const struct proto *pr,
                       int code, const char *type, const char *msg, const char *code_str,
                       long retry_after)
{
	pr->error(w->scratch, code, type, msg, code_str);
	add_ctype(req, "application/json");
	if (retry_after >= 0 && (code == 429 || code == 503 || code == 529)) {
		char tmp[24];

		snprintf(tmp, sizeof(tmp), "%ld", retry_after);
		evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", tmp);
	}
	evhttp_send_reply(req, code, reason_phrase(code), w->scratch);
}

static void send_forced(struct mock_worker *w, struct evhttp_request *req, const struct proto *pr,
                        int status, const char *why, long retry_after)
{
	char msg[96], code[16];

	snprintf(msg, sizeof(msg), "mock: forced status %d%s", status, why);
	snprintf(code, sizeof(code), "%d", status);
	send_error(w, req, pr, status, pr->status_type(status), msg, code, retry_after);
}

/* Response head of a stream; with preamble, the protocol's opening events too. */
static void stream_begin(struct mock_worker *w, struct evhttp_request *req, struct gen *g,
                         int preamble)
{
	struct evkeyvalq *oh = evhttp_request_get_output_headers(req);

	evhttp_add_header(oh, "Content-Type", g->proto->stream_ctype);
	evhttp_add_header(oh, "Cache-Control", "no-cache");
	evhttp_send_reply_start(req, 200, "OK");
	if (preamble && g->proto->start) {
		struct sse s = {req, w->scratch};

		g->proto->start(&s, g);
	}
}

static void stream_delta(struct mock_worker *w, struct evhttp_request *req, struct gen *g, long i)
{
	struct sse s = {req, w->scratch};

	g->proto->delta(&s, g, i);
}

/* The closing events (or, with fail, the mid-stream error) and the end of the body. */
static void stream_end(struct mock_worker *w, struct evhttp_request *req, struct gen *g, int fail)
{
	struct sse s = {req, w->scratch};

	if (fail)
		g->proto->fail(&s, g);
	else
		g->proto->finish(&s, g);
	evhttp_send_reply_end(req);
}

/* Whether stream_error_after ends the stream once `sent` deltas are out. */
static int stream_fails_at(const struct gen *g, long sent)
{
	return g->p.stream_error_after >= 0 && sent >= g->p.stream_error_after &&
	       g->p.stream_error_after <= g->ndeltas;
}

/* 200 text/event-stream with a body of binary junk. */
static void send_junk_sse(struct mock_worker *w, struct evhttp_request *req, const struct gen *g)
{
	struct evkeyvalq *oh = evhttp_request_get_output_headers(req);

	evhttp_add_header(oh, "Content-Type", "text/event-stream");
	evhttp_add_header(oh, "Cache-Control", "no-cache");
	evhttp_send_reply_start(req, 200, "OK");
	fault_junk(w->scratch, (size_t)(g->p.fault_bytes >= 0 ? g->p.fault_bytes : JUNK_SSE_BYTES));
	evhttp_send_reply_chunk(req, w->scratch);
	evhttp_send_reply_end(req);
}

/* ------------------------------------------------------------------ slots and queue */

static void q_unlink(struct mock_app *a, struct mock_ctx *c)
{
	if (c->qprev)
		c->qprev->qnext = c->qnext;
	else
		a->q_head = c->qnext;
	if (c->qnext)
		c->qnext->qprev = c->qprev;
	else
		a->q_tail = c->qprev;
	c->qprev = c->qnext = NULL;
}

static void q_push(struct mock_app *a, struct mock_ctx *c)
{
	c->qnext = NULL;
	c->qprev = a->q_tail;
	if (a->q_tail)
		a->q_tail->qnext = c;
	else
		a->q_head = c;
	a->q_tail = c;
}

/* Hand free slots to waiting requests (FIFO). Lock held. The woken request's timer is
 * activated; event_active is thread-safe when evthread is on (more than one thread). */
static void admit_next_locked(struct mock_app *a)
{
	while (a->q_head != NULL &&
	       (a->cfg.max_concurrency <= 0 || a->st.running < a->cfg.max_concurrency)) {
		struct mock_ctx *c = a->q_head;

		q_unlink(a, c);
		a->st.waiting--;
		a->st.running++;
		c->holds_slot = 1;
		c->state = ST_ADMITTED;
		event_active(&c->timer, EV_TIMEOUT, 1);
	}
}

/* Count how a request ended, in the counters and its record. Lock held. */
static void finish_locked(struct mock_app *a, uint64_t seq, enum outcome o, long deltas)
{
	static const enum rec_outcome rec[] = {
	        [OUT_COMPLETED] = REC_COMPLETED,          [OUT_CANCELLED] = REC_CLIENT_DISCONNECT,
	        [OUT_DISCONNECTED] = REC_MOCK_DISCONNECT, [OUT_FAULT] = REC_FAULT,
	        [OUT_STREAM_ERROR] = REC_STREAM_ERROR,
	};

	switch (o) {
	case OUT_COMPLETED:
		a->st.completed++;
		break;
	case OUT_CANCELLED:
		a->st.cancelled++;
		a->st.last_disconnect_deltas = deltas;
		break;
	case OUT_DISCONNECTED:
		a->st.disconnected++;
		break;
	case OUT_STREAM_ERROR:
		a->st.errors++;
		break;
	case OUT_FAULT:
		break; /* counted in faults when the fault began */
	}
	rec_finish(&a->rec, seq, rec[o], deltas);
}

/* A request that never got a slot or context ends at once. */
static void finish_now(struct mock_app *a, uint64_t seq, enum rec_outcome o, uint64_t *counter)
{
	app_lock(a);
	if (counter)
		(*counter)++;
	rec_finish(&a->rec, seq, o, 0);
	app_unlock(a);
}

/* Forget a request: release its slot or queue place, stop its events, free it. Does not
 * touch the connection or the evhttp request. */
static void ctx_release(struct mock_ctx *c, enum outcome o)
{
	struct mock_worker *w = c->w;
	struct mock_app *a = w->app;

	app_lock(a);
	if (c->state == ST_QUEUED) {
		q_unlink(a, c);
		a->st.waiting--;
	} else if (c->holds_slot) {
		a->st.running--;
		c->holds_slot = 0;
		admit_next_locked(a);
	}
	a->st.active--;
	finish_locked(a, c->rec_seq, o, c->sent);
	app_unlock(a);

	/* After the unlock: nobody can activate our timer any more. */
	if (c->watching)
		event_del(&c->watch);
	if (c->raw_on)
		event_del(&c->raw);
	event_del(&c->timer);
	if (c->prev)
		c->prev->next = c->next;
	else
		w->ctxs = c->next;
	if (c->next)
		c->next->prev = c->prev;
	if (c->body)
		evbuffer_free(c->body);
	plan_free(&c->g);
	free(c);
}

/* The client went away (or the connection failed). */
static void close_cb(struct evhttp_connection *evcon, void *arg)
{
	struct mock_ctx *c = arg;
	struct evhttp_request *req = c->req;
	/* evhttp detaches a request still in progress when the connection hits EOF while
	 * writing; it is then ours to free. When we free the connection ourselves the request
	 * is still attached and evhttp frees it. */
	int detached = evhttp_request_get_connection(req) == NULL;
	enum outcome o = OUT_CANCELLED;

	(void)evcon;
	if (c->state == ST_CLOSING)
		o = c->reset ? OUT_FAULT : OUT_DISCONNECTED;
	ctx_release(c, o);
	if (detached)
		evhttp_request_free(req);
}

/* Close the connection without (the rest of) a reply. */
static void ctx_abort(struct mock_ctx *c, enum outcome o)
{
	struct evhttp_connection *evcon = c->evcon;

	evhttp_connection_set_closecb(evcon, NULL, NULL);
	ctx_release(c, o);
	evhttp_connection_free(evcon);
}

/* The same with a RST instead of a FIN. */
static void ctx_reset_now(struct mock_ctx *c)
{
	struct evhttp_connection *evcon = c->evcon;
	int fd = bufferevent_getfd(evhttp_connection_get_bufferevent(evcon));

	evhttp_connection_set_closecb(evcon, NULL, NULL);
	ctx_release(c, OUT_FAULT);
	fault_reset_fd(fd);
	evhttp_connection_free(evcon);
}

/* The client is gone (a write failed): free the connection, which runs close_cb. */
static void ctx_client_gone(struct mock_ctx *c)
{
	evhttp_connection_free(c->evcon);
}

/* Peer-close detection while evhttp is not reading (see the top of the file). */
static void watch_cb(evutil_socket_t fd, short what, void *arg)
{
	struct mock_ctx *c = arg;
	char ch;

	(void)what;
	for (;;) {
		ssize_t n = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);

		if (n > 0) {
			/* The client sent more (pipelining). Move it into evhttp's input buffer,
			 * which evhttp parses after this reply, so an EOF behind it is seen. */
			struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);
			struct evbuffer *in = bufferevent_get_input(bev);
			int r;

			if (evbuffer_get_length(in) > (1u << 20)) {
				event_del(&c->watch);
				c->watching = 0;
				return;
			}
			r = evbuffer_read(in, fd, 65536);
			if (r > 0)
				continue;
			if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
				return;
			break; /* EOF or error */
		}
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			return;
		break;
	}
	/* Runs close_cb, which releases c; the request is still attached: evhttp frees it. */
	evhttp_connection_free(c->evcon);
}

static void add_ms(struct event *ev, long ms)
{
	struct timeval tv = {ms / 1000, (ms % 1000) * 1000};

	evtimer_add(ev, &tv);
}

static void ctx_start(struct mock_ctx *c)
{
	if (c->g.p.hang) {
		c->state = ST_HANG;
		return;
	}
	c->state = ST_TTFT;
	add_ms(&c->timer, c->g.p.ttft_ms);
}

static void ctx_unwatch(struct mock_ctx *c)
{
	if (c->watching) {
		event_del(&c->watch);
		c->watching = 0;
	}
}

/* Hand what evhttp has queued to the socket now. Returns -1 when the client is gone; a
 * full socket is not an error (the bufferevent writes the rest when it drains). A socket
 * bufferevent freezes the start of its output buffer and lifts the freeze only around its
 * own writes (a frozen buffer refuses evbuffer_write with -1 and a stale errno), so we do
 * the same. */
static int ctx_flush(struct mock_ctx *c)
{
	struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);
	struct evbuffer *out = bufferevent_get_output(bev);
	int fd = bufferevent_getfd(bev);
	int rc = 0;

	evbuffer_unfreeze(out, 1);
	while (evbuffer_get_length(out) > 0) {
		int n;

		errno = 0;
		n = evbuffer_write(out, fd);
		if (n > 0)
			continue;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			rc = -1;
		break;
	}
	evbuffer_freeze(out, 1);
	return rc;
}

static void ctx_try_close(struct mock_ctx *c)
{
	struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);

	/* Let what was sent reach the socket, then close: the client sees N tokens and EOF
	 * (or the reset). */
	if (evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
		add_ms(&c->timer, 1);
		return;
	}
	if (c->reset)
		ctx_reset_now(c);
	else
		ctx_abort(c, OUT_DISCONNECTED);
}

/* What the stream does once `sent` deltas are out, other than the next delta. */
enum step { STEP_DELTA, STEP_DISCONNECT, STEP_RESET, STEP_STALL, STEP_FAIL, STEP_FINISH };

static enum step next_step(const struct gen *g, long sent)
{
	const struct mock_params *p = &g->p;

	if (p->disconnect_after >= 0 && sent >= p->disconnect_after)
		return STEP_DISCONNECT;
	if (p->fault == FAULT_RESET && sent >= p->fault_after)
		return STEP_RESET;
	if (p->fault == FAULT_STALL && sent >= p->fault_after)
		return STEP_STALL;
	if (stream_fails_at(g, sent))
		return STEP_FAIL;
	if (sent >= g->ndeltas)
		return STEP_FINISH;
	return STEP_DELTA;
}

static void ctx_stream_step(struct mock_ctx *c)
{
	struct mock_worker *w = c->w;
	struct gen *g = &c->g;

	for (;;) {
		switch (next_step(g, c->sent)) {
		case STEP_DISCONNECT:
		case STEP_RESET:
			c->reset = next_step(g, c->sent) == STEP_RESET;
			c->state = ST_CLOSING;
			ctx_try_close(c);
			return;
		case STEP_STALL:
			c->state = ST_HANG;
			return;
		case STEP_FAIL:
		case STEP_FINISH: {
			int fail = next_step(g, c->sent) == STEP_FAIL;

			evhttp_connection_set_closecb(c->evcon, NULL, NULL);
			stream_end(w, c->req, g, fail);
			ctx_release(c, fail ? OUT_STREAM_ERROR : OUT_COMPLETED);
			return;
		}
		case STEP_DELTA:
			break;
		}
		stream_delta(w, c->req, g, c->sent++);
		if (g->p.itl_ms > 0) {
			/* Each delta reaches the socket before the next is made (see the top). */
			if (ctx_flush(c) != 0) {
				c->sent--;
				ctx_client_gone(c);
				return;
			}
			if (next_step(g, c->sent) == STEP_DELTA) {
				add_ms(&c->timer, g->p.itl_ms);
				return;
			}
		}
	}
}

static void raw_cb(evutil_socket_t fd, short what, void *arg)
{
	struct mock_ctx *c = arg;
	int n;

	(void)what;
	if (evbuffer_get_length(c->body) == 0)
		fault_header_lines(c->body, RAW_BATCH, &c->raw_line);
	n = evbuffer_write(c->body, fd);
	if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
		ctx_client_gone(c);
}

/* Endless headers: evhttp steps aside and we write the socket until the client leaves. */
static void ctx_raw_start(struct mock_ctx *c)
{
	struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);

	if (c->body == NULL)
		c->body = evbuffer_new();
	if (c->body == NULL) {
		ctx_abort(c, OUT_FAULT);
		return;
	}
	evbuffer_drain(c->body, evbuffer_get_length(c->body));
	ADD_LIT(c->body, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n");
	bufferevent_disable(bev, EV_READ | EV_WRITE);
	event_assign(&c->raw, c->w->base, bufferevent_getfd(bev), EV_WRITE | EV_PERSIST, raw_cb, c);
	event_add(&c->raw, NULL);
	c->raw_on = 1;
	c->state = ST_RAW;
}

static void ctx_first_output(struct mock_ctx *c)
{
	struct mock_worker *w = c->w;
	struct gen *g = &c->g;
	int fault = g->p.fault;

	if (fault != FAULT_NONE && fault != FAULT_BIG_EVENT) {
		app_lock(w->app);
		w->app->st.faults++;
		app_unlock(w->app);
	}
	switch (fault) {
	case FAULT_GARBAGE:
		fault_garbage(bufferevent_getfd(evhttp_connection_get_bufferevent(c->evcon)));
		ctx_abort(c, OUT_FAULT);
		return;
	case FAULT_ENDLESS_HEADERS:
		ctx_raw_start(c);
		return;
	case FAULT_JUNK_SSE:
		evhttp_connection_set_closecb(c->evcon, NULL, NULL);
		send_junk_sse(w, c->req, g);
		ctx_release(c, OUT_FAULT);
		return;
	default:
		break;
	}
	if (!g->stream) {
		struct evhttp_request *req = c->req;

		if (g->p.disconnect_after >= 0) {
			ctx_abort(c, OUT_DISCONNECTED);
			return;
		}
		if (fault == FAULT_RESET) {
			ctx_reset_now(c);
			return;
		}
		if (fault == FAULT_STALL) {
			ctx_unwatch(c); /* evhttp reads again once a reply has started */
			add_ctype(req, "application/json");
			evhttp_send_reply_start(req, 200, "OK");
			c->state = ST_HANG;
			return;
		}
		evhttp_connection_set_closecb(c->evcon, NULL, NULL);
		add_ctype(req, "application/json");
		evhttp_send_reply(req, 200, "OK", c->body);
		ctx_release(c, OUT_COMPLETED);
		return;
	}
	ctx_unwatch(c);
	/* A reset or stall after 0 deltas comes right after the head: no event at all. */
	stream_begin(w, c->req, g,
	             !((fault == FAULT_RESET || fault == FAULT_STALL) && g->p.fault_after == 0));
	c->state = ST_STREAM;
	ctx_stream_step(c);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct mock_ctx *c = arg;

	(void)fd;
	(void)what;
	switch (c->state) {
	case ST_ADMITTED:
		ctx_start(c);
		break;
	case ST_TTFT:
		ctx_first_output(c);
		break;
	case ST_STREAM:
		ctx_stream_step(c);
		break;
	case ST_CLOSING:
		ctx_try_close(c);
		break;
	default:
		break;
	}
}

void mock_worker_drop_requests(struct mock_worker *w)
{
	struct mock_ctx *c = w->ctxs;

	while (c != NULL) {
		struct mock_ctx *next = c->next;

		if (evhttp_request_get_connection(c->req) != NULL)
			evhttp_connection_set_closecb(c->evcon, NULL, NULL);
		else
			evhttp_request_free(c->req);
		if (c->watching)
			event_del(&c->watch);
		if (c->raw_on)
			event_del(&c->raw);
		event_del(&c->timer);
		if (c->body)
			evbuffer_free(c->body);
		plan_free(&c->g);
		free(c);
		c = next;
	}
	w->ctxs = NULL;
	/* Queue entries of this worker are gone; the queue is only used while running. */
	w->app->q_head = w->app->q_tail = NULL;
}

/* ------------------------------------------------------------------ generation */

static const char *json_str_or(json_t *v, const char *dflt, size_t *len)
{
	if (json_is_string(v)) {
		*len = json_string_length(v);
		return json_string_value(v);
	}
	*len = dflt ? strlen(dflt) : 0;
	return dflt;
}

static int needs_async(const struct gen *g, int admitted)
{
	const struct mock_params *p = &g->p;

	return !admitted || p->hang || p->ttft_ms > 0 || p->disconnect_after >= 0 ||
	       p->fault != FAULT_NONE || (g->stream && p->itl_ms > 0 && g->ndeltas > 1);
}

static void handle_gen(struct mock_worker *w, struct evhttp_request *req, enum kind kind,
                       const struct proto *pr, const char *body, size_t blen, uint64_t seq)
{
	struct mock_app *a = w->app;
	struct gen g;
	json_t *root, *hold = NULL;
	json_error_t jerr;
	const char *why;
	int admitted;
	struct mock_ctx *c;
	size_t copy;

	memset(&g, 0, sizeof(g));
	g.kind = kind;
	g.proto = pr;
	g.cfg = &a->cfg;
	g.p = a->cfg.defaults;
	params_headers(req, &g.p, &hold);

	root = json_loadb(body, blen, JSON_ALLOW_NUL, &jerr);
	if (root == NULL || !json_is_object(root)) {
		char msg[256];

		if (root == NULL)
			snprintf(msg, sizeof(msg), "mock: invalid JSON body: %s", jerr.text);
		else
			snprintf(msg, sizeof(msg), "mock: the request body must be a JSON object");
		finish_now(a, seq, REC_INVALID, NULL);
		send_error(w, req, pr, 400, "invalid_request_error", msg, "invalid_json", -1);
		goto out;
	}
	params_body(root, &g.p);
	why = pr->validate ? pr->validate(req, root) : NULL;
	if (why != NULL) {
		finish_now(a, seq, REC_INVALID, NULL);
		send_error(w, req, pr, 400, "invalid_request_error", why, NULL, -1);
		goto out;
	}

	g.model = json_str_or(json_object_get(root, "model"), a->cfg.model, &g.model_len);
	if (kind == K_RESP)
		g.prev_id = json_str_or(json_object_get(root, "previous_response_id"), NULL,
		                        &g.prev_id_len);
	if (pr->delta != NULL) {
		json_t *so = json_object_get(root, "stream_options");

		g.stream = json_is_true(json_object_get(root, "stream"));
		g.usage_chunk = g.stream && pr->prefix && json_is_object(so) &&
		                json_is_true(json_object_get(so, "include_usage")) && !g.p.no_usage;
	}

	if (g.p.status != 0 && (g.p.status < 200 || g.p.status > 299)) {
		finish_now(a, seq, REC_ERROR, &a->st.errors);
		send_forced(w, req, pr, g.p.status, "", g.p.retry_after);
		goto out;
	}
	if (g.p.error_rate > 0 && rng_double(&w->rng) < g.p.error_rate) {
		finish_now(a, seq, REC_ERROR, &a->st.errors);
		send_forced(w, req, pr, 500, " (error-rate)", g.p.retry_after);
		goto out;
	}
	if (plan_build(&g, root) != 0) {
		send_error(w, req, pr, 500, pr->status_type(500), "mock: out of memory", NULL, -1);
		goto out;
	}

	/* Admission: a slot, a place in the queue, or 429. */
	app_lock(a);
	if (a->cfg.max_concurrency <= 0 || a->st.running < a->cfg.max_concurrency) {
		a->st.running++;
		admitted = 1;
	} else if (a->st.waiting < a->cfg.queue) {
		a->st.waiting++;
		admitted = 0;
	} else {
		a->st.rejected++;
		rec_finish(&a->rec, seq, REC_REJECTED, 0);
		app_unlock(a);
		send_error(w, req, pr, 429, "rate_limit_error",
		           "mock: too many concurrent requests (max-concurrency and queue full)",
		           "429", g.p.retry_after);
		goto out;
	}
	a->st.active++;
	if (a->st.active > a->st.max_active)
		a->st.max_active = a->st.active;
	app_unlock(a);

	g.id = __atomic_add_fetch(&a->next_id, 1, __ATOMIC_RELAXED);
	g.created = (long long)time(NULL);
	if (g.stream && pr->prefix) {
		struct evbuffer *pb = w->pfx;

		evbuffer_drain(pb, evbuffer_get_length(pb));
		pr->prefix(pb, &g);
		g.prefix_len = evbuffer_get_length(pb);
		g.prefix = (const char *)evbuffer_pullup(pb, -1);
	}

	if (!needs_async(&g, admitted)) {
		enum outcome o = OUT_COMPLETED;
		long n = 0;

		if (g.stream) {
			int fail = stream_fails_at(&g, g.p.stream_error_after);

			n = fail ? g.p.stream_error_after : g.ndeltas;
			stream_begin(w, req, &g, 1);
			for (long i = 0; i < n; i++)
				stream_delta(w, req, &g, i);
			stream_end(w, req, &g, fail);
			o = fail ? OUT_STREAM_ERROR : OUT_COMPLETED;
		} else {
			pr->body(w->scratch, &g, root);
			add_ctype(req, "application/json");
			evhttp_send_reply(req, 200, "OK", w->scratch);
		}
		app_lock(a);
		a->st.running--;
		a->st.active--;
		finish_locked(a, seq, o, n);
		admit_next_locked(a);
		app_unlock(a);
		goto out;
	}

	copy = g.prefix_len + plan_borrowed_size(&g);
	c = calloc(1, sizeof(*c) + copy);
	if (c != NULL && !g.stream) {
		c->body = evbuffer_new();
		if (c->body == NULL) {
			free(c);
			c = NULL;
		}
	}
	if (c == NULL) {
		app_lock(a);
		if (admitted) {
			a->st.running--;
			admit_next_locked(a);
		} else {
			a->st.waiting--;
		}
		a->st.active--;
		app_unlock(a);
		send_error(w, req, pr, 500, pr->status_type(500), "mock: out of memory", NULL, -1);
		goto out;
	}
	c->w = w;
	c->req = req;
	c->evcon = evhttp_request_get_connection(req);
	c->rec_seq = seq;
	c->g = g;
	g.own = NULL; /* the context owns the plan now */
	if (g.prefix_len) {
		memcpy(c->copy, g.prefix, g.prefix_len);
		c->g.prefix = c->copy;
	}
	plan_adopt(&c->g, c->copy + g.prefix_len);
	if (!g.stream)
		pr->body(c->body, &c->g, root);

	evtimer_assign(&c->timer, w->base, timer_cb, c);
	event_assign(&c->watch, w->base,
	             bufferevent_getfd(evhttp_connection_get_bufferevent(c->evcon)),
	             EV_READ | EV_PERSIST, watch_cb, c);
	event_add(&c->watch, NULL);
	c->watching = 1;
	evhttp_connection_set_closecb(c->evcon, close_cb, c);
	c->next = w->ctxs;
	if (w->ctxs)
		w->ctxs->prev = c;
	w->ctxs = c;

	if (admitted) {
		c->holds_slot = 1;
		c->state = ST_ADMITTED;
		ctx_start(c);
		goto out;
	}
	app_lock(a);
	if (a->q_head == NULL && a->st.running < a->cfg.max_concurrency) {
		/* A slot was freed between the two locks. */
		a->st.waiting--;
		a->st.running++;
		c->holds_slot = 1;
		c->state = ST_ADMITTED;
		app_unlock(a);
		ctx_start(c);
		goto out;
	}
	c->state = ST_QUEUED;
	q_push(a, c);
	app_unlock(a);
out:
	plan_free(&g);
	json_decref(root);
	json_decref(hold);
}

/* ------------------------------------------------------------------ other endpoints */

static void handle_stats(struct mock_worker *w, struct evhttp_request *req)
{
	struct mock_app *a = w->app;
	struct mock_stats s;

	app_lock(a);
	s = a->st;
	app_unlock(a);
	evbuffer_add_printf(
	        w->scratch,
	        "{\"requests\":%llu,\"completed\":%llu,\"cancelled\":%llu,\"active\":%ld,"
	        "\"running\":%ld,\"waiting\":%ld,\"max_active\":%ld,"
	        "\"all_requests\":%llu,\"disconnected\":%llu,\"rejected\":%llu,"
	        "\"errors\":%llu,\"client_disconnects\":%llu,"
	        "\"last_disconnect_deltas\":%ld,\"faults\":%llu}",
	        (unsigned long long)s.requests, (unsigned long long)s.completed,
	        (unsigned long long)s.cancelled, s.active, s.running, s.waiting, s.max_active,
	        (unsigned long long)s.all_requests, (unsigned long long)s.disconnected,
	        (unsigned long long)s.rejected, (unsigned long long)s.errors,
	        (unsigned long long)s.cancelled, s.last_disconnect_deltas,
	        (unsigned long long)s.faults);
	add_ctype(req, "application/json");
	evhttp_send_reply(req, 200, "OK", w->scratch);
}

static void free_cb(const void *data, size_t len, void *arg)
{
	(void)len;
	(void)arg;
	free((void *)data);
}

static void handle_mock_api(struct mock_worker *w, struct evhttp_request *req, const char *path,
                            enum evhttp_cmd_type cmd)
{
	struct mock_app *a = w->app;

	if (!strcmp(path, "/_mock/requests") && cmd == EVHTTP_REQ_GET) {
		char *s;

		app_lock(a);
		s = rec_dump(&a->rec);
		app_unlock(a);
		if (s == NULL) {
			send_error(w, req, &proto_chat, 500, "server_error", "mock: out of memory",
			           NULL, -1);
			return;
		}
		evbuffer_add_reference(w->scratch, s, strlen(s), free_cb, NULL);
		add_ctype(req, "application/json");
		evhttp_send_reply(req, 200, "OK", w->scratch);
		return;
	}
	if (!strcmp(path, "/_mock/requests") && cmd == EVHTTP_REQ_DELETE) {
		app_lock(a);
		rec_clear(&a->rec);
		a->st.requests = a->st.all_requests = 0;
		a->st.completed = a->st.cancelled = a->st.disconnected = 0;
		a->st.rejected = a->st.errors = a->st.faults = 0;
		a->st.last_disconnect_deltas = -1;
		a->st.max_active = a->st.active;
		app_unlock(a);
		ADD_LIT(w->scratch, "{\"ok\":true}");
		add_ctype(req, "application/json");
		evhttp_send_reply(req, 200, "OK", w->scratch);
		return;
	}
	if (!strcmp(path, "/_mock/stats") && (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD)) {
		handle_stats(w, req);
		return;
	}
	send_error(w, req, &proto_chat, 404, "not_found_error", "mock: unknown /_mock endpoint",
	           "not_found", -1);
}

static void gauge(struct evbuffer *b, const char *name, const char *help, const char *model,
                  const char *fmt_value, double v)
{
	evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s gauge\n%s{model_name=\"", name, help, name,
	                    name);
	prom_escape(b, model);
	ADD_LIT(b, "\"} ");
	evbuffer_add_printf(b, fmt_value, v);
	ADD_LIT(b, "\n");
}

static void counter(struct evbuffer *b, const char *name, const char *help, uint64_t v)
{
	evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
	                    (unsigned long long)v);
}

static void handle_metrics(struct mock_worker *w, struct evhttp_request *req)
{
	struct mock_app *a = w->app;
	struct evbuffer *b = w->scratch;
	struct mock_stats s;
	double kv = 0;

	app_lock(a);
	s = a->st;
	app_unlock(a);
	if (a->cfg.max_concurrency > 0)
		kv = (double)s.running / (double)a->cfg.max_concurrency;
	gauge(b, "vllm:num_requests_running", "Number of requests currently running.", a->cfg.model,
	      "%.0f", (double)s.running);
	gauge(b, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
	      a->cfg.model, "%.0f", (double)s.waiting);
	gauge(b, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
	      a->cfg.model, "%g", kv);
	counter(b, "mockllm_requests_total", "Generation requests received.",
	        s.requests);
	counter(b, "mockllm_cancelled_total",
	        "Requests whose client went away before the reply was finished.", s.cancelled);
	counter(b, "mockllm_completed_total", "Requests answered completely.", s.completed);
	add_ctype(req, "text/plain; version=0.0.4");
	evhttp_send_reply(req, 200, "OK", b);
}

static const char *method_name(enum evhttp_cmd_type cmd)
{
	switch (cmd) {
	case EVHTTP_REQ_GET:
		return "GET";
	case EVHTTP_REQ_POST:
		return "POST";
	case EVHTTP_REQ_HEAD:
		return "HEAD";
	case EVHTTP_REQ_PUT:
		return "PUT";
	case EVHTTP_REQ_DELETE:
		return "DELETE";
	case EVHTTP_REQ_OPTIONS:
		return "OPTIONS";
	case EVHTTP_REQ_TRACE:
		return "TRACE";
	case EVHTTP_REQ_CONNECT:
		return "CONNECT";
	case EVHTTP_REQ_PATCH:
		return "PATCH";
	}
	return "UNKNOWN";
}

/* POST endpoints, by the end of the path; the first match wins. */
static const struct {
	const char *suffix;
	enum kind kind;
	const struct proto *proto;
} ROUTES[] = {
        {"/chat/completions", K_CHAT, &proto_chat},
        {"/completions", K_COMPL, &proto_completions},
        {"/embeddings", K_EMB, &proto_embeddings},
        {"/messages/count_tokens", K_COUNT, &proto_count_tokens},
        {"/messages", K_MSG, &proto_messages},
        {"/responses", K_RESP, &proto_responses},
        {"/moderations", K_MOD, &proto_moderations},
};

void mock_handle(struct evhttp_request *req, void *arg)
{
	struct mock_worker *w = arg;
	struct mock_app *a = w->app;
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
	const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
	struct evbuffer *in = evhttp_request_get_input_buffer(req);
	size_t blen = evbuffer_get_length(in);
	const char *body = blen ? (const char *)evbuffer_pullup(in, -1) : "";
	enum kind kind = K_NONE;
	const struct proto *pr = NULL;
	uint64_t seq;
	size_t plen;

	if (path == NULL || *path == '\0')
		path = "/";
	if (!strncmp(path, "/_mock/", 7)) {
		handle_mock_api(w, req, path, cmd);
		return;
	}
	if (!strcmp(path, "/metrics")) {
		handle_metrics(w, req);
		return;
	}
	plen = strlen(path);
	if (cmd == EVHTTP_REQ_POST) {
		for (size_t i = 0; i < sizeof(ROUTES) / sizeof(ROUTES[0]); i++) {
			if (ends_with(path, plen, ROUTES[i].suffix)) {
				kind = ROUTES[i].kind;
				pr = ROUTES[i].proto;
				break;
			}
		}
	}

	app_lock(a);
	a->st.all_requests++;
	if (kind != K_NONE)
		a->st.requests++;
	seq = rec_add(&a->rec, method_name(cmd), path, query, evhttp_request_get_input_headers(req),
	              body, blen, now_unix());
	app_unlock(a);

	if (kind != K_NONE) {
		handle_gen(w, req, kind, pr, body, blen, seq);
		return;
	}
	if (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD) {
		if (ends_with(path, plen, "/models")) {
			ADD_LIT(w->scratch, "{\"object\":\"list\",\"data\":[{\"id\":\"");
			json_escape(w->scratch, a->cfg.model, strlen(a->cfg.model));
			ADD_LIT(w->scratch, "\",\"object\":\"model\",\"created\":0,"
			                    "\"owned_by\":\"mock\"}]}");
			add_ctype(req, "application/json");
			evhttp_send_reply(req, 200, "OK", w->scratch);
			return;
		}
		if (ends_with(path, plen, "/health")) {
			ADD_LIT(w->scratch, "ok");
			add_ctype(req, "text/plain");
			evhttp_send_reply(req, 200, "OK", w->scratch);
			return;
		}
	}
	send_error(w, req, &proto_chat, 404, "not_found_error", "mock: no such endpoint",
	           "not_found", -1);
}
