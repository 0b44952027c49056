/* upstream.c — libcurl multi driven by a worker's event_base: sockets, timers, pooled handles.
 *
 * Rules this file keeps so its users don't have to think about libcurl:
 * - owners are never called back from inside curl_multi_* with a handle they
 *   could remove: on_done runs after curl_multi_remove_handle, from the loop;
 * - on_head/on_body run inside libcurl's callbacks and may only return a verdict;
 * - first_byte and idle timeouts are ours (libcurl has only connect and total):
 *   one timer per transfer, re-armed lazily from a "last activity" stamp so a
 *   stream of small chunks costs no timer syscalls per chunk.
 */
#include "sluice/upstream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "sluice/http.h"
#include "sluice/log.h"

#define EASY_POOL_MAX 256

struct upstream {
	struct event_base *base;
	CURLM *multi;
	struct event *timer;    /* libcurl's own timeout */
	struct event *check_ev; /* deferred completion check */
	CURL *pool[EASY_POOL_MAX];
	size_t n_pool;
	int running;
};

struct upstream_url {
	CURLU *h;         /* owned */
	unsigned holders; /* running transfers started with it */
	bool released;    /* the owner let go: free with the last holder */
};

struct upstream_sock {
	struct upstream *up;
	struct event *ev;
	curl_socket_t fd;
};

static void check_done(struct upstream *up);
static void xfer_arm_timer_us(struct upstream_xfer *x, uint64_t us);

/* ---------------------------------------------------------------- multi <-> loop */

static void sock_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream *up = arg;
	int action = ((kind & EV_READ) ? CURL_CSELECT_IN : 0) | ((kind & EV_WRITE) ? CURL_CSELECT_OUT : 0);
	curl_multi_socket_action(up->multi, fd, action, &up->running);
	check_done(up);
}

static int sock_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct upstream *up = userp;
	struct upstream_sock *sk = socketp;

	if (what == CURL_POLL_REMOVE) {
		if (sk) {
			event_free(sk->ev);
			free(sk);
			curl_multi_assign(up->multi, fd, NULL);
		}
		return 0;
	}
	short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) |
	             ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
	if (sk == NULL) {
		sk = calloc(1, sizeof(*sk));
		if (sk == NULL)
			return -1;
		sk->up = up;
		sk->fd = fd;
		curl_multi_assign(up->multi, fd, sk);
	} else {
		event_free(sk->ev);
	}
	sk->ev = event_new(up->base, fd, kind, sock_event_cb, up);
	event_add(sk->ev, NULL);
	return 0;
}

static void multi_timer_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream *up = arg;
	curl_multi_socket_action(up->multi, CURL_SOCKET_TIMEOUT, 0, &up->running);
	check_done(up);
}

static int multi_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	struct upstream *up = userp;
	if (timeout_ms < 0) {
		event_del(up->timer);
	} else {
		struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
		event_add(up->timer, &tv);
	}
	return 0;
}

static void check_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	check_done(arg);
}

