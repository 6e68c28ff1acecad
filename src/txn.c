/* txn: one client request's life (see txn.h).
 *
 * Parser callbacks only forward bytes and set flags; what follows from them
 * (finishing the transaction, releasing a connection) happens after the
 * parser returns, never from inside it. */
#include "txn.h"
#include "txn_int.h"

#include "access.h"
#include "budget.h"
#include "buf.h"
#include "clock.h"
#include "frame.h"
#include "log.h"
#include "retry.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int txn_attempt(txn_t *t, int fresh);
static int txn_forward_last(txn_t *t);
static int txn_respond(txn_t *t, const verdict_t *v);

const char *txn_date(txn_env_t *env)
{
    time_t now = time(NULL);
    if (now != env->date_at) {
        clock_http_date(now, env->date);
        env->date_at = now;
    }
    return env->date;
}

/* ---- errord's own answers (SPEC §4) ------------------------------------------ */

/* Writes a complete JSON error response to the client, with `extra`
 * header lines ("Name: value\r\n...", or NULL). */
static void txn_write_error(txn_t *t, int status, const char *message, int keep,
                            const char *extra)
{
    buf_t body = BUF_INIT, out = BUF_INIT;
    frame_error_body(&body, message);
    frame_local_t o = {
        .status = status,
        .type = "application/json",
        .headers = extra,
        .headers_len = extra != NULL ? strlen(extra) : 0,
        .has_length = 1,
        .body_len = body.len,
        .date = txn_date(t->env),
        .request_id = t->id,
        .client_version = t->req->version,
        .keep_alive = keep,
    };
    frame_local_head(&out, &o);
    if (t->req->method != HTTP_M_HEAD)
        buf_append(&out, body.data, body.len);
    io_append(t->out, out.data, out.len);
    buf_free(&out);
    buf_free(&body);
}

/* ---- the record ------------------------------------------------------------------ */

/* Counts the finished transaction and its attempts in the metrics. */
static void count_txn(txn_t *t)
{
    metrics_t *m = t->env->metrics;
    metrics_verdict_t final = MV_NONE;
    for (int i = 0; i < t->n_attempts; i++) {
        const access_attempt_t *a = &t->attempts[i];
        if (a->status > 0 && a->status < METRICS_STATUS)
            metric_add(&m->upstream_responses[a->status], 1);
        else
            metric_add(&m->upstream_errors[metrics_error_of(a->error)], 1);
        if (a->failure != NULL)
            metric_add(&m->policy_errors[metrics_policy_error_of(a->failure)], 1);
        metrics_observe(&m->attempt_seconds, a->ns);
    }
    if (t->n_attempts > 0) {
        verdict_kind_t v = t->attempts[t->n_attempts - 1].verdict;
        final = v == VERDICT_RETRY ? MV_RETRY : v == VERDICT_RESPOND ? MV_RESPOND : MV_PASS;
    }
    int status = t->status > 0 && t->status < METRICS_STATUS ? t->status : 0;
    metric_add(&m->requests[status][final], 1);
    metrics_observe(&m->request_seconds, clock_now_ns() - t->t0);
}

static const policy_settings_t *txn_settings(const txn_t *t)
{
    return t->policy != NULL ? policy_settings(t->policy) : NULL;
}

/* Writes the access record. */
static void log_access(txn_t *t)
{
    access_record_t r = {
        .request_id = t->id,
        .client = t->client_addr,
        .req = t->req,
        .status = t->status,
        .upstream_status = t->res != NULL ? t->res->status : -1,
        .bytes_in = t->body_in,
        .bytes_out = t->bytes_out,
        .duration_ns = clock_now_ns() - t->t0,
        .attempts = t->attempts,
        .n_attempts = t->n_attempts,
        .seen = &t->seen,
        .retries = t->retries,
        .waited_ms = t->waited_ms,
        .policy_sha256 = t->policy != NULL ? policy_sha256(t->policy) : NULL,
        .settings = txn_settings(t),
        .error = t->error,
    };
    access_write(&r);
}

/* Notes in ledger line `a` what its handler was shown: the response, or
 * the failure's `message`. */
