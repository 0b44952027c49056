/* upstream.c — libcurl multi handles driven by a worker's event_base: sockets, timers, pools.
 *
 * Rules this file keeps so its users don't have to think about libcurl:
 * - owners are never called back from inside curl_multi_* with a handle they
 *   could remove: on_done runs after curl_multi_remove_handle, from the loop;
 * - on_head/on_body run inside libcurl's callbacks and may only return a verdict;
 * - first_byte and idle timeouts are ours (libcurl has only connect and total):
 *   one timer per transfer, re-armed lazily from a "last activity" stamp so a
 *   stream of small chunks costs no timer syscalls per chunk.
 *
 * Shards. libcurl 7.88 looks for a reusable connection by walking every connection of
 * the multi handle to the same host, and walks the whole cache again when a transfer is
 * removed; with 10,000 streams open to one upstream a new request cost ~13 ms of CPU
 * (issue 10). So a worker's transfers are spread over several multi handles ("shards"),
 * each carrying at most SHARD_TRANSFERS of them, with its own connection cache: what
 * libcurl walks is bounded by SHARD_TRANSFERS, whatever the number of streams. A new
 * transfer goes to the first shard with room, so load stays on the first shards and their
 * idle connections keep being reused; a slot freed by a stream that ended is taken next,
 * with the idle connection it left. Shards are made on demand; one that stays empty for
 * SHARD_RETIRE_MS is freed with its connections (the first shard stays).
 *
 * Sockets. An idle connection's socket is not unregistered from epoll when libcurl stops
 * watching it (CURL_POLL_REMOVE): it is "parked", so the next transfer on that connection
 * costs no epoll_ctl to register it again, nor the one to remove it at its end. That is
 * only safe for sockets whose close we see, so connection sockets are opened and closed
 * through our callbacks (CURLOPT_OPENSOCKETFUNCTION / CLOSESOCKETFUNCTION); any other
 * socket libcurl watches is unregistered at CURL_POLL_REMOVE as before. A parked socket
 * that turns readable (the upstream closed the idle connection) is unregistered then;
 * libcurl's own check finds it dead when it next tries it.
 */
#include "sluice/upstream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "sluice/http.h"
#include "sluice/log.h"

/* Easy handles, response header buffers and transfer timers kept for reuse, each. */
#define EASY_POOL_MAX 256
/* Transfers one multi handle carries at most: the bound on libcurl's connection walks. */
#define SHARD_TRANSFERS 256
/* A shard other than the first is freed after being empty this long (ms). */
#define SHARD_RETIRE_MS 30000
/* libcurl's floor for a connection cache (CURLMOPT_MAXCONNECTS). */
#define MIN_MAXCONNECTS 16

struct upstream_shard {
	struct upstream *up;
	CURLM *multi;
	struct event *timer;     /* libcurl's own timeout */
	struct event *check_ev;  /* deferred completion check */
	struct event *retire_ev; /* empty for SHARD_RETIRE_MS: freed */
	size_t index;            /* in up->shards */
	size_t n_xfers;          /* transfers added and not yet removed */
	int running;
	bool starting;           /* inside upstream_xfer_start's curl_multi_add_handle */
	bool due_now;            /* libcurl asked for a 0 ms timeout meanwhile */
};

struct upstream_url {
	CURLU *h;         /* owned */
	unsigned holders; /* running transfers started with it */
	bool released;    /* the owner let go: free with the last holder */
};

struct upstream_sock {
	struct upstream_shard *shard; /* whose multi it reports to */
	struct event *ev;             /* NULL until first watched */
	curl_socket_t fd;
	short kind;                   /* EV_READ / EV_WRITE of ev */
	bool registered;              /* ev is added */
	bool ours;                    /* opened by open_socket_cb: its close is seen */
	bool parked;                  /* libcurl does not watch it now (an idle connection) */
};

struct upstream {
	struct event_base *base;
	struct upstream_shard **shards; /* [n_shards]; NULL where one was retired */
	size_t n_shards;
	long maxconnects;
	struct upstream_sock **socks;   /* by fd, [n_socks] */
	size_t n_socks;
	CURL *pool[EASY_POOL_MAX];
	size_t n_pool;
	struct evbuffer *buf_pool[EASY_POOL_MAX];
	size_t n_buf_pool;
	struct event *timer_pool[EASY_POOL_MAX];
	size_t n_timer_pool;
};

