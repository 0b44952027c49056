/* external.c — operators' own policies: a shared object loaded at config load (plugin.h).
 *
 *   external: { path: /usr/lib/sluice/plugins/redact.so, config: {...} }
 *
 * The object is dlopened when the configuration is loaded (never per request), its table
 * checked against the ABI this Sluice speaks, and its conf_parse given `config` as JSON;
 * every failure is a configuration error at the entry. The entry then runs as a policy of
 * its own name, with the plugin's phases; this file only forwards the calls.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config_section.h"
#include "sluice/log.h"
#include "sluice/plugin.h"
#include "sluice/policy.h"
#include "sluice/policy_chain.h"
#include "sluice/prompt.h"

#define PLUGIN_NAME_MAX 128
#define PLUGIN_ERR_MAX  256

struct ext_conf {
	void *dl; /* dlopen handle, closed with the snapshot */
	const struct sluice_plugin *p;
	void *pconf; /* the plugin's own */
};

static const char *const keys[] = {"path", "config", NULL};
static const char *const required[] = {"path", NULL};

static const struct sluice_plugin_host host = {
        .abi_version = SLUICE_PLUGIN_ABI_VERSION,
        .size = sizeof(struct sluice_plugin_host),
        .log = log_write,
        .prompt_foreach = prompt_foreach,
};

static void ext_free(void *conf)
{
	struct ext_conf *e = conf;
	if (e == NULL)
		return;
	if (e->pconf != NULL)
		e->p->conf_free(e->pconf);
	if (e->dl != NULL)
		dlclose(e->dl);
	free(e);
}

static bool name_ok(const char *s)
{
	size_t n = 0;
	for (; s[n] != '\0'; n++) {
		char c = s[n];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '-') ||
		    n >= PLUGIN_NAME_MAX)
			return false;
	}
	return n > 0;
}

/* What is wrong with the plugin's table; NULL when it is usable. */
static const char *table_problem(const struct sluice_plugin *p, char *buf, size_t len)
{
	const unsigned all = POLICY_PHASE_REQUEST | POLICY_PHASE_RESPONSE;

	if (p->abi_version != SLUICE_PLUGIN_ABI_VERSION) {
		snprintf(buf, len, "was built for plugin ABI %u; this Sluice speaks version %u",
		         (unsigned)p->abi_version, SLUICE_PLUGIN_ABI_VERSION);
		return buf;
	}
	if (p->size < sizeof(struct sluice_plugin))
		return "has a plugin table smaller than plugin ABI 1's";
	if (p->name == NULL || !name_ok(p->name))
		return "has a name that is not letters, digits, '.', '_' and '-' (at most 128)";
	if (policy_find(p->name) != NULL) {
		snprintf(buf, len, "is named %s, like a built-in policy", p->name);
		return buf;
	}
	if (p->phases == 0 || (p->phases & ~all) != 0)
		return "declares no phase, or one this Sluice does not know";
	if (p->conf_parse == NULL || p->conf_free == NULL)
		return "has no conf_parse or conf_free";
	if ((p->phases & POLICY_PHASE_REQUEST) && p->on_request == NULL)
		return "declares the request phase without on_request";
	if ((p->phases & POLICY_PHASE_RESPONSE) &&
	    (p->response_begin == NULL || p->on_response_text == NULL || p->response_end == NULL))
		return "declares the response phase without response_begin, on_response_text and "
		       "response_end";
	return NULL;
}

