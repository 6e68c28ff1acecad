/* retry: errord's rules for a retry a policy asks for, and for the deadline
 * that bounds a whole client request. Plain C: the policy says what it
 * wants (verdict.h), these rules say whether it may happen and when; the
 * shared counts behind them (the budget, the cooldown) live in budget.c. */
#ifndef ERRORD_RETRY_H
#define ERRORD_RETRY_H

#include "budget.h"
#include "http.h"
#include "rand.h"
#include "settings.h"
#include "verdict.h"

#include <stdint.h>

/* What a retry is checked against. */
typedef struct {
    const policy_settings_t *settings;
    int attempt;            /* the attempt that just ended, 1 for the first */
    int repeatable;         /* the request may be sent again (retry_repeatable) */
    int body_complete;      /* the whole request body was read */
    int body_kept;          /* ... and is kept, so it can go again */
    const http_head_t *res; /* the response the verdict answers, or NULL */
    uint64_t deadline_ns;   /* the request's deadline (monotonic), 0: none */
    rand_t *rng;            /* for the backoff's jitter */
} retry_ask_t;

/* Checks the retry verdict `v` asks for, in order: attempts, idempotency,
 * the kept body, Retry-After's maximum, the deadline, then the budget
 * (which counts it when it fits). Returns -1 when the retry may go, with
 * its delay in *delay_ms: the verdict's `after`, else the response's
 * Retry-After, else the settings' backoff. Otherwise returns why it may
 * not (a refusal_t). */
int retry_check(const retry_ask_t *ask, const verdict_t *v, uint64_t *delay_ms);

/* The delay before try `attempt` + 1 (`attempt` counts from 1) when
 * neither the policy nor the upstream says: exponential backoff with full
 * jitter, a random number of milliseconds in
 * [0, min(backoff_max_ms, backoff_base_ms * 2^(attempt-1))]. Draws from
 * `r`, which belongs to the caller's thread. errord.backoff() is this. */
uint64_t retry_backoff_ms(const policy_settings_t *s, rand_t *r, int attempt);

/* Whether `req` may be sent again without changing its effect: an
 * idempotent method, or a client that said so with Idempotency-Key. */
int retry_repeatable(const http_head_t *req);

/* How long the client request `req` may take in all, in ms (0: no
 * limit): its X-Request-Timeout (500, 500ms, 2s..., at most an hour) when
 * valid, else settings.deadline_ms (`s` NULL: none). */
uint64_t retry_deadline_ms(const policy_settings_t *s, const http_head_t *req);

#endif