static void check_done(struct upstream_shard *sh);
static void xfer_arm_timer_us(struct upstream_xfer *x, uint64_t us);
static void xfer_timer_cb(evutil_socket_t fd, short kind, void *arg);

/* ---------------------------------------------------------------- sockets */

static struct upstream_sock *sock_of(struct upstream *up, curl_socket_t fd)
{
	return fd >= 0 && (size_t)fd < up->n_socks ? up->socks[fd] : NULL;
}

static struct upstream_sock *sock_new(struct upstream *up, curl_socket_t fd)
{
	if (fd < 0)
		return NULL;
	if ((size_t)fd >= up->n_socks) {
		size_t n = up->n_socks ? up->n_socks : 64;
		while (n <= (size_t)fd)
			n *= 2;
		struct upstream_sock **t = realloc(up->socks, n * sizeof(*t));
		if (t == NULL)
			return NULL;
		memset(t + up->n_socks, 0, (n - up->n_socks) * sizeof(*t));
		up->socks = t;
		up->n_socks = n;
	}
	struct upstream_sock *sk = calloc(1, sizeof(*sk));
	if (sk == NULL)
		return NULL;
	sk->fd = fd;
	up->socks[fd] = sk;
	return sk;
}

static void sock_free(struct upstream *up, struct upstream_sock *sk)
{
	if (sk->ev)
		event_free(sk->ev);
	up->socks[sk->fd] = NULL;
	free(sk);
}

static void sock_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream_sock *sk = arg;
	struct upstream_shard *sh = sk->shard;

	if (sk->parked) { /* an idle connection turned readable: closed by the upstream, likely */
		event_del(sk->ev);
		sk->registered = false;
		return;
	}
	int action = ((kind & EV_READ) ? CURL_CSELECT_IN : 0) | ((kind & EV_WRITE) ? CURL_CSELECT_OUT : 0);
	curl_multi_socket_action(sh->multi, fd, action, &sh->running); /* may free sk */
	check_done(sh);
}

static int sock_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct upstream_shard *sh = userp;
	struct upstream *up = sh->up;
	struct upstream_sock *sk = sock_of(up, fd);

	if (what == CURL_POLL_REMOVE) {
		if (sk == NULL)
			return 0;
		if (sk->ours)
			sk->parked = true; /* stays registered: see "Sockets" above */
		else
			sock_free(up, sk);
		return 0;
	}
	short kind = ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
	if (sk == NULL && (sk = sock_new(up, fd)) == NULL)
		return -1;
	sk->parked = false;
	if (sk->ev != NULL && sk->registered && sk->kind == kind) {
		sk->shard = sh; /* a parked connection taken again: already watched as asked */
		return 0;
	}
	if (sk->ev == NULL) {
		sk->ev = event_new(up->base, fd, kind | EV_PERSIST, sock_event_cb, sk);
		if (sk->ev == NULL)
			return -1;
	} else {
		if (sk->registered)
			event_del(sk->ev);
		event_assign(sk->ev, up->base, fd, kind | EV_PERSIST, sock_event_cb, sk);
	}
	sk->shard = sh;
	sk->kind = kind;
	event_add(sk->ev, NULL);
	sk->registered = true;
	return 0;
}

/* Connection sockets: opened and closed here, so that a parked one is never left
 * registered under a number the kernel gives to another socket. */
static curl_socket_t open_socket_cb(void *clientp, curlsocktype purpose,
                                    struct curl_sockaddr *addr)
{
	struct upstream *up = clientp;
	curl_socket_t fd = socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);

	if (fd < 0)
		return CURL_SOCKET_BAD;
	struct upstream_sock *sk = sock_of(up, fd);
	if (sk != NULL) /* a number we still held: its socket was closed without us */
		sock_free(up, sk);
	if ((sk = sock_new(up, fd)) == NULL) {
		close(fd);
		return CURL_SOCKET_BAD;
	}
	sk->ours = true;
	return fd;
}

static int close_socket_cb(void *clientp, curl_socket_t fd)
{
	struct upstream *up = clientp;
	struct upstream_sock *sk = sock_of(up, fd);

	if (sk != NULL)
		sock_free(up, sk); /* unregistered before the number can be reused */
	return close(fd);
}

/* ---------------------------------------------------------------- shards */

static void multi_timer_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream_shard *sh = arg;
	curl_multi_socket_action(sh->multi, CURL_SOCKET_TIMEOUT, 0, &sh->running);
	check_done(sh);
}