static void *ext_parse(struct config_section *sec, const struct cnode *m, const char *path)
{
	char p[CSEC_PATH_LEN], buf[PLUGIN_ERR_MAX];
	size_t failed = csec_error_count(sec);
	const struct cnode *pv, *cv;
	struct ext_conf *e = NULL;
	json_t *config = NULL;

	if (m == NULL) {
		csec_error(sec, NULL, path, "needs a path: external: { path: /path/to/plugin.so }");
		return NULL;
	}
	if (!csec_keys(sec, m, path, keys, required) || (pv = csec_get(m, "path")) == NULL)
		return NULL;
	const char *file = csec_string(sec, pv, csec_path_key(p, path, "path"), CSEC_NONEMPTY);
	if (file == NULL)
		return NULL;
	if (file[0] != '/') {
		csec_error(sec, pv, p,
		           "must be an absolute path (a bare name would be searched for "
		           "in the system's library directories)");
		return NULL;
	}
	cv = csec_get(m, "config");
	config = cv ? csec_json(sec, cv, csec_path_key(buf, path, "config")) : json_null();
	if (config == NULL)
		return NULL; /* reported */
	if ((e = calloc(1, sizeof *e)) == NULL)
		goto fail;
	e->dl = dlopen(file, RTLD_NOW | RTLD_LOCAL);
	if (e->dl == NULL) {
		const char *why = dlerror();
		csec_error(sec, pv, p, "cannot load the plugin: %s", why ? why : "unknown error");
		goto fail;
	}
	sluice_plugin_fn fn;
	*(void **)&fn = dlsym(e->dl, SLUICE_PLUGIN_SYMBOL);
	if (fn == NULL) {
		csec_error(sec, pv, p, "%s has no %s() function: is it a Sluice plugin?", file,
		           SLUICE_PLUGIN_SYMBOL);
		goto fail;
	}
	e->p = fn();
	const char *problem = e->p ? table_problem(e->p, buf, sizeof buf) : "returned no table";
	if (problem != NULL) {
		csec_error(sec, pv, p, "%s %s", file, problem);
		goto fail;
	}
	char err[PLUGIN_ERR_MAX] = "";
	e->pconf = e->p->conf_parse(config, &host, err, sizeof err);
	if (e->pconf == NULL) {
		err[sizeof err - 1] = '\0';
		for (char *c = err; *c != '\0'; c++)
			if ((unsigned char)*c < 0x20)
				*c = ' ';
		csec_error(sec, cv ? cv : m, cv ? csec_path_key(p, path, "config") : path,
		           "plugin %s refused its config: %s", e->p->name,
		           err[0] ? err : "no reason given");
		goto fail;
	}
	json_decref(config);
	return e;
fail:
	if (csec_error_count(sec) == failed)
		csec_error(sec, m, path, "out of memory");
	json_decref(config);
	ext_free(e);
	return NULL;
}

static const char *ext_label(const void *conf)
{
	return ((const struct ext_conf *)conf)->p->name;
}

static unsigned ext_phases(const void *conf)
{
	return ((const struct ext_conf *)conf)->p->phases;
}

/* ---------------------------------------------------------------- forwarding */

static enum policy_verdict ext_request(const void *conf, struct policy_request *req)
{
	const struct ext_conf *e = conf;
	return e->p->on_request(e->pconf, req);
}

static void ext_request_cancel(const void *conf, struct policy_request *req)
{
	const struct ext_conf *e = conf;
	if (e->p->request_cancel != NULL)
		e->p->request_cancel(e->pconf, req);
}

/* Response states pair the plugin's own state with its table. */
struct ext_state {
	const struct sluice_plugin *p;
	void *state; /* the plugin's */
};

static void *ext_begin(const void *conf, struct policy_stream *s, unsigned choice)
{
	const struct ext_conf *e = conf;
	struct ext_state *st = malloc(sizeof *st);
	if (st == NULL)
		return NULL;
	st->p = e->p;
	st->state = e->p->response_begin(e->pconf, s, choice);
	if (st->state == NULL) {
		free(st);
		return NULL;
	}
	return st;
}

static enum policy_verdict ext_text(void *state, struct policy_text *t)
{
	struct ext_state *st = state;
	return st->p->on_response_text(st->state, t);
}

static enum policy_verdict ext_done(void *state, struct policy_text *t)
{
	struct ext_state *st = state;
	return st->p->on_response_done ? st->p->on_response_done(st->state, t) : POLICY_CONTINUE;
}

static void ext_end(void *state)
{
	struct ext_state *st = state;
	st->p->response_end(st->state);
	free(st);
}

const struct policy_def policy_external = {
        .name = "external",
        .phases = POLICY_PHASE_REQUEST | POLICY_PHASE_RESPONSE,
        .conf_parse = ext_parse,
        .conf_free = ext_free,
        .conf_label = ext_label,
        .conf_phases = ext_phases,
        .on_request = ext_request,
        .request_cancel = ext_request_cancel,
        .response_begin = ext_begin,
        .on_response_text = ext_text,
        .on_response_done = ext_done,
        .response_end = ext_end,
};
