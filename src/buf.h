/* buf: a growable byte buffer. */
#ifndef ERRORD_BUF_H
#define ERRORD_BUF_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *data;
    size_t len;
    size_t cap;
} buf_t;

#define BUF_INIT {NULL, 0, 0}

/* Makes room for at least `extra` more bytes. Returns 0, or -ENOMEM. */
int buf_reserve(buf_t *b, size_t extra);

/* Grows the buffer for `extra` more bytes (buf_reserve's slow path). */
int buf_grow(buf_t *b, size_t extra);

/* Appends `n` bytes. Returns 0, or -ENOMEM (the buffer is unchanged). */
static inline int buf_append(buf_t *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    if (b->cap - b->len < n && buf_grow(b, n) < 0)
        return -12; /* -ENOMEM */
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

/* Appends a string literal (its length is known at compile time). */
#define buf_lit(b, lit) buf_append((b), "" lit, sizeof(lit) - 1)

/* Appends a NUL-terminated string. */
int buf_puts(buf_t *b, const char *s);

/* Appends printf-style formatted text. */
int buf_printf(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Appends `v` in decimal. */
int buf_put_u64(buf_t *b, uint64_t v);

/* Appends `ns` nanoseconds as milliseconds with three decimals ("1.234"). */
int buf_put_ms(buf_t *b, uint64_t ns);

/* Appends `s` as the inside of a JSON string (quotes not included). */
int buf_json_escape(buf_t *b, const char *s, size_t n);

/* The length of the longest prefix of `s` that is well-formed UTF-8 without
 * a NUL byte: text that a C string and a JSON string both carry as it is. */
size_t buf_text_span(const char *s, size_t n);

/* The contents as a C string: a NUL is kept after the bytes (not counted
 * in len). "" when empty, or when there is no memory for the NUL. */
const char *buf_cstr(buf_t *b);

/* Drops the first `n` bytes, keeping the rest. */
void buf_consume(buf_t *b, size_t n);

/* Empties the buffer but keeps its memory for reuse. */
static inline void buf_clear(buf_t *b) { b->len = 0; }

/* Releases the memory; the buffer is empty and reusable afterwards. */
void buf_free(buf_t *b);

#endif
