/* server.c — request handling of sluice-mockllm.
 *
 * A request that needs no delay (no ttft/itl, no hang, no disconnect) and gets a
 * concurrency slot at once is answered synchronously from the evhttp callback, without
 * any allocation of ours. Everything else gets a struct mock_ctx driven by one timer.
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
#include <jansson.h>

#define MAX_TOKENS 10000000L
#define MAX_DELAY_MS (24L * 3600 * 1000)

static const char *const WORDS[] = {
	"lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
	"sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
	"dolore", "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis",
	"nostrud", "exercitation", "ullamco", "laboris", "nisi", "aliquip", "ex", "ea",
};
#define ADD_LIT(b, lit) evbuffer_add((b), (lit), sizeof(lit) - 1)
#define NWORDS (sizeof(WORDS) / sizeof(WORDS[0]))

enum kind { K_NONE, K_CHAT, K_COMPL, K_EMB };
enum state { ST_QUEUED, ST_ADMITTED, ST_TTFT, ST_STREAM, ST_HANG, ST_CLOSING };
enum outcome { OUT_COMPLETED, OUT_CANCELLED, OUT_DISCONNECTED };

struct gen {
	enum kind kind;
	int stream;
	int usage_chunk; /* stream with include_usage: final usage chunk, "usage":null elsewhere */
	int finish_length;
	long ntok;
	long prompt_tokens;
	struct mock_params p;
	const char *prefix; /* SSE event JSON up to and including "choices":[ */
	size_t prefix_len;
};

struct mock_ctx {
	struct mock_worker *w;
	struct evhttp_request *req;
	struct evhttp_connection *evcon;
	struct mock_ctx *prev, *next;   /* worker's list */
	struct mock_ctx *qprev, *qnext; /* app wait queue */
	struct event timer;
	struct event watch;
	int watching;
	int state;      /* ST_QUEUED -> ST_ADMITTED is written under the app lock */
	int holds_slot; /* written under the app lock */
	long sent;
	struct evbuffer *body; /* prebuilt non-stream reply */
	struct gen g;
	char prefix[];
};

static void timer_cb(evutil_socket_t fd, short what, void *arg);
static void watch_cb(evutil_socket_t fd, short what, void *arg);
static void close_cb(struct evhttp_connection *evcon, void *arg);

/* ------------------------------------------------------------------ replies */

static void add_ctype(struct evhttp_request *req, const char *ctype)
{
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", ctype);
}

static const char *reason_phrase(int code)
{
	switch (code) {
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 402: return "Payment Required";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 408: return "Request Timeout";
	case 409: return "Conflict";
	case 413: return "Payload Too Large";
	case 422: return "Unprocessable Entity";
	case 429: return "Too Many Requests";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	case 529: return "Overloaded";
	default: return NULL; /* evhttp's generic phrase */
	}
}

/* OpenAI error shape. code_str NULL gives "code": null. */
static void send_error(struct mock_worker *w, struct evhttp_request *req, int code,
		       const char *type, const char *msg, const char *code_str, long retry_after)
{
	struct evbuffer *b = w->scratch;

	ADD_LIT(b, "{\"error\":{\"message\":\"");
	json_escape(b, msg, strlen(msg));
	ADD_LIT(b, "\",\"type\":\"");
	evbuffer_add(b, type, strlen(type));
	ADD_LIT(b, "\",\"param\":null,\"code\":");
	if (code_str) {
		ADD_LIT(b, "\"");
		json_escape(b, code_str, strlen(code_str));
		ADD_LIT(b, "\"}}");
	} else {
		ADD_LIT(b, "null}}");
	}
	add_ctype(req, "application/json");
	if (retry_after >= 0 && (code == 429 || code == 503)) {
		char tmp[24];

		snprintf(tmp, sizeof(tmp), "%ld", retry_after);
		evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", tmp);
	}
	evhttp_send_reply(req, code, reason_phrase(code), b);
}

