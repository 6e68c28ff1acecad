/* alert: the table of firing alerts (see alert.h). */
#include "alert.h"

#include "buf.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct alert_s {
    struct alert_s *next;
    char *key; /* name, then each label as "\0k\0v" */
    size_t key_len;
    char *name;
    char *severity;
    char *summary;
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

static void alert_free(alert_t *a)
{
    free(a->key);
    free(a->name);
    free(a->severity);
    free(a->summary);
    free(a);
}

int64_t alert_fire(const alert_event_t *ev, int64_t now_ms)
{
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
        if (a == NULL || set_str(&a->name, ev->name) < 0) {
            if (a != NULL)
                alert_free(a);
            goto out;
        }
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
