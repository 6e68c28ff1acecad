/* retry: errord's rules for retries and deadlines (see retry.h). */
#include "retry.h"

#include "clock.h"
#include "config.h"

#include <string.h>

/* The longest deadline a client may ask for. */
#define DEADLINE_MAX_MS 3600000

uint64_t retry_backoff_ms(const policy_settings_t *s, rand_t *r, int attempt)
{
    uint64_t cap = s->backoff_base_ms;
    for (int i = 1; i < attempt && cap < s->backoff_max_ms; i++)
        cap *= 2;
    if (cap > s->backoff_max_ms)
        cap = s->backoff_max_ms;
    return cap == 0 ? 0 : rand_next(r) % (cap + 1);
}

int retry_check(const retry_ask_t *ask, const verdict_t *v, uint64_t *delay_ms)
{
    const policy_settings_t *s = ask->settings;
    if (ask->attempt >= s->attempts)
        return REFUSED_ATTEMPTS;
    if (!ask->repeatable && !v->unsafe)
        return REFUSED_UNSAFE;
    if (!ask->body_complete)
        return REFUSED_BODY_INCOMPLETE;
    if (!ask->body_kept)
        return REFUSED_BODY_TOO_LARGE;
    int64_t retry_after = ask->res != NULL ? http_retry_after_ms(ask->res, clock_wall_ms()) : -1;
    if (v->after_ms >= 0) {
        *delay_ms = (uint64_t)v->after_ms;
    } else if (retry_after >= 0) {
        /* the upstream said when: that beats any backoff of ours */
        if ((uint64_t)retry_after > s->retry_after_max_ms)
            return REFUSED_RETRY_AFTER;
        *delay_ms = (uint64_t)retry_after;
    } else {
        *delay_ms = retry_backoff_ms(s, ask->rng, ask->attempt);
    }
    if (ask->deadline_ns != 0 && clock_now_ns() + *delay_ms * 1000000u >= ask->deadline_ns)
        return REFUSED_DEADLINE;
    if (s->budget_on && !budget_take_retry(s->budget_ratio, s->budget_min_per_s, clock_wall_ms()))
        return REFUSED_BUDGET;
    return -1;
}

int retry_repeatable(const http_head_t *req)
{
    return http_method_idempotent(req->method) || http_head_find(req, "idempotency-key") != NULL;
}

uint64_t retry_deadline_ms(const policy_settings_t *s, const http_head_t *req)
{
    uint64_t deadline_ms = s != NULL ? s->deadline_ms : 0;
    const http_header_t *rt = http_head_find(req, "x-request-timeout");
    if (rt != NULL && rt->value_len > 0 && rt->value_len < 32) {
        char v[32];
        uint64_t ms;
        memcpy(v, rt->value, rt->value_len);
        v[rt->value_len] = '\0';
        if (config_parse_duration(v, &ms) == 0 && ms > 0)
            deadline_ms = ms < DEADLINE_MAX_MS ? ms : DEADLINE_MAX_MS;
    }
    return deadline_ms;
}
