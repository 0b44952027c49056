/* server.c — the process: listeners, worker threads, signals, config reload and graceful drain.
 *
 * The main thread owns signals and reloads. A new snapshot reaches the workers
 * through a one-slot mailbox each (mutex + event_active): a worker swaps its
 * pointer between two requests, so a request keeps the snapshot it started with
 * (it holds its own reference) and no lock is taken on the request path.
 */
#include "sluice/server.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "sluice/accesslog.h"
#include "sluice/admin.h"
#include "sluice/alerts.h"
#include "sluice/balancer.h"
#include "sluice/health.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/mcp.h"
#include "sluice/metrics.h"
#include "sluice/notify.h"
#include "sluice/quota.h"
#include "sluice/request.h"
#include "sluice/upstream.h"

#define DRAIN_CHECK_MS 20
#define QUOTA_VIEW_MS 1000
#define LISTEN_BACKLOG 4096

struct server {
	struct event_base *base;
	struct config *config; /* the published snapshot: one reference */
	const char *config_path;
	struct worker *workers;
	int n_workers;
	struct event *sig_hup, *sig_term, *sig_int, *sig_usr1;
	struct event *drain_ev;
	uint64_t drain_deadline_us;
	bool draining;
	bool ready;
	uint64_t generation;
	uint64_t started_unix;
	struct health_checker *checker;
	struct admin *admin;
	/* The shared (Redis) view of quota use for the admin API: refreshed from
	 * the main loop every QUOTA_VIEW_MS by asynchronous peeks, read by the
	 * (synchronous) admin hooks. Unused with the memory store. */
	struct quota *view_quota;
	struct event *view_ev;
	json_t *view;                 /* {"consumer:NAME": [...], "instance:NAME": [...]} */
	struct view_peek **view_pending; /* per consumer, then per instance */
	size_t n_view_pending;
};

/* ---------------------------------------------------------------- listeners */

static int listen_socket(const struct config_listen *l)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
	                         .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
	struct addrinfo *ai = NULL;
	char port[8];
	int fd = -1, one = 1;

	snprintf(port, sizeof(port), "%d", l->port);
	int rc = getaddrinfo(l->host, port, &hints, &ai);
	if (rc != 0) {
		log_error("listen %s: %s", l->address, gai_strerror(rc));
		return -1;
	}
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	/* One socket per worker on the same port: the kernel spreads connections. */
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
		goto fail;
	/* Accepted sockets inherit it; a missing TCP_NODELAY costs ~40 ms per response. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, LISTEN_BACKLOG) < 0)
		goto fail;
	freeaddrinfo(ai);
	return fd;
fail:
	log_error("listen %s: %s", l->address, strerror(errno));
	if (fd >= 0)
		close(fd);
	freeaddrinfo(ai);
	return -1;
}

static void http_limits_from(const struct config *c, struct http_limits *lim)
{
	lim->max_header_size = c->server.max_header_size;
	lim->max_body_size = c->server.max_body_size;
	lim->client_timeout = c->server.client_timeout;
	lim->keepalive_timeout = c->server.keepalive_timeout;
	lim->write_timeout = c->server.client_timeout;
	/* max_connections is for the process; each worker takes its share. */
	int per = c->server.max_connections / (c->server.workers > 0 ? c->server.workers : 1);
	lim->max_connections = per > 0 ? per : 1;
}

/*
 * libcurl 7.88 counts busy connections against CURLMOPT_MAXCONNECTS: at the
 * pools' size, every transfer past it closed a connection when done (45% of
 * requests opened a new one at 200 in flight, bench/README.md). Size the cache
 * for every request a worker may have in flight; idle ones still retire after
 * keepalive.idle (CURLOPT_MAXAGE_CONN).
 */
static long maxconnects_from(const struct config *c)
{
	long n = 0;
	for (size_t i = 0; i < c->n_instances; i++)
		n += c->instances[i].keepalive.pool;
	long per_worker = c->server.max_connections / (c->server.workers > 0 ? c->server.workers : 1);
	return n > per_worker ? n : per_worker;
}

