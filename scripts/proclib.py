"""What the measuring scripts (conn-memory, soak) share: the processes they
start, waiting for them to be ready, stopping them, and what /proc says of
them. Standard library only."""

import os
import subprocess
import time


class Failed(Exception):
    """The tool could not run (exit status 2)."""


def read_file(path):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tail(path, n=15):
    return "".join(read_file(path).splitlines(True)[-n:])


def wait_for_line(proc, path, pred, timeout, what):
    """Polls the file `proc` writes its stdout to until a line satisfies
    `pred`; returns pred's value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "r", errors="replace") as f:
                for line in f:
                    value = pred(line)
                    if value:
                        return value
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        raise Failed("%s exited with status %s before it was ready" % (what, proc.returncode))
    raise Failed("%s was not ready within %.0fs" % (what, timeout))


def stop(proc, timeout=15.0):
    """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))
