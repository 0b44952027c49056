/* mcp_gateway.c — one client exchange on an MCP route, top to bottom.
 *
 *   mcp_handle          method, key-auth, the session (id → snapshot, route, servers)
 *   → dispatch          what the message is: answered here (ping, refusals), sent to one
 *                       server (tools/call, prompts/get, resources/read, responses), or to
 *                       all of them (initialize, lists, notifications, DELETE, GET)
 *   → admit_call        tools/call: allow/deny lists, request-rate limits (quota.c)
 *   → legs_start        one upstream transfer per server, with the server's own auth
 *   → leg_on_head/body  a single leg streams to the client as its events arrive (whole
 *                       events, back-pressure); fan-out legs are collected
 *   → leg_on_done       the last leg: merge (initialize, lists) or end the stream
 *   → ex_finish         settle, access log line, metric, free
 *
 * The client's credentials never leave: each leg carries the server's auth.header only.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/random.h>
#include <sys/time.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "sluice/auth.h"
#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/mcp_log.h"
#include "sluice/mcp_parts.h"
#include "sluice/policy_chain.h"
#include "sluice/quota.h"
#include "sluice/router.h"
#include "sluice/server.h"
#include "sluice/sse.h"
#include "sluice/upstream.h"

/* Above this many bytes queued for a slow client, the upstream legs are paused. */
#define STREAM_HIGH_WATER (64 * 1024)
/* A server's whole JSON answer (lists, initialize, a non-stream call) is capped here. */
#define MAX_LEG_BODY  (16u * 1024 * 1024)
#define MAX_SSE_EVENT (4u * 1024 * 1024)

enum ex_kind {
	EX_LOCAL,      /* answered by the gateway */
	EX_INITIALIZE, /* fan-out, merged result, a new session */
	EX_LIST,       /* fan-out, merged list */
	EX_FANOUT,     /* fan-out request answered {} (logging/setLevel) */
	EX_FORWARD,    /* one server, its answer streamed back */
	EX_NOTIFY,     /* notifications and responses: 202 when every leg accepted */
	EX_STREAM,     /* GET: the servers' streams merged */
	EX_DELETE,     /* DELETE: the session ends on every server */
	EX_BATCH,      /* a JSON-RPC batch: its members are exchanges of their own */
};

struct mcp_exchange;

struct mcp_leg {
	struct mcp_exchange *ex;
	unsigned slot; /* in the route's mcp.servers */
	const struct mcp_server_conf *server;
	const struct mcp_upstream_session *up; /* NULL for initialize */
	struct upstream_xfer xfer;
	bool started, done;
	enum upstream_result res;
	char detail[160];
	bool sse;
	struct sse_parser parser;
	bool parser_ready;
	struct evbuffer *body; /* buffered answer */
	json_t *response;      /* fan-out: the JSON-RPC response found */
	char *req_body;        /* owned when rewritten; else NULL (the client's bytes) */
	size_t req_len;
	bool paused;
	char last_event_id[256]; /* GET: what to resume from */
};

struct mcp_worker_shared;

/* A JSON-RPC batch (2025-03-26): its members, and their answers until the client gets them. */
struct mcp_batch {
	struct mcp_exchange **members; /* NULL once a member finished */
	char **replies;                /* JSON mode: each member's answer (owned), NULL: none */
	size_t *reply_len;
	size_t n, left;
	bool starting;    /* members are being started: the batch completes after */
	bool aborting;    /* the batch ends early: its members are being ended */
	bool streaming;   /* the client has the batch's SSE head: answers go out as events */
	bool any_request; /* some member wants an answer (else: 202) */
	bool retry_after; /* a member's Retry-After is on the batch's head */
	bool drain_armed;
	int fail_status; /* only notifications and responses: the first failure, if any */
	char *fail_body;
	size_t fail_len;
};

/* A server's endpoint, parsed once per worker (upstream.h): by mcp_server_index. */
struct mcp_url {
	const struct mcp_server_state *state; /* NULL: none yet */
	struct upstream_url *url;             /* owned (the worker's reference) */
};

struct mcp_worker {
	struct worker *w;
	struct mcp_crypto *crypto;
	struct mcp_url *urls; /* grown on use; a retired server's is released */
	size_t n_urls;
	/* named: cppcheck cannot parse an anonymous one */
	LIST_HEAD(mcp_exchange_list, mcp_exchange) live;
	size_t n_live;
	struct event *retired_ev; /* main → worker: servers were retired */
	char shared[];            /* struct mcp_worker_shared (mcp_registry.c) */
};

struct mcp_exchange {
	struct mcp_worker *mw;
	struct http_request *http; /* NULL once the client side is finished */
	LIST_ENTRY(mcp_exchange) link;
	struct config *config; /* the snapshot: current for initialize, the session's after */
	const struct config_route *route;
	const struct mcp_route_conf *rc;
	const struct config_consumer *consumer;
	char key_fp[13];
	struct mcp_session sess;
	bool has_session;
	char sess_hash[13];
	int version; /* the session's protocol version index, -1 none */

	json_t *msg;        /* the client's message */
	const json_t *id;   /* inside msg */
	const char *method; /* inside msg */
	enum mcp_msg_kind kind_msg;
	enum ex_kind kind;
	enum mcp_list list;
	char tool[129]; /* tools/call: the unprefixed tool, for the log */
	const char *tool_label;
	const struct mcp_server_conf *server; /* the one server (forward), NULL for fan-out */

	struct mcp_leg *legs;
	size_t n_legs, legs_left;
	bool stream_started; /* the client has our SSE head */
	bool client_paused;
	struct evbuffer *events;  /* events of one upstream read: one chunk */
	struct mcp_event_ids ids; /* GET / streams: the last event id of every server */
	bool multi;               /* session with more than one server: rewrite ids */
	struct mcp_cursor_part cursor_in[MCP_MAX_SERVERS];
	size_t n_cursor_in;
	char *cursor_buf; /* MCP_CURSOR_MAX bytes, owned: only for a list call with a cursor
	                     (a message's exchange is zeroed whole; keep it small) */

	struct quota_ticket ticket;
	bool ticket_held, quota_pending;
	struct policy_run *policies; /* tools/call on a route with plugins; owned */
	json_t *policy_body;         /* the arguments' text as they read it; owned */
	bool policy_pending;
	bool args_changed; /* a policy rewrote an argument */
	/* the policies' decisions, copied from the run (freed before the record is written);
	 * strings are the snapshot's or fixed */
	struct record_policy policy_actions[RECORD_MAX_POLICY_ACTIONS];
	int n_policy_actions;

	/* the record */
	char http_method[8];
	char request_id[40];
	char client_ip[48];
	int status;
	int upstream_status;
	const char *outcome;
	int rpc_error;
	uint64_t start_us, start_unix_us;
	uint64_t bytes_in, bytes_out;

	/* The message's bytes: the client's body, or a batch member's own serialisation. */
	const char *body;
	size_t body_len;
	char *body_owned;
	/* Batches: a member is an exchange like any other that writes to the client only
	 * through its batch (the out_* functions); its `http` is the batch's request, NULL once
	 * the member has its answer. */
	struct mcp_exchange *batch; /* this member's batch; NULL: the client's own exchange */
	struct mcp_batch *b;        /* a batch's members (owned) */
	size_t member;              /* a member's index in its batch */
};

static void ex_finish(struct mcp_exchange *ex);
static void leg_cleanup(struct mcp_leg *l);
static void put_event(struct evbuffer *out, const char *event, const char *id, const char *data,
                      size_t len);
static void batch_free(struct mcp_batch *b);
static void batch_end_members(struct mcp_exchange *bx);
static void batch_member_done(struct mcp_exchange *bx, size_t i);
static void dispatch_batch(struct mcp_exchange *bx);
static void dispatch_message(struct mcp_exchange *ex);
static void filters_of(const struct mcp_exchange *ex, enum mcp_list kind,
                       const struct mcp_tool_filter **rf, const struct mcp_tool_filter **cf);

/* ---------------------------------------------------------------- worker state */

struct mcp_worker_shared *mcp_worker_shared(struct mcp_worker *mw)
{
	return (struct mcp_worker_shared *)(void *)mw->shared;
}

size_t mcp_worker_shared_size(void);

static void on_retired(evutil_socket_t fd, short what, void *arg);

struct mcp_worker *mcp_worker_alloc(struct worker *w)
{
	struct mcp_worker *mw = calloc(1, sizeof(*mw) + mcp_worker_shared_size());
	if (mw == NULL)
		return NULL;
	mw->w = w;
	LIST_INIT(&mw->live);
	mw->crypto = mcp_crypto_new();
	mw->retired_ev = event_new(w->base, -1, 0, on_retired, mw);
	if (mw->crypto == NULL || mw->retired_ev == NULL) {
		mcp_crypto_free(mw->crypto);
		if (mw->retired_ev)
			event_free(mw->retired_ev);
		free(mw);
		return NULL;
	}
	return mw;
}

void mcp_worker_dealloc(struct mcp_worker *mw)
{
	mcp_worker_abort_all(mw);
	for (size_t i = 0; i < mw->n_urls; i++)
		upstream_url_release(mw->urls[i].url);
	free(mw->urls);
	mcp_crypto_free(mw->crypto);
	event_free(mw->retired_ev);
	free(mw);
}

struct mcp_crypto *mcp_worker_crypto(struct mcp_worker *mw)
{
	return mw->crypto;
}

void mcp_worker_retired_servers(struct mcp_worker *mw)
{
	event_active(mw->retired_ev, 0, 0);
}

size_t mcp_worker_active(const struct mcp_worker *mw)
{
	return mw ? mw->n_live : 0;
}

/* ---------------------------------------------------------------- replies */

static uint64_t wall_us(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (uint64_t)tv.tv_sec * 1000000u + (uint64_t)tv.tv_usec;
}

/* ---------------------------------------------------------------- the client side */

/*
 * Everything an exchange sends its client goes through these. The client's own exchange
 * writes to its request; a batch member writes to its batch: an answer is kept for the
 * batch's JSON array (batch_put), or sent as an event once the batch streams.
 */
static void batch_put(struct mcp_exchange *m, int status, const char *body, size_t len);
static void batch_stream_start(struct mcp_exchange *bx);
static void batch_drained(void *arg);
static void on_client_drained(void *arg);

/* A whole answer; the exchange's client side is finished. */
static void out_reply(struct mcp_exchange *ex, int status, const char *ctype, const char *body,
                      size_t len)
{
	if (ex->batch != NULL)
		batch_put(ex, status, body, len);
	else
		http_reply(ex->http, status, ctype, body, len);
	ex->http = NULL;
}

static void out_header(struct mcp_exchange *ex, const char *name, const char *value)
{
	struct mcp_exchange *bx = ex->batch;
	if (bx == NULL) {
		http_response_header(ex->http, name, value);
		return;
	}
	/* A member: only a limit's Retry-After says something about the whole batch. */
	if (strcasecmp(name, "Retry-After") == 0 && bx->http != NULL && !bx->b->streaming &&
	    !bx->b->retry_after) {
		http_response_header(bx->http, name, value);
		bx->b->retry_after = true;
	}
}

static void out_stream_start(struct mcp_exchange *ex)
{
	if (ex->batch != NULL) {
		batch_stream_start(ex->batch);
		return;
	}
	http_response_header(ex->http, "Cache-Control", "no-cache");
	http_reply_start(ex->http, 200, "text/event-stream");
}

/* Events (buf is emptied). */
static void out_chunk(struct mcp_exchange *ex, struct evbuffer *buf)
{
	struct mcp_exchange *to = ex->batch ? ex->batch : ex;
	if (to->http == NULL || (ex->batch != NULL && !to->b->streaming)) {
		evbuffer_drain(buf, evbuffer_get_length(buf));
		return;
	}
	if (ex->batch != NULL)
		to->bytes_out += evbuffer_get_length(buf);
	http_reply_chunk_buffer(to->http, buf);
}

