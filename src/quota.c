/* quota.c — admission with reservation, settlement and release; concurrency caps. */
#include "sluice/quota.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "sluice/log.h"
#include "store.h"

/*
 * The admission rule, and why (docs/quotas.md has the proof):
 *
 *   a counter admits while  used + reserved < limit,  and then reserves the amount.
 *
 * used + reserved is what the counter holds: every in-flight request's estimate plus the
 * real usage of the settled ones. Refusing only an exhausted counter (rather than one
 * the estimate would overflow) lets a consumer spend its whole quota even when the last
 * request's estimate is generous, and still bounds the overshoot: the last request
 * admitted saw the counter below the limit, every earlier one is in the counter at no
 * less than its real use (when estimates are not low), so the total ends below
 * limit + that last request's real tokens — however many requests raced for it,
 * because the check and the reservation happen in one critical section (a shard lock
 * or one Lua script).
 */

/* A settlement, release or undo of one Redis reservation (the ADJUST script), owned until
 * Redis answered it. While Redis cannot be reached it waits in its quota's retry queue. */
struct quota_adjust {
	TAILQ_ENTRY(quota_adjust) link;
	struct quota *q;
	uint64_t epoch;    /* the store's at admission: another epoch's keys may be elsewhere */
	uint64_t deadline; /* ms: dropped if not delivered by then (its lease has run out) */
	int nkeys, argc;
	const char **argv; /* in the same block */
	size_t *lens;
};

TAILQ_HEAD(quota_adjust_list, quota_adjust);

struct quota {
	struct event_base *base;
	struct redis_store *redis; /* NULL with the memory store */
	bool freeing;
	/* Reservation tokens: a per-worker random prefix and a sequence number. */
	uint64_t token_seed, token_seq;
	struct quota_adjust_list retry; /* adjustments waiting for Redis, oldest first */
	size_t n_retry;
	size_t n_dropped; /* since the last time Redis was reachable */
};

/* A Redis admission in flight. Owns its keys and token, so that a cancelled one can still
 * be released and one whose reply was lost can be undone. */
struct quota_pending {
	struct quota *q;
	struct quota_ticket *t; /* NULL once cancelled */
	unsigned n;
	uint64_t amounts[QUOTA_MAX_COUNTERS];
	char token[QUOTA_TOKEN_LEN + 1];
	uint64_t epoch, deadline, lease_ms;
	int argc; /* 4 keys per counter, then 4 + 4 per counter arguments */
	const char **argv;
	size_t *lens;
};

/* ---------------------------------------------------------------- clock and windows */

static uint64_t wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t (*_Atomic clock_fn)(void) = wall_ms;

void quota_set_clock_for_tests(uint64_t (*now_ms)(void))
{
	clock_fn = now_ms != NULL ? now_ms : wall_ms;
}

static uint64_t now_ms(void)
{
	return clock_fn();
}

/* Start of the index-th month since January 1970, in ms. */
static uint64_t month_start_ms(int64_t index)
{
	struct tm tm;

	memset(&tm, 0, sizeof(tm));
	if (index < 0)
		index = 0;
	tm.tm_year = 70 + (int)(index / 12);
	tm.tm_mon = (int)(index % 12);
	tm.tm_mday = 1;
	return (uint64_t)timegm(&tm) * 1000;
}

void quota_window_bounds(const struct config_window *w, uint64_t now, uint64_t *start,
                         uint64_t *end, uint64_t *prev_start)
{
	if (w->months > 0) {
		time_t secs = (time_t)(now / 1000);
		struct tm tm;
		int64_t idx, first;

		gmtime_r(&secs, &tm);
		idx = (int64_t)(tm.tm_year - 70) * 12 + tm.tm_mon;
		first = idx - idx % (int64_t)w->months;
		*start = month_start_ms(first);
		*end = month_start_ms(first + (int64_t)w->months);
		*prev_start = month_start_ms(first - (int64_t)w->months);
		return;
	}
	uint64_t len = w->ms > 0 ? w->ms : 1;
	*start = now - now % len;
	*end = *start + len;
	*prev_start = *start >= len ? *start - len : 0;
}

/* ---------------------------------------------------------------- the plan */

/*
 * Amounts come from the client (max_tokens, n, the size of its prompt) and from the
 * upstream (its usage): every sum saturates, and one charge is at most QUOTA_MAX_AMOUNT —
 * the largest limit the loader accepts, and the largest integer a Lua number (the Redis
 * scripts' arithmetic) holds exactly.
 */
#define QUOTA_MAX_AMOUNT 9007199254740991ull /* 2^53 - 1 */

