/* A tiny unit test harness: TEST(name) { ... } registers a test; ASSERT*
 * fail it with the file and line. tests/unit/main.c runs them all. */
#ifndef ERRORD_TEST_H
#define ERRORD_TEST_H

#include <stdio.h>
#include <string.h>

typedef void (*test_fn)(void);

void test_register(const char *name, test_fn fn);
void test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define TEST(name)                                                   \
    static void test_##name(void);                                   \
    __attribute__((constructor)) static void register_##name(void)   \
    {                                                                \
        test_register(#name, test_##name);                           \
    }                                                                \
    static void test_##name(void)

#define ASSERT(cond)                                                 \
    do {                                                             \
        if (!(cond)) {                                               \
            test_fail(__FILE__, __LINE__, "%s", #cond);              \
            return;                                                  \
        }                                                            \
    } while (0)

#define ASSERT_EQ(a, b)                                                                \
    do {                                                                               \
        long long a_ = (long long)(a), b_ = (long long)(b);                            \
        if (a_ != b_) {                                                                \
            test_fail(__FILE__, __LINE__, "%s == %s (%lld != %lld)", #a, #b, a_, b_);  \
            return;                                                                    \
        }                                                                              \
    } while (0)

#define ASSERT_STR(a, b)                                                               \
    do {                                                                               \
        const char *a_ = (a), *b_ = (b);                                               \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                         \
            test_fail(__FILE__, __LINE__, "%s == %s (\"%s\" != \"%s\")", #a, #b,       \
                      a_ ? a_ : "(null)", b_ ? b_ : "(null)");                         \
            return;                                                                    \
        }                                                                              \
    } while (0)

#define ASSERT_MEM(p, n, lit)                                                          \
    do {                                                                               \
        size_t n_ = (n);                                                               \
        if (n_ != sizeof(lit) - 1 || memcmp((p), (lit), n_) != 0) {                    \
            test_fail(__FILE__, __LINE__, "%s == \"%s\" (got \"%.*s\")", #p, lit,      \
                      (int)n_, (const char *)(p));                                     \
            return;                                                                    \
        }                                                                              \
    } while (0)

#endif
