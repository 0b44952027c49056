/* fuzz_retry_after.c — libFuzzer target: Retry-After values (health_parse_retry_after).
 *
 * Input: "NOW\nVALUE" — NOW the unix time in decimal (folded into years
 * 1970..9999; without a newline, NOW is 784111777, 1994-11-06T08:49:37Z), VALUE
 * the header value, passed as an exact-size heap copy. Checked: the
 * result never passes the cap; delta-seconds match a saturating reference; an
 * accepted HTTP-date is one glibc's strptime reads the same way, at the same
 * time (timegm).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sluice/health.h"

#include "fuzz.h"

#define YEAR_10000 253402300800LL /* 10000-01-01T00:00:00Z */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int64_t now = 784111777;
	const uint8_t *nl = memchr(data, '\n', size);
	if (nl != NULL) {
		uint64_t n = 0;
		for (const uint8_t *p = data; p < nl; p++)
			n = (n * 10 + (uint64_t)(*p % 10)) % (uint64_t)YEAR_10000;
		now = (int64_t)n;
		size -= (size_t)(nl + 1 - data);
		data = nl + 1;
	}
	size_t len = size;
	char *v = fuzz_exact_copy(data, len);
	if (v == NULL)
		return 0;

	uint64_t s = 12345;
	bool ok = health_parse_retry_after(v, len, now, &s);
	if (ok)
		FUZZ_CHECK(s <= HEALTH_RETRY_AFTER_MAX_S);

	/* The value without its surrounding blanks. */
	size_t b = 0, e = len;
	while (b < e && (v[b] == ' ' || v[b] == '\t'))
		b++;
	while (e > b && (v[e - 1] == ' ' || v[e - 1] == '\t'))
		e--;
	bool digits = e > b;
	uint64_t want = 0;
	for (size_t i = b; i < e; i++) {
		if (v[i] < '0' || v[i] > '9') {
			digits = false;
			break;
		}
		want = want > HEALTH_RETRY_AFTER_MAX_S ? want : want * 10 + (uint64_t)(v[i] - '0');
	}
	if (digits) {
		FUZZ_CHECK(ok);
		FUZZ_CHECK(s ==
		           (want < HEALTH_RETRY_AFTER_MAX_S ? want : HEALTH_RETRY_AFTER_MAX_S));
	} else if (ok) {
		/* A date: 29 bytes that strptime reads whole, to the same instant. */
		FUZZ_CHECK(e - b == 29);
		char text[30];
		memcpy(text, v + b, 29);
		text[29] = '\0';
		struct tm tm;
		memset(&tm, 0, sizeof(tm));
		const char *end = strptime(text, "%a, %d %b %Y %H:%M:%S GMT", &tm);
		FUZZ_CHECK(end == text + 29);
		int64_t at = (int64_t)timegm(&tm);
		int64_t d = at - now;
		uint64_t expect = d <= 0                         ? 0
		                  : d < HEALTH_RETRY_AFTER_MAX_S ? (uint64_t)d
		                                                 : HEALTH_RETRY_AFTER_MAX_S;
		FUZZ_CHECK(s == expect);
	}
	free(v);
	return 0;
}
