/* mcp_registry.c — what outlives one exchange: MCP server states, the snapshots open sessions
 * run on, and each worker's table of the sessions it has seen.
 *
 * Threads. Each worker owns a struct mcp_worker; its mutex guards the worker's snapshot list
 * and session table and is taken by that worker once per MCP message (uncontended) and by
 * the main thread for a moment at reload, at the sweep (every MCP_SWEEP_MS) and for the
 * admin API. No worker ever takes another worker's lock: the session id carries what
 * routing needs (mcp_session.c), the tables only count and list sessions and decide how
 * long an old snapshot must be kept.
 *
 * Snapshots. Every published snapshot goes into every worker's list. A session names the
 * generation it started on; its messages run on that snapshot as long as it is open. The
 * sweep drops, on every worker, the snapshots that are neither current nor used by a
 * session any worker has seen within the route's session_idle_timeout.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <event2/event.h>

#include "sluice/health.h"
#include "sluice/log.h"
#include "sluice/mcp_parts.h"
#include "sluice/server.h"

#define MCP_SWEEP_MS    1000
#define MAX_WORKERS     256
#define MAX_SNAPS       64
#define SESSION_BUCKETS 256
#define MAX_TOOL_LABELS 256 /* metric labels per server: tools past these count as "other" */

/* ---------------------------------------------------------------- server states */

struct mcp_server_state {
	char *name, *endpoint;
	size_t index; /* 0, 1, 2 … in order of creation: workers' tables are indexed by it */
	_Atomic(struct mcp_server_state *) next;
	atomic_bool retired;
	struct instance_state *health; /* health_state("mcp:<name>") */
	pthread_mutex_t tools_mu;      /* inserts only */
	char *tools[MAX_TOOL_LABELS];  /* published before n_tools grows */
	atomic_size_t n_tools;
};

static _Atomic(struct mcp_server_state *) states;
static pthread_mutex_t states_mu = PTHREAD_MUTEX_INITIALIZER;
static size_t n_states; /* under states_mu */

struct mcp_server_state *mcp_server_state_get(const char *name, const char *endpoint)
{
	struct mcp_server_state *st;
	const char *ep = endpoint ? endpoint : "";

	pthread_mutex_lock(&states_mu);
	for (st = atomic_load(&states); st != NULL; st = atomic_load(&st->next))
		if (!atomic_load(&st->retired) && strcmp(st->name, name) == 0 &&
		    strcmp(st->endpoint, ep) == 0)
			break;
	if (st == NULL && (st = calloc(1, sizeof(*st))) != NULL) {
		char hname[160];
		st->name = strdup(name);
		st->endpoint = strdup(ep);
		st->index = n_states++;
		snprintf(hname, sizeof(hname), "mcp:%s", name);
		st->health = health_state(hname);
		pthread_mutex_init(&st->tools_mu, NULL);
		if (st->name == NULL || st->endpoint == NULL) {
			log_error("mcp: out of memory");
			abort();
		}
		atomic_store(&st->next, atomic_load(&states));
		atomic_store(&states, st);
	}
	pthread_mutex_unlock(&states_mu);
	if (st == NULL) {
		log_error("mcp: out of memory");
		abort();
	}
	return st;
}

size_t mcp_server_index(const struct mcp_server_state *st)
{
	return st->index;
}

const char *mcp_server_endpoint(const struct mcp_server_state *st)
{
	return st->endpoint;
}

bool mcp_server_retired(const struct mcp_server_state *st)
{
	return st == NULL || atomic_load(&((struct mcp_server_state *)st)->retired);
}

struct instance_state *mcp_server_health(const struct mcp_server_state *st)
{
	return st->health;
}

const char *mcp_server_tool_label(struct mcp_server_state *st, const char *tool)
{
	size_t n = atomic_load_explicit(&st->n_tools, memory_order_acquire);
	for (size_t i = 0; tool != NULL && i < n; i++)
		if (strcmp(st->tools[i], tool) == 0)
			return st->tools[i];
	return "other";
}

