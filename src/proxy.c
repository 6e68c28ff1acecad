/* proxy: the client side of errord (see proxy.h).
 *
 * A client connection serves one transaction (txn) at a time: the request
 * is read and forwarded to an upstream connection as it arrives, the response
 * streams back, and only then is the next pipelined request parsed, so
 * answers go out in order. Parser callbacks only forward bytes and set
 * flags; what follows from them (finishing a transaction, releasing a
 * connection, starting the next request) happens after the parser returns,
 * never from inside it. */
#include "proxy.h"

#include "budget.h"
#include "buf.h"
#include "clock.h"
#include "frame.h"
#include "http.h"
#include "io.h"
#include "list.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "rand.h"
#include "redact.h"
#include "upstream.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_BUF_SIZE (64 * 1024)
/* Stop reading a side once this much is waiting to be written to the other. */
#define HIGH_WATER (256 * 1024)
/* Without a policy: request bytes kept so a request can go again on a fresh
 * connection when a pooled one turns out dead. */
#define REPLAY_LIMIT (1024 * 1024)
/* Pipelined bytes held while a request is being served. */
#define PIPELINE_LIMIT (64 * 1024)
/* How long a closing connection reads and discards what the client sends. */
#define LINGER_MS 2000
#define MAX_ATTEMPTS 16
#define REQUEST_ID_MAX 200

typedef struct client_s client_t;

/* One line of the attempt ledger. */
typedef struct {
    int status;          /* upstream status, or 0 */
    const char *error;   /* error kind when there is no status */
    const char *verdict; /* "pass", "retry", "respond" */
    const char *refused; /* why errord refused the policy's retry, or NULL */
    const char *failure; /* how the policy handler failed, or NULL */
    char reason[VERDICT_REASON_MAX + 1];
    uint64_t ns;
    uint64_t held_ms;  /* held by a cooldown before it started */
    int64_t delay_ms;  /* waited after it before the next attempt, -1: none */
    uint32_t seen_off; /* what its handler saw, JSON in txn.seen, for replays */
    uint32_t seen_len;
} attempt_t;

typedef struct {
    client_t *client;
    policy_t *policy; /* the policy the request started under, or NULL */
    http_head_t *req;
    char id[REQUEST_ID_MAX + 1];
    uint64_t t0;
    buf_t head;         /* the request head as sent upstream */
    buf_t body;         /* request body bytes not yet forwarded, or all of them while replayable */
    size_t body_fwd;    /* bytes of `body` forwarded on this attempt */
    uint64_t body_in;   /* request body bytes received */
    uint64_t bytes_out; /* response body bytes sent to the client */
    upconn_t *up;
    http_head_t *res;
    buf_t res_body;      /* a response body held for the policy */
    http_head_t *last_res; /* the last complete real response, kept while retrying */
    buf_t last_body;
    int attempt;         /* the policy's attempt number, 1 for the first */
    int retries;         /* retries made */
    size_t replay_limit;
    uint64_t deadline_ns; /* when the request must have its answer; 0: none */
    uint64_t hold_t0;     /* a cooldown holds the next attempt since then */
    uint64_t held_ms;     /* ... for this long so far */
    uint64_t waited_ms;   /* retry delays and holds, in all */
    int status;          /* what the client got */
    const char *error;   /* why the transaction ended badly */
    char tls_error[192]; /* the words of a failed TLS handshake */
    uint64_t attempt_t0;
    uint64_t res_bytes;  /* bytes received from the upstream on this attempt */
    int n_attempts;
    buf_t seen;          /* what handlers saw (attempt_t.seen_off) */
    unsigned req_done : 1;    /* the whole request was read */
    unsigned replayable : 1;  /* `body` holds the whole body read so far */
    unsigned up_ready : 1;    /* the upstream connection is usable */
    unsigned up_reused : 1;   /* ... and came from the pool */
    unsigned end_sent : 1;    /* the whole request went upstream */
    unsigned up_paused : 1;   /* upstream reads stopped for backpressure */
    unsigned res_done : 1;    /* the response is complete */
    unsigned committed : 1;   /* the response head went to the client */
    unsigned chunk_out : 1;   /* the response body is chunk-encoded to the client */
    unsigned close_out : 1;   /* the response body ends when the connection closes */
    unsigned keep_alive : 1;  /* the client connection continues afterwards */
    unsigned stale_retried : 1;
    unsigned started : 1;     /* the first attempt has begun */
    unsigned holding : 1;     /* the response waits for the policy's verdict */
    unsigned noted : 1;       /* counted in the retry budget's requests */
    unsigned res_over : 1;    /* ... and its body is larger than body_limit */
    /* Last, and not zeroed when a transaction starts: attempt_end() clears
     * each line as it is written. */
    attempt_t attempts[MAX_ATTEMPTS];
} txn_t;

struct client_s {
    io_t io;
    proxy_t *proxy;
    list_t link;
    http_parser_t *parser;
    txn_t *txn;
    buf_t in; /* pipelined bytes held back while a request is served */
    char addr[64];
    int reading;
    int eof;
    int timer_mode;
    uint64_t head_ms; /* loop time of a head's first byte while it is incomplete, or 0 */
};

/* What the client connection's timer is measuring. */
enum {
    CT_NONE,
    CT_HEADER, /* the request head must be complete by then */
    CT_BODY,   /* the request body must not stall that long */
    CT_IDLE,   /* keep-alive: no new request for that long */
    CT_SEND,   /* the client must take some of the response by then */
    CT_RETRY,  /* the next attempt starts then */
    CT_HOLD,   /* a cooldown ends then */
    CT_DEADLINE, /* the request's deadline */
};

struct proxy_s {
    uv_loop_t *loop;
    const config_t *cfg;
    proxy_shared_t *shared;
    uv_tcp_t listener;
    uv_check_t flusher;
    upstream_t *upstream;
    upstream_owner_t upstream_owner;
    policy_t *policy; /* NULL: every response passes */
    metrics_t *metrics;
    http_limits_t req_limits;
    http_limits_t res_limits;
    list_t clients;
    char *rbuf;
    rand_t rng;
    time_t date_at;
    char date[32];
    int listening;
    int draining;
    int open_handles;
    void (*on_done)(void *arg);
    void *done_arg;
};

static void client_read_on(client_t *c, int on);
static void client_timer(client_t *c, int mode);
static void client_next(client_t *c, int keep_alive);
static void client_close(client_t *c, const char *why);
static void client_abort(client_t *c, const char *why);
static void txn_pump(txn_t *t);
static void txn_body_backpressure(txn_t *t);
static int txn_flush(txn_t *t);
static int txn_attempt(txn_t *t, int fresh);
static int txn_upstream_failed(txn_t *t, const char *kind, int status, const char *message);
static void maybe_done(proxy_t *p);

/* ---- small helpers ---------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    proxy_t *p = h->loop->data;
    *b = uv_buf_init(p->rbuf, READ_BUF_SIZE);
}

static const char *http_date(proxy_t *p)
{
    time_t now = time(NULL);
    if (now != p->date_at) {
        clock_http_date(now, p->date);
        p->date_at = now;
    }
    return p->date;
}

/* ---- errord's own answers (SPEC §4) ------------------------------------------ */

/* Writes a complete JSON error response to the client, with `extra`
 * header lines ("Name: value\r\n...", or NULL). */
static void write_error_with(client_t *c, txn_t *t, int status, const char *message, int keep,
                             const char *extra)
{
    buf_t body = BUF_INIT;
    buf_lit(&body, "{\"message\":\"");
    buf_json_escape(&body, message, strlen(message));
    buf_lit(&body, "\"}\n");

    buf_t out = BUF_INIT;
    buf_printf(&out,
               "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
               "Date: %s\r\n",
               status, http_reason(status), body.len, http_date(c->proxy));
    if (t != NULL)
        buf_printf(&out, "X-Request-Id: %s\r\n", t->id);
    if (extra != NULL)
        buf_puts(&out, extra);
    if (!keep)
        buf_lit(&out, "Connection: close\r\n");
    else if (t != NULL && t->req->version == 10)
        buf_lit(&out, "Connection: keep-alive\r\n");
    buf_lit(&out, "\r\n");
    if (t == NULL || t->req->method != HTTP_M_HEAD)
        buf_append(&out, body.data, body.len);
    io_append(&c->io, out.data, out.len);
    buf_free(&out);
    buf_free(&body);
}

