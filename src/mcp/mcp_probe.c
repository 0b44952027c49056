/* mcp_probe.c — active health checks of MCP servers by MCP ping, on the main thread.
 *
 * A stateful server answers 400 to a ping outside a session, so a probe keeps a session of
 * its own: initialize, notifications/initialized, then one ping per interval on it. When
 * the server forgets the session (404: it restarted) the probe initialises again in the
 * same round; only a ping answered with a result counts as a success. The results feed the
 * server's health state (health_active_report), so transitions, alerts and metrics are the
 * same as for instances. The checks' settings are copied: a snapshot may go while a probe
 * runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/mcp_parts.h"
#include "sluice/sse.h"
#include "sluice/upstream.h"

#define PROBE_BODY_MAX (64 * 1024)

static const char init_body[] =
        "{\"jsonrpc\":\"2.0\",\"id\":\"sluice-probe-init\",\"method\":\"initialize\",\"params\":{"
        "\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":"
        "\"sluice-probe\",\"version\":\"" SLUICE_VERSION "\"}}}";
static const char initialized_body[] =
        "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}";
static const char ping_body[] = "{\"jsonrpc\":\"2.0\",\"id\":\"sluice-probe\",\"method\":\"ping\"}";

enum step { STEP_IDLE, STEP_INIT, STEP_INITIALIZED, STEP_PING };

struct mprobe {
	struct mprobe *next;
	char *name, *endpoint;
	char **headers; /* "Name: value" */
	size_t n_headers;
	bool tls_verify;
	struct config_active_check check; /* thresholds (no owned strings used) */
	uint64_t interval, timeout;
	struct instance_state *st;
	bool stale;
	enum step step;
	bool retried; /* this round re-initialised after a 404 already */
	char sid[MCP_MAX_UPSTREAM_SID + 1];
	char version[16];
	struct upstream_xfer x;
	struct evbuffer *body;
	struct event *timer;
};

static struct event_base *probe_base;
static struct upstream *probe_up;
static struct mprobe *probes;

static void round_start(struct mprobe *p);

static void schedule(struct mprobe *p, uint64_t ms)
{
	struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
	evtimer_add(p->timer, &tv);
}

static void verdict(struct mprobe *p, enum health_probe_result r, long status, const char *why)
{
	upstream_xfer_cleanup(&p->x);
	p->step = STEP_IDLE;
	health_active_report(p->st, &p->check, r, status, why);
	schedule(p, p->interval);
}

static bool on_head(void *arg, long status)
{
	return true;
}

static size_t on_body(void *arg, const char *data, size_t len)
{
	struct mprobe *p = arg;
	if (evbuffer_get_length(p->body) + len > PROBE_BODY_MAX)
		return 0;
	evbuffer_add(p->body, data, len);
	return len;
}

struct found {
	bool result;
};

static bool on_event(void *arg, const struct sse_event *ev)
{
	struct mcp_scan sc;
	if (ev->has_data && mcp_scan_object(ev->data, ev->data_len, &sc) && sc.result.len &&
	    sc.id.len)
		((struct found *)arg)->result = true;
	return true;
}

/* Does the answer hold a JSON-RPC result (JSON body, or one SSE event)? */
static bool has_result(struct mprobe *p)
{
	size_t n = evbuffer_get_length(p->body);
	const char *b = n ? (const char *)evbuffer_pullup(p->body, (ev_ssize_t)n) : "";
	struct found f = {false};
	if (strncasecmp(p->x.content_type, "text/event-stream", 17) == 0) {
		struct sse_parser sp;
		sse_parser_init(&sp, PROBE_BODY_MAX);
		sse_feed(&sp, b, n, on_event, &f);
		sse_feed(&sp, "\n\n", 2, on_event, &f); /* a last event without its blank line */
		sse_parser_free(&sp);
		return f.result;
	}
	struct mcp_scan sc;
	return mcp_scan_object(b, n, &sc) && sc.result.len > 0;
}

static void send_step(struct mprobe *p, enum step s);
static void take_sid(struct mprobe *p, const struct evbuffer *headers);

