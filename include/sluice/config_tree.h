/* config_tree.h — internal to the config module: YAML text as a tree of nodes that remember
 * where they were written, so every later error can name its line and column. */
#ifndef SLUICE_CONFIG_TREE_H
#define SLUICE_CONFIG_TREE_H

#include <stdbool.h>
#include <stddef.h>

enum cnode_kind { CNODE_SCALAR, CNODE_MAP, CNODE_SEQ };

struct cnode {
	enum cnode_kind kind;
	unsigned line, col;  /* 1-based, where the node starts */
	char *str;           /* SCALAR: the text, NUL-free; in values ${NAME} is already replaced */
	bool quoted;         /* SCALAR written quoted, as a block (| >) or tagged !!str: a string,
	                        never a number, a boolean or null */
	bool null;           /* SCALAR written as nothing, ~ or null (plain) */
	bool unexpanded;     /* SCALAR whose ${NAME} could not be replaced (reported): later
	                        errors about its value would only repeat that one */
	struct cnode **kids; /* SEQ: the items; MAP: key, value, key, value... (owned) */
	size_t n;            /* SEQ: items; MAP: pairs */
};

#define CNODE_KEY(m, i) ((m)->kids[2 * (i)])
#define CNODE_VAL(m, i) ((m)->kids[2 * (i) + 1])

/* Receives one problem; path is "" at the top level. */
typedef void (*ctree_report_fn)(void *arg, unsigned line, unsigned col, const char *path,
                                const char *msg);

/*
 * Parses one YAML document. Returns its root, or NULL when the text is empty (nothing
 * reported) or is not valid YAML (the syntax error reported at the position libyaml gives).
 *
 * Beyond syntax, the returned tree has been checked for what no later step can see:
 * duplicate keys in one mapping, non-scalar keys, merge keys (<<, unsupported) and tags other
 * than YAML's own; and ${NAME} has been replaced in every scalar value (never in keys), each
 * unset variable reported. Those problems are reported, and the tree is still returned so
 * that the caller can report everything else too. Aliases (*name) are expanded into copies
 * of their anchor's node (bounded, so "billion laughs" is refused).
 */
struct cnode *ctree_parse(const char *text, size_t len, ctree_report_fn report, void *arg);
void ctree_free(struct cnode *n);

/* The value under key in a MAP (the first if repeated), or NULL; *keynode gets the key node
 * when keynode is not NULL. */
const struct cnode *ctree_get(const struct cnode *map, const char *key,
                              const struct cnode **keynode);

#endif
