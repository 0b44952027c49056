/* accesslog.c — the JSON access log: one line per request, built by hand, one write(2) each.
 *
 * Why not jansson here: it would build a tree of a few dozen nodes per request
 * only to serialise it again; the line has a fixed shape, so it is printed
 * directly. Strings are escaped for JSON, and bytes that are not valid UTF-8
 * (a client may send any bytes in a path) become U+FFFD, so every line parses.
 *
 * Descriptor handling: workers write to one descriptor number that never
 * changes while the log is on. Reopening (SIGUSR1) and switching targets on
 * reload open the new file and dup3() it over that number, which is atomic: a
 * worker writing at that moment lands whole in the old file or the new one,
 * and never in a descriptor that was closed and reused for something else.
 */
#include "sluice/accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "sluice/log.h"
#include "sluice/record.h"

#define LINE_STACK 8192 /* most lines fit; longer ones (payloads) are built on the heap */

static _Atomic int al_fd = -1; /* what workers write to; -1 while off */
static int al_stable = -1;     /* the descriptor number kept across reopens (main thread) */
static char al_target[4096];   /* "stdout", a path, or "" when off (main thread) */
static _Atomic uint64_t al_last_warn_us;

/*
 * A line cut short by a failed write — a full disk: the kernel writes what fits, then refuses
 * the rest — would have the next line appended to its fragment: two records on one line that
 * is not JSON. The unwritten rest of such a line is kept and written before any other line, so
 * that the line ends whole once there is room again. al_torn is read by every write without
 * the lock (the fast path stays lock-free); the rest is under al_torn_lock. A rest longer than
 * the buffer (a line with payloads) is replaced by "\n": its fragment then stays a line of its
 * own, never glued to the next one. A reopen forgets the rest (it belongs to the old file).
 */
#define TORN_REST_MAX 65536
static pthread_mutex_t al_torn_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool al_torn;
static char al_rest[TORN_REST_MAX]; /* under al_torn_lock */
static size_t al_rest_len;

/* ---------------------------------------------------------------- line builder */

/* snprintf-like: writes what fits in buf[0, cap), counts everything. */
struct line {
	char *buf;
	size_t cap;
	size_t len;
};

static void put(struct line *l, const char *s, size_t n)
{
	if (l->len < l->cap) {
		size_t room = l->cap - l->len;
		memcpy(l->buf + l->len, s, n < room ? n : room);
	}
	l->len += n;
}

static void put_str(struct line *l, const char *s)
{
	put(l, s, strlen(s));
}

static void putf(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct line *l, const char *fmt, ...)
{
	char tmp[64];
	va_list ap;
	va_start(ap, fmt);
	/* NOLINTNEXTLINE(clang-analyzer-valist.Uninitialized): va_start is right above */
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n > 0)
		put(l, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *p)
{
	unsigned char c = p[0];
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		return (p[1] & 0xc0) == 0x80 ? 2 : 0;
	if (c >= 0xe0 && c <= 0xef) {
		unsigned char lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
		return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 ? 3 : 0;
	}
	if (c >= 0xf0 && c <= 0xf4) {
		unsigned char lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
		return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 && (p[3] & 0xc0) == 0x80
		               ? 4
		               : 0;
	}
	return 0;
}

/* A JSON string, or null for NULL. */
static void put_json_string(struct line *l, const char *s)
{
	static const char hex[] = "0123456789abcdef";

	if (s == NULL) {
		put(l, "null", 4);
		return;
	}
	put(l, "\"", 1);
	const unsigned char *p = (const unsigned char *)s, *run = p;
	while (*p) {
		unsigned char c = *p;
		if (c >= 0x20 && c != '"' && c != '\\' && c < 0x7f) {
			p++;
			continue;
		}
		size_t n = c >= 0x80 ? utf8_len(p) : 1;
		if (n > 1) {
			p += n;
			continue;
		}
		put(l, (const char *)run, (size_t)(p - run));
		switch (c) {
		case '"':
			put(l, "\\\"", 2);
			break;
		case '\\':
			put(l, "\\\\", 2);
			break;
		case '\n':
			put(l, "\\n", 2);
			break;
		case '\r':
			put(l, "\\r", 2);
			break;
		case '\t':
			put(l, "\\t", 2);
			break;
		default:
			if (n == 0) { /* not UTF-8: the replacement character */
				put(l, "\\ufffd", 6);
			} else {
				char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
				put(l, u, 6);
			}
		}
		p++;
		run = p;
	}
	put(l, (const char *)run, (size_t)(p - run));
	put(l, "\"", 1);
}

