/* sink: delivers the alert table to the sinks (see sink.h). */
#include "sink.h"

#include "alert.h"
#include "clock.h"
#include "httpc.h"
#include "log.h"
#include "metrics.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define TICK_MS 200
#define MAX_TRIES 5          /* deliveries of one item before it is dropped */
#define RETRY_BASE_MS 1000   /* backoff after a failed delivery: 1 s, 2 s, 4 s... */
#define RETRY_MAX_MS 30000

typedef struct item_s {
    struct item_s *next;
    buf_t body;
    int tries;
    uint64_t not_before; /* monotonic ms */
} item_t;

typedef struct {
    sinks_t *owner;
    policy_sink_t cfg;
    httpc_url_t url;
    const char *undeliverable; /* why it cannot be delivered to, or NULL */
    item_t *head, *tail;
    int queued;
    httpc_req_t *inflight;
    double tokens; /* the rate limit's bucket */
    uint64_t refilled_ms;
    uint64_t sent, failed, dropped;
    int last_status;
    char last_error[128];
} sink_t;

/* What has been said about one alert. */
typedef struct {
    char *key;
    size_t key_len;
    uint64_t am_sent_ms; /* last sent to Alertmanager, monotonic */
} known_t;

struct sinks_s {
    uv_loop_t *loop;
    uv_timer_t tick;
    sink_t **sink; /* pointers: a delivery in flight points at its sink */
    size_t n;
    known_t *known;
    size_t n_known;
    size_t cap_known;
    uint64_t resolve_after_ms;
    uint64_t repeat_ms;
    char *upstream;
    char *generator_url;
    tls_ctx_t *tls; /* for https sinks, made with the first */
    int closing;
    uint64_t close_by;
    void (*done)(void *arg);
    void *done_arg;
};

static const char *const KIND_NAME[] = {"alertmanager", "webhook", "slack", "pagerduty"};

/* ---- queues ------------------------------------------------------------------- */

static void item_free(item_t *it)
{
    buf_free(&it->body);
    free(it);
}

static void pop(sink_t *k)
{
    item_t *it = k->head;
    k->head = it->next;
    if (k->head == NULL)
        k->tail = NULL;
    k->queued--;
    item_free(it);
}

static void enqueue(sink_t *k, const buf_t *body)
{
    if (k->undeliverable != NULL) {
        k->dropped++;
        return;
    }
    if (k->queued >= k->cfg.queue) {
        /* full: the oldest goes, unless it is being delivered right now */
        item_t *prev = NULL, *victim = k->head;
        if (k->inflight != NULL && victim != NULL) {
            prev = victim;
            victim = victim->next;
        }
        if (victim == NULL) { /* only the one in flight: this one goes */
            k->dropped++;
            return;
        }
        if (prev != NULL)
            prev->next = victim->next;
        else
            k->head = victim->next;
        if (k->tail == victim)
            k->tail = prev;
        k->queued--;
        k->dropped++;
        item_free(victim);
    }
    item_t *it = calloc(1, sizeof *it);
    if (it == NULL || buf_append(&it->body, body->data, body->len) < 0) {
        free(it);
        k->dropped++;
        return;
    }
    if (k->tail != NULL)
        k->tail->next = it;
    else
        k->head = it;
    k->tail = it;
    k->queued++;
}

static void pump(sink_t *k);

static void on_delivered(void *arg, int status, const char *error)
{
    sink_t *k = arg;
    k->inflight = NULL;
    k->last_status = status;
    snprintf(k->last_error, sizeof k->last_error, "%s", error ? error : "");
    if (k->head == NULL)
        return;
    if (status >= 200 && status < 300) {
        k->sent++;
        pop(k);
    } else {
        k->failed++;
        item_t *it = k->head;
        int retryable = status == 0 || status >= 500 || status == 429;
        if (!retryable || ++it->tries >= MAX_TRIES) {
            k->dropped++;
            pop(k);
        } else {
            uint64_t wait = RETRY_BASE_MS << (it->tries - 1);
            it->not_before = clock_now_ms() + (wait < RETRY_MAX_MS ? wait : RETRY_MAX_MS);
        }
        log_record_t *r = log_begin(LOG_WARN, "alert delivery failed");
        log_str(r, "sink", KIND_NAME[k->cfg.kind]);
        log_str(r, "url", k->cfg.url);
        if (status != 0)
            log_int(r, "status", status);
        else
            log_str(r, "error", k->last_error);
        log_bool(r, "retrying", retryable && k->head == it);
        log_end(r);
    }
    pump(k);
}

