/* Runs a fuzz target over files, without libFuzzer: `make test` replays the
 * seed corpora and every input a fuzzer once crashed on, so a fix that
 * regresses fails the suite on a machine without clang. A target that finds
 * a problem aborts, and the run fails with it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return -1;
    }
    uint8_t *data = NULL;
    size_t len = 0, cap = 0, n;
    do {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            uint8_t *more = realloc(data, cap);
            if (more == NULL) {
                free(data);
                fclose(f);
                return -1;
            }
            data = more;
        }
        n = fread(data + len, 1, cap - len, f);
        len += n;
    } while (n > 0);
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        perror(path);
    } else {
        /* Its own copy, so reading past the input is caught under ASan. */
        uint8_t *exact = malloc(len ? len : 1);
        if (exact != NULL) {
            if (len > 0)
                memcpy(exact, data, len);
            LLVMFuzzerTestOneInput(exact, len);
            free(exact);
        }
    }
    free(data);
    return failed ? -1 : 0;
}

int main(int argc, char **argv)
{
    if (LLVMFuzzerInitialize != NULL)
        LLVMFuzzerInitialize(&argc, &argv);
    int bad = 0;
    for (int i = 1; i < argc; i++)
        bad |= replay(argv[i]) != 0;
    fprintf(stderr, "%s: %d inputs replayed%s\n", argv[0], argc - 1, bad ? ", some unreadable" : "");
    return bad;
}
