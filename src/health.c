/* health.c — instance health: passive hysteresis, half-open trials, active probes, load scrapes.
 *
 * One state per instance name, fed by two sources (HAProxy's model): the
 * checker's active probes on the main thread, and the workers' passive
 * reports from real traffic. Each source keeps its own consecutive counters,
 * because their rates differ by orders of magnitude (a probe every 30 s, a
 * hundred requests a second); either may flip the one healthy flag, and every
 * flip resets both so the next decision starts from fresh evidence.
 *
 * What workers read per request is atomic. The counters sit behind a
 * per-instance mutex that the hot path avoids: an OK report on a healthy
 * instance with no failure streak pending (passive_dirty) takes no lock.
 */
#include "sluice/health.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>

#include "sluice/alerts.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/upstream.h"

/* A probe or scrape reads at most this much of a response body: enough for a
 * vLLM /metrics page, and a probe only needs the status. */
#define PROBE_BODY_MAX   (64 * 1024)
#define SCRAPE_BODY_MAX  (4 * 1024 * 1024)
#define REGISTRY_BUCKETS 256
/* Longest sample value token read ("-1.2345678901234567e+308" is 24 bytes). */
#define HEALTH_SAMPLE_MAX 64

enum source { SRC_START, SRC_ACTIVE, SRC_PASSIVE, SRC_TRIAL };
static const char *const source_names[] = {"start", "active", "passive", "trial"};

struct streak {
	int ok, http, tcp, timeout;
};

struct instance_state {
	char *name;                            /* owned */
	_Atomic(struct instance_state *) next; /* registry bucket chain */

	/* Read by workers on every request. */
	atomic_bool healthy;
	atomic_int inflight;
	_Atomic uint64_t retry_until_us;   /* monotonic; 0: not cooling */
	_Atomic uint64_t cooldown_from_us; /* monotonic: unhealthy since, or last failed trial */
	_Atomic uint64_t trial_us;         /* monotonic start of the trial in progress; 0: none */
	atomic_bool passive_dirty;         /* a passive failure streak is under way */
	_Atomic uint64_t ewma_ttft_us, ewma_total_us;
	/* Load, written by the checker's scraper. The three values may come from
	 * different scrapes when read during an update: harmless for a balancer. */
	_Atomic uint64_t load_at_us; /* 0: unknown */
	_Atomic uint64_t load_interval_us;
	_Atomic double load_waiting, load_running, load_kv;

	pthread_mutex_t mu; /* guards everything below */
	struct streak passive, active;
	int passive_last_status;
	bool passive_mixed_status;
	uint64_t transitions;
	uint64_t last_transition_unix_ms;
	char last_reason[160];
	enum source source;
	uint64_t probes_ok, probes_failed;
};

static _Atomic(struct instance_state *) registry[REGISTRY_BUCKETS];
static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER; /* inserts only */

static health_transition_fn transition_hook;
static void *transition_hook_arg;

/* ---------------------------------------------------------------- helpers */

static uint64_t unix_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static bool status_listed(const int *list, size_t n, long status)
{
	for (size_t i = 0; i < n; i++)
		if (list[i] == status)
			return true;
	return false;
}

static char *xstrdup(const char *s)
{
	if (s == NULL)
		return NULL;
	char *d = strdup(s);
	if (d == NULL) {
		log_error("health: out of memory");
		abort();
	}
	return d;
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size);
	if (p == NULL) {
		log_error("health: out of memory");
		abort();
	}
	return p;
}

static const char *healthy_word(bool h)
{
	return h ? "healthy" : "unhealthy";
}

/* ---------------------------------------------------------------- registry */

static unsigned name_hash(const char *s)
{
	uint32_t h = 2166136261u; /* FNV-1a */
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h % REGISTRY_BUCKETS;
}

void health_registry_init(void)
{
	/* The buckets are static and start empty; nothing to allocate. Kept so
	 * that main's start-up order reads the same as its shutdown. */
}

void health_registry_free(void)
{
	pthread_mutex_lock(&registry_mu);
	for (size_t b = 0; b < REGISTRY_BUCKETS; b++) {
		struct instance_state *st = atomic_exchange(&registry[b], NULL);
		while (st != NULL) {
			struct instance_state *next = atomic_load(&st->next);
			pthread_mutex_destroy(&st->mu);
			free(st->name);
			free(st);
			st = next;
		}
	}
	pthread_mutex_unlock(&registry_mu);
	transition_hook = NULL;
	transition_hook_arg = NULL;
}

static struct instance_state *find_in(struct instance_state *st, const char *name)
{
	for (; st != NULL; st = atomic_load_explicit(&st->next, memory_order_acquire))
		if (strcmp(st->name, name) == 0)
			return st;
	return NULL;
}

struct instance_state *health_state_find(const char *name)
{
	unsigned b = name_hash(name);
	return find_in(atomic_load_explicit(&registry[b], memory_order_acquire), name);
}

struct instance_state *health_state(const char *name)
{
	struct instance_state *st = health_state_find(name);
	if (st != NULL)
		return st;

	/* Readers walk the chains without the lock: a new state is fully built
	 * before the release store that links it at the head of its bucket. */
	unsigned b = name_hash(name);
	pthread_mutex_lock(&registry_mu);
	st = find_in(atomic_load(&registry[b]), name);
	if (st == NULL) {
		st = xcalloc(1, sizeof(*st));
		st->name = xstrdup(name);
		pthread_mutex_init(&st->mu, NULL);
		atomic_init(&st->healthy, true);
		st->source = SRC_START;
		snprintf(st->last_reason, sizeof(st->last_reason), "initial state");
		atomic_store(&st->next, atomic_load(&registry[b]));
		atomic_store_explicit(&registry[b], st, memory_order_release);
	}
	pthread_mutex_unlock(&registry_mu);
	return st;
}

const char *health_state_name(const struct instance_state *st)
{
	return st->name;
}

void health_set_transition_hook(health_transition_fn fn, void *arg)
{
	transition_hook = fn;
	transition_hook_arg = arg;
}

/* ---------------------------------------------------------------- transitions */

static json_t *streak_json(const struct streak *s)
{
	return json_pack("{s:i, s:i, s:i, s:i}", "successes", s->ok, "http_failures", s->http,
	                 "tcp_failures", s->tcp, "timeouts", s->timeout);
}

/*
 * Flip the healthy flag. With st->mu held, so that the log line, the hook and
 * the alert of one instance come out in the order of its transitions. counts
 * is the evidence (NULL: none), captured before the streaks are reset.
 */
static void transition_locked(struct instance_state *st, bool to, enum source src,
                              const struct streak *counts, const char *reason, uint64_t now_us)
{
	bool from = atomic_load(&st->healthy);
	if (from == to)
		return;
	st->transitions++;
	st->last_transition_unix_ms = unix_ms();
	snprintf(st->last_reason, sizeof(st->last_reason), "%s", reason);
	st->source = src;
	json_t *counts_json = counts ? streak_json(counts) : json_object();
	memset(&st->passive, 0, sizeof(st->passive));
	memset(&st->active, 0, sizeof(st->active));
	st->passive_last_status = 0;
	st->passive_mixed_status = false;
	atomic_store(&st->passive_dirty, false);
	if (!to)
		atomic_store(&st->cooldown_from_us, now_us);
	atomic_store(&st->healthy, to);
	atomic_store(&st->trial_us, 0);

	log_warn("instance %s: %s -> %s (%s: %s)", st->name, healthy_word(from), healthy_word(to),
	         source_names[src], reason);
	if (transition_hook != NULL)
		transition_hook(st->name, to, reason, transition_hook_arg);
	alerts_emit("instance_health",
	            json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:I}", "instance", st->name, "from",
	                      healthy_word(from), "to", healthy_word(to), "source",
	                      source_names[src], "reason", reason, "counts", counts_json,
	                      "transitions", (json_int_t)st->transitions));
}

