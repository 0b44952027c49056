/* usage.c — token usage: read "usage" without parsing whole responses; estimate it. */
#include "sluice/usage.h"

#include <stdlib.h>
#include <string.h>

#include "sluice/json_scan.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* A member's value inside the scanned text. */
struct span {
	const char *p;
	size_t len;
};

/* ------------------------------------------------------------ a depth-1 JSON scanner */

/*
 * Reading "usage" must not cost a parse of the whole response (the content can be
 * megabytes), and a plain search for "usage" is wrong because the word may sit inside
 * the generated text or in a nested object. So the top-level object is walked member by
 * member: each value is skipped whole — strings honouring escapes, objects and arrays by
 * bracket depth — without building anything. Only the members asked for are handed back.
 * The walk does not validate what it skips; jansson validates what is finally parsed.
 */

static const char *skip_ws(const char *p, const char *e)
{
	if (p < e && (unsigned char)*p > ' ')
		return p; /* the usual case: no whitespace at all */
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* How many of the 8 bytes at p are neither '"' nor '\\' (SWAR: x ^ c turns c into a zero
 * byte, and (y - 0x01…) & ~y & 0x80… flags the zero bytes; the first flag is exact). */
static size_t quiet8(const char *p)
{
	const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
	uint64_t x;
	memcpy(&x, p, 8);
	uint64_t q = x ^ (ones * '"'), b = x ^ (ones * '\\');
	uint64_t hit = (((q - ones) & ~q) | ((b - ones) & ~b)) & highs;
	return hit == 0 ? 8 : (size_t)__builtin_ctzll(hit) / 8;
}

/* The first '"' or '\\' in [p, e), or e: sixteen bytes at a time where SSE2 is there (a
 * 654-byte answer is mostly one content string), then eight (SWAR), then one. */
static const char *quiet_run(const char *p, const char *e)
{
#if defined(__SSE2__)
	const __m128i dq = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\');
	while (e - p >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
		unsigned m = (unsigned)_mm_movemask_epi8(
		        _mm_or_si128(_mm_cmpeq_epi8(v, dq), _mm_cmpeq_epi8(v, bs)));
		if (m != 0)
			return p + __builtin_ctz(m);
		p += 16;
	}
#endif
	while (e - p >= 8) {
		size_t n = quiet8(p);
		p += n;
		if (n < 8)
			return p;
	}
	while (p < e && *p != '"' && *p != '\\')
		p++;
	return p;
}

/* p at the opening quote; returns just past the closing quote, NULL when unterminated. */
static const char *skip_string(const char *p, const char *e)
{
	for (p++;;) {
		p = quiet_run(p, e);
		if (p >= e)
			return NULL;
		if (*p == '"')
			return p + 1;
		/* a backslash: the byte after it is escaped (a cut escape leaves p past e) */
		if (e - p < 2)
			return NULL;
		p += 2;
	}
}

/* Returns just past the value starting at p, NULL when truncated. */
static const char *skip_value(const char *p, const char *e)
{
	size_t depth = 0;

	if (p >= e)
		return NULL;
	if (*p == '"')
		return skip_string(p, e);
	if (*p != '{' && *p != '[') {
		/* number, true, false, null: up to the next delimiter */
		while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' &&
		       *p != '\n' && *p != '\r')
			p++;
		return p;
	}
	while (p < e) {
		switch (*p) {
		case '"':
			p = skip_string(p, e);
			if (p == NULL)
				return NULL;
			continue;
		case '{':
		case '[':
			depth++;
			break;
		case '}':
		case ']':
			if (--depth == 0)
				return p + 1;
			break;
		default:
			break;
		}
		p++;
	}
	return NULL;
}

/* Finds the top-level members named in names[] (raw, unescaped names); found[i] gets the
 * value of the first member called names[i]. false when buf is not a JSON object. */
static bool scan_members(const char *buf, size_t len, const char *const *names, size_t n,
                         struct span *found)
{
	const char *p = buf, *e = buf + len;
	size_t name_lens[4];

