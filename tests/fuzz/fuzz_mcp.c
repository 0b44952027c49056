/* fuzz_mcp.c — libFuzzer target for what the MCP gateway reads from outside: JSON-RPC bodies
 * (classification, batches, the top-level scanner, the name splice, the arguments handed to
 * policies, list merging of a server's answer), the
 * Mcp-Session-Id and Last-Event-ID headers, list cursors and tool globs.
 *
 * Input: bytes split at the first two 0xff bytes into (header, body, pattern); each part is
 * fed to every parser that takes that kind of input. Build (tests/fuzz's CMake option, or by
 * hand): clang -fsanitize=fuzzer,address,undefined ... linked with sluice_core. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/mcp_parts.h"

static struct mcp_crypto *crypto;

static void seen(void *arg, unsigned slot, const char *name)
{
	(void)arg;
	(void)slot;
	(void)name;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (crypto == NULL) {
		static const unsigned char key[32] = {7};
		mcp_crypto_set_key(key);
		crypto = mcp_crypto_new();
	}
	const uint8_t *sep1 = memchr(data, 0xff, size);
	size_t hl = sep1 ? (size_t)(sep1 - data) : size;
	const uint8_t *body = sep1 ? sep1 + 1 : data + size;
	size_t rest = size - hl - (sep1 ? 1 : 0);
	const uint8_t *sep2 = memchr(body, 0xff, rest);
	size_t bl = sep2 ? (size_t)(sep2 - body) : rest;
	const uint8_t *pat = sep2 ? sep2 + 1 : body + bl;
	size_t pl = rest - bl - (sep2 ? 1 : 0);

	/* headers: a header value is a C string once http.c parsed it */
	char *h = malloc(hl + 1);
	if (h == NULL)
		return 0;
	memcpy(h, data, hl);
	h[hl] = '\0';
	struct mcp_session s;
	if (mcp_header_token(h, MCP_TOKEN_MAX))
		(void)mcp_session_decode(crypto, h, hl, &s);
	struct mcp_event_ids ids;
	if (mcp_event_ids_parse(&ids, h, hl)) {
		char out[2048];
		(void)mcp_event_ids_format(&ids, out, sizeof(out));
		mcp_event_ids_free(&ids);
	}
	struct mcp_cursor_part parts[MCP_MAX_SERVERS];
	size_t n;
	char buf[MCP_CURSOR_MAX];
	uint8_t sid[MCP_SID_BYTES] = {0};
	(void)mcp_cursor_decode(crypto, sid, 0, h, hl, parts, &n, buf, sizeof(buf));
	(void)mcp_version_index(h, hl);

	/* bodies and stream events: bytes with a length */
	struct mcp_scan sc;
	(void)mcp_scan_object((const char *)body, bl, &sc);
	struct mcp_span sp;
	(void)mcp_scan_member((const char *)body, bl, "params", &sp);
	json_t *m = json_loadb((const char *)body, bl, JSON_REJECT_DUPLICATES, NULL);
	if (m != NULL) {
		const char *method;
		(void)mcp_msg_classify(m, &method);
		size_t answered;
		(void)mcp_batch_check(m, MCP_MAX_BATCH, &answered);
		/* the splice must agree with the parsed message: the name, prefix cut */
		const json_t *params = json_object_get(m, "params");
		const json_t *name = json_object_get(params, "name");
		char *out = NULL;
		size_t ol = 0;
		if (json_is_string(name) &&
		    mcp_splice_param((const char *)body, bl, NULL, "name", json_string_value(name),
		                     json_string_length(name), json_string_length(name) / 2, &out,
		                     &ol)) {
			json_t *again = json_loadb(out, ol, JSON_REJECT_DUPLICATES, NULL);
			const json_t *n2 =
			        json_object_get(json_object_get(again, "params"), "name");
			size_t cut = json_string_length(name) / 2;
			if (!json_is_string(n2) ||
			    json_string_length(n2) != json_string_length(name) - cut ||
			    memcmp(json_string_value(n2), json_string_value(name) + cut,
			           json_string_length(n2)) != 0)
				abort();
			json_decref(again);
			free(out);
		}
		json_decref(mcp_policy_body(json_object_get(params, "arguments"), NULL));
		struct mcp_list_part lp = {1, "srv", m};
		const char *next[1];
		char *deny[] = {"srv__x*"};
		struct mcp_tool_filter f = {.deny = deny, .n_deny = 1};
		for (int k = MCP_LIST_TOOLS; k <= MCP_LIST_TEMPLATES; k++) {
			json_t *merged = mcp_merge_list((enum mcp_list)k, &lp, 1, "__", &f, NULL,
			                                next, seen, NULL);
			json_decref(merged);
		}
		const char *names[] = {"srv"};
		const json_t *res[] = {m};
		json_decref(mcp_merge_initialize("2025-06-18", names, res, 1, "sluice/fuzz"));
		(void)mcp_caps_of(json_object_get(m, "capabilities"));
		json_decref(m);
	}

	/* tool globs: the pattern from configuration, the name from a client */
	char *p = malloc(pl + 1);
	if (p != NULL) {
		memcpy(p, pat, pl);
		p[pl] = '\0';
		(void)mcp_glob_match(p, (const char *)body, bl);
		const char *names[] = {"srv", "tickets"};
		const char *r;
		(void)mcp_split_name((const char *)body, bl, "__", names, 2, &r);
		free(p);
	}
	free(h);
	return 0;
}
