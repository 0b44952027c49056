/* metrics.c — Prometheus metrics: per-worker shards of labelled series, summed at scrape time.
 *
 * Why shards: every request updates a dozen series; a counter shared by all
 * workers would bounce its cache line between cores on every request. Each
 * worker therefore writes only its own shard, and the scrape, which happens a
 * few times a minute, pays for the sum.
 *
 * A shard is a fixed array of hash chains. A series is found by hashing its
 * family and label tuple (a few short strings). A new series is fully built,
 * then published at the head of its chain with a release store; a reader that
 * loads the head with acquire sees it complete, and chains only ever grow at the
 * head, so the scrape walks them without a lock while the owner inserts. Values
 * are _Atomic uint64_t updated with relaxed operations by their only writer
 * (plain add on x86) and read relaxed by the scrape: race-free, no fences.
 *
 * The rare events (health transitions, reloads, store errors) may come from
 * any thread: they go to one more shard whose inserts and increments are made
 * under a mutex.
 */
#include "sluice/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <event2/buffer.h>

#include "sluice/log.h"
#include "sluice/record.h"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

#define SHARD_SLOTS        512 /* hash chains per shard: a few hundred series stay one or two deep */
#define MAX_LABELS         5   /* string labels per series; a family may add one coded label */
#define MAX_GAUGE_SOURCES  16
#define RECENT_TRANSITIONS 64

#define MS_NS 1000000ull
#define S_NS  1000000000ull

/* ---------------------------------------------------------------- families */

enum family {
	F_REQUESTS,
	F_UPSTREAM_RESPONSES,
	F_ATTEMPTS,
	F_FALLBACKS,
	F_QUOTA_REJECTIONS,
	F_TOKENS,
	F_COST,
	F_REQUEST_DURATION,
	F_UPSTREAM_DURATION,
	F_TTFT,
	F_TPOT,
	F_OVERHEAD,
	F_HEALTH_TRANSITIONS,
	F_RELOADS,
	F_STORE_ERRORS,
	F_MCP_REQUESTS,
	F_MCP_DURATION,
	F_POLICY_ACTIONS,
	F_COUNT
};

/* How the integer part of a series key is shown. */
enum code_kind {
	CODE_NONE,
	CODE_STATUS,     /* code="200" */
	CODE_TOKEN_KIND, /* kind="prompt",estimated="false": kind * 2 + estimated */
};

enum token_kind { TOKEN_PROMPT, TOKEN_COMPLETION, TOKEN_CACHED, TOKEN_REASONING, TOKEN_KINDS };
static const char *const token_kind_names[TOKEN_KINDS] = {"prompt", "completion", "cached",
                                                          "reasoning"};

/* Bucket upper bounds in nanoseconds. LLM calls take from milliseconds (a
 * cached short answer) to minutes (a long generation), hence 5 ms … 120 s. */
static const uint64_t latency_bounds[] = {
        5 * MS_NS,   10 * MS_NS,  25 * MS_NS, 50 * MS_NS,   100 * MS_NS,
        250 * MS_NS, 500 * MS_NS, 1 * S_NS,   2500 * MS_NS, 5 * S_NS,
        10 * S_NS,   20 * S_NS,   30 * S_NS,  60 * S_NS,    120 * S_NS,
};
/* Time per output token: 1 ms (small model on a big GPU) … 1 s (overloaded). */
static const uint64_t token_bounds[] = {
        1 * MS_NS,  2500000,     5 * MS_NS,   10 * MS_NS,  20 * MS_NS,  30 * MS_NS, 50 * MS_NS,
        75 * MS_NS, 100 * MS_NS, 150 * MS_NS, 250 * MS_NS, 500 * MS_NS, 1 * S_NS,
};
/* The gateway's own time per request: 50 µs … 100 ms. */
static const uint64_t overhead_bounds[] = {
        50000,     100000,     250000,     500000,     1 * MS_NS,   2500000,
        5 * MS_NS, 10 * MS_NS, 25 * MS_NS, 50 * MS_NS, 100 * MS_NS,
};

#define NB(a) (sizeof(a) / sizeof((a)[0]))

struct family_desc {
	const char *name;
	const char *help;
	const char *labels[MAX_LABELS]; /* names of the string labels, NULL-padded */
	const uint64_t *bounds;         /* histograms */
	size_t n_bounds;
	enum code_kind code;
	bool histogram;
	bool micros; /* counted in micro-units, shown in units (exact decimals) */
};

#define BOUNDS(a) .bounds = (a), .n_bounds = NB(a)