/* Starts the next delivery when one is due and the rate limit allows. */
static void pump(sink_t *k)
{
    if (k->inflight != NULL || k->head == NULL || k->undeliverable != NULL)
        return;
    uint64_t now = clock_now_ms();
    if (now < k->head->not_before)
        return;
    double burst = k->cfg.rate_per_min < 10 ? 1 : k->cfg.rate_per_min / 10.0;
    k->tokens += (double)(now - k->refilled_ms) * k->cfg.rate_per_min / 60000.0;
    if (k->tokens > burst)
        k->tokens = burst;
    k->refilled_ms = now;
    if (k->tokens < 1)
        return;
    k->tokens -= 1;
    int rc = httpc_post(k->owner->loop, k->owner->tls, &k->url, k->cfg.headers, k->head->body.data,
                        k->head->body.len, k->cfg.timeout_ms, on_delivered, k, &k->inflight);
    if (rc < 0) {
        k->inflight = NULL;
        snprintf(k->last_error, sizeof k->last_error, "%s", uv_strerror(rc));
        k->head->not_before = now + RETRY_BASE_MS;
    }
}

/* ---- payloads ----------------------------------------------------------------- */

static void json_str(buf_t *b, const char *s)
{
    buf_lit(b, "\"");
    buf_json_escape(b, s, strlen(s));
    buf_lit(b, "\"");
}

static void json_time(buf_t *b, int64_t ms)
{
    char ts[32];
    clock_rfc3339(ms, ts);
    json_str(b, ts);
}

static int reserved_label(const char *k)
{
    return strcmp(k, "alertname") == 0 || strcmp(k, "severity") == 0 ||
           strcmp(k, "upstream") == 0;
}

static void json_labels(buf_t *b, const alert_info_t *a)
{
    buf_lit(b, "{");
    for (size_t i = 0; i < a->n_labels; i++) {
        if (i > 0)
            buf_lit(b, ",");
        json_str(b, a->labels[i].key);
        buf_lit(b, ":");
        json_str(b, a->labels[i].value);
    }
    buf_lit(b, "}");
}

/* "name": ... "last_seen": ... of an alert, for payloads and /alerts. */
static void json_alert_fields(buf_t *b, const alert_info_t *a)
{
    buf_lit(b, "\"name\":");
    json_str(b, a->name);
    buf_lit(b, ",\"severity\":");
    json_str(b, a->severity);
    buf_lit(b, ",\"summary\":");
    json_str(b, a->summary);
    buf_lit(b, ",\"labels\":");
    json_labels(b, a);
    buf_printf(b, ",\"count\":%lld,\"first_seen\":", (long long)a->count);
    json_time(b, a->first_ms);
    buf_lit(b, ",\"last_seen\":");
    json_time(b, a->last_ms);
}

/* One alert in Alertmanager's API v2 shape. */
static void am_alert(sinks_t *s, buf_t *b, const alert_info_t *a, int64_t ends_ms)
{
    buf_lit(b, "{\"labels\":{\"alertname\":");
    json_str(b, a->name);
    buf_lit(b, ",\"severity\":");
    json_str(b, a->severity);
    buf_lit(b, ",\"upstream\":");
    json_str(b, s->upstream);
    for (size_t i = 0; i < a->n_labels; i++) {
        if (reserved_label(a->labels[i].key))
            continue;
        buf_lit(b, ",");
        json_str(b, a->labels[i].key);
        buf_lit(b, ":");
        json_str(b, a->labels[i].value);
    }
    buf_printf(b, "},\"annotations\":{\"summary\":");
    json_str(b, a->summary);
    buf_printf(b, ",\"count\":\"%lld\"},\"startsAt\":", (long long)a->count);
    json_time(b, a->first_ms);
    if (ends_ms > 0) {
        buf_lit(b, ",\"endsAt\":");
        json_time(b, ends_ms);
    }
    if (s->generator_url != NULL) {
        buf_lit(b, ",\"generatorURL\":");
        json_str(b, s->generator_url);
    }
    buf_lit(b, "}");
}

/* The stable PagerDuty dedup key of an alert: its name and labels hashed. */
static void dedup_key(const alert_info_t *a, char out[40])
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < a->key_len; i++)
        h = (h ^ (unsigned char)a->key[i]) * 1099511628211ull;
    snprintf(out, 40, "errord-%016llx", (unsigned long long)h);
}

