/* request.c — one client request through the gateway, top to bottom.
 *
 *   request_handle        accept: snapshot, request id, the client's protocol (by path),
 *                         built-in endpoints (model lists)
 *   → read_body           content type, JSON, the fields we route on
 *   → route               path, then the requested model (a route's public names)
 *   → authenticate        key-auth → consumer; allow-list; concurrency cap
 *   → request_policies    the route's plugins on the client's body (may answer later:
 *                         moderation); a refusal reserves and charges nothing
 *   → next_attempt        the fallback loop: balancer pick → health gate → quota
 *                         reservation (maybe asynchronous, Redis) → attempt_start
 *   → attempt_start       the provider table picks the upstream protocol and URL; the body
 *                         goes out spliced (identity) or built from the pivot (translation)
 *   → on_upstream_head    status known: stream to the client, or buffer
 *   → on_upstream_body    whole SSE events: forwarded as they are (identity), or decoded
 *                         into pivot chunks → response policies → the client's encoder
 *   → on_upstream_done    deliver (identity bytes, or decode → policies → encode), or fail
 *                         over to the next candidate, or fail
 *   → request_finish      settle tokens, log, count, release everything
 *
 * Nothing reaches the client before an upstream has answered with something we
 * pass through — for a stream, its first complete event with data. That is what lets a
 * later attempt replace a failed one unseen, whatever protocol each instance speaks.
 * After the first byte, a failure ends the stream with the client protocol's error event,
 * never with a silent truncation.
 *
 * Protocols (docs/providers.md): the client's is chosen by the path; each attempt asks
 * provider_upstream_proto what the instance speaks. Equal: the identity, today's zero-copy
 * splice, nothing parsed beyond usage. Different: the pivot (the chat form of the
 * request) is built once per request, the upstream body once per attempt, and the answer
 * is translated event by event. A route with response policies always reads the answer
 * through the pivot, so a guard written once works for every protocol.
 */
#include "sluice/request.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "sluice/accesslog.h"
#include "sluice/auth.h"
#include "sluice/balancer.h"
#include "sluice/body_splice.h"
#include "sluice/config.h"
#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/json_scan.h"
#include "sluice/log.h"
#include "sluice/mcp.h"
#include "sluice/metrics.h"
#include "sluice/policy_chain.h"
#include "sluice/provider.h"
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
/* Choices whose text an answer through the policies tracks, to pass it unchanged. */
#define RAW_CHOICES 4
/* An upstream header line we build ("Name: value"). */
#define HEADER_LINE_MAX 8192
/* The request id: the client's when sane and shorter than ID_MAX, sent upstream as a line. */
#define ID_HEADER "x-request-id: "
#define ID_MAX    128

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
	struct config *config;     /* the snapshot this request runs on: one reference */
	struct http_request *http; /* NULL once the client side is finished */
	TAILQ_ENTRY(request) link;
	char *id; /* in id_line */
	struct request_record rec;

	/* what the client asked */
	enum proto proto; /* the client's protocol, by the path */
	/* The client's body, read by one validating scan (scanned): its members are spans
	 * into the client's bytes, and no tree is built unless something needs one
	 * (body_tree: request policies, translation, an instance's options). A body past
	 * the scanner's bounds is parsed at once instead (scanned false, body set). */
	bool scanned;
	json_t *body;      /* the parsed client body, or NULL; request policies may rewrite it */
	bool body_changed; /* ... and then it is re-serialised, never spliced */
	json_t *pivot;     /* the chat form of body: built once, for the first
	                      translated attempt (owned) */
	const char *model; /* requested model (model_buf or model_alloc); NULL if absent */
	char *model_alloc;
	bool stream;
	uint64_t start_us;     /* monotonic: the request's first byte */
	bool hide_usage_chunk; /* we asked for include_usage; the client did not */
	uint64_t est_prompt, est_completion;
	struct proto_reply_ctx reply; /* what the codecs know of the request */

	/* who asks */
	const struct config_consumer *consumer;
	char key_fp[13];
	bool concurrency_held;

	/* the route's policies: NULL when it has none (then nothing here costs anything) */
	struct policy_run *policies;
	bool answer_policies; /* the route has response policies */
	json_t *answer;       /* a non-stream pivot answer waiting on a pending policy */
	const json_t *answer_members[2 * RAW_CHOICES]; /* its text before the policies */
	size_t n_answer_members;
	bool answer_bytes;       /* chat → chat: the policies read the answer's bytes, no tree */
	bool answer_no_usage;    /* ... which carry no usage */
	bool answer_changed;     /* ... and rewrote them into policed */
	struct evbuffer *policed; /* what they rewrote (policy_run_chat_bytes) */
	char *policy_body;        /* the client's bytes as the request policies spliced them */

	/* where it goes: the fallback loop */
	const struct config_route *route;
	struct balancer *own_balancer; /* when the worker's belong to another snapshot */
	bool *excluded;                /* per route target: not a candidate any more */
	bool excluded_small[SMALL_TARGETS];
	const struct config_target *target;     /* the current attempt's */
	const struct config_instance *instance; /* its instance */
	struct instance_state *state;
	bool inflight_held;
	bool trial;   /* this attempt is a half-open health trial */
	bool estimate; /* count_tokens on an instance without the endpoint: answered here */
	int attempts; /* started upstream transfers */
	uint64_t attempt_start_us;

	/* quota: the current attempt's reservation (the ticket itself is past scan) */
	bool ticket_held;           /* admitted and not yet settled or released */
	enum attempt_cost cost;     /* of the current attempt, if it ended now */
	bool quota_pending;         /* waiting on the store */
	bool quota_denied;          /* some candidate was refused by a quota */
	struct quota_ticket *denial; /* the refusal that clears soonest, for the 429 (owned) */

	/* the last failure, for the answer when every candidate failed */
	enum upstream_result last_res;
	int last_status;
	bool unserved; /* a candidate could not express the request */
	struct proto_error unserved_err;

	/* the current attempt */
	enum proto up_proto; /* what the instance is spoken to in */
	const char *up_url;  /* borrowed from the snapshot or the provider table */
	bool pivot_answer;   /* the answer goes through the pivot */
	char *upstream_body; /* shaped body, or NULL when the client's bytes go as they are */
	size_t upstream_len;
	struct upstream_xfer xfer;
	enum reply_mode mode;
	struct evbuffer *buffered; /* REPLY_BUFFERED */
	struct sse_parser sse;     /* REPLY_STREAM */
	struct evbuffer *events;   /* what one upstream read gives the client: one chunk */
	bool sse_ready;
	struct proto_decoder *dec; /* pivot streams: the upstream protocol's decoder */
	struct proto_encoder *enc; /* and the client protocol's encoder */
	bool stream_started;       /* the client has the stream's head */
	bool client_paused;        /* the transfer waits for the client to drain */
	bool feed_stopped;         /* our own event callback stopped the parse */
	bool stopped;              /* a response policy ended the stream */
	bool stream_failed;        /* the upstream's stream broke or reported an error */
	struct proto_error stream_err;
	const struct sse_event *cur_event; /* the upstream event being decoded (borrowed) */
	bool raw_ok;       /* chat → chat through the policies: events they leave alone go out as
	                      they came (keep_raw) */
	bool raw_started;  /* raw_ok was decided for this attempt's stream */
	bool enc_taught;   /* the encoder has seen a chunk of the stream (its id, model) */
	char *first_chunk; /* the stream's first chunk read in its bytes, to teach it later */
	bool body_refused; /* its answer passed a cap: an upstream error */
	const char *refused_why;
	struct record_usage usage;
	size_t output_text_bytes;        /* for an estimate when no usage comes */
	char *prompt_payload;            /* log.payloads: the client's body */
	struct evbuffer *output_payload; /* log.payloads: the answer's text */

	/* From here on, members are written before they are read: request_new zeroes the
	 * struct only up to scan (a third of its size is these buffers). */
	struct json_scan scan; /* filled by json_scan_body */
	/* the current attempt's reservation: quota_ticket_reset in request_new and before
	 * each admission (its reservations past n_res are never read) */
	struct quota_ticket ticket;
	/* "x-request-id: <id>": the upstream's header line, sent without a copy */
	char id_line[sizeof(ID_HEADER) - 1 + ID_MAX];
	/* Copies for the record: the client's buffers are recycled once the reply
	 * is finished, before the record is written. */
	char method[16], path[256], client_ip[48];
	char model_buf[128];
	char last_detail[320]; /* the last failure's */
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

/* v as 16 lower-case hex digits at o. */
static char *put_hex16(char *o, uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	for (int i = 15; i >= 0; i--, v >>= 4)
		o[i] = digits[v & 15];
	return o + 16;
}

