/* Flags and ERRORD_* environment variables (SPEC §1): defaults, the
 * environment, flags winning over it, and bad values refused with a message
 * that names what was wrong. */
#include "config.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>

#define ARGC(v) ((int)(sizeof(v) / sizeof *(v)))

static const char *const ENV_VARS[] = {
    "ERRORD_LISTEN",
    "ERRORD_UPSTREAM",
    "ERRORD_POLICY",
    "ERRORD_ADMIN",
    "ERRORD_WATCH",
    "ERRORD_WORKERS",
    "ERRORD_LOG_LEVEL",
    "ERRORD_PRESERVE_HOST",
    "ERRORD_CLIENT_HEADER_TIMEOUT",
    "ERRORD_CLIENT_IDLE_TIMEOUT",
    "ERRORD_CONNECT_TIMEOUT",
    "ERRORD_FIRST_BYTE_TIMEOUT",
    "ERRORD_UPSTREAM_IDLE_TIMEOUT",
    "ERRORD_UPSTREAM_KEEPALIVE_TIMEOUT",
    "ERRORD_DRAIN_TIMEOUT",
    "ERRORD_MAX_REQUEST_LINE",
    "ERRORD_MAX_HEADER_SIZE",
    "ERRORD_MAX_BODY_SIZE",
    "ERRORD_MAX_CONNECTIONS",
    "ERRORD_UPSTREAM_MAX_IDLE",
};

/* Each test starts from an environment with no ERRORD_* variable in it. */
static void clear_env(void)
{
    for (size_t i = 0; i < sizeof ENV_VARS / sizeof *ENV_VARS; i++)
        unsetenv(ENV_VARS[i]);
}

static int port_of(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)ss)->sin_port);
    if (ss->ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    return -1;
}

/* The address in `ss` as text ("127.0.0.1", "::1"), in `out`. */
static const char *ip_of(const struct sockaddr_storage *ss, char *out, size_t n)
{
    const void *a = ss->ss_family == AF_INET6
                        ? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
                        : (const void *)&((const struct sockaddr_in *)ss)->sin_addr;
    if (inet_ntop(ss->ss_family, a, out, (socklen_t)n) == NULL)
        snprintf(out, n, "?");
    return out;
}

/* ---- config_parse: defaults, environment, flags --------------------------------- */

TEST(config_defaults)
{
    clear_env();
    config_t c;
    char err[256] = "";
    char *argv[] = {"errord", "--upstream", "http://127.0.0.1:8081"};
    ASSERT_EQ(config_parse(&c, ARGC(argv), argv, err, sizeof err), CONFIG_RUN);
    ASSERT_STR(c.listen, "127.0.0.1:8080");
    char ip[64];
    ASSERT_EQ(c.listen_addr.ss_family, AF_INET);
    ASSERT_STR(ip_of(&c.listen_addr, ip, sizeof ip), "127.0.0.1");
    ASSERT_EQ(port_of(&c.listen_addr), 8080);
    /* The admin port answers on loopback only, and has no token unless given one. */
    ASSERT_EQ(c.admin_enabled, 1);
    ASSERT_EQ(c.admin_addr.ss_family, AF_INET);
    ASSERT_STR(ip_of(&c.admin_addr, ip, sizeof ip), "127.0.0.1");
    ASSERT_EQ(port_of(&c.admin_addr), 9901);
    ASSERT(c.admin_token == NULL);
    ASSERT_EQ(c.workers, 1);
    ASSERT_EQ(c.log_level, LOG_INFO);
    ASSERT_STR(c.log_level_name, "info");
    ASSERT_EQ(c.preserve_host, 0);
    ASSERT_EQ(c.client_header_timeout, 10000);
    ASSERT_EQ(c.client_idle_timeout, 60000);
    ASSERT_EQ(c.connect_timeout, 2000);
    ASSERT_EQ(c.first_byte_timeout, 30000);
    ASSERT_EQ(c.upstream_idle_timeout, 30000);
    ASSERT_EQ(c.upstream_keepalive_timeout, 15000);
    ASSERT_EQ(c.drain_timeout, 10000);
    ASSERT_EQ(c.max_request_line, 8 * 1024);   /* SPEC §7: 8 KiB */
    ASSERT_EQ(c.max_header_size, 64 * 1024);   /* SPEC §7: 64 KiB */
    ASSERT_EQ(c.max_body_size, 0);
    ASSERT_EQ(c.max_connections, 1024);
    ASSERT_EQ(c.upstream_max_idle, 128);
    config_free(&c);
}

