/* fuzz.h — what the libFuzzer targets share: a check that aborts, exact-size copies. */
#ifndef SLUICE_FUZZ_H
#define SLUICE_FUZZ_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A failed invariant is a finding like a crash: libFuzzer keeps the input. */
#define FUZZ_CHECK(c)                                                                              \
	do {                                                                                       \
		if (!(c)) {                                                                        \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);      \
			abort();                                                                   \
		}                                                                                  \
	} while (0)

/* The bytes in a heap block of exactly n bytes (no NUL after them), so that ASan
 * reports any read past the end; NULL when out of memory. The caller frees it. */
static inline char *fuzz_exact_copy(const void *p, size_t n)
{
	char *c = malloc(n ? n : 1);
	if (c != NULL && n > 0)
		memcpy(c, p, n);
	else if (c != NULL)
		c[0] = '\0'; /* never read (n is 0), but gcc cannot tell */
	return c;
}

#endif