/* A TLS context for one listener, or NULL with the reason logged. */
static SSL_CTX *tls_context(const struct config_listen *l)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	char err[256] = "out of memory";

	if (ctx == NULL)
		goto fail;
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
	if (SSL_CTX_use_certificate_chain_file(ctx, l->tls_cert) != 1 ||
	    SSL_CTX_use_PrivateKey_file(ctx, l->tls_key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1) {
		ERR_error_string_n(ERR_get_error(), err, sizeof(err));
		goto fail;
	}
	return ctx;
fail:
	log_error("listen %s: TLS certificate %s / key %s: %s", l->address, l->tls_cert, l->tls_key,
	          err);
	ERR_clear_error();
	SSL_CTX_free(ctx);
	return NULL;
}

/* Load every listener's certificate: false when one fails (a reload is refused). */
static bool tls_check(const struct config *c)
{
	for (size_t i = 0; i < c->server.n_listen; i++) {
		if (c->server.listen[i].tls_cert == NULL)
			continue;
		SSL_CTX *ctx = tls_context(&c->server.listen[i]);
		if (ctx == NULL)
			return false;
		SSL_CTX_free(ctx);
	}
	return true;
}

/* ---------------------------------------------------------------- workers */

static void worker_free_balancers(struct worker *w)
{
	if (w->balancers_config) {
		for (size_t i = 0; i < w->balancers_config->n_routes; i++)
			balancer_free(w->balancers[i]);
		/* In-flight transfers of the old snapshot may still use these: each
		 * is freed by the last transfer holding it (upstream.h). */
		for (size_t i = 0; w->urls && i < w->balancers_config->n_instances; i++)
			upstream_url_release(w->urls[i]);
	}
	free(w->balancers);
	free(w->urls);
	w->balancers = NULL;
	w->urls = NULL;
	w->balancers_config = NULL;
}

static void worker_apply_config(struct worker *w, struct config *c)
{
	struct http_limits lim;
	http_limits_from(c, &lim);
	if (w->http)
		http_server_set_limits(w->http, &lim);
	upstream_set_maxconnects(w->upstream, maxconnects_from(c));
	/* Balancer state is per worker and per snapshot: a reload starts the
	 * weighted rotation afresh (requests still on the old snapshot balance
	 * on their own, see request.c). */
	worker_free_balancers(w);
	w->balancers = calloc(c->n_routes ? c->n_routes : 1, sizeof(*w->balancers));
	w->urls = calloc(c->n_instances ? c->n_instances : 1, sizeof(*w->urls));
	if (w->balancers && w->urls) {
		for (size_t i = 0; i < c->n_routes; i++)
			w->balancers[i] = balancer_new(&c->routes[i]);
		/* Parsed once per worker and snapshot; NULL (parse per request) on error. */
		for (size_t i = 0; i < c->n_instances; i++)
			w->urls[i] = upstream_url_new(c->instances[i].url);
		w->balancers_config = c;
	}
	if (w->quota)
		quota_configure(w->quota, c);
	/* Certificates are re-read on every reload (renewed files take effect);
	 * open connections keep the context they started with. */
	for (size_t i = 0; w->http && i < c->server.n_listen; i++) {
		if (c->server.listen[i].tls_cert == NULL)
			continue;
		SSL_CTX *ctx = tls_context(&c->server.listen[i]);
		if (ctx) {
			http_server_set_tls(w->http, i, ctx);
			SSL_CTX_free(ctx);
		}
	}
}

static void worker_drain_check(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	/* Done when no request is live and every connection has flushed its
	 * last response and closed (drain closes them as their replies end), and
	 * the last settlements have reached the quota store. */
	if (TAILQ_EMPTY(&w->requests) && mcp_worker_active(w->mcp) == 0 &&
	    http_server_connections(w->http) == 0 && quota_inflight(w->quota) == 0) {
		event_base_loopexit(w->base, NULL);
		return;
	}
	struct timeval tv = {0, DRAIN_CHECK_MS * 1000};
	event_add(w->drain_check_ev, &tv);
}

