/* test_config_keys.c — "no key that does nothing": every key written in the configuration
 * contract and in conf/ is read by the loader and named, with the module that honours it and a
 * test that exercises it, in docs/configuration.md's key table; and an unknown key put into
 * any of those mappings is refused with file:line:column. */
#include <ctype.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "sluice/config.h"
#include "sluice/config_tree.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define SOURCE_DIR   TEST_DATA_DIR "/../../.."
#define PROBE_KEY    "zz_unknown_key"

/* The files whose keys are enumerated: the contract (a verbatim copy of the shared
 * sluice.example.yaml) and every working example. */
static const char *const files[] = {
        TEST_DATA_DIR "/contract.yaml",
        SOURCE_DIR "/conf/sluice.yaml",
        SOURCE_DIR "/conf/examples/governance.yaml",
        SOURCE_DIR "/conf/examples/protocols.yaml",
        SOURCE_DIR "/conf/examples/scenario1-fallback.yaml",
        SOURCE_DIR "/conf/examples/scenario2-quotas.yaml",
};

/* Mappings whose keys are data, not configuration keys: header and parameter names, request
 * body fields, a plugin's own configuration. Normalised paths ("[]" for any index). */
static const char *const free_form[] = {
        "alerts.webhook.headers",
        "instances[].options",
        "instances[].auth.header",
        "instances[].auth.query",
        "mcp_servers[].auth.header",
        "routes[].plugins[].external.config",
        "routes[].plugins[].moderation.auth.header",
        "routes[].plugins[].request_override.set",
        "routes[].plugins[].request_override.cap", /* any numeric body field */
        "routes[].plugins[].request_override.defaults",
};

/* ---- helpers ------------------------------------------------------------------------------ */