	if (n > sizeof(name_lens) / sizeof(name_lens[0]))
		return false;
	for (size_t i = 0; i < n; i++) {
		found[i] = (struct span){NULL, 0};
		name_lens[i] = strlen(names[i]);
	}
	p = skip_ws(p, e);
	if (p >= e || *p != '{')
		return false;
	p = skip_ws(p + 1, e);
	if (p < e && *p == '}')
		return true;
	while (p < e) {
		const char *name, *v;
		size_t name_len;

		if (*p != '"')
			return false;
		name = p + 1;
		p = skip_string(p, e);
		if (p == NULL)
			return false;
		name_len = (size_t)(p - 1 - name);
		p = skip_ws(p, e);
		if (p >= e || *p != ':')
			return false;
		v = skip_ws(p + 1, e);
		p = skip_value(v, e);
		if (p == NULL)
			return false;
		for (size_t i = 0; i < n; i++) {
			if (found[i].p == NULL && name_lens[i] == name_len &&
			    memcmp(names[i], name, name_len) == 0) {
				found[i].p = v;
				found[i].len = (size_t)(p - v);
			}
		}
		p = skip_ws(p, e);
		if (p < e && *p == ',') {
			p = skip_ws(p + 1, e);
			continue;
		}
		return p < e && *p == '}';
	}
	return false;
}

/* ------------------------------------------------------------ reading a usage object */

/* The numbers fill_usage reads, wherever they come from (a tree, or the scan below). */
enum usage_key {
	UK_PROMPT,
	UK_COMPLETION,
	UK_INPUT,
	UK_CACHE_READ,
	UK_CACHE_CREATION,
	UK_OUTPUT,
	UK_TOTAL,
	UK_N
};
static const char *const usage_key_names[UK_N] = {
        [UK_PROMPT] = "prompt_tokens",
        [UK_COMPLETION] = "completion_tokens",
        [UK_INPUT] = "input_tokens",
        [UK_CACHE_READ] = "cache_read_input_tokens",
        [UK_CACHE_CREATION] = "cache_creation_input_tokens",
        [UK_OUTPUT] = "output_tokens",
        [UK_TOTAL] = "total_tokens",
};
/* The nested counts: details object, then the member in it. */
enum usage_detail { UD_PROMPT_CACHED, UD_INPUT_CACHED, UD_COMPLETION_REASONING, UD_OUTPUT_REASONING, UD_N };
static const char *const usage_detail_names[UD_N][2] = {
        [UD_PROMPT_CACHED] = {"prompt_tokens_details", "cached_tokens"},
        [UD_INPUT_CACHED] = {"input_tokens_details", "cached_tokens"},
        [UD_COMPLETION_REASONING] = {"completion_tokens_details", "reasoning_tokens"},
        [UD_OUTPUT_REASONING] = {"output_tokens_details", "reasoning_tokens"},
};

struct usage_counts {
	bool have[UK_N]; /* the member is a number (integer or real) */
	uint64_t v[UK_N];
	uint64_t detail[UD_N]; /* 0 when absent or not a number */
};

/* A number's count: integers clamped at 0, reals truncated when in range, else 0. */
static uint64_t integer_count(int64_t i)
{
	return i > 0 ? (uint64_t)i : 0;
}

static uint64_t real_count(double d)
{
	return d > 0 && d < 1.8e19 ? (uint64_t)d : 0;
}

static bool count_of(const json_t *obj, const char *key, uint64_t *out)
{
	const json_t *v = json_object_get(obj, key);

	if (json_is_integer(v)) {
		*out = integer_count(json_integer_value(v));
		return true;
	}
	if (json_is_real(v)) {
		*out = real_count(json_real_value(v));
		return true;
	}
	return false;
}

static void counts_from_tree(const json_t *u, struct usage_counts *c)
{
	memset(c, 0, sizeof(*c));
	for (int k = 0; k < UK_N; k++)
		c->have[k] = count_of(u, usage_key_names[k], &c->v[k]);
	for (int d = 0; d < UD_N; d++) {
		const json_t *o = json_object_get(u, usage_detail_names[d][0]);
		if (json_is_object(o))
			count_of(o, usage_detail_names[d][1], &c->detail[d]);
	}
}

