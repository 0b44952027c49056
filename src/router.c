/* router.c — match a request (path, model) to a configured route; list the models served. */
#include "sluice/router.h"

#include <string.h>

static size_t router_path_len(const char *path, size_t len);
static bool router_serves_path(const struct config_route *r, const char *path, size_t len);
static bool router_lists_model(const struct config_route *r, const char *model);
static bool router_add_model(json_t *data, json_t *seen, const char *id);

/* ---------------------------------------------------------------------------
 * Matching
 * ------------------------------------------------------------------------- */

/*
 * One pass over the routes in configuration order, comparing in place: no
 * copy of the path is made and nothing is allocated. The first route naming
 * the model returns at once; the first catch-all is only remembered, because a
 * route naming the model may still follow it.
 */
enum router_result router_match(const struct config *c, const char *path, const char *model,
                                const struct config_route **out)
{
	const struct config_route *catch_all = NULL;
	bool path_served = false;

	if (out)
		*out = NULL;
	if (!path)
		return ROUTER_NO_PATH;

	/* The caller strips the query, but a '?' that slips through must not
	 * turn a known path into a 404. */
	size_t len = router_path_len(path, strcspn(path, "?"));

	for (size_t i = 0; i < c->n_routes; i++) {
		const struct config_route *r = &c->routes[i];

		if (!router_serves_path(r, path, len))
			continue;
		path_served = true;
		if (r->n_models == 0) {
			if (!catch_all)
				catch_all = r;
		} else if (router_lists_model(r, model)) {
			if (out)
				*out = r;
			return ROUTER_OK;
		}
	}
	if (catch_all) {
		if (out)
			*out = catch_all;
		return ROUTER_OK;
	}
	return path_served ? ROUTER_NO_MODEL : ROUTER_NO_PATH;
}

/* Length of path without one trailing '/', which is not significant; "/" itself
 * stays as it is. */
static size_t router_path_len(const char *path, size_t len)
{
	if (len > 1 && path[len - 1] == '/')
		len--;
	return len;
}

static bool router_serves_path(const struct config_route *r, const char *path, size_t len)
{
	for (size_t i = 0; i < r->n_paths; i++) {
		const char *p = r->paths[i];
		/* Configured paths are normalised the same way, so "/v1/x/" in the
		 * file and "/v1/x" on the wire (or the reverse) match. */
		if (router_path_len(p, strlen(p)) == len && memcmp(p, path, len) == 0)
			return true;
	}
	return false;
}

static bool router_lists_model(const struct config_route *r, const char *model)
{
	if (!model)
		return false;
	for (size_t i = 0; i < r->n_models; i++)
		if (strcmp(r->models[i], model) == 0)
			return true;
	return false;
}

/* ---------------------------------------------------------------------------
 * GET /v1/models
 * ------------------------------------------------------------------------- */

/*
 * Built per call rather than cached: it is rare, and a snapshot is immutable
 * so the answer would only change with a reload anyway. "seen" is a set of ids
 * (object keys) so that deduplication stays linear; "data" keeps the order in
 * which ids first appear in the configuration, so the list is stable across
 * calls and reloads of the same file.
 */
json_t *router_models_json(const struct config *c)
{
	return router_models_json_for(c, NULL, NULL);
}

json_t *router_models_json_for(const struct config *c, router_route_filter keep, const void *arg)
{
	json_t *data = json_array();
	json_t *seen = json_object();
	json_t *list = NULL;

	if (!data || !seen)
		goto fail;

	for (size_t i = 0; i < c->n_routes; i++) {
		const struct config_route *r = &c->routes[i];

		if (keep != NULL && !keep(r, arg))
			continue;
		for (size_t m = 0; m < r->n_models; m++)
			if (!router_add_model(data, seen, r->models[m]))
				goto fail;
		if (r->n_models > 0)
			continue;
		/* A catch-all route serves whatever model its targets pin (the target's own
		 * upstream model, else its instance's). */
		for (size_t t = 0; t < r->n_targets; t++) {
			const struct config_target *tg = &r->targets[t];
			const char *model = tg->model      ? tg->model
			                    : tg->instance ? tg->instance->model
			                                   : NULL;
			if (model && !router_add_model(data, seen, model))
				goto fail;
		}
	}

	list = json_object();
	if (!list || json_object_set_new(list, "object", json_string("list")) != 0)
		goto fail;
	/* json_object_set_new takes the reference to data even when it fails. */
	int rc = json_object_set_new(list, "data", data);
	data = NULL;
	if (rc != 0)
		goto fail;
	json_decref(seen);
	return list;

fail:
	log_error("router: cannot build the model list (out of memory, or a model id not UTF-8)");
	json_decref(list);
	json_decref(data);
	json_decref(seen);
	return NULL;
}

static bool router_add_model(json_t *data, json_t *seen, const char *id)
{
	if (json_object_get(seen, id))
		return true;
	if (json_object_set_new(seen, id, json_true()) != 0)
		return false;
	json_t *m = json_pack("{s:s, s:s, s:i, s:s}", "id", id, "object", "model", "created", 0,
	                      "owned_by", "sluice");
	return m && json_array_append_new(data, m) == 0;
}

/* ---------------------------------------------------------------------------
 * The Anthropic shape, for clients that speak Messages
 * ------------------------------------------------------------------------- */

/* The epoch: a gateway's public name has no release date of its own. */
#define ROUTER_ANTHROPIC_CREATED_AT "1970-01-01T00:00:00Z"

json_t *router_models_anthropic(const json_t *list)
{
	const json_t *src = json_object_get(list, "data"), *m;
	json_t *data = json_array(), *out = NULL;
	size_t i;

	if (data == NULL)
		return NULL;
	json_array_foreach(src, i, m)
	{
		const char *id = json_string_value(json_object_get(m, "id"));
		json_t *e = id ? json_pack("{s:s,s:s,s:s,s:s}", "type", "model", "id", id,
		                           "display_name", id, "created_at",
		                           ROUTER_ANTHROPIC_CREATED_AT)
		               : NULL;
		if (e == NULL || json_array_append_new(data, e) != 0) {
			json_decref(data);
			return NULL;
		}
	}
	size_t n = json_array_size(data);
	const char *first =
	        n ? json_string_value(json_object_get(json_array_get(data, 0), "id")) : NULL;
	const char *last =
	        n ? json_string_value(json_object_get(json_array_get(data, n - 1), "id")) : NULL;
	out = json_pack("{s:o,s:b,s:s?,s:s?}", "data", data, "has_more", 0, "first_id", first,
	                "last_id", last);
	return out;
}
