/* clock: monotonic time, wall-clock time stamps and HTTP dates. */
#include "clock.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static const char *const WDAY[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
static const char *const MONTH[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                    "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

uint64_t clock_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t clock_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int clock_rfc3339(int64_t ms, char out[32])
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    return snprintf(out, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                    tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                    (int)(ms % 1000));
}

int clock_http_date(time_t t, char out[32])
{
    struct tm tm;
    gmtime_r(&t, &tm);
    return snprintf(out, 32, "%s, %02d %s %04d %02d:%02d:%02d GMT", WDAY[tm.tm_wday],
                    tm.tm_mday, MONTH[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                    tm.tm_sec);
}

static int month_index(const char *m)
{
    for (int i = 0; i < 12; i++)
        if (strncmp(m, MONTH[i], 3) == 0)
            return i;
    return -1;
}

int clock_parse_http_date(const char *s, size_t n, time_t *t)
{
    char text[64], wday[16], mon[4];
    struct tm tm;
    int used = 0;

    while (n > 0 && (*s == ' ' || *s == '\t')) {
        s++;
        n--;
    }
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n == 0 || n >= sizeof text)
        return -EINVAL;
    memcpy(text, s, n);
    text[n] = '\0';
    memset(&tm, 0, sizeof tm);

    /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
    if (sscanf(text, "%3s, %2d %3s %4d %2d:%2d:%2d GMT%n", wday, &tm.tm_mday, mon, &tm.tm_year,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &used) == 7 && used == (int)n) {
        /* fall through to the common checks */
    } else if (sscanf(text, "%15[A-Za-z], %2d-%3s-%2d %2d:%2d:%2d GMT%n", wday, &tm.tm_mday,
                      mon, &tm.tm_year, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &used) == 7 &&
               used == (int)n) {
        /* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT; two-digit years per RFC 9110 */
        tm.tm_year += tm.tm_year < 70 ? 2000 : 1900;
    } else if (sscanf(text, "%3s %3s %2d %2d:%2d:%2d %4d%n", wday, mon, &tm.tm_mday,
                      &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &tm.tm_year, &used) == 7 &&
               used == (int)n) {
        /* asctime: Sun Nov  6 08:49:37 1994 */
    } else {
        return -EINVAL;
    }
    int m = month_index(mon);
    if (m < 0 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 ||
        tm.tm_sec > 60 || tm.tm_year < 1900)
        return -EINVAL;
    for (const char *p = mon; *p; p++)
        if (!isalpha((unsigned char)*p))
            return -EINVAL;
    tm.tm_mon = m;
    tm.tm_year -= 1900;
    *t = timegm(&tm);
    return 0;
}
