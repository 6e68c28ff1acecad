/* libFuzzer target: arbitrary bytes through the request parser and the
 * response parser, fed whole and then split at a point the input chooses.
 *
 * Each message the parser accepts is forwarded the way errord forwards it
 * (src/frame.c): the head written anew for the other side, the body framed
 * again piece by piece as it arrives. At the message's end the forwarded
 * bytes are parsed again, and they must give back the same message: the same
 * start line, the same end-to-end fields in the same order, nothing
 * hop-by-hop, the framing errord promised and the same body bytes. Anything
 * else is a message that reads one way to errord and another way to the
 * next hop. */
#include "frame.h"
#include "http.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HOST "upstream.test:8081"
#define CLIENT "192.0.2.7"
#define REQUEST_ID "0123456789abcdef0123456789abcdef"
#define DATE "Sun, 06 Nov 1994 08:49:37 GMT"

static const http_limits_t LIMITS = {8192, 65536};
static const http_limits_t LIMITS_AGAIN = {65536, 1 << 20}; /* errord's own fields on top */

#define check(cond) \
    do {            \
        if (!(cond)) \
            abort(); \
    } while (0)

static int name_is(const http_header_t *f, const char *name)
{
    return f->name_len == strlen(name) && strncasecmp(f->name, name, f->name_len) == 0;
}

static int value_is(const http_header_t *f, const char *value)
{
    return f->value_len == strlen(value) && memcmp(f->value, value, f->value_len) == 0;
}