struct upstream *upstream_new(struct event_base *base)
{
	struct upstream *up = calloc(1, sizeof(*up));
	if (up == NULL)
		return NULL;
	up->base = base;
	up->multi = curl_multi_init();
	up->timer = evtimer_new(base, multi_timer_event_cb, up);
	up->check_ev = event_new(base, -1, 0, check_event_cb, up);
	if (up->multi == NULL || up->timer == NULL || up->check_ev == NULL) {
		upstream_free(up);
		return NULL;
	}
	curl_multi_setopt(up->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
	curl_multi_setopt(up->multi, CURLMOPT_SOCKETDATA, up);
	curl_multi_setopt(up->multi, CURLMOPT_TIMERFUNCTION, multi_timer_cb);
	curl_multi_setopt(up->multi, CURLMOPT_TIMERDATA, up);
	/* HTTP/2 multiplexing where the upstream offers it over TLS. */
	curl_multi_setopt(up->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
	upstream_set_maxconnects(up, 64);
	return up;
}

void upstream_set_maxconnects(struct upstream *up, long n)
{
	/* At curl's default, a busy worker re-opened thousands of upstream
	 * connections per second (design.md §11): size the cache to the pools. */
	curl_multi_setopt(up->multi, CURLMOPT_MAXCONNECTS, n < 16 ? 16L : n);
}

void upstream_free(struct upstream *up)
{
	if (up == NULL)
		return;
	for (size_t i = 0; i < up->n_pool; i++)
		curl_easy_cleanup(up->pool[i]);
	if (up->multi)
		curl_multi_cleanup(up->multi);
	if (up->timer)
		event_free(up->timer);
	if (up->check_ev)
		event_free(up->check_ev);
	free(up);
}

/* ---------------------------------------------------------------- pre-parsed URLs */

struct upstream_url *upstream_url_new(const char *url)
{
	struct upstream_url *u = calloc(1, sizeof(*u));
	if (u == NULL)
		return NULL;
	u->h = curl_url();
	if (u->h == NULL || curl_url_set(u->h, CURLUPART_URL, url, 0) != CURLUE_OK) {
		curl_url_cleanup(u->h);
		free(u);
		return NULL;
	}
	return u;
}

static void url_free(struct upstream_url *u)
{
	curl_url_cleanup(u->h);
	free(u);
}

static void url_drop(struct upstream_url *u)
{
	if (--u->holders == 0 && u->released)
		url_free(u);
}

void upstream_url_release(struct upstream_url *u)
{
	if (u == NULL)
		return;
	u->released = true;
	if (u->holders == 0)
		url_free(u);
}

/* ---------------------------------------------------------------- transfer callbacks */

static bool header_passed_through(const char *name, size_t len)
{
	static const char *const hop[] = {
		"connection", "keep-alive", "transfer-encoding", "content-length", "date",
		"server", "proxy-connection", "upgrade", "te", "trailer", "content-type",
		"x-request-id", "set-cookie", "alt-svc", "strict-transport-security",
		"content-encoding", "x-sluice-instance",
	};
	for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
		if (strlen(hop[i]) == len && strncasecmp(hop[i], name, len) == 0)
			return false;
	return true;
}

/* RFC 9110 §5.6.2 tchar. */
static bool is_tchar(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c != '\0' && memchr("!#$%&'*+-.^_`|~", c, 15) != NULL;
}

/*
 * One response header line as libcurl hands it over: "Name: value" and its line
 * end. The line is split into name and value only when every byte is lawful: the
 * name a token, the value free of control bytes but HTAB — CR, LF and NUL above
 * all. Everything downstream (the client's response head, Content-Type) may then
 * treat the pair as text. A line that fails is dropped, not the transfer: libcurl
 * has already framed the response itself, and a header the gateway does not pass
 * on cannot split the head it writes; failing the answer would turn one odd
 * header into an outage.
 */
static bool header_split(const char *line, size_t len, const char **name, size_t *name_len,
                         const char **val, size_t *val_len)
{
	const char *end = line + len, *colon = NULL;

	if (end > line && end[-1] == '\n')
		end--;
	if (end > line && end[-1] == '\r')
		end--;
	for (const char *p = line; p < end; p++) {
		if (*p == ':') {
			colon = p;
			break;
		}
		if (!is_tchar((unsigned char)*p))
			return false;
	}
	if (colon == NULL || colon == line)
		return false;
	for (const char *p = colon + 1; p < end; p++) {
		unsigned char c = (unsigned char)*p;
		if ((c < 0x20 && c != '\t') || c == 0x7f)
			return false;
	}
	const char *v = colon + 1;
	while (v < end && (*v == ' ' || *v == '\t'))
		v++;
	while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	*name = line;
	*name_len = (size_t)(colon - line);
	*val = v;
	*val_len = (size_t)(end - v);
	return true;
}

static size_t header_cb(char *line, size_t size, size_t nmemb, void *arg)
{
	struct upstream_xfer *x = arg;
	size_t len = size * nmemb;

	x->last_activity_us = http_now_us();
	if (len >= 5 && memcmp(line, "HTTP/", 5) == 0) {
		/* A new response head (after a 1xx, or a redirect): start over. */
		evbuffer_drain(x->headers, evbuffer_get_length(x->headers));
		x->content_type[0] = '\0';
		return len;
	}
	if (len <= 2 && (len == 0 || line[0] == '\r' || line[0] == '\n')) {
		long status = 0;
		curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
		if (status >= 100 && status < 200)
			return len; /* interim response */
		x->status = status;
		x->head_done = true;
		x->head_us = x->last_activity_us;
		xfer_arm_timer_us(x, x->to.idle * 1000); /* from here on, gaps are "idle" */
		if (!x->ops->on_head(x->arg, status))
			return 0;
		return len;
	}
	const char *name, *v;
	size_t nlen, vlen;
	if (!header_split(line, len, &name, &nlen, &v, &vlen)) {
		log_debug("upstream: response header line of %zu bytes dropped: not a token name, "
		          "or control bytes in its value",
		          len);
		return len;
	}
	if (nlen == 12 && strncasecmp(name, "content-type", 12) == 0) {
		size_t vl = vlen < sizeof(x->content_type) - 1 ? vlen : sizeof(x->content_type) - 1;
		memcpy(x->content_type, v, vl);
		x->content_type[vl] = '\0';
	} else if (header_passed_through(name, nlen)) {
		evbuffer_add(x->headers, name, nlen);
		evbuffer_add(x->headers, ": ", 2);
		evbuffer_add(x->headers, v, vlen);
		evbuffer_add(x->headers, "\r\n", 2);
	}
	return len;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	struct upstream_xfer *x = arg;
	size_t len = size * nmemb;

	x->last_activity_us = http_now_us();
	if (!x->body_started) {
		x->body_started = true;
		x->first_body_us = x->last_activity_us;
	}
	size_t r = x->ops->on_body(x->arg, data, len);
	if (r == UPSTREAM_PAUSE)
		x->paused = true;
	return r;
}

static void xfer_arm_timer_us(struct upstream_xfer *x, uint64_t us)
{
	struct timeval tv = {(time_t)(us / 1000000), (suseconds_t)(us % 1000000)};
	event_add(x->timer, &tv);
}

/* Our first_byte / idle timer. It is armed for the full period and, when it
 * fires early relative to the latest activity, re-armed for what is left. */
static void xfer_timer_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream_xfer *x = arg;
	uint64_t now = http_now_us(), since, limit_us;
	const char *what;

	if (!x->running)
		return;
	if (!x->head_done) {
		limit_us = x->to.first_byte * 1000;
		since = x->start_us;
		what = "no response within first_byte timeout";
	} else {
		limit_us = x->to.idle * 1000;
		since = x->last_activity_us;
		what = "no data within idle timeout";
		/* A transfer paused for back-pressure waits on our client, not on
		 * the upstream: the client's write timeout covers that. */
		if (x->paused) {
			xfer_arm_timer_us(x, limit_us);
			return;
		}
	}
	if (now - since < limit_us) {
		xfer_arm_timer_us(x, limit_us - (now - since));
		return;
	}
	upstream_xfer_cancel(x);
	x->ops->on_done(x->arg, UPSTREAM_TIMEOUT, what);
}

/* ---------------------------------------------------------------- transfers */

void upstream_xfer_init(struct upstream_xfer *x, struct upstream *up, const struct upstream_ops *ops,
                        void *arg)
{
	memset(x, 0, sizeof(*x));
	x->up = up;
	x->ops = ops;
	x->arg = arg;
}

bool upstream_xfer_header(struct upstream_xfer *x, const char *line)
{
	struct curl_slist *n = curl_slist_append(x->req_headers, line);
	if (n == NULL)
		return false;
	x->req_headers = n;
	return true;
}

bool upstream_xfer_start(struct upstream_xfer *x, const char *method, const char *url,
                         const char *body, size_t len, const struct upstream_timeouts *to,
                         bool tls_verify, long keepalive_idle_s)
{
	struct upstream *up = x->up;

	if (x->headers == NULL)
		x->headers = evbuffer_new();
	if (x->timer == NULL)
		x->timer = evtimer_new(up->base, xfer_timer_cb, x);
	if (x->headers == NULL || x->timer == NULL)
		return false;
	/* Reused handles keep their options; every option we rely on is set below. */
	x->easy = up->n_pool ? up->pool[--up->n_pool] : curl_easy_init();
	if (x->easy == NULL)
		return false;
	x->status = 0;
	x->head_done = x->body_started = x->paused = false;
	x->content_type[0] = '\0';
	x->errbuf[0] = '\0';
	x->to = *to;

	/* libcurl sends "Expect: 100-continue" for large bodies and would wait a
	 * second for it; an empty Expect: turns that off. */
	upstream_xfer_header(x, "Expect:");
	bool has_ct = false;
	for (struct curl_slist *h = x->req_headers; h && !has_ct; h = h->next)
		has_ct = strncasecmp(h->data, "content-type:", 13) == 0;
	if (body != NULL && !has_ct)
		upstream_xfer_header(x, "Content-Type: application/json");

	CURL *e = x->easy;
	/* A CURLU wins over CURLOPT_URL: set both, so a reused handle takes the right one. */
	curl_easy_setopt(e, CURLOPT_CURLU, x->url ? x->url->h : NULL);
	if (x->url == NULL)
		curl_easy_setopt(e, CURLOPT_URL, url);
	/* NOBODY first: clearing it turns a handle back into GET. */
	curl_easy_setopt(e, CURLOPT_NOBODY, method && strcmp(method, "HEAD") == 0 ? 1L : 0L);
	if (method == NULL || strcmp(method, "POST") == 0 || body != NULL) {
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, body ? body : "");
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(body ? len : 0));
	} else {
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	}
	/* A reused handle keeps its last custom method: always set it. */
	bool plain = method == NULL || strcmp(method, "POST") == 0 ||
	             (strcmp(method, "GET") == 0 && body == NULL);
	curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, plain ? NULL : method);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->req_headers);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "sluice/" SLUICE_VERSION);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_PRIVATE, x);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)to->connect);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)to->total);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, tls_verify ? 1L : 0L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, tls_verify ? 2L : 0L);
	curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, keepalive_idle_s > 0 ? keepalive_idle_s : 1L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);

	x->start_us = x->last_activity_us = http_now_us();
	x->head_us = x->first_body_us = 0;
	if (curl_multi_add_handle(up->multi, e) != CURLM_OK) {
		curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
		curl_easy_setopt(e, CURLOPT_CURLU, NULL);
		up->pool[up->n_pool++] = e; /* came from the pool or fits back */
		x->easy = NULL;
		x->url = NULL;
		return false;
	}
	x->running = true;
	if (x->url)
		x->url->holders++;
	xfer_arm_timer_us(x, to->first_byte * 1000);
	/* Start connecting now rather than on the next loop turn; completions
	 * found here are delivered from the loop (check_ev), never from inside
	 * this call. */
	curl_multi_socket_action(up->multi, CURL_SOCKET_TIMEOUT, 0, &up->running);
	event_active(up->check_ev, 0, 0);
	return true;
}