static void shard_set_timer(struct upstream_shard *sh, long timeout_ms)
{
	if (timeout_ms < 0) {
		event_del(sh->timer);
	} else {
		struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
		event_add(sh->timer, &tv);
	}
}

static int multi_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	struct upstream_shard *sh = userp;

	/* A new transfer asks to be run at once: upstream_xfer_start does that right after
	 * adding it, so a 0 ms timer would only cost a loop turn and a socket_action. */
	if (timeout_ms == 0 && sh->starting) {
		sh->due_now = true;
		return 0;
	}
	shard_set_timer(sh, timeout_ms);
	return 0;
}

static void check_event_cb(evutil_socket_t fd, short kind, void *arg)
{
	check_done(arg);
}

static long shard_maxconnects(const struct upstream *up)
{
	/* More than the shard can have busy is never needed; fewer only when configured. */
	long n = up->maxconnects < MIN_MAXCONNECTS ? MIN_MAXCONNECTS : up->maxconnects;
	return n < SHARD_TRANSFERS ? n : SHARD_TRANSFERS;
}

static void shard_free(struct upstream_shard *sh)
{
	if (sh == NULL)
		return;
	if (sh->multi)
		curl_multi_cleanup(sh->multi); /* closes its connections: close_socket_cb */
	if (sh->timer)
		event_free(sh->timer);
	if (sh->check_ev)
		event_free(sh->check_ev);
	if (sh->retire_ev)
		event_free(sh->retire_ev);
	free(sh);
}

static void shard_retire_cb(evutil_socket_t fd, short kind, void *arg)
{
	struct upstream_shard *sh = arg;

	if (sh->n_xfers > 0 || sh->index == 0)
		return;
	sh->up->shards[sh->index] = NULL;
	shard_free(sh);
}

static struct upstream_shard *shard_new(struct upstream *up, size_t index)
{
	struct upstream_shard *sh = calloc(1, sizeof(*sh));
	if (sh == NULL)
		return NULL;
	sh->up = up;
	sh->index = index;
	sh->multi = curl_multi_init();
	sh->timer = evtimer_new(up->base, multi_timer_event_cb, sh);
	sh->check_ev = event_new(up->base, -1, 0, check_event_cb, sh);
	sh->retire_ev = evtimer_new(up->base, shard_retire_cb, sh);
	if (sh->multi == NULL || sh->timer == NULL || sh->check_ev == NULL || sh->retire_ev == NULL) {
		shard_free(sh);
		return NULL;
	}
	curl_multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
	curl_multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, sh);
	curl_multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, multi_timer_cb);
	curl_multi_setopt(sh->multi, CURLMOPT_TIMERDATA, sh);
	/* HTTP/2 multiplexing where the upstream offers it over TLS. */
	curl_multi_setopt(sh->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
	curl_multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS, shard_maxconnects(up));
	return sh;
}

/* The first shard with room for one more transfer; a new one when all are full. */
static struct upstream_shard *shard_pick(struct upstream *up)
{
	size_t free_slot = up->n_shards;

	for (size_t i = 0; i < up->n_shards; i++) {
		struct upstream_shard *sh = up->shards[i];
		if (sh != NULL && sh->n_xfers < SHARD_TRANSFERS)
			return sh;
		if (sh == NULL && free_slot == up->n_shards)
			free_slot = i;
	}
	if (free_slot == up->n_shards) {
		struct upstream_shard **t = realloc(up->shards, (up->n_shards + 1) * sizeof(*t));
		if (t == NULL)
			return NULL;
		up->shards = t;
		up->shards[up->n_shards++] = NULL;
	}
	up->shards[free_slot] = shard_new(up, free_slot);
	return up->shards[free_slot];
}

static void shard_add(struct upstream_shard *sh)
{
	if (sh->n_xfers++ == 0)
		event_del(sh->retire_ev);
}

static void shard_remove(struct upstream_shard *sh)
{
	if (--sh->n_xfers == 0 && sh->index > 0) {
		struct timeval tv = {.tv_sec = SHARD_RETIRE_MS / 1000,
		                     .tv_usec = (SHARD_RETIRE_MS % 1000) * 1000};
		event_add(sh->retire_ev, &tv);
	}
}

struct upstream *upstream_new(struct event_base *base)
{
	struct upstream *up = calloc(1, sizeof(*up));
	if (up == NULL)
		return NULL;
	up->base = base;
	up->maxconnects = 64;
	if (shard_pick(up) == NULL) {
		upstream_free(up);
		return NULL;
	}
	return up;
}

