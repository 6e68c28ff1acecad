/* sha256: SHA-256 (FIPS 180-4), for naming the policy a request ran under. */
#ifndef ERRORD_SHA256_H
#define ERRORD_SHA256_H

#include <stddef.h>

/* Writes the SHA-256 of `n` bytes at `data` as 64 lower-case hex digits and a
 * NUL into `hex`. */
void sha256_hex(const void *data, size_t n, char hex[65]);

#endif
