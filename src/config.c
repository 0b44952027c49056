/* config.c — loads sluice.yaml into an immutable, typed snapshot, collecting every error with
 * its file:line:column and key path. */
#include "sluice/config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <pthread.h>

#include <openssl/evp.h>

#include "sluice/config_section.h"
#include "sluice/config_tree.h"
#include "sluice/mcp.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"
#include "sluice/provider.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#define MS(n)      ((uint64_t)(n))
#define SEC(n)     ((uint64_t)(n)*1000)
#define MINUTES(n) (SEC(n) * 60)
#define KIB(n)     ((uint64_t)(n) << 10)
#define MIB(n)     ((uint64_t)(n) << 20)

/* Token and request limits are counted in Redis' Lua (doubles): keep them exact there. */
#define LIMIT_MAX 9007199254740991ull
/* Prices and cost limits are decimal numbers of at most this many decimals, kept as integer
 * micro-units (docs/quotas.md §4): what the counters hold is exact, also in Lua. */
#define COST_DECIMALS 6
#define COST_UNIT     1000000ull /* micro-units per unit: 10^COST_DECIMALS */
/* The largest price per million tokens: one unit per token. Far above any real price, and it
 * keeps tokens x price (at most 2^53 x 10^12) inside the quota module's 128-bit arithmetic. */
#define PRICE_MAX_MICROS (1000000ull * COST_UNIT)
/* A config file larger than this is a mistake, not a configuration. */
#define CONFIG_MAX_FILE_SIZE MIB(64)
#define PATH_LEN             384

/* ============================================================================================
 * Defaults: every default value of the configuration is in this section, and nowhere else.
 * docs/configuration.md documents the same values; keep the two together.
 * ========================================================================================== */

#define DEFAULT_LISTEN      "0.0.0.0:8080"
#define DEFAULT_WORKERS_MAX 256 /* "auto" resolves to the CPU count, capped here */

static const char *const default_key_headers[] = {"authorization", "apikey", "x-api-key", NULL};
static const int default_active_healthy_statuses[] = {200, 302, 0};
static const int default_active_unhealthy_statuses[] = {429, 404, 500, 501, 502, 503, 504, 505, 0};
static const int default_passive_statuses[] = {500, 502, 503, 504, 0};
/* fallback.on: FALLBACK_ALL; route auth: key-auth when any consumer is declared, else none;
 * active check type: the endpoint's scheme; active check host: the endpoint's host:port. */

/* Provider names and default endpoints come from the provider table (src/provider/provider.c,
 * provider_ops()): adding a provider there is the only change the loader needs. */
#define MAX_PROVIDERS 32
static const char *provider_names[MAX_PROVIDERS + 1]; /* filled once from the table */
static pthread_once_t provider_names_once = PTHREAD_ONCE_INIT;

static void provider_names_fill(void)
{
	for (size_t i = 0; i < MAX_PROVIDERS && provider_ops((enum provider)i) != NULL; i++)
		provider_names[i] = provider_ops((enum provider)i)->name;
}

/* Names of enum values, indexed by value, NULL-terminated. */
static const char *const strategy_names[] = {"total_tokens", "prompt_tokens", "completion_tokens",
                                             "cost", NULL};
static const char *const limit_type_names[] = {"fixed", "sliding", NULL};
static const char *const check_type_names[] = {"http", "https", "tcp", NULL};
static const char *const store_type_names[] = {"memory", "redis", NULL};
static const char *const on_error_names[] = {"allow", "deny", NULL};
static const char *const route_auth_names[] = {"none", "key-auth", NULL};
static const char *const route_type_names[] = {"llm", "mcp", NULL};
static const char *const balancer_names[] = {"roundrobin", "chash", "least_requests",
                                             "ewma",       "load",  NULL};
static const char *const hash_on_names[] = {"consumer", "header", "client_ip", NULL};
static const char *const log_level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const trigger_names[] = {"unhealthy", "quota",         "http_429", "http_5xx",
                                            "timeout",   "connect_error", NULL};

/* Enums are written through int pointers by the field table below. */
_Static_assert(sizeof(enum provider) == sizeof(int), "enum size");
_Static_assert(sizeof(enum log_level) == sizeof(int), "enum size");
_Static_assert(sizeof(enum limit_strategy) == sizeof(int), "enum size");
_Static_assert(sizeof(enum check_type) == sizeof(int), "enum size");
_Static_assert(sizeof(enum balancer_algorithm) == sizeof(int), "enum size");
_Static_assert(sizeof(enum route_type) == sizeof(int), "enum size");
_Static_assert(sizeof(unsigned) == sizeof(int), "weight size");

/* What a key holds, and how the loader reads it. */
enum field_kind {
	F_CUSTOM,   /* read by code beside the table; listed so that the key is known */
	F_STR,      /* char * */
	F_BOOL,     /* bool */
	F_INT,      /* int (or unsigned with FL_UNSIGNED) in min..max */
	F_DURATION, /* uint64_t ms */
	F_SIZE,     /* uint64_t bytes */
	F_ENUM,     /* int-sized enum, names[] */
	F_STATUSES, /* int * at off, size_t at off2; HTTP statuses */
	F_STRLIST,  /* char ** at off, size_t at off2 */
	F_ADDR,     /* "host:port": char *address at off, char *host at off2, int port at off3 */
	F_URL,      /* char *, an http(s) URL */
	F_WORKERS,  /* int: "auto" or 1..DEFAULT_WORKERS_MAX */
};

enum field_flag {
	FL_REQUIRED = 1u << 0,
	FL_NONZERO = 1u << 1,  /* durations, sizes: zero refused */
	FL_NONEMPTY = 1u << 2, /* strings (and list items): "" refused */
	FL_LOWER = 1u << 3,    /* strings (and list items): lower-cased */
	FL_NAME = 1u << 4,     /* letters, digits, '.', '_', '-' */
	FL_TOKEN = 1u << 5,    /* an HTTP token (header name, method) */
	FL_PATH = 1u << 6,     /* starts with "/", no spaces */
	FL_NOQUERY = 1u << 7,  /* no '?' or '#' */
	FL_HOSTPORT = 1u << 8, /* host:port */
	FL_HEADER = 1u << 9,   /* "Name: value" */
	FL_MIN1 = 1u << 10,    /* lists: at least one item */
	FL_UNSIGNED = 1u << 11,
};

struct field {
	const char *key;
	enum field_kind kind;
	unsigned flags;
	size_t off, off2, off3;
	long long min, max;       /* F_INT */
	uint64_t def_u;           /* F_DURATION, F_SIZE */
	long long def_i;          /* F_INT, F_ENUM, F_BOOL */
	const char *def_s;        /* F_STR, F_URL, F_ADDR */
	const char *const *def_l; /* F_STRLIST, NULL-terminated */
	const int *def_st;        /* F_STATUSES, 0-terminated */
	const char *const *names; /* F_ENUM */
};

#define FIELDS(t) t, ARRAY_LEN(t)

// clang-format off
/* One row per key. T is the struct the row's offsets are in. */
#define CUSTOM(k, fl) {.key = k, .kind = F_CUSTOM, .flags = fl}
#define STR(k, m, fl, def) {.key = k, .kind = F_STR, .flags = fl, .off = offsetof(T, m), .def_s = def}
#define URL(k, m, fl) {.key = k, .kind = F_URL, .flags = fl, .off = offsetof(T, m)}
#define BOOL(k, m, def) {.key = k, .kind = F_BOOL, .off = offsetof(T, m), .def_i = def}
#define INT(k, m, lo, hi, def) {.key = k, .kind = F_INT, .off = offsetof(T, m), .min = lo, .max = hi, .def_i = def}
#define UINT(k, m, lo, hi, def) {.key = k, .kind = F_INT, .flags = FL_UNSIGNED, .off = offsetof(T, m), .min = lo, .max = hi, .def_i = def}
#define DURATION(k, m, fl, def) {.key = k, .kind = F_DURATION, .flags = fl, .off = offsetof(T, m), .def_u = def}
#define SIZE(k, m, fl, def) {.key = k, .kind = F_SIZE, .flags = fl, .off = offsetof(T, m), .def_u = def}
#define ENUM(k, m, nm, def) {.key = k, .kind = F_ENUM, .off = offsetof(T, m), .def_i = def, .names = nm}
#define REQUIRED_ENUM(k, m, nm) {.key = k, .kind = F_ENUM, .flags = FL_REQUIRED, .off = offsetof(T, m), .names = nm}
#define STATUSES(k, m, nmemb, def) {.key = k, .kind = F_STATUSES, .off = offsetof(T, m), .off2 = offsetof(T, nmemb), .def_st = def}
#define STRLIST(k, m, nmemb, fl, def) {.key = k, .kind = F_STRLIST, .flags = fl, .off = offsetof(T, m), .off2 = offsetof(T, nmemb), .def_l = def}
#define ADDR(k, m, hostm, portm, fl, def) {.key = k, .kind = F_ADDR, .flags = fl, .off = offsetof(T, m), .off2 = offsetof(T, hostm), .off3 = offsetof(T, portm), .def_s = def}
#define WORKERS(k, m) {.key = k, .kind = F_WORKERS, .off = offsetof(T, m)}
#define REQ FL_REQUIRED
#define NONZERO FL_NONZERO

static const struct field top_fields[] = {
	CUSTOM("server", 0), CUSTOM("admin", 0), CUSTOM("log", 0), CUSTOM("store", 0),
	CUSTOM("alerts", 0), CUSTOM("instances", 0), CUSTOM("consumers", 0), CUSTOM("routes", 0),
	CUSTOM("mcp_servers", 0), /* src/mcp/mcp_config.c */
};

#define T struct config_server
static const struct field server_fields[] = {
	CUSTOM("listen", 0),  /* default: one listener on DEFAULT_LISTEN, plain TCP */
	WORKERS("workers", workers), /* default "auto": the CPU count */
	SIZE("max_body_size", max_body_size, NONZERO, MIB(16)),
	SIZE("max_header_size", max_header_size, NONZERO, KIB(64)),
	DURATION("client_timeout", client_timeout, NONZERO, SEC(60)),
	DURATION("keepalive_timeout", keepalive_timeout, 0, SEC(75)), /* 0: close after each response */
	INT("max_connections", max_connections, 1, 10000000, 20000),
	DURATION("drain_timeout", drain_timeout, 0, SEC(30)),
	BOOL("expose_instance_header", expose_instance_header, true),
};
#undef T

#define T struct config_listen
static const struct field listen_fields[] = {
	ADDR("address", address, host, port, REQ, NULL),
	CUSTOM("tls", 0),
};
static const struct field tls_fields[] = {
	STR("cert", tls_cert, REQ | FL_NONEMPTY, NULL),
	STR("key", tls_key, REQ | FL_NONEMPTY, NULL),
};
#undef T

#define T struct config_admin
static const struct field admin_fields[] = {
	ADDR("listen", address, host, port, 0, "127.0.0.1:9180"), /* no admin section: no listener */
	CUSTOM("key", REQ), /* "none": no authentication */
};
#undef T

#define T struct config_log
static const struct field log_fields[] = {
	ENUM("level", level, log_level_names, LOG_LEVEL_INFO),
	STR("error_log", error_log, FL_NONEMPTY, "stderr"),
	STR("access_log", access_log, FL_NONEMPTY, "stdout"), /* "off": NULL */
	BOOL("payloads", payloads, false),
};
#undef T

#define T struct config_store
static const struct field store_fields[] = {
	ENUM("type", type, store_type_names, STORE_MEMORY),
	CUSTOM("redis", 0),
	ENUM("on_error", on_error, on_error_names, STORE_ON_ERROR_ALLOW),
};
static const struct field redis_fields[] = {
	ADDR("address", redis.address, redis.host, redis.port, 0, "127.0.0.1:6379"),
	STR("password", redis.password, 0, NULL), /* "": NULL */
	INT("db", redis.db, 0, 65535, 0),
	STR("prefix", redis.prefix, 0, "sluice:"),
	DURATION("timeout", redis.timeout, NONZERO, MS(100)),
};
#undef T

#define T struct config_alerts
static const struct field alerts_fields[] = {
	CUSTOM("webhook", 0),
};
static const struct field webhook_fields[] = {
	URL("url", webhook_url, REQ),
	DURATION("timeout", webhook_timeout, NONZERO, SEC(2)),
	CUSTOM("headers", 0),
};
#undef T

#define T struct config_instance
static const struct field instance_fields[] = {
	STR("name", name, REQ | FL_NAME, NULL),
	REQUIRED_ENUM("provider", provider, provider_names),
	URL("endpoint", endpoint, 0), /* default: the provider's (provider_ops) */
	URL("responses_endpoint", responses_endpoint, 0), /* default: the provider's, if any */
	STR("model", model, FL_NONEMPTY, NULL),
	CUSTOM("options", 0),
	CUSTOM("auth", 0),
	CUSTOM("timeouts", 0),
	BOOL("tls_verify", tls_verify, true),
	CUSTOM("keepalive", 0),
	CUSTOM("limits", 0),
	/* The client's max_tokens × n is reserved up to this (docs/quotas.md §4). */
	UINT("max_reservation", max_reservation, 1, 1000000000, 32768),
	CUSTOM("checks", 0),
	CUSTOM("load", 0),
	CUSTOM("price", 0), /* per million tokens; cached_input defaults to input */
};
static const struct field auth_fields[] = {
	CUSTOM("header", 0),
	CUSTOM("query", 0),
};
static const struct field timeouts_fields[] = {
	DURATION("connect", timeouts.connect, NONZERO, SEC(5)),
	DURATION("first_byte", timeouts.first_byte, NONZERO, SEC(60)),
	DURATION("idle", timeouts.idle, NONZERO, SEC(60)),
	DURATION("total", timeouts.total, NONZERO, MINUTES(10)),
};
static const struct field keepalive_fields[] = {
	INT("pool", keepalive.pool, 0, 100000, 30),
	DURATION("idle", keepalive.idle, NONZERO, SEC(60)),
};
static const struct field load_fields[] = {
	URL("metrics_url", load.metrics_url, 0),
	DURATION("interval", load.interval, NONZERO, MS(250)),
};
static const struct field checks_fields[] = {
	CUSTOM("active", 0),
	CUSTOM("passive", 0),
};
#undef T

