/* worker: the event loops that serve traffic. Each worker has a loop, a
 * listener, a proxy and an upstream pool of its own. The first runs on the
 * control loop (the caller's, next to signals, reloads and the admin port);
 * the others have a thread each. A policy instance belongs to one worker
 * (a Lua state belongs to one loop), so a reload hands each its own. */
#ifndef ERRORD_WORKER_H
#define ERRORD_WORKER_H

#include "config.h"
#include "policy.h"

#include <stddef.h>
#include <uv.h>

typedef struct workers_s workers_t;

/* Makes room for cfg->workers workers, the first on `loop`; none runs yet.
 * `cfg` must outlive them. `on_drained(arg)` fires on `loop` once every
 * worker has finished after workers_drain() or workers_abort(). Returns
 * NULL when out of memory. */
workers_t *workers_new(uv_loop_t *loop, config_t *cfg, void (*on_drained)(void *arg),
                       void *arg);

/* Starts the workers: worker i takes over per_worker[i] (left NULL), binds
 * its listener and, but for the first, its thread. With port 0 the first
 * listener picks the port and cfg->listen_addr says it to the others.
 * Returns 0, or a negative libuv error with the workers that did start
 * left for workers_stop(); instances no worker took stay the caller's. */
int workers_start(workers_t *ws, policy_t **per_worker);

/* Hands worker i per_worker[i] (taken over, left NULL), which it swaps in
 * between two requests; the first worker does so now. An instance handed
 * over earlier and not yet taken is released. */
void workers_hand_over(workers_t *ws, policy_t **per_worker);

/* Tells every worker to stop accepting and let requests in flight finish. */
void workers_drain(workers_t *ws);

/* Tells every worker to close its connections now, drained or not. */
void workers_abort(workers_t *ws);

/* Returns 1 once workers_drain() was called, else 0. */
int workers_draining(const workers_t *ws);

/* Returns the number of client connections open in all workers. */
size_t workers_connections(const workers_t *ws);

/* Writes the first worker's listening address, "127.0.0.1:8080", into
 * `out`. Returns 0 or a libuv error. */
int workers_address(const workers_t *ws, char *out, size_t n);

/* Waits for the threaded workers to end, aborting them first unless they
 * were told to drain, and closes their loops. The control loop, where the
 * first worker runs, is the caller's to run to its end and close. */
void workers_stop(workers_t *ws);

/* Closes every handle still open on `loop` and runs it until all are
 * closed: what is left of a loop that did not end by itself. */
void workers_close_loop(uv_loop_t *loop);

/* Frees the workers and what they hold, after workers_stop() and after the
 * control loop ran to its end. NULL is fine. */
void workers_free(workers_t *ws);

#endif