static void send_forced(struct mock_worker *w, struct evhttp_request *req, int status,
			const char *why, long retry_after)
{
	char msg[96], code[16];

	snprintf(msg, sizeof(msg), "mock: forced status %d%s", status, why);
	snprintf(code, sizeof(code), "%d", status);
	send_error(w, req, status, status == 429 ? "rate_limit_error" : "mock_error", msg, code,
		   retry_after);
}

static void add_word(struct evbuffer *b, long i)
{
	const char *word = WORDS[(size_t)i % NWORDS];

	if (i > 0)
		ADD_LIT(b, " ");
	evbuffer_add(b, word, strlen(word));
}

static void add_usage(struct evbuffer *b, long prompt, long completion)
{
	evbuffer_add_printf(b, "\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,"
			       "\"total_tokens\":%ld}",
			    prompt, completion, prompt + completion);
}

/* Non-stream chat / legacy completion body. */
static void build_completion(struct evbuffer *b, const struct gen *g, uint64_t id,
			     const char *model, size_t model_len)
{
	const char *finish = g->finish_length ? "length" : "stop";

	if (g->kind == K_CHAT)
		evbuffer_add_printf(b, "{\"id\":\"chatcmpl-%llu\",\"object\":\"chat.completion\","
				       "\"created\":%lld,\"model\":\"",
				    (unsigned long long)id, (long long)time(NULL));
	else
		evbuffer_add_printf(b, "{\"id\":\"cmpl-%llu\",\"object\":\"text_completion\","
				       "\"created\":%lld,\"model\":\"",
				    (unsigned long long)id, (long long)time(NULL));
	json_escape(b, model, model_len);
	if (g->kind == K_CHAT)
		ADD_LIT(b, "\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
				"\"content\":\"");
	else
		ADD_LIT(b, "\",\"choices\":[{\"index\":0,\"text\":\"");
	for (long i = 0; i < g->ntok; i++)
		add_word(b, i);
	if (g->kind == K_CHAT)
		ADD_LIT(b, "\"}");
	else
		ADD_LIT(b, "\"");
	evbuffer_add_printf(b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}]", finish);
	if (!g->p.no_usage) {
		ADD_LIT(b, ",");
		add_usage(b, g->prompt_tokens, g->ntok);
	}
	ADD_LIT(b, "}");
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
	const unsigned char *p = data;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void add_embedding(struct evbuffer *b, size_t index, uint64_t h)
{
	uint64_t st = h ? h : 0x9E3779B97F4A7C15ULL;

	evbuffer_add_printf(b, "%s{\"object\":\"embedding\",\"index\":%zu,\"embedding\":[",
			    index ? "," : "", index);
	for (int k = 0; k < 8; k++)
		evbuffer_add_printf(b, "%s%.6f", k ? "," : "", rng_double(&st) * 2.0 - 1.0);
	ADD_LIT(b, "]}");
}

/* Hash of one embedding input: a string or an array of token ids. */
static uint64_t input_hash(json_t *v)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	if (json_is_string(v))
		return fnv1a(h, json_string_value(v), json_string_length(v));
	if (json_is_array(v)) {
		size_t i;
		json_t *x;

		json_array_foreach (v, i, x) {
			json_int_t t = json_integer_value(x);

			h = fnv1a(h, &t, sizeof(t));
		}
	}
	return h;
}

static int is_token_array(json_t *v)
{
	return json_is_array(v) && (json_array_size(v) == 0 || json_is_integer(json_array_get(v, 0)));
}

static void build_embeddings(struct evbuffer *b, const struct gen *g, json_t *input,
			     const char *model, size_t model_len)
{
	size_t n = 0;

	ADD_LIT(b, "{\"object\":\"list\",\"data\":[");
	if (json_is_array(input) && !is_token_array(input)) {
		size_t i;
		json_t *x;

		json_array_foreach (input, i, x)
			add_embedding(b, n++, input_hash(x));
	} else if (input != NULL) {
		add_embedding(b, n++, input_hash(input));
	}
	ADD_LIT(b, "],\"model\":\"");
	json_escape(b, model, model_len);
	ADD_LIT(b, "\"");
	if (!g->p.no_usage)
		evbuffer_add_printf(b, ",\"usage\":{\"prompt_tokens\":%ld,\"total_tokens\":%ld}",
				    g->prompt_tokens, g->prompt_tokens);
	ADD_LIT(b, "}");
}

