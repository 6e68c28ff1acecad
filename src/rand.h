/* rand: a fast pseudo-random generator (xorshift128+) for jitter and
 * request ids, seeded from the kernel. Not for secrets. One generator
 * belongs to one thread. */
#ifndef ERRORD_RAND_H
#define ERRORD_RAND_H

#include <stdint.h>

typedef struct {
    uint64_t s[2];
} rand_t;

/* Seeds `r` from getrandom(), or from the clock and pid when the kernel
 * has no entropy to give. */
void rand_seed(rand_t *r);

/* The next 64 random bits. */
static inline uint64_t rand_next(rand_t *r)
{
    uint64_t s1 = r->s[0];
    const uint64_t s0 = r->s[1];
    r->s[0] = s0;
    s1 ^= s1 << 23;
    r->s[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return r->s[1] + s0;
}

#endif