/* The end of a stream; a member's ends inside its batch's. */
static void out_end(struct mcp_exchange *ex)
{
	if (ex->batch == NULL && ex->http != NULL)
		http_reply_end(ex->http);
	ex->http = NULL;
}

static size_t out_pending(const struct mcp_exchange *ex)
{
	const struct mcp_exchange *to = ex->batch ? ex->batch : ex;
	return to->http != NULL ? http_reply_pending(to->http) : 0;
}

static void out_on_drain(struct mcp_exchange *ex)
{
	struct mcp_exchange *bx = ex->batch;
	if (bx == NULL) {
		http_reply_on_drain(ex->http, on_client_drained, ex);
		return;
	}
	/* One callback per request: the batch's resumes every member. */
	if (!bx->b->drain_armed && bx->http != NULL) {
		bx->b->drain_armed = true;
		http_reply_on_drain(bx->http, batch_drained, bx);
	}
}

/* {"jsonrpc":"2.0","id":<id|null>,"error":{"code","message","data":{gateway, reason}}} */
static bool put_error(struct evbuffer *b, const json_t *id, int code, const char *reason,
                      const char *msg)
{
	char *ids = id ? json_dumps(id, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
	if (id != NULL && ids == NULL)
		return false;
	evbuffer_add_printf(b,
	                    "{\"jsonrpc\":\"2.0\",\"id\":%s,\"error\":{\"code\":%d,\"message\":\"",
	                    ids ? ids : "null", code);
	http_json_escape(b, msg, strlen(msg));
	evbuffer_add_printf(b, "\",\"data\":{\"gateway\":\"sluice\",\"reason\":\"%s\"}}}", reason);
	free(ids);
	return true;
}

/* The error above as the whole answer, with http_status. */
static void reply_error(struct mcp_exchange *ex, int http_status, int code, const char *outcome,
                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void reply_error(struct mcp_exchange *ex, int http_status, int code, const char *outcome,
                        const char *fmt, ...)
{
	char msg[768];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);

	ex->status = http_status;
	ex->outcome = outcome;
	ex->rpc_error = code;
	if (http_status >= 400 && http_status < 500)
		log_info("[%s] mcp %d %s: %s", ex->request_id, http_status, outcome, msg);
	if (ex->http == NULL)
		return;
	struct evbuffer *b = evbuffer_new();
	if (b == NULL || !put_error(b, ex->id, code, outcome, msg)) {
		if (b != NULL)
			evbuffer_free(b);
		out_reply(ex, 503, "text/plain", "out of memory\n", 14);
		return;
	}
	evbuffer_add(b, "\n", 1);
	size_t n = evbuffer_get_length(b);
	ex->bytes_out += n;
	out_reply(ex, http_status, "application/json", (const char *)evbuffer_pullup(b, -1), n);
	evbuffer_free(b);
}

/* A result for the client's request (result: stolen reference). */
static void reply_result(struct mcp_exchange *ex, json_t *result)
{
	json_t *o = result ? json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id", ex->id, "result",
	                               result)
	                   : NULL;
	char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	if (text == NULL) {
		reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error",
		            "cannot encode the answer");
		return;
	}
	size_t n = strlen(text);
	ex->status = 200;
	if (ex->outcome == NULL)
		ex->outcome = "ok";
	ex->bytes_out += n;
	out_reply(ex, 200, "application/json", text, n);
	free(text);
}

static void reply_status(struct mcp_exchange *ex, int status)
{
	ex->status = status;
	if (ex->outcome == NULL)
		ex->outcome = "ok";
	out_reply(ex, status, NULL, "", 0);
}

/* ---------------------------------------------------------------- legs */

static bool leg_on_head(void *arg, long status);
static size_t leg_on_body(void *arg, const char *data, size_t len);
static void leg_on_done(void *arg, enum upstream_result res, const char *detail);

static const struct upstream_ops leg_ops = {
        .on_head = leg_on_head,
        .on_body = leg_on_body,
        .on_done = leg_on_done,
};

/* The server's pre-parsed endpoint on this worker, made on first use; NULL (the transfer
 * parses the string) when it cannot be. A reload never changes a state's endpoint. */
static struct upstream_url *worker_url(struct mcp_worker *mw, const struct mcp_server_conf *s)
{
	size_t i = mcp_server_index(s->state);
	if (i >= mw->n_urls) {
		size_t n = i + 1 > 2 * mw->n_urls ? i + 1 : 2 * mw->n_urls;
		struct mcp_url *u = realloc(mw->urls, n * sizeof(*u));
		if (u == NULL)
			return NULL;
		memset(u + mw->n_urls, 0, (n - mw->n_urls) * sizeof(*u));
		mw->urls = u;
		mw->n_urls = n;
	}
	if (mw->urls[i].state == NULL) {
		mw->urls[i].url = upstream_url_new(mcp_server_endpoint(s->state));
		mw->urls[i].state = s->state;
	}
	return mw->urls[i].url;
}

static bool leg_start(struct mcp_leg *l, const char *method, const char *body, size_t len)
{
	struct mcp_exchange *ex = l->ex;
	const struct mcp_server_conf *s = l->server;
	char line[8192];

	upstream_xfer_init(&l->xfer, ex->mw->w->upstream, &leg_ops, l);
	upstream_xfer_curlu(&l->xfer, worker_url(ex->mw, s));
	/* The server's credentials only: the client's stay here. */
	for (size_t i = 0; i < s->n_auth_headers; i++) {
		snprintf(line, sizeof(line), "%s: %s", s->auth_headers[i].name,
		         s->auth_headers[i].value);
		upstream_xfer_header(&l->xfer, line);
	}
	if (strcmp(method, "GET") == 0)
		upstream_xfer_header(&l->xfer, "Accept: text/event-stream");
	else if (strcmp(method, "POST") == 0)
		upstream_xfer_header(&l->xfer, "Accept: application/json, text/event-stream");
	if (l->up != NULL && l->up->sid_len > 0) {
		snprintf(line, sizeof(line), "Mcp-Session-Id: %s", l->up->sid);
		upstream_xfer_header(&l->xfer, line);
	}
	if (l->up != NULL) {
		snprintf(line, sizeof(line), "MCP-Protocol-Version: %s",
		         mcp_versions[l->up->version]);
		upstream_xfer_header(&l->xfer, line);
	}
	if (l->last_event_id[0]) {
		snprintf(line, sizeof(line), "Last-Event-ID: %s", l->last_event_id);
		upstream_xfer_header(&l->xfer, line);
	}
	snprintf(line, sizeof(line), "x-request-id: %s", ex->request_id);
	upstream_xfer_header(&l->xfer, line);
	struct upstream_timeouts to = {
	        .connect = s->timeouts.connect,
	        .first_byte = s->timeouts.first_byte,
	        .idle = s->timeouts.idle,
	        .total = 0, /* streams last as long as the session */
	};
	l->started = true;
	health_inflight_add(s->as_instance.state, 1);
	if (!upstream_xfer_start(&l->xfer, method, s->endpoint, body, len, &to, s->tls_verify,
	                         60)) {
		health_inflight_add(s->as_instance.state, -1);
		l->started = false;
		l->done = true;
		l->res = UPSTREAM_ERROR;
		snprintf(l->detail, sizeof(l->detail), "cannot start the transfer");
		return false;
	}
	return true;
}

static void leg_cleanup(struct mcp_leg *l)
{
	if (l->started && !l->done) {
		upstream_xfer_cancel(&l->xfer);
		health_inflight_add(l->server->as_instance.state, -1);
		l->done = true;
		l->res = UPSTREAM_ABORTED;
	}
	upstream_xfer_cleanup(&l->xfer);
	if (l->parser_ready) {
		sse_parser_free(&l->parser);
		l->parser_ready = false;
	}
	if (l->body) {
		evbuffer_free(l->body);
		l->body = NULL;
	}
	json_decref(l->response);
	l->response = NULL;
	free(l->req_body);
	l->req_body = NULL;
}

static bool is_event_stream(const char *ct)
{
	return strncasecmp(ct, "text/event-stream", 17) == 0;
}

static void on_client_drained(void *arg)
{
	struct mcp_exchange *ex = arg;
	ex->client_paused = false;
	for (size_t i = 0; i < ex->n_legs; i++)
		if (ex->legs[i].paused && !ex->legs[i].done) {
			ex->legs[i].paused = false;
			upstream_xfer_resume(&ex->legs[i].xfer);
		}
}

static bool streams_to_client(const struct mcp_exchange *ex)
{
	return ex->kind == EX_FORWARD || ex->kind == EX_STREAM;
}

static bool leg_on_head(void *arg, long status)
{
	struct mcp_leg *l = arg;
	struct mcp_exchange *ex = l->ex;

	if (ex->http == NULL && streams_to_client(ex))
		return false;
	l->sse = status >= 200 && status < 300 && is_event_stream(l->xfer.content_type);
	if (l->sse) {
		sse_parser_init(&l->parser, MAX_SSE_EVENT);
		l->parser_ready = true;
	}
	if (l->sse && streams_to_client(ex) && !ex->stream_started && ex->http != NULL) {
		ex->stream_started = true;
		ex->status = 200;
		out_stream_start(ex);
	}
	if (!l->sse && (l->body = evbuffer_new()) == NULL)
		return false;
	return true;
}

/* "data: ..." lines for data (split at \n), then the blank line. */
static void put_event(struct evbuffer *out, const char *event, const char *id, const char *data,
                      size_t len)
{
	if (event != NULL && event[0])
		evbuffer_add_printf(out, "event: %s\n", event);
	if (id != NULL && id[0])
		evbuffer_add_printf(out, "id: %s\n", id);
	const char *p = data, *end = data + len;
	while (p <= end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *e = nl ? nl : end;
		evbuffer_add(out, "data: ", 6);
		evbuffer_add(out, p, (size_t)(e - p));
		evbuffer_add(out, "\n", 1);
		if (nl == NULL)
			break;
		p = nl + 1;
	}
	evbuffer_add(out, "\n", 1);
}

/* The "id:" field of a raw event, if any. */
static bool raw_event_id(const char *raw, size_t len, const char **v, size_t *vl)
{
	const char *p = raw, *end = raw + len;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *e = nl ? nl : end;
		size_t ll = (size_t)(e - p);
		if (ll > 0 && p[ll - 1] == '\r')
			ll--;
		if (ll >= 3 && memcmp(p, "id:", 3) == 0) {
			*v = p + 3;
			*vl = ll - 3;
			if (*vl > 0 && **v == ' ') {
				(*v)++;
				(*vl)--;
			}
			return true;
		}
		p = e + 1;
	}
	return false;
}

/*
 * A server's event on its way to the client. Most pass as received. Rewritten:
 * - the event id, when the server sets one: the composite of every server's last id on
 *   this stream (a batch's: of all its members);
 * - in sessions with several servers, a server-to-client request's id becomes
 *   "s<slot>:<id>", so the client's answer can be sent back to the server that asked;
 * - notifications/resources/updated: the uri gets the server's prefix, like resources/list.
 */