static const char *pagerduty_severity(const char *s)
{
    static const char *const ok[] = {"critical", "error", "warning", "info"};
    for (size_t i = 0; i < 4; i++)
        if (strcmp(s, ok[i]) == 0)
            return s;
    return "warning";
}

/* The notice of a new or resolved alert for a webhook, Slack or PagerDuty. */
static void notice(sinks_t *s, sink_t *k, const alert_info_t *a, int resolved, buf_t *b)
{
    const char *status = resolved ? "resolved" : "firing";
    buf_clear(b);
    switch (k->cfg.kind) {
    case SINK_WEBHOOK:
        buf_printf(b, "{\"status\":\"%s\",", status);
        json_alert_fields(b, a);
        buf_lit(b, ",\"upstream\":");
        json_str(b, s->upstream);
        buf_lit(b, "}");
        break;
    case SINK_SLACK: {
        buf_t text = BUF_INIT;
        buf_printf(&text, "[%s] %s (%s): %s (%lld times, upstream %s)",
                   resolved ? "RESOLVED" : "FIRING", a->name, a->severity, a->summary,
                   (long long)a->count, s->upstream);
        buf_append(&text, "", 1); /* the NUL json_str wants */
        buf_lit(b, "{\"text\":");
        json_str(b, text.data);
        buf_lit(b, "}");
        buf_free(&text);
        break;
    }
    case SINK_PAGERDUTY: {
        char key[40];
        dedup_key(a, key);
        buf_lit(b, "{\"routing_key\":");
        json_str(b, k->cfg.routing_key);
        buf_printf(b, ",\"event_action\":\"%s\",\"dedup_key\":\"%s\"",
                   resolved ? "resolve" : "trigger", key);
        if (!resolved) {
            buf_lit(b, ",\"payload\":{\"summary\":");
            buf_t sum = BUF_INIT;
            buf_printf(&sum, "%s: %s", a->name, a->summary);
            buf_append(&sum, "", 1);
            json_str(b, sum.data);
            buf_free(&sum);
            buf_lit(b, ",\"source\":");
            json_str(b, s->upstream);
            buf_printf(b, ",\"severity\":\"%s\",\"custom_details\":{\"count\":%lld,\"labels\":",
                       pagerduty_severity(a->severity), (long long)a->count);
            json_labels(b, a);
            buf_lit(b, "}}");
        }
        buf_lit(b, "}");
        break;
    }
    case SINK_ALERTMANAGER:
        break;
    }
}

/* ---- the tick ----------------------------------------------------------------- */

static known_t *find_known(sinks_t *s, const alert_info_t *a)
{
    for (size_t i = 0; i < s->n_known; i++)
        if (s->known[i].key_len == a->key_len && memcmp(s->known[i].key, a->key, a->key_len) == 0)
            return &s->known[i];
    return NULL;
}

static known_t *add_known(sinks_t *s, const alert_info_t *a)
{
    if (s->n_known == s->cap_known) {
        size_t cap = s->cap_known ? s->cap_known * 2 : 16;
        known_t *k = realloc(s->known, cap * sizeof *k);
        if (k == NULL)
            return NULL;
        s->known = k;
        s->cap_known = cap;
    }
    known_t *k = &s->known[s->n_known];
    k->key = malloc(a->key_len);
    if (k->key == NULL)
        return NULL;
    memcpy(k->key, a->key, a->key_len);
    k->key_len = a->key_len;
    k->am_sent_ms = 0;
    s->n_known++;
    return k;
}

static void forget_known(sinks_t *s, known_t *k)
{
    free(k->key);
    *k = s->known[--s->n_known];
}

static void notify(sinks_t *s, const alert_info_t *a, int resolved)
{
    buf_t b = BUF_INIT;
    for (size_t i = 0; i < s->n; i++) {
        if (s->sink[i]->cfg.kind == SINK_ALERTMANAGER)
            continue; /* it gets the batch of collect() */
        notice(s, s->sink[i], a, resolved, &b);
        enqueue(s->sink[i], &b);
    }
    buf_free(&b);
}

