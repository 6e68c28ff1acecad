/* main: flags, start-up, reload and shutdown order.
 *
 * Each worker runs an event loop with its own listener, proxy and upstream
 * pool. The first runs on the main thread's loop, next to the control work
 * (signals, reloads, the admin port, alert delivery, the drain timer); the
 * others have a thread each.
 *
 * A reload (SIGHUP, POST /reload, --watch) happens on the control loop: it
 * reads the file once, loads it, runs its tests, and builds one instance per
 * worker (a Lua state belongs to one loop); only when all of that worked is
 * each worker handed its instance, which it swaps in between two requests.
 * SIGTERM or SIGINT drains the workers, bounded by --drain-timeout; errord
 * then exits 0. */
#include "admin.h"
#include "clock.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "lua_version.h"
#include "metrics.h"
#include "notify.h"
#include "policy.h"
#include "proxy.h"
#include "sink.h"
#include "tls.h"
#include "sha256.h"
#include "tools.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
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
    uv_mutex_t lock;
    policy_t *next_policy; /* handed over by a reload; the worker swaps it in */
} worker_t;

/* How the last reload went, for GET /policy. */
typedef struct {
    const char *result; /* "reloaded", "unchanged", "failed"; NULL: none yet */
    const char *trigger;
    int64_t at_ms;
    double took_ms;
    buf_t errors; /* when it failed: one problem per line */
    uint64_t n_reloaded, n_unchanged, n_failed;
} reload_state_t;

typedef struct {
    uv_loop_t *loop;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    uv_signal_t sighup;
    uv_fs_event_t watcher; /* --watch: the policy file's directory */
    uv_timer_t watch_timer; /* ... debounces its events */
    uint64_t watch_first_ms;
    struct stat watched; /* the policy file as last seen */
    int watching;
    uv_timer_t drain_timer;
    uv_async_t worker_done; /* a worker finished draining */
    worker_t *workers;
    int n_workers;
    atomic_int n_done;
    int draining;
    config_t cfg;
    proxy_shared_t shared;
    char *policy_path; /* resolved; NULL when running without a policy */
    policy_t *policy;  /* the control loop's instance: settings, alert sinks */
    sinks_t *sinks;
    admin_t *admin;
    reload_state_t reload;
} control_t;

static control_t control;

static void on_worker_drained(void *arg)
{
    worker_t *w = arg;
    uv_close((uv_handle_t *)&w->wake, NULL);
    atomic_fetch_add(&control.n_done, 1);
    uv_async_send(&control.worker_done);
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
    notify("STOPPING=1");
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
    uv_close((uv_handle_t *)&control.sighup, NULL);
    if (control.watching) {
        uv_close((uv_handle_t *)&control.watcher, NULL);
        uv_close((uv_handle_t *)&control.watch_timer, NULL);
    }
    uv_close((uv_handle_t *)&control.drain_timer, NULL);
    uv_close((uv_handle_t *)&control.worker_done, NULL);
}

/* ---- loading and reloading the policy ---------------------------------------------- */

static void collect_failed_test(const policy_test_result_t *r, void *arg)
{
    buf_t *errors = arg;
    if (r->passed)
        return;
    if (r->line > 0)
        buf_printf(errors, "%s:%d: test \"%s\" failed: %s\n", control.policy_path, r->line,
                   r->name, r->message);
    else
        buf_printf(errors, "%s: test \"%s\" failed: %s\n", control.policy_path, r->name,
                   r->message);
}

static void log_warnings(const buf_t *warnings)
{
    for (size_t i = 0; i < warnings->len;) {
        size_t n = strcspn(warnings->data + i, "\n");
        log_record_t *r = log_begin(LOG_WARN, "policy warning");
        log_str(r, "policy", control.policy_path);
        log_strn(r, "warning", warnings->data + i, n);
        log_end(r);
        i += n + 1;
    }
}