static void worker_wake(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;

	pthread_mutex_lock(&w->lock);
	struct config *next = w->next_config;
	w->next_config = NULL;
	bool drain = w->drain, stop = w->stop;
	pthread_mutex_unlock(&w->lock);

	if (next) {
		struct config *old = w->config;
		w->config = next;
		worker_apply_config(w, next);
		config_unref(old);
	}
	if (stop) {
		event_base_loopbreak(w->base);
		return;
	}
	if (drain && !event_pending(w->drain_check_ev, EV_TIMEOUT, NULL)) {
		http_server_drain(w->http);
		mcp_worker_drain(w->mcp); /* server streams end: their clients reconnect elsewhere */
		worker_drain_check(-1, 0, w);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	event_base_dispatch(w->base);
	/* Drained, or forced at drain_timeout: whatever is still here is cut. */
	request_abort_all(w);
	mcp_worker_abort_all(w->mcp);
	atomic_store(&w->exited, true);
	return NULL;
}

static bool worker_init(struct server *s, struct worker *w, int id)
{
	struct config *c = s->config;
	struct http_limits lim;
	int fds[16];
	size_t n_fds = 0;

	w->id = id;
	w->server = s;
	TAILQ_INIT(&w->requests);
	pthread_mutex_init(&w->lock, NULL);
	if (getrandom(&w->rng, sizeof(w->rng), 0) != sizeof(w->rng) || w->rng == 0)
		w->rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)time(NULL) ^ (uint64_t)id;
	/* Default (coarse, ~4 ms) timers: precise ones cost a timerfd syscall per
	 * loop turn (bench/README.md), and our timeouts are not that fine. */
	w->base = event_base_new();
	if (w->base == NULL)
		return false;
	w->upstream = upstream_new(w->base);
	w->quota = quota_new(w->base, c);
	w->metrics = metrics_shard(id);
	w->wake_ev = event_new(w->base, -1, 0, worker_wake, w);
	w->mcp = mcp_worker_new(w);
	w->drain_check_ev = evtimer_new(w->base, worker_drain_check, w);
	if (w->upstream == NULL || w->quota == NULL || w->wake_ev == NULL ||
	    w->drain_check_ev == NULL || w->mcp == NULL)
		return false;
	for (size_t i = 0; i < c->server.n_listen && n_fds < 16; i++) {
		int fd = listen_socket(&c->server.listen[i]);
		if (fd < 0) {
			for (size_t j = 0; j < n_fds; j++)
				close(fds[j]);
			return false;
		}
		fds[n_fds++] = fd;
	}
	http_limits_from(c, &lim);
	w->http = http_server_new(w->base, fds, n_fds, &lim, request_handle, w);
	if (w->http == NULL)
		return false;
	http_server_set_head_check(w->http, request_head_check);
	w->config = config_ref(c);
	worker_apply_config(w, c);
	return true;
}

static void worker_destroy(struct worker *w)
{
	mcp_worker_free(w->mcp); /* its exchanges' connections belong to w->http */
	if (w->http)
		http_server_free(w->http);
	worker_free_balancers(w);
	if (w->quota)
		quota_free(w->quota);
	if (w->upstream)
		upstream_free(w->upstream);
	if (w->wake_ev)
		event_free(w->wake_ev);
	if (w->drain_check_ev)
		event_free(w->drain_check_ev);
	if (w->base)
		event_base_free(w->base);
	if (w->config)
		config_unref(w->config);
	if (w->next_config)
		config_unref(w->next_config);
	pthread_mutex_destroy(&w->lock);
}

static void worker_post(struct worker *w, struct config *next, bool drain, bool stop)
{
	pthread_mutex_lock(&w->lock);
	if (next) {
		if (w->next_config)
			config_unref(w->next_config);
		w->next_config = config_ref(next);
	}
	w->drain |= drain;
	w->stop |= stop;
	pthread_mutex_unlock(&w->lock);
	event_active(w->wake_ev, 0, 0);
}

/* ---------------------------------------------------------------- publish and reload */

/*
 * Prepare a snapshot on the main thread before any worker sees it: attach the
 * runtime state that outlives snapshots (health, in-flight) by instance name,
 * and bring probes, alerts and the access log in line with it.
 */
static void server_prepare(struct server *s, struct config *c)
{
	for (size_t i = 0; i < c->n_instances; i++)
		c->instances[i].state = health_state(c->instances[i].name);
	health_checker_sync(s->checker, c);
	mcp_publish(c); /* MCP server states, retired servers, the workers' snapshot lists */
	alerts_configure(c);
	accesslog_open(c->log.access_log);
	if (s->admin)
		admin_configure(s->admin, c);
}

static void view_configure(struct server *s, const struct config *c);