/* ---------------------------------------------------------------- workers: admission */

static uint64_t trial_lease_us(const struct config_instance *in)
{
	/* A trial caller that never reports (crashed path, lost request) must not
	 * keep the instance out for good: its slot lapses after the time its
	 * answer could have taken, and never before a cooldown. */
	uint64_t ms = in->timeouts.connect + in->timeouts.first_byte;
	if (ms < in->passive.cooldown)
		ms = in->passive.cooldown;
	return ms * 1000;
}

enum health_gate health_admit(struct instance_state *st, const struct config_instance *in,
                              uint64_t now_us)
{
	if (atomic_load_explicit(&st->healthy, memory_order_acquire)) {
		uint64_t until = atomic_load_explicit(&st->retry_until_us, memory_order_relaxed);
		return until != 0 && now_us < until ? HEALTH_COOLING : HEALTH_PASS;
	}
	/* With active checks the probes alone bring an instance back: real
	 * requests are not spent on testing it. */
	if (in->active.enabled)
		return HEALTH_DOWN;
	if (now_us < atomic_load(&st->cooldown_from_us) + in->passive.cooldown * 1000)
		return HEALTH_DOWN;
	uint64_t t = atomic_load(&st->trial_us);
	if (t != 0 && now_us - t < trial_lease_us(in))
		return HEALTH_DOWN;
	uint64_t mine = now_us ? now_us : 1;
	if (atomic_compare_exchange_strong(&st->trial_us, &t, mine))
		return HEALTH_TRIAL;
	return HEALTH_DOWN;
}

void health_trial_abandon(struct instance_state *st)
{
	atomic_store(&st->trial_us, 0);
}

/* ---------------------------------------------------------------- workers: passive reports */

enum verdict { V_GOOD, V_NEUTRAL, V_HTTP, V_TCP, V_TIMEOUT };

static enum verdict passive_verdict(const struct config_instance *in, enum health_outcome o,
                                    int status)
{
	switch (o) {
	case HEALTH_OK:
		return V_GOOD;
	case HEALTH_HTTP_STATUS:
		return status_listed(in->passive.http_statuses, in->passive.n_http_statuses, status)
		               ? V_HTTP
		               : V_NEUTRAL;
	case HEALTH_CONNECT_ERROR:
		return V_TCP;
	case HEALTH_TIMEOUT:
		return V_TIMEOUT;
	}
	return V_NEUTRAL;
}

/* The outcome of a half-open trial; st is unhealthy, without active checks. */
static void trial_outcome(struct instance_state *st, const struct config_instance *in,
                          enum verdict v, int status, uint64_t now_us)
{
	uint64_t t = atomic_load(&st->trial_us);
	if (t == 0)
		return; /* no trial: a straggler admitted before the transition */
	if (v == V_GOOD || v == V_NEUTRAL) {
		/* Any answer that is not a listed failure shows the instance serves. */
		char reason[64];
		if (v == V_GOOD)
			snprintf(reason, sizeof(reason), "trial request succeeded");
		else
			snprintf(reason, sizeof(reason), "trial request answered http %d", status);
		struct streak ok = {.ok = 1};
		pthread_mutex_lock(&st->mu);
		if (atomic_load(&st->trial_us) == t)
			transition_locked(st, true, SRC_TRIAL, &ok, reason, now_us);
		pthread_mutex_unlock(&st->mu);
		return;
	}
	/* Restart the cooldown before the slot is freed, or a racing admit could
	 * grant a second trial against the old cooldown. */
	atomic_store(&st->cooldown_from_us, now_us);
	if (!atomic_compare_exchange_strong(&st->trial_us, &t, 0))
		return;
	const char *what = v == V_HTTP ? "http status" : v == V_TCP ? "connect error" : "timeout";
	if (v == V_HTTP)
		log_info("instance %s: trial request failed (http %d); still unhealthy, next trial "
		         "in %llu ms",
		         st->name, status, (unsigned long long)in->passive.cooldown);
	else
		log_info("instance %s: trial request failed (%s); still unhealthy, next trial in "
		         "%llu ms",
		         st->name, what, (unsigned long long)in->passive.cooldown);
}

void health_report(struct instance_state *st, const struct config_instance *in,
                   enum health_outcome o, int http_status, uint64_t now_us)
{
	enum verdict v = passive_verdict(in, o, http_status);

	if (!atomic_load_explicit(&st->healthy, memory_order_acquire)) {
		if (in->active.enabled) {
			atomic_store(&st->trial_us, 0);
			return;
		}
		trial_outcome(st, in, v, http_status, now_us);
		return;
	}
	/* Healthy: the hot path. */
	if (v == V_NEUTRAL)
		return;
	if (v == V_GOOD && !atomic_load_explicit(&st->passive_dirty, memory_order_relaxed))
		return;
	if (v != V_GOOD && !in->passive.enabled)
		return;

	pthread_mutex_lock(&st->mu);
	if (!atomic_load(&st->healthy)) {
		pthread_mutex_unlock(&st->mu);
		return; /* flipped meanwhile: this report is a straggler */
	}
	struct streak *s = &st->passive;
	if (v == V_GOOD) {
		memset(s, 0, sizeof(*s));
		st->passive_last_status = 0;
		st->passive_mixed_status = false;
		atomic_store(&st->passive_dirty, false);
		pthread_mutex_unlock(&st->mu);
		return;
	}
	/* Failure kinds count separately (as in lua-resty-healthcheck): a
	 * timeout does not break a streak of 503s, only an OK does. */
	int count = 0, threshold = 0;
	char reason[160];
	switch (v) {
	case V_HTTP:
		if (s->http > 0 && st->passive_last_status != http_status)
			st->passive_mixed_status = true;
		st->passive_last_status = http_status;
		count = ++s->http;
		threshold = in->passive.http_failures;
		if (st->passive_mixed_status)
			snprintf(reason, sizeof(reason), "%d consecutive http failures (last %d)",
			         count, http_status);
		else
			snprintf(reason, sizeof(reason), "%d consecutive http %d", count,
			         http_status);
		break;
	case V_TCP:
		count = ++s->tcp;
		threshold = in->passive.tcp_failures;
		snprintf(reason, sizeof(reason), "%d consecutive connect errors", count);
		break;
	case V_TIMEOUT:
		count = ++s->timeout;
		threshold = in->passive.timeouts;
		snprintf(reason, sizeof(reason), "%d consecutive timeouts", count);
		break;
	default:
		break;
	}
	atomic_store(&st->passive_dirty, true);
	if (threshold > 0 && count >= threshold) {
		struct streak evidence = *s;
		transition_locked(st, false, SRC_PASSIVE, &evidence, reason, now_us);
	}
	pthread_mutex_unlock(&st->mu);
}