static void on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct mprobe *p = arg;
	long status = p->x.status;
	char why[200];

	if (res != UPSTREAM_OK) {
		snprintf(why, sizeof(why), "MCP %s: %s: %s",
		         p->step == STEP_PING ? "ping" : "initialize", upstream_result_name(res),
		         detail ? detail : "");
		p->sid[0] = '\0';
		verdict(p, res == UPSTREAM_TIMEOUT ? HEALTH_PROBE_TIMEOUT : HEALTH_PROBE_TCP_FAIL,
		        0, why);
		return;
	}
	switch (p->step) {
	case STEP_INIT: {
		if (status != 200 || !has_result(p)) {
			snprintf(why, sizeof(why),
			         "MCP initialize answered HTTP %ld without a result", status);
			verdict(p, HEALTH_PROBE_HTTP_FAIL, status, why);
			return;
		}
		take_sid(p, p->x.headers);
		send_step(p, STEP_INITIALIZED);
		return;
	}
	case STEP_INITIALIZED:
		send_step(p, STEP_PING);
		return;
	case STEP_PING:
		if (status == 404 && p->sid[0] && !p->retried) {
			/* The server forgot our session (restarted): a new one, this round. */
			p->retried = true;
			p->sid[0] = '\0';
			send_step(p, STEP_INIT);
			return;
		}
		if (status == 200 && has_result(p)) {
			verdict(p, HEALTH_PROBE_OK, status, "MCP ping answered");
			return;
		}
		snprintf(why, sizeof(why), "MCP ping answered HTTP %ld without a result", status);
		verdict(p, HEALTH_PROBE_HTTP_FAIL, status, why);
		return;
	default:
		return;
	}
}

static const struct upstream_ops probe_ops = {
        .on_head = on_head,
        .on_body = on_body,
        .on_done = on_done,
};

/* The session id the server gave at initialize, read from the response head. */
static void take_sid(struct mprobe *p, const struct evbuffer *headers)
{
	size_t n = evbuffer_get_length(headers);
	const char *h =
	        n ? (const char *)evbuffer_pullup((struct evbuffer *)headers, (ev_ssize_t)n) : "";
	for (const char *q = h, *end = h + n; q < end;) {
		const char *eol = memchr(q, '\r', (size_t)(end - q));
		if (eol == NULL)
			return;
		size_t l = (size_t)(eol - q);
		if (l > 16 && l - 16 <= MCP_MAX_UPSTREAM_SID &&
		    strncasecmp(q, "mcp-session-id: ", 16) == 0) {
			memcpy(p->sid, q + 16, l - 16);
			p->sid[l - 16] = '\0';
			if (!mcp_header_token(p->sid, MCP_MAX_UPSTREAM_SID))
				p->sid[0] = '\0';
			return;
		}
		q = eol + 2;
	}
}

static void send_step(struct mprobe *p, enum step s)
{
	char line[512];
	const char *body = s == STEP_INIT          ? init_body
	                   : s == STEP_INITIALIZED ? initialized_body
	                                           : ping_body;
	upstream_xfer_cleanup(&p->x);
	upstream_xfer_init(&p->x, probe_up, &probe_ops, p);
	evbuffer_drain(p->body, evbuffer_get_length(p->body));
	p->step = s;
	for (size_t i = 0; i < p->n_headers; i++)
		upstream_xfer_header(&p->x, p->headers[i]);
	upstream_xfer_header(&p->x, "Accept: application/json, text/event-stream");
	if (s != STEP_INIT && p->sid[0]) {
		snprintf(line, sizeof(line), "Mcp-Session-Id: %s", p->sid);
		upstream_xfer_header(&p->x, line);
	}
	if (s != STEP_INIT)
		upstream_xfer_header(&p->x, "MCP-Protocol-Version: 2025-06-18");
	struct upstream_timeouts to = {p->timeout, p->timeout, p->timeout, p->timeout};
	/* A short keep-alive: a probe should notice a dead listener behind a live socket. */
	if (!upstream_xfer_start(&p->x, "POST", p->endpoint, body, strlen(body), &to, p->tls_verify,
	                         1))
		verdict(p, HEALTH_PROBE_TCP_FAIL, 0, "could not start the MCP probe");
}

static void round_start(struct mprobe *p)
{
	p->retried = false;
	send_step(p, p->sid[0] ? STEP_PING : STEP_INIT);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	round_start(arg);
}

