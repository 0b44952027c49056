/* plan.c — what one sluice-mockllm reply says: text deltas, tool calls, stop reason, tokens.
 *
 * The default reply is lorem-ipsum words, generated on the fly with no allocation. The
 * output controls (content, chunks, repeat, tool_call, the big_event fault) are copied into
 * one allocation owned by the reply (gen.own), so an asynchronous reply outlives the request
 * body it came from. Every protocol writes its events from the same plan: text delta i is
 * plan_piece(i), and tool-call argument pieces follow the text. */
#include "mockllm.h"

#include <stdlib.h>
#include <string.h>

static const char *const WORDS[] = {
        "lorem",  "ipsum",   "dolor",  "sit",     "amet",         "consectetur", "adipiscing",
        "elit",   "sed",     "do",     "eiusmod", "tempor",       "incididunt",  "ut",
        "labore", "et",      "dolore", "magna",   "aliqua",       "enim",        "ad",
        "minim",  "veniam",  "quis",   "nostrud", "exercitation", "ullamco",     "laboris",
        "nisi",   "aliquip", "ex",     "ea",
};
#define NWORDS (sizeof(WORDS) / sizeof(WORDS[0]))
/* Tool calls of one reply beyond this are ignored. */
#define MAX_TOOL_CALLS 16

/* ------------------------------------------------------------------ prompt tokens */

long plan_count(size_t bytes, long ids)
{
	long n = (long)((bytes + 3) / 4) + ids;

	return n < 1 ? 1 : n;
}

/* Bytes of text and explicit token ids in a prompt / input / content value: strings, and the
 * "text" of content parts. */
void plan_count_value(json_t *v, size_t *bytes, long *ids)
{
	size_t i;
	json_t *x;

	if (json_is_string(v)) {
		*bytes += json_string_length(v);
	} else if (json_is_array(v)) {
		json_array_foreach(v, i, x)
		{
			if (json_is_integer(x))
				(*ids)++;
			else
				plan_count_value(x, bytes, ids);
		}
	} else if (json_is_object(v)) {
		json_t *t = json_object_get(v, "text");

		if (json_is_string(t))
			*bytes += json_string_length(t);
	}
}

static void count_messages(json_t *msgs, size_t *bytes, long *ids)
{
	size_t i;
	json_t *m;

	if (json_is_array(msgs))
		json_array_foreach(msgs, i, m)
		        plan_count_value(json_object_get(m, "content"), bytes, ids);
}

/* Responses input: a string, or items (strings, messages with content, tool outputs). */
static void count_items(json_t *input, size_t *bytes, long *ids)
{
	size_t i;
	json_t *x;

	if (!json_is_array(input)) {
		plan_count_value(input, bytes, ids);
		return;
	}
	json_array_foreach(input, i, x)
	{
		json_t *out = json_object_get(x, "output");

		if (json_is_string(x))
			*bytes += json_string_length(x);
		plan_count_value(json_object_get(x, "content"), bytes, ids);
		if (json_is_string(out))
			*bytes += json_string_length(out);
	}
}

static long prompt_tokens(enum kind kind, json_t *root)
{
	size_t bytes = 0;
	long ids = 0;

	switch (kind) {
	case K_CHAT:
		count_messages(json_object_get(root, "messages"), &bytes, &ids);
		break;
	case K_COMPL:
		plan_count_value(json_object_get(root, "prompt"), &bytes, &ids);
		break;
	case K_EMB:
		plan_count_value(json_object_get(root, "input"), &bytes, &ids);
		break;
	case K_MSG:
	case K_COUNT:
		plan_count_value(json_object_get(root, "system"), &bytes, &ids);
		count_messages(json_object_get(root, "messages"), &bytes, &ids);
		break;
	case K_RESP:
		plan_count_value(json_object_get(root, "instructions"), &bytes, &ids);
		count_items(json_object_get(root, "input"), &bytes, &ids);
		break;
	default:
		return 0;
	}
	return plan_count(bytes, ids);
}

/* ------------------------------------------------------------------ building */

struct tool_spec {
	const char *name, *args;
	size_t name_len, args_len;
	char *dump; /* json_dumps result behind args, or NULL */
	int args_json;
};