/* The environment the two tests below start from. */
static void set_sample_env(void)
{
    clear_env();
    setenv("ERRORD_UPSTREAM", "http://10.1.2.3:9000", 1);
    setenv("ERRORD_LISTEN", "127.0.0.1:7000", 1);
    setenv("ERRORD_WORKERS", "3", 1);
    setenv("ERRORD_LOG_LEVEL", "debug", 1);
    setenv("ERRORD_PRESERVE_HOST", "1", 1);
    setenv("ERRORD_CONNECT_TIMEOUT", "500ms", 1);
}

TEST(config_reads_environment)
{
    set_sample_env();
    setenv("ERRORD_MAX_HEADER_SIZE", "16KiB", 1);
    setenv("ERRORD_MAX_CONNECTIONS", "77", 1);
    config_t c;
    char err[256] = "";
    char *argv[] = {"errord"};
    int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
    clear_env();
    ASSERT_EQ(rc, CONFIG_RUN);
    ASSERT_STR(c.upstream, "http://10.1.2.3:9000");
    ASSERT_STR(c.upstream_host, "10.1.2.3");
    ASSERT_EQ(c.upstream_port, 9000);
    ASSERT_STR(c.listen, "127.0.0.1:7000");
    ASSERT_EQ(port_of(&c.listen_addr), 7000);
    ASSERT_EQ(c.workers, 3);
    ASSERT_EQ(c.log_level, LOG_DEBUG);
    ASSERT_EQ(c.preserve_host, 1);
    ASSERT_EQ(c.connect_timeout, 500);
    ASSERT_EQ(c.max_header_size, 16 * 1024);
    ASSERT_EQ(c.max_connections, 77);
    config_free(&c);
}

TEST(config_flags_beat_environment)
{
    set_sample_env();
    config_t c;
    char err[256] = "";
    char *argv[] = {"errord",      "--upstream",        "http://127.0.0.1:8081",
                    "--listen",    "127.0.0.1:7001",    "--workers",
                    "2",           "--log-level",       "error",
                    "--preserve-host=0", "--connect-timeout", "3s"};
    int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
    clear_env();
    ASSERT_EQ(rc, CONFIG_RUN);
    ASSERT_STR(c.upstream_host, "127.0.0.1");
    ASSERT_EQ(c.upstream_port, 8081);
    ASSERT_EQ(port_of(&c.listen_addr), 7001);
    ASSERT_EQ(c.workers, 2);
    ASSERT_EQ(c.log_level, LOG_ERROR);
    ASSERT_EQ(c.preserve_host, 0);
    ASSERT_EQ(c.connect_timeout, 3000);
    config_free(&c);
}

TEST(config_flag_equals_value_form)
{
    clear_env();
    config_t c;
    char err[256] = "";
    char *argv[] = {"errord", "--upstream=http://127.0.0.1:8081", "--listen=[::1]:9090",
                    "--workers=4", "--log-level=warn", "--max-body-size=1MiB",
                    "--first-byte-timeout=2m", "--preserve-host"};
    ASSERT_EQ(config_parse(&c, ARGC(argv), argv, err, sizeof err), CONFIG_RUN);
    ASSERT_EQ(c.upstream_port, 8081);
    ASSERT_EQ(c.listen_addr.ss_family, AF_INET6);
    ASSERT_EQ(port_of(&c.listen_addr), 9090);
    ASSERT_EQ(c.workers, 4);
    ASSERT_EQ(c.log_level, LOG_WARN);
    ASSERT_EQ(c.max_body_size, 1024 * 1024);
    ASSERT_EQ(c.first_byte_timeout, 120000);
    ASSERT_EQ(c.preserve_host, 1); /* a bare boolean flag turns it on */
    config_free(&c);
}