/* Active checks: APISIX's defaults, so that the case study's checks.active means the same. */
#define T struct config_active_check
static const struct field active_fields[] = {
	BOOL("enabled", enabled, true), /* false when checks.active is absent */
	ENUM("type", type, check_type_names, CHECK_HTTP), /* https when the endpoint is https:// */
	STR("http_method", http_method, FL_TOKEN, "GET"),
	STR("http_path", http_path, FL_PATH, "/"),
	STR("host", host, FL_HOSTPORT, NULL), /* the endpoint's host:port */
	STR("http_req_body", http_req_body, 0, NULL),
	STRLIST("req_headers", req_headers, n_req_headers, FL_HEADER, NULL),
	BOOL("https_verify_certificate", https_verify_certificate, true),
	DURATION("timeout", timeout, NONZERO, SEC(1)),
	INT("concurrency", concurrency, 1, 1000, 10),
	CUSTOM("healthy", 0),
	CUSTOM("unhealthy", 0),
};
static const struct field active_healthy_fields[] = {
	DURATION("interval", healthy.interval, NONZERO, SEC(1)),
	STATUSES("http_statuses", healthy.http_statuses, healthy.n_http_statuses, default_active_healthy_statuses),
	INT("successes", healthy.successes, 1, 254, 2),
};
static const struct field active_unhealthy_fields[] = {
	DURATION("interval", unhealthy.interval, NONZERO, SEC(1)),
	STATUSES("http_statuses", unhealthy.http_statuses, unhealthy.n_http_statuses, default_active_unhealthy_statuses),
	INT("http_failures", unhealthy.http_failures, 1, 254, 5),
	INT("tcp_failures", unhealthy.tcp_failures, 1, 254, 2),
	INT("timeouts", unhealthy.timeouts, 1, 254, 3),
};
#undef T

#define T struct config_passive_check
static const struct field passive_fields[] = {
	BOOL("enabled", enabled, true),
	CUSTOM("unhealthy", 0),
	DURATION("cooldown", cooldown, NONZERO, SEC(10)),
};
static const struct field passive_unhealthy_fields[] = {
	STATUSES("http_statuses", http_statuses, n_http_statuses, default_passive_statuses),
	INT("http_failures", http_failures, 0, 254, 3), /* 0: never */
	INT("tcp_failures", tcp_failures, 0, 254, 2),
	INT("timeouts", timeouts, 0, 254, 2),
};
#undef T

#define T struct config_limit
static const struct field limit_fields[] = {
	CUSTOM("instance", 0), /* consumers only */
	ENUM("strategy", strategy, strategy_names, LIMIT_TOTAL_TOKENS),
	CUSTOM("limit", 0), /* exactly one of limit and requests */
	CUSTOM("requests", 0),
	CUSTOM("window", REQ),
	ENUM("type", type, limit_type_names, LIMIT_FIXED),
};
#undef T

#define T struct config_consumer
static const struct field consumer_fields[] = {
	STR("name", name, REQ | FL_NAME, NULL),
	CUSTOM("keys", REQ),
	CUSTOM("routes", 0), /* default: every route */
	CUSTOM("limits", 0),
	INT("max_concurrent", max_concurrent, 0, 1000000, 0), /* 0: no cap */
	INT("rejected_code", rejected_code, 400, 599, 429),
	STR("rejected_msg", rejected_msg, FL_NONEMPTY, NULL),
	CUSTOM("mcp_tools", 0), /* src/mcp/mcp_config.c */
};
#undef T

#define T struct config_route
static const struct field route_fields[] = {
	STR("name", name, REQ | FL_NAME, NULL),
	ENUM("type", type, route_type_names, ROUTE_TYPE_LLM),
	CUSTOM("mcp", 0), /* type: mcp only; src/mcp/mcp_config.c */
	STRLIST("paths", paths, n_paths, REQ | FL_MIN1 | FL_PATH | FL_NOQUERY, NULL),
	STRLIST("models", models, n_models, FL_NONEMPTY, NULL),
	ENUM("auth", auth, route_auth_names, ROUTE_AUTH_NONE), /* key-auth when consumers exist */
	STRLIST("key_headers", key_headers, n_key_headers, FL_MIN1 | FL_TOKEN | FL_LOWER, default_key_headers),
	CUSTOM("balancer", 0),
	CUSTOM("fallback", 0),
	CUSTOM("targets", 0), /* required by type: llm, refused by type: mcp */
	CUSTOM("plugins", 0),
};
static const struct field balancer_fields[] = {
	ENUM("algorithm", balancer.algorithm, balancer_names, BALANCER_ROUNDROBIN),
	ENUM("hash_on", balancer.hash_on, hash_on_names, HASH_ON_CONSUMER),
	STR("key", balancer.key, FL_TOKEN, NULL), /* required by hash_on: header */
};
static const struct field fallback_fields[] = {
	CUSTOM("on", 0), /* default FALLBACK_ALL */
	STATUSES("http_statuses", fallback.http_statuses, fallback.n_http_statuses, NULL),
	INT("max_attempts", fallback.max_attempts, 1, 32, 3),
};
#undef T

#define T struct config_target
static const struct field target_fields[] = {
	CUSTOM("instance", REQ),
	INT("priority", priority, -1000000, 1000000, 0),
	UINT("weight", weight, 0, 1000000, 100), /* 0: drained */
	STR("model", model, FL_NONEMPTY, NULL), /* default: the instance's model */
};
#undef T

// clang-format on
#undef CUSTOM
#undef STR
#undef URL
#undef BOOL
#undef INT
#undef UINT
#undef DURATION
#undef SIZE
#undef ENUM
#undef REQUIRED_ENUM
#undef STATUSES
#undef STRLIST
#undef ADDR
#undef WORKERS
#undef REQ
#undef NONZERO

/* ============================================================================================
 * Memory. Loading runs at start-up and on reload; running out of memory there leaves nothing
 * sensible to do, so allocation failures abort instead of threading NULL through every step.
 * ========================================================================================== */

__attribute__((noreturn)) static void oom(void)
{
	log_error("config: out of memory");
	abort();
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (p == NULL)
		oom();
	return p;
}

static char *xstrdup(const char *s)
{
	char *p = strdup(s);
	if (p == NULL)
		oom();
	return p;
}

static char *xstrndup(const char *s, size_t n)
{
	char *p = strndup(s, n);
	if (p == NULL)
		oom();
	return p;
}

static char *xvasprintf(const char *fmt, va_list ap)
{
	char *s;
	if (vasprintf(&s, fmt, ap) < 0)
		oom();
	return s;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *xasprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	char *s = xvasprintf(fmt, ap);
	va_end(ap);
	return s;
}

static json_t *jcheck(json_t *j)
{
	if (j == NULL)
		oom();
	return j;
}

/* ============================================================================================
 * The loader's state and its error list.
 * ========================================================================================== */

struct problem {
	unsigned line, col;
	size_t seq;
	char *msg;
};

struct key_ref {
	unsigned char sha256[32];
	size_t consumer;
	const struct cnode *node;
};

/* What a module parsing its own section sees of the loader (config_section.h). */
struct config_section {
	struct loader *ld;
	const struct cnode *at; /* the entry being parsed: where an error with no node goes */
};

struct loader {
	const char *file; /* name used in messages */
	struct problem *probs;
	size_t n_probs, cap_probs;
	size_t n_failed; /* errors found, including those not repeated (csec_error_count) */
	struct config_section sec;
	struct config *c;
	bool consumers_declared;
	struct key_ref *keys; /* every consumer key, to find one used twice */
	size_t n_keys, cap_keys;
};

static void add_problem(struct loader *ld, unsigned line, unsigned col, char *msg)
{
	if (ld->n_probs == ld->cap_probs) {
		size_t cap = ld->cap_probs ? 2 * ld->cap_probs : 16;
		struct problem *p = realloc(ld->probs, cap * sizeof *p);
		if (p == NULL)
			oom();
		ld->probs = p;
		ld->cap_probs = cap;
	}
	ld->probs[ld->n_probs] = (struct problem){line, col, ld->n_probs, msg};
	ld->n_probs++;
}

static void vreport(struct loader *ld, unsigned line, unsigned col, const char *path,
                    const char *fmt, va_list ap)
{
	char *msg = xvasprintf(fmt, ap);
	char *full = path[0] != '\0' ? xasprintf("%s:%u:%u: %s: %s", ld->file, line, col, path, msg)
	                             : xasprintf("%s:%u:%u: %s", ld->file, line, col, msg);
	free(msg);
	add_problem(ld, line, col, full);
}

/* One error at node `at`, about the key path `path`. */
static void err(struct loader *ld, const struct cnode *at, const char *path, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static void err(struct loader *ld, const struct cnode *at, const char *path, const char *fmt, ...)
{
	va_list ap;
	ld->n_failed++;
	if (at != NULL && at->unexpanded)
		return; /* its unset variable is the error; what follows from it is noise */
	va_start(ap, fmt);
	vreport(ld, at ? at->line : 1, at ? at->col : 1, path, fmt, ap);
	va_end(ap);
}

static void tree_report(void *arg, unsigned line, unsigned col, const char *path, const char *msg)
{
	struct loader *ld = arg;
	ld->n_failed++;
	add_problem(ld, line, col,
	            path[0] != '\0' ? xasprintf("%s:%u:%u: %s: %s", ld->file, line, col, path, msg)
	                            : xasprintf("%s:%u:%u: %s", ld->file, line, col, msg));
}

static int problem_cmp(const void *a, const void *b)
{
	const struct problem *x = a, *y = b;
	if (x->line != y->line)
		return x->line < y->line ? -1 : 1;
	if (x->col != y->col)
		return x->col < y->col ? -1 : 1;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Move the problems, in file order, into errs (which may be NULL). */
static void hand_over_problems(struct loader *ld, struct config_errors *errs)
{
	qsort(ld->probs, ld->n_probs, sizeof *ld->probs, problem_cmp);
	for (size_t i = 0; i < ld->n_probs; i++) {
		if (errs != NULL && errs->n < CONFIG_MAX_ERRORS) {
			errs->msgs[errs->n++] = ld->probs[i].msg;
		} else {
			if (errs != NULL)
				errs->dropped++;
			free(ld->probs[i].msg);
		}
	}
	free(ld->probs);
	ld->probs = NULL;
	ld->n_probs = ld->cap_probs = 0;
}

/* ============================================================================================
 * Paths, nodes, suggestions.
 * ========================================================================================== */

static const char *at_key(char *buf, const char *parent, const char *key)
{
	int r = parent[0] != '\0' ? snprintf(buf, PATH_LEN, "%s.%s", parent, key)
	                          : snprintf(buf, PATH_LEN, "%s", key);
	if (r < 0 || r >= PATH_LEN)
		memcpy(buf + PATH_LEN - 4, "...", 4);
	return buf;
}

static const char *at_index(char *buf, const char *parent, size_t i)
{
	int r = snprintf(buf, PATH_LEN, "%s[%zu]", parent, i);
	if (r < 0 || r >= PATH_LEN)
		memcpy(buf + PATH_LEN - 4, "...", 4);
	return buf;
}

static const struct cnode *get(const struct cnode *map, const char *key)
{
	return ctree_get(map, key, NULL);
}

static const char *what(const struct cnode *n)
{
	switch (n->kind) {
	case CNODE_MAP:
		return "a mapping";
	case CNODE_SEQ:
		return "a list";
	default:
		return n->null ? "null" : "a string";
	}
}

/* n if it is a mapping; NULL when n is NULL (absent) or, reported, something else. */
static const struct cnode *as_map(struct loader *ld, const struct cnode *n, const char *path)
{
	if (n == NULL || n->kind == CNODE_MAP)
		return n;
	err(ld, n, path, "must be a mapping, not %s", what(n));
	return NULL;
}

static const struct cnode *as_seq(struct loader *ld, const struct cnode *n, const char *path)
{
	if (n == NULL || n->kind == CNODE_SEQ)
		return n;
	err(ld, n, path, "must be a list, not %s", what(n));
	return NULL;
}

/* The text of a non-null scalar; NULL (reported) otherwise. */
static const char *as_str(struct loader *ld, const struct cnode *n, const char *path)
{
	if (n->kind == CNODE_SCALAR && !n->null)
		return n->str;
	err(ld, n, path, "must be a string, not %s", what(n));
	return NULL;
}

static const char *scalar_text(const struct cnode *n)
{
	return n->kind == CNODE_SCALAR && !n->null ? n->str : NULL;
}

/* Optimal string alignment distance (a transposition counts one), capped inputs. */
static size_t edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	size_t d[65][65];

	if (la > 64 || lb > 64)
		return SIZE_MAX;
	for (size_t i = 0; i <= la; i++)
		d[i][0] = i;
	for (size_t j = 0; j <= lb; j++)
		d[0][j] = j;
	for (size_t i = 1; i <= la; i++) {
		for (size_t j = 1; j <= lb; j++) {
			size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
			size_t v = d[i - 1][j] + 1;
			if (d[i][j - 1] + 1 < v)
				v = d[i][j - 1] + 1;
			if (d[i - 1][j - 1] + cost < v)
				v = d[i - 1][j - 1] + cost;
			if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
			    d[i - 2][j - 2] + 1 < v)
				v = d[i - 2][j - 2] + 1;
			d[i][j] = v;
		}
	}
	return d[la][lb];
}

/* Suggestion collector: the nearest candidate within distance 2 (and closer than the word's
 * own length, so that "a" does not suggest "db"). */
struct nearest {
	const char *word;
	const char *best;
	size_t dist;
};

static void consider(struct nearest *n, const char *cand)
{
	if (cand == NULL)
		return;
	size_t d = edit_distance(n->word, cand);
	if (d <= 2 && d < strlen(n->word) && (n->best == NULL || d < n->dist)) {
		n->best = cand;
		n->dist = d;
	}
}

/* " (did you mean "x"?)" or "" — into buf. */
static const char *hint(char *buf, size_t len, const struct nearest *n)
{
	if (n->best == NULL)
		buf[0] = '\0';
	else
		snprintf(buf, len, " (did you mean \"%s\"?)", n->best);
	return buf;
}

static const char *hint_names(char *buf, size_t len, const char *word, const char *const *names)
{
	struct nearest n = {.word = word};
	for (size_t i = 0; names[i] != NULL; i++)
		consider(&n, names[i]);
	return hint(buf, len, &n);
}

static bool name_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '.' || c == '_' || c == '-';
}

static bool token_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static bool is_token(const char *s, size_t n)
{
	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (!token_char(s[i]))
			return false;
	}
	return true;
}

static bool has_ctl(const char *s)
{
	for (; *s != '\0'; s++) {
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return true;
	}
	return false;
}

static bool has_space_or_ctl(const char *s)
{
	for (; *s != '\0'; s++) {
		if ((unsigned char)*s <= 0x20 || *s == 0x7f)
			return true;
	}
	return false;
}

