/* sink: delivers the alert table to the sinks (see sink.h). */
#include "sink.h"

#include "alert.h"
#include "clock.h"
#include "httpc.h"
#include "json.h"
#include "log.h"
#include "metrics.h"

#include <errno.h>
#include <stdio.h>
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

static int reserved_label(const char *k)
{
    return strcmp(k, "alertname") == 0 || strcmp(k, "severity") == 0 ||
           strcmp(k, "upstream") == 0;
}

/* Adds the alert's own labels to `obj`, but those errord sets itself when
 * `skip_reserved`. */
static void add_labels(cJSON *obj, const alert_info_t *a, int skip_reserved)
{
    for (size_t i = 0; i < a->n_labels; i++)
        if (!skip_reserved || !reserved_label(a->labels[i].key))
            json_add(obj, a->labels[i].key, json_str(a->labels[i].value));
}

static cJSON *labels_object(const alert_info_t *a)
{
    cJSON *labels = cJSON_CreateObject();
    add_labels(labels, a, 0);
    return labels;
}

/* "name": ... "last_seen": ... of an alert, for payloads and /alerts. */
static void add_alert_fields(cJSON *obj, const alert_info_t *a)
{
    json_add(obj, "name", json_str(a->name));
    json_add(obj, "severity", json_str(a->severity));
    json_add(obj, "summary", json_str(a->summary));
    json_add(obj, "labels", labels_object(a));
    json_add(obj, "count", cJSON_CreateNumber((double)a->count));
    json_add(obj, "first_seen", json_time(a->first_ms));
    json_add(obj, "last_seen", json_time(a->last_ms));
}