TEST(config_later_flag_wins)
{
    clear_env();
    config_t c;
    char err[256] = "";
    char *argv[] = {"errord", "--upstream", "http://127.0.0.1:1111", "--upstream",
                    "http://127.0.0.1:2222", "--workers", "5", "--workers=6"};
    ASSERT_EQ(config_parse(&c, ARGC(argv), argv, err, sizeof err), CONFIG_RUN);
    ASSERT_EQ(c.upstream_port, 2222);
    ASSERT_EQ(c.workers, 6);
    config_free(&c);
}

TEST(config_boolean_spellings)
{
    const char *on[] = {"1", "true", "yes", "on", "TRUE"};
    const char *off[] = {"0", "false", "no", "off", "Off"};
    for (size_t i = 0; i < sizeof on / sizeof *on; i++) {
        clear_env();
        setenv("ERRORD_PRESERVE_HOST", on[i], 1);
        config_t c;
        char err[256] = "";
        char *argv[] = {"errord", "--upstream", "http://127.0.0.1:8081"};
        int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
        int v = c.preserve_host;
        config_free(&c);
        clear_env();
        ASSERT_EQ(rc, CONFIG_RUN);
        if (v != 1)
            test_fail(__FILE__, __LINE__, "ERRORD_PRESERVE_HOST=%s did not turn it on", on[i]);
    }
    for (size_t i = 0; i < sizeof off / sizeof *off; i++) {
        clear_env();
        config_t c;
        char err[256] = "";
        char flag[64];
        snprintf(flag, sizeof flag, "--preserve-host=%s", off[i]);
        char *argv[] = {"errord", "--upstream", "http://127.0.0.1:8081", "--preserve-host",
                        flag};
        int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
        int v = c.preserve_host;
        config_free(&c);
        ASSERT_EQ(rc, CONFIG_RUN);
        if (v != 0)
            test_fail(__FILE__, __LINE__, "%s did not turn it off", flag);
    }
}

TEST(config_help_and_version_need_no_upstream)
{
    clear_env();
    config_t c;
    char err[256] = "";
    char *help[] = {"errord", "--help"};
    ASSERT_EQ(config_parse(&c, ARGC(help), help, err, sizeof err), CONFIG_HELP);
    config_free(&c);
    char *version[] = {"errord", "--version"};
    ASSERT_EQ(config_parse(&c, ARGC(version), version, err, sizeof err), CONFIG_VERSION);
    config_free(&c);
}

TEST(config_usage_lists_every_flag_and_env)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    ASSERT(f != NULL);
    config_usage(f);
    fclose(f);
    const char *want[] = {"--listen",          "ERRORD_LISTEN",     "--upstream",
                          "ERRORD_UPSTREAM",   "--workers",         "ERRORD_WORKERS",
                          "--log-level",       "ERRORD_LOG_LEVEL",  "--preserve-host",
                          "--version",         "--help"};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (strstr(text, want[i]) == NULL)
            test_fail(__FILE__, __LINE__, "usage does not mention %s", want[i]);
    free(text);
}

/* ---- config_parse: what is refused ------------------------------------------------ */

/* Expects config_parse to refuse `argv` with a message containing `needle`. */
static void expect_refused(int line, int argc, char **argv, const char *needle)
{
    config_t c;
    char err[512] = "";
    int rc = config_parse(&c, argc, argv, err, sizeof err);
    config_free(&c);
    if (rc != -1) {
        test_fail(__FILE__, line, "accepted: %s %s (rc %d)", argv[argc - 2], argv[argc - 1],
                  rc);
        return;
    }
    if (err[0] == '\0')
        test_fail(__FILE__, line, "refused with no message: %s", argv[argc - 1]);
    else if (needle != NULL && strstr(err, needle) == NULL)
        test_fail(__FILE__, line, "message \"%s\" does not mention \"%s\"", err, needle);
}