/* "host:port" or "[v6]:port", port 1..65535. */
static bool split_hostport(const char *s, char **host, int *port)
{
	const char *h, *p;
	size_t hl;

	if (s[0] == '[') {
		const char *close = strchr(s, ']');
		if (close == NULL || close[1] != ':')
			return false;
		h = s + 1;
		hl = (size_t)(close - h);
		p = close + 2;
		if (hl == 0 || strspn(h, "0123456789abcdefABCDEF:.") < hl)
			return false;
	} else {
		const char *colon = strrchr(s, ':');
		if (colon == NULL)
			return false;
		h = s;
		hl = (size_t)(colon - s);
		p = colon + 1;
		if (hl == 0)
			return false;
		for (size_t i = 0; i < hl; i++) {
			if (!name_char(h[i]))
				return false; /* includes ':' — bare IPv6 needs brackets */
		}
	}
	size_t pl = strlen(p);
	if (pl == 0 || pl > 5 || strspn(p, "0123456789") != pl)
		return false;
	long v = strtol(p, NULL, 10);
	if (v < 1 || v > 65535)
		return false;
	if (host != NULL)
		*host = xstrndup(h, hl);
	if (port != NULL)
		*port = (int)v;
	return true;
}

/* Checks an http(s) URL; returns NULL when fine, else what is wrong. On success *hostport (if
 * not NULL) gets "host:port" with the scheme's port when none is written, *https the scheme. */
static const char *url_problem(const char *s, char **hostport, bool *https)
{
	size_t skip;
	bool tls;

	if (strncasecmp(s, "http://", 7) == 0) {
		skip = 7;
		tls = false;
	} else if (strncasecmp(s, "https://", 8) == 0) {
		skip = 8;
		tls = true;
	} else {
		return "must be an http:// or https:// URL";
	}
	if (has_space_or_ctl(s))
		return "must not contain spaces or control characters";
	if (strchr(s, '#') != NULL)
		return "must not contain a fragment (#)";
	const char *auth = s + skip;
	size_t alen = strcspn(auth, "/?");
	if (alen == 0)
		return "has no host";
	if (memchr(auth, '@', alen) != NULL)
		return "must not contain credentials (user@host): use auth.header or auth.query";
	const char *host = auth, *port = NULL;
	size_t hl = alen;
	if (auth[0] == '[') {
		const char *close = memchr(auth, ']', alen);
		if (close == NULL)
			return "has an unterminated [IPv6] host";
		hl = (size_t)(close - auth) + 1;
		if (hl < alen) {
			if (close[1] != ':')
				return "has garbage after the [IPv6] host";
			port = close + 2;
		}
	} else {
		const char *colon = memchr(auth, ':', alen);
		if (colon != NULL) {
			hl = (size_t)(colon - auth);
			port = colon + 1;
		}
		if (hl == 0)
			return "has no host";
	}
	long pv = tls ? 443 : 80;
	if (port != NULL) {
		size_t pl = alen - (size_t)(port - auth);
		if (pl == 0 || pl > 5 || strspn(port, "0123456789") < pl)
			return "has an invalid port";
		pv = strtol(port, NULL, 10);
		if (pv < 1 || pv > 65535)
			return "has a port outside 1..65535";
	}
	if (hostport != NULL)
		*hostport = xasprintf("%.*s:%ld", (int)hl, host, pv);
	if (https != NULL)
		*https = tls;
	return NULL;
}

/* What is wrong with string s under the given flags; NULL when fine. */
static const char *str_problem(unsigned flags, const char *s)
{
	if ((flags & (FL_NONEMPTY | FL_NAME | FL_TOKEN | FL_PATH | FL_HOSTPORT | FL_HEADER)) &&
	    s[0] == '\0')
		return "must not be empty";
	if (flags & FL_NAME) {
		for (const char *p = s; *p != '\0'; p++) {
			if (!name_char(*p))
				return "must contain only letters, digits, '.', '_' and '-'";
		}
		if (strlen(s) > 128)
			return "must be at most 128 characters long";
	}
	if ((flags & FL_TOKEN) && !is_token(s, strlen(s)))
		return "must be an HTTP token (letters, digits and !#$%&'*+-.^_`|~)";
	if (flags & FL_PATH) {
		if (s[0] != '/')
			return "must start with \"/\"";
		if (has_space_or_ctl(s))
			return "must not contain spaces or control characters";
	}
	if ((flags & FL_NOQUERY) && strpbrk(s, "?#") != NULL)
		return "must be a path only, without \"?\" or \"#\"";
	if ((flags & FL_HOSTPORT) && !split_hostport(s, NULL, NULL))
		return "must be host:port (or [ipv6]:port) with a port from 1 to 65535";
	if (flags & FL_HEADER) {
		const char *colon = strchr(s, ':');
		if (colon == NULL || !is_token(s, (size_t)(colon - s)) || has_ctl(colon))
			return "must be a header line \"Name: value\"";
	}
	return NULL;
}

/* ============================================================================================
 * The generic field machinery: defaults, then the keys present.
 * ========================================================================================== */

#define FIELD_PTR(type, obj, off) ((type *)(void *)((char *)(obj) + (off)))

static void lower(char *s)
{
	for (; *s != '\0'; s++) {
		if (*s >= 'A' && *s <= 'Z')
			*s = (char)(*s - 'A' + 'a');
	}
}

static void free_strv(char **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i]);
	free(v);
}

static int workers_auto(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	if (n < 1)
		n = 1;
	return n > DEFAULT_WORKERS_MAX ? DEFAULT_WORKERS_MAX : (int)n;
}

static void set_addr(const struct field *f, void *obj, const char *s, char *host, int port)
{
	char **address = FIELD_PTR(char *, obj, f->off);
	char **hostp = FIELD_PTR(char *, obj, f->off2);
	free(*address);
	free(*hostp);
	*address = xstrdup(s);
	*hostp = host;
	*FIELD_PTR(int, obj, f->off3) = port;
}

static void set_default(const struct field *f, void *obj)
{
	if (obj == NULL)
		return; /* a table of F_CUSTOM keys only */
	switch (f->kind) {
	case F_CUSTOM:
		break;
	case F_STR:
	case F_URL: {
		char **p = FIELD_PTR(char *, obj, f->off);
		free(*p);
		*p = f->def_s ? xstrdup(f->def_s) : NULL;
		break;
	}
	case F_BOOL:
		*FIELD_PTR(bool, obj, f->off) = f->def_i != 0;
		break;
	case F_INT:
	case F_ENUM:
		*FIELD_PTR(int, obj, f->off) = (int)f->def_i;
		break;
	case F_DURATION:
	case F_SIZE:
		*FIELD_PTR(uint64_t, obj, f->off) = f->def_u;
		break;
	case F_WORKERS:
		*FIELD_PTR(int, obj, f->off) = workers_auto();
		break;
	case F_STATUSES: {
		int **p = FIELD_PTR(int *, obj, f->off);
		size_t n = 0;
		while (f->def_st && f->def_st[n] != 0)
			n++;
		free(*p);
		*p = NULL;
		if (n > 0) {
			*p = xcalloc(n, sizeof **p);
			memcpy(*p, f->def_st, n * sizeof **p);
		}
		*FIELD_PTR(size_t, obj, f->off2) = n;
		break;
	}
	case F_STRLIST: {
		char ***p = FIELD_PTR(char **, obj, f->off);
		size_t *np = FIELD_PTR(size_t, obj, f->off2);
		size_t n = 0;
		while (f->def_l && f->def_l[n] != NULL)
			n++;
		free_strv(*p, *np);
		*p = NULL;
		if (n > 0) {
			*p = xcalloc(n, sizeof **p);
			for (size_t i = 0; i < n; i++)
				(*p)[i] = xstrdup(f->def_l[i]);
		}
		*np = n;
		break;
	}
	case F_ADDR:
		if (f->def_s != NULL) {
			char *host = NULL;
			int port = 0;
			(void)split_hostport(f->def_s, &host, &port);
			set_addr(f, obj, f->def_s, host, port);
		}
		break;
	}
}

static bool parse_ll(const char *s, long long *out)
{
	char *end;
	if (s == NULL ||
	    !((s[0] >= '0' && s[0] <= '9') || (s[0] == '-' && s[1] >= '0' && s[1] <= '9')))
		return false;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return false;
	*out = v;
	return true;
}

static bool parse_bool(const char *s, bool *out)
{
	if (s == NULL)
		return false;
	if (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "TRUE") == 0) {
		*out = true;
		return true;
	}
	if (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 || strcmp(s, "FALSE") == 0) {
		*out = false;
		return true;
	}
	return false;
}

static int find_name(const char *const *names, const char *s)
{
	for (int i = 0; s != NULL && names[i] != NULL; i++) {
		if (strcmp(names[i], s) == 0)
			return i;
	}
	return -1;
}

static void err_enum(struct loader *ld, const struct cnode *v, const char *path,
                     const char *const *names)
{
	char list[256] = "", h[128];
	size_t len = 0;
	for (size_t i = 0; names[i] != NULL; i++) {
		int r = snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", names[i]);
		if (r < 0 || (size_t)r >= sizeof list - len)
			break;
		len += (size_t)r;
	}
	const char *s = scalar_text(v);
	if (s == NULL)
		err(ld, v, path, "must be one of %s, not %s", list, what(v));
	else
		err(ld, v, path, "\"%s\" is not one of %s%s", s, list,
		    hint_names(h, sizeof h, s, names));
}

static bool parse_enum(struct loader *ld, const struct cnode *v, const char *path,
                       const char *const *names, int *out)
{
	int i = find_name(names, scalar_text(v));
	if (i < 0) {
		err_enum(ld, v, path, names);
		return false;
	}
	*out = i;
	return true;
}

static bool parse_int(struct loader *ld, const struct cnode *v, const char *path, long long min,
                      long long max, long long *out)
{
	long long x;
	if (!parse_ll(scalar_text(v), &x) || x < min || x > max) {
		err(ld, v, path, "must be an integer from %lld to %lld", min, max);
		return false;
	}
	*out = x;
	return true;
}

static bool parse_duration_node(struct loader *ld, const struct cnode *v, const char *path,
                                bool nonzero, uint64_t *out)
{
	const char *s = scalar_text(v);
	uint64_t ms;
	if (s == NULL) {
		err(ld, v, path, "must be a duration such as 30s, not %s", what(v));
		return false;
	}
	if (!config_parse_duration(s, &ms)) {
		err(ld, v, path,
		    "invalid duration \"%s\": use a number with a unit: ms, s, m, h, d or w "
		    "(a bare number means seconds)",
		    s);
		return false;
	}
	if (nonzero && ms == 0) {
		err(ld, v, path, "must be greater than zero");
		return false;
	}
	*out = ms;
	return true;
}

static bool parse_size_node(struct loader *ld, const struct cnode *v, const char *path,
                            bool nonzero, uint64_t *out)
{
	const char *s = scalar_text(v);
	uint64_t bytes;
	if (s == NULL) {
		err(ld, v, path, "must be a size such as 16MiB, not %s", what(v));
		return false;
	}
	if (!config_parse_size(s, &bytes)) {
		err(ld, v, path,
		    "invalid size \"%s\": use bytes or a number with a unit: KiB, MiB, GiB "
		    "(powers of 1024) or KB, MB, GB (powers of 1000)",
		    s);
		return false;
	}
	if (nonzero && bytes == 0) {
		err(ld, v, path, "must be greater than zero");
		return false;
	}
	*out = bytes;
	return true;
}

static bool parse_statuses(struct loader *ld, const struct cnode *v, const char *path, int **out,
                           size_t *n_out)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, path);
	bool ok = true;
	if (seq == NULL)
		return false;
	int *st = seq->n ? xcalloc(seq->n, sizeof *st) : NULL;
	for (size_t i = 0; i < seq->n; i++) {
		long long x;
		if (!parse_ll(scalar_text(seq->kids[i]), &x) || x < 100 || x > 599) {
			err(ld, seq->kids[i], at_index(p, path, i),
			    "must be an HTTP status from 100 to 599");
			ok = false;
			continue;
		}
		st[i] = (int)x;
	}
	if (!ok) {
		free(st);
		return false;
	}
	free(*out);
	*out = st;
	*n_out = seq->n;
	return true;
}

/* A list of strings, each checked against flags; NULL-free array of seq->n. */
static bool parse_strlist(struct loader *ld, const struct cnode *v, const char *path,
                          unsigned flags, char ***out, size_t *n_out)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, path);
	bool ok = true;
	if (seq == NULL)
		return false;
	if ((flags & FL_MIN1) && seq->n == 0) {
		err(ld, v, path, "must list at least one item");
		return false;
	}
	char **list = seq->n ? xcalloc(seq->n, sizeof *list) : NULL;
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const char *s = as_str(ld, seq->kids[i], ip);
		const char *problem = s ? str_problem(flags, s) : NULL;
		if (s == NULL || problem != NULL) {
			if (problem != NULL)
				err(ld, seq->kids[i], ip, "%s", problem);
			ok = false;
			list[i] = xstrdup("");
			continue;
		}
		list[i] = xstrdup(s);
		if (flags & FL_LOWER)
			lower(list[i]);
	}
	if (!ok) {
		free_strv(list, seq->n);
		return false;
	}
	free_strv(*out, *n_out);
	*out = list;
	*n_out = seq->n;
	return true;
}

