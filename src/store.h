/* store.h — private to quota: the memory store and the per-worker Redis connection. */
#ifndef SLUICE_STORE_H
#define SLUICE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sluice/config.h"

struct event_base;
struct redisReply;

/* ---------------------------------------------------------------- memory */

/*
 * A counter series is "<limit id>:<consumer|*>"; its buckets are told apart by their start
 * (ms). Every bucket of a series lives in the same shard (chosen by the series' hash), so
 * a sliding window reads its two buckets under one lock.
 */
struct mem_counter {
	const char *series;
	size_t len;
	uint64_t hash;        /* store_hash(series, len) */
	uint64_t start;       /* current bucket */
	uint64_t prev_start;  /* previous bucket (read only when prev_weight > 0) */
	uint32_t prev_weight; /* millionths; 0 for fixed windows */
	uint64_t expire_at;   /* ms: when the current bucket may be forgotten */
	uint64_t limit, amount;
	uint64_t cur, prev; /* out: the values before this admission */
};

uint64_t store_hash(const char *s, size_t len);
/* The weighted use of a counter: cur + floor(prev × weight / 10^6). */
uint64_t store_weighted(uint64_t cur, uint64_t prev, uint32_t weight);

/* All or nothing: when every counter has weighted use < limit, adds its amount to each and
 * returns true; otherwise changes nothing. cur/prev are filled either way. The shards
 * involved are locked in index order, so concurrent admissions cannot deadlock. */
bool store_memory_admit(struct mem_counter *cs, size_t n, uint64_t now);
/* Adds delta to a bucket that still exists, never going below zero. */
void store_memory_adjust(const char *series, size_t len, uint64_t hash, uint64_t start,
                         int64_t delta, uint64_t now);
/* Fills cur/prev without changing anything. */
void store_memory_read(struct mem_counter *cs, size_t n, uint64_t now);
void store_memory_free(void);

/* ---------------------------------------------------------------- redis */

struct redis_store;

enum redis_script { REDIS_SCRIPT_ADMIT, REDIS_SCRIPT_ADJUST, REDIS_N_SCRIPTS };

/* Called exactly once per accepted command, from the loop: reply is the server's answer
 * (possibly an error reply other than NOSCRIPT), NULL on timeout, disconnect or teardown.
 * ctx and the argv given to the command stay the caller's; they must live until then. */
typedef void (*redis_done_fn)(void *ctx, struct redisReply *reply);

/* One connection per worker; configure() connects (and reconnects on change). */
struct redis_store *redis_store_new(struct event_base *base);
void redis_store_configure(struct redis_store *rs, const struct config_store *cfg);
/* Pending commands get done(ctx, NULL), synchronously. */
void redis_store_free(struct redis_store *rs);

/* Changes whenever the address, credentials, db or prefix change: a reservation made under
 * another epoch is not settled (its keys may be elsewhere). */
uint64_t redis_store_epoch(const struct redis_store *rs);
const char *redis_store_prefix(const struct redis_store *rs);
enum store_on_error redis_store_on_error(const struct redis_store *rs);
/* True while commands can be sent (connected or handshaking); false during a backoff. */
bool redis_store_usable(const struct redis_store *rs);
/* Commands sent and not yet completed. */
size_t redis_store_inflight(const struct redis_store *rs);
/* Note a store failure seen by the caller (e.g. a malformed reply): starts an outage. */
void redis_store_report_failure(struct redis_store *rs, const char *why);

/* Called on the loop when a (re)connection's handshake is done: commands sent now run on
 * the new connection. Commands may be sent from it. */
typedef void (*redis_ready_fn)(void *arg);
void redis_store_on_ready(struct redis_store *rs, redis_ready_fn fn, void *arg);
/* Connected and past the handshake. */
bool redis_store_ready(const struct redis_store *rs);

/* EVALSHA script with keys argv[0..nkeys) and arguments argv[nkeys..argc); on NOSCRIPT the
 * script is sent whole with EVAL (which loads it again). false when the command could not
 * be queued (no connection): done is then not called. */
bool redis_store_eval(struct redis_store *rs, enum redis_script script, int nkeys, int argc,
                      const char **argv, const size_t *lens, redis_done_fn done, void *ctx);
/* A plain command (argv[0] is its name). */
bool redis_store_command(struct redis_store *rs, int argc, const char **argv, const size_t *lens,
                         redis_done_fn done, void *ctx);

/* ---------------------------------------------------------------- redis replies */

/* Interpreting replies (bytes from outside: any type, size or nesting is handled). */

struct redisReader;
/* A hiredis reader that builds replies the way the store's connections do: arrays of
 * more than 4096 elements are refused (an error, not a 16 GiB allocation). For the fuzz
 * target; free it with redisReaderFree. */
struct redisReader *redis_reply_reader_new(void);

/* NULL (no reply) or an error reply. */
bool redis_reply_is_error(const struct redisReply *r);
/* An error reply starting with NOSCRIPT. */
bool redis_reply_is_noscript(const struct redisReply *r);
/* A printable, NUL-terminated description for a log line (an error's text, or the
 * reply's kind); returns its length (< cap). */
size_t redis_reply_describe(const struct redisReply *r, char *buf, size_t cap);
/* A counter's value: nil (absent) → 0, an integer (negative → 0), or a string of 1–20
 * decimal digits that fits in 64 bits. false for anything else. */
bool redis_reply_u64(const struct redisReply *r, uint64_t *out);

enum redis_verdict { REDIS_VERDICT_BAD, REDIS_VERDICT_REFUSED, REDIS_VERDICT_ADMITTED };
/* The admission script's answer for n counters: {0|1, cur1, prev1, ...}, integers only;
 * cur[] and prev[] (n each) get the values read (negative → 0). BAD for any other shape
 * (then cur/prev may be partly written). */
enum redis_verdict redis_reply_admit(const struct redisReply *r, size_t n, uint64_t *cur,
                                     uint64_t *prev);
/* An MGET of n keys: out[i] per redis_reply_u64. false for any other shape. */
bool redis_reply_values(const struct redisReply *r, size_t n, uint64_t *out);

#endif
