/* log: JSON lines on stdout, one record per line, with levels.
 *
 * A record is built field by field and written whole:
 *
 *     log_record_t *r = log_begin(LOG_WARN, "upstream connect failed");
 *     log_str(r, "error", uv_strerror(rc));
 *     log_end(r);
 *
 * log_begin() returns NULL when the level is filtered out; every other call
 * accepts NULL and does nothing, so callers need no checks. Records are
 * buffered per thread; an event loop calls log_flush() once per iteration,
 * anything else gets its record written at log_end(). */
#ifndef ERRORD_LOG_H
#define ERRORD_LOG_H

#include <stddef.h>
#include <stdint.h>

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level_t;

typedef struct log_record_s log_record_t;

/* Sets the lowest level written. */
void log_set_level(log_level_t level);

/* Parses "debug", "info", "warn" or "error". Returns 0, or -EINVAL. */
int log_level_parse(const char *s, log_level_t *level);

/* Starts a record with "time", "level" and "msg" (when msg is not NULL). */
log_record_t *log_begin(log_level_t level, const char *msg);

/* Each appends the field `key` (escaped: a policy chooses keys too) to the
 * record `r` (NULL: nothing): a string (NULL is written as null), `n`
 * bytes of one, an integer. */
void log_str(log_record_t *r, const char *key, const char *value);
void log_strn(log_record_t *r, const char *key, const char *value, size_t n);
void log_int(log_record_t *r, const char *key, int64_t value);
/* `ns` nanoseconds as milliseconds with three decimals. */
void log_ms(log_record_t *r, const char *key, uint64_t ns);
/* true or false. */
void log_bool(log_record_t *r, const char *key, int value);
/* Appends `json`, already-encoded JSON text, as the value of `key`. */
void log_raw(log_record_t *r, const char *key, const char *json, size_t n);

/* The same for a key errord chose itself, encoded by the compiler: pass
 * LOG_KEY("name") for `k, k_len` (the access record's path writes a dozen
 * of them per request; no strlen, no escaping). */
#define LOG_KEY(name) ",\"" name "\":", sizeof(",\"" name "\":") - 1
void log_kstr(log_record_t *r, const char *k, size_t k_len, const char *value, size_t n);
void log_kint(log_record_t *r, const char *k, size_t k_len, int64_t value);
void log_kms(log_record_t *r, const char *k, size_t k_len, uint64_t ns);
void log_kraw(log_record_t *r, const char *k, size_t k_len, const char *json, size_t n);

/* Finishes the record and queues it (or writes it, outside a loop). */
void log_end(log_record_t *r);

/* Convenience: one record with only a printf-formatted message. */
void log_msgf(log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Tells the calling thread whether it runs an event loop that flushes. */
void log_set_buffered(int buffered);

/* Writes out the calling thread's queued records. */
void log_flush(void);

#endif