static void parse_value(struct loader *ld, const struct field *f, const struct cnode *v,
                        const char *path, void *obj)
{
	switch (f->kind) {
	case F_CUSTOM:
		break;
	case F_STR: {
		const char *s = as_str(ld, v, path);
		if (s == NULL)
			break;
		const char *problem = str_problem(f->flags, s);
		if (problem != NULL) {
			err(ld, v, path, "%s", problem);
			break;
		}
		char **p = FIELD_PTR(char *, obj, f->off);
		free(*p);
		*p = xstrdup(s);
		if (f->flags & FL_LOWER)
			lower(*p);
		break;
	}
	case F_URL: {
		const char *s = as_str(ld, v, path);
		const char *problem = s ? url_problem(s, NULL, NULL) : NULL;
		if (problem != NULL)
			err(ld, v, path, "%s", problem);
		if (s == NULL || problem != NULL)
			break;
		char **p = FIELD_PTR(char *, obj, f->off);
		free(*p);
		*p = xstrdup(s);
		break;
	}
	case F_BOOL: {
		bool b;
		if (!parse_bool(scalar_text(v), &b))
			err(ld, v, path, "must be true or false");
		else
			*FIELD_PTR(bool, obj, f->off) = b;
		break;
	}
	case F_INT: {
		long long x;
		if (!parse_int(ld, v, path, f->min, f->max, &x))
			break;
		if (f->flags & FL_UNSIGNED)
			*FIELD_PTR(unsigned, obj, f->off) = (unsigned)x;
		else
			*FIELD_PTR(int, obj, f->off) = (int)x;
		break;
	}
	case F_ENUM: {
		int i;
		if (parse_enum(ld, v, path, f->names, &i))
			*FIELD_PTR(int, obj, f->off) = i;
		break;
	}
	case F_DURATION:
		(void)parse_duration_node(ld, v, path, f->flags & FL_NONZERO,
		                          FIELD_PTR(uint64_t, obj, f->off));
		break;
	case F_SIZE:
		(void)parse_size_node(ld, v, path, f->flags & FL_NONZERO,
		                      FIELD_PTR(uint64_t, obj, f->off));
		break;
	case F_WORKERS: {
		const char *s = scalar_text(v);
		long long x;
		if (s != NULL && strcmp(s, "auto") == 0)
			*FIELD_PTR(int, obj, f->off) = workers_auto();
		else if (parse_ll(s, &x) && x >= 1 && x <= DEFAULT_WORKERS_MAX)
			*FIELD_PTR(int, obj, f->off) = (int)x;
		else
			err(ld, v, path, "must be \"auto\" or an integer from 1 to %d",
			    DEFAULT_WORKERS_MAX);
		break;
	}
	case F_STATUSES:
		(void)parse_statuses(ld, v, path, FIELD_PTR(int *, obj, f->off),
		                     FIELD_PTR(size_t, obj, f->off2));
		break;
	case F_STRLIST:
		(void)parse_strlist(ld, v, path, f->flags, FIELD_PTR(char **, obj, f->off),
		                    FIELD_PTR(size_t, obj, f->off2));
		break;
	case F_ADDR: {
		const char *s = as_str(ld, v, path);
		char *host;
		int port;
		if (s == NULL)
			break;
		if (!split_hostport(s, &host, &port)) {
			err(ld, v, path,
			    "must be host:port (or [ipv6]:port) with a port from 1 to 65535");
			break;
		}
		set_addr(f, obj, s, host, port);
		break;
	}
	}
}

static const struct field *find_field(const struct field *fields, size_t n, const char *key)
{
	for (size_t i = 0; i < n; i++) {
		if (strcmp(fields[i].key, key) == 0)
			return &fields[i];
	}
	return NULL;
}

/*
 * One mapping against its field table: every field gets its default, then every key present is
 * read (F_CUSTOM keys are left to the caller), unknown keys and missing required ones are
 * reported. map may be NULL (the section is absent: defaults only). obj may be NULL when the
 * table has only F_CUSTOM fields.
 */
static void section(struct loader *ld, const struct cnode *map, const char *path,
                    const struct field *fields, size_t n, void *obj)
{
	char p[PATH_LEN], h[128];

	for (size_t i = 0; i < n; i++)
		set_default(&fields[i], obj);
	if (map == NULL)
		return;
	for (size_t i = 0; i < map->n; i++) {
		const struct cnode *k = CNODE_KEY(map, i);
		const char *key = scalar_text(k);
		if (key == NULL)
			continue; /* reported by the tree */
		const struct field *f = find_field(fields, n, key);
		if (f == NULL && !k->quoted && strcmp(key, "<<") == 0)
			continue; /* reported by the tree */
		if (f == NULL && fields == top_fields && strncmp(key, "x-", 2) == 0)
			continue; /* extension keys: a place for anchors, ignored */
		if (f == NULL) {
			struct nearest near = {.word = key};
			for (size_t j = 0; j < n; j++)
				consider(&near, fields[j].key);
			err(ld, k, path, "unknown key \"%s\"%s", key, hint(h, sizeof h, &near));
			continue;
		}
		/* a repeated key is reported by the tree; read the first only */
		if (get(map, key) != CNODE_VAL(map, i))
			continue;
		parse_value(ld, f, CNODE_VAL(map, i), at_key(p, path, key), obj);
	}
	for (size_t i = 0; i < n; i++) {
		if ((fields[i].flags & FL_REQUIRED) && get(map, fields[i].key) == NULL)
			err(ld, map, path, "missing required key \"%s\"", fields[i].key);
	}
}

/* The mapping under key in map (NULL when absent or, reported, not a mapping). */
static const struct cnode *sub_map(struct loader *ld, const struct cnode *map, const char *key,
                                   const char *path, char *buf)
{
	at_key(buf, path, key);
	return as_map(ld, get(map, key), buf);
}

/* ============================================================================================
 * Name/value mappings (headers, query), YAML to JSON.
 * ========================================================================================== */

static struct config_kv *parse_kv(struct loader *ld, const struct cnode *v, const char *path,
                                  bool header, size_t *n_out)
{
	char p[PATH_LEN];
	const struct cnode *map = as_map(ld, v, path);
	*n_out = 0;
	if (map == NULL || map->n == 0)
		return NULL;
	struct config_kv *kv = xcalloc(map->n, sizeof *kv);
	size_t n = 0;
	for (size_t i = 0; i < map->n; i++) {
		const char *name = scalar_text(CNODE_KEY(map, i));
		if (name == NULL || get(map, name) != CNODE_VAL(map, i))
			continue; /* repeated keys are reported by the tree */
		at_key(p, path, name);
		if (header && !is_token(name, strlen(name))) {
			err(ld, CNODE_KEY(map, i), path, "\"%s\" is not a valid header name", name);
			continue;
		}
		if (!header && name[0] == '\0') {
			err(ld, CNODE_KEY(map, i), path, "parameter names must not be empty");
			continue;
		}
		const char *value = as_str(ld, CNODE_VAL(map, i), p);
		if (value == NULL)
			continue;
		if (header && has_ctl(value)) {
			err(ld, CNODE_VAL(map, i), p,
			    "must not contain line breaks or control characters");
			continue;
		}
		kv[n].name = xstrdup(name);
		kv[n].value = xstrdup(value);
		n++;
	}
	*n_out = n;
	return kv;
}

static void free_kv(struct config_kv *kv, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(kv[i].name);
		free(kv[i].value);
	}
	free(kv);
}

/* Plain YAML scalars that look like numbers, following YAML 1.2's core schema. */
static bool looks_int(const char *s)
{
	if (*s == '-' || *s == '+')
		s++;
	if (*s == '\0')
		return false;
	return strspn(s, "0123456789") == strlen(s);
}

static bool looks_float(const char *s)
{
	bool digits = false;
	if (*s == '-' || *s == '+')
		s++;
	while (*s >= '0' && *s <= '9') {
		s++;
		digits = true;
	}
	if (*s == '.') {
		s++;
		while (*s >= '0' && *s <= '9') {
			s++;
			digits = true;
		}
	}
	if (!digits)
		return false;
	if (*s == 'e' || *s == 'E') {
		s++;
		if (*s == '-' || *s == '+')
			s++;
		if (*s < '0' || *s > '9')
			return false;
		while (*s >= '0' && *s <= '9')
			s++;
	}
	return *s == '\0';
}

static bool looks_special_float(const char *s)
{
	static const char *const specials[] = {".inf",  ".Inf",  ".INF",  "+.inf", "+.Inf", "+.INF",
	                                       "-.inf", "-.Inf", "-.INF", ".nan",  ".NaN",  ".NAN"};
	for (size_t i = 0; i < ARRAY_LEN(specials); i++) {
		if (strcmp(s, specials[i]) == 0)
			return true;
	}
	return false;
}

static json_t *scalar_json(struct loader *ld, const struct cnode *n, const char *path)
{
	bool b;
	if (n->null)
		return jcheck(json_null());
	if (!n->quoted) {
		if (parse_bool(n->str, &b))
			return jcheck(json_boolean(b));
		if (looks_int(n->str)) {
			errno = 0;
			long long v = strtoll(n->str, NULL, 10);
			if (errno == ERANGE) {
				err(ld, n, path, "integer %s is out of range", n->str);
				return NULL;
			}
			return jcheck(json_integer(v));
		}
		if (looks_float(n->str)) {
			double d = strtod(n->str, NULL);
			if (!isfinite(d)) {
				err(ld, n, path, "number %s is out of range", n->str);
				return NULL;
			}
			return jcheck(json_real(d));
		}
		if (looks_special_float(n->str)) {
			err(ld, n, path, "infinity and NaN cannot be sent as JSON");
			return NULL;
		}
	}
	json_t *s = json_string(n->str);
	if (s == NULL)
		err(ld, n, path, "must be valid UTF-8");
	return s;
}

/* Any YAML value as JSON; NULL when something in it was reported. */
static json_t *to_json(struct loader *ld, const struct cnode *n, const char *path)
{
	char p[PATH_LEN];
	bool ok = true;
	json_t *j;

	switch (n->kind) {
	case CNODE_SCALAR:
		return scalar_json(ld, n, path);
	case CNODE_SEQ:
		j = jcheck(json_array());
		for (size_t i = 0; i < n->n; i++) {
			json_t *item = to_json(ld, n->kids[i], at_index(p, path, i));
			if (item == NULL)
				ok = false;
			else
				json_array_append_new(j, item);
		}
		break;
	default:
		j = jcheck(json_object());
		for (size_t i = 0; i < n->n; i++) {
			const char *key = scalar_text(CNODE_KEY(n, i));
			if (key == NULL) {
				ok = false;
				continue;
			}
			json_t *item = to_json(ld, CNODE_VAL(n, i), at_key(p, path, key));
			if (item == NULL)
				ok = false;
			else if (json_object_get(j, key) == NULL)
				json_object_set_new(j, key, item);
			else
				json_decref(item); /* repeated key: reported by the tree */
		}
		break;
	}
	if (!ok) {
		json_decref(j);
		return NULL;
	}
	return j;
}

/* ============================================================================================
 * Top-level sections.
 * ========================================================================================== */

static void parse_listen(struct loader *ld, const struct cnode *v, const char *path,
                         struct config_server *s)
{
	char p[PATH_LEN], tp[PATH_LEN];

	if (v == NULL) {
		s->listen = xcalloc(1, sizeof *s->listen);
		s->n_listen = 1;
		set_default(&(struct field){.key = "address",
		                            .kind = F_ADDR,
		                            .off = offsetof(struct config_listen, address),
		                            .off2 = offsetof(struct config_listen, host),
		                            .off3 = offsetof(struct config_listen, port),
		                            .def_s = DEFAULT_LISTEN},
		            &s->listen[0]);
		return;
	}
	/* "listen: 0.0.0.0:8080" is read as a list of that one address */
	bool single = v->kind == CNODE_SCALAR && !v->null;
	const struct cnode *seq = single ? NULL : as_seq(ld, v, path);
	if (!single && seq == NULL)
		return;
	size_t n = seq ? seq->n : 1;
	if (n == 0) {
		err(ld, v, path, "must list at least one address");
		return;
	}
	s->listen = xcalloc(n, sizeof *s->listen);
	s->n_listen = n;
	for (size_t i = 0; i < n; i++) {
		struct config_listen *l = &s->listen[i];
		const struct cnode *item = seq ? seq->kids[i] : v;
		const char *ip = seq ? at_index(p, path, i) : strcpy(p, path);
		if (item->kind == CNODE_SCALAR) {
			parse_value(ld, &listen_fields[0], item, ip, l);
		} else {
			const struct cnode *m = as_map(ld, item, ip);
			section(ld, m, ip, FIELDS(listen_fields), l);
			const struct cnode *tls = sub_map(ld, m, "tls", ip, tp);
			if (tls != NULL)
				section(ld, tls, tp, FIELDS(tls_fields), l);
		}
		for (size_t j = 0; l->host != NULL && j < i; j++) {
			if (s->listen[j].host != NULL && s->listen[j].port == l->port &&
			    strcmp(s->listen[j].host, l->host) == 0) {
				const struct cnode *at =
				        item->kind == CNODE_MAP ? get(item, "address") : item;
				err(ld, at, ip, "address %s is already listed (%s[%zu])",
				    l->address, path, j);
				break;
			}
		}
	}
}

static void parse_server(struct loader *ld, const struct cnode *m)
{
	char p[PATH_LEN];
	struct config_server *s = &ld->c->server;

	section(ld, m, "server", FIELDS(server_fields), s);
	parse_listen(ld, get(m, "listen"), at_key(p, "server", "listen"), s);
}

static void parse_admin(struct loader *ld, const struct cnode *m)
{
	char p[PATH_LEN];
	struct config_admin *a = &ld->c->admin;

	if (m == NULL)
		return; /* no admin section: no admin listener */
	section(ld, m, "admin", FIELDS(admin_fields), a);
	const struct cnode *k = get(m, "key");
	if (k == NULL)
		return; /* reported by section() */
	const char *key = as_str(ld, k, at_key(p, "admin", "key"));
	if (key == NULL)
		return;
	if (key[0] == '\0')
		err(ld, k, p,
		    "must not be empty (write \"none\" to turn admin authentication off)");
	else if (strcmp(key, "none") != 0)
		a->key = xstrdup(key);
}

static void parse_log(struct loader *ld, const struct cnode *m)
{
	struct config_log *l = &ld->c->log;

	section(ld, m, "log", FIELDS(log_fields), l);
	if (l->access_log != NULL && strcmp(l->access_log, "off") == 0) {
		free(l->access_log);
		l->access_log = NULL;
	}
}

static void parse_store(struct loader *ld, const struct cnode *m)
{
	char p[PATH_LEN];
	struct config_store *s = &ld->c->store;

	section(ld, m, "store", FIELDS(store_fields), s);
	section(ld, sub_map(ld, m, "redis", "store", p), p, FIELDS(redis_fields), s);
	if (s->redis.password != NULL && s->redis.password[0] == '\0') {
		free(s->redis.password);
		s->redis.password = NULL;
	}
}

static void parse_alerts(struct loader *ld, const struct cnode *m)
{
	char p[PATH_LEN], hp[PATH_LEN];
	struct config_alerts *a = &ld->c->alerts;

	section(ld, m, "alerts", FIELDS(alerts_fields), NULL);
	const struct cnode *w = sub_map(ld, m, "webhook", "alerts", p);
	section(ld, w, p, FIELDS(webhook_fields), a);
	a->webhook_headers = parse_kv(ld, get(w, "headers"), at_key(hp, p, "headers"), true,
	                              &a->n_webhook_headers);
}

/* ============================================================================================
 * Instances.
 * ========================================================================================== */

