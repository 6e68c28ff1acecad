/* reload: the policy errord runs, and its reloads (SIGHUP, POST /reload,
 * --watch). A reload reads the file once, loads it, runs its tests and
 * builds one instance per worker; only when all of that worked does the
 * new policy take over: the alert sinks follow its settings and each worker
 * is handed its instance. On any failure the running policy stays. */
#ifndef ERRORD_RELOAD_H
#define ERRORD_RELOAD_H

#include "buf.h"
#include "policy.h"
#include "sink.h"
#include "worker.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* The policy file and how its reloads went so far, for GET /policy and
 * the metrics. */
typedef struct {
    const char *path;    /* the policy file (`r`'s copy), NULL without a policy */
    int watching;        /* the file is watched (--watch) */
    const char *result;  /* the last one: "reloaded", "unchanged", "failed"; NULL: none yet */
    const char *trigger; /* "SIGHUP", "admin", "watch" */
    int64_t at_ms;       /* wall clock */
    double took_ms;      /* of the last one that reloaded */
    buf_t errors;        /* of the last failure, one problem per line */
    uint64_t n_reloaded, n_unchanged, n_failed;
} reload_status_t;

typedef struct reload_s reload_t;

/* Makes the keeper of the policy file `path` (copied; NULL: errord runs
 * without a policy), whose instances go to `n_workers` workers. Nothing is
 * loaded yet. Returns NULL when out of memory. */
reload_t *reload_new(const char *path, int n_workers);

/* Loads the policy before errord listens: the control instance (the one
 * the settings and the alert sinks come from) stays in `r`, and one instance
 * per worker goes to per_worker[] (n_workers slots, the caller's to give
 * away). Without a policy, does nothing. Returns 0, or -1 with what is wrong
 * appended to `msg`. */
int reload_first(reload_t *r, policy_t **per_worker, buf_t *msg);

/* From now on a reload hands its instances to `workers` and its settings
 * to `sinks` (NULL: none). Both must outlive `r`'s reloads. */
void reload_attach(reload_t *r, workers_t *workers, sinks_t *sinks);

/* Starts the triggers on `loop`: SIGHUP, and when `watch` and there is a
 * policy, the policy file's directory (--watch). Triggers are ignored once
 * the workers drain. Returns 0, or -1 with why in `err`. */
int reload_start(reload_t *r, uv_loop_t *loop, int watch, char *err, size_t errlen);

/* Reloads the policy file now, after reload_attach(). Returns 0 when the new
 * policy runs or the file has not changed, -1 when the old one stays, with
 * one problem per line appended to `errors`. */
int reload_now(reload_t *r, const char *trigger, buf_t *errors);

/* Returns the running control instance, or NULL without a policy. It is
 * `r`'s, and changes with each reload. */
const policy_t *reload_policy(const reload_t *r);

/* Returns how the reloads went; `r`'s, valid until the next reload. */
const reload_status_t *reload_status(const reload_t *r);

/* Closes the triggers' handles (errord is stopping). */
void reload_close(reload_t *r);

/* Frees `r` and its policy, after its handles were closed and their loop ran
 * to its end. NULL is fine. */
void reload_free(reload_t *r);

#endif
