# errord: build, test, run.
#
#   make            build ./errord
#   make run        run errord in front of the bundled mock of the reference API
#                   (ARGS="--policy my-policy.lua" adds errord flags)
#   make test       unit and integration tests
#   make asan       the whole test suite against an ASan + UBSan build
#   make valgrind   the integration tests with errord under valgrind
#   make fuzz       build the libFuzzer targets (clang)
#   make replay     the fuzz targets over their corpora (part of make unit)
#   make bench      errord against HAProxy and nginx (../shared/bench)
#   make install    PREFIX=/usr/local DESTDIR=
#   make clean

VERSION    := 0.1.0
PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR      = $(PREFIX)/bin
DATADIR     = $(PREFIX)/share/errord
MANDIR      = $(PREFIX)/share/man
UNITDIR     = $(PREFIX)/lib/systemd/system
CC         ?= cc
PYTHON     ?= /usr/bin/python3
LLHTTP_SRC ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
PKGS        = libuv lua5.4 libcjson libssl libcrypto

# Every target but clean needs the Debian packages: scripts/setup installs
# what is missing before make looks at a single file (make caches directory
# listings, so files that appeared later would not be seen).
# Building and installing need only the build packages.
SETUP_GOALS := $(filter-out clean,$(or $(MAKECMDGOALS),all))
SETUP_ARGS  := $(if $(filter-out all errord install,$(SETUP_GOALS)),,--build)
ifneq ($(SETUP_GOALS),)
ifneq ($(shell scripts/setup $(SETUP_ARGS) 1>&2; echo $$?),0)
$(error scripts/setup could not install the packages errord needs)
endif
endif

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS))
PKG_LIBS   := $(shell pkg-config --libs $(PKGS))

WARNINGS    = -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
              -Wpointer-arith -Wformat=2 -Wvla -Wundef -Werror
OPT        ?= -O2 -g
CFLAGS_ALL  = -std=c11 $(OPT) $(WARNINGS) -D_GNU_SOURCE -DERRORD_VERSION='"$(VERSION)"' \
              -DERRORD_DATADIR='"$(DATADIR)"' -I$(LLHTTP_INC) $(PKG_CFLAGS) $(CFLAGS)
# llhttp is third-party code: its own warnings are not ours to fix. Strict
# mode makes it reject what the RFC forbids instead of guessing.
LLHTTP_FLAGS = -std=c11 $(OPT) -w -DLLHTTP_STRICT_MODE=1 -I$(LLHTTP_INC) $(CFLAGS)
LIBS        = $(PKG_LIBS) -lpthread -lm

