/* mcp_parts.h — the MCP gateway's inner pieces, shared by src/mcp and their unit tests:
 * JSON-RPC scanning, session ids, cursors, event ids, tool globs, list merging, the registry. */
#ifndef SLUICE_MCP_PARTS_H
#define SLUICE_MCP_PARTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/mcp.h"

/* ------------------------------------------------------------------ protocol versions */

/* The versions Sluice speaks, newest first (index = the version's number in tokens). */
#define MCP_N_VERSIONS 4
extern const char *const mcp_versions[MCP_N_VERSIONS];
/* Index of the version in [s, s+len), or -1. */
int mcp_version_index(const char *s, size_t len);
/* What a version allows: JSON-RPC batches only in 2025-03-26. */
bool mcp_version_allows_batch(int version);

/* ------------------------------------------------------------------ JSON-RPC */

/* Codes of the JSON-RPC errors the gateway makes (docs/mcp.md lists them). */
enum {
	MCP_ERR_PARSE = -32700,
	MCP_ERR_INVALID_REQUEST = -32600,
	MCP_ERR_METHOD_NOT_FOUND = -32601,
	MCP_ERR_INVALID_PARAMS = -32602,
	MCP_ERR_INTERNAL = -32603,
	MCP_ERR_RESOURCE_NOT_FOUND = -32002, /* the spec's, for resources/read */
	MCP_ERR_UNAUTHORIZED = -32001,
	MCP_ERR_FORBIDDEN = -32003,
	MCP_ERR_SESSION = -32004,
	MCP_ERR_RATE_LIMITED = -32029,
	MCP_ERR_POLICY = -32040, /* refused by the route's request policies */
	MCP_ERR_UPSTREAM = -32050,
	MCP_ERR_UPSTREAM_TIMEOUT = -32051,
};

enum mcp_msg_kind {
	MCP_MSG_INVALID,
	MCP_MSG_REQUEST,      /* method and id */
	MCP_MSG_NOTIFICATION, /* method, no id */
	MCP_MSG_RESPONSE,     /* id and exactly one of result / error */
};

/* What a parsed message is; *method (may be NULL) gets the method of requests and
 * notifications. Checks "jsonrpc":"2.0", the id's type (string or integer) and the shape. */
enum mcp_msg_kind mcp_msg_classify(const json_t *m, const char **method);

/* JSON-RPC batches (2025-03-26): at most this many messages in one. */
#define MCP_MAX_BATCH 64
enum mcp_batch_check {
	MCP_BATCH_OK,
	MCP_BATCH_EMPTY,
	MCP_BATCH_TOO_LARGE, /* more than max members */
	MCP_BATCH_MIXED,     /* responses with requests or notifications */
};
/* What the batch arr (a JSON array) holds: requests and notifications, or responses (the
 * 2025-03-26 transport's two kinds of batch). *answered gets how many members are answered:
 * requests, and members that are no valid message (each gets its own error). */
enum mcp_batch_check mcp_batch_check(const json_t *arr, size_t max, size_t *answered);

/*
 * A scan of one JSON object's top-level members, without building a tree: used on every
 * upstream stream event to tell the few that need rewriting (server-to-client requests,
 * resource notifications) from the many that pass as they are. Spans point into the input
 * and cover the raw JSON value (strings with their quotes). False when the bytes are not
 * one JSON object (then the event is passed through untouched).
 */
struct mcp_span {
	const char *p;
	size_t len; /* 0: absent */
};
struct mcp_scan {
	struct mcp_span id, method, result, error;
};
bool mcp_scan_object(const char *data, size_t len, struct mcp_scan *out);
/* The span holds the JSON string literal s (no escapes in s). */
bool mcp_span_is(const struct mcp_span *sp, const char *s);

/* The raw JSON value of member key (no escapes in key) of the object in [obj, obj+len):
 * false when obj is not one JSON object or has no such member (a key written with escapes
 * does not count). */
bool mcp_scan_member(const char *obj, size_t len, const char *key, struct mcp_span *out);
/*
 * A message's bytes with the first `cut` bytes of params.<field> (params.<sub>.<field> when
 * sub is not NULL) removed: how a prefixed tool, prompt or resource name goes to its server
 * without re-serialising the message. Only when that member is a plain string literal (no
 * escapes) whose bytes are value[0..vlen) — the caller's parsed value, so the splice is
 * exactly the rewrite the parsed message would get — and cut <= vlen, not inside a UTF-8
 * sequence. The new bytes in
 * *out (malloc'd, *out_len). False otherwise (the caller re-serialises).
 */
bool mcp_splice_param(const char *body, size_t blen, const char *sub, const char *field,
                      const char *value, size_t vlen, size_t cut, char **out, size_t *out_len);

/* Header values are visible ASCII (0x21..0x7e), 1..max bytes. */
bool mcp_header_token(const char *s, size_t max);

/* ------------------------------------------------------------------ session ids */

#define MCP_NO_CONSUMER 0xffffu
#define MCP_SID_BYTES   16

