/* metrics: counters and their exposition (see metrics.h). */
#include "metrics.h"

#include "alert.h"
#include "budget.h"
#include "clock.h"
#include "http.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

/* Upper bounds of the duration buckets, in microseconds: from half a
 * millisecond (a hop on loopback) to a minute (a long deadline). */
static const uint64_t BUCKET_US[METRICS_BUCKETS] = {
    500,    1000,   2500,    5000,    10000,   25000,   50000,    100000,
    250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000, 60000000,
};

/* ---- the workers' blocks -------------------------------------------------------- */

#define MAX_WORKERS 1024

static metrics_t *workers[MAX_WORKERS];
static atomic_int n_workers;
static uv_mutex_t lock; /* adding workers and reasons */
static uv_once_t once = UV_ONCE_INIT;

static void init_lock(void)
{
    uv_mutex_init(&lock);
}

metrics_t *metrics_new_worker(void)
{
    uv_once(&once, init_lock);
    metrics_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    uv_mutex_lock(&lock);
    int n = atomic_load(&n_workers);
    if (n < MAX_WORKERS) {
        workers[n] = m;
        atomic_store_explicit(&n_workers, n + 1, memory_order_release);
    }
    uv_mutex_unlock(&lock);
    return m;
}

void metrics_observe(histogram_t *h, uint64_t ns)
{
    uint64_t us = ns / 1000;
    int i = 0;
    while (i < METRICS_BUCKETS && us > BUCKET_US[i])
        i++;
    if (i < METRICS_BUCKETS)
        metric_add(&h->bucket[i], 1);
    metric_add(&h->count, 1);
    metric_add(&h->sum_us, us);
}

static const char *const ERROR_NAME[ME_N] = {"connect",  "timeout",  "reset",  "protocol",
                                             "deadline", "aborted", "tls"};
static const char *const POLICY_ERROR_NAME[MP_N] = {"error", "timeout", "memory", "verdict",
                                                     "set_aside"};
static const char *const VERDICT_NAME[MV_N] = {"pass", "retry", "respond", "none"};
static const char *const RELOAD_NAME[3] = {"reloaded", "unchanged", "failed"};

metrics_error_t metrics_error_of(const char *kind)
{
    for (int i = 0; kind != NULL && i < ME_N; i++)
        if (strcmp(kind, ERROR_NAME[i]) == 0)
            return (metrics_error_t)i;
    return ME_ABORTED;
}

metrics_policy_error_t metrics_policy_error_of(const char *failure)
{
    for (int i = 0; failure != NULL && i < MP_N; i++)
        if (strcmp(failure, POLICY_ERROR_NAME[i]) == 0)
            return (metrics_policy_error_t)i;
    return MP_ERROR;
}

/* ---- retry reasons ----------------------------------------------------------------- */

static struct {
    char name[33];
    metric_t n;
} reasons[METRICS_MAX_REASONS + 1]; /* the last is "other" */
static atomic_int n_reasons;

void metrics_retry(const char *reason)
{
    uv_once(&once, init_lock);
    const char *name = reason[0] != '\0' ? reason : "none";
    int n = atomic_load_explicit(&n_reasons, memory_order_acquire);
    for (int i = 0; i < n; i++) {
        if (strcmp(reasons[i].name, name) == 0) {
            atomic_fetch_add_explicit(&reasons[i].n, 1, memory_order_relaxed);
            return;
        }
    }
    uv_mutex_lock(&lock);
    n = atomic_load(&n_reasons);
    int i = 0;
    while (i < n && strcmp(reasons[i].name, name) != 0)
        i++;
    if (i == n && n < METRICS_MAX_REASONS) {
        snprintf(reasons[i].name, sizeof reasons[i].name, "%s", name);
        atomic_store_explicit(&n_reasons, n + 1, memory_order_release);
    } else if (i == n) {
        i = METRICS_MAX_REASONS; /* the table is full */
    }
    atomic_fetch_add_explicit(&reasons[i].n, 1, memory_order_relaxed);
    uv_mutex_unlock(&lock);
}

/* ---- the text format --------------------------------------------------------------- */

void metrics_family(buf_t *out, const char *name, const char *type, const char *help)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_label_value(buf_t *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_lit(out, "\\\\");
        else if (*s == '"')
            buf_lit(out, "\\\"");
        else if (*s == '\n')
            buf_lit(out, "\\n");
        else
            buf_append(out, s, 1);
    }
}

static uint64_t load(const metric_t *m)
{
    return atomic_load_explicit(m, memory_order_relaxed);
}

/* The sum over the workers of the metric at `offset` in their blocks. */
static uint64_t sum(size_t offset)
{
    uint64_t total = 0;
    int n = atomic_load_explicit(&n_workers, memory_order_acquire);
    for (int i = 0; i < n; i++)
        total += load((const metric_t *)((const char *)workers[i] + offset));
    return total;
}

#define SUM(field) sum(offsetof(metrics_t, field))

static void seconds(buf_t *out, uint64_t us)
{
    buf_printf(out, "%llu.%06llu", (unsigned long long)(us / 1000000),
               (unsigned long long)(us % 1000000));
}