static int same_bytes(const char *a, size_t an, const char *b, size_t bn)
{
    return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

/* ---- one message, forwarded ------------------------------------------------------------------ */

typedef struct {
    http_parse_kind_t kind;
    int client_version; /* responses: the version of the request they answer */
    http_head_t *head;  /* as received */
    frame_body_t body_framing;
    buf_t wire; /* as forwarded */
    buf_t body; /* as received, transfer coding removed */
} forward_t;

/* What a parse of the forwarded bytes gives back. */
typedef struct {
    http_head_t *head;
    buf_t body;
    int messages;
} again_t;

static int again_head(void *ud, http_head_t *h)
{
    again_t *a = ud;
    check(a->head == NULL); /* one message in, one message out */
    a->head = h;
    return 0;
}

static int again_body(void *ud, const char *at, size_t n)
{
    again_t *a = ud;
    buf_append(&a->body, at, n);
    return 0;
}

static int again_end(void *ud)
{
    again_t *a = ud;
    a->messages++;
    return 0;
}

static const http_handler_t AGAIN = {again_head, again_body, again_end};

/* The fields of `h` that are neither hop-by-hop nor named in `skip`, one by
 * one: `*i` is where to look from. Returns NULL past the last. */
static const http_header_t *next_field(const http_head_t *h, size_t *i, const char *const *skip)
{
    for (; *i < h->n_headers; (*i)++) {
        const http_header_t *f = &h->headers[*i];
        int skipped = (f->flags & HTTP_HDR_HOP) != 0;
        for (const char *const *s = skip; *s != NULL && !skipped; s++)
            skipped = name_is(f, *s);
        if (!skipped)
            return &h->headers[(*i)++];
    }
    return NULL;
}

/* The received end-to-end fields and the forwarded ones, less what errord
 * sets itself, must be the same list. (A field named "close" is forwarded,
 * but the next hop reads it as hop-by-hop when errord's own Connection says
 * close: RFC 9110 reserves that field name for this reason.) */
static void check_fields(const http_head_t *in, const http_head_t *out, const char *const *skip)
{
    size_t i = 0, j = 0;
    const http_header_t *a, *b;
    do {
        a = next_field(in, &i, skip);
        b = next_field(out, &j, skip);
        check((a == NULL) == (b == NULL));
        if (a != NULL)
            check(same_bytes(a->name, a->name_len, b->name, b->name_len) &&
                  same_bytes(a->value, a->value_len, b->value, b->value_len));
    } while (a != NULL);
}

/* Exactly one field `name` in `h`; returns it. */
static const http_header_t *only_field(const http_head_t *h, const char *name)
{
    const http_header_t *found = NULL;
    for (size_t i = 0; i < h->n_headers; i++) {
        if (name_is(&h->headers[i], name)) {
            check(found == NULL);
            found = &h->headers[i];
        }
    }
    check(found != NULL);
    return found;
}

/* The first end-to-end field `name` in `h`, or NULL. */
static const http_header_t *end_to_end(const http_head_t *h, const char *name)
{
    for (size_t i = 0; i < h->n_headers; i++)
        if (!(h->headers[i].flags & HTTP_HDR_HOP) && name_is(&h->headers[i], name))
            return &h->headers[i];
    return NULL;
}

/* errord's Via comes last before the framing fields. */
static void check_via(const http_head_t *out)
{
    size_t framing = (out->flags & HTTP_F_CHUNKED) || out->content_length >= 0;
    size_t close = out->n_headers > 0 && name_is(&out->headers[out->n_headers - 1], "connection");
    check(out->n_headers > framing + close);
    const http_header_t *via = &out->headers[out->n_headers - 1 - framing - close];
    check(name_is(via, "via") && value_is(via, "1.1 errord"));
}

static int same_codings(const http_head_t *in, const http_head_t *out)
{
    return same_bytes(in->codings ? in->codings : "", in->codings_len,
                      out->codings ? out->codings : "", out->codings_len);
}

static void check_request(const http_head_t *in, const http_head_t *out)
{
    static const char *const skip[] = {"host", "x-forwarded-for", "x-forwarded-proto",
                                       "x-request-id", "via", "close", NULL};
    check(strcmp(in->method_name, out->method_name) == 0);
    check(same_bytes(in->target, in->target_len, out->target, out->target_len));
    check(out->version == 11);
    check(value_is(only_field(out, "host"), HOST));
    check(value_is(only_field(out, "x-request-id"), REQUEST_ID));
    const http_header_t *xff = only_field(out, "x-forwarded-for");
    size_t n = strlen(CLIENT);
    check(xff->value_len >= n && memcmp(xff->value + xff->value_len - n, CLIENT, n) == 0);
    check_via(out);
    check_fields(in, out, skip);
    check((in->flags & HTTP_F_CHUNKED) == (out->flags & HTTP_F_CHUNKED) && same_codings(in, out));
    check(in->content_length == out->content_length);
}

static void check_response(const forward_t *fw, const http_head_t *out)
{
    /* errord adds a Date only to a response that has none. */
    static const char *const skip[] = {"x-request-id", "via", "close", NULL};
    static const char *const skip_date[] = {"x-request-id", "via", "close", "date", NULL};
    const http_head_t *in = fw->head;
    check(in->status == out->status && out->version == 11);
    if (in->reason_len > 0)
        check(same_bytes(in->reason, in->reason_len, out->reason, out->reason_len));
    check(value_is(only_field(out, "x-request-id"), REQUEST_ID));
    int dated = end_to_end(in, "date") != NULL;
    if (!dated)
        check(value_is(only_field(out, "date"), DATE));
    check_via(out);
    check_fields(in, out, dated ? skip : skip_date);
    switch (fw->body_framing) {
    case FRAME_BODY_AS_IS:
        check(!(out->flags & HTTP_F_CHUNKED));
        if (!(in->flags & HTTP_F_NO_BODY) || in->status != 204)
            check(out->content_length == in->content_length);
        break;
    case FRAME_BODY_CHUNKED:
        check(fw->client_version == 11 && (out->flags & HTTP_F_CHUNKED) && same_codings(in, out));
        break;
    case FRAME_BODY_TO_CLOSE:
        check(fw->client_version == 10 && (out->flags & HTTP_F_BODY_TO_EOF) &&
              (out->flags & HTTP_F_CLOSE));
        break;
    }
}

/* The message is complete: parse what was forwarded and compare. */
static void check_forwarded(forward_t *fw)
{
    again_t a = {0};
    http_parser_t *p = http_parser_new(fw->kind, &LIMITS_AGAIN, &AGAIN, &a);
    check(p != NULL);
    check(http_parser_feed(p, fw->wire.data, fw->wire.len) == (ssize_t)fw->wire.len);
    if (fw->body_framing == FRAME_BODY_TO_CLOSE)
        check(http_parser_finish(p) == 0);
    check(a.head != NULL && a.messages == 1);
    if (fw->kind == HTTP_PARSE_REQUEST)
        check_request(fw->head, a.head);
    else
        check_response(fw, a.head);
    check(same_bytes(fw->body.data, fw->body.len, a.body.data, a.body.len));
    http_parser_free(p);
    http_head_free(a.head);
    buf_free(&a.body);
}

static void forward_reset(forward_t *fw)
{
    if (fw->head != NULL)
        http_head_free(fw->head);
    fw->head = NULL;
    buf_clear(&fw->wire);
    buf_clear(&fw->body);
}

static int on_head(void *ud, http_head_t *h)
{
    forward_t *fw = ud;
    /* Pointers must stay inside the head's own memory. */
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        check(f->name_len > 0 && memchr(f->name, ':', f->name_len) == NULL);
        check(!memchr(f->value, '\r', f->value_len) && !memchr(f->value, '\n', f->value_len) &&
              !memchr(f->value, '\0', f->value_len));
    }
    check(!((h->flags & HTTP_F_CHUNKED) && h->content_length >= 0));

    forward_reset(fw);
    fw->head = h;
    if (fw->kind == HTTP_PARSE_REQUEST) {
        frame_request_t o = {HOST, strlen(HOST), CLIENT, REQUEST_ID};
        frame_request_head(&fw->wire, h, &o);
        fw->body_framing = (h->flags & HTTP_F_CHUNKED) ? FRAME_BODY_CHUNKED : FRAME_BODY_AS_IS;
    } else {
        frame_response_t o = {DATE, REQUEST_ID, fw->client_version, 1};
        fw->body_framing = frame_response_head(&fw->wire, h, &o);
        check(o.keep_alive == (fw->body_framing != FRAME_BODY_TO_CLOSE));
    }
    return 0;
}

