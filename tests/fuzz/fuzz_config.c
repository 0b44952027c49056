/* fuzz_config.c — libFuzzer target: the configuration loader over arbitrary YAML.
 *
 * Whatever the text, config_load_string returns a snapshot or errors, never
 * crashes, leaks (LeakSanitizer runs after every input) or runs away: aliases
 * that multiply (billion laughs) and deep nesting are refused by budget, which the
 * per-input timeout of scripts/fuzz.sh would catch. The input is an exact-size
 * heap copy, not NUL-terminated. Inputs are bounded (a real file is a few KiB)
 * so that a run spends its time on structure, not on size.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/config.h"
#include "sluice/log.h"

#include "fuzz.h"

#define FUZZ_CONFIG_MAX_INPUT (64 * 1024)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	log_set_level(LOG_LEVEL_ERROR);
	/* ${VAR} references resolve against the environment: give a few a value. */
	setenv("FUZZ_KEY", "sk-fuzz", 1);
	setenv("FUZZ_EMPTY", "", 1);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > FUZZ_CONFIG_MAX_INPUT)
		return 0;
	char *buf = fuzz_exact_copy(data, size);
	if (buf == NULL)
		return 0;

	struct config_errors errs;
	struct config *c = config_load_string(buf, size, "fuzz.yaml", &errs);
	/* One of the two, and every error in the documented shape. */
	FUZZ_CHECK((c != NULL) == (errs.n == 0 && errs.dropped == 0));
	for (size_t i = 0; i < errs.n; i++)
		FUZZ_CHECK(errs.msgs[i] != NULL && strncmp(errs.msgs[i], "fuzz.yaml:", 10) == 0);
	if (c != NULL) {
		FUZZ_CHECK(config_ref(c) == c);
		config_unref(c);
		config_unref(c);
	}
	config_errors_free(&errs);
	free(buf);
	return 0;
}
