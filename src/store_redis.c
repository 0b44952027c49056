/* store_redis.c — one hiredis connection per worker: Lua scripts, own timeouts, backoff. */
#include "store.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>

#include "sluice/log.h"

#include <hiredis/adapters/libevent.h>

/*
 * Why the connection is managed this way:
 *
 * - Debian's hiredis 0.14 has no command timeout for async contexts, so every command
 *   arms its own libevent timer. Replies come back in order, so when the oldest command
 *   times out the server has said nothing for a whole timeout: the connection is torn
 *   down (every pending command then completes with "no reply") and reopened after a
 *   backoff of 100 ms doubling to 5 s. A stalled server therefore costs each request at
 *   most one timeout, and later requests go straight to the fallback until the
 *   connection is back.
 * - The handshake (AUTH, SELECT, SCRIPT LOAD) is queued right behind the connect, and
 *   commands may be queued behind it: hiredis keeps them in order, so a request arriving
 *   while the connection opens waits for it instead of failing.
 * - hiredis calls the pending callbacks from inside redisAsyncFree and from its own
 *   read handler. Teardowns decided inside a hiredis callback are therefore deferred to
 *   an event of ours (kill_ev), and the context pointer is cleared before it is freed so
 *   that anything a callback starts goes to the fallback.
 * - One outage is logged once per process: a process-wide count of workers whose
 *   connection is down; the warning is printed on 0 → 1 and the recovery on 1 → 0.
 */

#define BACKOFF_MIN_MS   100
#define BACKOFF_MAX_MS   5000
#define HANDSHAKE_MIN_MS 1000

/*
 * The data, per counter bucket (docs/quotas.md §8 has the why):
 *
 *   K     "<prefix><limit id>:<consumer|*>:<window start>": a string, the settled use plus
 *         every live reservation (what the admission rule reads, what MGET shows);
 *   K:r   a sorted set of the bucket's reservations, by token (unique per admission):
 *           "<token>:<amount>"  a live reservation; score: its lease's end (ms)
 *           "<token>"           a dead token; score: when it may be forgotten (ms)
 *
 * A reservation is settled, released or undone by its token, so each of those is
 * idempotent (the first removes the live member, a repeat finds nothing) and can be sent
 * again after a lost reply. An undo for an admission whose reply was lost leaves a dead
 * token, so that the admission, should it still run later, reserves nothing. A live
 * reservation past its lease (its owner died, or lost Redis for longer than the lease) is
 * reclaimed by the next admission on its bucket and leaves a dead token, so that a late
 * settlement still charges what was used — once.
 */

/* ADMIT — KEYS: for counter i, KEYS[4i-3] its current bucket, KEYS[4i-2] the previous one,
 * KEYS[4i-1] and KEYS[4i] their reservation sets. ARGV[1] token, ARGV[2] now (ms),
 * ARGV[3] the lease's end (ms), ARGV[4] how long a dead token is kept (ms); then for
 * counter i, ARGV[4+4i-3] limit, ARGV[4+4i-2] amount, ARGV[4+4i-1] weight of the previous
 * bucket in millionths (0: fixed window), ARGV[4+4i] TTL in ms.
 * Expired reservations are reclaimed first (at most 64 per set and call). Every counter
 * admits while its weighted use is below its limit; then, and only then, the amounts are
 * added and the token recorded (all or nothing, atomically: a script runs alone).
 * Returns {admitted, cur1, prev1, cur2, prev2, ...} as read before any change, or {-1}
 * when the token is dead (this admission was undone before it ran). */
