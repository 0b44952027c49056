/* mcp_log.h — what one MCP message did: the access-log line and the metrics (mcp_log.c). */
#ifndef SLUICE_MCP_LOG_H
#define SLUICE_MCP_LOG_H

#include <stddef.h>
#include <stdint.h>

#include "sluice/record.h"

struct metrics_shard;

/* Strings are borrowed for the call; NULL means none. */
struct mcp_log_record {
	const char *request_id;
	uint64_t start_unix_us;
	const char *client_ip;
	const char *http_method; /* POST, GET, DELETE */
	const char *route;
	const char *consumer;
	const char *key_fingerprint;
	const char *session;    /* hashed (mcp_session_hash), never the id itself */
	const char *method;     /* the JSON-RPC method; NULL for GET, DELETE and responses */
	const char *tool;       /* tools/call: the server's own tool name */
	const char *tool_label; /* the bounded metric label: a listed, allowed tool or "other" */
	const char *server;     /* the server that handled it; NULL for fan-out */
	const char *upstreams;  /* fan-out: the servers asked, comma-separated */
	int status;             /* HTTP status sent to the client */
	int upstream_status;
	const char *outcome; /* a fixed string: ok, error, denied, rate_limited, ... */
	/* What the route's request policies did to a tools/call, in order of first use: the
	 * model access log's "policy" field and sluice_policy_actions_total (strings are the
	 * snapshot's or fixed) */
	const struct record_policy *policies;
	int n_policies;
	int rpc_error; /* the gateway's JSON-RPC error code, 0 when none */
	uint64_t duration_us;
	uint64_t bytes_in, bytes_out;
};

/* The bounded "method" label: a known MCP method, "response", the HTTP method for GET and
 * DELETE, or "other". */
const char *mcp_method_label(const char *method, const char *http_method);
/* Format the JSON line (no newline) into buf; returns its length like snprintf. */
size_t mcp_log_format(const struct mcp_log_record *r, char *buf, size_t cap);
/* Access log line + sluice_mcp_requests_total + sluice_mcp_request_duration_seconds +
 * sluice_policy_actions_total. */
void mcp_log_write(struct metrics_shard *shard, const struct mcp_log_record *r);

#endif