static bool forward_event(struct mcp_leg *l, const struct sse_event *ev)
{
	struct mcp_exchange *ex = l->ex;
	const char *idv;
	size_t idl;
	char composite[1024];
	bool has_id = raw_event_id(ev->raw, ev->raw_len, &idv, &idl);
	json_t *rewritten = NULL;

	if (has_id) {
		/* A batch's members share one stream: its ids carry every member's server, so
		 * that resuming from the last one resumes the servers whose events came before. */
		struct mcp_event_ids *ids = ex->batch != NULL ? &ex->batch->ids : &ex->ids;
		if (!mcp_event_ids_set(ids, l->slot, idv, idl) ||
		    !mcp_event_ids_format(ids, composite, sizeof(composite)))
			has_id = false;
	}
	if (ev->has_data && ev->data_len > 0) {
		struct mcp_scan sc;
		bool scanned = mcp_scan_object(ev->data, ev->data_len, &sc);
		bool server_request = scanned && sc.method.len && sc.id.len && ex->multi;
		bool updated = scanned && sc.method.len &&
		               mcp_span_is(&sc.method, "notifications/resources/updated");
		if (server_request || updated) {
			json_t *m = json_loadb(ev->data, ev->data_len, 0, NULL);
			if (m != NULL && server_request) {
				char *orig = json_dumps(json_object_get(m, "id"), JSON_ENCODE_ANY);
				json_t *nid = orig ? json_sprintf("s%u:%s", l->slot, orig) : NULL;
				free(orig);
				if (nid != NULL)
					json_object_set_new(m, "id", nid);
			}
			if (m != NULL && updated) {
				json_t *params = json_object_get(m, "params");
				const char *uri = json_string_value(json_object_get(params, "uri"));
				json_t *pref = uri ? json_sprintf("%s%s%s", l->server->name,
				                                  ex->rc->separator, uri)
				                   : NULL;
				const struct mcp_tool_filter *rf, *cf;
				filters_of(ex, MCP_LIST_RESOURCES, &rf, &cf);
				if (pref != NULL &&
				    !mcp_tool_allowed(rf, cf, json_string_value(pref),
				                      json_string_length(pref))) {
					/* a hidden resource's updates are not the client's business
					 */
					json_decref(pref);
					json_decref(m);
					return true;
				}
				if (pref != NULL)
					json_object_set_new(params, "uri", pref);
			}
			rewritten = m;
		}
	}
	if (!has_id && rewritten == NULL) {
		evbuffer_add(ex->events, ev->raw, ev->raw_len);
		ex->bytes_out += ev->raw_len;
		return true;
	}
	size_t before = evbuffer_get_length(ex->events);
	if (rewritten != NULL) {
		char *text = json_dumps(rewritten, JSON_COMPACT);
		json_decref(rewritten);
		if (text == NULL)
			return false;
		put_event(ex->events, ev->event, has_id ? composite : NULL, text, strlen(text));
		free(text);
	} else {
		put_event(ex->events, ev->event, composite, ev->data, ev->data_len);
	}
	ex->bytes_out += evbuffer_get_length(ex->events) - before;
	return true;
}

/* Fan-out legs: keep the response to our request; notifications on the way are dropped. */
static void collect_message(struct mcp_leg *l, const char *data, size_t len)
{
	json_t *m = json_loadb(data, len, 0, NULL);
	if (m == NULL)
		return;
	if (mcp_msg_classify(m, NULL) == MCP_MSG_RESPONSE &&
	    (l->ex->id == NULL || json_equal(json_object_get(m, "id"), (json_t *)l->ex->id))) {
		json_decref(l->response);
		l->response = m;
		return;
	}
	json_decref(m);
}

static bool leg_on_event(void *arg, const struct sse_event *ev)
{
	struct mcp_leg *l = arg;
	if (streams_to_client(l->ex))
		return forward_event(l, ev);
	if (ev->has_data && ev->data_len > 0)
		collect_message(l, ev->data, ev->data_len);
	return true;
}

static size_t leg_on_body(void *arg, const char *data, size_t len)
{
	struct mcp_leg *l = arg;
	struct mcp_exchange *ex = l->ex;

	if (!l->sse) {
		if (evbuffer_get_length(l->body) + len > MAX_LEG_BODY)
			return 0;
		evbuffer_add(l->body, data, len);
		return len;
	}
	if (streams_to_client(ex)) {
		if (ex->http == NULL)
			return 0;
		/* Back-pressure: hold the servers while the client lags. */
		if (out_pending(ex) > STREAM_HIGH_WATER) {
			l->paused = true;
			ex->client_paused = true;
			out_on_drain(ex);
			return UPSTREAM_PAUSE;
		}
		if (ex->events == NULL && (ex->events = evbuffer_new()) == NULL)
			return 0;
	}
	bool ok = sse_feed(&l->parser, data, len, leg_on_event, l);
	if (streams_to_client(ex) && ex->stream_started && ex->events != NULL && ex->http != NULL)
		out_chunk(ex, ex->events);
	return ok ? len : 0;
}

static enum health_outcome health_of(enum upstream_result res, long status)
{
	if (res == UPSTREAM_TIMEOUT)
		return HEALTH_TIMEOUT;
	if (res == UPSTREAM_CONNECT_ERROR || res == UPSTREAM_ERROR)
		return HEALTH_CONNECT_ERROR;
	return status >= 400 ? HEALTH_HTTP_STATUS : HEALTH_OK;
}

static const char *outcome_of(enum upstream_result res)
{
	switch (res) {
	case UPSTREAM_TIMEOUT:
		return "timeout";
	case UPSTREAM_CONNECT_ERROR:
		return "connect_error";
	case UPSTREAM_ABORTED:
		return "client_gone";
	default:
		return "upstream_error";
	}
}

static void ex_complete(struct mcp_exchange *ex);

static void leg_on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct mcp_leg *l = arg;
	struct mcp_exchange *ex = l->ex;
	long status = l->xfer.status;

	l->done = true;
	l->res = res;
	snprintf(l->detail, sizeof(l->detail), "%s", detail ? detail : "");
	health_inflight_add(l->server->as_instance.state, -1);
	if (res != UPSTREAM_ABORTED)
		health_report(l->server->as_instance.state, &l->server->as_instance,
		              health_of(res, status), (int)status, http_now_us());
	if (l->sse && l->body == NULL && res == UPSTREAM_OK && sse_pending(&l->parser) > 0)
		l->res = UPSTREAM_ERROR; /* ended inside an event */
	if (!l->sse && l->body != NULL && !streams_to_client(ex) && status >= 200 && status < 300) {
		size_t n = evbuffer_get_length(l->body);
		if (n > 0)
			collect_message(l, (const char *)evbuffer_pullup(l->body, (ev_ssize_t)n),
			                n);
	}
	if (status > 0)
		ex->upstream_status = (int)status;
	if (--ex->legs_left == 0)
		ex_complete(ex);
	else if (ex->kind == EX_STREAM && ex->stream_started)
		log_debug("[%s] mcp: server %s left the merged stream (%s)", ex->request_id,
		          l->server->name, res == UPSTREAM_OK ? "ended" : l->detail);
}

/* ---------------------------------------------------------------- completion */

/* The upstream said the session is gone (404 with its session id): the client starts over. */
static bool leg_session_gone(const struct mcp_leg *l)
{
	return l->done && l->res == UPSTREAM_OK && l->xfer.status == 404 && l->up != NULL &&
	       l->up->sid_len > 0;
}

static void leg_why(const struct mcp_leg *l, char *buf, size_t cap)
{
	if (l->res == UPSTREAM_OK)
		snprintf(buf, cap, "%s answered HTTP %ld", l->server->name, l->xfer.status);
	else
		snprintf(buf, cap, "%s: %s: %s", l->server->name, upstream_result_name(l->res),
		         l->detail);
}

static void fail_leg(struct mcp_exchange *ex, const struct mcp_leg *l)
{
	char why[320];
	leg_why(l, why, sizeof(why));
	log_warn("[%s] mcp %s: %s", ex->request_id, ex->method ? ex->method : ex->http_method, why);
	int code = l->res == UPSTREAM_TIMEOUT ? MCP_ERR_UPSTREAM_TIMEOUT : MCP_ERR_UPSTREAM;
	const char *outcome = l->res == UPSTREAM_OK ? "upstream_error" : outcome_of(l->res);
	/* A request gets a JSON-RPC error the client can act on; the session goes on. */
	int status = ex->kind_msg == MCP_MSG_REQUEST ? 200 : l->res == UPSTREAM_TIMEOUT ? 504 : 502;
	reply_error(ex, status, code, outcome, "MCP server '%s' is unavailable: %s",
	            l->server->name, why);
}

static void reply_session_gone(struct mcp_exchange *ex, const char *server)
{
	reply_error(ex, 404, MCP_ERR_SESSION, "session_not_found",
	            "session not found (server '%s' ended it): initialize a new session", server);
}

static void complete_forward(struct mcp_exchange *ex)
{
	struct mcp_leg *l = &ex->legs[0];

	if (ex->stream_started) {
		/* The client has the stream: end it; a broken one gets an error event. */
		if (l->res != UPSTREAM_OK && l->res != UPSTREAM_ABORTED && ex->http != NULL &&
		    ex->kind_msg == MCP_MSG_REQUEST) {
			char why[320];
			leg_why(l, why, sizeof(why));
			char *id = json_dumps(ex->id, JSON_ENCODE_ANY | JSON_COMPACT);
			struct evbuffer *b = evbuffer_new();
			if (b != NULL && id != NULL) {
				evbuffer_add_printf(
				        b,
				        "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":%s,"
				        "\"error\":{\"code\":%d,\"message\":\"",
				        id, MCP_ERR_UPSTREAM);
				http_json_escape(b, why, strlen(why));
				evbuffer_add(b, "\"}}\n\n", 5);
				out_chunk(ex, b);
			}
			evbuffer_free(b);
			free(id);
			ex->outcome = outcome_of(l->res);
			ex->rpc_error = MCP_ERR_UPSTREAM;
			log_warn("[%s] mcp: stream from %s failed: %s", ex->request_id,
			         l->server->name, why);
		}
		if (ex->outcome == NULL)
			ex->outcome = "ok";
		out_end(ex);
		return;
	}
	if (leg_session_gone(l)) {
		reply_session_gone(ex, l->server->name);
		return;
	}
	if (l->res != UPSTREAM_OK || l->xfer.status >= 500 || (l->body == NULL && !l->sse)) {
		fail_leg(ex, l);
		return;
	}
	/* A JSON answer (or a 202, or a 4xx): as the server gave it. */
	size_t n = l->body ? evbuffer_get_length(l->body) : 0;
	const char *body = n ? (const char *)evbuffer_pullup(l->body, (ev_ssize_t)n) : "";
	ex->status = (int)l->xfer.status;
	if (ex->outcome == NULL)
		ex->outcome = l->xfer.status < 400 ? "ok" : "upstream_error";
	if (n > 0) {
		struct mcp_scan sc;
		if (mcp_scan_object(body, n, &sc) && sc.error.len)
			ex->outcome = "error";
	}
	ex->bytes_out += n;
	out_reply(ex, (int)l->xfer.status,
	          l->xfer.content_type[0] ? l->xfer.content_type : "application/json", body, n);
}

static void tool_seen(void *arg, unsigned slot, const char *name)
{
	const struct mcp_route_conf *rc = arg;
	if (slot < rc->n_servers)
		mcp_server_tool_learn(rc->servers[slot]->state, name);
}