static int tool_spec(json_t *tc, struct tool_spec *t)
{
	json_t *name = json_object_get(tc, "name");
	json_t *a = json_object_get(tc, "arguments");

	memset(t, 0, sizeof(*t));
	if (!json_is_string(name))
		return -1;
	t->name = json_string_value(name);
	t->name_len = json_string_length(name);
	if (a == NULL) {
		t->args = "{}";
		t->args_len = 2;
		t->args_json = 1;
	} else if (json_is_string(a)) {
		json_t *parsed = json_loadb(json_string_value(a), json_string_length(a), 0, NULL);

		t->args = json_string_value(a);
		t->args_len = json_string_length(a);
		t->args_json = json_is_object(parsed);
		json_decref(parsed);
	} else {
		/* ASCII-only, so the pieces can be cut at any byte. */
		t->dump = json_dumps(a, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_ENCODE_ANY);
		if (t->dump == NULL)
			return -1;
		t->args = t->dump;
		t->args_len = strlen(t->dump);
		t->args_json = json_is_object(a);
	}
	return 0;
}

static void cut_args(struct tool_call *t)
{
	size_t n = t->args_len;
	int k = n < TOOL_PIECES ? (int)n : TOOL_PIECES;

	if (k < 1)
		k = 1;
	t->npieces = k;
	for (int i = 0; i <= k; i++) {
		size_t c = n * (size_t)i / (size_t)k;

		/* never inside a UTF-8 sequence */
		while (c < n && ((unsigned char)t->args[c] & 0xC0) == 0x80)
			c++;
		t->cut[i] = c;
	}
}

/* Pieces of content: split before each space (after the first byte). */
static size_t content_pieces(const char *s, size_t n, size_t *off)
{
	size_t k = 0;

	if (n == 0)
		return 0;
	if (off)
		off[0] = 0;
	for (size_t j = 1; j < n; j++) {
		if (s[j] == ' ') {
			k++;
			if (off)
				off[k] = j;
		}
	}
	k++;
	if (off)
		off[k] = n;
	return k;
}

static void piece_ref(const struct gen *g, long i, const char **s, size_t *n)
{
	switch (g->src) {
	case SRC_LOREM:
		*s = WORDS[(size_t)i % NWORDS];
		*n = strlen(*s);
		break;
	case SRC_PIECES:
		*s = g->text + g->off[i];
		*n = g->off[i + 1] - g->off[i];
		break;
	case SRC_REPEAT:
		*s = g->text;
		*n = g->text_len;
		break;
	default:
		*s = "";
		*n = 0;
		break;
	}
}

/* The first text delta that equals a stop sequence (leading spaces aside) ends the text. */
static void apply_stop(struct gen *g, json_t *stop, char *dst)
{
	long limit = g->ntok;

	if (g->src == SRC_FILL || !(json_is_string(stop) || json_is_array(stop)))
		return;
	/* Lorem words cycle and a repeated text is one piece: the first cycle decides. */
	if (g->src == SRC_LOREM && limit > (long)NWORDS)
		limit = (long)NWORDS;
	if (g->src == SRC_REPEAT && limit > 1)
		limit = 1;
	for (long i = 0; i < limit; i++) {
		const char *s;
		size_t n;
		size_t k;
		json_t *x;

		piece_ref(g, i, &s, &n);
		while (n > 0 && *s == ' ') {
			s++;
			n--;
		}
		for (k = 0; k < (json_is_array(stop) ? json_array_size(stop) : 1); k++) {
			x = json_is_array(stop) ? json_array_get(stop, k) : stop;
			if (!json_is_string(x) || json_string_length(x) != n ||
			    memcmp(json_string_value(x), s, n) != 0 || n == 0)
				continue;
			memcpy(dst, s, n);
			g->stop_seq = dst;
			g->stop_seq_len = n;
			g->ntok = i;
			g->finish = FIN_STOP_SEQ;
			return;
		}
	}
}

static size_t stop_room(json_t *stop)
{
	size_t i, n = 0;
	json_t *x;

	if (json_is_string(stop))
		return json_string_length(stop);
	if (json_is_array(stop))
		json_array_foreach(stop, i, x) if (json_is_string(x)) n += json_string_length(x);
	return n;
}

