/* mcp_merge.c — many servers as one: merged initialize results and lists, prefixed names. */
#include <stdio.h>
#include <string.h>

#include "sluice/mcp_parts.h"

bool mcp_list_of_method(const char *method, enum mcp_list *out)
{
	static const char *const methods[] = {"tools/list", "prompts/list", "resources/list",
	                                      "resources/templates/list"};
	for (size_t i = 0; method != NULL && i < sizeof(methods) / sizeof(methods[0]); i++)
		if (strcmp(method, methods[i]) == 0) {
			*out = (enum mcp_list)i;
			return true;
		}
	return false;
}

const char *mcp_list_key(enum mcp_list k)
{
	static const char *const keys[] = {"tools", "prompts", "resources", "resourceTemplates"};
	return keys[k];
}

const char *mcp_list_field(enum mcp_list k)
{
	static const char *const fields[] = {"name", "name", "uri", "uriTemplate"};
	return fields[k];
}

int mcp_split_name(const char *s, size_t len, const char *sep, const char *const *names, size_t n,
                   const char **rest)
{
	size_t sl = strlen(sep);
	const char *hit = len >= sl ? memmem(s, len, sep, sl) : NULL;
	if (hit == NULL)
		return -1;
	size_t pl = (size_t)(hit - s);
	for (size_t i = 0; i < n; i++)
		if (strlen(names[i]) == pl && memcmp(names[i], s, pl) == 0) {
			*rest = hit + sl;
			return (int)i;
		}
	return -1;
}

json_t *mcp_merge_list(enum mcp_list kind, const struct mcp_list_part *parts, size_t n,
                       const char *sep, const struct mcp_tool_filter *route_filter,
                       const struct mcp_tool_filter *consumer_filter, const char **next,
                       mcp_tool_seen_fn seen, void *seen_arg)
{
	const char *key = mcp_list_key(kind), *field = mcp_list_field(kind);
	json_t *items = json_array(), *out = json_object();
	char small[512];

	if (items == NULL || out == NULL)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		const json_t *list = json_object_get(parts[i].result, key);
		const json_t *nc = json_object_get(parts[i].result, "nextCursor");
		size_t j;
		json_t *item;
		if (next != NULL)
			next[i] = json_is_string(nc) && json_string_length(nc) > 0
			                  ? json_string_value(nc)
			                  : NULL;
		if (!json_is_array(list))
			continue;
		json_array_foreach(list, j, item)
		{
			const json_t *name = json_object_get(item, field);
			if (!json_is_object(item) || !json_is_string(name))
				continue;
			size_t sl = strlen(parts[i].server), pl = strlen(sep),
			       nl = json_string_length(name);
			size_t total = sl + pl + nl;
			char *pref = total < sizeof(small) ? small : malloc(total + 1);
			if (pref == NULL)
				goto fail;
			memcpy(pref, parts[i].server, sl);
			memcpy(pref + sl, sep, pl);
			memcpy(pref + sl + pl, json_string_value(name), nl);
			pref[total] = '\0';
			bool keep = mcp_tool_allowed(route_filter, consumer_filter, pref, total);
			json_t *copy = keep ? json_copy((json_t *)item) : NULL;
			json_t *ns = copy ? json_stringn(pref, total) : NULL;
			if (pref != small)
				free(pref);
			if (!keep)
				continue;
			if (copy == NULL || ns == NULL ||
			    json_object_set_new(copy, field, ns) != 0 ||
			    json_array_append_new(items, copy) != 0) {
				json_decref(copy);
				goto fail;
			}
			if (kind == MCP_LIST_TOOLS && seen != NULL)
				seen(seen_arg, parts[i].slot, json_string_value(name));
		}
	}
	if (json_object_set_new(out, key, items) != 0) {
		items = NULL;
		goto fail;
	}
	return out;
fail:
	json_decref(items);
	json_decref(out);
	return NULL;
}

uint8_t mcp_caps_of(const json_t *caps)
{
	static const char *const names[] = {"tools", "prompts", "resources", "logging",
	                                    "completions"};
	uint8_t bits = 0;
	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (json_is_object(json_object_get(caps, names[i])))
			bits |= (uint8_t)(1u << i);
	return bits;
}

/* Union of one capability object into acc (sub-flags such as listChanged OR-ed). */
static void cap_union(json_t *acc, const json_t *caps, const char *name)
{
	const json_t *c = json_object_get(caps, name);
	if (!json_is_object(c))
		return;
	json_t *a = json_object_get(acc, name);
	if (a == NULL) {
		a = json_object();
		if (a == NULL || json_object_set_new(acc, name, a) != 0)
			return;
	}
	const char *k;
	json_t *v;
	json_object_foreach((json_t *)c, k, v)
	{
		if (json_is_true(v))
			json_object_set_new(a, k, json_true());
	}
}

json_t *mcp_merge_initialize(const char *version, const char *const *servers,
                             const json_t *const *results, size_t n, const char *name)
{
	json_t *caps = json_object(), *out = NULL, *instr = NULL;
	static const char *const kinds[] = {"tools", "prompts", "resources", "logging",
	                                    "completions"};

	if (caps == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		const json_t *c = json_object_get(results[i], "capabilities");
		for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++)
			cap_union(caps, c, kinds[k]);
		const json_t *in = json_object_get(results[i], "instructions");
		if (json_is_string(in) && json_string_length(in) > 0) {
			json_t *line = json_sprintf("%s%s: %s", instr ? "\n\n" : "", servers[i],
			                            json_string_value(in));
			if (line == NULL)
				continue;
			if (instr == NULL) {
				instr = line;
			} else {
				json_t *joined = json_sprintf("%s%s", json_string_value(instr),
				                              json_string_value(line));
				json_decref(line);
				if (joined != NULL) {
					json_decref(instr);
					instr = joined;
				}
			}
		}
	}
	out = json_pack("{s:s, s:o, s:{s:s, s:s}}", "protocolVersion", version, "capabilities",
	                caps, "serverInfo", "name", name, "version", SLUICE_VERSION);
	if (out != NULL && instr != NULL)
		json_object_set(out, "instructions", instr);
	json_decref(instr);
	return out;
}
