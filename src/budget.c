/* budget: what retries may spend (see budget.h). */
#include "budget.h"

#include <pthread.h>
#include <stdatomic.h>

/* Per-second counts over a ring a little longer than the window. */
#define SLOTS 16

typedef struct {
    int64_t sec[SLOTS];
    uint64_t n[SLOTS];
} rate_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static rate_t requests, retries;
static _Atomic uint64_t cooldown_until;
static _Atomic uint64_t refusals[REFUSED_N];

static void rate_add(rate_t *r, int64_t sec)
{
    int i = (int)(sec % SLOTS);
    if (r->sec[i] != sec) {
        r->sec[i] = sec;
        r->n[i] = 0;
    }
    r->n[i]++;
}

static uint64_t rate_sum(const rate_t *r, int64_t sec)
{
    uint64_t total = 0;
    for (int i = 0; i < SLOTS; i++)
        if (r->sec[i] > sec - BUDGET_WINDOW_S && r->sec[i] <= sec)
            total += r->n[i];
    return total;
}

void budget_note_request(int64_t now_ms)
{
    pthread_mutex_lock(&lock);
    rate_add(&requests, now_ms / 1000);
    pthread_mutex_unlock(&lock);
}

int budget_take_retry(double ratio, double min_per_s, int64_t now_ms)
{
    int64_t sec = now_ms / 1000;
    pthread_mutex_lock(&lock);
    double allowed = ratio * (double)rate_sum(&requests, sec) + min_per_s * BUDGET_WINDOW_S;
    int ok = (double)rate_sum(&retries, sec) + 1 <= allowed;
    if (ok)
        rate_add(&retries, sec);
    pthread_mutex_unlock(&lock);
    return ok;
}

void budget_cooldown(uint64_t until_ms)
{
    uint64_t cur = atomic_load(&cooldown_until);
    while (cur < until_ms && !atomic_compare_exchange_weak(&cooldown_until, &cur, until_ms))
        ;
}

uint64_t budget_cooldown_until(uint64_t now_ms)
{
    uint64_t until = atomic_load(&cooldown_until);
    return until > now_ms ? until : 0;
}

void budget_refused(refusal_t why)
{
    atomic_fetch_add(&refusals[why], 1);
}

uint64_t budget_refusals(refusal_t why)
{
    return atomic_load(&refusals[why]);
}

const char *budget_refusal_name(refusal_t why)
{
    static const char *const names[REFUSED_N] = {
        "attempts", "budget", "deadline", "unsafe", "body_too_large", "body_incomplete",
        "retry_after",
    };
    return names[why];
}
