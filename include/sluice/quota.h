/* quota.h — token and request quotas: admission with reservation, settlement, concurrency caps. */
#ifndef SLUICE_QUOTA_H
#define SLUICE_QUOTA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sluice/config.h"
#include "sluice/record.h"

/*
 * The model (docs/quotas.md has the whole of it):
 *
 * - A counter is one limit (config_limit.id) for one consumer ("*" for an instance's own
 *   limits) in one window. Admission looks at every applicable counter, in this order:
 *   the consumer's limits for this instance, the consumer's limits for all instances
 *   (tokens, then requests), then the instance's own limits.
 * - Rule: a counter admits while used + reserved < limit. Admission is all or nothing:
 *   when every counter admits, the estimate is reserved on each of them at once (the
 *   Redis store does it in one Lua script); otherwise nothing is reserved.
 * - Settlement replaces the reservation with the real usage; release gives it back.
 * - Bound: when reservations are not below the real usage, a counter never ends more
 *   than one request's real tokens above its limit, whatever the concurrency.
 * - Cost limits (strategy cost) are token limits whose amounts are what the tokens cost at
 *   the price of the attempt's instance, in integer micro-units, rounded up: the same
 *   reservations, settlements and stores. They apply only to instances with a price.
 *
 * Threads: one struct quota per worker thread, used only from that thread and its
 * event_base. The memory store and the concurrency registry are process-wide and
 * thread-safe (sharded locks / atomics, no global lock).
 */

struct event_base;
struct quota;
struct quota_pending;

/* Applicable limits per admission (consumer + instance). The loader should refuse
 * configurations that could exceed it; extra limits are ignored with an error log. */
#define QUOTA_MAX_COUNTERS 16

/*
 * Redis reservations (docs/quotas.md §8). Each carries a token (QUOTA_TOKEN_LEN hex
 * digits, unique per admission). One that is not settled within its lease — the
 * instance's timeouts.total plus QUOTA_LEASE_GRACE_MS after its admission — is presumed
 * orphaned and is reclaimed by the next admission with the same prefix. Settlements that
 * cannot reach Redis wait for the next connection, at most QUOTA_RETRY_MAX per worker
 * (beyond, the oldest is dropped) and until two leases after their admission.
 */
#define QUOTA_TOKEN_LEN      32
#define QUOTA_LEASE_GRACE_MS 60000
#define QUOTA_RETRY_MAX      4096

/* One counter's reservation (private to quota.c; in the header so tickets can be embedded). */
struct quota_reservation {
	const struct config_limit *limit;
	uint64_t start, end;  /* the bucket reserved in: [start, end) ms since the epoch */
	uint64_t prev_start;  /* the bucket before it (sliding windows) */
	uint32_t prev_weight; /* sliding: weight of the previous bucket, millionths; 0 fixed */
	uint64_t amount;      /* reserved */
	uint64_t cur, prev;   /* read at admission: the bucket's value and the previous one's */
	bool is_consumer;
};

enum quota_backend { QUOTA_BACKEND_NONE, QUOTA_BACKEND_MEMORY, QUOTA_BACKEND_REDIS };

/* Embedded in the request and zeroed before its first use. quota_admit resets the
 * public part; a ticket is reusable for the next attempt once settled or released. */
struct quota_ticket {
	/* public results */
	bool admitted;
	const struct config_limit *denied_by; /* the first limit that refused, in check order */
	bool denied_is_consumer;              /* a consumer's limit vs the instance's own */
	uint64_t retry_after_s; /* when every refusing limit would admit again (≥ 1) */
	/* the tightest applicable token limit (least remaining), for x-ratelimit-*-tokens on
	 * success (remaining after this reservation) and on rejection */
	bool have_headers;
	uint64_t hdr_limit, hdr_remaining, hdr_reset_s;
	bool store_error;   /* the store failed (Redis down or slow): the result came from the
	                       local fallback (on_error: allow) or is a refusal (deny) */
	bool deny_on_error; /* store_error with on_error: deny → the caller answers 503 */

