/* config_value.c — the value syntaxes of the configuration: durations, windows and sizes. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "sluice/config.h"

#define MS_PER_SECOND 1000ull
#define MS_PER_MINUTE (60 * MS_PER_SECOND)
#define MS_PER_HOUR   (60 * MS_PER_MINUTE)
#define MS_PER_DAY    (24 * MS_PER_HOUR)
#define MS_PER_WEEK   (7 * MS_PER_DAY)

/* Calendar months a window may span: ten years. */
#define WINDOW_MAX_MONTHS 120

struct unit {
	const char *name;
	uint64_t factor;
};

static const struct unit duration_units[] = {
        {"", MS_PER_SECOND}, /* a bare number means seconds, as in the case study */
        {"ms", 1},           {"s", MS_PER_SECOND}, {"m", MS_PER_MINUTE},
        {"h", MS_PER_HOUR},  {"d", MS_PER_DAY},    {"w", MS_PER_WEEK},
};

static const struct unit size_units[] = {
        {"", 1},
        {"B", 1},
        {"KB", 1000ull},
        {"MB", 1000ull * 1000},
        {"GB", 1000ull * 1000 * 1000},
        {"TB", 1000ull * 1000 * 1000 * 1000},
        {"KiB", 1ull << 10},
        {"MiB", 1ull << 20},
        {"GiB", 1ull << 30},
        {"TiB", 1ull << 40},
};

/*
 * "DIGITS[.DIGITS]UNIT" → value × unit, exactly: a fraction is accepted only when the result
 * is whole ("1.5s" is 1500 ms, "0.0001s" is refused). No sign, no spaces, no exponent. The
 * result must fit in an int64_t so that callers may do signed arithmetic on it.
 */
static bool parse_scaled(const char *s, const struct unit *units, size_t n_units, uint64_t *out)
{
	uint64_t whole = 0, frac = 0, scale = 1;
	const char *p = s;

	if (s == NULL || *p < '0' || *p > '9')
		return false;
	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned d = (unsigned)(*p - '0');
		if (whole > (UINT64_MAX - d) / 10)
			return false;
		whole = whole * 10 + d;
	}
	if (*p == '.') {
		p++;
		if (*p < '0' || *p > '9')
			return false;
		for (; *p >= '0' && *p <= '9'; p++) {
			if (scale >= 1000000000000000000ull)
				return false; /* more than 18 decimals */
			frac = frac * 10 + (unsigned)(*p - '0');
			scale *= 10;
		}
	}
	for (size_t i = 0; i < n_units; i++) {
		if (strcmp(p, units[i].name) != 0)
			continue;
		uint64_t f = units[i].factor;
		if (whole > INT64_MAX / f)
			return false;
		unsigned __int128 part = (unsigned __int128)frac * f;
		if (part % scale != 0)
			return false;
		uint64_t v = whole * f + (uint64_t)(part / scale);
		if (v > INT64_MAX)
			return false;
		*out = v;
		return true;
	}
	return false;
}

bool config_parse_duration(const char *s, uint64_t *ms)
{
	return parse_scaled(s, duration_units, sizeof duration_units / sizeof duration_units[0],
	                    ms);
}

bool config_parse_size(const char *s, uint64_t *bytes)
{
	return parse_scaled(s, size_units, sizeof size_units / sizeof size_units[0], bytes);
}

bool config_parse_window(const char *s, struct config_window *w)
{
	size_t len = s ? strlen(s) : 0;

	if (len > 2 && strcmp(s + len - 2, "mo") == 0) {
		unsigned months = 0;
		for (size_t i = 0; i < len - 2; i++) {
			if (s[i] < '0' || s[i] > '9')
				return false;
			months = months * 10 + (unsigned)(s[i] - '0');
			if (months > WINDOW_MAX_MONTHS)
				return false;
		}
		if (months == 0)
			return false;
		w->ms = 0;
		w->months = months;
		return true;
	}
	uint64_t ms;
	if (!config_parse_duration(s, &ms) || ms == 0)
		return false;
	w->ms = ms;
	w->months = 0;
	return true;
}

size_t config_format_duration(uint64_t ms, char *buf, size_t len)
{
	static const struct unit largest_first[] = {
	        {"w", MS_PER_WEEK},   {"d", MS_PER_DAY},    {"h", MS_PER_HOUR},
	        {"m", MS_PER_MINUTE}, {"s", MS_PER_SECOND},
	};
	int r = -1;

	for (size_t i = 0; ms != 0 && i < sizeof largest_first / sizeof largest_first[0]; i++) {
		if (ms % largest_first[i].factor == 0) {
			r = snprintf(buf, len, "%llu%s",
			             (unsigned long long)(ms / largest_first[i].factor),
			             largest_first[i].name);
			break;
		}
	}
	if (r < 0)
		r = snprintf(buf, len, "%llums", (unsigned long long)ms);
	return r < 0 ? 0 : (size_t)r;
}

size_t config_format_window(const struct config_window *w, char *buf, size_t len)
{
	if (w->months != 0) {
		int r = snprintf(buf, len, "%umo", w->months);
		return r < 0 ? 0 : (size_t)r;
	}
	return config_format_duration(w->ms, buf, len);
}