static void write_error(client_t *c, txn_t *t, int status, const char *message, int keep)
{
    write_error_with(c, t, status, message, keep, NULL);
}

/* ---- the access record (SPEC §6) ----------------------------------------------- */

/* What a replay gets of a response body at most. */
#define SEEN_BODY_MAX 4096

/* Appends the headers of `h` as a JSON object, names in lower case, the
 * values of secret headers (SPEC §6) redacted. */
static void json_headers(const policy_t *policy, buf_t *b, const http_head_t *h)
{
    buf_lit(b, "{");
    for (size_t i = 0; i < h->n_headers; i++) {
        const http_header_t *f = &h->headers[i];
        char name[128];
        size_t n = f->name_len < sizeof name ? f->name_len : sizeof name;
        for (size_t j = 0; j < n; j++)
            name[j] = (char)tolower((unsigned char)f->name[j]);
        buf_puts(b, i ? ",\"" : "\"");
        buf_json_escape(b, name, n);
        buf_lit(b, "\":\"");
        if (redact_header_secret(policy != NULL ? policy_settings(policy) : NULL, name, n))
            buf_lit(b, "[redacted]");
        else
            buf_json_escape(b, f->value, f->value_len);
        buf_lit(b, "\"");
    }
    buf_lit(b, "}");
}

/* Notes in the ledger line `a` what its handler was shown: the response's
 * headers and (up to SEEN_BODY_MAX) body, or the failure's message. */
static void note_seen(txn_t *t, attempt_t *a, const char *message)
{
    if (a == NULL)
        return;
    size_t start = t->seen.len;
    if (message != NULL) {
        buf_lit(&t->seen, ",\"message\":\"");
        buf_json_escape(&t->seen, message, strlen(message));
        buf_lit(&t->seen, "\"");
    } else {
        buf_lit(&t->seen, ",\"headers\":");
        json_headers(t->policy, &t->seen, t->res);
        if (t->res_over) {
            buf_lit(&t->seen, ",\"body_over_limit\":true");
        } else {
            size_t n = t->res_body.len < SEEN_BODY_MAX ? t->res_body.len : SEEN_BODY_MAX;
            buf_lit(&t->seen, ",\"body\":\"");
            buf_json_escape(&t->seen, t->res_body.data ? t->res_body.data : "", n);
            buf_lit(&t->seen, "\"");
            if (n < t->res_body.len)
                buf_lit(&t->seen, ",\"body_truncated\":true");
        }
    }
    a->seen_off = (uint32_t)start;
    a->seen_len = (uint32_t)(t->seen.len - start);
}

static void log_access(txn_t *t)
{
    log_record_t *r = log_begin(LOG_INFO, NULL);
    if (r == NULL)
        return;
    client_t *c = t->client;
    log_str(r, "type", "access");
    log_str(r, "request_id", t->id);
    log_str(r, "client", c->addr);
    log_str(r, "method", t->req->method_name);
    log_strn(r, "path", t->req->target, t->req->target_len);
    log_str(r, "version", t->req->version == 10 ? "HTTP/1.0" : "HTTP/1.1");
    log_int(r, "status", t->status);
    if (t->res != NULL)
        log_int(r, "upstream_status", t->res->status);
    else
        log_raw(r, "upstream_status", "null", 4);
    log_int(r, "bytes_in", (int64_t)t->body_in);
    log_int(r, "bytes_out", (int64_t)t->bytes_out);
    log_ms(r, "duration_ms", clock_now_ns() - t->t0);

    buf_t a = BUF_INIT;
    buf_lit(&a, "[");
    for (int i = 0; i < t->n_attempts; i++) {
        const attempt_t *at = &t->attempts[i];
        buf_puts(&a, i ? ",{\"attempt\":" : "{\"attempt\":");
        buf_put_u64(&a, (uint64_t)i + 1);
        if (at->status) {
            buf_lit(&a, ",\"status\":");
            buf_put_u64(&a, (uint64_t)at->status);
        } else {
            buf_lit(&a, ",\"error\":\"");
            buf_puts(&a, at->error ? at->error : "aborted");
            buf_lit(&a, "\"");
        }
        buf_lit(&a, ",\"duration_ms\":");
        buf_put_ms(&a, at->ns);
        buf_lit(&a, ",\"verdict\":\"");
        buf_puts(&a, at->verdict);
        buf_lit(&a, "\"");
        if (at->reason[0] != '\0') {
            buf_lit(&a, ",\"reason\":\"");
            buf_puts(&a, at->reason);
            buf_lit(&a, "\"");
        }
        if (at->refused != NULL) {
            buf_lit(&a, ",\"refused\":\"");
            buf_puts(&a, at->refused);
            buf_lit(&a, "\"");
        }
        if (at->failure != NULL) {
            buf_lit(&a, ",\"policy_error\":\"");
            buf_puts(&a, at->failure);
            buf_lit(&a, "\"");
        }
        if (at->held_ms > 0) {
            buf_lit(&a, ",\"held_ms\":");
            buf_put_u64(&a, at->held_ms);
        }
        if (at->delay_ms >= 0) {
            buf_lit(&a, ",\"delay_ms\":");
            buf_put_u64(&a, (uint64_t)at->delay_ms);
        }
        if (at->seen_len > 0)
            buf_append(&a, t->seen.data + at->seen_off, at->seen_len);
        buf_lit(&a, "}");
    }
    buf_lit(&a, "]");
    log_raw(r, "attempts", a.data, a.len);
    buf_free(&a);
    log_int(r, "retries", t->retries);
    log_int(r, "waited_ms", (int64_t)t->waited_ms);
    if (t->policy != NULL)
        log_str(r, "policy_sha256", policy_sha256(t->policy));
    if (t->seen.len > 0) { /* a handler ran: the request it saw, for replays */
        buf_t h = BUF_INIT;
        json_headers(t->policy, &h, t->req);
        log_raw(r, "req_headers", h.data, h.len);
        buf_free(&h);
    }
    if (t->error != NULL)
        log_str(r, "error", t->error);
    log_end(r);
}

/* Counts the finished transaction and its attempts in the metrics. */
static void count_txn(txn_t *t)
{
    metrics_t *m = t->client->proxy->metrics;
    metrics_verdict_t final = MV_NONE;
    for (int i = 0; i < t->n_attempts; i++) {
        const attempt_t *a = &t->attempts[i];
        if (a->status > 0 && a->status < METRICS_STATUS)
            metric_add(&m->upstream_responses[a->status], 1);
        else
            metric_add(&m->upstream_errors[metrics_error_of(a->error)], 1);
        if (a->failure != NULL)
            metric_add(&m->policy_errors[metrics_policy_error_of(a->failure)], 1);
        metrics_observe(&m->attempt_seconds, a->ns);
    }
    if (t->n_attempts > 0) {
        const attempt_t *last = &t->attempts[t->n_attempts - 1];
        final = last->verdict[0] == 'r' ? (last->verdict[2] == 't' ? MV_RETRY : MV_RESPOND)
                                        : MV_PASS;
    }
    int status = t->status > 0 && t->status < METRICS_STATUS ? t->status : 0;
    metric_add(&m->requests[status][final], 1);
    metrics_observe(&m->request_seconds, clock_now_ns() - t->t0);
}

/* Counts a request errord refused before its head was whole: no verdict,
 * timed from its first byte. */
static void count_reject(client_t *c, int status)
{
    metrics_t *m = c->proxy->metrics;
    uint64_t ms = c->head_ms != 0 ? uv_now(c->io.timer.loop) - c->head_ms : 0;
    metric_add(&m->requests[status > 0 && status < METRICS_STATUS ? status : 0][MV_NONE], 1);
    metrics_observe(&m->request_seconds, ms * 1000000u);
}