static const struct family_desc families[F_COUNT] = {
        [F_REQUESTS] = {.name = "sluice_requests_total",
                        .help = "Requests answered, by route, consumer and the status code sent "
                                "to the client.",
                        .labels = {"route", "consumer"},
                        .code = CODE_STATUS},
        [F_UPSTREAM_RESPONSES] = {.name = "sluice_upstream_responses_total",
                                  .help = "Responses received from upstream instances, by "
                                          "status code.",
                                  .labels = {"upstream"},
                                  .code = CODE_STATUS},
        [F_ATTEMPTS] = {.name = "sluice_attempts_total",
                        .help = "Attempts at an instance, by outcome (ok, http_<status>, "
                                "timeout, connect_error, upstream_error, unhealthy, quota, "
                                "client_gone).",
                        .labels = {"upstream", "outcome"}},
        [F_FALLBACKS] = {.name = "sluice_fallbacks_total",
                         .help = "Attempts after which the request moved on to another "
                                 "instance, by the instance left and the reason.",
                         .labels = {"route", "upstream", "reason"}},
        [F_QUOTA_REJECTIONS] = {.name = "sluice_quota_rejections_total",
                                .help = "Requests refused with 429 by a quota, by consumer and "
                                        "limit id.",
                                .labels = {"consumer", "limit"}},
        [F_TOKENS] = {.name = "sluice_tokens_total",
                      .help = "Tokens by consumer, upstream instance and kind; "
                              "estimated=\"true\" when the upstream reported no usage and "
                              "Sluice estimated it.",
                      .labels = {"consumer", "upstream"},
                      .code = CODE_TOKEN_KIND},
        [F_COST] = {.name = "sluice_cost_total",
                    .help = "What the usage of answered requests cost at the answering "
                            "instance's price, in its price units, by route, instance and "
                            "consumer; only instances with a price.",
                    .labels = {"route", "instance", "consumer"},
                    .micros = true},
        [F_REQUEST_DURATION] = {.name = "sluice_request_duration_seconds",
                                .help = "Time from a request's arrival to its last byte, by "
                                        "route.",
                                .histogram = true,
                                .labels = {"route"},
                                BOUNDS(latency_bounds)},
        [F_UPSTREAM_DURATION] = {.name = "sluice_upstream_duration_seconds",
                                 .help = "Duration of each attempt that reached an instance, "
                                         "by instance.",
                                 .histogram = true,
                                 .labels = {"upstream"},
                                 BOUNDS(latency_bounds)},
        [F_TTFT] = {.name = "sluice_time_to_first_token_seconds",
                    .help = "Streamed requests: time from arrival to the first byte sent to "
                            "the client, by instance.",
                    .histogram = true,
                    .labels = {"upstream"},
                    BOUNDS(latency_bounds)},
        [F_TPOT] = {.name = "sluice_time_per_output_token_seconds",
                    .help = "Streamed requests: (total - time to first token) / completion "
                            "tokens, by instance.",
                    .histogram = true,
                    .labels = {"upstream"},
                    BOUNDS(token_bounds)},
        [F_OVERHEAD] = {.name = "sluice_gateway_overhead_seconds",
                        .help = "Time a request spent in the gateway itself (total minus "
                                "upstream time).",
                        .histogram = true,
                        BOUNDS(overhead_bounds)},
        [F_HEALTH_TRANSITIONS] = {.name = "sluice_health_transitions_total",
                                  .help = "Instance health transitions, by the state entered.",
                                  .labels = {"upstream", "to"}},
        [F_RELOADS] = {.name = "sluice_config_reloads_total",
                       .help = "Configuration reloads, by result (ok, error).",
                       .labels = {"result"}},
        [F_STORE_ERRORS] = {.name = "sluice_store_errors_total",
                            .help = "Errors talking to the counter store, by store.",
                            .labels = {"store"}},
        [F_MCP_REQUESTS] = {.name = "sluice_mcp_requests_total",
                            .help = "MCP messages, by route, server (empty: every server of "
                                    "the session), JSON-RPC method, tool (a tool the server "
                                    "listed, or other) and outcome.",
                            .labels = {"route", "server", "method", "tool", "outcome"}},
        [F_MCP_DURATION] = {.name = "sluice_mcp_request_duration_seconds",
                            .help = "Time from an MCP message's arrival to the end of its "
                                    "answer, by route, server and method.",
                            .histogram = true,
                            .labels = {"route", "server", "method"},
                            BOUNDS(latency_bounds)},
        [F_POLICY_ACTIONS] = {.name = "sluice_policy_actions_total",
                              .help = "Decisions of the routes' policies (plugins), by route, "
                                      "policy and action (blocked, masked, cut, ...).",
                              .labels = {"route", "policy", "action"}},
};

static size_t family_n_labels(const struct family_desc *d)
{
	size_t n = 0;
	while (n < MAX_LABELS && d->labels[n] != NULL)
		n++;
	return n;
}

/* ---------------------------------------------------------------- series and shards */

