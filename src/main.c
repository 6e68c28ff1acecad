/* main: flags, start-up and shutdown order, signals.
 *
 * Start-up: the flags, the upstream's TLS settings, the policy (loaded and
 * tested before errord listens; see reload.h), the workers (worker.h), then
 * the control loop's own services: the admin port (admin_routes.h), alert
 * delivery (sink.h) and the reload triggers. The first worker runs on the
 * control loop, the others on threads.
 *
 * SIGTERM or SIGINT drains the workers, bounded by --drain-timeout; once
 * they are done the alerts still pending are flushed, the control loop's
 * handles close, and errord exits 0. Every way out goes through teardown(),
 * which releases whatever start-up got to. */
#include "admin.h"
#include "admin_routes.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "notify.h"
#include "policy.h"
#include "reload.h"
#include "sink.h"
#include "tls.h"
#include "tools.h"
#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#ifndef ERRORD_VERSION
#define ERRORD_VERSION "dev"
#endif

/* How long pending alerts may take to go out when errord stops. */
#define ALERT_FLUSH_MS 5000

typedef struct {
    config_t cfg;
    uv_loop_t *loop;
    char *policy_path;      /* resolved; NULL when running without a policy */
    reload_t *reload;       /* the running policy and its reloads */
    policy_t **per_worker;  /* the first policy's instances, until the workers take them */
    workers_t *workers;
    admin_t *admin;
    sinks_t *sinks;
    admin_routes_t routes;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    uv_timer_t drain_timer;
    int ran; /* the control loop ran: errord started and stopped */
} control_t;

static control_t control;

static void on_drain_timeout(uv_timer_t *t)
{
    (void)t;
    log_msgf(LOG_WARN, "drain time is up; closing the connections still open");
    workers_abort(control.workers);
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (workers_draining(control.workers)) {
        log_msgf(LOG_WARN, "second %s; closing the connections still open", strsignal(signum));
        workers_abort(control.workers);
        return;
    }
    notify("STOPPING=1");
    log_record_t *r = log_begin(LOG_INFO, "stopping: draining in-flight requests");
    log_str(r, "signal", strsignal(signum));
    log_int(r, "drain_timeout_ms", (int64_t)control.cfg.drain_timeout);
    log_end(r);
    uv_timer_start(&control.drain_timer, on_drain_timeout, control.cfg.drain_timeout, 0);
    workers_drain(control.workers);
}

/* The proxies are done, so every alert is in: flush them, then close the
 * control loop's handles, which ends the loop. */
static void on_workers_drained(void *arg)
{
    (void)arg;
    if (control.sinks != NULL) {
        uint64_t flush = control.cfg.drain_timeout < ALERT_FLUSH_MS ? control.cfg.drain_timeout
                                                                    : ALERT_FLUSH_MS;
        sinks_close(control.sinks, flush, NULL, NULL);
    }
    if (control.admin != NULL)
        admin_close(control.admin, NULL, NULL);
    uv_close((uv_handle_t *)&control.sigterm, NULL);
    uv_close((uv_handle_t *)&control.sigint, NULL);
    reload_close(control.reload);
    uv_close((uv_handle_t *)&control.drain_timer, NULL);
}

