#include "buf.h"
#include "test.h"

TEST(buf_append_grows)
{
    buf_t b = BUF_INIT;
    for (int i = 0; i < 1000; i++)
        ASSERT_EQ(buf_append(&b, "abc", 3), 0);
    ASSERT_EQ(b.len, 3000);
    ASSERT(memcmp(b.data + 2997, "abc", 3) == 0);
    buf_consume(&b, 2998);
    ASSERT_MEM(b.data, b.len, "bc");
    buf_free(&b);
    ASSERT(b.data == NULL && b.len == 0);
}

TEST(buf_printf_long)
{
    buf_t b = BUF_INIT;
    char big[1000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ASSERT_EQ(buf_printf(&b, "<%s>%d", big, 42), 0);
    ASSERT_EQ(b.len, 999 + 4);
    ASSERT(b.data[0] == '<' && memcmp(b.data + 1000, ">42", 3) == 0);
    buf_free(&b);
}

TEST(buf_json_escape_controls_and_quotes)
{
    buf_t b = BUF_INIT;
    buf_json_escape(&b, "a\"b\\c\n\x01", 7);
    ASSERT_MEM(b.data, b.len, "a\\\"b\\\\c\\n\\u0001");
    buf_free(&b);
}

TEST(buf_json_escape_keeps_utf8_replaces_invalid)
{
    buf_t b = BUF_INIT;
    buf_json_escape(&b, "caf\xc3\xa9 \xff!", 8);
    ASSERT_MEM(b.data, b.len, "caf\xc3\xa9 \\ufffd!");
    buf_clear(&b);
    buf_json_escape(&b, "\xed\xa0\x80", 3); /* a UTF-16 surrogate is not UTF-8 */
    ASSERT_MEM(b.data, b.len, "\\ufffd\\ufffd\\ufffd");
    buf_free(&b);
}
