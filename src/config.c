/* config: errord's settings, from flags and ERRORD_* environment variables. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <uv.h>

typedef enum { OPT_STR, OPT_BOOL, OPT_DURATION, OPT_SIZE, OPT_COUNT } opt_kind_t;

typedef struct {
    const char *flag;
    const char *env;
    opt_kind_t kind;
    size_t offset;
    const char *def; /* default, as the user would type it; NULL: none */
    const char *arg;
    const char *help;
} option_t;

#define OPT(flag, env, kind, field, def, arg, help) \
    {flag, env, kind, offsetof(config_t, field), def, arg, help}

static const option_t OPTIONS[] = {
    OPT("listen", "ERRORD_LISTEN", OPT_STR, listen, "127.0.0.1:8080", "ADDR:PORT",
        "where clients connect"),
    OPT("upstream", "ERRORD_UPSTREAM", OPT_STR, upstream, NULL, "URL",
        "the API errord forwards to, http[s]://HOST[:PORT] (required)"),
    OPT("upstream-ca", "ERRORD_UPSTREAM_CA", OPT_STR, upstream_ca, NULL, "FILE",
        "with https: trust the CA certificates in FILE (PEM) instead of the system's"),
    OPT("upstream-insecure", "ERRORD_UPSTREAM_INSECURE", OPT_BOOL, upstream_insecure, "0", NULL,
        "with https: do not verify the upstream's certificate (testing only)"),
    OPT("policy", "ERRORD_POLICY", OPT_STR, policy, NULL, "FILE",
        "the Lua policy (default: lua/default.lua of the install; off: none)"),
    OPT("admin", "ERRORD_ADMIN", OPT_STR, admin, "127.0.0.1:9901", "ADDR:PORT",
        "the admin port (/healthz, /alerts...); off: none"),
    OPT("admin-token", "ERRORD_ADMIN_TOKEN", OPT_STR, admin_token, NULL, "TOKEN",
        "require Authorization: Bearer TOKEN on the admin port (but the probes); prefer the env"),
    OPT("watch", "ERRORD_WATCH", OPT_BOOL, watch, "0", NULL,
        "reload the policy when its file changes (SIGHUP and POST /reload always do)"),
    OPT("workers", "ERRORD_WORKERS", OPT_COUNT, workers, "1", "N",
        "event loops, each on its own thread"),
    OPT("log-level", "ERRORD_LOG_LEVEL", OPT_STR, log_level_name, "info", "LEVEL",
        "debug, info, warn or error"),
    OPT("preserve-host", "ERRORD_PRESERVE_HOST", OPT_BOOL, preserve_host, "0", NULL,
        "send the client's Host upstream instead of the upstream's authority"),
    OPT("client-header-timeout", "ERRORD_CLIENT_HEADER_TIMEOUT", OPT_DURATION,
        client_header_timeout, "10s", "DURATION",
        "time a client has to send a whole request head (408 after)"),
    OPT("client-idle-timeout", "ERRORD_CLIENT_IDLE_TIMEOUT", OPT_DURATION, client_idle_timeout,
        "60s", "DURATION", "idle keep-alive connection, stalled request body, or client not reading, cut after"),
    OPT("connect-timeout", "ERRORD_CONNECT_TIMEOUT", OPT_DURATION, connect_timeout, "2s",
        "DURATION", "time to connect to the upstream (504 after)"),
    OPT("first-byte-timeout", "ERRORD_FIRST_BYTE_TIMEOUT", OPT_DURATION, first_byte_timeout,
        "30s", "DURATION", "time from a request sent to its response head (504 after)"),
    OPT("upstream-idle-timeout", "ERRORD_UPSTREAM_IDLE_TIMEOUT", OPT_DURATION,
        upstream_idle_timeout, "30s", "DURATION",
        "longest silence from the upstream in a response body, or while it takes a request body"),
    OPT("upstream-keepalive-timeout", "ERRORD_UPSTREAM_KEEPALIVE_TIMEOUT", OPT_DURATION,
        upstream_keepalive_timeout, "15s", "DURATION",
        "an idle pooled upstream connection is closed after"),
    OPT("drain-timeout", "ERRORD_DRAIN_TIMEOUT", OPT_DURATION, drain_timeout, "10s",
        "DURATION", "on SIGTERM, how long in-flight requests may take to finish"),
    OPT("max-request-line", "ERRORD_MAX_REQUEST_LINE", OPT_SIZE, max_request_line, "8KiB",
        "SIZE", "longest request line (414 past it)"),
    OPT("max-header-size", "ERRORD_MAX_HEADER_SIZE", OPT_SIZE, max_header_size, "64KiB", "SIZE",
        "largest request or response head (431, or 502 for a response, past it)"),
    OPT("max-body-size", "ERRORD_MAX_BODY_SIZE", OPT_SIZE, max_body_size, "0", "SIZE",
        "largest request body (413 past it); 0 means no limit"),
    OPT("max-connections", "ERRORD_MAX_CONNECTIONS", OPT_COUNT, max_connections, "1024", "N",
        "client connections at once; more are answered 503 and closed"),
    OPT("upstream-max-idle", "ERRORD_UPSTREAM_MAX_IDLE", OPT_COUNT, upstream_max_idle, "128",
        "N", "idle upstream connections kept for reuse, per worker"),
};