static struct config_instance *find_instance_loaded(const struct config *c, const char *name)
{
	for (size_t i = 0; name != NULL && i < c->n_instances; i++) {
		if (c->instances[i].name != NULL && strcmp(c->instances[i].name, name) == 0)
			return &c->instances[i];
	}
	return NULL;
}

static struct config_route *find_route_loaded(const struct config *c, const char *name)
{
	for (size_t i = 0; name != NULL && i < c->n_routes; i++) {
		if (c->routes[i].name != NULL && strcmp(c->routes[i].name, name) == 0)
			return &c->routes[i];
	}
	return NULL;
}

static const char *hint_instance(char *buf, size_t len, const struct config *c, const char *name)
{
	struct nearest n = {.word = name};
	for (size_t i = 0; i < c->n_instances; i++)
		consider(&n, c->instances[i].name);
	return hint(buf, len, &n);
}

static const char *hint_route(char *buf, size_t len, const struct config *c, const char *name)
{
	struct nearest n = {.word = name};
	for (size_t i = 0; i < c->n_routes; i++)
		consider(&n, c->routes[i].name);
	return hint(buf, len, &n);
}

struct strbuf_local {
	char *s;
	size_t len, cap;
};

static void sb_add(struct strbuf_local *sb, const char *s, size_t n)
{
	if (sb->len + n + 1 > sb->cap) {
		size_t cap = sb->cap ? sb->cap : 128;
		while (cap < sb->len + n + 1)
			cap *= 2;
		char *p = realloc(sb->s, cap);
		if (p == NULL)
			oom();
		sb->s = p;
		sb->cap = cap;
	}
	memcpy(sb->s + sb->len, s, n);
	sb->len += n;
	sb->s[sb->len] = '\0';
}

/* RFC 3986: unreserved characters stay, every other byte is %XX. */
static void url_encode(struct strbuf_local *sb, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	for (; *s != '\0'; s++) {
		unsigned char c = (unsigned char)*s;
		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		    c == '-' || c == '.' || c == '_' || c == '~') {
			sb_add(sb, (const char *)&c, 1);
		} else {
			char esc[3] = {'%', hex[c >> 4], hex[c & 15]};
			sb_add(sb, esc, 3);
		}
	}
}

/* endpoint + auth.query, respecting a query the endpoint already has. */
static char *build_url(const char *endpoint, const struct config_kv *q, size_t n)
{
	struct strbuf_local sb = {0};
	size_t len = strlen(endpoint);

	sb_add(&sb, endpoint, len);
	for (size_t i = 0; i < n; i++) {
		char sep = '&';
		if (i == 0) {
			if (strchr(endpoint, '?') == NULL)
				sep = '?';
			else if (endpoint[len - 1] == '?' || endpoint[len - 1] == '&')
				sep = '\0';
		}
		if (sep != '\0')
			sb_add(&sb, &sep, 1);
		url_encode(&sb, q[i].name);
		sb_add(&sb, "=", 1);
		url_encode(&sb, q[i].value);
	}
	return sb.s;
}

/* "3600000" ms → "1h" for ids. */
static char *limit_id(const struct config_limit *l, const char *owner_kind, const char *owner,
                      bool consumer)
{
	char win[64];
	const char *what_counted = l->requests ? "requests" : config_strategy_name(l->strategy);
	config_format_window(&l->window, win, sizeof win);
	if (!consumer)
		return xasprintf("%s:%s:%s:%s", owner_kind, owner, what_counted, win);
	return xasprintf("%s:%s:%s:%s:%s", owner_kind, owner,
	                 l->instance && l->instance->name ? l->instance->name : "*", what_counted,
	                 win);
}

/* "DIGITS[.DIGITS]" with at most COST_DECIMALS decimals, in micro-units, at most max. No sign,
 * no exponent: what is written is what is counted, without a float's rounding. */
static bool parse_micros(const char *s, uint64_t max, uint64_t *out)
{
	uint64_t v = 0, scale = COST_UNIT, whole_max = max / COST_UNIT;
	const char *p = s;

	if (s == NULL || !(*p >= '0' && *p <= '9'))
		return false;
	for (; *p >= '0' && *p <= '9'; p++) {
		uint64_t d = (uint64_t)(*p - '0');
		if (v > whole_max / 10 || v * 10 + d > whole_max)
			return false; /* the whole part alone is above max */
		v = v * 10 + d;
	}
	v *= COST_UNIT;
	if (*p == '.') {
		p++;
		if (!(*p >= '0' && *p <= '9'))
			return false;
		for (; *p >= '0' && *p <= '9'; p++) {
			if (scale == 1)
				return false; /* more decimals than a micro-unit */
			scale /= 10;
			v += (uint64_t)(*p - '0') * scale;
		}
	}
	if (*p != '\0' || v > max)
		return false;
	*out = v;
	return true;
}

static void parse_price(struct loader *ld, const struct cnode *m, const char *path,
                        struct config_price *pr)
{
	static const char *const keys[] = {"input", "cached_input", "output"};
	uint64_t *dst[] = {&pr->input, &pr->cached_input, &pr->output};
	char kp[PATH_LEN], h[128];

	if (m == NULL)
		return;
	pr->set = true;
	for (size_t i = 0; i < m->n; i++) {
		const struct cnode *k = CNODE_KEY(m, i);
		const char *key = scalar_text(k);
		if (key == NULL || (!k->quoted && strcmp(key, "<<") == 0))
			continue; /* reported by the tree */
		size_t j = 0;
		while (j < ARRAY_LEN(keys) && strcmp(keys[j], key) != 0)
			j++;
		if (j == ARRAY_LEN(keys)) {
			struct nearest near = {.word = key};
			for (size_t x = 0; x < ARRAY_LEN(keys); x++)
				consider(&near, keys[x]);
			err(ld, k, path, "unknown key \"%s\"%s", key, hint(h, sizeof h, &near));
			continue;
		}
		const struct cnode *v = CNODE_VAL(m, i);
		if (get(m, key) != v)
			continue; /* a repeated key is reported by the tree */
		if (!parse_micros(scalar_text(v), PRICE_MAX_MICROS, dst[j]))
			err(ld, v, at_key(kp, path, key),
			    "must be a price per million tokens: a number from 0 to %llu with at "
			    "most "
			    "%d decimals",
			    PRICE_MAX_MICROS / COST_UNIT, COST_DECIMALS);
	}
	for (size_t j = 0; j < ARRAY_LEN(keys); j++)
		if (j != 1 && get(m, keys[j]) == NULL)
			err(ld, m, path, "missing required key \"%s\"", keys[j]);
	if (get(m, "cached_input") == NULL)
		pr->cached_input = pr->input; /* no cache discount known: never under-charge */
}

static bool parse_limit_value(struct loader *ld, const struct cnode *v, const char *path,
                              uint64_t *out)
{
	long long x;
	if (!parse_ll(scalar_text(v), &x) || x < 1 || (unsigned long long)x > LIMIT_MAX) {
		err(ld, v, path, "must be an integer from 1 to %llu", LIMIT_MAX);
		return false;
	}
	*out = (uint64_t)x;
	return true;
}

/* A cost limit counts what the instance's price says: on one instance, that instance needs a
 * price; on all instances (any), at least one must have one, or the limit counts nothing. */
static void cost_needs_price(struct loader *ld, const struct cnode *m, const char *path,
                             const struct config_instance *in, bool any)
{
	if (any) {
		for (size_t i = 0; i < ld->c->n_instances; i++)
			if (ld->c->instances[i].price.set)
				return;
		err(ld, m, path,
		    "strategy cost needs a price: no instance has one (add price: { input, "
		    "cached_input, output } to the instances it should count)");
	} else if (in != NULL && !in->price.set) {
		err(ld, m, path,
		    "strategy cost needs a price: instance \"%s\" has none (add price: { input, "
		    "cached_input, output } to it)",
		    in->name ? in->name : "");
	}
}

/*
 * limits: of an instance (owner_instance set: the limit is that instance's own) or of a
 * consumer (owner_instance NULL: "instance:" optionally names the instance).
 */
static void parse_limits(struct loader *ld, const struct cnode *v, const char *path,
                         struct config_instance *owner_instance, const char *owner_name,
                         struct config_limit **out, size_t *n_out)
{
	char p[PATH_LEN], kp[PATH_LEN], h[128];
	const struct cnode *seq = as_seq(ld, v, path);
	bool consumer = owner_instance == NULL;

	if (seq == NULL || seq->n == 0)
		return;
	*out = xcalloc(seq->n, sizeof **out);
	*n_out = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		struct config_limit *l = &(*out)[i];
		const char *ip = at_index(p, path, i);
		const struct cnode *m = as_map(ld, seq->kids[i], ip);
		const struct cnode *k, *inst, *lim, *req, *win;

		section(ld, m, ip, FIELDS(limit_fields), l);
		if (m == NULL)
			continue;
		inst = ctree_get(m, "instance", &k);
		if (!consumer) {
			l->instance = owner_instance;
			if (inst != NULL)
				err(ld, k, ip,
				    "key \"instance\" is not allowed in an instance's limits: they "
				    "apply "
				    "to the instance itself");
		} else if (inst != NULL) {
			const char *name = as_str(ld, inst, at_key(kp, ip, "instance"));
			if (name != NULL) {
				l->instance = find_instance_loaded(ld->c, name);
				if (l->instance == NULL)
					err(ld, inst, kp, "unknown instance \"%s\"%s", name,
					    hint_instance(h, sizeof h, ld->c, name));
			}
		}
		lim = get(m, "limit");
		req = ctree_get(m, "requests", &k);
		if (lim != NULL && req != NULL) {
			err(ld, k, ip,
			    "\"limit\" (tokens) and \"requests\" cannot be combined: write one "
			    "entry "
			    "for each");
		} else if (lim == NULL && req == NULL) {
			err(ld, m, ip, "missing required key \"limit\" (tokens) or \"requests\"");
		} else if (lim != NULL && l->strategy == LIMIT_COST) {
			if (!parse_micros(scalar_text(lim), LIMIT_MAX, &l->tokens) ||
			    l->tokens == 0)
				err(ld, lim, at_key(kp, ip, "limit"),
				    "must be a cost in price units: a number from 0.000001 to "
				    "%llu.%06llu with at most %d decimals",
				    LIMIT_MAX / COST_UNIT, LIMIT_MAX % COST_UNIT, COST_DECIMALS);
			cost_needs_price(ld, m, ip, l->instance, consumer && inst == NULL);
		} else if (lim != NULL) {
			(void)parse_limit_value(ld, lim, at_key(kp, ip, "limit"), &l->tokens);
		} else {
			(void)parse_limit_value(ld, req, at_key(kp, ip, "requests"), &l->requests);
			if (ctree_get(m, "strategy", &k) != NULL)
				err(ld, k, ip,
				    "\"strategy\" applies to token limits (limit:), not to "
				    "requests:");
		}
		win = get(m, "window");
		at_key(kp, ip, "window");
		if (win != NULL) {
			const char *s = scalar_text(win);
			if (s == NULL || !config_parse_window(s, &l->window))
				err(ld, win, kp,
				    "invalid window \"%s\": use a duration such as 30s, 1h, 1d, "
				    "1w, or "
				    "calendar months such as 1mo",
				    s ? s : what(win));
			else if (l->type == LIMIT_SLIDING && l->window.months != 0)
				err(ld, win, kp,
				    "a sliding window must be a duration, not calendar months");
		}
		if (l->tokens == 0 && l->requests == 0)
			continue;
		if (l->window.ms == 0 && l->window.months == 0)
			continue;
		if (consumer && inst != NULL && l->instance == NULL)
			continue;
		l->id = limit_id(l, consumer ? "consumer" : "instance",
		                 owner_name ? owner_name : "", consumer);
		for (size_t j = 0; j < i; j++) {
			if ((*out)[j].id != NULL && strcmp((*out)[j].id, l->id) == 0) {
				err(ld, m, ip, "counts the same thing as %s[%zu] (%s): merge them",
				    path, j, l->id);
				break;
			}
		}
	}
}

static void parse_active(struct loader *ld, const struct cnode *m, const char *path,
                         struct config_instance *in)
{
	char p[PATH_LEN];
	struct config_active_check *a = &in->active;

	section(ld, m, path, FIELDS(active_fields), a);
	section(ld, sub_map(ld, m, "healthy", path, p), p, FIELDS(active_healthy_fields), a);
	section(ld, sub_map(ld, m, "unhealthy", path, p), p, FIELDS(active_unhealthy_fields), a);
	if (m == NULL)
		a->enabled = false;
	if (in->endpoint == NULL)
		return;
	char *hostport = NULL;
	bool https = false;
	if (url_problem(in->endpoint, &hostport, &https) != NULL)
		return;
	if (get(m, "type") == NULL && https)
		a->type = CHECK_HTTPS;
	if (a->host == NULL)
		a->host = hostport;
	else
		free(hostport);
}

static void parse_passive(struct loader *ld, const struct cnode *v, const char *path,
                          struct config_passive_check *pc)
{
	char p[PATH_LEN];
	const struct cnode *m = NULL;

	if (v != NULL && v->kind == CNODE_SCALAR)
		err(ld, v, path,
		    "must be a mapping; to turn passive checks off write \"passive: { enabled: "
		    "false }\"");
	else
		m = as_map(ld, v, path);
	section(ld, m, path, FIELDS(passive_fields), pc);
	section(ld, sub_map(ld, m, "unhealthy", path, p), p, FIELDS(passive_unhealthy_fields), pc);
}

static void parse_instance(struct loader *ld, const struct cnode *m, const char *path,
                           struct config_instance *in)
{
	char p[PATH_LEN], p2[PATH_LEN];

	section(ld, m, path, FIELDS(instance_fields), in);

	const struct cnode *am = sub_map(ld, m, "auth", path, p);
	section(ld, am, p, FIELDS(auth_fields), NULL);
	in->auth_headers =
	        parse_kv(ld, get(am, "header"), at_key(p2, p, "header"), true, &in->n_auth_headers);
	in->auth_query =
	        parse_kv(ld, get(am, "query"), at_key(p2, p, "query"), false, &in->n_auth_query);

	const struct cnode *opt = sub_map(ld, m, "options", path, p);
	if (opt != NULL)
		in->options = to_json(ld, opt, p);

	section(ld, sub_map(ld, m, "timeouts", path, p), p, FIELDS(timeouts_fields), in);
	section(ld, sub_map(ld, m, "keepalive", path, p), p, FIELDS(keepalive_fields), in);
	section(ld, sub_map(ld, m, "load", path, p), p, FIELDS(load_fields), in);

