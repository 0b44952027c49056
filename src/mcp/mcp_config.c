/* mcp_config.c — the MCP keys of sluice.yaml: mcp_servers, a route's mcp section, a consumer's
 * mcp_tools. config.c hands each node over and collects the errors (file:line:col: path: msg).
 */
#include "sluice/mcp.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sluice/config_tree.h"
#include "sluice/log.h"
#include "sluice/policy.h"

#define PATH_LEN 384

/* ============================================================================================
 * Defaults (documented in docs/configuration.md and docs/mcp.md).
 * ========================================================================================== */

#define DEF_CONNECT_MS      5000u
#define DEF_FIRST_BYTE_MS   60000u
#define DEF_IDLE_MS         (5u * 60u * 1000u)
#define DEF_CHECK_INTERVAL  10000u
#define DEF_CHECK_TIMEOUT   2000u
#define DEF_CHECK_SUCCESSES 1
#define DEF_CHECK_FAILURES  2
#define DEF_SEPARATOR       "__"
#define DEF_IDLE_SESSION_MS (60u * 60u * 1000u)
/* Passive health of a server (not configurable): the instances' defaults. */
#define DEF_PASSIVE_TCP      2
#define DEF_PASSIVE_TIMEOUTS 2
#define DEF_PASSIVE_HTTP     3
#define DEF_PASSIVE_COOLDOWN 10000u
static const int passive_statuses[] = {500, 502, 503, 504};
/* Limits one server or one consumer's mcp_tools may declare. */
#define MAX_LIMITS CONFIG_MAX_LIMITS

/* ============================================================================================
 * Small helpers over the tree.
 * ========================================================================================== */

static __attribute__((noreturn)) void oom(void)
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

static void report(struct mcp_conf_ctx *ctx, const struct cnode *at, const char *path,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void report(struct mcp_conf_ctx *ctx, const struct cnode *at, const char *path,
                   const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	ctx->report(ctx->arg, at, path, msg);
}

static const char *at_key(char *buf, const char *parent, const char *key)
{
	int r = parent[0] ? snprintf(buf, PATH_LEN, "%s.%s", parent, key)
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

static const char *kind_of(const struct cnode *n)
{
	return n->kind == CNODE_MAP   ? "a mapping"
	       : n->kind == CNODE_SEQ ? "a list"
	       : n->null              ? "null"
	                              : "a string";
}

static const struct cnode *as_map(struct mcp_conf_ctx *ctx, const struct cnode *n, const char *path)
{
	if (n == NULL || n->kind == CNODE_MAP)
		return n;
	report(ctx, n, path, "must be a mapping, not %s", kind_of(n));
	return NULL;
}

static const struct cnode *as_seq(struct mcp_conf_ctx *ctx, const struct cnode *n, const char *path)
{
	if (n == NULL || n->kind == CNODE_SEQ)
		return n;
	report(ctx, n, path, "must be a list, not %s", kind_of(n));
	return NULL;
}

static const char *as_str(struct mcp_conf_ctx *ctx, const struct cnode *n, const char *path)
{
	if (n->kind == CNODE_SCALAR && !n->null)
		return n->str;
	report(ctx, n, path, "must be a string, not %s", kind_of(n));
	return NULL;
}

/* Reports every key of map that is not in keys (NULL-terminated). */
static void known_keys(struct mcp_conf_ctx *ctx, const struct cnode *map, const char *path,
                       const char *const *keys)
{
	for (size_t i = 0; map != NULL && i < map->n; i++) {
		const struct cnode *k = CNODE_KEY(map, i);
		if (k->kind != CNODE_SCALAR || k->null)
			continue; /* reported by the tree */
		bool known = false;
		for (size_t j = 0; keys[j] != NULL && !known; j++)
			known = strcmp(keys[j], k->str) == 0;
		if (!known) {
			char list[256] = "";
			size_t len = 0;
			for (size_t j = 0; keys[j] != NULL; j++) {
				int r = snprintf(list + len, sizeof(list) - len, "%s%s",
				                 j ? ", " : "", keys[j]);
				if (r < 0 || (size_t)r >= sizeof(list) - len)
					break;
				len += (size_t)r;
			}
			report(ctx, k, path, "unknown key \"%s\" (known: %s)", k->str, list);
		}
	}
}

static bool name_ok(const char *s)
{
	if (s[0] == '\0' || strlen(s) > 128)
		return false;
	for (const char *p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-'))
			return false;
	return true;
}

static bool token_ok(const char *s)
{
	if (s[0] == '\0')
		return false;
	for (const char *p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || strchr("!#$%&'*+-.^_`|~", *p) != NULL))
			return false;
	return true;
}

static bool has_ctl(const char *s, bool space_too)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f || (space_too && *s == ' '))
			return true;
	return false;
}

