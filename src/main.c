/* main: flags, start-up and shutdown order.
 *
 * The main thread runs a control loop (signals, the drain timer); each worker
 * thread runs an event loop with its own listener, proxy and upstream pool.
 * SIGTERM or SIGINT drains the workers, bounded by --drain-timeout; errord
 * then exits 0. */
#include "config.h"
#include "http.h"
#include "log.h"
#include "proxy.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#ifndef ERRORD_VERSION
#define ERRORD_VERSION "dev"
#endif

enum { CMD_NONE, CMD_DRAIN, CMD_ABORT };

typedef struct {
    uv_loop_t loop;
    uv_async_t wake; /* the control loop asks for a drain or an abort */
    uv_thread_t thread;
    proxy_t *proxy;
    atomic_int cmd;
    int started;
} worker_t;

typedef struct {
    uv_loop_t *loop;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    uv_timer_t drain_timer;
    uv_async_t worker_done; /* a worker finished draining */
    worker_t *workers;
    int n_workers;
    atomic_int n_done;
    int draining;
    config_t cfg;
    proxy_shared_t shared;
} control_t;

static control_t control;

static void on_worker_drained(void *arg)
{
    worker_t *w = arg;
    uv_close((uv_handle_t *)&w->wake, NULL);
    atomic_fetch_add(&control.n_done, 1);
    uv_async_send(&control.worker_done);
}

static void on_wake(uv_async_t *a)
{
    worker_t *w = a->data;
    int cmd = atomic_exchange(&w->cmd, CMD_NONE);
    if (cmd != CMD_NONE)
        proxy_drain(w->proxy, on_worker_drained, w);
}

static void worker_run(void *arg)
{
    worker_t *w = arg;
    log_set_buffered(1);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
}

static void tell_workers(int cmd)
{
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        if (!w->started)
            continue;
        atomic_store(&w->cmd, cmd);
        uv_async_send(&w->wake);
    }
}

static void on_drain_timeout(uv_timer_t *t)
{
    (void)t;
    log_msgf(LOG_WARN, "drain time is up; closing the connections still open");
    tell_workers(CMD_ABORT);
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (control.draining) {
        log_msgf(LOG_WARN, "second %s; closing the connections still open", strsignal(signum));
        tell_workers(CMD_ABORT);
        return;
    }
    control.draining = 1;
    log_record_t *r = log_begin(LOG_INFO, "stopping: draining in-flight requests");
    log_str(r, "signal", strsignal(signum));
    log_int(r, "drain_timeout_ms", (int64_t)control.cfg.drain_timeout);
    log_end(r);
    uv_timer_start(&control.drain_timer, on_drain_timeout, control.cfg.drain_timeout, 0);
    tell_workers(CMD_DRAIN);
}

static void on_worker_done(uv_async_t *a)
{
    (void)a;
    if (atomic_load(&control.n_done) < control.n_workers)
        return;
    uv_close((uv_handle_t *)&control.sigterm, NULL);
    uv_close((uv_handle_t *)&control.sigint, NULL);
    uv_close((uv_handle_t *)&control.drain_timer, NULL);
    uv_close((uv_handle_t *)&control.worker_done, NULL);
}

/* Lets errord hold as many sockets as the hard limit allows. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int start_workers(void)
{
    control.workers = calloc((size_t)control.cfg.workers, sizeof *control.workers);
    if (control.workers == NULL)
        return -ENOMEM;
    for (int i = 0; i < control.cfg.workers; i++) {
        worker_t *w = &control.workers[i];
        int rc = uv_loop_init(&w->loop);
        if (rc < 0)
            return rc;
        control.n_workers++;
        w->proxy = proxy_new(&w->loop, &control.cfg, &control.shared);
        if (w->proxy == NULL)
            return -ENOMEM;
        uv_async_init(&w->loop, &w->wake, on_wake);
        w->wake.data = w;
        rc = proxy_listen(w->proxy);
        if (rc < 0)
            return rc;
        if (i == 0) {
            /* With port 0 the first listener picks the port; the others share it. */
            char addr[64];
            proxy_address(w->proxy, addr, sizeof addr);
            config_parse_addr(addr, &control.cfg.listen_addr);
        }
    }
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        int rc = uv_thread_create(&w->thread, worker_run, w);
        if (rc < 0)
            return rc;
        w->started = 1;
    }
    return 0;
}

/* Closes what a worker that never ran still holds, so its loop can close. */
static void on_close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void stop_workers(void)
{
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        if (w->started) {
            uv_thread_join(&w->thread);
        } else {
            uv_walk(&w->loop, on_close_walk, NULL);
            uv_run(&w->loop, UV_RUN_DEFAULT);
        }
        uv_loop_close(&w->loop);
        proxy_free(w->proxy);
    }
    free(control.workers);
}

int main(int argc, char **argv)
{
    char err[512];
    int action = config_parse(&control.cfg, argc, argv, err, sizeof err);
    if (action < 0) {
        fprintf(stderr, "errord: %s\n", err);
        config_free(&control.cfg);
        return 2;
    }
    if (action == CONFIG_HELP) {
        config_usage(stdout);
        config_free(&control.cfg);
        return 0;
    }
    if (action == CONFIG_VERSION) {
        printf("errord %s (libuv %s, llhttp %s)\n", ERRORD_VERSION, uv_version_string(),
               http_parser_version());
        config_free(&control.cfg);
        return 0;
    }

    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    log_set_level(control.cfg.log_level);
    control.loop = uv_default_loop();

    int rc = start_workers();
    if (rc < 0) {
        log_record_t *r = log_begin(LOG_ERROR, "cannot start");
        log_str(r, "listen", control.cfg.listen);
        log_str(r, "error", uv_strerror(rc));
        log_end(r);
        fprintf(stderr, "errord: cannot listen on %s: %s\n", control.cfg.listen, uv_strerror(rc));
        if (control.workers != NULL) {
            /* Workers already running drain at once; the others are closed. */
            uv_async_init(control.loop, &control.worker_done, NULL);
            tell_workers(CMD_ABORT);
            stop_workers();
            uv_close((uv_handle_t *)&control.worker_done, NULL);
            uv_run(control.loop, UV_RUN_DEFAULT);
        }
        config_free(&control.cfg);
        return 1;
    }

    uv_signal_init(control.loop, &control.sigterm);
    uv_signal_init(control.loop, &control.sigint);
    uv_signal_start(&control.sigterm, on_signal, SIGTERM);
    uv_signal_start(&control.sigint, on_signal, SIGINT);
    uv_timer_init(control.loop, &control.drain_timer);
    uv_async_init(control.loop, &control.worker_done, on_worker_done);

    log_record_t *r = log_begin(LOG_INFO, "errord started");
    log_str(r, "version", ERRORD_VERSION);
    char addr[64];
    proxy_address(control.workers[0].proxy, addr, sizeof addr);
    log_str(r, "listen", addr);
    log_str(r, "upstream", control.cfg.upstream);
    log_int(r, "workers", control.cfg.workers);
    log_int(r, "pid", getpid());
    log_end(r);

    uv_run(control.loop, UV_RUN_DEFAULT);
    stop_workers();
    uv_loop_close(control.loop);
    log_msgf(LOG_INFO, "errord stopped");
    config_free(&control.cfg);
    return 0;
}
