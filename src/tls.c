/* tls: TLS client connections over memory buffers (see tls.h). */
#include "tls.h"

#include <arpa/inet.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sessions kept for resumption, one per host (an upstream has one host;
 * the alert sinks a few). */
#define MAX_SESSIONS 8

typedef struct {
    char *host;
    SSL_SESSION *session;
} session_slot_t;

struct tls_ctx_s {
    SSL_CTX *ssl;
    session_slot_t sessions[MAX_SESSIONS];
    int next_slot; /* the one to replace when all are taken */
    unsigned long full, resumed;
};

struct tls_conn_s {
    tls_ctx_t *ctx;
    SSL *ssl;
    BIO *in, *out; /* ciphertext from the peer, and for it */
    char *host;
    char error[160];
    int counted;
    int failed; /* a fatal error: its session must not be resumed */
};

static void set_error(tls_conn_t *c, const char *what)
{
    snprintf(c->error, sizeof c->error, "%s", what);
}

/* The reason for the last failure on `c`, from the certificate check when
 * that is what failed, else from OpenSSL's error queue. */
static void take_error(tls_conn_t *c)
{
    c->failed = 1;
    long vr = SSL_get_verify_result(c->ssl);
    unsigned long e = ERR_peek_last_error();
    if (vr != X509_V_OK && SSL_get_verify_mode(c->ssl) != SSL_VERIFY_NONE)
        set_error(c, X509_verify_cert_error_string(vr));
    else if (e != 0 && ERR_reason_error_string(e) != NULL)
        set_error(c, ERR_reason_error_string(e));
    else if (c->error[0] == '\0')
        set_error(c, "the connection closed during the TLS handshake");
    ERR_clear_error();
}

static session_slot_t *slot_of(tls_ctx_t *ctx, const char *host)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (ctx->sessions[i].host != NULL && strcmp(ctx->sessions[i].host, host) == 0)
            return &ctx->sessions[i];
    return NULL;
}

/* A session to resume later arrived (with TLS 1.3, after the handshake). */
static int on_new_session(SSL *ssl, SSL_SESSION *session)
{
    tls_conn_t *c = SSL_get_app_data(ssl);
    tls_ctx_t *ctx = c->ctx;
    session_slot_t *s = slot_of(ctx, c->host);
    if (s == NULL) {
        char *host = strdup(c->host);
        if (host == NULL)
            return 0;
        s = &ctx->sessions[ctx->next_slot];
        ctx->next_slot = (ctx->next_slot + 1) % MAX_SESSIONS;
        free(s->host);
        if (s->session != NULL)
            SSL_SESSION_free(s->session);
        s->host = host;
    } else if (s->session != NULL) {
        SSL_SESSION_free(s->session);
    }
    s->session = session;
    return 1; /* the reference is ours */
}