	const struct provider_ops *ops = provider_ops(in->provider);
	if (in->endpoint == NULL && get(m, "endpoint") == NULL && ops != NULL) {
		if (ops->default_endpoint != NULL)
			in->endpoint = xstrdup(ops->default_endpoint);
		else if (get(m, "provider") != NULL)
			err(ld, m, path,
			    "missing required key \"endpoint\" (provider %s has no default "
			    "endpoint)",
			    ops->name);
	}
	if (in->endpoint != NULL)
		in->url = build_url(in->endpoint, in->auth_query, in->n_auth_query);
	if (in->responses_endpoint != NULL) {
		if (ops != NULL && ops->upstream != PROTO_CHAT)
			err(ld, get(m, "responses_endpoint"), at_key(p, path, "responses_endpoint"),
			    "provider %s does not serve the Responses API", ops->name);
		in->responses_url =
		        build_url(in->responses_endpoint, in->auth_query, in->n_auth_query);
	}
	/* The provider's own rules, once endpoint and auth are known (an azure deployment URL
	 * needs an api-version, ...). */
	char why[256];
	if (in->url != NULL && ops != NULL && ops->check_instance != NULL &&
	    !ops->check_instance(in, why, sizeof why))
		err(ld, get(m, "endpoint") ? get(m, "endpoint") : m, path, "%s", why);

	/* before the limits: a cost limit needs the price */
	parse_price(ld, sub_map(ld, m, "price", path, p), p, &in->price);
	parse_limits(ld, get(m, "limits"), at_key(p, path, "limits"), in, in->name, &in->limits,
	             &in->n_limits);
	if (in->n_limits > CONFIG_MAX_LIMITS)
		err(ld, get(m, "limits"), at_key(p, path, "limits"),
		    "at most %d limits per instance (found %zu)", CONFIG_MAX_LIMITS, in->n_limits);

	const struct cnode *cm = sub_map(ld, m, "checks", path, p);
	section(ld, cm, p, FIELDS(checks_fields), NULL);
	parse_active(ld, sub_map(ld, cm, "active", p, p2), p2, in);
	parse_passive(ld, get(cm, "passive"), at_key(p2, p, "passive"), &in->passive);
}

/* ============================================================================================
 * Unique names: instances, routes, consumers.
 * ========================================================================================== */

struct named {
	const char *name;
	size_t index;
	const struct cnode *node;
};

static int named_cmp(const void *a, const void *b)
{
	const struct named *x = a, *y = b;
	int r = strcmp(x->name, y->name);
	if (r != 0)
		return r;
	return x->index < y->index ? -1 : x->index > y->index;
}

/* Reports every repeated name of a list at list[i].name, pointing at the first. */
static void check_unique_names(struct loader *ld, const struct cnode *seq, const char *list,
                               const char *kind)
{
	char p[PATH_LEN], ip[PATH_LEN];
	struct named *v;
	size_t n = 0;

	if (seq == NULL || seq->kind != CNODE_SEQ || seq->n < 2)
		return;
	v = xcalloc(seq->n, sizeof *v);
	for (size_t i = 0; i < seq->n; i++) {
		const struct cnode *name = get(seq->kids[i], "name");
		if (name != NULL && scalar_text(name) != NULL)
			v[n++] = (struct named){scalar_text(name), i, name};
	}
	qsort(v, n, sizeof *v, named_cmp);
	for (size_t i = 1, first = 0; i < n; i++) {
		if (strcmp(v[i].name, v[first].name) != 0) {
			first = i;
			continue;
		}
		err(ld, v[i].node, at_key(p, at_index(ip, list, v[i].index), "name"),
		    "duplicate %s name \"%s\" (first defined at line %u, column %u)", kind,
		    v[i].name, v[first].node->line, v[first].node->col);
	}
	free(v);
}

static void parse_instances(struct loader *ld, const struct cnode *v)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, "instances");
	struct config *c = ld->c;

	if (seq == NULL || seq->n == 0)
		return;
	c->instances = xcalloc(seq->n, sizeof *c->instances);
	c->n_instances = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, "instances", i);
		c->instances[i].index = i;
		parse_instance(ld, as_map(ld, seq->kids[i], ip), ip, &c->instances[i]);
	}
	check_unique_names(ld, seq, "instances", "instance");
}

/* ============================================================================================
 * Routes and their plugins.
 * ========================================================================================== */

/* A route's plugins, in order: each `- name: {...}` goes to its policy's conf_parse
 * (src/policy/), which reports its own errors through ld->sec and returns its compiled state. */
static void parse_plugins(struct loader *ld, const struct cnode *v, const char *path,
                          struct config_route *r)
{
	char p[PATH_LEN], cp[PATH_LEN], h[128];
	const struct cnode *seq = as_seq(ld, v, path);

	if (seq == NULL || seq->n == 0)
		return;
	r->plugins = xcalloc(seq->n, sizeof *r->plugins);
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const struct cnode *item = seq->kids[i];
		if (item->kind != CNODE_MAP || item->n != 1) {
			err(ld, item, ip,
			    "must be a mapping with one key, the plugin's name (\"- prompt_guard: "
			    "{ "
			    "... }\")");
			continue;
		}
		const struct cnode *k = CNODE_KEY(item, 0), *conf = CNODE_VAL(item, 0);
		const char *name = scalar_text(k);
		if (name == NULL)
			continue;
		const struct policy_def *def = policy_find(name);
		if (def == NULL) {
			struct nearest near = {.word = name};
			for (size_t j = 0; policy_at(j) != NULL; j++)
				consider(&near, policy_at(j)->name);
			err(ld, k, ip, "unknown plugin \"%s\"%s", name, hint(h, sizeof h, &near));
			continue;
		}
		/* Once per route: against the entries written before, even those refused. */
		bool repeated = false;
		for (size_t j = 0; def->conf_label == NULL && j < i; j++) {
			const struct cnode *prev = seq->kids[j];
			const char *pn = prev->kind == CNODE_MAP && prev->n == 1
			                         ? scalar_text(CNODE_KEY(prev, 0))
			                         : NULL;
			if (pn != NULL && strcmp(pn, name) == 0) {
				err(ld, k, ip, "plugin %s is already configured on this route",
				    name);
				repeated = true;
				break;
			}
		}
		if (repeated)
			continue;
		at_key(cp, ip, name);
		const struct cnode *m = NULL;
		if (!(conf->kind == CNODE_SCALAR && conf->null)) { /* "- loop_guard:" = defaults */
			m = as_map(ld, conf, cp);
			if (m == NULL)
				continue;
		}
		size_t failed = ld->n_failed;
		ld->sec.at = k;
		void *pc = def->conf_parse(&ld->sec, m, cp);
		ld->sec.at = NULL;
		if (pc == NULL) {
			/* a policy must say why: never drop one silently */
			if (ld->n_failed == failed)
				err(ld, k, ip, "plugin %s could not be configured", name);
			continue;
		}
		/* An external plugin is known by its own name: one of each per route too. */
		const char *label = def->conf_label ? def->conf_label(pc) : def->name;
		for (size_t j = 0; def->conf_label != NULL && j < r->n_plugins; j++) {
			if (strcmp(r->plugins[j].name, label) == 0) {
				err(ld, k, ip, "plugin %s is already configured on this route",
				    label);
				repeated = true;
				break;
			}
		}
		if (repeated) {
			def->conf_free(pc);
			continue;
		}
		struct config_plugin *pl = &r->plugins[r->n_plugins++];
		pl->name = xstrdup(label);
		pl->def = def;
		pl->conf = pc;
		pl->phases = def->conf_phases ? def->conf_phases(pc) : def->phases;
		r->plugin_phases |= pl->phases;
	}
}

static unsigned trigger_bits(struct loader *ld, const struct cnode *v, const char *path)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, path);
	unsigned bits = 0;

	for (size_t i = 0; seq != NULL && i < seq->n; i++) {
		int t;
		if (parse_enum(ld, seq->kids[i], at_index(p, path, i), trigger_names, &t))
			bits |= 1u << t;
	}
	return bits;
}

static bool models_overlap(const struct config_route *a, const struct config_route *b)
{
	if (a->n_models == 0 && b->n_models == 0)
		return true;
	for (size_t i = 0; i < a->n_models; i++) {
		for (size_t j = 0; j < b->n_models; j++) {
			if (strcmp(a->models[i], b->models[j]) == 0)
				return true;
		}
	}
	return false;
}

static void parse_targets(struct loader *ld, const struct cnode *v, const char *path,
                          struct config_route *r)
{
	char p[PATH_LEN], kp[PATH_LEN], h[128];
	const struct cnode *seq = as_seq(ld, v, path);

	if (seq == NULL)
		return;
	if (seq->n == 0) {
		err(ld, seq, path, "must list at least one target");
		return;
	}
	r->targets = xcalloc(seq->n, sizeof *r->targets);
	r->n_targets = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		struct config_target *t = &r->targets[i];
		const char *ip = at_index(p, path, i);
		const struct cnode *m = as_map(ld, seq->kids[i], ip);
		section(ld, m, ip, FIELDS(target_fields), t);
		const struct cnode *iv = get(m, "instance");
		const char *name = iv ? as_str(ld, iv, at_key(kp, ip, "instance")) : NULL;
		if (name == NULL)
			continue;
		t->instance = find_instance_loaded(ld->c, name);
		if (t->instance == NULL) {
			err(ld, iv, kp, "unknown instance \"%s\"%s", name,
			    hint_instance(h, sizeof h, ld->c, name));
			continue;
		}
		/* load balancing ranks by the model server's own metrics: a target
		 * without them would never be picked while the others report. */
		if (r->balancer.algorithm == BALANCER_LOAD && t->instance->load.metrics_url == NULL)
			err(ld, iv, kp,
			    "balancer \"load\" needs instance \"%s\" to set load.metrics_url", name);
		for (size_t j = 0; j < i; j++) {
			if (r->targets[j].instance == t->instance) {
				err(ld, iv, kp,
				    "instance \"%s\" is already a target of this route (%s[%zu])",
				    name, path, j);
				break;
			}
		}
	}
	/* highest priority first; stable, so equal priorities keep their written order */
	for (size_t i = 1; i < r->n_targets; i++) {
		struct config_target t = r->targets[i];
		size_t j = i;
		while (j > 0 && r->targets[j - 1].priority < t.priority) {
			r->targets[j] = r->targets[j - 1];
			j--;
		}
		r->targets[j] = t;
	}
}

/*
 * What the route's paths ask of its targets (docs/providers.md): every target must be able to
 * serve the protocol of every path — an Anthropic instance takes no legacy completions or
 * embeddings — except count_tokens, which the gateway answers itself for instances that
 * cannot (its estimate). Response policies read the output text through the pivot, which
 * chat, Messages and Responses have: a path of another protocol would let its output past
 * them, so such a route is refused rather than half guarded.
 */
static void check_route_protocols(struct loader *ld, const struct cnode *m, const char *path,
                                  struct config_route *r)
{
	char p[PATH_LEN], tp[PATH_LEN];
	const struct cnode *targets = get(m, "targets");

	for (size_t i = 0; i < r->n_paths; i++) {
		enum proto proto = proto_of_path(r->paths[i], strlen(r->paths[i]));
		if ((r->plugin_phases & POLICY_PHASE_RESPONSE) && proto_codec(proto) == NULL)
			err(ld, get(m, "plugins"), at_key(p, path, "plugins"),
			    "response policies need chat, messages or responses paths; path \"%s\" "
			    "speaks %s, whose output they cannot read",
			    r->paths[i], proto_name(proto));
		if (proto == PROTO_COUNT_TOKENS || targets == NULL || targets->kind != CNODE_SEQ ||
		    targets->n != r->n_targets)
			continue;
		for (size_t t = 0; t < r->n_targets; t++) {
			const struct config_instance *in = r->targets[t].instance;
			const char *url;
			if (in == NULL || provider_upstream_proto(in, proto, &url) != PROTO__COUNT)
				continue;
			/* targets are sorted by priority: find the written entry for the message */
			for (size_t k = 0; k < targets->n; k++) {
				const struct cnode *iv = get(targets->kids[k], "instance");
				if (iv == NULL || scalar_text(iv) == NULL ||
				    strcmp(scalar_text(iv), in->name) != 0)
					continue;
				err(ld, iv, at_key(tp, at_index(p, at_key(tp, path, "targets"), k),
				                   "instance"),
				    "instance \"%s\" (provider %s) cannot serve path \"%s\" (%s)",
				    in->name, config_provider_name(in->provider), r->paths[i],
				    proto_name(proto));
			}
		}
	}
}

static void mcp_report(void *arg, const struct cnode *at, const char *path, const char *msg)
{
	err(arg, at, path, "%s", msg);
}

/* The keys that depend on the route's type. false: an mcp route, fully parsed here. */
static bool route_kind_keys(struct loader *ld, const struct cnode *m, const char *path,
                            struct config_route *r)
{
	static const char *const llm_only[] = {"models", "balancer", "fallback", "targets"};
	const struct cnode *k;
	char pp[PATH_LEN];

	if (r->type != ROUTE_TYPE_MCP) {
		if (ctree_get(m, "mcp", &k) != NULL)
			err(ld, k, path, "key \"mcp\" needs type: mcp");
		if (get(m, "targets") == NULL)
			err(ld, m, path, "missing required key \"targets\"");
		return true;
	}
	for (size_t i = 0; i < ARRAY_LEN(llm_only); i++)
		if (ctree_get(m, llm_only[i], &k) != NULL)
			err(ld, k, path, "key \"%s\" does not apply to a route with type: mcp",
			    llm_only[i]);
	if (get(m, "mcp") == NULL)
		err(ld, m, path, "missing required key \"mcp\" (mcp: { servers: [...] })");
	struct mcp_conf_ctx ctx = {mcp_report, ld, ld->c};
	mcp_config_route(&ctx, get(m, "mcp"), path, r);
	/* plugins: request policies over tool arguments (mcp_config.c says which apply) */
	parse_plugins(ld, get(m, "plugins"), at_key(pp, path, "plugins"), r);
	mcp_config_plugins(&ctx, get(m, "plugins"), pp, r);
	/* paths: another route (any type) may not serve the same path */
	const struct cnode *paths = get(m, "paths");
	for (size_t i = 0; paths != NULL && paths->kind == CNODE_SEQ && paths->n == r->n_paths &&
	                   i < r->n_paths;
	     i++)
		for (size_t q = 0; q < r->index; q++)
			for (size_t j = 0; j < ld->c->routes[q].n_paths; j++)
				if (strcmp(ld->c->routes[q].paths[j], r->paths[i]) == 0) {
					char p[PATH_LEN], ip[PATH_LEN];
					err(ld, paths->kids[i],
					    at_index(ip, at_key(p, path, "paths"), i),
					    "path \"%s\" is already served by route \"%s\"",
					    r->paths[i], ld->c->routes[q].name ? ld->c->routes[q].name : "");
				}
	return false;
}

