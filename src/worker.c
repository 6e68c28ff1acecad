/* worker: the event loops that serve traffic (see worker.h). */
#include "worker.h"

#include "log.h"
#include "proxy.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

enum { CMD_NONE, CMD_DRAIN, CMD_ABORT };

typedef struct {
    workers_t *owner;
    uv_loop_t own_loop; /* workers after the first */
    uv_loop_t *loop;
    uv_async_t wake; /* the control loop asks for a drain, an abort or a policy swap */
    uv_thread_t thread;
    proxy_t *proxy;
    atomic_int cmd;
    int started; /* its thread runs */
    uv_mutex_t lock;
    policy_t *next_policy; /* handed over by a reload; the worker swaps it in */
} worker_t;

struct workers_s {
    uv_loop_t *loop;
    config_t *cfg;
    proxy_shared_t shared;
    worker_t *w;
    int n; /* initialized so far */
    int told; /* told to drain or to abort */
    int draining;
    uv_async_t done; /* a worker finished */
    atomic_int n_done;
    void (*on_drained)(void *arg);
    void *arg;
};

static void on_done(uv_async_t *a)
{
    workers_t *ws = a->data;
    if (atomic_load(&ws->n_done) < ws->n)
        return;
    uv_close((uv_handle_t *)&ws->done, NULL);
    ws->on_drained(ws->arg);
}

/* On the worker's loop: its proxy has closed every connection. */
static void on_worker_drained(void *arg)
{
    worker_t *w = arg;
    uv_close((uv_handle_t *)&w->wake, NULL);
    atomic_fetch_add(&w->owner->n_done, 1);
    uv_async_send(&w->owner->done);
}

/* Swaps in the policy a reload handed over, if any. On the worker's loop. */
static void take_policy(worker_t *w)
{
    uv_mutex_lock(&w->lock);
    policy_t *p = w->next_policy;
    w->next_policy = NULL;
    uv_mutex_unlock(&w->lock);
    if (p != NULL) {
        proxy_set_policy(w->proxy, p);
        policy_release(p); /* the hand-over's reference; the proxy holds its own */
    }
}

static void on_wake(uv_async_t *a)
{
    worker_t *w = a->data;
    take_policy(w);
    int cmd = atomic_exchange(&w->cmd, CMD_NONE);
    if (cmd != CMD_NONE)
        proxy_drain(w->proxy, on_worker_drained, w);
}

static void worker_run(void *arg)
{
    worker_t *w = arg;
    log_set_buffered(1);
    uv_run(w->loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
}

static void tell(workers_t *ws, int cmd)
{
    ws->told = 1;
    for (int i = 0; i < ws->n; i++) {
        worker_t *w = &ws->w[i];
        if (!w->started && i > 0)
            continue;
        atomic_store(&w->cmd, cmd);
        uv_async_send(&w->wake);
    }
}

workers_t *workers_new(uv_loop_t *loop, config_t *cfg, void (*on_drained)(void *arg),
                       void *arg)
{
    workers_t *ws = calloc(1, sizeof *ws);
    if (ws == NULL)
        return NULL;
    ws->w = calloc((size_t)cfg->workers, sizeof *ws->w);
    if (ws->w == NULL) {
        free(ws);
        return NULL;
    }
    ws->loop = loop;
    ws->cfg = cfg;
    ws->on_drained = on_drained;
    ws->arg = arg;
    uv_async_init(loop, &ws->done, on_done);
    ws->done.data = ws;
    return ws;
}

/* Sets up worker i on its loop: its proxy, which takes over `policy`, its
 * wake-up handle and its listener. */
static int worker_init(workers_t *ws, int i, policy_t *policy)
{
    worker_t *w = &ws->w[i];
    w->owner = ws;
    w->loop = i == 0 ? ws->loop : &w->own_loop;
    if (i > 0) {
        int rc = uv_loop_init(w->loop);
        if (rc < 0) {
            policy_release(policy);
            return rc;
        }
    }
    ws->n++;
    uv_mutex_init(&w->lock);
    char err[512];
    w->proxy = proxy_new(w->loop, ws->cfg, &ws->shared, policy, err, sizeof err);
    policy_release(policy); /* the proxy holds it now */
    if (w->proxy == NULL) {
        log_record_t *r = log_begin(LOG_ERROR, "cannot start a worker");
        log_str(r, "error", err);
        log_end(r);
        return -ENOMEM;
    }
    uv_async_init(w->loop, &w->wake, on_wake);
    w->wake.data = w;
    return proxy_listen(w->proxy);
}

int workers_start(workers_t *ws, policy_t **per_worker)
{
    for (int i = 0; i < ws->cfg->workers; i++) {
        policy_t *policy = per_worker[i];
        per_worker[i] = NULL;
        int rc = worker_init(ws, i, policy);
        if (rc < 0)
            return rc;
        if (i == 0) {
            /* With port 0 the first listener picks the port; the others share it. */
            char addr[64];
            proxy_address(ws->w[0].proxy, addr, sizeof addr);
            config_parse_addr(addr, &ws->cfg->listen_addr);
        }
    }
    for (int i = 1; i < ws->n; i++) {
        worker_t *w = &ws->w[i];
        int rc = uv_thread_create(&w->thread, worker_run, w);
        if (rc < 0)
            return rc;
        w->started = 1;
    }
    return 0;
}

void workers_hand_over(workers_t *ws, policy_t **per_worker)
{
    for (int i = 0; i < ws->n; i++) {
        worker_t *w = &ws->w[i];
        uv_mutex_lock(&w->lock);
        policy_t *stale = w->next_policy; /* never taken: the worker did not run since */
        w->next_policy = per_worker[i];
        uv_mutex_unlock(&w->lock);
        per_worker[i] = NULL;
        policy_release(stale);
        if (i == 0)
            take_policy(w); /* the control loop's own worker: now */
        else if (w->started)
            uv_async_send(&w->wake);
    }
}

void workers_drain(workers_t *ws)
{
    ws->draining = 1;
    tell(ws, CMD_DRAIN);
}

void workers_abort(workers_t *ws)
{
    tell(ws, CMD_ABORT);
}

int workers_draining(const workers_t *ws)
{
    return ws->draining;
}

size_t workers_connections(const workers_t *ws)
{
    return atomic_load(&ws->shared.connections);
}

int workers_address(const workers_t *ws, char *out, size_t n)
{
    return proxy_address(ws->w[0].proxy, out, n);
}

static void on_close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void workers_close_loop(uv_loop_t *loop)
{
    uv_walk(loop, on_close_walk, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
}

void workers_stop(workers_t *ws)
{
    if (!ws->told)
        for (int i = 1; i < ws->n; i++)
            if (ws->w[i].started) {
                atomic_store(&ws->w[i].cmd, CMD_ABORT);
                uv_async_send(&ws->w[i].wake);
            }
    for (int i = 1; i < ws->n; i++) {
        worker_t *w = &ws->w[i];
        if (w->started) {
            uv_thread_join(&w->thread);
        } else {
            workers_close_loop(w->loop); /* what a worker that never ran still holds */
        }
        uv_loop_close(w->loop);
    }
}

void workers_free(workers_t *ws)
{
    if (ws == NULL)
        return;
    for (int i = 0; i < ws->n; i++) {
        worker_t *w = &ws->w[i];
        proxy_free(w->proxy);
        policy_release(w->next_policy);
        uv_mutex_destroy(&w->lock);
    }
    free(ws->w);
    free(ws);
}