static void probe_free(struct mprobe *p)
{
	upstream_xfer_cleanup(&p->x);
	if (p->timer)
		event_free(p->timer);
	if (p->body)
		evbuffer_free(p->body);
	for (size_t i = 0; i < p->n_headers; i++)
		free(p->headers[i]);
	free(p->headers);
	free(p->name);
	free(p->endpoint);
	free(p);
}

void mcp_probes_start(struct event_base *base)
{
	probe_base = base;
	probe_up = upstream_new(base);
	if (probe_up == NULL)
		log_error("mcp: cannot create the probes' transfer engine; no MCP health checks");
}

static bool same(const struct mprobe *p, const struct mcp_server_conf *s)
{
	if (strcmp(p->name, s->name) != 0 || strcmp(p->endpoint, s->endpoint) != 0 ||
	    p->interval != s->check.interval || p->timeout != s->check.timeout ||
	    p->check.healthy.successes != s->check.successes ||
	    p->check.unhealthy.http_failures != s->check.failures ||
	    p->tls_verify != s->tls_verify || p->n_headers != s->n_auth_headers)
		return false;
	for (size_t i = 0; i < s->n_auth_headers; i++) {
		char line[8192];
		snprintf(line, sizeof(line), "%s: %s", s->auth_headers[i].name,
		         s->auth_headers[i].value);
		if (strcmp(line, p->headers[i]) != 0)
			return false;
	}
	return true;
}

void mcp_probes_sync(const struct config *c)
{
	if (probe_up == NULL)
		return;
	for (struct mprobe *p = probes; p != NULL; p = p->next)
		p->stale = true;
	for (size_t i = 0; c->mcp != NULL && i < c->mcp->n_servers; i++) {
		const struct mcp_server_conf *s = &c->mcp->servers[i];
		if (!s->check.enabled || s->endpoint == NULL)
			continue;
		struct mprobe *p;
		for (p = probes; p != NULL && !(same(p, s) && p->stale); p = p->next)
			;
		if (p != NULL) {
			p->stale = false; /* unchanged: keeps its schedule and session */
			continue;
		}
		p = calloc(1, sizeof(*p));
		if (p == NULL)
			continue;
		p->name = strdup(s->name);
		p->endpoint = strdup(s->endpoint);
		p->headers = calloc(s->n_auth_headers ? s->n_auth_headers : 1, sizeof(char *));
		p->timer = evtimer_new(probe_base, timer_cb, p);
		p->body = evbuffer_new();
		if (p->name == NULL || p->endpoint == NULL || p->headers == NULL ||
		    p->timer == NULL || p->body == NULL) {
			probe_free(p);
			continue;
		}
		for (size_t k = 0; k < s->n_auth_headers; k++) {
			char line[8192];
			snprintf(line, sizeof(line), "%s: %s", s->auth_headers[k].name,
			         s->auth_headers[k].value);
			if ((p->headers[k] = strdup(line)) != NULL)
				p->n_headers++;
		}
		p->tls_verify = s->tls_verify;
		p->interval = s->check.interval;
		p->timeout = s->check.timeout;
		p->check.healthy.successes = s->check.successes;
		p->check.unhealthy.http_failures = s->check.failures;
		p->check.unhealthy.tcp_failures = s->check.failures;
		p->check.unhealthy.timeouts = s->check.failures;
		p->st = s->as_instance.state;
		upstream_xfer_init(&p->x, probe_up, &probe_ops, p);
		p->next = probes;
		probes = p;
		log_info("mcp server %s: active checks (MCP ping) started: %s every %llu ms",
		         p->name, p->endpoint, (unsigned long long)p->interval);
		/* At once, not an interval later: the first verdict comes with the start. */
		schedule(p, 0);
	}
	for (struct mprobe **pp = &probes; *pp != NULL;) {
		struct mprobe *p = *pp;
		if (!p->stale) {
			pp = &p->next;
			continue;
		}
		*pp = p->next;
		log_info("mcp server %s: active checks stopped", p->name);
		probe_free(p);
	}
}

void mcp_probes_stop(void)
{
	while (probes != NULL) {
		struct mprobe *p = probes;
		probes = p->next;
		probe_free(p);
	}
	upstream_free(probe_up);
	probe_up = NULL;
}