/* src into dst[cap], cut to fit and terminated: snprintf's "%s" without the printf. */
static void copy_cut(char *dst, size_t cap, const char *src)
{
	size_t n = strlen(src);
	if (n >= cap)
		n = cap - 1;
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Keep the client's x-request-id when it is sane; otherwise make one. */
static void assign_request_id(struct request *r)
{
	const char *given = http_request_header(r->http, "x-request-id");

	memcpy(r->id_line, ID_HEADER, sizeof(ID_HEADER) - 1);
	r->id = r->id_line + sizeof(ID_HEADER) - 1;
	if (given != NULL) {
		size_t n = strlen(given);
		bool ok = n > 0 && n < ID_MAX;
		for (size_t i = 0; ok && i < n; i++)
			ok = given[i] > 32 && given[i] < 127;
		if (ok) {
			memcpy(r->id, given, n + 1);
			return;
		}
	}
	char *o = put_hex16(r->id, next_random(r->w));
	*put_hex16(o, r->w->n_requests) = '\0';
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
 * The model list says what a gateway serves and to whom: when every route is key-auth, it
 * takes a valid key — read with each key-auth route's own key headers, in route order —
 * and lists only the public names of the routes its consumer may use (and of auth: none
 * routes). A client that speaks Anthropic (it sends anthropic-version, as the Anthropic
 * SDKs do) gets Anthropic's list shape. Returns the list, or NULL after answering 401 (or
 * 500).
 */
static json_t *models_for_caller(struct request *r)
{
	const struct config *c = r->config;
	const struct config_consumer *cons = NULL;
	enum auth_result worst = AUTH_NONE_REQUIRED;
	bool any_open = false;
	json_t *list;

	for (size_t i = 0; i < c->n_routes && cons == NULL; i++) {
		const struct config_route *rt = &c->routes[i];
		enum auth_result res;

		if (rt->auth == ROUTE_AUTH_NONE) {
			any_open = true;
			continue;
		}
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
	} else if (worst == AUTH_MISSING && !any_open) {
		/* With no key, a caller sees the auth: none routes' models, if there are any. */
		reply_error(r, 401, "authentication_error", "missing_api_key",
		            "no API key: send it as Authorization: Bearer <key>");
		return NULL;
	}
	list = router_models_json_for(c, consumer_may_use, cons);
	if (list != NULL && http_request_header(r->http, "anthropic-version") != NULL) {
		json_t *a = router_models_anthropic(list);
		json_decref(list);
		list = a;
	}
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
static bool plan(struct request *r);
static void request_policies(struct request *r);
static void next_attempt(struct request *r);
static const char *get_client_header(void *arg, const char *name);

/* A new request on hr, with its id and record; NULL (answered 503) when out of memory. */
static struct request *request_new(struct http_request *hr, struct worker *w)
{
	struct request *r = malloc(sizeof(*r));
	struct timeval now;

	if (r == NULL) {
		http_reply_error(hr, 503, "server_error", "out_of_memory", "out of memory");
		return NULL;
	}
	memset(r, 0, offsetof(struct request, scan));
	quota_ticket_reset(&r->ticket);
	r->last_detail[0] = r->model_buf[0] = '\0';
	r->w = w;
	r->http = hr;
	r->config = config_ref(w->config);
	w->n_requests++;
	TAILQ_INSERT_TAIL(&w->requests, r, link);
	assign_request_id(r);
	{
		/* The id is printable ASCII without spaces (assign_request_id): no checks. */
		char line[sizeof(r->id_line) + 2];
		size_t n = strlen(r->id_line);
		memcpy(line, r->id_line, n);
		memcpy(line + n, "\r\n", 2);
		http_response_header_lines(hr, line, n + 2);
	}
	http_request_on_abort(hr, on_client_abort, r);

	r->start_us = hr->start_us ? hr->start_us : http_now_us();
	gettimeofday(&now, NULL);
	r->rec.request_id = r->id;
	r->rec.start_unix_us = (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_usec -
	                       (http_now_us() - r->start_us);
	copy_cut(r->method, sizeof(r->method), hr->method);
	copy_cut(r->path, sizeof(r->path), hr->path);
	copy_cut(r->client_ip, sizeof(r->client_ip), hr->client_ip);
	r->rec.method = r->method;
	r->rec.path = r->path;
	r->rec.client_ip = r->client_ip;
	r->rec.bytes_in = hr->body_len;
	/* The client's protocol decides the shape of every answer, gateway errors included. */
	r->proto = proto_of_path(hr->path, strlen(hr->path));
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
	if (!read_body(r) || !route(r) || !authenticate(r) || !plan(r))
		return;
	request_policies(r);
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

/* The requested model, decoded from the scan into memory the request owns. */
static bool scanned_model(struct request *r, const struct json_scan_value *v)
{
	char *buf = r->model_buf;
	size_t n = json_scan_string(v, buf, sizeof(r->model_buf) - 1);

	if (n > sizeof(r->model_buf) - 1) {
		if ((r->model_alloc = malloc(n + 1)) == NULL)
			return false;
		buf = r->model_alloc;
		json_scan_string(v, buf, n);
	}
	buf[n] = '\0';
	r->model = buf;
	return true;
}

static bool read_body(struct request *r)
{
	struct http_request *hr = r->http;
	const char *ct = http_request_header(hr, "content-type");
	json_error_t jerr;
	bool bad_model, bad_stream, model_nul = false;

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
	switch (json_scan_body(hr->body, hr->body_len, &r->scan)) {
	case JSON_SCAN_OK:
		r->scanned = true;
		break;
	case JSON_SCAN_INVALID:
		reply_error(r, 400, "invalid_request_error", "invalid_json",
		            "the request body is not valid JSON: %s at line %d column %d",
		            r->scan.error, r->scan.line, r->scan.column);
		return false;
	case JSON_SCAN_NOT_OBJECT:
		reply_error(r, 400, "invalid_request_error", "invalid_json",
		            "the request body must be a JSON object");
		return false;
	case JSON_SCAN_TOO_COMPLEX:
		break; /* past the scanner's bounds: jansson decides */
	}
	if (r->scanned) {
		const struct json_scan_value *m = &r->scan.member[JSON_SCAN_MODEL];
		const struct json_scan_value *st = &r->scan.member[JSON_SCAN_STREAM];
		bad_model = m->type != JSON_SCAN_ABSENT && m->type != JSON_SCAN_STRING;
		if (m->type == JSON_SCAN_STRING) {
			if (!scanned_model(r, m)) {
				reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
				return false;
			}
			model_nul = strlen(r->model) != m->str_len;
		}
		bad_stream = st->type != JSON_SCAN_ABSENT && st->type != JSON_SCAN_TRUE &&
		             st->type != JSON_SCAN_FALSE && st->type != JSON_SCAN_NULL;
		r->stream = st->type == JSON_SCAN_TRUE;
	} else {
		r->body = json_loadb(hr->body, hr->body_len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL,
		                     &jerr);
		if (r->body == NULL) {
			reply_error(r, 400, "invalid_request_error", "invalid_json",
			            "the request body is not valid JSON: %s at line %d column %d",
			            jerr.text, jerr.line, jerr.column);
			return false;
		}
		if (!json_is_object(r->body)) {
			reply_error(r, 400, "invalid_request_error", "invalid_json",
			            "the request body must be a JSON object");
			return false;
		}
		r->reply.request = r->body;
		json_t *model = json_object_get(r->body, "model");
		json_t *stream = json_object_get(r->body, "stream");
		bad_model = model != NULL && !json_is_string(model);
		r->model = json_string_value(model);
		model_nul = r->model != NULL && strlen(r->model) != json_string_length(model);
		bad_stream = stream != NULL && !json_is_boolean(stream) && !json_is_null(stream);
		r->stream = json_is_true(stream);
	}
	if (bad_model) {
		reply_error(r, 400, "invalid_request_error", "invalid_model",
		            "\"model\" must be a string");
		return false;
	}
	if (model_nul) { /* as a C string it would name another model */
		r->model = NULL;
		reply_error(r, 400, "invalid_request_error", "invalid_model",
		            "\"model\" must not contain a NUL character");
		return false;
	}
	r->rec.model_requested = r->model;
	if (bad_stream) {
		reply_error(r, 400, "invalid_request_error", "invalid_stream",
		            "\"stream\" must be true or false");
		return false;
	}
	r->rec.stream = r->stream;
	return true;
}

/* The client's body as a tree, parsed on first need (request policies, translation, an
 * instance's options, codecs that echo the request); NULL only when out of memory: the
 * scan accepted these bytes, and it accepts nothing jansson refuses. */
static json_t *body_tree(struct request *r)
{
	if (r->body == NULL && r->http != NULL) {
		r->body = json_loadb(r->http->body, r->http->body_len,
		                     JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
		if (!json_is_object(r->body)) {
			json_decref(r->body);
			r->body = NULL;
		}
		r->reply.request = r->body;
	}
	return r->body;
}

/* The quota's prompt estimate: of the tree when there is one (request policies may have
 * rewritten it), else of the scan (the same number for the same bytes). */
static uint64_t estimate_prompt(struct request *r)
{
	uint64_t est;
	/* a request policy took it of these very bytes already */
	if (r->policies != NULL && r->scanned && !r->body_changed &&
	    policy_run_request_estimate(r->policies, &est))
		return est;
	return r->body != NULL ? usage_estimate_prompt(r->body)
	                       : json_scan_estimate_prompt(&r->scan);
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
	enum auth_result res = auth_check(r->config, r->route, get_client_header, r->http,
	                                  &r->consumer, r->key_fp);

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

/* What the fallback loop needs, and what the codecs know of the request. */
static bool plan(struct request *r)
{
	struct http_request *hr = r->http;
	size_t n = r->route->n_targets;

	r->excluded = n <= SMALL_TARGETS ? r->excluded_small : calloc(n, sizeof(bool));
	if (r->excluded == NULL) {
		reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
		return false;
	}
	if (r->config->log.payloads) {
		r->prompt_payload = strndup(hr->body, hr->body_len);
		r->output_payload = evbuffer_new();
	}
	r->reply.request_id = r->id;
	r->reply.created = (long long)(r->rec.start_unix_us / 1000000u);
	r->reply.include_usage =
	        r->scanned ? r->scan.include_usage
	                   : json_is_true(json_object_get(
	                             json_object_get(r->body, "stream_options"), "include_usage"));
	return true;
}

/* ---------------------------------------------------------------- request policies */

static void start_attempts(struct request *r);

/*
 * A chain whose whole change was chat messages added around the client's (a decorator)
 * says so in bytes: they are spliced into the client's "messages" array, and the body is
 * not re-serialised. From then on the pipeline reads those bytes as the client's (the tree
 * says the same). False: re-serialise.
 */
static bool splice_request_body(struct request *r)
{
	struct http_request *hr = r->http;
	const char *before, *after;
	struct json_scan js;

	if (r->proto != PROTO_CHAT || !policy_run_request_splice(r->policies, &before, &after) ||
	    json_scan_body(hr->body, hr->body_len, &js) != JSON_SCAN_OK ||
	    js.member[JSON_SCAN_MESSAGES].type != JSON_SCAN_ARRAY)
		return false;
	size_t len;
	char *buf = policy_splice_messages(hr->body, hr->body_len, &js.member[JSON_SCAN_MESSAGES],
	                                   before, after, &len);
	if (buf == NULL)
		return false;
	free(r->policy_body);
	r->policy_body = buf;
	hr->body = buf; /* owned by the request, which outlives every reader of hr->body */
	hr->body_len = len;
	/* r->scan's spans pointed into the client's bytes: read them again from these */
	if (r->scanned && json_scan_body(hr->body, hr->body_len, &r->scan) != JSON_SCAN_OK)
		r->scanned = false;
	return true;
}

/* The chain's verdict (now, or later from the loop): refuse, or go on to the attempts. */
static void after_request_policies(void *arg, enum policy_verdict v)
{
	struct request *r = arg;
	const struct policy_request *out = policy_run_request_outcome(r->policies);
	json_t *tree = policy_run_request_take_tree(r->policies);

	if (tree != NULL) { /* a policy needed it: the body as the policies left it */
		r->body = tree;
		r->reply.request = tree;
	}
	if (v == POLICY_REFUSE) {
		reply_error(r, out->status ? out->status : 400,
		            out->type ? out->type : "invalid_request_error",
		            out->code ? out->code : "policy_refused", "%s",
		            out->message[0] ? out->message : "refused by the route's policy");
		return;
	}
	/* A rewritten body goes out re-serialised (the client's bytes are not what it says
	 * now), or spliced when all that changed were messages added around the client's. */
	char *bytes;
	size_t len;
	const struct json_scan *scan;
	if (out->changed && policy_run_request_bytes_result(r->policies, &bytes, &len, &scan)) {
		/* spliced by the policies themselves: these are the client's bytes now */
		free(r->policy_body);
		r->policy_body = bytes;
		r->http->body = bytes; /* owned by the request, which outlives every reader */
		r->http->body_len = len;
		if (scan != NULL)
			r->scan = *scan;
		r->scanned = scan != NULL;
		if (!r->scanned && body_tree(r) == NULL) {
			reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
			return;
		}
	} else if (out->changed && !splice_request_body(r)) {
		r->body_changed = true;
	}
	start_attempts(r);
}

/*
 * The route's plugins, in order, on the client's body in its own protocol, before any
 * quota is reserved: a refused request reserves and charges nothing. A route without
 * plugins creates nothing here. The response policies' state is created with the run, so
 * every attempt's answer goes through the same chain.
 */
static void request_policies(struct request *r)
{
	const struct config_route *rt = r->route;

	if (rt->n_plugins == 0) {
		start_attempts(r);
		return;
	}
	struct policy_env env = {
	        .base = r->w->base,
	        .upstream = r->w->upstream,
	        .request_id = r->id,
	        .route = rt->name,
	        .consumer = r->consumer ? r->consumer->name : NULL,
	};
	r->policies = policy_run_new(rt, &env, r->stream);
	if (r->policies == NULL) {
		reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
		return;
	}
	r->answer_policies =
	        (rt->plugin_phases & POLICY_PHASE_RESPONSE) != 0 && proto_codec(r->proto) != NULL;
	if (!(rt->plugin_phases & POLICY_PHASE_REQUEST)) {
		start_attempts(r);
		return;
	}
	/* A scanned body goes to the policies as bytes: a tree is parsed only for one that needs
	 * it (policy_bytes.h). */
	enum policy_verdict v =
	        r->body != NULL ? policy_run_request(r->policies, r->proto, r->body,
	                                             after_request_policies, r)
	                        : policy_run_request_bytes(r->policies, r->proto, r->http->body,
	                                                   r->http->body_len, &r->scan,
	                                                   after_request_policies, r);
	if (v != POLICY_PENDING)
		after_request_policies(r, v);
}

/* The estimates quotas reserve are taken from the body as the upstream will see it: after
 * the policies, so decorated messages are counted. count_tokens costs no tokens. */
static void start_attempts(struct request *r)
{
	if (r->proto != PROTO_COUNT_TOKENS) {
		r->est_prompt = estimate_prompt(r);
		r->est_completion =
		        r->body != NULL
		                ? usage_completion_budget(r->body, USAGE_DEFAULT_COMPLETION_BUDGET)
		                : json_scan_completion_budget(&r->scan,
		                                              USAGE_DEFAULT_COMPLETION_BUDGET);
	}
	next_attempt(r);
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
static void attempt_start(struct request *r);
static void answer_count_tokens(struct request *r);

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
		const char *url;
		r->excluded[idx] = true; /* whatever happens, not again for this request */
		/* count_tokens on an instance that has no such endpoint: the gateway's estimate,
		 * whatever the instance's health (after_quota answers it). */
		r->estimate = r->proto == PROTO_COUNT_TOKENS &&
		              provider_upstream_proto(in, PROTO_COUNT_TOKENS, &url) == PROTO__COUNT;
		enum health_gate gate = r->estimate ? HEALTH_PASS : health_admit(in->state, in, now);
		if ((gate == HEALTH_DOWN || gate == HEALTH_COOLING) &&
		    (rt->fallback.on & FALLBACK_UNHEALTHY)) {
			record_attempt(r, in, "unhealthy", 0, 0);
			continue;
		}
		r->target = &rt->targets[idx];
		r->instance = in;
		r->state = in->state;
		r->trial = gate == HEALTH_TRIAL;
		quota_ticket_reset(&r->ticket);
		/* count_tokens costs no tokens: request rates alone admit it, passed through or
		 * estimated; a spent token or cost budget does not refuse it. */
		if ((r->proto == PROTO_COUNT_TOKENS
		             ? quota_admit_requests(r->w->quota, &r->ticket, r->config, r->consumer,
		                                    in, on_quota, r)
		             : quota_admit(r->w->quota, &r->ticket, r->config, r->consumer, in,
		                           r->est_prompt, r->est_completion, on_quota,
		                           r)) == QUOTA_PENDING) {
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
		if (!r->quota_denied || t->retry_after_s < r->denial->retry_after_s) {
			if (r->denial == NULL && (r->denial = malloc(sizeof(*r->denial))) == NULL) {
				reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
				return;
			}
			r->quota_denied = true;
			*r->denial = *t;
		}
		if (r->route->fallback.on & FALLBACK_QUOTA) {
			next_attempt(r);
			return;
		}
		reply_quota_rejection(r, t);
		return;
	}
	r->ticket_held = true;
	if (r->estimate) {
		r->cost = COST_REQUEST; /* the request counts, no tokens */
		answer_count_tokens(r);
		return;
	}
	attempt_start(r);
}

/* A gateway-made error from a proto_error (translation refusals, translated upstream
 * errors), in the client's protocol. */
static void reply_proto_error(struct request *r, const struct proto_error *e)
{
	int status = e->status ? e->status : 400;

	reply_error(r, status, e->type ? e->type : proto_type_for_status(status),
	            e->code ? e->code : "invalid_request", "%s", e->message);
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
			            r->last_res == UPSTREAM_TIMEOUT ? "timeout_error"
			                                            : "upstream_error",
			            r->last_res == UPSTREAM_TIMEOUT ? "upstream_timeout"
			            : r->last_res == UPSTREAM_CONNECT_ERROR
			                    ? "upstream_connect_error"
			                    : "upstream_error",
			            "%s", r->last_detail);
		return;
	}
	if (r->unserved) {
		/* No candidate could express the request (e.g. n > 1 on Anthropic instances). */
		reply_proto_error(r, &r->unserved_err);
		return;
	}
	if (r->quota_denied) {
		reply_quota_rejection(r, r->denial);
		return;
	}
	reply_error(r, 503, "service_unavailable", "no_available_instance",
	            "route '%s' has no healthy instance available", r->route->name);
}

static void add_ratelimit_headers(struct request *r, const struct quota_ticket *t)
{
	static const char limit[] = "x-ratelimit-limit-tokens: ",
	                  remaining[] = "\r\nx-ratelimit-remaining-tokens: ",
	                  reset[] = "\r\nx-ratelimit-reset-tokens: ";
	char v[sizeof(limit) + sizeof(remaining) + sizeof(reset) + 3 * 20 + 3];
	size_t n = 0;
	if (!t->have_headers || r->http == NULL)
		return;
	/* Fixed names and digits: one add, none of the checks for bytes from elsewhere. */
	memcpy(v, limit, sizeof(limit) - 1);
	n = sizeof(limit) - 1;
	n += http_put_decimal(v + n, t->hdr_limit);
	memcpy(v + n, remaining, sizeof(remaining) - 1);
	n += sizeof(remaining) - 1;
	n += http_put_decimal(v + n, t->hdr_remaining);
	memcpy(v + n, reset, sizeof(reset) - 1);
	n += sizeof(reset) - 1;
	n += http_put_decimal(v + n, t->hdr_reset_s);
	memcpy(v + n, "s\r\n", 3);
	http_response_header_lines(r->http, v, n + 3);
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
		            "quota exhausted (%s); retry in %" PRIu64 " s",
		            t->denied_by ? t->denied_by->id : "limit", t->retry_after_s);
}

/* POST …/messages/count_tokens where the instance has no such endpoint: the gateway's own
 * estimate (the one quotas use), answered at once; no upstream, no tokens. */
static void answer_count_tokens(struct request *r)
{
	json_t *o = json_pack("{s:I}", "input_tokens", (json_int_t)estimate_prompt(r));

	reply_json(r, o);
	json_decref(o);
}

/* ---------------------------------------------------------------- the upstream body */

/* The model the instance is asked for: the target's, else the instance's; NULL keeps the
 * client's (a route's public names are the client's side of the alias). */
static const char *upstream_model(const struct request *r)
{
	if (r->target != NULL && r->target->model != NULL)
		return r->target->model;
	return r->instance->model;
}

/*
 * The client's bytes with "model" replaced by model (when not NULL) and, when
 * want_usage, "stream_options":{"include_usage":true} added as the first member.
 * The client's body is a non-empty object without stream_options (checked).
 */
static bool splice_body(struct request *r, const char *model, bool want_usage)
{
	const char *val = NULL;
	size_t val_len = 0;

	if (model && r->model && r->scanned) {
		/* the exact bytes of the value, whatever escapes spell the member's name; the
		 * scanner validated the whole body */
		val = r->scan.member[JSON_SCAN_MODEL].p;
		val_len = r->scan.member[JSON_SCAN_MODEL].len;
	}
	return body_splice(r->http->body, r->http->body_len, model, r->model != NULL, val, val_len,
	                   want_usage, &r->upstream_body, &r->upstream_len);
}

/* Stream usage is what quotas charge: the OpenAI protocols need asking for it. */
static bool asks_stream_usage(enum proto p)
{
	return p == PROTO_CHAT || p == PROTO_COMPLETIONS || p == PROTO_OTHER;
}

/*
 * The identity body an instance receives: the client's, with the instance's model and
 * options applied (the instance wins; on an Anthropic instance options.max_tokens is a
 * default), the model dropped where the URL names it (azure deployments), and usage
 * requested for OpenAI streams. Each attempt starts from the client's body, so one
 * instance's options never leak into the next. When nothing changes, the client's bytes
 * go as they are (no re-serialisation); the common change — another model name and/or
 * usage for a stream — is a splice of those bytes.
 */
static bool shape_body(struct request *r)
{
	const struct config_instance *in = r->instance;
	const struct provider_ops *ops = provider_ops(in->provider);
	const char *model = upstream_model(r);
	bool drop_model = ops->drop_model != NULL && ops->drop_model(in);
	bool same_model = model == NULL || (r->model && strcmp(model, r->model) == 0);
	/* The scan describes the client's bytes; a body the policies rewrote is read from
	 * its tree. */
	bool from_scan = r->scanned && !r->body_changed;
	bool have_so, client_usage;
	size_t n_members;
	json_t *so = NULL;

	if (from_scan) {
		have_so = r->scan.member[JSON_SCAN_STREAM_OPTIONS].type != JSON_SCAN_ABSENT;
		client_usage = r->scan.include_usage;
		n_members = r->scan.n_members;
	} else {
		so = json_object_get(r->body, "stream_options");
		have_so = so != NULL;
		client_usage = json_is_true(json_object_get(so, "include_usage"));
		n_members = json_object_size(r->body);
	}
	bool want_usage = r->stream && asks_stream_usage(r->proto) && !client_usage;

	r->hide_usage_chunk = want_usage;
	bool no_options = in->options == NULL || json_object_size(in->options) == 0;
	if (!r->body_changed && same_model && !drop_model && !want_usage && no_options)
		return true;
	/* On a body too complex for the scan, the splice finds "model" in the raw bytes; a
	 * name written with escapes ("mod\u0065l", which the parse understood) is not found
	 * there, and the body is rebuilt below. */
	if (!r->body_changed && no_options && !drop_model && !have_so && n_members > 0 &&
	    splice_body(r, same_model ? NULL : model, want_usage))
		return true;

	json_t *tree = body_tree(r);
	if (tree == NULL)
		return false;
	so = json_object_get(tree, "stream_options");
	json_t *b = json_copy(tree); /* shallow: only top-level keys change */
	if (b == NULL)
		return false;
	if (drop_model)
		json_object_del(b, "model");
	else if (model)
		json_object_set_new(b, "model", json_string(model));
	if (in->options && ops->upstream == PROTO_MESSAGES) {
		const char *k;
		json_t *v;
		json_object_foreach(in->options, k, v)
		{
			if (strcmp(k, "max_tokens") != 0 || json_object_get(b, k) == NULL)
				json_object_set(b, k, v);
		}
	} else if (in->options) {
		json_object_update(b, in->options);
	}
	if (want_usage) {
		/* Hide the extra chunk from a client that did not ask (on_stream_event). */
		json_t *nso = json_is_object(so) ? json_copy(so) : json_object();
		json_object_set_new(nso, "include_usage", json_true());
		json_object_set_new(b, "stream_options", nso);
	}
	r->upstream_body = json_dumps(b, JSON_COMPACT);
	json_decref(b);
	r->upstream_len = r->upstream_body ? strlen(r->upstream_body) : 0;
	return r->upstream_body != NULL;
}

/*
 * A translated body: the pivot (built once per request from the client's body) in the
 * instance's protocol, with the upstream model — none where the URL names it. The codec
 * merges the instance's options. The client's top-level "mock" object is carried across,
 * and nothing else the pivot does not know: it steers sluice-mockllm in tests
 * (docs/providers.md), as it does on the identity path. False with *err filled when this
 * instance cannot serve the request (err->status 500: out of memory).
 */
static bool translate_body(struct request *r, struct proto_error *err)
{
	const struct config_instance *in = r->instance;
	const struct provider_ops *ops = provider_ops(in->provider);
	const char *model = upstream_model(r);
	json_t *up, *mock;

	memset(err, 0, sizeof(*err));
	if (body_tree(r) == NULL) {
		proto_error_set(err, 500, "server_error", "internal_error", "out of memory");
		return false;
	}
	if (r->pivot == NULL) {
		r->pivot = proto_codec(r->proto)->request_to_chat(r->body, err);
		if (r->pivot == NULL)
			return false;
	}
	if (ops->drop_model != NULL && ops->drop_model(in))
		model = NULL;
	else if (model == NULL)
		model = r->model;
	up = proto_codec(r->up_proto)->request_from_chat(r->pivot, in, model, err);
	if (up == NULL)
		return false;
	mock = json_object_get(r->body, "mock");
	if (json_is_object(mock))
		json_object_set(up, "mock", mock);
	r->upstream_body = json_dumps(up, JSON_COMPACT);
	json_decref(up);
	if (r->upstream_body == NULL) {
		proto_error_set(err, 500, "server_error", "internal_error", "out of memory");
		return false;
	}
	r->upstream_len = strlen(r->upstream_body);
	return true;
}

/* ---------------------------------------------------------------- upstream attempt */

static void attempt_reset(struct request *r)
{
	upstream_xfer_cleanup(&r->xfer);
	if (r->buffered)
		evbuffer_drain(r->buffered, evbuffer_get_length(r->buffered));
	if (r->sse_ready) {
		sse_parser_free(&r->sse);
		r->sse_ready = false;
	}
	if (r->dec) {
		proto_codec(r->up_proto)->decoder_free(r->dec);
		r->dec = NULL;
	}
	if (r->enc) {
		proto_codec(r->proto)->encoder_free(r->enc);
		r->enc = NULL;
	}
	free(r->upstream_body);
	r->upstream_body = NULL;
	r->mode = REPLY_NONE;
	r->cost = COST_NOTHING;
	r->client_paused = false;
	r->feed_stopped = r->stream_failed = r->body_refused = false;
	r->raw_ok = r->raw_started = r->enc_taught = false;
	free(r->first_chunk);
	r->first_chunk = NULL;
	memset(&r->usage, 0, sizeof(r->usage));
	r->output_text_bytes = 0;
}

static bool has_auth_header(const struct config_instance *in, const char *name, size_t len)
{
	for (size_t i = 0; i < in->n_auth_headers; i++)
		if (strlen(in->auth_headers[i].name) == len &&
		    strncasecmp(in->auth_headers[i].name, name, len) == 0)
			return true;
	return false;
}

/* The client's Anthropic headers worth keeping on the Messages identity path: the API
 * version it was written for and the beta features it uses. */
static const char *const anthropic_client_headers[] = {"anthropic-version", "anthropic-beta", NULL};

/*
 * The headers an attempt sends: the instance's auth — never the client's credentials —
 * then the provider's extra headers (anthropic-version) unless the auth sets the same name
 * or, on the Messages identity path, the client sent its own; the request id.
 */
static void add_upstream_headers(struct request *r)
{
	const struct config_instance *in = r->instance;
	const struct provider_ops *ops = provider_ops(in->provider);
	bool anthropic_identity = r->up_proto == r->proto &&
	                          (r->proto == PROTO_MESSAGES || r->proto == PROTO_COUNT_TOKENS);
	char line[HEADER_LINE_MAX];

	for (size_t i = 0; i < in->n_auth_headers; i++) {
		snprintf(line, sizeof(line), "%s: %s", in->auth_headers[i].name,
		         in->auth_headers[i].value);
		upstream_xfer_header(&r->xfer, line);
	}
	if (anthropic_identity) {
		for (size_t i = 0; anthropic_client_headers[i] != NULL; i++) {
			const char *name = anthropic_client_headers[i];
			const char *v = http_request_header(r->http, name);
			if (v == NULL || has_auth_header(in, name, strlen(name)))
				continue;
			snprintf(line, sizeof(line), "%s: %s", name, v);
			upstream_xfer_header(&r->xfer, line);
		}
	}
	for (size_t i = 0; ops->extra_headers != NULL && ops->extra_headers[i] != NULL; i++) {
		const char *h = ops->extra_headers[i], *colon = strchr(h, ':');
		size_t n = colon ? (size_t)(colon - h) : strlen(h);
		char name[64];
		if (has_auth_header(in, h, n) || n >= sizeof(name))
			continue;
		memcpy(name, h, n);
		name[n] = '\0';
		if (anthropic_identity && http_request_header(r->http, name) != NULL)
			continue;
		upstream_xfer_header(&r->xfer, h);
	}
	upstream_xfer_header_static(&r->xfer, r->id_line); /* r outlives its transfers */
	if (r->stream)
		upstream_xfer_header(&r->xfer, "Accept: text/event-stream");
}

/* This candidate cannot express the request: give its reservation back, remember why,
 * and try the next one (the client hears the reason only if none can). */
static void attempt_unserved(struct request *r, const struct proto_error *err)
{
	log_info("[%s] instance %s cannot serve this request: %s", r->id, r->instance->name,
	         err->message);
	record_attempt(r, r->instance, "unsupported", 0, 0);
	if (r->trial)
		health_trial_abandon(r->state);
	r->trial = false;
	quota_release(r->w->quota, &r->ticket);
	r->ticket_held = false;
	r->unserved = true;
	r->unserved_err = *err;
	next_attempt(r);
}

static void attempt_start(struct request *r)
{
	const struct config_instance *in = r->instance;
	struct proto_error perr;

	attempt_reset(r);
	r->up_proto = provider_upstream_proto(in, r->proto, &r->up_url);
	r->pivot_answer = r->up_proto != r->proto || r->answer_policies;
	/* The codecs may echo the client's request (Responses, Messages) or read its options
	 * (Anthropic's thinking): they read its tree. The chat codec reads neither, so chat to
	 * chat under response policies parses nothing. */
	if (r->pivot_answer && !(r->proto == PROTO_CHAT && r->up_proto == PROTO_CHAT) &&
	    body_tree(r) == NULL) {
		reply_error(r, 503, "server_error", "out_of_memory", "out of memory");
		return;
	}
	/* Synthesised objects carry the client's model name; an answer in the client's own
	 * protocol keeps the upstream's, as on the identity path. */
	r->reply.model = r->up_proto != r->proto ? r->model : NULL;
	if (r->up_proto == r->proto) {
		if (!shape_body(r)) {
			reply_error(r, 500, "server_error", "internal_error",
			            "cannot build the upstream body");
			return;
		}
	} else if (!translate_body(r, &perr)) {
		if (perr.status == 500) {
			reply_proto_error(r, &perr);
			return;
		}
		if (r->pivot == NULL) { /* the client's request itself cannot be expressed */
			reply_proto_error(r, &perr);
			return;
		}
		attempt_unserved(r, &perr);
		return;
	}
	r->attempts++;
	r->attempt_start_us = http_now_us();
	r->rec.instance = in->name;
	r->rec.priced = in->price.set;
	r->rec.model_upstream = upstream_model(r) ? upstream_model(r) : r->model;
	upstream_xfer_init(&r->xfer, r->w->upstream, &upstream_ops, r);
	if (r->w->balancers_config == r->config && r->up_url == in->url)
		upstream_xfer_curlu(&r->xfer, r->w->urls[in->index]);
	add_upstream_headers(r);

	const char *body = r->upstream_body ? r->upstream_body : r->http->body;
	size_t len = r->upstream_body ? r->upstream_len : r->http->body_len;
	struct upstream_timeouts to = {
	        .connect = in->timeouts.connect,
	        .first_byte = in->timeouts.first_byte,
	        .idle = in->timeouts.idle,
	        .total = in->timeouts.total,
	};
	log_debug("[%s] %s %s → instance %s (%s%s%s, attempt %d%s)", r->id, r->route->name,
	          r->model ? r->model : "-", in->name, proto_name(r->proto),
	          r->up_proto != r->proto ? " → " : "",
	          r->up_proto != r->proto ? proto_name(r->up_proto) : "", r->attempts,
	          r->trial ? ", health trial" : "");
	health_inflight_add(r->state, 1);
	r->inflight_held = true;
	/* keepalive.pool: 0 keeps no connection to this instance (-1: close after the exchange) */
	if (!upstream_xfer_start(&r->xfer, NULL, r->up_url, body, len, &to, in->tls_verify,
	                         in->keepalive.pool == 0 ? -1L
	                                                 : (long)(in->keepalive.idle / 1000))) {
		reply_error(r, 500, "server_error", "internal_error",
		            "cannot start the upstream transfer");
		return;
	}
	/* From here the upstream may be working on it, whether or not the client stays. */
	r->cost = COST_WORK;
}

/* ---------------------------------------------------------------- upstream answers */

static void add_response_headers(struct request *r)
{
	struct http_request *hr = r->http;
	struct evbuffer *h = r->xfer.headers;
	size_t n = h ? evbuffer_get_length(h) : 0;

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
		evbuffer_drain(h, n); /* the lines were cut in place */
	}
	add_ratelimit_headers(r, &r->ticket);
	if (r->config->server.expose_instance_header)
		http_response_header(hr, "x-sluice-instance", r->instance->name);
}

static bool is_event_stream(const char *ct)
{
	return strncasecmp(ct, "text/event-stream", 17) == 0;
}

static void on_policy_stop(void *arg, const char *finish_reason);

static bool on_upstream_head(void *arg, long status)
{
	struct request *r = arg;

	if (r->http == NULL)
		return false;
	if (r->stream && status >= 200 && status < 300 && is_event_stream(r->xfer.content_type)) {
		r->mode = REPLY_STREAM;
		sse_parser_init(&r->sse, MAX_SSE_EVENT);
		r->sse_ready = true;
		if (r->pivot_answer) {
			r->dec = proto_codec(r->up_proto)->decoder_new(&r->reply);
			r->enc = proto_codec(r->proto)->encoder_new(&r->reply);
			if (r->dec == NULL || r->enc == NULL) {
				r->body_refused = true;
				r->refused_why = "out of memory";
				return false;
			}
			/* A decision taken later (a moderation window) ends this stream. */
			if (r->answer_policies)
				policy_run_on_stop(r->policies, on_policy_stop, r);
		}
		return true; /* the client's head goes with the first whole event */
	}
	if (!r->stream && status >= 200 && status < 300 && is_event_stream(r->xfer.content_type)) {
		/* Not the answer that was asked for (an error page, a server that streams
		 * regardless): a broken answer, like a reset. */
		r->body_refused = true;
		r->refused_why = "it answered a non-stream request with an event stream";
		return false;
	}
	r->mode = REPLY_BUFFERED;
	if (r->buffered == NULL)
		r->buffered = upstream_buf_get(r->w->upstream);
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

/* Length of the text in "<key>":"..." fields of one event: for an estimate when the
 * upstream reports no usage. A scan, not a parse. */
static size_t text_bytes(const char *key, size_t key_len, const char *data, size_t len,
                         struct evbuffer *keep)
{
	size_t total = 0;
	const char *p = data, *end = data + len;
	while ((p = usage_find(p, (size_t)(end - p), key, key_len)) != NULL) {
		p += key_len;
		const char *q = p;
		/* An escape takes two bytes, unless the data ends inside it. */
		while (q < end && *q != '"')
			q += (*q == '\\' && end - q >= 2) ? 2 : 1;
		total += (size_t)(q - p);
		if (keep)
			evbuffer_add(keep, p,
			             (size_t)(q - p)); /* still JSON-escaped: fine for a log */
		p = q;
	}
	return total;
}

/* Where each protocol's stream events carry their text. */
static size_t event_text_bytes(enum proto p, const struct sse_event *ev, struct evbuffer *keep)
{
	static const char chat[] = "\"content\":\"", messages[] = "\"text\":\"",
	                  responses[] = "\"delta\":\"";

	switch (p) {
	case PROTO_MESSAGES:
		return text_bytes(messages, sizeof(messages) - 1, ev->data, ev->data_len, keep);
	case PROTO_RESPONSES:
		return text_bytes(responses, sizeof(responses) - 1, ev->data, ev->data_len, keep);
	default:
		return text_bytes(chat, sizeof(chat) - 1, ev->data, ev->data_len, keep);
	}
}

/* The client's stream begins: its head, with the first bytes it will get. */
static void start_client_stream(struct request *r)
{
	if (r->stream_started)
		return;
	r->stream_started = true;
	r->rec.ttft_us = http_now_us() - r->start_us;
	add_response_headers(r);
	http_response_header_lines(r->http, "Cache-Control: no-cache\r\n", 25);
	http_reply_start(r->http, (int)r->xfer.status,
	                 r->pivot_answer ? "text/event-stream" : r->xfer.content_type);
}

/* The identity path: the upstream's event goes to the client as it came; usage is read
 * from it on the way. */
static bool identity_event(struct request *r, const struct sse_event *ev)
{
	/* Nothing starts the client's stream but an event with data: a page of blank lines
	 * (an HTML error in a 200 event stream) is not an answer, and may still fail over. */
	if (!ev->has_data && !r->stream_started)
		return true;
	if (r->proto == PROTO_MESSAGES || r->proto == PROTO_RESPONSES) {
		proto_codec(r->proto)->stream_usage(ev, &r->usage);
		if (ev->has_data)
			r->output_text_bytes += event_text_bytes(r->proto, ev, r->output_payload);
	} else if (ev->has_data && ev->data_len > 0 && ev->data[0] == '{') {
		bool usage_only = false;
		struct record_usage u;
		if (usage_from_sse_data(ev->data, ev->data_len, &u, &usage_only)) {
			r->usage = u;
			if (usage_only && r->hide_usage_chunk)
				return true; /* asked for by us, not by the client */
		} else {
			r->output_text_bytes += event_text_bytes(r->proto, ev, r->output_payload);
		}
	}
	start_client_stream(r);
	r->rec.bytes_out += ev->raw_len;
	/* Straight into the client's output, as one chunk: an event through r->events cost
	 * a buffer of its own (libcurl hands over one HTTP chunk, here one event, per call). */
	http_reply_chunk(r->http, ev->raw, ev->raw_len);
	return true;
}

/* The bytes of text in a pivot chunk's deltas, also appended to keep (may be NULL). */
static size_t chunk_text(const json_t *chunk, struct evbuffer *keep)
{
	const json_t *choices = json_object_get(chunk, "choices"), *ch;
	size_t i, n = 0;

	json_array_foreach(choices, i, ch)
	{
		const json_t *c = json_object_get(json_object_get(ch, "delta"), "content");
		if (json_is_string(c)) {
			n += json_string_length(c);
			if (keep)
				evbuffer_add(keep, json_string_value(c), json_string_length(c));
		}
	}
	return n;
}

/* Whatever the encoder wrote for this event goes to the client (starting its stream). */
static void take_encoded(struct request *r)
{
	size_t n = evbuffer_get_length(r->events);

	if (n == 0)
		return;
	start_client_stream(r);
	r->rec.bytes_out += n;
}

/* The text members of an answer's or a chunk's choices (part "message" or "delta"), to
 * tell afterwards whether the policies changed any (they replace a member they rewrite).
 * False when there are too many to track. */

static bool text_members(const json_t *obj, const char *part, const json_t **v, size_t cap,
                         size_t *n)
{
	const json_t *choices = json_object_get(obj, "choices"), *ch;
	size_t i;

	*n = 0;
	json_array_foreach(choices, i, ch)
	{
		if (*n + 2 > cap)
			return false;
		v[(*n)++] = json_object_get(json_object_get(ch, part), "content");
		v[(*n)++] = json_object_get(ch, "finish_reason");
	}
	return true;
}

/*
 * A chat client on a chat instance, through response policies: an event whose text the
 * policies passed unchanged goes out as the upstream's bytes, as on the identity path,
 * instead of being serialised again (the encoder has seen the first chunk, so a chunk the
 * gateway adds at a cut carries the stream's id). The extra usage chunk the gateway asked
 * for stays hidden from a client that did not.
 */
static bool keep_raw(struct request *r, const json_t *chunk, const json_t **before, size_t n)
{
	const json_t *after[2 * RAW_CHOICES];
	const json_t *choices = json_object_get(chunk, "choices");
	size_t m;

	if (!r->raw_ok || r->cur_event == NULL ||
	    !text_members(chunk, "delta", after, 2 * RAW_CHOICES, &m) || m != n ||
	    memcmp(before, after, n * sizeof(after[0])) != 0)
		return false;
	if (!(r->hide_usage_chunk && json_is_array(choices) && json_array_size(choices) == 0 &&
	      json_object_get(chunk, "usage") != NULL))
		evbuffer_add(r->events, r->cur_event->raw, r->cur_event->raw_len);
	return true;
}

/*
 * One pivot chunk of a translated or policed stream: its usage, then the response
 * policies (which may rewrite its text, or stop the answer), then the client's encoder.
 * A stop ends the client's stream here, in its protocol, with the policies' finish
 * reason, and stops the parse: the upstream transfer is cancelled on this very event.
 */
static bool on_pivot_chunk(void *arg, json_t *chunk)
{
	struct request *r = arg;
	const struct proto_codec *client = proto_codec(r->proto);
	struct record_usage u;
	enum policy_verdict v = POLICY_CONTINUE;
	const json_t *before[2 * RAW_CHOICES];
	size_t n_before = 0;
	bool raw = false;

	if (proto_usage_from_chat(chunk, &u))
		r->usage = u;
	if (r->raw_ok && !text_members(chunk, "delta", before, 2 * RAW_CHOICES, &n_before))
		r->raw_ok = false;
	/* Counted before the policies (what the upstream produced, for an estimate); logged
	 * after them (what the client got). */
	r->output_text_bytes += chunk_text(chunk, r->answer_policies ? NULL : r->output_payload);
	if (r->answer_policies) {
		v = policy_run_chat_chunk(r->policies, chunk);
		if (v == POLICY_REFUSE) {
			proto_error_set(&r->stream_err, 500, "server_error", "policy_error",
			                "the route's response policies could not run");
			r->stream_failed = r->feed_stopped = true;
			return false;
		}
		if (r->output_payload)
			chunk_text(chunk, r->output_payload);
		/* Raw once the encoder knows the stream's id: a chunk the gateway adds later
		 * carries it. */
		raw = v == POLICY_CONTINUE && r->enc_taught && keep_raw(r, chunk, before, n_before);
	}
	if (!raw)
		r->enc_taught = true;
	if (!raw && !client->encode(r->enc, chunk, r->events)) {
		proto_error_set(&r->stream_err, 502, "upstream_error", "upstream_error",
		                "the upstream's answer cannot be expressed in this protocol");
		r->stream_failed = r->feed_stopped = true;
		return false;
	}
	if (v == POLICY_STOP) {
		client->stream_end(r->enc, policy_run_stopped(r->policies), r->events);
		r->stopped = r->feed_stopped = true;
	}
	take_encoded(r);
	return v != POLICY_STOP;
}

/*
 * Before the gateway writes a chunk of its own into a stream whose events went out as the
 * upstream's bytes (a cut, held text released at the end): the encoder learns the stream's
 * id, model and created from its first chunk, parsed now — only on those paths.
 */
static void teach_encoder(struct request *r)
{
	if (r->enc_taught || r->first_chunk == NULL || r->enc == NULL)
		return;
	r->enc_taught = true;
	json_t *c = json_loads(r->first_chunk, 0, NULL);
	struct evbuffer *sink = c ? evbuffer_new() : NULL;
	if (sink != NULL) {
		proto_codec(r->proto)->encode(r->enc, c, sink);
		evbuffer_free(sink);
	}
	json_decref(c);
}

/*
 * A chat event on a chat instance through the response policies: read in its bytes, no
 * tree (policy_run_chat_bytes). An event the policies leave alone goes out as it came; one
 * they changed goes out spliced. 1: handled, go on; 0: handled, the stream is over; -1:
 * not read, take the tree path.
 */
static int policed_chat_event(struct request *r, const struct sse_event *ev)
{
	struct policy_chat_bytes pb;
	struct record_usage u;
	bool usage_only = false;

	if (r->policed == NULL && (r->policed = evbuffer_new()) == NULL)
		return -1;
	enum policy_verdict v =
	        policy_run_chat_bytes(r->policies, ev->data, ev->data_len, true, r->policed, &pb);
	if (!pb.read)
		return -1;
	if (v == POLICY_REFUSE) {
		evbuffer_drain(r->policed, evbuffer_get_length(r->policed));
		proto_error_set(&r->stream_err, 500, "server_error", "policy_error",
		                "the route's response policies could not run");
		r->stream_failed = r->feed_stopped = true;
		return 0;
	}
	if (!r->enc_taught && r->first_chunk == NULL &&
	    (r->first_chunk = strndup(ev->data, ev->data_len)) == NULL) {
		evbuffer_drain(r->policed, evbuffer_get_length(r->policed));
		return -1; /* out of memory: the tree path teaches the encoder itself */
	}
	r->output_text_bytes += pb.text_bytes;
	if (usage_from_sse_data(ev->data, ev->data_len, &u, &usage_only))
		r->usage = u;
	if (pb.changed) {
		/* One data line per line of the JSON: an event whose data came in several lines
		 * has line breaks between its tokens (whitespace), which a single line would
		 * turn into the end of the field. */
		size_t n = evbuffer_get_length(r->policed);
		const char *p = (const char *)evbuffer_pullup(r->policed, -1), *e = p + n;
		while (p != NULL && p <= e) {
			const char *q = p;
			while (q < e && *q != '\n' && *q != '\r')
				q++;
			evbuffer_add(r->events, "data: ", 6);
			evbuffer_add(r->events, p, (size_t)(q - p));
			evbuffer_add(r->events, "\n", 1);
			if (q == e)
				break;
			p = q + 1;
		}
		evbuffer_add(r->events, "\n", 1);
		evbuffer_drain(r->policed, n);
	} else if (!(usage_only && r->hide_usage_chunk)) {
		evbuffer_add(r->events, ev->raw, ev->raw_len);
	}
	if (v == POLICY_STOP) {
		teach_encoder(r);
		proto_codec(r->proto)->stream_end(r->enc, policy_run_stopped(r->policies), r->events);
		r->stopped = r->feed_stopped = true;
	}
	take_encoded(r);
	return v != POLICY_STOP;
}

static bool on_stream_event(void *arg, const struct sse_event *ev)
{
	struct request *r = arg;
	struct proto_error err;

	if (!r->pivot_answer)
		return identity_event(r, ev);
	/* Chat through the policies: every event read in its bytes, without a tree (payload
	 * logging and error events take the tree path). */
	if (!r->raw_started && r->answer_policies && r->proto == PROTO_CHAT &&
	    r->up_proto == PROTO_CHAT && r->reply.model == NULL)
		r->raw_started = r->raw_ok = true;
	if (r->raw_ok && r->output_payload == NULL && ev->has_data && ev->event[0] == '\0' &&
	    !(ev->data_len == 6 && memcmp(ev->data, "[DONE]", 6) == 0)) {
		int k = policed_chat_event(r, ev);
		if (k >= 0)
			return k == 1;
	}
	memset(&err, 0, sizeof(err));
	r->cur_event = ev;
	bool ok = proto_codec(r->up_proto)->decode(r->dec, ev, on_pivot_chunk, r, &err);
	r->cur_event = NULL;
	if (ok)
		return true;
	if (!r->feed_stopped) { /* the upstream's stream is broken, or said it failed */
		r->stream_err = err;
		r->stream_failed = r->feed_stopped = true;
	}
	return false;
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
		/* Whole events only, so an error event can always follow cleanly; on the
		 * pivot path all the events of one read go out as one chunk (identity events
		 * go to the client one by one, identity_event). */
		if (r->events == NULL && (r->events = evbuffer_new()) == NULL)
			return 0;
		bool ok = sse_feed(&r->sse, data, len, on_stream_event, r);
		if (r->stream_started)
			http_reply_chunk_buffer(r->http, r->events);
		if (!ok && !r->feed_stopped) {
			/* Refused by the parser: an event over the cap. That is the upstream
			 * failing, not the client leaving (on_upstream_done). */
			r->body_refused = true;
			r->refused_why = "the upstream sent an SSE event over 4 MiB";
		}
		return ok ? len : 0;
	}
	if (evbuffer_get_length(r->buffered) + len > MAX_RESPONSE_BODY) {
		r->body_refused = true;
		r->refused_why = "the upstream's answer is over 64 MiB";
		return 0;
	}
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
	case UPSTREAM_TIMEOUT:
		return FALLBACK_TIMEOUT;
	case UPSTREAM_CONNECT_ERROR:
		return FALLBACK_CONNECT_ERROR;
	/* A reset before any answer is the instance failing, like a 5xx. */
	case UPSTREAM_ERROR:
		return FALLBACK_CONNECT_ERROR | FALLBACK_HTTP_5XX;
	default:
		return 0;
	}
}

/* The attempt is over: passive health, in-flight, the record. */
static void attempt_end(struct request *r, enum upstream_result res, int status,
                        const char *outcome)
{
	const struct provider_ops *ops = provider_ops(r->instance->provider);
	uint64_t now = http_now_us();
	enum health_outcome ho = HEALTH_OK;
	int health_status = status;

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
	/* A provider's overload status (Anthropic's 529) counts as the 503 it stands for. */
	if (ops->is_overload != NULL && ops->is_overload(status))
		health_status = 503;
	if (res != UPSTREAM_ABORTED)
		health_report(r->state, r->instance, ho, health_status, now);
	r->trial = false;
	if (res == UPSTREAM_OK && status < 400 && r->xfer.head_us)
		health_observe_latency(r->state, r->xfer.head_us - r->xfer.start_us,
		                       now - r->xfer.start_us);
	r->rec.upstream_us += now - r->attempt_start_us;
	record_attempt(r, r->instance, outcome, status, now - r->attempt_start_us);
}

/* An error event in the client's protocol, after the stream began; nothing follows it. */
static void stream_error_event(struct request *r, int status, const char *code, const char *msg)
{
	const struct proto_codec *c = proto_codec(r->proto);
	struct proto_error_out e = {
	        .status = status, .type = "upstream_error", .code = code, .message = msg};
	struct evbuffer *b = evbuffer_new();

	if (b == NULL)
		return; /* out of memory: the stream still ends, without the event */
	if (c != NULL) {
		c->stream_error(r->enc, &e, b);
	} else {
		evbuffer_add_printf(b, "event: error\ndata: {\"error\":{\"message\":\"");
		http_json_escape(b, msg, strlen(msg));
		evbuffer_add_printf(
		        b, "\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"%s\"}}\n\n",
		        code);
	}
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
		return status < 400    ? "ok"
		       : status == 429 ? "http_429"
		       : status < 500  ? "http_4xx"
		                       : "http_5xx";
	case UPSTREAM_TIMEOUT:
		return "timeout";
	case UPSTREAM_CONNECT_ERROR:
		return "connect_error";
	case UPSTREAM_ERROR:
		return "upstream_error";
	case UPSTREAM_ABORTED:
		return "client_gone";
	}
	return "unknown";
}