struct series {
	struct series *next; /* chain; set before publication, immutable after */
	uint64_t hash;
	enum family fam;
	int code;
	char *label[MAX_LABELS];   /* owned; "" for absent */
	_Atomic uint64_t value;    /* counters */
	_Atomic uint64_t sum_ns;   /* histograms */
	_Atomic uint64_t bucket[]; /* histograms: n_bounds + 1 (the last is +Inf); not cumulative */
};

/* The last series found for a family, code and label pointers (the same route, consumer and
 * instance strings come back request after request): the hash over the label bytes is
 * skipped on a hit, which is still checked by comparing the labels' bytes — a pointer may be
 * reused for other bytes after a reload. Only the shard's writer reads or writes it. */
#define MEMO_SLOTS 64
struct series_memo {
	struct series *p;
	const char *l[MAX_LABELS];
	int fam, code;
};

struct metrics_shard {
	struct series *_Atomic heads[SHARD_SLOTS];
	struct series_memo memo[MEMO_SLOTS];
};

static struct metrics_shard **shards; /* [n_shards], owned; one per worker */
static int n_shards;

/* Events from any thread: inserts and increments under events_lock. */
static struct metrics_shard events_shard;
static pthread_mutex_t events_lock = PTHREAD_MUTEX_INITIALIZER;

struct transition {
	uint64_t unix_ms;
	bool healthy;
	char instance[96];
	char reason[192];
};
static struct transition recent[RECENT_TRANSITIONS]; /* ring, under events_lock */
static size_t recent_next, recent_count;

static _Atomic int last_reload_ok = 1;
static _Atomic uint64_t last_reload_success_ms;
static _Atomic uint64_t start_ms;