int plan_build(struct gen *g, json_t *root)
{
	struct mock_params *p = &g->p;
	struct tool_spec specs[MAX_TOOL_CALLS];
	int nspec = 0, rc = -1;
	json_t *stop = NULL, *mt = NULL, *tools = json_object_get(root, "tools");
	size_t npieces = 0, text_bytes = 0, tool_bytes = 0, size;
	char *q;

	g->open_block = -1;
	g->max_output = -1;
	g->finish = FIN_STOP;
	g->text_tokens = prompt_tokens(g->kind, root);
	g->prompt_tokens = g->text_tokens + p->cache_read + p->cache_creation;
	if (g->kind == K_EMB || g->kind == K_COUNT || g->kind == K_MOD)
		return 0; /* no generated text */

	/* Tool calls, when the request offers tools and a control asks for them. */
	if (p->tool_call != NULL && (g->kind == K_CHAT || g->kind == K_MSG || g->kind == K_RESP) &&
	    json_is_array(tools) && json_array_size(tools) > 0) {
		size_t n = json_is_array(p->tool_call) ? json_array_size(p->tool_call) : 1;

		for (size_t i = 0; i < n && nspec < MAX_TOOL_CALLS; i++) {
			json_t *tc = json_is_array(p->tool_call) ? json_array_get(p->tool_call, i)
			                                         : p->tool_call;

			if (tool_spec(tc, &specs[nspec]) == 0) {
				tool_bytes += specs[nspec].name_len + specs[nspec].args_len;
				nspec++;
			}
		}
	}

	/* The text. */
	if (p->fault == FAULT_BIG_EVENT) {
		g->src = SRC_FILL;
		g->text_len = (size_t)(p->fault_bytes >= 0 ? p->fault_bytes : BIG_EVENT_BYTES);
		g->ntok = 1;
	} else if (p->chunks != NULL) {
		size_t i;
		json_t *x;

		g->src = SRC_PIECES;
		npieces = json_array_size(p->chunks);
		json_array_foreach(p->chunks, i, x) text_bytes += json_string_length(x);
	} else if (p->content != NULL) {
		g->src = SRC_PIECES;
		npieces = content_pieces(p->content, p->content_len, NULL);
		text_bytes = p->content_len;
	} else if (p->repeat != NULL) {
		g->src = SRC_REPEAT;
		text_bytes = p->repeat_len;
		g->ntok = p->times >= 0 ? p->times : p->tokens;
	} else {
		g->src = SRC_LOREM;
		g->ntok = nspec > 0 ? 0 : p->tokens;
	}
	if (g->src == SRC_PIECES)
		g->ntok = (long)npieces;

	if (g->kind == K_MSG)
		stop = json_object_get(root, "stop_sequences");
	else if (g->kind == K_CHAT)
		stop = json_object_get(root, "stop");

	size = (g->src == SRC_PIECES ? (npieces + 1) * sizeof(size_t) : 0) +
	       (size_t)nspec * sizeof(struct tool_call) + text_bytes + tool_bytes + stop_room(stop);
	if (size > 0) {
		g->own = malloc(size);
		if (g->own == NULL)
			goto out;
	}
	q = g->own;
	if (g->src == SRC_PIECES) {
		g->off = (const size_t *)q;
		q += (npieces + 1) * sizeof(size_t);
	}
	if (nspec > 0) {
		g->tools = (struct tool_call *)q;
		g->ntools = nspec;
		q += (size_t)nspec * sizeof(struct tool_call);
	}
	if (g->src == SRC_PIECES && p->chunks != NULL) {
		size_t *off = (size_t *)g->off, pos = 0, i;
		json_t *x;

		g->text = q;
		json_array_foreach(p->chunks, i, x)
		{
			off[i] = pos;
			memcpy(q + pos, json_string_value(x), json_string_length(x));
			pos += json_string_length(x);
		}
		off[npieces] = pos;
		q += pos;
	} else if (g->src == SRC_PIECES) {
		g->text = q;
		memcpy(q, p->content, p->content_len);
		content_pieces(p->content, p->content_len, (size_t *)g->off);
		q += p->content_len;
	} else if (g->src == SRC_REPEAT) {
		g->text = q;
		g->text_len = p->repeat_len;
		memcpy(q, p->repeat, p->repeat_len);
		q += p->repeat_len;
	}
	for (int i = 0; i < nspec; i++) {
		struct tool_call *t = &g->tools[i];

		memcpy(q, specs[i].name, specs[i].name_len);
		t->name = q;
		t->name_len = specs[i].name_len;
		q += t->name_len;
		memcpy(q, specs[i].args, specs[i].args_len);
		t->args = q;
		t->args_len = specs[i].args_len;
		t->args_json = specs[i].args_json;
		q += t->args_len;
		cut_args(t);
	}

	if (stop != NULL)
		apply_stop(g, stop, q);
	if (g->kind == K_CHAT || g->kind == K_COMPL)
		mt = json_is_integer(json_object_get(root, "max_completion_tokens"))
		             ? json_object_get(root, "max_completion_tokens")
		             : json_object_get(root, "max_tokens");
	else if (g->kind == K_MSG)
		mt = json_object_get(root, "max_tokens");
	else if (g->kind == K_RESP)
		mt = json_object_get(root, "max_output_tokens");
	if (json_is_integer(mt) && json_integer_value(mt) >= 0) {
		if (g->kind == K_RESP)
			g->max_output = json_integer_value(mt) > MAX_TOKENS
			                        ? MAX_TOKENS
			                        : (long)json_integer_value(mt);
		if (json_integer_value(mt) < g->ntok) {
			g->ntok = (long)json_integer_value(mt);
			g->finish = FIN_LENGTH;
		}
	}
	if (g->finish != FIN_STOP_SEQ)
		g->stop_seq = NULL;
	if (g->finish == FIN_LENGTH || g->finish == FIN_STOP_SEQ)
		g->ntools = 0; /* the text ended before the model got to its tool calls */
	if (g->ntools > 0)
		g->finish = FIN_TOOL;
	g->ndeltas = g->ntok;
	for (int i = 0; i < g->ntools; i++)
		g->ndeltas += g->tools[i].npieces;
	rc = 0;
out:
	for (int i = 0; i < nspec; i++)
		free(specs[i].dump);
	return rc;
}