static bool same_listeners(const struct config *a, const struct config *b)
{
	if (a->server.n_listen != b->server.n_listen)
		return false;
	for (size_t i = 0; i < a->server.n_listen; i++)
		if (strcmp(a->server.listen[i].address, b->server.listen[i].address) != 0)
			return false;
	return true;
}

static void apply_logging(const struct config *c)
{
	log_set_level(c->log.level);
	log_open(c->log.error_log);
}

static bool server_reload(struct server *s, json_t **errors_out)
{
	struct config_errors errs = {0};
	/* RELOADING=1 ... READY=1 brackets every reload, refused ones included. */
	notify_reloading();
	struct config *c = config_load(s->config_path, &errs);

	if (c == NULL) {
		json_t *list = json_array();
		for (size_t i = 0; i < errs.n; i++) {
			log_error("reload rejected: %s", errs.msgs[i]);
			json_array_append_new(list, json_string(errs.msgs[i]));
		}
		if (errors_out)
			*errors_out = json_incref(list);
		alerts_emit("config_reload_failed", json_pack("{s:s, s:o}", "file", s->config_path,
		                                              "errors", list));
		metrics_reload(false);
		if (errs.dropped)
			log_error("reload rejected: ... and %zu more errors", errs.dropped);
		log_error("reload of %s failed with %zu error(s); still serving generation %llu",
		          s->config_path, errs.n + errs.dropped, (unsigned long long)s->generation);
		config_errors_free(&errs);
		notify_ready();
		return false;
	}
	if (!tls_check(c)) {
		log_error("reload of %s refused: a TLS certificate does not load", s->config_path);
		if (errors_out)
			*errors_out = json_pack("[s]", "a TLS certificate or key does not load (see the log)");
		config_unref(c);
		metrics_reload(false);
		notify_ready();
		return false;
	}
	if (!same_listeners(s->config, c))
		log_warn("reload: server.listen changed; listeners change only on restart");
	if (c->server.workers != s->config->server.workers)
		log_warn("reload: server.workers changed; the worker count changes only on restart");
	c->generation = ++s->generation;
	apply_logging(c);
	server_prepare(s, c);
	for (int i = 0; i < s->n_workers; i++)
		worker_post(&s->workers[i], c, false, false);
	config_unref(s->config);
	s->config = c;
	view_configure(s, c);
	log_info("reloaded %s: generation %llu, sha256 %.12s, %zu instances, %zu routes",
	         s->config_path, (unsigned long long)c->generation, c->sha256_hex, c->n_instances,
	         c->n_routes);
	metrics_reload(true);
	notify_ready();
	return true;
}

/* ---------------------------------------------------------------- signals and drain */

static void drain_tick(evutil_socket_t fd, short what, void *arg)
{
	struct server *s = arg;
	bool all = true;

	for (int i = 0; i < s->n_workers; i++)
		all &= atomic_load(&s->workers[i].exited);
	if (all) {
		event_base_loopbreak(s->base);
		return;
	}
	if (http_now_us() >= s->drain_deadline_us) {
		log_warn("drain_timeout reached: closing the requests still in flight");
		for (int i = 0; i < s->n_workers; i++)
			worker_post(&s->workers[i], NULL, false, true);
		s->drain_deadline_us = UINT64_MAX;
	}
	struct timeval tv = {0, DRAIN_CHECK_MS * 1000};
	event_add(s->drain_ev, &tv);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct server *s = arg;

	switch (sig) {
	case SIGHUP:
		log_info("SIGHUP: reloading %s", s->config_path);
		server_reload(s, NULL);
		break;
	case SIGUSR1:
		log_reopen();
		accesslog_reopen();
		log_info("SIGUSR1: log files reopened");
		break;
	case SIGTERM:
	case SIGINT:
		if (s->draining) {
			log_warn("second stop signal: stopping now");
			s->drain_deadline_us = 0;
			break;
		}
		s->draining = true;
		notify_stopping();
		log_info("%s: draining (up to %llu ms for in-flight requests)",
		         sig == SIGTERM ? "SIGTERM" : "SIGINT",
		         (unsigned long long)s->config->server.drain_timeout);
		s->drain_deadline_us = http_now_us() + s->config->server.drain_timeout * 1000;
		for (int i = 0; i < s->n_workers; i++)
			worker_post(&s->workers[i], NULL, true, false);
		drain_tick(-1, 0, s);
		break;
	}
}