static const char script_admit[] =
        "local token, now, tomb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])\n"
        "local function reclaim(k, z)\n"
        "  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 64)\n"
        "  for _, m in ipairs(old) do\n"
        "    redis.call('ZREM', z, m)\n"
        "    local t, a = string.match(m, '^(%x+):(%d+)$')\n"
        "    if t then\n"
        "      if redis.call('EXISTS', k) == 1 then\n"
        "        local v = redis.call('DECRBY', k, a)\n"
        "        if v < 0 then redis.call('INCRBY', k, -v) end\n"
        "      end\n"
        "      redis.call('ZADD', z, now + tomb, t)\n"
        "    end\n"
        "  end\n"
        "end\n"
        "local n = #KEYS / 4\n"
        "local out = {1}\n"
        "local ok = 1\n"
        "for i = 1, n do\n"
        "  local k, z, a = KEYS[4*i-3], KEYS[4*i-1], 4 + 4*(i-1)\n"
        "  local w = tonumber(ARGV[a+3])\n"
        "  reclaim(k, z)\n"
        "  if w > 0 then reclaim(KEYS[4*i-2], KEYS[4*i]) end\n"
        "  if redis.call('ZSCORE', z, token) then return {-1} end\n"
        "  local cur = tonumber(redis.call('GET', k) or 0)\n"
        "  local prev = 0\n"
        "  if w > 0 then prev = tonumber(redis.call('GET', KEYS[4*i-2]) or 0) end\n"
        "  out[2*i] = cur\n"
        "  out[2*i+1] = prev\n"
        "  if cur + math.floor(prev * w / 1000000) >= tonumber(ARGV[a+1]) then ok = 0 end\n"
        "end\n"
        "if ok == 1 then\n"
        "  for i = 1, n do\n"
        "    local k, z, a = KEYS[4*i-3], KEYS[4*i-1], 4 + 4*(i-1)\n"
        "    local ttl = tonumber(ARGV[a+4])\n"
        "    redis.call('INCRBY', k, ARGV[a+2])\n"
        "    redis.call('PEXPIRE', k, ttl)\n"
        "    redis.call('ZADD', z, ARGV[3], token .. ':' .. ARGV[a+2])\n"
        "    if redis.call('PTTL', z) < ttl then redis.call('PEXPIRE', z, ttl) end\n"
        "  end\n"
        "end\n"
        "out[1] = ok\n"
        "return out\n";

/* ADJUST — settle, release or undo one reservation by its token. KEYS: for counter i,
 * KEYS[2i-1] the bucket it was reserved in, KEYS[2i] its reservation set. ARGV[1] token,
 * ARGV[2] now (ms), ARGV[3] 0, or for an undo how long to keep the dead token (ms); then
 * for counter i, ARGV[3+2i-1] the amount reserved, ARGV[3+2i] the amount to charge.
 * A live reservation becomes the charge; a reclaimed one (dead token) is charged in full,
 * once; nothing is done for a token already settled. An undo that finds nothing live
 * leaves a dead token, so that its admission reserves nothing if it still runs. A bucket
 * that expired is left alone (its window is over); a counter never goes below zero (and
 * keeps its TTL). */
static const char script_adjust[] =
        "local token, now, tomb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])\n"
        "for i = 1, #KEYS / 2 do\n"
        "  local k, z = KEYS[2*i-1], KEYS[2*i]\n"
        "  local amount, charge = ARGV[2+2*i], tonumber(ARGV[3+2*i])\n"
        "  local d = 0\n"
        "  if redis.call('ZREM', z, token .. ':' .. amount) == 1 then\n"
        "    d = charge - tonumber(amount)\n"
        "  else\n"
        "    if redis.call('ZREM', z, token) == 1 then d = charge end\n"
        "    if tomb > 0 then\n"
        "      redis.call('ZADD', z, now + tomb, token)\n"
        "      if redis.call('PTTL', z) < tomb then redis.call('PEXPIRE', z, tomb) end\n"
        "    end\n"
        "  end\n"
        "  if d ~= 0 and redis.call('EXISTS', k) == 1 then\n"
        "    local v = redis.call('INCRBY', k, d)\n"
        "    if v < 0 then redis.call('INCRBY', k, -v) end\n"
        "  end\n"
        "end\n"
        "return 1\n";

static const char *const script_src[REDIS_N_SCRIPTS] = {script_admit, script_adjust};

struct redis_cmd {
	TAILQ_ENTRY(redis_cmd) link;
	struct redis_store *rs;
	struct event *timer;
	redis_done_fn done;
	void *ctx;
	bool is_eval;
	bool retried; /* NOSCRIPT: sent again with EVAL */
	enum redis_script script;
	int nkeys, argc;
	const char **argv;
	const size_t *lens;
};