static bool duration(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path,
                     uint64_t *out)
{
	const char *s = v->kind == CNODE_SCALAR && !v->null ? v->str : NULL;
	uint64_t ms;
	if (s == NULL || !config_parse_duration(s, &ms)) {
		report(ctx, v, path,
		       "invalid duration \"%s\": use a number with a unit: ms, s, m, h, d or w",
		       s ? s : kind_of(v));
		return false;
	}
	if (ms == 0) {
		report(ctx, v, path, "must be greater than zero");
		return false;
	}
	*out = ms;
	return true;
}

static bool int_in(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path, long lo,
                   long hi, int *out)
{
	const char *s = v->kind == CNODE_SCALAR && !v->null ? v->str : NULL;
	char *end = NULL;
	long x = s && *s ? strtol(s, &end, 10) : 0;
	if (s == NULL || *s == '\0' || *end != '\0' || x < lo || x > hi) {
		report(ctx, v, path, "must be an integer from %ld to %ld", lo, hi);
		return false;
	}
	*out = (int)x;
	return true;
}

static bool boolean(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path, bool *out)
{
	const char *s = v->kind == CNODE_SCALAR && !v->null ? v->str : "";
	if (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "TRUE") == 0)
		*out = true;
	else if (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 || strcmp(s, "FALSE") == 0)
		*out = false;
	else {
		report(ctx, v, path, "must be true or false");
		return false;
	}
	return true;
}

/* An http(s) URL with a host, no spaces, no credentials, no fragment. */
static const char *url_problem(const char *s)
{
	size_t skip;
	if (strncasecmp(s, "http://", 7) == 0)
		skip = 7;
	else if (strncasecmp(s, "https://", 8) == 0)
		skip = 8;
	else
		return "must be an http:// or https:// URL";
	if (has_ctl(s, true))
		return "must not contain spaces or control characters";
	if (strchr(s, '#') != NULL)
		return "must not contain a fragment (#)";
	size_t alen = strcspn(s + skip, "/?");
	if (alen == 0 || s[skip] == ':')
		return "has no host";
	if (memchr(s + skip, '@', alen) != NULL)
		return "must not contain credentials (user@host): use auth.header";
	return NULL;
}

/* ============================================================================================
 * Tool filters and limits (shared by routes and consumers).
 * ========================================================================================== */

static void glob_list(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path,
                      char ***out, size_t *n_out)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ctx, v, path);
	if (seq == NULL || seq->n == 0)
		return;
	*out = xcalloc(seq->n, sizeof(char *));
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const char *s = as_str(ctx, seq->kids[i], ip);
		if (s == NULL)
			continue;
		if (s[0] == '\0' || has_ctl(s, false)) {
			report(ctx, seq->kids[i], ip,
			       "must be a non-empty pattern without control "
			       "characters");
			continue;
		}
		(*out)[(*n_out)++] = xstrdup(s);
	}
}

static void tool_filter(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path,
                        struct mcp_tool_filter *f)
{
	static const char *const keys[] = {"allow", "deny", NULL};
	char p[PATH_LEN];
	const struct cnode *m = as_map(ctx, v, path);
	if (m == NULL)
		return;
	known_keys(ctx, m, path, keys);
	glob_list(ctx, ctree_get(m, "allow", NULL), at_key(p, path, "allow"), &f->allow,
	          &f->n_allow);
	glob_list(ctx, ctree_get(m, "deny", NULL), at_key(p, path, "deny"), &f->deny, &f->n_deny);
}