/* Health transitions (any thread) feed the metrics and the status page. */
static void on_health_transition(const char *instance, bool healthy, const char *reason, void *arg)
{
	metrics_health_event(instance, healthy, reason);
}

/* Scrape-time gauges: read where they live (health registry, workers' servers). */
static void gauge_source(void *arg, struct evbuffer *out)
{
	struct server *s = arg;
	const struct config *c = s->config;
	struct metrics_upstream_state *v = calloc(c->n_instances ? c->n_instances : 1, sizeof(*v));
	unsigned long long conns = 0, accept_errors = 0;

	if (v != NULL) {
		for (size_t i = 0; i < c->n_instances; i++) {
			v[i].name = c->instances[i].name;
			v[i].healthy = health_is_healthy(c->instances[i].state);
			int n = health_inflight(c->instances[i].state);
			v[i].inflight = n > 0 ? (unsigned long long)n : 0;
		}
		metrics_write_upstreams(out, v, c->n_instances);
		free(v);
	}
	for (int i = 0; i < s->n_workers; i++) {
		conns += http_server_connections(s->workers[i].http);
		accept_errors += http_server_accept_errors(s->workers[i].http);
	}
	metrics_write_connections(out, conns, accept_errors);
}

/* ---------------------------------------------------------------- shared quota view */

static json_t *limits_json(const struct quota_limit_state *st, size_t n);

struct view_peek {
	struct server *s;
	size_t slot;
	struct quota_peek *h;
	char key[160];
};

static void view_cancel_all(struct server *s)
{
	for (size_t i = 0; i < s->n_view_pending; i++) {
		struct view_peek *vp = s->view_pending[i];
		if (vp) {
			quota_peek_cancel(vp->h);
			free(vp);
			s->view_pending[i] = NULL;
		}
	}
}

static void view_peek_done(void *arg, struct quota_limit_state *st, size_t n, bool store_error)
{
	struct view_peek *vp = arg;
	struct server *s = vp->s;

	s->view_pending[vp->slot] = NULL;
	if (!store_error)
		json_object_set_new(s->view, vp->key, limits_json(st, n));
	free(vp);
}

static void view_issue(struct server *s, size_t slot, const char *kind, const char *name,
                       const struct config_consumer *co, const struct config_instance *in)
{
	struct view_peek *vp = calloc(1, sizeof(*vp));
	if (vp == NULL)
		return;
	vp->s = s;
	vp->slot = slot;
	snprintf(vp->key, sizeof(vp->key), "%s:%s", kind, name);
	s->view_pending[slot] = vp;
	struct quota_peek *h = quota_peek(s->view_quota, co, in, view_peek_done, vp);
	/* A synchronous answer has run the callback, which freed vp. */
	if (s->view_pending[slot] == vp)
		vp->h = h;
}

static void view_refresh(evutil_socket_t fd, short what, void *arg)
{
	struct server *s = arg;
	const struct config *c = s->config;
	size_t need = c->n_consumers + c->n_instances;

	view_cancel_all(s);
	if (need > s->n_view_pending) {
		struct view_peek **p = realloc(s->view_pending, need * sizeof(*p));
		if (p == NULL)
			return;
		s->view_pending = p;
		s->n_view_pending = need;
	}
	for (size_t i = 0; i < need; i++)
		s->view_pending[i] = NULL;
	for (size_t i = 0; i < c->n_consumers; i++)
		view_issue(s, i, "consumer", c->consumers[i].name, &c->consumers[i], NULL);
	for (size_t i = 0; i < c->n_instances; i++)
		if (c->instances[i].n_limits)
			view_issue(s, c->n_consumers + i, "instance", c->instances[i].name, NULL,
			           &c->instances[i]);
	struct timeval tv = {QUOTA_VIEW_MS / 1000, (QUOTA_VIEW_MS % 1000) * 1000};
	event_add(s->view_ev, &tv);
}

/* (Re)start the shared view for snapshot c; peeks in flight refer to the old
 * snapshot's limits, so they are cancelled first. */
static void view_configure(struct server *s, const struct config *c)
{
	view_cancel_all(s);
	json_object_clear(s->view);
	if (c->store.type != STORE_REDIS) {
		event_del(s->view_ev);
		return;
	}
	if (s->view_quota == NULL)
		s->view_quota = quota_new(s->base, c);
	else
		quota_configure(s->view_quota, c);
	event_active(s->view_ev, 0, 0);
}