#define N_OPTIONS (sizeof OPTIONS / sizeof *OPTIONS)

int config_parse_duration(const char *s, uint64_t *ms)
{
    /* Decimal only: "1.5s", "250ms", "2m"; no hex, no exponents. */
    uint64_t whole = 0, frac = 0, scale = 1;
    const char *p = s;
    if (!isdigit((unsigned char)*p))
        return -EINVAL;
    for (; isdigit((unsigned char)*p); p++) {
        whole = whole * 10 + (uint64_t)(*p - '0');
        if (whole > 1000000000000ull)
            return -EINVAL;
    }
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return -EINVAL;
        for (; isdigit((unsigned char)*p); p++) {
            if (scale < 1000000000ull) {
                frac = frac * 10 + (uint64_t)(*p - '0');
                scale *= 10;
            }
        }
    }
    uint64_t mult;
    if (*p == '\0' || strcmp(p, "ms") == 0)
        mult = 1;
    else if (strcmp(p, "s") == 0)
        mult = 1000;
    else if (strcmp(p, "m") == 0)
        mult = 60000;
    else if (strcmp(p, "h") == 0)
        mult = 3600000;
    else
        return -EINVAL;
    *ms = whole * mult + (frac * mult + scale / 2) / scale;
    return 0;
}

int config_parse_size(const char *s, uint64_t *bytes)
{
    char *end;
    if (!isdigit((unsigned char)*s))
        return -EINVAL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0)
        return -EINVAL;
    uint64_t mult = 1;
    if (*end != '\0') {
        switch (tolower((unsigned char)*end)) {
        case 'k': mult = 1024; break;
        case 'm': mult = 1024 * 1024; break;
        case 'g': mult = 1024ull * 1024 * 1024; break;
        default: return -EINVAL;
        }
        end++;
        if (strcasecmp(end, "") != 0 && strcasecmp(end, "b") != 0 && strcasecmp(end, "ib") != 0)
            return -EINVAL;
    }
    if (v > UINT64_MAX / mult)
        return -EINVAL;
    *bytes = v * mult;
    return 0;
}

int config_parse_addr(const char *s, struct sockaddr_storage *ss)
{
    char host[256];
    const char *colon = strrchr(s, ':');
    if (colon == NULL || colon[1] == '\0')
        return -EINVAL;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535)
        return -EINVAL;
    size_t hlen = (size_t)(colon - s);
    if (hlen >= sizeof host)
        return -EINVAL;
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    memset(ss, 0, sizeof *ss);
    if (hlen == 0)
        return uv_ip4_addr("0.0.0.0", (int)port, (struct sockaddr_in *)ss) < 0 ? -EINVAL : 0;
    if (host[0] == '[') {
        if (hlen < 3 || host[hlen - 1] != ']')
            return -EINVAL;
        host[hlen - 1] = '\0';
        return uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss) < 0 ? -EINVAL : 0;
    }
    return uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) < 0 ? -EINVAL : 0;
}

