/* settings: what a policy's `settings = { ... }` says, as plain C values
 * with errord's defaults filled in. The policy engine fills them in; the
 * proxy, the retry rules and the alert sinks read them. */
#ifndef ERRORD_SETTINGS_H
#define ERRORD_SETTINGS_H

#include <stddef.h>
#include <stdint.h>

/* One alert sink from settings.alerts. */
typedef enum { SINK_ALERTMANAGER, SINK_WEBHOOK, SINK_SLACK, SINK_PAGERDUTY } sink_kind_t;

typedef struct {
    sink_kind_t kind;
    char *url;
    char *headers;     /* extra header lines for a webhook, "Name: value\r\n", or NULL */
    char *routing_key; /* PagerDuty's integration key */
    int rate_per_min;  /* deliveries a minute at most */
    int queue;         /* deliveries kept waiting at most; the oldest go first */
    uint64_t timeout_ms;
} policy_sink_t;

/* settings = { ... } of the policy file, with errord's defaults. */
typedef struct {
    int attempts;              /* tries per client request, the first included */
    uint64_t backoff_base_ms;  /* exponential backoff with full jitter */
    uint64_t backoff_max_ms;
    size_t body_limit;         /* response bodies up to this are buffered for handlers */
    size_t replay_limit;       /* request bodies up to this are kept for retries */
    uint64_t deadline_ms;      /* bounds a whole client request; 0: none */
    uint64_t try_timeout_ms;   /* an attempt's wait for its response; 0: --first-byte-timeout */
    uint64_t retry_after_max_ms; /* a longer Retry-After is not waited for */
    int budget_on;             /* settings.budget = false turns it off */
    double budget_ratio;       /* retries <= ratio x requests + min_per_s x window */
    double budget_min_per_s;
    policy_sink_t *sinks;      /* settings.alerts */
    size_t n_sinks;
    uint64_t resolve_after_ms; /* an alert quiet this long is resolved */
    uint64_t repeat_ms;        /* firing alerts are sent to Alertmanager again this often */
    char **secret_headers;     /* settings.secret_headers: more names (lower case) */
    size_t n_secret_headers;
    uint64_t handler_instructions; /* per handler call */
    uint64_t handler_time_ms;      /* per handler call */
    size_t memory_limit;           /* the Lua state's memory, bytes */
    uint64_t set_aside_ms;         /* a failing handler's first time set aside */
} policy_settings_t;

#endif