/* ------------------------------------------------------------------ SSE events */

static void ev_begin(struct evbuffer *b, const struct gen *g)
{
	ADD_LIT(b, "data: ");
	evbuffer_add(b, g->prefix, g->prefix_len);
}

static void ev_end(struct evbuffer *b, const struct gen *g)
{
	if (g->usage_chunk)
		ADD_LIT(b, "],\"usage\":null}\n\n");
	else
		ADD_LIT(b, "]}\n\n");
}

static void stream_start(struct mock_worker *w, struct evhttp_request *req, const struct gen *g)
{
	struct evkeyvalq *oh = evhttp_request_get_output_headers(req);

	evhttp_add_header(oh, "Content-Type", "text/event-stream");
	evhttp_add_header(oh, "Cache-Control", "no-cache");
	evhttp_send_reply_start(req, 200, "OK");
	if (g->kind == K_CHAT) {
		ev_begin(w->scratch, g);
		ADD_LIT(w->scratch, "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
			     "\"logprobs\":null,\"finish_reason\":null}");
		ev_end(w->scratch, g);
		evhttp_send_reply_chunk(req, w->scratch);
	}
}

static void stream_token(struct mock_worker *w, struct evhttp_request *req, const struct gen *g,
			 long i)
{
	struct evbuffer *b = w->scratch;

	ev_begin(b, g);
	if (g->kind == K_CHAT)
		ADD_LIT(b, "{\"index\":0,\"delta\":{\"content\":\"");
	else
		ADD_LIT(b, "{\"index\":0,\"text\":\"");
	add_word(b, i);
	if (g->kind == K_CHAT)
		ADD_LIT(b, "\"},\"logprobs\":null,\"finish_reason\":null}");
	else
		ADD_LIT(b, "\",\"logprobs\":null,\"finish_reason\":null}");
	ev_end(b, g);
	evhttp_send_reply_chunk(req, b);
}

