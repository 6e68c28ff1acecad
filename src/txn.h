/* txn: one client request's life, from its head to its access record.
 *
 * A transaction forwards the request to an upstream connection as it
 * arrives, and streams the response back, or holds it for the policy's
 * handler, which decides once: pass it on, retry (within errord's rules,
 * retry.h), or answer with respond{}. Failures without a response go to
 * the policy's error handler, then to errord's own 502/504.
 *
 * The client connection that owns a transaction (proxy.c) is reached only
 * through txn_conn_ops_t: its one timer, its reading, and what happens when
 * the transaction ends or the connection must close. Response bytes go to
 * the connection's io. */
#ifndef ERRORD_TXN_H
#define ERRORD_TXN_H

#include "config.h"
#include "http.h"
#include "io.h"
#include "metrics.h"
#include "policy.h"
#include "rand.h"
#include "upstream.h"

#include <stdint.h>
#include <time.h>

typedef struct txn_s txn_t;

/* What the client connection's one timer measures: the connection's own
 * waits (HEADER, IDLE) and its transaction's share it. */
typedef enum {
    WAIT_NONE,
    WAIT_HEADER,   /* the request head must be complete by then */
    WAIT_BODY,     /* the request body must not stall that long */
    WAIT_IDLE,     /* keep-alive: no new request for that long */
    WAIT_SEND,     /* the client must take some of the response by then */
    WAIT_RETRY,    /* the next attempt starts then */
    WAIT_HOLD,     /* a cooldown ends then */
    WAIT_DEADLINE, /* the request's deadline */
} txn_wait_t;

/* What a transaction asks of the client connection that owns it. */
typedef struct {
    /* Starts the timer for `what` (WAIT_NONE stops it). RETRY and HOLD run
     * `ms` from now by the clock, DEADLINE `ms` from the loop's time; the
     * others take their flag's timeout. */
    void (*wait)(void *conn, txn_wait_t what, uint64_t ms);
    /* What the timer measures now. */
    txn_wait_t (*waiting)(void *conn);
    /* Starts (1) or stops (0) reading the client (backpressure). */
    void (*read)(void *conn, int on);
    /* Whether the connection reads now. */
    int (*reading)(void *conn);
    /* Whether it may serve another request after this one: it is not
     * draining, nor half-closed with nothing more sent. */
    int (*open)(void *conn);
    /* The transaction ended and is freed: go on to the next request, or
     * close when `keep_alive` is 0. */
    void (*done)(void *conn, int keep_alive);
    /* Close after what is written (close) or at once (abort). The
     * connection ends the transaction with txn_drop(). */
    void (*close)(void *conn, const char *why);
    void (*abort)(void *conn, const char *why);
} txn_conn_ops_t;

/* What the transactions of one event loop share; the proxy owns it. */
typedef struct {
    const config_t *cfg;
    upstream_t *upstream;
    metrics_t *metrics;
    rand_t rng;
    time_t date_at;
    char date[32];
} txn_env_t;

/* The Date of a response sent now, cached for the second. */
const char *txn_date(txn_env_t *env);

/* Fills in the upstream events of `o` (reads and the response parser's
 * callbacks), which lead to the transaction leasing the connection. */
void txn_upstream_events(upstream_owner_t *o);

/* Starts the transaction of request `head` (which it takes) from client
 * `client_addr` (kept by the caller while it lives), under `policy` (NULL:
 * none; it takes a reference), answering on `out`. Returns 0 with *out_txn
 * set; -EMSGSIZE with *out_txn set when the body is larger than
 * --max-body-size (the caller rejects it); -ENOMEM, head freed, *out_txn
 * NULL. */
int txn_start(txn_env_t *env, policy_t *policy, http_head_t *head, const txn_conn_ops_t *ops,
              void *conn, io_t *out, const char *client_addr, txn_t **out_txn);

/* Request body bytes arrived (their transfer coding removed). Returns 0,
 * -EMSGSIZE past --max-body-size, or -ENOMEM. */
int txn_request_body(txn_t *t, const char *at, size_t n);

/* The whole request was read. */
void txn_request_end(txn_t *t);

/* Whether the whole request was read. */
int txn_request_read(const txn_t *t);

/* After the parser returned: starts the first attempt, or forwards the
 * body that arrived, then writes out what both sides gathered. The
 * transaction may end in it. */
void txn_proceed(txn_t *t);

/* The timer the transaction set ran out (WAIT_RETRY, WAIT_HOLD or
 * WAIT_DEADLINE; the caller has reset the connection's to WAIT_NONE). */
void txn_wait_over(txn_t *t, txn_wait_t what);

/* The client took what was waiting for it: resume reading the upstream. */
void txn_client_drained(txn_t *t);

/* The request could not be read (`status`, `message`): errord's error goes
 * out unless a response has begun; the caller then closes. */
void txn_reject(txn_t *t, int status, const char *message);

/* The client left before sending the whole request: recorded as 499. */
void txn_client_left(txn_t *t);

/* Ends and frees the transaction as its connection goes away: the
 * attempt in flight is abandoned, the record says `why` (may be NULL). */
void txn_drop(txn_t *t, const char *why);

#endif
