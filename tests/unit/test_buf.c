#include "buf.h"
#include "bytes.h"
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

/* The word-at-a-time tests agree with byte-by-byte ones: every byte value
 * at every position of a word of otherwise ordinary (or high) bytes. */
TEST(bytes_word_tests_match_bytewise)
{
    const unsigned char fills[] = {'a', 0x20, 0x7e, 0x80, 0xff};
    for (size_t f = 0; f < sizeof fills; f++) {
        for (int pos = 0; pos < 8; pos++) {
            for (int v = 0; v < 256; v++) {
                char w[8];
                memset(w, fills[f], sizeof w);
                w[pos] = (char)v;
                int below = 0, above = 0, quote = 0;
                for (int k = 0; k < 8; k++) {
                    unsigned char c = (unsigned char)w[k];
                    below |= c < 0x20;
                    above |= c > 0x7e;
                    quote |= c == '"';
                }
                uint64_t x = bytes_load8(w);
                ASSERT_EQ(!!bytes_below(x, 0x20), below);
                ASSERT_EQ(!!bytes_above(x, 0x7e), above);
                ASSERT_EQ(!!bytes_has(x, '"'), quote);
            }
        }
    }
}

/* A byte that must be escaped is found wherever it falls in a long run. */
TEST(buf_json_escape_finds_specials_at_every_offset)
{
    const char specials[] = {'"', '\\', '\n', '\x01', '\x7f'};
    for (size_t k = 0; k < sizeof specials; k++) {
        for (size_t at = 0; at < 40; at++) {
            char s[40];
            memset(s, 'x', sizeof s);
            s[at] = specials[k];
            buf_t b = BUF_INIT;
            ASSERT_EQ(buf_json_escape(&b, s, sizeof s), 0);
            size_t esc = specials[k] == '\x01' || specials[k] == '\x7f' ? 6 : 2;
            ASSERT_EQ(b.len, sizeof s - 1 + esc);
            ASSERT(memcmp(b.data, s, at) == 0);
            ASSERT(b.data[at] == '\\');
            buf_free(&b);
        }
    }
}
