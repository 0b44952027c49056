/* request.c — one client request through the gateway, top to bottom.
 *
 *   request_handle        accept: snapshot, request id, built-in endpoints
 *   → read_body           content type, JSON, the fields we route on
 *   → route               path, then the requested model
 *   → authenticate        key-auth → consumer; allow-list; concurrency cap
 *   → next_attempt        the fallback loop: balancer pick → health gate → quota
 *                         reservation (maybe asynchronous, Redis) → attempt_start
 *   → attempt_start       shape the body for the instance, send it upstream
 *   → on_upstream_head    status known: stream to the client, or buffer
 *   → on_upstream_body    forward whole SSE events (back-pressure), or buffer
 *   → on_upstream_done    deliver, or fail over to the next candidate, or fail
 *   → request_finish      settle tokens, log, count, release everything
 *
 * Nothing reaches the client before an upstream has answered with something we
 * pass through — for a stream, its first complete event. That is what lets a
 * later attempt replace a failed one unseen. After the first byte, a failure
 * ends the stream with an SSE "error" event, never with a silent truncation.
 */
#include "sluice/request.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "sluice/accesslog.h"
#include "sluice/auth.h"
#include "sluice/balancer.h"
#include "sluice/config.h"
#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/mcp.h"
#include "sluice/metrics.h"
#include "sluice/quota.h"
#include "sluice/record.h"
#include "sluice/router.h"
#include "sluice/server.h"
#include "sluice/sse.h"
#include "sluice/upstream.h"
#include "sluice/usage.h"

/* Above this many bytes queued for a slow client, the upstream transfer is
 * paused until the client has taken them all (back-pressure). */
#define STREAM_HIGH_WATER (64 * 1024)
/* A non-stream upstream answer is held whole before it is sent; this caps it. */
#define MAX_RESPONSE_BODY (64u * 1024 * 1024)
/* One SSE event larger than this is a broken stream. */
#define MAX_SSE_EVENT (4u * 1024 * 1024)
/* Targets tracked without allocation; larger routes allocate. */
#define SMALL_TARGETS 32

/*
 * What the current attempt costs when it ends (docs/quotas.md §3): the upstream is charged
 * for what it was asked to do, not for what reached the client — a client that leaves
 * before the answer still cost the upstream its work.
 */
enum attempt_cost {
	COST_NOTHING, /* never reached an upstream, or refused it and failed over: released */
	COST_REQUEST, /* the upstream's refusal is the answer: the request counts, no tokens */
	COST_WORK,    /* the upstream was asked to work: the request, and its tokens */
};

enum reply_mode {
	REPLY_NONE,     /* no upstream answer yet */
	REPLY_BUFFERED, /* collecting a whole upstream answer */
	REPLY_STREAM,   /* forwarding SSE events as they come */
};

struct request {
	struct worker *w;
	struct config *config;      /* the snapshot this request runs on: one reference */
	struct http_request *http;  /* NULL once the client side is finished */
	TAILQ_ENTRY(request) link;
	char id[128];
	/* Copies for the record: the client's buffers are recycled once the reply
	 * is finished, before the record is written. */
	char method[16], path[256], client_ip[48];
	struct request_record rec;

	/* what the client asked */
	json_t *body;               /* the parsed client body (never modified) */
	const char *model;          /* requested model, inside body; NULL if absent */
	bool stream;
	uint64_t start_us;          /* monotonic: the request's first byte */
	bool hide_usage_chunk;      /* we asked for include_usage; the client did not */
	uint64_t est_prompt, est_completion;

	/* who asks */
	const struct config_consumer *consumer;
	char key_fp[13];
	bool concurrency_held;

	/* where it goes: the fallback loop */
	const struct config_route *route;
	struct balancer *own_balancer; /* when the worker's belong to another snapshot */
	bool *excluded;                /* per route target: not a candidate any more */
	bool excluded_small[SMALL_TARGETS];
	const struct config_instance *instance; /* the current attempt's */
	struct instance_state *state;
	bool inflight_held;
	bool trial;                    /* this attempt is a half-open health trial */
	int attempts;                  /* started upstream transfers */
	uint64_t attempt_start_us;

	/* quota: the current attempt's reservation */
	struct quota_ticket ticket;
	bool ticket_held;              /* admitted and not yet settled or released */
	enum attempt_cost cost;        /* of the current attempt, if it ended now */
	bool quota_pending;            /* waiting on the store */
	bool quota_denied;             /* some candidate was refused by a quota */
	struct quota_ticket denial;    /* the first refusal, for the 429 */

	/* the last failure, for the answer when every candidate failed */
	enum upstream_result last_res;
	int last_status;
	char last_detail[320];

	/* the current attempt's answer */
	char *upstream_body;           /* shaped body, or NULL when the client's bytes go as they are */
	struct upstream_xfer xfer;
	enum reply_mode mode;
	struct evbuffer *buffered;     /* REPLY_BUFFERED */
	struct sse_parser sse; /* REPLY_STREAM */
	struct evbuffer *events; /* whole events from one upstream read: one chunk */
	bool sse_ready;
	bool stream_started;           /* the client has the stream's head */
	bool client_paused;            /* the transfer waits for the client to drain */
	struct record_usage usage;
	size_t output_text_bytes;      /* for an estimate when no usage comes */
	char *prompt_payload;            /* log.payloads: the client's body */
	struct evbuffer *output_payload; /* log.payloads: the answer's text */
};