TAILQ_HEAD(redis_cmd_list, redis_cmd);

struct redis_store {
	struct event_base *base;
	redisAsyncContext *ac; /* NULL while waiting to reconnect */
	struct redis_cmd_list cmds;
	size_t n_cmds;

	/* settings, owned copies */
	char *host;
	int port;
	char *password;
	int db;
	char *prefix;
	uint64_t timeout_ms;
	enum store_on_error on_error;
	bool configured;
	uint64_t epoch;

	redis_ready_fn on_ready; /* called when a handshake completes */
	void *on_ready_arg;
	bool ready;     /* handshake done */
	int hs_pending; /* handshake replies still expected */
	bool down;      /* counted in outage_workers */
	bool freeing;
	uint64_t backoff_ms;
	struct event *retry_ev; /* reconnect timer */
	struct event *kill_ev;  /* deferred teardown */
	struct event *hs_ev;    /* handshake timeout */
	char kill_why[160];
	char sha[REDIS_N_SCRIPTS][41];
};

/* Workers whose connection is down: the outage is logged on 0 → 1 and 1 → 0. */
static atomic_int outage_workers;

static void rs_connect(struct redis_store *rs);

/* ---------------------------------------------------------------- outage state */

static void mark_down(struct redis_store *rs, const char *why)
{
	if (rs->down || rs->freeing)
		return;
	rs->down = true;
	if (atomic_fetch_add(&outage_workers, 1) == 0) {
		if (rs->on_error == STORE_ON_ERROR_ALLOW)
			log_warn("redis unreachable, counting locally (%s:%d: %s)", rs->host,
			         rs->port, why ? why : "error");
		else
			log_warn("redis unreachable, answering 503 to quota-limited requests "
			         "(%s:%d: %s)",
			         rs->host, rs->port, why ? why : "error");
	} else {
		log_debug("redis %s:%d: %s", rs->host, rs->port, why ? why : "error");
	}
}

static void mark_up(struct redis_store *rs)
{
	if (!rs->down)
		return;
	rs->down = false;
	if (atomic_fetch_sub(&outage_workers, 1) == 1)
		log_info("redis reachable again, shared counting resumes (%s:%d)", rs->host,
		         rs->port);
}

void redis_store_report_failure(struct redis_store *rs, const char *why)
{
	mark_down(rs, why);
}

/* ---------------------------------------------------------------- commands */

static void finish(struct redis_cmd *cmd, redisReply *reply)
{
	struct redis_store *rs = cmd->rs;

	TAILQ_REMOVE(&rs->cmds, cmd, link);
	rs->n_cmds--;
	if (cmd->timer != NULL)
		event_free(cmd->timer);
	cmd->done(cmd->ctx, reply);
	free(cmd);
}

static void schedule_retry(struct redis_store *rs)
{
	struct timeval tv = {(time_t)(rs->backoff_ms / 1000),
	                     (suseconds_t)(rs->backoff_ms % 1000) * 1000};

	if (rs->freeing)
		return;
	evtimer_add(rs->retry_ev, &tv);
	rs->backoff_ms = rs->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : rs->backoff_ms * 2;
}

/*
 * Close the connection now. Never called from inside a hiredis callback (use kill_ev).
 * Every pending command completes with NULL; whatever their completions start finds
 * rs->ac == NULL and goes to the fallback.
 */
static void teardown(struct redis_store *rs, const char *why, bool reconnect)
{
	redisAsyncContext *ac = rs->ac;
	bool deferred = ac != NULL && (ac->c.flags & REDIS_IN_CALLBACK);

	event_del(rs->hs_ev);
	event_del(rs->kill_ev);
	if (ac != NULL) {
		rs->ac = NULL;
		rs->ready = false;
		ac->data = NULL; /* on_disconnect: ours, nothing to do */
		/* Inside one of its callbacks hiredis frees later, and completes the commands
		 * then: they must stay alive until it does. */
		redisAsyncFree(ac);
	}
	/* hiredis completed them all; this only guards against a command it did not know. */
	while (!deferred && !TAILQ_EMPTY(&rs->cmds))
		finish(TAILQ_FIRST(&rs->cmds), NULL);
	if (reconnect) {
		mark_down(rs, why);
		if (!evtimer_pending(rs->retry_ev, NULL))
			schedule_retry(rs);
	}
}