/* Compares the alert table with what was said, and queues what is due. */
static void collect(sinks_t *s)
{
    alert_info_t *alerts;
    size_t n;
    if (s->n == 0 || alert_snapshot(&alerts, &n) < 0)
        return;
    int64_t now = clock_wall_ms();
    uint64_t mono = clock_now_ms();
    buf_t am = BUF_INIT;
    int am_n = 0;
    buf_lit(&am, "[");
    for (size_t i = 0; i < n; i++) {
        const alert_info_t *a = &alerts[i];
        known_t *k = find_known(s, a);
        if ((uint64_t)(now - a->last_ms) >= s->resolve_after_ms) {
            if (!alert_remove_if_quiet(a->key, a->key_len, a->last_ms))
                continue; /* it fired again just now */
            if (k == NULL)
                notify(s, a, 0); /* fired and went quiet between two ticks */
            notify(s, a, 1);
            if (am_n++ > 0)
                buf_lit(&am, ",");
            am_alert(s, &am, a, now);
            if (k != NULL)
                forget_known(s, k);
            continue;
        }
        int is_new = k == NULL;
        if (is_new && (k = add_known(s, a)) == NULL)
            continue;
        if (is_new)
            notify(s, a, 0);
        if (is_new || mono - k->am_sent_ms >= s->repeat_ms) {
            if (am_n++ > 0)
                buf_lit(&am, ",");
            am_alert(s, &am, a, 0);
            k->am_sent_ms = mono;
        }
    }
    buf_lit(&am, "]");
    if (am_n > 0) /* Alertmanager: each URL gets it (a cluster de-duplicates) */
        for (size_t i = 0; i < s->n; i++)
            if (s->sink[i]->cfg.kind == SINK_ALERTMANAGER)
                enqueue(s->sink[i], &am);
    buf_free(&am);
    alert_snapshot_free(alerts, n);
}

static int all_idle(const sinks_t *s)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->sink[i]->inflight != NULL ||
            (s->sink[i]->head != NULL && s->sink[i]->undeliverable == NULL))
            return 0;
    return 1;
}

static void on_closed(uv_handle_t *h)
{
    sinks_t *s = h->data;
    if (s->done != NULL)
        s->done(s->done_arg);
}

static void on_tick(uv_timer_t *t)
{
    sinks_t *s = t->data;
    collect(s);
    for (size_t i = 0; i < s->n; i++)
        pump(s->sink[i]);
    if (s->closing && (all_idle(s) || clock_now_ms() >= s->close_by)) {
        for (size_t i = 0; i < s->n; i++) {
            if (s->sink[i]->inflight != NULL) {
                httpc_cancel(s->sink[i]->inflight);
                s->sink[i]->inflight = NULL;
            }
        }
        uv_close((uv_handle_t *)&s->tick, on_closed);
    }
}

/* ---- setting up ----------------------------------------------------------------- */