void health_retry_after(struct instance_state *st, const struct config_instance *in,
                        uint64_t seconds, uint64_t now_us)
{
	if (seconds == 0)
		return;
	if (seconds > HEALTH_RETRY_AFTER_MAX_S)
		seconds = HEALTH_RETRY_AFTER_MAX_S;
	uint64_t until = now_us + seconds * 1000000u;
	uint64_t cur = atomic_load(&st->retry_until_us);
	do {
		if (cur >= until)
			return; /* an equal or later deadline is already set */
	} while (!atomic_compare_exchange_weak(&st->retry_until_us, &cur, until));
	/* One line per period: only the caller that started it logs. */
	if (cur == 0 || cur <= now_us)
		log_warn(
		        "instance %s: 429 with Retry-After %llu s: out of rotation until it passes",
		        st->name, (unsigned long long)seconds);
}

/* 2DIGIT / 4DIGIT fields of an HTTP-date. */
static bool date_digits(const char *p, size_t n, int *out)
{
	int v = 0;
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return false;
		v = v * 10 + (p[i] - '0');
	}
	*out = v;
	return true;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (month 1..12). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
	y -= m <= 2;
	int64_t era = (y >= 0 ? y : y - 399) / 400;
	int64_t yoe = y - era * 400;
	int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

/* IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT" (RFC 9110 §5.6.7), the one form
 * senders must use; the two obsolete forms are not read (a 429 without a usable
 * Retry-After just keeps the instance in rotation). */
static bool imf_fixdate(const char *p, size_t n, int64_t *unix_s)
{
	static const char days[] = "MonTueWedThuFriSatSun";
	static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
	static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	int day, year, hh, mm, ss, month = -1;

	if (n != 29 || p[3] != ',' || p[4] != ' ' || p[7] != ' ' || p[11] != ' ' || p[16] != ' ' ||
	    p[19] != ':' || p[22] != ':' || p[25] != ' ' || memcmp(p + 26, "GMT", 3) != 0)
		return false;
	bool day_ok = false;
	for (int i = 0; i < 7; i++)
		day_ok |= memcmp(p, days + 3 * i, 3) == 0;
	for (int i = 0; i < 12; i++)
		if (memcmp(p + 8, months + 3 * i, 3) == 0)
			month = i;
	if (!day_ok || month < 0 || !date_digits(p + 5, 2, &day) ||
	    !date_digits(p + 12, 4, &year) || !date_digits(p + 17, 2, &hh) ||
	    !date_digits(p + 20, 2, &mm) || !date_digits(p + 23, 2, &ss))
		return false;
	bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
	if (day < 1 || day > mdays[month] || (month == 1 && day == 29 && !leap) || hh > 23 ||
	    mm > 59 || ss > 60)
		return false;
	*unix_s = days_from_civil(year, month + 1, day) * 86400 + hh * 3600 + mm * 60 + ss;
	return true;
}

bool health_parse_retry_after(const char *v, size_t len, int64_t now_unix_s, uint64_t *seconds)
{
	const char *p = v, *end = len > 0 ? v + len : v;

	while (p < end && (*p == ' ' || *p == '\t'))
		p++;
	while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	if (p == end)
		return false;
	if (*p >= '0' && *p <= '9') {
		/* delta-seconds: saturate past the cap, so no count of digits can wrap. */
		uint64_t n = 0;
		for (; p < end; p++) {
			if (*p < '0' || *p > '9')
				return false;
			if (n <= HEALTH_RETRY_AFTER_MAX_S)
				n = n * 10 + (uint64_t)(*p - '0');
		}
		*seconds = n < HEALTH_RETRY_AFTER_MAX_S ? n : HEALTH_RETRY_AFTER_MAX_S;
		return true;
	}
	int64_t at;
	if (!imf_fixdate(p, (size_t)(end - p), &at))
		return false;
	/* Both within years 0..9999 (and now from the clock): the difference cannot wrap. */
	int64_t d = at - now_unix_s;
	*seconds = d <= 0                         ? 0
	           : d < HEALTH_RETRY_AFTER_MAX_S ? (uint64_t)d
	                                          : HEALTH_RETRY_AFTER_MAX_S;
	return true;
}

void health_inflight_add(struct instance_state *st, int delta)
{
	atomic_fetch_add_explicit(&st->inflight, delta, memory_order_relaxed);
}

int health_inflight(const struct instance_state *st)
{
	return atomic_load_explicit(&((struct instance_state *)st)->inflight, memory_order_relaxed);
}

bool health_is_healthy(const struct instance_state *st)
{
	return atomic_load(&((struct instance_state *)st)->healthy);
}

/* Peak-EWMA: a slower sample is taken at once, faster ones pull the average
 * down by 1/HEALTH_EWMA_DIV each — an instance that turns slow loses traffic
 * on its next answer, one that recovers wins it back gradually. */
static void ewma_update(_Atomic uint64_t *v, uint64_t sample)
{
	uint64_t cur = atomic_load_explicit(v, memory_order_relaxed), next;
	do {
		if (cur == 0)
			next = sample ? sample : 1;
		else if (sample >= cur)
			next = sample;
		else
			next = cur - (cur - sample) / HEALTH_EWMA_DIV;
	} while (!atomic_compare_exchange_weak_explicit(v, &cur, next, memory_order_relaxed,
	                                                memory_order_relaxed));
}

void health_observe_latency(struct instance_state *st, uint64_t ttft_us, uint64_t total_us)
{
	if (ttft_us != 0)
		ewma_update(&st->ewma_ttft_us, ttft_us);
	if (total_us != 0)
		ewma_update(&st->ewma_total_us, total_us);
}

uint64_t health_ewma_ttft_us(const struct instance_state *st)
{
	return atomic_load_explicit(&((struct instance_state *)st)->ewma_ttft_us,
	                            memory_order_relaxed);
}

uint64_t health_ewma_total_us(const struct instance_state *st)
{
	return atomic_load_explicit(&((struct instance_state *)st)->ewma_total_us,
	                            memory_order_relaxed);
}

bool health_load_get(const struct instance_state *cst, uint64_t now_us, struct health_load *out)
{
	struct instance_state *st = (struct instance_state *)cst;
	uint64_t at = atomic_load(&st->load_at_us);
	uint64_t interval = atomic_load(&st->load_interval_us);
	if (at == 0 || now_us < at)
		return false;
	if (now_us - at > interval * HEALTH_LOAD_STALE_INTERVALS)
		return false;
	out->waiting = atomic_load(&st->load_waiting);
	out->running = atomic_load(&st->load_running);
	out->kv_cache = atomic_load(&st->load_kv);
	out->age_us = now_us - at;
	return true;
}

void health_snapshot(const struct instance_state *cst, struct health_snapshot *out)
{
	struct instance_state *st = (struct instance_state *)cst; /* the lock is not state */
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&st->mu);
	out->healthy = atomic_load(&st->healthy);
	out->transitions = st->transitions;
	out->last_transition_unix_ms = st->last_transition_unix_ms;
	snprintf(out->last_reason, sizeof(out->last_reason), "%s", st->last_reason);
	out->source = source_names[st->source];
	out->probes_ok = st->probes_ok;
	out->probes_failed = st->probes_failed;
	pthread_mutex_unlock(&st->mu);
	out->inflight = health_inflight(st);
	out->ewma_ttft_us = health_ewma_ttft_us(st);
	out->ewma_total_us = health_ewma_total_us(st);
	uint64_t until = atomic_load(&st->retry_until_us), now = http_now_us();
	if (until > now)
		out->retry_after_until_unix_ms = unix_ms() + (until - now + 999) / 1000;
}

/* ================================================================ main thread: the checker */

enum probe_result { PR_SUCCESS, PR_HTTP_FAIL, PR_TCP_FAIL, PR_TIMEOUT, PR_NEUTRAL };
enum probe_phase { PH_IDLE, PH_QUEUED, PH_RUNNING };

