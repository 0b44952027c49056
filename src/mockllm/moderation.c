/* moderation.c — sluice-mockllm's OpenAI moderations endpoint: flags inputs with configured words.
 *
 * --moderation-words 'violence=kill,attack;self-harm=hurt' maps categories to words. A word
 * matches case-insensitively (ASCII) where it is not part of a longer run of letters and
 * digits, so "kill" flags "Kill it!" but not "skill". The built-in set (DEFAULT_WORDS) is
 * used when the flag is absent. */
#include "mockllm.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_WORDS                                                                              \
	"violence=kill,attack,shoot;self-harm=hurt myself,suicide;harassment=idiot,loser;"         \
	"hate=hateword;sexual=nsfw;illicit=shoplift"
/* Score of a category with no match. */
#define UNFLAGGED_SCORE 0.000001

/* Every category OpenAI's omni-moderation model reports, in its order. */
static const char *const CATEGORIES[] = {
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
};
#define NCATEGORIES (sizeof(CATEGORIES) / sizeof(CATEGORIES[0]))

static char ascii_lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static int is_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static void trim(const char **s, const char **e)
{
	while (*s < *e && (**s == ' ' || **s == '\t'))
		(*s)++;
	while (*e > *s && ((*e)[-1] == ' ' || (*e)[-1] == '\t'))
		(*e)--;
}

static char *dup_lower(const char *s, size_t n)
{
	char *d = malloc(n + 1);

	if (d == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++)
		d[i] = ascii_lower(s[i]);
	d[n] = '\0';
	return d;
}

/* One "category=word,word" clause. */
static int parse_clause(const char *s, const char *e, struct mock_config *cfg)
{
	const char *eq = memchr(s, '=', (size_t)(e - s));
	const char *ns = s, *ne = eq;
	struct moderation_category *c, *grown;

	if (eq == NULL)
		return -1;
	trim(&ns, &ne);
	if (ns == ne)
		return -1;
	grown = realloc(cfg->mod, (cfg->nmod + 1) * sizeof(*cfg->mod));
	if (grown == NULL)
		return -1;
	cfg->mod = grown;
	c = &cfg->mod[cfg->nmod++];
	memset(c, 0, sizeof(*c));
	c->name = dup_lower(ns, (size_t)(ne - ns));
	if (c->name == NULL)
		return -1;
	for (const char *w = eq + 1; w < e;) {
		const char *comma = memchr(w, ',', (size_t)(e - w));
		const char *we = comma ? comma : e, *ws = w;
		char **words;
		size_t *lens;

		trim(&ws, &we);
		if (ws < we) {
			words = realloc(c->words, (c->nwords + 1) * sizeof(*c->words));
			if (words == NULL)
				return -1;
			c->words = words;
			lens = realloc(c->word_lens, (c->nwords + 1) * sizeof(*c->word_lens));
			if (lens == NULL)
				return -1;
			c->word_lens = lens;
			c->words[c->nwords] = dup_lower(ws, (size_t)(we - ws));
			if (c->words[c->nwords] == NULL)
				return -1;
			c->word_lens[c->nwords++] = (size_t)(we - ws);
		}
		w = comma ? comma + 1 : e;
	}
	return 0;
}

int moderation_parse(const char *spec, struct mock_config *cfg)
{
	const char *s = spec ? spec : DEFAULT_WORDS;
	const char *end = s + strlen(s);

	moderation_free(cfg);
	while (s < end) {
		const char *semi = memchr(s, ';', (size_t)(end - s));
		const char *e = semi ? semi : end;

		if (e > s && parse_clause(s, e, cfg) != 0)
			return -1;
		s = semi ? semi + 1 : end;
	}
	return 0;
}

void moderation_free(struct mock_config *cfg)
{
	for (size_t i = 0; i < cfg->nmod; i++) {
		for (size_t k = 0; k < cfg->mod[i].nwords; k++)
			free(cfg->mod[i].words[k]);
		free(cfg->mod[i].words);
		free(cfg->mod[i].word_lens);
		free(cfg->mod[i].name);
	}
	free(cfg->mod);
	cfg->mod = NULL;
	cfg->nmod = 0;
}

/* Whether word w (lower case) occurs in s[0..n) on its own. */
static int contains_word(const char *s, size_t n, const char *w, size_t wl)
{
	for (size_t i = 0; wl > 0 && i + wl <= n; i++) {
		size_t j = 0;

		while (j < wl && ascii_lower(s[i + j]) == w[j])
			j++;
		if (j < wl)
			continue;
		if ((i > 0 && is_alnum(s[i - 1])) || (i + wl < n && is_alnum(s[i + wl])))
			continue;
		return 1;
	}
	return 0;
}

