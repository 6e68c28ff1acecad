/* sink: delivers the alert table to the sinks of settings.alerts
 * (Alertmanager, webhook, Slack, PagerDuty), on an event loop, with
 * errord's own HTTP client.
 *
 * Every tick it compares the table with what it has sent: a new alert is
 * sent to every sink; Alertmanager gets the firing ones again every
 * repeat_ms (so they stay active there) and, like PagerDuty, a resolve once
 * an alert has been quiet for resolve_after_ms. Each sink has a bounded
 * queue (full: the oldest delivery is dropped and counted), a rate limit, one
 * delivery in flight, and retries with backoff on 5xx and network errors.
 * Nothing here waits on a sink: proxied traffic never does either. */
#ifndef ERRORD_SINK_H
#define ERRORD_SINK_H

#include "buf.h"
#include "settings.h"

#include <uv.h>

typedef struct sinks_s sinks_t;

/* Starts delivering on `loop` to the sinks of `settings` (copied).
 * `upstream` becomes a label of every alert; `generator_url` (the admin
 * port's /alerts, or NULL) is where Alertmanager links back to. Returns NULL
 * when out of memory. */
sinks_t *sinks_new(uv_loop_t *loop, const policy_settings_t *settings, const char *upstream,
                   const char *generator_url);

/* Delivers to the sinks of `settings` from now on (a reloaded policy's):
 * a sink that stays (same kind, URL, headers and key) keeps its queue and
 * counts, a new one is told of the alerts already firing, a removed one's
 * queue is dropped (and logged). Returns 0, or -ENOMEM with nothing
 * changed. */
int sinks_update(sinks_t *s, const policy_settings_t *settings);

/* Appends the JSON of the firing alerts and of each sink's delivery state,
 * {"alerts":[...],"sinks":[...]}, to `out`. */
void sinks_state_json(sinks_t *s, buf_t *out);

/* Appends the sinks' metrics in the Prometheus text format. */
void sinks_metrics(sinks_t *s, buf_t *out);

/* Sends what is due now and waits for the queues to empty, for at most
 * `timeout_ms`; then closes everything and calls `done`. */
void sinks_close(sinks_t *s, uint64_t timeout_ms, void (*done)(void *arg), void *arg);

/* Frees the sinks after `done` fired. */
void sinks_free(sinks_t *s);

#endif