static void kill_later(struct redis_store *rs, const char *why)
{
	snprintf(rs->kill_why, sizeof(rs->kill_why), "%s", why);
	event_active(rs->kill_ev, 0, 0);
}

static void on_kill(evutil_socket_t fd, short what, void *arg)
{
	struct redis_store *rs = arg;
	teardown(rs, rs->kill_why, true);
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct redis_cmd *cmd = arg;
	struct redis_store *rs = cmd->rs;
	char why[96];

	snprintf(why, sizeof(why), "no reply within %llu ms", (unsigned long long)rs->timeout_ms);
	teardown(rs, why, true);
}

/* ---------------------------------------------------------------- reply objects */

/*
 * Replies are built by these rather than by hiredis's defaults, to bound what one reply
 * may make us allocate: hiredis 0.14 allocates an array's element vector from the count
 * the server announces, so "*2147483647\r\n" — 13 bytes — would ask for 16 GiB. No reply
 * Sluice expects has more than REDIS_MAX_REPLY_ELEMENTS elements (an admission of 16
 * counters has 33); a larger array is refused as out of memory, which fails the connection
 * like any protocol error. The objects are hiredis's redisReply, freed by freeReplyObject.
 */
#define REDIS_MAX_REPLY_ELEMENTS 4096

/* Hang r in its parent array (hiredis builds the parent first, with every slot). */
static bool reply_link(const redisReadTask *task, redisReply *r)
{
	redisReply *parent;

	if (task->parent == NULL)
		return true;
	parent = task->parent->obj;
	if (parent == NULL || parent->type != REDIS_REPLY_ARRAY || task->idx < 0 ||
	    (size_t)task->idx >= parent->elements)
		return false;
	parent->element[task->idx] = r;
	return true;
}

static void *reply_string(const redisReadTask *task, char *str, size_t len)
{
	redisReply *r;
	char *copy;

	if (len >= SIZE_MAX / 2 || (copy = malloc(len + 1)) == NULL)
		return NULL;
	if ((r = calloc(1, sizeof(*r))) == NULL) {
		free(copy);
		return NULL;
	}
	memcpy(copy, str, len);
	copy[len] = '\0'; /* for hiredis's own users; ours go by len */
	r->type = task->type;
	r->str = copy;
	r->len = len;
	if (!reply_link(task, r)) {
		freeReplyObject(r);
		return NULL;
	}
	return r;
}

static void *reply_array(const redisReadTask *task, int elements)
{
	redisReply *r;

	if (elements < 0 || elements > REDIS_MAX_REPLY_ELEMENTS)
		return NULL;
	if ((r = calloc(1, sizeof(*r))) == NULL)
		return NULL;
	r->type = REDIS_REPLY_ARRAY;
	if (elements > 0 && (r->element = calloc((size_t)elements, sizeof(*r->element))) == NULL) {
		free(r);
		return NULL;
	}
	r->elements = (size_t)elements;
	if (!reply_link(task, r)) {
		freeReplyObject(r);
		return NULL;
	}
	return r;
}

static void *reply_scalar(const redisReadTask *task, int type, long long v)
{
	redisReply *r = calloc(1, sizeof(*r));

	if (r == NULL)
		return NULL;
	r->type = type;
	r->integer = v;
	if (!reply_link(task, r)) {
		free(r);
		return NULL;
	}
	return r;
}

static void *reply_integer(const redisReadTask *task, long long v)
{
	return reply_scalar(task, REDIS_REPLY_INTEGER, v);
}

static void *reply_nil(const redisReadTask *task)
{
	return reply_scalar(task, REDIS_REPLY_NIL, 0);
}

/* Not const: hiredis's reader holds a plain pointer to its table. */
static redisReplyObjectFunctions reply_functions = {
        .createString = reply_string,
        .createArray = reply_array,
        .createInteger = reply_integer,
        .createNil = reply_nil,
        .freeObject = freeReplyObject,
};

