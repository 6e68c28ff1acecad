/* main: flags, start-up and shutdown order.
 *
 * Each worker runs an event loop with its own listener, proxy and upstream
 * pool. The first runs on the main thread's loop, next to the control work
 * (signals, the drain timer); the others have a thread each.
 * SIGTERM or SIGINT drains the workers, bounded by --drain-timeout; errord
 * then exits 0. */
#include "admin.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "policy.h"
#include "proxy.h"
#include "sink.h"

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
    uv_loop_t own_loop; /* workers after the first */
    uv_loop_t *loop;
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
    char *policy_path; /* resolved; NULL when running without a policy */
    policy_t *policy;  /* the main thread's instance: settings, alert sinks */
    sinks_t *sinks;
    admin_t *admin;
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
    uv_run(w->loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
}

static void tell_workers(int cmd)
{
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        if (!w->started && i > 0)
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

/* How long pending alerts may take to go out when errord stops. */
#define ALERT_FLUSH_MS 5000

static void on_worker_done(uv_async_t *a)
{
    (void)a;
    if (atomic_load(&control.n_done) < control.n_workers)
        return;
    /* The proxies are done, so every alert is in: flush them, then stop. */
    if (control.sinks != NULL) {
        uint64_t flush = control.cfg.drain_timeout < ALERT_FLUSH_MS ? control.cfg.drain_timeout
                                                                    : ALERT_FLUSH_MS;
        sinks_close(control.sinks, flush, NULL, NULL);
    }
    if (control.admin != NULL)
        admin_close(control.admin, NULL, NULL);
    uv_close((uv_handle_t *)&control.sigterm, NULL);
    uv_close((uv_handle_t *)&control.sigint, NULL);
    uv_close((uv_handle_t *)&control.drain_timer, NULL);
    uv_close((uv_handle_t *)&control.worker_done, NULL);
}

/* The policy file to run: --policy, else lua/default.lua next to the binary
 * (a build tree) or in the install's data directory. NULL for "off". */
static int resolve_policy(char **path, char *err, size_t errlen)
{
    const char *given = control.cfg.policy;
    *path = NULL;
    if (given != NULL && (strcmp(given, "off") == 0 || strcmp(given, "none") == 0))
        return 0;
    if (given != NULL) {
        *path = strdup(given);
        return 0;
    }
    /* A build tree: errord or build/errord or build/asan/errord */
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 32);
    for (int up = 0; n > 0 && up < 3; up++) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash == NULL)
            break;
        n = slash - exe;
        strcpy(slash + 1, "lua/default.lua");
        if (access(exe, R_OK) == 0) {
            *path = strdup(exe);
            return 0;
        }
        exe[n] = '\0'; /* the directory; its parent next */
    }
    if (access(ERRORD_DATADIR "/default.lua", R_OK) == 0) {
        *path = strdup(ERRORD_DATADIR "/default.lua");
        return 0;
    }
    snprintf(err, errlen, "no default policy at lua/default.lua next to errord nor at %s; "
                          "give --policy FILE, or --policy off to run without one",
             ERRORD_DATADIR "/default.lua");
    return -1;
}

static void report_test(const policy_test_result_t *r, void *arg)
{
    (void)arg;
    if (!r->passed)
        fprintf(stderr, "errord: policy test \"%s\" failed: %s\n", r->name, r->message);
}

/* Loads the policy once, as every worker will, and runs its tests: a policy
 * that does not load or pass stops errord before it listens. */
static int check_policy(void)
{
    char err[1024];
    policy_t *p = policy_load(control.policy_path, err, sizeof err);
    if (p == NULL) {
        fprintf(stderr, "errord: invalid policy: %s\n", err);
        return -1;
    }
    int failed = policy_run_tests(p, report_test, NULL, err, sizeof err);
    if (failed == 0)
        control.policy = p; /* kept: its settings configure the alert sinks */
    else
        policy_release(p);
    if (failed < 0)
        fprintf(stderr, "errord: invalid policy: %s: %s\n", control.policy_path, err);
    else if (failed > 0)
        fprintf(stderr, "errord: %s: %d policy test%s failed\n", control.policy_path, failed,
                failed == 1 ? "" : "s");
    return failed == 0 ? 0 : -1;
}

static void alerts_json(void *arg, buf_t *out)
{
    sinks_state_json(arg, out);
}

