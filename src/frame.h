/* frame: the bytes errord puts on the wire for a message it forwards.
 *
 * A forwarded head is written anew, never copied: hop-by-hop fields
 * (Connection and what it names, Keep-Alive, TE, Upgrade...) and the
 * received framing are dropped, and errord states its own framing for the
 * body it is about to send (RFC 9112 §6): the received Content-Length, or
 * chunked, or, to an HTTP/1.0 client, a body that ends with the connection.
 * Body bytes arrive with their transfer coding removed and are chunk-encoded
 * again when the head said chunked. These functions only write: deciding
 * what to send stays with the proxy. */
#ifndef ERRORD_FRAME_H
#define ERRORD_FRAME_H

#include "buf.h"
#include "http.h"

#include <stddef.h>
#include <stdint.h>

/* What errord adds to a request it sends upstream. */
typedef struct {
    const char *host; /* the Host field's value */
    size_t host_len;
    const char *client_addr; /* appended to X-Forwarded-For */
    const char *request_id;  /* X-Request-Id */
} frame_request_t;

/* Appends the request head for the upstream: the request line in HTTP/1.1,
 * Host, the end-to-end fields in order (X-Forwarded-For fields merged into
 * one, with the client's address last), X-Forwarded-Proto, X-Request-Id,
 * Via, and the body's framing. */
void frame_request_head(buf_t *b, const http_head_t *req, const frame_request_t *o);

/* How the body after a response head is framed. */
typedef enum {
    FRAME_BODY_AS_IS,    /* Content-Length, or no body at all */
    FRAME_BODY_CHUNKED,  /* chunk-encoded (frame_chunk_size_line, FRAME_LAST_CHUNK) */
    FRAME_BODY_TO_CLOSE, /* to an HTTP/1.0 client: the close ends the body */
} frame_body_t;

typedef struct {
    const char *date;       /* Date when the response has none */
    const char *request_id; /* X-Request-Id */
    int client_version;     /* the request's: 10 or 11 */
    int keep_alive;         /* in: the client connection may stay open; out: 0 when it may not */
} frame_response_t;

/* Appends the response head for the client: the status line in HTTP/1.1,
 * the end-to-end fields in order (the upstream's X-Request-Id replaced by
 * errord's), Date, Via, the framing, and Connection. */
frame_body_t frame_response_head(buf_t *b, const http_head_t *res, frame_response_t *o);

/* An answer errord makes itself: its own errors (SPEC §4), a policy's
 * respond{}, the admin port's routes. */
typedef struct {
    int status;
    const char *type;       /* Content-Type, or NULL (among `headers`, or no body) */
    const char *headers;    /* more "Name: value\r\n" lines, or NULL */
    size_t headers_len;
    int has_length;         /* 0 for 204 and 304, which have no Content-Length */
    size_t body_len;
    const char *date;       /* Date */
    const char *request_id; /* X-Request-Id, or NULL */
    int client_version;     /* the request's, 10 or 11; 11 when there is none */
    int keep_alive;         /* the client connection stays open afterwards */
} frame_local_t;

/* Appends the head of an answer errord makes itself: the status line,
 * Content-Type, the extra header lines, Content-Length, Date, X-Request-Id
 * and Connection. The body (o->body_len bytes) is the caller's to append. */
void frame_local_head(buf_t *b, const frame_local_t *o);

/* Appends errord's own error body, {"message":"..."} and a newline, with
 * `message` escaped for JSON. */
void frame_error_body(buf_t *b, const char *message);

/* Appends a Content-Length field of `n`. */
void frame_content_length(buf_t *b, int64_t n);

/* Writes "<hex size>\r\n" for a chunk of `n` bytes; returns its length.
 * The chunk's data and a CRLF follow it. */
size_t frame_chunk_size_line(char out[24], size_t n);

/* The last chunk, with no trailer fields. */
#define FRAME_LAST_CHUNK "0\r\n\r\n"
#define FRAME_LAST_CHUNK_LEN 5

#endif