struct redisReader *redis_reply_reader_new(void)
{
	return redisReaderCreateWithFunctions(&reply_functions);
}

/* ---------------------------------------------------------------- replies */

/*
 * Replies are bytes from outside: whatever their type, size or nesting, these read them
 * by type and length (never as C strings), and refuse what does not have the expected
 * shape. tests/fuzz/fuzz_redis_reply.c runs them over arbitrary replies.
 */

bool redis_reply_is_error(const struct redisReply *r)
{
	return r == NULL || r->type == REDIS_REPLY_ERROR;
}

bool redis_reply_is_noscript(const struct redisReply *r)
{
	static const char prefix[] = "NOSCRIPT";

	return r != NULL && r->type == REDIS_REPLY_ERROR && r->str != NULL &&
	       r->len >= sizeof(prefix) - 1 && memcmp(r->str, prefix, sizeof(prefix) - 1) == 0;
}

size_t redis_reply_describe(const struct redisReply *r, char *buf, size_t cap)
{
	const char *what;
	size_t n = 0;

	if (cap == 0)
		return 0;
	if (r == NULL)
		what = "no reply";
	else if ((r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STATUS ||
	          r->type == REDIS_REPLY_STRING) &&
	         r->str != NULL) {
		/* Printable ASCII only: the text goes into log lines. */
		for (size_t i = 0; i < r->len && n + 1 < cap; i++) {
			unsigned char ch = (unsigned char)r->str[i];
			buf[n++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
		}
		buf[n] = '\0';
		return n;
	} else {
		what = r->type == REDIS_REPLY_ARRAY ? "an array" : "a reply of another type";
	}
	snprintf(buf, cap, "%s", what);
	return strlen(buf);
}

bool redis_reply_u64(const struct redisReply *r, uint64_t *out)
{
	uint64_t v = 0;

	if (r == NULL)
		return false;
	if (r->type == REDIS_REPLY_NIL) {
		*out = 0;
		return true;
	}
	if (r->type == REDIS_REPLY_INTEGER) {
		*out = r->integer > 0 ? (uint64_t)r->integer : 0;
		return true;
	}
	if (r->type != REDIS_REPLY_STRING || r->str == NULL || r->len == 0 || r->len > 20)
		return false;
	for (size_t i = 0; i < r->len; i++) {
		unsigned d = (unsigned char)r->str[i] - '0';
		if (d > 9 || v > (UINT64_MAX - d) / 10)
			return false;
		v = v * 10 + d;
	}
	*out = v;
	return true;
}

enum redis_verdict redis_reply_admit(const struct redisReply *r, size_t n, uint64_t *cur,
                                     uint64_t *prev)
{
	if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->element == NULL ||
	    n > (SIZE_MAX - 1) / 2 || r->elements != 1 + 2 * n)
		return REDIS_VERDICT_BAD;
	for (size_t i = 0; i < r->elements; i++)
		if (r->element[i] == NULL || r->element[i]->type != REDIS_REPLY_INTEGER)
			return REDIS_VERDICT_BAD;
	if (r->element[0]->integer != 0 && r->element[0]->integer != 1)
		return REDIS_VERDICT_BAD;
	for (size_t i = 0; i < n; i++) {
		long long c = r->element[1 + 2 * i]->integer, p = r->element[2 + 2 * i]->integer;
		cur[i] = c > 0 ? (uint64_t)c : 0;
		prev[i] = p > 0 ? (uint64_t)p : 0;
	}
	return r->element[0]->integer == 1 ? REDIS_VERDICT_ADMITTED : REDIS_VERDICT_REFUSED;
}

bool redis_reply_values(const struct redisReply *r, size_t n, uint64_t *out)
{
	if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != n ||
	    (n > 0 && r->element == NULL))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!redis_reply_u64(r->element[i], &out[i]))
			return false;
	return true;
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata);