/* A 429's Retry-After (delta-seconds or an HTTP-date, bounded): the instance cools down. */
static void note_retry_after(struct request *r)
{
	const char *v;
	size_t vl;
	uint64_t secs;

	if (upstream_xfer_find_header(&r->xfer, "retry-after", &v, &vl) &&
	    health_parse_retry_after(v, vl, (int64_t)time(NULL), &secs))
		health_retry_after(r->state, r->instance, secs, http_now_us());
}

/*
 * An upstream error status answered to the client: in the client's protocol when the
 * upstream spoke another one (or the provider has its own error shapes, Azure's and
 * Gemini's), else passed through as it came. A body that no codec reads is passed through.
 */
static void deliver_error(struct request *r, int status, const char *body, size_t n)
{
	const struct provider_ops *ops = provider_ops(r->instance->provider);
	const struct proto_codec *up = proto_codec(r->up_proto);
	struct proto_error err;
	bool mapped = false;

	memset(&err, 0, sizeof(err));
	if (ops->error_to_openai != NULL)
		mapped = ops->error_to_openai(body, n, status, &err);
	if (!mapped && r->up_proto != r->proto && up != NULL)
		mapped = up->error_to_openai(body, n, status, &err);
	add_response_headers(r);
	r->rec.upstream_status = status;
	if (mapped) {
		if (err.status == 0)
			err.status = status;
		reply_proto_error(r, &err);
		return;
	}
	r->rec.status = status;
	r->rec.bytes_out = n;
	http_reply(r->http, status,
	           r->xfer.content_type[0] ? r->xfer.content_type : "application/json", body, n);
	r->http = NULL;
	request_finish(r);
}