void upstream_set_maxconnects(struct upstream *up, long n)
{
	/* At curl's default, a busy worker re-opened thousands of upstream
	 * connections per second (design.md §11): size the caches to the pools. */
	up->maxconnects = n;
	for (size_t i = 0; i < up->n_shards; i++)
		if (up->shards[i])
			curl_multi_setopt(up->shards[i]->multi, CURLMOPT_MAXCONNECTS,
			                  shard_maxconnects(up));
}

void upstream_free(struct upstream *up)
{
	if (up == NULL)
		return;
	for (size_t i = 0; i < up->n_pool; i++)
		curl_easy_cleanup(up->pool[i]);
	for (size_t i = 0; i < up->n_shards; i++)
		shard_free(up->shards[i]);
	free(up->shards);
	for (size_t i = 0; i < up->n_buf_pool; i++)
		evbuffer_free(up->buf_pool[i]);
	for (size_t i = 0; i < up->n_timer_pool; i++)
		event_free(up->timer_pool[i]);
	for (size_t i = 0; i < up->n_socks; i++)
		if (up->socks[i])
			sock_free(up, up->socks[i]);
	free(up->socks);
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
#define HOP(s) {s, sizeof(s) - 1}
	static const struct {
		const char *s;
		size_t len;
	} hop[] = {
	        HOP("connection"),        HOP("keep-alive"),       HOP("transfer-encoding"),
	        HOP("content-length"),    HOP("date"),             HOP("server"),
	        HOP("proxy-connection"),  HOP("upgrade"),          HOP("te"),
	        HOP("trailer"),           HOP("content-type"),     HOP("x-request-id"),
	        HOP("set-cookie"),        HOP("alt-svc"),          HOP("strict-transport-security"),
	        HOP("content-encoding"),  HOP("x-sluice-instance"),
	};
#undef HOP
	for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
		if (hop[i].len == len && strncasecmp(hop[i].s, name, len) == 0)
			return false;
	return true;
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
	const char *end = line + len, *colon;

	if (end > line && end[-1] == '\n')
		end--;
	if (end > line && end[-1] == '\r')
		end--;
	colon = http_token_end(line, end);
	if (colon == end || *colon != ':' || colon == line)
		return false;
	if (http_field_value_end(colon + 1, end) != end)
		return false;
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

static void header_link(struct upstream_xfer *x, struct curl_slist *n)
{
	n->next = NULL;
	if (x->req_tail)
		x->req_tail->next = n;
	else
		x->req_headers = n;
	x->req_tail = n;
}

static bool header_inline(const struct upstream_xfer *x, const struct curl_slist *n)
{
	return n >= x->hdr_node && n < x->hdr_node + UPSTREAM_HEADER_NODES;
}

/* A line that did not fit the transfer's own storage: one curl_slist_append'ed node. */
static bool header_alloc(struct upstream_xfer *x, const char *line)
{
	struct curl_slist *n = curl_slist_append(NULL, line);
	if (n == NULL)
		return false;
	header_link(x, n);
	return true;
}

bool upstream_xfer_header_static(struct upstream_xfer *x, const char *line)
{
	if (x->n_hdr_nodes == UPSTREAM_HEADER_NODES)
		return header_alloc(x, line);
	struct curl_slist *n = &x->hdr_node[x->n_hdr_nodes++];
	n->data = (char *)line; /* libcurl only reads it */
	header_link(x, n);
	return true;
}

bool upstream_xfer_header(struct upstream_xfer *x, const char *line)
{
	size_t len = strlen(line) + 1;
	if (x->n_hdr_nodes == UPSTREAM_HEADER_NODES || len > UPSTREAM_HEADER_BYTES - x->hdr_used)
		return header_alloc(x, line);
	char *copy = x->hdr_bytes + x->hdr_used;
	memcpy(copy, line, len);
	x->hdr_used += len;
	return upstream_xfer_header_static(x, copy);
}

/* Free the allocated nodes of the request header list; the transfer's own stay. */
static void headers_release(struct upstream_xfer *x)
{
	struct curl_slist *n = x->req_headers, *next;
	for (; n != NULL; n = next) {
		next = n->next;
		if (!header_inline(x, n)) {
			n->next = NULL;
			curl_slist_free_all(n);
		}
	}
	x->req_headers = x->req_tail = NULL;
	x->n_hdr_nodes = 0;
	x->hdr_used = 0;
}

/* An environment variable as libcurl reads it: unset and empty are the same. */
static const char *env_value(const char *name)
{
	const char *v = getenv(name);
	return v != NULL && v[0] != '\0' ? v : NULL;
}

/*
 * Proxies from the environment, read when the handle is made rather than by libcurl on every
 * transfer (five getenv calls each, about 1.6k instructions). The same rules: no_proxy, else
 * NO_PROXY; <scheme>_proxy (HTTPS_PROXY too, never HTTP_PROXY), else all_proxy / ALL_PROXY.
 * With none of the proxy variables set, an empty CURLOPT_PROXY says "no proxy" and libcurl
 * looks no further; with one set, libcurl still picks it per scheme as before.
 */
static void easy_env_proxy(CURL *e)
{
	const char *np = env_value("no_proxy");

	if (np == NULL)
		np = env_value("NO_PROXY");
	curl_easy_setopt(e, CURLOPT_NOPROXY, np != NULL ? np : "");
	if (env_value("http_proxy") == NULL && env_value("https_proxy") == NULL &&
	    env_value("HTTPS_PROXY") == NULL && env_value("all_proxy") == NULL &&
	    env_value("ALL_PROXY") == NULL)
		curl_easy_setopt(e, CURLOPT_PROXY, "");
}

/* The options every transfer of this file has: set once when the handle is made, kept by
 * the pool (curl_easy_reset is never called). */
static CURL *easy_new(struct upstream *up)
{
	CURL *e = curl_easy_init();
	if (e == NULL)
		return NULL;
	easy_env_proxy(e);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, up);
	curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
	curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, up);
	return e;
}

