#include "rand.h"
#include "clock.h"

#include <sys/random.h>
#include <unistd.h>

void rand_seed(rand_t *r)
{
    if (getrandom(r->s, sizeof r->s, 0) != sizeof r->s)
        r->s[0] = clock_now_ns() ^ (uint64_t)getpid();
    r->s[1] |= 1; /* the state must not be all zero */
}
