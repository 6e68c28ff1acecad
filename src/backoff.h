/* backoff: how long a retry waits when the policy does not say, as plain
 * arithmetic on the policy's settings and a random generator. */
#ifndef ERRORD_BACKOFF_H
#define ERRORD_BACKOFF_H

#include "rand.h"
#include "settings.h"

#include <stdint.h>

/* The delay before try `attempt` + 1 (`attempt` counts from 1): exponential
 * backoff with full jitter, a random number of milliseconds in
 * [0, min(backoff_max_ms, backoff_base_ms * 2^(attempt-1))]. Draws from `r`,
 * which belongs to the caller's thread. */
uint64_t backoff_delay_ms(const policy_settings_t *s, rand_t *r, int attempt);

#endif