/* This node's local counts (memory store), or the last shared (Redis) view. */
static json_t *limits_view(struct server *s, const char *kind, const char *name,
                           const struct config_consumer *co, const struct config_instance *in)
{
	char key[160];
	struct quota_limit_state st[64];

	if (s->config->store.type == STORE_REDIS) {
		snprintf(key, sizeof(key), "%s:%s", kind, name);
		json_t *v = json_object_get(s->view, key);
		if (v)
			return json_incref(v);
	}
	return limits_json(st, quota_peek_memory(co, in, st, 64));
}

/* ---------------------------------------------------------------- admin hooks (main thread) */

static json_t *hook_status(void *arg)
{
	struct server *s = arg;
	size_t conns = 0, active = 0;
	for (int i = 0; i < s->n_workers; i++) {
		/* Racy reads of other threads' counters: fine for a status figure. */
		conns += http_server_connections(s->workers[i].http);
		active += http_server_active(s->workers[i].http);
	}
	return json_pack("{s:s, s:I, s:I, s:s, s:s, s:i, s:I, s:I, s:b}", "version", SLUICE_VERSION,
	                 "uptime_s", (json_int_t)((uint64_t)time(NULL) - s->started_unix),
	                 "config_generation", (json_int_t)s->generation, "config_file",
	                 s->config_path, "config_sha256", s->config->sha256_hex, "workers",
	                 s->n_workers, "open_connections", (json_int_t)conns, "active_requests",
	                 (json_int_t)active, "draining", s->draining);
}

static json_t *hook_instances(void *arg)
{
	struct server *s = arg;
	const struct config *c = s->config;
	json_t *list = json_array();

	for (size_t i = 0; i < c->n_instances; i++) {
		const struct config_instance *in = &c->instances[i];
		struct health_snapshot h;
		health_snapshot(in->state, &h);
		json_t *o = json_pack(
		        "{s:s, s:s, s:s?, s:b, s:s, s:s?, s:I, s:I, s:i, s:f, s:f, s:I, s:I, s:I}",
		        "name", in->name, "provider", config_provider_name(in->provider), "model",
		        in->model, "healthy", h.healthy, "last_reason", h.last_reason, "last_source",
		        h.source, "last_transition_unix_ms", (json_int_t)h.last_transition_unix_ms,
		        "transitions", (json_int_t)h.transitions, "inflight", h.inflight,
		        "ewma_ttft_ms", h.ewma_ttft_us / 1000.0, "ewma_total_ms",
		        h.ewma_total_us / 1000.0, "retry_after_until_unix_ms",
		        (json_int_t)h.retry_after_until_unix_ms, "probes_ok", (json_int_t)h.probes_ok,
		        "probes_failed", (json_int_t)h.probes_failed);
		json_object_set_new(o, "active_checks", json_boolean(in->active.enabled));
		json_object_set_new(o, "ewma_latency_ms", json_real(h.ewma_total_us / 1000.0));
		struct health_load hl;
		if (in->load.metrics_url && health_load_get(in->state, http_now_us(), &hl))
			json_object_set_new(o, "load", json_pack("{s:f, s:f, s:f}", "waiting", hl.waiting,
			                                          "running", hl.running, "kv_cache",
			                                          hl.kv_cache));
		else
			json_object_set_new(o, "load", json_null());
		if (h.last_transition_unix_ms) {
			char when[40];
			time_t t = (time_t)(h.last_transition_unix_ms / 1000);
			struct tm tm;
			gmtime_r(&t, &tm);
			size_t n = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
			snprintf(when + n, sizeof(when) - n, ".%03dZ",
			         (int)(h.last_transition_unix_ms % 1000));
			json_object_set_new(o, "last_transition",
			                    json_pack("{s:b, s:s, s:s}", "healthy", h.healthy, "reason",
			                              h.last_reason, "time", when));
		} else {
			json_object_set_new(o, "last_transition",
			                    json_pack("{s:b, s:s, s:n}", "healthy", h.healthy, "reason",
			                              h.last_reason, "time"));
		}
		json_object_set_new(o, "limits", limits_view(s, "instance", in->name, NULL, in));
		json_array_append_new(list, o);
	}
	return list;
}