static void send_pivot_answer(struct request *r);

static void on_answer_policies_done(void *arg)
{
	send_pivot_answer(arg);
}

/*
 * A non-stream answer through the pivot: decoded into a chat.completion (done before the
 * fallback decision, since an answer that cannot be read is an upstream error), then the
 * response policies, then the client's protocol. False when the upstream's body is not a
 * valid answer.
 */
static bool decode_pivot_answer(struct request *r, const char *body, size_t n)
{
	/* Chat on a chat instance: the policies read the bytes (deliver_answer_bytes); a tree
	 * only when that reader declines them. */
	r->answer_bytes = r->answer_policies && r->proto == PROTO_CHAT &&
	                  r->up_proto == PROTO_CHAT && r->output_payload == NULL &&
	                  policy_run_chat_bytes_readable(r->policies, body, n, false);
	if (r->answer_bytes) {
		r->answer_no_usage = !usage_from_body(body, n, &r->usage);
		return true;
	}
	json_t *root = json_loadb(body, n, JSON_ALLOW_NUL, NULL);

	r->answer = root ? proto_codec(r->up_proto)->response_to_chat(root, &r->reply) : NULL;
	json_decref(root);
	if (r->answer == NULL)
		return false;
	if (!proto_usage_from_chat(r->answer, &r->usage)) {
		const json_t *ch = json_array_get(json_object_get(r->answer, "choices"), 0);
		const json_t *c = json_object_get(json_object_get(ch, "message"), "content");
		r->output_text_bytes = json_is_string(c) ? json_string_length(c) : n;
	}
	return true;
}