static bool fill_usage(const struct usage_counts *c, struct record_usage *out)
{
	bool have_prompt, have_completion, have_total;

	memset(out, 0, sizeof(*out));
	/* OpenAI chat / completions / embeddings */
	have_prompt = c->have[UK_PROMPT];
	out->prompt = c->v[UK_PROMPT];
	have_completion = c->have[UK_COMPLETION];
	out->completion = c->v[UK_COMPLETION];
	/* Anthropic and the Responses API: Anthropic's input_tokens leave out cache reads and
	 * writes, which still count as prompt; the Responses API has neither field. */
	if (!have_prompt && c->have[UK_INPUT]) {
		have_prompt = true;
		out->prompt = c->v[UK_INPUT];
		if (c->have[UK_CACHE_READ])
			out->prompt += c->v[UK_CACHE_READ];
		if (c->have[UK_CACHE_CREATION])
			out->prompt += c->v[UK_CACHE_CREATION];
	}
	if (!have_completion && c->have[UK_OUTPUT]) {
		have_completion = true;
		out->completion = c->v[UK_OUTPUT];
	}
	have_total = c->have[UK_TOTAL];
	out->total = c->v[UK_TOTAL];
	if (!have_prompt && !have_completion && !have_total)
		return false;
	if (!have_total)
		out->total = out->prompt + out->completion;

	out->cached = c->detail[UD_PROMPT_CACHED];
	if (out->cached == 0)
		out->cached = c->detail[UD_INPUT_CACHED];
	if (out->cached == 0 && c->have[UK_CACHE_READ])
		out->cached = c->v[UK_CACHE_READ];
	out->reasoning = c->detail[UD_COMPLETION_REASONING];
	if (out->reasoning == 0)
		out->reasoning = c->detail[UD_OUTPUT_REASONING];
	out->present = true;
	out->estimated = false;
	return true;
}

/*
 * The same counts without a tree, over an object json_scan_body() accepted and in which no
 * byte is a backslash: every key is its raw bytes, no key is repeated (the scan refuses
 * duplicates), and every number is valid JSON that the scan checked against jansson's
 * rules (an integer fits int64_t, a real does not overflow).
 */
static const char *number_count(const char *p, const char *e, bool *have, uint64_t *out)
{
	const char *q = p;
	bool real = false;

	while (q < e && (*q == '-' || *q == '+' || *q == '.' || *q == 'e' || *q == 'E' ||
	                 (*q >= '0' && *q <= '9'))) {
		real |= *q == '.' || *q == 'e' || *q == 'E';
		q++;
	}
	*have = true;
	if (real) {
		char buf[64];
		size_t n = (size_t)(q - p);
		if (n < sizeof(buf)) {
			memcpy(buf, p, n);
			buf[n] = '\0';
			*out = real_count(strtod(buf, NULL));
		} else {
			char *big = strndup(p, n);
			*out = big ? real_count(strtod(big, NULL)) : 0;
			free(big);
		}
	} else if (*p == '-') {
		*out = 0;
	} else {
		uint64_t v = 0;
		for (const char *d = p; d < q; d++)
			v = v * 10 + (uint64_t)(*d - '0'); /* fits: the scan checked int64_t */
		*out = v;
	}
	return q;
}

static bool key_is(const char *k, size_t n, const char *name)
{
	return strlen(name) == n && memcmp(k, name, n) == 0;
}

/* The members of the object at p (validated, no backslash). The top level (details NULL)
 * fills c's counts and walks the details objects; a details object fills *detail from
 * its member called detail_key. */
static const char *walk_counts(const char *p, const char *e, struct usage_counts *c,
                               const char *detail_key, uint64_t *detail)
{
	p = skip_ws(p + 1, e); /* past '{' */
	while (p < e && *p == '"') {
		const char *k = p + 1, *ke = memchr(k, '"', (size_t)(e - k));
		if (ke == NULL)
			return NULL;
		size_t kn = (size_t)(ke - k);
		p = skip_ws(ke + 1, e);
		p = skip_ws(p + 1, e); /* past ':' */
		if (p >= e)
			return NULL;
		bool is_number = *p == '-' || (*p >= '0' && *p <= '9');
		const char *next = NULL;
		if (detail_key == NULL) {
			for (int i = 0; i < UK_N && is_number; i++)
				if (key_is(k, kn, usage_key_names[i]))
					next = number_count(p, e, &c->have[i], &c->v[i]);
			for (int d = 0; d < UD_N && *p == '{' && next == NULL; d++)
				if (key_is(k, kn, usage_detail_names[d][0]))
					next = walk_counts(p, e, NULL, usage_detail_names[d][1],
					                   &c->detail[d]);
		} else if (is_number && key_is(k, kn, detail_key)) {
			bool have;
			next = number_count(p, e, &have, detail);
		}
		if (next == NULL)
			next = skip_value(p, e);
		if (next == NULL)
			return NULL;
		p = skip_ws(next, e);
		if (p < e && *p == ',')
			p = skip_ws(p + 1, e);
	}
	return p < e && *p == '}' ? p + 1 : NULL;
}