static void complete_list(struct mcp_exchange *ex)
{
	struct mcp_list_part parts[MCP_MAX_SERVERS];
	const char *next[MCP_MAX_SERVERS];
	size_t n = 0;
	char why[320] = "";

	for (size_t i = 0; i < ex->n_legs; i++) {
		struct mcp_leg *l = &ex->legs[i];
		if (leg_session_gone(l)) {
			reply_session_gone(ex, l->server->name);
			return;
		}
		const json_t *res = json_object_get(l->response, "result");
		if (l->res != UPSTREAM_OK || !json_is_object(res)) {
			/* This server's items are missing from the answer; the others are there. */
			if (l->res != UPSTREAM_OK || l->xfer.status != 200)
				leg_why(l, why, sizeof(why));
			else
				snprintf(why, sizeof(why), "%s answered no result",
				         l->server->name);
			log_warn("[%s] mcp %s: skipping %s", ex->request_id, ex->method, why);
			continue;
		}
		parts[n].slot = l->slot;
		parts[n].server = l->server->name;
		parts[n].result = res;
		n++;
	}
	if (n == 0 && ex->n_legs > 0) {
		reply_error(ex, 200, MCP_ERR_UPSTREAM, "upstream_error",
		            "no MCP server of route '%s' answered %s (last: %s)", ex->route->name,
		            ex->method, why);
		return;
	}
	const struct mcp_tool_filter *rf, *cf;
	filters_of(ex, ex->list, &rf, &cf);
	json_t *merged = mcp_merge_list(ex->list, parts, n, ex->rc->separator, rf, cf, next,
	                                tool_seen, (void *)ex->rc);
	if (merged == NULL) {
		reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error", "cannot merge the lists");
		return;
	}
	struct mcp_cursor_part cp[MCP_MAX_SERVERS];
	size_t n_cp = 0;
	for (size_t i = 0; i < n; i++)
		if (next[i] != NULL)
			cp[n_cp++] = (struct mcp_cursor_part){(uint8_t)parts[i].slot, next[i],
			                                      strlen(next[i])};
	if (n_cp > 0) {
		char cur[MCP_CURSOR_MAX];
		if (mcp_cursor_encode(ex->mw->crypto, ex->sess.sid, (uint8_t)ex->list, cp, n_cp,
		                      cur, sizeof(cur)))
			json_object_set_new(merged, "nextCursor", json_string(cur));
	}
	reply_result(ex, merged);
}

static void complete_initialize(struct mcp_exchange *ex)
{
	const char *names[MCP_MAX_SERVERS];
	const json_t *results[MCP_MAX_SERVERS];
	size_t n = 0;
	char why[320] = "no server";
	bool any_down = false;

	ex->sess.n = 0;
	for (size_t i = 0; i < ex->n_legs; i++) {
		struct mcp_leg *l = &ex->legs[i];
		const json_t *res = json_object_get(l->response, "result");
		const char *v = json_string_value(json_object_get(res, "protocolVersion"));
		int vi = v ? mcp_version_index(v, strlen(v)) : -1;
		if (l->res != UPSTREAM_OK || !json_is_object(res) || vi < 0) {
			if (l->res != UPSTREAM_OK || l->xfer.status != 200)
				leg_why(l, why, sizeof(why));
			else
				snprintf(why, sizeof(why), "%s answered no usable result",
				         l->server->name);
			any_down = true;
			log_warn("[%s] mcp initialize: %s is not part of the session: %s",
			         ex->request_id, l->server->name, why);
			continue;
		}
		/* Its own session id, from the response head. */
		struct mcp_upstream_session *u = &ex->sess.up[ex->sess.n];
		memset(u, 0, sizeof(*u));
		u->slot = (uint8_t)l->slot;
		u->version = (uint8_t)vi;
		u->caps = mcp_caps_of(json_object_get(res, "capabilities"));
		size_t hn = evbuffer_get_length(l->xfer.headers);
		const char *h =
		        hn ? (const char *)evbuffer_pullup(l->xfer.headers, (ev_ssize_t)hn) : "";
		for (const char *p = h, *end = h + hn; p < end;) {
			const char *eol = memchr(p, '\r', (size_t)(end - p));
			if (eol == NULL)
				break;
			if ((size_t)(eol - p) > 16 && strncasecmp(p, "mcp-session-id: ", 16) == 0) {
				size_t sl = (size_t)(eol - p - 16);
				char tmp[MCP_MAX_UPSTREAM_SID + 2];
				if (sl <= MCP_MAX_UPSTREAM_SID) {
					memcpy(tmp, p + 16, sl);
					tmp[sl] = '\0';
					if (mcp_header_token(tmp, MCP_MAX_UPSTREAM_SID)) {
						memcpy(u->sid, tmp, sl + 1);
						u->sid_len = (uint8_t)sl;
					}
				}
				if (u->sid_len == 0) {
					snprintf(why, sizeof(why),
					         "%s sent an unusable Mcp-Session-Id",
					         l->server->name);
					log_warn("[%s] mcp initialize: %s", ex->request_id, why);
					u = NULL;
				}
				break;
			}
			p = eol + 2;
		}
		if (u == NULL)
			continue;
		names[n] = l->server->name;
		results[n] = res;
		n++;
		ex->sess.n++;
	}
	if (n == 0) {
		reply_error(ex, any_down ? 502 : 503, MCP_ERR_UPSTREAM, "upstream_error",
		            "no MCP server of route '%s' could be initialised (last: %s)",
		            ex->route->name, why);
		return;
	}
	char name[160], token[MCP_TOKEN_MAX];
	snprintf(name, sizeof(name), "sluice/%s", ex->route->name);
	json_t *merged =
	        mcp_merge_initialize(mcp_versions[ex->sess.version], names, results, n, name);
	if (merged == NULL ||
	    !mcp_session_encode(ex->mw->crypto, &ex->sess, token, sizeof(token))) {
		json_decref(merged);
		reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error",
		            "cannot create the session");
		return;
	}
	ex->has_session = true;
	mcp_session_hash(ex->sess.sid, ex->sess_hash);
	mcp_worker_session_seen(ex->mw, &ex->sess, ex->route->name,
	                        ex->consumer ? ex->consumer->name : NULL,
	                        ex->rc->session_idle_timeout);
	out_header(ex, "Mcp-Session-Id", token);
	reply_result(ex, merged);
}

static void complete_fanout(struct mcp_exchange *ex)
{
	bool ok = false;
	const struct mcp_leg *bad = NULL;
	for (size_t i = 0; i < ex->n_legs; i++) {
		const struct mcp_leg *l = &ex->legs[i];
		if (leg_session_gone(l)) {
			reply_session_gone(ex, l->server->name);
			return;
		}
		bool good = l->res == UPSTREAM_OK && l->xfer.status >= 200 && l->xfer.status < 300;
		ok = ok || good;
		if (!good && bad == NULL)
			bad = l;
	}
	if (ex->kind == EX_FANOUT) {
		if (!ok && bad != NULL)
			fail_leg(ex, bad);
		else
			reply_result(ex, json_object());
		return;
	}
	if (ex->kind == EX_DELETE) {
		/* Ended here whatever the servers said: a gone one has nothing left to end. */
		mcp_worker_session_closed(ex->mw, &ex->sess);
		reply_status(ex, 200);
		return;
	}
	/* notifications and responses */
	if (bad != NULL)
		fail_leg(ex, bad);
	else
		reply_status(ex, 202);
}

static void complete_stream(struct mcp_exchange *ex)
{
	if (ex->stream_started) {
		if (ex->outcome == NULL)
			ex->outcome = "ok";
		out_end(ex);
		return;
	}
	/* No server opened a stream. */
	for (size_t i = 0; i < ex->n_legs; i++)
		if (leg_session_gone(&ex->legs[i])) {
			reply_session_gone(ex, ex->legs[i].server->name);
			return;
		}
	bool all_405 = true;
	for (size_t i = 0; i < ex->n_legs; i++)
		all_405 =
		        all_405 && ex->legs[i].res == UPSTREAM_OK && ex->legs[i].xfer.status == 405;
	if (all_405) {
		out_header(ex, "Allow", "POST, DELETE");
		reply_error(ex, 405, MCP_ERR_INVALID_REQUEST, "method_not_allowed",
		            "no server of this session offers a server-to-client stream");
		return;
	}
	fail_leg(ex, &ex->legs[0]);
}

static void ex_complete(struct mcp_exchange *ex)
{
	if (ex->http != NULL) {
		switch (ex->kind) {
		case EX_FORWARD:
			complete_forward(ex);
			break;
		case EX_LIST:
			complete_list(ex);
			break;
		case EX_INITIALIZE:
			complete_initialize(ex);
			break;
		case EX_STREAM:
			complete_stream(ex);
			break;
		default:
			complete_fanout(ex);
			break;
		}
	}
	ex_finish(ex);
}

/* ---------------------------------------------------------------- starting legs */

static const struct mcp_upstream_session *session_up(const struct mcp_exchange *ex, unsigned slot)
{
	for (unsigned i = 0; i < ex->sess.n; i++)
		if (ex->sess.up[i].slot == slot)
			return &ex->sess.up[i];
	return NULL;
}

static bool legs_alloc(struct mcp_exchange *ex, size_t n)
{
	ex->legs = calloc(n ? n : 1, sizeof(*ex->legs));
	if (ex->legs == NULL)
		return false;
	ex->n_legs = n;
	return true;
}

static void leg_init(struct mcp_exchange *ex, size_t i, unsigned slot)
{
	struct mcp_leg *l = &ex->legs[i];
	l->ex = ex;
	l->slot = slot;
	l->server = ex->rc->servers[slot];
	l->up = session_up(ex, slot);
}

/* Start every leg; body NULL for GET/DELETE. The exchange waits for their on_done. */
static void legs_start(struct mcp_exchange *ex, const char *method, const char *body, size_t len)
{
	size_t failed = 0;
	ex->legs_left = ex->n_legs;
	for (size_t i = 0; i < ex->n_legs; i++) {
		struct mcp_leg *l = &ex->legs[i];
		const char *b = l->req_body ? l->req_body : body;
		size_t bl = l->req_body ? l->req_len : len;
		if (!leg_start(l, method, b, bl))
			failed++;
	}
	/* Legs that could not start count as done; all of them: answer now. */
	ex->legs_left -= failed;
	if (ex->legs_left == 0)
		ex_complete(ex);
}

/* Fan out to every server of the session (or of the route, for initialize). */
static void fan_out(struct mcp_exchange *ex, const char *method)
{
	size_t n = ex->kind == EX_INITIALIZE ? ex->rc->n_servers : ex->sess.n;
	uint64_t now = http_now_us();
	if (!legs_alloc(ex, n)) {
		reply_error(ex, 503, MCP_ERR_INTERNAL, "internal_error", "out of memory");
		ex_finish(ex);
		return;
	}
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned slot = ex->kind == EX_INITIALIZE ? (unsigned)i : ex->sess.up[i].slot;
		if (slot >= ex->rc->n_servers)
			continue;
		const struct mcp_server_conf *s = ex->rc->servers[slot];
		/* A list or setLevel goes only to the servers that offer it. */
		static const uint8_t list_cap[] = {MCP_CAP_TOOLS, MCP_CAP_PROMPTS,
		                                   MCP_CAP_RESOURCES, MCP_CAP_RESOURCES};
		if ((ex->kind == EX_LIST && !(ex->sess.up[i].caps & list_cap[ex->list])) ||
		    (ex->kind == EX_FANOUT && !(ex->sess.up[i].caps & MCP_CAP_LOGGING)))
			continue;
		/* Lists and initialize skip a server known to be down: the others answer. */
		if ((ex->kind == EX_INITIALIZE || ex->kind == EX_LIST) &&
		    health_admit(s->as_instance.state, &s->as_instance, now) == HEALTH_DOWN) {
			log_debug("[%s] mcp %s: skipping unhealthy server %s", ex->request_id,
			          method, s->name);
			continue;
		}
		if (ex->kind == EX_LIST && ex->n_cursor_in > 0) {
			const struct mcp_cursor_part *cp = NULL;
			for (size_t c = 0; c < ex->n_cursor_in && cp == NULL; c++)
				if (ex->cursor_in[c].slot == slot)
					cp = &ex->cursor_in[c];
			if (cp == NULL)
				continue; /* this server's pages are all out */
			json_t *m = json_deep_copy(ex->msg);
			json_t *params = json_object_get(m, "params");
			if (m == NULL || !json_is_object(params) ||
			    json_object_set_new(params, "cursor", json_string(cp->cursor)) != 0 ||
			    (ex->legs[k].req_body = json_dumps(m, JSON_COMPACT)) == NULL) {
				json_decref(m);
				continue;
			}
			ex->legs[k].req_len = strlen(ex->legs[k].req_body);
			json_decref(m);
		} else if (ex->kind == EX_LIST &&
		           json_object_get(json_object_get(ex->msg, "params"), "cursor") != NULL) {
			continue;
		}
		leg_init(ex, k, slot);
		if (ex->kind == EX_INITIALIZE)
			ex->legs[k].up = NULL;
		k++;
	}
	ex->n_legs = k;
	if (k == 0) {
		if (ex->kind == EX_LIST) {
			/* every server skipped (down, or no pages left): an empty page */
			json_t *r = json_object();
			json_object_set_new(r, mcp_list_key(ex->list), json_array());
			reply_result(ex, r);
		} else if (ex->kind == EX_FANOUT) {
			reply_result(ex, json_object()); /* no server takes it: nothing to do */
		} else {
			reply_error(ex, 503, MCP_ERR_UPSTREAM, "no_available_server",
			            "no MCP server of route '%s' is available", ex->route->name);
		}
		ex_finish(ex);
		return;
	}
	const char *http = ex->kind == EX_STREAM   ? "GET"
	                   : ex->kind == EX_DELETE ? "DELETE"
	                                           : "POST";
	const char *body = ex->kind == EX_STREAM || ex->kind == EX_DELETE ? NULL : ex->body;
	legs_start(ex, http, body, body ? ex->body_len : 0);
}