size_t plan_borrowed_size(const struct gen *g)
{
	return g->model_len + 1 + (g->prev_id ? g->prev_id_len + 1 : 0);
}

void plan_adopt(struct gen *g, char *buf)
{
	memcpy(buf, g->model, g->model_len);
	buf[g->model_len] = '\0';
	g->model = buf;
	buf += g->model_len + 1;
	if (g->prev_id) {
		memcpy(buf, g->prev_id, g->prev_id_len);
		buf[g->prev_id_len] = '\0';
		g->prev_id = buf;
	}
}

void plan_free(struct gen *g)
{
	free(g->own);
	g->own = NULL;
}

/* ------------------------------------------------------------------ writing */

void plan_piece(struct evbuffer *b, const struct gen *g, long i)
{
	static const char fill[4096] = {[0 ... 4095] = 'x'};

	switch (g->src) {
	case SRC_LOREM: {
		const char *word = WORDS[(size_t)i % NWORDS];

		if (i > 0)
			ADD_LIT(b, " ");
		evbuffer_add(b, word, strlen(word));
		break;
	}
	case SRC_PIECES:
		json_escape(b, g->text + g->off[i], g->off[i + 1] - g->off[i]);
		break;
	case SRC_REPEAT:
		json_escape(b, g->text, g->text_len);
		break;
	case SRC_FILL:
		for (size_t left = g->text_len; left > 0;) {
			size_t n = left < sizeof(fill) ? left : sizeof(fill);

			evbuffer_add(b, fill, n);
			left -= n;
		}
		break;
	}
}

void plan_text(struct evbuffer *b, const struct gen *g)
{
	for (long i = 0; i < g->ntok; i++)
		plan_piece(b, g, i);
}

void plan_args(struct evbuffer *b, const struct tool_call *t, int piece)
{
	json_escape(b, t->args + t->cut[piece], t->cut[piece + 1] - t->cut[piece]);
}

void plan_tool_of(const struct gen *g, long i, int *tool, int *piece)
{
	long j = i - g->ntok;
	int t = 0;

	while (t < g->ntools - 1 && j >= g->tools[t].npieces) {
		j -= g->tools[t].npieces;
		t++;
	}
	*tool = t;
	*piece = (int)j;
}

int plan_has_text(const struct gen *g)
{
	return g->ntok > 0 || g->ntools == 0;
}

int plan_block_of(const struct gen *g, long i)
{
	int t, k;

	if (i < g->ntok)
		return 0;
	plan_tool_of(g, i, &t, &k);
	return plan_has_text(g) + t;
}
