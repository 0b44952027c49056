/* mcp_session.c — what the gateway hands clients and gets back: session ids, list cursors and
 * the event ids of merged streams.
 *
 * Why sealed session ids: a session must reach the upstream sessions that created it from
 * any worker, and a cross-worker table would put a lock on every message. So the id the
 * client sees carries everything routing needs — the snapshot generation, the route, the
 * consumer, and each server's slot and own Mcp-Session-Id — sealed with AES-256-GCM under a
 * key made at start: a client can neither read nor forge one, and any worker can open it
 * with its own cipher context and nothing shared. The key lives as long as the process, so
 * sessions end with it (clients get 404 and initialise again).
 */
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "sluice/mcp_parts.h"

#define NONCE_LEN 12
#define TAG_LEN   16
#define TOKEN_TAG "s1."
#define TOKEN_VER 1
/* The sealed plaintext of a session: fixed part + per server (slot, version, len, sid). */
#define SESSION_FIXED (1 + 8 + 2 + 2 + 1 + MCP_SID_BYTES + 8 + 1)
#define SESSION_MAX   (SESSION_FIXED + MCP_MAX_SERVERS * (4 + MCP_MAX_UPSTREAM_SID))

static unsigned char key[32];

struct mcp_crypto {
	EVP_CIPHER_CTX *ctx;
};

struct mcp_crypto *mcp_crypto_new(void)
{
	struct mcp_crypto *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->ctx = EVP_CIPHER_CTX_new();
	if (c->ctx == NULL) {
		free(c);
		return NULL;
	}
	return c;
}

void mcp_crypto_free(struct mcp_crypto *c)
{
	if (c == NULL)
		return;
	EVP_CIPHER_CTX_free(c->ctx);
	free(c);
}

void mcp_crypto_set_key(const unsigned char k[32])
{
	memcpy(key, k, sizeof(key));
}

bool mcp_crypto_random_key(void)
{
	return RAND_bytes(key, sizeof(key)) == 1;
}

/* ---------------------------------------------------------------- base64url (no padding) */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
	size_t o = 0, i = 0;
	for (; i + 3 <= n; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
		out[o++] = b64[(v >> 6) & 63];
		out[o++] = b64[v & 63];
	}
	if (n - i == 1) {
		uint32_t v = (uint32_t)in[i] << 16;
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
	} else if (n - i == 2) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
		out[o++] = b64[(v >> 6) & 63];
	}
	out[o] = '\0';
	return o;
}

static int b64_val(char ch)
{
	if (ch >= 'A' && ch <= 'Z')
		return ch - 'A';
	if (ch >= 'a' && ch <= 'z')
		return ch - 'a' + 26;
	if (ch >= '0' && ch <= '9')
		return ch - '0' + 52;
	if (ch == '-')
		return 62;
	if (ch == '_')
		return 63;
	return -1;
}

/* Returns the decoded length, or -1 (bad character, impossible length, too long). */
static long b64_decode(const char *in, size_t n, unsigned char *out, size_t cap)
{
	size_t o = 0;
	uint32_t acc = 0;
	int bits = 0;
	if (n % 4 == 1)
		return -1;
	for (size_t i = 0; i < n; i++) {
		int v = b64_val(in[i]);
		if (v < 0)
			return -1;
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (o >= cap)
				return -1;
			out[o++] = (unsigned char)(acc >> bits);
		}
	}
	return (long)o;
}

/* ---------------------------------------------------------------- sealing */

static bool seal(struct mcp_crypto *c, const char *aad, const uint8_t *aad2, size_t aad2_len,
                 const unsigned char *pt, size_t n, unsigned char *out)
{
	int len = 0;
	unsigned char *nonce = out, *ct = out + NONCE_LEN, *tag = out + NONCE_LEN + n;
	if (RAND_bytes(nonce, NONCE_LEN) != 1)
		return false;
	if (EVP_EncryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, nonce) != 1 ||
	    EVP_EncryptUpdate(c->ctx, NULL, &len, (const unsigned char *)aad, (int)strlen(aad)) !=
	            1 ||
	    (aad2_len && EVP_EncryptUpdate(c->ctx, NULL, &len, aad2, (int)aad2_len) != 1) ||
	    EVP_EncryptUpdate(c->ctx, ct, &len, pt, (int)n) != 1 ||
	    EVP_EncryptFinal_ex(c->ctx, ct + len, &len) != 1 ||
	    EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) != 1)
		return false;
	return true;
}

