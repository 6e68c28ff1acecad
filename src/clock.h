/* clock: monotonic time, wall-clock time stamps and HTTP dates. */
#ifndef ERRORD_CLOCK_H
#define ERRORD_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Monotonic time in nanoseconds from an arbitrary origin. */
uint64_t clock_now_ns(void);

/* Monotonic time in milliseconds from an arbitrary origin. */
static inline uint64_t clock_now_ms(void) { return clock_now_ns() / 1000000u; }

/* Wall-clock time in milliseconds since the Unix epoch. */
int64_t clock_wall_ms(void);

/* Writes `ms` (Unix epoch milliseconds) as RFC 3339 UTC with milliseconds,
 * "2026-11-25T15:33:33.123Z", into `out` (at least 25 bytes). Returns the
 * length written, without the NUL. */
int clock_rfc3339(int64_t ms, char out[32]);

/* Writes `t` as an IMF-fixdate, "Wed, 25 Nov 2026 15:33:33 GMT", into `out`
 * (at least 30 bytes). Returns the length, without the NUL. */
int clock_http_date(time_t t, char out[32]);

/* Parses an HTTP-date (IMF-fixdate, RFC 850 or asctime form). Returns 0 and
 * sets *t, or -EINVAL. */
int clock_parse_http_date(const char *s, size_t n, time_t *t);

#endif
