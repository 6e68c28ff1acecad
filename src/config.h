/* config: errord's settings, from flags and ERRORD_* environment variables. */
#ifndef ERRORD_CONFIG_H
#define ERRORD_CONFIG_H

#include "log.h"

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <sys/socket.h>

typedef struct {
    /* where clients connect */
    char *listen;
    struct sockaddr_storage listen_addr;
    /* the upstream, from --upstream http[s]://HOST[:PORT] */
    char *upstream;
    char *upstream_host;      /* without brackets for IPv6 */
    int upstream_port;
    char *upstream_authority; /* "host[:port]", the Host errord sends */
    int upstream_tls;         /* https */
    char *upstream_ca;        /* PEM CAs trusted instead of the system's */
    int upstream_insecure;    /* no certificate verification */
    char *policy;
    char *admin; /* ADDR:PORT or "off" */
    struct sockaddr_storage admin_addr;
    int admin_enabled;
    char *admin_token; /* required on the admin port when set */
    int watch;
    int workers;
    log_level_t log_level;
    char *log_level_name;
    int preserve_host;
    /* timeouts, in milliseconds */
    uint64_t client_header_timeout;
    uint64_t client_idle_timeout;
    uint64_t connect_timeout;
    uint64_t first_byte_timeout;
    uint64_t upstream_idle_timeout;
    uint64_t upstream_keepalive_timeout;
    uint64_t drain_timeout;
    /* limits */
    uint64_t max_request_line;
    uint64_t max_header_size;
    uint64_t max_body_size; /* 0: no limit */
    uint64_t max_connections;
    uint64_t upstream_max_idle;
} config_t;

typedef enum { CONFIG_RUN, CONFIG_HELP, CONFIG_VERSION } config_action_t;

/* Fills `c` from the defaults, then the environment, then the flags in
 * argv. On success returns what to do; on a bad flag or value returns -1
 * with a message for the user in `err`. Strings in `c` are allocated; free
 * them with config_free(). */
int config_parse(config_t *c, int argc, char **argv, char *err, size_t errlen);

/* Finds the policy file to run: --policy, else lua/default.lua next to the
 * binary (a build tree) or in the install's data directory. Sets *path to a
 * copy the caller frees, or to NULL for --policy off. Returns 0, or -1 with
 * why in `err`. */
int config_policy_path(const config_t *c, char **path, char *err, size_t errlen);

/* Frees what config_parse() allocated. */
void config_free(config_t *c);

/* Writes the --help text to `out`. */
void config_usage(FILE *out);

/* Parses a duration: "250ms", "10s", "2m", "1h", or plain milliseconds.
 * Returns 0 or -EINVAL. */
int config_parse_duration(const char *s, uint64_t *ms);

/* Parses a size: "512", "8k", "64KiB", "1m", "2g". Returns 0 or -EINVAL. */
int config_parse_size(const char *s, uint64_t *bytes);

/* Parses "ADDR:PORT", "[V6]:PORT" or ":PORT". Returns 0 or -EINVAL. */
int config_parse_addr(const char *s, struct sockaddr_storage *ss);

#endif
