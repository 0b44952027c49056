/* mcp_glob.c — tool allow/deny lists: glob patterns over prefixed tool names. */
#include <string.h>

#include "sluice/mcp_parts.h"

/*
 * `*` any run of bytes (also empty), `?` one byte, `\x` the byte x; everything else is
 * itself. The classic two-pointer walk: on a mismatch, go back to the last `*` and let it
 * swallow one byte more, so the time is O(|pattern| × |name|) at worst, with no recursion.
 */
bool mcp_glob_match(const char *pat, const char *s, size_t len)
{
	const char *p = pat, *star = NULL;
	size_t i = 0, star_i = 0;

	while (i < len) {
		if (*p == '*') {
			star = ++p;
			star_i = i;
			continue;
		}
		if (*p != '\0') {
			const char *q = p;
			char want = *q;
			bool any = want == '?';
			if (want == '\\' && q[1] != '\0')
				want = *++q;
			if (any || s[i] == want) {
				p = q + 1;
				i++;
				continue;
			}
		}
		if (star == NULL)
			return false;
		p = star;
		i = ++star_i;
	}
	while (*p == '*')
		p++;
	return *p == '\0';
}

static bool any_match(char *const *pats, size_t n, const char *name, size_t len)
{
	for (size_t i = 0; i < n; i++)
		if (mcp_glob_match(pats[i], name, len))
			return true;
	return false;
}

static bool filter_allows(const struct mcp_tool_filter *f, const char *name, size_t len)
{
	if (f == NULL)
		return true;
	if (f->n_allow > 0 && !any_match(f->allow, f->n_allow, name, len))
		return false;
	return !any_match(f->deny, f->n_deny, name, len);
}

bool mcp_tool_allowed(const struct mcp_tool_filter *route, const struct mcp_tool_filter *consumer,
                      const char *name, size_t len)
{
	return filter_allows(route, name, len) && filter_allows(consumer, name, len);
}
