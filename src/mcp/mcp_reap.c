/* mcp_reap.c — ending upstream MCP sessions the gateway no longer uses: DELETE, in the
 * background, on the main thread.
 *
 * When a reload removes a server (or changes its endpoint), every gateway session that used
 * it ends (mcp_registry.c). Its sessions on the servers stay open unless someone says so:
 * each gets a DELETE with its own Mcp-Session-Id, as the Streamable HTTP transport asks of a
 * client that is done — on the session's remaining servers and on the removed one, which
 * may still be running. Best effort: a server that does not answer, or answers anything,
 * is logged at debug level and never retried (it forgets idle sessions by itself); bounded:
 * MCP_REAP_INFLIGHT transfers at a time, MCP_REAP_QUEUE waiting, MCP_REAP_TIMEOUT_MS each;
 * asynchronous: the main loop never waits for one. Everything a DELETE needs is copied when
 * it is queued, so the snapshot it came from may go meanwhile.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/event.h>

#include "sluice/log.h"
#include "sluice/mcp_parts.h"
#include "sluice/upstream.h"

struct reap {
	TAILQ_ENTRY(reap) link;
	char *server;   /* for the log */
	char *endpoint; /* owned copies */
	char **headers; /* "Name: value": the server's auth, the session id, the version */
	size_t n_headers;
	bool tls_verify;
	uint64_t connect_ms;
	struct upstream_xfer x;
	bool running;
};

TAILQ_HEAD(reap_list, reap);

static struct upstream *reap_up; /* on the main loop */
static struct reap_list waiting = TAILQ_HEAD_INITIALIZER(waiting);
static struct reap_list running = TAILQ_HEAD_INITIALIZER(running);
static size_t n_waiting, n_running, n_dropped;

static void reap_next(void);

static void reap_free(struct reap *r)
{
	upstream_xfer_cleanup(&r->x);
	for (size_t i = 0; i < r->n_headers; i++)
		free(r->headers[i]);
	free(r->headers);
	free(r->server);
	free(r->endpoint);
	free(r);
}

static bool on_head(void *arg, long status)
{
	return true;
}

static size_t on_body(void *arg, const char *data, size_t len)
{
	return len; /* nothing to read in the answer */
}

static void on_done(void *arg, enum upstream_result res, const char *detail)
{
	struct reap *r = arg;
	if (res == UPSTREAM_OK)
		log_debug("mcp: DELETE of a session on server %s answered HTTP %ld", r->server,
		          r->x.status);
	else
		log_debug("mcp: DELETE of a session on server %s failed: %s: %s", r->server,
		          upstream_result_name(res), detail ? detail : "");
	TAILQ_REMOVE(&running, r, link);
	n_running--;
	reap_free(r);
	reap_next();
}

static const struct upstream_ops reap_ops = {
        .on_head = on_head,
        .on_body = on_body,
        .on_done = on_done,
};

/* Start waiting DELETEs while there is room. */
static void reap_next(void)
{
	struct reap *r;
	while (reap_up != NULL && n_running < MCP_REAP_INFLIGHT &&
	       (r = TAILQ_FIRST(&waiting)) != NULL) {
		TAILQ_REMOVE(&waiting, r, link);
		n_waiting--;
		upstream_xfer_init(&r->x, reap_up, &reap_ops, r);
		for (size_t i = 0; i < r->n_headers; i++)
			upstream_xfer_header(&r->x, r->headers[i]);
		struct upstream_timeouts to = {
		        .connect = r->connect_ms < MCP_REAP_TIMEOUT_MS ? r->connect_ms
		                                                       : MCP_REAP_TIMEOUT_MS,
		        .first_byte = MCP_REAP_TIMEOUT_MS,
		        .idle = MCP_REAP_TIMEOUT_MS,
		        .total = MCP_REAP_TIMEOUT_MS,
		};
		/* No keep-alive worth keeping: these are rare. */
		if (!upstream_xfer_start(&r->x, "DELETE", r->endpoint, NULL, 0, &to, r->tls_verify,
		                         1)) {
			log_debug("mcp: cannot start a DELETE to server %s", r->server);
			reap_free(r);
			continue;
		}
		TAILQ_INSERT_TAIL(&running, r, link);
		n_running++;
	}
}

static bool add_header(struct reap *r, const char *name, const char *value)
{
	size_t n = strlen(name) + 2 + strlen(value) + 1;
	char *line = malloc(n);
	if (line == NULL)
		return false;
	snprintf(line, n, "%s: %s", name, value);
	r->headers[r->n_headers++] = line;
	return true;
}

void mcp_reap_session(const struct mcp_server_conf *s, const struct mcp_upstream_session *up)
{
	if (reap_up == NULL || s->endpoint == NULL || up->sid_len == 0)
		return;
	if (n_waiting >= MCP_REAP_QUEUE) {
		if (n_dropped++ == 0)
			log_warn("mcp: more than %d server sessions to end at once: the rest are "
			         "left to expire on their servers",
			         MCP_REAP_QUEUE);
		return;
	}
	struct reap *r = calloc(1, sizeof(*r));
	if (r == NULL)
		return;
	r->server = strdup(s->name);
	r->endpoint = strdup(s->endpoint);
	r->headers = calloc(s->n_auth_headers + 2, sizeof(*r->headers));
	bool ok = r->server != NULL && r->endpoint != NULL && r->headers != NULL;
	for (size_t i = 0; ok && i < s->n_auth_headers; i++)
		ok = add_header(r, s->auth_headers[i].name, s->auth_headers[i].value);
	ok = ok && add_header(r, "Mcp-Session-Id", up->sid) &&
	     add_header(r, "MCP-Protocol-Version", mcp_versions[up->version]);
	if (!ok) {
		reap_free(r);
		return;
	}
	r->tls_verify = s->tls_verify;
	r->connect_ms = s->timeouts.connect;
	TAILQ_INSERT_TAIL(&waiting, r, link);
	n_waiting++;
	reap_next();
}

void mcp_reap_start(struct event_base *main_base)
{
	reap_up = upstream_new(main_base);
	if (reap_up == NULL)
		log_error("mcp: cannot create the transfer engine that ends server sessions; "
		          "removed servers' sessions are left to expire");
}

void mcp_reap_stop(void)
{
	struct reap *r;
	while ((r = TAILQ_FIRST(&running)) != NULL) {
		TAILQ_REMOVE(&running, r, link);
		upstream_xfer_cancel(&r->x);
		reap_free(r);
	}
	while ((r = TAILQ_FIRST(&waiting)) != NULL) {
		TAILQ_REMOVE(&waiting, r, link);
		reap_free(r);
	}
	n_running = n_waiting = 0;
	upstream_free(reap_up);
	reap_up = NULL;
}
