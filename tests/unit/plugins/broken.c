/* broken.c — plugins the loader must refuse (test_policy_external): built once with
 * BROKEN_BAD_ABI (a table for another ABI version) and once with BROKEN_NO_SYMBOL (no
 * sluice_plugin function at all). */
#include "sluice/plugin.h"

#ifdef BROKEN_BAD_ABI
static void *parse(const json_t *config, const struct sluice_plugin_host *host, char *err,
                   size_t errlen)
{
	return NULL;
}

static void conf_free(void *conf)
{
}

static enum policy_verdict on_request(const void *conf, struct policy_request *req)
{
	return POLICY_CONTINUE;
}

static const struct sluice_plugin plugin = {
        .abi_version = SLUICE_PLUGIN_ABI_VERSION + 98,
        .size = sizeof(struct sluice_plugin),
        .name = "broken",
        .phases = POLICY_PHASE_REQUEST,
        .conf_parse = parse,
        .conf_free = conf_free,
        .on_request = on_request,
};

const struct sluice_plugin *sluice_plugin(void)
{
	return &plugin;
}
#endif

#ifdef BROKEN_NO_SYMBOL
int sluice_not_a_plugin(void)
{
	return 0;
}
#endif
