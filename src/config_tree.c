/* config_tree.c — YAML text to a tree of positioned nodes (libyaml events), then the checks
 * that need the whole tree: duplicate keys, merge keys, tags, ${ENV} substitution. */
#include "sluice/config_tree.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "sluice/log.h"

/* Nesting the configuration never needs; the limits keep recursion over the tree bounded. */
#define TREE_MAX_DEPTH      64
#define TREE_MAX_COPY_DEPTH (2 * TREE_MAX_DEPTH)
/* Nodes that aliases may create in total: enough for any real file, too few for an
 * exponential "billion laughs" document. */
#define TREE_MAX_ALIAS_NODES 100000
#define TREE_PATH_CAP        1024

__attribute__((noreturn)) static void tree_oom(void)
{
	log_error("config: out of memory");
	abort();
}

static void *tree_alloc(size_t n)
{
	void *p = calloc(1, n ? n : 1);
	if (p == NULL)
		tree_oom();
	return p;
}

static char *tree_strndup(const char *s, size_t n)
{
	char *p = strndup(s, n);
	if (p == NULL)
		tree_oom();
	return p;
}

/* ---- building the tree from events ------------------------------------------------------ */

struct anchor {
	char *name;
	struct cnode *node; /* owned by the tree */
};

struct builder {
	ctree_report_fn report;
	void *arg;
	/* Open collections, outermost first; kids grow with cap[] beside them. While building,
	 * node->n counts kids (keys and values alike); it becomes the pair count on close. */
	struct cnode *stack[TREE_MAX_DEPTH];
	size_t cap[TREE_MAX_DEPTH];
	char *stack_anchor[TREE_MAX_DEPTH];
	size_t depth;
	struct anchor *anchors;
	size_t n_anchors, cap_anchors;
	size_t alias_nodes;
	size_t documents;
	struct cnode *root;
	bool failed;
};

/* The key path of the position where the next node will be attached. */
static void builder_path(const struct builder *b, char *buf, size_t cap)
{
	size_t len = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < b->depth; i++) {
		const struct cnode *n = b->stack[i];
		int r = 0;
		if (n->kind == CNODE_SEQ) {
			r = snprintf(buf + len, cap - len, "[%zu]", n->n);
		} else if (n->n % 2 == 1 && n->kids[n->n - 1]->kind == CNODE_SCALAR) {
			r = snprintf(buf + len, cap - len, "%s%s", len ? "." : "",
			             n->kids[n->n - 1]->str);
		}
		if (r < 0 || (size_t)r >= cap - len)
			return;
		len += (size_t)r;
	}
}