static void put_key(struct line *l, const char *key)
{
	/* Keys are fixed ASCII names: no escaping. The first key has no comma. */
	if (l->len > 1)
		put(l, ",", 1);
	put(l, "\"", 1);
	put_str(l, key);
	put(l, "\":", 2);
}

static void field_str(struct line *l, const char *key, const char *v)
{
	put_key(l, key);
	put_json_string(l, v);
}

static void field_u64(struct line *l, const char *key, uint64_t v)
{
	put_key(l, key);
	putf(l, "%" PRIu64, v);
}

/* Microseconds as milliseconds with three decimals; null when absent. */
static void field_ms(struct line *l, const char *key, uint64_t us, bool present)
{
	put_key(l, key);
	if (present)
		putf(l, "%" PRIu64 ".%03u", us / 1000, (unsigned)(us % 1000));
	else
		put(l, "null", 4);
}

static void field_status(struct line *l, const char *key, int status)
{
	put_key(l, key);
	if (status > 0)
		putf(l, "%d", status);
	else
		put(l, "null", 4);
}

static void put_time(struct line *l, uint64_t unix_us)
{
	if (unix_us == 0) {
		struct timeval tv;
		gettimeofday(&tv, NULL);
		unix_us = (uint64_t)tv.tv_sec * 1000000u + (uint64_t)tv.tv_usec;
	}
	time_t sec = (time_t)(unix_us / 1000000u);
	struct tm tm;
	char buf[40];
	gmtime_r(&sec, &tm);
	size_t n = strftime(buf, sizeof(buf), "\"%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf + n, sizeof(buf) - n, ".%03uZ\"", (unsigned)(unix_us / 1000u % 1000u));
	put_str(l, buf);
}