/* The main loop's own services: alert delivery and the admin port. */
static int start_control(void)
{
    char admin_addr[64], generator[128];
    const char *gen = NULL;
    if (control.cfg.admin_enabled) {
        admin_sources_t src = {alerts_json, NULL};
        int rc;
        control.admin = admin_start(control.loop, &control.cfg, &src, &rc);
        if (control.admin == NULL) {
            fprintf(stderr, "errord: cannot listen on the admin port %s: %s\n",
                    control.cfg.admin, uv_strerror(rc));
            return -1;
        }
        admin_address(control.admin, admin_addr, sizeof admin_addr);
        snprintf(generator, sizeof generator, "http://%s/alerts", admin_addr);
        gen = generator;
    }
    static const policy_settings_t no_sinks = {0};
    const policy_settings_t *settings =
        control.policy != NULL ? policy_settings(control.policy) : &no_sinks;
    control.sinks = sinks_new(control.loop, settings, control.cfg.upstream, gen);
    if (control.sinks == NULL) {
        fprintf(stderr, "errord: out of memory\n");
        return -1;
    }
    if (control.admin != NULL)
        admin_set_arg(control.admin, control.sinks);
    return 0;
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
        w->loop = i == 0 ? control.loop : &w->own_loop;
        if (i > 0) {
            int rc = uv_loop_init(w->loop);
            if (rc < 0)
                return rc;
        }
        control.n_workers++;
        char err[512];
        w->proxy = proxy_new(w->loop, &control.cfg, &control.shared, control.policy_path, err,
                             sizeof err);
        if (w->proxy == NULL) {
            log_record_t *r = log_begin(LOG_ERROR, "cannot start a worker");
            log_str(r, "error", err);
            log_end(r);
            return -ENOMEM;
        }
        uv_async_init(w->loop, &w->wake, on_wake);
        w->wake.data = w;
        int rc = proxy_listen(w->proxy);
        if (rc < 0)
            return rc;
        if (i == 0) {
            /* With port 0 the first listener picks the port; the others share it. */
            char addr[64];
            proxy_address(w->proxy, addr, sizeof addr);
            config_parse_addr(addr, &control.cfg.listen_addr);
        }
    }
    for (int i = 1; i < control.n_workers; i++) {
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

/* Waits for the threaded workers and closes their loops; the first worker's
 * loop is the main loop, run to its end by then. */
static void stop_workers(void)
{
    for (int i = 1; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        if (w->started) {
            uv_thread_join(&w->thread);
        } else {
            uv_walk(w->loop, on_close_walk, NULL);
            uv_run(w->loop, UV_RUN_DEFAULT);
        }
        uv_loop_close(w->loop);
    }
}

static void free_workers(void)
{
    for (int i = 0; i < control.n_workers; i++)
        proxy_free(control.workers[i].proxy);
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

    log_set_level(control.cfg.log_level);
    if (resolve_policy(&control.policy_path, err, sizeof err) < 0) {
        fprintf(stderr, "errord: %s\n", err);
        config_free(&control.cfg);
        return 2;
    }
    if (control.policy_path != NULL && check_policy() < 0) {
        free(control.policy_path);
        config_free(&control.cfg);
        return 2;
    }

    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    control.loop = uv_default_loop();

    int rc = start_workers();
    if (rc < 0) {
        log_record_t *r = log_begin(LOG_ERROR, "cannot start");
        log_str(r, "listen", control.cfg.listen);
        log_str(r, "error", uv_strerror(rc));
        log_end(r);
        fprintf(stderr, "errord: cannot listen on %s: %s\n", control.cfg.listen, uv_strerror(rc));
        if (control.workers != NULL) {
            /* Threaded workers already running stop at once; then every
             * handle left on the main loop is closed. */
            for (int i = 1; i < control.n_workers; i++) {
                worker_t *w = &control.workers[i];
                if (w->started) {
                    atomic_store(&w->cmd, CMD_ABORT);
                    uv_async_send(&w->wake);
                }
            }
            stop_workers();
            uv_walk(control.loop, on_close_walk, NULL);
            uv_run(control.loop, UV_RUN_DEFAULT);
            free_workers();
        }
        uv_loop_close(control.loop);
        free(control.policy_path);
        config_free(&control.cfg);
        return 1;
    }

    if (start_control() < 0) {
        /* nothing has run yet: close what exists and stop */
        tell_workers(CMD_ABORT);
        stop_workers();
        uv_walk(control.loop, on_close_walk, NULL);
        uv_run(control.loop, UV_RUN_DEFAULT);
        uv_loop_close(control.loop);
        free_workers();
        sinks_free(control.sinks);
        policy_release(control.policy);
        free(control.policy_path);
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
    log_str(r, "policy", control.policy_path ? control.policy_path : "off");
    char admin_addr[64] = "off";
    if (control.admin != NULL)
        admin_address(control.admin, admin_addr, sizeof admin_addr);
    log_str(r, "admin", admin_addr);
    log_int(r, "workers", control.cfg.workers);
    log_int(r, "pid", getpid());
    log_end(r);

    log_set_buffered(1); /* the first worker's loop flushes the log */
    uv_run(control.loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
    stop_workers();
    uv_loop_close(control.loop);
    free_workers();
    admin_free(control.admin);
    sinks_free(control.sinks);
    policy_release(control.policy);
    log_msgf(LOG_INFO, "errord stopped");
    free(control.policy_path);
    config_free(&control.cfg);
    return 0;
}
