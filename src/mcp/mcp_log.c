/* mcp_log.c — one access-log line and one metric sample per MCP message.
 *
 * The line is JSON with a fixed shape, printed directly (like accesslog.c does for model
 * requests) and written through the access log's descriptor. Metric labels come only from
 * the configuration and fixed sets: the tool label is a tool the server listed and the
 * route allowed, or "other" (mcp_registry.c bounds how many).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "sluice/accesslog.h"
#include "sluice/mcp_log.h"
#include "sluice/metrics.h"

#define LINE_MAX_BYTES 4096

const char *mcp_method_label(const char *method, const char *http_method)
{
	static const char *const known[] = {
	        "initialize",
	        "ping",
	        "tools/list",
	        "tools/call",
	        "prompts/list",
	        "prompts/get",
	        "resources/list",
	        "resources/templates/list",
	        "resources/read",
	        "resources/subscribe",
	        "resources/unsubscribe",
	        "completion/complete",
	        "logging/setLevel",
	        "notifications/initialized",
	        "notifications/cancelled",
	        "notifications/progress",
	        "notifications/roots/list_changed",
	        "batch", /* a JSON-RPC batch as a whole (each member has its own line) */
	};
	if (method == NULL) {
		if (http_method != NULL && strcmp(http_method, "GET") == 0)
			return "GET";
		if (http_method != NULL && strcmp(http_method, "DELETE") == 0)
			return "DELETE";
		return http_method != NULL && strcmp(http_method, "POST") == 0 ? "response"
		                                                               : "other";
	}
	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strcmp(known[i], method) == 0)
			return known[i];
	return "other";
}

struct out {
	char *buf;
	size_t cap, len;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (o->len < o->cap) {
		size_t room = o->cap - o->len;
		memcpy(o->buf + o->len, s, n < room ? n : room);
	}
	o->len += n;
}

static void puts_(struct out *o, const char *s)
{
	put(o, s, strlen(s));
}

static void put_str(struct out *o, const char *key, const char *v)
{
	static const char hex[] = "0123456789abcdef";
	put(o, ",\"", 2);
	puts_(o, key);
	put(o, "\":", 2);
	if (v == NULL) {
		put(o, "null", 4);
		return;
	}
	put(o, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
		if (*p == '"' || *p == '\\') {
			char e[2] = {'\\', (char)*p};
			put(o, e, 2);
		} else if (*p < 0x20 || *p == 0x7f) {
			char u[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
			put(o, u, 6);
		} else {
			put(o, (const char *)p, 1);
		}
	}
	put(o, "\"", 1);
}

static void put_num(struct out *o, const char *key, uint64_t v, bool null_if_zero)
{
	char tmp[48];
	int n = null_if_zero && v == 0 ? snprintf(tmp, sizeof(tmp), ",\"%s\":null", key)
	                               : snprintf(tmp, sizeof(tmp), ",\"%s\":%" PRIu64, key, v);
	put(o, tmp, (size_t)n);
}

size_t mcp_log_format(const struct mcp_log_record *r, char *buf, size_t cap)
{
	struct out o = {buf, cap ? cap - 1 : 0, 0};
	char tmp[64];
	time_t sec = (time_t)(r->start_unix_us / 1000000u);
	struct tm tm;
	gmtime_r(&sec, &tm);
	size_t n = strftime(tmp, sizeof(tmp), "{\"time\":\"%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(tmp + n, sizeof(tmp) - n, ".%03uZ\"",
	         (unsigned)(r->start_unix_us / 1000u % 1000u));
	puts_(&o, tmp);
	put(&o, ",\"type\":\"mcp\"", 13);
	put_str(&o, "request_id", r->request_id);
	put_str(&o, "http_method", r->http_method);
	put_str(&o, "client_ip", r->client_ip);
	put_str(&o, "route", r->route);
	put_str(&o, "consumer", r->consumer);
	put_str(&o, "key_fingerprint", r->key_fingerprint);
	put_str(&o, "session", r->session);
	put_str(&o, "rpc_method", r->method);
	put_str(&o, "tool", r->tool);
	put_str(&o, "upstream", r->server ? r->server : r->upstreams);
	put_num(&o, "status", (uint64_t)(r->status > 0 ? r->status : 0), true);
	put_num(&o, "upstream_status", (uint64_t)(r->upstream_status > 0 ? r->upstream_status : 0),
	        true);
	put_str(&o, "outcome", r->outcome);
	/* the same shape as the model access log's "policy" (accesslog.c) */
	if (r->n_policies > 0) {
		puts_(&o, ",\"policy\":[");
		for (int i = 0; i < r->n_policies && i < RECORD_MAX_POLICY_ACTIONS; i++) {
			/* put_str writes ",\"key\":v": the object opens with a member of its own */
			snprintf(tmp, sizeof(tmp), "%s{\"count\":%u", i ? "," : "",
			         r->policies[i].count);
			puts_(&o, tmp);
			put_str(&o, "policy", r->policies[i].policy);
			put_str(&o, "action", r->policies[i].action);
			puts_(&o, "}");
		}
		puts_(&o, "]");
	} else {
		puts_(&o, ",\"policy\":null");
	}
	if (r->rpc_error != 0) {
		snprintf(tmp, sizeof(tmp), ",\"rpc_error\":%d", r->rpc_error);
		puts_(&o, tmp);
	} else {
		puts_(&o, ",\"rpc_error\":null");
	}
	snprintf(tmp, sizeof(tmp), ",\"duration_ms\":%" PRIu64 ".%03u", r->duration_us / 1000,
	         (unsigned)(r->duration_us % 1000));
	puts_(&o, tmp);
	put_num(&o, "bytes_in", r->bytes_in, false);
	put_num(&o, "bytes_out", r->bytes_out, false);
	put(&o, "}", 1);
	if (cap)
		buf[o.len < o.cap ? o.len : o.cap] = '\0';
	return o.len;
}

void mcp_log_write(struct metrics_shard *shard, const struct mcp_log_record *r)
{
	char line[LINE_MAX_BYTES];
	size_t n = mcp_log_format(r, line, sizeof(line));
	if (n < sizeof(line) - 1)
		accesslog_write_line(line, n);
	const char *method = mcp_method_label(r->method, r->http_method);
	const char *tool = r->tool_label ? r->tool_label : "";
	metrics_record_mcp(shard, r->route ? r->route : "", r->server ? r->server : "", method,
	                   tool, r->outcome ? r->outcome : "ok", r->duration_us);
	metrics_record_policies(shard, r->route ? r->route : "", r->policies, r->n_policies);
}