/* evdns may call back after the probe that asked is gone (a cancel is
 * delivered later, from the loop): the probe points to its ticket, the ticket
 * to the probe, and whoever goes first cuts the link. The callback frees it. */
struct dns_ticket {
	struct probe *p; /* NULL: orphaned */
	struct evdns_getaddrinfo_request *req;
};

struct probe {
	struct probe *next;  /* hc->probes */
	struct probe *qnext; /* hc->queue */
	struct health_checker *hc;
	struct instance_state *st;
	char *name;
	struct config_active_check cfg; /* owned deep copy */
	char *url;                      /* http(s): scheme://host/path */
	char *tcp_host;                 /* tcp: host without brackets */
	char tcp_port[8];
	bool stale; /* sync: not in the new snapshot */
	enum probe_phase phase;
	uint64_t started_us;
	struct event *timer; /* next probe */
	/* http(s) */
	struct upstream_xfer x;
	size_t body_bytes;
	/* tcp */
	struct event *deadline;
	struct event *conn_ev;
	struct event *done_ev; /* tcp outcomes are delivered from the loop */
	evutil_socket_t fd;
	struct dns_ticket *dns;
	enum probe_result tcp_res;
	char tcp_detail[160];
};

struct scraper {
	struct scraper *next;
	struct health_checker *hc;
	struct instance_state *st;
	char *name;
	char *url;
	uint64_t interval_ms;
	bool stale;
	bool running;
	struct event *timer; /* persistent, every interval */
	struct upstream_xfer x;
	char *body;
	size_t len, cap;
	bool too_big;
};

struct health_checker {
	struct event_base *base;
	struct upstream *up;    /* our own curl multi: probes never share a worker's */
	struct evdns_base *dns; /* created on the first tcp probe of a host name */
	struct probe *probes;
	struct probe *q_head, *q_tail; /* due, waiting for a concurrency slot */
	int running;
	struct scraper *scrapers;
};

static void probe_due(struct probe *p);
static void pump(struct health_checker *hc);

/* ---------------------------------------------------------------- probe settings */

static char **strv_dup(char **v, size_t n)
{
	if (n == 0)
		return NULL;
	char **d = xcalloc(n, sizeof(*d));
	for (size_t i = 0; i < n; i++)
		d[i] = xstrdup(v[i]);
	return d;
}

static int *ints_dup(const int *v, size_t n)
{
	if (n == 0)
		return NULL;
	int *d = xcalloc(n, sizeof(*d));
	memcpy(d, v, n * sizeof(*d));
	return d;
}

/* The endpoint's host:port, for hand-built configs without checks.active.host
 * (the loader always fills it). */
static char *endpoint_hostport(const char *endpoint, bool *https)
{
	*https = false;
	if (endpoint == NULL)
		return NULL;
	const char *p = strstr(endpoint, "://");
	if (p == NULL)
		return NULL;
	*https = (size_t)(p - endpoint) == 5 && strncasecmp(endpoint, "https", 5) == 0;
	p += 3;
	size_t n = strcspn(p, "/?#");
	char *hp = xcalloc(n + 8, 1);
	memcpy(hp, p, n);
	bool has_port = hp[0] == '[' ? strstr(hp, "]:") != NULL : strchr(hp, ':') != NULL;
	if (!has_port)
		strcat(hp, *https ? ":443" : ":80");
	return hp;
}

static void active_copy(struct config_active_check *d, const struct config_active_check *s,
                        const struct config_instance *in)
{
	*d = *s;
	d->http_method = xstrdup(s->http_method ? s->http_method : "GET");
	d->http_path = xstrdup(s->http_path ? s->http_path : "/");
	bool https = false;
	char *ep = endpoint_hostport(in->endpoint, &https);
	if (s->host != NULL) {
		d->host = xstrdup(s->host);
		free(ep);
	} else {
		d->host = ep ? ep : xstrdup("127.0.0.1:80");
	}
	d->http_req_body = xstrdup(s->http_req_body);
	d->req_headers = strv_dup(s->req_headers, s->n_req_headers);
	d->healthy.http_statuses = ints_dup(s->healthy.http_statuses, s->healthy.n_http_statuses);
	d->unhealthy.http_statuses =
	        ints_dup(s->unhealthy.http_statuses, s->unhealthy.n_http_statuses);
	if (d->concurrency < 1)
		d->concurrency = 1;
	if (d->healthy.successes < 1)
		d->healthy.successes = 1;
}

static void active_free(struct config_active_check *a)
{
	free(a->http_method);
	free(a->http_path);
	free(a->host);
	free(a->http_req_body);
	for (size_t i = 0; i < a->n_req_headers; i++)
		free(a->req_headers[i]);
	free(a->req_headers);
	free(a->healthy.http_statuses);
	free(a->unhealthy.http_statuses);
	memset(a, 0, sizeof(*a));
}