static void send_answer_bytes(struct request *r);

static void on_answer_bytes_done(void *arg)
{
	send_answer_bytes(arg);
}

/* A chat answer from a chat instance through the response policies, read in its bytes:
 * it goes out as it came, or as they spliced it. */
static void deliver_answer_bytes(struct request *r)
{
	size_t n = evbuffer_get_length(r->buffered);
	const char *body = n ? (const char *)evbuffer_pullup(r->buffered, -1) : "";
	struct policy_chat_bytes pb = {0};
	enum policy_verdict v = POLICY_REFUSE;

	if (r->policed != NULL || (r->policed = evbuffer_new()) != NULL)
		v = policy_run_chat_bytes(r->policies, body, n, false, r->policed, &pb);
	if (v == POLICY_REFUSE || !pb.read) {
		reply_error(r, 500, "server_error", "policy_error",
		            "the route's response policies could not run");
		return;
	}
	if (r->answer_no_usage)
		r->output_text_bytes = pb.text_bytes;
	r->answer_changed = pb.changed;
	if (policy_run_done(r->policies, on_answer_bytes_done, r) == POLICY_PENDING)
		return; /* on_answer_bytes_done, from the loop */
	send_answer_bytes(r);
}

static void send_answer_bytes(struct request *r)
{
	struct evbuffer *src = r->answer_changed ? r->policed : r->buffered;
	size_t n = evbuffer_get_length(src);
	const char *body = n ? (const char *)evbuffer_pullup(src, -1) : "";
	char *text = NULL;

	if (policy_run_withheld(r->policies)) {
		/* A done-phase decision (moderation) withholds a choice's text: on a tree. */
		json_t *a = json_loadb(body, n, JSON_ALLOW_NUL, NULL);
		if (a != NULL) {
			policy_run_chat_completion_done(r->policies, a);
			text = json_dumps(a, JSON_COMPACT);
		}
		json_decref(a);
		if (text == NULL) {
			reply_error(r, 500, "server_error", "policy_error",
			            "the route's response policies could not run");
			return;
		}
		body = text;
		n = strlen(text);
	}
	add_response_headers(r);
	r->rec.status = (int)r->xfer.status;
	r->rec.bytes_out = n;
	r->rec.ttft_us = http_now_us() - r->start_us;
	http_reply(r->http, (int)r->xfer.status,
	           r->xfer.content_type[0] ? r->xfer.content_type : "application/json", body, n);
	r->http = NULL;
	free(text);
	request_finish(r);
}