/*
 * The common shape checked and read in one pass: keys and strings of printable ASCII
 * without escapes, integers of up to 18 digits, true/false/null, objects nested at most
 * twice. Anything else — a real, an array, an escape, a byte outside 0x20–0x7e in a
 * string, a repeated key that a count depends on, invalid JSON — returns NULL and the
 * caller takes the general path below, so whatever this accepts is valid JSON that
 * jansson reads to the same counts (fuzz_usage compares them for any bytes).
 */
static const char *plain_string(const char *p, const char *e)
{
	p++;
#if defined(__SSE2__)
	/* Sixteen at a time: the first byte that is '"', or not printable ASCII, or '\\' (as
	 * signed bytes, 0x80 and over are under 0x20 too); the bytewise loop below decides. */
	const __m128i sp = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7f),
	              dq = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\');
	while (e - p >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
		__m128i stop = _mm_or_si128(
		        _mm_or_si128(_mm_cmplt_epi8(v, sp), _mm_cmpeq_epi8(v, del)),
		        _mm_or_si128(_mm_cmpeq_epi8(v, dq), _mm_cmpeq_epi8(v, bs)));
		unsigned m = (unsigned)_mm_movemask_epi8(stop);
		if (m != 0) {
			p += __builtin_ctz(m);
			break;
		}
		p += 16;
	}
#endif
	for (; p < e; p++) {
		unsigned char ch = (unsigned char)*p;
		if (ch == '"')
			return p + 1;
		if (ch < 0x20 || ch > 0x7e || ch == '\\')
			return NULL;
	}
	return NULL;
}

static const char *plain_integer(const char *p, const char *e, uint64_t *out)
{
	bool neg = p < e && *p == '-';
	uint64_t v = 0;

	p += neg;
	const char *d = p;
	if (p >= e || *p < '0' || *p > '9')
		return NULL;
	if (*p == '0')
		p++;
	else
		for (; p < e && *p >= '0' && *p <= '9'; p++)
			v = v * 10 + (uint64_t)(*p - '0');
	if (p - d > 18 || (p < e && (*p == '.' || *p == 'e' || *p == 'E')))
		return NULL; /* may not fit int64_t, or a real: the general path */
	*out = neg ? 0 : v;
	return p;
}

static const char *plain_literal(const char *p, const char *e)
{
	static const char *const lit[] = {"true", "false", "null"};
	for (size_t i = 0; i < 3; i++) {
		size_t n = strlen(lit[i]);
		if ((size_t)(e - p) >= n && memcmp(p, lit[i], n) == 0)
			return p + n;
	}
	return NULL;
}

/* The object at p ('{'). Top level: c != NULL (counts, details walked); a details object:
 * *detail from its member detail_key; anything else: validated only (c, detail_key NULL). */