static void free_filter(struct mcp_tool_filter *f)
{
	for (size_t i = 0; i < f->n_allow; i++)
		free(f->allow[i]);
	for (size_t i = 0; i < f->n_deny; i++)
		free(f->deny[i]);
	free(f->allow);
	free(f->deny);
}

static struct mcp_server_conf *find_server(const struct config *c, const char *name)
{
	for (size_t i = 0; c->mcp != NULL && i < c->mcp->n_servers; i++)
		if (c->mcp->servers[i].name != NULL && strcmp(c->mcp->servers[i].name, name) == 0)
			return &c->mcp->servers[i];
	return NULL;
}

/*
 * Request-rate limits on tool calls: [{requests, window, type, server?}]. owner_server is
 * set for a server's own limits (no `server:` key); NULL for a consumer's (`server:` picks
 * one server, absent = all servers together).
 */
static void rate_limits(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path,
                        struct mcp_server_conf *owner_server, const char *owner_name,
                        struct config_limit **out, size_t *n_out)
{
	static const char *const server_keys[] = {"requests", "window", "type", NULL};
	static const char *const consumer_keys[] = {"requests", "window", "type", "server", NULL};
	char p[PATH_LEN], kp[PATH_LEN], win[64];
	const struct cnode *seq = as_seq(ctx, v, path);

	if (seq == NULL || seq->n == 0)
		return;
	if (seq->n > MAX_LIMITS) {
		report(ctx, seq, path, "at most %d limits (found %zu)", MAX_LIMITS, seq->n);
		return;
	}
	*out = xcalloc(seq->n, sizeof(**out));
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, path, i);
		const struct cnode *m = as_map(ctx, seq->kids[i], ip);
		struct config_limit l = {0};
		bool ok = m != NULL;
		if (m == NULL)
			continue;
		known_keys(ctx, m, ip, owner_server ? server_keys : consumer_keys);
		const struct cnode *req = ctree_get(m, "requests", NULL);
		const struct cnode *w = ctree_get(m, "window", NULL);
		const struct cnode *t = ctree_get(m, "type", NULL);
		const struct cnode *s = ctree_get(m, "server", NULL);
		int n = 0;
		if (req == NULL) {
			report(ctx, m, ip, "missing required key \"requests\"");
			ok = false;
		} else if (!int_in(ctx, req, at_key(kp, ip, "requests"), 1, 1000000000, &n)) {
			ok = false;
		}
		l.requests = (uint64_t)n;
		if (t != NULL) {
			const char *ts = t->kind == CNODE_SCALAR && !t->null ? t->str : "";
			if (strcmp(ts, "fixed") == 0)
				l.type = LIMIT_FIXED;
			else if (strcmp(ts, "sliding") == 0)
				l.type = LIMIT_SLIDING;
			else {
				report(ctx, t, at_key(kp, ip, "type"),
				       "\"%s\" is not one of fixed, sliding", ts);
				ok = false;
			}
		}
		if (w == NULL) {
			report(ctx, m, ip, "missing required key \"window\"");
			ok = false;
		} else {
			const char *ws = w->kind == CNODE_SCALAR && !w->null ? w->str : NULL;
			if (ws == NULL || !config_parse_window(ws, &l.window)) {
				report(ctx, w, at_key(kp, ip, "window"),
				       "invalid window \"%s\": use a duration such as 30s, 1m, 1h, "
				       "or "
				       "calendar months such as 1mo",
				       ws ? ws : kind_of(w));
				ok = false;
			} else if (l.type == LIMIT_SLIDING && l.window.months) {
				report(ctx, w, at_key(kp, ip, "window"),
				       "a sliding window must be a duration, not calendar months");
				ok = false;
			}
		}
		if (owner_server != NULL) {
			l.instance = &owner_server->as_instance;
		} else if (s != NULL) {
			const char *sn = as_str(ctx, s, at_key(kp, ip, "server"));
			struct mcp_server_conf *sc = sn ? find_server(ctx->c, sn) : NULL;
			if (sn != NULL && sc == NULL) {
				report(ctx, s, kp, "unknown MCP server \"%s\"", sn);
				ok = false;
			}
			l.instance = sc ? &sc->as_instance : NULL;
		}
		if (!ok)
			continue;
		config_format_window(&l.window, win, sizeof(win));
		char id[512];
		if (owner_server != NULL)
			snprintf(id, sizeof(id), "mcp_server:%s:requests:%s", owner_name, win);
		else
			snprintf(id, sizeof(id), "mcp_consumer:%s:%s:requests:%s", owner_name,
			         s != NULL && l.instance ? l.instance->name + 4 : "*", win);
		l.id = xstrdup(id);
		for (size_t j = 0; j < *n_out; j++)
			if (strcmp((*out)[j].id, l.id) == 0) {
				report(ctx, m, ip,
				       "counts the same thing as another limit (%s): merge "
				       "them",
				       l.id);
				free(l.id);
				l.id = NULL;
				break;
			}
		if (l.id != NULL)
			(*out)[(*n_out)++] = l;
	}
}