/* Loads `src` (the policy file's text) as everything errord will run: the
 * control loop's instance, which runs the policy's tests, and one instance
 * per worker in `per_worker`. Returns the control instance, or NULL with one
 * problem per line in `errors`. */
static policy_t *load_instances(const char *src, size_t len, policy_t **per_worker,
                                buf_t *errors)
{
    policy_report_t rep = POLICY_REPORT_INIT;
    policy_t *p = policy_load_text(control.policy_path, src, len, &rep);
    log_warnings(&rep.warnings);
    if (p == NULL) {
        buf_append(errors, rep.errors.data, rep.errors.len);
        policy_report_free(&rep);
        return NULL;
    }
    policy_report_free(&rep);
    char err[512];
    int failed = policy_run_tests(p, collect_failed_test, errors, err, sizeof err);
    if (failed < 0)
        buf_printf(errors, "%s: %s\n", control.policy_path, err);
    for (int i = 0; failed == 0 && i < control.cfg.workers; i++) {
        policy_report_t quiet = POLICY_REPORT_INIT;
        per_worker[i] = policy_load_text(control.policy_path, src, len, &quiet);
        if (per_worker[i] == NULL) { /* loaded once already: out of memory */
            buf_append(errors, quiet.errors.data, quiet.errors.len);
            failed = -1;
        }
        policy_report_free(&quiet);
    }
    if (failed == 0)
        return p;
    for (int i = 0; i < control.cfg.workers; i++) {
        policy_release(per_worker[i]);
        per_worker[i] = NULL;
    }
    policy_release(p);
    return NULL;
}

static void json_time(buf_t *b, int64_t ms)
{
    char iso[32];
    clock_rfc3339(ms, iso);
    buf_printf(b, "\"%s\"", iso);
}

static void json_text(buf_t *b, const char *s, size_t n)
{
    buf_lit(b, "\"");
    buf_json_escape(b, s, n);
    buf_lit(b, "\"");
}

/* The problems in `errors` (one per line) as a JSON array. */
static void json_lines(buf_t *b, const buf_t *errors)
{
    buf_lit(b, "[");
    for (size_t i = 0; i < errors->len;) {
        size_t n = strcspn(errors->data + i, "\n");
        if (i > 0)
            buf_lit(b, ",");
        json_text(b, errors->data + i, n);
        i += n + 1;
    }
    buf_lit(b, "]");
}

/* Reloads the policy file. Returns 0 when the new policy runs (or the file
 * has not changed), -1 when the old one stays; `errors` says why. */