void mcp_server_tool_learn(struct mcp_server_state *st, const char *tool)
{
	if (strcmp(mcp_server_tool_label(st, tool), "other") != 0 || strlen(tool) > 128)
		return;
	pthread_mutex_lock(&st->tools_mu);
	size_t n = atomic_load(&st->n_tools);
	bool have = false;
	for (size_t i = 0; i < n && !have; i++)
		have = strcmp(st->tools[i], tool) == 0;
	if (!have && n < MAX_TOOL_LABELS && (st->tools[n] = strdup(tool)) != NULL)
		atomic_store_explicit(&st->n_tools, n + 1, memory_order_release);
	pthread_mutex_unlock(&st->tools_mu);
}

/* ---------------------------------------------------------------- workers */

struct sess_entry {
	struct sess_entry *next;
	uint8_t sid[MCP_SID_BYTES];
	uint64_t generation;
	uint16_t route_index;
	char route[64], consumer[64];
	char servers[256]; /* slots' server names, comma-separated, for the admin API */
	uint64_t created_ms, last_ms, idle_ms;
	uint64_t messages;
	bool closed;
	/* The session's servers and their own session ids: what a reload that removes one of
	 * them ends upstream (mcp_reap.c). Allocated with the entry. */
	uint8_t n_up;
	struct mcp_upstream_session *up;
};

struct mcp_worker_shared {
	pthread_mutex_t mu;
	struct config *snaps[MAX_SNAPS]; /* one reference each */
	size_t n_snaps;
	struct sess_entry *buckets[SESSION_BUCKETS];
	size_t n_sessions;
};

size_t mcp_worker_shared_size(void)
{
	return sizeof(struct mcp_worker_shared);
}

/* Defined with the gateway: the part only the worker touches. */
struct mcp_worker *mcp_worker_alloc(struct worker *w);
void mcp_worker_dealloc(struct mcp_worker *mw);
struct mcp_worker_shared *mcp_worker_shared(struct mcp_worker *mw);
void mcp_worker_retired_servers(struct mcp_worker *mw);

static struct mcp_worker *workers[MAX_WORKERS];
static size_t n_workers;
static struct config *published; /* main thread: the last published snapshot, one ref */
static struct event *sweep_ev;