static void free_limits(struct config_limit *l, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(l[i].id);
	free(l);
}

/* ============================================================================================
 * mcp_servers
 * ========================================================================================== */

static void server_headers(struct mcp_conf_ctx *ctx, const struct cnode *auth, const char *path,
                           struct mcp_server_conf *s)
{
	static const char *const auth_keys[] = {"header", NULL};
	char p[PATH_LEN], hp[PATH_LEN];
	const struct cnode *m = as_map(ctx, auth, path);
	if (m == NULL)
		return;
	known_keys(ctx, m, path, auth_keys);
	const struct cnode *h =
	        as_map(ctx, ctree_get(m, "header", NULL), at_key(p, path, "header"));
	if (h == NULL || h->n == 0)
		return;
	s->auth_headers = xcalloc(h->n, sizeof(*s->auth_headers));
	for (size_t i = 0; i < h->n; i++) {
		const struct cnode *k = CNODE_KEY(h, i), *v = CNODE_VAL(h, i);
		if (k->kind != CNODE_SCALAR || k->null)
			continue;
		if (!token_ok(k->str)) {
			report(ctx, k, p, "\"%s\" is not a valid header name", k->str);
			continue;
		}
		const char *val = as_str(ctx, v, at_key(hp, p, k->str));
		if (val == NULL)
			continue;
		if (has_ctl(val, false)) {
			report(ctx, v, hp, "must not contain line breaks or control characters");
			continue;
		}
		s->auth_headers[s->n_auth_headers].name = xstrdup(k->str);
		s->auth_headers[s->n_auth_headers].value = xstrdup(val);
		s->n_auth_headers++;
	}
}

static void server_checks(struct mcp_conf_ctx *ctx, const struct cnode *v, const char *path,
                          struct mcp_server_conf *s)
{
	static const char *const checks_keys[] = {"active", NULL};
	static const char *const active_keys[] = {"interval", "timeout", "successes", "failures",
	                                          NULL};
	char p[PATH_LEN], kp[PATH_LEN];
	const struct cnode *m = as_map(ctx, v, path);
	if (m == NULL)
		return;
	known_keys(ctx, m, path, checks_keys);
	const struct cnode *a =
	        as_map(ctx, ctree_get(m, "active", NULL), at_key(p, path, "active"));
	if (a == NULL)
		return;
	known_keys(ctx, a, p, active_keys);
	s->check.enabled = true;
	const struct cnode *x;
	if ((x = ctree_get(a, "interval", NULL)) != NULL)
		duration(ctx, x, at_key(kp, p, "interval"), &s->check.interval);
	if ((x = ctree_get(a, "timeout", NULL)) != NULL)
		duration(ctx, x, at_key(kp, p, "timeout"), &s->check.timeout);
	if ((x = ctree_get(a, "successes", NULL)) != NULL)
		int_in(ctx, x, at_key(kp, p, "successes"), 1, 254, &s->check.successes);
	if ((x = ctree_get(a, "failures", NULL)) != NULL)
		int_in(ctx, x, at_key(kp, p, "failures"), 1, 254, &s->check.failures);
}