static void note_seen(txn_t *t, access_attempt_t *a, const char *message)
{
    access_note_seen(&t->seen, a, txn_settings(t), message, t->res, &t->res_body, t->res_over);
}

/* ---- the transaction --------------------------------------------------------------- */

/* Closes the ledger line of the attempt in flight; returns it (NULL when
 * there is none) so the verdict can be filled in. */
static access_attempt_t *attempt_end(txn_t *t, int status, const char *error)
{
    if (t->attempt_t0 == 0 || t->n_attempts >= MAX_ATTEMPTS)
        return NULL;
    access_attempt_t *a = &t->attempts[t->n_attempts++];
    memset(a, 0, sizeof *a);
    a->status = status;
    a->error = error;
    a->verdict = VERDICT_PASS;
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
    int keep = t->keep_alive && !t->close_out;
    const txn_conn_ops_t *ops = t->ops;
    void *conn = t->conn;
    txn_release_upstream(t, 0);
    count_txn(t);
    log_access(t);
    txn_free(t);
    ops->done(conn, keep);
}

/* The client's X-Request-Id when it is one errord can pass on and log,
 * else 32 random hex digits. */
static void request_id(txn_t *t)
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
            return;
        }
    }
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        uint64_t v = rand_next(&t->env->rng);
        for (int i = 0; i < 16; i++, v >>= 4)
            t->id[half * 16 + i] = hex[v & 15];
    }
    t->id[32] = '\0';
}

/* The request head as the upstream gets it (frame_request_head), with Host
 * set to the upstream's authority unless --preserve-host keeps the client's. */
