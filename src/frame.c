#include "frame.h"

#include <string.h>
#include <strings.h>

#define NAME_IS(f, lit) \
    ((f)->name_len == sizeof(lit) - 1 && strncasecmp((f)->name, lit, sizeof(lit) - 1) == 0)

static void put_field(buf_t *b, const http_header_t *f)
{
    buf_append(b, f->name, f->name_len);
    buf_lit(b, ": ");
    buf_append(b, f->value, f->value_len);
    buf_lit(b, "\r\n");
}

/* "Transfer-Encoding: [codings, ]chunked": the codings other than chunked
 * are the sender's and pass through. */
static void put_chunked(buf_t *b, const http_head_t *h)
{
    buf_lit(b, "Transfer-Encoding: ");
    if (h->codings != NULL) {
        buf_append(b, h->codings, h->codings_len);
        buf_lit(b, ", ");
    }
    buf_lit(b, "chunked\r\n");
}

static void put_status_line(buf_t *b, int status, const char *reason, size_t reason_len)
{
    buf_lit(b, "HTTP/1.1 ");
    buf_put_u64(b, (uint64_t)status);
    buf_lit(b, " ");
    if (reason_len > 0)
        buf_append(b, reason, reason_len);
    else
        buf_puts(b, http_reason(status));
    buf_lit(b, "\r\n");
}

/* Connection: close when the connection ends, keep-alive to an HTTP/1.0
 * client that keeps it (1.1 keeps it by default). */
static void put_connection(buf_t *b, int keep_alive, int client_version)
{
    if (!keep_alive)
        buf_lit(b, "Connection: close\r\n");
    else if (client_version == 10)
        buf_lit(b, "Connection: keep-alive\r\n");
}

void frame_local_head(buf_t *b, const frame_local_t *o)
{
    put_status_line(b, o->status, NULL, 0);
    if (o->type != NULL) {
        buf_lit(b, "Content-Type: ");
        buf_puts(b, o->type);
        buf_lit(b, "\r\n");
    }
    if (o->headers != NULL)
        buf_append(b, o->headers, o->headers_len);
    if (o->has_length)
        frame_content_length(b, (int64_t)o->body_len);
    buf_lit(b, "Date: ");
    buf_puts(b, o->date);
    buf_lit(b, "\r\n");
    if (o->request_id != NULL) {
        buf_lit(b, "X-Request-Id: ");
        buf_puts(b, o->request_id);
        buf_lit(b, "\r\n");
    }
    put_connection(b, o->keep_alive, o->client_version);
    buf_lit(b, "\r\n");
}

void frame_error_body(buf_t *b, const char *message)
{
    buf_lit(b, "{\"message\":\"");
    buf_json_escape(b, message, strlen(message));
    buf_lit(b, "\"}\n");
}

void frame_content_length(buf_t *b, int64_t n)
{
    buf_lit(b, "Content-Length: ");
    buf_put_u64(b, (uint64_t)n);
    buf_lit(b, "\r\n");
}

size_t frame_chunk_size_line(char out[24], size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char tmp[16];
    int i = sizeof tmp;
    do {
        tmp[--i] = hex[n & 15];
        n >>= 4;
    } while (n != 0);
    size_t len = sizeof tmp - (size_t)i;
    memcpy(out, tmp + i, len);
    memcpy(out + len, "\r\n", 2);
    return len + 2;
}

/* Fields errord sets itself on a request it sends upstream. */
static int replaced_upstream(const http_header_t *f)
{
    switch (f->name_len) {
    case 4: return NAME_IS(f, "host");
    case 12: return NAME_IS(f, "x-request-id");
    case 17: return NAME_IS(f, "x-forwarded-proto");
    default: return 0;
    }
}

void frame_request_head(buf_t *b, const http_head_t *r, const frame_request_t *o)
{
    buf_puts(b, r->method_name);
    buf_lit(b, " ");
    buf_append(b, r->target, r->target_len);
    buf_lit(b, " HTTP/1.1\r\nHost: ");
    buf_append(b, o->host, o->host_len);
    buf_lit(b, "\r\n");

    int xff = 0;
    for (size_t i = 0; i < r->n_headers; i++) {
        const http_header_t *f = &r->headers[i];
        if ((f->flags & HTTP_HDR_HOP) || replaced_upstream(f))
            continue;
        if (NAME_IS(f, "x-forwarded-for"))
            xff = 1;
        else
            put_field(b, f);
    }
    /* One X-Forwarded-For after the other fields: the client's values in
     * order, then the client's address. */
    buf_lit(b, "X-Forwarded-For: ");
    for (size_t i = 0; xff && i < r->n_headers; i++) {
        const http_header_t *f = &r->headers[i];
        if (!(f->flags & HTTP_HDR_HOP) && f->value_len > 0 && NAME_IS(f, "x-forwarded-for")) {
            buf_append(b, f->value, f->value_len);
            buf_lit(b, ", ");
        }
    }
    buf_puts(b, o->client_addr);
    buf_lit(b, "\r\nX-Forwarded-Proto: http\r\nX-Request-Id: ");
    buf_puts(b, o->request_id);
    buf_lit(b, "\r\nVia: 1.1 errord\r\n");
    if (r->flags & HTTP_F_CHUNKED)
        put_chunked(b, r);
    else if (r->content_length >= 0)
        frame_content_length(b, r->content_length);
    buf_lit(b, "\r\n");
}

frame_body_t frame_response_head(buf_t *b, const http_head_t *res, frame_response_t *o)
{
    frame_body_t body = FRAME_BODY_AS_IS;
    int has_date = 0;

    put_status_line(b, res->status, res->reason, res->reason_len);
    for (size_t i = 0; i < res->n_headers; i++) {
        const http_header_t *f = &res->headers[i];
        if ((f->flags & HTTP_HDR_HOP) || NAME_IS(f, "x-request-id"))
            continue;
        if (NAME_IS(f, "date"))
            has_date = 1;
        put_field(b, f);
    }
    if (!has_date) {
        buf_lit(b, "Date: ");
        buf_puts(b, o->date);
        buf_lit(b, "\r\n");
    }
    buf_lit(b, "X-Request-Id: ");
    buf_puts(b, o->request_id);
    buf_lit(b, "\r\nVia: 1.1 errord\r\n");

    if (res->flags & HTTP_F_NO_BODY) {
        /* HEAD and 304 keep the length of the representation they describe. */
        if (res->content_length >= 0 && res->status != 204)
            frame_content_length(b, res->content_length);
    } else if (res->content_length >= 0) {
        frame_content_length(b, res->content_length);
    } else if (o->client_version == 11) {
        body = FRAME_BODY_CHUNKED;
        put_chunked(b, res);
    } else {
        body = FRAME_BODY_TO_CLOSE; /* HTTP/1.0 has no chunked */
        o->keep_alive = 0;
    }
    put_connection(b, o->keep_alive, o->client_version);
    buf_lit(b, "\r\n");
    return body;
}