/* One alert in Alertmanager's API v2 shape. */
static cJSON *am_alert(const sinks_t *s, const alert_info_t *a, int64_t ends_ms)
{
    cJSON *alert = cJSON_CreateObject();
    cJSON *labels = cJSON_CreateObject();
    json_add(labels, "alertname", json_str(a->name));
    json_add(labels, "severity", json_str(a->severity));
    json_add(labels, "upstream", json_str(s->upstream));
    add_labels(labels, a, 1);
    json_add(alert, "labels", labels);
    cJSON *annotations = cJSON_CreateObject();
    char count[24];
    snprintf(count, sizeof count, "%lld", (long long)a->count);
    json_add(annotations, "summary", json_str(a->summary));
    json_add(annotations, "count", json_str(count));
    json_add(alert, "annotations", annotations);
    json_add(alert, "startsAt", json_time(a->first_ms));
    if (ends_ms > 0)
        json_add(alert, "endsAt", json_time(ends_ms));
    if (s->generator_url != NULL)
        json_add(alert, "generatorURL", json_str(s->generator_url));
    return alert;
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

static cJSON *pagerduty_event(const sink_t *k, const alert_info_t *a, int resolved)
{
    cJSON *event = cJSON_CreateObject();
    char key[40];
    dedup_key(a, key);
    json_add(event, "routing_key", json_str(k->cfg.routing_key));
    json_add(event, "event_action", json_str(resolved ? "resolve" : "trigger"));
    json_add(event, "dedup_key", json_str(key));
    if (resolved)
        return event;
    cJSON *payload = cJSON_CreateObject();
    json_add(payload, "summary", json_printf("%s: %s", a->name, a->summary));
    json_add(payload, "source", json_str(k->owner->upstream));
    json_add(payload, "severity", json_str(pagerduty_severity(a->severity)));
    cJSON *details = cJSON_CreateObject();
    json_add(details, "count", cJSON_CreateNumber((double)a->count));
    json_add(details, "labels", labels_object(a));
    json_add(payload, "custom_details", details);
    json_add(event, "payload", payload);
    return event;
}

/* The notice of a new or resolved alert for a webhook, Slack or PagerDuty
 * (NULL for Alertmanager, which gets the batch of collect()). */
static cJSON *notice(const sinks_t *s, const sink_t *k, const alert_info_t *a, int resolved)
{
    cJSON *body = NULL;
    switch (k->cfg.kind) {
    case SINK_WEBHOOK:
        body = cJSON_CreateObject();
        json_add(body, "status", json_str(resolved ? "resolved" : "firing"));
        add_alert_fields(body, a);
        json_add(body, "upstream", json_str(s->upstream));
        break;
    case SINK_SLACK:
        body = cJSON_CreateObject();
        json_add(body, "text",
                 json_printf("[%s] %s (%s): %s (%lld times, upstream %s)",
                             resolved ? "RESOLVED" : "FIRING", a->name, a->severity, a->summary,
                             (long long)a->count, s->upstream));
        break;
    case SINK_PAGERDUTY:
        body = pagerduty_event(k, a, resolved);
        break;
    case SINK_ALERTMANAGER:
        break;
    }
    return body;
}

/* Queues the tree `body` (deleted here) for `k`; a body that does not
 * render for want of memory counts as dropped. */
static void enqueue_json(sink_t *k, cJSON *body)
{
    buf_t b = BUF_INIT;
    if (json_render(body, &b) < 0)
        k->dropped++;
    else
        enqueue(k, &b);
    buf_free(&b);
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
    for (size_t i = 0; i < s->n; i++)
        if (s->sink[i]->cfg.kind != SINK_ALERTMANAGER) /* it gets the batch of collect() */
            enqueue_json(s->sink[i], notice(s, s->sink[i], a, resolved));
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
    cJSON *am = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) {
        const alert_info_t *a = &alerts[i];
        known_t *k = find_known(s, a);
        if ((uint64_t)(now - a->last_ms) >= s->resolve_after_ms) {
            if (!alert_remove_if_quiet(a->key, a->key_len, a->last_ms))
                continue; /* it fired again just now */
            if (k == NULL)
                notify(s, a, 0); /* fired and went quiet between two ticks */
            notify(s, a, 1);
            json_push(am, am_alert(s, a, now));
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
            json_push(am, am_alert(s, a, 0));
            k->am_sent_ms = mono;
        }
    }
    if (cJSON_GetArraySize(am) > 0) { /* Alertmanager: each URL gets it (a cluster de-duplicates) */
        buf_t batch = BUF_INIT;
        int rendered = json_render(am, &batch);
        for (size_t i = 0; i < s->n; i++) {
            if (s->sink[i]->cfg.kind != SINK_ALERTMANAGER)
                continue;
            if (rendered < 0)
                s->sink[i]->dropped++;
            else
                enqueue(s->sink[i], &batch);
        }
        buf_free(&batch);
    } else {
        cJSON_Delete(am);
    }
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
    for (size_t i = 0; i < n; i++)
        if (find_known(s, &alerts[i]) != NULL) /* else new to all: the next tick announces it */
            enqueue_json(k, notice(s, k, &alerts[i], 0));
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

static const char *sink_state(const sink_t *k)
{
    if (k->undeliverable != NULL)
        return "undeliverable";
    if (k->last_status >= 200 && k->last_status < 300)
        return "ok";
    return k->sent == 0 && k->failed == 0 ? "idle" : "failing";
}

static cJSON *sink_json(const sink_t *k)
{
    cJSON *obj = cJSON_CreateObject();
    json_add(obj, "kind", json_str(KIND_NAME[k->cfg.kind]));
    json_add(obj, "url", json_str(k->cfg.url));
    json_add(obj, "state", json_str(sink_state(k)));
    json_add(obj, "queued", cJSON_CreateNumber(k->queued));
    json_add(obj, "sent", cJSON_CreateNumber((double)k->sent));
    json_add(obj, "failed", cJSON_CreateNumber((double)k->failed));
    json_add(obj, "dropped", cJSON_CreateNumber((double)k->dropped));
    json_add(obj, "last_status", cJSON_CreateNumber(k->last_status));
    json_add(obj, "last_error",
             json_str(k->undeliverable != NULL ? k->undeliverable : k->last_error));
    return obj;
}

int sinks_state_json(sinks_t *s, buf_t *out)
{
    alert_info_t *alerts = NULL;
    size_t n = 0;
    alert_snapshot(&alerts, &n);
    cJSON *state = cJSON_CreateObject();
    cJSON *list = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) {
        cJSON *alert = cJSON_CreateObject();
        add_alert_fields(alert, &alerts[i]);
        json_add(alert, "state", json_str("firing"));
        json_push(list, alert);
    }
    alert_snapshot_free(alerts, n);
    json_add(state, "alerts", list);
    list = cJSON_CreateArray();
    for (size_t i = 0; s != NULL && i < s->n; i++)
        json_push(list, sink_json(s->sink[i]));
    json_add(state, "sinks", list);
    return json_render(state, out);
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