/* ---- transactions ------------------------------------------------------------- */

/* Closes the ledger line of the attempt in flight; returns it (NULL when
 * there is none) so the verdict can be filled in. */
static attempt_t *attempt_end(txn_t *t, int status, const char *error)
{
    if (t->attempt_t0 == 0 || t->n_attempts >= MAX_ATTEMPTS)
        return NULL;
    attempt_t *a = &t->attempts[t->n_attempts++];
    memset(a, 0, sizeof *a);
    a->status = status;
    a->error = error;
    a->verdict = "pass";
    a->ns = clock_now_ns() - t->attempt_t0;
    a->held_ms = t->held_ms;
    a->delay_ms = -1;
    t->held_ms = 0;
    t->attempt_t0 = 0;
    return a;
}

static void txn_free(txn_t *t)
{
    if (t->policy != NULL)
        policy_release(t->policy);
    http_head_free(t->req);
    http_head_free(t->res);
    http_head_free(t->last_res);
    buf_free(&t->res_body);
    buf_free(&t->last_body);
    buf_free(&t->seen);
    buf_free(&t->head);
    buf_free(&t->body);
    free(t);
}

/* Ends the upstream side of the transaction. */
static void txn_release_upstream(txn_t *t, int reusable)
{
    if (t->up == NULL)
        return;
    upconn_t *u = t->up;
    t->up = NULL;
    t->up_ready = 0;
    t->up_paused = 0;
    upstream_release(u, reusable);
}

/* The transaction is over: log it and let the connection go on (or close). */
static void txn_finish(txn_t *t)
{
    client_t *c = t->client;
    int keep = t->keep_alive && !t->close_out;
    txn_release_upstream(t, 0);
    count_txn(t);
    log_access(t);
    c->txn = NULL;
    txn_free(t);
    client_next(c, keep);
}

static const char *request_id(txn_t *t, proxy_t *p)
{
    const http_header_t *h = http_head_find(t->req, "x-request-id");
    if (h != NULL && h->value_len > 0 && h->value_len <= REQUEST_ID_MAX) {
        int ok = 1;
        for (uint32_t i = 0; i < h->value_len && ok; i++)
            ok = h->value[i] > 0x20 && h->value[i] < 0x7f && h->value[i] != '"' &&
                 h->value[i] != '\\';
        if (ok) {
            memcpy(t->id, h->value, h->value_len);
            t->id[h->value_len] = '\0';
            return t->id;
        }
    }
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        uint64_t v = rand_next(&p->rng);
        for (int i = 0; i < 16; i++, v >>= 4)
            t->id[half * 16 + i] = hex[v & 15];
    }
    t->id[32] = '\0';
    return t->id;
}

/* The request head as the upstream gets it (frame_request_head), with Host
 * set to the upstream's authority unless --preserve-host keeps the client's. */
static void build_request_head(txn_t *t, proxy_t *p)
{
    const http_head_t *r = t->req;
    const config_t *cfg = p->cfg;
    frame_request_t o = {
        .host = cfg->upstream_authority,
        .host_len = strlen(cfg->upstream_authority),
        .client_addr = t->client->addr,
        .request_id = t->id,
    };
    const http_header_t *host;
    if (cfg->preserve_host && r->authority != NULL) {
        o.host = r->authority;
        o.host_len = r->authority_len;
    } else if (cfg->preserve_host && (host = http_head_find(r, "host")) != NULL) {
        o.host = host->value;
        o.host_len = host->value_len;
    }
    frame_request_head(&t->head, r, &o);
}

/* Whether the request may be sent again without changing its effect: an
 * idempotent method, or a client that said so with Idempotency-Key. */
static int txn_repeatable(const txn_t *t)
{
    return http_method_idempotent(t->req->method) ||
           http_head_find(t->req, "idempotency-key") != NULL;
}

/* Whether the client connection can serve another request after this one:
 * after a half-close, only the requests it already sent. */
static int client_wants_more(const txn_t *t)
{
    const client_t *c = t->client;
    if ((c->eof && c->in.len == 0) || c->proxy->draining || !t->req_done)
        return 0;
    if (t->req->version == 10)
        return (t->req->flags & HTTP_F_KEEP_ALIVE) != 0;
    return !(t->req->flags & HTTP_F_CLOSE);
}

/* Answers the transaction with errord's own error, then ends it. */
static int txn_fail(txn_t *t, int status, const char *message)
{
    client_t *c = t->client;
    if (t->error == NULL)
        t->error = message;
    if (t->committed) {
        /* Part of a response is out: the client must see it broken (and
         * the record keeps the status it was sent). */
        client_close(c, message);
        return -1;
    }
    t->status = status;
    t->committed = 1;
    t->keep_alive = client_wants_more(t);
    write_error(c, t, status, message, t->keep_alive);
    txn_finish(t);
    return -1;
}

static void on_up_drain(io_t *io);
static void on_up_write_error(io_t *io);
static void on_up_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void on_up_timeout(uv_timer_t *timer);

static void up_timer(txn_t *t, uint64_t ms)
{
    uv_timer_start(&t->up->io.timer, on_up_timeout, ms, 0);
}

/* The upstream connection is ready: send the request (what has arrived).
 * Returns -1 when the transaction ended. */
static int txn_up_ready(txn_t *t)
{
    upconn_t *u = t->up;
    proxy_t *p = t->client->proxy;
    t->up_ready = 1;
    u->io.on_drain = on_up_drain;
    u->io.on_error = on_up_write_error;
    http_parser_set_head_request(u->parser, t->req->method == HTTP_M_HEAD);
    io_append(&u->io, t->head.data, t->head.len);
    txn_pump(t); /* a request that is all here starts the first-byte timer */
    if (!t->end_sent)
        up_timer(t, p->cfg->upstream_idle_timeout);
    if (txn_flush(t) < 0)
        return -1;
    txn_body_backpressure(t);
    return 0;
}

static void on_up_ready(upconn_t *u, int status)
{
    txn_t *t = u->owner;
    if (status == UPSTREAM_ETLS) {
        snprintf(t->tls_error, sizeof t->tls_error, "TLS handshake with the upstream failed: %s",
                 upconn_tls_error(u));
        txn_upstream_failed(t, "tls", 502, t->tls_error);
        return;
    }
    if (status < 0) {
        const char *why = status == UV_ETIMEDOUT ? "upstream connect timed out"
                          : (status == UV_EAI_NONAME || status == UV_EAI_AGAIN ||
                             status == UV_EAI_FAIL)
                              ? "could not resolve the upstream host"
                              : "upstream refused the connection";
        txn_upstream_failed(t, "connect", status == UV_ETIMEDOUT ? 504 : 502, why);
        return;
    }
    t->up_reused = 0;
    txn_up_ready(t);
}

/* Starts an attempt: sends the request on a pooled or new connection.
 * Returns -1 when the transaction ended. */
static int txn_forward_last(txn_t *t);
static void on_client_timeout(uv_timer_t *timer);

/* Starts the client's timer `ms` from now by the clock, not from the loop's
 * cached time, which lags by however long this iteration has run so far:
 * a retry delay or a cooldown must not end early. */
static void client_timer_from_now(client_t *c, uint64_t ms)
{
    uv_update_time(c->io.timer.loop);
    uv_timer_start(&c->io.timer, on_client_timeout, ms, 0);
}

/* A cooldown runs: hold the attempt until it ends, or, when the request's
 * deadline comes first, answer now: with an earlier attempt's real response,
 * else 429 and Retry-After, which an HTTP client already knows to honour.
 * Returns 1 when held, -1 when the transaction ended, 0 to go ahead. */
