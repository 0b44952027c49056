/* usage.c — token usage: read "usage" without parsing whole responses; estimate it. */
#include "sluice/usage.h"

#include <string.h>

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
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* p at the opening quote; returns just past the closing quote, NULL when unterminated. */
static const char *skip_string(const char *p, const char *e)
{
	for (p++; p < e; p++) {
		if (*p == '\\')
			p++;
		else if (*p == '"')
			return p + 1;
	}
	return NULL;
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

	for (size_t i = 0; i < n; i++)
		found[i].p = NULL;
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
			if (found[i].p == NULL && strlen(names[i]) == name_len &&
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

static bool count_of(const json_t *obj, const char *key, uint64_t *out)
{
	const json_t *v = json_object_get(obj, key);
	double d;

	if (json_is_integer(v)) {
		json_int_t i = json_integer_value(v);
		*out = i > 0 ? (uint64_t)i : 0;
		return true;
	}
	if (json_is_real(v)) {
		d = json_real_value(v);
		*out = d > 0 && d < 1.8e19 ? (uint64_t)d : 0;
		return true;
	}
	return false;
}

static uint64_t detail_count(const json_t *usage, const char *details, const char *key)
{
	uint64_t v = 0;
	const json_t *d = json_object_get(usage, details);

	if (json_is_object(d))
		count_of(d, key, &v);
	return v;
}

static bool fill_usage(const json_t *u, struct record_usage *out)
{
	uint64_t v;
	bool have_prompt, have_completion, have_total;

	memset(out, 0, sizeof(*out));
	if (!json_is_object(u))
		return false;

	/* OpenAI chat / completions / embeddings */
	have_prompt = count_of(u, "prompt_tokens", &out->prompt);
	have_completion = count_of(u, "completion_tokens", &out->completion);
	/* Anthropic and the Responses API: Anthropic's input_tokens leave out cache reads and
	 * writes, which still count as prompt; the Responses API has neither field. */
	if (!have_prompt && count_of(u, "input_tokens", &out->prompt)) {
		have_prompt = true;
		if (count_of(u, "cache_read_input_tokens", &v))
			out->prompt += v;
		if (count_of(u, "cache_creation_input_tokens", &v))
			out->prompt += v;
	}
	if (!have_completion)
		have_completion = count_of(u, "output_tokens", &out->completion);
	have_total = count_of(u, "total_tokens", &out->total);
	if (!have_prompt && !have_completion && !have_total)
		return false;
	if (!have_total)
		out->total = out->prompt + out->completion;

	out->cached = detail_count(u, "prompt_tokens_details", "cached_tokens");
	if (out->cached == 0)
		out->cached = detail_count(u, "input_tokens_details", "cached_tokens");
	if (out->cached == 0 && count_of(u, "cache_read_input_tokens", &v))
		out->cached = v;
	out->reasoning = detail_count(u, "completion_tokens_details", "reasoning_tokens");
	if (out->reasoning == 0)
		out->reasoning = detail_count(u, "output_tokens_details", "reasoning_tokens");
	out->present = true;
	out->estimated = false;
	return true;
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

static bool usage_from_span(const struct span *s, struct record_usage *out)
{
	json_t *u;
	bool ok;

	if (s->p == NULL || s->len == 0 || s->p[0] != '{')
		return false;
	u = json_loadb(s->p, s->len, JSON_DISABLE_EOF_CHECK, NULL);
	ok = fill_usage(u, out);
	json_decref(u);
	return ok;
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

bool usage_from_sse_data(const char *data, size_t len, struct record_usage *out, bool *usage_only)
{
	static const char *const names[] = {"usage", "choices"};
	struct span s[2];

	if (usage_only != NULL)
		*usage_only = false;
	/* The hot path: most chunks carry no usage at all, and with include_usage
	 * every chunk says "usage":null — only an object is worth a scan. */
	if (data == NULL)
		return false;
	bool object = false;
	for (const char *p = data, *end = data + len;
	     !object && (p = memmem(p, (size_t)(end - p), "\"usage\"", 7)) != NULL;) {
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