#define REFUSED(needle, ...)                                              \
    do {                                                                  \
        char *argv_[] = {"errord", __VA_ARGS__};                          \
        expect_refused(__LINE__, ARGC(argv_), argv_, needle);             \
    } while (0)

#define UP "--upstream", "http://127.0.0.1:8081"

TEST(config_missing_upstream_refused)
{
    clear_env();
    REFUSED("--upstream", "--listen", "127.0.0.1:8080");
    setenv("ERRORD_UPSTREAM", "", 1); /* set but empty is no upstream either */
    REFUSED("--upstream", "--workers", "1");
    clear_env();
}

TEST(config_bad_flag_values_refused)
{
    clear_env();
    REFUSED("--workers", UP, "--workers", "abc");
    REFUSED("--workers", UP, "--workers", "0");
    REFUSED("--workers", UP, "--workers", "-2");
    REFUSED("--workers", UP, "--workers", "65");
    REFUSED("--workers", UP, "--workers", "4x");
    REFUSED("--workers", UP, "--workers=");
    REFUSED("--log-level", UP, "--log-level", "loud");
    REFUSED("--listen", UP, "--listen", "nowhere");
    REFUSED("--listen", UP, "--listen", "127.0.0.1");
    REFUSED("--listen", UP, "--listen", "127.0.0.1:70000");
    REFUSED("--listen", UP, "--listen=localhost:80");
    REFUSED("--connect-timeout", UP, "--connect-timeout", "10x");
    REFUSED("--connect-timeout", UP, "--connect-timeout", "-1s");
    REFUSED("--connect-timeout", UP, "--connect-timeout", "soon");
    REFUSED("timeout", UP, "--connect-timeout", "0");
    REFUSED("--max-header-size", UP, "--max-header-size", "8q");
    REFUSED("--max-header-size", UP, "--max-header-size", "lots");
    REFUSED("--max-connections", UP, "--max-connections", "0");
    REFUSED("--preserve-host", UP, "--preserve-host=maybe");
    REFUSED("--max-request-line", UP, "--max-request-line", "10");
}

TEST(config_bad_command_lines_refused)
{
    clear_env();
    REFUSED("--bogus", UP, "--bogus");
    REFUSED("--bogus", UP, "--bogus=1");
    REFUSED("stray", UP, "stray");
    REFUSED("--workers", UP, "--workers"); /* the value is missing */
    REFUSED("--listen", "--listen");
}