static json_t *hook_routes(void *arg)
{
	struct server *s = arg;
	const struct config *c = s->config;
	json_t *list = json_array();

	for (size_t i = 0; i < c->n_routes; i++) {
		const struct config_route *rt = &c->routes[i];
		json_t *paths = json_array(), *models = json_array(), *targets = json_array();
		for (size_t j = 0; j < rt->n_paths; j++)
			json_array_append_new(paths, json_string(rt->paths[j]));
		for (size_t j = 0; j < rt->n_models; j++)
			json_array_append_new(models, json_string(rt->models[j]));
		for (size_t j = 0; j < rt->n_targets; j++)
			json_array_append_new(targets, json_pack("{s:s, s:i, s:i}", "instance",
			                                         rt->targets[j].instance->name, "priority",
			                                         rt->targets[j].priority, "weight",
			                                         (int)rt->targets[j].weight));
		json_t *o = json_pack("{s:s, s:s, s:o, s:o, s:o}", "name", rt->name, "type",
		                      rt->mcp ? "mcp" : "llm", "paths", paths, "models", models,
		                      "targets", targets);
		/* An MCP route has servers instead of targets (GET /mcp has their state). */
		json_t *servers = rt->mcp && o ? json_array() : NULL;
		for (size_t j = 0; servers && j < rt->mcp->n_servers; j++)
			json_array_append_new(servers, json_string(rt->mcp->servers[j]->name));
		if (servers != NULL)
			json_object_set_new(o, "servers", servers);
		json_array_append_new(list, o);
	}
	return list;
}

static json_t *limits_json(const struct quota_limit_state *st, size_t n)
{
	json_t *list = json_array();
	for (size_t i = 0; i < n; i++) {
		const struct config_limit *l = st[i].limit;
		json_t *o = json_pack("{s:s, s:s?, s:s, s:I, s:I, s:I, s:I, s:s}", "id", l->id,
		                      "instance", l->instance ? l->instance->name : NULL, "kind",
		                      l->requests ? "requests" : config_strategy_name(l->strategy),
		                      "limit", (json_int_t)(l->requests ? l->requests : l->tokens), "used",
		                      (json_int_t)st[i].used, "remaining", (json_int_t)st[i].remaining,
		                      "reset_s", (json_int_t)st[i].reset_s, "window_type",
		                      config_limit_type_name(l->type));
		if (o != NULL && l->requests == 0 && l->strategy == LIMIT_COST) {
			/* Counted in micro-units, shown in price units (docs/quotas.md §4). */
			json_object_set_new(o, "limit",
			                    json_real((double)l->tokens / RECORD_COST_UNIT));
			json_object_set_new(o, "used",
			                    json_real((double)st[i].used / RECORD_COST_UNIT));
			json_object_set_new(o, "remaining",
			                    json_real((double)st[i].remaining / RECORD_COST_UNIT));
		}
		json_array_append_new(list, o);
	}
	return list;
}

/* Quota use: this node's counts (memory store), or the shared view refreshed
 * from Redis every QUOTA_VIEW_MS. */
static json_t *hook_consumers(void *arg)
{
	struct server *s = arg;
	const struct config *c = s->config;
	json_t *list = json_array();
	for (size_t i = 0; i < c->n_consumers; i++) {
		const struct config_consumer *co = &c->consumers[i];
		json_array_append_new(list, json_pack("{s:s, s:i, s:i, s:o}", "name", co->name,
		                                      "max_concurrent", co->max_concurrent, "in_flight",
		                                      quota_concurrency_current(co->name), "limits",
		                                      limits_view(s, "consumer", co->name, co, NULL)));
	}
	return list;
}

static json_t *hook_reload(void *arg, bool *ok)
{
	struct server *s = arg;
	json_t *errors = NULL;
	*ok = server_reload(s, &errors);
	if (*ok)
		return json_pack("{s:b, s:I}", "ok", 1, "generation", (json_int_t)s->generation);
	return json_pack("{s:b, s:o}", "ok", 0, "errors", errors ? errors : json_array());
}

static bool hook_ready(void *arg)
{
	struct server *s = arg;
	return s->ready && !s->draining;
}

/* ---------------------------------------------------------------- run */

