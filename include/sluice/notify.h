/* notify.h — the systemd readiness protocol (sd_notify) without libsystemd. */
#ifndef SLUICE_NOTIFY_H
#define SLUICE_NOTIFY_H

#include <stdbool.h>

/*
 * Each call sends one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET
 * (a path, or an abstract socket when it starts with '@'). Without
 * NOTIFY_SOCKET (not started by systemd with Type=notify) they do nothing.
 * Errors are logged at debug level and otherwise ignored: a service must not
 * stop because its supervisor cannot hear it.
 *
 * Sequence for server.c: notify_ready() once the workers serve; on SIGHUP or
 * POST /reload notify_reloading() before loading, then notify_ready() when the
 * reload is done (applied or refused); notify_stopping() when draining starts.
 */
void notify_ready(void);
void notify_reloading(void); /* RELOADING=1 + MONOTONIC_USEC (systemd >= 253 requires it) */
void notify_stopping(void);
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Send msg as is ("KEY=VALUE" lines). True when sent, or when there is no
 * NOTIFY_SOCKET to send to. */
bool notify_send(const char *msg);

#endif