static int txn_hold(txn_t *t)
{
    uint64_t now = clock_now_ms(), until = budget_cooldown_until(now);
    if (until == 0)
        return 0;
    client_t *c = t->client;
    if (t->deadline_ns != 0 && until * 1000000u >= t->deadline_ns) {
        if (t->last_res != NULL)
            return txn_forward_last(t);
        char extra[64];
        snprintf(extra, sizeof extra, "Retry-After: %llu\r\n",
                 (unsigned long long)((until - now + 999) / 1000));
        t->status = 429;
        t->error = "held by a cooldown past the request's deadline";
        t->committed = 1;
        t->keep_alive = client_wants_more(t);
        write_error_with(c, t, 429, "the upstream asked to slow down; try again later",
                         t->keep_alive, extra);
        txn_finish(t);
        return -1;
    }
    if (t->hold_t0 == 0)
        t->hold_t0 = clock_now_ns();
    c->timer_mode = CT_HOLD;
    client_timer_from_now(c, until - now);
    return 1;
}

/* Times the request's deadline while it waits for its answer. */
static void txn_arm_deadline(txn_t *t)
{
    client_t *c = t->client;
    if (t->deadline_ns == 0 || t->committed || !t->req_done || c->timer_mode == CT_RETRY ||
        c->timer_mode == CT_HOLD)
        return;
    uint64_t now = clock_now_ns();
    c->timer_mode = CT_DEADLINE;
    /* armed on every read of the request: the loop's time will do here */
    uv_timer_start(&c->io.timer, on_client_timeout,
                   t->deadline_ns > now ? (t->deadline_ns - now + 999999) / 1000000 : 0, 0);
}

/* The deadline passed with no answer sent: the attempt in flight is
 * abandoned; the client gets an earlier attempt's real response, or 504. */
static void txn_deadline_passed(txn_t *t)
{
    if (t->up != NULL || t->attempt_t0 != 0)
        attempt_end(t, 0, "deadline");
    txn_release_upstream(t, 0);
    http_head_free(t->res); /* a response still being read for the policy */
    t->res = NULL;
    t->holding = 0;
    log_record_t *r = log_begin(LOG_WARN, "request deadline passed");
    log_str(r, "request_id", t->id);
    log_int(r, "attempt", t->attempt);
    log_end(r);
    if (t->last_res != NULL) {
        txn_forward_last(t);
        return;
    }
    txn_fail(t, 504, "no answer from the upstream before the request's deadline");
}

static int txn_attempt(txn_t *t, int fresh)
{
    proxy_t *p = t->client->proxy;
    int held = txn_hold(t);
    if (held != 0)
        return held < 0 ? -1 : 0;
    if (t->hold_t0 != 0) {
        uint64_t ms = (clock_now_ns() - t->hold_t0) / 1000000u;
        t->held_ms += ms;
        t->waited_ms += ms;
        t->hold_t0 = 0;
    }
    if (!t->noted) {
        t->noted = 1;
        budget_note_request(clock_wall_ms());
    }
    t->attempt_t0 = clock_now_ns();
    t->res_bytes = 0;
    t->body_fwd = 0;
    t->end_sent = 0;
    t->up_ready = 0;
    int rc = upstream_lease(p->upstream, t, fresh, on_up_ready, &t->up);
    if (rc < 0) {
        t->up = NULL;
        return txn_upstream_failed(t, "connect", 502, "could not open an upstream connection");
    }
    if (rc == 1) {
        t->up_reused = 1;
        return txn_up_ready(t);
    }
    return 0;
}

/* How long an attempt waits for its response once the request is sent:
 * the policy's settings.try_timeout_ms, else --first-byte-timeout. */
static uint64_t try_timeout(const txn_t *t)
{
    if (t->policy != NULL && policy_settings(t->policy)->try_timeout_ms > 0)
        return policy_settings(t->policy)->try_timeout_ms;
    return t->client->proxy->cfg->first_byte_timeout;
}

/* Forwards the request body that has arrived, framed for the upstream. */
static void txn_pump(txn_t *t)
{
    if (!t->up_ready || t->end_sent)
        return;
    io_t *io = &t->up->io;
    size_t n = t->body.len - t->body_fwd;
    if (n > 0) {
        if (t->req->flags & HTTP_F_CHUNKED) {
            char line[24];
            io_append(io, line, frame_chunk_size_line(line, n));
            io_append(io, t->body.data + t->body_fwd, n);
            io_append(io, "\r\n", 2);
        } else {
            io_append(io, t->body.data + t->body_fwd, n);
        }
        t->body_fwd = t->body.len;
        if (!t->replayable) {
            buf_clear(&t->body);
            t->body_fwd = 0;
        }
    }
    if (t->req_done) {
        if (t->req->flags & HTTP_F_CHUNKED)
            io_append(io, FRAME_LAST_CHUNK, FRAME_LAST_CHUNK_LEN);
        t->end_sent = 1;
        if (t->res == NULL)
            up_timer(t, try_timeout(t));
    }
}

/* Writes what both sides have gathered. Returns -1 when the transaction
 * ended because a connection broke. */
/* Reads the request body only as fast as the upstream takes it: stops the
 * client's reads while too much waits, resumes them once it drained. */
static void txn_body_backpressure(txn_t *t)
{
    if (t->req_done)
        return;
    client_t *c = t->client;
    size_t waiting = t->up_ready ? io_pending(&t->up->io) : t->body.len - t->body_fwd;
    int on = waiting <= HIGH_WATER;
    if (on == c->reading)
        return;
    client_read_on(c, on);
    /* While errord holds the body back, the client is not stalling: the
     * upstream's timer measures the wait instead. */
    client_timer(c, on ? CT_BODY : CT_NONE);
}

static int txn_flush(txn_t *t)
{
    client_t *c = t->client;
    if (t->up != NULL && io_flush(&t->up->io) < 0)
        return txn_upstream_failed(t, "reset", 502, "upstream connection broke");
    if (io_flush(&c->io) < 0) {
        client_abort(c, "client connection broke");
        return -1;
    }
    return 0;
}

static void txn_send_body(txn_t *t, const char *at, size_t n);
static void txn_response_done(txn_t *t, int extra_bytes);
static int txn_respond(txn_t *t, const verdict_t *v);
static void txn_commit(txn_t *t);

/* Checks the retry a verdict asks for against errord's rules, in order:
 * attempts, idempotency, the kept body, Retry-After's maximum, the deadline,
 * then the budget (which counts it). Returns -1 when it may go ahead, with
 * its delay in *delay_ms, or why it may not. */
static int retry_check(txn_t *t, const verdict_t *v, uint64_t *delay_ms)
{
    const policy_settings_t *s = policy_settings(t->policy);
    if (t->attempt >= s->attempts)
        return REFUSED_ATTEMPTS;
    if (!txn_repeatable(t) && !v->unsafe)
        return REFUSED_UNSAFE;
    if (!t->req_done)
        return REFUSED_BODY_INCOMPLETE;
    if (!t->replayable)
        return REFUSED_BODY_TOO_LARGE;
    int64_t retry_after = t->res != NULL ? http_retry_after_ms(t->res, clock_wall_ms()) : -1;
    if (v->after_ms >= 0) {
        *delay_ms = (uint64_t)v->after_ms;
    } else if (retry_after >= 0) {
        /* the upstream said when: that beats any backoff of ours */
        if ((uint64_t)retry_after > s->retry_after_max_ms)
            return REFUSED_RETRY_AFTER;
        *delay_ms = (uint64_t)retry_after;
    } else {
        *delay_ms = policy_backoff_ms(t->policy, t->attempt);
    }
    if (t->deadline_ns != 0 && clock_now_ns() + *delay_ms * 1000000u >= t->deadline_ns)
        return REFUSED_DEADLINE;
    if (s->budget_on && !budget_take_retry(s->budget_ratio, s->budget_min_per_s, clock_wall_ms()))
        return REFUSED_BUDGET;
    return -1;
}

static void log_refusal(const txn_t *t, const attempt_t *a, const char *why)
{
    log_record_t *r = log_begin(LOG_INFO, "retry refused");
    log_str(r, "request_id", t->id);
    log_int(r, "attempt", t->attempt);
    if (a != NULL && a->status)
        log_int(r, "status", a->status);
    else if (a != NULL)
        log_str(r, "error_kind", a->error);
    log_str(r, "refused", why);
    log_end(r);
}