int server_run(struct config *cfg, const char *config_path)
{
	struct server s = {0};
	int rc = 1, started = 0;

	if (!tls_check(cfg)) {
		config_unref(cfg);
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	evthread_use_pthreads();
	curl_global_init(CURL_GLOBAL_DEFAULT);

	s.config = cfg;
	s.config_path = config_path;
	s.generation = cfg->generation = 1;
	s.started_unix = (uint64_t)time(NULL);
	apply_logging(cfg);
	s.base = event_base_new();
	s.n_workers = cfg->server.workers;
	s.workers = calloc((size_t)s.n_workers, sizeof(*s.workers));
	if (s.base == NULL || s.workers == NULL)
		goto out;

	health_registry_init();
	if (!mcp_global_init())
		goto out;
	metrics_init(s.n_workers);
	health_set_transition_hook(on_health_transition, NULL);
	metrics_add_gauge_source(gauge_source, &s);
	if (!alerts_init(s.base))
		goto out;
	s.checker = health_checker_new(s.base);
	static const struct admin_hooks hooks = {
		.status = hook_status,
		.instances = hook_instances,
		.consumers = hook_consumers,
		.routes = hook_routes,
		.reload = hook_reload,
		.ready = hook_ready,
	};
	struct admin_hooks h = hooks;
	h.arg = &s;
	s.admin = admin_new(s.base, cfg, &h);
	if (s.checker == NULL || (cfg->admin.address && s.admin == NULL))
		goto out;
	server_prepare(&s, cfg);
	if (!mcp_main_start(s.base))
		goto out;
	s.view = json_object();
	s.view_ev = evtimer_new(s.base, view_refresh, &s);
	if (s.view == NULL || s.view_ev == NULL)
		goto out;
	view_configure(&s, cfg);

	for (int i = 0; i < s.n_workers; i++)
		if (!worker_init(&s, &s.workers[i], i))
			goto out;

	s.sig_hup = evsignal_new(s.base, SIGHUP, on_signal, &s);
	s.sig_term = evsignal_new(s.base, SIGTERM, on_signal, &s);
	s.sig_int = evsignal_new(s.base, SIGINT, on_signal, &s);
	s.sig_usr1 = evsignal_new(s.base, SIGUSR1, on_signal, &s);
	s.drain_ev = evtimer_new(s.base, drain_tick, &s);
	event_add(s.sig_hup, NULL);
	event_add(s.sig_term, NULL);
	event_add(s.sig_int, NULL);
	event_add(s.sig_usr1, NULL);

	for (; started < s.n_workers; started++)
		if (pthread_create(&s.workers[started].thread, NULL, worker_main, &s.workers[started]) != 0) {
			log_error("cannot start worker %d: %s", started, strerror(errno));
			goto out;
		}

	for (size_t i = 0; i < cfg->server.n_listen; i++)
		log_info("listening on %s", cfg->server.listen[i].address);
	log_info("sluice %s ready: %d workers, %zu instances, %zu routes, config sha256 %.12s",
	         SLUICE_VERSION, s.n_workers, cfg->n_instances, cfg->n_routes, cfg->sha256_hex);

	s.ready = true;
	notify_ready();
	notify_status("serving generation %llu with %d workers", (unsigned long long)s.generation,
	              s.n_workers);
	event_base_dispatch(s.base);
	rc = 0;
out:
	for (int i = 0; i < started; i++) {
		worker_post(&s.workers[i], NULL, false, true);
		pthread_join(s.workers[i].thread, NULL);
	}
	if (s.workers)
		for (int i = 0; i < s.n_workers; i++)
			worker_destroy(&s.workers[i]);
	free(s.workers);
	struct event *evs[] = {s.sig_hup, s.sig_term, s.sig_int, s.sig_usr1, s.drain_ev};
	for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
		if (evs[i])
			event_free(evs[i]);
	admin_free(s.admin);
	view_cancel_all(&s);
	free(s.view_pending);
	if (s.view_ev)
		event_free(s.view_ev);
	if (s.view_quota)
		quota_free(s.view_quota);
	json_decref(s.view);
	mcp_main_stop();
	health_checker_free(s.checker);
	alerts_shutdown();
	if (s.base)
		event_base_free(s.base);
	config_unref(s.config);
	accesslog_close();
	metrics_free();
	quota_global_free();
	mcp_global_free();
	health_registry_free();
	curl_global_cleanup();
	if (rc == 0)
		log_info("stopped");
	return rc;
}