static const char *plain_object(const char *p, const char *e, int depth, struct usage_counts *c,
                                const char *detail_key, uint64_t *detail)
{
	unsigned seen = 0;

	p = skip_ws(p + 1, e);
	if (p < e && *p == '}')
		return p + 1;
	while (p < e && *p == '"') {
		const char *k = p + 1;
		p = plain_string(p, e);
		if (p == NULL)
			return NULL;
		size_t kn = (size_t)(p - 1 - k);
		p = skip_ws(p, e);
		if (p >= e || *p != ':')
			return NULL;
		p = skip_ws(p + 1, e);
		if (p >= e)
			return NULL;
		int key = -1; /* 0..UK_N-1 a count, UK_N + d a details object, UK_N + UD_N the detail */
		if (c != NULL) {
			/* the names' lengths, not strlen per key (usage_key_names, usage_detail_names) */
			static const unsigned char key_len[UK_N] = {13, 17, 12, 23, 27, 13, 12};
			static const unsigned char detail_len[UD_N] = {21, 20, 25, 21};
			for (int i = 0; i < UK_N && key < 0; i++)
				if (kn == key_len[i] && memcmp(k, usage_key_names[i], kn) == 0)
					key = i;
			for (int d = 0; d < UD_N && key < 0; d++)
				if (kn == detail_len[d] && memcmp(k, usage_detail_names[d][0], kn) == 0)
					key = UK_N + d;
		} else if (detail_key != NULL && key_is(k, kn, detail_key)) {
			key = UK_N + UD_N;
		}
		if (key >= 0) {
			if (seen & (1u << key))
				return NULL; /* repeated: jansson's last one wins — the general path */
			seen |= 1u << key;
		}
		if (*p == '-' || (*p >= '0' && *p <= '9')) {
			uint64_t v;
			p = plain_integer(p, e, &v);
			if (p == NULL)
				return NULL;
			if (key >= 0 && key < UK_N) {
				c->have[key] = true;
				c->v[key] = v;
			} else if (key == UK_N + UD_N) {
				*detail = v;
			}
		} else if (*p == '{') {
			if (depth >= 2)
				return NULL;
			if (key >= UK_N && key < UK_N + UD_N)
				p = plain_object(p, e, depth + 1, NULL, usage_detail_names[key - UK_N][1],
				                 &c->detail[key - UK_N]);
			else
				p = plain_object(p, e, depth + 1, NULL, NULL, NULL);
		} else if (*p == '"') {
			p = plain_string(p, e);
		} else {
			p = plain_literal(p, e);
		}
		if (p == NULL)
			return NULL;
		p = skip_ws(p, e);
		if (p < e && *p == ',') {
			p = skip_ws(p + 1, e);
			if (p >= e || *p != '"')
				return NULL;
			continue;
		}
		return p < e && *p == '}' ? p + 1 : NULL;
	}
	return NULL;
}

/* The usage object at s (a depth-1 member's raw value) → *out. It is read as jansson
 * would read it (json_loadb, no flags: duplicate keys allowed, the last one wins; a
 * "\u0000" refused): an object the scan accepts and without a backslash is walked in
 * place; anything else — escapes, duplicates, invalid JSON — is handed to jansson. */
static bool usage_from_span(const struct span *s, struct record_usage *out)
{
	struct usage_counts c;
	struct json_scan js;

	if (s->p == NULL || s->len == 0 || s->p[0] != '{')
		return false;
	memset(&c, 0, sizeof(c));
	if (plain_object(s->p, s->p + s->len, 0, &c, NULL, NULL) == s->p + s->len)
		return fill_usage(&c, out);
	if (memchr(s->p, '\\', s->len) == NULL &&
	    json_scan_body(s->p, s->len, &js) == JSON_SCAN_OK) {
		memset(&c, 0, sizeof(c));
		if (walk_counts(s->p, s->p + s->len, &c, NULL, NULL) != NULL)
			return fill_usage(&c, out);
	}
	json_t *u = json_loadb(s->p, s->len, JSON_DISABLE_EOF_CHECK, NULL);
	bool ok = json_is_object(u);
	if (ok) {
		counts_from_tree(u, &c);
		ok = fill_usage(&c, out);
	}
	json_decref(u);
	if (!ok)
		memset(out, 0, sizeof(*out));
	return ok;
}

bool usage_scan_member(const char *buf, size_t len, const char *name, const char **val,
                       size_t *val_len)
{
	const char *const names[] = {name};
	struct span s;

	if (!scan_members(buf, len, names, 1, &s) || s.p == NULL)
		return false;
	*val = s.p;
	*val_len = s.len;
	return true;
}

bool usage_from_body(const char *body, size_t len, struct record_usage *out)
{
	static const char *const names[] = {"usage"};
	struct span s[1];

	memset(out, 0, sizeof(*out));
	if (body == NULL || !scan_members(body, len, names, 1, s))
		return false;
	if (!usage_from_span(&s[0], out)) {
		memset(out, 0, sizeof(*out));
		return false;
	}
	return true;
}