static uint64_t wall_ms(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

static void shared_add_snap(struct mcp_worker_shared *sh, struct config *c)
{
	struct config *drop = NULL;
	pthread_mutex_lock(&sh->mu);
	if (sh->n_snaps == MAX_SNAPS) {
		/* Full of retained snapshots: the oldest goes (its sessions get 404). */
		drop = sh->snaps[0];
		memmove(sh->snaps, sh->snaps + 1, (MAX_SNAPS - 1) * sizeof(sh->snaps[0]));
		sh->n_snaps--;
	}
	sh->snaps[sh->n_snaps++] = config_ref(c);
	pthread_mutex_unlock(&sh->mu);
	config_unref(drop);
}

struct mcp_worker *mcp_worker_new(struct worker *w)
{
	struct mcp_worker *mw = mcp_worker_alloc(w);
	if (mw == NULL)
		return NULL;
	struct mcp_worker_shared *sh = mcp_worker_shared(mw);
	pthread_mutex_init(&sh->mu, NULL);
	if (published != NULL)
		shared_add_snap(sh, published);
	if (n_workers < MAX_WORKERS)
		workers[n_workers++] = mw;
	return mw;
}

void mcp_worker_free(struct mcp_worker *mw)
{
	if (mw == NULL)
		return;
	struct mcp_worker_shared *sh = mcp_worker_shared(mw);
	for (size_t i = 0; i < n_workers; i++)
		if (workers[i] == mw) {
			workers[i] = workers[--n_workers];
			break;
		}
	for (size_t b = 0; b < SESSION_BUCKETS; b++)
		while (sh->buckets[b] != NULL) {
			struct sess_entry *e = sh->buckets[b];
			sh->buckets[b] = e->next;
			free(e);
		}
	for (size_t i = 0; i < sh->n_snaps; i++)
		config_unref(sh->snaps[i]);
	pthread_mutex_destroy(&sh->mu);
	mcp_worker_dealloc(mw);
}

struct config *mcp_worker_snapshot(struct mcp_worker *mw, uint64_t gen)
{
	struct mcp_worker_shared *sh = mcp_worker_shared(mw);
	struct config *c = NULL;
	pthread_mutex_lock(&sh->mu);
	for (size_t i = sh->n_snaps; i-- > 0 && c == NULL;)
		if (sh->snaps[i]->generation == gen)
			c = config_ref(sh->snaps[i]);
	pthread_mutex_unlock(&sh->mu);
	return c;
}

static unsigned sid_bucket(const uint8_t sid[MCP_SID_BYTES])
{
	return (unsigned)(sid[0] | sid[1] << 8) % SESSION_BUCKETS; /* sids are random */
}

void mcp_worker_session_seen(struct mcp_worker *mw, const struct mcp_session *s, const char *route,
                             const char *consumer, uint64_t idle_ms)
{
	struct mcp_worker_shared *sh = mcp_worker_shared(mw);
	unsigned b = sid_bucket(s->sid);
	uint64_t now = wall_ms();
	struct sess_entry *e;

	pthread_mutex_lock(&sh->mu);
	for (e = sh->buckets[b]; e != NULL; e = e->next)
		if (memcmp(e->sid, s->sid, MCP_SID_BYTES) == 0)
			break;
	if (e == NULL && (e = calloc(1, sizeof(*e) + s->n * sizeof(*e->up))) != NULL) {
		/* First message of this session on this worker: one allocation, then none. */
		memcpy(e->sid, s->sid, MCP_SID_BYTES);
		e->n_up = s->n;
		e->up = (struct mcp_upstream_session *)(void *)(e + 1);
		memcpy(e->up, s->up, s->n * sizeof(*e->up));
		e->generation = s->generation;
		e->route_index = s->route;
		snprintf(e->route, sizeof(e->route), "%s", route ? route : "");
		snprintf(e->consumer, sizeof(e->consumer), "%s", consumer ? consumer : "");
		e->created_ms = s->created_ms;
		e->idle_ms = idle_ms;
		e->next = sh->buckets[b];
		sh->buckets[b] = e;
		sh->n_sessions++;
		for (size_t i = 0; i < sh->n_snaps; i++) {
			const struct config *c = sh->snaps[i];
			if (c->generation != s->generation || s->route >= c->n_routes ||
			    c->routes[s->route].mcp == NULL)
				continue;
			const struct mcp_route_conf *rc = c->routes[s->route].mcp;
			size_t o = 0;
			for (unsigned k = 0; k < s->n; k++)
				if (s->up[k].slot < rc->n_servers && o < sizeof(e->servers) - 1)
					o += (size_t)snprintf(
					        e->servers + o, sizeof(e->servers) - o, "%s%s",
					        o ? "," : "", rc->servers[s->up[k].slot]->name);
			break;
		}
	}
	if (e != NULL) {
		e->last_ms = now;
		e->messages++;
	}
	pthread_mutex_unlock(&sh->mu);
}

void mcp_worker_session_closed(struct mcp_worker *mw, const struct mcp_session *s)
{
	struct mcp_worker_shared *sh = mcp_worker_shared(mw);
	pthread_mutex_lock(&sh->mu);
	for (struct sess_entry *e = sh->buckets[sid_bucket(s->sid)]; e != NULL; e = e->next)
		if (memcmp(e->sid, s->sid, MCP_SID_BYTES) == 0)
			e->closed = true;
	pthread_mutex_unlock(&sh->mu);
}

/* ---------------------------------------------------------------- main thread */

/* The session's route in its snapshot (still on the worker's list), or NULL. */
static const struct mcp_route_conf *entry_route(const struct mcp_worker_shared *sh,
                                                const struct sess_entry *e)
{
	for (size_t i = 0; i < sh->n_snaps; i++) {
		const struct config *c = sh->snaps[i];
		if (c->generation == e->generation)
			return e->route_index < c->n_routes ? c->routes[e->route_index].mcp : NULL;
	}
	return NULL;
}

/* Does the session use a retired server (as attach_session sees it)? */
static bool entry_retired(const struct mcp_worker_shared *sh, const struct sess_entry *e)
{
	const struct mcp_route_conf *rc = entry_route(sh, e);
	if (rc == NULL)
		return true; /* its snapshot is gone */
	for (size_t k = 0; k < e->n_up; k++)
		if (e->up[k].slot >= rc->n_servers ||
		    mcp_server_retired(rc->servers[e->up[k].slot]->state))
			return true;
	return false;
}

struct closed_list {
	uint8_t (*sid)[MCP_SID_BYTES];
	size_t n, cap;
};

static void sweep(evutil_socket_t fd, short what, void *arg)
{
	uint64_t now = wall_ms();
	uint64_t *gens = NULL;
	size_t n_gens = 0, cap_gens = 0;
	struct closed_list closed = {0};

	/* 1. Expire idle, closed and ended sessions; note the generations still in use. */
	for (size_t w = 0; w < n_workers; w++) {
		struct mcp_worker_shared *sh = mcp_worker_shared(workers[w]);
		pthread_mutex_lock(&sh->mu);
		for (size_t b = 0; b < SESSION_BUCKETS; b++)
			for (struct sess_entry **pe = &sh->buckets[b]; *pe != NULL;) {
				struct sess_entry *e = *pe;
				bool gone = e->closed || now - e->last_ms > e->idle_ms ||
				            entry_retired(sh, e);
				if (e->closed && closed.n < 4096) {
					if (closed.n == closed.cap) {
						size_t cap = closed.cap ? 2 * closed.cap : 16;
						void *p = realloc(closed.sid, cap * MCP_SID_BYTES);
						if (p != NULL) {
							closed.sid = p;
							closed.cap = cap;
						}
					}
					if (closed.n < closed.cap)
						memcpy(closed.sid[closed.n++], e->sid,
						       MCP_SID_BYTES);
				}
				if (gone) {
					*pe = e->next;
					sh->n_sessions--;
					free(e);
					continue;
				}
				bool seen = false;
				for (size_t g = 0; g < n_gens && !seen; g++)
					seen = gens[g] == e->generation;
				if (!seen) {
					if (n_gens == cap_gens) {
						size_t cap = cap_gens ? 2 * cap_gens : 8;
						uint64_t *p = realloc(gens, cap * sizeof(*p));
						if (p != NULL) {
							gens = p;
							cap_gens = cap;
						}
					}
					if (n_gens < cap_gens)
						gens[n_gens++] = e->generation;
				}
				pe = &e->next;
			}
		pthread_mutex_unlock(&sh->mu);
	}
	/* 2. A session closed on one worker is closed on all; old snapshots nobody uses go. */
	for (size_t w = 0; w < n_workers; w++) {
		struct mcp_worker_shared *sh = mcp_worker_shared(workers[w]);
		struct config *drop[MAX_SNAPS];
		size_t n_drop = 0;
		pthread_mutex_lock(&sh->mu);
		for (size_t k = 0; k < closed.n; k++)
			for (struct sess_entry **pe = &sh->buckets[sid_bucket(closed.sid[k])];
			     *pe != NULL;) {
				struct sess_entry *e = *pe;
				if (memcmp(e->sid, closed.sid[k], MCP_SID_BYTES) == 0) {
					*pe = e->next;
					sh->n_sessions--;
					free(e);
					continue;
				}
				pe = &e->next;
			}
		size_t keep = 0;
		for (size_t i = 0; i < sh->n_snaps; i++) {
			struct config *c = sh->snaps[i];
			bool used = c == published;
			for (size_t g = 0; g < n_gens && !used; g++)
				used = gens[g] == c->generation;
			if (used)
				sh->snaps[keep++] = c;
			else
				drop[n_drop++] = c;
		}
		sh->n_snaps = keep;
		pthread_mutex_unlock(&sh->mu);
		for (size_t i = 0; i < n_drop; i++)
			config_unref(drop[i]);
	}
	free(gens);
	free(closed.sid);
	if (sweep_ev != NULL) {
		struct timeval tv = {MCP_SWEEP_MS / 1000, (MCP_SWEEP_MS % 1000) * 1000};
		event_add(sweep_ev, &tv);
	}
}

bool mcp_global_init(void)
{
	if (!mcp_crypto_random_key()) {
		log_error("mcp: cannot make the session key (RAND_bytes failed)");
		return false;
	}
	return true;
}

/*
 * A reload retired servers: every open session that used one ends (its next message gets
 * 404). Its upstream sessions end too — on its other servers and on the removed one where
 * it still answers: each gets a DELETE with its own Mcp-Session-Id (mcp_reap.c: in the
 * background, bounded, best effort). A session is seen by several workers: once each.
 */
static void end_retired_sessions(void)
{
	uint8_t(*done)[MCP_SID_BYTES] = NULL;
	size_t n_done = 0, cap_done = 0, n_ended = 0;

	for (size_t w = 0; w < n_workers; w++) {
		struct mcp_worker_shared *sh = mcp_worker_shared(workers[w]);
		pthread_mutex_lock(&sh->mu);
		for (size_t b = 0; b < SESSION_BUCKETS; b++)
			for (struct sess_entry *e = sh->buckets[b]; e != NULL; e = e->next) {
				const struct mcp_route_conf *rc = entry_route(sh, e);
				if (e->closed || rc == NULL || !entry_retired(sh, e))
					continue;
				e->closed = true; /* the sweep takes it off every worker */
				bool seen = false;
				for (size_t k = 0; k < n_done && !seen; k++)
					seen = memcmp(done[k], e->sid, MCP_SID_BYTES) == 0;
				if (seen)
					continue;
				if (n_done == cap_done) {
					size_t cap = cap_done ? 2 * cap_done : 16;
					void *p = realloc(done, cap * MCP_SID_BYTES);
					if (p == NULL)
						continue;
					done = p;
					cap_done = cap;
				}
				memcpy(done[n_done++], e->sid, MCP_SID_BYTES);
				n_ended++;
				for (size_t k = 0; k < e->n_up; k++)
					if (e->up[k].sid_len > 0 && e->up[k].slot < rc->n_servers)
						mcp_reap_session(rc->servers[e->up[k].slot],
						                 &e->up[k]);
			}
		pthread_mutex_unlock(&sh->mu);
	}
	free(done);
	if (n_ended > 0)
		log_info("mcp: %zu open session%s used a removed server: ended, and their server "
		         "sessions are being closed (DELETE)",
		         n_ended, n_ended == 1 ? "" : "s");
}

void mcp_probes_start(struct event_base *base);
void mcp_probes_sync(const struct config *c);
void mcp_probes_stop(void);

void mcp_publish(struct config *c)
{
	/* Attach the states; every state this snapshot does not name is retired: its
	 * sessions end (their next message gets 404) and it never comes back. */
	for (size_t i = 0; c->mcp != NULL && i < c->mcp->n_servers; i++) {
		struct mcp_server_conf *s = &c->mcp->servers[i];
		s->state = mcp_server_state_get(s->name, s->endpoint);
		s->as_instance.state = s->state->health;
	}
	for (struct mcp_server_state *st = atomic_load(&states); st != NULL;
	     st = atomic_load(&st->next)) {
		bool used = false;
		for (size_t i = 0; c->mcp != NULL && i < c->mcp->n_servers && !used; i++)
			used = c->mcp->servers[i].state == st;
		if (!used && !atomic_exchange(&st->retired, true))
			log_info("mcp: server %s (%s) is gone from the configuration: its sessions "
			         "end",
			         st->name, st->endpoint);
	}
	end_retired_sessions();
	for (size_t w = 0; w < n_workers; w++) {
		shared_add_snap(mcp_worker_shared(workers[w]), c);
		mcp_worker_retired_servers(workers[w]);
	}
	config_unref(published);
	published = config_ref(c);
	if (sweep_ev != NULL)
		mcp_probes_sync(c);
}

bool mcp_main_start(struct event_base *main_base)
{
	sweep_ev = evtimer_new(main_base, sweep, NULL);
	if (sweep_ev == NULL)
		return false;
	struct timeval tv = {MCP_SWEEP_MS / 1000, (MCP_SWEEP_MS % 1000) * 1000};
	event_add(sweep_ev, &tv);
	mcp_probes_start(main_base);
	mcp_reap_start(main_base);
	if (published != NULL)
		mcp_probes_sync(published);
	return true;
}

void mcp_main_stop(void)
{
	mcp_probes_stop();
	mcp_reap_stop();
	if (sweep_ev != NULL) {
		event_free(sweep_ev);
		sweep_ev = NULL;
	}
}

void mcp_global_free(void)
{
	config_unref(published);
	published = NULL;
	struct mcp_server_state *st = atomic_exchange(&states, NULL);
	while (st != NULL) {
		struct mcp_server_state *next = atomic_load(&st->next);
		for (size_t i = 0; i < atomic_load(&st->n_tools); i++)
			free(st->tools[i]);
		pthread_mutex_destroy(&st->tools_mu);
		free(st->name);
		free(st->endpoint);
		free(st);
		st = next;
	}
}

/* ---------------------------------------------------------------- admin */

json_t *mcp_admin_json(void)
{
	json_t *servers = json_array(), *sessions = json_array();
	struct sess_entry *all = NULL;
	size_t n_all = 0, cap_all = 0;

	/* Sessions: one entry per session, merged over the workers that saw it. */
	for (size_t w = 0; w < n_workers; w++) {
		struct mcp_worker_shared *sh = mcp_worker_shared(workers[w]);
		pthread_mutex_lock(&sh->mu);
		for (size_t b = 0; b < SESSION_BUCKETS; b++)
			for (struct sess_entry *e = sh->buckets[b]; e != NULL; e = e->next) {
				size_t i = 0;
				while (i < n_all && memcmp(all[i].sid, e->sid, MCP_SID_BYTES) != 0)
					i++;
				if (i < n_all) {
					all[i].messages += e->messages;
					if (e->last_ms > all[i].last_ms)
						all[i].last_ms = e->last_ms;
					continue;
				}
				if (n_all == cap_all) {
					size_t cap = cap_all ? 2 * cap_all : 16;
					struct sess_entry *p = realloc(all, cap * sizeof(*p));
					if (p == NULL)
						continue;
					all = p;
					cap_all = cap;
				}
				all[n_all++] = *e;
			}
		pthread_mutex_unlock(&sh->mu);
	}
	for (size_t i = 0; i < n_all; i++) {
		char h[13];
		mcp_session_hash(all[i].sid, h);
		json_array_append_new(sessions,
		                      json_pack("{s:s, s:s, s:s?, s:s, s:I, s:I, s:I, s:I}",
		                                "session", h, "route", all[i].route, "consumer",
		                                all[i].consumer[0] ? all[i].consumer : NULL,
		                                "servers", all[i].servers, "generation",
		                                (json_int_t)all[i].generation, "created_unix_ms",
		                                (json_int_t)all[i].created_ms, "last_seen_unix_ms",
		                                (json_int_t)all[i].last_ms, "messages",
		                                (json_int_t)all[i].messages));
	}
	const struct config *c = published;
	for (size_t i = 0; c != NULL && c->mcp != NULL && i < c->mcp->n_servers; i++) {
		const struct mcp_server_conf *s = &c->mcp->servers[i];
		struct health_snapshot hs;
		size_t open = 0;
		health_snapshot(s->state->health, &hs);
		for (size_t k = 0; k < n_all; k++) {
			/* the comma list holds whole names */
			const char *p = all[k].servers;
			size_t nl = strlen(s->name);
			for (; (p = strstr(p, s->name)) != NULL; p += nl)
				if ((p == all[k].servers || p[-1] == ',') &&
				    (p[nl] == ',' || p[nl] == '\0')) {
					open++;
					break;
				}
		}
		json_t *o = json_pack("{s:s, s:s, s:b, s:s, s:s, s:b, s:I, s:I, s:I}", "name",
		                      s->name, "endpoint", s->endpoint, "healthy", hs.healthy,
		                      "last_reason", hs.last_reason, "last_source", hs.source,
		                      "active_checks", s->check.enabled, "open_sessions",
		                      (json_int_t)open, "probes_ok", (json_int_t)hs.probes_ok,
		                      "probes_failed", (json_int_t)hs.probes_failed);
		json_array_append_new(servers, o);
	}
	free(all);
	return json_pack("{s:o, s:I, s:o}", "servers", servers, "open_sessions", (json_int_t)n_all,
	                 "sessions", sessions);
}
