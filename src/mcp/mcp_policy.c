/* mcp_policy.c — a tools/call's arguments as the text the route's request policies read.
 *
 * The request policies (prompt_guard, request_limits, moderation, plugins) read prompt text
 * in the shape of a client protocol (prompt.h). A tool call's text is the string values of
 * its arguments, wherever they sit in the arguments' tree; they become one user message of a
 * chat body, one text part each, in the order they appear. One message, so that a guard
 * reading "the last user message" sees every argument, and parts, so that prompt_guard joins
 * them with "\n" as it does a message's parts. The parts are the arguments' own JSON strings
 * (shared references, not copies): a policy that rewrites a part in place rewrites the
 * argument, and the gateway then re-serialises the call.
 */
#include "sluice/mcp_parts.h"

static bool collect(const json_t *v, json_t *parts, size_t depth, size_t *n)
{
	if (depth > MCP_POLICY_MAX_DEPTH)
		return false; /* text the policies could not see: the call is refused */
	if (json_is_string(v)) {
		json_t *part = json_pack("{s:s, s:O}", "type", "text", "text", v);
		if (part == NULL || json_array_append_new(parts, part) != 0)
			return false;
		(*n)++;
		return true;
	}
	if (json_is_array(v)) {
		size_t i;
		const json_t *x;
		json_array_foreach(v, i, x)
		{
			if (!collect(x, parts, depth + 1, n))
				return false;
		}
		return true;
	}
	if (json_is_object(v)) {
		const char *k;
		const json_t *x;
		json_object_foreach((json_t *)v, k, x)
		{
			if (!collect(x, parts, depth + 1, n))
				return false;
		}
	}
	return true; /* numbers, booleans, null: no text */
}

json_t *mcp_policy_body(const json_t *arguments, size_t *n_texts)
{
	json_t *parts = json_array();
	size_t n = 0;

	if (parts == NULL)
		return NULL;
	if (arguments != NULL && !collect(arguments, parts, 0, &n)) {
		json_decref(parts);
		return NULL;
	}
	if (n_texts != NULL)
		*n_texts = n;
	return json_pack("{s:[{s:s, s:o}]}", "messages", "role", "user", "content", parts);
}