const char *usage_find(const char *hay, size_t len, const char *needle, size_t n)
{
	const char *s = hay, *e = hay + len;

	if (n < 4 || len < n)
		return memmem(hay, len, needle, n);
#if defined(__SSE2__)
	/* Sixteen starts at a time: those whose bytes 1 and 3 are the needle's (the letters
	 * of a quoted key: rare together), then a compare of each (Muła's generic SIMD
	 * substring search). Loads read s + 1 … s + 18. */
	const __m128i b1 = _mm_set1_epi8(needle[1]), b3 = _mm_set1_epi8(needle[3]);
	while (e - s >= 19) {
		__m128i v1 = _mm_loadu_si128((const __m128i *)(const void *)(s + 1));
		__m128i v3 = _mm_loadu_si128((const __m128i *)(const void *)(s + 3));
		unsigned m = (unsigned)_mm_movemask_epi8(
		        _mm_and_si128(_mm_cmpeq_epi8(v1, b1), _mm_cmpeq_epi8(v3, b3)));
		while (m != 0) {
			const char *c = s + __builtin_ctz(m);
			if ((size_t)(e - c) < n)
				return NULL;
			if (c[0] == needle[0] && memcmp(c, needle, n) == 0)
				return c;
			m &= m - 1;
		}
		s += 16;
	}
#endif
	for (; (size_t)(e - s) >= n; s++)
		if (s[1] == needle[1] && s[3] == needle[3] && memcmp(s, needle, n) == 0)
			return s;
	return NULL;
}

/*
 * Whether the data ends with a top-level "usage":null — the last member of every chunk but
 * the usage chunk when include_usage is asked for (OpenAI, vLLM, the mock), checked from the
 * end in a few bytes. The quote that opens "usage" follows '{' or ',' (whitespace between
 * allowed), so it opens a string: in valid JSON that string is a key of the object the final
 * '}' closes, the top-level one. In valid JSON the answer is the full scan's, but for a chunk
 * that repeats the top-level key "usage" (an object first, null last): the last one counts.
 */
