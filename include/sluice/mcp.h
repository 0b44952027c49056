/* mcp.h — the MCP gateway: configuration, per-worker state and the entry point request.c calls.
 *
 * A route with `type: mcp` fronts one or more MCP servers (top-level `mcp_servers:`) speaking
 * the Streamable HTTP transport. Sluice is the MCP server its clients see: it answers
 * initialize by initialising every server of the route, merges their tools, prompts and
 * resources under a `<server><separator>` prefix, sends each call to the server that owns
 * it, and applies key-auth, tool allow/deny lists, request-rate limits, health, metrics and
 * the access log on the way. docs/mcp.md describes the behaviour; this header the pieces.
 *
 * Files: mcp_config.c (the keys), mcp_jsonrpc.c (message scanning), mcp_session.c
 * (session ids, cursors, event ids), mcp_glob.c (tool filters), mcp_merge.c (list merging),
 * mcp_gateway.c (one exchange with the servers), mcp_registry.c (workers' sessions, retained
 * snapshots, server states), mcp_probe.c (active health checks by ping), mcp_log.c (access
 * log line, metrics).
 */
#ifndef SLUICE_MCP_H
#define SLUICE_MCP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/config.h"

struct cnode;
struct event_base;
struct http_request;
struct worker;

/* Servers one MCP route may aggregate; a session names each of them by its slot. */
#define MCP_MAX_SERVERS 16
/* An upstream's Mcp-Session-Id longer than this is refused (the spec bounds nothing; real
 * servers use UUIDs). */
#define MCP_MAX_UPSTREAM_SID 128

/* ------------------------------------------------------------------ configuration */

/* Filter of tools, prompts or resources: glob patterns over the prefixed name ("search__*",
 * for resources the prefixed URI, "docs__file:///..."); `*` matches any run of bytes, `?` one
 * byte, `\` escapes the next. Empty allow = everything allowed. */
struct mcp_tool_filter {
	char **allow;
	size_t n_allow;
	char **deny;
	size_t n_deny;
};

struct mcp_server_state;

struct mcp_server_conf {
	char *name;
	size_t index;                   /* in config->mcp->servers */
	char *endpoint;                 /* http(s) URL of the Streamable HTTP endpoint */
	struct config_kv *auth_headers; /* sent upstream; the client's never are */
	size_t n_auth_headers;
	struct {
		uint64_t connect;    /* ms, default 5s */
		uint64_t first_byte; /* ms, default 60s */
		uint64_t idle;       /* ms, default 5m: gaps in a stream */
	} timeouts;
	bool tls_verify; /* default true */
	struct {
		bool enabled;      /* checks.active present */
		uint64_t interval; /* ms, default 10s */
		uint64_t timeout;  /* ms, default 2s */
		int successes;     /* default 1 */
		int failures;      /* default 2 */
	} check;
	/* The server as the quota and health modules see an instance: name "mcp:<name>", its
	 * request-rate limits, passive-check defaults, active.enabled when probed. */
	struct config_instance as_instance;
	/* Runtime state kept across reloads by name and endpoint (mcp_registry.c): attached by
	 * the main thread before the snapshot is published; not owned by the snapshot. */
	struct mcp_server_state *state;
};

struct mcp_conf {
	struct mcp_server_conf *servers;
	size_t n_servers;
};

struct mcp_route_conf {
	struct mcp_server_conf **servers; /* the route's servers, in slot order */
	size_t n_servers;
	struct mcp_tool_filter tools;
	struct mcp_tool_filter prompts;   /* by prefixed name */
	struct mcp_tool_filter resources; /* by prefixed URI (and URI template) */
	char *separator;                  /* default "__" */
	uint64_t session_idle_timeout;    /* ms, default 1h */
};

struct mcp_consumer_conf {
	struct mcp_tool_filter tools;
	struct mcp_tool_filter prompts;
	struct mcp_tool_filter resources;
	/* The consumer as the quota module sees one: its name and its tool-call limits (each
	 * limit's instance is a server's as_instance, or NULL for all servers). */
	struct config_consumer as_consumer;
};

/* The loader's side: errors go through report (config.c adds file:line:col). */
struct mcp_conf_ctx {
	void (*report)(void *arg, const struct cnode *at, const char *path, const char *msg);
	void *arg;
	struct config *c; /* the snapshot being built */
};

/* Top-level mcp_servers (node may be NULL). Before routes and consumers. */
void mcp_config_servers(struct mcp_conf_ctx *ctx, const struct cnode *node);
/* The `mcp:` section of a route with type: mcp (node NULL: reported as missing). */
void mcp_config_route(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                      struct config_route *r);
/* After config.c parsed a type: mcp route's `plugins:` (node, may be NULL) into r: refuses
 * the policies and keys that mean nothing over tool arguments (docs/mcp.md, "Policies"). */
void mcp_config_plugins(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                        const struct config_route *r);
/* A consumer's `mcp_tools:` (node may be NULL). */
void mcp_config_consumer(struct mcp_conf_ctx *ctx, const struct cnode *node, const char *path,
                         struct config_consumer *cs);
void mcp_config_free(struct mcp_conf *m);
void mcp_config_free_route(struct mcp_route_conf *m);
void mcp_config_free_consumer(struct mcp_consumer_conf *m);

/* ------------------------------------------------------------------ the process */

/* Main thread, once before the workers start (random session key). */
bool mcp_global_init(void);
/* Main thread, at start and on every reload, before the workers get c: attaches server
 * states, retires the servers that are gone (their sessions end), hands c to every
 * worker's list of snapshots sessions may run on. */
void mcp_publish(struct config *c);
/* Main thread: start the registry's periodic sweep and the servers' active checks. */
bool mcp_main_start(struct event_base *main_base);
void mcp_main_stop(void);
void mcp_global_free(void);

/* Admin API (main thread): servers with health and sessions. New reference. */
json_t *mcp_admin_json(void);

/* ------------------------------------------------------------------ workers */

struct mcp_worker;
/* Worker state (its snapshots, sessions, exchanges). Created on the main thread before
 * the worker runs; used by the worker; freed after it stopped. */
struct mcp_worker *mcp_worker_new(struct worker *w);
void mcp_worker_free(struct mcp_worker *mw);
/* Exchanges in flight on this worker (a draining worker waits for 0). */
size_t mcp_worker_active(const struct mcp_worker *mw);
/* Drain: end the long-lived server streams (GET) so that clients reconnect elsewhere. */
void mcp_worker_drain(struct mcp_worker *mw);
/* Shutdown: cancel and free every exchange. */
void mcp_worker_abort_all(struct mcp_worker *mw);

/* request.c: the request matched a route with type mcp. The module owns hr from here. */
void mcp_handle(struct worker *w, struct http_request *hr, const struct config_route *route);

#endif