/* One server: bytes of the message made for it (owned, stolen; NULL: the client's bytes as
 * they are). */
static void forward_bytes(struct mcp_exchange *ex, unsigned slot, char *bytes, size_t len,
                          enum ex_kind kind)
{
	ex->kind = kind;
	if (!legs_alloc(ex, 1)) {
		free(bytes);
		reply_error(ex, 503, MCP_ERR_INTERNAL, "internal_error", "out of memory");
		ex_finish(ex);
		return;
	}
	leg_init(ex, 0, slot);
	ex->server = ex->legs[0].server;
	ex->legs[0].req_body = bytes;
	ex->legs[0].req_len = len;
	legs_start(ex, "POST", ex->body, ex->body_len);
}

/* One server: the message rewritten (msg: stolen) or the client's bytes as they are. */
static void forward_one(struct mcp_exchange *ex, unsigned slot, json_t *rewritten,
                        enum ex_kind kind)
{
	char *text = NULL;
	if (rewritten != NULL) {
		text = json_dumps(rewritten, JSON_COMPACT);
		json_decref(rewritten);
		if (text == NULL) {
			reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error", "cannot encode");
			ex_finish(ex);
			return;
		}
	}
	forward_bytes(ex, slot, text, text ? strlen(text) : 0, kind);
}

/*
 * One server, with params.<field> (or params.<sub>.<field>) — the prefixed name, a string of
 * the parsed message — cut to rest, its server's own name. The prefix is cut out of the
 * client's bytes when they allow it (mcp_splice_param): one copy instead of copying the
 * parsed message and encoding it again. A policy that rewrote an argument changed the
 * parsed message only: then it is encoded.
 */
static json_t *with_param(const json_t *msg, const char *sub, const char *field, const char *value);

static void forward_renamed(struct mcp_exchange *ex, unsigned slot, const char *sub,
                            const char *field, const json_t *value, const char *rest)
{
	const char *v = json_string_value(value);
	size_t vl = json_string_length(value);
	char *bytes;
	size_t len;

	if (!ex->args_changed && mcp_splice_param(ex->body, ex->body_len, sub, field, v, vl,
	                                          (size_t)(rest - v), &bytes, &len)) {
		forward_bytes(ex, slot, bytes, len, EX_FORWARD);
		return;
	}
	json_t *m = with_param(ex->msg, sub, field, rest);
	if (m == NULL) {
		reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error", "cannot rewrite %s",
		            ex->method);
		ex_finish(ex);
		return;
	}
	forward_one(ex, slot, m, EX_FORWARD);
}

/* ---------------------------------------------------------------- tools/call and routed methods */

/* The route's and the consumer's filter (NULL: none) for one kind of name. */
static void filters_of(const struct mcp_exchange *ex, enum mcp_list kind,
                       const struct mcp_tool_filter **rf, const struct mcp_tool_filter **cf)
{
	const struct mcp_consumer_conf *mc = ex->consumer ? ex->consumer->mcp : NULL;
	switch (kind) {
	case MCP_LIST_TOOLS:
		*rf = &ex->rc->tools;
		*cf = mc ? &mc->tools : NULL;
		return;
	case MCP_LIST_PROMPTS:
		*rf = &ex->rc->prompts;
		*cf = mc ? &mc->prompts : NULL;
		return;
	default: /* resources and their templates */
		*rf = &ex->rc->resources;
		*cf = mc ? &mc->resources : NULL;
		return;
	}
}

static int split_owner(struct mcp_exchange *ex, const char *name, size_t len, const char **rest)
{
	const char *names[MCP_MAX_SERVERS];
	for (size_t i = 0; i < ex->rc->n_servers; i++)
		names[i] = ex->rc->servers[i]->name;
	int slot = mcp_split_name(name, len, ex->rc->separator, names, ex->rc->n_servers, rest);
	if (slot >= 0 && session_up(ex, (unsigned)slot) == NULL)
		return -1; /* not part of this session */
	return slot;
}

/* The message with params.<field> (or params.ref.<field>) set to value. NULL on failure. */
static json_t *with_param(const json_t *msg, const char *sub, const char *field, const char *value)
{
	json_t *m = json_deep_copy(msg);
	json_t *p = json_object_get(m, "params");
	if (sub != NULL)
		p = json_object_get(p, sub);
	if (m == NULL || !json_is_object(p) ||
	    json_object_set_new(p, field, json_string(value)) != 0) {
		json_decref(m);
		return NULL;
	}
	return m;
}

static void on_quota(void *arg, struct quota_ticket *t);
static void call_admitted(struct mcp_exchange *ex);
static void call_policies(struct mcp_exchange *ex);
static void on_policies(void *arg, enum policy_verdict v);
static void policies_decided(struct mcp_exchange *ex, enum policy_verdict v);
static void admit_quota(struct mcp_exchange *ex);

static void admit_call(struct mcp_exchange *ex)
{
	const json_t *params = json_object_get(ex->msg, "params");
	const json_t *name = json_object_get(params, "name");
	const char *rest = NULL;

	if (!json_is_string(name)) {
		reply_error(ex, 200, MCP_ERR_INVALID_PARAMS, "invalid",
		            "tools/call needs params.name");
		ex_finish(ex);
		return;
	}
	const char *n = json_string_value(name);
	size_t nl = json_string_length(name);
	int slot = split_owner(ex, n, nl, &rest);
	/* A hidden tool looks exactly like one that does not exist: never forwarded. */
	const struct mcp_tool_filter *rf, *cf;
	filters_of(ex, MCP_LIST_TOOLS, &rf, &cf);
	bool allowed = slot >= 0 && mcp_tool_allowed(rf, cf, n, nl);
	snprintf(ex->tool, sizeof(ex->tool), "%.*s", (int)(nl < 128 ? nl : 128),
	         slot >= 0 ? rest : n);
	if (!allowed) {
		ex->tool_label = "other";
		if (slot >= 0)
			ex->server = ex->rc->servers[slot];
		reply_error(ex, 200, MCP_ERR_INVALID_PARAMS, slot >= 0 ? "denied" : "unknown_tool",
		            "Unknown tool: %s", n);
		ex_finish(ex);
		return;
	}
	const struct mcp_server_conf *s = ex->rc->servers[slot];
	ex->server = s;
	ex->tool_label = mcp_server_tool_label(s->state, rest);
	ex->legs = NULL;
	/* The route's request policies over the arguments, before any quota is counted. */
	if (ex->route->plugin_phases & POLICY_PHASE_REQUEST) {
		call_policies(ex);
		return;
	}
	admit_quota(ex);
}

static void call_policies(struct mcp_exchange *ex)
{
	const json_t *args = json_object_get(json_object_get(ex->msg, "params"), "arguments");
	struct policy_env env = {
	        .base = ex->mw->w->base,
	        .upstream = ex->mw->w->upstream,
	        .request_id = ex->request_id,
	        .route = ex->route->name,
	        .consumer = ex->consumer ? ex->consumer->name : NULL,
	};

	ex->policy_body = mcp_policy_body(args, NULL);
	if (ex->policy_body == NULL) {
		reply_error(ex, 200, MCP_ERR_POLICY, "policy_refused",
		            "tools/call refused: its arguments cannot be checked by the gateway's "
		            "policies (nested deeper than %d)",
		            MCP_POLICY_MAX_DEPTH);
		ex_finish(ex);
		return;
	}
	ex->policies = policy_run_new(ex->route, &env, false);
	if (ex->policies == NULL) {
		reply_error(ex, 503, MCP_ERR_INTERNAL, "internal_error", "out of memory");
		ex_finish(ex);
		return;
	}
	enum policy_verdict v =
	        policy_run_request(ex->policies, PROTO_CHAT, ex->policy_body, on_policies, ex);
	if (v == POLICY_PENDING) {
		ex->policy_pending = true;
		return;
	}
	policies_decided(ex, v);
}

static void on_policies(void *arg, enum policy_verdict v)
{
	struct mcp_exchange *ex = arg;
	ex->policy_pending = false;
	policies_decided(ex, v);
}

static void policies_decided(struct mcp_exchange *ex, enum policy_verdict v)
{
	const struct policy_request *out = policy_run_request_outcome(ex->policies);
	const struct policy_action *acts;
	size_t n = policy_run_actions(ex->policies, &acts, NULL);
	for (size_t i = 0; i < n && ex->n_policy_actions < RECORD_MAX_POLICY_ACTIONS; i++)
		ex->policy_actions[ex->n_policy_actions++] = (struct record_policy){
		        .policy = acts[i].policy, .action = acts[i].action, .count = acts[i].count};
	if (v == POLICY_REFUSE) {
		/* A JSON-RPC error the agent can read; the server never sees the call. */
		reply_error(ex, 200, MCP_ERR_POLICY, "policy_refused",
		            "tools/call refused by the gateway's policies: %s (%s)", out->message,
		            out->code ? out->code : "refused");
		ex_finish(ex);
		return;
	}
	/* A policy that rewrote text rewrote the arguments themselves (shared strings). */
	ex->args_changed = out->changed;
	admit_quota(ex);
}

static void admit_quota(struct mcp_exchange *ex)
{
	const struct mcp_server_conf *s = ex->server;
	const struct config_consumer *qc =
	        ex->consumer && ex->consumer->mcp ? &ex->consumer->mcp->as_consumer : NULL;
	memset(&ex->ticket, 0, sizeof(ex->ticket));
	if (quota_admit(ex->mw->w->quota, &ex->ticket, ex->config, qc, &s->as_instance, 0, 0,
	                on_quota, ex) == QUOTA_PENDING) {
		ex->quota_pending = true;
		return;
	}
	call_admitted(ex);
}

static void on_quota(void *arg, struct quota_ticket *t)
{
	struct mcp_exchange *ex = arg;
	ex->quota_pending = false;
	call_admitted(ex);
}

