#include "clock.h"
#include "test.h"

TEST(clock_http_date_round_trip)
{
    char out[32];
    clock_http_date(784111777, out);
    ASSERT_STR(out, "Sun, 06 Nov 1994 08:49:37 GMT");
    time_t t = 0;
    ASSERT_EQ(clock_parse_http_date(out, strlen(out), &t), 0);
    ASSERT_EQ(t, 784111777);
}

TEST(clock_parse_obsolete_date_forms)
{
    time_t t = 0;
    const char *rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT";
    const char *asc = "Sun Nov  6 08:49:37 1994";
    ASSERT_EQ(clock_parse_http_date(rfc850, strlen(rfc850), &t), 0);
    ASSERT_EQ(t, 784111777);
    ASSERT_EQ(clock_parse_http_date(asc, strlen(asc), &t), 0);
    ASSERT_EQ(t, 784111777);
}

TEST(clock_parse_rejects_garbage)
{
    time_t t;
    const char *bad[] = {"", "120", "Sun, 06 Nov 1994 08:49:37", "Sun, 06 Foo 1994 08:49:37 GMT",
                         "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 GMT junk"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ASSERT_EQ(clock_parse_http_date(bad[i], strlen(bad[i]), &t), -22);
}

TEST(clock_rfc3339_has_milliseconds)
{
    char out[32];
    clock_rfc3339(784111777123LL, out);
    ASSERT_STR(out, "1994-11-06T08:49:37.123Z");
}
