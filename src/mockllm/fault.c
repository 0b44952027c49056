/* fault.c — byte-level faults of sluice-mockllm: RST, garbage, junk, endless headers, closing.
 *
 * These replies cannot be made with evhttp's API, so they work on the connection's socket
 * directly (server.c takes the descriptor from the evhttp connection once evhttp is done
 * with it) or, for --close-on-accept, on a listener of their own. */
#include "mockllm.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/listener.h>

/* Bytes of the garbage fault. */
#define GARBAGE_BYTES 256
/* Filler of one endless-headers line. */
#define HEADER_FILLER "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

/* evhttp frees a connection with shutdown(SHUT_WR) before close, which sends a FIN: the peer
 * would see an orderly end, then the RST. So the socket is moved off evhttp's descriptor:
 * a fresh unconnected socket takes the number (evhttp closes that one later), and our dup of
 * the original, with SO_LINGER 0, is its last descriptor — closing it sends the RST. epoll
 * forgets the original when it is closed; libevent ignores the ENOENT of its later delete. */
void fault_reset_fd(int fd)
{
	struct linger lg = {1, 0};
	int orig = dup(fd);
	int fresh = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (orig < 0 || fresh < 0 || dup2(fresh, fd) < 0) {
		/* Fall back on the descriptor itself: a FIN may precede the RST. */
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	} else {
		setsockopt(orig, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	if (fresh >= 0)
		close(fresh);
	if (orig >= 0)
		close(orig);
}

void fault_junk(struct evbuffer *b, size_t n)
{
	uint64_t st = 0x243F6A8885A308D3ULL; /* same junk every time */
	unsigned char block[4096];

	while (n > 0) {
		size_t k = n < sizeof(block) ? n : sizeof(block);

		for (size_t i = 0; i < k; i++) {
			unsigned char c = (unsigned char)(rng_next(&st) >> 56);

			/* No line break: the junk never completes an SSE event or a header. */
			block[i] = (c == '\n' || c == '\r') ? 0 : c;
		}
		evbuffer_add(b, block, k);
		n -= k;
	}
}

void fault_garbage(int fd)
{
	struct evbuffer *b = evbuffer_new();

	if (b == NULL)
		return;
	fault_junk(b, GARBAGE_BYTES);
	/* A fresh connection's send buffer takes this at once; a short write is still garbage. */
	while (evbuffer_get_length(b) > 0 && evbuffer_write(b, fd) > 0)
		;
	evbuffer_free(b);
}

void fault_header_lines(struct evbuffer *b, size_t bytes, uint64_t *line)
{
	size_t start = evbuffer_get_length(b);

	while (evbuffer_get_length(b) - start < bytes)
		evbuffer_add_printf(b, "X-Mock-Filler-%llu: %s\r\n", (unsigned long long)(*line)++,
		                    HEADER_FILLER);
}

static void closer_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len,
                      void *arg)
{
	(void)l;
	(void)sa;
	(void)len;
	(void)arg;
	close(fd);
}

struct evconnlistener *fault_closer_new(struct event_base *base, int fd)
{
	/* backlog 0: the socket is listening already. */
	return evconnlistener_new(base, closer_cb, NULL, LEV_OPT_CLOSE_ON_FREE, 0, fd);
}
