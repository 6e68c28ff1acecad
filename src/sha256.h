/* sha256: SHA-256 (FIPS 180-4), for naming the policy a request ran under
 * and for telling whether a reloaded policy file has changed. */
#ifndef ERRORD_SHA256_H
#define ERRORD_SHA256_H

#include <stddef.h>

/* Writes the SHA-256 of the `n` bytes at `data` into `hex` (the caller's) as
 * 64 lower-case hex digits and a NUL. When OpenSSL cannot compute it (out of
 * memory), `hex` is the empty string, which matches no digest. */
void sha256_hex(const void *data, size_t n, char hex[65]);

#endif