static void request_finish(struct request *r);
static void reply_error(struct request *r, int status, const char *type, const char *code,
                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static bool on_upstream_head(void *arg, long status);
static size_t on_upstream_body(void *arg, const char *data, size_t len);
static void on_upstream_done(void *arg, enum upstream_result res, const char *detail);

static const struct upstream_ops upstream_ops = {
	.on_head = on_upstream_head,
	.on_body = on_upstream_body,
	.on_done = on_upstream_done,
};

/* ---------------------------------------------------------------- accept */

static uint64_t next_random(struct worker *w)
{
	/* xorshift64*: cheap, per worker, no lock; ids need uniqueness, not secrecy. */
	uint64_t x = w->rng;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	w->rng = x;
	return x * 0x2545f4914f6cdd1dull;
}

/* Keep the client's x-request-id when it is sane; otherwise make one. */
static void assign_request_id(struct request *r)
{
	const char *given = http_request_header(r->http, "x-request-id");
	if (given != NULL) {
		size_t n = strlen(given);
		bool ok = n > 0 && n < sizeof(r->id);
		for (size_t i = 0; ok && i < n; i++)
			ok = given[i] > 32 && given[i] < 127;
		if (ok) {
			memcpy(r->id, given, n + 1);
			return;
		}
	}
	snprintf(r->id, sizeof(r->id), "%016" PRIx64 "%016" PRIx64, next_random(r->w),
	         r->w->n_requests);
}

/* A gateway-made JSON answer (obj borrowed), or 500 when it cannot be encoded. */
static void reply_json(struct request *r, const json_t *obj)
{
	char *text = obj ? json_dumps(obj, JSON_COMPACT) : NULL;

	if (text == NULL) {
		reply_error(r, 500, "server_error", "internal_error", "cannot encode the answer");
		return;
	}
	r->rec.status = 200;
	r->rec.bytes_out = strlen(text);
	http_reply(r->http, 200, "application/json", text, r->rec.bytes_out);
	r->http = NULL;
	free(text);
	request_finish(r);
}

static const char *get_client_header(void *arg, const char *name);

/* A route this consumer (NULL: no key) may call; the same rule as auth_check's. */
static bool consumer_may_use(const struct config_route *rt, const void *arg)
{
	const struct config_consumer *cons = arg;

	if (rt->auth == ROUTE_AUTH_NONE)
		return true;
	if (cons == NULL)
		return false;
	if (cons->n_routes == 0)
		return true;
	for (size_t i = 0; i < cons->n_routes; i++)
		if (cons->routes[i] == rt ||
		    (cons->routes[i] != NULL && strcmp(cons->routes[i]->name, rt->name) == 0))
			return true;
	return false;
}

/*
 * The model list says what a gateway serves and to whom: when any route is key-auth, it
 * takes a valid key — read with each key-auth route's own key headers, in route order —
 * and lists only the models of the routes its consumer may use (and of auth: none
 * routes). Returns the list, or NULL after answering 401 (or 500).
 */
static json_t *models_for_caller(struct request *r)
{
	const struct config *c = r->config;
	const struct config_consumer *cons = NULL;
	enum auth_result worst = AUTH_NONE_REQUIRED;
	json_t *list;

	for (size_t i = 0; i < c->n_routes && cons == NULL; i++) {
		const struct config_route *rt = &c->routes[i];
		enum auth_result res;

		if (rt->auth == ROUTE_AUTH_NONE)
			continue;
		res = auth_check(c, rt, get_client_header, r->http, &cons, r->key_fp);
		if (res == AUTH_UNKNOWN || worst == AUTH_NONE_REQUIRED)
			worst = res;
	}
	if (cons != NULL) {
		r->rec.consumer = cons->name;
		r->rec.key_fingerprint = r->key_fp;
	} else if (worst == AUTH_UNKNOWN) {
		r->rec.key_fingerprint = r->key_fp;
		reply_error(r, 401, "authentication_error", "invalid_api_key",
		            "invalid API key (fingerprint %s)", r->key_fp);
		return NULL;
	} else if (worst == AUTH_MISSING) {
		reply_error(r, 401, "authentication_error", "missing_api_key",
		            "no API key: send it as Authorization: Bearer <key>");
		return NULL;
	}
	list = router_models_json_for(c, consumer_may_use, cons);
	if (list == NULL)
		reply_error(r, 500, "server_error", "internal_error",
		            "cannot build the model list");
	return list;
}

static void handle_models(struct request *r)
{
	json_t *list = models_for_caller(r);

	if (list == NULL)
		return;
	reply_json(r, list);
	json_decref(list);
}

/* GET /v1/models/{id}: one entry of the list, or 404 like OpenAI. */
static void handle_model(struct request *r, const char *id)
{
	json_t *list = models_for_caller(r);

	if (list == NULL)
		return;
	json_t *data = json_object_get(list, "data"), *m, *found = NULL;
	size_t i;

	json_array_foreach(data, i, m)
	{
		const char *mid = json_string_value(json_object_get(m, "id"));
		if (mid && strcmp(mid, id) == 0) {
			found = m;
			break;
		}
	}
	if (found)
		reply_json(r, found);
	else
		reply_error(r, 404, "invalid_request_error", "model_not_found",
		            "the model '%s' does not exist", id);
	json_decref(list);
}

static void on_client_abort(void *arg);
static bool read_body(struct request *r);
static bool route(struct request *r);
static bool authenticate(struct request *r);
static void next_attempt(struct request *r);
static const char *get_client_header(void *arg, const char *name);

/* A new request on hr, with its id and record; NULL (answered 503) when out of memory. */
static struct request *request_new(struct http_request *hr, struct worker *w)
{
	struct request *r = calloc(1, sizeof(*r));
	struct timeval now;

	if (r == NULL) {
		http_reply_error(hr, 503, "server_error", "out_of_memory", "out of memory");
		return NULL;
	}
	r->w = w;
	r->http = hr;
	r->config = config_ref(w->config);
	w->n_requests++;
	TAILQ_INSERT_TAIL(&w->requests, r, link);
	assign_request_id(r);
	http_response_header(hr, "x-request-id", r->id);
	http_request_on_abort(hr, on_client_abort, r);

	r->start_us = hr->start_us ? hr->start_us : http_now_us();
	gettimeofday(&now, NULL);
	r->rec.request_id = r->id;
	r->rec.start_unix_us = (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_usec -
	                       (http_now_us() - r->start_us);
	snprintf(r->method, sizeof(r->method), "%s", hr->method);
	snprintf(r->path, sizeof(r->path), "%s", hr->path);
	snprintf(r->client_ip, sizeof(r->client_ip), "%s", hr->client_ip);
	r->rec.method = r->method;
	r->rec.path = r->path;
	r->rec.client_ip = r->client_ip;
	r->rec.bytes_in = hr->body_len;
	return r;
}

void request_handle(struct http_request *hr, void *arg)
{
	struct worker *w = arg;
	const struct config_route *mcp_route;

	/* MCP routes speak JSON-RPC over GET, POST and DELETE: their own module (src/mcp). */
	if (router_match(w->config, hr->path, NULL, &mcp_route) == ROUTER_OK &&
	    mcp_route->type == ROUTE_TYPE_MCP) {
		mcp_handle(w, hr, mcp_route);
		return;
	}
	struct request *r = request_new(hr, w);
	if (r == NULL)
		return;
	if (strcmp(hr->path, "/v1/models") == 0 || strcmp(hr->path, "/models") == 0) {
		if (strcmp(hr->method, "GET") == 0 || strcmp(hr->method, "HEAD") == 0) {
			handle_models(r);
			return;
		}
	}
	if (strncmp(hr->path, "/v1/models/", 11) == 0 && hr->path[11] != '\0' &&
	    (strcmp(hr->method, "GET") == 0 || strcmp(hr->method, "HEAD") == 0)) {
		handle_model(r, hr->path + 11);
		return;
	}
	const struct config_route *any;
	if (router_match(r->config, hr->path, NULL, &any) == ROUTER_NO_PATH) {
		reply_error(r, 404, "invalid_request_error", "not_found", "no route serves %s %s",
		            hr->method, hr->path);
		return;
	}
	if (strcmp(hr->method, "POST") != 0) {
		http_response_header(hr, "Allow", "POST");
		reply_error(r, 405, "invalid_request_error", "method_not_allowed",
		            "%s is not allowed on %s; use POST", hr->method, hr->path);
		return;
	}
	if (!read_body(r) || !route(r) || !authenticate(r))
		return;

	size_t n = r->route->n_targets;
	r->excluded = n <= SMALL_TARGETS ? r->excluded_small : calloc(n, sizeof(bool));
	if (r->excluded == NULL) {
		reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
		return;
	}
	if (r->config->log.payloads) {
		r->prompt_payload = strndup(hr->body, hr->body_len);
		r->output_payload = evbuffer_new();
	}
	r->est_prompt = usage_estimate_prompt(r->body);
	r->est_completion = usage_completion_budget(r->body, USAGE_DEFAULT_COMPLETION_BUDGET);
	next_attempt(r);
}

/*
 * The server's head hook, for a client that waits for 100 Continue before it sends its
 * body: refuse now what would be refused without the body. No route for the path and a
 * method other than POST are request_handle's own answers, given before it reads a body.
 * A missing or unknown key is refused when every route the path can reach needs one (the
 * body's model picks among them). Anything else goes on, and request_handle checks it all
 * again once the body is in.
 */
bool request_head_check(struct http_request *hr, void *arg)
{
	struct worker *w = arg;
	const struct config *c = w->config;
	enum auth_result res = AUTH_NONE_REQUIRED;
	char fp[13] = "";

	if (router_match(c, hr->path, NULL, NULL) == ROUTER_NO_PATH ||
	    strcmp(hr->method, "POST") != 0) {
		request_handle(hr, arg);
		return false;
	}
	for (size_t i = 0; i < c->n_routes; i++) {
		const struct config_route *rt = &c->routes[i], *got;
		/* The loader lets one route at most claim a path and model, so rt serves
		 * the path exactly when matching it with rt's own model gives rt. */
		const char *model = rt->n_models ? rt->models[0] : NULL;
		if (router_match(c, hr->path, model, &got) != ROUTER_OK || got != rt)
			continue;
		res = auth_check(c, rt, get_client_header, hr, NULL, fp);
		if (res != AUTH_MISSING && res != AUTH_UNKNOWN)
			return true;
	}
	if (res != AUTH_MISSING && res != AUTH_UNKNOWN)
		return true; /* no route checked: leave it all to request_handle */
	struct request *r = request_new(hr, w);
	if (r != NULL) {
		memcpy(r->key_fp, fp, sizeof(fp));
		r->rec.key_fingerprint = fp[0] ? r->key_fp : NULL;
		reply_error(r, 401, "authentication_error", auth_error_code(res), "%s",
		            auth_error_message(res));
	}
	return false;
}

/* ---------------------------------------------------------------- read, route, authenticate */

static bool read_body(struct request *r)
{
	struct http_request *hr = r->http;
	const char *ct = http_request_header(hr, "content-type");
	json_error_t jerr;

	if (ct == NULL || strncasecmp(ct, "application/json", 16) != 0 ||
	    (ct[16] != '\0' && ct[16] != ';' && ct[16] != ' ')) {
		reply_error(r, 400, "invalid_request_error", "invalid_content_type",
		            "Content-Type must be application/json, got %s", ct ? ct : "none");
		return false;
	}
	if (hr->body_len == 0) {
		reply_error(r, 400, "invalid_request_error", "empty_body",
		            "the request body is empty; a JSON object is required");
		return false;
	}
	r->body = json_loadb(hr->body, hr->body_len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
	if (r->body == NULL) {
		reply_error(r, 400, "invalid_request_error", "invalid_json",
		            "the request body is not valid JSON: %s at line %d column %d", jerr.text,
		            jerr.line, jerr.column);
		return false;
	}
	if (!json_is_object(r->body)) {
		reply_error(r, 400, "invalid_request_error", "invalid_json",
		            "the request body must be a JSON object");
		return false;
	}
	json_t *model = json_object_get(r->body, "model");
	if (model != NULL && !json_is_string(model)) {
		reply_error(r, 400, "invalid_request_error", "invalid_model",
		            "\"model\" must be a string");
		return false;
	}
	r->model = model ? json_string_value(model) : NULL;
	r->rec.model_requested = r->model;
	json_t *stream = json_object_get(r->body, "stream");
	if (stream != NULL && !json_is_boolean(stream) && !json_is_null(stream)) {
		reply_error(r, 400, "invalid_request_error", "invalid_stream",
		            "\"stream\" must be true or false");
		return false;
	}
	r->stream = json_is_true(stream);
	r->rec.stream = r->stream;
	return true;
}

static bool route(struct request *r)
{
	switch (router_match(r->config, r->http->path, r->model, &r->route)) {
	case ROUTER_OK:
		r->rec.route = r->route->name;
		return true;
	case ROUTER_NO_MODEL:
		reply_error(r, 404, "invalid_request_error", "model_not_found",
		            "the model '%s' does not exist or is not served on %s",
		            r->model ? r->model : "", r->http->path);
		return false;
	case ROUTER_NO_PATH:
	default:
		reply_error(r, 404, "invalid_request_error", "not_found", "no route serves %s",
		            r->http->path);
		return false;
	}
}

static const char *get_client_header(void *arg, const char *name)
{
	return http_request_header(arg, name);
}

static bool authenticate(struct request *r)
{
	enum auth_result res =
	        auth_check(r->config, r->route, get_client_header, r->http, &r->consumer, r->key_fp);

	switch (res) {
	case AUTH_NONE_REQUIRED:
		break;
	case AUTH_OK:
		r->rec.consumer = r->consumer->name;
		r->rec.key_fingerprint = r->key_fp;
		break;
	case AUTH_MISSING:
		reply_error(r, 401, "authentication_error", "missing_api_key",
		            "no API key: send it as Authorization: Bearer <key>");
		return false;
	case AUTH_UNKNOWN:
		r->rec.key_fingerprint = r->key_fp;
		reply_error(r, 401, "authentication_error", "invalid_api_key",
		            "invalid API key (fingerprint %s)", r->key_fp);
		return false;
	case AUTH_FORBIDDEN:
		r->rec.consumer = r->consumer->name;
		reply_error(r, 403, "permission_error", "consumer_not_allowed",
		            "consumer '%s' may not use route '%s'", r->consumer->name,
		            r->route->name);
		return false;
	}
	if (r->consumer && r->consumer->max_concurrent > 0) {
		if (!quota_concurrency_acquire(r->consumer)) {
			r->rec.limit_id = "max_concurrent";
			reply_error(r, 429, "rate_limit_error", "too_many_concurrent_requests",
			            "consumer '%s' has %d requests in flight already",
			            r->consumer->name, r->consumer->max_concurrent);
			return false;
		}
		r->concurrency_held = true;
	}
	return true;
}

/* ---------------------------------------------------------------- the fallback loop */

static struct balancer *route_balancer(struct request *r)
{
	struct worker *w = r->w;
	if (w->balancers_config == r->config)
		return w->balancers[r->route->index];
	/* A request that outlived a reload keeps its snapshot's routes: it
	 * balances on its own until it ends (rare, and only for that request). */
	if (r->own_balancer == NULL)
		r->own_balancer = balancer_new(r->route);
	return r->own_balancer;
}

static uint64_t balancer_rand(void *arg)
{
	return next_random(arg);
}

static int balancer_inflight(void *arg, const struct config_instance *in)
{
	return health_inflight(in->state);
}

/* ewma: time to the first byte, which tracks queueing and prefill; total time
 * would mostly measure how long each answer was. */
static uint64_t balancer_latency(void *arg, const struct config_instance *in)
{
	return health_ewma_ttft_us(in->state);
}

/* load: the model server's own queue and KV-cache figures, scraped by health.c. */
static bool balancer_load_of(void *arg, const struct config_instance *in, struct balancer_load *out)
{
	struct health_load hl;

	if (!health_load_get(in->state, *(const uint64_t *)arg, &hl))
		return false;
	out->waiting = hl.waiting;
	out->running = hl.running;
	out->kv_cache = hl.kv_cache;
	return true;
}

static int pick_target(struct request *r)
{
	uint64_t now = http_now_us();
	struct balancer_input in = {
		.rand = balancer_rand,
		.rand_arg = r->w,
		.inflight = balancer_inflight,
		.latency_us = balancer_latency,
		.load = balancer_load_of,
		.load_arg = &now,
		.excluded = r->excluded,
	};
	switch (r->route->balancer.hash_on) {
	case HASH_ON_CONSUMER:
		in.hash_key = r->consumer ? r->consumer->name : NULL;
		break;
	case HASH_ON_HEADER:
		in.hash_key = r->route->balancer.key
		                      ? http_request_header(r->http, r->route->balancer.key)
		                      : NULL;
		break;
	case HASH_ON_CLIENT_IP:
		in.hash_key = r->http->client_ip;
		break;
	}
	in.hash_key_len = in.hash_key ? strlen(in.hash_key) : 0;
	struct balancer *b = route_balancer(r);
	return b ? balancer_pick(b, &in) : -1;
}

static void record_attempt(struct request *r, const struct config_instance *in, const char *outcome,
                           int status, uint64_t latency_us)
{
	if (r->rec.n_attempts < RECORD_MAX_ATTEMPTS) {
		struct record_attempt *a = &r->rec.attempts[r->rec.n_attempts++];
		a->instance = in->name;
		a->outcome = outcome;
		a->status = status;
		a->latency_us = latency_us;
	}
}

static void fail_all(struct request *r);
static void after_quota(struct request *r);
static bool attempt_start(struct request *r);

static void on_quota(void *arg, struct quota_ticket *t)
{
	struct request *r = arg;
	r->quota_pending = false;
	after_quota(r);
}

/*
 * Choose the next candidate and start it. Candidates are skipped — without
 * counting as an attempt — when unhealthy, cooling down after a 429, or out of
 * quota, as the route's fallback.on allows. Ends in attempt_start, a pending
 * quota answer, or fail_all.
 */
static void next_attempt(struct request *r)
{
	const struct config_route *rt = r->route;
	uint64_t now = http_now_us();

	while (r->attempts < rt->fallback.max_attempts) {
		int idx = pick_target(r);
		if (idx < 0)
			break;
		const struct config_instance *in = rt->targets[idx].instance;
		r->excluded[idx] = true; /* whatever happens, not again for this request */
		enum health_gate gate = health_admit(in->state, in, now);
		if ((gate == HEALTH_DOWN || gate == HEALTH_COOLING) && (rt->fallback.on & FALLBACK_UNHEALTHY)) {
			record_attempt(r, in, "unhealthy", 0, 0);
			continue;
		}
		r->instance = in;
		r->state = in->state;
		r->trial = gate == HEALTH_TRIAL;
		memset(&r->ticket, 0, sizeof(r->ticket));
		if (quota_admit(r->w->quota, &r->ticket, r->config, r->consumer, in, r->est_prompt,
		                r->est_completion, on_quota, r) == QUOTA_PENDING) {
			r->quota_pending = true;
			return;
		}
		after_quota(r);
		return;
	}
	fail_all(r);
}

static void reply_quota_rejection(struct request *r, const struct quota_ticket *t);

static void after_quota(struct request *r)
{
	struct quota_ticket *t = &r->ticket;
	const struct config_instance *in = r->instance;

	if (t->store_error && t->deny_on_error) {
		if (r->trial)
			health_trial_abandon(r->state);
		reply_error(r, 503, "service_unavailable", "quota_store_unavailable",
		            "the quota store is unreachable and store.on_error is deny");
		return;
	}
	if (!t->admitted) {
		if (r->trial)
			health_trial_abandon(r->state);
		record_attempt(r, in, "quota", 0, 0);
		/* Keep the refusal that clears soonest: that is when to retry. */
		if (!r->quota_denied || t->retry_after_s < r->denial.retry_after_s) {
			r->quota_denied = true;
			r->denial = *t;
		}
		if (r->route->fallback.on & FALLBACK_QUOTA) {
			next_attempt(r);
			return;
		}
		reply_quota_rejection(r, t);
		return;
	}
	r->ticket_held = true;
	attempt_start(r);
}

/* Every candidate is gone: say why, with the most useful status. */
static void fail_all(struct request *r)
{
	if (r->attempts > 0) {
		int status = r->last_res == UPSTREAM_TIMEOUT ? 504 : 502;
		if (r->last_res == UPSTREAM_OK)
			reply_error(r, status, "upstream_error", "all_instances_failed",
			            "every instance failed; the last answered HTTP %d: %s",
			            r->last_status, r->last_detail);
		else
			reply_error(r, status,
			            r->last_res == UPSTREAM_TIMEOUT ? "timeout_error" : "upstream_error",
			            r->last_res == UPSTREAM_TIMEOUT          ? "upstream_timeout"
			            : r->last_res == UPSTREAM_CONNECT_ERROR ? "upstream_connect_error"
			                                                    : "upstream_error",
			            "%s", r->last_detail);
		return;
	}
	if (r->quota_denied) {
		reply_quota_rejection(r, &r->denial);
		return;
	}
	reply_error(r, 503, "service_unavailable", "no_available_instance",
	            "route '%s' has no healthy instance available", r->route->name);
}

static void add_ratelimit_headers(struct request *r, const struct quota_ticket *t)
{
	char v[32];
	if (!t->have_headers || r->http == NULL)
		return;
	snprintf(v, sizeof(v), "%" PRIu64, t->hdr_limit);
	http_response_header(r->http, "x-ratelimit-limit-tokens", v);
	snprintf(v, sizeof(v), "%" PRIu64, t->hdr_remaining);
	http_response_header(r->http, "x-ratelimit-remaining-tokens", v);
	snprintf(v, sizeof(v), "%" PRIu64 "s", t->hdr_reset_s);
	http_response_header(r->http, "x-ratelimit-reset-tokens", v);
}

static void reply_quota_rejection(struct request *r, const struct quota_ticket *t)
{
	const struct config_consumer *c = r->consumer;
	int status = c ? c->rejected_code : 429;
	char v[32];

	r->rec.limit_id = t->denied_by ? t->denied_by->id : NULL;
	snprintf(v, sizeof(v), "%" PRIu64, t->retry_after_s ? t->retry_after_s : 1);
	http_response_header(r->http, "Retry-After", v);
	add_ratelimit_headers(r, t);
	if (c && c->rejected_msg)
		reply_error(r, status, "rate_limit_error", "quota_exceeded", "%s", c->rejected_msg);
	else
		reply_error(r, status, "rate_limit_error", "quota_exceeded",
		            "token quota exhausted (%s); retry in %" PRIu64 " s",
		            t->denied_by ? t->denied_by->id : "limit", t->retry_after_s);
}

/* ---------------------------------------------------------------- upstream attempt */

/*
 * The body an instance receives: the client's, with the instance's model and
 * options applied (the instance wins), and usage requested for streams. Each
 * attempt starts from the client's original body, so one instance's options
 * never leak into the next. When nothing changes, the client's bytes go as
 * they are (no re-serialisation).
 */
/* Append s as a JSON string literal (with quotes). */
static char *put_json_string(char *o, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	*o++ = '"';
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\') {
			*o++ = '\\';
			*o++ = (char)ch;
		} else if (ch < 0x20) {
			memcpy(o, "\\u00", 4);
			o[4] = hex[ch >> 4];
			o[5] = hex[ch & 15];
			o += 6;
		} else {
			*o++ = (char)ch;
		}
	}
	*o++ = '"';
	return o;
}

/*
 * The client's bytes with "model" replaced by model (when not NULL) and, when
 * want_usage, "stream_options":{"include_usage":true} added as the first member.
 * The client's body is a non-empty object without stream_options (checked).
 */
static bool splice_body(struct request *r, const char *model, bool want_usage)
{
	static const char usage_member[] = "\"stream_options\":{\"include_usage\":true},";
	const char *body = r->http->body, *end = body + r->http->body_len;
	const char *val = NULL, *brace = memchr(body, '{', r->http->body_len);
	size_t val_len = 0;

	if (brace == NULL)
		return false;
	if (model && r->model && !usage_scan_member(body, r->http->body_len, "model", &val, &val_len))
		return false;
	char *out = malloc(r->http->body_len + (model ? strlen(model) * 6 + 16 : 0) +
	                   sizeof(usage_member) + 1);
	if (out == NULL)
		return false;
	char *o = out;
	const char *p = brace + 1;
	memcpy(o, body, (size_t)(p - body));
	o += p - body;
	if (want_usage) {
		memcpy(o, usage_member, sizeof(usage_member) - 1);
		o += sizeof(usage_member) - 1;
	}
	if (model && val == NULL) { /* the client named no model: add one */
		memcpy(o, "\"model\":", 8);
		o = put_json_string(o + 8, model);
		*o++ = ',';
	}
	if (model && val != NULL) {
		memcpy(o, p, (size_t)(val - p));
		o = put_json_string(o + (val - p), model);
		p = val + val_len;
	}
	memcpy(o, p, (size_t)(end - p));
	o += end - p;
	*o = '\0';
	r->upstream_body = out;
	return true;
}

static bool shape_body(struct request *r)
{
	const struct config_instance *in = r->instance;
	bool drop_model = in->provider == PROVIDER_AZURE_OPENAI;
	bool same_model = in->model == NULL || (r->model && strcmp(in->model, r->model) == 0);
	json_t *so = json_object_get(r->body, "stream_options");
	bool want_usage = r->stream && !json_is_true(json_object_get(so, "include_usage"));

	free(r->upstream_body);
	r->upstream_body = NULL;
	r->hide_usage_chunk = want_usage;
	bool no_options = in->options == NULL || json_object_size(in->options) == 0;
	if (same_model && !drop_model && !want_usage && no_options)
		return true;
	/* The common case — another model name and/or usage for a stream — is a
	 * splice of the client's bytes: no re-serialisation of the whole body. The splice
	 * finds "model" in the raw bytes; a name written with escapes ("mod\u0065l", which
	 * the parse understood) is not found there, and the body is rebuilt below. */
	if (no_options && !drop_model && so == NULL && json_object_size(r->body) > 0 &&
	    splice_body(r, same_model ? NULL : in->model, want_usage))
		return true;

	json_t *b = json_copy(r->body); /* shallow: only top-level keys change */
	if (b == NULL)
		return false;
	if (drop_model)
		json_object_del(b, "model");
	else if (in->model)
		json_object_set_new(b, "model", json_string(in->model));
	if (in->options)
		json_object_update(b, in->options);
	if (want_usage) {
		/* Usage is what quotas are charged from: ask for it, and hide the
		 * extra chunk from a client that did not (on_stream_event). */
		json_t *nso = json_is_object(so) ? json_copy(so) : json_object();
		json_object_set_new(nso, "include_usage", json_true());
		json_object_set_new(b, "stream_options", nso);
	}
	r->upstream_body = json_dumps(b, JSON_COMPACT);
	json_decref(b);
	return r->upstream_body != NULL;
}

static void attempt_reset(struct request *r)
{
	upstream_xfer_cleanup(&r->xfer);
	if (r->buffered)
		evbuffer_drain(r->buffered, evbuffer_get_length(r->buffered));
	if (r->sse_ready) {
		sse_parser_free(&r->sse);
		r->sse_ready = false;
	}
	r->mode = REPLY_NONE;
	r->cost = COST_NOTHING;
	r->client_paused = false;
	memset(&r->usage, 0, sizeof(r->usage));
	r->output_text_bytes = 0;
}

static bool attempt_start(struct request *r)
{
	const struct config_instance *in = r->instance;
	char line[8192];

	attempt_reset(r);
	r->attempts++;
	r->attempt_start_us = http_now_us();
	r->rec.instance = in->name;
	r->rec.model_upstream = in->model ? in->model : r->model;
	if (!shape_body(r)) {
		reply_error(r, 500, "server_error", "internal_error", "cannot build the upstream body");
		return false;
	}
	upstream_xfer_init(&r->xfer, r->w->upstream, &upstream_ops, r);
	if (r->w->balancers_config == r->config)
		upstream_xfer_curlu(&r->xfer, r->w->urls[in->index]);
	/* The client's credentials stay here: only the instance's auth goes up. */
	for (size_t i = 0; i < in->n_auth_headers; i++) {
		snprintf(line, sizeof(line), "%s: %s", in->auth_headers[i].name,
		         in->auth_headers[i].value);
		upstream_xfer_header(&r->xfer, line);
	}
	snprintf(line, sizeof(line), "x-request-id: %s", r->id);
	upstream_xfer_header(&r->xfer, line);
	if (r->stream)
		upstream_xfer_header(&r->xfer, "Accept: text/event-stream");

	const char *body = r->upstream_body ? r->upstream_body : r->http->body;
	size_t len = r->upstream_body ? strlen(r->upstream_body) : r->http->body_len;
	struct upstream_timeouts to = {
		.connect = in->timeouts.connect,
		.first_byte = in->timeouts.first_byte,
		.idle = in->timeouts.idle,
		.total = in->timeouts.total,
	};
	log_debug("[%s] %s %s → instance %s (attempt %d%s)", r->id, r->route->name,
	          r->model ? r->model : "-", in->name, r->attempts, r->trial ? ", health trial" : "");
	health_inflight_add(r->state, 1);
	r->inflight_held = true;
	if (!upstream_xfer_start(&r->xfer, NULL, in->url, body, len, &to, in->tls_verify,
	                         (long)(in->keepalive.idle / 1000))) {
		reply_error(r, 500, "server_error", "internal_error", "cannot start the upstream transfer");
		return false;
	}
	/* From here the upstream may be working on it, whether or not the client stays. */
	r->cost = COST_WORK;
	return true;
}

/* ---------------------------------------------------------------- upstream answers */

static void add_response_headers(struct request *r)
{
	struct http_request *hr = r->http;
	struct evbuffer *h = r->xfer.headers;
	size_t n = evbuffer_get_length(h);

	/* The upstream's own headers (rate-limit hints, processing time...),
	 * already filtered of hop-by-hop ones. */
	if (n > 0) {
		char *lines = (char *)evbuffer_pullup(h, (ev_ssize_t)n);
		char *p = lines, *end = lines + n;
		while (p < end) {
			char *eol = memchr(p, '\r', (size_t)(end - p));
			char *colon = memchr(p, ':', (size_t)(end - p));
			if (eol == NULL || colon == NULL || colon > eol)
				break;
			*colon = '\0';
			*eol = '\0';
			/* Our quota headers win over an upstream's of the same name. */
			if (!(r->ticket.have_headers && strncasecmp(p, "x-ratelimit-", 12) == 0))
				http_response_header(hr, p, colon + 2 <= eol ? colon + 2 : eol);
			p = eol + 2;
		}
	}
	add_ratelimit_headers(r, &r->ticket);
	if (r->config->server.expose_instance_header)
		http_response_header(hr, "x-sluice-instance", r->instance->name);
}

static bool is_event_stream(const char *ct)
{
	return strncasecmp(ct, "text/event-stream", 17) == 0;
}

static bool on_upstream_head(void *arg, long status)
{
	struct request *r = arg;

	if (r->http == NULL)
		return false;
	if (r->stream && status >= 200 && status < 300 && is_event_stream(r->xfer.content_type)) {
		r->mode = REPLY_STREAM;
		sse_parser_init(&r->sse, MAX_SSE_EVENT);
		r->sse_ready = true;
		return true; /* the client's head goes with the first whole event */
	}
	r->mode = REPLY_BUFFERED;
	if (r->buffered == NULL)
		r->buffered = evbuffer_new();
	return r->buffered != NULL;
}

static void on_client_drained(void *arg)
{
	struct request *r = arg;
	if (r->client_paused) {
		r->client_paused = false;
		upstream_xfer_resume(&r->xfer);
	}
}

/* Length of the text in "content":"..." fields of one chunk: for an estimate
 * when the upstream reports no usage. A scan, not a parse. */
static size_t content_bytes(const char *data, size_t len, struct evbuffer *keep)
{
	static const char key[] = "\"content\":\"";
	size_t total = 0;
	const char *p = data, *end = data + len;
	while ((p = memmem(p, (size_t)(end - p), key, sizeof(key) - 1)) != NULL) {
		p += sizeof(key) - 1;
		const char *q = p;
		/* An escape takes two bytes, unless the data ends inside it. */
		while (q < end && *q != '"')
			q += (*q == '\\' && end - q >= 2) ? 2 : 1;
		total += (size_t)(q - p);
		if (keep)
			evbuffer_add(keep, p, (size_t)(q - p)); /* still JSON-escaped: fine for a log */
		p = q;
	}
	return total;
}

static bool on_stream_event(void *arg, const struct sse_event *ev)
{
	struct request *r = arg;

	if (ev->has_data && ev->data_len > 0 && ev->data[0] == '{') {
		bool usage_only = false;
		struct record_usage u;
		if (usage_from_sse_data(ev->data, ev->data_len, &u, &usage_only)) {
			r->usage = u;
			if (usage_only && r->hide_usage_chunk)
				return true; /* asked for by us, not by the client */
		} else {
			r->output_text_bytes += content_bytes(ev->data, ev->data_len, r->output_payload);
		}
	}
	if (!r->stream_started) {
		r->stream_started = true;
		r->rec.ttft_us = http_now_us() - r->start_us;
		add_response_headers(r);
		http_response_header(r->http, "Cache-Control", "no-cache");
		http_reply_start(r->http, (int)r->xfer.status, r->xfer.content_type);
	}
	r->rec.bytes_out += ev->raw_len;
	evbuffer_add(r->events, ev->raw, ev->raw_len);
	return true;
}

static size_t on_upstream_body(void *arg, const char *data, size_t len)
{
	struct request *r = arg;

	if (r->http == NULL)
		return 0;
	if (r->mode == REPLY_STREAM) {
		/* Back-pressure: hold the upstream while the client lags. */
		if (http_reply_pending(r->http) > STREAM_HIGH_WATER) {
			r->client_paused = true;
			http_reply_on_drain(r->http, on_client_drained, r);
			return UPSTREAM_PAUSE;
		}
		/* Whole events only, so an error event can always follow cleanly;
		 * all the events of one read go out as one chunk. */
		if (r->events == NULL && (r->events = evbuffer_new()) == NULL)
			return 0;
		bool ok = sse_feed(&r->sse, data, len, on_stream_event, r);
		if (r->stream_started)
			http_reply_chunk_buffer(r->http, r->events);
		return ok ? len : 0;
	}
	if (evbuffer_get_length(r->buffered) + len > MAX_RESPONSE_BODY)
		return 0;
	evbuffer_add(r->buffered, data, len);
	return len;
}

/* A status listed in fallback.http_statuses: a trigger whatever fallback.on says. */
#define FALLBACK_LISTED (1u << 31)

static unsigned trigger_for_status(const struct config_route *rt, int status)
{
	for (size_t i = 0; i < rt->fallback.n_http_statuses; i++)
		if (rt->fallback.http_statuses[i] == status)
			return FALLBACK_LISTED;
	if (status == 429)
		return FALLBACK_HTTP_429;
	if (status >= 500)
		return FALLBACK_HTTP_5XX;
	return 0;
}

static unsigned trigger_for_result(enum upstream_result res)
{
	switch (res) {
	case UPSTREAM_TIMEOUT: return FALLBACK_TIMEOUT;
	case UPSTREAM_CONNECT_ERROR: return FALLBACK_CONNECT_ERROR;
	/* A reset before any answer is the instance failing, like a 5xx. */
	case UPSTREAM_ERROR: return FALLBACK_CONNECT_ERROR | FALLBACK_HTTP_5XX;
	default: return 0;
	}
}

/* The attempt is over: passive health, in-flight, the record. */
static void attempt_end(struct request *r, enum upstream_result res, int status, const char *outcome)
{
	uint64_t now = http_now_us();
	enum health_outcome ho = HEALTH_OK;

	if (r->inflight_held) {
		health_inflight_add(r->state, -1);
		r->inflight_held = false;
	}
	if (res == UPSTREAM_TIMEOUT)
		ho = HEALTH_TIMEOUT;
	else if (res == UPSTREAM_CONNECT_ERROR || res == UPSTREAM_ERROR)
		ho = HEALTH_CONNECT_ERROR;
	else if (status >= 400)
		ho = HEALTH_HTTP_STATUS;
	if (res != UPSTREAM_ABORTED)
		health_report(r->state, r->instance, ho, status, now);
	r->trial = false;
	if (res == UPSTREAM_OK && status < 400 && r->xfer.head_us)
		health_observe_latency(r->state, r->xfer.head_us - r->xfer.start_us, now - r->xfer.start_us);
	r->rec.upstream_us += now - r->attempt_start_us;
	record_attempt(r, r->instance, outcome, status, now - r->attempt_start_us);
}

static void stream_error_event(struct request *r, const char *code, const char *msg)
{
	struct evbuffer *b = evbuffer_new();
	if (b == NULL)
		return; /* out of memory: the stream still ends, without the event */
	evbuffer_add_printf(b, "event: error\ndata: {\"error\":{\"message\":\"");
	http_json_escape(b, msg, strlen(msg));
	evbuffer_add_printf(b, "\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"%s\"}}\n\n",
	                    code);
	http_reply_chunk_buffer(r->http, b);
	evbuffer_free(b);
}

/*
 * What an attempt that ended without reaching the client costs (docs/quotas.md §3). The
 * upstream refused: a connect error (it never saw the request), a reset before any answer
 * or an error status (like a 5xx) — the request counts only when that refusal is the
 * client's answer. It timed out after the request was sent: it was working, so the tokens
 * are charged even when another candidate takes over.
 */
static enum attempt_cost ended_attempt_cost(enum upstream_result res, int status,
                                            const char *detail)
{
	switch (res) {
	case UPSTREAM_OK:
		return status >= 400 ? COST_REQUEST : COST_WORK;
	case UPSTREAM_TIMEOUT:
		/* upstream.c names a timeout before the connection was made this way. */
		return strcmp(detail, "connect timeout") == 0 ? COST_NOTHING : COST_WORK;
	case UPSTREAM_CONNECT_ERROR:
		return COST_NOTHING;
	case UPSTREAM_ERROR:
	case UPSTREAM_ABORTED:
	default:
		return COST_REQUEST;
	}
}

/* What a client is told about a failed attempt, after the instance's name: a generic
 * reason. The detail — libcurl's text, the upstream's address — is the operator's: it goes
 * to the error log, with the request id. */
static const char *client_reason(enum upstream_result res)
{
	switch (res) {
	case UPSTREAM_TIMEOUT:
		return "timed out";
	case UPSTREAM_CONNECT_ERROR:
		return "could not be reached";
	default:
		return "failed";
	}
}

/* Give this attempt up and try the next candidate. detail is what the client may see
 * should every candidate fail. */
static void fail_over(struct request *r, enum upstream_result res, int status, const char *detail)
{
	r->last_res = res;
	r->last_status = status;
	snprintf(r->last_detail, sizeof(r->last_detail), "%s", detail);
	if (r->ticket_held) {
		/* The request is counted by the attempt that ends it; work done here is charged. */
		if (r->cost == COST_WORK)
			quota_settle_tokens(r->w->quota, &r->ticket, r->est_prompt,
			                    usage_estimate_text(r->output_text_bytes));
		else
			quota_release(r->w->quota, &r->ticket);
		r->ticket_held = false;
	}
	attempt_reset(r);
	next_attempt(r);
}

/* The attempt's outcome for the record and the metrics: a fixed string. */
static const char *outcome_name(enum upstream_result res, int status)
{
	switch (res) {
	case UPSTREAM_OK:
		return status < 400 ? "ok" : status == 429 ? "http_429" : status < 500 ? "http_4xx" : "http_5xx";
	case UPSTREAM_TIMEOUT: return "timeout";
	case UPSTREAM_CONNECT_ERROR: return "connect_error";
	case UPSTREAM_ERROR: return "upstream_error";
	case UPSTREAM_ABORTED: return "client_gone";
	}
	return "unknown";
}

static void on_upstream_done(void *arg, enum upstream_result res, const char *detail)
{
	struct request *r = arg;
	const struct config_instance *in = r->instance;
	int status = (int)r->xfer.status;
	const char *outcome = outcome_name(res, status);

	if (r->http == NULL) { /* the client left; nothing to tell */
		attempt_end(r, UPSTREAM_ABORTED, status, "client_gone");
		request_finish(r);
		return;
	}
	r->rec.upstream_status = status;

	/* A stream the client has seen: finish it, cleanly or with an error event. */
	if (r->mode == REPLY_STREAM && r->stream_started) {
		attempt_end(r, res, status, outcome);
		if (res != UPSTREAM_OK || sse_pending(&r->sse) != 0) {
			const char *why = res == UPSTREAM_OK ? "the stream ended inside an event" : detail;
			char msg[200];
			log_warn("[%s] instance %s: stream failed after the first byte: %s", r->id,
			         in->name, why);
			if (res == UPSTREAM_OK)
				snprintf(msg, sizeof(msg), "instance '%s': %s", in->name, why);
			else
				snprintf(msg, sizeof(msg),
				         "instance '%s' %s after the stream started", in->name,
				         client_reason(res));
			stream_error_event(r,
			                   res == UPSTREAM_TIMEOUT ? "upstream_timeout"
			                                           : "upstream_stream_error",
			                   msg);
			r->rec.error_code = "upstream_stream_error";
		}
		r->rec.status = status;
		http_reply_end(r->http);
		r->http = NULL;
		request_finish(r);
		return;
	}

	/* Nothing sent yet: fail over when the route says so. */
	/* A 2xx stream that ended before one whole event is a broken answer, like a reset. */
	if (res == UPSTREAM_OK && r->mode == REPLY_STREAM) {
		res = UPSTREAM_ERROR;
		detail = "the stream ended before its first event";
	}
	unsigned trigger = res == UPSTREAM_OK ? trigger_for_status(r->route, status)
	                                      : trigger_for_result(res);
	r->cost = ended_attempt_cost(res, status, detail);
	attempt_end(r, res, status, outcome_name(res, status));
	if (res == UPSTREAM_OK && status == 429) {
		/* "Name: value\r\n" lines, not NUL-terminated: compare at line starts. */
		size_t n = evbuffer_get_length(r->xfer.headers);
		const char *h = n ? (const char *)evbuffer_pullup(r->xfer.headers, (ev_ssize_t)n) : NULL;
		for (const char *p = h, *end = h + n; p != NULL && p < end;) {
			const char *eol = memchr(p, '\n', (size_t)(end - p));
			if ((size_t)(end - p) > 13 && strncasecmp(p, "retry-after: ", 13) == 0) {
				health_retry_after(r->state, in, strtoull(p + 13, NULL, 10), http_now_us());
				break;
			}
			p = eol ? eol + 1 : end;
		}
	}
	if (trigger & (r->route->fallback.on | FALLBACK_LISTED)) {
		char why[300];
		if (res == UPSTREAM_OK) {
			snprintf(why, sizeof(why), "%s answered HTTP %d", in->name, status);
			log_info("[%s] failing over from %s: %s", r->id, in->name, why);
		} else {
			log_info("[%s] failing over from %s: %s: %s", r->id, in->name,
			         upstream_result_name(res), detail);
			snprintf(why, sizeof(why), "instance '%s' %s", in->name,
			         client_reason(res));
		}
		fail_over(r, res, status, why);
		return;
	}
	if (res != UPSTREAM_OK) {
		int code = res == UPSTREAM_TIMEOUT ? 504 : 502;
		log_warn("[%s] instance %s: %s: %s", r->id, in->name, upstream_result_name(res), detail);
		if (res == UPSTREAM_TIMEOUT)
			reply_error(r, code, "timeout_error", "upstream_timeout",
			            "instance '%s' %s", in->name, client_reason(res));
		else if (res == UPSTREAM_CONNECT_ERROR)
			reply_error(r, code, "upstream_error", "upstream_connect_error",
			            "instance '%s' %s", in->name, client_reason(res));
		else
			reply_error(r, code, "upstream_error", "upstream_error", "instance '%s' %s",
			            in->name, client_reason(res));
		return;
	}

	/* Deliver the whole answer as the upstream gave it. */
	size_t n = evbuffer_get_length(r->buffered);
	const char *body = (const char *)evbuffer_pullup(r->buffered, (ev_ssize_t)n);
	if (status >= 200 && status < 300) {
		if (!usage_from_body(body, n, &r->usage))
			r->output_text_bytes = n;
	}
	add_response_headers(r);
	r->rec.status = status;
	r->rec.bytes_out = n;
	r->rec.ttft_us = http_now_us() - r->start_us;
	http_reply(r->http, status, r->xfer.content_type[0] ? r->xfer.content_type : "application/json",
	           body, n);
	r->http = NULL;
	request_finish(r);
}

/* ---------------------------------------------------------------- the end */

static void on_client_abort(void *arg)
{
	struct request *r = arg;

	log_debug("[%s] client went away; cancelling the upstream transfer", r->id);
	if (r->xfer.running) {
		upstream_xfer_cancel(&r->xfer);
		attempt_end(r, UPSTREAM_ABORTED, (int)r->xfer.status, "client_gone");
	}
	if (r->quota_pending) {
		quota_cancel(r->w->quota, &r->ticket);
		r->quota_pending = false;
		if (r->trial)
			health_trial_abandon(r->state);
	}
	r->rec.status = 499; /* nginx's "client closed request" */
	http_request_abandon(r->http);
	r->http = NULL;
	request_finish(r);
}

static void reply_error(struct request *r, int status, const char *type, const char *code,
                        const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (status < 500)
		log_info("[%s] %d %s: %s", r->id, status, code, msg);
	r->rec.status = status;
	r->rec.error_code = code;
	r->rec.bytes_out = http_reply_error(r->http, status, type, code, "%s", msg);
	r->http = NULL;
	request_finish(r);
}

/*
 * Charge what the upstream was asked to do (docs/quotas.md §3): its usage, or — when it
 * said nothing, or the client left before it could — the prompt estimate and the text
 * produced so far. An error status passed through counts the request and no tokens; an
 * attempt that never reached the upstream costs nothing.
 */
static void settle(struct request *r)
{
	struct record_usage *u = &r->usage;

	if (!u->present && r->cost == COST_WORK && (r->ticket_held || r->output_text_bytes > 0)) {
		u->present = true;
		u->estimated = true;
		u->prompt = r->est_prompt;
		u->completion = usage_estimate_text(r->output_text_bytes);
		u->total = u->prompt + u->completion;
	}
	if (r->ticket_held) {
		if (r->cost == COST_WORK)
			quota_settle(r->w->quota, &r->ticket, u->prompt, u->completion);
		else if (r->cost == COST_REQUEST)
			quota_settle(r->w->quota, &r->ticket, 0, 0);
		else
			quota_release(r->w->quota, &r->ticket);
		r->ticket_held = false;
	}
	r->rec.usage = *u;
}

/*
 * Every path ends here exactly once, as the last thing its caller does: the
 * client side is finished (or gone), the transfer is over or cancelled.
 */
static void request_finish(struct request *r)
{
	struct worker *w = r->w;

	if (r->http != NULL) {
		http_request_abandon(r->http);
		r->http = NULL;
	}
	if (r->xfer.running) {
		upstream_xfer_cancel(&r->xfer);
		attempt_end(r, UPSTREAM_ABORTED, 0, "client_gone");
	}
	if (r->inflight_held) {
		health_inflight_add(r->state, -1);
		r->inflight_held = false;
	}
	if (r->quota_pending)
		quota_cancel(w->quota, &r->ticket);
	settle(r);
	if (r->concurrency_held)
		quota_concurrency_release(r->consumer);

	if (r->prompt_payload)
		r->rec.prompt_payload = r->prompt_payload;
	if (r->output_payload) {
		if (r->mode == REPLY_BUFFERED && r->buffered && evbuffer_get_length(r->output_payload) == 0)
			evbuffer_add(r->output_payload, evbuffer_pullup(r->buffered, -1),
			             evbuffer_get_length(r->buffered));
		evbuffer_add(r->output_payload, "", 1);
		r->rec.output_payload = (const char *)evbuffer_pullup(r->output_payload, -1);
	}
	r->rec.total_us = http_now_us() - r->start_us;
	r->rec.overhead_us = r->rec.total_us > r->rec.upstream_us ? r->rec.total_us - r->rec.upstream_us : 0;
	metrics_record_request(w->metrics, &r->rec);
	accesslog_write(&r->rec);

	upstream_xfer_cleanup(&r->xfer);
	TAILQ_REMOVE(&w->requests, r, link);
	if (r->sse_ready)
		sse_parser_free(&r->sse);
	if (r->buffered)
		evbuffer_free(r->buffered);
	if (r->events)
		evbuffer_free(r->events);
	if (r->own_balancer)
		balancer_free(r->own_balancer);
	if (r->excluded != r->excluded_small)
		free(r->excluded);
	free(r->upstream_body);
	free(r->prompt_payload);
	if (r->output_payload)
		evbuffer_free(r->output_payload);
	json_decref(r->body);
	config_unref(r->config);
	free(r);
}

void request_abort_all(struct worker *w)
{
	struct request *r;

	while ((r = TAILQ_FIRST(&w->requests)) != NULL) {
		upstream_xfer_cancel(&r->xfer);
		request_finish(r);
	}
}