static void parse_route(struct loader *ld, const struct cnode *m, const char *path,
                        struct config_route *r)
{
	char p[PATH_LEN], ip[PATH_LEN];

	section(ld, m, path, FIELDS(route_fields), r);
	if (get(m, "auth") == NULL)
		r->auth = ld->consumers_declared ? ROUTE_AUTH_KEY : ROUTE_AUTH_NONE;
	if (m != NULL && !route_kind_keys(ld, m, path, r))
		return;

	const struct cnode *bm = sub_map(ld, m, "balancer", path, p);
	section(ld, bm, p, FIELDS(balancer_fields), r);
	if (r->balancer.hash_on == HASH_ON_HEADER && r->balancer.key == NULL && bm != NULL)
		err(ld, get(bm, "hash_on"), at_key(ip, p, "hash_on"),
		    "hash_on: header needs \"key\", the header to hash on");

	const struct cnode *fm = sub_map(ld, m, "fallback", path, p);
	section(ld, fm, p, FIELDS(fallback_fields), r);
	r->fallback.on = FALLBACK_ALL;
	if (get(fm, "on") != NULL)
		r->fallback.on = trigger_bits(ld, get(fm, "on"), at_key(ip, p, "on"));

	parse_targets(ld, get(m, "targets"), at_key(p, path, "targets"), r);
	parse_plugins(ld, get(m, "plugins"), at_key(p, path, "plugins"), r);
	check_route_protocols(ld, m, path, r);

	/* paths: no repeats in the route, no other route for the same path and models */
	const struct cnode *paths = get(m, "paths");
	if (paths == NULL || paths->kind != CNODE_SEQ || paths->n != r->n_paths)
		return;
	for (size_t i = 0; i < r->n_paths; i++) {
		const char *pp = at_index(ip, at_key(p, path, "paths"), i);
		bool reported = false;
		for (size_t j = 0; j < i && !reported; j++) {
			if (strcmp(r->paths[i], r->paths[j]) == 0) {
				err(ld, paths->kids[i], pp, "path \"%s\" is listed twice",
				    r->paths[i]);
				reported = true;
			}
		}
		for (size_t q = 0; q < r->index && !reported; q++) {
			const struct config_route *o = &ld->c->routes[q];
			for (size_t j = 0; j < o->n_paths; j++) {
				if (strcmp(o->paths[j], r->paths[i]) == 0 &&
				    (models_overlap(o, r) || o->type == ROUTE_TYPE_MCP)) {
					err(ld, paths->kids[i], pp,
					    "path \"%s\" is already served by route \"%s\" for the "
					    "same "
					    "models",
					    r->paths[i], o->name ? o->name : "");
					reported = true;
					break;
				}
			}
		}
	}
}

static void parse_routes(struct loader *ld, const struct cnode *v)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, "routes");
	struct config *c = ld->c;

	if (seq == NULL || seq->n == 0)
		return;
	c->routes = xcalloc(seq->n, sizeof *c->routes);
	c->n_routes = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, "routes", i);
		c->routes[i].index = i;
		parse_route(ld, as_map(ld, seq->kids[i], ip), ip, &c->routes[i]);
	}
	check_unique_names(ld, seq, "routes", "route");
}

/* ============================================================================================
 * Consumers.
 * ========================================================================================== */

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static void sha256(const void *data, size_t len, unsigned char out[32])
{
	unsigned int n = 32;
	if (!EVP_Digest(data, len, out, &n, EVP_sha256(), NULL))
		oom(); /* only fails when OpenSSL cannot allocate */
}

static void hex_encode(const unsigned char *in, size_t n, char *out)
{
	static const char hex[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = hex[in[i] >> 4];
		out[2 * i + 1] = hex[in[i] & 15];
	}
	out[2 * n] = '\0';
}

static void remember_key(struct loader *ld, const unsigned char sha[32], size_t consumer,
                         const struct cnode *node)
{
	if (ld->n_keys == ld->cap_keys) {
		size_t cap = ld->cap_keys ? 2 * ld->cap_keys : 16;
		struct key_ref *k = realloc(ld->keys, cap * sizeof *k);
		if (k == NULL)
			oom();
		ld->keys = k;
		ld->cap_keys = cap;
	}
	struct key_ref *k = &ld->keys[ld->n_keys++];
	memcpy(k->sha256, sha, 32);
	k->consumer = consumer;
	k->node = node;
}

static void parse_keys(struct loader *ld, const struct cnode *v, const char *path,
                       struct config_consumer *cs)
{
	char p[PATH_LEN];
	static const char prefix[] = "sha256:";
	const struct cnode *seq = as_seq(ld, v, path);

	if (seq == NULL)
		return;
	if (seq->n == 0) {
		err(ld, seq, path, "must list at least one key");
		return;
	}
	cs->keys = xcalloc(seq->n, sizeof *cs->keys);
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const char *key = as_str(ld, seq->kids[i], ip);
		struct config_consumer_key *k = &cs->keys[cs->n_keys];
		if (key == NULL)
			continue;
		if (key[0] == '\0') {
			err(ld, seq->kids[i], ip, "must not be empty");
			continue;
		}
		if (strncmp(key, prefix, sizeof prefix - 1) == 0) {
			const char *hex = key + sizeof prefix - 1;
			bool ok = strlen(hex) == 64;
			for (size_t j = 0; ok && j < 32; j++) {
				int hi = hexval(hex[2 * j]), lo = hexval(hex[2 * j + 1]);
				ok = hi >= 0 && lo >= 0;
				if (ok)
					k->sha256[j] = (unsigned char)(hi << 4 | lo);
			}
			if (!ok) {
				err(ld, seq->kids[i], ip,
				    "a hashed key must be \"sha256:\" followed by 64 hex digits");
				continue;
			}
		} else {
			sha256(key, strlen(key), k->sha256);
		}
		char hex[65];
		hex_encode(k->sha256, 32, hex);
		memcpy(k->fingerprint, hex, 12);
		k->fingerprint[12] = '\0';
		remember_key(ld, k->sha256, cs->index, seq->kids[i]);
		cs->n_keys++;
	}
}

static int key_ref_cmp(const void *a, const void *b)
{
	const struct key_ref *x = a, *y = b;
	int r = memcmp(x->sha256, y->sha256, 32);
	if (r != 0)
		return r;
	if (x->node->line != y->node->line)
		return x->node->line < y->node->line ? -1 : 1;
	return x->node->col < y->node->col ? -1 : x->node->col > y->node->col;
}

/* A key shared by two consumers (or listed twice) would make authentication ambiguous. The
 * message shows the fingerprint, never the key. */
static void check_unique_keys(struct loader *ld, const struct cnode *seq)
{
	char p[PATH_LEN], ip[PATH_LEN], kp[PATH_LEN];

	if (ld->n_keys < 2)
		return;
	qsort(ld->keys, ld->n_keys, sizeof *ld->keys, key_ref_cmp);
	for (size_t i = 1, first = 0; i < ld->n_keys; i++) {
		const struct key_ref *k = &ld->keys[i], *f = &ld->keys[first];
		if (memcmp(k->sha256, f->sha256, 32) != 0) {
			first = i;
			continue;
		}
		const struct config_consumer *owner = &ld->c->consumers[f->consumer];
		char hex[65];
		hex_encode(k->sha256, 6, hex);
		/* the path of this key: find its index in its consumer's list */
		const struct cnode *keys = get(seq->kids[k->consumer], "keys");
		size_t idx = 0;
		for (size_t j = 0; keys != NULL && j < keys->n; j++) {
			if (keys->kids[j] == k->node)
				idx = j;
		}
		at_index(kp, at_key(p, at_index(ip, "consumers", k->consumer), "keys"), idx);
		if (k->consumer == f->consumer)
			err(ld, k->node, kp,
			    "key %s... is listed twice (first at line %u, column %u)", hex,
			    f->node->line, f->node->col);
		else
			err(ld, k->node, kp,
			    "key %s... is already used by consumer \"%s\" (line %u, column %u)",
			    hex, owner->name ? owner->name : "", f->node->line, f->node->col);
	}
}

static void parse_consumer_routes(struct loader *ld, const struct cnode *v, const char *path,
                                  struct config_consumer *cs)
{
	char p[PATH_LEN], h[128];
	const struct cnode *seq = as_seq(ld, v, path);

	if (seq == NULL || seq->n == 0)
		return;
	cs->routes = xcalloc(seq->n, sizeof *cs->routes);
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const char *name = as_str(ld, seq->kids[i], ip);
		if (name == NULL)
			continue;
		struct config_route *r = find_route_loaded(ld->c, name);
		if (r == NULL) {
			err(ld, seq->kids[i], ip, "unknown route \"%s\"%s", name,
			    hint_route(h, sizeof h, ld->c, name));
			continue;
		}
		bool repeated = false;
		for (size_t j = 0; j < cs->n_routes; j++)
			repeated = repeated || cs->routes[j] == r;
		if (repeated) {
			err(ld, seq->kids[i], ip, "route \"%s\" is listed twice", name);
			continue;
		}
		cs->routes[cs->n_routes++] = r;
	}
}

static void parse_consumers(struct loader *ld, const struct cnode *v)
{
	char p[PATH_LEN], kp[PATH_LEN];
	const struct cnode *seq = as_seq(ld, v, "consumers");
	struct config *c = ld->c;

	if (seq == NULL || seq->n == 0)
		return;
	c->consumers = xcalloc(seq->n, sizeof *c->consumers);
	c->n_consumers = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		struct config_consumer *cs = &c->consumers[i];
		const char *ip = at_index(p, "consumers", i);
		const struct cnode *m = as_map(ld, seq->kids[i], ip);
		cs->index = i;
		section(ld, m, ip, FIELDS(consumer_fields), cs);
		parse_keys(ld, get(m, "keys"), at_key(kp, ip, "keys"), cs);
		parse_consumer_routes(ld, get(m, "routes"), at_key(kp, ip, "routes"), cs);
		parse_limits(ld, get(m, "limits"), at_key(kp, ip, "limits"), NULL, cs->name,
		             &cs->limits, &cs->n_limits);
		if (cs->n_limits > CONFIG_MAX_LIMITS)
			err(ld, get(m, "limits"), at_key(kp, ip, "limits"),
			    "at most %d limits per consumer (found %zu)", CONFIG_MAX_LIMITS,
			    cs->n_limits);
		struct mcp_conf_ctx ctx = {mcp_report, ld, ld->c};
		mcp_config_consumer(&ctx, get(m, "mcp_tools"), at_key(kp, ip, "mcp_tools"), cs);
	}
	check_unique_names(ld, seq, "consumers", "consumer");
	check_unique_keys(ld, seq);
}

/* ============================================================================================
 * Freeing, loading, references, lookups.
 * ========================================================================================== */

static void free_limits(struct config_limit *l, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(l[i].id);
	free(l);
}

static void free_instance(struct config_instance *in)
{
	free(in->name);
	free(in->endpoint);
	free(in->url);
	free(in->responses_endpoint);
	free(in->responses_url);
	free(in->model);
	json_decref(in->options);
	free_kv(in->auth_headers, in->n_auth_headers);
	free_kv(in->auth_query, in->n_auth_query);
	free_limits(in->limits, in->n_limits);
	free(in->active.http_method);
	free(in->active.http_path);
	free(in->active.host);
	free(in->active.http_req_body);
	free_strv(in->active.req_headers, in->active.n_req_headers);
	free(in->active.healthy.http_statuses);
	free(in->active.unhealthy.http_statuses);
	free(in->passive.http_statuses);
	free(in->load.metrics_url);
}

static void free_route(struct config_route *r)
{
	free(r->name);
	free_strv(r->paths, r->n_paths);
	free_strv(r->models, r->n_models);
	free_strv(r->key_headers, r->n_key_headers);
	free(r->balancer.key);
	free(r->fallback.http_statuses);
	for (size_t i = 0; i < r->n_targets; i++)
		free(r->targets[i].model);
	free(r->targets);
	for (size_t i = 0; i < r->n_plugins; i++) {
		free(r->plugins[i].name);
		r->plugins[i].def->conf_free(r->plugins[i].conf);
	}
	free(r->plugins);
	mcp_config_free_route(r->mcp);
}

static void free_consumer(struct config_consumer *cs)
{
	free(cs->name);
	free(cs->keys);
	free(cs->routes);
	free_limits(cs->limits, cs->n_limits);
	free(cs->rejected_msg);
	mcp_config_free_consumer(cs->mcp);
}

static void config_free(struct config *c)
{
	for (size_t i = 0; i < c->server.n_listen; i++) {
		free(c->server.listen[i].address);
		free(c->server.listen[i].host);
		free(c->server.listen[i].tls_cert);
		free(c->server.listen[i].tls_key);
	}
	free(c->server.listen);
	free(c->admin.address);
	free(c->admin.host);
	free(c->admin.key);
	free(c->log.error_log);
	free(c->log.access_log);
	free(c->store.redis.address);
	free(c->store.redis.host);
	free(c->store.redis.password);
	free(c->store.redis.prefix);
	free(c->alerts.webhook_url);
	free_kv(c->alerts.webhook_headers, c->alerts.n_webhook_headers);
	for (size_t i = 0; i < c->n_instances; i++)
		free_instance(&c->instances[i]);
	free(c->instances);
	for (size_t i = 0; i < c->n_consumers; i++)
		free_consumer(&c->consumers[i]);
	free(c->consumers);
	for (size_t i = 0; i < c->n_routes; i++)
		free_route(&c->routes[i]);
	free(c->routes);
	mcp_config_free(c->mcp);
	free(c->path);
	free(c);
}

static void build(struct loader *ld, const struct cnode *root)
{
	char p[PATH_LEN];
	const struct cnode *consumers = get(root, "consumers");

	section(ld, root, "", FIELDS(top_fields), NULL);
	parse_server(ld, sub_map(ld, root, "server", "", p));
	parse_admin(ld, sub_map(ld, root, "admin", "", p));
	parse_log(ld, sub_map(ld, root, "log", "", p));
	parse_store(ld, sub_map(ld, root, "store", "", p));
	parse_alerts(ld, sub_map(ld, root, "alerts", "", p));
	ld->consumers_declared =
	        consumers != NULL && consumers->kind == CNODE_SEQ && consumers->n > 0;
	/* instances first: routes and consumers point at them; routes before consumers, whose
	 * allow-lists point at routes */
	parse_instances(ld, get(root, "instances"));
	struct mcp_conf_ctx mctx = {mcp_report, ld, ld->c};
	mcp_config_servers(&mctx, get(root, "mcp_servers"));
	parse_routes(ld, get(root, "routes"));
	parse_consumers(ld, consumers);
}