/* The server as an instance for health.c and quota.c. */
static void server_as_instance(struct mcp_server_conf *s)
{
	struct config_instance *in = &s->as_instance;
	size_t n = strlen(s->name) + 5;
	in->name = xcalloc(n, 1);
	snprintf(in->name, n, "mcp:%s", s->name);
	in->index = s->index;
	in->provider = PROVIDER_OPENAI_COMPATIBLE;
	in->timeouts.connect = s->timeouts.connect;
	in->timeouts.first_byte = s->timeouts.first_byte;
	in->timeouts.idle = s->timeouts.idle;
	in->tls_verify = s->tls_verify;
	/* With probes, recovery is the probes' decision (no half-open trials). */
	in->active.enabled = s->check.enabled;
	in->active.healthy.successes = s->check.successes;
	in->active.unhealthy.tcp_failures = s->check.failures;
	in->active.unhealthy.timeouts = s->check.failures;
	in->active.unhealthy.http_failures = s->check.failures;
	in->active.healthy.interval = in->active.unhealthy.interval = s->check.interval;
	in->active.timeout = s->check.timeout;
	in->passive.enabled = true;
	in->passive.http_statuses = xcalloc(sizeof(passive_statuses) / sizeof(int), sizeof(int));
	memcpy(in->passive.http_statuses, passive_statuses, sizeof(passive_statuses));
	in->passive.n_http_statuses = sizeof(passive_statuses) / sizeof(int);
	in->passive.http_failures = DEF_PASSIVE_HTTP;
	in->passive.tcp_failures = DEF_PASSIVE_TCP;
	in->passive.timeouts = DEF_PASSIVE_TIMEOUTS;
	in->passive.cooldown = DEF_PASSIVE_COOLDOWN;
}

static void parse_server(struct mcp_conf_ctx *ctx, const struct cnode *m, const char *path,
                         struct mcp_server_conf *s)
{
	static const char *const keys[] = {"name",       "endpoint", "auth",   "timeouts",
	                                   "tls_verify", "limits",   "checks", NULL};
	static const char *const timeout_keys[] = {"connect", "first_byte", "idle", NULL};
	char p[PATH_LEN], kp[PATH_LEN];
	const struct cnode *v;

	s->timeouts.connect = DEF_CONNECT_MS;
	s->timeouts.first_byte = DEF_FIRST_BYTE_MS;
	s->timeouts.idle = DEF_IDLE_MS;
	s->tls_verify = true;
	s->check.interval = DEF_CHECK_INTERVAL;
	s->check.timeout = DEF_CHECK_TIMEOUT;
	s->check.successes = DEF_CHECK_SUCCESSES;
	s->check.failures = DEF_CHECK_FAILURES;
	if (m == NULL) {
		s->name = xstrdup("");
		server_as_instance(s);
		return;
	}
	known_keys(ctx, m, path, keys);
	v = ctree_get(m, "name", NULL);
	const char *name = v ? as_str(ctx, v, at_key(p, path, "name")) : NULL;
	if (v == NULL)
		report(ctx, m, path, "missing required key \"name\"");
	else if (name != NULL && !name_ok(name))
		report(ctx, v, p,
		       "must contain only letters, digits, '.', '_' and '-' (at most 128)");
	s->name = xstrdup(name && name_ok(name) ? name : "");

	v = ctree_get(m, "endpoint", NULL);
	const char *ep = v ? as_str(ctx, v, at_key(p, path, "endpoint")) : NULL;
	if (v == NULL)
		report(ctx, m, path, "missing required key \"endpoint\"");
	else if (ep != NULL && url_problem(ep) != NULL)
		report(ctx, v, p, "%s", url_problem(ep));
	else if (ep != NULL)
		s->endpoint = xstrdup(ep);

	if ((v = ctree_get(m, "auth", NULL)) != NULL)
		server_headers(ctx, v, at_key(p, path, "auth"), s);
	const struct cnode *tm =
	        as_map(ctx, ctree_get(m, "timeouts", NULL), at_key(p, path, "timeouts"));
	if (tm != NULL) {
		known_keys(ctx, tm, p, timeout_keys);
		if ((v = ctree_get(tm, "connect", NULL)) != NULL)
			duration(ctx, v, at_key(kp, p, "connect"), &s->timeouts.connect);
		if ((v = ctree_get(tm, "first_byte", NULL)) != NULL)
			duration(ctx, v, at_key(kp, p, "first_byte"), &s->timeouts.first_byte);
		if ((v = ctree_get(tm, "idle", NULL)) != NULL)
			duration(ctx, v, at_key(kp, p, "idle"), &s->timeouts.idle);
	}
	if ((v = ctree_get(m, "tls_verify", NULL)) != NULL)
		boolean(ctx, v, at_key(p, path, "tls_verify"), &s->tls_verify);
	if ((v = ctree_get(m, "checks", NULL)) != NULL)
		server_checks(ctx, v, at_key(p, path, "checks"), s);
	server_as_instance(s);
	rate_limits(ctx, ctree_get(m, "limits", NULL), at_key(p, path, "limits"), s, s->name,
	            &s->as_instance.limits, &s->as_instance.n_limits);
}