	/* private */
	struct quota_reservation res[QUOTA_MAX_COUNTERS];
	unsigned n_res;
	const char *consumer_name;       /* "*" for auth: none */
	enum quota_backend backend;      /* where the reservation lives */
	uint64_t epoch;                  /* redis store epoch at admission */
	char token[QUOTA_TOKEN_LEN + 1]; /* redis: the reservation's */
	uint64_t deadline;               /* redis: ms, after which a settlement is pointless */
	bool holds;                      /* a live reservation: settle or release it */
	struct quota_pending *pending;   /* a Redis admission in flight */
	void (*cb)(void *arg, struct quota_ticket *t);
	void *cb_arg;
	/* the attempt's instance: its price settles the cost limits */
	const struct config_instance *instance;
};

typedef void (*quota_cb)(void *arg, struct quota_ticket *t);
enum quota_status { QUOTA_DONE, QUOTA_PENDING };

/* One per worker: attaches to the process-wide memory store (created on the first call)
 * and, with store.type redis, opens this worker's connection on base. */
struct quota *quota_new(struct event_base *base, const struct config *c);
/* After a reload, on the worker's thread between requests: follows store type, address,
 * password, db, prefix, timeout and on_error. Counters are keyed by limit id and window,
 * so they survive reloads and a changed limit value keeps what was used. */
void quota_configure(struct quota *q, const struct config *c);
/* Closes the Redis connection. Admissions still pending are dropped without their
 * callbacks: cancel or finish the requests first. Neither this nor quota_configure may be
 * called from inside a quota_cb. */
void quota_free(struct quota *q);
/* Redis commands this worker still waits for (admissions, settlements, releases), and
 * the adjustments waiting for a connection while one is being made. A draining worker
 * keeps its loop running until this is 0 (or its drain timeout passed), or the last
 * settlements are lost (their reservations are reclaimed when their leases end). Always
 * 0 with the memory store. */
size_t quota_inflight(const struct quota *q);
/* At exit, after every quota_free: frees the memory store and the concurrency registry. */
void quota_global_free(void);

/*
 * Admission for one attempt on instance IN (consumer NULL for auth: none routes: only the
 * instance's own limits apply). Reserves est_prompt + est_completion on total_tokens
 * counters, est_prompt on prompt_tokens, est_completion on completion_tokens, 1 on request
 * counters, and on cost counters est_prompt x input + est_completion x output at IN's price
 * (quota_cost_micros' rule; a cost limit on every instance is skipped when IN has no price).
 * When t still holds a reservation from an earlier attempt, it is released first.
 *
 * Memory store (or Redis down with on_error allow/deny): QUOTA_DONE, result in *t, cb not
 * called. Redis: QUOTA_PENDING, cb(arg, t) later from the worker's loop, never from inside
 * this call; one EVALSHA round trip, bounded by store.redis.timeout. c is the request's
 * snapshot (the pointers in the ticket point into it: keep it referenced until settled).
 */
/* A ticket as zeroed, but for the reservations past n_res (now 0), which nothing reads:
 * plan_add zeroes each one it takes. ~200 bytes written instead of sizeof (1.3 KiB). */
void quota_ticket_reset(struct quota_ticket *t);
enum quota_status quota_admit(struct quota *q, struct quota_ticket *t, const struct config *c,
                              const struct config_consumer *consumer,
                              const struct config_instance *in, uint64_t est_prompt,
                              uint64_t est_completion, quota_cb cb, void *arg);
/* The same for a request that costs no tokens (count_tokens): only the request-rate limits
 * (requests:) that quota_admit would check apply — token and cost limits neither refuse it
 * nor are charged, whether or not they are spent. Settle or release it the same way (a
 * settlement charges the request, 1, on each request counter). */
enum quota_status quota_admit_requests(struct quota *q, struct quota_ticket *t,
                                       const struct config *c,
                                       const struct config_consumer *consumer,
                                       const struct config_instance *in, quota_cb cb, void *arg);
