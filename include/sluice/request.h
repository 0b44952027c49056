/* request.h — one client request through the gateway pipeline (see src/request.c). */
#ifndef SLUICE_REQUEST_H
#define SLUICE_REQUEST_H

#include <stdbool.h>

struct http_request;
struct worker;

/* The http_server handler: arg is the worker. */
void request_handle(struct http_request *hr, void *arg);
/* The http_server head hook (Expect: 100-continue): false when it answered. */
bool request_head_check(struct http_request *hr, void *arg);
/* Shutdown: cancel and free every live request of the worker. */
void request_abort_all(struct worker *w);

#endif