/* in: nonce | ct | tag (n bytes). Returns the plaintext length or -1. */
static long open_sealed(struct mcp_crypto *c, const char *aad, const uint8_t *aad2, size_t aad2_len,
                        unsigned char *in, size_t n, unsigned char *pt)
{
	int len = 0, fin = 0;
	if (n < NONCE_LEN + TAG_LEN)
		return -1;
	size_t ct_len = n - NONCE_LEN - TAG_LEN;
	if (EVP_DecryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, in) != 1 ||
	    EVP_DecryptUpdate(c->ctx, NULL, &len, (const unsigned char *)aad, (int)strlen(aad)) !=
	            1 ||
	    (aad2_len && EVP_DecryptUpdate(c->ctx, NULL, &len, aad2, (int)aad2_len) != 1) ||
	    EVP_DecryptUpdate(c->ctx, pt, &len, in + NONCE_LEN, (int)ct_len) != 1 ||
	    EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, in + NONCE_LEN + ct_len) !=
	            1 ||
	    EVP_DecryptFinal_ex(c->ctx, pt + len, &fin) != 1)
		return -1;
	return (long)(len + fin);
}

static void put_u64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

static uint64_t get_u64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

/* ---------------------------------------------------------------- sessions */

bool mcp_session_encode(struct mcp_crypto *c, const struct mcp_session *s, char *out, size_t cap)
{
	unsigned char pt[SESSION_MAX], sealed[NONCE_LEN + SESSION_MAX + TAG_LEN];
	size_t n = 0;

	if (s->n > MCP_MAX_SERVERS)
		return false;
	pt[n++] = TOKEN_VER;
	put_u64(pt + n, s->generation);
	n += 8;
	pt[n++] = (unsigned char)(s->route >> 8);
	pt[n++] = (unsigned char)s->route;
	pt[n++] = (unsigned char)(s->consumer >> 8);
	pt[n++] = (unsigned char)s->consumer;
	pt[n++] = s->version;
	memcpy(pt + n, s->sid, MCP_SID_BYTES);
	n += MCP_SID_BYTES;
	put_u64(pt + n, s->created_ms);
	n += 8;
	pt[n++] = s->n;
	for (unsigned i = 0; i < s->n; i++) {
		const struct mcp_upstream_session *u = &s->up[i];
		if (u->sid_len > MCP_MAX_UPSTREAM_SID)
			return false;
		pt[n++] = u->slot;
		pt[n++] = u->version;
		pt[n++] = u->caps;
		pt[n++] = u->sid_len;
		memcpy(pt + n, u->sid, u->sid_len);
		n += u->sid_len;
	}
	size_t sealed_len = NONCE_LEN + n + TAG_LEN;
	size_t need = sizeof(TOKEN_TAG) - 1 + (sealed_len + 2) / 3 * 4 + 1;
	if (need > cap || !seal(c, "mcp-session", NULL, 0, pt, n, sealed))
		return false;
	memcpy(out, TOKEN_TAG, sizeof(TOKEN_TAG) - 1);
	b64_encode(sealed, sealed_len, out + sizeof(TOKEN_TAG) - 1);
	return true;
}