static char *dup_or_null(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

static int same_str(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static void sink_free(sink_t *k)
{
    if (k == NULL)
        return;
    if (k->inflight != NULL)
        httpc_cancel(k->inflight);
    while (k->head != NULL)
        pop(k);
    free(k->cfg.url);
    free(k->cfg.headers);
    free(k->cfg.routing_key);
    free(k);
}

static sink_t *sink_new(sinks_t *s, const policy_sink_t *c)
{
    sink_t *k = calloc(1, sizeof *k);
    if (k == NULL)
        return NULL;
    k->owner = s;
    k->cfg = *c;
    k->cfg.url = strdup(c->url);
    k->cfg.headers = dup_or_null(c->headers);
    k->cfg.routing_key = dup_or_null(c->routing_key);
    if (k->cfg.url == NULL || (c->headers && !k->cfg.headers) ||
        (c->routing_key && !k->cfg.routing_key)) {
        sink_free(k);
        return NULL;
    }
    k->tokens = c->rate_per_min < 10 ? 1 : c->rate_per_min / 10.0;
    k->refilled_ms = clock_now_ms();
    char url[1100];
    snprintf(url, sizeof url, "%s", c->url);
    if (c->kind == SINK_ALERTMANAGER) {
        size_t len = strlen(url);
        while (len > 0 && url[len - 1] == '/')
            url[--len] = '\0';
        snprintf(url + len, sizeof url - len, "/api/v2/alerts");
    }
    int rc = httpc_parse_url(url, &k->url);
    if (rc < 0) {
        k->undeliverable = "the URL is not a valid http:// or https:// URL";
    } else if (k->url.tls && k->owner->tls == NULL) {
        /* the system's CA store (SSL_CERT_FILE and SSL_CERT_DIR apply) */
        char err[256];
        k->owner->tls = tls_ctx_new(NULL, 0, err, sizeof err);
        if (k->owner->tls == NULL)
            k->undeliverable = "no TLS: the system's CA store could not be loaded";
    }
    if (k->undeliverable != NULL) {
        log_record_t *r = log_begin(LOG_WARN, "alert sink cannot be delivered to");
        log_str(r, "sink", KIND_NAME[c->kind]);
        log_str(r, "url", c->url);
        log_str(r, "reason", k->undeliverable);
        log_end(r);
    }
    return k;
}

/* Whether `k` delivers what `c` describes: same kind, place and identity. */
static int sink_is(const sink_t *k, const policy_sink_t *c)
{
    return k->cfg.kind == c->kind && strcmp(k->cfg.url, c->url) == 0 &&
           same_str(k->cfg.headers, c->headers) && same_str(k->cfg.routing_key, c->routing_key);
}

/* Starts the tick when there is a sink to deliver to, stops it otherwise. */
static void schedule(sinks_t *s)
{
    if (s->closing)
        return;
    if (s->n > 0 && !uv_is_active((uv_handle_t *)&s->tick))
        uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
    else if (s->n == 0)
        uv_timer_stop(&s->tick);
}

/* Tells a sink that joins about the alerts already firing. */
static void introduce(sinks_t *s, sink_t *k)
{
    alert_info_t *alerts;
    size_t n;
    if (k->cfg.kind == SINK_ALERTMANAGER || alert_snapshot(&alerts, &n) < 0)
        return; /* Alertmanager hears of them with the next repeat */
    buf_t b = BUF_INIT;
    for (size_t i = 0; i < n; i++) {
        if (find_known(s, &alerts[i]) == NULL)
            continue; /* new to everyone: the next tick announces it */
        notice(s, k, &alerts[i], 0, &b);
        enqueue(k, &b);
    }
    buf_free(&b);
    alert_snapshot_free(alerts, n);
}

int sinks_update(sinks_t *s, const policy_settings_t *settings)
{
    size_t n = settings->n_sinks;
    sink_t **next = calloc(n + 1, sizeof *next);
    unsigned char *kept = calloc(n + 1, 1);
    if (next == NULL || kept == NULL)
        goto nomem;
    /* first what can fail: the sinks that are new */
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < s->n && !kept[i]; j++)
            if (sink_is(s->sink[j], &settings->sinks[i]))
                kept[i] = 1;
        if (!kept[i] && (next[i] = sink_new(s, &settings->sinks[i])) == NULL)
            goto nomem;
    }
    /* then the ones kept move over, with their queues and counts */
    for (size_t i = 0; i < n; i++) {
        const policy_sink_t *c = &settings->sinks[i];
        for (size_t j = 0; kept[i] && next[i] == NULL && j < s->n; j++) {
            if (s->sink[j] != NULL && sink_is(s->sink[j], c)) {
                next[i] = s->sink[j];
                s->sink[j] = NULL;
                next[i]->cfg.rate_per_min = c->rate_per_min;
                next[i]->cfg.queue = c->queue;
                next[i]->cfg.timeout_ms = c->timeout_ms;
            }
        }
        if (next[i] == NULL) /* the same sink listed twice: a second one */
            next[i] = sink_new(s, c);
        if (next[i] != NULL && !kept[i])
            introduce(s, next[i]);
    }
    for (size_t j = 0; j < s->n; j++) {
        sink_t *k = s->sink[j];
        if (k != NULL && k->queued > 0) {
            log_record_t *r = log_begin(LOG_WARN, "alert sink removed; its queue is dropped");
            log_str(r, "sink", KIND_NAME[k->cfg.kind]);
            log_str(r, "url", k->cfg.url);
            log_int(r, "dropped", k->queued);
            log_end(r);
        }
        sink_free(k);
    }
    free(s->sink);
    free(kept);
    s->sink = next;
    s->n = 0;
    for (size_t i = 0; i < n; i++) /* drops a second copy that found no memory */
        if (next[i] != NULL)
            next[s->n++] = next[i];
    s->resolve_after_ms = settings->resolve_after_ms;
    s->repeat_ms = settings->repeat_ms;
    schedule(s);
    return 0;

nomem:
    for (size_t i = 0; next != NULL && kept != NULL && i < n; i++)
        if (!kept[i])
            sink_free(next[i]);
    free(next);
    free(kept);
    return -ENOMEM;
}

