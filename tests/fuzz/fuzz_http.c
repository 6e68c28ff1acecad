/* libFuzzer target: arbitrary bytes through the request parser and the
 * response parser, fed whole and then split at a point the input chooses.
 * Each message's head is checked for the invariants the proxy relies on. */
#include "http.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static size_t body_bytes;

static int on_head(void *ud, http_head_t *h)
{
    (void)ud;
    /* Pointers must stay inside the head's own memory. */
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        if (f->name_len == 0 || memchr(f->name, ':', f->name_len) != NULL)
            abort();
        if (memchr(f->value, '\r', f->value_len) || memchr(f->value, '\n', f->value_len) ||
            memchr(f->value, '\0', f->value_len))
            abort();
    }
    if ((h->flags & HTTP_F_CHUNKED) && h->content_length >= 0)
        abort();
    http_head_free(h);
    return 0;
}

static int on_body(void *ud, const char *at, size_t n)
{
    (void)ud;
    (void)at;
    body_bytes += n;
    return 0;
}

static int on_end(void *ud)
{
    (void)ud;
    return 0;
}

static const http_handler_t HANDLER = {on_head, on_body, on_end};
static const http_limits_t LIMITS = {8192, 65536};

static void run(http_parse_kind_t kind, const uint8_t *data, size_t size, size_t split)
{
    http_parser_t *p = http_parser_new(kind, &LIMITS, &HANDLER, NULL);
    const char *d = (const char *)data;
    size_t off = 0;
    for (int round = 0; round < 64 && off < size; round++) {
        size_t end = off < split && split < size ? split : size;
        ssize_t used = http_parser_feed(p, d + off, end - off);
        if (used < 0)
            break;
        off += (size_t)used;
        if (http_parser_ended(p))
            http_parser_resume(p);
    }
    http_parser_finish(p);
    http_parser_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t split = data[0] % (size + 1);
    data++;
    size--;
    run(HTTP_PARSE_REQUEST, data, size, split);
    run(HTTP_PARSE_RESPONSE, data, size, split);
    return 0;
}