bool upstream_xfer_start(struct upstream_xfer *x, const char *method, const char *url,
                         const char *body, size_t len, const struct upstream_timeouts *to,
                         bool tls_verify, long keepalive_idle_s)
{
	struct upstream *up = x->up;

	/* The header buffer and the timer come from the pools when they can (a fallback
	 * attempt, or the next request, gets those of the one before). */
	if (x->headers == NULL)
		x->headers = upstream_buf_get(up);
	if (x->timer == NULL) {
		if (up->n_timer_pool) {
			x->timer = up->timer_pool[--up->n_timer_pool];
			event_assign(x->timer, up->base, -1, 0, xfer_timer_cb, x);
		} else {
			x->timer = evtimer_new(up->base, xfer_timer_cb, x);
		}
	}
	if (x->headers == NULL || x->timer == NULL)
		return false;
	struct upstream_shard *sh = shard_pick(up);
	if (sh == NULL)
		return false;
	/* Reused handles keep their options; every per-transfer one is set below. */
	x->easy = up->n_pool ? up->pool[--up->n_pool] : easy_new(up);
	if (x->easy == NULL)
		return false;
	x->status = 0;
	x->head_done = x->body_started = x->paused = false;
	x->content_type[0] = '\0';
	x->errbuf[0] = '\0';
	x->to = *to;

	/* libcurl sends "Expect: 100-continue" for large bodies and would wait a
	 * second for it; an empty Expect: turns that off. */
	upstream_xfer_header_static(x, "Expect:");
	bool has_ct = false, has_ua = false;
	for (struct curl_slist *h = x->req_headers; h && !(has_ct && has_ua); h = h->next) {
		has_ct = has_ct || strncasecmp(h->data, "content-type:", 13) == 0;
		has_ua = has_ua || strncasecmp(h->data, "user-agent:", 11) == 0;
	}
	if (body != NULL && !has_ct)
		upstream_xfer_header_static(x, "Content-Type: application/json");
	/* A line of ours, not CURLOPT_USERAGENT: libcurl formats that one per transfer. */
	if (!has_ua)
		upstream_xfer_header_static(x, "User-Agent: sluice/" SLUICE_VERSION);

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
	curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_PRIVATE, x);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)to->connect);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)to->total);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, tls_verify ? 1L : 0L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, tls_verify ? 2L : 0L);
	curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, keepalive_idle_s > 0 ? keepalive_idle_s : 1L);
	/* set both ways: easy handles are pooled and never reset */
	curl_easy_setopt(e, CURLOPT_FORBID_REUSE, keepalive_idle_s < 0 ? 1L : 0L);

	x->start_us = x->last_activity_us = http_now_us();
	x->head_us = x->first_body_us = 0;
	sh->starting = true;
	sh->due_now = false;
	CURLMcode added = curl_multi_add_handle(sh->multi, e);
	sh->starting = false;
	if (added != CURLM_OK) {
		curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
		curl_easy_setopt(e, CURLOPT_CURLU, NULL);
		up->pool[up->n_pool++] = e; /* came from the pool or fits back */
		x->easy = NULL;
		x->url = NULL;
		if (sh->due_now) {
			long ms = -1;
			curl_multi_timeout(sh->multi, &ms);
			shard_set_timer(sh, ms);
		}
		return false;
	}
	shard_add(sh);
	x->shard = sh;
	x->running = true;
	if (x->url)
		x->url->holders++;
	xfer_arm_timer_us(x, to->first_byte * 1000);
	/* Start connecting now rather than on the next loop turn; completions
	 * found here are delivered from the loop (check_ev), never from inside
	 * this call. */
	curl_multi_socket_action(sh->multi, CURL_SOCKET_TIMEOUT, 0, &sh->running);
	if (sh->due_now) {
		/* The 0 ms timeout asked for while adding was served just now; arm what is
		 * due next, as libcurl sees it after this run. */
		long ms = -1;
		sh->due_now = false;
		curl_multi_timeout(sh->multi, &ms);
		shard_set_timer(sh, ms);
	}
	event_active(sh->check_ev, 0, 0);
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
		event_active(x->shard->check_ev, 0, 0);
	}
}

