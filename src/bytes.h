/* bytes: tests on eight bytes at once, for the long runs of ordinary bytes
 * in message heads and log strings (a run is skimmed a word at a time, and
 * the word that holds a special byte is then walked one byte at a time).
 *
 * Each test is exact as a yes/no answer for the whole word: a borrow or a
 * carry can only mark a byte past one that really matched. */
#ifndef ERRORD_BYTES_H
#define ERRORD_BYTES_H

#include <stdint.h>
#include <string.h>

#define BYTES_ONES 0x0101010101010101ull
#define BYTES_HIGHS 0x8080808080808080ull

static inline uint64_t bytes_load8(const char *s)
{
    uint64_t x;
    memcpy(&x, s, sizeof x);
    return x;
}

/* Some byte of `x` is below `n` (n <= 128). */
static inline uint64_t bytes_below(uint64_t x, unsigned n)
{
    return (x - BYTES_ONES * n) & ~x & BYTES_HIGHS;
}

/* Some byte of `x` is above `n` (n <= 127). */
static inline uint64_t bytes_above(uint64_t x, unsigned n)
{
    return ((x + BYTES_ONES * (127 - n)) | x) & BYTES_HIGHS;
}

/* Some byte of `x` is `c`. */
static inline uint64_t bytes_has(uint64_t x, unsigned char c)
{
    return bytes_below(x ^ (BYTES_ONES * c), 1);
}

#endif