static int on_body(void *ud, const char *at, size_t n)
{
    forward_t *fw = ud;
    check(fw->head != NULL && n > 0);
    buf_append(&fw->body, at, n);
    if (fw->body_framing == FRAME_BODY_CHUNKED) {
        char line[24];
        buf_append(&fw->wire, line, frame_chunk_size_line(line, n));
        buf_append(&fw->wire, at, n);
        buf_lit(&fw->wire, "\r\n");
    } else {
        buf_append(&fw->wire, at, n);
    }
    return 0;
}

static int on_end(void *ud)
{
    forward_t *fw = ud;
    check(fw->head != NULL);
    if (fw->body_framing == FRAME_BODY_CHUNKED)
        buf_append(&fw->wire, FRAME_LAST_CHUNK, FRAME_LAST_CHUNK_LEN);
    check_forwarded(fw);
    forward_reset(fw);
    return 0;
}

static const http_handler_t HANDLER = {on_head, on_body, on_end};

static void run(http_parse_kind_t kind, int client_version, const uint8_t *data, size_t size,
                size_t split)
{
    forward_t fw = {.kind = kind, .client_version = client_version};
    http_parser_t *p = http_parser_new(kind, &LIMITS, &HANDLER, &fw);
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
    forward_reset(&fw);
    buf_free(&fw.wire);
    buf_free(&fw.body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t split = data[0] % (size + 1);
    int client_version = (data[0] & 0x80) ? 10 : 11;
    data++;
    size--;
    run(HTTP_PARSE_REQUEST, 11, data, size, split);
    run(HTTP_PARSE_RESPONSE, client_version, data, size, split);
    return 0;
}
