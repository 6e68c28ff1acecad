/* verdict: what a policy is asked about one upstream response or failure,
 * and what it answers, as plain C values. The policy engine fills a
 * verdict in; the proxy carries it out. */
#ifndef ERRORD_VERDICT_H
#define ERRORD_VERDICT_H

#include "buf.h"
#include "http.h"

#include <stddef.h>
#include <stdint.h>

/* What a handler is asked about. `res` is NULL for the error handler, which
 * gets `err_kind` ("connect", "timeout", "reset", "protocol") and
 * `err_message` instead. `body` is NULL when the response body is larger than
 * body_limit (it is being streamed). */
typedef struct {
    const http_head_t *req;
    const char *request_id;
    int attempt;          /* 1 for the first try */
    uint64_t elapsed_ns;  /* since the client request arrived */
    const http_head_t *res;
    const char *body;
    size_t body_len;
    uint64_t attempt_ns;  /* since this attempt started */
    const char *err_kind;
    const char *err_message;
} policy_input_t;

typedef enum { VERDICT_PASS, VERDICT_RETRY, VERDICT_RESPOND } verdict_kind_t;

#define VERDICT_REASON_MAX 32

/* What a handler decided. */
typedef struct {
    verdict_kind_t kind;
    /* retry */
    int64_t after_ms; /* -1: not given, use the backoff */
    char reason[VERDICT_REASON_MAX + 1]; /* [a-z0-9_], "" when not given */
    int unsafe;       /* the policy vouches a non-idempotent request may repeat */
    int cooldown;     /* hold every request for the retry's delay too */
    /* respond */
    int status;
    buf_t headers; /* "Name: value\r\n" lines */
    buf_t body;
    int has_content_type;
    /* The handler failed (raised, ran too long, ran out of memory or
     * returned something that is not a verdict): errord passes (fails open)
     * and this says why: "error", "timeout", "memory", "verdict". */
    const char *failure;
} verdict_t;

#define VERDICT_INIT {VERDICT_PASS, -1, "", 0, 0, 0, BUF_INIT, BUF_INIT, 0, NULL}

/* The verdict's word, as the access record and p.tests write it: "pass",
 * "retry" or "respond". */
const char *verdict_name(verdict_kind_t k);

/* Frees what a verdict holds; it is VERDICT_INIT again afterwards. */
void verdict_reset(verdict_t *v);

#endif
