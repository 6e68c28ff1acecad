/* counter: sliding-window event counts (see counter.h).
 *
 * Each key has a ring of per-second buckets; a count sums the buckets of the
 * window. Keys live in an open-addressing hash table behind one mutex: the
 * policy calls this a few times per non-2xx response, far from a hot lock. */
#include "counter.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *key;
    size_t len;
    uint32_t *buckets; /* ring of `cap` seconds */
    int cap;
    int64_t last_sec; /* the second the newest bucket holds */
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

/* Makes the ring cover `seconds` and clears the buckets that fell out of it. */
static int advance(entry_t *e, int seconds, int64_t now_sec)
{
    if (e->cap < seconds) {
        int cap = e->cap ? e->cap : 8;
        while (cap < seconds)
            cap *= 2;
        uint32_t *b = calloc((size_t)cap, sizeof *b);
        if (b == NULL)
            return -1;
        /* keep what the old ring held, at its seconds' new places */
        for (int k = 0; k < e->cap; k++) {
            int64_t sec = e->last_sec - k;
            b[sec % cap] = e->buckets[sec % e->cap];
        }
        free(e->buckets);
        e->buckets = b;
        e->cap = cap;
    }
    if (now_sec > e->last_sec) {
        int64_t gap = now_sec - e->last_sec;
        for (int64_t k = 1; k <= gap && k <= e->cap; k++)
            e->buckets[(e->last_sec + k) % e->cap] = 0;
        e->last_sec = now_sec;
    }
    return 0;
}

static int64_t sum(const entry_t *e, int seconds, int64_t now_sec)
{
    int64_t total = 0;
    for (int k = 0; k < seconds && k < e->cap; k++) {
        int64_t sec = now_sec - k;
        if (sec > e->last_sec || sec < 0)
            continue;
        total += e->buckets[sec % e->cap];
    }
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
    if (e != NULL && advance(e, seconds, now_sec) == 0) {
        e->buckets[now_sec % e->cap]++;
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
    if (e != NULL && now_sec >= e->last_sec)
        n = sum(e, seconds, now_sec);
    pthread_mutex_unlock(&lock);
    return n;
}

void counter_reset(void)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < table_cap; i++) {
        free(table[i].key);
        free(table[i].buckets);
    }
    free(table);
    table = NULL;
    table_cap = n_keys = 0;
    pthread_mutex_unlock(&lock);
}