/* Replace the reservation with the real usage (as reported, or estimated): u's prompt
 * (which includes its cached tokens), cached and completion. Fire and forget: one round trip
 * with Redis. No-op when t holds nothing. */
void quota_settle_usage(struct quota *q, struct quota_ticket *t, const struct record_usage *u);
/* The same without cached tokens (cost limits price every prompt token at input). */
void quota_settle(struct quota *q, struct quota_ticket *t, uint64_t prompt, uint64_t completion);
/* An attempt that the upstream worked on but that fails over to the next candidate (a
 * timeout after the request was sent): its tokens are charged like quota_settle, its
 * request counts are given back — a request counts once, on the attempt that ends it. */
void quota_settle_tokens(struct quota *q, struct quota_ticket *t, uint64_t prompt,
                         uint64_t completion);
/* A failed attempt gives its whole reservation back (tokens and the request count): one
 * that never reached an upstream, or that the upstream refused. */
void quota_release(struct quota *q, struct quota_ticket *t);
/* The request went away while its admission was pending: cb will not run; a reservation
 * the admission makes is released when the reply arrives. Also releases a held one. */
void quota_cancel(struct quota *q, struct quota_ticket *t);

/* What usage u cost on instance IN, in micro-units of its price's currency (10^-6), rounded
 * up: (prompt - cached) x input + cached x cached_input + completion x output, prices per
 * million tokens. 0 when IN has no price or u is not present; at most 2^53 - 1. What the
 * access log and sluice_cost_total show, and what quota_settle_usage charges. */
uint64_t quota_cost_micros(const struct config_instance *in, const struct record_usage *u);

/* Per-consumer max_concurrent, per node: process-wide atomics keyed by consumer name (so
 * in-flight counts survive reloads). Always true when the consumer has no cap (then
 * release does nothing: call both with the same snapshot's consumer). */
bool quota_concurrency_acquire(const struct config_consumer *consumer);
void quota_concurrency_release(const struct config_consumer *consumer);
/* Requests in flight for a consumer name (admin API, tests). */
int quota_concurrency_current(const char *consumer_name);

/* ---------------------------------------------------------------- admin / status */

/* One limit's state. used includes in-flight reservations; for sliding windows it is the
 * weighted estimate. */
struct quota_limit_state {
	const struct config_limit *limit;
	uint64_t used, remaining, reset_s;
};

/* Synchronous, from the process-wide memory store: the state of every limit of CONSUMER
 * (when not NULL) or else of instance IN. Returns how many were written (≤ cap). With a
 * Redis store this reads only what was counted locally; use quota_peek for the shared view. */
size_t quota_peek_memory(const struct config_consumer *consumer, const struct config_instance *in,
                         struct quota_limit_state *out, size_t cap);

typedef void (*quota_peek_cb)(void *arg, struct quota_limit_state *states, size_t n,
                              bool store_error);
struct quota_peek;
/* The same through q's store. With memory: calls cb before returning and returns NULL.
 * With Redis: one MGET; returns a handle, cb runs later from the loop (states[] valid
 * during the call only); quota_peek_cancel(handle) before cb stops it. When Redis is down,
 * cb gets the memory view with store_error set. */
struct quota_peek *quota_peek(struct quota *q, const struct config_consumer *consumer,
                              const struct config_instance *in, quota_peek_cb cb, void *arg);
void quota_peek_cancel(struct quota_peek *p);

/* Tests: replace the wall clock (ms since the epoch, UTC); NULL restores it. */
void quota_set_clock_for_tests(uint64_t (*now_ms)(void));

/* The bucket of WINDOW that holds now_ms: [*start, *end), and the bucket before it.
 * Fixed windows of W ms start at floor(now/W)*W; month windows on the 1st, 00:00 UTC,
 * every N months counted from January 1970. Public for the tests and the admin API. */
void quota_window_bounds(const struct config_window *w, uint64_t now_ms, uint64_t *start,
                         uint64_t *end, uint64_t *prev_start);

#endif