struct gauge_source {
	metrics_gauge_fn fn;
	void *arg;
};
static struct gauge_source gauge_sources[MAX_GAUGE_SOURCES];
static size_t n_gauge_sources;
static pthread_mutex_t gauge_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t unix_ms_now(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

static uint64_t hash_bytes(uint64_t h, const char *s)
{
	/* FNV-1a; the 0xff separator keeps ("ab","c") apart from ("a","bc"). */
	for (; *s; s++) {
		h ^= (unsigned char)*s;
		h *= 0x100000001b3ull;
	}
	h ^= 0xff;
	h *= 0x100000001b3ull;
	return h;
}

static uint64_t series_hash(enum family f, const char *const *l, size_t n, int code)
{
	uint64_t h = 0xcbf29ce484222325ull ^ (uint64_t)f;
	for (size_t i = 0; i < n; i++)
		h = hash_bytes(h, l[i]);
	h ^= (uint64_t)(unsigned)code;
	h *= 0x100000001b3ull;
	return h ^ (h >> 29);
}

static void series_free(struct series *p)
{
	for (size_t i = 0; i < MAX_LABELS; i++)
		free(p->label[i]);
	free(p);
}

/*
 * The series of (f, labels, code) in shard s, created on first use. Only the
 * shard's writer calls this (for the events shard: under events_lock). NULL
 * only when out of memory: the observation is then dropped.
 */
static struct series *series_get(struct metrics_shard *s, enum family f,
                                 const char *const in[MAX_LABELS], int code)
{
	const struct family_desc *d = &families[f];
	const char *l[MAX_LABELS];
	size_t n = family_n_labels(d);
	for (size_t i = 0; i < MAX_LABELS; i++)
		l[i] = in[i] ? in[i] : "";
	uint64_t mh = (uint64_t)f * 0x9e3779b97f4a7c15ull ^ (uint64_t)(unsigned)code;
	for (size_t i = 0; i < n; i++)
		mh = (mh ^ (uint64_t)(uintptr_t)l[i]) * 0x100000001b3ull;
	struct series_memo *m = &s->memo[(mh ^ (mh >> 32)) % MEMO_SLOTS];
	if (m->p != NULL && m->fam == (int)f && m->code == code) {
		size_t i = 0;
		while (i < n && m->l[i] == l[i] && strcmp(m->p->label[i], l[i]) == 0)
			i++;
		if (i == n)
			return m->p;
	}

	uint64_t h = series_hash(f, l, n, code);
	_Atomic(struct series *) *head = &s->heads[h % SHARD_SLOTS];

	for (struct series *p = atomic_load_explicit(head, memory_order_acquire); p; p = p->next) {
		if (p->hash != h || p->fam != f || p->code != code)
			continue;
		size_t i = 0;
		while (i < n && strcmp(p->label[i], l[i]) == 0)
			i++;
		if (i == n) {
			*m = (struct series_memo){.p = p, .fam = (int)f, .code = code};
			memcpy(m->l, l, n * sizeof(l[0]));
			return p;
		}
	}

	size_t nb = d->histogram ? d->n_bounds + 1 : 0;
	struct series *p = calloc(1, sizeof(*p) + nb * sizeof(p->bucket[0]));
	if (p == NULL)
		return NULL;
	p->hash = h;
	p->fam = f;
	p->code = code;
	for (size_t i = 0; i < n; i++) {
		p->label[i] = strdup(l[i]);
		if (p->label[i] == NULL) {
			series_free(p);
			return NULL;
		}
	}
	p->next = atomic_load_explicit(head, memory_order_relaxed);
	atomic_store_explicit(head, p, memory_order_release);
	return p;
}

/* Relaxed read-modify-write by the only writer: no lock prefix needed, but
 * still an atomic access, so the concurrent scrape read is not a data race. */
static inline void add_relaxed(_Atomic uint64_t *v, uint64_t n)
{
	atomic_store_explicit(v, atomic_load_explicit(v, memory_order_relaxed) + n,
	                      memory_order_relaxed);
}

static void counter_add(struct metrics_shard *s, enum family f, const char *a, const char *b,
                        const char *c, int code, uint64_t n)
{
	const char *const l[MAX_LABELS] = {a, b, c};
	struct series *p = series_get(s, f, l, code);
	if (p)
		add_relaxed(&p->value, n);
}

static void observe_labels(struct metrics_shard *s, enum family f, const char *const l[MAX_LABELS],
                           uint64_t ns)
{
	const struct family_desc *d = &families[f];
	struct series *p = series_get(s, f, l, 0);
	if (p == NULL)
		return;
	size_t i = 0;
	while (i < d->n_bounds && ns > d->bounds[i])
		i++;
	add_relaxed(&p->bucket[i], 1);
	add_relaxed(&p->sum_ns, ns);
}

static void observe(struct metrics_shard *s, enum family f, const char *a, uint64_t ns)
{
	const char *const l[MAX_LABELS] = {a};
	observe_labels(s, f, l, ns);
}

void metrics_record_mcp(struct metrics_shard *s, const char *route, const char *server,
                        const char *method, const char *tool, const char *outcome,
                        uint64_t duration_us)
{
	if (s == NULL)
		return;
	const char *const l[MAX_LABELS] = {route, server, method, tool, outcome};
	struct series *p = series_get(s, F_MCP_REQUESTS, l, 0);
	if (p)
		add_relaxed(&p->value, 1);
	const char *const d[MAX_LABELS] = {route, server, method};
	observe_labels(s, F_MCP_DURATION, d, duration_us * 1000u);
}

static void shard_clear(struct metrics_shard *s)
{
	for (size_t i = 0; i < SHARD_SLOTS; i++) {
		struct series *p = atomic_load_explicit(&s->heads[i], memory_order_acquire);
		while (p) {
			struct series *next = p->next;
			series_free(p);
			p = next;
		}
		atomic_store_explicit(&s->heads[i], NULL, memory_order_relaxed);
	}
	memset(s->memo, 0, sizeof(s->memo));
}

/* ---------------------------------------------------------------- public: recording */

void metrics_init(int n_workers)
{
	if (shards != NULL) {
		log_warn("metrics_init called twice; keeping the first shards");
		return;
	}
	if (n_workers < 1)
		n_workers = 1;
	shards = calloc((size_t)n_workers, sizeof(*shards));
	if (shards == NULL) {
		log_error("metrics: out of memory");
		return;
	}
	for (int i = 0; i < n_workers; i++) {
		shards[i] = calloc(1, sizeof(*shards[i]));
		if (shards[i] == NULL) {
			log_error("metrics: out of memory");
			break;
		}
		n_shards = i + 1;
	}
	uint64_t now = unix_ms_now();
	atomic_store(&start_ms, now);
	atomic_store(&last_reload_success_ms, now); /* the initial load counts as one */
	atomic_store(&last_reload_ok, 1);
}

struct metrics_shard *metrics_shard(int worker_id)
{
	if (worker_id < 0 || worker_id >= n_shards)
		return NULL;
	return shards[worker_id];
}

static bool outcome_is_skip(const char *o)
{
	/* Candidates passed over without a call: no upstream time to observe. */
	return strcmp(o, "unhealthy") == 0 || strcmp(o, "quota") == 0 ||
	       strcmp(o, "unsupported") == 0;
}

void metrics_record_policies(struct metrics_shard *s, const char *route,
                             const struct record_policy *p, int n)
{
	if (s == NULL || p == NULL)
		return;
	/* Policy names come from the configuration, actions from a fixed set per policy. */
	for (int i = 0; i < n && i < RECORD_MAX_POLICY_ACTIONS; i++)
		counter_add(s, F_POLICY_ACTIONS, route, p[i].policy, p[i].action, 0, p[i].count);
}

void metrics_record_request(struct metrics_shard *s, const struct request_record *r)
{
	if (s == NULL || r == NULL)
		return;
	const char *route = r->route ? r->route : "";
	const char *consumer = r->consumer ? r->consumer : "";
	const char *instance = r->instance ? r->instance : "";
	int n = r->n_attempts;
	if (n < 0)
		n = 0;
	if (n > RECORD_MAX_ATTEMPTS)
		n = RECORD_MAX_ATTEMPTS;

	counter_add(s, F_REQUESTS, route, consumer, NULL, r->status, 1);
	metrics_record_policies(s, route, r->policies, r->n_policies);

	for (int i = 0; i < n; i++) {
		const struct record_attempt *a = &r->attempts[i];
		const char *ai = a->instance ? a->instance : "";
		const char *outcome = a->outcome ? a->outcome : "none";
		counter_add(s, F_ATTEMPTS, ai, outcome, NULL, 0, 1);
		if (a->status > 0)
			counter_add(s, F_UPSTREAM_RESPONSES, ai, NULL, NULL, a->status, 1);
		if (!outcome_is_skip(outcome))
			observe(s, F_UPSTREAM_DURATION, ai, a->latency_us * 1000u);
		if (i < n - 1)
			counter_add(s, F_FALLBACKS, route, ai, outcome, 0, 1);
	}

	observe(s, F_REQUEST_DURATION, route, r->total_us * 1000u);
	observe(s, F_OVERHEAD, NULL, r->overhead_us * 1000u);

	bool ok = r->status >= 200 && r->status < 300;
	if (r->stream && ok && r->ttft_us > 0) {
		observe(s, F_TTFT, instance, r->ttft_us * 1000u);
		if (r->usage.present && r->usage.completion > 0 && r->total_us > r->ttft_us)
			observe(s, F_TPOT, instance,
			        (r->total_us - r->ttft_us) * 1000u / r->usage.completion);
	}

	if (r->usage.present) {
		const uint64_t v[TOKEN_KINDS] = {r->usage.prompt, r->usage.completion,
		                                 r->usage.cached, r->usage.reasoning};
		int est = r->usage.estimated ? 1 : 0;
		for (int k = 0; k < TOKEN_KINDS; k++)
			if (v[k] > 0)
				counter_add(s, F_TOKENS, consumer, instance, NULL, k * 2 + est,
				            v[k]);
	}

	if (r->priced)
		counter_add(s, F_COST, route, instance, consumer, 0, r->cost_micros);

	if (r->status == 429 && r->limit_id != NULL)
		counter_add(s, F_QUOTA_REJECTIONS, consumer, r->limit_id, NULL, 0, 1);
}

static void event_count(enum family f, const char *a, const char *b)
{
	pthread_mutex_lock(&events_lock);
	counter_add(&events_shard, f, a, b, NULL, 0, 1);
	pthread_mutex_unlock(&events_lock);
}

void metrics_health_event(const char *instance, bool healthy, const char *reason)
{
	const char *name = instance ? instance : "";
	pthread_mutex_lock(&events_lock);
	counter_add(&events_shard, F_HEALTH_TRANSITIONS, name, healthy ? "healthy" : "unhealthy",
	            NULL, 0, 1);
	struct transition *t = &recent[recent_next];
	t->unix_ms = unix_ms_now();
	t->healthy = healthy;
	snprintf(t->instance, sizeof(t->instance), "%s", name);
	snprintf(t->reason, sizeof(t->reason), "%s", reason ? reason : "");
	recent_next = (recent_next + 1) % RECENT_TRANSITIONS;
	if (recent_count < RECENT_TRANSITIONS)
		recent_count++;
	pthread_mutex_unlock(&events_lock);
}

void metrics_health_transition(const char *instance, bool healthy)
{
	metrics_health_event(instance, healthy, NULL);
}

void metrics_reload(bool ok)
{
	event_count(F_RELOADS, ok ? "ok" : "error", NULL);
	atomic_store(&last_reload_ok, ok ? 1 : 0);
	if (ok)
		atomic_store(&last_reload_success_ms, unix_ms_now());
}

void metrics_store_error(const char *store)
{
	event_count(F_STORE_ERRORS, store ? store : "", NULL);
}

json_t *metrics_recent_transitions(void)
{
	json_t *arr = json_array();
	pthread_mutex_lock(&events_lock);
	for (size_t i = 0; i < recent_count; i++) {
		const struct transition *t =
		        &recent[(recent_next + RECENT_TRANSITIONS - 1 - i) % RECENT_TRANSITIONS];
		char when[32];
		time_t sec = (time_t)(t->unix_ms / 1000);
		struct tm tm;
		gmtime_r(&sec, &tm);
		size_t w = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
		snprintf(when + w, sizeof(when) - w, ".%03uZ", (unsigned)(t->unix_ms % 1000));
		json_array_append_new(arr, json_pack("{s:s, s:b, s:s, s:s}", "instance",
		                                     t->instance, "healthy", t->healthy, "reason",
		                                     t->reason, "time", when));
	}
	pthread_mutex_unlock(&events_lock);
	return arr;
}

/* ---------------------------------------------------------------- gauge sources */

void metrics_add_gauge_source(metrics_gauge_fn fn, void *arg)
{
	pthread_mutex_lock(&gauge_lock);
	if (n_gauge_sources < MAX_GAUGE_SOURCES)
		gauge_sources[n_gauge_sources++] = (struct gauge_source){fn, arg};
	else
		log_error("metrics: more than %d gauge sources; ignoring one", MAX_GAUGE_SOURCES);
	pthread_mutex_unlock(&gauge_lock);
}

void metrics_remove_gauge_source(metrics_gauge_fn fn, void *arg)
{
	pthread_mutex_lock(&gauge_lock);
	for (size_t i = 0; i < n_gauge_sources; i++) {
		if (gauge_sources[i].fn == fn && gauge_sources[i].arg == arg) {
			memmove(&gauge_sources[i], &gauge_sources[i + 1],
			        (n_gauge_sources - i - 1) * sizeof(gauge_sources[0]));
			n_gauge_sources--;
			break;
		}
	}
	pthread_mutex_unlock(&gauge_lock);
}

/* ---------------------------------------------------------------- exposition helpers */

/* Label values: backslash, double quote and line feed are escaped. */
static void put_label_value(struct evbuffer *out, const char *v)
{
	const char *run = v;
	for (const char *p = v; *p; p++) {
		const char *esc = *p == '\\'   ? "\\\\"
		                  : *p == '"'  ? "\\\""
		                  : *p == '\n' ? "\\n"
		                               : NULL;
		if (esc == NULL)
			continue;
		evbuffer_add(out, run, (size_t)(p - run));
		evbuffer_add(out, esc, 2);
		run = p + 1;
	}
	evbuffer_add(out, run, strlen(run));
}

/* HELP text: backslash and line feed are escaped (quotes are not). */
static void put_help(struct evbuffer *out, const char *v)
{
	const char *run = v;
	for (const char *p = v; *p; p++) {
		const char *esc = *p == '\\' ? "\\\\" : *p == '\n' ? "\\n" : NULL;
		if (esc == NULL)
			continue;
		evbuffer_add(out, run, (size_t)(p - run));
		evbuffer_add(out, esc, 2);
		run = p + 1;
	}
	evbuffer_add(out, run, strlen(run));
}

void metrics_write_family(struct evbuffer *out, const char *name, const char *type,
                          const char *help)
{
	evbuffer_add_printf(out, "# HELP %s ", name);
	put_help(out, help ? help : "");
	evbuffer_add_printf(out, "\n# TYPE %s %s\n", name, type);
}

static void put_double(struct evbuffer *out, double v)
{
	if (isnan(v))
		evbuffer_add(out, "NaN", 3);
	else if (isinf(v))
		evbuffer_add_printf(out, "%sInf", v > 0 ? "+" : "-");
	else
		evbuffer_add_printf(out, "%.15g", v);
}

void metrics_write_sample(struct evbuffer *out, const char *name, const char *const *labels,
                          double value)
{
	evbuffer_add(out, name, strlen(name));
	if (labels && labels[0]) {
		evbuffer_add(out, "{", 1);
		for (size_t i = 0; labels[i] && labels[i + 1]; i += 2) {
			evbuffer_add_printf(out, "%s%s=\"", i ? "," : "", labels[i]);
			put_label_value(out, labels[i + 1]);
			evbuffer_add(out, "\"", 1);
		}
		evbuffer_add(out, "}", 1);
	}
	evbuffer_add(out, " ", 1);
	put_double(out, value);
	evbuffer_add(out, "\n", 1);
}

void metrics_write_upstreams(struct evbuffer *out, const struct metrics_upstream_state *v, size_t n)
{
	metrics_write_family(out, "sluice_upstream_healthy", "gauge",
	                     "1 when the instance is healthy, 0 when it is not.");
	for (size_t i = 0; i < n; i++) {
		const char *const l[] = {"upstream", v[i].name ? v[i].name : "", NULL};
		metrics_write_sample(out, "sluice_upstream_healthy", l, v[i].healthy ? 1 : 0);
	}
	metrics_write_family(out, "sluice_upstream_inflight", "gauge",
	                     "Requests in flight to the instance, all workers together.");
	for (size_t i = 0; i < n; i++) {
		const char *const l[] = {"upstream", v[i].name ? v[i].name : "", NULL};
		metrics_write_sample(out, "sluice_upstream_inflight", l, (double)v[i].inflight);
	}
}

void metrics_write_connections(struct evbuffer *out, unsigned long long open,
                               unsigned long long accept_errors)
{
	metrics_write_family(out, "sluice_open_connections", "gauge",
	                     "Client connections open on the traffic listeners.");
	metrics_write_sample(out, "sluice_open_connections", NULL, (double)open);
	metrics_write_family(out, "sluice_accept_errors_total", "counter",
	                     "accept() calls on the traffic listeners that failed (out of file "
	                     "descriptors or memory); the listener rests and retries.");
	metrics_write_sample(out, "sluice_accept_errors_total", NULL, (double)accept_errors);
}

/* Nanoseconds as exact decimal seconds: 5000000 -> "0.005", 120e9 -> "120". */
static void format_seconds(char *buf, size_t len, uint64_t ns)
{
	uint64_t sec = ns / S_NS, frac = ns % S_NS;
	if (frac == 0) {
		snprintf(buf, len, "%" PRIu64, sec);
		return;
	}
	char digits[16];
	snprintf(digits, sizeof(digits), "%09" PRIu64, frac);
	size_t n = 9;
	while (digits[n - 1] == '0')
		n--;
	digits[n] = '\0';
	snprintf(buf, len, "%" PRIu64 ".%s", sec, digits);
}

/* name{labels of p[,extra]} — the caller adds the value. */
static void put_series_name(struct evbuffer *out, const struct series *p, const char *suffix,
                            const char *extra_name, const char *extra_value)
{
	const struct family_desc *d = &families[p->fam];
	size_t n = family_n_labels(d);
	bool any = false;

	evbuffer_add_printf(out, "%s%s", d->name, suffix);
	for (size_t i = 0; i < n; i++) {
		evbuffer_add_printf(out, "%s%s=\"", any ? "," : "{", d->labels[i]);
		put_label_value(out, p->label[i]);
		evbuffer_add(out, "\"", 1);
		any = true;
	}
	if (d->code == CODE_STATUS) {
		evbuffer_add_printf(out, "%scode=\"%d\"", any ? "," : "{", p->code);
		any = true;
	} else if (d->code == CODE_TOKEN_KIND) {
		int kind = p->code / 2;
		evbuffer_add_printf(out, "%skind=\"%s\",estimated=\"%s\"", any ? "," : "{",
		                    kind >= 0 && kind < TOKEN_KINDS ? token_kind_names[kind] : "",
		                    p->code % 2 ? "true" : "false");
		any = true;
	}
	if (extra_name) {
		evbuffer_add_printf(out, "%s%s=\"%s\"", any ? "," : "{", extra_name, extra_value);
		any = true;
	}
	if (any)
		evbuffer_add(out, "}", 1);
	evbuffer_add(out, " ", 1);
}

/* ---------------------------------------------------------------- render */

static int series_cmp(const void *x, const void *y)
{
	const struct series *a = *(const struct series *const *)x;
	const struct series *b = *(const struct series *const *)y;
	if (a->fam != b->fam)
		return a->fam < b->fam ? -1 : 1;
	size_t n = family_n_labels(&families[a->fam]);
	for (size_t i = 0; i < n; i++) {
		int c = strcmp(a->label[i], b->label[i]);
		if (c)
			return c;
	}
	return a->code < b->code ? -1 : a->code > b->code;
}

static bool same_key(const struct series *a, const struct series *b)
{
	return series_cmp(&a, &b) == 0;
}

struct series_vec {
	struct series **v;
	size_t n, cap;
};

static bool vec_push(struct series_vec *sv, struct series *p)
{
	if (sv->n == sv->cap) {
		size_t cap = sv->cap ? sv->cap * 2 : 256;
		struct series **nv = realloc(sv->v, cap * sizeof(*nv));
		if (nv == NULL)
			return false;
		sv->v = nv;
		sv->cap = cap;
	}
	sv->v[sv->n++] = p;
	return true;
}

static bool collect(struct series_vec *sv, struct metrics_shard *s)
{
	for (size_t i = 0; i < SHARD_SLOTS; i++)
		for (struct series *p = atomic_load_explicit(&s->heads[i], memory_order_acquire); p;
		     p = p->next)
			if (!vec_push(sv, p))
				return false;
	return true;
}

static uint64_t load(const _Atomic uint64_t *v)
{
	return atomic_load_explicit(v, memory_order_relaxed);
}

/* Micro-units as exact decimal units and a newline: 1500000 -> "1.5", 7 -> "0.000007". */
static void put_micros(struct evbuffer *out, uint64_t v)
{
	char digits[8];
	size_t n = 6;

	if (v % RECORD_COST_UNIT == 0) {
		evbuffer_add_printf(out, "%" PRIu64 "\n", v / RECORD_COST_UNIT);
		return;
	}
	snprintf(digits, sizeof(digits), "%06u", (unsigned)(v % RECORD_COST_UNIT));
	while (digits[n - 1] == '0')
		n--;
	digits[n] = '\0';
	evbuffer_add_printf(out, "%" PRIu64 ".%s\n", v / RECORD_COST_UNIT, digits);
}

/* The series [from, to) share one key: one output series. */
static void render_series(struct evbuffer *out, struct series **v, size_t from, size_t to)
{
	const struct family_desc *d = &families[v[from]->fam];

	if (!d->histogram) {
		uint64_t sum = 0;
		for (size_t j = from; j < to; j++)
			sum += load(&v[j]->value);
		put_series_name(out, v[from], "", NULL, NULL);
		if (d->micros)
			put_micros(out, sum);
		else
			evbuffer_add_printf(out, "%" PRIu64 "\n", sum);
		return;
	}

	uint64_t cum = 0, sum_ns = 0;
	char num[48];
	for (size_t b = 0; b <= d->n_bounds; b++) {
		for (size_t j = from; j < to; j++)
			cum += load(&v[j]->bucket[b]);
		if (b < d->n_bounds)
			format_seconds(num, sizeof(num), d->bounds[b]);
		else
			snprintf(num, sizeof(num), "+Inf");
		put_series_name(out, v[from], "_bucket", "le", num);
		evbuffer_add_printf(out, "%" PRIu64 "\n", cum);
	}
	for (size_t j = from; j < to; j++)
		sum_ns += load(&v[j]->sum_ns);
	format_seconds(num, sizeof(num), sum_ns);
	put_series_name(out, v[from], "_sum", NULL, NULL);
	evbuffer_add_printf(out, "%s\n", num);
	/* The count is the +Inf bucket, not the separate count: workers keep
	 * counting while we read, and Prometheus requires the two to agree. */
	put_series_name(out, v[from], "_count", NULL, NULL);
	evbuffer_add_printf(out, "%" PRIu64 "\n", cum);
}

void metrics_render(struct evbuffer *out)
{
	struct series_vec sv = {0};
	bool ok = true;

	for (int i = 0; i < n_shards && ok; i++)
		ok = collect(&sv, shards[i]);
	if (ok)
		ok = collect(&sv, &events_shard);
	if (!ok) {
		log_error("metrics: out of memory while rendering");
		sv.n = 0;
	}
	if (sv.n > 1)
		qsort(sv.v, sv.n, sizeof(*sv.v), series_cmp);

	size_t i = 0;
	for (int f = 0; f < F_COUNT; f++) {
		const struct family_desc *d = &families[f];
		metrics_write_family(out, d->name, d->histogram ? "histogram" : "counter", d->help);
		while (i < sv.n && (int)sv.v[i]->fam == f) {
			size_t j = i + 1;
			while (j < sv.n && same_key(sv.v[i], sv.v[j]))
				j++;
			render_series(out, sv.v, i, j);
			i = j;
		}
	}
	free(sv.v);

	static const char *const version_label[] = {"version", SLUICE_VERSION, NULL};
	metrics_write_family(out, "sluice_build_info", "gauge",
	                     "Always 1; the version as a label.");
	metrics_write_sample(out, "sluice_build_info", version_label, 1);
	metrics_write_family(out, "sluice_start_time_seconds", "gauge",
	                     "When the process started, in seconds since the epoch.");
	metrics_write_sample(out, "sluice_start_time_seconds", NULL,
	                     (double)atomic_load(&start_ms) / 1000.0);
	metrics_write_family(out, "sluice_config_last_reload_successful", "gauge",
	                     "1 when the last configuration reload succeeded, 0 when it failed.");
	metrics_write_sample(out, "sluice_config_last_reload_successful", NULL,
	                     atomic_load(&last_reload_ok));
	metrics_write_family(out, "sluice_config_last_reload_success_timestamp_seconds", "gauge",
	                     "When the configuration was last loaded successfully.");
	metrics_write_sample(out, "sluice_config_last_reload_success_timestamp_seconds", NULL,
	                     (double)atomic_load(&last_reload_success_ms) / 1000.0);

	struct gauge_source copy[MAX_GAUGE_SOURCES];
	size_t n;
	pthread_mutex_lock(&gauge_lock);
	n = n_gauge_sources;
	memcpy(copy, gauge_sources, n * sizeof(copy[0]));
	pthread_mutex_unlock(&gauge_lock);
	for (size_t k = 0; k < n; k++)
		copy[k].fn(copy[k].arg, out);
}

void metrics_free(void)
{
	for (int i = 0; i < n_shards; i++) {
		shard_clear(shards[i]);
		free(shards[i]);
	}
	free(shards);
	shards = NULL;
	n_shards = 0;
	pthread_mutex_lock(&events_lock);
	shard_clear(&events_shard);
	recent_next = recent_count = 0;
	pthread_mutex_unlock(&events_lock);
	pthread_mutex_lock(&gauge_lock);
	n_gauge_sources = 0;
	pthread_mutex_unlock(&gauge_lock);
}
