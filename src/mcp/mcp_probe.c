/* mcp_probe.c — active health checks of MCP servers by MCP ping, on the main thread. */
#include "sluice/mcp_parts.h"

struct event_base;

void mcp_probes_start(struct event_base *base);
void mcp_probes_sync(const struct config *c);
void mcp_probes_stop(void);

void mcp_probes_start(struct event_base *base)
{
}

void mcp_probes_sync(const struct config *c)
{
}

void mcp_probes_stop(void)
{
}