/* http[s]://HOST[:PORT][/] */
static int parse_upstream(config_t *c, char *err, size_t errlen)
{
    const char *u = c->upstream;
    c->upstream_tls = strncasecmp(u, "https://", 8) == 0;
    if (!c->upstream_tls && strncasecmp(u, "http://", 7) != 0) {
        snprintf(err, errlen, "--upstream %s: expected http://HOST[:PORT] or https://HOST[:PORT]", u);
        return -1;
    }
    const int default_port = c->upstream_tls ? 443 : 80;
    const char *h = u + (c->upstream_tls ? 8 : 7), *end = h + strcspn(h, "/?#");
    if (*end != '\0' && strcmp(end, "/") != 0) {
        snprintf(err, errlen, "--upstream %s: a path is not supported, give http://HOST[:PORT]", u);
        return -1;
    }
    const char *hend, *port = NULL;
    if (*h == '[') {
        hend = memchr(h, ']', (size_t)(end - h));
        if (hend == NULL) {
            snprintf(err, errlen, "--upstream %s: unterminated IPv6 address", u);
            return -1;
        }
        if (hend + 1 < end && hend[1] == ':')
            port = hend + 2;
        else if (hend + 1 != end)
            goto bad;
        h++;
    } else {
        hend = memchr(h, ':', (size_t)(end - h));
        if (hend != NULL)
            port = hend + 1;
        else
            hend = end;
    }
    if (hend == h)
        goto bad;
    c->upstream_port = default_port;
    if (port != NULL) {
        long p = 0;
        if (port == end)
            goto bad;
        for (const char *q = port; q < end; q++) {
            if (!isdigit((unsigned char)*q))
                goto bad;
            p = p * 10 + (*q - '0');
            if (p > 65535)
                goto bad;
        }
        if (p == 0)
            goto bad;
        c->upstream_port = (int)p;
    }
    c->upstream_host = strndup(h, (size_t)(hend - h));
    /* The Host errord sends: the port only when it is not the default. */
    char auth[300];
    int v6 = *(h - 1) == '[';
    if (c->upstream_port == default_port)
        snprintf(auth, sizeof auth, "%s%s%s", v6 ? "[" : "", c->upstream_host, v6 ? "]" : "");
    else
        snprintf(auth, sizeof auth, "%s%s%s:%d", v6 ? "[" : "", c->upstream_host, v6 ? "]" : "",
                 c->upstream_port);
    c->upstream_authority = strdup(auth);
    return 0;
bad:
    snprintf(err, errlen, "--upstream %s: expected %s://HOST[:PORT]", u,
         c->upstream_tls ? "https" : "http");
    return -1;
}

static int set_option(config_t *c, const option_t *o, const char *value, const char *from,
                      char *err, size_t errlen)
{
    void *field = (char *)c + o->offset;
    switch (o->kind) {
    case OPT_STR: {
        char **s = field;
        free(*s);
        *s = strdup(value);
        return 0;
    }
    case OPT_BOOL: {
        int *b = field;
        if (strcmp(value, "1") == 0 || strcasecmp(value, "true") == 0 ||
            strcasecmp(value, "yes") == 0 || strcasecmp(value, "on") == 0) {
            *b = 1;
            return 0;
        }
        if (strcmp(value, "0") == 0 || strcasecmp(value, "false") == 0 ||
            strcasecmp(value, "no") == 0 || strcasecmp(value, "off") == 0) {
            *b = 0;
            return 0;
        }
        break;
    }
    case OPT_DURATION:
        if (config_parse_duration(value, field) == 0)
            return 0;
        snprintf(err, errlen, "%s %s: expected a duration such as 500ms, 10s or 2m", from, value);
        return -1;
    case OPT_SIZE:
        if (config_parse_size(value, field) == 0)
            return 0;
        snprintf(err, errlen, "%s %s: expected a size such as 512, 8KiB or 1MiB", from, value);
        return -1;
    case OPT_COUNT: {
        char *end;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (errno != 0 || *end != '\0' || end == value || v < 0)
            break;
        if (o->offset == offsetof(config_t, workers))
            *(int *)field = (int)(v > 1024 ? 1024 : v);
        else
            *(uint64_t *)field = (uint64_t)v;
        return 0;
    }
    }
    snprintf(err, errlen, "%s %s: invalid value", from, value);
    return -1;
}