static void call_admitted(struct mcp_exchange *ex)
{
	struct quota_ticket *t = &ex->ticket;
	const struct mcp_server_conf *s = ex->server;

	if (t->store_error && t->deny_on_error) {
		reply_error(ex, 503, MCP_ERR_INTERNAL, "quota_store_unavailable",
		            "the quota store is unreachable and store.on_error is deny");
		ex_finish(ex);
		return;
	}
	if (!t->admitted) {
		char v[32];
		snprintf(v, sizeof(v), "%" PRIu64, t->retry_after_s ? t->retry_after_s : 1);
		out_header(ex, "Retry-After", v);
		reply_error(ex, 429, MCP_ERR_RATE_LIMITED, "rate_limited",
		            "tool call rate limit reached (%s); retry in %s s",
		            t->denied_by ? t->denied_by->id : "limit", v);
		ex_finish(ex);
		return;
	}
	ex->ticket_held = true;
	if (health_admit(s->as_instance.state, &s->as_instance, http_now_us()) == HEALTH_DOWN) {
		reply_error(ex, 200, MCP_ERR_UPSTREAM, "unhealthy",
		            "MCP server '%s' is unavailable (unhealthy)", s->name);
		ex_finish(ex);
		return;
	}
	const json_t *name = json_object_get(json_object_get(ex->msg, "params"), "name");
	const char *rest = json_string_value(name) + strlen(s->name) + strlen(ex->rc->separator);
	unsigned slot = 0;
	while (ex->rc->servers[slot] != s)
		slot++;
	forward_renamed(ex, slot, NULL, "name", name, rest);
}

/* prompts/get (name), resources/... (uri), completion/complete (ref.name | ref.uri): false
 * when the field names no server of the session; else the exchange went on (forwarded, or
 * refused here when the route or the consumer hides the prompt or resource). */
static bool route_by_prefix(struct mcp_exchange *ex, const char *sub, const char *field)
{
	const json_t *p = json_object_get(ex->msg, "params");
	if (sub != NULL)
		p = json_object_get(p, sub);
	const json_t *v = json_object_get(p, field);
	const char *rest = NULL;
	if (!json_is_string(v))
		return false;
	const char *name = json_string_value(v);
	size_t len = json_string_length(v);
	int slot = split_owner(ex, name, len, &rest);
	if (slot < 0)
		return false;
	/* A hidden prompt or resource answers as one that does not exist (the codes the spec
	 * gives for those), never forwarded. */
	enum mcp_list kind = strcmp(field, "uri") == 0 ? MCP_LIST_RESOURCES : MCP_LIST_PROMPTS;
	const struct mcp_tool_filter *rf, *cf;
	filters_of(ex, kind, &rf, &cf);
	if (!mcp_tool_allowed(rf, cf, name, len)) {
		ex->server = ex->rc->servers[slot];
		if (kind == MCP_LIST_PROMPTS)
			reply_error(ex, 200, MCP_ERR_INVALID_PARAMS, "denied", "Unknown prompt: %s",
			            name);
		else
			reply_error(ex, 200, MCP_ERR_RESOURCE_NOT_FOUND, "denied",
			            "Resource not found: %s", name);
		ex_finish(ex);
		return true;
	}
	forward_renamed(ex, (unsigned)slot, sub, field, v, rest);
	return true;
}

/* A client's answer to a server's request: "s<slot>:<original id>" in sessions with
 * several servers, as forward_event made it. */
static void route_response(struct mcp_exchange *ex)
{
	if (ex->sess.n == 1) {
		forward_one(ex, ex->sess.up[0].slot, NULL, EX_NOTIFY);
		return;
	}
	const char *s = json_string_value(ex->id);
	unsigned slot = 0;
	const char *p = s;
	if (s != NULL && *p == 's') {
		for (p++; *p >= '0' && *p <= '9' && slot < MCP_MAX_SERVERS; p++)
			slot = slot * 10 + (unsigned)(*p - '0');
	}
	json_t *orig = s && *p == ':' ? json_loads(p + 1, JSON_DECODE_ANY, NULL) : NULL;
	if (orig == NULL || session_up(ex, slot) == NULL || slot >= ex->rc->n_servers) {
		json_decref(orig);
		reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "a response to an unknown request id");
		ex_finish(ex);
		return;
	}
	json_t *m = json_deep_copy(ex->msg);
	if (m == NULL || json_object_set_new(m, "id", orig) != 0) {
		json_decref(m);
		reply_error(ex, 500, MCP_ERR_INTERNAL, "internal_error", "out of memory");
		ex_finish(ex);
		return;
	}
	forward_one(ex, slot, m, EX_NOTIFY);
}

/* ---------------------------------------------------------------- dispatch */

static void dispatch_request(struct mcp_exchange *ex)
{
	const char *m = ex->method;

	if (strcmp(m, "ping") == 0) {
		ex->kind = EX_LOCAL;
		reply_result(ex, json_object());
		ex_finish(ex);
		return;
	}
	if (mcp_list_of_method(m, &ex->list)) {
		ex->kind = EX_LIST;
		const json_t *cur = json_object_get(json_object_get(ex->msg, "params"), "cursor");
		if (cur != NULL) {
			if (!json_is_string(cur) ||
			    (ex->cursor_buf = malloc(MCP_CURSOR_MAX)) == NULL ||
			    !mcp_cursor_decode(ex->mw->crypto, ex->sess.sid, (uint8_t)ex->list,
			                       json_string_value(cur), json_string_length(cur),
			                       ex->cursor_in, &ex->n_cursor_in, ex->cursor_buf,
			                       MCP_CURSOR_MAX)) {
				reply_error(ex, 200, MCP_ERR_INVALID_PARAMS, "invalid",
				            "invalid cursor");
				ex_finish(ex);
				return;
			}
		}
		fan_out(ex, m);
		return;
	}
	if (strcmp(m, "tools/call") == 0) {
		admit_call(ex);
		return;
	}
	bool routed = false, tried = true;
	if (strcmp(m, "prompts/get") == 0)
		routed = route_by_prefix(ex, NULL, "name");
	else if (strcmp(m, "resources/read") == 0 || strcmp(m, "resources/subscribe") == 0 ||
	         strcmp(m, "resources/unsubscribe") == 0)
		routed = route_by_prefix(ex, NULL, "uri");
	else if (strcmp(m, "completion/complete") == 0)
		routed = route_by_prefix(ex, "ref", "name") || route_by_prefix(ex, "ref", "uri");
	else
		tried = false;
	if (routed)
		return;
	if (tried) {
		reply_error(ex, 200, MCP_ERR_INVALID_PARAMS, "invalid",
		            "%s: the name or uri names no server of this session", m);
		ex_finish(ex);
		return;
	}
	if (strcmp(m, "logging/setLevel") == 0) {
		ex->kind = EX_FANOUT;
		fan_out(ex, m);
		return;
	}
	/* Anything else: one server can take it as it is; several cannot be merged blindly. */
	if (ex->sess.n == 1) {
		forward_one(ex, ex->sess.up[0].slot, NULL, EX_FORWARD);
		return;
	}
	reply_error(ex, 200, MCP_ERR_METHOD_NOT_FOUND, "method_not_found", "Method not found: %s",
	            m);
	ex_finish(ex);
}

static void dispatch_post(struct mcp_exchange *ex)
{
	struct http_request *hr = ex->http;
	const char *ct = http_request_header(hr, "content-type");
	json_error_t jerr;

	if (ct == NULL || strncasecmp(ct, "application/json", 16) != 0 ||
	    (ct[16] != '\0' && ct[16] != ';' && ct[16] != ' ')) {
		reply_error(ex, 415, MCP_ERR_INVALID_REQUEST, "invalid",
		            "Content-Type must be application/json");
		ex_finish(ex);
		return;
	}
	ex->body = hr->body;
	ex->body_len = hr->body_len;
	ex->msg = json_loadb(hr->body, hr->body_len, JSON_REJECT_DUPLICATES, &jerr);
	if (ex->msg == NULL) {
		reply_error(ex, 400, MCP_ERR_PARSE, "invalid",
		            "Parse error: %s at line %d column %d", jerr.text, jerr.line,
		            jerr.column);
		ex_finish(ex);
		return;
	}
	if (json_is_array(ex->msg)) {
		dispatch_batch(ex);
		return;
	}
	dispatch_message(ex);
}

/* One message: the client's own, or a batch's member. */
static void dispatch_message(struct mcp_exchange *ex)
{
	ex->kind_msg = mcp_msg_classify(ex->msg, &ex->method);
	const json_t *id = json_object_get(ex->msg, "id");
	if (ex->kind_msg == MCP_MSG_REQUEST || ex->kind_msg == MCP_MSG_RESPONSE)
		ex->id = id;
	if (ex->kind_msg == MCP_MSG_INVALID) {
		reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid", "Invalid Request");
		ex_finish(ex);
		return;
	}
	if (ex->kind_msg == MCP_MSG_REQUEST && strcmp(ex->method, "initialize") == 0) {
		if (ex->batch != NULL) {
			reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
			            "initialize must not be part of a JSON-RPC batch");
			ex_finish(ex);
			return;
		}
		if (ex->has_session) {
			reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
			            "initialize must be sent without Mcp-Session-Id");
			ex_finish(ex);
			return;
		}
		const char *v = json_string_value(
		        json_object_get(json_object_get(ex->msg, "params"), "protocolVersion"));
		int vi = v ? mcp_version_index(v, strlen(v)) : -1;
		ex->kind = EX_INITIALIZE;
		ex->sess.version = (uint8_t)(vi >= 0 ? vi : 0);
		ex->sess.generation = ex->config->generation;
		ex->sess.route = (uint16_t)ex->route->index;
		ex->sess.consumer = ex->consumer ? (uint16_t)ex->consumer->index : MCP_NO_CONSUMER;
		ex->sess.created_ms = ex->start_unix_us / 1000;
		if (getrandom(ex->sess.sid, MCP_SID_BYTES, 0) != MCP_SID_BYTES) {
			reply_error(ex, 503, MCP_ERR_INTERNAL, "internal_error", "no randomness");
			ex_finish(ex);
			return;
		}
		fan_out(ex, "initialize");
		return;
	}
	if (!ex->has_session) {
		reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "Bad Request: Mcp-Session-Id header is required");
		ex_finish(ex);
		return;
	}
	switch (ex->kind_msg) {
	case MCP_MSG_REQUEST:
		dispatch_request(ex);
		return;
	case MCP_MSG_NOTIFICATION:
		ex->kind = EX_NOTIFY;
		fan_out(ex, ex->method);
		return;
	default:
		route_response(ex);
		return;
	}
}

/* ---------------------------------------------------------------- batches */

/*
 * A JSON-RPC batch (MCP 2025-03-26 only): each member becomes an exchange of its own,
 * dispatched as if it had come alone — routed to the server that owns it or answered
 * here, with the allow/deny lists, policies and limits applied to it alone (a refused member
 * gets its own error; the others go on). Their answers come back as one JSON array, in
 * the batch's order, or — as soon as one server answers with a stream — as one SSE stream
 * carrying every member's events and answers as they come. Notifications and responses
 * get no answer: a batch of only those is 202 once every member was accepted.
 */

static void batch_free(struct mcp_batch *b)
{
	if (b == NULL)
		return;
	for (size_t i = 0; i < b->n; i++)
		free(b->replies[i]);
	free(b->replies);
	free(b->reply_len);
	free(b->members);
	free(b->fail_body);
	free(b);
}

/* The batch ends before its members (the client went away, shutdown): end them now. */
static void batch_end_members(struct mcp_exchange *bx)
{
	struct mcp_batch *b = bx->b;
	b->aborting = true;
	for (size_t i = 0; i < b->n; i++) {
		struct mcp_exchange *m = b->members[i];
		if (m == NULL)
			continue;
		m->http = NULL;
		if (m->quota_pending) {
			quota_cancel(m->mw->w->quota, &m->ticket);
			m->quota_pending = false;
		}
		if (m->status == 0)
			m->status = 499;
		if (m->outcome == NULL)
			m->outcome = "client_gone";
		ex_finish(m); /* clears b->members[i] */
	}
}

