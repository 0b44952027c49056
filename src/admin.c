/* admin.c — the admin listener: key check, JSON endpoints, /metrics and the status page.
 *
 * It runs on the main thread's event loop with the same small HTTP server the
 * workers use (http.c), on its own listening socket, so the admin API stays
 * reachable (and separately firewalled) whatever the traffic listeners do.
 * Every answer is produced synchronously inside the handler: the data comes
 * from hooks that read the main thread's own state, so nothing here waits.
 */
#include "sluice/admin.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "sluice/config.h"
#include "sluice/http.h"
#include "sluice/log.h"
#include "sluice/mcp.h"
#include "sluice/metrics.h"

/* The admin listener serves a few operators and scrapers, not traffic. */
#define ADMIN_BACKLOG           64
#define ADMIN_MAX_CONNECTIONS   64
#define ADMIN_MAX_HEADER        (64 * 1024)
#define ADMIN_MAX_BODY          (1024 * 1024)
#define ADMIN_CLIENT_TIMEOUT_MS 10000
#define ADMIN_KEEPALIVE_MS      60000
#define ADMIN_WRITE_TIMEOUT_MS  30000

struct admin {
	struct http_server *http; /* NULL when the admin API is off */
	int port;
	char *address; /* as configured at start, owned */
	bool key_on;   /* false: admin.key is "none" */
	unsigned char key_sha256[32];
	struct admin_hooks hooks;
};

/* ---------------------------------------------------------------- listening socket */

static int admin_listen(const struct config_admin *ca, int *port_out)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
	                         .ai_socktype = SOCK_STREAM,
	                         .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
	struct addrinfo *ai = NULL;
	const char *host = ca->host ? ca->host : "127.0.0.1";
	char port[8];
	int fd = -1, one = 1;

	snprintf(port, sizeof(port), "%d", ca->port);
	int rc = getaddrinfo(host, port, &hints, &ai);
	if (rc != 0) {
		log_error("admin listen %s: %s", ca->address, gai_strerror(rc));
		return -1;
	}
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		goto fail;
	if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, ADMIN_BACKLOG) < 0)
		goto fail;
	freeaddrinfo(ai);

	struct sockaddr_storage ss = {0};
	socklen_t sl = sizeof(ss);
	*port_out = ca->port;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET)
			*port_out = ntohs(((struct sockaddr_in *)&ss)->sin_port);
		else if (ss.ss_family == AF_INET6)
			*port_out = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	}
	return fd;
fail:
	log_error("admin listen %s: %s", ca->address, strerror(errno));
	if (fd >= 0)
		close(fd);
	freeaddrinfo(ai);
	return -1;
}

/* ---------------------------------------------------------------- authentication */

static void sha256(const char *s, size_t len, unsigned char out[32])
{
	unsigned int n = 32;
	if (!EVP_Digest(s, len, out, &n, EVP_sha256(), NULL))
		memset(out, 0, 32);
}

