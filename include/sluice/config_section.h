/* config_section.h — the loader's lower helpers, public for modules that parse their own section.
 *
 * A module that owns a part of the configuration (a policy under `plugins:`, design.md §12) is
 * handed the YAML node of its section and a struct config_section, and reads its keys with the
 * functions below. They are thin wrappers over what src/config.c uses for every other section,
 * so a module's messages read exactly like the loader's own:
 *
 *   FILE:LINE:COLUMN: KEY.PATH: message
 *
 * Every reader reports what is wrong at the node it was given (or, when the node is absent, at
 * nothing: absent means "use your default") and returns false / NULL; the caller goes on
 * reading the rest of its section so that one load reports every problem. A module knows its
 * section failed when csec_error_count() grew while it parsed.
 *
 * Strings returned as `const char *` point into the YAML tree and are valid only during the
 * parse: copy what must outlive it. Everything returned as owned is released with the
 * matching *_free.
 */
#ifndef SLUICE_CONFIG_SECTION_H
#define SLUICE_CONFIG_SECTION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include "sluice/config.h"
#include "sluice/config_tree.h"

/* The loader's error list, seen from one section. Opaque; valid during the call that hands it. */
struct config_section;

/* A key path buffer ("routes[0].plugins[2].loop_guard.window"). */
#define CSEC_PATH_LEN 384

/* Checks on strings (and on each item of a string list). */
enum csec_flag {
	CSEC_NONEMPTY = 1u << 2, /* "" refused */
	CSEC_LOWER = 1u << 3,    /* lower-cased (string lists) */
	CSEC_NAME = 1u << 4,     /* letters, digits, '.', '_', '-'; at most 128 characters */
	CSEC_TOKEN = 1u << 5,    /* an HTTP token (a header or parameter name) */
	CSEC_MIN1 = 1u << 10,    /* lists: at least one item */
};

/* ---- errors and paths --------------------------------------------------------------------- */

/* One error at node at (NULL: the entry being parsed, e.g. the key of "- moderation:"), about
 * key path path. An error about a value whose
 * ${NAME} could not be expanded is not repeated (its unset variable is the error), but it is
 * counted. */
void csec_error(struct config_section *s, const struct cnode *at, const char *path, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));
/* Errors reported so far in the whole load (those not repeated included): a module compares
 * the count before and after its parse. */
size_t csec_error_count(const struct config_section *s);

/* parent.key and parent[i], into buf (CSEC_PATH_LEN bytes); return buf. */
const char *csec_path_key(char *buf, const char *parent, const char *key);
const char *csec_path_index(char *buf, const char *parent, size_t i);

/* ---- mappings and lists ------------------------------------------------------------------- */

/* The value under key in map (NULL when absent or map is NULL). */
const struct cnode *csec_get(const struct cnode *map, const char *key);
/* n when it is a mapping (a list); NULL when n is NULL (absent) or, reported, something else. */
const struct cnode *csec_map(struct config_section *s, const struct cnode *n, const char *path);
const struct cnode *csec_seq(struct config_section *s, const struct cnode *n, const char *path);
/* Every key of map must be one of keys (NULL-terminated): an unknown key is reported at the key
 * with the nearest known one suggested ("unknown key "windw" (did you mean "window"?)"); every
 * key of required (NULL-terminated, may be NULL) must be present (reported at map). map may be
 * NULL (nothing to check). Returns false when something was reported. */
bool csec_keys(struct config_section *s, const struct cnode *map, const char *path,
               const char *const *keys, const char *const *required);

/* ---- values ------------------------------------------------------------------------------- */

/* An integer from min to max ("must be an integer from 2 to 1000000"). */
bool csec_int(struct config_section *s, const struct cnode *n, const char *path, long long min,
              long long max, long long *out);
/* A number written as a YAML number (not quoted) from min to max; max may be HUGE_VAL
 * ("must be a number", "must not be negative", "must be a number from 0 to 1"). */
bool csec_number(struct config_section *s, const struct cnode *n, const char *path, double min,
                 double max, double *out);
bool csec_bool(struct config_section *s, const struct cnode *n, const char *path, bool *out);
/* A non-null scalar checked against csec_flag bits; borrowed from the tree. */
const char *csec_string(struct config_section *s, const struct cnode *n, const char *path,
                        unsigned flags);
/* One of names (NULL-terminated): *out is its index ("\"hide\" is not one of mask, block"). */
bool csec_enum(struct config_section *s, const struct cnode *n, const char *path,
               const char *const *names, int *out);
/* The same for a name of some kind: "unknown <word> "usr" (did you mean "user"?)". */
bool csec_name(struct config_section *s, const struct cnode *n, const char *path,
               const char *const *names, const char *word, int *out);
/* A list of names (at most 32): *bits gets 1 << index for each; an unknown item is reported
 * as by csec_name with word, or as by csec_enum when word is NULL. */
bool csec_enum_bits(struct config_section *s, const struct cnode *n, const char *path,
                    const char *const *names, const char *word, unsigned *bits);
/* Durations and sizes in the loader's syntax (docs/configuration.md), in ms and bytes. */
bool csec_duration(struct config_section *s, const struct cnode *n, const char *path, bool nonzero,
                   uint64_t *ms);
bool csec_size(struct config_section *s, const struct cnode *n, const char *path, bool nonzero,
               uint64_t *bytes);
/* An http:// or https:// URL (no credentials, no fragment); borrowed from the tree. */
const char *csec_url(struct config_section *s, const struct cnode *n, const char *path);

/* A list of strings, each checked against flags; owned by the caller (csec_strv_free). */
bool csec_strlist(struct config_section *s, const struct cnode *n, const char *path, unsigned flags,
                  char ***out, size_t *n_out);
void csec_strv_free(char **v, size_t n);

/* A list of regular expressions, compiled with PCRE2_UTF | options and JIT-compiled with
 * jit_options (0: PCRE2_JIT_COMPLETE); an empty one is refused ("it would match
 * everything"). *out holds the ones that compiled (owned: csec_regex_free). */
bool csec_regex_list(struct config_section *s, const struct cnode *n, const char *path,
                     uint32_t options, uint32_t jit_options, pcre2_code ***out, size_t *n_out);
void csec_regex_free(pcre2_code **v, size_t n);

/* A mapping of HTTP header names to values without control characters (as instances'
 * auth.header); owned by the caller (csec_kv_free). */
bool csec_headers(struct config_section *s, const struct cnode *n, const char *path,
                  struct config_kv **out, size_t *n_out);
void csec_kv_free(struct config_kv *kv, size_t n);

/* Any YAML value as JSON, with YAML 1.2 core-schema scalars (as instances' options): a new
 * reference, or NULL when something in it was reported. */
json_t *csec_json(struct config_section *s, const struct cnode *n, const char *path);

#endif