static void deliver_pivot_answer(struct request *r)
{
	if (r->answer_bytes) {
		deliver_answer_bytes(r);
		return;
	}
	/* A chat answer on a chat instance that the policies leave alone goes out as the
	 * upstream's bytes (send_pivot_answer), as on the identity path. */
	r->raw_ok = r->proto == PROTO_CHAT && r->up_proto == PROTO_CHAT &&
	            text_members(r->answer, "message", r->answer_members, 2 * RAW_CHOICES,
	                         &r->n_answer_members);
	if (r->answer_policies) {
		if (policy_run_chat_completion(r->policies, r->answer) == POLICY_REFUSE) {
			reply_error(r, 500, "server_error", "policy_error",
			            "the route's response policies could not run");
			return;
		}
		if (policy_run_done(r->policies, on_answer_policies_done, r) == POLICY_PENDING)
			return; /* on_answer_policies_done, from the loop */
	}
	send_pivot_answer(r);
}

static void send_pivot_answer(struct request *r)
{
	json_t *out;
	char *text;

	if (r->answer_policies)
		policy_run_chat_completion_done(r->policies, r->answer);
	if (r->raw_ok) {
		const json_t *after[2 * RAW_CHOICES];
		size_t m;
		r->raw_ok = text_members(r->answer, "message", after, 2 * RAW_CHOICES, &m) &&
		            m == r->n_answer_members &&
		            memcmp(after, r->answer_members, m * sizeof(after[0])) == 0;
	}
	if (r->raw_ok) {
		size_t n = evbuffer_get_length(r->buffered);
		add_response_headers(r);
		r->rec.status = (int)r->xfer.status;
		r->rec.bytes_out = n;
		r->rec.ttft_us = http_now_us() - r->start_us;
		http_reply(r->http, (int)r->xfer.status,
		           r->xfer.content_type[0] ? r->xfer.content_type : "application/json",
		           (const char *)evbuffer_pullup(r->buffered, -1), n);
		r->http = NULL;
		request_finish(r);
		return;
	}
	if (r->output_payload) {
		const json_t *ch = json_array_get(json_object_get(r->answer, "choices"), 0);
		const json_t *c = json_object_get(json_object_get(ch, "message"), "content");
		if (json_is_string(c))
			evbuffer_add(r->output_payload, json_string_value(c),
			             json_string_length(c));
	}
	out = proto_codec(r->proto)->response_from_chat(r->answer, &r->reply);
	text = out ? json_dumps(out, JSON_COMPACT) : NULL;
	json_decref(out);
	if (text == NULL) {
		log_warn("[%s] instance %s: its answer cannot be expressed as %s", r->id,
		         r->instance->name, proto_name(r->proto));
		reply_error(
		        r, 502, "upstream_error", "upstream_error",
		        "instance '%s' gave an answer that cannot be expressed in this protocol",
		        r->instance->name);
		return;
	}
	add_response_headers(r);
	r->rec.status = (int)r->xfer.status;
	r->rec.bytes_out = strlen(text);
	r->rec.ttft_us = http_now_us() - r->start_us;
	http_reply(r->http, (int)r->xfer.status, "application/json", text, r->rec.bytes_out);
	r->http = NULL;
	free(text);
	request_finish(r);
}

