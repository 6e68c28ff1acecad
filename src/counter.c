/* counter: sliding-window event counts (see counter.h).
 *
 * Each key has a ring of per-second buckets for the last minute and one of
 * per-minute buckets for the last hour; a count sums the buckets of the
 * window (1 s resolution up to 60 s, whole minutes beyond). Keys live in an open-addressing hash table behind one mutex: the
 * policy calls this a few times per non-2xx response, far from a hot lock. */
#include "counter.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Seconds are kept for a minute, minutes for an hour. */
#define SECONDS 64
#define MINUTES 64

typedef struct {
    char *key;
    size_t len;
    uint32_t sec[SECONDS]; /* ring: events in each second */
    uint32_t min[MINUTES]; /* ring: events in each minute */
    int64_t last_sec;      /* the newest second the rings hold */
} entry_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static entry_t *table;
static size_t table_cap; /* a power of two */
static size_t n_keys;

static uint64_t hash(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static int grow(void)
{
    size_t cap = table_cap ? table_cap * 2 : 64;
    entry_t *t = calloc(cap, sizeof *t);
    if (t == NULL)
        return -1;
    for (size_t i = 0; i < table_cap; i++) {
        if (table[i].key == NULL)
            continue;
        size_t j = hash(table[i].key, table[i].len) & (cap - 1);
        while (t[j].key != NULL)
            j = (j + 1) & (cap - 1);
        t[j] = table[i];
    }
    free(table);
    table = t;
    table_cap = cap;
    return 0;
}

/* The entry of `key`, created when `create`; NULL when absent or full. */
static entry_t *find(const char *key, size_t len, int create)
{
    if (table_cap == 0 && (!create || grow() < 0))
        return NULL;
    size_t i = hash(key, len) & (table_cap - 1);
    while (table[i].key != NULL) {
        if (table[i].len == len && memcmp(table[i].key, key, len) == 0)
            return &table[i];
        i = (i + 1) & (table_cap - 1);
    }
    if (!create || n_keys >= COUNTER_MAX_KEYS)
        return NULL;
    if ((n_keys + 1) * 2 > table_cap) {
        if (grow() < 0)
            return NULL;
        return find(key, len, create);
    }
    entry_t *e = &table[i];
    e->key = malloc(len + 1);
    if (e->key == NULL)
        return NULL;
    memcpy(e->key, key, len);
    e->key[len] = '\0';
    e->len = len;
    n_keys++;
    return e;
}

/* Moves the rings forward to `now_sec`, clearing what fell out of them. */
static void advance(entry_t *e, int64_t now_sec)
{
    if (now_sec <= e->last_sec)
        return;
    for (int64_t t = e->last_sec + 1; t <= now_sec && t <= e->last_sec + SECONDS; t++)
        e->sec[t % SECONDS] = 0;
    int64_t last_min = e->last_sec / 60, now_min = now_sec / 60;
    for (int64_t m = last_min + 1; m <= now_min && m <= last_min + MINUTES; m++)
        e->min[m % MINUTES] = 0;
    e->last_sec = now_sec;
}

/* Events in the last `seconds` up to `now_sec`: second by second up to a
 * minute, whole minutes beyond. */
static int64_t sum(const entry_t *e, int seconds, int64_t now_sec)
{
    int64_t total = 0;
    if (now_sec > e->last_sec + 3600 || now_sec < 0)
        return 0;
    if (seconds <= 60) {
        for (int64_t t = now_sec - seconds + 1; t <= now_sec; t++)
            if (t <= e->last_sec && t > e->last_sec - SECONDS && t >= 0)
                total += e->sec[t % SECONDS];
        return total;
    }
    int64_t last_min = e->last_sec / 60;
    for (int64_t m = (now_sec - seconds + 1) / 60; m <= now_sec / 60; m++)
        if (m <= last_min && m > last_min - MINUTES && m >= 0)
            total += e->min[m % MINUTES];
    return total;
}

static int clamp(int seconds)
{
    return seconds < 1 ? 1 : seconds > COUNTER_MAX_WINDOW ? COUNTER_MAX_WINDOW : seconds;
}

int64_t counter_hit(const char *key, size_t len, int seconds, int64_t now_ms)
{
    int64_t now_sec = now_ms / 1000, n = 1;
    seconds = clamp(seconds);
    pthread_mutex_lock(&lock);
    entry_t *e = find(key, len, 1);
    if (e != NULL) {
        advance(e, now_sec);
        if (now_sec == e->last_sec) { /* a clock that went back counts nothing */
            e->sec[now_sec % SECONDS]++;
            e->min[(now_sec / 60) % MINUTES]++;
        }
        n = sum(e, seconds, now_sec);
    }
    pthread_mutex_unlock(&lock);
    return n;
}

int64_t counter_peek(const char *key, size_t len, int seconds, int64_t now_ms)
{
    int64_t now_sec = now_ms / 1000, n = 0;
    seconds = clamp(seconds);
    pthread_mutex_lock(&lock);
    entry_t *e = find(key, len, 0);
    if (e != NULL)
        n = sum(e, seconds, now_sec);
    pthread_mutex_unlock(&lock);
    return n;
}

void counter_reset(void)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < table_cap; i++)
        free(table[i].key);
    free(table);
    table = NULL;
    table_cap = n_keys = 0;
    pthread_mutex_unlock(&lock);
}