static struct config *load_text(const char *text, size_t len, const char *name,
                                struct config_errors *errs)
{
	struct loader ld = {.file = name ? name : "<string>"};
	ld.sec.ld = &ld;
	pthread_once(&provider_names_once, provider_names_fill);
	struct config *c = xcalloc(1, sizeof *c);
	unsigned char digest[32];

	if (errs != NULL)
		memset(errs, 0, sizeof *errs);
	atomic_init(&c->refs, 1);
	c->path = xstrdup(ld.file);
	sha256(text, len, digest);
	hex_encode(digest, 32, c->sha256_hex);
	ld.c = c;

	struct cnode *root = ctree_parse(text, len, tree_report, &ld);
	if (root == NULL || (root->kind == CNODE_SCALAR && root->null)) {
		if (ld.n_probs == 0)
			add_problem(&ld, 1, 1,
			            xasprintf("%s:1:1: the configuration is empty", ld.file));
	} else if (root->kind != CNODE_MAP) {
		err(&ld, root, "",
		    "the configuration must be a mapping of sections (server, instances, routes, "
		    "...), not %s",
		    what(root));
	} else {
		build(&ld, root);
	}
	ctree_free(root);
	free(ld.keys);
	if (ld.n_probs > 0) {
		hand_over_problems(&ld, errs);
		config_free(c);
		return NULL;
	}
	free(ld.probs);
	return c;
}

struct config *config_load_string(const char *yaml, size_t len, const char *name,
                                  struct config_errors *errs)
{
	return load_text(yaml, len, name, errs);
}

struct config *config_load(const char *path, struct config_errors *errs)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int saved;

	if (f == NULL)
		goto fail;
	for (;;) {
		if (len == cap) {
			cap = cap ? 2 * cap : 65536;
			if (cap > CONFIG_MAX_FILE_SIZE + 1)
				cap = CONFIG_MAX_FILE_SIZE + 1;
			char *p = realloc(buf, cap);
			if (p == NULL)
				oom();
			buf = p;
		}
		size_t got = fread(buf + len, 1, cap - len, f);
		len += got;
		if (got == 0 || len > CONFIG_MAX_FILE_SIZE)
			break;
	}
	if (ferror(f))
		goto fail;
	fclose(f);
	f = NULL;
	if (len > CONFIG_MAX_FILE_SIZE) {
		free(buf);
		if (errs != NULL) {
			memset(errs, 0, sizeof *errs);
			errs->msgs[errs->n++] =
			        xasprintf("%s: the file is larger than %llu bytes", path,
			                  (unsigned long long)CONFIG_MAX_FILE_SIZE);
		}
		return NULL;
	}
	struct config *c = load_text(buf ? buf : "", len, path, errs);
	free(buf);
	return c;
fail:
	saved = errno;
	if (f != NULL)
		fclose(f);
	free(buf);
	if (errs != NULL) {
		memset(errs, 0, sizeof *errs);
		errs->msgs[errs->n++] = xasprintf("%s: cannot read: %s", path, strerror(saved));
	}
	return NULL;
}

void config_errors_free(struct config_errors *errs)
{
	if (errs == NULL)
		return;
	for (size_t i = 0; i < errs->n; i++)
		free(errs->msgs[i]);
	errs->n = 0;
	errs->dropped = 0;
}

struct config *config_ref(struct config *c)
{
	if (c != NULL)
		atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
	return c;
}

void config_unref(struct config *c)
{
	if (c != NULL && atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
		config_free(c);
}

static const char *name_of(const char *const *names, size_t n, unsigned v)
{
	return v < n ? names[v] : NULL;
}

const char *config_provider_name(enum provider p)
{
	const struct provider_ops *ops = provider_ops(p);
	return ops ? ops->name : NULL;
}

const char *config_strategy_name(enum limit_strategy s)
{
	return name_of(strategy_names, ARRAY_LEN(strategy_names) - 1, (unsigned)s);
}

const char *config_limit_type_name(enum limit_type t)
{
	return name_of(limit_type_names, ARRAY_LEN(limit_type_names) - 1, (unsigned)t);
}

const char *config_balancer_name(enum balancer_algorithm a)
{
	return name_of(balancer_names, ARRAY_LEN(balancer_names) - 1, (unsigned)a);
}

const char *config_hash_on_name(enum hash_on h)
{
	return name_of(hash_on_names, ARRAY_LEN(hash_on_names) - 1, (unsigned)h);
}

const char *config_check_type_name(enum check_type t)
{
	return name_of(check_type_names, ARRAY_LEN(check_type_names) - 1, (unsigned)t);
}

const char *config_fallback_trigger_name(enum fallback_trigger t)
{
	for (unsigned i = 0; trigger_names[i] != NULL; i++) {
		if ((unsigned)t == 1u << i)
			return trigger_names[i];
	}
	return NULL;
}

struct config_instance *config_find_instance(const struct config *c, const char *name)
{
	return c ? find_instance_loaded(c, name) : NULL;
}

struct config_consumer *config_find_consumer(const struct config *c, const char *name)
{
	for (size_t i = 0; c != NULL && name != NULL && i < c->n_consumers; i++) {
		if (c->consumers[i].name != NULL && strcmp(c->consumers[i].name, name) == 0)
			return &c->consumers[i];
	}
	return NULL;
}

struct config_route *config_find_route(const struct config *c, const char *name)
{
	return c ? find_route_loaded(c, name) : NULL;
}

/* ============================================================================================
 * config_section.h: the helpers above, for modules that parse their own section (policies).
 * Thin wrappers, so that a module's messages are the loader's.
 * ========================================================================================== */

_Static_assert(CSEC_PATH_LEN == PATH_LEN, "one path length");
_Static_assert((unsigned)CSEC_NONEMPTY == FL_NONEMPTY && (unsigned)CSEC_LOWER == FL_LOWER &&
                       (unsigned)CSEC_NAME == FL_NAME && (unsigned)CSEC_TOKEN == FL_TOKEN &&
                       (unsigned)CSEC_MIN1 == FL_MIN1,
               "csec flags are the loader's");
#define CSEC_FLAGS (FL_NONEMPTY | FL_LOWER | FL_NAME | FL_TOKEN | FL_MIN1)

void csec_error(struct config_section *s, const struct cnode *at, const char *path, const char *fmt,
                ...)
{
	struct loader *ld = s->ld;
	va_list ap;
	ld->n_failed++;
	if (at == NULL)
		at = s->at;
	if (at != NULL && at->unexpanded)
		return;
	va_start(ap, fmt);
	vreport(ld, at ? at->line : 1, at ? at->col : 1, path, fmt, ap);
	va_end(ap);
}

size_t csec_error_count(const struct config_section *s)
{
	return s->ld->n_failed;
}

const char *csec_path_key(char *buf, const char *parent, const char *key)
{
	return at_key(buf, parent, key);
}

const char *csec_path_index(char *buf, const char *parent, size_t i)
{
	return at_index(buf, parent, i);
}

const struct cnode *csec_get(const struct cnode *map, const char *key)
{
	return get(map, key);
}

const struct cnode *csec_map(struct config_section *s, const struct cnode *n, const char *path)
{
	return as_map(s->ld, n, path);
}

const struct cnode *csec_seq(struct config_section *s, const struct cnode *n, const char *path)
{
	return as_seq(s->ld, n, path);
}

bool csec_keys(struct config_section *s, const struct cnode *map, const char *path,
               const char *const *keys, const char *const *required)
{
	struct loader *ld = s->ld;
	size_t failed = ld->n_failed;
	char h[128];

	if (map == NULL)
		return true;
	for (size_t i = 0; i < map->n; i++) {
		const struct cnode *k = CNODE_KEY(map, i);
		const char *key = scalar_text(k);
		if (key == NULL || find_name(keys, key) >= 0)
			continue; /* a non-scalar key is reported by the tree */
		if (!k->quoted && strcmp(key, "<<") == 0)
			continue; /* reported by the tree */
		err(ld, k, path, "unknown key \"%s\"%s", key, hint_names(h, sizeof h, key, keys));
	}
	for (size_t i = 0; required != NULL && required[i] != NULL; i++) {
		if (get(map, required[i]) == NULL)
			err(ld, map, path, "missing required key \"%s\"", required[i]);
	}
	return ld->n_failed == failed;
}

bool csec_int(struct config_section *s, const struct cnode *n, const char *path, long long min,
              long long max, long long *out)
{
	return parse_int(s->ld, n, path, min, max, out);
}

bool csec_number(struct config_section *s, const struct cnode *n, const char *path, double min,
                 double max, double *out)
{
	bool numeric = n->kind == CNODE_SCALAR && !n->quoted && !n->null &&
	               (looks_int(n->str) || looks_float(n->str));
	if (!numeric) {
		err(s->ld, n, path, "must be a number");
		return false;
	}
	double d = strtod(n->str, NULL);
	if (!isfinite(d)) {
		err(s->ld, n, path, "number %s is out of range", n->str);
		return false;
	}
	if (d < min && min == 0 && isinf(max)) {
		err(s->ld, n, path, "must not be negative");
		return false;
	}
	if (d < min || d > max) {
		if (isinf(max))
			err(s->ld, n, path, "must be a number of at least %g", min);
		else
			err(s->ld, n, path, "must be a number from %g to %g", min, max);
		return false;
	}
	*out = d;
	return true;
}

bool csec_bool(struct config_section *s, const struct cnode *n, const char *path, bool *out)
{
	if (!parse_bool(scalar_text(n), out)) {
		err(s->ld, n, path, "must be true or false");
		return false;
	}
	return true;
}

const char *csec_string(struct config_section *s, const struct cnode *n, const char *path,
                        unsigned flags)
{
	const char *v = as_str(s->ld, n, path);
	const char *problem = v ? str_problem(flags & CSEC_FLAGS, v) : NULL;
	if (problem != NULL) {
		err(s->ld, n, path, "%s", problem);
		return NULL;
	}
	return v;
}

bool csec_enum(struct config_section *s, const struct cnode *n, const char *path,
               const char *const *names, int *out)
{
	return parse_enum(s->ld, n, path, names, out);
}

bool csec_name(struct config_section *s, const struct cnode *n, const char *path,
               const char *const *names, const char *word, int *out)
{
	char h[128];
	const char *v = as_str(s->ld, n, path);
	if (v == NULL)
		return false;
	int k = find_name(names, v);
	if (k < 0) {
		err(s->ld, n, path, "unknown %s \"%s\"%s", word, v,
		    hint_names(h, sizeof h, v, names));
		return false;
	}
	*out = k;
	return true;
}

bool csec_enum_bits(struct config_section *s, const struct cnode *n, const char *path,
                    const char *const *names, const char *word, unsigned *bits)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(s->ld, n, path);
	bool ok = seq != NULL;

	*bits = 0;
	for (size_t i = 0; seq != NULL && i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		int k;
		if (word ? csec_name(s, seq->kids[i], ip, names, word, &k)
		         : parse_enum(s->ld, seq->kids[i], ip, names, &k))
			*bits |= k < 32 ? 1u << k : 0;
		else
			ok = false;
	}
	return ok;
}

bool csec_duration(struct config_section *s, const struct cnode *n, const char *path, bool nonzero,
                   uint64_t *ms)
{
	return parse_duration_node(s->ld, n, path, nonzero, ms);
}

bool csec_size(struct config_section *s, const struct cnode *n, const char *path, bool nonzero,
               uint64_t *bytes)
{
	return parse_size_node(s->ld, n, path, nonzero, bytes);
}

const char *csec_url(struct config_section *s, const struct cnode *n, const char *path)
{
	const char *v = as_str(s->ld, n, path);
	const char *problem = v ? url_problem(v, NULL, NULL) : NULL;
	if (problem != NULL) {
		err(s->ld, n, path, "%s", problem);
		return NULL;
	}
	return v;
}

bool csec_strlist(struct config_section *s, const struct cnode *n, const char *path, unsigned flags,
                  char ***out, size_t *n_out)
{
	*out = NULL;
	*n_out = 0;
	return parse_strlist(s->ld, n, path, flags & CSEC_FLAGS, out, n_out);
}

void csec_strv_free(char **v, size_t n)
{
	free_strv(v, n);
}

bool csec_regex_list(struct config_section *s, const struct cnode *n, const char *path,
                     uint32_t options, uint32_t jit_options, pcre2_code ***out, size_t *n_out)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(s->ld, n, path);
	bool ok = seq != NULL;

	*out = NULL;
	*n_out = 0;
	if (seq == NULL || seq->n == 0)
		return ok;
	*out = xcalloc(seq->n, sizeof **out);
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const char *re = as_str(s->ld, seq->kids[i], ip);
		int code;
		PCRE2_SIZE off;
		if (re == NULL) {
			ok = false;
			continue;
		}
		if (re[0] == '\0') {
			err(s->ld, seq->kids[i], ip,
			    "must not be empty (it would match everything)");
			ok = false;
			continue;
		}
		pcre2_code *rc = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED,
		                               PCRE2_UTF | options, &code, &off, NULL);
		if (rc == NULL) {
			PCRE2_UCHAR msg[256];
			if (pcre2_get_error_message(code, msg, sizeof msg) < 0)
				strcpy((char *)msg, "unknown error");
			err(s->ld, seq->kids[i], ip, "invalid regular expression: %s at offset %zu",
			    (const char *)msg, (size_t)off);
			ok = false;
			continue;
		}
		/* Without JIT support the interpreter runs the same pattern: not an error. */
		(void)pcre2_jit_compile(rc, jit_options ? jit_options : PCRE2_JIT_COMPLETE);
		(*out)[(*n_out)++] = rc;
	}
	return ok;
}

void csec_regex_free(pcre2_code **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		pcre2_code_free(v[i]);
	free(v);
}

bool csec_headers(struct config_section *s, const struct cnode *n, const char *path,
                  struct config_kv **out, size_t *n_out)
{
	size_t failed = s->ld->n_failed;
	*out = parse_kv(s->ld, n, path, true, n_out);
	return s->ld->n_failed == failed;
}

void csec_kv_free(struct config_kv *kv, size_t n)
{
	free_kv(kv, n);
}

json_t *csec_json(struct config_section *s, const struct cnode *n, const char *path)
{
	return to_json(s->ld, n, path);
}
