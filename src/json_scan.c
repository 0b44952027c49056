/* json_scan.c — one validating pass over a JSON request body: the members the gateway reads, no
 * tree.
 *
 * Why: jansson builds a tree of the whole request — every message, every string copied,
 * every object hashed — only for the gateway to check that the body is JSON and to read a
 * handful of top-level members (issue 10: 62k of the 203k instructions of a proxied
 * request). This scanner makes the same accept/reject decision in one pass over the
 * client's bytes and leaves the values where they are. The rules it keeps are listed in
 * json_scan.h; each was checked against jansson 2.14 (tests/unit/test_json_scan.c, and the
 * differential fuzz target tests/fuzz/fuzz_json_scan.c).
 *
 * The walk is iterative: an explicit stack of open containers (one bit each: object or
 * array) replaces recursion, so hostile nesting costs a bit per level, not a stack frame.
 * Duplicate keys are found by keeping a 32-bit hash and the offset of every key of every
 * object still open; a new key is compared with those of its own object only (hash first,
 * then the decoded bytes).
 */
#include "sluice/json_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sluice/usage.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Names of the members handed back, by enum json_scan_member, with their lengths. */
#define NAME(s)                                                                                    \
	{                                                                                          \
		s, sizeof(s) - 1                                                                   \
	}
static const struct {
	const char *s;
	size_t len;
} member_names[JSON_SCAN_N_MEMBERS] = {
        [JSON_SCAN_MODEL] = NAME("model"),
        [JSON_SCAN_STREAM] = NAME("stream"),
        [JSON_SCAN_STREAM_OPTIONS] = NAME("stream_options"),
        [JSON_SCAN_MAX_TOKENS] = NAME("max_tokens"),
        [JSON_SCAN_MAX_COMPLETION_TOKENS] = NAME("max_completion_tokens"),
        [JSON_SCAN_MAX_OUTPUT_TOKENS] = NAME("max_output_tokens"),
        [JSON_SCAN_N] = NAME("n"),
        [JSON_SCAN_MESSAGES] = NAME("messages"),
        [JSON_SCAN_INPUT] = NAME("input"),
        [JSON_SCAN_PROMPT] = NAME("prompt"),
        [JSON_SCAN_SYSTEM] = NAME("system"),
        [JSON_SCAN_INSTRUCTIONS] = NAME("instructions"),
        [JSON_SCAN_TOOLS] = NAME("tools"),
        [JSON_SCAN_FUNCTIONS] = NAME("functions"),
};
#undef NAME

/* Longer than any name above: a key this long (decoded) is none of them. */
#define NAME_CAP 24

/* jansson's strtod decides overflow for reals this close to DBL_MAX; the copy it is given
 * keeps this many significant digits (more than the 767 any double needs) plus a sticky one. */
#define REAL_DIGITS 780

const char *json_scan_member_name(enum json_scan_member m)
{
	return (unsigned)m < JSON_SCAN_N_MEMBERS ? member_names[m].s : "";
}

/* ---------------------------------------------------------------- bytes */

