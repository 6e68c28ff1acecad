/* tls: TLS client connections over memory buffers, for the event loop.
 *
 * OpenSSL never touches a socket here: ciphertext read from the socket is
 * fed in with tls_feed(), plaintext comes out of tls_read(); plaintext goes
 * in with tls_write() and the ciphertext to send is taken with
 * tls_take_output(). The caller moves the bytes with libuv, so nothing
 * blocks.
 *
 * A tls_ctx_t holds the trust settings and the session to resume; it
 * belongs to one thread, like the connections made from it. */
#ifndef ERRORD_TLS_H
#define ERRORD_TLS_H

#include "buf.h"

#include <stddef.h>
#include <sys/types.h>

typedef struct tls_ctx_s tls_ctx_t;
typedef struct tls_conn_s tls_conn_t;

/* Certificates are verified against `ca_file` (PEM), or the system's store
 * when NULL (which honours SSL_CERT_FILE and SSL_CERT_DIR); `insecure` turns
 * verification off. NULL with a message in `err` on failure. */
tls_ctx_t *tls_ctx_new(const char *ca_file, int insecure, char *err, size_t errlen);
void tls_ctx_free(tls_ctx_t *ctx);

/* Full handshakes and resumed ones made from `ctx`. */
void tls_ctx_counts(const tls_ctx_t *ctx, unsigned long *full, unsigned long *resumed);

/* A client connection to `host` (sent as SNI unless it is an IP address,
 * and what the certificate must name). NULL when out of memory. */
tls_conn_t *tls_conn_new(tls_ctx_t *ctx, const char *host);
void tls_conn_free(tls_conn_t *c);

/* Advances the handshake: 1 done, 0 waiting for the peer, -1 failed (see
 * tls_error()). */
int tls_handshake(tls_conn_t *c);

/* Ciphertext received from the peer. Returns 0 or -1 (out of memory). */
int tls_feed(tls_conn_t *c, const char *data, size_t n);

/* tls_read(): the peer closed the session. */
#define TLS_CLOSED (-2)

/* Plaintext received: up to n bytes into out. Returns the count, 0 when
 * more ciphertext is needed, TLS_CLOSED when the peer closed the session,
 * or -1 on an error (see tls_error()). */
ssize_t tls_read(tls_conn_t *c, char *out, size_t n);

/* Encrypts plaintext (after the handshake). Returns 0 or -1. */
int tls_write(tls_conn_t *c, const char *data, size_t n);

/* Moves the ciphertext waiting to be sent to the end of `out`. Returns the
 * byte count, or -1 when out of memory. */
ssize_t tls_take_output(tls_conn_t *c, buf_t *out);

/* What failed, in words ("certificate has expired", "hostname mismatch",
 * ...), once tls_handshake() or tls_read() returned -1. */
const char *tls_error(const tls_conn_t *c);

#endif
