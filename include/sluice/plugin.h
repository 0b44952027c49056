/* plugin.h — the ABI of operators' own policies: shared objects loaded with dlopen at config load.
 *
 * A plugin is a shared object that exports one function,
 *
 *     const struct sluice_plugin *sluice_plugin(void);
 *
 * returning a static table: the ABI version it was built for, its name, and the same phase
 * functions as a built-in policy (policy.h), with one difference: its configuration arrives
 * as JSON (the `config:` value of its entry) rather than as YAML nodes. A route loads it with
 *
 *     plugins:
 *       - external: { path: /usr/lib/sluice/plugins/redact.so, config: { fields: [email] } }
 *
 * Sluice dlopens path (an absolute path) when it loads the configuration, checks the version,
 * and calls conf_parse with config; a missing file, a missing symbol, another ABI version or a
 * refused config is a configuration error at the entry's line, and a reload keeps the running
 * configuration. The object stays loaded until the last snapshot using it is freed. Loading
 * the same path again (a reload) reuses the loaded object: install a new build under a new
 * path.
 *
 * The rules of policy.h hold: phase functions run on the worker threads, concurrently, with
 * conf shared and read-only; per-request and per-choice state is the plugin's own; never
 * block the loop (use env->base and env->upstream for anything that waits). See
 * docs/plugins.md and examples/plugins/redact.c.
 *
 * Versioning: SLUICE_PLUGIN_ABI_VERSION changes whenever this table, the host table, or a
 * type they use (policy.h, prompt.h, the JSON library) changes incompatibly; a plugin built
 * for another version is refused. Fields may be added at the end of the host table without a
 * version change: check host->size before using a field past the ones you know.
 */
#ifndef SLUICE_PLUGIN_H
#define SLUICE_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "sluice/log.h"
#include "sluice/policy.h"
#include "sluice/prompt.h"

#define SLUICE_PLUGIN_ABI_VERSION 1u
#define SLUICE_PLUGIN_SYMBOL      "sluice_plugin"

/* What Sluice offers a plugin; valid for the life of the process. */
struct sluice_plugin_host {
	uint32_t abi_version; /* SLUICE_PLUGIN_ABI_VERSION */
	uint32_t size;        /* sizeof(struct sluice_plugin_host) of the running Sluice */
	/* The error log (log.h), with Sluice's levels. */
	void (*log)(enum log_level level, const char *fmt, ...)
	        __attribute__((format(printf, 2, 3)));
	/* prompt_foreach (prompt.h): the text of a client body by role, in every protocol. */
	bool (*prompt_foreach)(json_t *body, enum proto proto, unsigned roles, bool last_only,
	                       prompt_text_fn fn, void *arg);
};

struct sluice_plugin {
	uint32_t abi_version; /* SLUICE_PLUGIN_ABI_VERSION */
	uint32_t size;        /* sizeof(struct sluice_plugin) */
	const char *name;     /* its name in metrics and logs: letters, digits, '.', '_', '-';
	                         not a built-in policy's name */
	unsigned phases;      /* policy_phase_bits */

	/* config is the entry's `config:` value (null when absent), borrowed for the call.
	 * Returns the plugin's immutable state, or NULL with err filled (one line, no
	 * newline: it becomes a configuration error at the entry). */
	void *(*conf_parse)(const json_t *config, const struct sluice_plugin_host *host, char *err,
	                    size_t errlen);
	void (*conf_free)(void *conf);

	/* As in struct policy_def (policy.h); NULL where the plugin has no such phase. */
	enum policy_verdict (*on_request)(const void *conf, struct policy_request *req);
	void (*request_cancel)(const void *conf, struct policy_request *req);
	void *(*response_begin)(const void *conf, struct policy_stream *s, unsigned choice);
	enum policy_verdict (*on_response_text)(void *state, struct policy_text *t);
	enum policy_verdict (*on_response_done)(void *state, struct policy_text *t);
	void (*response_end)(void *state);
};

typedef const struct sluice_plugin *(*sluice_plugin_fn)(void);

#endif