static bool send_cmd(struct redis_cmd *cmd, bool whole_script)
{
	struct redis_store *rs = cmd->rs;
	int extra = cmd->is_eval ? 3 : 0;
	int argc = cmd->argc + extra, rc;
	const char **argv = malloc(sizeof(*argv) * (size_t)argc);
	size_t *lens = malloc(sizeof(*lens) * (size_t)argc);
	char nkeys[16];

	if (rs->ac == NULL || argv == NULL || lens == NULL) {
		free(argv);
		free(lens);
		return false;
	}
	if (cmd->is_eval) {
		snprintf(nkeys, sizeof(nkeys), "%d", cmd->nkeys);
		argv[0] = whole_script ? "EVAL" : "EVALSHA";
		argv[1] = whole_script ? script_src[cmd->script] : rs->sha[cmd->script];
		argv[2] = nkeys;
		for (int i = 0; i < 3; i++)
			lens[i] = strlen(argv[i]);
	}
	for (int i = 0; i < cmd->argc; i++) {
		argv[extra + i] = cmd->argv[i];
		lens[extra + i] = cmd->lens != NULL ? cmd->lens[i] : strlen(cmd->argv[i]);
	}
	/* hiredis copies the formatted command: argv may go right after. */
	rc = redisAsyncCommandArgv(rs->ac, on_reply, cmd, argc, argv, lens);
	free(argv);
	free(lens);
	return rc == REDIS_OK;
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
	struct redis_cmd *cmd = privdata;
	struct redis_store *rs = cmd->rs;
	redisReply *reply = r;

	/* The script cache was flushed (SCRIPT FLUSH, a restarted or failed-over server that
	 * kept the connection's address): send it whole once; EVAL caches it again. */
	if (cmd->is_eval && !cmd->retried && redis_reply_is_noscript(reply)) {
		cmd->retried = true;
		if (send_cmd(cmd, true))
			return;
		reply = NULL;
	}
	if (reply != NULL && reply->type != REDIS_REPLY_ERROR)
		mark_up(rs);
	finish(cmd, reply);
}

static bool submit(struct redis_store *rs, struct redis_cmd *cmd)
{
	cmd->rs = rs;
	if (rs->ac == NULL)
		return false;
	if (rs->timeout_ms > 0) {
		struct timeval tv = {(time_t)(rs->timeout_ms / 1000),
		                     (suseconds_t)(rs->timeout_ms % 1000) * 1000};
		cmd->timer = evtimer_new(rs->base, on_timeout, cmd);
		if (cmd->timer == NULL)
			return false;
		evtimer_add(cmd->timer, &tv);
	}
	if (!send_cmd(cmd, false)) {
		if (cmd->timer != NULL)
			event_free(cmd->timer);
		return false;
	}
	TAILQ_INSERT_TAIL(&rs->cmds, cmd, link);
	rs->n_cmds++;
	return true;
}

/* Queue a copy of tmpl: the one place a command is allocated. */
static bool submit_copy(struct redis_store *rs, const struct redis_cmd *tmpl)
{
	struct redis_cmd *cmd = malloc(sizeof(*cmd));

	if (cmd == NULL)
		return false;
	*cmd = *tmpl;
	if (!submit(rs, cmd)) {
		free(cmd);
		return false;
	}
	return true;
}

bool redis_store_eval(struct redis_store *rs, enum redis_script script, int nkeys, int argc,
                      const char **argv, const size_t *lens, redis_done_fn done, void *ctx)
{
	const struct redis_cmd tmpl = {.done = done, .ctx = ctx, .is_eval = true, .script = script,
	                               .nkeys = nkeys, .argc = argc, .argv = argv, .lens = lens};
	return submit_copy(rs, &tmpl);
}

bool redis_store_command(struct redis_store *rs, int argc, const char **argv, const size_t *lens,
                         redis_done_fn done, void *ctx)
{
	const struct redis_cmd tmpl = {.done = done, .ctx = ctx, .argc = argc, .argv = argv,
	                               .lens = lens};
	return submit_copy(rs, &tmpl);
}

/* ---------------------------------------------------------------- connection */

