/* txn_int: the inside of a transaction, shared by txn.c (its life: the
 * attempts, the policy's verdict, the answer, the record) and
 * txn_forward.c (its bytes: the request to the upstream, the response to
 * the client). No other file includes this header. */
#ifndef ERRORD_TXN_INT_H
#define ERRORD_TXN_INT_H

#include "access.h"
#include "txn.h"

/* Stop reading a side once this much is waiting to be written to the other. */
#define HIGH_WATER (256 * 1024)
/* Without a policy: request bytes kept so a request can go again on a fresh
 * connection when a pooled one turns out dead. */
#define REPLAY_LIMIT (1024 * 1024)
#define MAX_ATTEMPTS 16
#define REQUEST_ID_MAX 200

struct txn_s {
    txn_env_t *env;
    const txn_conn_ops_t *ops;
    void *conn;              /* the client connection, for ops */
    io_t *out;               /* ... and its io, where the answer goes */
    const char *client_addr;
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
    buf_t seen;          /* what handlers saw (access_attempt_t.seen_off) */
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
    access_attempt_t attempts[MAX_ATTEMPTS];
};

/* ---- txn_forward.c ---- */

/* Leases an upstream connection for the attempt that starts now and,
 * once it is ready, sends the request. Returns -1 when the transaction
 * ended. */
int txn_connect(txn_t *t, int fresh);

/* Forwards the request body that has arrived, framed for the upstream;
 * after its end, starts the wait for the response. */
void txn_pump(txn_t *t);

/* Reads the request body only as fast as the upstream takes it. */
void txn_body_backpressure(txn_t *t);

/* Writes what both sides have gathered. Returns -1 when the transaction
 * ended because a connection broke. */
int txn_flush(txn_t *t);

/* Sends the response head (t->res) to the client, with errord's framing. */
void txn_commit(txn_t *t);

/* Sends response body bytes to the client, framed. */
void txn_send_body(txn_t *t, const char *at, size_t n);

/* Whether the upstream connection can take another request after this
 * response: it is complete, nothing followed it (`extra_bytes`), nobody
 * asked to close. */
int txn_response_reusable(const txn_t *t, int extra_bytes);

/* ---- txn.c ---- */

/* The upstream failed without a usable response (`kind` as the error
 * handler gets it; `status` and `message` for errord's answer when that is
 * what it comes to). Returns -1 when the transaction ended. */
int txn_upstream_failed(txn_t *t, const char *kind, int status, const char *message);

/* The held response goes to its handler. Returns 0 when the response
 * keeps streaming from the same connection, -1 when the connection was
 * let go. */
int txn_decide(txn_t *t, int extra_bytes);

/* Whether the client connection can serve another request after this one:
 * the whole request was read, the connection stays open, and the request
 * did not ask to close. */
int txn_wants_more(const txn_t *t);

/* The response is complete: end the body and the transaction. */
void txn_response_done(txn_t *t, int extra_bytes);

#endif