static const option_t *find_option(const char *name, size_t n)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (strlen(OPTIONS[i].flag) == n && strncmp(OPTIONS[i].flag, name, n) == 0)
            return &OPTIONS[i];
    return NULL;
}

static int check(config_t *c, char *err, size_t errlen)
{
    if (config_parse_addr(c->listen, &c->listen_addr) < 0) {
        snprintf(err, errlen, "--listen %s: expected ADDR:PORT, such as 127.0.0.1:8080", c->listen);
        return -1;
    }
    c->admin_enabled = strcmp(c->admin, "off") != 0;
    if (c->admin_enabled && config_parse_addr(c->admin, &c->admin_addr) < 0) {
        snprintf(err, errlen, "--admin %s: expected ADDR:PORT, such as 127.0.0.1:9901, or off",
             c->admin);
        return -1;
    }
    if (c->admin_token != NULL) {
        int ok = c->admin_token[0] != '\0';
        for (const char *t = c->admin_token; ok && *t; t++)
            ok = *t > 0x20 && *t < 0x7f;
        if (!ok) {
            snprintf(err, errlen, "--admin-token: expected printable characters without spaces");
            return -1;
        }
    }
    if (c->upstream == NULL || c->upstream[0] == '\0') {
        snprintf(err, errlen, "--upstream is required (or ERRORD_UPSTREAM), e.g. "
                          "--upstream http://127.0.0.1:8081");
        return -1;
    }
    if (parse_upstream(c, err, errlen) < 0)
        return -1;
    if (!c->upstream_tls && (c->upstream_ca != NULL || c->upstream_insecure)) {
        snprintf(err, errlen, "--upstream-ca and --upstream-insecure need an https:// --upstream");
        return -1;
    }
    if (c->upstream_ca != NULL) {
        FILE *f = fopen(c->upstream_ca, "r");
        if (f == NULL) {
            snprintf(err, errlen, "--upstream-ca %s: %s", c->upstream_ca, strerror(errno));
            return -1;
        }
        fclose(f);
    }
    if (log_level_parse(c->log_level_name, &c->log_level) < 0) {
        snprintf(err, errlen, "--log-level %s: expected debug, info, warn or error",
             c->log_level_name);
        return -1;
    }
    if (c->workers < 1 || c->workers > 64) {
        snprintf(err, errlen, "--workers %d: expected 1 to 64", c->workers);
        return -1;
    }
    if (c->max_connections < 1) {
        snprintf(err, errlen, "--max-connections must be at least 1");
        return -1;
    }
    if (c->max_request_line < 64 || c->max_header_size < c->max_request_line) {
        snprintf(err, errlen, "--max-request-line must be at least 64 bytes and at most "
                          "--max-header-size");
        return -1;
    }
    if (c->client_header_timeout == 0 || c->client_idle_timeout == 0 ||
        c->connect_timeout == 0 || c->first_byte_timeout == 0 ||
        c->upstream_idle_timeout == 0 || c->upstream_keepalive_timeout == 0) {
        snprintf(err, errlen, "timeouts must be greater than zero");
        return -1;
    }
    return 0;
}