bool mcp_session_decode(struct mcp_crypto *c, const char *tok, size_t len, struct mcp_session *out)
{
	unsigned char sealed[NONCE_LEN + SESSION_MAX + TAG_LEN], pt[SESSION_MAX];
	size_t tl = sizeof(TOKEN_TAG) - 1;

	memset(out, 0, sizeof(*out));
	if (len <= tl || memcmp(tok, TOKEN_TAG, tl) != 0)
		return false;
	long sl = b64_decode(tok + tl, len - tl, sealed, sizeof(sealed));
	if (sl < 0)
		return false;
	long n = open_sealed(c, "mcp-session", NULL, 0, sealed, (size_t)sl, pt);
	if (n < (long)SESSION_FIXED || pt[0] != TOKEN_VER)
		return false;
	size_t o = 1;
	out->generation = get_u64(pt + o);
	o += 8;
	out->route = (uint16_t)(pt[o] << 8 | pt[o + 1]);
	o += 2;
	out->consumer = (uint16_t)(pt[o] << 8 | pt[o + 1]);
	o += 2;
	out->version = pt[o++];
	memcpy(out->sid, pt + o, MCP_SID_BYTES);
	o += MCP_SID_BYTES;
	out->created_ms = get_u64(pt + o);
	o += 8;
	out->n = pt[o++];
	if (out->n > MCP_MAX_SERVERS || out->version >= MCP_N_VERSIONS)
		return false;
	for (unsigned i = 0; i < out->n; i++) {
		struct mcp_upstream_session *u = &out->up[i];
		if ((size_t)n - o < 4)
			return false;
		u->slot = pt[o++];
		u->version = pt[o++];
		u->caps = pt[o++];
		u->sid_len = pt[o++];
		if (u->slot >= MCP_MAX_SERVERS || u->version >= MCP_N_VERSIONS ||
		    u->sid_len > MCP_MAX_UPSTREAM_SID || (size_t)n - o < u->sid_len)
			return false;
		memcpy(u->sid, pt + o, u->sid_len);
		u->sid[u->sid_len] = '\0';
		o += u->sid_len;
		for (unsigned j = 0; j < i; j++)
			if (out->up[j].slot == u->slot)
				return false;
	}
	return o == (size_t)n;
}

void mcp_session_hash(const uint8_t sid[MCP_SID_BYTES], char out[13])
{
	static const char hex[] = "0123456789abcdef";
	unsigned char d[SHA256_DIGEST_LENGTH];
	SHA256(sid, MCP_SID_BYTES, d);
	for (int i = 0; i < 6; i++) {
		out[2 * i] = hex[d[i] >> 4];
		out[2 * i + 1] = hex[d[i] & 15];
	}
	out[12] = '\0';
}

/* ---------------------------------------------------------------- cursors */

#define CURSOR_PT_MAX 6144

bool mcp_cursor_encode(struct mcp_crypto *c, const uint8_t sid[MCP_SID_BYTES], uint8_t kind,
                       const struct mcp_cursor_part *parts, size_t n, char *out, size_t cap)
{
	unsigned char pt[CURSOR_PT_MAX], sealed[NONCE_LEN + CURSOR_PT_MAX + TAG_LEN];
	size_t o = 0;

	if (n > MCP_MAX_SERVERS)
		return false;
	pt[o++] = kind;
	pt[o++] = (unsigned char)n;
	for (size_t i = 0; i < n; i++) {
		if (parts[i].len > 0xffff || CURSOR_PT_MAX - o < 3 + parts[i].len)
			return false;
		pt[o++] = parts[i].slot;
		pt[o++] = (unsigned char)(parts[i].len >> 8);
		pt[o++] = (unsigned char)parts[i].len;
		memcpy(pt + o, parts[i].cursor, parts[i].len);
		o += parts[i].len;
	}
	size_t sl = NONCE_LEN + o + TAG_LEN;
	if ((sl + 2) / 3 * 4 + 1 > cap || !seal(c, "mcp-cursor", sid, MCP_SID_BYTES, pt, o, sealed))
		return false;
	b64_encode(sealed, sl, out);
	return true;
}