static void build_request_head(txn_t *t)
{
    const http_head_t *r = t->req;
    const config_t *cfg = t->env->cfg;
    frame_request_t o = {
        .host = cfg->upstream_authority,
        .host_len = strlen(cfg->upstream_authority),
        .client_addr = t->client_addr,
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

int txn_wants_more(const txn_t *t)
{
    if (!t->req_done || !t->ops->open(t->conn))
        return 0;
    if (t->req->version == 10)
        return (t->req->flags & HTTP_F_KEEP_ALIVE) != 0;
    return !(t->req->flags & HTTP_F_CLOSE);
}

/* Answers the transaction with errord's own error, then ends it. */
static int txn_fail(txn_t *t, int status, const char *message)
{
    if (t->error == NULL)
        t->error = message;
    if (t->committed) {
        /* Part of a response is out: the client must see it broken (and
         * the record keeps the status it was sent). */
        t->ops->close(t->conn, message);
        return -1;
    }
    t->status = status;
    t->committed = 1;
    t->keep_alive = txn_wants_more(t);
    txn_write_error(t, status, message, t->keep_alive, NULL);
    txn_finish(t);
    return -1;
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
    if (t->deadline_ns != 0 && until * 1000000u >= t->deadline_ns) {
        if (t->last_res != NULL)
            return txn_forward_last(t);
        char extra[64];
        snprintf(extra, sizeof extra, "Retry-After: %llu\r\n",
                 (unsigned long long)((until - now + 999) / 1000));
        t->status = 429;
        t->error = "held by a cooldown past the request's deadline";
        t->committed = 1;
        t->keep_alive = txn_wants_more(t);
        txn_write_error(t, 429, "the upstream asked to slow down; try again later",
                        t->keep_alive, extra);
        txn_finish(t);
        return -1;
    }
    if (t->hold_t0 == 0)
        t->hold_t0 = clock_now_ns();
    t->ops->wait(t->conn, WAIT_HOLD, until - now);
    return 1;
}

/* Times the request's deadline while it waits for its answer. */
static void txn_arm_deadline(txn_t *t)
{
    txn_wait_t w = t->ops->waiting(t->conn);
    if (t->deadline_ns == 0 || t->committed || !t->req_done || w == WAIT_RETRY || w == WAIT_HOLD)
        return;
    uint64_t now = clock_now_ns();
    t->ops->wait(t->conn, WAIT_DEADLINE,
                 t->deadline_ns > now ? (t->deadline_ns - now + 999999) / 1000000 : 0);
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

/* Starts an attempt: sends the request on a pooled or new connection,
 * unless a cooldown holds it. Returns -1 when the transaction ended. */
static int txn_attempt(txn_t *t, int fresh)
{
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
    return txn_connect(t, fresh);
}

static void log_refusal(const txn_t *t, const access_attempt_t *a, const char *why)
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

/* A retry made: in the access record's count and the metric, by reason. */
static void txn_count_retry(txn_t *t, const char *reason)
{
    t->retries++;
    metrics_retry(reason);
}

/* The next attempt waits `delay_ms`, holding no upstream connection: the
 * client connection's timer counts it down. A complete response is kept,
 * in case no later attempt gets a real one. */
static void txn_schedule_retry(txn_t *t, access_attempt_t *a, const verdict_t *v,
                               uint64_t delay_ms)
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
    t->ops->wait(t->conn, WAIT_RETRY, delay_ms);
}

/* Makes the retry a verdict asks for, unless errord refuses it (then the
 * refusal goes into the ledger, the log and the counts). Returns 1 when
 * scheduled. */
static int txn_apply_retry(txn_t *t, access_attempt_t *a, const verdict_t *v)
{
    uint64_t delay_ms = 0;
    retry_ask_t ask = {
        .settings = policy_settings(t->policy),
        .attempt = t->attempt,
        .repeatable = retry_repeatable(t->req),
        .body_complete = t->req_done,
        .body_kept = t->replayable,
        .res = t->res,
        .deadline_ns = t->deadline_ns,
        .rng = &t->env->rng,
    };
    int refused = retry_check(&ask, v, &delay_ms);
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

static void note_verdict(access_attempt_t *a, const verdict_t *v)
{
    if (a == NULL)
        return;
    a->verdict = v->kind;
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
int txn_upstream_failed(txn_t *t, const char *kind, int status, const char *message)
{
    txn_env_t *env = t->env;
    /* A pooled connection can die just as it is reused. Sending again is safe
     * only for a request that may be repeated (RFC 9112 9.3.1). */
    int stale = t->up_reused && t->res_bytes == 0 && !t->committed && !t->stale_retried &&
                t->replayable && strcmp(kind, "reset") == 0 && retry_repeatable(t->req);
    access_attempt_t *a = attempt_end(t, 0, kind);
    txn_release_upstream(t, 0);
    if (stale) {
        /* The upstream closed it as the request arrived, and nothing came
         * back: a request that may be repeated goes again, once, on a fresh
         * connection (like a retry, counted as one). */
        if (a != NULL) {
            a->verdict = VERDICT_RETRY;
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
    log_str(r, "upstream", env->cfg->upstream);
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

/* The response is complete: end the body and the transaction. */
void txn_response_done(txn_t *t, int extra_bytes)
{
    if (t->chunk_out)
        io_append(t->out, FRAME_LAST_CHUNK, FRAME_LAST_CHUNK_LEN);
    int reusable = txn_response_reusable(t, extra_bytes);
    attempt_end(t, t->res->status, NULL); /* unless the policy's verdict closed it */
    txn_release_upstream(t, reusable);
    txn_finish(t);
}

/* Answers with the policy's respond{} verdict. Returns -1 (the transaction
 * is over). */
static int txn_respond(txn_t *t, const verdict_t *v)
{
    int has_body = v->status != 204 && v->status != 304;
    buf_t b = BUF_INIT;
    t->committed = 1;
    t->status = v->status;
    t->keep_alive = txn_wants_more(t);
    frame_local_t o = {
        .status = v->status,
        .headers = v->headers.data,
        .headers_len = v->headers.len,
        .has_length = has_body,
        .body_len = v->body.len,
        .date = txn_date(t->env),
        .request_id = t->id,
        .client_version = t->req->version,
        .keep_alive = t->keep_alive,
    };
    frame_local_head(&b, &o);
    if (has_body && t->req->method != HTTP_M_HEAD) {
        buf_append(&b, v->body.data, v->body.len);
        t->bytes_out = v->body.len;
    }
    io_append(t->out, b.data, b.len);
    buf_free(&b);
    txn_finish(t);
    return -1;
}

/* The held response goes to its handler. Returns 0 when the response keeps
 * streaming from the same connection, -1 when the connection was let go
 * (retry, respond, or the response is complete). */
int txn_decide(txn_t *t, int extra_bytes)
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
    access_attempt_t *a = attempt_end(t, t->res->status, NULL);
    note_verdict(a, &v);
    note_seen(t, a, NULL);
    if (v.kind == VERDICT_RETRY) {
        int reusable = txn_response_reusable(t, extra_bytes);
        if (txn_apply_retry(t, a, &v)) {
            verdict_reset(&v);
            txn_release_upstream(t, reusable);
            return -1;
        }
    } else if (v.kind == VERDICT_RESPOND) {
        txn_release_upstream(t, txn_response_reusable(t, extra_bytes));
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

/* ---- what the client connection calls ------------------------------------------- */

int txn_start(txn_env_t *env, policy_t *policy, http_head_t *head, const txn_conn_ops_t *ops,
              void *conn, io_t *out, const char *client_addr, txn_t **out_txn)
{
    txn_t *t = malloc(sizeof *t);
    *out_txn = t;
    if (t == NULL) {
        http_head_free(head);
        return -ENOMEM;
    }
    memset(t, 0, offsetof(txn_t, attempts));
    t->env = env;
    t->ops = ops;
    t->conn = conn;
    t->out = out;
    t->client_addr = client_addr;
    t->req = head;
    t->t0 = clock_now_ns();
    t->attempt = 1;
    t->policy = policy;
    t->replay_limit = REPLAY_LIMIT;
    if (policy != NULL) {
        policy_hold(policy);
        t->replay_limit = policy_settings(policy)->replay_limit;
    }
    t->replayable = head->content_length <= (int64_t)t->replay_limit;
    uint64_t deadline_ms = retry_deadline_ms(txn_settings(t), head);
    t->deadline_ns = deadline_ms ? t->t0 + deadline_ms * 1000000u : 0;
    request_id(t);

    const config_t *cfg = env->cfg;
    if (cfg->max_body_size > 0 && head->content_length > (int64_t)cfg->max_body_size) {
        t->status = 413;
        return -EMSGSIZE;
    }
    build_request_head(t);
    if ((head->flags & HTTP_F_EXPECT_CONTINUE) && head->version == 11 &&
        !(head->flags & HTTP_F_NO_BODY))
        io_append(out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 0;
}

int txn_request_body(txn_t *t, const char *at, size_t n)
{
    const config_t *cfg = t->env->cfg;
    t->body_in += n;
    if (cfg->max_body_size > 0 && t->body_in > cfg->max_body_size) {
        t->status = 413;
        return -EMSGSIZE;
    }
    if (t->replayable && t->body_in > t->replay_limit)
        t->replayable = 0;
    if (!t->replayable && t->body_fwd > 0 && t->body_fwd == t->body.len) {
        buf_clear(&t->body);
        t->body_fwd = 0;
    }
    return buf_append(&t->body, at, n);
}

void txn_request_end(txn_t *t)
{
    t->req_done = 1;
}

int txn_request_read(const txn_t *t)
{
    return t->req_done;
}

void txn_proceed(txn_t *t)
{
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

void txn_wait_over(txn_t *t, txn_wait_t what)
{
    if (what == WAIT_DEADLINE) {
        txn_deadline_passed(t);
        return;
    }
    if (what == WAIT_RETRY)
        t->attempt++;
    if (txn_attempt(t, 0) == 0) {
        txn_arm_deadline(t);
        txn_flush(t);
    }
}

void txn_reject(txn_t *t, int status, const char *message)
{
    t->error = message;
    t->status = status;
    if (!t->committed) {
        t->committed = 1;
        txn_write_error(t, status, message, 0, NULL);
    }
}

void txn_client_left(txn_t *t)
{
    t->status = 499;
}

void txn_drop(txn_t *t, const char *why)
{
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