static void on_connect(const redisAsyncContext *ac, int status)
{
	struct redis_store *rs = ac->data;

	if (status == REDIS_OK || rs == NULL || rs->ac != ac)
		return;
	/* hiredis frees the context when this returns, then completes its commands. */
	rs->ac = NULL;
	rs->ready = false;
	event_del(rs->hs_ev);
	mark_down(rs, ac->c.errstr[0] ? ac->c.errstr : "connect failed");
	if (!evtimer_pending(rs->retry_ev, NULL))
		schedule_retry(rs);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
	struct redis_store *rs = ac->data;

	if (rs == NULL || rs->ac != ac)
		return;
	rs->ac = NULL;
	rs->ready = false;
	event_del(rs->hs_ev);
	mark_down(rs, ac->c.errstr[0] ? ac->c.errstr : "connection closed");
	if (!evtimer_pending(rs->retry_ev, NULL))
		schedule_retry(rs);
}

static void on_handshake(redisAsyncContext *ac, void *r, void *privdata)
{
	struct redis_store *rs = privdata;
	redisReply *reply = r;

	if (reply == NULL || rs->ac != ac)
		return; /* the teardown in progress says why */
	if (reply->type == REDIS_REPLY_ERROR) {
		char why[160], text[128];
		redis_reply_describe(reply, text, sizeof(text));
		snprintf(why, sizeof(why), "handshake: %s", text);
		log_debug("redis %s:%d %s", rs->host, rs->port, why);
		kill_later(rs, why);
		return;
	}
	if (--rs->hs_pending == 0) {
		rs->ready = true;
		rs->backoff_ms = BACKOFF_MIN_MS;
		event_del(rs->hs_ev);
		log_debug("redis %s:%d connected", rs->host, rs->port);
		mark_up(rs);
		/* Settlements that waited for the connection go now, behind nothing. */
		if (rs->on_ready != NULL)
			rs->on_ready(rs->on_ready_arg);
	}
}

static void on_handshake_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct redis_store *rs = arg;
	teardown(rs, "handshake timed out", true);
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
	rs_connect(arg);
}

static void rs_connect(struct redis_store *rs)
{
	redisAsyncContext *ac;
	uint64_t hs_ms = rs->timeout_ms > HANDSHAKE_MIN_MS ? rs->timeout_ms : HANDSHAKE_MIN_MS;
	struct timeval tv = {(time_t)(hs_ms / 1000), (suseconds_t)(hs_ms % 1000) * 1000};
	char db[16];

	if (rs->ac != NULL || rs->freeing || rs->host == NULL)
		return;
	log_debug("redis %s:%d: connecting", rs->host, rs->port);
	ac = redisAsyncConnect(rs->host, rs->port);
	if (ac == NULL) {
		mark_down(rs, "out of memory");
		schedule_retry(rs);
		return;
	}
	if (ac->err) {
		char why[160];
		snprintf(why, sizeof(why), "%s", ac->errstr ? ac->errstr : "connect failed");
		redisAsyncFree(ac);
		mark_down(rs, why);
		schedule_retry(rs);
		return;
	}
	ac->data = rs;
	ac->c.reader->fn = &reply_functions; /* nothing was read yet */
	if (redisLibeventAttach(ac, rs->base) != REDIS_OK) {
		redisAsyncFree(ac);
		mark_down(rs, "cannot attach to the event loop");
		schedule_retry(rs);
		return;
	}
	redisAsyncSetConnectCallback(ac, on_connect);
	redisAsyncSetDisconnectCallback(ac, on_disconnect);
	rs->ac = ac;
	rs->ready = false;
	rs->hs_pending = 0;

	if (rs->password != NULL) {
		redisAsyncCommand(ac, on_handshake, rs, "AUTH %s", rs->password);
		rs->hs_pending++;
	}
	if (rs->db != 0) {
		snprintf(db, sizeof(db), "%d", rs->db);
		redisAsyncCommand(ac, on_handshake, rs, "SELECT %s", db);
		rs->hs_pending++;
	}
	for (int i = 0; i < REDIS_N_SCRIPTS; i++) {
		redisAsyncCommand(ac, on_handshake, rs, "SCRIPT LOAD %s", script_src[i]);
		rs->hs_pending++;
	}
	evtimer_add(rs->hs_ev, &tv);
}