sinks_t *sinks_new(uv_loop_t *loop, const policy_settings_t *settings, const char *upstream,
                   const char *generator_url)
{
    sinks_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->loop = loop;
    s->upstream = strdup(upstream);
    s->generator_url = dup_or_null(generator_url);
    uv_timer_init(loop, &s->tick);
    s->tick.data = s;
    if (s->upstream == NULL || (generator_url != NULL && s->generator_url == NULL) ||
        sinks_update(s, settings) < 0) {
        sinks_free(s);
        return NULL;
    }
    return s;
}

void sinks_state_json(sinks_t *s, buf_t *out)
{
    alert_info_t *alerts = NULL;
    size_t n = 0;
    alert_snapshot(&alerts, &n);
    buf_lit(out, "{\"alerts\":[");
    for (size_t i = 0; i < n; i++) {
        const alert_info_t *a = &alerts[i];
        buf_puts(out, i ? ",{" : "{");
        json_alert_fields(out, a);
        buf_lit(out, ",\"state\":\"firing\"}");
    }
    alert_snapshot_free(alerts, n);
    buf_lit(out, "],\"sinks\":[");
    for (size_t i = 0; s != NULL && i < s->n; i++) {
        const sink_t *k = s->sink[i];
        const char *state = k->undeliverable != NULL                      ? "undeliverable"
                            : k->last_status >= 200 && k->last_status < 300 ? "ok"
                            : k->sent == 0 && k->failed == 0                ? "idle"
                                                                            : "failing";
        buf_printf(out, "%s{\"kind\":\"%s\",\"url\":", i ? "," : "", KIND_NAME[k->cfg.kind]);
        json_str(out, k->cfg.url);
        buf_printf(out,
                   ",\"state\":\"%s\",\"queued\":%d,\"sent\":%llu,\"failed\":%llu,"
                   "\"dropped\":%llu,\"last_status\":%d,\"last_error\":",
                   state, k->queued, (unsigned long long)k->sent, (unsigned long long)k->failed,
                   (unsigned long long)k->dropped, k->last_status);
        json_str(out, k->undeliverable != NULL ? k->undeliverable : k->last_error);
        buf_lit(out, "}");
    }
    buf_lit(out, "]}\n");
}

void sinks_metrics(sinks_t *s, buf_t *out)
{
    static const char *const result[] = {"sent", "failed", "dropped"};
    metrics_family(out, "errord_alert_deliveries_total", "counter",
                   "Deliveries to the alert sinks of settings.alerts (sink: its position there, "
                   "from 1), by result: sent, failed (and retried), dropped (queue full, too "
                   "many tries, or undeliverable).");
    for (size_t i = 0; s != NULL && i < s->n; i++) {
        const sink_t *k = s->sink[i];
        const uint64_t n[] = {k->sent, k->failed, k->dropped};
        for (int r = 0; r < 3; r++)
            buf_printf(out, "errord_alert_deliveries_total{sink=\"%zu\",kind=\"%s\",result=\"%s\"} %llu\n",
                       i + 1, KIND_NAME[k->cfg.kind], result[r], (unsigned long long)n[r]);
    }
    metrics_family(out, "errord_alert_queue", "gauge", "Deliveries waiting, by sink.");
    for (size_t i = 0; s != NULL && i < s->n; i++)
        buf_printf(out, "errord_alert_queue{sink=\"%zu\",kind=\"%s\"} %d\n", i + 1,
                   KIND_NAME[s->sink[i]->cfg.kind], s->sink[i]->queued);
}

void sinks_close(sinks_t *s, uint64_t timeout_ms, void (*done)(void *arg), void *arg)
{
    s->closing = 1;
    s->close_by = clock_now_ms() + timeout_ms;
    s->done = done;
    s->done_arg = arg;
    uv_timer_start(&s->tick, on_tick, 0, TICK_MS / 4); /* at once, then briskly */
}

void sinks_free(sinks_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->n; i++)
        sink_free(s->sink[i]);
    for (size_t i = 0; i < s->n_known; i++)
        free(s->known[i].key);
    free(s->known);
    free(s->sink);
    free(s->upstream);
    free(s->generator_url);
    tls_ctx_free(s->tls);
    free(s);
}