/* The next attempt waits `delay_ms`, holding no upstream connection: the
 * client connection's timer counts it down. A complete response is kept,
 * in case no later attempt gets a real one. */
/* A retry made: in the access record's count and the metric, by reason. */
static void txn_count_retry(txn_t *t, const char *reason)
{
    t->retries++;
    metrics_retry(reason);
}

static void txn_schedule_retry(txn_t *t, attempt_t *a, const verdict_t *v, uint64_t delay_ms)
{
    if (t->res != NULL && t->res_done && !t->res_over) {
        http_head_free(t->last_res);
        buf_free(&t->last_body);
        t->last_res = t->res;
        t->last_body = t->res_body;
        t->res_body = (buf_t)BUF_INIT;
    } else {
        http_head_free(t->res);
    }
    t->res = NULL;
    buf_clear(&t->res_body);
    t->res_done = t->holding = t->res_over = 0;
    txn_count_retry(t, v->reason);
    t->waited_ms += delay_ms;
    if (a != NULL)
        a->delay_ms = (int64_t)delay_ms;
    if (v->cooldown)
        budget_cooldown(clock_now_ms() + delay_ms); /* everyone waits as long */
    t->client->timer_mode = CT_RETRY;
    client_timer_from_now(t->client, delay_ms);
}

/* Makes the retry a verdict asks for, unless errord refuses it (then the
 * refusal goes into the ledger, the log and the counts). Returns 1 when
 * scheduled. */
static int txn_apply_retry(txn_t *t, attempt_t *a, const verdict_t *v)
{
    uint64_t delay_ms = 0;
    int refused = retry_check(t, v, &delay_ms);
    if (refused >= 0) {
        const char *why = budget_refusal_name((refusal_t)refused);
        budget_refused((refusal_t)refused);
        if (a != NULL)
            a->refused = why;
        log_refusal(t, a, why);
        return 0;
    }
    txn_schedule_retry(t, a, v, delay_ms);
    return 1;
}

static void note_verdict(attempt_t *a, const verdict_t *v)
{
    if (a == NULL)
        return;
    a->verdict = verdict_name(v->kind);
    memcpy(a->reason, v->reason, sizeof a->reason);
    a->failure = v->failure;
}

/* The client gets the last complete real response an earlier attempt
 * received, rather than an answer errord makes up. Returns -1. */
static int txn_forward_last(txn_t *t)
{
    http_head_free(t->res);
    t->res = t->last_res;
    t->last_res = NULL;
    buf_t body = t->last_body;
    t->last_body = (buf_t)BUF_INIT;
    t->res_done = 1;
    txn_commit(t);
    if (body.len > 0)
        txn_send_body(t, body.data, body.len);
    buf_free(&body);
    txn_response_done(t, 0);
    return -1;
}

/* The upstream failed without a usable response. A pooled connection that
 * turned out dead gets the request once more on a fresh connection; then
 * the policy's error handler decides; without one (or when it passes)
 * errord answers 502/504, or forwards an earlier attempt's real response.
 * Returns -1 when the transaction ended. */
static int txn_upstream_failed(txn_t *t, const char *kind, int status, const char *message)
{
    proxy_t *p = t->client->proxy;
    /* A pooled connection can die just as it is reused. Sending again is safe
     * only for a request that may be repeated (RFC 9112 9.3.1). */
    int stale = t->up_reused && t->res_bytes == 0 && !t->committed && !t->stale_retried &&
                t->replayable && strcmp(kind, "reset") == 0 && txn_repeatable(t);
    attempt_t *a = attempt_end(t, 0, kind);
    txn_release_upstream(t, 0);
    if (stale) {
        /* The upstream closed it as the request arrived, and nothing came
         * back: a request that may be repeated goes again, once, on a fresh
         * connection (like a retry, counted as one). */
        if (a != NULL) {
            a->verdict = "retry";
            snprintf(a->reason, sizeof a->reason, "stale_connection");
        }
        txn_count_retry(t, "stale_connection");
        t->stale_retried = 1;
        return txn_attempt(t, 1);
    }
    log_record_t *r = log_begin(LOG_WARN, "upstream failed");
    log_str(r, "request_id", t->id);
    log_str(r, "kind", kind);
    log_str(r, "error", message);
    log_str(r, "upstream", p->cfg->upstream);
    log_end(r);
    if (!t->committed && t->policy != NULL && policy_handles_errors(t->policy)) {
        policy_input_t in = {
            .req = t->req,
            .request_id = t->id,
            .attempt = t->attempt,
            .elapsed_ns = clock_now_ns() - t->t0,
            .attempt_ns = a != NULL ? a->ns : 0,
            .err_kind = kind,
            .err_message = message,
        };
        verdict_t v = VERDICT_INIT;
        policy_decide(t->policy, &in, &v);
        note_verdict(a, &v);
        note_seen(t, a, message);
        int scheduled = v.kind == VERDICT_RETRY && txn_apply_retry(t, a, &v);
        int responded = v.kind == VERDICT_RESPOND && txn_respond(t, &v) < 0;
        verdict_reset(&v);
        if (scheduled)
            return 0;
        if (responded)
            return -1;
    }
    if (t->last_res != NULL && !t->committed)
        return txn_forward_last(t);
    return txn_fail(t, status, message);
}

/* Sends the response head to the client, with errord's framing. */
static void txn_commit(txn_t *t)
{
    client_t *c = t->client;
    buf_t b = BUF_INIT;

    t->committed = 1;
    t->status = t->res->status;
    if (c->timer_mode == CT_DEADLINE)
        client_timer(c, CT_NONE); /* the answer has begun: no deadline cuts it */
    frame_response_t o = {
        .date = http_date(c->proxy),
        .request_id = t->id,
        .client_version = t->req->version,
        .keep_alive = client_wants_more(t),
    };
    switch (frame_response_head(&b, t->res, &o)) {
    case FRAME_BODY_CHUNKED: t->chunk_out = 1; break;
    case FRAME_BODY_TO_CLOSE: t->close_out = 1; break;
    case FRAME_BODY_AS_IS: break;
    }
    t->keep_alive = o.keep_alive;
    io_append(&c->io, b.data, b.len);
    buf_free(&b);
}

/* Whether the upstream connection can take another request after this
 * response: it is complete, nothing followed it, nobody asked to close. */
static int response_reusable(const txn_t *t, int extra_bytes)
{
    const http_head_t *res = t->res;
    return t->res_done && !extra_bytes && t->end_sent &&
           !(res->flags & (HTTP_F_BODY_TO_EOF | HTTP_F_CLOSE)) &&
           (res->version == 11 || (res->flags & HTTP_F_KEEP_ALIVE));
}

/* The response is complete: end the body and the transaction. */
static void txn_response_done(txn_t *t, int extra_bytes)
{
    if (t->chunk_out)
        io_append(&t->client->io, FRAME_LAST_CHUNK, FRAME_LAST_CHUNK_LEN);
    int reusable = response_reusable(t, extra_bytes);
    attempt_end(t, t->res->status, NULL); /* unless the policy's verdict closed it */
    txn_release_upstream(t, reusable);
    txn_finish(t);
}

/* Sends response body bytes to the client, framed. */
static void txn_send_body(txn_t *t, const char *at, size_t n)
{
    io_t *out = &t->client->io;
    if (t->chunk_out) {
        char line[24];
        io_append(out, line, frame_chunk_size_line(line, n));
        io_append(out, at, n);
        io_append(out, "\r\n", 2);
    } else {
        io_append(out, at, n);
    }
    t->bytes_out += n;
}

/* Answers with the policy's respond{} verdict. Returns -1 (the transaction
 * is over). */
