"""scripts/conn-memory at small scale: errord holds a few hundred idle
keep-alive client connections open, serves them again, and the tool reports
it (and fails when it should). The full run is 10,000 connections, by hand:
`scripts/conn-memory`.

The script is run as a subprocess against the binary under test
(ERRORD_BIN); it starts its own mock API and errord on free loopback ports
and stops both."""

import os
import resource
import sys

import pytest

from support import ERRORD, ROOT, SLOW, run_script

SCRIPT = os.path.join(ROOT, "scripts", "conn-memory")


# ---- helpers ------------------------------------------------------------------------


def conn_memory(*args, timeout=60):
    """Runs the script; returns (exit status, its RESULT fields or None, all
    its output)."""
    timeout = int(timeout * SLOW)
    return run_script([sys.executable, SCRIPT, "--errord", ERRORD, "--timeout", str(timeout), *args],
                      timeout + 60)


# ---- tests --------------------------------------------------------------------------


def test_300_idle_connections_stay_open_are_reused_and_fit_in_64_mib():
    rc, r, out = conn_memory("--connections", "300")
    assert rc == 0, out
    assert r is not None, out
    assert r["connections"] == 300 and r["served"] == 300, out
    assert r["open"] == 300, out
    assert r["refused"] == 0 and r["failed"] == 0, out
    assert r["sample"] == 100 and r["reused_ok"] == r["sample"], out
    assert r["fds_loaded"] >= r["fds_idle"] + 300, out
    assert r["client_fds"] == 300, out
    assert r["client_fds_closed"] == 0, "errord kept sockets of clients that had gone: " + out
    assert 0 < r["rss_idle_kib"] <= r["rss_loaded_kib"], out
    assert r["per_conn_bytes"] == (r["rss_loaded_kib"] - r["rss_idle_kib"]) * 1024 // 300, out
    assert r["errord_exit"] == 0, out
    if SLOW == 1.0:  # a sanitizer's or valgrind's own memory is no measure of errord's
        assert r["rss_loaded_kib"] < 64 * 1024, out


def test_a_max_connections_below_the_connections_is_reported_as_a_failure():
    rc, r, out = conn_memory("--connections", "300", "--max-connections", "200")
    assert rc == 1, out
    assert r is not None, out
    # The first 200 are held open, so every later one is over the limit.
    assert r["served"] == 200 and r["open"] == 200, out
    assert r["refused"] + r["failed"] == 100, out
    assert r["refused"] > 0, "no 503 seen: " + out
    assert r["reused_ok"] == r["sample"] == 100, out
    assert "--max-connections 200 is below --connections 300" in out


def test_max_rss_mib_fails_a_run_above_it():
    rc, r, out = conn_memory("--connections", "50", "--max-rss-mib", "1")
    assert rc == 1, out
    assert r is not None and r["open"] == 50 and r["reused_ok"] == r["sample"] == 50, out
    assert r["rss_loaded_kib"] > 1024, out
    assert "above --max-rss-mib 1" in out


def test_more_connections_than_the_fd_hard_limit_is_refused_before_starting():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on file descriptors")
    rc, r, out = conn_memory("--connections", str(hard))
    assert rc == 2, out
    assert r is None, out
    assert "hard limit" in out and str(hard) in out, out
    assert "errord pid" not in out, out