bool mcp_cursor_decode(struct mcp_crypto *c, const uint8_t sid[MCP_SID_BYTES], uint8_t kind,
                       const char *tok, size_t len, struct mcp_cursor_part *parts, size_t *n_out,
                       char *buf, size_t cap)
{
	unsigned char sealed[NONCE_LEN + CURSOR_PT_MAX + TAG_LEN], pt[CURSOR_PT_MAX];
	long sl = b64_decode(tok, len, sealed, sizeof(sealed));
	*n_out = 0;
	if (sl < 0)
		return false;
	long n = open_sealed(c, "mcp-cursor", sid, MCP_SID_BYTES, sealed, (size_t)sl, pt);
	if (n < 2 || pt[0] != kind || pt[1] > MCP_MAX_SERVERS)
		return false;
	size_t o = 2, b = 0, count = pt[1];
	for (size_t i = 0; i < count; i++) {
		if ((size_t)n - o < 3)
			return false;
		size_t l = (size_t)pt[o + 1] << 8 | pt[o + 2];
		parts[i].slot = pt[o];
		o += 3;
		if ((size_t)n - o < l || cap - b < l + 1 || parts[i].slot >= MCP_MAX_SERVERS)
			return false;
		memcpy(buf + b, pt + o, l);
		buf[b + l] = '\0';
		parts[i].cursor = buf + b;
		parts[i].len = l;
		b += l + 1;
		o += l;
	}
	if (o != (size_t)n)
		return false;
	*n_out = count;
	return true;
}

/* ---------------------------------------------------------------- event ids */

void mcp_event_ids_free(struct mcp_event_ids *e)
{
	for (size_t i = 0; i < MCP_MAX_SERVERS; i++) {
		free(e->id[i]);
		e->id[i] = NULL;
	}
}

bool mcp_event_ids_set(struct mcp_event_ids *e, unsigned slot, const char *id, size_t len)
{
	if (slot >= MCP_MAX_SERVERS || len > 1024)
		return false;
	char *p = malloc(len + 1);
	if (p == NULL)
		return false;
	memcpy(p, id, len);
	p[len] = '\0';
	free(e->id[slot]);
	e->id[slot] = p;
	return true;
}

bool mcp_event_ids_format(const struct mcp_event_ids *e, char *out, size_t cap)
{
	size_t o = 0;
	for (unsigned i = 0; i < MCP_MAX_SERVERS; i++) {
		if (e->id[i] == NULL)
			continue;
		size_t l = strlen(e->id[i]);
		if (o + 1 + 4 + (l + 2) / 3 * 4 + 1 > cap)
			return false;
		if (o > 0)
			out[o++] = '.';
		o += (size_t)snprintf(out + o, cap - o, "%u:", i);
		o += b64_encode((const unsigned char *)e->id[i], l, out + o);
	}
	if (o >= cap)
		return false;
	out[o] = '\0';
	return o > 0;
}

bool mcp_event_ids_parse(struct mcp_event_ids *e, const char *s, size_t len)
{
	const char *p = s, *end = s + len;
	memset(e, 0, sizeof(*e));
	while (p < end) {
		const char *dot = memchr(p, '.', (size_t)(end - p));
		const char *q = dot ? dot : end;
		const char *colon = memchr(p, ':', (size_t)(q - p));
		unsigned slot = 0;
		if (colon == NULL || colon == p || colon - p > 2)
			goto fail;
		for (const char *d = p; d < colon; d++) {
			if (*d < '0' || *d > '9')
				goto fail;
			slot = slot * 10 + (unsigned)(*d - '0');
		}
		unsigned char id[1024];
		long n = b64_decode(colon + 1, (size_t)(q - colon - 1), id, sizeof(id));
		if (n <= 0 || slot >= MCP_MAX_SERVERS || e->id[slot] != NULL ||
		    memchr(id, '\0', (size_t)n) != NULL ||
		    !mcp_event_ids_set(e, slot, (const char *)id, (size_t)n))
			goto fail;
		p = dot ? dot + 1 : end;
	}
	return true;
fail:
	mcp_event_ids_free(e);
	return false;
}