/* Checks the upstream's TLS trust settings once, before anything starts. */
static int check_upstream_tls(void)
{
    char err[512];
    tls_ctx_t *tls = tls_ctx_new(control.cfg.upstream_ca, control.cfg.upstream_insecure, err,
                                 sizeof err);
    if (tls == NULL) {
        fprintf(stderr, "errord: --upstream-ca %s\n", err);
        return -1;
    }
    tls_ctx_free(tls);
    if (control.cfg.upstream_insecure) {
        log_record_t *r = log_begin(LOG_WARN, "upstream TLS certificates are not verified "
                                              "(--upstream-insecure): anyone on the path "
                                              "can read and change the traffic");
        log_str(r, "upstream", control.cfg.upstream);
        log_end(r);
    }
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

/* The control loop's own services: the admin port, alert delivery and the
 * reload triggers. */
static int start_control(void)
{
    char admin_addr[64], generator[128], err[512];
    const char *gen = NULL;
    control.routes = (admin_routes_t){control.reload, control.workers, NULL};
    if (control.cfg.admin_enabled) {
        int rc;
        control.admin = admin_start(control.loop, &control.cfg, &rc);
        if (control.admin == NULL) {
            fprintf(stderr, "errord: cannot listen on the admin port %s: %s\n",
                    control.cfg.admin, uv_strerror(rc));
            return -1;
        }
        if (admin_routes_add(control.admin, &control.routes) < 0) {
            fprintf(stderr, "errord: out of memory\n");
            return -1;
        }
        admin_address(control.admin, admin_addr, sizeof admin_addr);
        snprintf(generator, sizeof generator, "http://%s/alerts", admin_addr);
        gen = generator;
    }
    static const policy_settings_t no_sinks = {0};
    const policy_t *policy = reload_policy(control.reload);
    const policy_settings_t *settings = policy != NULL ? policy_settings(policy) : &no_sinks;
    control.sinks = sinks_new(control.loop, settings, control.cfg.upstream, gen);
    if (control.sinks == NULL) {
        fprintf(stderr, "errord: out of memory\n");
        return -1;
    }
    control.routes.sinks = control.sinks;
    reload_attach(control.reload, control.workers, control.sinks);
    if (reload_start(control.reload, control.loop, control.cfg.watch, err, sizeof err) < 0) {
        fprintf(stderr, "errord: %s\n", err);
        return -1;
    }
    return 0;
}

static void log_started(void)
{
    const policy_t *policy = reload_policy(control.reload);
    log_record_t *r = log_begin(LOG_INFO, "errord started");
    log_str(r, "version", ERRORD_VERSION);
    char addr[64];
    workers_address(control.workers, addr, sizeof addr);
    log_str(r, "listen", addr);
    log_str(r, "upstream", control.cfg.upstream);
    log_str(r, "policy", control.policy_path ? control.policy_path : "off");
    if (policy != NULL)
        log_str(r, "policy_sha256", policy_sha256(policy));
    char admin_addr[64] = "off";
    if (control.admin != NULL)
        admin_address(control.admin, admin_addr, sizeof admin_addr);
    log_str(r, "admin", admin_addr);
    log_int(r, "workers", control.cfg.workers);
    log_int(r, "pid", getpid());
    log_end(r);
}

/* Starts errord and runs it until it has drained. Returns the exit status;
 * what it set up is left for teardown(). */
static int run(int argc, char **argv)
{
    char err[512];
    int action = config_parse(&control.cfg, argc, argv, err, sizeof err);
    if (action < 0) {
        fprintf(stderr, "errord: %s\n", err);
        return 2;
    }
    if (action == CONFIG_HELP) {
        config_usage(stdout);
        return 0;
    }
    if (action == CONFIG_VERSION) {
        printf("errord %s (libuv %s, llhttp %s)\n", ERRORD_VERSION, uv_version_string(),
               http_parser_version());
        return 0;
    }

    log_set_level(control.cfg.log_level);
    if (control.cfg.upstream_tls && check_upstream_tls() < 0)
        return 2;
    if (config_policy_path(&control.cfg, &control.policy_path, err, sizeof err) < 0) {
        fprintf(stderr, "errord: %s\n", err);
        return 2;
    }
    control.reload = reload_new(control.policy_path, control.cfg.workers);
    control.per_worker = calloc((size_t)control.cfg.workers, sizeof *control.per_worker);
    if (control.reload == NULL || control.per_worker == NULL) {
        fprintf(stderr, "errord: out of memory\n");
        return 2;
    }
    buf_t msg = BUF_INIT;
    int rc = reload_first(control.reload, control.per_worker, &msg);
    if (rc < 0)
        fprintf(stderr, "errord: %s", buf_cstr(&msg));
    buf_free(&msg);
    if (rc < 0)
        return 2;

    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    control.loop = uv_default_loop();
    control.workers = workers_new(control.loop, &control.cfg, on_workers_drained, NULL);
    rc = control.workers == NULL ? -ENOMEM : workers_start(control.workers, control.per_worker);
    if (rc < 0) {
        log_record_t *r = log_begin(LOG_ERROR, "cannot start");
        log_str(r, "listen", control.cfg.listen);
        log_str(r, "error", uv_strerror(rc));
        log_end(r);
        fprintf(stderr, "errord: cannot listen on %s: %s\n", control.cfg.listen, uv_strerror(rc));
        return 1;
    }
    if (start_control() < 0)
        return 1;

    uv_signal_init(control.loop, &control.sigterm);
    uv_signal_init(control.loop, &control.sigint);
    uv_signal_start(&control.sigterm, on_signal, SIGTERM);
    uv_signal_start(&control.sigint, on_signal, SIGINT);
    uv_timer_init(control.loop, &control.drain_timer);
    log_started();
    int told = notify("READY=1");
    if (told < 0)
        log_msgf(LOG_WARN, "could not tell the service manager errord is ready (%s): %s",
                 getenv("NOTIFY_SOCKET"), uv_strerror(told));

    control.ran = 1;
    log_set_buffered(1); /* the first worker's loop flushes the log */
    uv_run(control.loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
    return 0;
}

/* Releases whatever run() set up, in the reverse order, from any point it
 * stopped at: workers that never ran are aborted, every handle still open
 * is closed, and the loops run until they are. */
static void teardown(void)
{
    if (control.workers != NULL)
        workers_stop(control.workers);
    if (control.loop != NULL) {
        workers_close_loop(control.loop);
        uv_loop_close(control.loop);
    }
    workers_free(control.workers);
    admin_free(control.admin);
    sinks_free(control.sinks);
    for (int i = 0; control.per_worker != NULL && i < control.cfg.workers; i++)
        policy_release(control.per_worker[i]); /* those no worker took */
    free(control.per_worker);
    reload_free(control.reload);
    if (control.ran)
        log_msgf(LOG_INFO, "errord stopped");
    free(control.policy_path);
    config_free(&control.cfg);
}

int main(int argc, char **argv)
{
    if (argc > 1 && tools_has(argv[1]))
        return tools_main(argc - 1, argv + 1);
    int status = run(argc, argv);
    teardown();
    exit(status);
}