static void stream_finish(struct mock_worker *w, struct evhttp_request *req, const struct gen *g)
{
	struct evbuffer *b = w->scratch;
	const char *finish = g->finish_length ? "length" : "stop";

	ev_begin(b, g);
	if (g->kind == K_CHAT)
		evbuffer_add_printf(b, "{\"index\":0,\"delta\":{},\"logprobs\":null,"
				       "\"finish_reason\":\"%s\"}",
				    finish);
	else
		evbuffer_add_printf(b, "{\"index\":0,\"text\":\"\",\"logprobs\":null,"
				       "\"finish_reason\":\"%s\"}",
				    finish);
	ev_end(b, g);
	evhttp_send_reply_chunk(req, b);
	if (g->usage_chunk) {
		ev_begin(b, g);
		ADD_LIT(b, "],");
		add_usage(b, g->prompt_tokens, g->ntok);
		ADD_LIT(b, "}\n\n");
		evhttp_send_reply_chunk(req, b);
	}
	ADD_LIT(b, "data: [DONE]\n\n");
	evhttp_send_reply_chunk(req, b);
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

static void count_outcome_locked(struct mock_app *a, enum outcome o)
{
	if (o == OUT_COMPLETED)
		a->st.completed++;
	else if (o == OUT_CANCELLED)
		a->st.cancelled++;
	else
		a->st.disconnected++;
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
	count_outcome_locked(a, o);
	app_unlock(a);

	/* After the unlock: nobody can activate our timer any more. */
	if (c->watching)
		event_del(&c->watch);
	event_del(&c->timer);
	if (c->prev)
		c->prev->next = c->next;
	else
		w->ctxs = c->next;
	if (c->next)
		c->next->prev = c->prev;
	if (c->body)
		evbuffer_free(c->body);
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

	(void)evcon;
	ctx_release(c, c->state == ST_CLOSING ? OUT_DISCONNECTED : OUT_CANCELLED);
	if (detached)
		evhttp_request_free(req);
}

/* Close the connection without (the rest of) a reply. */
static void ctx_abort(struct mock_ctx *c)
{
	struct evhttp_connection *evcon = c->evcon;

	evhttp_connection_set_closecb(evcon, NULL, NULL);
	ctx_release(c, OUT_DISCONNECTED);
	evhttp_connection_free(evcon);
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
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

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

static void ctx_try_close(struct mock_ctx *c)
{
	struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);

	/* Let what was sent reach the socket, then close: the client sees N tokens and EOF. */
	if (evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
		add_ms(&c->timer, 1);
		return;
	}
	ctx_abort(c);
}

static void ctx_stream_step(struct mock_ctx *c)
{
	struct mock_worker *w = c->w;
	const struct gen *g = &c->g;

	for (;;) {
		if (g->p.disconnect_after >= 0 && c->sent >= g->p.disconnect_after) {
			c->state = ST_CLOSING;
			ctx_try_close(c);
			return;
		}
		if (c->sent >= g->ntok) {
			struct evhttp_request *req = c->req;

			evhttp_connection_set_closecb(c->evcon, NULL, NULL);
			stream_finish(w, req, g);
			ctx_release(c, OUT_COMPLETED);
			return;
		}
		stream_token(w, c->req, g, c->sent++);
		if (g->p.itl_ms > 0 && c->sent < g->ntok &&
		    !(g->p.disconnect_after >= 0 && c->sent >= g->p.disconnect_after)) {
			add_ms(&c->timer, g->p.itl_ms);
			return;
		}
	}
}

static void ctx_first_output(struct mock_ctx *c)
{
	if (!c->g.stream) {
		struct evhttp_request *req = c->req;
		struct evbuffer *body = c->body;

		if (c->g.p.disconnect_after >= 0) {
			ctx_abort(c);
			return;
		}
		evhttp_connection_set_closecb(c->evcon, NULL, NULL);
		add_ctype(req, "application/json");
		evhttp_send_reply(req, 200, "OK", body);
		ctx_release(c, OUT_COMPLETED);
		return;
	}
	if (c->watching) {
		event_del(&c->watch);
		c->watching = 0;
	}
	stream_start(c->w, c->req, &c->g);
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
		event_del(&c->timer);
		if (c->body)
			evbuffer_free(c->body);
		free(c);
		c = next;
	}
	w->ctxs = NULL;
	/* Queue entries of this worker are gone; the queue is only used while running. */
	w->app->q_head = w->app->q_tail = NULL;
}

/* ------------------------------------------------------------------ overrides */

static void apply_headers(struct evhttp_request *req, struct mock_params *p)
{
	const struct evkeyvalq *h = evhttp_request_get_input_headers(req);

	for (const struct evkeyval *kv = h->tqh_first; kv != NULL; kv = kv->next.tqe_next) {
		const char *k, *v = kv->value;
		long l;
		double d;
		int b;

		if (strncasecmp(kv->key, "x-mock-", 7) != 0)
			continue;
		k = kv->key + 7;
		if (!strcasecmp(k, "tokens")) {
			if (!parse_long(v, 0, MAX_TOKENS, &l))
				p->tokens = l;
		} else if (!strcasecmp(k, "ttft-ms")) {
			if (!parse_long(v, 0, MAX_DELAY_MS, &l))
				p->ttft_ms = l;
		} else if (!strcasecmp(k, "itl-ms")) {
			if (!parse_long(v, 0, MAX_DELAY_MS, &l))
				p->itl_ms = l;
		} else if (!strcasecmp(k, "status")) {
			if (!parse_long(v, 0, 599, &l))
				p->status = (int)l;
		} else if (!strcasecmp(k, "error-rate")) {
			if (!parse_double(v, 0, 1, &d))
				p->error_rate = d;
		} else if (!strcasecmp(k, "hang")) {
			if (!parse_bool(v, &b))
				p->hang = b;
		} else if (!strcasecmp(k, "disconnect-after")) {
			if (!parse_long(v, -1, MAX_TOKENS, &l))
				p->disconnect_after = l;
		} else if (!strcasecmp(k, "no-usage")) {
			if (!parse_bool(v, &b))
				p->no_usage = b;
		} else if (!strcasecmp(k, "retry-after")) {
			if (!parse_long(v, -1, INT_MAX, &l))
				p->retry_after = l;
		}
	}
}