static void batch_complete(struct mcp_exchange *bx)
{
	struct mcp_batch *b = bx->b;

	if (bx->http != NULL && b->streaming) {
		http_reply_end(bx->http);
	} else if (bx->http != NULL && b->any_request) {
		struct evbuffer *out = evbuffer_new();
		size_t k = 0;
		if (out == NULL) {
			bx->status = 503;
			http_reply(bx->http, 503, "text/plain", "out of memory\n", 14);
		} else {
			evbuffer_add(out, "[", 1);
			for (size_t i = 0; i < b->n; i++)
				if (b->replies[i] != NULL) {
					if (k++ > 0)
						evbuffer_add(out, ",", 1);
					evbuffer_add(out, b->replies[i], b->reply_len[i]);
				}
			evbuffer_add(out, "]\n", 2);
			size_t n = evbuffer_get_length(out);
			bx->status = 200;
			bx->bytes_out += n;
			http_reply(bx->http, 200, "application/json",
			           (const char *)evbuffer_pullup(out, -1), n);
			evbuffer_free(out);
		}
	} else if (bx->http != NULL && b->fail_status != 0) {
		bx->status = b->fail_status;
		bx->bytes_out += b->fail_len;
		http_reply(bx->http, b->fail_status, "application/json",
		           b->fail_body ? b->fail_body : "", b->fail_body ? b->fail_len : 0);
	} else if (bx->http != NULL) {
		bx->status = 202;
		http_reply(bx->http, 202, NULL, "", 0);
	}
	bx->http = NULL;
	if (bx->outcome == NULL)
		bx->outcome = "ok";
	ex_finish(bx);
}

static void batch_member_done(struct mcp_exchange *bx, size_t i)
{
	struct mcp_batch *b = bx->b;
	b->members[i] = NULL;
	b->left--;
	if (b->left == 0 && !b->starting && !b->aborting)
		batch_complete(bx);
}

/* A member's whole answer (out_reply). */
static void batch_put(struct mcp_exchange *m, int status, const char *body, size_t len)
{
	struct mcp_exchange *bx = m->batch;
	struct mcp_batch *b = bx->b;
	struct evbuffer *made = NULL;
	struct mcp_scan sc;

	if (m->kind_msg != MCP_MSG_REQUEST && m->kind_msg != MCP_MSG_INVALID) {
		/* Notifications and responses are not answered; a failure is the batch's answer
		 * when no member is. */
		if ((status < 200 || status >= 300) && b->fail_status == 0 &&
		    (b->fail_body = malloc(len ? len : 1)) != NULL) {
			b->fail_status = status;
			memcpy(b->fail_body, body, len);
			b->fail_len = len;
		}
		return;
	}
	while (len > 0 && (body[len - 1] == '\n' || body[len - 1] == '\r'))
		len--;
	if (len == 0 || !mcp_scan_object(body, len, &sc)) {
		/* The server answered a request with no JSON-RPC message: say so, for it. */
		char msg[128];
		snprintf(msg, sizeof(msg),
		         "the MCP server answered HTTP %d without a JSON-RPC message", status);
		made = evbuffer_new();
		if (made == NULL ||
		    !put_error(made, m->id, MCP_ERR_UPSTREAM, "upstream_error", msg)) {
			if (made != NULL)
				evbuffer_free(made);
			return;
		}
		m->outcome = "upstream_error";
		m->rpc_error = MCP_ERR_UPSTREAM;
		len = evbuffer_get_length(made);
		body = (const char *)evbuffer_pullup(made, -1);
	}
	if (b->streaming) {
		struct evbuffer *e = evbuffer_new();
		if (e != NULL) {
			put_event(e, "message", NULL, body, len);
			out_chunk(m, e);
			evbuffer_free(e);
		}
	} else if (b->replies[m->member] == NULL && (b->replies[m->member] = malloc(len)) != NULL) {
		memcpy(b->replies[m->member], body, len);
		b->reply_len[m->member] = len;
	}
	if (made != NULL)
		evbuffer_free(made);
}

/* A member's server answers with a stream: from now on the batch is one SSE stream. */
static void batch_stream_start(struct mcp_exchange *bx)
{
	struct mcp_batch *b = bx->b;
	if (b->streaming || bx->http == NULL)
		return;
	b->streaming = true;
	bx->stream_started = true;
	bx->status = 200;
	http_response_header(bx->http, "Cache-Control", "no-cache");
	http_reply_start(bx->http, 200, "text/event-stream");
	/* The answers that came before go first. */
	struct evbuffer *e = evbuffer_new();
	for (size_t i = 0; e != NULL && i < b->n; i++)
		if (b->replies[i] != NULL) {
			put_event(e, "message", NULL, b->replies[i], b->reply_len[i]);
			free(b->replies[i]);
			b->replies[i] = NULL;
		}
	if (e != NULL) {
		bx->bytes_out += evbuffer_get_length(e);
		http_reply_chunk_buffer(bx->http, e);
		evbuffer_free(e);
	}
}

static void batch_drained(void *arg)
{
	struct mcp_exchange *bx = arg;
	bx->b->drain_armed = false;
	for (size_t i = 0; i < bx->b->n; i++)
		if (bx->b->members[i] != NULL)
			on_client_drained(bx->b->members[i]);
}

/* A member: the batch's session, snapshot and identity; its own message and bytes. */
static struct mcp_exchange *member_new(struct mcp_exchange *bx, size_t i, json_t *msg)
{
	struct mcp_exchange *m = calloc(1, sizeof(*m));
	char *body = json_dumps(msg, JSON_COMPACT);
	if (m == NULL || body == NULL) {
		free(m);
		free(body);
		return NULL;
	}
	m->mw = bx->mw;
	m->http = bx->http;
	m->config = config_ref(bx->config);
	m->route = bx->route;
	m->rc = bx->rc;
	m->consumer = bx->consumer;
	memcpy(m->key_fp, bx->key_fp, sizeof(m->key_fp));
	m->sess = bx->sess;
	m->has_session = bx->has_session;
	memcpy(m->sess_hash, bx->sess_hash, sizeof(m->sess_hash));
	m->version = bx->version;
	m->multi = bx->multi;
	m->msg = json_incref(msg);
	m->body_owned = body;
	m->body = body;
	m->body_len = strlen(body);
	m->batch = bx;
	m->member = i;
	memcpy(m->http_method, bx->http_method, sizeof(m->http_method));
	memcpy(m->client_ip, bx->client_ip, sizeof(m->client_ip));
	snprintf(m->request_id, sizeof(m->request_id), "%.24s.%u", bx->request_id,
	         (unsigned)(i % 1000)); /* i < MCP_MAX_BATCH */
	m->start_us = bx->start_us;
	m->start_unix_us = bx->start_unix_us;
	m->bytes_in = m->body_len;
	return m;
}

static void dispatch_batch(struct mcp_exchange *bx)
{
	size_t n = json_array_size(bx->msg), answered = 0;
	struct mcp_batch *b;

	bx->kind = EX_BATCH;
	bx->method = "batch";
	if (!bx->has_session) {
		reply_error(bx, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "Bad Request: Mcp-Session-Id header is required");
		ex_finish(bx);
		return;
	}
	if (!mcp_version_allows_batch(bx->version)) {
		reply_error(bx, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "JSON-RPC batches are not allowed in MCP protocol version %s (only in "
		            "2025-03-26)",
		            mcp_versions[bx->version]);
		ex_finish(bx);
		return;
	}
	switch (mcp_batch_check(bx->msg, MCP_MAX_BATCH, &answered)) {
	case MCP_BATCH_EMPTY:
		reply_error(bx, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "Invalid Request: an empty batch");
		ex_finish(bx);
		return;
	case MCP_BATCH_TOO_LARGE:
		reply_error(bx, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "a batch of %zu messages: at most %d", n, MCP_MAX_BATCH);
		ex_finish(bx);
		return;
	case MCP_BATCH_MIXED:
		reply_error(bx, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "a batch holds requests and notifications, or responses, not both");
		ex_finish(bx);
		return;
	case MCP_BATCH_OK:
		break;
	}
	bx->b = b = calloc(1, sizeof(*b));
	if (b != NULL) {
		b->members = calloc(n, sizeof(*b->members));
		b->replies = calloc(n, sizeof(*b->replies));
		b->reply_len = calloc(n, sizeof(*b->reply_len));
	}
	bool ok = b != NULL && b->members != NULL && b->replies != NULL && b->reply_len != NULL;
	for (size_t i = 0; ok && i < n; i++)
		ok = (b->members[i] = member_new(bx, i, json_array_get(bx->msg, i))) != NULL;
	if (!ok) {
		for (size_t i = 0; b != NULL && b->members != NULL && i < n; i++)
			if (b->members[i] != NULL) {
				json_decref(b->members[i]->msg);
				config_unref(b->members[i]->config);
				free(b->members[i]->body_owned);
				free(b->members[i]);
			}
		if (b != NULL)
			b->n = 0; /* nothing of the members is left to free */
		reply_error(bx, 503, MCP_ERR_INTERNAL, "internal_error", "out of memory");
		ex_finish(bx);
		return;
	}
	b->n = b->left = n;
	b->any_request = answered > 0;
	b->starting = true;
	for (size_t i = 0; i < n; i++) {
		LIST_INSERT_HEAD(&bx->mw->live, b->members[i], link);
		bx->mw->n_live++;
	}
	/* A member may be answered at once (ping, a refusal): its slot empties meanwhile. */
	for (size_t i = 0; i < n; i++) {
		struct mcp_exchange *m = b->members[i];
		if (m != NULL)
			dispatch_message(m);
	}
	b->starting = false;
	if (b->left == 0)
		batch_complete(bx);
}

static const char *get_header(void *arg, const char *name)
{
	return http_request_header(arg, name);
}

static void on_client_abort(void *arg);

/* The session named by the client's Mcp-Session-Id: its snapshot, route and consumer. A
 * session that cannot be found or no longer can be served is 404: the client initialises
 * again, and no message ever goes to a server of another session. */
static bool attach_session(struct mcp_exchange *ex, const char *sid)
{
	struct mcp_session *s = &ex->sess;
	size_t len = strlen(sid);

	if (!mcp_session_decode(ex->mw->crypto, sid, len, s)) {
		reply_error(ex, 404, MCP_ERR_SESSION, "session_not_found", "session not found");
		return false;
	}
	mcp_session_hash(s->sid, ex->sess_hash);
	struct config *c = mcp_worker_snapshot(ex->mw, s->generation);
	const struct config_route *rt = c && s->route < c->n_routes ? &c->routes[s->route] : NULL;
	if (rt == NULL || rt->mcp == NULL || strcmp(rt->name, ex->route->name) != 0) {
		config_unref(c);
		reply_error(
		        ex, 404, MCP_ERR_SESSION, "session_not_found",
		        "session not found (it ended, or the gateway restarted): initialize a new "
		        "session");
		return false;
	}
	const struct config_consumer *cons =
	        s->consumer != MCP_NO_CONSUMER && s->consumer < c->n_consumers
	                ? &c->consumers[s->consumer]
	                : NULL;
	/* Only the consumer that opened a session may use it. */
	bool same = (cons == NULL && ex->consumer == NULL) ||
	            (cons != NULL && ex->consumer != NULL &&
	             strcmp(cons->name, ex->consumer->name) == 0);
	for (unsigned i = 0; same && i < s->n; i++) {
		if (s->up[i].slot >= rt->mcp->n_servers ||
		    mcp_server_retired(rt->mcp->servers[s->up[i].slot]->state)) {
			config_unref(c);
			reply_error(
			        ex, 404, MCP_ERR_SESSION, "session_not_found",
			        "session ended: one of its MCP servers was removed; initialize a "
			        "new session");
			return false;
		}
	}
	if (!same) {
		config_unref(c);
		reply_error(ex, 404, MCP_ERR_SESSION, "session_not_found", "session not found");
		return false;
	}
	/* From here on the exchange runs on the session's snapshot. */
	config_unref(ex->config);
	ex->config = c;
	ex->route = rt;
	ex->rc = rt->mcp;
	ex->consumer = cons;
	ex->has_session = true;
	ex->version = s->version;
	ex->multi = s->n > 1;
	mcp_worker_session_seen(ex->mw, s, rt->name, cons ? cons->name : NULL,
	                        rt->mcp->session_idle_timeout);
	return true;
}

