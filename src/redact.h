/* redact: which header values are secrets (SPEC §6), and how they are taken
 * out of text errord writes: the access record's headers, a failed
 * handler's message and traceback, and what a policy logs, alerts, prints
 * or gives as a retry reason. Plain C: the callers hand over text. */
#ifndef ERRORD_REDACT_H
#define ERRORD_REDACT_H

#include "buf.h"
#include "settings.h"
#include "verdict.h"

#include <stddef.h>

/* Secrets shorter than this are not looked for in text: they would match
 * ordinary words. */
#define REDACT_SECRET_MIN 4

/* Whether the header `name` (`n` bytes, any case) holds a secret whose
 * value errord never writes out: Authorization, Proxy-Authorization,
 * Cookie, Set-Cookie, X-Api-Key, and the names of settings.secret_headers
 * (`s` may be NULL: the fixed names only). */
int redact_header_secret(const policy_settings_t *s, const char *name, size_t n);

/* Replaces with "[redacted]" every secret the call `in` carries that occurs
 * in the `n` bytes of `text`: the value of each of its secret headers
 * (request and response) and, for a "Scheme credentials" value, the
 * credentials alone, each up to its first NUL byte. With `json`, `text` is
 * JSON text and a secret is looked for as JSON writes it ('"', '\\' and
 * HTAB escaped). Returns 1 with the result in `out` (empty on entry; the
 * caller frees it), or 0 when `text` holds no secret (or `in` is NULL),
 * leaving `out` untouched: the common case allocates nothing. */
int redact_scrub(const policy_settings_t *s, const policy_input_t *in, const char *text, size_t n,
                 int json, buf_t *out);

#endif