static bool str_eq(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static bool ints_eq(const int *a, size_t na, const int *b, size_t nb)
{
	return na == nb && (na == 0 || memcmp(a, b, na * sizeof(*a)) == 0);
}

/* Both are copies made by active_copy, so defaults are already resolved. */
static bool active_equal(const struct config_active_check *a, const struct config_active_check *b)
{
	if (a->type != b->type || !str_eq(a->http_method, b->http_method) ||
	    !str_eq(a->http_path, b->http_path) || !str_eq(a->host, b->host) ||
	    !str_eq(a->http_req_body, b->http_req_body) ||
	    a->https_verify_certificate != b->https_verify_certificate ||
	    a->timeout != b->timeout || a->concurrency != b->concurrency ||
	    a->healthy.interval != b->healthy.interval ||
	    a->healthy.successes != b->healthy.successes ||
	    a->unhealthy.interval != b->unhealthy.interval ||
	    a->unhealthy.http_failures != b->unhealthy.http_failures ||
	    a->unhealthy.tcp_failures != b->unhealthy.tcp_failures ||
	    a->unhealthy.timeouts != b->unhealthy.timeouts || a->n_req_headers != b->n_req_headers)
		return false;
	if (!ints_eq(a->healthy.http_statuses, a->healthy.n_http_statuses, b->healthy.http_statuses,
	             b->healthy.n_http_statuses) ||
	    !ints_eq(a->unhealthy.http_statuses, a->unhealthy.n_http_statuses,
	             b->unhealthy.http_statuses, b->unhealthy.n_http_statuses))
		return false;
	for (size_t i = 0; i < a->n_req_headers; i++)
		if (strcmp(a->req_headers[i], b->req_headers[i]) != 0)
			return false;
	return true;
}

/* Derive the probe's target from its (copied) settings. */
static void probe_target(struct probe *p)
{
	free(p->url);
	free(p->tcp_host);
	p->url = p->tcp_host = NULL;
	const char *hp = p->cfg.host;
	if (p->cfg.type != CHECK_TCP) {
		const char *scheme = p->cfg.type == CHECK_HTTPS ? "https" : "http";
		const char *path = p->cfg.http_path;
		size_t n = strlen(scheme) + strlen(hp) + strlen(path) + 8;
		p->url = xcalloc(n, 1);
		snprintf(p->url, n, "%s://%s%s%s", scheme, hp, path[0] == '/' ? "" : "/", path);
		return;
	}
	/* host:port, [v6]:port, or a bare host (port 80). */
	const char *port = NULL;
	size_t hl;
	if (hp[0] == '[') {
		const char *rb = strchr(hp, ']');
		hl = rb ? (size_t)(rb - hp - 1) : strlen(hp + 1);
		p->tcp_host = xcalloc(hl + 1, 1);
		memcpy(p->tcp_host, hp + 1, hl);
		if (rb && rb[1] == ':')
			port = rb + 2;
	} else {
		const char *colon = strrchr(hp, ':');
		if (colon && strchr(hp, ':') == colon) {
			hl = (size_t)(colon - hp);
			port = colon + 1;
		} else {
			hl = strlen(hp);
		}
		p->tcp_host = xcalloc(hl + 1, 1);
		memcpy(p->tcp_host, hp, hl);
	}
	snprintf(p->tcp_port, sizeof(p->tcp_port), "%s", port && *port ? port : "80");
}

/* ---------------------------------------------------------------- probe results */

static void active_result(struct instance_state *st, const struct config_active_check *c,
                          const char *name, enum probe_result res, long status,
                          const char *detail);

static void active_apply(struct probe *p, enum probe_result res, long status, const char *detail)
{
	active_result(p->st, &p->cfg, p->name, res, status, detail);
}

void health_active_report(struct instance_state *st, const struct config_active_check *check,
                          enum health_probe_result r, long status, const char *detail)
{
	static const enum probe_result map[] = {
		[HEALTH_PROBE_OK] = PR_SUCCESS, [HEALTH_PROBE_HTTP_FAIL] = PR_HTTP_FAIL,
		[HEALTH_PROBE_TCP_FAIL] = PR_TCP_FAIL, [HEALTH_PROBE_TIMEOUT] = PR_TIMEOUT};
	active_result(st, check, st->name, map[r], status, detail);
}

static void active_result(struct instance_state *st, const struct config_active_check *c,
                          const char *name, enum probe_result res, long status,
                          const char *detail)
{
	uint64_t now = http_now_us();
	char reason[160];
	int count = 0, threshold = 0;

	pthread_mutex_lock(&st->mu);
	bool healthy = atomic_load(&st->healthy);
	struct streak *s = &st->active;
	switch (res) {
	case PR_SUCCESS:
		st->probes_ok++;
		if (s->ok < c->healthy.successes)
			s->ok++;
		s->http = s->tcp = s->timeout = 0;
		if (!healthy && s->ok >= c->healthy.successes) {
			if (c->type == CHECK_TCP)
				snprintf(reason, sizeof(reason),
				         "%d consecutive successful probes (connected)", s->ok);
			else
				snprintf(reason, sizeof(reason),
				         "%d consecutive successful probes (http %ld)", s->ok,
				         status);
			struct streak evidence = *s;
			transition_locked(st, true, SRC_ACTIVE, &evidence, reason, now);
		}
		break;
	case PR_HTTP_FAIL:
		st->probes_failed++;
		s->ok = 0;
		count = ++s->http;
		threshold = c->unhealthy.http_failures;
		snprintf(reason, sizeof(reason), "%d consecutive failed probes (http %ld)", count,
		         status);
		break;
	case PR_TCP_FAIL:
		st->probes_failed++;
		s->ok = 0;
		count = ++s->tcp;
		threshold = c->unhealthy.tcp_failures;
		snprintf(reason, sizeof(reason), "%d consecutive failed probes (%s)", count,
		         detail);
		break;
	case PR_TIMEOUT:
		st->probes_failed++;
		s->ok = 0;
		count = ++s->timeout;
		threshold = c->unhealthy.timeouts;
		snprintf(reason, sizeof(reason), "%d consecutive probe timeouts (%s)", count,
		         detail);
		break;
	case PR_NEUTRAL:
		break;
	}
	if (res != PR_SUCCESS && res != PR_NEUTRAL && healthy && threshold > 0 &&
	    count >= threshold) {
		struct streak evidence = *s;
		transition_locked(st, false, SRC_ACTIVE, &evidence, reason, now);
	}
	pthread_mutex_unlock(&st->mu);

	if (res == PR_NEUTRAL)
		log_debug("instance %s: probe answered http %ld, in neither status list", name,
		          status);
	else
		log_debug("instance %s: probe %s%s%s", name, res == PR_SUCCESS ? "ok" : "failed",
		          detail && *detail ? ": " : "", detail ? detail : "");
}

/* A probe is over (called from the loop, never from inside libcurl or
 * libevent's connect machinery): count it, schedule the next, start queued ones. */
static void probe_complete(struct probe *p, enum probe_result res, long status, const char *detail)
{
	struct health_checker *hc = p->hc;

	p->phase = PH_IDLE;
	hc->running--;
	active_apply(p, res, status, detail);

	/* The cadence is measured from start to start, so a slow answer does not
	 * stretch the interval; the next probe never overlaps this one. */
	uint64_t interval_ms =
	        health_is_healthy(p->st) ? p->cfg.healthy.interval : p->cfg.unhealthy.interval;
	uint64_t elapsed_us = http_now_us() - p->started_us;
	uint64_t wait_us = interval_ms * 1000 > elapsed_us ? interval_ms * 1000 - elapsed_us : 0;
	struct timeval tv = {(time_t)(wait_us / 1000000), (suseconds_t)(wait_us % 1000000)};
	evtimer_add(p->timer, &tv);
	pump(hc);
}

/* ---------------------------------------------------------------- http(s) probes */

static bool probe_on_head(void *arg, long status)
{
	return true;
}

static size_t probe_on_body(void *arg, const char *data, size_t len)
{
	struct probe *p = arg;
	p->body_bytes += len;
	return p->body_bytes > PROBE_BODY_MAX ? 0 : len; /* the status is all we need */
}

static void probe_on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct probe *p = arg;
	long status = p->x.status;
	char what[200];

	if (p->x.head_done) {
		/* An answer counts by its status, even if the body then broke. */
		const struct config_active_check *c = &p->cfg;
		enum probe_result r = PR_NEUTRAL;
		if (status_listed(c->healthy.http_statuses, c->healthy.n_http_statuses, status))
			r = PR_SUCCESS;
		else if (status_listed(c->unhealthy.http_statuses, c->unhealthy.n_http_statuses,
		                       status))
			r = PR_HTTP_FAIL;
		snprintf(what, sizeof(what), "http %ld", status);
		probe_complete(p, r, status, what);
		return;
	}
	if (res == UPSTREAM_TIMEOUT)
		snprintf(what, sizeof(what), "no answer within %llu ms",
		         (unsigned long long)(p->cfg.timeout ? p->cfg.timeout : 1000));
	else
		snprintf(what, sizeof(what), "%s: %s",
		         res == UPSTREAM_CONNECT_ERROR ? "connect error" : "transfer error",
		         detail ? detail : "");
	probe_complete(p, res == UPSTREAM_TIMEOUT ? PR_TIMEOUT : PR_TCP_FAIL, 0, what);
}

static const struct upstream_ops probe_ops = {
        .on_head = probe_on_head,
        .on_body = probe_on_body,
        .on_done = probe_on_done,
};

static bool header_is_json_content_type(const char *line)
{
	if (strncasecmp(line, "content-type:", 13) != 0)
		return false;
	const char *v = line + 13;
	while (*v == ' ' || *v == '\t')
		v++;
	return strncasecmp(v, "application/json", 16) == 0 &&
	       (v[16] == '\0' || v[16] == ';' || v[16] == ' ');
}

