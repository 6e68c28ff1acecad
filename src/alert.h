/* alert: the table of firing alerts, shared by every worker and kept across
 * policy reloads. A policy's alert{} lands here, de-duplicated by name and
 * labels: the same alert again only counts up and refreshes its summary.
 * (Delivery to Alertmanager and the other sinks reads this table.) */
#ifndef ERRORD_ALERT_H
#define ERRORD_ALERT_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *key;
    const char *value;
} alert_label_t;

typedef struct {
    const char *name;
    const char *severity;
    const char *summary;
    const alert_label_t *labels; /* sorted by key, keys unique */
    size_t n_labels;
} alert_event_t;

/* Records one occurrence at `now_ms` (wall clock). Returns how many times
 * this alert (name + labels) has fired so far, or -1 when out of memory.
 * Thread-safe. */
int64_t alert_fire(const alert_event_t *ev, int64_t now_ms);

/* How many times alert_fire() was called. Thread-safe. */
uint64_t alert_events(void);

/* How many distinct alerts are in the table. Thread-safe. */
size_t alert_count(void);

/* A copy of one alert, for the sinks and the admin port. */
typedef struct {
    char *key; /* identity: name and labels */
    size_t key_len;
    char *name;
    char *severity;
    char *summary;
    alert_label_t *labels; /* owned copies */
    size_t n_labels;
    int64_t count;
    int64_t first_ms; /* wall clock */
    int64_t last_ms;
} alert_info_t;

/* Copies every alert in the table into *out (an array of *n, freed with
 * alert_snapshot_free()). Returns 0 or -ENOMEM. Thread-safe. */
int alert_snapshot(alert_info_t **out, size_t *n);

/* Frees the `n` copies at `a` that alert_snapshot() made. NULL is fine. */
void alert_snapshot_free(alert_info_t *a, size_t n);

/* Removes the alert `key` if it has had no event since `last_ms` (it is
 * resolved); returns 1 when removed. Thread-safe. */
int alert_remove_if_quiet(const char *key, size_t len, int64_t last_ms);

/* Forgets every alert (for tests). */
void alert_reset(void);

#endif