static int txn_respond(txn_t *t, const verdict_t *v)
{
    client_t *c = t->client;
    int no_body = v->status == 204 || v->status == 304;
    buf_t b = BUF_INIT;
    t->committed = 1;
    t->status = v->status;
    t->keep_alive = client_wants_more(t);
    buf_lit(&b, "HTTP/1.1 ");
    buf_put_u64(&b, (uint64_t)v->status);
    buf_lit(&b, " ");
    buf_puts(&b, http_reason(v->status));
    buf_lit(&b, "\r\n");
    buf_append(&b, v->headers.data, v->headers.len);
    if (!no_body)
        frame_content_length(&b, (int64_t)v->body.len);
    buf_lit(&b, "Date: ");
    buf_puts(&b, http_date(c->proxy));
    buf_lit(&b, "\r\nX-Request-Id: ");
    buf_puts(&b, t->id);
    buf_lit(&b, "\r\n");
    if (!t->keep_alive)
        buf_lit(&b, "Connection: close\r\n");
    else if (t->req->version == 10)
        buf_lit(&b, "Connection: keep-alive\r\n");
    buf_lit(&b, "\r\n");
    if (!no_body && t->req->method != HTTP_M_HEAD) {
        buf_append(&b, v->body.data, v->body.len);
        t->bytes_out = v->body.len;
    }
    io_append(&c->io, b.data, b.len);
    buf_free(&b);
    txn_finish(t);
    return -1;
}

/* The held response goes to its handler. Returns 0 when the response keeps
 * streaming from the same connection, -1 when the connection was let go
 * (retry, respond, or the response is complete). */
static int txn_decide(txn_t *t, int extra_bytes)
{
    policy_input_t in = {
        .req = t->req,
        .request_id = t->id,
        .attempt = t->attempt,
        .elapsed_ns = clock_now_ns() - t->t0,
        .res = t->res,
        .body = t->res_over ? NULL : (t->res_body.data ? t->res_body.data : ""),
        .body_len = t->res_over ? 0 : t->res_body.len,
        .attempt_ns = clock_now_ns() - t->attempt_t0,
    };
    verdict_t v = VERDICT_INIT;
    policy_decide(t->policy, &in, &v);
    t->holding = 0;
    attempt_t *a = attempt_end(t, t->res->status, NULL);
    note_verdict(a, &v);
    note_seen(t, a, NULL);
    if (v.kind == VERDICT_RETRY) {
        int reusable = response_reusable(t, extra_bytes);
        if (txn_apply_retry(t, a, &v)) {
            verdict_reset(&v);
            txn_release_upstream(t, reusable);
            return -1;
        }
    } else if (v.kind == VERDICT_RESPOND) {
        txn_release_upstream(t, response_reusable(t, extra_bytes));
        txn_respond(t, &v);
        verdict_reset(&v);
        return -1;
    }
    verdict_reset(&v);
    txn_commit(t);
    if (t->res_body.len > 0)
        txn_send_body(t, t->res_body.data, t->res_body.len);
    buf_free(&t->res_body);
    if (t->res_done) {
        txn_response_done(t, extra_bytes);
        return -1;
    }
    return 0;
}

/* ---- upstream events ------------------------------------------------------------ */

static int on_res_head(void *ud, http_head_t *head)
{
    upconn_t *u = ud;
    txn_t *t = u->owner;
    if (head->status < 200) {
        http_head_free(head); /* interim: the final response follows */
        return 0;
    }
    t->res = head;
    if (t->policy != NULL && policy_handles(t->policy, head->status))
        t->holding = 1; /* its handler decides once the body is in (or too big) */
    else
        txn_commit(t);
    return 0; /* the idle timer is set after this read, if the body goes on */
}

static int on_res_body(void *ud, const char *at, size_t n)
{
    upconn_t *u = ud;
    txn_t *t = u->owner;
    if (t->holding) {
        /* Past body_limit the handler is asked at once (body = nil); until
         * then at most one more read lands here. */
        if (buf_append(&t->res_body, at, n) < 0)
            return -1;
        if (t->res_body.len > policy_settings(t->policy)->body_limit)
            t->res_over = 1;
        return 0;
    }
    txn_send_body(t, at, n);
    return 0;
}

static int on_res_end(void *ud)
{
    upconn_t *u = ud;
    txn_t *t = u->owner;
    if (t->res != NULL)
        t->res_done = 1;
    return 0;
}

static const http_handler_t RESPONSE_HANDLER = {on_res_head, on_res_body, on_res_end};

static void on_up_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    upconn_t *u = ((io_t *)s->data)->owner;
    txn_t *t = u->owner;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (http_parser_finish(u->parser) == 0 && t->res_done) {
            if (t->holding)
                txn_decide(t, 1);
            else
                txn_response_done(t, 0);
            return;
        }
        if (t->res == NULL)
            txn_upstream_failed(t, "reset", 502,
                                "upstream closed the connection before responding");
        else
            txn_upstream_failed(t, "reset", 502, "upstream closed the connection mid-response");
        return;
    }
    const char *data = b->base;
    size_t n = (size_t)nread;
    t->res_bytes += n;
    while (n > 0) {
        ssize_t used = http_parser_feed(u->parser, data, n);
        if (used < 0) {
            const http_error_t *e = http_parser_error(u->parser);
            log_record_t *r = log_begin(LOG_WARN, "invalid response from upstream");
            log_str(r, "request_id", t->id);
            log_str(r, "error", e->message);
            log_end(r);
            txn_upstream_failed(t, "protocol", 502, "invalid response from upstream");
            return;
        }
        data += used;
        n -= (size_t)used;
        if (!http_parser_ended(u->parser))
            break;
        if (!t->res_done) {
            http_parser_resume(u->parser); /* after an interim response */
            continue;
        }
        if (t->holding)
            txn_decide(t, n > 0);
        else
            txn_response_done(t, n > 0);
        return;
    }
    if (t->holding && t->res_over && txn_decide(t, 0) < 0)
        return;
    if (io_pending(&t->client->io) > HIGH_WATER) {
        /* The client reads slower than the upstream sends: stop reading the
         * upstream (not its fault now) and time the client instead. */
        t->up_paused = 1;
        upconn_pause(u);
        uv_timer_stop(&u->io.timer);
        client_timer(t->client, CT_SEND);
    } else if (t->res != NULL) {
        up_timer(t, t->client->proxy->cfg->upstream_idle_timeout);
    }
    txn_flush(t);
}

static void on_up_timeout(uv_timer_t *timer)
{
    upconn_t *u = ((io_t *)timer->data)->owner;
    txn_t *t = u->owner;
    const char *why = !t->end_sent     ? "upstream stopped reading the request"
                      : t->res == NULL ? "upstream did not respond in time"
                                       : "upstream stalled mid-response";
    txn_upstream_failed(t, "timeout", 504, why);
}

static void on_up_drain(io_t *io)
{
    upconn_t *u = io->owner;
    txn_t *t = u->owner;
    if (!t->end_sent)
        up_timer(t, t->client->proxy->cfg->upstream_idle_timeout);
    txn_body_backpressure(t);
}

static void on_up_write_error(io_t *io)
{
    upconn_t *u = io->owner;
    txn_upstream_failed(u->owner, "reset", 502, "upstream connection broke");
}

/* ---- request events ---------------------------------------------------------------- */