static int category_hit(const struct moderation_category *c, json_t *texts)
{
	size_t i;
	json_t *x;

	json_array_foreach(texts, i,
	                   x) for (size_t k = 0; k < c->nwords;
	                           k++) if (contains_word(json_string_value(x),
	                                                  json_string_length(x), c->words[k],
	                                                  c->word_lens[k])) return 1;
	return 0;
}

static int is_standard(const char *name)
{
	for (size_t i = 0; i < NCATEGORIES; i++)
		if (!strcmp(CATEGORIES[i], name))
			return 1;
	return 0;
}

static void add_entry(struct evbuffer *b, int part, int comma, const char *name, int hit,
                      double score)
{
	evbuffer_add_printf(b, "%s\"", comma ? "," : "");
	json_escape(b, name, strlen(name));
	if (part == 0)
		evbuffer_add_printf(b, "\":%s", hit ? "true" : "false");
	else if (part == 1)
		evbuffer_add_printf(b, "\":%g", hit ? score : UNFLAGGED_SCORE);
	else
		ADD_LIT(b, "\":[\"text\"]");
}

/* One result: every standard category, then the configured ones outside that set. */
static void add_result(struct evbuffer *b, const struct gen *g, json_t *texts, int first)
{
	static const char *const parts[] = {"categories", "category_scores",
	                                    "category_applied_input_types"};
	const struct mock_config *cfg = g->cfg;
	unsigned char *hits = cfg->nmod ? calloc(cfg->nmod, 1) : NULL;
	int flagged = 0;

	for (size_t k = 0; hits && k < cfg->nmod; k++) {
		hits[k] = (unsigned char)category_hit(&cfg->mod[k], texts);
		flagged |= hits[k];
	}
	evbuffer_add_printf(b, "%s{\"flagged\":%s", first ? "" : ",", flagged ? "true" : "false");
	for (int part = 0; part < 3; part++) {
		evbuffer_add_printf(b, ",\"%s\":{", parts[part]);
		for (size_t i = 0; i < NCATEGORIES; i++) {
			int h = 0;

			for (size_t k = 0; hits && k < cfg->nmod; k++)
				if (!strcmp(cfg->mod[k].name, CATEGORIES[i]))
					h |= hits[k];
			add_entry(b, part, i > 0, CATEGORIES[i], h, g->p.moderation_score);
		}
		for (size_t k = 0; k < cfg->nmod; k++)
			if (!is_standard(cfg->mod[k].name))
				add_entry(b, part, 1, cfg->mod[k].name, hits && hits[k],
				          g->p.moderation_score);
		ADD_LIT(b, "}");
	}
	ADD_LIT(b, "}");
	free(hits);
}

static const char *validate(struct evhttp_request *req, json_t *root)
{
	json_t *in = json_object_get(root, "input");

	(void)req;
	if (!json_is_string(in) && !json_is_array(in))
		return "input: a string or an array is required";
	return NULL;
}

/* input: a string (one result), an array of strings (one result each), or an array of
 * content parts (one result over their "text"). */
static void mod_body(struct evbuffer *b, struct gen *g, json_t *root)
{
	json_t *in = json_object_get(root, "input");
	json_t *texts = json_array();
	size_t i;
	json_t *x;
	int first = 1;

	evbuffer_add_printf(b, "{\"id\":\"modr-%llu\",\"model\":\"", (unsigned long long)g->id);
	json_escape(b, g->model, g->model_len);
	ADD_LIT(b, "\",\"results\":[");
	if (texts == NULL)
		goto out;
	if (json_is_string(in)) {
		json_array_append(texts, in);
		add_result(b, g, texts, 1);
	} else if (json_is_array(in) && json_is_object(json_array_get(in, 0))) {
		json_array_foreach(in, i, x)
		{
			json_t *t = json_object_get(x, "text");

			if (json_is_string(t))
				json_array_append(texts, t);
		}
		add_result(b, g, texts, 1);
	} else {
		json_array_foreach(in, i, x)
		{
			if (!json_is_string(x))
				continue;
			json_array_clear(texts);
			json_array_append(texts, x);
			add_result(b, g, texts, first);
			first = 0;
		}
	}
out:
	ADD_LIT(b, "]}");
	json_decref(texts);
}

const struct proto proto_moderations = {
        .validate = validate,
        .error = proto_openai_error,
        .status_type = proto_openai_status_type,
        .body = mod_body,
};
