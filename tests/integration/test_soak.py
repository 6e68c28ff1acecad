"""scripts/soak for 15 seconds: a steady load through errord while its
upstream injects every kind of fault, the policy is reloaded and the admin
port scraped, and afterwards nothing was lost. The full run is 300 s with 16
clients, by hand: `scripts/soak`.

The script is run as a subprocess against the binary under test
(ERRORD_BIN); it starts its own fault-injecting upstream and errord on free
loopback ports and stops both."""

import os
import subprocess
import sys

import pytest

from support import ERRORD, ROOT, SLOW, run_script

SCRIPT = os.path.join(ROOT, "scripts", "soak")

# Every kind of fault the upstream injects; `refused` counts the attempts
# errord logged as a connect error while the upstream was not listening.
FAULTS = ("502", "500", "403", "reset", "stall", "slow_body", "refused")


# ---- helpers ------------------------------------------------------------------------


def soak(*args, timeout):
    """Runs the script; returns (exit status, its RESULT fields or None, all
    its output)."""
    return run_script([sys.executable, SCRIPT, "--errord", ERRORD, *args], timeout)


def counts(field):
    """"a:1,b:2" -> {"a": 1, "b": 2}."""
    out = {}
    for part in field.split(","):
        if part:
            key, _, value = part.partition(":")
            out[key] = int(value)
    return out


# ---- tests --------------------------------------------------------------------------


@pytest.mark.skipif(SLOW >= 10, reason="memcheck is too slow for a 1 s --first-byte-timeout")
def test_a_short_soak_meets_every_fault_and_loses_nothing():
    # A sanitizer's memory (ASan's quarantine) is no measure of errord's.
    margin = "2" if SLOW == 1.0 else "1024"
    rc, r, out = soak("--duration", "15", "--clients", "4", "--rss-margin-mib", margin,
                      timeout=15 + 35 + 120)
    assert r is not None, out
    assert rc == 0, out
    assert r["lost"] == 0, out
    assert r["requests"] > 100, out
    assert r["complete"] + r["explained_closes"] == r["requests"], out
    faults = counts(r["faults"])
    for kind in FAULTS:
        assert faults.get(kind, 0) >= 1, "no %s fault in 15 s: %s" % (kind, out)
    assert faults["ok"] > faults["reset"], out
    assert r["errord_exit"] == 0, out
    assert r["reloads"] >= 4, out  # every 2.5 s in a 15 s run, SIGHUP and POST in turn
    assert r["scrapes"] >= 5, out
    assert 0 < r["rss_kib_first"] and 0 < r["fds_first"], out
    assert counts(r["statuses"]).get("200", 0) > 0, out


def test_a_binary_that_is_not_there_is_reported_before_starting():
    p = subprocess.run([sys.executable, SCRIPT, "--errord", os.path.join(ROOT, "no-such-errord"),
                        "--duration", "5"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no errord binary" in p.stderr
    assert "RESULT" not in p.stdout
