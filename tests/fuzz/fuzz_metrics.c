/* fuzz_metrics.c — libFuzzer target: the model-server metrics parser (health_parse_load).
 *
 * The scraped page is an exact-size heap copy, not NUL-terminated, so a read past
 * it is an ASan report (strtod used to run past a line). The result must not
 * depend on bytes after the last newline of a line that names no gauge: parsing
 * the page and the page followed by "\n# comment" gives the same figures.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/health.h"

#include "fuzz.h"

static bool same(double a, double b)
{
	return (isnan(a) && isnan(b)) || a == b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char tail[] = "\n# HELP x y";
	char *buf = fuzz_exact_copy(data, size);
	char *ext = malloc(size + sizeof(tail) - 1);
	if (buf == NULL || ext == NULL) {
		free(buf);
		free(ext);
		return 0;
	}
	memcpy(ext, data, size);
	memcpy(ext + size, tail, sizeof(tail) - 1);

	struct health_load a, b;
	bool ok = health_parse_load(buf, size, &a);
	FUZZ_CHECK(a.age_us == 0);
	if (!ok)
		FUZZ_CHECK(a.waiting == 0 && a.running == 0 && a.kv_cache == -1);
	bool ok2 = health_parse_load(ext, size + sizeof(tail) - 1, &b);
	FUZZ_CHECK(ok == ok2);
	FUZZ_CHECK(same(a.waiting, b.waiting) && same(a.running, b.running) &&
	           same(a.kv_cache, b.kv_cache));
	free(buf);
	free(ext);
	return 0;
}