static int reload_file(const char *trigger, buf_t *errors)
{
    reload_state_t *st = &control.reload;
    uint64_t t0 = clock_now_ns();
    size_t len = 0;
    char err[512];
    char *src = policy_read_file(control.policy_path, &len, err, sizeof err);
    policy_t *p = NULL;
    policy_t **per_worker = calloc((size_t)control.cfg.workers, sizeof *per_worker);
    if (src == NULL)
        buf_printf(errors, "%s\n", err);
    else if (per_worker == NULL)
        buf_printf(errors, "out of memory\n");
    if (src != NULL && per_worker != NULL) {
        char sha[65];
        sha256_hex(src, len, sha);
        if (strcmp(sha, policy_sha256(control.policy)) == 0) {
            st->result = "unchanged";
            st->n_unchanged++;
            free(src);
            free(per_worker);
            log_record_t *r = log_begin(LOG_DEBUG, "policy file unchanged; nothing to reload");
            log_str(r, "trigger", trigger);
            log_end(r);
            st->trigger = trigger;
            st->at_ms = clock_wall_ms();
            return 0;
        }
        p = load_instances(src, len, per_worker, errors);
    }
    free(src);
    st->trigger = trigger;
    st->at_ms = clock_wall_ms();
    buf_clear(&st->errors);
    if (p == NULL) {
        free(per_worker);
        st->result = "failed";
        st->n_failed++;
        buf_append(&st->errors, errors->data, errors->len);
        log_record_t *r = log_begin(LOG_ERROR, "policy reload failed; the running policy stays");
        log_str(r, "trigger", trigger);
        log_str(r, "policy", control.policy_path);
        const char *text = buf_cstr(errors);
        log_strn(r, "error", text, strcspn(text, "\n"));
        buf_t list = BUF_INIT;
        json_lines(&list, errors);
        log_raw(r, "errors", list.data, list.len);
        buf_free(&list);
        log_str(r, "running_sha256", policy_sha256(control.policy));
        log_end(r);
        return -1;
    }

    /* Swap: the sinks follow the new settings, each worker gets its instance. */
    policy_release(control.policy);
    control.policy = p;
    if (control.sinks != NULL && sinks_update(control.sinks, policy_settings(p)) < 0)
        log_msgf(LOG_ERROR, "out of memory updating the alert sinks; they keep the old settings");
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        uv_mutex_lock(&w->lock);
        policy_t *stale = w->next_policy; /* never taken: the worker did not run since */
        w->next_policy = per_worker[i];
        uv_mutex_unlock(&w->lock);
        policy_release(stale);
        if (i == 0)
            take_policy(w); /* the control loop's own worker: now */
        else if (w->started)
            uv_async_send(&w->wake);
    }
    free(per_worker);
    st->result = "reloaded";
    st->n_reloaded++;
    st->took_ms = (double)(clock_now_ns() - t0) / 1e6;
    log_record_t *r = log_begin(LOG_INFO, "policy reloaded");
    log_str(r, "trigger", trigger);
    log_str(r, "policy", control.policy_path);
    log_str(r, "sha256", policy_sha256(p));
    log_ms(r, "took_ms", clock_now_ns() - t0);
    log_end(r);
    return 0;
}

/* A reload, as the service manager sees it (systemctl reload waits for it). */
static int reload(const char *trigger, buf_t *errors)
{
    notify("RELOADING=1");
    int rc = reload_file(trigger, errors);
    notify("READY=1");
    return rc;
}

static void on_sighup(uv_signal_t *s, int signum)
{
    (void)s;
    (void)signum;
    if (control.draining)
        return;
    if (control.policy == NULL) {
        log_msgf(LOG_WARN, "SIGHUP: errord runs without a policy (--policy off); nothing to reload");
        return;
    }
    buf_t errors = BUF_INIT;
    reload("SIGHUP", &errors);
    buf_free(&errors);
}

/* The longest --watch waits for a file that keeps changing to settle. */
#define WATCH_SETTLE_MS 200
#define WATCH_MAX_WAIT_MS 1000

/* Whether the policy file is another file, or was written, since last seen
 * (a symlink is followed: Kubernetes swaps ConfigMap files that way). */
static int watched_file_changed(void)
{
    struct stat now;
    if (stat(control.policy_path, &now) < 0)
        return 0; /* gone for now: an editor between its write and its rename */
    const struct stat *was = &control.watched;
    int changed = now.st_dev != was->st_dev || now.st_ino != was->st_ino ||
                  now.st_size != was->st_size || now.st_mtim.tv_sec != was->st_mtim.tv_sec ||
                  now.st_mtim.tv_nsec != was->st_mtim.tv_nsec ||
                  now.st_ctim.tv_sec != was->st_ctim.tv_sec ||
                  now.st_ctim.tv_nsec != was->st_ctim.tv_nsec;
    control.watched = now;
    return changed;
}

static void on_watch_timer(uv_timer_t *t)
{
    (void)t;
    control.watch_first_ms = 0;
    if (control.draining || !watched_file_changed())
        return; /* something else in the directory changed */
    buf_t errors = BUF_INIT;
    reload("watch", &errors);
    buf_free(&errors);
}

/* Something changed in the policy file's directory (editors write a new
 * file and rename it over the old one; Kubernetes swaps a symlink): reload
 * once things settle. An unchanged file is noticed by its hash. */
