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

#include "sha256.h"

TEST(sha256_known_answers)
{
    char hex[65];
    sha256_hex("", 0, hex);
    ASSERT_STR(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha256_hex("abc", 3, hex);
    ASSERT_STR(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 56 bytes */
    sha256_hex(two, strlen(two), hex);
    ASSERT_STR(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    char million[1000];
    memset(million, 'a', sizeof million);
    sha256_hex(million, sizeof million, hex); /* checked against sha256sum */
    ASSERT_STR(hex, "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}
