/* fuzz_policy.h — what the policy fuzz targets share: a chat route whose plugins: list is
 * given as YAML, loaded once at start-up (a config that does not load is the target's bug). */
#ifndef SLUICE_FUZZ_POLICY_H
#define SLUICE_FUZZ_POLICY_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config.h"

/* plugins: the items of the route's plugins: list, each line indented by four spaces. */
static inline struct config *fuzz_chat_route(const char *plugins)
{
	char yaml[4096];
	struct config_errors e;
	int n = snprintf(yaml, sizeof yaml,
	                 "instances: [{ name: a, provider: openai }]\n"
	                 "routes:\n"
	                 "  - name: chat\n"
	                 "    paths: [/v1/chat/completions]\n"
	                 "    targets: [{ instance: a }]\n"
	                 "    plugins:\n%s",
	                 plugins);
	if (n < 0 || (size_t)n >= sizeof yaml)
		abort();
	struct config *c = config_load_string(yaml, (size_t)n, "fuzz.yaml", &e);
	if (c == NULL) {
		for (size_t k = 0; k < e.n; k++)
			fprintf(stderr, "%s\n", e.msgs[k]);
		abort();
	}
	return c;
}

#endif