static uint64_t sat_add(uint64_t a, uint64_t b)
{
	return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static uint64_t clamp_amount(uint64_t v)
{
	return v > QUOTA_MAX_AMOUNT ? QUOTA_MAX_AMOUNT : v;
}

static uint64_t limit_value(const struct config_limit *l)
{
	return l->requests > 0 ? l->requests : l->tokens;
}

/* Token and cost limits count usage: charged whenever the upstream worked, also on an attempt
 * that fails over (quota_settle_tokens). Request limits count requests. */
static bool counts_usage(const struct config_limit *l)
{
	return l->requests == 0;
}

/* The limits the x-ratelimit-*-tokens headers speak of: tokens, not cost. */
static bool counts_tokens(const struct config_limit *l)
{
	return l->requests == 0 && l->strategy != LIMIT_COST;
}

/*
 * Cost. A price is per million tokens in micro-units (config_price), so tokens x price is in
 * millionths of a micro-unit; the sum is rounded up once to a whole micro-unit — a charge is
 * never below what the usage cost. Cached prompt tokens are part of prompt (as the upstreams
 * report them) and are priced at cached_input instead of input.
 */
#define QUOTA_PRICE_TOKENS 1000000u /* a price is for this many tokens */

static uint64_t price_cost(const struct config_price *p, uint64_t prompt, uint64_t cached,
                           uint64_t completion)
{
	unsigned __int128 sum;

	if (cached > prompt)
		cached = prompt;
	/* Counts below 2^64 and prices below 2^40 (the loader's bound): no product or sum wraps. */
	sum = (unsigned __int128)(prompt - cached) * p->input +
	      (unsigned __int128)cached * p->cached_input +
	      (unsigned __int128)completion * p->output;
	sum = (sum + QUOTA_PRICE_TOKENS - 1) / QUOTA_PRICE_TOKENS;
	return sum > QUOTA_MAX_AMOUNT ? QUOTA_MAX_AMOUNT : (uint64_t)sum;
}

uint64_t quota_cost_micros(const struct config_instance *in, const struct record_usage *u)
{
	if (in == NULL || !in->price.set || u == NULL || !u->present)
		return 0;
	return price_cost(&in->price, u->prompt, u->cached, u->completion);
}

/* A cost limit counts only attempts on instances that have a price. */
static bool limit_applies(const struct config_limit *l, const struct config_instance *in)
{
	return l->strategy != LIMIT_COST || (in != NULL && in->price.set);
}

static uint64_t amount_for(const struct config_limit *l, const struct config_instance *in,
                           uint64_t prompt, uint64_t cached, uint64_t completion)
{
	if (l->requests > 0)
		return 1;
	switch (l->strategy) {
	case LIMIT_PROMPT_TOKENS:
		return prompt;
	case LIMIT_COMPLETION_TOKENS:
		return completion;
	case LIMIT_COST:
		return in != NULL && in->price.set
		               ? price_cost(&in->price, prompt, cached, completion)
		               : 0;
	default:
		return clamp_amount(sat_add(prompt, completion));
	}
}

static bool plan_add(struct quota_ticket *t, const struct config_limit *l, bool is_consumer,
                     const struct config_instance *in, uint64_t prompt, uint64_t completion,
                     uint64_t now)
{
	static atomic_bool warned;
	struct quota_reservation *r;

	if (t->n_res >= QUOTA_MAX_COUNTERS) {
		if (!atomic_exchange(&warned, true))
			log_error("quota: more than %d limits apply to one request; limit %s and "
			          "later "
			          "ones are not enforced",
			          QUOTA_MAX_COUNTERS, l->id ? l->id : "?");
		return false;
	}
	r = &t->res[t->n_res++];
	memset(r, 0, sizeof(*r));
	r->limit = l;
	r->is_consumer = is_consumer;
	r->amount = amount_for(l, in, prompt, 0, completion);
	quota_window_bounds(&l->window, now, &r->start, &r->end, &r->prev_start);
	if (l->type == LIMIT_SLIDING && r->end > r->start) {
		/* The previous bucket counts for the part of it the sliding window still covers. */
		r->prev_weight = (uint32_t)((unsigned __int128)(r->end - now) * 1000000u /
		                            (r->end - r->start));
		if (r->prev_weight == 0)
			r->prev_weight =
			        1; /* still sliding: keep reading it until the bucket turns */
	}
	return true;
}

/* The applicable limits in check order: the consumer's for this instance, the consumer's
 * for all instances, the consumer's request rates, then the instance's own. requests_only
 * keeps the request rates alone (quota_admit_requests). */
static void plan_build(struct quota_ticket *t, const struct config_consumer *cons,
                       const struct config_instance *in, uint64_t prompt, uint64_t completion,
                       uint64_t now, bool requests_only)
{
	t->consumer_name = cons != NULL ? cons->name : "*";
	if (cons != NULL && !requests_only) {
		for (size_t i = 0; i < cons->n_limits; i++) {
			const struct config_limit *l = &cons->limits[i];
			if (counts_usage(l) && l->instance != NULL && l->instance == in)
				plan_add(t, l, true, in, prompt, completion, now);
		}
		/* A cost limit on every instance: each attempt at its own instance's price. */
		for (size_t i = 0; i < cons->n_limits; i++) {
			const struct config_limit *l = &cons->limits[i];
			if (counts_usage(l) && l->instance == NULL && limit_applies(l, in))
				plan_add(t, l, true, in, prompt, completion, now);
		}
	}
	if (cons != NULL) {
		for (size_t i = 0; i < cons->n_limits; i++) {
			const struct config_limit *l = &cons->limits[i];
			if (!counts_usage(l) && (l->instance == NULL || l->instance == in))
				plan_add(t, l, true, in, prompt, completion, now);
		}
	}
	if (in != NULL)
		for (size_t i = 0; i < in->n_limits; i++)
			if (!requests_only || !counts_usage(&in->limits[i]))
				plan_add(t, &in->limits[i], false, in, prompt, completion, now);
}

static const char *series_consumer(const struct quota_ticket *t, const struct quota_reservation *r)
{
	return r->is_consumer ? t->consumer_name : "*";
}

/* "<limit id>:<consumer|*>" */
static size_t series_len(const struct config_limit *l, const char *consumer)
{
	return strlen(l->id ? l->id : "") + 1 + strlen(consumer);
}

static size_t series_write(char *p, const struct config_limit *l, const char *consumer)
{
	size_t a = strlen(l->id ? l->id : ""), b = strlen(consumer);
	memcpy(p, l->id ? l->id : "", a);
	p[a] = ':';
	memcpy(p + a + 1, consumer, b);
	return a + 1 + b;
}

/* ---------------------------------------------------------------- results */

static uint64_t ceil_s(uint64_t ms)
{
	uint64_t s = ms / 1000 + (ms % 1000 != 0);
	return s > 0 ? s : 1;
}

/* When a refusing counter would admit again, assuming nothing more is charged. */
static uint64_t retry_ms(const struct quota_reservation *r, uint64_t limit, uint64_t now)
{
	uint64_t w = r->end - r->start;

	if (r->end <= now)
		return 1;
	if (r->limit->type != LIMIT_SLIDING)
		return r->end - now;
	if (r->cur >= limit) {
		/* In the next bucket this one weighs (1 - f): below the limit once
		 * f > (cur - limit) / cur. */
		return r->end - now + (uint64_t)((unsigned __int128)w * (r->cur - limit) / r->cur) +
		       1;
	}
	if (r->prev == 0)
		return 1;
	/* cur + prev × (end - t) / w < limit  ⇔  t > end - (limit - cur) × w / prev */
	uint64_t keep = (uint64_t)((unsigned __int128)(limit - r->cur) * w / r->prev);
	uint64_t when = keep >= r->end ? 0 : r->end - keep;
	return when > now ? when - now + 1 : 1;
}

/* Fill the public part of t from the values read (res[].cur/prev) and the verdict. */
static void compute_result(struct quota_ticket *t, bool admitted, uint64_t now)
{
	uint64_t retry = 0;
	bool have = false;
	uint64_t best_remaining = 0, best_limit = 0, best_reset = 0;

	t->admitted = admitted;
	t->denied_by = NULL;
	t->denied_is_consumer = false;
	for (unsigned i = 0; i < t->n_res; i++) {
		const struct quota_reservation *r = &t->res[i];
		uint64_t limit = limit_value(r->limit);
		uint64_t used = store_weighted(r->cur, r->prev, r->prev_weight);

		if (!admitted && used >= limit) {
			uint64_t ms = retry_ms(r, limit, now);
			if (t->denied_by == NULL) {
				t->denied_by = r->limit;
				t->denied_is_consumer = r->is_consumer;
			}
			/* The request needs every refusing limit to admit again. */
			if (ms > retry)
				retry = ms;
		}
		if (counts_tokens(r->limit)) {
			uint64_t after = admitted ? sat_add(used, r->amount) : used;
			uint64_t remaining = limit > after ? limit - after : 0;
			uint64_t reset = r->end > now ? r->end - now : 0;
			if (r->limit->type == LIMIT_SLIDING)
				reset += r->end - r->start; /* fully replenished one window later */
			if (!have || remaining < best_remaining ||
			    (remaining == best_remaining && limit < best_limit)) {
				have = true;
				best_remaining = remaining;
				best_limit = limit;
				best_reset = reset;
			}
		}
	}
	t->retry_after_s = admitted ? 0 : ceil_s(retry);
	t->have_headers = have;
	t->hdr_limit = best_limit;
	t->hdr_remaining = best_remaining;
	t->hdr_reset_s = have ? ceil_s(best_reset) : 0;
	t->holds = admitted && t->n_res > 0;
}

/* ---------------------------------------------------------------- memory store */

/* Builds the memory-store view of t's counters. names must hold every series. */
static void mem_counters(const struct quota_ticket *t, struct mem_counter *cs, char *names)
{
	char *p = names;

	for (unsigned i = 0; i < t->n_res; i++) {
		const struct quota_reservation *r = &t->res[i];
		struct mem_counter *c = &cs[i];
		c->series = p;
		c->len = series_write(p, r->limit, series_consumer(t, r));
		p += c->len;
		c->hash = store_hash(c->series, c->len);
		c->start = r->start;
		c->prev_start = r->prev_start;
		c->prev_weight = r->prev_weight;
		/* The bucket is read until the end of the window after it (sliding). */
		c->expire_at = r->end + (r->end - r->start);
		c->limit = limit_value(r->limit);
		c->amount = r->amount;
	}
}

static size_t names_size(const struct quota_ticket *t)
{
	size_t n = 1;
	for (unsigned i = 0; i < t->n_res; i++)
		n += series_len(t->res[i].limit, series_consumer(t, &t->res[i]));
	return n;
}

/* Returns false only when out of memory (then the request is admitted uncounted). */
static bool memory_admit(struct quota_ticket *t)
{
	struct mem_counter cs[QUOTA_MAX_COUNTERS];
	char small[2048], *names = small;
	size_t need = names_size(t);
	uint64_t now = now_ms();
	bool ok;

	if (need > sizeof(small) && (names = malloc(need)) == NULL) {
		compute_result(t, true, now);
		t->holds = false;
		return false;
	}
	memset(cs, 0, sizeof(cs));
	mem_counters(t, cs, names);
	ok = store_memory_admit(cs, t->n_res, now);
	for (unsigned i = 0; i < t->n_res; i++) {
		t->res[i].cur = cs[i].cur;
		t->res[i].prev = cs[i].prev;
	}
	if (names != small)
		free(names);
	t->backend = QUOTA_BACKEND_MEMORY;
	compute_result(t, ok, now);
	return true;
}

static void memory_adjust(const struct quota_ticket *t, const int64_t *deltas)
{
	char small[2048], *names = small;
	size_t need = names_size(t);
	uint64_t now = now_ms();

	if (need > sizeof(small) && (names = malloc(need)) == NULL)
		return;
	for (unsigned i = 0; i < t->n_res; i++) {
		const struct quota_reservation *r = &t->res[i];
		size_t len = series_write(names, r->limit, series_consumer(t, r));
		store_memory_adjust(names, len, store_hash(names, len), r->start, deltas[i], now);
	}
	if (names != small)
		free(names);
}

/* ---------------------------------------------------------------- redis store */

/*
 * Every Redis reservation carries a token, unique per admission (docs/quotas.md §8 and
 * store_redis.c's scripts): settling, releasing or undoing it by token is idempotent, so
 * an adjustment whose reply is lost is simply sent again; an admission whose reply is lost
 * is undone by token, which also stops it should it still run later on the old
 * connection; and a reservation nobody settles within its lease is reclaimed by the next
 * admission (with the same prefix).
 */

/* How long a reservation may stay unsettled before it is presumed orphaned: the longest
 * an attempt on the instance may run, and the time its settlement may take to arrive. */
static uint64_t lease_ms(const struct config_instance *in)
{
	return (in != NULL ? in->timeouts.total : 0) + QUOTA_LEASE_GRACE_MS;
}

static void next_token(struct quota *q, char out[QUOTA_TOKEN_LEN + 1])
{
	snprintf(out, QUOTA_TOKEN_LEN + 1, "%016" PRIx64 "%016" PRIx64, q->token_seed,
	         ++q->token_seq);
}

/* One allocation holding a header of head bytes, argv, lens and the text they point to. */
static bool argv_alloc(size_t argc, size_t text, const char ***argv, size_t **lens, char **buf,
                       void **block, size_t head)
{
	size_t a = head, b, c;
	char *p;

	a = (a + 15) & ~(size_t)15;
	b = a + argc * sizeof(char *);
	c = b + argc * sizeof(size_t);
	p = malloc(c + text);
	if (p == NULL)
		return false;
	*block = p;
	*argv = (const char **)(void *)(p + a);
	*lens = (size_t *)(void *)(p + b);
	*buf = p + c;
	return true;
}

/* The reservations and the dead tokens: <prefix> and these (store_redis.c has the layout). */
static const char reservations_key[] = "reservations";
static const char dead_key[] = "reservations:dead";

/* Appends "<prefix><series>:<start>" at *bufp as argv[i]. */
static void put_key(const struct quota_ticket *t, const struct quota_reservation *r, uint64_t start,
                    const char *prefix, const char **argv, size_t *lens, int i, char **bufp)
{
	char *p = *bufp;
	size_t n = strlen(prefix);

	memcpy(p, prefix, n);
	n += series_write(p + n, r->limit, series_consumer(t, r));
	n += (size_t)sprintf(p + n, ":%" PRIu64, start);
	argv[i] = p;
	lens[i] = n;
	*bufp = p + n + 1;
}

/* Appends bytes as argv[i]. */
static void put_bytes(const char *s, size_t len, const char **argv, size_t *lens, int i,
                      char **bufp)
{
	memcpy(*bufp, s, len);
	(*bufp)[len] = '\0';
	argv[i] = *bufp;
	lens[i] = len;
	*bufp += len + 1;
}

static void put_num(uint64_t v, const char **argv, size_t *lens, int i, char **bufp)
{
	int n = sprintf(*bufp, "%" PRIu64, v);
	argv[i] = *bufp;
	lens[i] = (size_t)n;
	*bufp += n + 1;
}

/* argv[0] and argv[1]: the reservations and the dead tokens under prefix. */
static void put_registry(const char *prefix, const char **argv, size_t *lens, char **bufp)
{
	size_t n = strlen(prefix);

	memcpy(*bufp, prefix, n);
	memcpy(*bufp + n, reservations_key, sizeof(reservations_key));
	argv[0] = *bufp;
	lens[0] = n + sizeof(reservations_key) - 1;
	*bufp += lens[0] + 1;
	memcpy(*bufp, prefix, n);
	memcpy(*bufp + n, dead_key, sizeof(dead_key));
	argv[1] = *bufp;
	lens[1] = n + sizeof(dead_key) - 1;
	*bufp += lens[1] + 1;
}

/* Appends a reservation's record — its token, then "|<amount>|<key length>|<key>" per
 * counter, the buckets being keys[0..n) — as argv[i]. The admission stores it, the
 * settlement names it again: both build it here, byte for byte the same. */
static void put_record(const char *token, unsigned n, const char *const *keys, const size_t *klens,
                       const uint64_t *amounts, const char **argv, size_t *lens, int i, char **bufp)
{
	char *p = *bufp;

	memcpy(p, token, QUOTA_TOKEN_LEN);
	p += QUOTA_TOKEN_LEN;
	for (unsigned k = 0; k < n; k++) {
		p += sprintf(p, "|%" PRIu64 "|%zu|", amounts[k], klens[k]);
		memcpy(p, keys[k], klens[k]);
		p += klens[k];
	}
	*p = '\0';
	argv[i] = *bufp;
	lens[i] = (size_t)(p - *bufp);
	*bufp = p + 1;
}

/* Room for one bucket's key and its terminator. */
static size_t key_room(const struct quota_ticket *t, const struct quota_reservation *r,
                       const char *prefix)
{
	return strlen(prefix) + series_len(r->limit, series_consumer(t, r)) + 1 + 20 + 1;
}

#define NUM_ROOM 21 /* a uint64_t in decimal and its terminator */

/* Room for the two registry keys, and for a record of n counters whose keys take
 * key_text bytes. */
static size_t registry_room(const char *prefix)
{
	return 2 * strlen(prefix) + sizeof(reservations_key) + sizeof(dead_key);
}

static size_t record_room(unsigned n, size_t key_text)
{
	return QUOTA_TOKEN_LEN + 1 + n * (3 + 2 * NUM_ROOM) + key_text;
}

/* ---------------------------------------------------------------- redis: adjustments */

static void adjust_send(struct quota_adjust *a);

static void adjust_drop(struct quota *q, struct quota_adjust *a)
{
	if (q->n_dropped++ == 0)
		log_warn("quota: a redis settlement could not be delivered in time (or more than "
		         "%d were waiting) and was dropped; its reservation is reclaimed when its "
		         "lease ends",
		         QUOTA_RETRY_MAX);
	free(a);
}

/* Keep a for the next connection, unless it is too late or too many wait already. */
static void retry_push(struct quota *q, struct quota_adjust *a)
{
	if (now_ms() > a->deadline) {
		adjust_drop(q, a);
		return;
	}
	if (q->n_retry >= QUOTA_RETRY_MAX) {
		struct quota_adjust *oldest = TAILQ_FIRST(&q->retry);
		TAILQ_REMOVE(&q->retry, oldest, link);
		q->n_retry--;
		adjust_drop(q, oldest);
	}
	TAILQ_INSERT_TAIL(&q->retry, a, link);
	q->n_retry++;
}

/* Redis is back (a handshake completed): send what waited, oldest first. */
static void retry_flush(void *arg)
{
	struct quota *q = arg;
	struct quota_adjust_list batch;
	struct quota_adjust *a;

	if (q->n_dropped > 0)
		log_info("quota: %zu redis settlements were dropped while redis was unreachable",
		         q->n_dropped);
	q->n_dropped = 0;
	if (q->n_retry > 0)
		log_debug("quota: sending %zu redis settlements that waited for the connection",
		          q->n_retry);
	TAILQ_INIT(&batch);
	TAILQ_CONCAT(&batch, &q->retry, link);
	q->n_retry = 0;
	while ((a = TAILQ_FIRST(&batch)) != NULL) {
		TAILQ_REMOVE(&batch, a, link);
		adjust_send(a); /* back on q->retry if it cannot go */
	}
}

static void retry_clear(struct quota *q)
{
	struct quota_adjust *a;

	while ((a = TAILQ_FIRST(&q->retry)) != NULL) {
		TAILQ_REMOVE(&q->retry, a, link);
		free(a);
	}
	q->n_retry = 0;
}

static void adjust_done(void *ctx, struct redisReply *reply)
{
	struct quota_adjust *a = ctx;
	struct quota *q = a->q;
	char why[128];

	if (!redis_reply_is_error(reply) || q->freeing) {
		free(a);
		return;
	}
	/* No reply, or an error: it may or may not have run. By token it can run twice. */
	redis_reply_describe(reply, why, sizeof(why));
	log_debug("quota: redis adjustment not confirmed (%s), kept for a retry", why);
	retry_push(q, a);
}

static void adjust_send(struct quota_adjust *a)
{
	struct quota *q = a->q;

	/* Another server or namespace now: this reservation's keys are not there. */
	if (q->redis == NULL || a->epoch != redis_store_epoch(q->redis)) {
		free(a);
		return;
	}
	if (now_ms() > a->deadline) {
		adjust_drop(q, a);
		return;
	}
	if (!redis_store_usable(q->redis) ||
	    !redis_store_eval(q->redis, REDIS_SCRIPT_ADJUST, a->nkeys, a->argc, a->argv, a->lens,
	                      adjust_done, a))
		retry_push(q, a);
}

/* An ADJUST for n counters: argv[0..2) the registry, argv[2..2+n) the buckets, then
 * token, now, tomb, the record and (amount, charge) per counter, put by the caller in
 * text bytes. */
static struct quota_adjust *adjust_new(struct quota *q, unsigned n, size_t text, uint64_t epoch,
                                       uint64_t deadline, char **buf)
{
	struct quota_adjust *a;
	const char **argv;
	size_t *lens;
	void *block;
	int argc = (int)(3 * n + 6);

	if (!argv_alloc((size_t)argc, text, &argv, &lens, buf, &block, sizeof(*a)))
		return NULL;
	a = block;
	memset(a, 0, sizeof(*a));
	a->q = q;
	a->epoch = epoch;
	a->deadline = deadline;
	a->nkeys = (int)(2 + n);
	a->argc = argc;
	a->argv = argv;
	a->lens = lens;
	return a;
}

/* Token, now, tomb and the per-counter (amount, charge) of an ADJUST. */
static void put_adjust_args(struct quota_adjust *a, unsigned n, const char *token, uint64_t tomb,
                            const uint64_t *amounts, const uint64_t *charges, char **buf)
{
	int base = (int)(2 + n);

	put_bytes(token, QUOTA_TOKEN_LEN, a->argv, a->lens, base, buf);
	put_num(now_ms(), a->argv, a->lens, base + 1, buf);
	put_num(tomb, a->argv, a->lens, base + 2, buf);
	for (unsigned i = 0; i < n; i++) {
		put_num(amounts[i], a->argv, a->lens, base + 4 + (int)(2 * i), buf);
		put_num(charges[i], a->argv, a->lens, base + 5 + (int)(2 * i), buf);
	}
}

/* Settle (charges[i] on counter i) or release (all 0) a reservation held by t. */
static void redis_adjust(struct quota *q, const struct quota_ticket *t, const uint64_t *charges)
{
	const char *prefix;
	struct quota_adjust *a;
	uint64_t amounts[QUOTA_MAX_COUNTERS];
	size_t key_text = 0;
	unsigned n = t->n_res;
	char *buf;

	if (q->redis == NULL || t->epoch != redis_store_epoch(q->redis)) {
		log_debug("quota: redis settings changed, adjustment of %u counters dropped", n);
		return;
	}
	prefix = redis_store_prefix(q->redis);
	for (unsigned i = 0; i < n; i++) {
		key_text += key_room(t, &t->res[i], prefix);
		amounts[i] = t->res[i].amount;
	}
	a = adjust_new(q, n,
	               registry_room(prefix) + 2 * key_text + record_room(n, key_text) +
	                       (3 + 2 * n) * NUM_ROOM + QUOTA_TOKEN_LEN + 1,
	               t->epoch, t->deadline, &buf);
	if (a == NULL) {
		log_error("quota: out of memory: a redis settlement is lost (reclaimed by its "
		          "lease)");
		return;
	}
	put_registry(prefix, a->argv, a->lens, &buf);
	for (unsigned i = 0; i < n; i++)
		put_key(t, &t->res[i], t->res[i].start, prefix, a->argv, a->lens, (int)(2 + i),
		        &buf);
	put_record(t->token, n, a->argv + 2, a->lens + 2, amounts, a->argv, a->lens,
	           (int)(2 + n + 3), &buf);
	put_adjust_args(a, n, t->token, 0, amounts, charges, &buf);
	adjust_send(a);
}

/*
 * For an admission in flight: release what it reserved (its requester left), or, when its
 * reply was lost (undo), give back whatever it may have reserved and leave its token dead
 * for lease_ms, so that the admission reserves nothing should it still run. Its keys and
 * record are in its own argv.
 */
static void pending_adjust(struct quota_pending *p, bool undo)
{
	static const uint64_t none[QUOTA_MAX_COUNTERS];
	struct quota_adjust *a;
	size_t text = (3 + 2 * p->n) * NUM_ROOM + QUOTA_TOKEN_LEN + 1;
	unsigned n = p->n;
	int nkeys = (int)(2 + 2 * n);
	char *buf;

	for (int i = 0; i < 2; i++)
		text += p->lens[i] + 1;
	for (unsigned i = 0; i < n; i++)
		text += p->lens[2 + 2 * i] + 1;
	text += p->lens[nkeys + 4] + 1;
	a = adjust_new(p->q, n, text, p->epoch, p->deadline, &buf);
	if (a == NULL) {
		log_error("quota: out of memory: a redis release is lost (reclaimed by its lease)");
		return;
	}
	for (int i = 0; i < 2; i++)
		put_bytes(p->argv[i], p->lens[i], a->argv, a->lens, i, &buf);
	for (unsigned i = 0; i < n; i++)
		put_bytes(p->argv[2 + 2 * i], p->lens[2 + 2 * i], a->argv, a->lens, (int)(2 + i),
		          &buf);
	put_bytes(p->argv[nkeys + 4], p->lens[nkeys + 4], a->argv, a->lens, (int)(2 + n + 3), &buf);
	put_adjust_args(a, n, p->token, undo ? p->lease_ms : 0, p->amounts, none, &buf);
	adjust_send(a);
}

/* ---------------------------------------------------------------- redis: admission */

/* The store failed for t: on_error decides. */
static void store_failed(struct quota *q, struct quota_ticket *t)
{
	t->store_error = true;
	if (q->redis != NULL && redis_store_on_error(q->redis) == STORE_ON_ERROR_DENY) {
		t->admitted = false;
		t->deny_on_error = true;
		t->holds = false;
		t->backend = QUOTA_BACKEND_NONE;
		return;
	}
	/* Count on this node alone until Redis is back (the outage was logged once). */
	memory_admit(t);
}

static void admit_done(void *ctx, struct redisReply *reply)
{
	struct quota_pending *p = ctx;
	struct quota_ticket *t = p->t;
	uint64_t cur[QUOTA_MAX_COUNTERS], prev[QUOTA_MAX_COUNTERS];
	enum redis_verdict v;

	if (p->q->freeing) {
		free(p);
		return;
	}
	v = redis_reply_admit(reply, p->n, cur, prev);
	if (v == REDIS_VERDICT_BAD) {
		/* Lost to a timeout or a disconnect, or not understood: the script may have
		 * reserved, or may still run on the old connection. Undo it by its token. */
		pending_adjust(p, true);
		if (reply != NULL) {
			char why[200], text[128];
			redis_reply_describe(reply, text, sizeof(text));
			snprintf(why, sizeof(why), "unexpected reply to the admission script: %s",
			         reply->type == REDIS_REPLY_ERROR ? text : "wrong shape");
			redis_store_report_failure(p->q->redis, why);
		}
	} else if (t == NULL && v == REDIS_VERDICT_ADMITTED) {
		pending_adjust(p, false); /* cancelled: give back what it reserved */
	}
	if (t == NULL) {
		free(p);
		return;
	}
	t->pending = NULL;
	if (v != REDIS_VERDICT_BAD) {
		for (unsigned i = 0; i < t->n_res; i++) {
			t->res[i].cur = cur[i];
			t->res[i].prev = prev[i];
		}
		t->backend = QUOTA_BACKEND_REDIS;
		compute_result(t, v == REDIS_VERDICT_ADMITTED, now_ms());
	} else {
		store_failed(p->q, t);
	}
	free(p);
	if (t->cb != NULL)
		t->cb(t->cb_arg, t);
}

/* Queues the admission script; false when it could not be sent. */
static bool redis_admit(struct quota *q, struct quota_ticket *t, const struct config_instance *in)
{
	const char *prefix = redis_store_prefix(q->redis);
	struct quota_pending *p;
	const char **argv;
	size_t *lens, key_text = 0, text;
	char *buf;
	void *block;
	unsigned n = t->n_res;
	int nkeys = (int)(2 + 2 * n), argc = (int)(6 * n + 7);
	uint64_t now = now_ms(), lease = lease_ms(in);

	for (unsigned i = 0; i < n; i++)
		key_text += key_room(t, &t->res[i], prefix);
	text = registry_room(prefix) + 2 * key_text + record_room(n, key_text) +
	       (4 + 4 * n) * NUM_ROOM + QUOTA_TOKEN_LEN + 1;
	if (!argv_alloc((size_t)argc, text, &argv, &lens, &buf, &block, sizeof(*p)))
		return false;
	p = block;
	memset(p, 0, sizeof(*p));
	p->q = q;
	p->t = t;
	p->n = n;
	p->argc = argc;
	p->argv = argv;
	p->lens = lens;
	p->epoch = redis_store_epoch(q->redis);
	p->lease_ms = lease;
	/* Past this, a settlement has nothing left to find: the lease ended, and so did the
	 * dead token its reclaim leaves. */
	p->deadline = now + 2 * lease;
	next_token(q, p->token);
	put_registry(prefix, argv, lens, &buf);
	for (unsigned i = 0; i < n; i++) {
		const struct quota_reservation *r = &t->res[i];
		int a = nkeys + 5 + (int)(4 * i);
		p->amounts[i] = r->amount;
		put_key(t, r, r->start, prefix, argv, lens, (int)(2 + 2 * i), &buf);
		/* The previous bucket is read only by a sliding window. */
		if (r->prev_weight > 0)
			put_key(t, r, r->prev_start, prefix, argv, lens, (int)(3 + 2 * i), &buf);
		else
			put_bytes("", 0, argv, lens, (int)(3 + 2 * i), &buf);
		put_num(limit_value(r->limit), argv, lens, a, &buf);
		put_num(r->amount, argv, lens, a + 1, &buf);
		put_num(r->prev_weight, argv, lens, a + 2, &buf);
		put_num(2 * (r->end - r->start), argv, lens, a + 3, &buf);
	}
	put_bytes(p->token, QUOTA_TOKEN_LEN, argv, lens, nkeys, &buf);
	put_num(now, argv, lens, nkeys + 1, &buf);
	put_num(now + lease, argv, lens, nkeys + 2, &buf);
	put_num(lease, argv, lens, nkeys + 3, &buf);
	{
		/* The record names the current buckets: argv[2], argv[4], ... */
		const char *keys[QUOTA_MAX_COUNTERS];
		size_t klens[QUOTA_MAX_COUNTERS];
		for (unsigned i = 0; i < n; i++) {
			keys[i] = argv[2 + 2 * i];
			klens[i] = lens[2 + 2 * i];
		}
		put_record(p->token, n, keys, klens, p->amounts, argv, lens, nkeys + 4, &buf);
	}
	t->epoch = p->epoch;
	t->deadline = p->deadline;
	memcpy(t->token, p->token, sizeof(t->token));
	t->pending = p;
	if (!redis_store_eval(q->redis, REDIS_SCRIPT_ADMIT, nkeys, argc, argv, lens, admit_done,
	                      p)) {
		t->pending = NULL;
		free(p);
		return false;
	}
	return true;
}

/* ---------------------------------------------------------------- public: lifecycle */

/*
 * BENCHMARK ONLY (bench/quota.sh): with SLUICE_QUOTA_POSTHOC=1 in the environment,
 * admission reserves 0 tokens, so the counter admits while used < limit and settlement
 * charges the real usage afterwards: the post-hoc charging of other gateways, measured
 * against the same build. Request-count limits still count 1. Read once, at the first
 * quota_new; -1 = not read yet (off). Never set it in production.
 */
static atomic_int posthoc_for_bench = -1;

struct quota *quota_new(struct event_base *base, const struct config *c)
{
	struct quota *q = calloc(1, sizeof(*q));

	if (q == NULL)
		return NULL;
	if (atomic_load(&posthoc_for_bench) < 0) {
		const char *e = getenv("SLUICE_QUOTA_POSTHOC");
		int on = e != NULL && strcmp(e, "1") == 0, unread = -1;
		if (atomic_compare_exchange_strong(&posthoc_for_bench, &unread, on) && on)
			log_warn("quota: SLUICE_QUOTA_POSTHOC=1: benchmark mode, token limits "
			         "reserve nothing (post-hoc charging)");
	}
	q->base = base;
	TAILQ_INIT(&q->retry);
	/* Tokens must not collide across workers, processes and nodes sharing one Redis. */
	if (getrandom(&q->token_seed, sizeof(q->token_seed), 0) != sizeof(q->token_seed))
		q->token_seed =
		        (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)q ^ (uint64_t)getpid() << 32;
	quota_configure(q, c);
	return q;
}

void quota_configure(struct quota *q, const struct config *c)
{
	if (c->store.type == STORE_REDIS) {
		if (q->redis == NULL) {
			q->redis = redis_store_new(q->base);
			if (q->redis == NULL) {
				log_error("quota: cannot create the redis store; counting locally");
				return;
			}
			redis_store_on_ready(q->redis, retry_flush, q);
		}
		redis_store_configure(q->redis, &c->store);
	} else if (q->redis != NULL) {
		struct redis_store *rs = q->redis;
		/* What its pending commands' completions start finds no store. */
		q->redis = NULL;
		redis_store_free(rs);
		retry_clear(q);
	}
}

void quota_free(struct quota *q)
{
	if (q == NULL)
		return;
	q->freeing = true;
	redis_store_free(q->redis);
	/* Lost with the worker: their reservations are reclaimed when their leases end. */
	if (q->n_retry > 0)
		log_warn("quota: %zu redis settlements were still waiting for redis at exit",
		         q->n_retry);
	retry_clear(q);
	free(q);
}

size_t quota_inflight(const struct quota *q)
{
	if (q->redis == NULL)
		return 0;
	/* Waiting adjustments count while a connection is being made: they go when it is. */
	return redis_store_inflight(q->redis) + (redis_store_usable(q->redis) ? q->n_retry : 0);
}

/* ---------------------------------------------------------------- public: admission */

static enum quota_status admit(struct quota *q, struct quota_ticket *t,
                               const struct config_consumer *consumer,
                               const struct config_instance *in, uint64_t est_prompt,
                               uint64_t est_completion, bool requests_only, quota_cb cb,
                               void *arg)
{
	if (t->pending != NULL || t->holds)
		quota_cancel(q, t);
	memset(t, 0, sizeof(*t));
	t->instance = in;
	/* The client chooses max_tokens and n: one attempt reserves at most the instance's
	 * max_reservation of completion tokens, so that no single request can take a whole
	 * shared quota while it runs (a larger answer is charged in full at settlement). */
	if (in != NULL && est_completion > in->max_reservation)
		est_completion = in->max_reservation;
	plan_build(t, consumer, in, clamp_amount(est_prompt), clamp_amount(est_completion),
	           now_ms(), requests_only);
	if (atomic_load_explicit(&posthoc_for_bench, memory_order_relaxed) == 1)
		for (unsigned i = 0; i < t->n_res; i++) /* benchmark only, see quota_new */
			if (counts_usage(t->res[i].limit))
				t->res[i].amount = 0;
	if (t->n_res == 0) {
		t->admitted = true;
		return QUOTA_DONE;
	}
	if (q->redis != NULL) {
		t->cb = cb;
		t->cb_arg = arg;
		if (redis_store_usable(q->redis) && redis_admit(q, t, in))
			return QUOTA_PENDING;
		t->cb = NULL;
		store_failed(q, t);
		return QUOTA_DONE;
	}
	memory_admit(t);
	return QUOTA_DONE;
}

enum quota_status quota_admit(struct quota *q, struct quota_ticket *t, const struct config *c,
                              const struct config_consumer *consumer,
                              const struct config_instance *in, uint64_t est_prompt,
                              uint64_t est_completion, quota_cb cb, void *arg)
{
	return admit(q, t, consumer, in, est_prompt, est_completion, false, cb, arg);
}

enum quota_status quota_admit_requests(struct quota *q, struct quota_ticket *t,
                                       const struct config *c,
                                       const struct config_consumer *consumer,
                                       const struct config_instance *in, quota_cb cb, void *arg)
{
	return admit(q, t, consumer, in, 0, 0, true, cb, arg);
}

/* Replace t's reservation on counter i with charges[i]. */
static void apply_charges(struct quota *q, struct quota_ticket *t, const uint64_t *charges)
{
	int64_t deltas[QUOTA_MAX_COUNTERS];

	if (t->backend == QUOTA_BACKEND_MEMORY) {
		/* Both are at most QUOTA_MAX_AMOUNT: the difference fits. */
		for (unsigned i = 0; i < t->n_res; i++)
			deltas[i] = (int64_t)charges[i] - (int64_t)t->res[i].amount;
		memory_adjust(t, deltas);
	} else if (t->backend == QUOTA_BACKEND_REDIS) {
		redis_adjust(q, t, charges);
	}
	t->holds = false;
}

static void settle(struct quota *q, struct quota_ticket *t, uint64_t prompt, uint64_t cached,
                   uint64_t completion, bool count_request)
{
	uint64_t charges[QUOTA_MAX_COUNTERS];

	if (!t->holds)
		return;
	prompt = clamp_amount(prompt);
	cached = clamp_amount(cached);
	completion = clamp_amount(completion);
	for (unsigned i = 0; i < t->n_res; i++) {
		const struct config_limit *l = t->res[i].limit;
		charges[i] = counts_usage(l) || count_request
		                     ? amount_for(l, t->instance, prompt, cached, completion)
		                     : 0;
	}
	apply_charges(q, t, charges);
}

void quota_settle(struct quota *q, struct quota_ticket *t, uint64_t prompt, uint64_t completion)
{
	settle(q, t, prompt, 0, completion, true);
}

void quota_settle_usage(struct quota *q, struct quota_ticket *t, const struct record_usage *u)
{
	if (u == NULL) {
		settle(q, t, 0, 0, 0, true);
		return;
	}
	settle(q, t, u->prompt, u->cached, u->completion, true);
}

void quota_settle_tokens(struct quota *q, struct quota_ticket *t, uint64_t prompt,
                         uint64_t completion)
{
	settle(q, t, prompt, 0, completion, false);
}

void quota_release(struct quota *q, struct quota_ticket *t)
{
	static const uint64_t none[QUOTA_MAX_COUNTERS];

	if (!t->holds)
		return;
	apply_charges(q, t, none);
}

void quota_ticket_reset(struct quota_ticket *t)
{
	const size_t tail = offsetof(struct quota_ticket, n_res);
	memset(t, 0, offsetof(struct quota_ticket, res));
	memset((char *)t + tail, 0, sizeof(*t) - tail);
}

void quota_cancel(struct quota *q, struct quota_ticket *t)
{
	if (t->pending != NULL) {
		t->pending->t = NULL;
		t->pending = NULL;
	}
	t->cb = NULL;
	quota_release(q, t);
}

/* ---------------------------------------------------------------- concurrency caps */

/*
 * A lock-free, insert-only table: name → in-flight count. Entries are published with a
 * compare-and-swap on the bucket head and never removed before quota_global_free, so
 * readers walk the chains without any lock. The table grows only with distinct consumer
 * names ever configured.
 */
#define CONC_BUCKETS 1024

struct conc_entry {
	struct conc_entry *next; /* written before publication, never after */
	atomic_int n;
	char name[];
};

static _Atomic(struct conc_entry *) conc_table[CONC_BUCKETS];

static struct conc_entry *conc_get(const char *name, bool create)
{
	size_t len = strlen(name);
	_Atomic(struct conc_entry *) *head = &conc_table[store_hash(name, len) % CONC_BUCKETS];
	struct conc_entry *first = atomic_load(head), *e, *fresh = NULL;

	for (;;) {
		for (e = first; e != NULL; e = e->next)
			if (strcmp(e->name, name) == 0) {
				free(fresh);
				return e;
			}
		if (!create)
			return NULL;
		if (fresh == NULL) {
			fresh = malloc(sizeof(*fresh) + len + 1);
			if (fresh == NULL)
				return NULL;
			atomic_init(&fresh->n, 0);
			memcpy(fresh->name, name, len + 1);
		}
		fresh->next = first;
		if (atomic_compare_exchange_weak(head, &first, fresh))
			return fresh;
		/* first now holds the new head: look again, someone may have added this name. */
	}
}

bool quota_concurrency_acquire(const struct config_consumer *consumer)
{
	struct conc_entry *e;

	if (consumer == NULL || consumer->max_concurrent <= 0)
		return true;
	e = conc_get(consumer->name, true);
	if (e == NULL)
		return true;
	if (atomic_fetch_add(&e->n, 1) >= consumer->max_concurrent) {
		atomic_fetch_sub(&e->n, 1);
		return false;
	}
	return true;
}

void quota_concurrency_release(const struct config_consumer *consumer)
{
	struct conc_entry *e;

	if (consumer == NULL || consumer->max_concurrent <= 0)
		return;
	e = conc_get(consumer->name, false);
	if (e != NULL)
		atomic_fetch_sub(&e->n, 1);
}

int quota_concurrency_current(const char *consumer_name)
{
	struct conc_entry *e = conc_get(consumer_name, false);
	return e != NULL ? atomic_load(&e->n) : 0;
}

void quota_global_free(void)
{
	for (size_t i = 0; i < CONC_BUCKETS; i++) {
		struct conc_entry *e = atomic_exchange(&conc_table[i], NULL), *next;
		for (; e != NULL; e = next) {
			next = e->next;
			free(e);
		}
	}
	store_memory_free();
}

/* ---------------------------------------------------------------- status (admin API) */

/* A ticket-shaped view of every limit of consumer (or of instance in), without amounts. */
static void peek_plan(struct quota_ticket *t, const struct config_consumer *cons,
                      const struct config_instance *in, uint64_t now)
{
	memset(t, 0, sizeof(*t));
	if (cons != NULL) {
		t->consumer_name = cons->name;
		for (size_t i = 0; i < cons->n_limits; i++)
			plan_add(t, &cons->limits[i], true, NULL, 0, 0, now);
	} else if (in != NULL) {
		t->consumer_name = "*";
		for (size_t i = 0; i < in->n_limits; i++)
			plan_add(t, &in->limits[i], false, in, 0, 0, now);
	}
	for (unsigned i = 0; i < t->n_res; i++)
		t->res[i].amount = 0;
}

static size_t peek_states(const struct quota_ticket *t, struct quota_limit_state *out, size_t cap,
                          uint64_t now)
{
	size_t n = 0;

	for (unsigned i = 0; i < t->n_res && n < cap; i++, n++) {
		const struct quota_reservation *r = &t->res[i];
		uint64_t limit = limit_value(r->limit);
		uint64_t used = store_weighted(r->cur, r->prev, r->prev_weight);
		uint64_t reset = r->end > now ? r->end - now : 0;
		if (r->limit->type == LIMIT_SLIDING)
			reset += r->end - r->start;
		out[n].limit = r->limit;
		out[n].used = used;
		out[n].remaining = limit > used ? limit - used : 0;
		out[n].reset_s = ceil_s(reset);
	}
	return n;
}

static size_t peek_memory_ticket(struct quota_ticket *t, struct quota_limit_state *out, size_t cap,
                                 uint64_t now)
{
	struct mem_counter cs[QUOTA_MAX_COUNTERS];
	char small[2048], *names = small;
	size_t need = names_size(t);

	if (need > sizeof(small) && (names = malloc(need)) == NULL)
		return 0;
	memset(cs, 0, sizeof(cs));
	mem_counters(t, cs, names);
	store_memory_read(cs, t->n_res, now);
	for (unsigned i = 0; i < t->n_res; i++) {
		t->res[i].cur = cs[i].cur;
		t->res[i].prev = cs[i].prev;
	}
	if (names != small)
		free(names);
	return peek_states(t, out, cap, now);
}

size_t quota_peek_memory(const struct config_consumer *consumer, const struct config_instance *in,
                         struct quota_limit_state *out, size_t cap)
{
	struct quota_ticket t;
	uint64_t now = now_ms();

	peek_plan(&t, consumer, in, now);
	return peek_memory_ticket(&t, out, cap, now);
}

struct quota_peek {
	struct quota *q;
	struct quota_ticket t; /* the plan; res[].cur/prev filled from the reply */
	quota_peek_cb cb;
	void *arg;
	bool cancelled;
	const char **argv;
	size_t *lens;
	void *block;
};

static void peek_done(void *ctx, struct redisReply *reply)
{
	struct quota_peek *p = ctx;
	struct quota_limit_state states[QUOTA_MAX_COUNTERS];
	uint64_t now = now_ms();
	uint64_t vals[2 * QUOTA_MAX_COUNTERS];
	size_t n;
	bool ok = redis_reply_values(reply, 2 * (size_t)p->t.n_res, vals);

	if (!p->cancelled && !p->q->freeing) {
		if (ok) {
			for (unsigned i = 0; i < p->t.n_res; i++) {
				p->t.res[i].cur = vals[2 * i];
				p->t.res[i].prev =
				        p->t.res[i].prev_weight > 0 ? vals[2 * i + 1] : 0;
			}
			n = peek_states(&p->t, states, QUOTA_MAX_COUNTERS, now);
		} else {
			n = peek_memory_ticket(&p->t, states, QUOTA_MAX_COUNTERS, now);
		}
		p->cb(p->arg, states, n, !ok);
	}
	free(p->block);
	free(p);
}

struct quota_peek *quota_peek(struct quota *q, const struct config_consumer *consumer,
                              const struct config_instance *in, quota_peek_cb cb, void *arg)
{
	struct quota_limit_state states[QUOTA_MAX_COUNTERS];
	struct quota_peek *p = calloc(1, sizeof(*p));
	uint64_t now = now_ms();
	size_t n, text = 0;
	char *buf;
	const char *prefix;

	if (p == NULL)
		return NULL;
	p->q = q;
	peek_plan(&p->t, consumer, in, now);
	if (q->redis != NULL && p->t.n_res > 0 && redis_store_usable(q->redis)) {
		int k = (int)p->t.n_res;
		prefix = redis_store_prefix(q->redis);
		for (int i = 0; i < k; i++)
			text += 2 * key_room(&p->t, &p->t.res[i], prefix) + 8;
		if (argv_alloc((size_t)(2 * k + 1), text, &p->argv, &p->lens, &buf, &p->block, 0)) {
			p->argv[0] = "MGET";
			p->lens[0] = 4;
			for (int i = 0; i < k; i++) {
				put_key(&p->t, &p->t.res[i], p->t.res[i].start, prefix, p->argv,
				        p->lens, 1 + 2 * i, &buf);
				put_key(&p->t, &p->t.res[i], p->t.res[i].prev_start, prefix,
				        p->argv, p->lens, 2 + 2 * i, &buf);
			}
			p->cb = cb;
			p->arg = arg;
			if (redis_store_command(q->redis, 2 * k + 1, p->argv, p->lens, peek_done,
			                        p))
				return p;
			free(p->block);
		}
	}
	n = peek_memory_ticket(&p->t, states, QUOTA_MAX_COUNTERS, now);
	cb(arg, states, n, q->redis != NULL && p->t.n_res > 0);
	free(p);
	return NULL;
}

void quota_peek_cancel(struct quota_peek *p)
{
	if (p != NULL)
		p->cancelled = true;
}