static bool accepts(const char *accept, const char *type)
{
	return accept == NULL || strstr(accept, type) != NULL || strstr(accept, "*/*") != NULL;
}

void mcp_handle(struct worker *w, struct http_request *hr, const struct config_route *route)
{
	struct mcp_worker *mw = w->mcp;
	struct mcp_exchange *ex = mw ? calloc(1, sizeof(*ex)) : NULL;

	if (ex == NULL) {
		http_reply_error(hr, 503, "server_error", "out_of_memory", "out of memory");
		return;
	}
	ex->mw = mw;
	ex->http = hr;
	ex->config = config_ref(w->config);
	ex->route = route;
	ex->rc = route->mcp;
	ex->version = -1;
	ex->start_us = hr->start_us ? hr->start_us : http_now_us();
	ex->start_unix_us = wall_us() - (http_now_us() - ex->start_us);
	ex->bytes_in = hr->body_len;
	snprintf(ex->http_method, sizeof(ex->http_method), "%s", hr->method);
	snprintf(ex->client_ip, sizeof(ex->client_ip), "%s", hr->client_ip ? hr->client_ip : "");
	w->n_requests++;
	snprintf(ex->request_id, sizeof(ex->request_id), "%016" PRIx64 "%08" PRIx64,
	         w->rng ^ (uint64_t)(uintptr_t)ex, w->n_requests);
	LIST_INSERT_HEAD(&mw->live, ex, link);
	mw->n_live++;
	http_response_header(hr, "x-request-id", ex->request_id);
	http_request_on_abort(hr, on_client_abort, ex);

	/* key-auth on the current snapshot: a revoked key stops at once, sessions or not. */
	enum auth_result ar =
	        auth_check(ex->config, route, get_header, hr, &ex->consumer, ex->key_fp);
	if (ar == AUTH_MISSING || ar == AUTH_UNKNOWN) {
		http_response_header(hr, "WWW-Authenticate", "Bearer");
		reply_error(ex, 401, MCP_ERR_UNAUTHORIZED, "unauthorized",
		            ar == AUTH_MISSING
		                    ? "no API key: send it as Authorization: Bearer <key>"
		                    : "invalid API key (fingerprint %s)",
		            ex->key_fp);
		ex_finish(ex);
		return;
	}
	if (ar == AUTH_FORBIDDEN) {
		reply_error(ex, 403, MCP_ERR_FORBIDDEN, "forbidden",
		            "consumer '%s' may not use route '%s'", ex->consumer->name,
		            route->name);
		ex_finish(ex);
		return;
	}
	bool get = strcmp(hr->method, "GET") == 0, post = strcmp(hr->method, "POST") == 0;
	bool del = strcmp(hr->method, "DELETE") == 0;
	if (!get && !post && !del) {
		http_response_header(hr, "Allow", "GET, POST, DELETE");
		reply_error(ex, 405, MCP_ERR_INVALID_REQUEST, "method_not_allowed",
		            "%s is not allowed on an MCP endpoint", hr->method);
		ex_finish(ex);
		return;
	}
	const char *pv = http_request_header(hr, "mcp-protocol-version");
	if (pv != NULL && mcp_version_index(pv, strlen(pv)) < 0) {
		reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
		            "unsupported MCP-Protocol-Version: %.40s", pv);
		ex_finish(ex);
		return;
	}
	const char *sid = http_request_header(hr, "mcp-session-id");
	if (sid != NULL && (!mcp_header_token(sid, MCP_TOKEN_MAX) || !attach_session(ex, sid))) {
		if (ex->http != NULL)
			reply_error(ex, 404, MCP_ERR_SESSION, "session_not_found",
			            "session not found");
		ex_finish(ex);
		return;
	}
	const char *accept = http_request_header(hr, "accept");
	if (get) {
		if (!ex->has_session || !accepts(accept, "text/event-stream")) {
			reply_error(
			        ex, ex->has_session ? 406 : 400, MCP_ERR_INVALID_REQUEST, "invalid",
			        ex->has_session ? "GET needs Accept: text/event-stream"
			                        : "Bad Request: Mcp-Session-Id header is required");
			ex_finish(ex);
			return;
		}
		ex->kind = EX_STREAM;
		const char *last = http_request_header(hr, "last-event-id");
		if (last != NULL)
			mcp_event_ids_parse(&ex->ids, last, strlen(last));
		if (!legs_alloc(ex, ex->sess.n)) {
			reply_error(ex, 503, MCP_ERR_INTERNAL, "internal_error", "out of memory");
			ex_finish(ex);
			return;
		}
		ex->n_legs = 0;
		for (unsigned i = 0; i < ex->sess.n; i++) {
			unsigned slot = ex->sess.up[i].slot;
			leg_init(ex, ex->n_legs, slot);
			if (ex->ids.id[slot] != NULL)
				snprintf(ex->legs[ex->n_legs].last_event_id,
				         sizeof(ex->legs[ex->n_legs].last_event_id), "%s",
				         ex->ids.id[slot]);
			ex->n_legs++;
		}
		legs_start(ex, "GET", NULL, 0);
		return;
	}
	if (del) {
		if (!ex->has_session) {
			reply_error(ex, 400, MCP_ERR_INVALID_REQUEST, "invalid",
			            "Bad Request: Mcp-Session-Id header is required");
			ex_finish(ex);
			return;
		}
		ex->kind = EX_DELETE;
		fan_out(ex, "DELETE");
		return;
	}
	if (accept != NULL &&
	    !(accepts(accept, "application/json") && accepts(accept, "text/event-stream"))) {
		reply_error(
		        ex, 406, MCP_ERR_INVALID_REQUEST, "invalid",
		        "Not Acceptable: Accept must list application/json and text/event-stream");
		ex_finish(ex);
		return;
	}
	dispatch_post(ex);
}

/* ---------------------------------------------------------------- the end */

static void on_client_abort(void *arg)
{
	struct mcp_exchange *ex = arg;
	if (ex->b != NULL)
		batch_end_members(ex);
	for (size_t i = 0; i < ex->n_legs; i++)
		leg_cleanup(&ex->legs[i]);
	if (ex->quota_pending) {
		quota_cancel(ex->mw->w->quota, &ex->ticket);
		ex->quota_pending = false;
	}
	if (ex->status == 0 || !ex->stream_started)
		ex->status = 499;
	if (ex->outcome == NULL || ex->kind == EX_STREAM)
		ex->outcome = ex->kind == EX_STREAM ? "ok" : "client_gone";
	http_request_abandon(ex->http);
	ex->http = NULL;
	ex_finish(ex);
}

void mcp_record(const struct mcp_exchange *ex);

static void ex_finish(struct mcp_exchange *ex)
{
	struct mcp_worker *mw = ex->mw;
	struct mcp_exchange *batch = ex->batch;
	size_t member = ex->member;

	if (ex->b != NULL)
		batch_end_members(ex);
	if (ex->http != NULL && batch == NULL)
		http_request_abandon(ex->http);
	ex->http = NULL;
	for (size_t i = 0; i < ex->n_legs; i++)
		leg_cleanup(&ex->legs[i]);
	if (ex->quota_pending)
		quota_cancel(mw->w->quota, &ex->ticket);
	if (ex->ticket_held)
		quota_settle(mw->w->quota, &ex->ticket, 0, 0);
	/* the run first: cancelling a pending policy may still read the body */
	policy_run_free(ex->policies);
	ex->policies = NULL;
	json_decref(ex->policy_body);
	ex->policy_body = NULL;
	mcp_record(ex);
	LIST_REMOVE(ex, link);
	mw->n_live--;
	free(ex->legs);
	if (ex->events)
		evbuffer_free(ex->events);
	mcp_event_ids_free(&ex->ids);
	json_decref(ex->msg);
	config_unref(ex->config);
	free(ex->body_owned);
	free(ex->cursor_buf);
	batch_free(ex->b);
	free(ex);
	if (batch != NULL)
		batch_member_done(batch, member);
}

/* A server stream whose session lost a server (reload) ends now; the client's next message
 * gets 404 and it initialises again. */
static void on_retired(evutil_socket_t fd, short what, void *arg)
{
	struct mcp_worker *mw = arg;
	struct mcp_exchange *ex, *next;
	/* A retired server is never used again: its parsed endpoint goes (a transfer still
	 * running keeps its own hold on it). */
	for (size_t i = 0; i < mw->n_urls; i++)
		if (mw->urls[i].state != NULL && mcp_server_retired(mw->urls[i].state) &&
		    mw->urls[i].url != NULL) {
			upstream_url_release(mw->urls[i].url);
			mw->urls[i].url = NULL;
		}
	for (ex = LIST_FIRST(&mw->live); ex != NULL; ex = next) {
		next = LIST_NEXT(ex, link);
		if (ex->kind != EX_STREAM)
			continue;
		bool gone = false;
		for (size_t i = 0; i < ex->n_legs && !gone; i++)
			gone = mcp_server_retired(ex->legs[i].server->state);
		if (!gone)
			continue;
		for (size_t i = 0; i < ex->n_legs; i++)
			leg_cleanup(&ex->legs[i]);
		complete_stream(ex);
		ex_finish(ex);
	}
}

void mcp_worker_drain(struct mcp_worker *mw)
{
	struct mcp_exchange *ex, *next;
	for (ex = mw ? LIST_FIRST(&mw->live) : NULL; ex != NULL; ex = next) {
		next = LIST_NEXT(ex, link);
		if (ex->kind != EX_STREAM || !ex->stream_started)
			continue;
		for (size_t i = 0; i < ex->n_legs; i++)
			leg_cleanup(&ex->legs[i]);
		complete_stream(ex);
		ex_finish(ex);
	}
}

void mcp_worker_abort_all(struct mcp_worker *mw)
{
	struct mcp_exchange *ex;
	while (mw != NULL && (ex = LIST_FIRST(&mw->live)) != NULL) {
		if (ex->batch != NULL)
			ex = ex->batch; /* a batch ends its members */
		if (ex->outcome == NULL)
			ex->outcome = "client_gone";
		ex_finish(ex);
	}
}

/* ---------------------------------------------------------------- the record */

void mcp_record(const struct mcp_exchange *ex)
{
	struct mcp_log_record r = {
	        .request_id = ex->request_id,
	        .start_unix_us = ex->start_unix_us,
	        .client_ip = ex->client_ip,
	        .http_method = ex->http_method,
	        .route = ex->route ? ex->route->name : NULL,
	        .consumer = ex->consumer ? ex->consumer->name : NULL,
	        .key_fingerprint = ex->key_fp[0] ? ex->key_fp : NULL,
	        .session = ex->sess_hash[0] ? ex->sess_hash : NULL,
	        .method = ex->method,
	        .tool = ex->tool[0] ? ex->tool : NULL,
	        .tool_label = ex->tool_label,
	        .server = ex->server ? ex->server->name : NULL,
	        .status = ex->status,
	        .upstream_status = ex->upstream_status,
	        .outcome = ex->outcome ? ex->outcome : "ok",
	        .policies = ex->policy_actions,
	        .n_policies = ex->n_policy_actions,
	        .rpc_error = ex->rpc_error,
	        .duration_us = http_now_us() - ex->start_us,
	        .bytes_in = ex->bytes_in,
	        .bytes_out = ex->bytes_out,
	};
	char servers[512];
	if (ex->server == NULL && ex->n_legs > 0) {
		size_t o = 0;
		for (size_t i = 0; i < ex->n_legs && o < sizeof(servers) - 1; i++)
			o += (size_t)snprintf(servers + o, sizeof(servers) - o, "%s%s",
			                      i ? "," : "", ex->legs[i].server->name);
		r.upstreams = servers;
	}
	mcp_log_write(ex->mw->w->metrics, &r);
}