static void xfer_release_handle(struct upstream_xfer *x)
{
	struct upstream *up = x->up;

	curl_multi_remove_handle(x->shard->multi, x->easy);
	shard_remove(x->shard);
	x->shard = NULL;
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
	headers_release(x);
}

void upstream_xfer_cancel(struct upstream_xfer *x)
{
	if (x->running)
		xfer_release_handle(x);
}

struct evbuffer *upstream_buf_get(struct upstream *up)
{
	return up && up->n_buf_pool ? up->buf_pool[--up->n_buf_pool] : evbuffer_new();
}

void upstream_buf_put(struct upstream *up, struct evbuffer *b)
{
	if (b == NULL)
		return;
	evbuffer_drain(b, evbuffer_get_length(b));
	if (up && up->n_buf_pool < EASY_POOL_MAX)
		up->buf_pool[up->n_buf_pool++] = b;
	else
		evbuffer_free(b);
}

void upstream_xfer_cleanup(struct upstream_xfer *x)
{
	struct upstream *up = x->up;

	upstream_xfer_cancel(x);
	headers_release(x);
	if (x->headers) {
		upstream_buf_put(up, x->headers);
		x->headers = NULL;
	}
	if (x->timer) {
		event_del(x->timer);
		if (up && up->n_timer_pool < EASY_POOL_MAX)
			up->timer_pool[up->n_timer_pool++] = x->timer;
		else
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

/* Whether the transfer got as far as sending its request, so a connection (and any TLS
 * handshake) was made: libcurl counts the request's bytes once they are sent. (Not the
 * connect time, which stays 0 on a connection reused from the pool.) */
static bool xfer_sent_request(struct upstream_xfer *x)
{
	long request_size = 0;

	curl_easy_getinfo(x->easy, CURLINFO_REQUEST_SIZE, &request_size);
	return request_size > 0;
}

static enum upstream_result classify(struct upstream_xfer *x, CURLcode rc, const char **detail)
{
	*detail = x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc);
	switch (rc) {
	case CURLE_OK:
		return UPSTREAM_OK;
	case CURLE_UNSUPPORTED_PROTOCOL:
		/* Before connecting: a scheme libcurl cannot speak. After the request went out
		 * (libcurl's "Received HTTP/0.9 when not allowed"): the instance answered bytes
		 * that are not HTTP — an upstream error, not a connect error. */
		if (xfer_sent_request(x))
			return UPSTREAM_ERROR;
		return UPSTREAM_CONNECT_ERROR;
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
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

static void check_done(struct upstream_shard *sh)
{
	CURLMsg *msg;
	int left;

	while ((msg = curl_multi_info_read(sh->multi, &left)) != NULL) {
		if (msg->msg != CURLMSG_DONE)
			continue;
		struct upstream_xfer *x = NULL;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
		if (x == NULL || !x->running)
			continue;
		const char *detail;
		char detail_copy[CURL_ERROR_SIZE];
		enum upstream_result res = classify(x, msg->data.result, &detail);
		/* A copy: detail may point into the handle's error buffer (no printf for it). */
		size_t dn = strnlen(detail, sizeof(detail_copy) - 1);
		memcpy(detail_copy, detail, dn);
		detail_copy[dn] = '\0';
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
