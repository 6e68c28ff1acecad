/* httpc: errord's own small HTTP/1.1 client, for the alert sinks. One POST
 * per connection: the name resolved without blocking, then connect, write,
 * and read the response with errord's parser, all under one timeout. It
 * runs on an event loop like everything else and never blocks it. */
#ifndef ERRORD_HTTPC_H
#define ERRORD_HTTPC_H

#include "tls.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct httpc_req_s httpc_req_t;

/* A request finished: `status` is the response's status, or 0 when there
 * was none (then `error` says why). */
typedef void (*httpc_done_cb)(void *arg, int status, const char *error);

/* A parsed http:// or https:// URL. */
typedef struct {
    int tls;
    char host[256];
    int port;
    char path[1024]; /* with the query */
    char authority[300];
} httpc_url_t;

/* Parses "http[s]://host[:port][/path]" into `out` (the caller's). Returns
 * 0 or -EINVAL. */
int httpc_parse_url(const char *url, httpc_url_t *out);

/* POSTs `body` (with Content-Type application/json and the `headers`
 * lines, "Name: value\r\n...", or NULL) to `url`, over TLS made from `tls`
 * for an https URL (-EPROTONOSUPPORT when `tls` is NULL then). `done` fires exactly once,
 * from the loop, unless the request is cancelled. Returns 0 with *out set,
 * or a negative error (then `done` never fires). */
int httpc_post(uv_loop_t *loop, tls_ctx_t *tls, const httpc_url_t *url, const char *headers,
               const char *body, size_t len, uint64_t timeout_ms, httpc_done_cb done, void *arg,
               httpc_req_t **out);

/* Stops the request `r`; its callback will not fire. `r` must not be used
 * afterwards: its memory goes once its handles have closed. */
void httpc_cancel(httpc_req_t *r);

#endif