/* A bucket's bound as Prometheus clients write it: "0.0005", "2.5", "60". */
static void bound(buf_t *out, uint64_t us)
{
    char text[32];
    int n = snprintf(text, sizeof text, "%llu.%06llu", (unsigned long long)(us / 1000000),
                     (unsigned long long)(us % 1000000));
    while (text[n - 1] == '0')
        n--;
    if (text[n - 1] == '.')
        n--;
    buf_append(out, text, (size_t)n);
}

static void histogram(buf_t *out, const char *name, const char *help, size_t offset)
{
    metrics_family(out, name, "histogram", help);
    uint64_t cumulative = 0;
    for (int b = 0; b < METRICS_BUCKETS; b++) {
        cumulative += sum(offset + offsetof(histogram_t, bucket) + (size_t)b * sizeof(metric_t));
        buf_printf(out, "%s_bucket{le=\"", name);
        bound(out, BUCKET_US[b]);
        buf_printf(out, "\"} %llu\n", (unsigned long long)cumulative);
    }
    uint64_t count = sum(offset + offsetof(histogram_t, count));
    buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum ", name, (unsigned long long)count,
               name);
    seconds(out, sum(offset + offsetof(histogram_t, sum_us)));
    buf_printf(out, "\n%s_count %llu\n", name, (unsigned long long)count);
}