static bool http_probe_start(struct probe *p)
{
	const struct config_active_check *c = &p->cfg;

	p->body_bytes = 0;
	for (size_t i = 0; i < c->n_req_headers; i++) {
		/* upstream_xfer_start adds "Content-Type: application/json" to any
		 * request with a body: the user's identical line would go out twice. */
		if (c->http_req_body != NULL && header_is_json_content_type(c->req_headers[i]))
			continue;
		if (!upstream_xfer_header(&p->x, c->req_headers[i]))
			return false;
	}
	uint64_t t = c->timeout ? c->timeout : 1000;
	struct upstream_timeouts to = {.connect = t, .first_byte = t, .idle = t, .total = t};
	/* A short keep-alive: a probe every interval should test a fresh
	 * connection, or a dead listener behind a live socket goes unnoticed. */
	return upstream_xfer_start(&p->x, c->http_method, p->url, c->http_req_body,
	                           c->http_req_body ? strlen(c->http_req_body) : 0, &to,
	                           c->type == CHECK_HTTPS && c->https_verify_certificate, 1);
}

/* ---------------------------------------------------------------- tcp probes */

static void tcp_stop(struct probe *p)
{
	if (p->dns != NULL) {
		struct dns_ticket *t = p->dns;
		p->dns = NULL;
		t->p = NULL;
		evdns_getaddrinfo_cancel(t->req); /* its callback frees t */
	}
	if (p->conn_ev != NULL) {
		event_free(p->conn_ev);
		p->conn_ev = NULL;
	}
	if (p->fd >= 0) {
		close(p->fd);
		p->fd = -1;
	}
	if (p->deadline)
		event_del(p->deadline);
}

static void tcp_finish(struct probe *p, enum probe_result res, const char *detail)
{
	tcp_stop(p);
	p->tcp_res = res;
	snprintf(p->tcp_detail, sizeof(p->tcp_detail), "%s", detail);
	event_active(p->done_ev, 0, 0);
}

static void tcp_done_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;
	if (p->phase == PH_RUNNING)
		probe_complete(p, p->tcp_res, 0, p->tcp_detail);
}

static void tcp_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;
	char d[64];
	snprintf(d, sizeof(d), "no connection within %llu ms", (unsigned long long)p->cfg.timeout);
	tcp_finish(p, PR_TIMEOUT, d);
}

static void tcp_conn_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;
	int err = 0;
	socklen_t len = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	char d[160];
	if (err == 0) {
		tcp_finish(p, PR_SUCCESS, "connected");
		return;
	}
	snprintf(d, sizeof(d), "connect to %s port %s: %s", p->tcp_host, p->tcp_port,
	         strerror(err));
	tcp_finish(p, PR_TCP_FAIL, d);
}

static void tcp_connect(struct probe *p, const struct sockaddr *sa, socklen_t salen)
{
	char d[160];
	int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(d, sizeof(d), "socket: %s", strerror(errno));
		tcp_finish(p, PR_TCP_FAIL, d);
		return;
	}
	if (connect(fd, sa, salen) == 0) {
		close(fd);
		tcp_finish(p, PR_SUCCESS, "connected");
		return;
	}
	if (errno != EINPROGRESS) {
		snprintf(d, sizeof(d), "connect to %s port %s: %s", p->tcp_host, p->tcp_port,
		         strerror(errno));
		close(fd);
		tcp_finish(p, PR_TCP_FAIL, d);
		return;
	}
	p->fd = fd;
	p->conn_ev = event_new(p->hc->base, fd, EV_WRITE, tcp_conn_cb, p);
	if (p->conn_ev == NULL || event_add(p->conn_ev, NULL) != 0)
		tcp_finish(p, PR_TCP_FAIL, "out of memory");
}

static void tcp_dns_cb(int result, struct evutil_addrinfo *ai, void *arg)
{
	struct dns_ticket *t = arg;
	struct probe *p = t->p;
	free(t);
	if (p == NULL) { /* cancelled: the probe is gone or moved on */
		if (ai)
			evutil_freeaddrinfo(ai);
		return;
	}
	p->dns = NULL;
	if (result != 0 || ai == NULL) {
		char d[160];
		snprintf(d, sizeof(d), "resolve %s: %s", p->tcp_host,
		         result ? evutil_gai_strerror(result) : "no address");
		if (ai)
			evutil_freeaddrinfo(ai);
		tcp_finish(p, PR_TCP_FAIL, d);
		return;
	}
	tcp_connect(p, ai->ai_addr, (socklen_t)ai->ai_addrlen);
	evutil_freeaddrinfo(ai);
}

static struct evdns_base *checker_dns(struct health_checker *hc)
{
	if (hc->dns != NULL)
		return hc->dns;
	/* /etc/resolv.conf and /etc/hosts; the resolver's socket must not keep
	 * the loop alive on its own. */
	hc->dns = evdns_base_new(hc->base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
	                                           EVDNS_BASE_DISABLE_WHEN_INACTIVE);
	if (hc->dns == NULL) {
		hc->dns = evdns_base_new(hc->base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
		if (hc->dns != NULL)
			evdns_base_load_hosts(hc->dns, NULL);
	}
	return hc->dns;
}

static void tcp_probe_start(struct probe *p)
{
	uint64_t t = p->cfg.timeout ? p->cfg.timeout : 1000;
	struct timeval tv = {(time_t)(t / 1000), (suseconds_t)(t % 1000) * 1000};
	evtimer_add(p->deadline, &tv);

	/* Numeric addresses need no resolver. */
	struct sockaddr_in6 a6;
	struct sockaddr_in a4;
	long port = strtol(p->tcp_port, NULL, 10);
	memset(&a6, 0, sizeof(a6));
	memset(&a4, 0, sizeof(a4));
	if (inet_pton(AF_INET, p->tcp_host, &a4.sin_addr) == 1) {
		a4.sin_family = AF_INET;
		a4.sin_port = htons((uint16_t)port);
		tcp_connect(p, (struct sockaddr *)&a4, sizeof(a4));
		return;
	}
	if (inet_pton(AF_INET6, p->tcp_host, &a6.sin6_addr) == 1) {
		a6.sin6_family = AF_INET6;
		a6.sin6_port = htons((uint16_t)port);
		tcp_connect(p, (struct sockaddr *)&a6, sizeof(a6));
		return;
	}
	struct evdns_base *dns = checker_dns(p->hc);
	if (dns == NULL) {
		tcp_finish(p, PR_TCP_FAIL, "no resolver");
		return;
	}
	struct evutil_addrinfo hints;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_protocol = IPPROTO_TCP;
	struct dns_ticket *tk = xcalloc(1, sizeof(*tk));
	tk->p = p;
	p->dns = tk;
	/* May answer at once (the callback has then run and freed tk). */
	struct evdns_getaddrinfo_request *r =
	        evdns_getaddrinfo(dns, p->tcp_host, p->tcp_port, &hints, tcp_dns_cb, tk);
	if (r != NULL)
		tk->req = r;
}

/* ---------------------------------------------------------------- probe scheduling */

static void probe_start(struct probe *p)
{
	struct health_checker *hc = p->hc;
	p->phase = PH_RUNNING;
	p->started_us = http_now_us();
	hc->running++;
	if (p->cfg.type == CHECK_TCP) {
		tcp_probe_start(p);
		return;
	}
	if (!http_probe_start(p)) {
		/* Never complete from here: we may be inside sync or pump. */
		upstream_xfer_cleanup(&p->x);
		upstream_xfer_init(&p->x, hc->up, &probe_ops, p);
		p->tcp_res = PR_TCP_FAIL;
		snprintf(p->tcp_detail, sizeof(p->tcp_detail), "could not start the probe");
		event_active(p->done_ev, 0, 0);
	}
}

static void pump(struct health_checker *hc)
{
	/* A probe starts while fewer than its instance's `concurrency` probes
	 * (of any instance) are in flight; the queue is FIFO. */
	while (hc->q_head != NULL && hc->running < hc->q_head->cfg.concurrency) {
		struct probe *p = hc->q_head;
		hc->q_head = p->qnext;
		if (hc->q_head == NULL)
			hc->q_tail = NULL;
		p->qnext = NULL;
		probe_start(p);
	}
}

static void probe_due(struct probe *p)
{
	struct health_checker *hc = p->hc;
	if (p->phase != PH_IDLE)
		return;
	p->phase = PH_QUEUED;
	p->qnext = NULL;
	if (hc->q_tail)
		hc->q_tail->qnext = p;
	else
		hc->q_head = p;
	hc->q_tail = p;
}

static void probe_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;
	probe_due(p);
	pump(p->hc);
}