static int hex_value(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* Decode %XX (and '+' as a space in a query) into out (NUL-terminated, truncated). */
static void url_decode(const char *s, size_t len, bool query, char *out, size_t cap)
{
	size_t o = 0;
	for (size_t i = 0; i < len && o + 1 < cap; i++) {
		char ch = s[i];
		if (ch == '+' && query) {
			ch = ' ';
		} else if (ch == '%' && i + 2 < len && hex_value(s[i + 1]) >= 0 &&
		           hex_value(s[i + 2]) >= 0) {
			ch = (char)(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
			i += 2;
		}
		out[o++] = ch;
	}
	out[o] = '\0';
}

/* The value of ?name= in the query (decoded into out), or false. */
static bool query_param(const char *query, const char *name, char *out, size_t cap)
{
	size_t nl = strlen(name);
	for (const char *p = query; p && *p;) {
		const char *end = strchr(p, '&');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if (len > nl && strncmp(p, name, nl) == 0 && p[nl] == '=') {
			url_decode(p + nl + 1, len - nl - 1, true, out, cap);
			return true;
		}
		p = end ? end + 1 : NULL;
	}
	return false;
}

/*
 * The presented token is hashed and the hashes compared with CRYPTO_memcmp:
 * constant time whatever the lengths, so response timing reveals nothing
 * about the key.
 */
static bool token_ok(const struct admin *a, const char *token, size_t len)
{
	unsigned char h[32];
	sha256(token, len, h);
	return CRYPTO_memcmp(h, a->key_sha256, sizeof(h)) == 0;
}

static bool authorized(const struct admin *a, const struct http_request *req, bool allow_query)
{
	if (!a->key_on)
		return true;
	const char *auth = http_request_header(req, "authorization");
	if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
		const char *t = auth + 7;
		while (*t == ' ')
			t++;
		return token_ok(a, t, strlen(t));
	}
	if (allow_query && req->query) {
		char key[1024];
		if (query_param(req->query, "key", key, sizeof(key)))
			return token_ok(a, key, strlen(key));
	}
	return false;
}

/* ---------------------------------------------------------------- replies */

static void reply_json(struct http_request *req, int status, json_t *j)
{
	/* 15 significant digits: a cost of 0.000123 shows as that, not 0.00012300000000000001. */
	char *s = j ? json_dumps(j, JSON_INDENT(2) | JSON_REAL_PRECISION(15)) : NULL;
	json_decref(j);
	if (s == NULL) {
		http_reply_error(req, 500, "server_error", "internal_error",
		                 "cannot encode the answer");
		return;
	}
	size_t len = strlen(s);
	char *body = realloc(s, len + 2);
	if (body == NULL) {
		free(s);
		http_reply_error(req, 500, "server_error", "internal_error", "out of memory");
		return;
	}
	body[len] = '\n';
	body[len + 1] = '\0';
	http_reply(req, status, "application/json", body, len + 1);
	free(body);
}

static void reply_hook(struct http_request *req, json_t *(*hook)(void *), void *arg)
{
	json_t *j = hook ? hook(arg) : NULL;
	if (j == NULL) {
		http_reply_error(req, 503, "server_error", "unavailable", "not available yet");
		return;
	}
	reply_json(req, 200, j);
}

static void reply_text(struct http_request *req, int status, const char *text)
{
	http_reply(req, status, "text/plain; charset=utf-8", text, strlen(text));
}

static void method_not_allowed(struct http_request *req, const char *allow)
{
	http_response_header(req, "Allow", allow);
	http_reply_error(req, 405, "invalid_request_error", "method_not_allowed",
	                 "%s is not allowed here; use %s", req->method, allow);
}

/* A browser that opens the status page without a key gets a form asking for
 * it; API clients get the usual JSON error. */
static const char login_page[] =
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Sluice</title>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        "<style>body{font:15px system-ui,sans-serif;background:#f4f5f7;color:#1d232b;display:"
        "flex;height:90vh;align-items:center;justify-content:center}form{background:#fff;"
        "padding:24px 28px;border-radius:8px;box-shadow:0 1px 4px #0002}input{font:inherit;"
        "padding:6px 8px;margin:8px 8px 0 0;width:18em}button{font:inherit;padding:6px 14px}"
        "</style></head><body><form method=get action='/'><b>Sluice admin</b><br>"
        "<label>Admin key (admin.key)<br><input type=password name=key autofocus></label>"
        "<button>Open</button></form></body></html>";

static void reply_unauthorized(struct http_request *req, bool page)
{
	http_response_header(req, "WWW-Authenticate", "Bearer realm=\"sluice-admin\"");
	const char *accept = http_request_header(req, "accept");
	if (page && accept && strstr(accept, "text/html")) {
		http_reply(req, 401, "text/html; charset=utf-8", login_page,
		           sizeof(login_page) - 1);
		return;
	}
	http_reply_error(req, 401, "invalid_request_error", "invalid_api_key",
	                 "a valid admin key is required (Authorization: Bearer <admin.key>)");
}

/* ---------------------------------------------------------------- endpoints */

static void get_consumer(struct admin *a, struct http_request *req, const char *raw)
{
	char name[512];
	url_decode(raw, strlen(raw), false, name, sizeof(name));
	json_t *all = a->hooks.consumers ? a->hooks.consumers(a->hooks.arg) : NULL;
	if (all == NULL) {
		http_reply_error(req, 503, "server_error", "unavailable", "not available yet");
		return;
	}
	size_t i;
	json_t *c;
	json_array_foreach(all, i, c)
	{
		const char *n = json_string_value(json_object_get(c, "name"));
		if (n && strcmp(n, name) == 0) {
			json_incref(c);
			json_decref(all);
			reply_json(req, 200, c);
			return;
		}
	}
	json_decref(all);
	http_reply_error(req, 404, "invalid_request_error", "consumer_not_found",
	                 "no consumer named '%s'", name);
}

static void post_reload(struct admin *a, struct http_request *req)
{
	if (a->hooks.reload == NULL) {
		http_reply_error(req, 503, "server_error", "unavailable", "reload not available");
		return;
	}
	bool ok = false;
	json_t *j = a->hooks.reload(a->hooks.arg, &ok);
	if (j == NULL)
		j = json_pack("{s:b}", "ok", ok);
	reply_json(req, ok ? 200 : 400, j);
}

static void get_metrics(struct http_request *req)
{
	struct evbuffer *out = evbuffer_new();
	if (out == NULL) {
		http_reply_error(req, 500, "server_error", "internal_error", "out of memory");
		return;
	}
	metrics_render(out);
	size_t len = evbuffer_get_length(out);
	http_reply(req, 200, "text/plain; version=0.0.4; charset=utf-8",
	           (const char *)evbuffer_pullup(out, -1), len);
	evbuffer_free(out);
}

static void get_page(struct http_request *req)
{
	/* The page carries the key in its address on first load: keep it out of
	 * Referer headers; everything it needs is inline. */
	http_response_header(req, "Referrer-Policy", "no-referrer");
	http_response_header(req, "X-Frame-Options", "DENY");
	http_response_header(req, "Content-Security-Policy",
	                     "default-src 'none'; script-src 'unsafe-inline'; "
	                     "style-src 'unsafe-inline'; connect-src 'self'; img-src data:");
	http_reply(req, 200, "text/html; charset=utf-8", admin_status_page,
	           (size_t)admin_status_page_len);
}

/* GET /mcp: the MCP gateway's servers and sessions (src/mcp/mcp_registry.c). */
static json_t *mcp_admin_hook(void *arg)
{
	return mcp_admin_json();
}

static void admin_handle(struct http_request *req, void *arg)
{
	struct admin *a = arg;
	const char *path = req->path;
	bool get = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
	bool post = strcmp(req->method, "POST") == 0;
	bool page = strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0;

	http_response_header(req, "Cache-Control", "no-store");

	/* Liveness must answer even to probes that carry no key. */
	if (strcmp(path, "/healthz") == 0) {
		if (!get)
			method_not_allowed(req, "GET");
		else
			reply_text(req, 200, "ok\n");
		return;
	}
	/* Checked before routing, so that an unauthenticated caller learns
	 * nothing, not even which paths exist. */
	if (!authorized(a, req, page)) {
		reply_unauthorized(req, page);
		return;
	}

	if (strcmp(path, "/reload") == 0) {
		if (!post)
			method_not_allowed(req, "POST");
		else
			post_reload(a, req);
		return;
	}
	bool known = page || strcmp(path, "/readyz") == 0 || strcmp(path, "/metrics") == 0 ||
	             strcmp(path, "/status") == 0 || strcmp(path, "/instances") == 0 ||
	             strcmp(path, "/consumers") == 0 || strcmp(path, "/routes") == 0 ||
	             strcmp(path, "/transitions") == 0 || strncmp(path, "/consumers/", 11) == 0 ||
	             strcmp(path, "/mcp") == 0;
	if (!known) {
		http_reply_error(req, 404, "invalid_request_error", "not_found",
		                 "no admin endpoint %s", path);
		return;
	}
	if (!get) {
		method_not_allowed(req, "GET");
		return;
	}

	if (page)
		get_page(req);
	else if (strcmp(path, "/readyz") == 0) {
		bool ready = a->hooks.ready && a->hooks.ready(a->hooks.arg);
		reply_text(req, ready ? 200 : 503, ready ? "ready\n" : "not ready\n");
	} else if (strcmp(path, "/metrics") == 0)
		get_metrics(req);
	else if (strcmp(path, "/status") == 0)
		reply_hook(req, a->hooks.status, a->hooks.arg);
	else if (strcmp(path, "/instances") == 0)
		reply_hook(req, a->hooks.instances, a->hooks.arg);
	else if (strcmp(path, "/consumers") == 0)
		reply_hook(req, a->hooks.consumers, a->hooks.arg);
	else if (strcmp(path, "/routes") == 0)
		reply_hook(req, a->hooks.routes, a->hooks.arg);
	else if (strcmp(path, "/mcp") == 0)
		reply_hook(req, mcp_admin_hook, NULL);
	else if (strcmp(path, "/transitions") == 0)
		reply_json(req, 200, metrics_recent_transitions());
	else if (path[11] == '\0')
		http_reply_error(req, 404, "invalid_request_error", "consumer_not_found",
		                 "no consumer name given");
	else
		get_consumer(a, req, path + 11);
}

/* ---------------------------------------------------------------- life cycle */

void admin_configure(struct admin *a, const struct config *c)
{
	if (a == NULL)
		return;
	const char *addr = c->admin.address;
	if ((addr == NULL) != (a->address == NULL) ||
	    (addr && a->address && strcmp(addr, a->address) != 0))
		log_warn("reload: admin.listen changed; it changes only on restart");
	a->key_on = c->admin.key != NULL;
	if (a->key_on)
		sha256(c->admin.key, strlen(c->admin.key), a->key_sha256);
	else
		memset(a->key_sha256, 0, sizeof(a->key_sha256));
}

struct admin *admin_new(struct event_base *main_base, const struct config *c,
                        const struct admin_hooks *hooks)
{
	struct admin *a = calloc(1, sizeof(*a));
	if (a == NULL)
		return NULL;
	if (hooks)
		a->hooks = *hooks;
	if (c->admin.address == NULL) {
		log_info("admin API off (admin.listen not set)");
		admin_configure(a, c);
		return a;
	}
	a->address = strdup(c->admin.address);
	if (a->address == NULL)
		goto fail;
	admin_configure(a, c);

	int fd = admin_listen(&c->admin, &a->port);
	if (fd < 0)
		goto fail;
	struct http_limits lim = {
	        .max_header_size = ADMIN_MAX_HEADER,
	        .max_body_size = ADMIN_MAX_BODY,
	        .client_timeout = ADMIN_CLIENT_TIMEOUT_MS,
	        .keepalive_timeout = ADMIN_KEEPALIVE_MS,
	        .write_timeout = ADMIN_WRITE_TIMEOUT_MS,
	        .max_connections = ADMIN_MAX_CONNECTIONS,
	};
	a->http = http_server_new(main_base, &fd, 1, &lim, admin_handle, a);
	if (a->http == NULL) {
		close(fd);
		log_error("admin listen %s: cannot start the HTTP server", c->admin.address);
		goto fail;
	}
	if (!a->key_on)
		log_warn("admin API on %s has no key (admin.key: none): anyone who can reach it "
		         "can reload the configuration",
		         c->admin.address);
	log_info("admin API listening on %s (port %d)", c->admin.address, a->port);
	return a;
fail:
	free(a->address);
	free(a);
	return NULL;
}

int admin_port(const struct admin *a)
{
	return a && a->http ? a->port : 0;
}

void admin_free(struct admin *a)
{
	if (a == NULL)
		return;
	http_server_free(a->http);
	free(a->address);
	OPENSSL_cleanse(a->key_sha256, sizeof(a->key_sha256));
	free(a);
}