TEST(config_bad_environment_values_refused)
{
    const struct {
        const char *var, *value;
    } bad[] = {
        {"ERRORD_WORKERS", "many"},
        {"ERRORD_LOG_LEVEL", "chatty"},
        {"ERRORD_CONNECT_TIMEOUT", "3 days"},
        {"ERRORD_MAX_HEADER_SIZE", "big"},
        {"ERRORD_PRESERVE_HOST", "perhaps"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        clear_env();
        setenv(bad[i].var, bad[i].value, 1);
        config_t c;
        char err[512] = "";
        char *argv[] = {"errord", "--upstream", "http://127.0.0.1:8081"};
        int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
        config_free(&c);
        clear_env();
        if (rc != -1)
            test_fail(__FILE__, __LINE__, "%s=%s accepted", bad[i].var, bad[i].value);
        else if (err[0] == '\0')
            test_fail(__FILE__, __LINE__, "%s=%s refused without a message", bad[i].var,
                      bad[i].value);
        else if (strstr(err, bad[i].value) == NULL && strstr(err, bad[i].var) == NULL)
            test_fail(__FILE__, __LINE__, "message \"%s\" names neither %s nor its value", err,
                      bad[i].var);
    }
}

/* ---- the upstream URL ---------------------------------------------------------------- */

typedef struct {
    const char *url;
    const char *host;
    int port;
    const char *authority;
} upstream_case_t;

TEST(config_upstream_url_forms)
{
    const upstream_case_t cases[] = {
        {"http://api.example.com", "api.example.com", 80, "api.example.com"},
        {"http://api.example.com/", "api.example.com", 80, "api.example.com"},
        {"http://127.0.0.1:8081", "127.0.0.1", 8081, "127.0.0.1:8081"},
        {"http://127.0.0.1:8081/", "127.0.0.1", 8081, "127.0.0.1:8081"},
        {"http://localhost:80", "localhost", 80, "localhost"},
        {"HTTP://Example.com:9000", "Example.com", 9000, "Example.com:9000"},
        {"http://[::1]:8080", "::1", 8080, "[::1]:8080"},
        {"http://[::1]:8080/", "::1", 8080, "[::1]:8080"},
        {"http://[::1]", "::1", 80, "[::1]"},
        {"http://[2001:db8::7]:65535", "2001:db8::7", 65535, "[2001:db8::7]:65535"},
        {"https://api.example.com", "api.example.com", 443, "api.example.com"},
        {"HTTPS://api.example.com:443/", "api.example.com", 443, "api.example.com"},
        {"https://api.example.com:8443", "api.example.com", 8443, "api.example.com:8443"},
        {"https://[::1]:8443", "::1", 8443, "[::1]:8443"},
        {"https://[::1]", "::1", 443, "[::1]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        clear_env();
        config_t c;
        char err[512] = "";
        char *argv[] = {"errord", "--upstream", (char *)cases[i].url};
        int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
        if (rc != CONFIG_RUN) {
            test_fail(__FILE__, __LINE__, "%s refused: %s", cases[i].url, err);
        } else if (c.upstream_host == NULL || strcmp(c.upstream_host, cases[i].host) != 0 ||
                   c.upstream_port != cases[i].port || c.upstream_authority == NULL ||
                   strcmp(c.upstream_authority, cases[i].authority) != 0) {
            test_fail(__FILE__, __LINE__, "%s: host \"%s\" port %d authority \"%s\"",
                      cases[i].url, c.upstream_host ? c.upstream_host : "(null)",
                      c.upstream_port, c.upstream_authority ? c.upstream_authority : "(null)");
        }
        config_free(&c);
    }
}

TEST(config_upstream_url_refused)
{
    const char *bad[] = {
        "https://api.example.com/v1",    /* a path */
        "https://",
        "https://host:0",
        "http://api.example.com/v1",     /* a path */
        "http://api.example.com/v1/",
        "http://127.0.0.1:8081/x",
        "http://api.example.com?x=1",
        "http://api.example.com#frag",
        "ftp://api.example.com",
        "api.example.com:80",            /* no scheme */
        "127.0.0.1:8081",
        "http://",
        "http:///",
        "http://:8080",
        "http://host:",
        "http://host:0",
        "http://host:65536",
        "http://host:80x",
        "http://host:-1",
        "http://[::1",
        "http://[::1]x",
        "http://[::1]:",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        clear_env();
        config_t c;
        char err[512] = "";
        char *argv[] = {"errord", "--upstream", (char *)bad[i]};
        int rc = config_parse(&c, ARGC(argv), argv, err, sizeof err);
        config_free(&c);
        if (rc != -1)
            test_fail(__FILE__, __LINE__, "--upstream %s accepted", bad[i]);
        else if (strstr(err, "--upstream") == NULL)
            test_fail(__FILE__, __LINE__, "--upstream %s: message \"%s\" does not say which flag",
                      bad[i], err);
    }
}

TEST(config_upstream_tls_flags)
{
    clear_env();
    config_t c;
    char err[512] = "";
    char *tls[] = {"errord", "--upstream", "https://api.example.com", "--upstream-ca",
                   "/dev/null", "--upstream-insecure"};
    ASSERT_EQ(config_parse(&c, ARGC(tls), tls, err, sizeof err), CONFIG_RUN);
    ASSERT(c.upstream_tls);
    ASSERT_STR(c.upstream_ca, "/dev/null");
    ASSERT(c.upstream_insecure);
    config_free(&c);

    /* the TLS flags mean nothing for http: said, not ignored */
    char *plain[] = {"errord", "--upstream", "http://api.example.com", "--upstream-insecure"};
    ASSERT_EQ(config_parse(&c, ARGC(plain), plain, err, sizeof err), -1);
    config_free(&c);
    ASSERT(strstr(err, "https") != NULL);

    char *missing[] = {"errord", "--upstream", "https://api.example.com", "--upstream-ca",
                       "/nonexistent/ca.pem"};
    ASSERT_EQ(config_parse(&c, ARGC(missing), missing, err, sizeof err), -1);
    config_free(&c);
    ASSERT(strstr(err, "/nonexistent/ca.pem") != NULL);
}

/* ---- the value parsers ------------------------------------------------------------------ */

typedef int (*parse_u64_t)(const char *s, uint64_t *out);

/* A text and the value a parser should make of it. */
typedef struct {
    const char *s;
    uint64_t want;
} parse_case_t;

#define N_CASES(a) (sizeof(a) / sizeof *(a))

/* Fails the test for each of the `n` cases that `parse` gets wrong. */
static void expect_parsed(parse_u64_t parse, const char *unit, const parse_case_t *ok, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t v = 12345;
        int rc = parse(ok[i].s, &v);
        if (rc != 0 || v != ok[i].want)
            test_fail(__FILE__, __LINE__, "\"%s\": rc %d, %llu %s (want %llu)", ok[i].s, rc,
                      (unsigned long long)v, unit, (unsigned long long)ok[i].want);
    }
}

/* Fails the test for each of the `n` texts that `parse` accepts, or refuses
 * but writes a value for all the same. */
static void expect_parse_refused(parse_u64_t parse, const char *unit, const char *const *bad,
                                 size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t v = 777;
        int rc = parse(bad[i], &v);
        if (rc != -22)
            test_fail(__FILE__, __LINE__, "\"%s\" accepted as %llu %s", bad[i],
                      (unsigned long long)v, unit);
        else if (v != 777)
            test_fail(__FILE__, __LINE__, "\"%s\" refused but wrote %llu", bad[i],
                      (unsigned long long)v);
    }
}