/* What a server said it offers at initialize (capabilities): which fan-outs reach it. */
enum {
	MCP_CAP_TOOLS = 1u << 0,
	MCP_CAP_PROMPTS = 1u << 1,
	MCP_CAP_RESOURCES = 1u << 2,
	MCP_CAP_LOGGING = 1u << 3,
	MCP_CAP_COMPLETIONS = 1u << 4,
};
/* The bits of an initialize result's capabilities object. */
uint8_t mcp_caps_of(const json_t *capabilities);

struct mcp_upstream_session {
	uint8_t slot;    /* the server's position in the route's mcp.servers */
	uint8_t version; /* the protocol version it answered (index) */
	uint8_t caps;    /* MCP_CAP_* */
	uint8_t sid_len; /* 0: the server runs without sessions */
	char sid[MCP_MAX_UPSTREAM_SID + 1];
};

struct mcp_session {
	uint64_t generation;        /* the snapshot the session started on */
	uint16_t route;             /* route index in that snapshot */
	uint16_t consumer;          /* consumer index, MCP_NO_CONSUMER for auth: none */
	uint8_t version;            /* the version the client and Sluice agreed on */
	uint8_t sid[MCP_SID_BYTES]; /* random: the session's identity */
	uint64_t created_ms;
	uint8_t n;
	struct mcp_upstream_session up[MCP_MAX_SERVERS];
};

/* AES-256-GCM with the process key; one context per thread (not thread-safe). */
struct mcp_crypto;
struct mcp_crypto *mcp_crypto_new(void);
void mcp_crypto_free(struct mcp_crypto *c);
/* The key (32 bytes): random at start (mcp_global_init); tests may set their own. */
void mcp_crypto_set_key(const unsigned char key[32]);
bool mcp_crypto_random_key(void);

/* The Mcp-Session-Id a client sees: "s1." + base64url(nonce | AES-GCM(session) | tag).
 * out needs MCP_TOKEN_MAX bytes. False only when out of space or OpenSSL fails. */
#define MCP_TOKEN_MAX 4096
bool mcp_session_encode(struct mcp_crypto *c, const struct mcp_session *s, char *out, size_t cap);
/* False for anything not minted by this process with its key: wrong format, wrong length,
 * failed authentication tag, inconsistent contents. */
bool mcp_session_decode(struct mcp_crypto *c, const char *tok, size_t len, struct mcp_session *out);
/* First 12 hex digits of SHA-256(sid): how logs and the admin API name a session. */
void mcp_session_hash(const uint8_t sid[MCP_SID_BYTES], char out[13]);

/* A merged list cursor: which servers still have pages, and their own cursors; bound to
 * the session (a cursor of another session does not decode). */
struct mcp_cursor_part {
	uint8_t slot;
	const char *cursor; /* decode: points into the caller's buffer (NUL-terminated) */
	size_t len;
};
#define MCP_CURSOR_MAX 8192
bool mcp_cursor_encode(struct mcp_crypto *c, const uint8_t sid[MCP_SID_BYTES], uint8_t kind,
                       const struct mcp_cursor_part *parts, size_t n, char *out, size_t cap);
/* buf (cap bytes) receives the decoded upstream cursors the parts point into. */
bool mcp_cursor_decode(struct mcp_crypto *c, const uint8_t sid[MCP_SID_BYTES], uint8_t kind,
                       const char *tok, size_t len, struct mcp_cursor_part *parts, size_t *n,
                       char *buf, size_t cap);

/* Event ids of merged streams: "<slot>:<base64url(upstream id)>" pairs joined by ".", the
 * last id of every server seen so far, so that Last-Event-ID resumes each of them. */
struct mcp_event_ids {
	char *id[MCP_MAX_SERVERS]; /* owned; NULL: none yet */
};
void mcp_event_ids_free(struct mcp_event_ids *e);
/* Record slot's upstream id (copied). */
bool mcp_event_ids_set(struct mcp_event_ids *e, unsigned slot, const char *id, size_t len);
/* The composite into out (NUL-terminated); false when it does not fit. */
bool mcp_event_ids_format(const struct mcp_event_ids *e, char *out, size_t cap);
/* Parse a Last-Event-ID; false when malformed (then it is ignored). */
bool mcp_event_ids_parse(struct mcp_event_ids *e, const char *s, size_t len);

/* ------------------------------------------------------------------ tool filters */

bool mcp_glob_match(const char *pat, const char *s, size_t len);
/* The route's filter, then the consumer's (may be NULL): allow lists (when not empty) must
 * match and no deny pattern may. */
bool mcp_tool_allowed(const struct mcp_tool_filter *route, const struct mcp_tool_filter *consumer,
                      const char *name, size_t len);

/* ------------------------------------------------------------------ list merging */

