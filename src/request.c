/* request.c — one client request through the gateway, top to bottom.
 *
 *   request_handle          accept: snapshot, request id, built-in endpoints
 *   → read_body             content type, JSON, the fields we route on
 *   → route                 path, then the requested model
 *   → choose_target         the instance that serves this attempt
 *   → attempt_start         shape the body for the instance, send it upstream
 *   → on_upstream_head      status known: stream to the client, or buffer
 *   → on_upstream_body      forward SSE events (with back-pressure) or buffer
 *   → on_upstream_done      finish the reply, or turn the failure into an error
 *   → request_finish        release everything
 *
 * Nothing reaches the client before an upstream has answered with a status we
 * pass through: that is what lets a later attempt replace a failed one unseen.
 * After the first byte of a stream, a failure ends the stream with an SSE
 * "error" event, never with a silent truncation.
 */
#include "sluice/request.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>

#include "sluice/config.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/router.h"
#include "sluice/server.h"
#include "sluice/sse.h"
#include "sluice/upstream.h"

/* Above this many bytes queued for a slow client, the upstream transfer is
 * paused until the client has taken them all (back-pressure). */
#define STREAM_HIGH_WATER (64 * 1024)
/* A non-stream upstream answer is held whole before it is sent; this caps it. */
#define MAX_RESPONSE_BODY (64u * 1024 * 1024)
/* One SSE event larger than this is a broken stream. */
#define MAX_SSE_EVENT (4u * 1024 * 1024)

enum reply_mode {
	REPLY_NONE,     /* nothing sent to the client yet */
	REPLY_BUFFERED, /* collecting a whole upstream answer */
	REPLY_STREAM,   /* forwarding SSE events as they come */
};

struct request {
	struct worker *w;
	struct config *config;      /* the snapshot this request runs on: one reference */
	struct http_request *http;  /* NULL once the client side is finished */
	TAILQ_ENTRY(request) link;
	char id[128];

	/* what the client asked */
	json_t *body;               /* the parsed client body (never modified) */
	const char *model;          /* requested model, inside body; NULL if absent */
	bool stream;

	/* where it goes */
	const struct config_route *route;
	const struct config_instance *instance;
	int attempts;