static int jnum(json_t *o, const char *key, double min, double max, double *out)
{
	json_t *v = json_object_get(o, key);

	if (!json_is_number(v))
		return -1;
	double d = json_number_value(v);
	if (d < min || d > max)
		return -1;
	*out = d;
	return 0;
}

static int jbool(json_t *o, const char *key, int *out)
{
	json_t *v = json_object_get(o, key);

	if (json_is_boolean(v))
		*out = json_is_true(v);
	else if (json_is_number(v))
		*out = json_number_value(v) != 0;
	else
		return -1;
	return 0;
}

static void apply_body(json_t *root, struct mock_params *p)
{
	json_t *m = json_object_get(root, "mock");
	double d;
	int b;

	if (!json_is_object(m))
		return;
	if (!jnum(m, "tokens", 0, MAX_TOKENS, &d))
		p->tokens = (long)d;
	if (!jnum(m, "ttft_ms", 0, MAX_DELAY_MS, &d))
		p->ttft_ms = (long)d;
	if (!jnum(m, "itl_ms", 0, MAX_DELAY_MS, &d))
		p->itl_ms = (long)d;
	if (!jnum(m, "status", 0, 599, &d))
		p->status = (int)d;
	if (!jnum(m, "error_rate", 0, 1, &d))
		p->error_rate = d;
	if (!jbool(m, "hang", &b))
		p->hang = b;
	if (json_is_null(json_object_get(m, "disconnect_after")))
		p->disconnect_after = -1;
	else if (!jnum(m, "disconnect_after", -1, MAX_TOKENS, &d))
		p->disconnect_after = (long)d;
	if (!jbool(m, "no_usage", &b))
		p->no_usage = b;
	if (!jnum(m, "retry_after", -1, INT_MAX, &d))
		p->retry_after = (long)d;
}

/* ------------------------------------------------------------------ prompt tokens */

/* Bytes of text and explicit token ids in a prompt / input value. */
static void count_text(json_t *v, size_t *bytes, long *ids)
{
	size_t i;
	json_t *x;

	if (json_is_string(v)) {
		*bytes += json_string_length(v);
	} else if (json_is_array(v)) {
		json_array_foreach (v, i, x) {
			if (json_is_integer(x))
				(*ids)++;
			else
				count_text(x, bytes, ids);
		}
	} else if (json_is_object(v)) {
		/* content part {"type":"text","text":"..."} */
		json_t *t = json_object_get(v, "text");

		if (json_is_string(t))
			*bytes += json_string_length(t);
	}
}

static long prompt_tokens(enum kind kind, json_t *root)
{
	size_t bytes = 0;
	long ids = 0, n;

	if (kind == K_CHAT) {
		json_t *msgs = json_object_get(root, "messages");
		size_t i;
		json_t *m;

		if (json_is_array(msgs))
			json_array_foreach (msgs, i, m)
				count_text(json_object_get(m, "content"), &bytes, &ids);
	} else {
		count_text(json_object_get(root, kind == K_EMB ? "input" : "prompt"), &bytes, &ids);
	}
	n = (long)((bytes + 3) / 4) + ids;
	return n < 1 ? 1 : n;
}

/* ------------------------------------------------------------------ generation */

