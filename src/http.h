/* http: HTTP/1.1 messages on the wire.
 *
 * A parser turns the bytes of one connection into messages: a head (start
 * line and header fields, copied out of the read buffers into memory the
 * head owns) followed by body bytes. llhttp does the parsing; in front of it
 * a validating pass holds the head, and a chunked body's trailer section, to
 * RFC 9112 strictly (CRLF line ends only, no obs-fold, no whitespace before a
 * colon, token names, no NUL or stray CR/LF in values), and after it the
 * framing is checked again (Content-Length, Transfer-Encoding, Host), so
 * nothing ambiguous gets through whatever the parser would have tolerated.
 *
 * The parser stops after each complete message; http_parser_resume() starts
 * the next one, which is how a connection answers pipelined requests in
 * order. */
#ifndef ERRORD_HTTP_H
#define ERRORD_HTTP_H

#include "buf.h"

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef enum {
    HTTP_M_OTHER = 0,
    HTTP_M_GET,
    HTTP_M_HEAD,
    HTTP_M_POST,
    HTTP_M_PUT,
    HTTP_M_DELETE,
    HTTP_M_OPTIONS,
    HTTP_M_PATCH,
    HTTP_M_TRACE,
    HTTP_M_CONNECT,
} http_method_t;

/* Header field flags. */
#define HTTP_HDR_HOP 0x1 /* hop-by-hop: never copied to the other side */

typedef struct {
    const char *name;
    const char *value;
    uint32_t name_len;
    uint32_t value_len;
    uint32_t name_off; /* positions in the head's arena, used while parsing */
    uint32_t value_off;
    uint32_t flags;
} http_header_t;

/* Message flags, from the framing and the Connection and Expect fields. */
#define HTTP_F_CHUNKED 0x01         /* body in chunked transfer coding */
#define HTTP_F_CLOSE 0x02           /* Connection: close */
#define HTTP_F_KEEP_ALIVE 0x04      /* Connection: keep-alive */
#define HTTP_F_EXPECT_CONTINUE 0x08 /* Expect: 100-continue */
#define HTTP_F_BODY_TO_EOF 0x10     /* response body runs until the connection closes */
#define HTTP_F_NO_BODY 0x20         /* no body by method or status (HEAD, 1xx, 204, 304) */

typedef struct http_head_s {
    /* Requests */
    http_method_t method;
    const char *method_name;
    const char *target; /* origin-form (absolute-form is rewritten) or "*" */
    size_t target_len;
    const char *authority; /* from an absolute-form target, else NULL */
    size_t authority_len;
    /* Responses */
    int status;
    const char *reason;
    size_t reason_len;
    /* Both */
    int version;         /* 10 for HTTP/1.0, 11 for HTTP/1.1 */
    int64_t content_length; /* -1 when there is none */
    unsigned flags;
    const char *codings; /* Transfer-Encoding codings before "chunked", or NULL */
    size_t codings_len;
    char *codings_owned;
    http_header_t *headers;
    size_t n_headers;
    size_t head_bytes; /* size of the head on the wire */
    size_t cap_headers;
    buf_t arena;
} http_head_t;

typedef struct {
    size_t max_line; /* start line bytes (request: 414 past it) */
    size_t max_head; /* whole head bytes (request: 431 past it) */
} http_limits_t;

typedef struct {
    int status; /* the status errord answers with (400, 414, 431, 501, 505...) */
    const char *message;
} http_error_t;

/* What a parser tells its owner. Each returns 0 to go on or a negative value
 * to stop parsing (the feed then fails with HTTP status 0 in the error, the
 * owner's own decision). on_body and on_end may be NULL: an owner that only
 * wants the head is not told of the rest. */
typedef struct {
    /* A valid head is complete. The head is the callee's from now on (free it
     * with http_head_free()). */
    int (*on_head)(void *ud, http_head_t *head);
    /* Body bytes, after any transfer coding is removed. `at` points into the
     * caller's buffer and is only valid during the call. */
    int (*on_body)(void *ud, const char *at, size_t n);
    /* The message is complete; the parser stops after it. */
    int (*on_end)(void *ud);
} http_handler_t;

typedef enum { HTTP_PARSE_REQUEST, HTTP_PARSE_RESPONSE } http_parse_kind_t;

typedef struct http_parser_s http_parser_t;

/* Creates a parser of requests or responses. `limits` and `h` must outlive
 * it. Returns NULL when out of memory. */
