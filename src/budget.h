/* budget: what retries may spend, shared by every worker and kept across
 * policy reloads.
 *
 * The retry budget: in a sliding window, retries may not exceed
 * ratio x requests + min_per_s x window (as in Finagle and Envoy), so a
 * failing upstream sees at most that much extra load however many requests
 * fail. The cooldown: when the upstream asks everyone to slow down, new
 * requests and retries are held until a point in time. And how many retries
 * were refused, by why. */
#ifndef ERRORD_BUDGET_H
#define ERRORD_BUDGET_H

#include <stdint.h>

/* The budget's sliding window. */
#define BUDGET_WINDOW_S 10

typedef enum {
    REFUSED_ATTEMPTS,
    REFUSED_BUDGET,
    REFUSED_DEADLINE,
    REFUSED_UNSAFE,
    REFUSED_BODY_TOO_LARGE,
    REFUSED_BODY_INCOMPLETE,
    REFUSED_RETRY_AFTER,
    REFUSED_N,
} refusal_t;

/* A client request went upstream (first attempts only). Thread-safe. */
void budget_note_request(int64_t now_ms);

/* Whether a retry fits the budget { ratio, min_per_s }; when it does, it is
 * counted. Thread-safe. */
int budget_take_retry(double ratio, double min_per_s, int64_t now_ms);

/* Holds new requests and retries until `until_ms` (monotonic), or later if a
 * cooldown already runs longer. */
void budget_cooldown(uint64_t until_ms);

/* The end of the current cooldown (monotonic ms), or 0 when there is none
 * at `now_ms`. */
uint64_t budget_cooldown_until(uint64_t now_ms);

/* Counts a refused retry. */
void budget_refused(refusal_t why);

/* Refused retries so far, for `why`. */
uint64_t budget_refusals(refusal_t why);

/* The word a refusal is logged and counted as ("attempts", "budget"...). */
const char *budget_refusal_name(refusal_t why);

#endif