static void handle_gen(struct mock_worker *w, struct evhttp_request *req, enum kind kind,
		       const char *body, size_t blen)
{
	struct mock_app *a = w->app;
	struct gen g;
	json_t *root, *v;
	json_error_t jerr;
	const char *model;
	size_t model_len;
	uint64_t id;
	int admitted, need_async;
	struct mock_ctx *c;

	memset(&g, 0, sizeof(g));
	g.kind = kind;
	g.p = a->cfg.defaults;
	apply_headers(req, &g.p);

	root = json_loadb(body, blen, JSON_ALLOW_NUL, &jerr);
	if (root == NULL || !json_is_object(root)) {
		char msg[256];

		if (root == NULL)
			snprintf(msg, sizeof(msg), "mock: invalid JSON body: %s", jerr.text);
		else
			snprintf(msg, sizeof(msg), "mock: the request body must be a JSON object");
		json_decref(root);
		send_error(w, req, 400, "invalid_request_error", msg, "invalid_json", -1);
		return;
	}
	apply_body(root, &g.p);

	v = json_object_get(root, "model");
	if (json_is_string(v)) {
		model = json_string_value(v);
		model_len = json_string_length(v);
	} else {
		model = a->cfg.model;
		model_len = strlen(model);
	}
	if (kind != K_EMB) {
		json_t *so = json_object_get(root, "stream_options");
		json_t *mt = json_object_get(root, "max_completion_tokens");

		g.stream = json_is_true(json_object_get(root, "stream"));
		g.usage_chunk = g.stream && json_is_object(so) &&
				json_is_true(json_object_get(so, "include_usage")) && !g.p.no_usage;
		if (!json_is_integer(mt))
			mt = json_object_get(root, "max_tokens");
		g.ntok = g.p.tokens;
		if (json_is_integer(mt) && json_integer_value(mt) >= 0 &&
		    json_integer_value(mt) < g.ntok) {
			g.ntok = (long)json_integer_value(mt);
			g.finish_length = 1;
		}
	}
	g.prompt_tokens = prompt_tokens(kind, root);

	if (g.p.status != 0 && (g.p.status < 200 || g.p.status > 299)) {
		json_decref(root);
		app_lock(a);
		a->st.errors++;
		app_unlock(a);
		send_forced(w, req, g.p.status, "", g.p.retry_after);
		return;
	}
	if (g.p.error_rate > 0 && rng_double(&w->rng) < g.p.error_rate) {
		json_decref(root);
		app_lock(a);
		a->st.errors++;
		app_unlock(a);
		send_forced(w, req, 500, " (error-rate)", g.p.retry_after);
		return;
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
		app_unlock(a);
		json_decref(root);
		send_error(w, req, 429, "rate_limit_error",
			   "mock: too many concurrent requests (max-concurrency and queue full)",
			   "429", g.p.retry_after);
		return;
	}
	a->st.active++;
	if (a->st.active > a->st.max_active)
		a->st.max_active = a->st.active;
	app_unlock(a);

	id = __atomic_add_fetch(&a->next_id, 1, __ATOMIC_RELAXED);
	need_async = !admitted || g.p.hang || g.p.ttft_ms > 0 || g.p.disconnect_after >= 0 ||
		     (g.stream && g.p.itl_ms > 0 && g.ntok > 1);

	if (g.stream) {
		struct evbuffer *pb = w->pfx;

		evbuffer_drain(pb, evbuffer_get_length(pb));
		evbuffer_add_printf(pb, "{\"id\":\"%s-%llu\",\"object\":\"%s\",\"created\":%lld,\"model\":\"",
				    kind == K_CHAT ? "chatcmpl" : "cmpl", (unsigned long long)id,
				    kind == K_CHAT ? "chat.completion.chunk" : "text_completion",
				    (long long)time(NULL));
		json_escape(pb, model, model_len);
		ADD_LIT(pb, "\",\"choices\":[");
		g.prefix_len = evbuffer_get_length(pb);
		g.prefix = (const char *)evbuffer_pullup(pb, -1);
	}

	if (!need_async) {
		if (g.stream) {
			stream_start(w, req, &g);
			for (long i = 0; i < g.ntok; i++)
				stream_token(w, req, &g, i);
			stream_finish(w, req, &g);
		} else {
			if (kind == K_EMB)
				build_embeddings(w->scratch, &g, json_object_get(root, "input"), model,
						 model_len);
			else
				build_completion(w->scratch, &g, id, model, model_len);
			add_ctype(req, "application/json");
			evhttp_send_reply(req, 200, "OK", w->scratch);
		}
		json_decref(root);
		app_lock(a);
		a->st.running--;
		a->st.active--;
		a->st.completed++;
		admit_next_locked(a);
		app_unlock(a);
		return;
	}

	c = calloc(1, sizeof(*c) + g.prefix_len + 1);
	if (c != NULL && !g.stream) {
		c->body = evbuffer_new();
		if (c->body == NULL) {
			free(c);
			c = NULL;
		}
	}
	if (c == NULL) {
		json_decref(root);
		app_lock(a);
		if (admitted) {
			a->st.running--;
			admit_next_locked(a);
		} else {
			a->st.waiting--;
		}
		a->st.active--;
		app_unlock(a);
		send_error(w, req, 500, "server_error", "mock: out of memory", NULL, -1);
		return;
	}
	c->w = w;
	c->req = req;
	c->evcon = evhttp_request_get_connection(req);
	c->g = g;
	if (g.stream) {
		memcpy(c->prefix, g.prefix, g.prefix_len);
		c->g.prefix = c->prefix;
	} else if (kind == K_EMB) {
		build_embeddings(c->body, &g, json_object_get(root, "input"), model, model_len);
	} else {
		build_completion(c->body, &g, id, model, model_len);
	}
	json_decref(root);

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
		return;
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
		return;
	}
	c->state = ST_QUEUED;
	q_push(a, c);
	app_unlock(a);
}