size_t accesslog_format(const struct request_record *r, char *buf, size_t len)
{
	struct line l = {.buf = buf, .cap = len ? len - 1 : 0, .len = 0};
	int n = r->n_attempts < 0 ? 0 : r->n_attempts;
	if (n > RECORD_MAX_ATTEMPTS)
		n = RECORD_MAX_ATTEMPTS;

	put(&l, "{", 1);
	put_key(&l, "time");
	put_time(&l, r->start_unix_us);
	field_str(&l, "request_id", r->request_id);
	field_str(&l, "method", r->method);
	field_str(&l, "path", r->path);
	field_str(&l, "client_ip", r->client_ip);
	field_str(&l, "route", r->route);
	field_str(&l, "consumer", r->consumer);
	field_str(&l, "key_fingerprint", r->key_fingerprint);
	field_str(&l, "model", r->model_requested);
	field_str(&l, "upstream_model", r->model_upstream);
	field_str(&l, "instance", r->instance);
	put_key(&l, "stream");
	put_str(&l, r->stream ? "true" : "false");
	field_status(&l, "status", r->status);
	field_status(&l, "upstream_status", r->upstream_status);
	field_str(&l, "error_code", r->error_code);
	field_str(&l, "limit_id", r->limit_id);

	put_key(&l, "attempts");
	put(&l, "[", 1);
	for (int i = 0; i < n; i++) {
		const struct record_attempt *a = &r->attempts[i];
		put_str(&l, i ? ",{\"instance\":" : "{\"instance\":");
		put_json_string(&l, a->instance);
		put_str(&l, ",\"outcome\":");
		put_json_string(&l, a->outcome);
		put_str(&l, ",\"status\":");
		if (a->status > 0)
			putf(&l, "%d", a->status);
		else
			put(&l, "null", 4);
		putf(&l, ",\"latency_ms\":%" PRIu64 ".%03u}", a->latency_us / 1000,
		     (unsigned)(a->latency_us % 1000));
	}
	put(&l, "]", 1);

	field_u64(&l, "bytes_in", r->bytes_in);
	field_u64(&l, "bytes_out", r->bytes_out);
	field_ms(&l, "ttft_ms", r->ttft_us, r->ttft_us > 0);
	field_ms(&l, "total_ms", r->total_us, true);
	field_ms(&l, "upstream_ms", r->upstream_us, true);
	field_ms(&l, "overhead_ms", r->overhead_us, true);

	put_key(&l, "usage");
	if (r->usage.present) {
		putf(&l, "{\"prompt\":%" PRIu64 ",\"completion\":%" PRIu64, r->usage.prompt,
		     r->usage.completion);
		putf(&l, ",\"total\":%" PRIu64 ",\"cached\":%" PRIu64, r->usage.total,
		     r->usage.cached);
		putf(&l, ",\"reasoning\":%" PRIu64 ",\"estimated\":%s}", r->usage.reasoning,
		     r->usage.estimated ? "true" : "false");
	} else {
		put(&l, "null", 4);
	}
	/* In price units, exact to the micro-unit it is counted in; only where a price applies. */
	if (r->priced) {
		put_key(&l, "cost");
		putf(&l, "%" PRIu64 ".%06u", r->cost_micros / RECORD_COST_UNIT,
		     (unsigned)(r->cost_micros % RECORD_COST_UNIT));
	}

	/* What the route's policies did: which policy, which action, how often (never the
	 * content they acted on). */
	put_key(&l, "policy");
	if (r->n_policies > 0) {
		int np = r->n_policies < RECORD_MAX_POLICY_ACTIONS ? r->n_policies
		                                                   : RECORD_MAX_POLICY_ACTIONS;
		put(&l, "[", 1);
		for (int i = 0; i < np; i++) {
			put_str(&l, i ? ",{\"policy\":" : "{\"policy\":");
			put_json_string(&l, r->policies[i].policy);
			put_str(&l, ",\"action\":");
			put_json_string(&l, r->policies[i].action);
			putf(&l, ",\"count\":%u}", r->policies[i].count);
		}
		put(&l, "]", 1);
	} else {
		put(&l, "null", 4);
	}

	/* Payloads only when request.c put them in the record (log.payloads). */
	if (r->prompt_payload)
		field_str(&l, "prompt", r->prompt_payload);
	if (r->output_payload)
		field_str(&l, "output", r->output_payload);
	put(&l, "}", 1);

	if (len)
		buf[l.len < l.cap ? l.len : l.cap] = '\0';
	return l.len;
}

/* ---------------------------------------------------------------- writing */

static void warn_write_failed(int err)
{
	/* At most one complaint a minute: a full disk must not flood the error log. */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	uint64_t now = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
	uint64_t last = atomic_load_explicit(&al_last_warn_us, memory_order_relaxed);
	if (last != 0 && now - last < 60000000u)
		return;
	if (atomic_compare_exchange_strong(&al_last_warn_us, &last, now))
		log_error("access log write failed: %s", strerror(err));
}

static void write_all(int fd, const char *line, size_t n);

void accesslog_write(const struct request_record *r)
{
	int fd = atomic_load_explicit(&al_fd, memory_order_acquire);
	if (fd < 0 || r == NULL)
		return;

	char stack[LINE_STACK];
	char *line = stack;
	size_t n = accesslog_format(r, stack, sizeof(stack) - 1);
	if (n >= sizeof(stack) - 1) {
		line = malloc(n + 2);
		if (line == NULL)
			return;
		accesslog_format(r, line, n + 1);
	}
	line[n++] = '\n';
	write_all(fd, line, n);
	if (line != stack)
		free(line);
}

void accesslog_write_line(const char *text, size_t len)
{
	int fd = atomic_load_explicit(&al_fd, memory_order_acquire);
	char stack[LINE_STACK];
	if (fd < 0)
		return;
	char *line = len < sizeof(stack) ? stack : malloc(len + 1);
	if (line == NULL)
		return;
	memcpy(line, text, len);
	line[len] = '\n';
	write_all(fd, line, len + 1);
	if (line != stack)
		free(line);
}

/* Returns how much of line was written: less than n only after a failed write (logged). */
static size_t write_some(int fd, const char *line, size_t n)
{
	/* One write(2): with O_APPEND on a file the kernel writes the whole line
	 * at the end, so lines of concurrent workers never interleave. A short
	 * write happens on a pipe or socket that is full (finish the line), or on a
	 * full disk (then the next write fails). */
	size_t off = 0;
	while (off < n) {
		ssize_t w = write(fd, line + off, n - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			warn_write_failed(errno);
			break;
		}
		off += (size_t)w;
	}
	return off;
}

