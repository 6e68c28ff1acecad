/* log: JSON lines on stdout, one record per line, with levels. */
#include "log.h"

#include "buf.h"
#include "clock.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Queued records are written once this many bytes are waiting. */
#define LOG_FLUSH_AT (64 * 1024)

struct log_record_s {
    buf_t *out;
    size_t start; /* where this record begins in `out`, to undo on failure */
};

static const char *const LEVEL_NAME[] = {"debug", "info", "warn", "error"};
static log_level_t min_level = LOG_INFO;
static _Thread_local buf_t pending;
static _Thread_local int buffered;
static _Thread_local log_record_t current;

void log_set_level(log_level_t level)
{
    min_level = level;
}

int log_level_parse(const char *s, log_level_t *level)
{
    for (int i = LOG_DEBUG; i <= LOG_ERROR; i++) {
        if (strcmp(s, LEVEL_NAME[i]) == 0) {
            *level = (log_level_t)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* RFC 3339 time with milliseconds; the part up to the second is formatted
 * once a second. */
static void put_time(buf_t *b)
{
    static _Thread_local int64_t cached_sec = -1;
    static _Thread_local char prefix[32];
    static _Thread_local size_t prefix_len;
    int64_t ms = clock_wall_ms();
    if (ms / 1000 != cached_sec) {
        cached_sec = ms / 1000;
        prefix_len = (size_t)clock_rfc3339(cached_sec * 1000, prefix) - 4; /* drop "000Z" */
    }
    char frac[4] = {(char)('0' + ms / 100 % 10), (char)('0' + ms / 10 % 10),
                    (char)('0' + ms % 10), 'Z'};
    buf_append(b, prefix, prefix_len);
    buf_append(b, frac, 4);
}

log_record_t *log_begin(log_level_t level, const char *msg)
{
    if (level < min_level)
        return NULL;
    current.out = &pending;
    current.start = pending.len;
    buf_lit(&pending, "{\"time\":\"");
    put_time(&pending);
    buf_lit(&pending, "\",\"level\":\"");
    buf_puts(&pending, LEVEL_NAME[level]);
    buf_lit(&pending, "\"");
    if (msg != NULL)
        log_str(&current, "msg", msg);
    return &current;
}

static void key(log_record_t *r, const char *k)
{
    buf_lit(r->out, ",\"");
    buf_json_escape(r->out, k, strlen(k)); /* policies choose keys too */
    buf_lit(r->out, "\":");
}

static void put_str(log_record_t *r, const char *value, size_t n)
{
    if (value == NULL) {
        buf_lit(r->out, "null");
        return;
    }
    buf_lit(r->out, "\"");
    buf_json_escape(r->out, value, n);
    buf_lit(r->out, "\"");
}

static void put_int(log_record_t *r, int64_t value)
{
    if (value < 0) {
        buf_append(r->out, "-", 1);
        buf_put_u64(r->out, (uint64_t)0 - (uint64_t)value);
    } else {
        buf_put_u64(r->out, (uint64_t)value);
    }
}

void log_strn(log_record_t *r, const char *k, const char *value, size_t n)
{
    if (r == NULL)
        return;
    key(r, k);
    put_str(r, value, n);
}

void log_str(log_record_t *r, const char *k, const char *value)
{
    log_strn(r, k, value, value ? strlen(value) : 0);
}

void log_int(log_record_t *r, const char *k, int64_t value)
{
    if (r == NULL)
        return;
    key(r, k);
    put_int(r, value);
}

void log_ms(log_record_t *r, const char *k, uint64_t ns)
{
    if (r == NULL)
        return;
    key(r, k);
    buf_put_ms(r->out, ns);
}

void log_kstr(log_record_t *r, const char *k, size_t k_len, const char *value, size_t n)
{
    if (r == NULL)
        return;
    buf_append(r->out, k, k_len);
    put_str(r, value, n);
}

void log_kint(log_record_t *r, const char *k, size_t k_len, int64_t value)
{
    if (r == NULL)
        return;
    buf_append(r->out, k, k_len);
    put_int(r, value);
}

void log_kms(log_record_t *r, const char *k, size_t k_len, uint64_t ns)
{
    if (r == NULL)
        return;
    buf_append(r->out, k, k_len);
    buf_put_ms(r->out, ns);
}

void log_kraw(log_record_t *r, const char *k, size_t k_len, const char *json, size_t n)
{
    if (r == NULL)
        return;
    buf_append(r->out, k, k_len);
    buf_append(r->out, json, n);
}

void log_bool(log_record_t *r, const char *k, int value)
{
    if (r == NULL)
        return;
    key(r, k);
    buf_puts(r->out, value ? "true" : "false");
}

void log_raw(log_record_t *r, const char *k, const char *json, size_t n)
{
    if (r == NULL)
        return;
    key(r, k);
    buf_append(r->out, json, n);
}

void log_end(log_record_t *r)
{
    if (r == NULL)
        return;
    if (buf_lit(r->out, "}\n") < 0) {
        r->out->len = r->start; /* out of memory: drop this record whole */
        return;
    }
    if (!buffered || pending.len >= LOG_FLUSH_AT)
        log_flush();
}

void log_msgf(log_level_t level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    if (level < min_level)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_end(log_begin(level, msg));
}

void log_set_buffered(int on)
{
    buffered = on;
    if (!on) {
        log_flush();
        buf_free(&pending);
    }
}

void log_flush(void)
{
    size_t off = 0;
    while (off < pending.len) {
        ssize_t n = write(STDOUT_FILENO, pending.data + off, pending.len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* stdout is gone; nothing sensible is left to do */
        off += (size_t)n;
    }
    pending.len = 0;
}
