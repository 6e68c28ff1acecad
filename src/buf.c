/* buf: a growable byte buffer. */
#include "buf.h"

#include "bytes.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int buf_grow(buf_t *b, size_t extra)
{
    size_t need = b->len + extra;
    if (need < b->len)
        return -ENOMEM;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int buf_reserve(buf_t *b, size_t extra)
{
    return b->cap - b->len >= extra ? 0 : buf_grow(b, extra);
}

int buf_puts(buf_t *b, const char *s)
{
    return buf_append(b, s, strlen(s));
}

int buf_printf(buf_t *b, const char *fmt, ...)
{
    va_list ap;
    char small[256];

    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -EINVAL;
    if ((size_t)n < sizeof small)
        return buf_append(b, small, (size_t)n);
    if (buf_reserve(b, (size_t)n + 1) < 0)
        return -ENOMEM;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int buf_put_u64(buf_t *b, uint64_t v)
{
    char tmp[20];
    int i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    return buf_append(b, tmp + i, sizeof tmp - (size_t)i);
}

int buf_put_ms(buf_t *b, uint64_t ns)
{
    uint64_t us = (ns + 500) / 1000;
    char frac[4] = {(char)('0' + us / 100 % 10), (char)('0' + us / 10 % 10),
                    (char)('0' + us % 10), 0};
    if (buf_put_u64(b, us / 1000) < 0 || buf_append(b, ".", 1) < 0)
        return -ENOMEM;
    return buf_append(b, frac, 3);
}

/* Length of the well-formed UTF-8 sequence at `s` (1-4), or 0 if there is none. */
static size_t utf8_sequence(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t len;
    unsigned min;

    if (u[0] < 0x80)
        return 1;
    if ((u[0] & 0xe0) == 0xc0) {
        len = 2;
        min = 0x80;
    } else if ((u[0] & 0xf0) == 0xe0) {
        len = 3;
        min = 0x800;
    } else if ((u[0] & 0xf8) == 0xf0) {
        len = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    unsigned cp = u[0] & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((u[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (u[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

size_t buf_text_span(const char *s, size_t n)
{
    size_t i = 0, seq;
    while (i < n && s[i] != 0 && (seq = utf8_sequence(s + i, n - i)) > 0)
        i += seq;
    return i;
}

/* Bytes buf_json_escape() copies as they are: printable ASCII but '"' and '\\'. */
static const unsigned char JSON_PLAIN[256] = {
    [0x20 ... 0x21] = 1, [0x23 ... 0x5b] = 1, [0x5d ... 0x7e] = 1, /* skip '"' and '\\' */
};

int buf_json_escape(buf_t *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i = 0;

    if (buf_reserve(b, n + 2) < 0)
        return -ENOMEM;
    while (i < n) {
        size_t start = i;
        for (uint64_t x; i + 8 <= n; i += 8) {
            x = bytes_load8(s + i);
            if (bytes_below(x, 0x20) | bytes_above(x, 0x7e) | bytes_has(x, '"') |
                bytes_has(x, '\\'))
                break;
        }
        while (i < n && JSON_PLAIN[(unsigned char)s[i]])
            i++;
        if (buf_append(b, s + start, i - start) < 0)
            return -ENOMEM;
        if (i == n)
            break;
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t seq = utf8_sequence(s + i, n - i);
            if (seq > 0) {
                if (buf_append(b, s + i, seq) < 0)
                    return -ENOMEM;
                i += seq;
                continue;
            }
            /* Not UTF-8: a JSON line must stay valid, so say U+FFFD. */
            if (buf_lit(b, "\\ufffd") < 0)
                return -ENOMEM;
            i++;
            continue;
        }
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t elen = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            elen = 6;
        }
        if (buf_append(b, esc, elen) < 0)
            return -ENOMEM;
        i++;
    }
    return 0;
}

const char *buf_cstr(buf_t *b)
{
    if (b->len == 0 || buf_reserve(b, 1) < 0)
        return "";
    b->data[b->len] = '\0';
    return b->data;
}

void buf_consume(buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

void buf_free(buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