TEST(config_parse_duration_units)
{
    static const parse_case_t ok[] = {
        {"0", 0},       {"1500", 1500},  {"250ms", 250}, {"10s", 10000},  {"2m", 120000},
        {"1h", 3600000}, {"1.5s", 1500},  {"90s", 90000}, {"24h", 86400000},
    };
    expect_parsed(config_parse_duration, "ms", ok, N_CASES(ok));
}

TEST(config_parse_duration_rejects)
{
    static const char *const bad[] = {"", "s", "ms", "-1s", "+1s", " 10s", "10 s", "10x",
                                      "10sec", "1d", "ten", "10s ", ".5s", "1e400"};
    expect_parse_refused(config_parse_duration, "ms", bad, N_CASES(bad));
}

/* Durations are decimal, like sizes: "0x10" is refused by the size parser
 * and must not silently mean 16 here. */
TEST(config_parse_duration_rejects_hex)
{
    static const char *const bad[] = {"0x10", "0x10s", "0x1p4s", "0X1Fms"};
    expect_parse_refused(config_parse_duration, "ms", bad, N_CASES(bad));
}

TEST(config_parse_size_units)
{
    static const parse_case_t ok[] = {
        {"0", 0},
        {"512", 512},
        {"8k", 8192},
        {"8K", 8192},
        {"8KiB", 8192},
        {"8kb", 8192},
        {"64KiB", 65536},
        {"1m", 1048576},
        {"1MiB", 1048576},
        {"2g", 2147483648ull},
        {"1GiB", 1073741824ull},
        {"18446744073709551615", UINT64_MAX},
    };
    expect_parsed(config_parse_size, "bytes", ok, N_CASES(ok));
}