static void on_watch_event(uv_fs_event_t *h, const char *name, int events, int status)
{
    (void)h;
    (void)name;
    (void)events;
    if (status < 0)
        return;
    uint64_t now = clock_now_ms();
    if (control.watch_first_ms == 0)
        control.watch_first_ms = now;
    uint64_t waited = now - control.watch_first_ms;
    uint64_t delay = waited >= WATCH_MAX_WAIT_MS ? 0 : WATCH_SETTLE_MS;
    if (delay > WATCH_MAX_WAIT_MS - waited)
        delay = WATCH_MAX_WAIT_MS - waited;
    uv_timer_start(&control.watch_timer, on_watch_timer, delay, 0);
}

static int start_watch(void)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", control.policy_path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    stat(control.policy_path, &control.watched);
    uv_timer_init(control.loop, &control.watch_timer);
    uv_fs_event_init(control.loop, &control.watcher);
    control.watching = 1;
    int rc = uv_fs_event_start(&control.watcher, on_watch_event, dir, 0);
    if (rc < 0) {
        fprintf(stderr, "errord: --watch: cannot watch %s: %s\n", dir, uv_strerror(rc));
        return -1;
    }
    return 0;
}

/* ---- the admin port's routes ------------------------------------------------------ */

static void route_alerts(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    if (sinks_state_json(control.sinks, &reply->body) < 0)
        reply->status = 500;
    else
        buf_lit(&reply->body, "\n");
}

static void route_policy(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    buf_t *b = &reply->body;
    const reload_state_t *st = &control.reload;
    if (control.policy == NULL) {
        buf_lit(b, "{\"path\":null,\"sha256\":null,\"loaded_at\":null,\"last_reload\":null}\n");
        return;
    }
    int handlers, tests;
    policy_describe(control.policy, &handlers, &tests);
    buf_lit(b, "{\"path\":");
    json_text(b, control.policy_path, strlen(control.policy_path));
    buf_printf(b, ",\"sha256\":\"%s\",\"loaded_at\":", policy_sha256(control.policy));
    json_time(b, policy_loaded_at(control.policy));
    buf_printf(b, ",\"handlers\":%d,\"tests\":%d,\"watch\":%s,\"last_reload\":", handlers, tests,
               control.watching ? "true" : "false");
    if (st->result == NULL) {
        buf_lit(b, "null");
    } else {
        buf_printf(b, "{\"result\":\"%s\",\"trigger\":\"%s\",\"at\":", st->result, st->trigger);
        json_time(b, st->at_ms);
        if (strcmp(st->result, "failed") == 0) {
            const char *text = buf_cstr(&control.reload.errors);
            buf_lit(b, ",\"error\":");
            json_text(b, text, strcspn(text, "\n"));
            buf_lit(b, ",\"errors\":");
            json_lines(b, &st->errors);
        } else {
            buf_lit(b, ",\"error\":null");
        }
        buf_lit(b, "}");
    }
    buf_printf(b, ",\"reloads\":{\"reloaded\":%llu,\"unchanged\":%llu,\"failed\":%llu}}\n",
               (unsigned long long)st->n_reloaded, (unsigned long long)st->n_unchanged,
               (unsigned long long)st->n_failed);
}

/* Ready for traffic: the policy is loaded and the listeners are up (both
 * true once the admin port answers), and errord is not draining. */
static int ready(void)
{
    return !control.draining;
}

static void route_readyz(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    if (ready()) {
        buf_lit(&reply->body, "{\"status\":\"ready\"}\n");
    } else {
        reply->status = 503;
        buf_lit(&reply->body, "{\"status\":\"draining\"}\n");
    }
}

static void route_metrics(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    const reload_state_t *st = &control.reload;
    metrics_control_t m = {
        .version = ERRORD_VERSION,
        .lua_version = lua_version_string(),
        .policy_path = control.policy != NULL ? control.policy_path : NULL,
        .policy_sha256 = control.policy != NULL ? policy_sha256(control.policy) : NULL,
        .policy_loaded_ms = control.policy != NULL ? policy_loaded_at(control.policy) : 0,
        .reloads = {st->n_reloaded, st->n_unchanged, st->n_failed},
        .client_connections = atomic_load(&control.shared.connections),
        .ready = ready(),
    };
    reply->type = "text/plain; version=0.0.4; charset=utf-8";
    metrics_render(&reply->body, &m);
    sinks_metrics(control.sinks, &reply->body);
}