/* 1: a string byte that needs no attention (printable ASCII but '"' and '\\'). */
static const unsigned char plain[256] = {
        ['\x20'] = 1, ['!'] = 1, ['#'] = 1,    ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1,
        ['('] = 1,    [')'] = 1, ['*'] = 1,    ['+'] = 1, [','] = 1, ['-'] = 1, ['.'] = 1,
        ['/'] = 1,    ['0'] = 1, ['1'] = 1,    ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1,
        ['6'] = 1,    ['7'] = 1, ['8'] = 1,    ['9'] = 1, [':'] = 1, [';'] = 1, ['<'] = 1,
        ['='] = 1,    ['>'] = 1, ['?'] = 1,    ['@'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1,
        ['D'] = 1,    ['E'] = 1, ['F'] = 1,    ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1,
        ['K'] = 1,    ['L'] = 1, ['M'] = 1,    ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1,
        ['R'] = 1,    ['S'] = 1, ['T'] = 1,    ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
        ['Y'] = 1,    ['Z'] = 1, ['['] = 1,    [']'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1,
        ['a'] = 1,    ['b'] = 1, ['c'] = 1,    ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1,
        ['h'] = 1,    ['i'] = 1, ['j'] = 1,    ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1,
        ['o'] = 1,    ['p'] = 1, ['q'] = 1,    ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1,
        ['v'] = 1,    ['w'] = 1, ['x'] = 1,    ['y'] = 1, ['z'] = 1, ['{'] = 1, ['|'] = 1,
        ['}'] = 1,    ['~'] = 1, ['\x7f'] = 1,
};

/*
 * How many of the 8 bytes at p are plain, word at a time: a byte is not when it is '"', '\\',
 * under 0x20 or 0x80 and over (a UTF-8 sequence, checked separately). The classic SWAR
 * tests: (x - 0x01…) & ~x & 0x80… flags a zero byte; x ^ 0x22… turns '"' into zero.
 */
static size_t plain8(const char *p)
{
	const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
	uint64_t x;
	memcpy(&x, p, 8);
	uint64_t q = x ^ (ones * '"'), b = x ^ (ones * '\\');
	uint64_t bad = ((q - ones) & ~q) | ((b - ones) & ~b) | (x - ones * 0x20) | x;
	bad &= highs;
	if (bad == 0)
		return 8;
	return (size_t)__builtin_ctzll(bad) / 8; /* little-endian: the first flagged byte */
}

/* Past the plain bytes from p (at most up to e). Sixteen bytes at a time where SSE2 is there:
 * as signed bytes, those under 0x20 and those of 0x80 and over are all less than 0x20. */
static const char *skip_plain(const char *p, const char *e)
{
#if defined(__SSE2__)
	const __m128i sp = _mm_set1_epi8(0x20), dq = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\');
	while (e - p >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
		__m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, sp),
		                           _mm_or_si128(_mm_cmpeq_epi8(v, dq), _mm_cmpeq_epi8(v, bs)));
		unsigned m = (unsigned)_mm_movemask_epi8(bad);
		if (m != 0)
			return p + __builtin_ctz(m);
		p += 16;
	}
#endif
	while (e - p >= 8) {
		size_t n = plain8(p);
		p += n;
		if (n < 8)
			return p;
	}
	while (p < e && plain[(unsigned char)*p])
		p++;
	return p;
}

static bool is_ws(char c)
{
	return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static const char *skip_ws(const char *p, const char *e)
{
	if (p < e && (unsigned char)*p > ' ')
		return p; /* the usual case: no whitespace at all */
	while (p < e && is_ws(*p))
		p++;
	return p;
}

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Four hex digits at p (p + 4 <= e checked by the caller); -1 when one is not. */
static long hex4(const char *p)
{
	long v = 0;
	for (int i = 0; i < 4; i++) {
		int d = hex_digit(p[i]);
		if (d < 0)
			return -1;
		v = v << 4 | d;
	}
	return v;
}

static size_t utf8_put(unsigned long cp, unsigned char *o)
{
	if (cp < 0x80) {
		o[0] = (unsigned char)cp;
		return 1;
	}
	if (cp < 0x800) {
		o[0] = (unsigned char)(0xc0 | cp >> 6);
		o[1] = (unsigned char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		o[0] = (unsigned char)(0xe0 | cp >> 12);
		o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
		o[2] = (unsigned char)(0x80 | (cp & 0x3f));
		return 3;
	}
	o[0] = (unsigned char)(0xf0 | cp >> 18);
	o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3f));
	o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
	o[3] = (unsigned char)(0x80 | (cp & 0x3f));
	return 4;
}

/*
 * The next decoded unit of a string already validated, at *pp (inside the quotes): its
 * bytes into o (1 to 4), 0 at the closing quote. What json_scan_string and the key
 * comparisons share; the validating pass below does the same walk with every check.
 */
static size_t next_unit(const char **pp, unsigned char *o)
{
	const char *p = *pp;

	if (*p == '"')
		return 0;
	if (*p != '\\') {
		o[0] = (unsigned char)*p;
		*pp = p + 1;
		return 1;
	}
	char c = p[1];
	*pp = p + 2;
	switch (c) {
	case 'b':
		o[0] = '\b';
		return 1;
	case 'f':
		o[0] = '\f';
		return 1;
	case 'n':
		o[0] = '\n';
		return 1;
	case 'r':
		o[0] = '\r';
		return 1;
	case 't':
		o[0] = '\t';
		return 1;
	case 'u':
		break;
	default:
		o[0] = (unsigned char)c;
		return 1; /* " \ / */
	}
	unsigned long cp = (unsigned long)hex4(p + 2);
	*pp = p + 6;
	if (cp >= 0xd800 && cp <= 0xdbff) { /* validated: a low surrogate escape follows */
		cp = 0x10000 + ((cp - 0xd800) << 10) + ((unsigned long)hex4(p + 8) - 0xdc00);
		*pp = p + 12;
	}
	return utf8_put(cp, o);
}

/* ---------------------------------------------------------------- the validating pass */