TEST(config_parse_size_rejects)
{
    static const char *const bad[] = {"",     "k",      "KiB",  "-1",    "+1",   " 8k",
                                      "8 k",  "8x",     "8kk",  "8KiBs", "8kib2", "1.5m",
                                      "8t",   "lots",   "18446744073709551616",
                                      "18446744073709551615k", "17179869184g"};
    expect_parse_refused(config_parse_size, "bytes", bad, N_CASES(bad));
}

TEST(config_parse_addr_forms)
{
    struct sockaddr_storage ss;
    char ip[64];

    ASSERT_EQ(config_parse_addr("127.0.0.1:8080", &ss), 0);
    ASSERT_EQ(ss.ss_family, AF_INET);
    ASSERT_STR(ip_of(&ss, ip, sizeof ip), "127.0.0.1");
    ASSERT_EQ(port_of(&ss), 8080);

    ASSERT_EQ(config_parse_addr("0.0.0.0:0", &ss), 0);
    ASSERT_EQ(ss.ss_family, AF_INET);
    ASSERT_STR(ip_of(&ss, ip, sizeof ip), "0.0.0.0");
    ASSERT_EQ(port_of(&ss), 0);

    ASSERT_EQ(config_parse_addr(":9901", &ss), 0); /* every interface */
    ASSERT_EQ(ss.ss_family, AF_INET);
    ASSERT_STR(ip_of(&ss, ip, sizeof ip), "0.0.0.0");
    ASSERT_EQ(port_of(&ss), 9901);

    ASSERT_EQ(config_parse_addr("[::1]:9000", &ss), 0);
    ASSERT_EQ(ss.ss_family, AF_INET6);
    ASSERT_STR(ip_of(&ss, ip, sizeof ip), "::1");
    ASSERT_EQ(port_of(&ss), 9000);

    ASSERT_EQ(config_parse_addr("[::]:65535", &ss), 0);
    ASSERT_EQ(ss.ss_family, AF_INET6);
    ASSERT_EQ(port_of(&ss), 65535);
}

TEST(config_parse_addr_rejects)
{
    const char *bad[] = {"",          "8080",           "127.0.0.1",      "127.0.0.1:",
                         ":",         "127.0.0.1:65536", "127.0.0.1:-1",  "127.0.0.1:80x",
                         "localhost:80", "999.1.1.1:80", "::1:80",        "[::1:80",
                         "[::1]",     "[]:80",          "[127.0.0.1]:80", "1.2.3:80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct sockaddr_storage ss;
        if (config_parse_addr(bad[i], &ss) != -22)
            test_fail(__FILE__, __LINE__, "\"%s\" accepted", bad[i]);
    }
}

/* ---- config_policy_path: which policy file errord runs ---------------------------- */

TEST(config_policy_path_given_or_off)
{
    clear_env();
    config_t c;
    char err[256] = "";
    char *path = NULL;
    char *given[] = {"errord", "--upstream", "http://127.0.0.1:8081", "--policy", "/etc/p.lua"};
    ASSERT_EQ(config_parse(&c, ARGC(given), given, err, sizeof err), CONFIG_RUN);
    ASSERT_EQ(config_policy_path(&c, &path, err, sizeof err), 0);
    ASSERT(path != NULL);
    ASSERT_STR(path, "/etc/p.lua");
    free(path);
    config_free(&c);
    char *off[] = {"errord", "--upstream", "http://127.0.0.1:8081", "--policy", "off"};
    ASSERT_EQ(config_parse(&c, ARGC(off), off, err, sizeof err), CONFIG_RUN);
    path = (char *)"not reset";
    ASSERT_EQ(config_policy_path(&c, &path, err, sizeof err), 0);
    ASSERT(path == NULL);
    config_free(&c);
}