enum mcp_list {
	MCP_LIST_TOOLS,
	MCP_LIST_PROMPTS,
	MCP_LIST_RESOURCES,
	MCP_LIST_TEMPLATES,
};
/* "tools/list" … → the list kind; false for other methods. */
bool mcp_list_of_method(const char *method, enum mcp_list *out);
const char *
mcp_list_key(enum mcp_list k); /* "tools", "prompts", "resources", "resourceTemplates" */
const char *mcp_list_field(enum mcp_list k); /* "name", "name", "uri", "uriTemplate" */

struct mcp_list_part {
	unsigned slot;
	const char *server;   /* the prefix */
	const json_t *result; /* the server's result object (borrowed) */
};
/* Called for every tool kept (unprefixed name), e.g. to learn metric labels. */
typedef void (*mcp_tool_seen_fn)(void *arg, unsigned slot, const char *name);
/*
 * The merged result {<key>: [...], "nextCursor"?: set by the caller}: items of each part
 * in order, their name (uri) prefixed "<server><sep>", filtered by the route's and the
 * consumer's filter of that kind (tools, prompts, resources; either may be NULL).
 * Items without a string name are dropped. next[slot] gets the part's nextCursor (borrowed,
 * NULL when none). New reference; NULL when out of memory.
 */
json_t *mcp_merge_list(enum mcp_list kind, const struct mcp_list_part *parts, size_t n,
                       const char *sep, const struct mcp_tool_filter *route_filter,
                       const struct mcp_tool_filter *consumer_filter, const char **next,
                       mcp_tool_seen_fn seen, void *seen_arg);
/* The merged initialize result: version, capabilities (union of tools, prompts, resources,
 * logging, completions), serverInfo {name, version}, instructions (each server's, labelled). */
json_t *mcp_merge_initialize(const char *version, const char *const *servers,
                             const json_t *const *results, size_t n, const char *name);
/* Split a prefixed name: the server (one of names[]) whose "<name><sep>" starts it. Returns
 * the index, -1 when none; *rest gets what follows the separator. */
int mcp_split_name(const char *s, size_t len, const char *sep, const char *const *names, size_t n,
                   const char **rest);

/* ------------------------------------------------------------------ policies */

/* Arguments nested deeper than this are refused on routes with plugins: text the policies
 * could not see must not reach the server. */
#define MCP_POLICY_MAX_DEPTH 64
/* A chat body {"messages":[{"role":"user","content":[{"type":"text","text":s}...]}]} with
 * every string value of arguments (may be NULL) as a part, in order; the parts share the
 * arguments' JSON strings (mcp_policy.c). *n_texts (may be NULL) gets their number. NULL
 * when out of memory or nested deeper than MCP_POLICY_MAX_DEPTH. New reference. */
json_t *mcp_policy_body(const json_t *arguments, size_t *n_texts);

/* ------------------------------------------------------------------ registry */

struct mcp_server_state;
/* The state of a server by name and endpoint (created on first use; never freed before
 * mcp_global_free). */
struct mcp_server_state *mcp_server_state_get(const char *name, const char *endpoint);
bool mcp_server_retired(const struct mcp_server_state *st);
/* Its number (0, 1, 2 … in order of creation, never reused) and its endpoint. */
size_t mcp_server_index(const struct mcp_server_state *st);
const char *mcp_server_endpoint(const struct mcp_server_state *st);
struct instance_state *mcp_server_health(const struct mcp_server_state *st);
/* A metric label for tool: the registered name when the server listed it, else "other". */
const char *mcp_server_tool_label(struct mcp_server_state *st, const char *tool);
void mcp_server_tool_learn(struct mcp_server_state *st, const char *tool);
/* Probe session (mcp_probe.c): kept on the state so a reload keeps it. */

/* Ending upstream sessions (mcp_reap.c, main thread): DELETE with the upstream session's
 * Mcp-Session-Id to server s, in the background; what it needs is copied. At most
 * MCP_REAP_INFLIGHT at a time, MCP_REAP_QUEUE waiting (more are dropped, and logged), each
 * within MCP_REAP_TIMEOUT_MS; failures are logged at debug level and not retried. */
#define MCP_REAP_INFLIGHT   16
#define MCP_REAP_QUEUE      4096
#define MCP_REAP_TIMEOUT_MS 5000
void mcp_reap_start(struct event_base *main_base);
void mcp_reap_session(const struct mcp_server_conf *s, const struct mcp_upstream_session *up);
void mcp_reap_stop(void);

/* The worker side of the registry (mcp_registry.c). */
struct mcp_worker_reg;
/* The snapshot of generation gen (new reference), or NULL when it is gone. */
struct config *mcp_worker_snapshot(struct mcp_worker *mw, uint64_t gen);
/* A message of session s was seen on this worker (route's idle timeout). first: it is
 * being created (initialize). */
void mcp_worker_session_seen(struct mcp_worker *mw, const struct mcp_session *s, const char *route,
                             const char *consumer, uint64_t idle_ms);
void mcp_worker_session_closed(struct mcp_worker *mw, const struct mcp_session *s);
struct mcp_crypto *mcp_worker_crypto(struct mcp_worker *mw);

#endif