/* ---------------------------------------------------------------- lifecycle */

struct redis_store *redis_store_new(struct event_base *base)
{
	struct redis_store *rs = calloc(1, sizeof(*rs));

	if (rs == NULL)
		return NULL;
	rs->base = base;
	TAILQ_INIT(&rs->cmds);
	rs->backoff_ms = BACKOFF_MIN_MS;
	rs->retry_ev = evtimer_new(base, on_retry, rs);
	rs->kill_ev = event_new(base, -1, 0, on_kill, rs);
	rs->hs_ev = evtimer_new(base, on_handshake_timeout, rs);
	if (rs->retry_ev == NULL || rs->kill_ev == NULL || rs->hs_ev == NULL) {
		redis_store_free(rs);
		return NULL;
	}
	for (int i = 0; i < REDIS_N_SCRIPTS; i++) {
		unsigned char md[SHA_DIGEST_LENGTH];
		SHA1((const unsigned char *)script_src[i], strlen(script_src[i]), md);
		for (int k = 0; k < SHA_DIGEST_LENGTH; k++)
			snprintf(&rs->sha[i][2 * k], 3, "%02x", md[k]);
	}
	return rs;
}

static bool str_differs(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a != b;
	return strcmp(a, b) != 0;
}

static char *dup_or_null(const char *s)
{
	return s != NULL ? strdup(s) : NULL;
}

void redis_store_configure(struct redis_store *rs, const struct config_store *cfg)
{
	const char *host = cfg->redis.host ? cfg->redis.host : "127.0.0.1";
	const char *prefix = cfg->redis.prefix ? cfg->redis.prefix : "";
	int port = cfg->redis.port ? cfg->redis.port : 6379;
	bool changed = !rs->configured || str_differs(rs->host, host) || rs->port != port ||
	               str_differs(rs->password, cfg->redis.password) || rs->db != cfg->redis.db ||
	               str_differs(rs->prefix, prefix);

	rs->timeout_ms = cfg->redis.timeout;
	rs->on_error = cfg->on_error;
	if (!changed)
		return;
	free(rs->host);
	free(rs->password);
	free(rs->prefix);
	rs->host = strdup(host);
	rs->port = port;
	rs->password = dup_or_null(cfg->redis.password);
	rs->db = cfg->redis.db;
	rs->prefix = strdup(prefix);
	rs->configured = true;
	rs->epoch++;
	/* A new server or namespace: start over at once. */
	teardown(rs, NULL, false);
	event_del(rs->retry_ev);
	rs->backoff_ms = BACKOFF_MIN_MS;
	rs_connect(rs);
}

void redis_store_free(struct redis_store *rs)
{
	if (rs == NULL)
		return;
	rs->freeing = true;
	teardown(rs, NULL, false);
	if (rs->down) {
		rs->down = false;
		atomic_fetch_sub(&outage_workers, 1);
	}
	if (rs->retry_ev)
		event_free(rs->retry_ev);
	if (rs->kill_ev)
		event_free(rs->kill_ev);
	if (rs->hs_ev)
		event_free(rs->hs_ev);
	free(rs->host);
	free(rs->password);
	free(rs->prefix);
	free(rs);
}

uint64_t redis_store_epoch(const struct redis_store *rs)
{
	return rs->epoch;
}

const char *redis_store_prefix(const struct redis_store *rs)
{
	return rs->prefix ? rs->prefix : "";
}

enum store_on_error redis_store_on_error(const struct redis_store *rs)
{
	return rs->on_error;
}

void redis_store_on_ready(struct redis_store *rs, redis_ready_fn fn, void *arg)
{
	rs->on_ready = fn;
	rs->on_ready_arg = arg;
}

bool redis_store_ready(const struct redis_store *rs)
{
	return rs->ac != NULL && rs->ready;
}

size_t redis_store_inflight(const struct redis_store *rs)
{
	return rs->n_cmds;
}

bool redis_store_usable(const struct redis_store *rs)
{
	return rs->ac != NULL;
}