http_parser_t *http_parser_new(http_parse_kind_t kind, const http_limits_t *limits,
                               const http_handler_t *h, void *ud);

/* Frees the parser and a head it is still reading. NULL is fine. */
void http_parser_free(http_parser_t *p);

/* Feeds `n` bytes. Returns how many were consumed: all of them, or fewer when
 * a message ended (the rest belongs to the next one). Returns -1 on an error;
 * http_parser_error() then says what, and the parser stays failed. */
ssize_t http_parser_feed(http_parser_t *p, const char *data, size_t n);

/* The connection closed. Completes a body that runs until EOF (calling
 * on_end). Returns 0 when no message was cut short, -1 otherwise. */
int http_parser_finish(http_parser_t *p);

/* Tells a response parser whether the next response answers a HEAD request
 * (and so has no body, whatever its head says). */
void http_parser_set_head_request(http_parser_t *p, int is_head);

/* Starts the next message after on_end. */
void http_parser_resume(http_parser_t *p);

/* Whether the parser is between messages and has seen no byte of the next. */
int http_parser_idle(const http_parser_t *p);

/* Whether the parser has stopped at the end of a message. */
int http_parser_ended(const http_parser_t *p);

/* The error that made the last feed fail. */
const http_error_t *http_parser_error(const http_parser_t *p);

/* Frees a head handed out by on_head. NULL is fine. */
void http_head_free(http_head_t *h);

/* A head built by hand rather than parsed (a policy's test cases):
 * HTTP/1.1, no Content-Length, room for `n_headers` fields. A request when
 * `method` is not NULL (with `target`, both C strings, copied), else a
 * response with `status`. Returns NULL when out of memory; free it with
 * http_head_free(). */
http_head_t *http_head_new(const char *method, const char *target, int status, size_t n_headers);

/* Adds a header field to a head made by http_head_new(), copying its name
 * and value. Pointers into the head stay valid only until the next call.
 * Returns 0, or -1 when out of memory or out of room (the head is as it
 * was). */
int http_head_add(http_head_t *h, const char *name, size_t name_len, const char *value,
                  size_t value_len);

/* The first header field named `name` (case-insensitive), or NULL. */
const http_header_t *http_head_find(const http_head_t *h, const char *name);

/* Retry-After of a response (delta-seconds or an HTTP-date) as milliseconds
 * from `now_ms` (wall clock; a date in the past is 0), or -1 when absent or
 * invalid. */
int64_t http_retry_after_ms(const http_head_t *res, int64_t now_ms);

/* What the Transfer-Encoding fields of a head say, read in order (RFC 9112
 * 6.1): chunked must come last, once, without parameters; the other known
 * codings pass through. Start from {0}; free `others`. */
typedef struct {
    int chunked_seen;  /* chunked was the last coding seen so far */
    int chunked_count;
    int unknown;       /* a coding errord does not know */
    int bad;           /* a coding after chunked, chunked with parameters */
    buf_t others;      /* the codings other than chunked, ", "-separated */
} http_te_t;

/* Reads the codings of one Transfer-Encoding value into `te`. Returns
 * non-zero once the value settles it (unknown or bad), else 0. */
int http_te_read(http_te_t *te, const char *value, size_t n);

/* Whether `s` (`n` bytes) is an authority, host[:port], of the characters
 * RFC 3986 allows there. */
int http_valid_host(const char *s, size_t n);

/* tchar (RFC 9110 5.6.2): 1 for each byte a token may hold, else 0. */
extern const unsigned char HTTP_TCHAR[256];

/* Calls `fn` for each element of the comma-separated list in `s` (`n`
 * bytes), trimmed of whitespace, skipping empty ones (RFC 9110 5.6.1).
 * Stops at, and returns, the first non-zero value fn returns; else 0. */
int http_list_each(const char *s, size_t n, int (*fn)(void *ctx, const char *s, size_t n),
                   void *ctx);

/* Whether the comma-separated list in `value` holds `token`
 * (case-insensitive). */
int http_list_has(const char *value, size_t n, const char *token);

/* Whether the `n` bytes at `s` are a token (RFC 9110 5.6.2), what a
 * header field name must be: one or more tchar. */
int http_is_token(const char *s, size_t n);

/* Whether `method` may be repeated without changing its effect (RFC 9110
 * 9.2.2). */
int http_method_idempotent(http_method_t method);

/* The version of llhttp errord was built with, "8.1.0". */
const char *http_parser_version(void);

/* The standard reason phrase for `status`, or "Unknown". */
const char *http_reason(int status);

#endif