void mcp_config_servers(struct mcp_conf_ctx *ctx, const struct cnode *node)
{
	char p[PATH_LEN];
	const struct cnode *seq = as_seq(ctx, node, "mcp_servers");
	struct mcp_conf *mc = xcalloc(1, sizeof(*mc));

	ctx->c->mcp = mc;
	if (seq == NULL || seq->n == 0)
		return;
	mc->servers = xcalloc(seq->n, sizeof(*mc->servers));
	mc->n_servers = seq->n;
	for (size_t i = 0; i < seq->n; i++) {
		const char *ip = at_index(p, "mcp_servers", i);
		mc->servers[i].index = i;
		parse_server(ctx, as_map(ctx, seq->kids[i], ip), ip, &mc->servers[i]);
		for (size_t j = 0; j < i; j++)
			if (mc->servers[i].name[0] &&
			    strcmp(mc->servers[i].name, mc->servers[j].name) == 0) {
				char np[PATH_LEN];
				report(ctx, ctree_get(seq->kids[i], "name", NULL),
				       at_key(np, ip, "name"),
				       "duplicate MCP server name \"%s\" (mcp_servers[%zu])",
				       mc->servers[i].name, j);
				break;
			}
	}
}

/* ============================================================================================
 * A route's mcp section
 * ========================================================================================== */

void mcp_config_route(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                      struct config_route *r)
{
	static const char *const keys[] = {"servers",   "tools",     "prompts",
	                                   "resources", "separator", "session_idle_timeout",
	                                   NULL};
	char p[PATH_LEN], ip[PATH_LEN];
	struct mcp_route_conf *rc = xcalloc(1, sizeof(*rc));
	const struct cnode *v;

	r->mcp = rc;
	rc->separator = xstrdup(DEF_SEPARATOR);
	rc->session_idle_timeout = DEF_IDLE_SESSION_MS;
	at_key(p, path, "mcp");
	const struct cnode *m = as_map(ctx, node, p);
	if (m == NULL)
		return; /* absent: config.c reports it */
	known_keys(ctx, m, p, keys);
	if ((v = ctree_get(m, "separator", NULL)) != NULL) {
		const char *s = as_str(ctx, v, at_key(ip, p, "separator"));
		if (s != NULL && (s[0] == '\0' || strlen(s) > 8 || has_ctl(s, true)))
			report(ctx, v, ip, "must be 1 to 8 visible characters");
		else if (s != NULL) {
			free(rc->separator);
			rc->separator = xstrdup(s);
		}
	}
	if ((v = ctree_get(m, "session_idle_timeout", NULL)) != NULL)
		duration(ctx, v, at_key(ip, p, "session_idle_timeout"), &rc->session_idle_timeout);
	if ((v = ctree_get(m, "tools", NULL)) != NULL)
		tool_filter(ctx, v, at_key(ip, p, "tools"), &rc->tools);
	if ((v = ctree_get(m, "prompts", NULL)) != NULL)
		tool_filter(ctx, v, at_key(ip, p, "prompts"), &rc->prompts);
	if ((v = ctree_get(m, "resources", NULL)) != NULL)
		tool_filter(ctx, v, at_key(ip, p, "resources"), &rc->resources);

	v = ctree_get(m, "servers", NULL);
	at_key(ip, p, "servers");
	const struct cnode *seq = as_seq(ctx, v, ip);
	if (v == NULL)
		report(ctx, m, p, "missing required key \"servers\"");
	if (seq == NULL)
		return;
	if (seq->n == 0 || seq->n > MCP_MAX_SERVERS) {
		report(ctx, seq, ip, "must list from 1 to %d MCP servers", MCP_MAX_SERVERS);
		return;
	}
	rc->servers = xcalloc(seq->n, sizeof(*rc->servers));
	for (size_t i = 0; i < seq->n; i++) {
		char sp[PATH_LEN];
		const char *name = as_str(ctx, seq->kids[i], at_index(sp, ip, i));
		if (name == NULL)
			continue;
		struct mcp_server_conf *s = find_server(ctx->c, name);
		if (s == NULL) {
			report(ctx, seq->kids[i], sp,
			       "unknown MCP server \"%s\" (declare it under "
			       "mcp_servers)",
			       name);
			continue;
		}
		/* The prefix must split back unambiguously: the first separator ends it. */
		if (strstr(name, rc->separator) != NULL) {
			report(ctx, seq->kids[i], sp,
			       "server name \"%s\" contains the separator \"%s\": tool names could "
			       "not be split back",
			       name, rc->separator);
			continue;
		}
		bool dup = false;
		for (size_t j = 0; j < rc->n_servers; j++)
			dup = dup || rc->servers[j] == s;
		if (dup) {
			report(ctx, seq->kids[i], sp, "server \"%s\" is listed twice", name);
			continue;
		}
		rc->servers[rc->n_servers++] = s;
	}
}