struct scanner {
	const char *base, *e;
	const char *error; /* a fixed reason; NULL while all is well */
	const char *error_at;
	bool complex; /* past a fixed bound: the caller asks jansson */
	size_t depth; /* containers open */
	unsigned char is_object[JSON_SCAN_MAX_DEPTH / 8 + 1]; /* one bit per open container */
	/* the keys of every open object: a 32-bit hash of the decoded name, its quote's offset */
	uint32_t key_hash[JSON_SCAN_MAX_OPEN_KEYS];
	uint32_t key_at[JSON_SCAN_MAX_OPEN_KEYS];
	size_t n_keys;
	uint16_t seg[JSON_SCAN_MAX_OBJECT_DEPTH]; /* per open object: its first key's index */
	size_t n_objects;
};

/* What the validating string scan reports. */
struct str_info {
	size_t len; /* decoded bytes */
	bool escaped;
	bool has_nul;  /* a \u0000 */
	uint32_t hash; /* of the decoded bytes (keys only) */
	size_t n_name; /* keys only: decoded bytes kept in name (at most NAME_CAP) */
	char name[NAME_CAP];
};

static const char *fail(struct scanner *s, const char *at, const char *why)
{
	if (s->error == NULL) {
		s->error = why;
		s->error_at = at;
	}
	return NULL;
}

/* The key's hash (FNV-1a over its decoded bytes) and the first NAME_CAP of them. */
static void key_bytes(struct str_info *si, const char *p, size_t n)
{
	size_t keep = n < NAME_CAP - si->n_name ? n : NAME_CAP - si->n_name;
	memcpy(si->name + si->n_name, p, keep);
	si->n_name += keep;
	for (size_t i = 0; i < n; i++)
		si->hash = (si->hash ^ (unsigned char)p[i]) * 16777619u;
}

/*
 * The string whose opening quote is at p: validated as jansson does (UTF-8, control bytes,
 * escapes, surrogate pairs). Returns the byte after the closing quote, or NULL with the
 * error set. key: also hash the decoded bytes and keep the first NAME_CAP of them.
 */
