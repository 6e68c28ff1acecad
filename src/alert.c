/* alert: the table of firing alerts (see alert.h). */
#include "alert.h"

#include "buf.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct alert_s {
    struct alert_s *next;
    char *key; /* name, then each label as "\0k\0v" */
    size_t key_len;
    char *name;
    char *severity;
    char *summary;
    alert_label_t *labels;
    size_t n_labels;
    int64_t count;
    int64_t first_ms;
    int64_t last_ms;
} alert_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static alert_t *alerts;
static size_t n_alerts;

static int set_str(char **field, const char *value)
{
    char *s = strdup(value ? value : "");
    if (s == NULL)
        return -1;
    free(*field);
    *field = s;
    return 0;
}

static void free_labels(alert_label_t *l, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free((char *)l[i].key);
        free((char *)l[i].value);
    }
    free(l);
}

static alert_label_t *copy_labels(const alert_label_t *l, size_t n)
{
    alert_label_t *out = calloc(n + 1, sizeof *out);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        out[i].key = strdup(l[i].key);
        out[i].value = strdup(l[i].value);
        if (out[i].key == NULL || out[i].value == NULL) {
            free_labels(out, i + 1);
            return NULL;
        }
    }
    return out;
}

static void alert_free(alert_t *a)
{
    free_labels(a->labels, a->n_labels);
    free(a->key);
    free(a->name);
    free(a->severity);
    free(a->summary);
    free(a);
}

static atomic_uint_fast64_t events;

uint64_t alert_events(void)
{
    return atomic_load_explicit(&events, memory_order_relaxed);
}

int64_t alert_fire(const alert_event_t *ev, int64_t now_ms)
{
    atomic_fetch_add_explicit(&events, 1, memory_order_relaxed);
    buf_t key = BUF_INIT;
    buf_append(&key, ev->name, strlen(ev->name));
    for (size_t i = 0; i < ev->n_labels; i++) {
        buf_append(&key, "", 1);
        buf_puts(&key, ev->labels[i].key);
        buf_append(&key, "", 1);
        buf_puts(&key, ev->labels[i].value);
    }
    int64_t count = -1;
    pthread_mutex_lock(&lock);
    alert_t *a = alerts;
    while (a != NULL && (a->key_len != key.len || memcmp(a->key, key.data, key.len) != 0))
        a = a->next;
    if (a == NULL) {
        a = calloc(1, sizeof *a);
        if (a == NULL || set_str(&a->name, ev->name) < 0 ||
            (a->labels = copy_labels(ev->labels, ev->n_labels)) == NULL) {
            if (a != NULL)
                alert_free(a);
            goto out;
        }
        a->n_labels = ev->n_labels;
        a->key = key.data;
        a->key_len = key.len;
        key = (buf_t)BUF_INIT;
        a->first_ms = now_ms;
        a->next = alerts;
        alerts = a;
        n_alerts++;
    }
    set_str(&a->severity, ev->severity);
    set_str(&a->summary, ev->summary);
    a->last_ms = now_ms;
    count = ++a->count;
out:
    pthread_mutex_unlock(&lock);
    buf_free(&key);
    return count;
}

size_t alert_count(void)
{
    pthread_mutex_lock(&lock);
    size_t n = n_alerts;
    pthread_mutex_unlock(&lock);
    return n;
}

static int info_of(const alert_t *a, alert_info_t *out)
{
    memset(out, 0, sizeof *out);
    out->key = malloc(a->key_len);
    out->name = strdup(a->name);
    out->severity = strdup(a->severity ? a->severity : "");
    out->summary = strdup(a->summary ? a->summary : "");
    out->labels = copy_labels(a->labels, a->n_labels);
    if (out->key == NULL || out->name == NULL || out->severity == NULL || out->summary == NULL ||
        out->labels == NULL)
        return -1;
    memcpy(out->key, a->key, a->key_len);
    out->key_len = a->key_len;
    out->n_labels = a->n_labels;
    out->count = a->count;
    out->first_ms = a->first_ms;
    out->last_ms = a->last_ms;
    return 0;
}

void alert_snapshot_free(alert_info_t *a, size_t n)
{
    for (size_t i = 0; i < n && a != NULL; i++) {
        free(a[i].key);
        free(a[i].name);
        free(a[i].severity);
        free(a[i].summary);
        free_labels(a[i].labels, a[i].n_labels);
    }
    free(a);
}

int alert_snapshot(alert_info_t **out, size_t *n)
{
    int rc = 0;
    pthread_mutex_lock(&lock);
    alert_info_t *arr = calloc(n_alerts + 1, sizeof *arr);
    size_t i = 0;
    for (alert_t *a = alerts; arr != NULL && a != NULL; a = a->next, i++) {
        if (info_of(a, &arr[i]) < 0) {
            alert_snapshot_free(arr, i + 1);
            arr = NULL;
        }
    }
    pthread_mutex_unlock(&lock);
    if (arr == NULL) {
        rc = -12; /* -ENOMEM */
        i = 0;
    }
    *out = arr;
    *n = i;
    return rc;
}

int alert_remove_if_quiet(const char *key, size_t len, int64_t last_ms)
{
    int removed = 0;
    pthread_mutex_lock(&lock);
    for (alert_t **pp = &alerts; *pp != NULL; pp = &(*pp)->next) {
        alert_t *a = *pp;
        if (a->key_len == len && memcmp(a->key, key, len) == 0) {
            if (a->last_ms == last_ms) {
                *pp = a->next;
                alert_free(a);
                n_alerts--;
                removed = 1;
            }
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return removed;
}

void alert_reset(void)
{
    pthread_mutex_lock(&lock);
    while (alerts != NULL) {
        alert_t *a = alerts;
        alerts = a->next;
        alert_free(a);
    }
    n_alerts = 0;
    pthread_mutex_unlock(&lock);
}