/* The end of a stream the client has seen. */
static void end_client_stream(struct request *r)
{
	r->rec.status = (int)r->xfer.status;
	if (r->events != NULL && evbuffer_get_length(r->events) > 0) {
		r->rec.bytes_out += evbuffer_get_length(r->events);
		http_reply_chunk_buffer(r->http, r->events);
	}
	http_reply_end(r->http);
	r->http = NULL;
	request_finish(r);
}

static void pivot_stream_close(struct request *r)
{
	const char *reason = r->policies ? policy_run_stopped(r->policies) : NULL;

	if (reason != NULL) /* only then does the end carry a chunk of the gateway's */
		teach_encoder(r);
	proto_codec(r->proto)->stream_end(r->enc, reason, r->events);
	end_client_stream(r);
}

static void on_stream_policies_done(void *arg)
{
	pivot_stream_close(arg);
}

/* Text the policies still held when the upstream ended, as a chunk of its choice. */
static void on_flush_text(void *arg, unsigned choice, const char *text, size_t len)
{
	struct request *r = arg;
	json_t *chunk = json_pack("{s:s,s:[{s:i,s:{s:s%},s:n}]}", "object", "chat.completion.chunk",
	                          "choices", "index", (int)choice, "delta", "content", text, len,
	                          "finish_reason");

	if (chunk != NULL) {
		if (r->output_payload)
			evbuffer_add(r->output_payload, text, len);
		teach_encoder(r);
		proto_codec(r->proto)->encode(r->enc, chunk, r->events);
	}
	json_decref(chunk);
}

/* A pivot stream the upstream ended cleanly: what the policies held, their last word
 * (maybe asynchronous: moderation's last window), then the protocol's closing events. */
static void pivot_stream_done(struct request *r)
{
	if (r->answer_policies) {
		enum policy_verdict v = policy_run_flush(r->policies, on_flush_text, r);
		if (v == POLICY_REFUSE) {
			stream_error_event(r, 500, "policy_error",
			                   "the route's response policies could not run");
			end_client_stream(r);
			return;
		}
		if (v != POLICY_STOP &&
		    policy_run_done(r->policies, on_stream_policies_done, r) == POLICY_PENDING) {
			/* the transfer is over; what was written waits with the end */
			if (evbuffer_get_length(r->events) > 0) {
				r->rec.bytes_out += evbuffer_get_length(r->events);
				http_reply_chunk_buffer(r->http, r->events);
			}
			return;
		}
	}
	pivot_stream_close(r);
}

/*
 * A policy decided asynchronously (a moderation window) to end the stream: the upstream
 * is cancelled at once — it stops generating — and the client's stream ends cleanly in
 * its protocol with the policy's finish reason. From the loop.
 */
static void on_policy_stop(void *arg, const char *finish_reason)
{
	struct request *r = arg;

	if (r->http == NULL || r->mode != REPLY_STREAM || r->enc == NULL)
		return;
	if (r->xfer.running) {
		upstream_xfer_cancel(&r->xfer);
		attempt_end(r, UPSTREAM_OK, (int)r->xfer.status, "ok");
	}
	r->stopped = true;
	if (r->events == NULL && (r->events = evbuffer_new()) == NULL) {
		http_reply_end(r->http);
		r->http = NULL;
		request_finish(r);
		return;
	}
	teach_encoder(r);
	proto_codec(r->proto)->stream_end(r->enc, finish_reason, r->events);
	start_client_stream(r);
	end_client_stream(r);
}