tls_ctx_t *tls_ctx_new(const char *ca_file, int insecure, char *err, size_t errlen)
{
    tls_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL || (ctx->ssl = SSL_CTX_new(TLS_client_method())) == NULL) {
        snprintf(err, errlen, "out of memory");
        free(ctx);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx->ssl, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx->ssl, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(ctx->ssl,
                                   SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx->ssl, on_new_session);
    if (insecure) {
        SSL_CTX_set_verify(ctx->ssl, SSL_VERIFY_NONE, NULL);
        return ctx;
    }
    SSL_CTX_set_verify(ctx->ssl, SSL_VERIFY_PEER, NULL);
    int ok = ca_file != NULL ? SSL_CTX_load_verify_locations(ctx->ssl, ca_file, NULL)
                             : SSL_CTX_set_default_verify_paths(ctx->ssl);
    if (!ok) {
        unsigned long e = ERR_peek_last_error();
        snprintf(err, errlen, "%s: %s", ca_file != NULL ? ca_file : "the system's CA store",
                 e != 0 && ERR_reason_error_string(e) ? ERR_reason_error_string(e)
                                                      : "no certificates");
        ERR_clear_error();
        tls_ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

void tls_ctx_free(tls_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    for (int i = 0; i < MAX_SESSIONS; i++) {
        free(ctx->sessions[i].host);
        if (ctx->sessions[i].session != NULL)
            SSL_SESSION_free(ctx->sessions[i].session);
    }
    SSL_CTX_free(ctx->ssl);
    free(ctx);
}

void tls_ctx_counts(const tls_ctx_t *ctx, unsigned long *full, unsigned long *resumed)
{
    *full = ctx->full;
    *resumed = ctx->resumed;
}

static int is_ip(const char *host)
{
    unsigned char addr[16];
    return inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
}

tls_conn_t *tls_conn_new(tls_ctx_t *ctx, const char *host)
{
    tls_conn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->ctx = ctx;
    c->host = strdup(host);
    c->ssl = SSL_new(ctx->ssl);
    c->in = BIO_new(BIO_s_mem());
    c->out = BIO_new(BIO_s_mem());
    if (c->host == NULL || c->ssl == NULL || c->in == NULL || c->out == NULL) {
        BIO_free(c->in);
        BIO_free(c->out);
        SSL_free(c->ssl);
        free(c->host);
        free(c);
        return NULL;
    }
    BIO_set_mem_eof_return(c->in, -1); /* empty means "wait", not end of file */
    SSL_set_bio(c->ssl, c->in, c->out);
    SSL_set_app_data(c->ssl, c);
    SSL_set_connect_state(c->ssl);
    if (is_ip(host)) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host);
    } else {
        SSL_set_tlsext_host_name(c->ssl, host);
        SSL_set1_host(c->ssl, host);
    }
    session_slot_t *s = slot_of(ctx, host);
    if (s != NULL && s->session != NULL)
        SSL_set_session(c->ssl, s->session);
    return c;
}

void tls_conn_free(tls_conn_t *c)
{
    if (c == NULL)
        return;
    /* Closed without close_notify (errord closes idle connections as HTTP
     * allows), but not broken: OpenSSL would otherwise forbid resuming the
     * session. */
    if (!c->failed)
        SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_free(c->ssl); /* and its BIOs */
    free(c->host);
    free(c);
}

int tls_handshake(tls_conn_t *c)
{
    int rc = SSL_do_handshake(c->ssl);
    if (rc == 1) {
        if (!c->counted) {
            c->counted = 1;
            if (SSL_session_reused(c->ssl))
                c->ctx->resumed++;
            else
                c->ctx->full++;
        }
        return 1;
    }
    int e = SSL_get_error(c->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    take_error(c);
    return -1;
}

int tls_feed(tls_conn_t *c, const char *data, size_t n)
{
    while (n > 0) {
        int chunk = n > INT_MAX ? INT_MAX : (int)n;
        int w = BIO_write(c->in, data, chunk);
        if (w <= 0)
            return -1;
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

ssize_t tls_read(tls_conn_t *c, char *out, size_t n)
{
    int r = SSL_read(c->ssl, out, n > INT_MAX ? INT_MAX : (int)n);
    if (r > 0)
        return r;
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        return TLS_CLOSED;
    default:
        take_error(c);
        return -1;
    }
}

int tls_write(tls_conn_t *c, const char *data, size_t n)
{
    while (n > 0) {
        int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
        int w = SSL_write(c->ssl, data, chunk);
        if (w <= 0) {
            take_error(c);
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

ssize_t tls_take_output(tls_conn_t *c, buf_t *out)
{
    size_t pending = BIO_ctrl_pending(c->out);
    if (pending == 0)
        return 0;
    if (buf_reserve(out, pending) < 0)
        return -1;
    int r = BIO_read(c->out, out->data + out->len, (int)pending);
    if (r <= 0)
        return 0;
    out->len += (size_t)r;
    return r;
}

const char *tls_error(const tls_conn_t *c)
{
    return c->error[0] != '\0' ? c->error : "the peer closed the connection in the handshake";
}