static void builder_report(struct builder *b, yaml_mark_t mark, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void builder_report(struct builder *b, yaml_mark_t mark, const char *fmt, ...)
{
	char path[TREE_PATH_CAP];
	char msg[1024];
	va_list ap;

	builder_path(b, path, sizeof path);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	b->report(b->arg, (unsigned)mark.line + 1, (unsigned)mark.column + 1, path, msg);
}

static struct cnode *node_new(enum cnode_kind kind, yaml_mark_t mark)
{
	struct cnode *n = tree_alloc(sizeof *n);
	n->kind = kind;
	n->line = (unsigned)mark.line + 1;
	n->col = (unsigned)mark.column + 1;
	return n;
}

void ctree_free(struct cnode *n)
{
	if (n == NULL)
		return;
	size_t kids = n->kind == CNODE_MAP ? 2 * n->n : n->n;
	if (n->kind != CNODE_SCALAR) {
		for (size_t i = 0; i < kids; i++)
			ctree_free(n->kids[i]);
	}
	free(n->kids);
	free(n->str);
	free(n);
}

/* Append n to the innermost open collection, or make it the root. */
static void attach(struct builder *b, struct cnode *n)
{
	if (b->depth == 0) {
		ctree_free(b->root); /* never set twice: one document only */
		b->root = n;
		return;
	}
	size_t top = b->depth - 1;
	struct cnode *parent = b->stack[top];
	if (parent->n == b->cap[top]) {
		size_t cap = b->cap[top] ? 2 * b->cap[top] : 8;
		struct cnode **kids = realloc(parent->kids, cap * sizeof *kids);
		if (kids == NULL)
			tree_oom();
		parent->kids = kids;
		b->cap[top] = cap;
	}
	parent->kids[parent->n++] = n;
}

static void add_anchor(struct builder *b, const char *name, struct cnode *n)
{
	if (b->n_anchors == b->cap_anchors) {
		size_t cap = b->cap_anchors ? 2 * b->cap_anchors : 8;
		struct anchor *a = realloc(b->anchors, cap * sizeof *a);
		if (a == NULL)
			tree_oom();
		b->anchors = a;
		b->cap_anchors = cap;
	}
	b->anchors[b->n_anchors].name = tree_strndup(name, strlen(name));
	b->anchors[b->n_anchors].node = n;
	b->n_anchors++;
}

/* Copy for an alias; NULL when the copy would pass the node or depth budget. */
static struct cnode *copy_node(struct builder *b, const struct cnode *n, size_t depth_left)
{
	if (depth_left == 0 || b->alias_nodes >= TREE_MAX_ALIAS_NODES)
		return NULL;
	b->alias_nodes++;
	struct cnode *c = tree_alloc(sizeof *c);
	*c = *n;
	c->kids = NULL;
	c->str = n->str ? tree_strndup(n->str, strlen(n->str)) : NULL;
	if (n->kind != CNODE_SCALAR) {
		size_t kids = n->kind == CNODE_MAP ? 2 * n->n : n->n;
		c->kids = tree_alloc((kids ? kids : 1) * sizeof *c->kids);
		for (size_t i = 0; i < kids; i++) {
			c->kids[i] = copy_node(b, n->kids[i], depth_left - 1);
			if (c->kids[i] == NULL) {
				c->n = n->kind == CNODE_MAP ? i / 2 : i;
				/* free what was copied; an odd trailing key is freed here */
				if (n->kind == CNODE_MAP && i % 2 == 1)
					ctree_free(c->kids[i - 1]);
				ctree_free(c);
				return NULL;
			}
		}
	}
	return c;
}

/* Tags: YAML's own are accepted (!!str makes a string); "!" is a string; others refused. */
static bool tag_is_string(struct builder *b, const yaml_char_t *tag, yaml_mark_t mark)
{
	static const char core[] = "tag:yaml.org,2002:";

	if (tag == NULL)
		return false;
	if (strcmp((const char *)tag, "tag:yaml.org,2002:str") == 0 ||
	    strcmp((const char *)tag, "!") == 0)
		return true;
	if (strncmp((const char *)tag, core, sizeof core - 1) != 0)
		builder_report(b, mark, "unsupported YAML tag \"%s\"", (const char *)tag);
	return false;
}

static void on_scalar(struct builder *b, const yaml_event_t *ev)
{
	const char *value = (const char *)ev->data.scalar.value;
	size_t len = ev->data.scalar.length;
	struct cnode *n = node_new(CNODE_SCALAR, ev->start_mark);
	bool is_str = tag_is_string(b, ev->data.scalar.tag, ev->start_mark);

	if (memchr(value, '\0', len) != NULL) {
		builder_report(b, ev->start_mark, "must not contain a NUL character");
		len = strlen(value);
	}
	n->str = tree_strndup(value, len);
	n->quoted = is_str || ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
	n->null = !n->quoted &&
	          (len == 0 || strcmp(n->str, "~") == 0 || strcmp(n->str, "null") == 0 ||
	           strcmp(n->str, "Null") == 0 || strcmp(n->str, "NULL") == 0);
	if (ev->data.scalar.anchor != NULL)
		add_anchor(b, (const char *)ev->data.scalar.anchor, n);
	attach(b, n);
}

static void on_open(struct builder *b, const yaml_event_t *ev, enum cnode_kind kind)
{
	const yaml_char_t *anchor, *tag;

	if (kind == CNODE_MAP) {
		anchor = ev->data.mapping_start.anchor;
		tag = ev->data.mapping_start.tag;
	} else {
		anchor = ev->data.sequence_start.anchor;
		tag = ev->data.sequence_start.tag;
	}
	if (b->depth == TREE_MAX_DEPTH) {
		builder_report(b, ev->start_mark, "nested more than %d levels deep",
		               TREE_MAX_DEPTH);
		b->failed = true;
		return;
	}
	(void)tag_is_string(b, tag, ev->start_mark);
	struct cnode *n = node_new(kind, ev->start_mark);
	b->stack[b->depth] = n;
	b->cap[b->depth] = 0;
	b->stack_anchor[b->depth] =
	        anchor ? tree_strndup((const char *)anchor, strlen((const char *)anchor)) : NULL;
	b->depth++;
}

static void on_close(struct builder *b)
{
	b->depth--;
	struct cnode *n = b->stack[b->depth];
	char *anchor = b->stack_anchor[b->depth];
	if (n->kind == CNODE_MAP)
		n->n /= 2;
	if (anchor != NULL) {
		add_anchor(b, anchor, n);
		free(anchor);
	}
	attach(b, n);
}

static void on_alias(struct builder *b, const yaml_event_t *ev)
{
	const char *name = (const char *)ev->data.alias.anchor;
	const struct anchor *a = NULL;

	/* the latest definition wins, as YAML says */
	for (size_t i = b->n_anchors; i-- > 0;) {
		if (strcmp(b->anchors[i].name, name) == 0) {
			a = &b->anchors[i];
			break;
		}
	}
	if (a == NULL) {
		builder_report(b, ev->start_mark, "alias *%s refers to no anchor &%s before it",
		               name, name);
		b->failed = true;
		return;
	}
	struct cnode *c = copy_node(b, a->node, TREE_MAX_COPY_DEPTH - b->depth);
	if (c == NULL) {
		builder_report(
		        b, ev->start_mark,
		        "alias *%s expands past the limit of %d nodes or %d levels created by "
		        "aliases",
		        name, TREE_MAX_ALIAS_NODES, TREE_MAX_COPY_DEPTH);
		b->failed = true;
		return;
	}
	attach(b, c);
}

static void syntax_error(struct builder *b, const yaml_parser_t *p, const char *text, size_t len)
{
	unsigned line = (unsigned)p->problem_mark.line + 1;
	unsigned col = (unsigned)p->problem_mark.column + 1;
	char msg[1024];

	if (p->error == YAML_READER_ERROR) {
		/* reader errors carry a byte offset, not a mark */
		line = 1;
		col = 1;
		for (size_t i = 0; i < p->problem_offset && i < len; i++) {
			if (text[i] == '\n') {
				line++;
				col = 1;
			} else {
				col++;
			}
		}
	}
	if (p->context != NULL)
		snprintf(msg, sizeof msg, "YAML syntax error: %s %s at line %zu, column %zu",
		         p->problem ? p->problem : "invalid YAML", p->context,
		         p->context_mark.line + 1, p->context_mark.column + 1);
	else
		snprintf(msg, sizeof msg, "YAML syntax error: %s",
		         p->problem ? p->problem : "invalid YAML");
	b->report(b->arg, line, col, "", msg);
}

static void builder_unwind(struct builder *b)
{
	while (b->depth > 0) {
		b->depth--;
		struct cnode *n = b->stack[b->depth];
		if (n->kind == CNODE_MAP) {
			/* an odd trailing key is freed with the pairs */
			if (n->n % 2 == 1)
				ctree_free(n->kids[n->n - 1]);
			n->n /= 2;
		}
		ctree_free(n);
		free(b->stack_anchor[b->depth]);
	}
	for (size_t i = 0; i < b->n_anchors; i++)
		free(b->anchors[i].name);
	free(b->anchors);
	b->anchors = NULL;
	b->n_anchors = 0;
}

/* ---- checks over the finished tree ------------------------------------------------------ */

struct walker {
	ctree_report_fn report;
	void *arg;
	char path[TREE_PATH_CAP];
	size_t len;
};

static void walker_report(struct walker *w, const struct cnode *at, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void walker_report(struct walker *w, const struct cnode *at, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	w->report(w->arg, at->line, at->col, w->path, msg);
}

/* Append to the path; returns the length to restore afterwards. */
static size_t walker_push(struct walker *w, const char *fmt, ...)
        __attribute__((format(printf, 2, 3)));

static size_t walker_push(struct walker *w, const char *fmt, ...)
{
	size_t saved = w->len;
	va_list ap;

	va_start(ap, fmt);
	int r = vsnprintf(w->path + w->len, sizeof w->path - w->len, fmt, ap);
	va_end(ap);
	if (r < 0 || (size_t)r >= sizeof w->path - w->len)
		w->len = strlen(w->path); /* truncated: keep what fits */
	else
		w->len += (size_t)r;
	return saved;
}

static void walker_pop(struct walker *w, size_t saved)
{
	w->len = saved;
	w->path[saved] = '\0';
}

struct strbuf {
	char *s;
	size_t len, cap;
};

static void sb_put(struct strbuf *sb, const char *s, size_t n)
{
	if (sb->len + n + 1 > sb->cap) {
		size_t cap = sb->cap ? sb->cap : 64;
		while (cap < sb->len + n + 1)
			cap *= 2;
		char *p = realloc(sb->s, cap);
		if (p == NULL)
			tree_oom();
		sb->s = p;
		sb->cap = cap;
	}
	memcpy(sb->s + sb->len, s, n);
	sb->len += n;
	sb->s[sb->len] = '\0';
}

static bool env_name_ok(const char *s, size_t n)
{
	if (n == 0 ||
	    !((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z') || s[0] == '_'))
		return false;
	for (size_t i = 1; i < n; i++) {
		char c = s[i];
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		      c == '_'))
			return false;
	}
	return true;
}

/* ${NAME} → the variable's value, $$ → $, any other $ stays. */
static void expand_env(struct walker *w, struct cnode *n)
{
	struct strbuf out = {0};
	bool bad = false;
	const char *p = n->str;

	if (strchr(p, '$') == NULL)
		return;
	while (*p != '\0') {
		const char *dollar = strchr(p, '$');
		if (dollar == NULL) {
			sb_put(&out, p, strlen(p));
			break;
		}
		sb_put(&out, p, (size_t)(dollar - p));
		if (dollar[1] == '$') {
			sb_put(&out, "$", 1);
			p = dollar + 2;
			continue;
		}
		if (dollar[1] != '{') {
			sb_put(&out, "$", 1);
			p = dollar + 1;
			continue;
		}
		const char *name = dollar + 2;
		const char *end = strchr(name, '}');
		if (end == NULL) {
			walker_report(w, n,
			              "unterminated \"${\" (write \"$$\" for a literal \"$\")");
			bad = true;
			break;
		}
		size_t name_len = (size_t)(end - name);
		if (!env_name_ok(name, name_len)) {
			walker_report(w, n, "invalid environment variable name \"%.*s\"",
			              (int)name_len, name);
			bad = true;
		} else {
			char var[256];
			const char *value = NULL;
			if (name_len < sizeof var) {
				memcpy(var, name, name_len);
				var[name_len] = '\0';
				value = getenv(var);
			}
			if (value == NULL) {
				walker_report(w, n, "environment variable %.*s is not set",
				              (int)name_len, name);
				bad = true;
			} else {
				sb_put(&out, value, strlen(value));
			}
		}
		p = end + 1;
	}
	if (!bad) {
		free(n->str);
		n->str = out.s ? out.s : tree_strndup("", 0);
	} else {
		free(out.s);
		n->unexpanded = true;
	}
}

static const char *kind_word(const struct cnode *n)
{
	if (n->kind == CNODE_MAP)
		return "a mapping";
	if (n->kind == CNODE_SEQ)
		return "a list";
	return "null";
}

static void check_node(struct walker *w, struct cnode *n)
{
	if (n->kind == CNODE_SCALAR) {
		if (!n->null)
			expand_env(w, n);
		return;
	}
	if (n->kind == CNODE_SEQ) {
		for (size_t i = 0; i < n->n; i++) {
			size_t saved = walker_push(w, "[%zu]", i);
			check_node(w, n->kids[i]);
			walker_pop(w, saved);
		}
		return;
	}
	for (size_t i = 0; i < n->n; i++) {
		struct cnode *key = CNODE_KEY(n, i);
		struct cnode *val = CNODE_VAL(n, i);
		size_t saved;

		if (key->kind != CNODE_SCALAR || key->null) {
			walker_report(w, key, "keys must be strings, not %s", kind_word(key));
			saved = walker_push(w, "%s?", w->len ? "." : "");
		} else {
			if (!key->quoted && strcmp(key->str, "<<") == 0)
				walker_report(
				        w, key,
				        "merge keys (<<) are not supported: repeat the keys, or "
				        "alias the whole value");
			for (size_t j = 0; j < i; j++) {
				const struct cnode *prev = CNODE_KEY(n, j);
				if (prev->kind == CNODE_SCALAR && !prev->null &&
				    strcmp(prev->str, key->str) == 0) {
					walker_report(w, key,
					              "duplicate key \"%s\" (first at line %u, "
					              "column %u)",
					              key->str, prev->line, prev->col);
					break;
				}
			}
			saved = walker_push(w, "%s%s", w->len ? "." : "", key->str);
		}
		check_node(w, val);
		walker_pop(w, saved);
	}
}

/* ---- public ----------------------------------------------------------------------------- */

struct cnode *ctree_parse(const char *text, size_t len, ctree_report_fn report, void *arg)
{
	struct builder b = {.report = report, .arg = arg};
	yaml_parser_t parser;
	bool done = false;

	if (!yaml_parser_initialize(&parser))
		tree_oom();
	yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
	while (!done && !b.failed) {
		yaml_event_t ev;
		if (!yaml_parser_parse(&parser, &ev)) {
			syntax_error(&b, &parser, text, len);
			b.failed = true;
			break;
		}
		switch (ev.type) {
		case YAML_DOCUMENT_START_EVENT:
			if (++b.documents > 1) {
				builder_report(
				        &b, ev.start_mark,
				        "YAML syntax error: only one document is allowed, this "
				        "is a second one");
				b.failed = true;
			}
			break;
		case YAML_SCALAR_EVENT:
			on_scalar(&b, &ev);
			break;
		case YAML_SEQUENCE_START_EVENT:
			on_open(&b, &ev, CNODE_SEQ);
			break;
		case YAML_MAPPING_START_EVENT:
			on_open(&b, &ev, CNODE_MAP);
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			on_close(&b);
			break;
		case YAML_ALIAS_EVENT:
			on_alias(&b, &ev);
			break;
		case YAML_STREAM_END_EVENT:
			done = true;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&parser);
	builder_unwind(&b);
	if (b.failed) {
		ctree_free(b.root);
		return NULL;
	}
	if (b.root != NULL) {
		struct walker w = {.report = report, .arg = arg};
		check_node(&w, b.root);
	}
	return b.root;
}

const struct cnode *ctree_get(const struct cnode *map, const char *key,
                              const struct cnode **keynode)
{
	if (map == NULL || map->kind != CNODE_MAP)
		return NULL;
	for (size_t i = 0; i < map->n; i++) {
		const struct cnode *k = CNODE_KEY(map, i);
		if (k->kind == CNODE_SCALAR && !k->null && strcmp(k->str, key) == 0) {
			if (keynode != NULL)
				*keynode = k;
			return CNODE_VAL(map, i);
		}
	}
	return NULL;
}
