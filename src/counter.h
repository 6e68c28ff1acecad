/* counter: sliding-window event counts, shared by every worker and kept
 * across policy reloads (what errord.count() reads and writes). */
#ifndef ERRORD_COUNTER_H
#define ERRORD_COUNTER_H

#include <stddef.h>
#include <stdint.h>

/* The longest window a count may look back over, in seconds. */
#define COUNTER_MAX_WINDOW 3600
/* Keys kept at most; past it, new keys count only their own event. */
#define COUNTER_MAX_KEYS 10000

/* Adds one event for `key` at `now_ms` (wall clock) and returns the events of
 * the last `seconds` seconds, this one included: second by second for windows
 * up to 60 s, whole minutes for longer ones (`seconds` is clamped to
 * 1..COUNTER_MAX_WINDOW). Thread-safe. */
int64_t counter_hit(const char *key, size_t len, int seconds, int64_t now_ms);

/* Reads the count without adding an event. */
int64_t counter_peek(const char *key, size_t len, int seconds, int64_t now_ms);

/* Forgets every key (for tests). */
void counter_reset(void);

#endif
