/* router.h — match a request (path, requested model) to a configured route. */
#ifndef SLUICE_ROUTER_H
#define SLUICE_ROUTER_H

#include "sluice/config.h"

enum router_result {
	ROUTER_OK,
	ROUTER_NO_PATH,  /* no route serves this path → 404 */
	ROUTER_NO_MODEL, /* routes serve the path, none serves this model → 404 model_not_found */
};

/* Routes are tried in configuration order. A route matches when one of its paths
 * equals the request path (exact match, query string excluded; a trailing "/" is
 * not significant) and, when the route lists models, the requested model is one
 * of them. A route with no models matches any model, but a route that names the
 * model wins over one that lists none, whatever their order; among equals the
 * first configured wins. model may be NULL (then only routes without a model
 * list match). *out (out may be NULL) is set on ROUTER_OK, NULL otherwise.
 * Nothing is allocated. */
enum router_result router_match(const struct config *c, const char *path, const char *model,
                                const struct config_route **out);

/* The model ids a GET /v1/models should list: every route's models (its public
 * names), plus, for routes without a model list, the upstream model of each target
 * that pins one (the target's model, else its instance's). Returns a JSON object in
 * OpenAI's list shape (caller decrefs). */
json_t *router_models_json(const struct config *c);
/* The same for the routes keep(route, arg) accepts (keep NULL: every route). */
typedef bool (*router_route_filter)(const struct config_route *route, const void *arg);
json_t *router_models_json_for(const struct config *c, router_route_filter keep, const void *arg);
/* The same list (list borrowed, in OpenAI's shape) in Anthropic's models-list shape:
 * {"data":[{"type":"model","id","display_name","created_at"}],"has_more":false,
 * "first_id","last_id"}. NULL when out of memory. */
json_t *router_models_anthropic(const json_t *list);

#endif