/* Stop whatever the probe is doing; it is idle afterwards, with no timer. */
static void probe_stop(struct probe *p)
{
	struct health_checker *hc = p->hc;
	event_del(p->timer);
	event_del(p->done_ev);
	if (p->phase == PH_QUEUED) {
		struct probe **pp = &hc->q_head, *prev = NULL;
		while (*pp != p) {
			prev = *pp;
			pp = &(*pp)->qnext;
		}
		*pp = p->qnext;
		if (hc->q_tail == p)
			hc->q_tail = prev;
		p->qnext = NULL;
	} else if (p->phase == PH_RUNNING) {
		if (p->cfg.type == CHECK_TCP)
			tcp_stop(p);
		else
			upstream_xfer_cancel(&p->x);
		hc->running--;
	}
	p->phase = PH_IDLE;
}

static void probe_free(struct probe *p)
{
	probe_stop(p);
	upstream_xfer_cleanup(&p->x);
	if (p->timer)
		event_free(p->timer);
	if (p->deadline)
		event_free(p->deadline);
	if (p->done_ev)
		event_free(p->done_ev);
	active_free(&p->cfg);
	free(p->url);
	free(p->tcp_host);
	free(p->name);
	free(p);
}

static struct probe *probe_new(struct health_checker *hc, const struct config_instance *in,
                               struct instance_state *st)
{
	struct probe *p = xcalloc(1, sizeof(*p));
	p->hc = hc;
	p->st = st;
	p->name = xstrdup(in->name);
	p->fd = -1;
	p->timer = evtimer_new(hc->base, probe_timer_cb, p);
	p->deadline = evtimer_new(hc->base, tcp_deadline_cb, p);
	p->done_ev = event_new(hc->base, -1, 0, tcp_done_cb, p);
	if (p->timer == NULL || p->deadline == NULL || p->done_ev == NULL) {
		log_error("health: out of memory");
		abort();
	}
	upstream_xfer_init(&p->x, hc->up, &probe_ops, p);
	return p;
}

static void log_probe_config(const struct probe *p, const char *verb)
{
	const struct config_active_check *c = &p->cfg;
	if (c->type == CHECK_TCP)
		log_info("instance %s: active tcp checks %s: %s:%s every %llu ms (unhealthy: %llu "
		         "ms)",
		         p->name, verb, p->tcp_host, p->tcp_port,
		         (unsigned long long)c->healthy.interval,
		         (unsigned long long)c->unhealthy.interval);
	else
		log_info("instance %s: active checks %s: %s %s every %llu ms (unhealthy: %llu ms)",
		         p->name, verb, c->http_method, p->url,
		         (unsigned long long)c->healthy.interval,
		         (unsigned long long)c->unhealthy.interval);
}

/* ---------------------------------------------------------------- load scrapes */

static bool scrape_on_head(void *arg, long status)
{
	return true;
}

static size_t scrape_on_body(void *arg, const char *data, size_t len)
{
	struct scraper *s = arg;
	if (s->len + len + 1 > SCRAPE_BODY_MAX) {
		s->too_big = true;
		return 0;
	}
	if (s->len + len + 1 > s->cap) {
		size_t cap = s->cap ? s->cap : 16384;
		while (cap < s->len + len + 1)
			cap *= 2;
		char *b = realloc(s->body, cap);
		if (b == NULL)
			return 0;
		s->body = b;
		s->cap = cap;
	}
	memcpy(s->body + s->len, data, len);
	s->len += len;
	s->body[s->len] = '\0';
	return len;
}

/* A sample value token as the text format writes it (Go's ParseFloat): a
 * decimal float, or NaN / Inf with a sign. strtod alone would also take hex
 * floats, "infinity" and "nan(...)", and would read past the token. */
static bool sample_number(const char *p, size_t n, double *out)
{
	static const struct {
		const char *text;
		double v;
	} words[] = {{"nan", NAN}, {"inf", INFINITY}, {"+inf", INFINITY}, {"-inf", -INFINITY}};
	char buf[HEALTH_SAMPLE_MAX];

	if (n == 0 || n >= sizeof(buf))
		return false;
	for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
		if (strlen(words[i].text) == n && strncasecmp(words[i].text, p, n) == 0) {
			*out = words[i].v;
			return true;
		}
	}
	for (size_t i = 0; i < n; i++)
		if (!((p[i] >= '0' && p[i] <= '9') || p[i] == '.' || p[i] == 'e' || p[i] == 'E' ||
		      p[i] == '+' || p[i] == '-'))
			return false;
	memcpy(buf, p, n);
	buf[n] = '\0';
	char *stop;
	double v = strtod(buf, &stop);
	if (stop != buf + n)
		return false;
	*out = v;
	return true;
}

/* The value of one sample line "name{labels} value [timestamp]", p just after
 * the name; false when it is not a number. */
static bool sample_value(const char *p, const char *end, double *out)
{
	if (p < end && *p == '{') {
		bool quoted = false;
		for (p++; p < end; p++) {
			if (quoted && *p == '\\' && p + 1 < end)
				p++;
			else if (*p == '"')
				quoted = !quoted;
			else if (!quoted && *p == '}')
				break;
		}
		if (p >= end)
			return false;
		p++;
	}
	if (p >= end || (*p != ' ' && *p != '\t'))
		return false;
	while (p < end && (*p == ' ' || *p == '\t'))
		p++;
	const char *tok = p;
	while (p < end && *p != ' ' && *p != '\t' && *p != '\r')
		p++;
	return sample_number(tok, (size_t)(p - tok), out);
}

bool health_parse_load(const char *body, size_t len, struct health_load *out)
{
	static const char *const names[] = {
	        "vllm:num_requests_waiting", "vllm:num_requests_running",
	        "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", /* before vLLM 0.10 */
	};
	double sum[4] = {0, 0, 0, 0};
	bool seen[4] = {false, false, false, false};
	const char *p = body, *end = len > 0 ? body + len : body;

	while (p < end) {
		const char *eol = memchr(p, '\n', (size_t)(end - p));
		if (eol == NULL)
			eol = end;
		if (*p != '#') {
			for (int i = 0; i < 4; i++) {
				size_t n = strlen(names[i]);
				double v;
				if ((size_t)(eol - p) > n && memcmp(p, names[i], n) == 0 &&
				    sample_value(p + n, eol, &v)) {
					sum[i] += v;
					seen[i] = true;
				}
			}
		}
		p = eol < end ? eol + 1 : end;
	}
	out->waiting = sum[0];
	out->running = sum[1];
	out->kv_cache = seen[2] ? sum[2] : seen[3] ? sum[3] : -1;
	out->age_us = 0;
	return seen[0] || seen[1] || seen[2] || seen[3];
}

