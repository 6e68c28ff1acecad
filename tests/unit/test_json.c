/* json: the cold-path JSON helpers over cJSON (admin answers, alert
 * payloads): text made valid UTF-8, times, lists of lines, and a tree that
 * lost a part refusing to render. */
#include "json.h"
#include "test.h"

#include <errno.h>

/* Renders `node` (taken over) and compares it with `want`. */
static int renders_as(cJSON *node, const char *want)
{
    buf_t b = BUF_INIT;
    int ok = json_render(node, &b) == 0 && strcmp(buf_cstr(&b), want) == 0;
    if (!ok)
        fprintf(stderr, "  rendered %s, want %s\n", buf_cstr(&b), want);
    buf_free(&b);
    return ok;
}

TEST(json_text_replaces_what_is_not_utf8)
{
    ASSERT(renders_as(json_text("caf\xc3\xa9", 5), "\"caf\xc3\xa9\""));
    ASSERT(renders_as(json_text("a\xff" "b", 3), "\"a\xef\xbf\xbd" "b\""));
    ASSERT(renders_as(json_text("a\0b", 3), "\"a\xef\xbf\xbd" "b\""));
    ASSERT(renders_as(json_text("\xc3", 1), "\"\xef\xbf\xbd\""));
    ASSERT(renders_as(json_text("abc", 0), "\"\""));
    ASSERT(renders_as(json_text("q\"\\\n", 4), "\"q\\\"\\\\\\n\""));
}

TEST(json_str_and_printf)
{
    ASSERT(renders_as(json_str(NULL), "null"));
    ASSERT(renders_as(json_str("x\xfe"), "\"x\xef\xbf\xbd\""));
    ASSERT(renders_as(json_printf("%s: %d", "n", 7), "\"n: 7\""));
}

TEST(json_time_is_rfc3339)
{
    ASSERT(renders_as(json_time(1764778413123), "\"2025-12-03T16:13:33.123Z\""));
}

TEST(json_lines_one_string_per_line)
{
    ASSERT(renders_as(json_lines("one\ntwo\n", 8), "[\"one\",\"two\"]"));
    ASSERT(renders_as(json_lines("last has no newline", 19), "[\"last has no newline\"]"));
    ASSERT(renders_as(json_lines(NULL, 0), "[]"));
}

TEST(json_object_keeps_order_and_makes_keys_text)
{
    cJSON *o = cJSON_CreateObject();
    json_add(o, "b", cJSON_CreateNumber(2));
    json_add(o, "a", cJSON_CreateNumber(3000000000.0));
    json_add(o, "k\xff", json_str("v"));
    cJSON *list = cJSON_CreateArray();
    json_push(list, cJSON_CreateBool(1));
    json_add(o, "list", list);
    ASSERT(renders_as(o, "{\"b\":2,\"a\":3000000000,\"k\xef\xbf\xbd\":\"v\",\"list\":[true]}"));
}

TEST(json_a_missing_part_spoils_the_tree)
{
    buf_t b = BUF_INIT;
    buf_lit(&b, "kept");
    cJSON *o = cJSON_CreateObject();
    cJSON *inner = cJSON_CreateArray();
    json_push(inner, NULL); /* as when a node could not be made */
    json_add(o, "inner", inner);
    json_add(o, "fine", json_str("yes"));
    ASSERT_EQ(json_render(o, &b), -ENOMEM);
    ASSERT_EQ(b.len, 4); /* out is unchanged */
    ASSERT_EQ(json_render(NULL, &b), -ENOMEM);
    json_add(NULL, "x", json_str("deleted, not leaked"));
    buf_free(&b);
}