/* ============================================================================================
 * A route's plugins (request policies over tool arguments)
 * ========================================================================================== */

/*
 * On an MCP route the request policies read the text of a tools/call's string arguments,
 * handed to them as one user message of a chat body (mcp_policy.c). So a policy applies
 * when it reads prompt text, with the keys that make sense for one user message; one that
 * shapes a model request or reads model output would do nothing here and is refused.
 */
static const char *const guard_keys[] = {"deny", "allow", NULL};
static const char *const limits_keys[] = {"max_prompt_tokens", NULL};
static const char *const moderation_keys[] = {
        "endpoint",         "auth",     "model", "on", "threshold", "timeout",
        "block_categories", "on_error", NULL};
static const char *const external_keys[] = {"path", "config", NULL};

static const struct {
	const char *name;
	const char *const *keys; /* the keys that apply; NULL: the policy is refused */
	const char *why;         /* NULL: applies */
} mcp_policies[] = {
        {"prompt_guard", guard_keys, NULL},
        {"request_limits", limits_keys, NULL},
        {"moderation", moderation_keys, NULL},
        {"external", external_keys, NULL},
        {"prompt_decorator", NULL, "adds messages to a model request; tool arguments have none"},
        {"request_override", NULL, "sets parameters of a model request; a tool call has none"},
        {"response_guard", NULL, "reads model output; MCP routes run request policies only"},
        {"loop_guard", NULL, "reads model output; MCP routes run request policies only"},
};

void mcp_config_plugins(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                        const struct config_route *r)
{
	char ip[PATH_LEN], kp[PATH_LEN];

	if (node == NULL || node->kind != CNODE_SEQ)
		return; /* config.c reported it */
	for (size_t i = 0; i < node->n; i++) {
		const struct cnode *item = node->kids[i];
		if (item->kind != CNODE_MAP || item->n != 1)
			continue;
		const struct cnode *k = CNODE_KEY(item, 0), *v = CNODE_VAL(item, 0);
		if (k->kind != CNODE_SCALAR || k->null)
			continue;
		at_key(kp, at_index(ip, path, i), k->str);
		size_t t = 0;
		while (t < sizeof(mcp_policies) / sizeof(mcp_policies[0]) &&
		       strcmp(mcp_policies[t].name, k->str) != 0)
			t++;
		if (t == sizeof(mcp_policies) / sizeof(mcp_policies[0])) {
			if (r->n_plugins == node->n) /* a policy the table does not know */
				report(ctx, k, kp,
				       "does not apply to a route with type: mcp (its request "
				       "policies are prompt_guard, request_limits, moderation and "
				       "external)");
			continue;
		}
		if (mcp_policies[t].keys == NULL) {
			report(ctx, k, kp, "does not apply to a route with type: mcp: it %s",
			       mcp_policies[t].why);
			continue;
		}
		for (size_t j = 0; v->kind == CNODE_MAP && j < v->n; j++) {
			const struct cnode *key = CNODE_KEY(v, j);
			if (key->kind != CNODE_SCALAR || key->null)
				continue;
			bool ok = false;
			for (size_t q = 0; mcp_policies[t].keys[q] != NULL && !ok; q++)
				ok = strcmp(mcp_policies[t].keys[q], key->str) == 0;
			if (!ok) {
				char p2[PATH_LEN];
				report(ctx, key, at_key(p2, kp, key->str),
				       "does not apply on a route with type: mcp, where %s reads "
				       "the "
				       "text of a tool call's string arguments as one user message",
				       k->str);
			}
		}
		/* The phases are the parsed entry's (moderation's `on`, a plugin's own): when
		 * every entry parsed, entry i is r->plugins[i]. */
		if (r->n_plugins == node->n && (r->plugins[i].phases & POLICY_PHASE_RESPONSE))
			report(ctx, k, kp,
			       "runs on model output too; on a route with type: mcp policies run "
			       "over tool arguments only%s",
			       strcmp(k->str, "moderation") == 0 ? ": set on: [request]" : "");
	}
}