static bool ends_with_null_usage(const char *data, size_t len)
{
	static const char tail[] = "\"usage\":null}";
	const size_t n = sizeof(tail) - 1;
	const char *e = data + len;

	while (e > data && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
		e--;
	if ((size_t)(e - data) <= n || memcmp(e - n, tail, n) != 0)
		return false;
	const char *p = e - n;
	while (p > data && (p[-1] == ' ' || p[-1] == '\t' || p[-1] == '\n' || p[-1] == '\r'))
		p--;
	return p > data && (p[-1] == ',' || p[-1] == '{');
}

bool usage_from_sse_data(const char *data, size_t len, struct record_usage *out, bool *usage_only)
{
	static const char *const names[] = {"usage", "choices"};
	struct span s[2];

	if (usage_only != NULL)
		*usage_only = false;
	/* The hot path: most chunks carry no usage at all, and with include_usage every chunk
	 * says "usage":null, as its last member — only an object is worth a scan. */
	if (data == NULL || ends_with_null_usage(data, len))
		return false;
	bool object = false;
	for (const char *p = data, *end = data + len;
	     !object && (p = usage_find(p, (size_t)(end - p), "\"usage\"", 7)) != NULL;) {
		p = skip_ws(p + 7, end);
		if (p < end && *p == ':')
			p = skip_ws(p + 1, end);
		object = p < end && *p == '{';
	}
	if (!object)
		return false;
	if (!scan_members(data, len, names, 2, s) || !usage_from_span(&s[0], out))
		return false;
	if (usage_only != NULL && s[1].p != NULL && s[1].p[0] == '[') {
		const char *p = skip_ws(s[1].p + 1, s[1].p + s[1].len);
		*usage_only = p < s[1].p + s[1].len && *p == ']';
	}
	return true;
}

/* ------------------------------------------------------------ estimates */

struct text_count {
	size_t bytes;   /* text */
	uint64_t ids;   /* explicit token ids */
	uint64_t media; /* image / audio / file parts */
};

/* Parts whose bytes are not text (base64 images would otherwise count as megatokens). */
static bool is_media_key(const char *k)
{
	return strcmp(k, "image_url") == 0 || strcmp(k, "input_audio") == 0 ||
	       strcmp(k, "image") == 0 || strcmp(k, "file") == 0 || strcmp(k, "source") == 0 ||
	       strcmp(k, "audio") == 0;
}

/* Text bytes of every string in v; with keys, object member names count too (tool schemas).
 * Integers in an array are token ids (completions and embeddings prompts). */
static void count_text(const json_t *v, bool keys, struct text_count *tc, int depth)
{
	size_t i;
	const char *k;
	json_t *x;

	if (depth > 64)
		return;
	if (json_is_string(v)) {
		tc->bytes += json_string_length(v);
	} else if (json_is_array(v)) {
		json_array_foreach((json_t *)v, i, x)
		{
			if (json_is_integer(x))
				tc->ids++;
			else
				count_text(x, keys, tc, depth + 1);
		}
	} else if (json_is_object(v)) {
		json_object_foreach((json_t *)v, k, x)
		{
			if (!keys && is_media_key(k)) {
				tc->media++;
				continue;
			}
			if (keys)
				tc->bytes += strlen(k);
			count_text(x, keys, tc, depth + 1);
		}
	}
}

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

uint64_t usage_estimate_prompt(const json_t *body)
{
	struct text_count tc = {0};
	uint64_t messages = 0, n;
	const json_t *v;

	if (!json_is_object(body))
		return 1;
	v = json_object_get(body, "messages");
	if (json_is_array(v)) {
		size_t i;
		json_t *m;
		json_array_foreach((json_t *)v, i, m)
		{
			messages++;
			/* role, content, name, tool_calls and their arguments: everything the
			 * template renders. The role is covered by the per-message overhead. */
			if (json_is_object(m)) {
				const char *k;
				json_t *x;
				json_object_foreach(m, k, x)
				{
					if (strcmp(k, "role") != 0)
						count_text(x, false, &tc, 1);
				}
			} else {
				count_text(m, false, &tc, 1);
			}
		}
	}
	count_text(json_object_get(body, "prompt"), false, &tc, 0);
	count_text(json_object_get(body, "input"), false, &tc, 0);
	count_text(json_object_get(body, "system"), false, &tc, 0);       /* anthropic */
	count_text(json_object_get(body, "instructions"), false, &tc, 0); /* responses */
	count_text(json_object_get(body, "tools"), true, &tc, 0);
	count_text(json_object_get(body, "functions"), true, &tc, 0);

	n = ceil_div(tc.bytes, USAGE_BYTES_PER_TOKEN) + tc.ids + tc.media * USAGE_TOKENS_PER_IMAGE;
	if (messages > 0)
		n += messages * USAGE_TOKENS_PER_MESSAGE + USAGE_TOKENS_PER_REPLY;
	return n > 0 ? n : 1;
}

uint64_t usage_completion_budget(const json_t *body, uint64_t default_budget)
{
	static const char *const caps[] = {"max_completion_tokens", "max_tokens",
	                                   "max_output_tokens"};
	uint64_t budget = default_budget;
	const json_t *v;

	if (!json_is_object(body))
		return default_budget;
	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		v = json_object_get(body, caps[i]);
		if (json_is_integer(v) && json_integer_value(v) >= 0) {
			budget = (uint64_t)json_integer_value(v);
			break;
		}
	}
	/* n choices each produce up to the cap. Both numbers are the client's: the product
	 * saturates instead of wrapping (a wrapped product would reserve almost nothing), and
	 * the caller clamps it to what one attempt may reserve (max_reservation). */
	v = json_object_get(body, "n");
	if (json_is_integer(v) && json_integer_value(v) > 1 && json_integer_value(v) <= 128) {
		uint64_t n = (uint64_t)json_integer_value(v);
		budget = budget > UINT64_MAX / n ? UINT64_MAX : budget * n;
	}
	return budget;
}

uint64_t usage_estimate_text(size_t text_bytes)
{
	return ceil_div(text_bytes, USAGE_BYTES_PER_TOKEN);
}

void usage_set_estimate(struct record_usage *out, uint64_t prompt, uint64_t completion)
{
	memset(out, 0, sizeof(*out));
	out->present = true;
	out->estimated = true;
	out->prompt = prompt;
	out->completion = completion;
	out->total = prompt + completion;
}
