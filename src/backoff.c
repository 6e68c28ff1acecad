/* backoff: the retry delay (see backoff.h). */
#include "backoff.h"

uint64_t backoff_delay_ms(const policy_settings_t *s, rand_t *r, int attempt)
{
    uint64_t cap = s->backoff_base_ms;
    for (int i = 1; i < attempt && cap < s->backoff_max_ms; i++)
        cap *= 2;
    if (cap > s->backoff_max_ms)
        cap = s->backoff_max_ms;
    return cap == 0 ? 0 : rand_next(r) % (cap + 1);
}