SRCS   := $(wildcard src/*.c)
LIBSRC := $(filter-out src/main.c,$(SRCS))
TESTS  := $(wildcard tests/unit/*.c)

BUILD  ?= build
OBJS    = $(SRCS:src/%.c=$(BUILD)/%.o)
LIBOBJS = $(LIBSRC:src/%.c=$(BUILD)/%.o)
LLOBJS  = $(BUILD)/llhttp/api.o $(BUILD)/llhttp/http.o $(BUILD)/llhttp/llhttp.o
TOBJS   = $(TESTS:tests/unit/%.c=$(BUILD)/unit/%.o)

# `make V=1` shows the commands.
Q = $(if $(V),,@)

.PHONY: FORCE all setup run test unit replay integration asan valgrind fuzz bench install clean

all: errord

setup:

errord: $(BUILD)/errord
	@rm -f $@ && cp $< $@

$(BUILD)/errord: $(OBJS) $(LLOBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(CFLAGS_ALL) -o $@ $^ $(LIBS) $(LDFLAGS)

# Objects are rebuilt when the flags change (PREFIX, OPT, sanitizers...).
$(BUILD)/.flags: FORCE
	@mkdir -p $(@D)
	@echo '$(CFLAGS_ALL)' | cmp -s - $@ || echo '$(CFLAGS_ALL)' > $@

FORCE:

$(BUILD)/%.o: src/%.c $(wildcard src/*.h) $(BUILD)/.flags
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(CFLAGS_ALL) -c -o $@ $<

$(BUILD)/llhttp/%.o: $(LLHTTP_SRC)/%.c
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(LLHTTP_FLAGS) -c -o $@ $<

$(BUILD)/unit/%.o: tests/unit/%.c $(wildcard tests/unit/*.h src/*.h) $(BUILD)/.flags
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(CFLAGS_ALL) -Isrc -c -o $@ $<

$(BUILD)/unit-tests: $(TOBJS) $(LIBOBJS) $(LLOBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(CFLAGS_ALL) -o $@ $^ $(LIBS) $(LDFLAGS)

unit: $(BUILD)/unit-tests replay
	$(BUILD)/unit-tests

# The fuzz targets, built without libFuzzer, over their seeds and every
# input that once found a bug (tests/fuzz/corpus).
REPLAYS = $(BUILD)/replay/fuzz_http $(BUILD)/replay/fuzz_policy

$(BUILD)/replay/%.o: tests/fuzz/%.c $(wildcard src/*.h) $(BUILD)/.flags
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(CFLAGS_ALL) -Isrc -c -o $@ $<

$(BUILD)/replay/fuzz_%: $(BUILD)/replay/fuzz_%.o $(BUILD)/replay/replay.o $(LIBOBJS) $(LLOBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(CFLAGS_ALL) -o $@ $^ $(LIBS) $(LDFLAGS)

.PRECIOUS: $(BUILD)/replay/%.o

# (The policy's log records go to stdout: only the outcome is of interest.)
replay: $(REPLAYS)
	$(BUILD)/replay/fuzz_http tests/fuzz/corpus/http/* >/dev/null
	$(BUILD)/replay/fuzz_policy tests/fuzz/corpus/policy/* >/dev/null

integration: $(BUILD)/errord
	ERRORD_BIN=$(abspath $(BUILD)/errord) $(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)

test: unit integration

# Everything again under AddressSanitizer and UndefinedBehaviorSanitizer.
asan:
	$(MAKE) BUILD=build/asan OPT="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" \
	    LDFLAGS="-fsanitize=address,undefined" test

# libFuzzer targets (clang, installed by scripts/setup --fuzz): fuzz_http
# feeds bytes through the request and response parsers and forwards what
# they accept, fuzz_policy hands responses to the default policy. Run one from the repository's root, with
# a work directory first (libFuzzer adds what it finds to the first one)
# and the seeds after it, e.g.
#   mkdir -p build/fuzz/policy
#   build/fuzz/fuzz_policy -max_total_time=60 build/fuzz/policy tests/fuzz/corpus/policy
FUZZ_CFLAGS = -std=c11 -g -O1 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -DERRORD_DATADIR='"$(DATADIR)"' \
              -DLLHTTP_STRICT_MODE=1 -I$(LLHTTP_INC) -Isrc $(PKG_CFLAGS)
fuzz:
	@scripts/setup --fuzz
	@mkdir -p build/fuzz
	clang $(FUZZ_CFLAGS) tests/fuzz/fuzz_http.c src/frame.c src/http.c src/http_head.c src/buf.c src/clock.c $(LLHTTP_SRC)/*.c \
	    -o build/fuzz/fuzz_http
	clang $(FUZZ_CFLAGS) tests/fuzz/fuzz_policy.c $(LIBSRC) $(LLHTTP_SRC)/*.c $(PKG_LIBS) -lm -lpthread \
	    -o build/fuzz/fuzz_policy

# The integration tests with errord under valgrind (big transfers shrunk to
# 64 MiB: memcheck runs them some twenty times slower). VALGRIND_TESTS picks
# test files, PYTEST_ARGS passes pytest options (-k ...).
VALGRIND_TESTS ?= tests/integration
valgrind: $(BUILD)/errord
	@command -v valgrind >/dev/null || scripts/setup --valgrind
	ERRORD_BIN=$(abspath tests/valgrind-errord) ERRORD_TEST_BIG_BYTES=67108864 \
	    ERRORD_TEST_CHUNKED_BYTES=67108864 $(PYTHON) -m pytest -q $(VALGRIND_TESTS) $(PYTEST_ARGS)

run: errord
	@scripts/run $(ARGS)

bench: errord
	@scripts/setup --bench
	@scripts/bench

# The binary, the default policy and the examples, luacheck's settings for
# policies, the man page, and the systemd unit (its ExecStart names the
# installed binary) with a sample of the settings it reads.
install: $(BUILD)/errord
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/examples $(DESTDIR)$(MANDIR)/man8 \
	    $(DESTDIR)$(UNITDIR)
	install -m 755 $(BUILD)/errord $(DESTDIR)$(BINDIR)/errord
	install -m 644 lua/default.lua $(DESTDIR)$(DATADIR)/default.lua
	install -m 644 lua/examples/*.lua $(DESTDIR)$(DATADIR)/examples/
	install -m 644 deploy/errord.env $(DESTDIR)$(DATADIR)/errord.env
	install -m 644 .luacheckrc $(DESTDIR)$(DATADIR)/luacheckrc
	install -m 644 docs/errord.8 $(DESTDIR)$(MANDIR)/man8/errord.8
	sed 's|@BINDIR@|$(BINDIR)|g' deploy/errord.service > $(DESTDIR)$(UNITDIR)/errord.service
	chmod 644 $(DESTDIR)$(UNITDIR)/errord.service

clean:
	rm -rf build errord