/* A stream the client has seen is over: finish it, cleanly or with an error event. */
static void stream_over(struct request *r, enum upstream_result res, const char *detail)
{
	const struct config_instance *in = r->instance;
	int status = (int)r->xfer.status;

	attempt_end(r, res, status, outcome_name(res, status));
	if (r->stopped) { /* a response policy ended it; its end is written */
		end_client_stream(r);
		return;
	}
	if (res != UPSTREAM_OK || sse_pending(&r->sse) != 0) {
		const char *why = res == UPSTREAM_OK ? "the stream ended inside an event" : detail;
		char msg[300];
		log_warn("[%s] instance %s: stream failed after the first byte: %s", r->id,
		         in->name, why);
		if (r->stream_failed)
			snprintf(msg, sizeof(msg), "instance '%s': %s", in->name,
			         r->stream_err.message);
		else if (res == UPSTREAM_OK)
			snprintf(msg, sizeof(msg), "instance '%s': %s", in->name, why);
		else
			snprintf(msg, sizeof(msg), "instance '%s' %s after the stream started",
			         in->name, client_reason(res));
		http_reply_chunk_buffer(r->http, r->events);
		stream_error_event(
		        r, r->stream_failed && r->stream_err.status ? r->stream_err.status : 502,
		        res == UPSTREAM_TIMEOUT ? "upstream_timeout" : "upstream_stream_error",
		        msg);
		r->rec.error_code = "upstream_stream_error";
		end_client_stream(r);
		return;
	}
	if (r->pivot_answer) {
		pivot_stream_done(r);
		return;
	}
	end_client_stream(r);
}

static void on_upstream_done(void *arg, enum upstream_result res, const char *detail)
{
	struct request *r = arg;
	const struct config_instance *in = r->instance;
	int status = (int)r->xfer.status;

	if (r->http == NULL) { /* the client left; nothing to tell */
		attempt_end(r, UPSTREAM_ABORTED, status, "client_gone");
		request_finish(r);
		return;
	}
	r->rec.upstream_status = status;
	/* What this side stopped on purpose is not the client leaving: a policy's cut is a
	 * good answer, a broken stream or an answer past a cap is the upstream failing. */
	if (res == UPSTREAM_ABORTED && r->stopped) {
		res = UPSTREAM_OK;
	} else if (res == UPSTREAM_ABORTED && r->stream_failed) {
		res = UPSTREAM_ERROR;
		detail = r->stream_err.message;
	} else if (res == UPSTREAM_ABORTED && r->body_refused) {
		res = UPSTREAM_ERROR;
		detail = r->refused_why;
	}

	if (r->mode == REPLY_STREAM && r->stream_started) {
		stream_over(r, res, detail);
		return;
	}

	/* Nothing sent yet: fail over when the route says so. An error the upstream reported
	 * inside its 200 stream (Anthropic's overloaded_error) counts as its status. */
	if (r->stream_failed && r->stream_err.status >= 400) {
		res = UPSTREAM_OK;
		status = r->stream_err.status;
	}
	/* A 2xx stream that ended before one event with data is a broken answer, like a reset. */
	if (res == UPSTREAM_OK && r->mode == REPLY_STREAM && !r->stream_failed) {
		res = UPSTREAM_ERROR;
		detail = "the stream ended before its first event";
	}
	size_t n = r->buffered ? evbuffer_get_length(r->buffered) : 0;
	const char *body = n ? (const char *)evbuffer_pullup(r->buffered, (ev_ssize_t)n) : "";
	/* A 2xx answer the pivot cannot read is the upstream failing too. */
	if (res == UPSTREAM_OK && r->mode == REPLY_BUFFERED && status >= 200 && status < 300 &&
	    r->pivot_answer && !decode_pivot_answer(r, body, n)) {
		res = UPSTREAM_ERROR;
		detail = "its answer is not a valid response of its protocol";
	}
	unsigned trigger =
	        res == UPSTREAM_OK ? trigger_for_status(r->route, status) : trigger_for_result(res);
	r->cost = ended_attempt_cost(res, status, detail);
	attempt_end(r, res, status, outcome_name(res, status));
	if (res == UPSTREAM_OK && status == 429)
		note_retry_after(r);
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
		json_decref(r->answer);
		r->answer = NULL;
		fail_over(r, res, status, why);
		return;
	}
	if (res != UPSTREAM_OK) {
		int code = res == UPSTREAM_TIMEOUT ? 504 : 502;
		log_warn("[%s] instance %s: %s: %s", r->id, in->name, upstream_result_name(res),
		         detail);
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
	if (r->stream_failed) { /* an error event before the stream began, not failed over */
		r->rec.upstream_status = status;
		reply_proto_error(r, &r->stream_err);
		return;
	}
	if (status < 200 || status >= 300) {
		deliver_error(r, status, body, n);
		return;
	}
	if (r->pivot_answer) {
		deliver_pivot_answer(r);
		return;
	}

	/* The identity: the whole answer as the upstream gave it. */
	if (r->proto != PROTO_COUNT_TOKENS && !usage_from_body(body, n, &r->usage))
		r->output_text_bytes = n;
	add_response_headers(r);
	r->rec.status = status;
	r->rec.bytes_out = n;
	r->rec.ttft_us = http_now_us() - r->start_us;
	http_reply(r->http, status,
	           r->xfer.content_type[0] ? r->xfer.content_type : "application/json", body, n);
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

/* A gateway-made error, in the client's protocol: the OpenAI shape, or Anthropic's on
 * Messages paths (which keeps OpenAI's code inside "error", so either SDK reads it). */
static void reply_error(struct request *r, int status, const char *type, const char *code,
                        const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	struct evbuffer *b = NULL;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (status < 500)
		log_info("[%s] %d %s: %s", r->id, status, code, msg);
	r->rec.status = status;
	r->rec.error_code = code;
	if ((r->proto == PROTO_MESSAGES || r->proto == PROTO_COUNT_TOKENS) &&
	    (b = evbuffer_new()) != NULL) {
		struct proto_error_out e = {
		        .status = status, .type = type, .code = code, .message = msg};
		proto_codec(PROTO_MESSAGES)->error_body(&e, b);
		r->rec.bytes_out = evbuffer_get_length(b);
		http_reply(r->http, status, "application/json",
		           (const char *)evbuffer_pullup(b, -1), r->rec.bytes_out);
		evbuffer_free(b);
	} else {
		r->rec.bytes_out = http_reply_error(r->http, status, type, code, "%s", msg);
	}
	r->http = NULL;
	request_finish(r);
}

/*
 * Charge what the upstream was asked to do (docs/quotas.md §3): its usage, or — when it
 * said nothing, or the client left before it could, or a policy cut it — the prompt
 * estimate and the text produced so far. An error status passed through counts the
 * request and no tokens; an attempt that never reached the upstream costs nothing;
 * count_tokens costs no tokens. Every protocol lands in the same struct record_usage, so
 * quotas charge the same tokens whichever protocol served the request.
 */
static void settle(struct request *r)
{
	struct record_usage *u = &r->usage;

	if (r->proto == PROTO_COUNT_TOKENS)
		memset(u, 0, sizeof(*u));
	else if (!u->present && r->cost == COST_WORK &&
	         (r->ticket_held || r->output_text_bytes > 0)) {
		u->present = true;
		u->estimated = true;
		u->prompt = r->est_prompt;
		u->completion = usage_estimate_text(r->output_text_bytes);
		u->total = u->prompt + u->completion;
	}
	if (r->ticket_held) {
		if (r->cost == COST_WORK)
			quota_settle_usage(r->w->quota, &r->ticket, u);
		else if (r->cost == COST_REQUEST)
			quota_settle(r->w->quota, &r->ticket, 0, 0);
		else
			quota_release(r->w->quota, &r->ticket);
		r->ticket_held = false;
	}
	r->rec.usage = *u;
	r->rec.cost_micros = r->rec.priced ? quota_cost_micros(r->instance, u) : 0;
}

/* The policies' decisions: into the record (metrics, access log), and their alerts. */
static void record_policies(struct request *r)
{
	const struct policy_action *a;
	size_t n = policy_run_actions(r->policies, &a, NULL);
	bool alert = false;

	for (size_t i = 0; i < n; i++) {
		if (r->rec.n_policies < RECORD_MAX_POLICY_ACTIONS)
			r->rec.policies[r->rec.n_policies++] = (struct record_policy){
			        .policy = a[i].policy, .action = a[i].action, .count = a[i].count};
		alert |= a[i].alert != NULL && !a[i].alerted;
	}
	if (alert)
		policy_run_emit_alerts(
		        r->policies, json_pack("{s:s?,s:s?,s:I}", "instance", r->rec.instance,
		                               "model", r->rec.model_upstream, "completion_tokens",
		                               (json_int_t)r->rec.usage.completion));
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
	if (r->policies)
		record_policies(r);

	if (r->prompt_payload)
		r->rec.prompt_payload = r->prompt_payload;
	if (r->output_payload) {
		if (r->mode == REPLY_BUFFERED && (!r->pivot_answer || r->raw_ok) && r->buffered &&
		    evbuffer_get_length(r->output_payload) == 0)
			evbuffer_add(r->output_payload, evbuffer_pullup(r->buffered, -1),
			             evbuffer_get_length(r->buffered));
		evbuffer_add(r->output_payload, "", 1);
		r->rec.output_payload = (const char *)evbuffer_pullup(r->output_payload, -1);
	}
	r->rec.total_us = http_now_us() - r->start_us;
	r->rec.overhead_us =
	        r->rec.total_us > r->rec.upstream_us ? r->rec.total_us - r->rec.upstream_us : 0;
	metrics_record_request(w->metrics, &r->rec);
	accesslog_write(&r->rec);

	/* Policies first: a pending call of theirs may hold the transfer's engine. */
	policy_run_free(r->policies);
	attempt_reset(r);
	TAILQ_REMOVE(&w->requests, r, link);
	upstream_buf_put(w->upstream, r->buffered); /* drained, back to the worker's pool */
	if (r->events)
		evbuffer_free(r->events);
	if (r->own_balancer)
		balancer_free(r->own_balancer);
	if (r->excluded != r->excluded_small)
		free(r->excluded);
	free(r->prompt_payload);
	if (r->output_payload)
		evbuffer_free(r->output_payload);
	if (r->policed)
		evbuffer_free(r->policed);
	free(r->policy_body);
	json_decref(r->answer);
	json_decref(r->pivot);
	json_decref(r->body);
	free(r->model_alloc);
	free(r->denial);
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
