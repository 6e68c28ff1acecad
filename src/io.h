/* io: a TCP connection with gathered, non-blocking output.
 *
 * Output appended while handling an event is written at io_flush(): straight
 * into the socket when it takes it (no copy beyond the gather buffer), else
 * handed to libuv, which writes it as the peer reads. io_pending() is what a
 * caller checks to apply backpressure; on_drain says when to read again.
 *
 * An io owns its TCP handle and one timer for its owner's timeouts. It is
 * closed with io_close() or io_close_after_flush(); on_closed fires once both
 * handles are closed, and only then may the owner free the memory. */
#ifndef ERRORD_IO_H
#define ERRORD_IO_H

#include "buf.h"
#include "tls.h"

#include <stdint.h>
#include <uv.h>

typedef struct io_s io_t;
typedef void (*io_cb)(io_t *io);

struct io_s {
    uv_tcp_t tcp;
    uv_timer_t timer;
    buf_t out;          /* gathered, not yet handed to the socket */
    size_t in_flight;   /* handed to libuv, not yet written */
    size_t low_water;   /* on_drain fires once pending output is this small */
    io_cb on_drain;     /* optional: output drained to low_water */
    io_cb on_error;     /* optional: a write failed; the connection is broken */
    io_cb on_closed;    /* both handles are closed */
    void *owner;
    int open_handles;
    uint64_t linger_ms;
    tls_conn_t *tls;     /* when the connection speaks TLS: out is plaintext */
    buf_t cipher;        /* TLS records not yet handed to the socket */
    uv_idle_t tls_idle;  /* reads plaintext OpenSSL holds, after a pause */
    uv_idle_cb tls_idle_cb;
    io_cb reset_cb;      /* io_reset(): the new TCP handle is ready */
    unsigned tls_ready : 1;   /* handshake done: plaintext may be sent */
    unsigned resetting : 1;   /* the TCP handle is being replaced */
    unsigned closing : 1;     /* io_close() was called */
    unsigned close_after : 1; /* close once the output is written */
    unsigned failed : 1;      /* a write failed */
};

/* Initializes the handles on `loop`. Returns 0 or a libuv error. */
int io_init(uv_loop_t *loop, io_t *io, void *owner);

/* Initializes `io` on the server's loop and accepts a pending connection
 * into it; `on_closed` is set first. Returns 0, or a libuv error after
 * which the io is closing (on_closed fires, and then the owner frees). */
int io_accept(uv_stream_t *server, io_t *io, void *owner, io_cb on_closed);

/* A uv_alloc_cb handing out one 16 KiB buffer per thread, for connections
 * that consume what they read before the next read (the admin port, the
 * alert sinks' client). */
void io_alloc_scratch(uv_handle_t *h, size_t suggested, uv_buf_t *b);

/* Gathers bytes for the next flush. Returns 0 or -ENOMEM. */
int io_append(io_t *io, const void *p, size_t n);

/* Writes the gathered bytes. Returns 0, or a negative error when the
 * connection is broken (on_error is not called for that). */
int io_flush(io_t *io);

/* Bytes gathered or in flight. */
static inline size_t io_pending(const io_t *io)
{
    return io->out.len + io->cipher.len + io->in_flight;
}

/* Closes now, dropping unwritten output. */
void io_close(io_t *io);

/* Writes what is gathered, sends FIN, reads and discards what the peer still
 * sends for up to `linger_ms` (so it is not reset before it reads the
 * answer), then closes. */
void io_close_after_flush(io_t *io, uint64_t linger_ms);

/* Replaces the TCP handle with a fresh one (after a failed connect, to try
 * another address); `then` runs once it is ready, unless io_close() came
 * first. The timer keeps running. */
void io_reset(io_t *io, io_cb then);

/* Makes `io` (connected) a TLS client of `host`: from now on output is
 * encrypted at io_flush() (once io->tls_ready is set) and the owner
 * passes what it reads through io->tls. The owner's `on_idle` runs, once
 * per io_tls_kick(), to read plaintext OpenSSL still holds. Returns 0 or
 * -ENOMEM. */
int io_tls_start(io_t *io, tls_ctx_t *ctx, const char *host, uv_idle_cb on_idle);

/* Schedules the owner's on_idle for the next loop turn. */
void io_tls_kick(io_t *io);

/* The address a listener is bound to, as "127.0.0.1:8080" or "[::1]:8080".
 * Returns 0 or a libuv error. */
int io_listen_addr(uv_tcp_t *listener, char *out, size_t n);

/* The peer's address as text ("127.0.0.1"), or "-" when unknown. */
void io_peer_addr(io_t *io, char *out, size_t n);

#endif