static void route_reload(void *arg, const http_head_t *req, admin_reply_t *reply)
{
    (void)arg;
    (void)req;
    buf_t *b = &reply->body;
    if (control.policy == NULL) {
        reply->status = 409;
        buf_lit(b, "{\"message\":\"errord runs without a policy (--policy off); there is "
                   "nothing to reload\"}\n");
        return;
    }
    if (control.draining) {
        reply->status = 503;
        buf_lit(b, "{\"message\":\"errord is stopping\"}\n");
        return;
    }
    buf_t errors = BUF_INIT;
    if (reload("admin", &errors) == 0) {
        buf_printf(b, "{\"result\":\"%s\",\"sha256\":\"%s\",\"path\":", control.reload.result,
                   policy_sha256(control.policy));
        json_text(b, control.policy_path, strlen(control.policy_path));
        buf_lit(b, "}\n");
    } else {
        reply->status = 422;
        const char *text = buf_cstr(&errors);
        buf_lit(b, "{\"message\":");
        json_text(b, text, strcspn(text, "\n"));
        buf_lit(b, ",\"errors\":");
        json_lines(b, &errors);
        buf_printf(b, ",\"running_sha256\":\"%s\"}\n", policy_sha256(control.policy));
    }
    buf_free(&errors);
}

/* The control loop's own services: the admin port and alert delivery. */
static int start_control(void)
{
    char admin_addr[64], generator[128];
    const char *gen = NULL;
    if (control.cfg.admin_enabled) {
        int rc;
        control.admin = admin_start(control.loop, &control.cfg, &rc);
        if (control.admin == NULL) {
            fprintf(stderr, "errord: cannot listen on the admin port %s: %s\n",
                    control.cfg.admin, uv_strerror(rc));
            return -1;
        }
        if (admin_route(control.admin, HTTP_M_GET, "/readyz", route_readyz, NULL) < 0 ||
            admin_route(control.admin, HTTP_M_GET, "/metrics", route_metrics, NULL) < 0 ||
            admin_route(control.admin, HTTP_M_GET, "/alerts", route_alerts, NULL) < 0 ||
            admin_route(control.admin, HTTP_M_GET, "/policy", route_policy, NULL) < 0 ||
            admin_route(control.admin, HTTP_M_POST, "/reload", route_reload, NULL) < 0) {
            fprintf(stderr, "errord: out of memory\n");
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
    if (control.cfg.watch && control.policy != NULL && start_watch() < 0)
        return -1;
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

/* Starts the workers, each with its instance of the policy (taken over). */
static int start_workers(policy_t **per_worker)
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
        uv_mutex_init(&w->lock);
        char err[512];
        w->proxy = proxy_new(w->loop, &control.cfg, &control.shared, per_worker[i], err,
                             sizeof err);
        policy_release(per_worker[i]); /* the proxy holds it now */
        per_worker[i] = NULL;
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
    for (int i = 0; i < control.n_workers; i++) {
        worker_t *w = &control.workers[i];
        proxy_free(w->proxy);
        policy_release(w->next_policy);
        uv_mutex_destroy(&w->lock);
    }
    free(control.workers);
}

/* Loads the policy before errord listens: one that does not load or pass
 * its tests stops errord (exit 2). */
static int load_first_policy(policy_t **per_worker)
{
    size_t len = 0;
    char err[512];
    char *src = policy_read_file(control.policy_path, &len, err, sizeof err);
    if (src == NULL) {
        fprintf(stderr, "errord: invalid policy: %s\n", err);
        return -1;
    }
    buf_t errors = BUF_INIT;
    control.policy = load_instances(src, len, per_worker, &errors);
    free(src);
    if (control.policy == NULL) {
        fprintf(stderr, "errord: invalid policy %s:\n%s", control.policy_path,
                buf_cstr(&errors));
        buf_free(&errors);
        return -1;
    }
    buf_free(&errors);
    return 0;
}

int main(int argc, char **argv)
{
    char err[512];
    if (argc > 1 && tools_has(argv[1]))
        return tools_main(argc - 1, argv + 1);
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
    if (control.cfg.upstream_tls) {
        /* the trust settings, checked once before anything starts */
        tls_ctx_t *tls = tls_ctx_new(control.cfg.upstream_ca, control.cfg.upstream_insecure, err,
                                     sizeof err);
        if (tls == NULL) {
            fprintf(stderr, "errord: --upstream-ca %s\n", err);
            config_free(&control.cfg);
            return 2;
        }
        tls_ctx_free(tls);
        if (control.cfg.upstream_insecure) {
            log_record_t *r = log_begin(LOG_WARN, "upstream TLS certificates are not verified "
                                                  "(--upstream-insecure): anyone on the path "
                                                  "can read and change the traffic");
            log_str(r, "upstream", control.cfg.upstream);
            log_end(r);
        }
    }
    if (config_policy_path(&control.cfg, &control.policy_path, err, sizeof err) < 0) {
        fprintf(stderr, "errord: %s\n", err);
        config_free(&control.cfg);
        return 2;
    }
    policy_t **per_worker = calloc((size_t)control.cfg.workers, sizeof *per_worker);
    if (per_worker == NULL || (control.policy_path != NULL && load_first_policy(per_worker) < 0)) {
        free(per_worker);
        free(control.policy_path);
        config_free(&control.cfg);
        return 2;
    }

    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    control.loop = uv_default_loop();

    int rc = start_workers(per_worker);
    for (int i = 0; i < control.cfg.workers; i++) /* those no worker took */
        policy_release(per_worker[i]);
    free(per_worker);
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
        policy_release(control.policy);
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
    uv_signal_init(control.loop, &control.sighup);
    uv_signal_start(&control.sigterm, on_signal, SIGTERM);
    uv_signal_start(&control.sigint, on_signal, SIGINT);
    uv_signal_start(&control.sighup, on_sighup, SIGHUP);
    uv_timer_init(control.loop, &control.drain_timer);
    uv_async_init(control.loop, &control.worker_done, on_worker_done);

    log_record_t *r = log_begin(LOG_INFO, "errord started");
    log_str(r, "version", ERRORD_VERSION);
    char addr[64];
    proxy_address(control.workers[0].proxy, addr, sizeof addr);
    log_str(r, "listen", addr);
    log_str(r, "upstream", control.cfg.upstream);
    log_str(r, "policy", control.policy_path ? control.policy_path : "off");
    if (control.policy != NULL)
        log_str(r, "policy_sha256", policy_sha256(control.policy));
    char admin_addr[64] = "off";
    if (control.admin != NULL)
        admin_address(control.admin, admin_addr, sizeof admin_addr);
    log_str(r, "admin", admin_addr);
    log_int(r, "workers", control.cfg.workers);
    log_int(r, "pid", getpid());
    log_end(r);
    int told = notify("READY=1");
    if (told < 0)
        log_msgf(LOG_WARN, "could not tell the service manager errord is ready (%s): %s",
                 getenv("NOTIFY_SOCKET"), uv_strerror(told));

    log_set_buffered(1); /* the first worker's loop flushes the log */
    uv_run(control.loop, UV_RUN_DEFAULT);
    log_set_buffered(0);
    stop_workers();
    uv_loop_close(control.loop);
    free_workers();
    admin_free(control.admin);
    sinks_free(control.sinks);
    policy_release(control.policy);
    buf_free(&control.reload.errors);
    log_msgf(LOG_INFO, "errord stopped");
    free(control.policy_path);
    config_free(&control.cfg);
    return 0;
}