static const char *scan_string(struct scanner *s, const char *p, struct str_info *si, bool key)
{
	const char *e = s->e, *q = p + 1;

	si->len = 0;
	si->escaped = si->has_nul = false;
	si->hash = 2166136261u;
	si->n_name = 0;
	for (;;) {
		const char *run = q;
		q = skip_plain(q, e);
		si->len += (size_t)(q - run);
		if (key)
			key_bytes(si, run, (size_t)(q - run));
		if (q >= e)
			return fail(s, p, "premature end of input in a string");
		unsigned char c = (unsigned char)*q;
		if (c == '"')
			return q + 1;
		if (c < 0x20)
			return fail(s, q, "control character in a string");
		if (c == '\\') {
			unsigned char out[4];
			size_t n;
			si->escaped = true;
			if (e - q < 2)
				return fail(s, q, "premature end of input in an escape");
			switch (q[1]) {
			case '"':
			case '\\':
			case '/':
			case 'b':
			case 'f':
			case 'n':
			case 'r':
			case 't':
				break;
			case 'u': {
				if (e - q < 6 || hex4(q + 2) < 0)
					return fail(s, q, "invalid escape");
				long cp = hex4(q + 2);
				if (cp >= 0xdc00 && cp <= 0xdfff)
					return fail(s, q, "invalid Unicode: lone low surrogate");
				if (cp >= 0xd800 && cp <= 0xdbff) {
					long lo;
					if (e - q < 12 || q[6] != '\\' || q[7] != 'u' ||
					    (lo = hex4(q + 8)) < 0 || lo < 0xdc00 || lo > 0xdfff)
						return fail(
						        s, q,
						        "invalid Unicode: unpaired high surrogate");
				}
				if (cp == 0)
					si->has_nul = true;
				break;
			}
			default:
				return fail(s, q, "invalid escape");
			}
			const char *from = q;
			n = next_unit(&from, out);
			si->len += n;
			if (key)
				key_bytes(si, (const char *)out, n);
			q = from;
			continue;
		}
		/* A UTF-8 sequence: strict, as jansson's utf8_check_full. */
		size_t need;
		unsigned long cp;
		if (c >= 0xc2 && c <= 0xdf) {
			need = 1;
			cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			need = 2;
			cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			need = 3;
			cp = c & 0x07;
		} else {
			return fail(s, q, "invalid UTF-8 byte");
		}
		if ((size_t)(e - q) <= need)
			return fail(s, q, "invalid UTF-8: truncated sequence");
		for (size_t i = 1; i <= need; i++) {
			unsigned char b = (unsigned char)q[i];
			if ((b & 0xc0) != 0x80)
				return fail(s, q, "invalid UTF-8: bad continuation byte");
			cp = cp << 6 | (b & 0x3f);
		}
		if ((need == 2 && cp < 0x800) || (need == 3 && cp < 0x10000) || cp > 0x10ffff ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return fail(s, q, "invalid UTF-8: overlong, surrogate or out of range");
		si->len += need + 1;
		if (key)
			key_bytes(si, q, need + 1);
		q += need + 1;
	}
}

/* Does a real with decimal exponent 308 (value in [1e308, 1e309)) overflow a double? The
 * boundary (DBL_MAX plus half an ulp) has 309 significant digits, so strtod over a copy of
 * the first REAL_DIGITS digits, with a sticky digit for any non-zero one dropped, decides it
 * exactly as strtod over the whole token would. */
static bool real_overflows_308(const char *p, const char *end)
{
	char buf[REAL_DIGITS + 16];
	size_t n = 0;
	bool started = false, sticky = false;

	buf[n++] = '0';
	buf[n++] = '.';
	for (; p < end && *p != 'e' && *p != 'E'; p++) {
		if (!is_digit(*p))
			continue; /* the sign and the decimal point */
		if (!started && *p == '0')
			continue;
		started = true;
		if (n < REAL_DIGITS + 2)
			buf[n++] = *p;
		else if (*p != '0')
			sticky = true;
	}
	if (sticky)
		buf[n++] = '1';
	memcpy(buf + n, "e309", 5); /* 0.d… × 10^309 = d.… × 10^308 */
	double v = strtod(buf, NULL);
	return isinf(v);
}

/*
 * The number at p (a '-' or a digit): jansson's token rules (no leading zeros, digits after
 * '.' and after an exponent), its integer range (int64_t) and real overflow. Returns the
 * byte after it, or NULL with the error set. *is_int and *ival describe it.
 */
static const char *scan_number(struct scanner *s, const char *p, bool *is_int, int64_t *ival)
{
	const char *e = s->e, *start = p, *int_digits;
	bool neg = false;
	uint64_t mag = 0;
	bool too_big = false;

	if (*p == '-') {
		neg = true;
		p++;
	}
	if (p >= e || !is_digit(*p))
		return fail(s, start, "invalid token");
	int_digits = p;
	if (*p == '0') {
		p++;
		if (p < e && is_digit(*p))
			return fail(s, start, "invalid token: leading zero");
	} else {
		while (p < e && is_digit(*p)) {
			unsigned d = (unsigned)(*p - '0');
			if (mag > (UINT64_MAX - d) / 10)
				too_big = true;
			else
				mag = mag * 10 + d;
			p++;
		}
	}
	size_t n_int = (size_t)(p - int_digits);
	const char *frac = NULL, *frac_end = NULL;
	int64_t exp = 0;
	*is_int = true;
	if (p < e && *p == '.') {
		p++;
		if (p >= e || !is_digit(*p))
			return fail(s, start, "invalid token: no digit after '.'");
		frac = p;
		while (p < e && is_digit(*p))
			p++;
		frac_end = p;
		*is_int = false;
	}
	if (p < e && (*p == 'e' || *p == 'E')) {
		bool eneg = false;
		p++;
		if (p < e && (*p == '+' || *p == '-'))
			eneg = *p++ == '-';
		if (p >= e || !is_digit(*p))
			return fail(s, start, "invalid token: no digit in the exponent");
		while (p < e && is_digit(*p)) {
			if (exp < 1000000000000000LL) /* saturate: far past any double */
				exp = exp * 10 + (*p - '0');
			p++;
		}
		if (eneg)
			exp = -exp;
		*is_int = false;
	}
	if (*is_int) {
		uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
		if (too_big || mag > limit)
			return fail(s, start, neg ? "too big negative integer" : "too big integer");
		*ival = neg ? (mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag)
		            : (int64_t)mag;
		return p;
	}
	/* A real: the decimal exponent of its first significant digit decides, except at 308. */
	int64_t e10;
	if (!(n_int == 1 && *int_digits == '0')) {
		e10 = (int64_t)n_int - 1 + exp;
	} else {
		const char *f = frac;
		while (f != NULL && f < frac_end && *f == '0')
			f++;
		if (f == NULL || f == frac_end)
			return p; /* zero */
		e10 = -(int64_t)(f - frac + 1) + exp;
	}
	if (e10 > 308 || (e10 == 308 && real_overflows_308(start, p)))
		return fail(s, start, "real number overflow");
	return p;
}

static bool bit_get(const unsigned char *bits, size_t i)
{
	return bits[i / 8] >> (i % 8) & 1;
}

static void bit_set(unsigned char *bits, size_t i, bool v)
{
	if (v)
		bits[i / 8] |= (unsigned char)(1u << (i % 8));
	else
		bits[i / 8] &= (unsigned char)~(1u << (i % 8));
}

/* A validated string's decoded bytes one at a time (units are 1 to 4 bytes). */
struct decoder {
	const char *p;
	unsigned char unit[4];
	size_t n, i;
};

/* The next decoded byte, or -1 at the closing quote. */
static int decoder_next(struct decoder *d)
{
	if (d->i == d->n) {
		d->n = next_unit(&d->p, d->unit);
		d->i = 0;
		if (d->n == 0)
			return -1;
	}
	return d->unit[d->i++];
}

/* Two validated keys (at their opening quotes): the same decoded bytes? A raw "\xc3\xa9" and
 * "\u00e9" are the same key, so the comparison is byte by byte, not unit by unit. */
static bool keys_equal(const char *a, const char *b)
{
	struct decoder da = {.p = a + 1}, db = {.p = b + 1};
	int ca, cb;

	do {
		ca = decoder_next(&da);
		cb = decoder_next(&db);
		if (ca != cb)
			return false;
	} while (ca >= 0);
	return true;
}

/* The key at p (validated, described by si) against the other keys of its object. */
static const char *add_key(struct scanner *s, const char *p, const struct str_info *si)
{
	size_t first = s->seg[s->n_objects - 1];

	for (size_t i = first; i < s->n_keys; i++)
		if (s->key_hash[i] == si->hash && keys_equal(s->base + s->key_at[i], p))
			return fail(s, p, "duplicate object key");
	if (s->n_keys == JSON_SCAN_MAX_OPEN_KEYS) {
		s->complex = true;
		return NULL;
	}
	s->key_hash[s->n_keys] = si->hash;
	s->key_at[s->n_keys] = (uint32_t)(p - s->base);
	s->n_keys++;
	return p;
}

static int member_index(const struct str_info *si)
{
	if (si->n_name != si->len || si->len == 0)
		return -1; /* longer than any name we look for */
	for (int i = 0; i < JSON_SCAN_N_MEMBERS; i++)
		if (member_names[i].len == si->len && member_names[i].s[0] == si->name[0] &&
		    memcmp(member_names[i].s, si->name, si->len) == 0)
			return i;
	return -1;
}

static void locate_error(struct json_scan *out, const char *base, const char *at)
{
	int line = 1;
	const char *line_start = base;

	for (const char *p = base; p < at; p++)
		if (*p == '\n') {
			line++;
			line_start = p + 1;
		}
	out->error_pos = (size_t)(at - base);
	out->line = line;
	out->column = (int)(at - line_start) + 1;
}

enum json_scan_result json_scan_body(const char *body, size_t len, struct json_scan *out)
{
	struct scanner s;
	const char *p, *e = body + len;
	struct json_scan_value *cur = NULL; /* the top-level member whose value is being read */
	bool top_object, in_so = false, iu_key = false;
	size_t so_depth = 0;

	memset(out, 0, sizeof(*out));
	s.base = body;
	s.e = e;
	s.error = NULL;
	s.error_at = body;
	s.complex = false;
	s.depth = 0;
	s.n_keys = 0;
	s.n_objects = 0;
	if (len > UINT32_MAX)
		return JSON_SCAN_TOO_COMPLEX; /* key offsets are 32 bits */

	p = skip_ws(body, e);
	if (p >= e || (*p != '{' && *p != '[')) {
		fail(&s, p, "'[' or '{' expected");
		goto invalid;
	}
	top_object = *p == '{';

value: /* p at the first byte of a value */
	if (s.depth + 1 > JSON_SCAN_MAX_DEPTH) {
		fail(&s, p, "maximum parsing depth reached");
		goto invalid;
	}
	if (p >= e) {
		fail(&s, p, "premature end of input");
		goto invalid;
	}
	if (iu_key) { /* the value of stream_options.include_usage */
		iu_key = false;
		out->include_usage = *p == 't';
	}
	if (cur != NULL && s.depth == 1) {
		cur->p = p;
		switch (*p) {
		case '{':
			cur->type = JSON_SCAN_OBJECT;
			break;
		case '[':
			cur->type = JSON_SCAN_ARRAY;
			break;
		case '"':
			cur->type = JSON_SCAN_STRING;
			break;
		case 't':
			cur->type = JSON_SCAN_TRUE;
			break;
		case 'f':
			cur->type = JSON_SCAN_FALSE;
			break;
		case 'n':
			cur->type = JSON_SCAN_NULL;
			break;
		default:
			cur->type = JSON_SCAN_INTEGER;
			break; /* or REAL: the number decides */
		}
	}
	switch (*p) {
	case '{':
		if (s.n_objects == JSON_SCAN_MAX_OBJECT_DEPTH) {
			s.complex = true;
			goto complex;
		}
		if (cur != NULL && s.depth == 1 && cur == &out->member[JSON_SCAN_STREAM_OPTIONS]) {
			in_so = true;
			so_depth = s.depth + 1;
		}
		bit_set(s.is_object, s.depth, true);
		s.depth++;
		s.seg[s.n_objects++] = (uint16_t)s.n_keys;
		p = skip_ws(p + 1, e);
		if (p < e && *p == '}') {
			p++;
			goto close_object;
		}
		goto key;
	case '[':
		bit_set(s.is_object, s.depth, false);
		s.depth++;
		p = skip_ws(p + 1, e);
		if (p < e && *p == ']') {
			p++;
			s.depth--;
			goto after_value;
		}
		goto value;
	case '"': {
		struct str_info si;
		const char *q = scan_string(&s, p, &si, false);
		if (q == NULL)
			goto invalid;
		if (cur != NULL && s.depth == 1) {
			cur->str_len = si.len;
			cur->escaped = si.escaped;
		}
		p = q;
		goto after_value;
	}
	case 't':
	case 'f':
	case 'n': {
		const char *word = *p == 't' ? "true" : *p == 'f' ? "false" : "null";
		size_t n = strlen(word);
		if ((size_t)(e - p) < n || memcmp(p, word, n) != 0) {
			fail(&s, p, "invalid token");
			goto invalid;
		}
		p += n;
		goto after_value;
	}
	default: {
		if (*p != '-' && !is_digit(*p)) {
			fail(&s, p, "unexpected token");
			goto invalid;
		}
		bool is_int;
		int64_t iv = 0;
		const char *q = scan_number(&s, p, &is_int, &iv);
		if (q == NULL)
			goto invalid;
		if (cur != NULL && s.depth == 1) {
			cur->type = is_int ? JSON_SCAN_INTEGER : JSON_SCAN_REAL;
			cur->integer = iv;
		}
		p = q;
		goto after_value;
	}
	}

key: /* in an object, p after whitespace, a key expected */
	if (p >= e || *p != '"') {
		fail(&s, p, "string or '}' expected");
		goto invalid;
	}
	{
		struct str_info si;
		const char *kstart = p, *q = scan_string(&s, p, &si, true);
		if (q == NULL)
			goto invalid;
		if (si.has_nul) {
			fail(&s, kstart, "NUL byte in object key not supported");
			goto invalid;
		}
		if (add_key(&s, kstart, &si) == NULL) {
			if (s.complex)
				goto complex;
			goto invalid;
		}
		if (s.depth == 1 && top_object) {
			int i = member_index(&si);
			out->n_members++;
			cur = i >= 0 ? &out->member[i] : NULL;
		} else if (in_so && s.depth == so_depth) {
			iu_key = si.len == 13 && si.n_name == 13 &&
			         memcmp(si.name, "include_usage", 13) == 0;
		}
		p = skip_ws(q, e);
		if (p >= e || *p != ':') {
			fail(&s, p, "':' expected");
			goto invalid;
		}
		p = skip_ws(p + 1, e);
		goto value;
	}

close_object:
	s.depth--;
	s.n_keys = s.seg[--s.n_objects];
	if (in_so && s.depth + 1 == so_depth)
		in_so = false;
	/* fall through */
after_value: /* p just past a value */
	if (s.depth == 1 && top_object && cur != NULL) {
		cur->len = (size_t)(p - cur->p);
		cur = NULL;
	}
	if (s.depth == 0) {
		p = skip_ws(p, e);
		if (p != e) {
			fail(&s, p, "end of file expected");
			goto invalid;
		}
		return top_object ? JSON_SCAN_OK : JSON_SCAN_NOT_OBJECT;
	}
	p = skip_ws(p, e);
	if (p >= e) {
		fail(&s, p, "premature end of input");
		goto invalid;
	}
	if (bit_get(s.is_object, s.depth - 1)) {
		if (*p == ',') {
			p = skip_ws(p + 1, e);
			goto key;
		}
		if (*p == '}') {
			p++;
			goto close_object;
		}
		fail(&s, p, "'}' expected");
		goto invalid;
	}
	if (*p == ',') {
		p = skip_ws(p + 1, e);
		goto value;
	}
	if (*p == ']') {
		p++;
		s.depth--;
		goto after_value;
	}
	fail(&s, p, "']' expected");
	goto invalid;

invalid:
	out->error = s.error ? s.error : "invalid JSON";
	locate_error(out, body, s.error_at);
	return JSON_SCAN_INVALID;
complex:
	return JSON_SCAN_TOO_COMPLEX;
}

size_t json_scan_string(const struct json_scan_value *v, char *buf, size_t cap)
{
	if (v->type != JSON_SCAN_STRING)
		return 0;
	if (!v->escaped) {
		memcpy(buf, v->p + 1, v->str_len < cap ? v->str_len : cap);
		return v->str_len;
	}
	const char *p = v->p + 1;
	unsigned char u[4];
	size_t n, total = 0;
	while ((n = next_unit(&p, u)) != 0) {
		for (size_t i = 0; i < n; i++, total++)
			if (total < cap)
				buf[total] = (char)u[i];
	}
	return total;
}

/* ---------------------------------------------------------------- the prompt estimate
 *
 * usage.c's count_text() over the spans: the same walk over an already validated text.
 * Text is counted in decoded bytes (json_string_length), integers in arrays are token ids,
 * media parts count as one image each, and nothing deeper than 64 levels counts.
 */

struct text_count {
	size_t bytes;
	uint64_t ids;
	uint64_t media;
};

#define COUNT_MAX_DEPTH 64

/* Past the validated string at p (its opening quote), which ends before e; *len gets its
 * decoded length. */
static const char *string_end(const char *p, const char *e, size_t *len)
{
	size_t n = 0;
	p++;
	for (;;) {
		const char *run = p;
		for (;;) { /* plain bytes and UTF-8 sequences (already validated) alike */
			p = skip_plain(p, e);
			if ((unsigned char)*p < 0x80)
				break;
			p++;
		}
		n += (size_t)(p - run);
		if (*p == '"') {
			*len = n;
			return p + 1;
		}
		/* a backslash: the validating pass left only well-formed escapes */
		unsigned char u[4];
		n += next_unit(&p, u);
	}
}

/* Past the validated number at p; *is_int: an integer token. */
static const char *number_end(const char *p, const char *e, bool *is_int)
{
	*is_int = true;
	while (p < e &&
	       (is_digit(*p) || *p == '-' || *p == '+' || *p == '.' || *p == 'e' || *p == 'E')) {
		if (*p == '.' || *p == 'e' || *p == 'E')
			*is_int = false;
		p++;
	}
	return p;
}

/* Past the validated value at p, counting nothing. */
static const char *skip_value(const char *p, const char *e)
{
	size_t depth = 0, ignored;

	do {
		p = skip_ws(p, e);
		switch (*p) {
		case '"':
			p = string_end(p, e, &ignored);
			break;
		case '{':
		case '[':
			depth++;
			p++;
			break;
		case '}':
		case ']':
			depth--;
			p++;
			break;
		case ',':
		case ':':
			p++;
			break;
		default: /* a number or a literal */
			p++;
			while (p < e && !is_ws(*p) && *p != ',' && *p != '}' && *p != ']')
				p++;
			break;
		}
	} while (depth > 0);
	return p;
}

/* A validated key (opening quote at p): its decoded length, and whether it is one of the
 * media part names (usage.c's is_media_key) or "role". */
static const char *key_info(const char *p, const char *e, size_t *len, bool *media, bool *role)
{
	static const struct {
		const char *s;
		size_t len;
	} media_keys[] = {{"image_url", 9}, {"input_audio", 11}, {"image", 5},
	                  {"file", 4},      {"source", 6},       {"audio", 5}};
	char name[16];
	const char *q = p + 1, *end = skip_plain(q, e), *name_p = name;
	size_t n = 0;

	if (*end == '"') { /* the usual key: no escape, no UTF-8, its bytes are its name */
		n = (size_t)(end - q);
		name_p = q;
		q = end;
	} else {
		unsigned char u[4];
		size_t k;
		while ((k = next_unit(&q, u)) != 0) {
			for (size_t i = 0; i < k; i++, n++)
				if (n < sizeof(name))
					name[n] = (char)u[i];
		}
	}
	*len = n;
	*media = *role = false;
	if (n <= sizeof(name)) {
		for (size_t i = 0; i < sizeof(media_keys) / sizeof(media_keys[0]); i++)
			if (media_keys[i].len == n && memcmp(media_keys[i].s, name_p, n) == 0)
				*media = true;
		*role = n == 4 && memcmp(name_p, "role", 4) == 0;
	}
	return q + 1;
}

static const char *count_text(const char *p, const char *e, bool keys, struct text_count *tc,
                              int depth)
{
	size_t n;

	p = skip_ws(p, e);
	if (depth > COUNT_MAX_DEPTH)
		return skip_value(p, e);
	switch (*p) {
	case '"':
		p = string_end(p, e, &n);
		tc->bytes += n;
		return p;
	case '[':
		p = skip_ws(p + 1, e);
		if (*p == ']')
			return p + 1;
		for (;;) {
			bool is_int;
			if (*p == '-' || is_digit(*p)) {
				p = number_end(p, e, &is_int);
				if (is_int)
					tc->ids++;
			} else {
				p = count_text(p, e, keys, tc, depth + 1);
			}
			p = skip_ws(p, e);
			if (*p++ == ']')
				return p;
			p = skip_ws(p, e);
		}
	case '{':
		p = skip_ws(p + 1, e);
		if (*p == '}')
			return p + 1;
		for (;;) {
			bool media, role;
			p = key_info(p, e, &n, &media, &role);
			p = skip_ws(p, e) + 1; /* the colon */
			if (!keys && media) {
				tc->media++;
				p = skip_value(p, e);
			} else {
				if (keys)
					tc->bytes += n;
				p = count_text(p, e, keys, tc, depth + 1);
			}
			p = skip_ws(p, e);
			if (*p++ == '}')
				return p;
			p = skip_ws(p, e);
		}
	default:
		return skip_value(p, e);
	}
}

static void count_member(const struct json_scan *s, enum json_scan_member m, bool keys,
                         struct text_count *tc)
{
	const struct json_scan_value *v = &s->member[m];
	if (v->type != JSON_SCAN_ABSENT)
		count_text(v->p, v->p + v->len, keys, tc, 0);
}

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

uint64_t json_scan_estimate_prompt(const struct json_scan *s)
{
	struct text_count tc = {0};
	uint64_t messages = 0, n;
	const struct json_scan_value *msgs = &s->member[JSON_SCAN_MESSAGES];

	if (msgs->type == JSON_SCAN_ARRAY) {
		const char *p = msgs->p, *e = msgs->p + msgs->len;
		p = skip_ws(p + 1, e);
		while (*p != ']') {
			messages++;
			if (*p == '{') {
				/* A message's members but its role, each from depth 1. */
				p = skip_ws(p + 1, e);
				while (*p != '}') {
					size_t klen;
					bool media, role;
					p = key_info(p, e, &klen, &media, &role);
					p = skip_ws(p, e) + 1;
					p = role ? skip_value(p, e)
					         : count_text(p, e, false, &tc, 1);
					p = skip_ws(p, e);
					if (*p == ',')
						p = skip_ws(p + 1, e);
				}
				p++;
			} else {
				p = count_text(p, e, false, &tc, 1);
			}
			p = skip_ws(p, e);
			if (*p == ',')
				p = skip_ws(p + 1, e);
		}
	}
	count_member(s, JSON_SCAN_PROMPT, false, &tc);
	count_member(s, JSON_SCAN_INPUT, false, &tc);
	count_member(s, JSON_SCAN_SYSTEM, false, &tc);
	count_member(s, JSON_SCAN_INSTRUCTIONS, false, &tc);
	count_member(s, JSON_SCAN_TOOLS, true, &tc);
	count_member(s, JSON_SCAN_FUNCTIONS, true, &tc);

	n = ceil_div(tc.bytes, USAGE_BYTES_PER_TOKEN) + tc.ids + tc.media * USAGE_TOKENS_PER_IMAGE;
	if (messages > 0)
		n += messages * USAGE_TOKENS_PER_MESSAGE + USAGE_TOKENS_PER_REPLY;
	return n > 0 ? n : 1;
}

uint64_t json_scan_completion_budget(const struct json_scan *s, uint64_t default_budget)
{
	static const enum json_scan_member caps[] = {
	        JSON_SCAN_MAX_COMPLETION_TOKENS, JSON_SCAN_MAX_TOKENS, JSON_SCAN_MAX_OUTPUT_TOKENS};
	uint64_t budget = default_budget;

	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		const struct json_scan_value *v = &s->member[caps[i]];
		if (v->type == JSON_SCAN_INTEGER && v->integer >= 0) {
			budget = (uint64_t)v->integer;
			break;
		}
	}
	const struct json_scan_value *n = &s->member[JSON_SCAN_N];
	if (n->type == JSON_SCAN_INTEGER && n->integer > 1 && n->integer <= 128)
		budget *= (uint64_t)n->integer;
	return budget;
}
