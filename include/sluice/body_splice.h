/* body_splice.h — the request body an instance receives, as a splice of the client's bytes.
 *
 * The common change to a client's body — another model name, and/or usage asked for in a
 * stream — is made on the client's bytes instead of re-serialising the parsed tree. Pure:
 * bytes and length in, a new allocation out. */
#ifndef SLUICE_BODY_SPLICE_H
#define SLUICE_BODY_SPLICE_H

#include <stdbool.h>
#include <stddef.h>

/*
 * body (len bytes, a JSON object with at least one member and no "stream_options", as
 * request.c has parsed it) with "model" replaced by model (when not NULL) and, when
 * want_usage, "stream_options":{"include_usage":true} added as the first member.
 * named_model: the body has a "model" member; it is replaced where it stands, else one is
 * added as a first member. model_val/model_val_len, when not NULL, is the model member's
 * value as a validating scanner found it in body (the whole body valid JSON); NULL has
 * body_splice look for it itself. false when out of memory, or when the named member is not found
 * in the bytes as one string literal: its name written with escapes ("mod\u0065l"), or bytes
 * that are not JSON. The caller then rebuilds the body from the tree. On true, *out
 * (NUL-terminated, *out_len bytes without the NUL) is the caller's to free.
 */
bool body_splice(const char *body, size_t len, const char *model, bool named_model,
                 const char *model_val, size_t model_val_len, bool want_usage, char **out,
                 size_t *out_len);

#endif