static int on_req_head(void *ud, http_head_t *head)
{
    client_t *c = ud;
    proxy_t *p = c->proxy;
    txn_t *t = malloc(sizeof *t);
    if (t == NULL) {
        http_head_free(head);
        return -1;
    }
    memset(t, 0, offsetof(txn_t, attempts));
    t->client = c;
    t->req = head;
    t->t0 = clock_now_ns();
    c->head_ms = 0;
    t->attempt = 1;
    t->policy = p->policy;
    t->replay_limit = REPLAY_LIMIT;
    if (t->policy != NULL) {
        policy_hold(t->policy);
        t->replay_limit = policy_settings(t->policy)->replay_limit;
    }
    t->replayable = head->content_length <= (int64_t)t->replay_limit;
    /* the deadline: X-Request-Timeout (500, 500ms, 2s...), else the policy's */
    uint64_t deadline_ms = t->policy != NULL ? policy_settings(t->policy)->deadline_ms : 0;
    const http_header_t *rt = http_head_find(head, "x-request-timeout");
    if (rt != NULL && rt->value_len > 0 && rt->value_len < 32) {
        char v[32];
        uint64_t ms;
        memcpy(v, rt->value, rt->value_len);
        v[rt->value_len] = '\0';
        if (config_parse_duration(v, &ms) == 0 && ms > 0)
            deadline_ms = ms < 3600000 ? ms : 3600000;
    }
    t->deadline_ns = deadline_ms ? t->t0 + deadline_ms * 1000000u : 0;
    c->txn = t;
    request_id(t, p);

    if (p->cfg->max_body_size > 0 && head->content_length > (int64_t)p->cfg->max_body_size) {
        t->status = 413;
        return -1;
    }
    build_request_head(t, p);
    if ((head->flags & HTTP_F_EXPECT_CONTINUE) && head->version == 11 &&
        !(head->flags & HTTP_F_NO_BODY))
        io_append(&c->io, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 0;
}

static int on_req_body(void *ud, const char *at, size_t n)
{
    client_t *c = ud;
    txn_t *t = c->txn;
    const config_t *cfg = c->proxy->cfg;
    t->body_in += n;
    if (cfg->max_body_size > 0 && t->body_in > cfg->max_body_size) {
        t->status = 413;
        return -1;
    }
    if (t->replayable && t->body_in > t->replay_limit)
        t->replayable = 0;
    if (!t->replayable && t->body_fwd > 0 && t->body_fwd == t->body.len) {
        buf_clear(&t->body);
        t->body_fwd = 0;
    }
    if (buf_append(&t->body, at, n) < 0)
        return -1;
    return 0;
}

static int on_req_end(void *ud)
{
    client_t *c = ud;
    c->txn->req_done = 1;
    return 0;
}

static const http_handler_t REQUEST_HANDLER = {on_req_head, on_req_body, on_req_end};

/* ---- client connections ---------------------------------------------------------- */

static void on_client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void client_reject(client_t *c, int status, const char *message);

static void client_read_on(client_t *c, int on)
{
    if (c->io.closing || c->io.close_after || on == c->reading)
        return;
    if (on && uv_read_start((uv_stream_t *)&c->io.tcp, on_alloc, on_client_read) < 0)
        return;
    if (!on)
        uv_read_stop((uv_stream_t *)&c->io.tcp);
    c->reading = on;
}

static void on_client_timeout(uv_timer_t *timer)
{
    client_t *c = ((io_t *)timer->data)->owner;
    if (c->timer_mode == CT_IDLE) {
        client_close(c, NULL);
        return;
    }
    if (c->timer_mode == CT_SEND) {
        client_abort(c, "client stopped reading the response");
        return;
    }
    if (c->timer_mode == CT_RETRY || c->timer_mode == CT_HOLD) {
        txn_t *t = c->txn;
        if (c->timer_mode == CT_RETRY)
            t->attempt++;
        c->timer_mode = CT_NONE;
        if (txn_attempt(t, 0) == 0 && c->txn == t) {
            txn_arm_deadline(t);
            txn_flush(t);
        }
        return;
    }
    if (c->timer_mode == CT_DEADLINE) {
        c->timer_mode = CT_NONE;
        txn_deadline_passed(c->txn);
        return;
    }
    if (c->txn != NULL) {
        client_reject(c, 408, "request body not received in time");
        return;
    }
    client_reject(c, 408, "request head not received in time");
}

static void client_timer(client_t *c, int mode)
{
    const config_t *cfg = c->proxy->cfg;
    c->timer_mode = mode;
    switch (mode) {
    case CT_HEADER:
        uv_timer_start(&c->io.timer, on_client_timeout, cfg->client_header_timeout, 0);
        break;
    case CT_BODY:
    case CT_IDLE:
    case CT_SEND:
        uv_timer_start(&c->io.timer, on_client_timeout, cfg->client_idle_timeout, 0);
        break;
    default:
        uv_timer_stop(&c->io.timer);
    }
}

/* A request could not be read: answer it with errord's error and close. */
static void client_reject(client_t *c, int status, const char *message)
{
    txn_t *t = c->txn;
    if (t == NULL) {
        write_error(c, NULL, status, message, 0);
        count_reject(c, status);
        log_record_t *r = log_begin(LOG_INFO, "rejected a request");
        log_str(r, "client", c->addr);
        log_int(r, "status", status);
        log_str(r, "error", message);
        log_end(r);
    } else {
        t->error = message;
        t->status = status;
        if (!t->committed) {
            t->committed = 1;
            write_error(c, t, status, message, 0);
        }
    }
    client_close(c, NULL);
}

/* Parses what the client sent and forwards what can go upstream. */
static void client_feed(client_t *c, const char *data, size_t n)
{
    if (c->txn != NULL && c->txn->req_done) {
        /* The next request waits until this one is answered. */
        buf_append(&c->in, data, n);
        if (c->in.len > PIPELINE_LIMIT)
            client_read_on(c, 0);
        return;
    }
    if (c->txn == NULL && c->head_ms == 0 && n > 0)
        c->head_ms = uv_now(c->io.timer.loop); /* the loop's time: no clock read per request */
    ssize_t used = http_parser_feed(c->parser, data, n);
    txn_t *t = c->txn;
    if (used < 0) {
        const http_error_t *e = http_parser_error(c->parser);
        if (t != NULL && t->status == 413)
            client_reject(c, 413, "request body too large");
        else if (e->status != 0)
            client_reject(c, e->status, e->message);
        else
            client_abort(c, "out of memory");
        return;
    }
    if ((size_t)used < n)
        buf_append(&c->in, data + used, n - (size_t)used);
    if (t == NULL) {
        /* a head still incomplete: it has from its first byte on */
        if (c->timer_mode != CT_HEADER)
            client_timer(c, CT_HEADER);
        return;
    }
    if (c->timer_mode != CT_HOLD)
        client_timer(c, t->req_done ? CT_NONE : CT_BODY);
    if (!t->started) {
        t->started = 1;
        if (txn_attempt(t, 0) < 0)
            return;
    } else {
        txn_pump(t);
    }
    txn_arm_deadline(t);
    if (txn_flush(t) == 0)
        txn_body_backpressure(t);
}

static void on_client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    client_t *c = ((io_t *)s->data)->owner;
    if (nread > 0) {
        client_feed(c, b->base, (size_t)nread);
        return;
    }
    if (nread == 0)
        return;
    if (nread != UV_EOF) {
        client_abort(c, "client connection reset");
        return;
    }
    /* EOF: the client will send nothing more. */
    c->eof = 1;
    client_read_on(c, 0);
    txn_t *t = c->txn;
    if (t == NULL) {
        client_close(c, NULL);
    } else if (!t->req_done) {
        t->status = 499;
        client_abort(c, "client closed the connection mid-request");
    }
    /* else: half-closed after a whole request; the answer still goes out */
}

/* After a transaction: wait for, or parse, the next request; or close. */
static void client_next(client_t *c, int keep_alive)
{
    if (c->io.closing || c->io.close_after)
        return;
    if (!keep_alive || (c->eof && c->in.len == 0) || c->proxy->draining) {
        client_close(c, NULL);
        return;
    }
    if (io_flush(&c->io) < 0) {
        client_abort(c, "client connection broke");
        return;
    }
    http_parser_resume(c->parser);
    client_timer(c, CT_IDLE);
    if (c->in.len > 0) {
        buf_t held = c->in;
        c->in = (buf_t)BUF_INIT;
        client_feed(c, held.data, held.len);
        buf_free(&held);
    }
    if (c->io.closing || c->io.close_after)
        return;
    if (c->eof) {
        /* Half-closed: what it sent is served; an incomplete request never will be. */
        if (c->txn == NULL || !c->txn->req_done)
            client_close(c, NULL);
        return;
    }
    if (c->txn == NULL || !c->txn->req_done)
        client_read_on(c, 1);
}