static char *read_all(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (f == NULL)
		fail_msg("cannot open %s", path);
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *buf = malloc((size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	*len = (size_t)n;
	return buf;
}

/* text with every occurrence of from replaced by to (a new string). */
static char *replace_all(const char *text, const char *from, const char *to)
{
	size_t nf = strlen(from), nt = strlen(to), count = 0;
	for (const char *p = strstr(text, from); p != NULL; p = strstr(p + nf, from))
		count++;
	char *out = malloc(strlen(text) + count * (nt > nf ? nt - nf : 0) + 1);
	assert_non_null(out);
	char *o = out;
	const char *s = text;
	for (const char *p = strstr(s, from); p != NULL; p = strstr(s, from)) {
		memcpy(o, s, (size_t)(p - s));
		o += p - s;
		memcpy(o, to, nt);
		o += nt;
		s = p + nf;
	}
	strcpy(o, s);
	return out;
}

/* The variables the files use, with values of the kind each place needs; any other one gets
 * "v-NAME" (unique, so that consumer keys never collide). */
static void set_env_for(const char *text)
{
	static const char *const known[][2] = {
	        {"ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook"},
	        {"CUSTOM_HOST_1", "10.0.0.11"},
	        {"CUSTOM_PORT_1", "8000"},
	        {"CUSTOM_NLB_HOST", "10.0.0.12"},
	        {"CUSTOM_NLB_PORT", "8001"},
	};
	for (const char *p = strstr(text, "${"); p != NULL; p = strstr(p + 2, "${")) {
		const char *end = strchr(p, '}');
		if (end == NULL || end - p > 100)
			continue;
		char name[128], value[160];
		memcpy(name, p + 2, (size_t)(end - p - 2));
		name[end - p - 2] = '\0';
		snprintf(value, sizeof value, "v-%s", name);
		for (size_t i = 0; i < ARRAY_LEN(known); i++) {
			if (strcmp(known[i][0], name) == 0)
				snprintf(value, sizeof value, "%s", known[i][1]);
		}
		setenv(name, value, 1);
	}
}

/* A file's text ready to load here: the contract's external plugin is the example plugin
 * built beside this test (the installed path does not exist on a build machine). */
static char *load_text(const char *path, size_t *len)
{
	char *raw = read_all(path, len);
	char *text = replace_all(raw, "/usr/lib/sluice/plugins/redact.so", PLUGIN_DIR "/redact.so");
	free(raw);
	*len = strlen(text);
	set_env_for(text);
	return text;
}

static const char *base_name(const char *path)
{
	const char *s = strrchr(path, '/');
	return s ? s + 1 : path;
}

/* ---- walking the tree --------------------------------------------------------------------- */

#define MAX_KEYS 1024
#define MAX_MAPS 1024
#define PATH_CAP 256

struct found_map {
	const struct cnode *node; /* valid while its file's tree is */
	unsigned line, col;
	char path[PATH_CAP]; /* as the loader writes it: routes[0].targets[1] */
};

struct walk {
	char keys[MAX_KEYS][PATH_CAP]; /* normalised: routes[].targets[].weight */
	size_t n_keys;
	struct found_map maps[MAX_MAPS];
	size_t n_maps;
};

static bool is_free_form(const char *norm)
{
	for (size_t i = 0; i < ARRAY_LEN(free_form); i++) {
		if (strcmp(free_form[i], norm) == 0)
			return true;
	}
	return false;
}

static void add_key(struct walk *w, const char *norm)
{
	for (size_t i = 0; i < w->n_keys; i++) {
		if (strcmp(w->keys[i], norm) == 0)
			return;
	}
	assert_true(w->n_keys < MAX_KEYS);
	snprintf(w->keys[w->n_keys++], PATH_CAP, "%s", norm);
}

static void walk(struct walk *w, const struct cnode *n, const char *path, const char *norm)
{
	char p[PATH_CAP], q[PATH_CAP];

	if (n->kind == CNODE_SEQ) {
		for (size_t i = 0; i < n->n; i++) {
			snprintf(p, sizeof p, "%s[%zu]", path, i);
			snprintf(q, sizeof q, "%s[]", norm);
			walk(w, n->kids[i], p, q);
		}
		return;
	}
	if (n->kind != CNODE_MAP || is_free_form(norm))
		return;
	bool seen = false;
	for (size_t i = 0; i < w->n_maps; i++)
		seen |= w->maps[i].line == n->line && w->maps[i].col == n->col;
	if (!seen) { /* an alias repeats its anchor's node and position: probe it once */
		assert_true(w->n_maps < MAX_MAPS);
		w->maps[w->n_maps].node = n;
		w->maps[w->n_maps].line = n->line;
		w->maps[w->n_maps].col = n->col;
		snprintf(w->maps[w->n_maps].path, PATH_CAP, "%s", path);
		w->n_maps++;
	}
	for (size_t i = 0; i < n->n; i++) {
		const char *key = CNODE_KEY(n, i)->str;
		if (key == NULL)
			continue;
		if (path[0] == '\0' && strncmp(key, "x-", 2) == 0)
			continue; /* extension keys: anchors only, ignored by the loader
			             (documented) */
		snprintf(p, sizeof p, "%s%s%s", path, path[0] ? "." : "", key);
		snprintf(q, sizeof q, "%s%s%s", norm, norm[0] ? "." : "", key);
		add_key(w, q);
		walk(w, CNODE_VAL(n, i), p, q);
	}
}

static void tree_report(void *arg, unsigned line, unsigned col, const char *path, const char *msg)
{
	(void)arg;
	fail_msg("%u:%u: %s: %s", line, col, path, msg);
}

/* ---- the docs table ------------------------------------------------------------------------ */

#define MAX_ROWS 1024

struct row {
	char key[PATH_CAP];
	char module[PATH_CAP];
	char test[PATH_CAP];
};

/* The rows of the table under "## Every key" in docs/configuration.md:
 * | `key.path` | `src/module.c` … | `tests/…` … | */
static size_t read_table(struct row *rows)
{
	size_t len, n = 0;
	char *doc = read_all(SOURCE_DIR "/docs/configuration.md", &len);
	char *sec = strstr(doc, "\n## Every key");
	assert_non_null(sec);
	char *end = strstr(sec + 1, "\n## ");
	if (end != NULL)
		*end = '\0';
	for (char *line = strtok(sec, "\n"); line != NULL; line = strtok(NULL, "\n")) {
		char cells[3][PATH_CAP];
		if (strncmp(line, "| `", 3) != 0)
			continue;
		/* the first backquoted word of each of the first three cells */
		const char *p = line;
		size_t c = 0;
		for (; c < 3; c++) {
			const char *bar = strchr(p, '|');
			const char *tick = bar ? strchr(bar, '`') : NULL;
			const char *close = tick ? strchr(tick + 1, '`') : NULL;
			const char *next = bar ? strchr(bar + 1, '|') : NULL;
			if (close == NULL || next == NULL || tick > next)
				break;
			snprintf(cells[c], PATH_CAP, "%.*s", (int)(close - tick - 1), tick + 1);
			p = next;
		}
		if (c < 3)
			fail_msg("docs/configuration.md: malformed key-table row: %s", line);
		assert_true(n < MAX_ROWS);
		snprintf(rows[n].key, PATH_CAP, "%s", cells[0]);
		snprintf(rows[n].module, PATH_CAP, "%s", cells[1]);
		snprintf(rows[n].test, PATH_CAP, "%s", cells[2]);
		n++;
	}
	free(doc);
	return n;
}

/* The word occurs in the file, not inside a longer word: letters and digits around it end
 * the match, '_' does not (the key "timeout" is the field webhook_timeout in a unit test). */
static bool file_mentions(const char *rel, const char *word)
{
	char path[512];
	size_t len, wl = strlen(word);
	snprintf(path, sizeof path, SOURCE_DIR "/%s", rel);
	char *text = read_all(path, &len);
	bool found = false;
	for (const char *p = strstr(text, word); p != NULL && !found; p = strstr(p + 1, word)) {
		bool before = p > text && isalnum((unsigned char)p[-1]);
		bool after = isalnum((unsigned char)p[wl]);
		found = !before && !after;
	}
	free(text);
	return found;
}

static bool exists(const char *rel)
{
	char path[512];
	struct stat st;
	snprintf(path, sizeof path, SOURCE_DIR "/%s", rel);
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- tests -------------------------------------------------------------------------------- */

/* Every file loads without one error: every key it writes is accepted. */
static void test_files_load(void **state)
{
	(void)state;
	for (size_t f = 0; f < ARRAY_LEN(files); f++) {
		size_t len;
		char *text = load_text(files[f], &len);
		struct config_errors e;
		struct config *c = config_load_string(text, len, base_name(files[f]), &e);
		for (size_t i = 0; i < e.n; i++)
			print_error("%s\n", e.msgs[i]);
		if (c == NULL)
			fail_msg("%s did not load", files[f]);
		assert_int_equal(e.n, 0);
		config_unref(c);
		config_errors_free(&e);
		free(text);
	}
}

/* Every key of every file has a row in docs/configuration.md naming an existing module and
 * an existing test that mentions the key; every row is a key some file writes or a key the
 * loader knows (the table may document keys no example uses). */
static void test_every_key_documented_and_tested(void **state)
{
	(void)state;
	static struct row rows[MAX_ROWS];
	static struct walk w;
	size_t n_rows = read_table(rows);
	bool ok = true;

	memset(&w, 0, sizeof w);
	for (size_t f = 0; f < ARRAY_LEN(files); f++) {
		size_t len;
		char *text = load_text(files[f], &len);
		struct cnode *root = ctree_parse(text, len, tree_report, NULL);
		assert_non_null(root);
		w.n_maps = 0; /* mappings are per file (positions); keys add up */
		walk(&w, root, "", "");
		ctree_free(root);
		free(text);
	}
	assert_true(w.n_keys > 100); /* the walk found the contract's keys at all */
	for (size_t k = 0; k < w.n_keys; k++) {
		const struct row *r = NULL;
		for (size_t i = 0; i < n_rows && r == NULL; i++)
			r = strcmp(rows[i].key, w.keys[k]) == 0 ? &rows[i] : NULL;
		if (r == NULL) {
			print_error("%s: no row in docs/configuration.md's key table\n", w.keys[k]);
			ok = false;
			continue;
		}
		const char *leaf = strrchr(r->key, '.');
		leaf = leaf ? leaf + 1 : r->key;
		if (strchr(leaf, '[') != NULL) /* "plugins[].moderation" -> "moderation" */
			leaf = strchr(leaf, ']') + 1;
		if (!exists(r->module)) {
			print_error("%s: module %s does not exist\n", r->key, r->module);
			ok = false;
		}
		if (!exists(r->test)) {
			print_error("%s: test %s does not exist\n", r->key, r->test);
			ok = false;
		} else if (!file_mentions(r->test, leaf)) {
			print_error("%s: test %s never mentions \"%s\"\n", r->key, r->test, leaf);
			ok = false;
		}
	}
	for (size_t i = 0; i < n_rows; i++) {
		bool used = false;
		for (size_t k = 0; k < w.n_keys && !used; k++)
			used = strcmp(rows[i].key, w.keys[k]) == 0;
		for (size_t j = 0; j < i; j++) {
			if (strcmp(rows[i].key, rows[j].key) == 0) {
				print_error("%s: two rows\n", rows[i].key);
				ok = false;
			}
		}
		if (!used)
			print_message("note: %s is documented but no example writes it\n",
			              rows[i].key);
	}
	assert_true(ok);
}

/* An unknown key put into any mapping of any file (at the position of its first key) is
 * refused, naming the file, the line and column of the unknown key, and the mapping's path. */
static void test_unknown_key_refused_everywhere(void **state)
{
	(void)state;
	static struct walk w;
	size_t probes = 0;
	bool ok = true;

	for (size_t f = 0; f < ARRAY_LEN(files); f++) {
		size_t len;
		char *text = load_text(files[f], &len);
		struct cnode *root = ctree_parse(text, len, tree_report, NULL);
		assert_non_null(root);
		memset(&w, 0, sizeof w);
		walk(&w, root, "", "");

		for (size_t m = 0; m < w.n_maps; m++) {
			const struct cnode *map = w.maps[m].node;
			/* offset of the node's line and column; an anchor (&name) is skipped to
			 * where the mapping's text starts */
			size_t off = 0;
			for (unsigned line = 1; line < map->line; off++)
				line += text[off] == '\n';
			off += map->col - 1;
			if (text[off] == '&') {
				off += strcspn(text + off, " \n");
				off += strspn(text + off, " \n");
			}
			unsigned want_line = 1, want_col = 1;
			for (size_t i = 0; i < off; i++) {
				want_col = text[i] == '\n' ? 1 : want_col + 1;
				want_line += text[i] == '\n';
			}
			bool flow = text[off] == '{';
			char insert[64 + PATH_CAP];
			if (flow) {
				off++;
				want_col++;
				bool empty = text[off + strspn(text + off, " ")] == '}';
				snprintf(insert, sizeof insert, "%s: 1%s", PROBE_KEY,
				         empty ? "" : ", ");
			} else {
				snprintf(insert, sizeof insert, "%s: 1\n%*s", PROBE_KEY,
				         (int)want_col - 1, "");
			}
			size_t il = strlen(insert);
			char *probe = malloc(len + il + 1);
			assert_non_null(probe);
			memcpy(probe, text, off);
			memcpy(probe + off, insert, il);
			memcpy(probe + off + il, text + off, len - off + 1);

			char want[128 + PATH_CAP];
			/* a plugin item is { NAME: {...} }: a second key is refused as such, at
			 * the item */
			size_t pl = strlen(w.maps[m].path);
			bool item = pl > 0 && w.maps[m].path[pl - 1] == ']' &&
			            strstr(w.maps[m].path, ".plugins[") != NULL &&
			            strchr(strstr(w.maps[m].path, ".plugins[") + 1, '.') == NULL;
			snprintf(want, sizeof want, "%s:%u:%u: %s%s", base_name(files[f]),
			         item ? map->line : want_line, item ? map->col : want_col,
			         w.maps[m].path, w.maps[m].path[0] ? ": " : "");
			const char *what =
			        item ? "must be a mapping with one key, the plugin's name"
			             : "\"" PROBE_KEY "\"";
			struct config_errors e;
			struct config *c =
			        config_load_string(probe, len + il, base_name(files[f]), &e);
			bool refused = false;
			for (size_t i = 0; i < e.n && !refused; i++)
				refused = strncmp(e.msgs[i], want, strlen(want)) == 0 &&
				          strstr(e.msgs[i], what) != NULL;
			if (c != NULL || !refused) {
				ok = false;
				print_error("%s: %s: an unknown key was %s; want \"%s…\"%s\n",
				            base_name(files[f]), w.maps[m].path,
				            c != NULL ? "accepted" : "refused otherwise", want,
				            e.n ? ", got:" : "");
				for (size_t i = 0; i < e.n; i++)
					print_error("    %s\n", e.msgs[i]);
			}
			probes++;
			config_unref(c);
			config_errors_free(&e);
			free(probe);
		}
		ctree_free(root);
		free(text);
	}
	print_message("%zu mappings probed\n", probes);
	assert_true(probes > 50);
	assert_true(ok);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_files_load),
	        cmocka_unit_test(test_every_key_documented_and_tested),
	        cmocka_unit_test(test_unknown_key_refused_everywhere),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