	/* the current attempt */
	char *upstream_body;        /* shaped body, or NULL when the client's bytes go as they are */
	struct upstream_xfer xfer;
	enum reply_mode mode;
	struct evbuffer *buffered;  /* REPLY_BUFFERED */
	struct sse_parser sse;      /* REPLY_STREAM */
	bool sse_ready;
	bool client_paused;         /* the transfer waits for the client to drain */
	bool aborted_by_client;
	uint64_t start_us;
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

static void handle_models(struct request *r)
{
	json_t *list = router_models_json(r->config);
	char *text = json_dumps(list, JSON_COMPACT);
	json_decref(list);
	if (text == NULL) {
		reply_error(r, 500, "server_error", "internal_error", "cannot list models");
		return;
	}
	http_reply(r->http, 200, "application/json", text, strlen(text));
	r->http = NULL;
	free(text);
	request_finish(r);
}

static void on_client_abort(void *arg);
static bool read_body(struct request *r);
static bool route(struct request *r);
static bool choose_target(struct request *r);
static bool attempt_start(struct request *r);

void request_handle(struct http_request *hr, void *arg)
{
	struct worker *w = arg;
	struct request *r = calloc(1, sizeof(*r));

	if (r == NULL) {
		http_reply_error(hr, 503, "server_error", "out_of_memory", "out of memory");
		return;
	}
	r->w = w;
	r->http = hr;
	r->config = config_ref(w->config);
	r->start_us = hr->start_us ? hr->start_us : http_now_us();
	w->n_requests++;
	TAILQ_INSERT_TAIL(&w->requests, r, link);
	assign_request_id(r);
	http_response_header(hr, "x-request-id", r->id);
	http_request_on_abort(hr, on_client_abort, r);

	if (strcmp(hr->path, "/v1/models") == 0 || strcmp(hr->path, "/models") == 0) {
		if (strcmp(hr->method, "GET") == 0 || strcmp(hr->method, "HEAD") == 0) {
			handle_models(r);
			return;
		}
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
	if (!read_body(r) || !route(r) || !choose_target(r))
		return;
	attempt_start(r);
}

/* ---------------------------------------------------------------- read and route */

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
	json_t *stream = json_object_get(r->body, "stream");
	if (stream != NULL && !json_is_boolean(stream) && !json_is_null(stream)) {
		reply_error(r, 400, "invalid_request_error", "invalid_stream",
		            "\"stream\" must be true or false");
		return false;
	}
	r->stream = json_is_true(stream);
	return true;
}

static bool route(struct request *r)
{
	switch (router_match(r->config, r->http->path, r->model, &r->route)) {
	case ROUTER_OK:
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

/* Until the balancer lands, a route is served by its highest-priority target
 * that is not drained (weight 0); targets are sorted by priority. */
static bool choose_target(struct request *r)
{
	for (size_t i = 0; i < r->route->n_targets; i++) {
		if (r->route->targets[i].weight > 0) {
			r->instance = r->route->targets[i].instance;
			return true;
		}
	}
	reply_error(r, 503, "service_unavailable", "no_available_instance",
	            "route '%s' has no instance available", r->route->name);
	return false;
}

/* ---------------------------------------------------------------- upstream attempt */

/*
 * The body an instance receives: the client's, with the instance's model and
 * options applied (the instance wins). Each attempt starts from the client's
 * original body, so one instance's options never leak into the next. When
 * nothing changes, the client's bytes go as they are (no re-serialisation).
 */
static bool shape_body(struct request *r)
{
	const struct config_instance *in = r->instance;
	bool drop_model = in->provider == PROVIDER_AZURE_OPENAI;
	bool same_model = in->model == NULL || (r->model && strcmp(in->model, r->model) == 0);

	free(r->upstream_body);
	r->upstream_body = NULL;
	if (same_model && !drop_model && (in->options == NULL || json_object_size(in->options) == 0))
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
	r->upstream_body = json_dumps(b, JSON_COMPACT);
	json_decref(b);
	return r->upstream_body != NULL;
}

static bool attempt_start(struct request *r)
{
	const struct config_instance *in = r->instance;
	char line[8192];

	r->attempts++;
	if (!shape_body(r)) {
		reply_error(r, 500, "server_error", "internal_error", "cannot build the upstream body");
		return false;
	}
	upstream_xfer_init(&r->xfer, r->w->upstream, &upstream_ops, r);
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
	log_debug("[%s] %s %s → instance %s (attempt %d)", r->id, r->route->name,
	          r->model ? r->model : "-", in->name, r->attempts);
	if (!upstream_xfer_start(&r->xfer, NULL, in->url, body, len, &to, in->tls_verify,
	                         (long)(in->keepalive.idle / 1000))) {
		upstream_xfer_cleanup(&r->xfer);
		reply_error(r, 500, "server_error", "internal_error", "cannot start the upstream transfer");
		return false;
	}
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
			http_response_header(hr, p, colon + 2 <= eol ? colon + 2 : eol);
			p = eol + 2;
		}
	}
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
		add_response_headers(r);
		http_response_header(r->http, "Cache-Control", "no-cache");
		http_reply_start(r->http, (int)status, r->xfer.content_type);
		return true;
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

static bool forward_event(void *arg, const struct sse_event *ev)
{
	struct request *r = arg;
	http_reply_chunk(r->http, ev->raw, ev->raw_len);
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
		/* Whole events only, so an error event can always follow cleanly. */
		if (!sse_feed(&r->sse, data, len, forward_event, r))
			return 0;
		return len;
	}
	if (evbuffer_get_length(r->buffered) + len > MAX_RESPONSE_BODY)
		return 0;
	evbuffer_add(r->buffered, data, len);
	return len;
}

static int status_for_failure(enum upstream_result res)
{
	return res == UPSTREAM_TIMEOUT ? 504 : 502;
}

static void stream_error_event(struct request *r, const char *code, const char *msg)
{
	struct evbuffer *b = evbuffer_new();
	evbuffer_add_printf(b, "event: error\ndata: {\"error\":{\"message\":\"");
	http_json_escape(b, msg, strlen(msg));
	evbuffer_add_printf(b, "\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"%s\"}}\n\n",
	                    code);
	size_t n = evbuffer_get_length(b);
	http_reply_chunk(r->http, evbuffer_pullup(b, (ev_ssize_t)n), n);
	evbuffer_free(b);
}

static void on_upstream_done(void *arg, enum upstream_result res, const char *detail)
{
	struct request *r = arg;
	const struct config_instance *in = r->instance;

	if (r->http == NULL) { /* the client left; nothing to tell */
		request_finish(r);
		return;
	}
	if (r->mode == REPLY_STREAM) {
		if (res == UPSTREAM_OK && sse_pending(&r->sse) == 0) {
			http_reply_end(r->http);
		} else {
			const char *why = res == UPSTREAM_OK ? "the stream ended inside an event" : detail;
			log_warn("[%s] instance %s: stream failed after the first byte: %s", r->id,
			         in->name, why);
			stream_error_event(r, res == UPSTREAM_TIMEOUT ? "upstream_timeout"
			                                              : "upstream_stream_error",
			                   why);
			http_reply_end(r->http);
		}
		r->http = NULL;
		request_finish(r);
		return;
	}
	if (res == UPSTREAM_OK) {
		size_t n = evbuffer_get_length(r->buffered);
		add_response_headers(r);
		http_reply(r->http, (int)r->xfer.status,
		           r->xfer.content_type[0] ? r->xfer.content_type : "application/json",
		           (const char *)evbuffer_pullup(r->buffered, (ev_ssize_t)n), n);
		r->http = NULL;
		request_finish(r);
		return;
	}
	int status = status_for_failure(res);
	log_warn("[%s] instance %s: %s: %s", r->id, in->name, upstream_result_name(res), detail);
	if (res == UPSTREAM_TIMEOUT)
		reply_error(r, status, "timeout_error", "upstream_timeout",
		            "instance '%s' timed out: %s", in->name, detail);
	else if (res == UPSTREAM_CONNECT_ERROR)
		reply_error(r, status, "upstream_error", "upstream_connect_error",
		            "cannot connect to instance '%s': %s", in->name, detail);
	else
		reply_error(r, status, "upstream_error", "upstream_error",
		            "instance '%s' failed: %s", in->name, detail);
}

/* ---------------------------------------------------------------- the end */

static void on_client_abort(void *arg)
{
	struct request *r = arg;

	log_debug("[%s] client went away; cancelling the upstream transfer", r->id);
	r->aborted_by_client = true;
	upstream_xfer_cancel(&r->xfer);
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
	http_reply_error(r->http, status, type, code, "%s", msg);
	r->http = NULL;
	request_finish(r);
}

/*
 * Every path ends here exactly once, as the last thing its caller does: the
 * client side is finished (or gone), the transfer is over or cancelled.
 */
static void request_finish(struct request *r)
{
	if (r->http != NULL) {
		http_request_abandon(r->http);
		r->http = NULL;
	}
	upstream_xfer_cleanup(&r->xfer);
	TAILQ_REMOVE(&r->w->requests, r, link);
	if (r->sse_ready)
		sse_parser_free(&r->sse);
	if (r->buffered)
		evbuffer_free(r->buffered);
	free(r->upstream_body);
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
