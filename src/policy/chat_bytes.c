/* chat_bytes.c — the response policies over a chat answer's bytes, without a tree (policy_chain.h).
 *
 * A chat.completion (non-stream) or a chat.completion.chunk (one stream event) is read in one
 * validating pass that records, per choice, where its index, its text (message.content or
 * delta.content) and its finish_reason are in the caller's bytes. The text goes through the
 * chain decoded — escapes resolved, so a pattern sees "4111\u0031..." as the digits it
 * stands for — and only when a policy changed something is a new document written, by
 * splicing the caller's bytes: each changed text is written back as a JSON string (escaped
 * again: a mask or a cut never leaves invalid JSON behind), a finish_reason the gateway
 * imposes replaces or joins the choice's. Everything else is the upstream's bytes, as they
 * came. An answer the policies leave alone is not copied at all.
 *
 * What the pass accepts is JSON (RFC 8259: structure, strings with their escapes and UTF-8,
 * numbers, literals, at most CB_MAX_DEPTH deep). It declines — returns false, having run
 * nothing, so the caller takes the tree path (json_loadb and policy_run_chat_chunk), which
 * then decides — whatever it cannot read with certainty the way a JSON parser would:
 *   - a key it looks at (choices, index, delta/message, content, finish_reason, error,
 *     object) written with an escape, or repeated in its object (parsers differ on which
 *     duplicate wins; the tree path takes jansson's answer);
 *   - an error event ("error" at the top, or "object": "error");
 *   - more than CB_MAX_CHOICES choices, an index too large to be an int64;
 *   - anything that is not valid JSON, or not an object at the top.
 * Two things jansson refuses and this pass does not look at, because they do not change
 * what the policies read: a duplicate key elsewhere, and a number beyond a double's range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "sluice/policy_chain.h"

#define CB_MAX_DEPTH 64

struct cb_span {
	const char *p; /* first byte of the value; NULL: absent */
	size_t len;    /* bytes of the value */
};

struct cb_choice {
	unsigned index;        /* as choice_index() in policy.c reads it */
	const char *obj;       /* the choice object's '{' */
	bool has_part;         /* delta / message is an object */
	const char *part;      /* its '{' */
	bool part_empty;       /* it has no members */
	struct cb_span text;   /* content's value (any type) */
	bool text_is_string;   /* ... a string */
	bool text_escaped;     /* ... holding an escape */
	struct cb_span finish; /* finish_reason's value (any type) */
	bool final;            /* finish_reason is a string */
};

struct cb_doc {
	bool choices; /* the document has a choices array */
	size_t n;
	struct cb_choice c[POLICY_CHAT_BYTES_CHOICES];
};

/* ---------------------------------------------------------------- the validating pass */

struct cb {
	const char *p, *e;
	int depth;
};

#define CB_INLINE static inline __attribute__((always_inline))

