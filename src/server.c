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

#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/request.h"
#include "sluice/upstream.h"

#define DRAIN_CHECK_MS 20
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
	uint64_t generation;
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

static long maxconnects_from(const struct config *c)
{
	long n = 0;
	for (size_t i = 0; i < c->n_instances; i++)
		n += c->instances[i].keepalive.pool;
	return n;
}

/* ---------------------------------------------------------------- workers */

static void worker_apply_config(struct worker *w, struct config *c)
{
	struct http_limits lim;
	http_limits_from(c, &lim);
	if (w->http)
		http_server_set_limits(w->http, &lim);
	upstream_set_maxconnects(w->upstream, maxconnects_from(c));
}

static void worker_drain_check(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	/* Done when no request is live and every connection has flushed its
	 * last response and closed (drain closes them as their replies end). */
	if (TAILQ_EMPTY(&w->requests) && http_server_connections(w->http) == 0) {
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
		worker_drain_check(-1, 0, w);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	event_base_dispatch(w->base);
	/* Drained, or forced at drain_timeout: whatever is still here is cut. */
	request_abort_all(w);
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
	w->base = event_base_new();
	if (w->base == NULL)
		return false;
	w->upstream = upstream_new(w->base);
	w->wake_ev = event_new(w->base, -1, 0, worker_wake, w);
	w->drain_check_ev = evtimer_new(w->base, worker_drain_check, w);
	if (w->upstream == NULL || w->wake_ev == NULL || w->drain_check_ev == NULL)
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
	w->config = config_ref(c);
	worker_apply_config(w, c);
	return true;
}

static void worker_destroy(struct worker *w)
{
	if (w->http)
		http_server_free(w->http);
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

/* ---------------------------------------------------------------- reload */

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

static void server_reload(struct server *s)
{
	struct config_errors errs = {0};
	struct config *c = config_load(s->config_path, &errs);

	if (c == NULL) {
		for (size_t i = 0; i < errs.n; i++)
			log_error("reload rejected: %s", errs.msgs[i]);
		if (errs.dropped)
			log_error("reload rejected: ... and %zu more errors", errs.dropped);
		log_error("reload of %s failed with %zu error(s); still serving generation %llu",
		          s->config_path, errs.n + errs.dropped, (unsigned long long)s->generation);
		config_errors_free(&errs);
		return;
	}
	if (!same_listeners(s->config, c))
		log_warn("reload: server.listen changed; listeners change only on restart");
	if (c->server.workers != s->config->server.workers)
		log_warn("reload: server.workers changed; the worker count changes only on restart");
	c->generation = ++s->generation;
	apply_logging(c);
	for (int i = 0; i < s->n_workers; i++)
		worker_post(&s->workers[i], c, false, false);
	config_unref(s->config);
	s->config = c;
	log_info("reloaded %s: generation %llu, sha256 %.12s, %zu instances, %zu routes",
	         s->config_path, (unsigned long long)c->generation, c->sha256_hex, c->n_instances,
	         c->n_routes);
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
		server_reload(s);
		break;
	case SIGUSR1:
		log_reopen();
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

/* ---------------------------------------------------------------- run */

int server_run(struct config *cfg, const char *config_path)
{
	struct server s = {0};
	int rc = 1, started = 0;

	signal(SIGPIPE, SIG_IGN);
	evthread_use_pthreads();
	curl_global_init(CURL_GLOBAL_DEFAULT);

	s.config = cfg;
	s.config_path = config_path;
	s.generation = cfg->generation = 1;
	apply_logging(cfg);
	s.base = event_base_new();
	s.n_workers = cfg->server.workers;
	s.workers = calloc((size_t)s.n_workers, sizeof(*s.workers));
	if (s.base == NULL || s.workers == NULL)
		goto out;

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
	if (s.base)
		event_base_free(s.base);
	config_unref(s.config);
	curl_global_cleanup();
	if (rc == 0)
		log_info("stopped");
	return rc;
}