/* process_*: the standard process metrics, from /proc. */
static void process(buf_t *out)
{
    FILE *f = fopen("/proc/self/stat", "r");
    unsigned long utime = 0, stime = 0, vsize = 0;
    unsigned long long start = 0;
    long rss = 0;
    if (f != NULL) {
        /* the command (2) may hold spaces: read past its closing ')' */
        char line[1024];
        if (fgets(line, sizeof line, f) != NULL) {
            char *p = strrchr(line, ')');
            if (p != NULL)
                sscanf(p + 2,
                       "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d "
                       "%*d %*d %llu %lu %ld",
                       &utime, &stime, &start, &vsize, &rss);
        }
        fclose(f);
    }
    long tick = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    double boot = 0;
    f = fopen("/proc/stat", "r");
    if (f != NULL) {
        char line[256];
        while (fgets(line, sizeof line, f) != NULL)
            if (sscanf(line, "btime %lf", &boot) == 1)
                break;
        fclose(f);
    }
    int fds = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d != NULL) {
        for (struct dirent *e = readdir(d); e != NULL; e = readdir(d))
            fds += e->d_name[0] != '.';
        closedir(d);
        fds--; /* the directory being read */
    }
    metrics_family(out, "process_cpu_seconds_total", "counter",
                   "User and system CPU time spent, in seconds.");
    buf_printf(out, "process_cpu_seconds_total %.2f\n", (double)(utime + stime) / (double)tick);
    metrics_family(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    buf_printf(out, "process_resident_memory_bytes %ld\n", rss * page);
    metrics_family(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
    buf_printf(out, "process_virtual_memory_bytes %lu\n", vsize);
    metrics_family(out, "process_open_fds", "gauge", "Open file descriptors.");
    buf_printf(out, "process_open_fds %d\n", fds);
    metrics_family(out, "process_start_time_seconds", "gauge",
                   "Start time of the process since the epoch, in seconds.");
    buf_printf(out, "process_start_time_seconds %.2f\n", boot + (double)start / (double)tick);
}

void metrics_render(buf_t *out, const metrics_control_t *c)
{
    metrics_family(out, "errord_requests_total", "counter",
                   "Client requests by the status they got (499: the client left first) and "
                   "the verdict of their last attempt (none: no attempt was made).");
    for (int s = 0; s < METRICS_STATUS; s++)
        for (int v = 0; v < MV_N; v++) {
            uint64_t n = SUM(requests[s][v]);
            if (n > 0)
                buf_printf(out, "errord_requests_total{status=\"%d\",verdict=\"%s\"} %llu\n", s,
                           VERDICT_NAME[v], (unsigned long long)n);
        }
    metrics_family(out, "errord_upstream_responses_total", "counter",
                   "Responses from the upstream by status, every attempt counted.");
    for (int s = 0; s < METRICS_STATUS; s++) {
        uint64_t n = SUM(upstream_responses[s]);
        if (n > 0)
            buf_printf(out, "errord_upstream_responses_total{status=\"%d\"} %llu\n", s,
                       (unsigned long long)n);
    }
    metrics_family(out, "errord_upstream_errors_total", "counter",
                   "Attempts that got no response, by why.");
    for (int k = 0; k < ME_N; k++)
        buf_printf(out, "errord_upstream_errors_total{kind=\"%s\"} %llu\n", ERROR_NAME[k],
                   (unsigned long long)SUM(upstream_errors[k]));

    metrics_family(out, "errord_retries_total", "counter",
                   "Retries made, by the reason their verdict gave (the first 32 distinct "
                   "reasons; later ones count as other).");
    int nr = atomic_load_explicit(&n_reasons, memory_order_acquire);
    for (int i = 0; i <= METRICS_MAX_REASONS; i++) {
        if (i >= nr && i < METRICS_MAX_REASONS)
            continue;
        uint64_t n = load(&reasons[i].n);
        if (i == METRICS_MAX_REASONS && n == 0)
            continue;
        buf_printf(out, "errord_retries_total{reason=\"%s\"} %llu\n",
                   i == METRICS_MAX_REASONS ? "other" : reasons[i].name, (unsigned long long)n);
    }
    metrics_family(out, "errord_retries_refused_total", "counter",
                   "Retries a policy asked for that errord refused, by why.");
    for (int w = 0; w < REFUSED_N; w++)
        buf_printf(out, "errord_retries_refused_total{why=\"%s\"} %llu\n",
                   budget_refusal_name((refusal_t)w),
                   (unsigned long long)budget_refusals((refusal_t)w));
    metrics_family(out, "errord_policy_errors_total", "counter",
                   "Policy handler calls that failed, or were skipped as the handler was set "
                   "aside (errord passed the response), by kind.");
    for (int k = 0; k < MP_N; k++)
        buf_printf(out, "errord_policy_errors_total{kind=\"%s\"} %llu\n", POLICY_ERROR_NAME[k],
                   (unsigned long long)SUM(policy_errors[k]));
    metrics_family(out, "errord_policy_reloads_total", "counter",
                   "Policy reloads by result (a failed one keeps the running policy).");
    for (int r = 0; r < 3; r++)
        buf_printf(out, "errord_policy_reloads_total{result=\"%s\"} %llu\n", RELOAD_NAME[r],
                   (unsigned long long)c->reloads[r]);
    metrics_family(out, "errord_policy_info", "gauge", "The running policy, by its sha256.");
    if (c->policy_path != NULL) {
        buf_lit(out, "errord_policy_info{path=\"");
        metrics_label_value(out, c->policy_path);
        buf_printf(out, "\",sha256=\"%s\"} 1\n", c->policy_sha256);
        metrics_family(out, "errord_policy_loaded_timestamp_seconds", "gauge",
                       "When the running policy was loaded, since the epoch.");
        buf_printf(out, "errord_policy_loaded_timestamp_seconds %lld.%03lld\n",
                   (long long)(c->policy_loaded_ms / 1000), (long long)(c->policy_loaded_ms % 1000));
    }

    histogram(out, "errord_request_duration_seconds",
              "Client requests, from the request head read to the response's end.",
              offsetof(metrics_t, request_seconds));
    histogram(out, "errord_upstream_attempt_duration_seconds",
              "Attempts at the upstream, from sending to the response's end or failure.",
              offsetof(metrics_t, attempt_seconds));

    metrics_family(out, "errord_client_connections", "gauge", "Client connections open.");
    buf_printf(out, "errord_client_connections %llu\n", (unsigned long long)c->client_connections);
    metrics_family(out, "errord_upstream_connections", "gauge",
                   "Upstream connections open, by state (idle: pooled for reuse).");
    uint64_t open = SUM(upstream_open), idle = SUM(upstream_idle);
    buf_printf(out, "errord_upstream_connections{state=\"active\"} %llu\n",
               (unsigned long long)(open > idle ? open - idle : 0));
    buf_printf(out, "errord_upstream_connections{state=\"idle\"} %llu\n", (unsigned long long)idle);
    metrics_family(out, "errord_upstream_tls_handshakes_total", "counter",
                   "TLS handshakes with an https upstream: full, or resuming a session.");
    buf_printf(out, "errord_upstream_tls_handshakes_total{session=\"new\"} %llu\n",
               (unsigned long long)SUM(tls_full));
    buf_printf(out, "errord_upstream_tls_handshakes_total{session=\"resumed\"} %llu\n",
               (unsigned long long)SUM(tls_resumed));

    uint64_t now = clock_now_ms(), until = budget_cooldown_until(now);
    metrics_family(out, "errord_cooldown_active", "gauge",
                   "1 while a cooldown holds new requests and retries.");
    buf_printf(out, "errord_cooldown_active %d\n", until > now);
    metrics_family(out, "errord_cooldown_remaining_seconds", "gauge",
                   "How long the current cooldown still holds requests.");
    buf_lit(out, "errord_cooldown_remaining_seconds ");
    seconds(out, until > now ? (until - now) * 1000 : 0);
    buf_lit(out, "\n");

    metrics_family(out, "errord_alerts_firing", "gauge", "Distinct alerts firing now.");
    buf_printf(out, "errord_alerts_firing %zu\n", alert_count());
    metrics_family(out, "errord_alert_events_total", "counter", "alert{} calls of the policies.");
    buf_printf(out, "errord_alert_events_total %llu\n", (unsigned long long)alert_events());

    metrics_family(out, "errord_ready", "gauge",
                   "1 when errord takes traffic (policy loaded, listening, not draining).");
    buf_printf(out, "errord_ready %d\n", c->ready);
    metrics_family(out, "errord_build_info", "gauge", "errord's version and libraries.");
    buf_printf(out,
               "errord_build_info{version=\"%s\",libuv=\"%s\",llhttp=\"%s\",lua=\"%s\"} 1\n",
               c->version, uv_version_string(), http_parser_version(), c->lua_version);
    process(out);
}