static void on_client_closed(io_t *io)
{
    client_t *c = io->owner;
    proxy_t *p = c->proxy;
    list_remove(&c->link);
    http_parser_free(c->parser);
    buf_free(&c->in);
    free(c);
    atomic_fetch_sub(&p->shared->connections, 1);
    maybe_done(p);
}

/* Ends the transaction in progress, if any, as the connection goes away. */
static void client_drop_txn(client_t *c, const char *why)
{
    txn_t *t = c->txn;
    if (t == NULL)
        return;
    c->txn = NULL;
    if (why != NULL && t->error == NULL)
        t->error = why;
    if (t->status == 0)
        t->status = 499; /* the client went away before an answer */
    if (t->up != NULL)
        attempt_end(t, 0, "aborted");
    txn_release_upstream(t, 0);
    count_txn(t);
    log_access(t);
    txn_free(t);
}

/* Closes the connection after what is gathered is written: the client sees
 * every byte sent so far, then the end of the connection. `why`, when given,
 * says what broke. */
static void client_close(client_t *c, const char *why)
{
    client_drop_txn(c, why);
    uv_timer_stop(&c->io.timer);
    io_close_after_flush(&c->io, LINGER_MS);
}

/* Closes the connection at once: the peer is gone or must be cut off. */
static void client_abort(client_t *c, const char *why)
{
    client_drop_txn(c, why);
    io_close(&c->io);
}

static void on_client_write_error(io_t *io)
{
    client_abort(io->owner, "client connection broke");
}

static void on_client_drain(io_t *io)
{
    client_t *c = io->owner;
    txn_t *t = c->txn;
    if (t != NULL && t->up_paused && t->up != NULL) {
        t->up_paused = 0;
        upconn_resume(t->up);
        up_timer(t, c->proxy->cfg->upstream_idle_timeout);
        client_timer(c, t->req_done ? CT_NONE : CT_BODY);
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    proxy_t *p = server->loop->data;
    if (status < 0)
        return;
    client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    c->proxy = p;
    list_init(&c->link);
    io_init(p->loop, &c->io, c);
    c->io.on_closed = on_client_closed;
    c->io.on_error = on_client_write_error;
    c->io.on_drain = on_client_drain;
    list_push_back(&p->clients, &c->link);
    size_t open = atomic_fetch_add(&p->shared->connections, 1) + 1;
    if (uv_accept(server, (uv_stream_t *)&c->io.tcp) < 0) {
        io_close(&c->io);
        return;
    }
    io_peer_addr(&c->io, c->addr, sizeof c->addr);
    if (open > p->cfg->max_connections) {
        write_error(c, NULL, 503, "too many connections", 0);
        count_reject(c, 503);
        log_record_t *r = log_begin(LOG_WARN, "connection limit reached; refused a client");
        log_str(r, "client", c->addr);
        log_int(r, "max_connections", (int64_t)p->cfg->max_connections);
        log_end(r);
        io_close_after_flush(&c->io, 0);
        return;
    }
    c->parser = http_parser_new(HTTP_PARSE_REQUEST, &p->req_limits, &REQUEST_HANDLER, c);
    if (c->parser == NULL) {
        io_close(&c->io);
        return;
    }
    uv_tcp_nodelay(&c->io.tcp, 1);
    client_timer(c, CT_HEADER);
    client_read_on(c, 1);
}

/* ---- the proxy ----------------------------------------------------------------------- */

static void on_check(uv_check_t *h)
{
    proxy_t *p = h->data;
    log_flush();
    metric_set(&p->metrics->upstream_open, upstream_open_count(p->upstream));
    metric_set(&p->metrics->upstream_idle, upstream_idle_count(p->upstream));
    unsigned long full, resumed;
    upstream_tls_counts(p->upstream, &full, &resumed);
    metric_set(&p->metrics->tls_full, full);
    metric_set(&p->metrics->tls_resumed, resumed);
}

proxy_t *proxy_new(uv_loop_t *loop, const config_t *cfg, proxy_shared_t *shared,
                   policy_t *policy, char *err, size_t errlen)
{
    proxy_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    p->policy = policy;
    if (policy != NULL)
        policy_hold(policy);
    p->rbuf = malloc(READ_BUF_SIZE);
    p->metrics = metrics_new_worker(); /* lives as long as the process: a scrape reads it */
    if (p->rbuf == NULL || p->metrics == NULL) {
        policy_release(p->policy);
        free(p);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    p->loop = loop;
    p->cfg = cfg;
    p->shared = shared;
    p->req_limits.max_line = cfg->max_request_line;
    p->req_limits.max_head = cfg->max_header_size;
    p->res_limits.max_line = cfg->max_header_size;
    p->res_limits.max_head = cfg->max_header_size;
    list_init(&p->clients);
    rand_seed(&p->rng);
    p->upstream_owner.alloc = on_alloc;
    p->upstream_owner.on_read = on_up_read;
    p->upstream_owner.response = &RESPONSE_HANDLER;
    p->upstream_owner.limits = &p->res_limits;
    p->upstream = upstream_new(loop, cfg, &p->upstream_owner, err, errlen);
    if (p->upstream == NULL) {
        policy_release(p->policy);
        free(p->rbuf);
        free(p);
        return NULL;
    }
    loop->data = p;
    uv_tcp_init(loop, &p->listener);
    uv_check_init(loop, &p->flusher);
    p->flusher.data = p;
    uv_check_start(&p->flusher, on_check);
    p->open_handles = 2;
    return p;
}

void proxy_set_policy(proxy_t *p, policy_t *policy)
{
    policy_hold(policy);
    policy_release(p->policy); /* freed once its last request ends */
    p->policy = policy;
}

int proxy_listen(proxy_t *p)
{
    const struct sockaddr *addr = (const struct sockaddr *)&p->cfg->listen_addr;
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (p->cfg->workers > 1)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    socklen_t len = addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                : sizeof(struct sockaddr_in);
    if (bind(fd, addr, len) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    int rc = uv_tcp_open(&p->listener, fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    rc = uv_listen((uv_stream_t *)&p->listener, 1024, on_connection);
    if (rc < 0)
        return rc;
    p->listening = 1;
    return 0;
}

int proxy_address(proxy_t *p, char *out, size_t n)
{
    return io_listen_addr(&p->listener, out, n);
}

static void on_proxy_handle_closed(uv_handle_t *h)
{
    proxy_t *p = h->loop->data;
    if (--p->open_handles == 0 && p->on_done != NULL)
        p->on_done(p->done_arg);
}

static void on_upstream_closed(void *arg)
{
    proxy_t *p = arg;
    uv_close((uv_handle_t *)&p->flusher, on_proxy_handle_closed);
}

/* When draining and the last client is gone, close the rest. */
static void maybe_done(proxy_t *p)
{
    if (!p->draining || !list_empty(&p->clients) || p->on_done == NULL)
        return;
    if (uv_is_closing((uv_handle_t *)&p->flusher))
        return;
    upstream_shutdown(p->upstream, on_upstream_closed, p);
}

void proxy_drain(proxy_t *p, void (*done)(void *arg), void *arg)
{
    int again = p->draining;
    p->draining = 1;
    p->on_done = done;
    p->done_arg = arg;
    if (!again)
        uv_close((uv_handle_t *)&p->listener, on_proxy_handle_closed);

    list_t *pos, *tmp;
    list_for_each_safe(pos, tmp, &p->clients)
    {
        client_t *c = list_entry(pos, client_t, link);
        if (again)
            client_abort(c, "shut down before the request finished");
        else if (c->txn == NULL && !c->io.closing && !c->io.close_after)
            client_close(c, NULL);
    }
    if (list_empty(&p->clients))
        maybe_done(p);
}

void proxy_free(proxy_t *p)
{
    if (p == NULL)
        return;
    upstream_free(p->upstream);
    policy_release(p->policy);
    free(p->rbuf);
    free(p);
}