CB_INLINE void ws(struct cb *s)
{
	/* most documents have none: one test for the common case */
	while (s->p < s->e && (unsigned char)*s->p <= ' ' &&
	       (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
		s->p++;
}

static int hexv(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = (char)(c | 0x20);
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static long hex4(const char *p)
{
	long v = 0;
	for (int i = 0; i < 4; i++) {
		int h = hexv(p[i]);
		if (h < 0)
			return -1;
		v = v * 16 + h;
	}
	return v;
}

/* One UTF-8 sequence at p (lead byte >= 0x80): its length, 0 when invalid (overlong,
 * surrogate, past U+10FFFF, truncated). */
static size_t utf8_seq(const unsigned char *p, const unsigned char *e)
{
	unsigned c = p[0];
	size_t n;
	unsigned min;
	uint32_t cp;

	if (c >= 0xC2 && c <= 0xDF) {
		n = 2, min = 0x80, cp = c & 0x1F;
	} else if (c >= 0xE0 && c <= 0xEF) {
		n = 3, min = 0x800, cp = c & 0x0F;
	} else if (c >= 0xF0 && c <= 0xF4) {
		n = 4, min = 0x10000, cp = c & 0x07;
	} else {
		return 0;
	}
	if ((size_t)(e - p) < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xC0) != 0x80)
			return 0;
		cp = (cp << 6) | (p[i] & 0x3F);
	}
	if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return 0;
	return n;
}

/* Whether the byte needs no look inside a string: not '"', '\\', under 0x20 or 0x80 and over. */
static bool plain_byte(unsigned char c)
{
	return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
}

/* Past the plain bytes from p (up to e), eight at a time: in each 64-bit word, a byte that
 * is '"' or '\\' is turned into zero and found by the zero-byte test ((x - 0x01..) & ~x &
 * 0x80..), one under 0x20 borrows in x - 0x20.., one of 0x80 and over has its top bit. The
 * lowest flagged byte is the first that is not plain (later flags may be spurious). */
static const unsigned char *skip_plain(const unsigned char *p, const unsigned char *e)
{
	const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;

	while (e - p >= 8) {
		uint64_t x;
		memcpy(&x, p, 8);
		uint64_t q = x ^ (ones * '"'), b = x ^ (ones * '\\');
		uint64_t bad = (((q - ones) & ~q) | ((b - ones) & ~b) | (x - ones * 0x20) | x) & highs;
		if (bad != 0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			return p + __builtin_ctzll(bad) / 8;
#else
			break;
#endif
		}
		p += 8;
	}
	while (p < e && plain_byte(*p))
		p++;
	return p;
}

/* A string at s->p ('"'): validated, s->p after its closing quote. */
CB_INLINE bool string(struct cb *s, bool *escaped)
{
	const unsigned char *p = (const unsigned char *)s->p + 1, *e = (const unsigned char *)s->e;
	bool esc = false;

	for (;;) {
		p = skip_plain(p, e);
		if (p >= e)
			return false;
		unsigned char c = *p;
		if (c == '"')
			break;
		if (c < 0x20)
			return false;
		if (c >= 0x80) {
			size_t n = utf8_seq(p, e);
			if (n == 0)
				return false;
			p += n;
			continue;
		}
		/* an escape */
		esc = true;
		if (e - p < 2)
			return false;
		switch (p[1]) {
		case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
			p += 2;
			continue;
		case 'u':
			break;
		default:
			return false;
		}
		if (e - p < 6)
			return false;
		long u = hex4((const char *)p + 2);
		if (u < 0)
			return false;
		p += 6;
		if (u >= 0xDC00 && u <= 0xDFFF)
			return false; /* a lone low surrogate */
		if (u >= 0xD800 && u <= 0xDBFF) {
			if (e - p < 6 || p[0] != '\\' || p[1] != 'u')
				return false;
			long lo = hex4((const char *)p + 2);
			if (lo < 0xDC00 || lo > 0xDFFF)
				return false;
			p += 6;
		}
	}
	if (escaped)
		*escaped = esc;
	s->p = (const char *)p + 1;
	return true;
}

static bool digits(struct cb *s)
{
	const char *q = s->p;
	while (s->p < s->e && *s->p >= '0' && *s->p <= '9')
		s->p++;
	return s->p > q;
}

/* A number; *integer: it has no fraction and no exponent. */
static bool number(struct cb *s, bool *integer)
{
	if (s->p < s->e && *s->p == '-')
		s->p++;
	if (s->p >= s->e)
		return false;
	if (*s->p == '0')
		s->p++;
	else if (!digits(s))
		return false;
	*integer = true;
	if (s->p < s->e && *s->p == '.') {
		s->p++;
		*integer = false;
		if (!digits(s))
			return false;
	}
	if (s->p < s->e && (*s->p == 'e' || *s->p == 'E')) {
		s->p++;
		*integer = false;
		if (s->p < s->e && (*s->p == '+' || *s->p == '-'))
			s->p++;
		if (!digits(s))
			return false;
	}
	return true;
}

static bool literal(struct cb *s, const char *w, size_t n)
{
	if ((size_t)(s->e - s->p) < n || memcmp(s->p, w, n) != 0)
		return false;
	s->p += n;
	return true;
}

static bool value(struct cb *s);

/* An object or an array, generic: every member validated, nothing recorded. */
static bool container(struct cb *s)
{
	char close = *s->p == '{' ? '}' : ']';
	bool obj = close == '}';

	if (++s->depth > CB_MAX_DEPTH)
		return false;
	s->p++;
	ws(s);
	if (s->p < s->e && *s->p == close) {
		s->p++;
		s->depth--;
		return true;
	}
	for (;;) {
		if (obj) {
			if (s->p >= s->e || *s->p != '"' || !string(s, NULL))
				return false;
			ws(s);
			if (s->p >= s->e || *s->p != ':')
				return false;
			s->p++;
			ws(s);
		}
		if (!value(s))
			return false;
		ws(s);
		if (s->p >= s->e)
			return false;
		if (*s->p == ',') {
			s->p++;
			ws(s);
			continue;
		}
		if (*s->p != close)
			return false;
		s->p++;
		s->depth--;
		return true;
	}
}

static bool value(struct cb *s)
{
	bool integer;

	if (s->p >= s->e)
		return false;
	switch (*s->p) {
	case '"':
		return string(s, NULL);
	case '{':
	case '[':
		return container(s);
	case 't':
		return literal(s, "true", 4);
	case 'f':
		return literal(s, "false", 5);
	case 'n':
		return literal(s, "null", 4);
	default:
		return number(s, &integer);
	}
}

/* The members of an object at s->p, one at a time: the key's raw bytes (between the quotes)
 * and whether it holds an escape; s->p at the value. Returns 1 for a member, 0 at the end
 * (s->p after '}'), -1 on invalid JSON. first: s->p is at '{'. */
CB_INLINE int member(struct cb *s, bool *first, const char **key, size_t *klen, bool *kesc)
{
	if (*first) {
		*first = false;
		if (++s->depth > CB_MAX_DEPTH)
			return -1;
		s->p++;
		ws(s);
		if (s->p < s->e && *s->p == '}') {
			s->p++;
			s->depth--;
			return 0;
		}
	} else {
		ws(s);
		if (s->p >= s->e)
			return -1;
		if (*s->p == '}') {
			s->p++;
			s->depth--;
			return 0;
		}
		if (*s->p != ',')
			return -1;
		s->p++;
		ws(s);
	}
	if (s->p >= s->e || *s->p != '"')
		return -1;
	*key = s->p + 1;
	if (!string(s, kesc))
		return -1;
	*klen = (size_t)(s->p - 1 - *key);
	ws(s);
	if (s->p >= s->e || *s->p != ':')
		return -1;
	s->p++;
	ws(s);
	return s->p < s->e ? 1 : -1; /* the callers look at the value's first byte */
}

/* Whether the key k[0..n) is the literal name: a comparison of known length, which the
 * compiler turns into a few integer compares. */
#define IS_KEY(k, n, name) ((n) == sizeof(name) - 1 && memcmp((k), (name), sizeof(name) - 1) == 0)

/* The keys each level reads, as 1 + their position (0: another key). */
CB_INLINE int part_key(const char *k, size_t n)
{
	return IS_KEY(k, n, "content") ? 1 : 0;
}

CB_INLINE int choice_key(const char *k, size_t n)
{
	return IS_KEY(k, n, "index")           ? 1
	       : IS_KEY(k, n, "delta")         ? 2
	       : IS_KEY(k, n, "message")       ? 3
	       : IS_KEY(k, n, "finish_reason") ? 4
	                                       : 0;
}

CB_INLINE int top_key(const char *k, size_t n)
{
	return IS_KEY(k, n, "choices") ? 1 : IS_KEY(k, n, "error") ? 2 : IS_KEY(k, n, "object") ? 3 : 0;
}

/* w: what the level's *_key said. w, or -1: decline (an escaped key, which might be one of
 * them, or one of them twice; *seen has a bit per key read so far). */
CB_INLINE int watched(int w, bool esc, unsigned *seen)
{
	if (esc)
		return -1;
	if (w > 0) {
		if (*seen & (1u << w))
			return -1;
		*seen |= 1u << w;
	}
	return w;
}

/* delta / message: content. */
static bool part(struct cb *s, struct cb_choice *c)
{
	bool first = true, esc;
	const char *k;
	size_t kn;
	unsigned seen = 0;
	int m, w;

	c->has_part = true;
	c->part = s->p;
	c->part_empty = true;
	while ((m = member(s, &first, &k, &kn, &esc)) == 1) {
		c->part_empty = false;
		if ((w = watched(part_key(k, kn), esc, &seen)) < 0)
			return false;
		const char *v = s->p;
		if (w == 1 && *v == '"') {
			if (!string(s, &c->text_escaped))
				return false;
			c->text_is_string = true;
		} else if (!value(s)) {
			return false;
		}
		if (w == 1) {
			c->text.p = v;
			c->text.len = (size_t)(s->p - v);
		}
	}
	return m == 0;
}

static bool choice(struct cb *s, struct cb_choice *c, size_t pos, bool chunk)
{
	bool first = true, esc;
	const char *k;
	size_t kn;
	unsigned seen = 0;
	int m, w;

	memset(c, 0, sizeof *c);
	c->index = (unsigned)pos;
	c->obj = s->p;
	while ((m = member(s, &first, &k, &kn, &esc)) == 1) {
		if ((w = watched(choice_key(k, kn), esc, &seen)) < 0)
			return false;
		const char *v = s->p;
		if (w == 1 && (*v == '-' || (*v >= '0' && *v <= '9'))) {
			bool integer;
			if (!number(s, &integer))
				return false;
			if (integer) {
				if (s->p - v > 18)
					return false; /* near int64's bounds: the tree path decides */
				unsigned long long x = 0;
				for (const char *q = v + (*v == '-'); q < s->p; q++)
					x = x * 10 + (unsigned)(*q - '0');
				c->index = x < POLICY_MAX_CHOICES && (*v != '-' || x == 0)
				                   ? (unsigned)x
				                   : POLICY_MAX_CHOICES;
			}
			continue;
		}
		if (w == (chunk ? 2 : 3) && *v == '{') {
			if (!part(s, c))
				return false;
			continue;
		}
		if (!value(s))
			return false;
		if (w == 4) {
			c->finish.p = v;
			c->finish.len = (size_t)(s->p - v);
			c->final = *v == '"';
		}
	}
	return m == 0;
}

static bool doc_scan(const char *data, size_t len, bool chunk, struct cb_doc *d)
{
	struct cb s = {data, data + len, 0};
	bool first = true, esc;
	const char *k;
	size_t kn;
	unsigned seen = 0;
	int m, w;

	d->n = 0;
	d->choices = false;
	ws(&s);
	if (s.p >= s.e || *s.p != '{')
		return false;
	while ((m = member(&s, &first, &k, &kn, &esc)) == 1) {
		if ((w = watched(top_key(k, kn), esc, &seen)) < 0 || w == 2)
			return false;
		const char *v = s.p;
		if (w == 3 && *v == '"') {
			if (!string(&s, &esc))
				return false;
			if (esc || ((size_t)(s.p - v) == 7 && memcmp(v, "\"error\"", 7) == 0))
				return false;
			continue;
		}
		if (w != 1 || *v != '[') {
			if (!value(&s))
				return false;
			continue;
		}
		/* choices */
		d->choices = true;
		if (++s.depth > CB_MAX_DEPTH)
			return false;
		s.p++;
		ws(&s);
		if (s.p < s.e && *s.p == ']') {
			s.p++;
			s.depth--;
			continue;
		}
		for (size_t pos = 0;; pos++) {
			if (s.p >= s.e)
				return false;
			if (*s.p == '{') {
				if (d->n == POLICY_CHAT_BYTES_CHOICES ||
				    !choice(&s, &d->c[d->n++], pos, chunk))
					return false;
			} else if (!value(&s)) {
				return false;
			}
			ws(&s);
			if (s.p < s.e && *s.p == ',') {
				s.p++;
				ws(&s);
				continue;
			}
			if (s.p >= s.e || *s.p != ']')
				return false;
			s.p++;
			s.depth--;
			break;
		}
	}
	if (m != 0)
		return false;
	ws(&s);
	/* An answer has its choices (as the tree path requires); a chunk may not. */
	return s.p == s.e && (chunk || d->choices);
}

/* ---------------------------------------------------------------- decoding and encoding */

/* A validated string's decoded bytes (span without its quotes) appended to buf. */
static bool decode(struct evbuffer *buf, const char *p, size_t n)
{
	const char *e = p + n, *run = p;
	char tmp[4];

	while (p < e) {
		if (*p != '\\') {
			p++;
			continue;
		}
		if (p > run && evbuffer_add(buf, run, (size_t)(p - run)) != 0)
			return false;
		char c = p[1];
		size_t k = 1;
		switch (c) {
		case 'b': tmp[0] = '\b'; break;
		case 'f': tmp[0] = '\f'; break;
		case 'n': tmp[0] = '\n'; break;
		case 'r': tmp[0] = '\r'; break;
		case 't': tmp[0] = '\t'; break;
		case 'u': {
			uint32_t u = (uint32_t)hex4(p + 2);
			p += 6;
			if (u >= 0xD800 && u <= 0xDBFF) {
				uint32_t lo = (uint32_t)hex4(p + 2);
				p += 6;
				u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
			}
			if (u < 0x80) {
				tmp[0] = (char)u;
			} else if (u < 0x800) {
				tmp[0] = (char)(0xC0 | (u >> 6));
				tmp[1] = (char)(0x80 | (u & 0x3F));
				k = 2;
			} else if (u < 0x10000) {
				tmp[0] = (char)(0xE0 | (u >> 12));
				tmp[1] = (char)(0x80 | ((u >> 6) & 0x3F));
				tmp[2] = (char)(0x80 | (u & 0x3F));
				k = 3;
			} else {
				tmp[0] = (char)(0xF0 | (u >> 18));
				tmp[1] = (char)(0x80 | ((u >> 12) & 0x3F));
				tmp[2] = (char)(0x80 | ((u >> 6) & 0x3F));
				tmp[3] = (char)(0x80 | (u & 0x3F));
				k = 4;
			}
			if (evbuffer_add(buf, tmp, k) != 0)
				return false;
			run = p;
			continue;
		}
		default: tmp[0] = c; break; /* " \ / */
		}
		if (evbuffer_add(buf, tmp, k) != 0)
			return false;
		p += 2;
		run = p;
	}
	return p <= run || evbuffer_add(buf, run, (size_t)(p - run)) == 0;
}

/* text[0..n) as a JSON string, quotes included. */
static bool encode(struct evbuffer *out, const char *p, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	const char *e = p + n, *run = p;
	char esc[6] = {'\\', 'u', '0', '0', 0, 0};

	if (evbuffer_add(out, "\"", 1) != 0)
		return false;
	for (; p < e; p++) {
		unsigned char c = (unsigned char)*p;
		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		if (p > run && evbuffer_add(out, run, (size_t)(p - run)) != 0)
			return false;
		run = p + 1;
		const char *two = c == '"'    ? "\\\""
		                  : c == '\\' ? "\\\\"
		                  : c == '\n' ? "\\n"
		                  : c == '\r' ? "\\r"
		                  : c == '\t' ? "\\t"
		                  : c == '\b' ? "\\b"
		                  : c == '\f' ? "\\f"
		                              : NULL;
		if (two != NULL) {
			if (evbuffer_add(out, two, 2) != 0)
				return false;
			continue;
		}
		esc[4] = hex[c >> 4];
		esc[5] = hex[c & 15];
		if (evbuffer_add(out, esc, 6) != 0)
			return false;
	}
	if (p > run && evbuffer_add(out, run, (size_t)(p - run)) != 0)
		return false;
	return evbuffer_add(out, "\"", 1) == 0;
}

/* ---------------------------------------------------------------- the splice */

enum edit_kind {
	EDIT_TEXT,       /* replace the content value with the text */
	EDIT_ADD_TEXT,   /* insert "content": text at the start of the part */
	EDIT_FINISH,     /* replace finish_reason's value with a string (NULL: null) */
	EDIT_ADD_FINISH, /* insert "finish_reason": string at the start of the choice */
};

struct edit {
	const char *at; /* where in the input */
	size_t skip;    /* input bytes replaced */
	enum edit_kind kind;
	size_t text_off, text_len; /* EDIT_*TEXT: in the run's text buffer */
	const char *str;           /* EDIT_*FINISH */
	bool comma;                /* EDIT_ADD_*: a comma after (the object had members) */
};

#define MAX_EDITS (2 * POLICY_CHAT_BYTES_CHOICES)

static bool write_edit(struct evbuffer *out, const struct edit *ed, const char *texts)
{
	bool ok = true;
	switch (ed->kind) {
	case EDIT_ADD_TEXT:
		ok = evbuffer_add(out, "\"content\":", 10) == 0;
		/* fall through */
	case EDIT_TEXT:
		ok = ok && encode(out, texts + ed->text_off, ed->text_len);
		break;
	case EDIT_ADD_FINISH:
		ok = evbuffer_add(out, "\"finish_reason\":", 16) == 0;
		/* fall through */
	case EDIT_FINISH:
		if (ed->str == NULL)
			ok = ok && evbuffer_add(out, "null", 4) == 0;
		else
			ok = ok && encode(out, ed->str, strlen(ed->str));
		break;
	}
	if (ed->comma)
		ok = ok && evbuffer_add(out, ",", 1) == 0;
	return ok;
}

static bool splice(struct evbuffer *out, const char *data, size_t len, struct edit *ed, size_t n,
                   const char *texts)
{
	/* In input order (few edits: insertion sort). */
	for (size_t i = 1; i < n; i++) {
		struct edit x = ed[i];
		size_t j = i;
		while (j > 0 && ed[j - 1].at > x.at) {
			ed[j] = ed[j - 1];
			j--;
		}
		ed[j] = x;
	}
	const char *p = data;
	for (size_t i = 0; i < n; i++) {
		if (ed[i].at > p && evbuffer_add(out, p, (size_t)(ed[i].at - p)) != 0)
			return false;
		if (!write_edit(out, &ed[i], texts))
			return false;
		p = ed[i].at + ed[i].skip;
	}
	return p >= data + len || evbuffer_add(out, p, (size_t)(data + len - p)) == 0;
}

/* ---------------------------------------------------------------- the runs */

bool policy_chat_bytes_readable(const char *data, size_t len, bool chunk)
{
	struct cb_doc d;
	return doc_scan(data, len, chunk, &d);
}

/* A scan kept for the next policy_run_chat_bytes over the same bytes (the run's slot). */
struct cb_saved {
	const char *data; /* NULL: nothing kept */
	size_t len;
	bool chunk;
	struct cb_doc d;
};

bool policy_run_chat_bytes_readable(struct policy_run *run, const char *data, size_t len,
                                    bool chunk)
{
	void **slot = policy_run_bytes_slot(run);
	struct cb_saved *sv = *slot;

	if (sv == NULL && (sv = *slot = malloc(sizeof *sv)) == NULL)
		return policy_chat_bytes_readable(data, len, chunk);
	sv->data = NULL;
	if (!doc_scan(data, len, chunk, &sv->d))
		return false;
	sv->data = data;
	sv->len = len;
	sv->chunk = chunk;
	return true;
}

/*
 * The chain over each choice's text; the changed texts and finish reasons are spliced into
 * out. Text buffers: run_text holds, one after the other, each choice's decoded input (when
 * escaped) and then each choice's output, addressed by offset (the buffer may move).
 */
enum policy_verdict policy_run_chat_bytes(struct policy_run *run, const char *data, size_t len,
                                          bool chunk, struct evbuffer *out,
                                          struct policy_chat_bytes *res)
{
	struct cb_doc scanned, *d = &scanned;
	struct cb_saved *sv = *policy_run_bytes_slot(run);
	struct edit ed[MAX_EDITS];
	size_t n_ed = 0;
	enum policy_verdict result = POLICY_CONTINUE;
	struct evbuffer *work = policy_run_bytes_buffer(run);

	res->read = false;
	res->changed = false;
	res->text_bytes = 0;
	if (sv != NULL && sv->data == data && sv->len == len && sv->chunk == chunk) {
		d = &sv->d; /* read by policy_run_chat_bytes_readable: once */
		sv->data = NULL;
	} else if (!doc_scan(data, len, chunk, &scanned)) {
		return POLICY_CONTINUE;
	}
	res->read = true;
	if (work == NULL)
		return POLICY_REFUSE;
	for (size_t i = 0; i < d->n; i++) {
		struct cb_choice *c = &d->c[i];
		bool final = chunk ? c->final : true;
		if (!c->text_is_string && !(chunk && final))
			continue; /* no text to look at (tool calls, a refusal) */
		const char *text = "";
		size_t tlen = 0;
		if (c->text_is_string) {
			text = c->text.p + 1;
			tlen = c->text.len - 2;
			if (c->text_escaped) {
				size_t off = evbuffer_get_length(work);
				if (!decode(work, text, tlen))
					return POLICY_REFUSE;
				tlen = evbuffer_get_length(work) - off;
				text = "";
				if (tlen > 0) {
					const char *w = (const char *)evbuffer_pullup(work, -1);
					if (w == NULL)
						return POLICY_REFUSE;
					text = w + off;
				}
			}
			res->text_bytes += tlen;
		}
		/* The chain's output goes after everything in work: its offset there. */
		size_t o0 = evbuffer_get_length(work);
		struct evbuffer *tout = policy_run_text_out(run);
		bool passed;
		if (tout == NULL)
			return POLICY_REFUSE;
		enum policy_verdict v =
		        policy_run_text_ref(run, c->index, text, tlen, final, tout, &passed);
		if (v == POLICY_REFUSE)
			return v;
		size_t olen = evbuffer_get_length(tout);
		bool same;
		if (passed) {
			same = true;
		} else if (olen == 0) {
			same = !c->text_is_string || tlen == 0;
		} else {
			const char *o = (const char *)evbuffer_pullup(tout, -1);
			if (o == NULL)
				return POLICY_REFUSE;
			same = c->text_is_string && olen == tlen && memcmp(o, text, tlen) == 0;
		}
		if (!same) {
			if (chunk ? !c->has_part : !c->text_is_string)
				return POLICY_REFUSE; /* nowhere to put the text (as the tree path) */
			if (evbuffer_add_buffer(work, tout) != 0)
				return POLICY_REFUSE;
			struct edit *e = &ed[n_ed++];
			e->text_off = o0;
			e->text_len = olen;
			e->str = NULL;
			if (c->text.p != NULL) {
				e->kind = EDIT_TEXT;
				e->at = c->text.p;
				e->skip = c->text.len;
				e->comma = false;
			} else {
				e->kind = EDIT_ADD_TEXT;
				e->at = c->part + 1;
				e->skip = 0;
				e->comma = !c->part_empty;
			}
		}
		if (v == POLICY_STOP) {
			result = POLICY_STOP;
			/* A stream: the gateway's finish_reason ends it, not the upstream's. A
			 * non-stream choice carries the gateway's. */
			const char *fr = chunk ? NULL : policy_run_finish_reason(run, c->index);
			struct edit *e = &ed[n_ed];
			if (c->finish.p != NULL) {
				if (!(chunk && !c->final)) {
					e->kind = EDIT_FINISH;
					e->at = c->finish.p;
					e->skip = c->finish.len;
					e->comma = false;
					e->str = fr;
					n_ed++;
				}
			} else if (!chunk) {
				e->kind = EDIT_ADD_FINISH;
				e->at = c->obj + 1;
				e->skip = 0;
				e->comma = true; /* the choice has its message at least */
				e->str = fr;
				n_ed++;
			}
		}
	}
	if (n_ed > 0) {
		const char *texts = evbuffer_get_length(work) ? (const char *)evbuffer_pullup(work, -1)
		                                              : "";
		if (texts == NULL || !splice(out, data, len, ed, n_ed, texts))
			return POLICY_REFUSE;
		res->changed = true;
	}
	return result;
}