void upstream_xfer_curlu(struct upstream_xfer *x, struct upstream_url *u)
{
	x->url = u;
}

void upstream_xfer_resume(struct upstream_xfer *x)
{
	if (x->running && x->paused) {
		x->paused = false;
		x->last_activity_us = http_now_us();
		curl_easy_pause(x->easy, CURLPAUSE_CONT);
		event_active(x->up->check_ev, 0, 0);
	}
}

static void xfer_release_handle(struct upstream_xfer *x)
{
	struct upstream *up = x->up;

	curl_multi_remove_handle(up->multi, x->easy);
	curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, NULL);
	curl_easy_setopt(x->easy, CURLOPT_CURLU, NULL);
	if (x->url) {
		url_drop(x->url);
		x->url = NULL;
	}
	if (up->n_pool < EASY_POOL_MAX)
		up->pool[up->n_pool++] = x->easy;
	else
		curl_easy_cleanup(x->easy);
	x->easy = NULL;
	x->running = false;
	event_del(x->timer);
	curl_slist_free_all(x->req_headers);
	x->req_headers = NULL;
}

void upstream_xfer_cancel(struct upstream_xfer *x)
{
	if (x->running)
		xfer_release_handle(x);
}

void upstream_xfer_cleanup(struct upstream_xfer *x)
{
	upstream_xfer_cancel(x);
	curl_slist_free_all(x->req_headers);
	x->req_headers = NULL;
	if (x->headers) {
		evbuffer_free(x->headers);
		x->headers = NULL;
	}
	if (x->timer) {
		event_free(x->timer);
		x->timer = NULL;
	}
}