/* ============================================================================================
 * A consumer's mcp_tools
 * ========================================================================================== */

void mcp_config_consumer(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                         struct config_consumer *cs)
{
	static const char *const keys[] = {"allow", "deny", "limits", "prompts", "resources", NULL};
	char p[PATH_LEN];
	const struct cnode *v;
	struct mcp_consumer_conf *mc = xcalloc(1, sizeof(*mc));

	cs->mcp = mc;
	mc->as_consumer.name = cs->name; /* borrowed from the consumer */
	mc->as_consumer.index = cs->index;
	mc->as_consumer.rejected_code = 429;
	if (node == NULL)
		return;
	const struct cnode *m = as_map(ctx, node, path);
	if (m == NULL)
		return;
	known_keys(ctx, m, path, keys);
	glob_list(ctx, ctree_get(m, "allow", NULL), at_key(p, path, "allow"), &mc->tools.allow,
	          &mc->tools.n_allow);
	glob_list(ctx, ctree_get(m, "deny", NULL), at_key(p, path, "deny"), &mc->tools.deny,
	          &mc->tools.n_deny);
	/* allow and deny above are the tools' (the contract's names); prompts and resources
	 * have their own { allow, deny } beside them. */
	if ((v = ctree_get(m, "prompts", NULL)) != NULL)
		tool_filter(ctx, v, at_key(p, path, "prompts"), &mc->prompts);
	if ((v = ctree_get(m, "resources", NULL)) != NULL)
		tool_filter(ctx, v, at_key(p, path, "resources"), &mc->resources);
	rate_limits(ctx, ctree_get(m, "limits", NULL), at_key(p, path, "limits"), NULL,
	            cs->name ? cs->name : "", &mc->as_consumer.limits, &mc->as_consumer.n_limits);
}

/* ============================================================================================
 * Freeing
 * ========================================================================================== */

void mcp_config_free(struct mcp_conf *m)
{
	if (m == NULL)
		return;
	for (size_t i = 0; i < m->n_servers; i++) {
		struct mcp_server_conf *s = &m->servers[i];
		free(s->name);
		free(s->endpoint);
		for (size_t j = 0; j < s->n_auth_headers; j++) {
			free(s->auth_headers[j].name);
			free(s->auth_headers[j].value);
		}
		free(s->auth_headers);
		free(s->as_instance.name);
		free(s->as_instance.passive.http_statuses);
		free_limits(s->as_instance.limits, s->as_instance.n_limits);
	}
	free(m->servers);
	free(m);
}

void mcp_config_free_route(struct mcp_route_conf *m)
{
	if (m == NULL)
		return;
	free(m->servers);
	free_filter(&m->tools);
	free_filter(&m->prompts);
	free_filter(&m->resources);
	free(m->separator);
	free(m);
}

void mcp_config_free_consumer(struct mcp_consumer_conf *m)
{
	if (m == NULL)
		return;
	free_filter(&m->tools);
	free_filter(&m->prompts);
	free_filter(&m->resources);
	free_limits(m->as_consumer.limits, m->as_consumer.n_limits);
	free(m);
}