int config_parse(config_t *c, int argc, char **argv, char *err, size_t errlen)
{
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (OPTIONS[i].def != NULL &&
            set_option(c, &OPTIONS[i], OPTIONS[i].def, OPTIONS[i].flag, err, errlen) < 0)
            return -1;
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const char *v = getenv(OPTIONS[i].env);
        if (v != NULL && *v != '\0' &&
            set_option(c, &OPTIONS[i], v, OPTIONS[i].env, err, errlen) < 0)
            return -1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            return CONFIG_HELP;
        if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0)
            return CONFIG_VERSION;
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument '%s' (see errord --help)", a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t n = eq ? (size_t)(eq - name) : strlen(name);
        const option_t *o = find_option(name, n);
        if (o == NULL) {
            snprintf(err, errlen, "unknown option '%.*s' (see errord --help)", (int)(n + 2), a);
            return -1;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (value == NULL && o->kind == OPT_BOOL)
            value = "1";
        if (value == NULL) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "--%s needs a value (%s)", o->flag, o->arg);
                return -1;
            }
            value = argv[++i];
        }
        char from[64];
        snprintf(from, sizeof from, "--%s", o->flag);
        if (set_option(c, o, value, from, err, errlen) < 0)
            return -1;
    }
    return check(c, err, errlen) < 0 ? -1 : CONFIG_RUN;
}

static int copy_path(const char *found, char **path, char *err, size_t errlen)
{
    *path = strdup(found);
    if (*path == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

int config_policy_path(const config_t *c, char **path, char *err, size_t errlen)
{
    const char *given = c->policy;
    *path = NULL;
    if (given != NULL && (strcmp(given, "off") == 0 || strcmp(given, "none") == 0))
        return 0;
    if (given != NULL)
        return copy_path(given, path, err, errlen);
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
        if (access(exe, R_OK) == 0)
            return copy_path(exe, path, err, errlen);
        exe[n] = '\0'; /* the directory; its parent next */
    }
    if (access(ERRORD_DATADIR "/default.lua", R_OK) == 0)
        return copy_path(ERRORD_DATADIR "/default.lua", path, err, errlen);
    snprintf(err, errlen, "no default policy at lua/default.lua next to errord nor at %s; "
                          "give --policy FILE, or --policy off to run without one",
             ERRORD_DATADIR "/default.lua");
    return -1;
}

void config_free(config_t *c)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        if (OPTIONS[i].kind == OPT_STR) {
            char **s = (char **)((char *)c + OPTIONS[i].offset);
            free(*s);
            *s = NULL;
        }
    }
    free(c->upstream_host);
    free(c->upstream_authority);
    c->upstream_host = c->upstream_authority = NULL;
}

void config_usage(FILE *out)
{
    fprintf(out, "usage: errord --upstream http[s]://HOST[:PORT] [options]\n"
                 "       errord check POLICY                  load, validate and test a policy\n"
                 "       errord test POLICY [CASES.json]      run its tests and extra cases\n"
                 "       errord replay POLICY LOG.jsonl [--against OLD_POLICY]\n"
                 "                                            what it decides for recorded traffic\n"
                 "       errord --version | --help\n\n"
                 "errord is an HTTP/1.1 sidecar proxy: it forwards each request to the upstream\n"
                 "and streams the response back, and a Lua policy decides what happens to each\n"
                 "error response (pass, retry, respond, log, alert).\n\n"
                 "options (each also read from the environment variable shown; flags win):\n");
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_t *o = &OPTIONS[i];
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", o->flag, o->arg ? " " : "", o->arg ? o->arg : "");
        fprintf(out, "  %-36s %s\n", left, o->help);
        fprintf(out, "  %-36s env %s", "", o->env);
        if (o->def != NULL && o->kind != OPT_BOOL)
            fprintf(out, ", default %s", o->def);
        fprintf(out, "\n");
    }
    fprintf(out, "\nDurations: 500ms, 10s, 2m, 1h (a bare number is milliseconds).\n"
                 "Sizes: 512, 8KiB, 1MiB, 1GiB.\n"
                 "Signals: SIGHUP reloads the policy (so does POST /reload on the admin port);\n"
                 "SIGTERM or SIGINT drains in-flight requests and exits 0.\n"
                 "Exit status: 0 ok, 1 runtime failure, 2 bad command line or invalid policy.\n");
}