bool upstream_xfer_find_header(const struct upstream_xfer *x, const char *name, const char **val,
                               size_t *val_len)
{
	size_t nlen = strlen(name), n = x->headers ? evbuffer_get_length(x->headers) : 0;
	if (n == 0)
		return false;
	/* Lines are "Name: value\r\n" with clean bytes (header_cb): no CR but the last. */
	const char *h = (const char *)evbuffer_pullup(x->headers, (ev_ssize_t)n);

	for (const char *p = h, *end = h + n; h != NULL && p < end;) {
		const char *eol = memchr(p, '\r', (size_t)(end - p));
		if (eol == NULL)
			break;
		if ((size_t)(eol - p) >= nlen + 2 && p[nlen] == ':' &&
		    strncasecmp(p, name, nlen) == 0) {
			*val = p + nlen + 2;
			*val_len = (size_t)(eol - *val);
			return true;
		}
		p = eol + 2;
	}
	return false;
}

static enum upstream_result classify(struct upstream_xfer *x, CURLcode rc, const char **detail)
{
	*detail = x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc);
	switch (rc) {
	case CURLE_OK:
		return UPSTREAM_OK;
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_URL_MALFORMAT:
		return UPSTREAM_CONNECT_ERROR;
	case CURLE_OPERATION_TIMEDOUT: {
		curl_off_t connect_us = 0;
		curl_easy_getinfo(x->easy, CURLINFO_CONNECT_TIME_T, &connect_us);
		if (connect_us == 0) {
			*detail = "connect timeout";
			return UPSTREAM_TIMEOUT;
		}
		*detail = "total timeout";
		return UPSTREAM_TIMEOUT;
	}
	case CURLE_WRITE_ERROR:
	case CURLE_ABORTED_BY_CALLBACK:
		return UPSTREAM_ABORTED;
	default:
		return UPSTREAM_ERROR;
	}
}

static void check_done(struct upstream *up)
{
	CURLMsg *msg;
	int left;

	while ((msg = curl_multi_info_read(up->multi, &left)) != NULL) {
		if (msg->msg != CURLMSG_DONE)
			continue;
		struct upstream_xfer *x = NULL;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
		if (x == NULL || !x->running)
			continue;
		const char *detail;
		char detail_copy[CURL_ERROR_SIZE];
		enum upstream_result res = classify(x, msg->data.result, &detail);
		snprintf(detail_copy, sizeof(detail_copy), "%s", detail);
		xfer_release_handle(x);
		x->ops->on_done(x->arg, res, detail_copy);
	}
}

const char *upstream_result_name(enum upstream_result r)
{
	switch (r) {
	case UPSTREAM_OK: return "ok";
	case UPSTREAM_CONNECT_ERROR: return "connect_error";
	case UPSTREAM_TIMEOUT: return "timeout";
	case UPSTREAM_ERROR: return "upstream_error";
	case UPSTREAM_ABORTED: return "aborted";
	}
	return "unknown";
}