/* ------------------------------------------------------------------ other endpoints */

static void handle_stats(struct mock_worker *w, struct evhttp_request *req)
{
	struct mock_app *a = w->app;
	struct mock_stats s;

	app_lock(a);
	s = a->st;
	app_unlock(a);
	evbuffer_add_printf(w->scratch,
			    "{\"requests\":%llu,\"completed\":%llu,\"cancelled\":%llu,\"active\":%ld,"
			    "\"running\":%ld,\"waiting\":%ld,\"max_active\":%ld,"
			    "\"all_requests\":%llu,\"disconnected\":%llu,\"rejected\":%llu,"
			    "\"errors\":%llu}",
			    (unsigned long long)s.requests, (unsigned long long)s.completed,
			    (unsigned long long)s.cancelled, s.active, s.running, s.waiting,
			    s.max_active, (unsigned long long)s.all_requests,
			    (unsigned long long)s.disconnected, (unsigned long long)s.rejected,
			    (unsigned long long)s.errors);
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
			send_error(w, req, 500, "server_error", "mock: out of memory", NULL, -1);
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
		a->st.rejected = a->st.errors = 0;
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
	send_error(w, req, 404, "not_found_error", "mock: unknown /_mock endpoint", "not_found", -1);
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
	gauge(b, "vllm:num_requests_running", "Number of requests currently running.",
	      a->cfg.model, "%.0f", (double)s.running);
	gauge(b, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
	      a->cfg.model, "%.0f", (double)s.waiting);
	gauge(b, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
	      a->cfg.model, "%g", kv);
	counter(b, "mockllm_requests_total", "Completion and embedding requests received.",
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
		if (ends_with(path, plen, "/chat/completions"))
			kind = K_CHAT;
		else if (ends_with(path, plen, "/completions"))
			kind = K_COMPL;
		else if (ends_with(path, plen, "/embeddings"))
			kind = K_EMB;
	}

	app_lock(a);
	a->st.all_requests++;
	if (kind != K_NONE)
		a->st.requests++;
	rec_add(&a->rec, method_name(cmd), path, query, evhttp_request_get_input_headers(req),
		body, blen, now_unix());
	app_unlock(a);

	if (kind != K_NONE) {
		handle_gen(w, req, kind, body, blen);
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
	send_error(w, req, 404, "not_found_error", "mock: no such endpoint", "not_found", -1);
}
