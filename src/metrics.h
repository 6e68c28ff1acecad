/* metrics: errord's counters, gauges and histograms, and their Prometheus
 * text exposition (SPEC §5).
 *
 * Each worker counts into a block of its own (metrics_t) that only its
 * thread writes: an increment is a plain load and store, no locked
 * instruction and no shared cache line. A scrape, on the control loop, sums
 * the blocks. What all workers share (retry reasons, refusals, alerts) is
 * counted where it lives.
 *
 * Every label value is bounded: statuses are numbers below 600, the other
 * labels are fixed words, and the reasons a policy gives its retries are
 * kept for the first METRICS_MAX_REASONS distinct ones; later ones are
 * counted as "other". */
#ifndef ERRORD_METRICS_H
#define ERRORD_METRICS_H

#include "buf.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define METRICS_STATUS 600
#define METRICS_MAX_REASONS 32
#define METRICS_BUCKETS 16

typedef atomic_uint_fast64_t metric_t;

/* Adds `n` to a counter or gauge of one worker; only its thread writes it. */
static inline void metric_add(metric_t *m, uint64_t n)
{
    atomic_store_explicit(m, atomic_load_explicit(m, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

/* Sets a gauge of one worker to `v`; only its thread writes it. */
static inline void metric_set(metric_t *m, uint64_t v)
{
    atomic_store_explicit(m, v, memory_order_relaxed);
}

/* The verdict that ended a client request: its last attempt's, or none
 * when it made no attempt (errord refused it, or the client left first). */
typedef enum { MV_PASS, MV_RETRY, MV_RESPOND, MV_NONE, MV_N } metrics_verdict_t;

/* Why an attempt got no response. */
typedef enum {
    ME_CONNECT,
    ME_TIMEOUT,
    ME_RESET,
    ME_PROTOCOL,
    ME_DEADLINE,
    ME_ABORTED,
    ME_TLS,
    ME_N
} metrics_error_t;

/* How a policy handler failed. */
typedef enum { MP_ERROR, MP_TIMEOUT, MP_MEMORY, MP_VERDICT, MP_SET_ASIDE, MP_N } metrics_policy_error_t;

typedef struct {
    metric_t bucket[METRICS_BUCKETS]; /* not cumulative; summed when rendered */
    metric_t count;
    metric_t sum_us;
} histogram_t;

/* One worker's block. */
typedef struct {
    metric_t requests[METRICS_STATUS][MV_N]; /* by final status (0: none sent) */
    metric_t upstream_responses[METRICS_STATUS];
    metric_t upstream_errors[ME_N];
    metric_t policy_errors[MP_N];
    histogram_t request_seconds;
    metric_t upstream_open; /* gauges */
    metric_t upstream_idle;
    metric_t tls_full;      /* TLS handshakes with the upstream so far */
    metric_t tls_resumed;
    histogram_t attempt_seconds;
} metrics_t;

/* A zeroed block for a worker, counted in every scrape from now on; it
 * lives until the process ends. NULL when out of memory. */
metrics_t *metrics_new_worker(void);

/* Adds a duration of `ns` nanoseconds to `h`, which only the calling
 * worker's thread writes. */
void metrics_observe(histogram_t *h, uint64_t ns);

/* Returns the metric label for an attempt's error `kind` ("connect",
 * "timeout"...); ME_ABORTED for NULL or a word it does not know. */
metrics_error_t metrics_error_of(const char *kind);

/* Returns the metric label for how a handler failed (`failure`: "error",
 * "timeout"...); MP_ERROR for NULL or a word it does not know. */
metrics_policy_error_t metrics_policy_error_of(const char *failure);

/* Counts a retry made, by the reason its verdict gave ("" when none).
 * Thread-safe. */
void metrics_retry(const char *reason);

/* What the control loop knows that the scrape shows. */
typedef struct {
    const char *version;
    const char *lua_version;     /* lua_version_string() */
    const char *policy_path;     /* NULL without a policy */
    const char *policy_sha256;
    int64_t policy_loaded_ms;
    uint64_t reloads[3];         /* reloaded, unchanged, failed */
    uint64_t client_connections;
    int ready;
} metrics_control_t;

/* Appends to `out` the Prometheus text exposition of everything but the
 * alert sinks (sinks_metrics() adds those); `c` is read, not kept. */
void metrics_render(buf_t *out, const metrics_control_t *c);

/* Appends the "# HELP" and "# TYPE" lines of the metric family `name`, for
 * renderers elsewhere. */
void metrics_family(buf_t *out, const char *name, const char *type, const char *help);

/* Appends the C string `s` as a label value, escaped as the text format
 * wants (quotes not included). */
void metrics_label_value(buf_t *out, const char *s);

#endif