/* Under al_torn_lock: line was cut after its first off bytes. */
static void keep_rest(const char *line, size_t n, size_t off)
{
	if (off == 0 || off >= n)
		return; /* nothing written, or everything: no fragment */
	if (n - off <= sizeof(al_rest)) {
		memcpy(al_rest, line + off, n - off);
		al_rest_len = n - off;
	} else {
		al_rest[0] = '\n';
		al_rest_len = 1;
	}
	atomic_store_explicit(&al_torn, true, memory_order_release);
}

static void forget_rest(void)
{
	pthread_mutex_lock(&al_torn_lock);
	al_rest_len = 0;
	atomic_store_explicit(&al_torn, false, memory_order_release);
	pthread_mutex_unlock(&al_torn_lock);
}

static void write_all(int fd, const char *line, size_t n)
{
	size_t off;

	if (!atomic_load_explicit(&al_torn, memory_order_acquire)) {
		off = write_some(fd, line, n);
		if (off > 0 && off < n) {
			/* A line another worker appends in the instant before the rest is kept
			 * would still be glued to the fragment: only when the disk frees up in that
			 * instant. */
			pthread_mutex_lock(&al_torn_lock);
			keep_rest(line, n, off);
			pthread_mutex_unlock(&al_torn_lock);
		}
		return;
	}
	pthread_mutex_lock(&al_torn_lock);
	if (al_rest_len > 0) {
		off = write_some(fd, al_rest, al_rest_len);
		if (off < al_rest_len) {
			/* Still no room: this line is lost, as every line is while the disk is
			 * full. */
			memmove(al_rest, al_rest + off, al_rest_len - off);
			al_rest_len -= off;
			pthread_mutex_unlock(&al_torn_lock);
			return;
		}
		al_rest_len = 0;
		atomic_store_explicit(&al_torn, false, memory_order_release);
	}
	keep_rest(line, n, write_some(fd, line, n));
	pthread_mutex_unlock(&al_torn_lock);
}

/* A new descriptor for target, or -1 (logged). */
static int open_target(const char *target)
{
	int fd;
	if (strcmp(target, "stdout") == 0)
		fd = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
	else
		fd = open(target, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0)
		log_error("cannot open access log %s: %s", target, strerror(errno));
	return fd;
}

/* Make al_stable refer to what fd refers to; fd is consumed. */
static bool install(int fd)
{
	if (al_stable < 0) {
		al_stable = fd;
		return true;
	}
	if (dup3(fd, al_stable, O_CLOEXEC) < 0) {
		log_error("access log: dup3: %s", strerror(errno));
		close(fd);
		return false;
	}
	close(fd);
	forget_rest(); /* a torn line's rest belongs to the file it was cut in */
	return true;
}

bool accesslog_open(const char *target)
{
	if (target == NULL || strcmp(target, "off") == 0 || target[0] == '\0') {
		if (atomic_load(&al_fd) >= 0) {
			atomic_store(&al_fd, -1);
			/* A worker may still be writing through al_stable: point it at
			 * /dev/null rather than closing it, so the old file is released
			 * and the number is not reused under that worker. */
			int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
			if (null >= 0)
				install(null);
		}
		al_target[0] = '\0';
		return true;
	}
	if (strlen(target) >= sizeof(al_target)) {
		log_error("access log path too long: %s", target);
		return false;
	}
	if (atomic_load(&al_fd) >= 0 && strcmp(target, al_target) == 0)
		return true;
	int fd = open_target(target);
	if (fd < 0 || !install(fd))
		return false;
	snprintf(al_target, sizeof(al_target), "%s", target);
	atomic_store_explicit(&al_fd, al_stable, memory_order_release);
	return true;
}

void accesslog_reopen(void)
{
	if (atomic_load(&al_fd) < 0 || strcmp(al_target, "stdout") == 0)
		return;
	int fd = open_target(al_target);
	if (fd >= 0)
		install(fd);
}

void accesslog_close(void)
{
	atomic_store(&al_fd, -1);
	forget_rest();
	if (al_stable >= 0)
		close(al_stable);
	al_stable = -1;
	al_target[0] = '\0';
}