static void scrape_on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct scraper *s = arg;
	s->running = false;
	if (res != UPSTREAM_OK || s->x.status != 200 || s->too_big) {
		/* Unknown rather than stale: a balancer must not trust old numbers. */
		atomic_store(&s->st->load_at_us, 0);
		log_debug("instance %s: load scrape of %s failed: %s (http %ld)", s->name, s->url,
		          s->too_big ? "body too large"
		          : detail   ? detail
		                     : "",
		          s->x.status);
		return;
	}
	/* A page without the vLLM names still counts as an answer: nothing waiting. */
	struct health_load l;
	health_parse_load(s->body, s->len, &l);
	atomic_store(&s->st->load_waiting, l.waiting);
	atomic_store(&s->st->load_running, l.running);
	atomic_store(&s->st->load_kv, l.kv_cache);
	atomic_store(&s->st->load_interval_us, s->interval_ms * 1000);
	atomic_store(&s->st->load_at_us, http_now_us());
}

static const struct upstream_ops scrape_ops = {
        .on_head = scrape_on_head,
        .on_body = scrape_on_body,
        .on_done = scrape_on_done,
};

static void scrape_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct scraper *s = arg;
	if (s->running)
		return; /* the last one is still going: skip a beat */
	s->len = 0;
	s->too_big = false;
	/* Past HEALTH_LOAD_STALE_INTERVALS the answer would be ignored anyway. */
	uint64_t t = s->interval_ms * HEALTH_LOAD_STALE_INTERVALS;
	struct upstream_timeouts to = {.connect = t, .first_byte = t, .idle = t, .total = t};
	if (!upstream_xfer_start(&s->x, "GET", s->url, NULL, 0, &to, true, 60)) {
		upstream_xfer_cleanup(&s->x);
		upstream_xfer_init(&s->x, s->hc->up, &scrape_ops, s);
		atomic_store(&s->st->load_at_us, 0);
		return;
	}
	s->running = true;
}

static void scraper_free(struct scraper *s)
{
	if (s->timer)
		event_free(s->timer);
	upstream_xfer_cancel(&s->x);
	upstream_xfer_cleanup(&s->x);
	atomic_store(&s->st->load_at_us, 0);
	free(s->body);
	free(s->url);
	free(s->name);
	free(s);
}

static void scraper_sync(struct health_checker *hc, const struct config_instance *in,
                         struct instance_state *st)
{
	struct scraper *s;
	for (s = hc->scrapers; s != NULL; s = s->next)
		if (strcmp(s->name, in->name) == 0)
			break;
	if (s != NULL && strcmp(s->url, in->load.metrics_url) == 0 &&
	    s->interval_ms == in->load.interval) {
		s->stale = false;
		return;
	}
	if (s != NULL) { /* changed: unlink and start over */
		struct scraper **pp = &hc->scrapers;
		while (*pp != s)
			pp = &(*pp)->next;
		*pp = s->next;
		scraper_free(s);
	}
	s = xcalloc(1, sizeof(*s));
	s->hc = hc;
	s->st = st;
	s->name = xstrdup(in->name);
	s->url = xstrdup(in->load.metrics_url);
	s->interval_ms = in->load.interval ? in->load.interval : 250;
	s->timer = event_new(hc->base, -1, EV_PERSIST, scrape_timer_cb, s);
	if (s->timer == NULL) {
		log_error("health: out of memory");
		abort();
	}
	upstream_xfer_init(&s->x, hc->up, &scrape_ops, s);
	struct timeval tv = {(time_t)(s->interval_ms / 1000),
	                     (suseconds_t)(s->interval_ms % 1000) * 1000};
	event_add(s->timer, &tv);
	event_active(s->timer, EV_TIMEOUT, 0); /* the first scrape now */
	s->next = hc->scrapers;
	hc->scrapers = s;
}

/* ---------------------------------------------------------------- checker */

struct health_checker *health_checker_new(struct event_base *main_base)
{
	struct health_checker *hc = xcalloc(1, sizeof(*hc));
	hc->base = main_base;
	hc->up = upstream_new(main_base);
	if (hc->up == NULL) {
		free(hc);
		return NULL;
	}
	return hc;
}

void health_checker_sync(struct health_checker *hc, const struct config *c)
{
	for (struct probe *p = hc->probes; p != NULL; p = p->next)
		p->stale = true;
	for (struct scraper *s = hc->scrapers; s != NULL; s = s->next)
		s->stale = true;

	for (size_t i = 0; i < c->n_instances; i++) {
		const struct config_instance *in = &c->instances[i];
		struct instance_state *st = health_state(in->name);

		if (in->load.metrics_url != NULL)
			scraper_sync(hc, in, st);
		if (!in->active.enabled)
			continue;

		struct probe *p;
		for (p = hc->probes; p != NULL; p = p->next)
			if (strcmp(p->name, in->name) == 0)
				break;
		struct config_active_check cfg;
		active_copy(&cfg, &in->active, in);
		if (p != NULL && active_equal(&p->cfg, &cfg)) {
			/* Unchanged: keep its schedule and its streak. */
			active_free(&cfg);
			p->stale = false;
			continue;
		}
		const char *verb = "started";
		if (p != NULL) {
			probe_stop(p);
			active_free(&p->cfg);
			pthread_mutex_lock(&st->mu);
			memset(&st->active, 0, sizeof(st->active));
			pthread_mutex_unlock(&st->mu);
			verb = "changed";
		} else {
			p = probe_new(hc, in, st);
			p->next = hc->probes;
			hc->probes = p;
		}
		p->cfg = cfg;
		p->stale = false;
		probe_target(p);
		log_probe_config(p, verb);
		/* At once: users of other gateways complain that checks lag
		 * start-up and reloads (apache/apisix #12838, #12879). */
		probe_due(p);
	}

	for (struct probe **pp = &hc->probes; *pp != NULL;) {
		struct probe *p = *pp;
		if (!p->stale) {
			pp = &p->next;
			continue;
		}
		*pp = p->next;
		log_info("instance %s: active checks stopped", p->name);
		pthread_mutex_lock(&p->st->mu);
		memset(&p->st->active, 0, sizeof(p->st->active));
		pthread_mutex_unlock(&p->st->mu);
		probe_free(p);
	}
	for (struct scraper **sp = &hc->scrapers; *sp != NULL;) {
		struct scraper *s = *sp;
		if (!s->stale) {
			sp = &s->next;
			continue;
		}
		*sp = s->next;
		scraper_free(s);
	}
	pump(hc);
}

bool health_checker_probing(const struct health_checker *hc, const char *instance)
{
	for (const struct probe *p = hc->probes; p != NULL; p = p->next)
		if (strcmp(p->name, instance) == 0)
			return true;
	return false;
}

void health_checker_free(struct health_checker *hc)
{
	if (hc == NULL)
		return;
	while (hc->probes != NULL) {
		struct probe *p = hc->probes;
		hc->probes = p->next;
		probe_free(p);
	}
	while (hc->scrapers != NULL) {
		struct scraper *s = hc->scrapers;
		hc->scrapers = s->next;
		scraper_free(s);
	}
	if (hc->dns != NULL)
		evdns_base_free(hc->dns, 0);
	upstream_free(hc->up);
	free(hc);
}
