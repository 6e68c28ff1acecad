"""The README's commands, run as a reader would run them, top to bottom.

Fenced blocks are read in order:
- ```lua NAME / ```json NAME: the reader saves the file NAME (later blocks
  with the same name replace it);
- ```sh blocks with "$ " lines: a transcript; each command runs and its
  output must be what the README shows ("..." stands for any lines; hex
  ids, hashes and dates may differ);
- other ```sh blocks: each command runs and must succeed. `make run` and
  `errord --upstream ...` are servers: they start in the background (a new
  one stops the one before) and are ready when their port answers.

Everything runs in a scratch directory that looks like the repository's
root (its files linked, build/ shared), with errord, the mock and the admin
port on free ports: 127.0.0.1:8080, :8081 and :9901 in a command become
those. A few commands cannot run here; COVERED_ELSEWHERE names them and the
test that checks them instead, and every other command in the README must
have run."""

import os
import re
import signal
import socket
import subprocess
import time

from support import ROOT, SLOW, closed_port as free_port, wait_until

README = os.path.join(ROOT, "README.md")

# command (a regex matched against its start) -> what checks it instead
COVERED_ELSEWHERE = {
    r"make test\b": "this suite is make test",
    r"(sudo )?make install\b": "test_deploy: test_make_install_lays_out_errord",
    r"(sudo )?install -D -m 644 deploy/errord\.env\b": "test_deploy: test_the_unit_reads_the_environment_file_errord_ships",
    r"(sudo )?systemctl\b": "test_deploy: the unit passes systemd-analyze verify",
    r"docker\b": "test_deploy: the Dockerfile's checks",
    r"kubectl\b": "test_deploy: the Kubernetes example's checks",
}

LINKED = ["Makefile", "src", "lua", "scripts", "docs", "deploy", "tests", ".luacheckrc", "build"]


def blocks():
    """(info string, text, line number) of each fenced block."""
    with open(README) as f:
        lines = f.read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if m:
            start = i
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((m.group(1).strip(), "\n".join(body), start + 1))
        i += 1
    return out


def commands(text):
    """The logical lines of a plain block: continuation lines joined."""
    out, cur = [], ""
    for line in text.split("\n"):
        cur += line
        if cur.endswith("\\"):
            cur += "\n"
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def transcript(text):
    """[(command, expected output lines)] of a block of "$ " lines."""
    out = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), "transcript line without a command: %r" % line
        cmd = line[2:]
        while cmd.endswith("\\"):
            i += 1
            cmd += "\n" + lines[i]
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        out.append((cmd, expected))
    return out


def normalize(line):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # colours a terminal shows
    line = re.sub(r"\b[0-9a-f]{12,64}\b", "<hex>", line)
    line = re.sub(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", "<date>", line)
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<time>", line)
    return line.rstrip()


def matches(expected, actual):
    """Whether the output lines match the README's: a line "..." matches any
    lines, and "..." in a line any text."""
    pattern = "".join("(?:.*\n)*?" if e.strip() == "..." else
                      ".*?".join(map(re.escape, normalize(e).split("..."))) + "\n"
                      for e in expected)
    return re.fullmatch(pattern, "".join(normalize(a) + "\n" for a in actual)) is not None


def errord_in_session(sid):
    """The pids of the processes named errord in session `sid` (what
    `pgrep -s SID -x errord` says, without procps)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if comm == "errord" and int(fields[3]) == sid:
            pids.append(entry)
    return pids


class Reader:
    """The scratch directory, the server running, and the ports."""

    def __init__(self, workdir):
        self.dir = workdir
        for name in LINKED:
            os.symlink(os.path.join(ROOT, name), os.path.join(workdir, name))
        self.server = None
        self.listen, self.mock, self.admin = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS") and not k.startswith("ERRORD_")}
        self.env.update(ERRORD_LISTEN="127.0.0.1:%d" % self.listen, MOCK_PORT=str(self.mock),
                        ERRORD_ADMIN="127.0.0.1:%d" % self.admin)
        self.ran = []

    def rewrite(self, cmd):
        cmd = cmd.replace("127.0.0.1:8080", "127.0.0.1:%d" % self.listen)
        cmd = cmd.replace("127.0.0.1:8081", "127.0.0.1:%d" % self.mock)
        cmd = cmd.replace("127.0.0.1:9901", "127.0.0.1:%d" % self.admin)
        cmd = re.sub(r"^errord ", "./errord ", cmd)
        cmd = cmd.replace("$(pidof errord)", "$(cat errord.pid)")
        return cmd

    def start(self, cmd):
        self.stop()
        if not os.path.exists(os.path.join(self.dir, "errord")):
            os.symlink(os.path.join(ROOT, "build", "errord"), os.path.join(self.dir, "errord"))
        out = open(os.path.join(self.dir, "server.log"), "w")
        self.server = subprocess.Popen(["bash", "-c", self.rewrite(cmd)], cwd=self.dir,
                                       env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        out.close()

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.listen), timeout=1).close()
                return True
            except OSError:
                return self.server.poll() is not None
        assert wait_until(up, 120), "%s did not start" % cmd
        assert self.server.poll() is None, "%s exited:\n%s" % (cmd, self.log())
        pid = errord_in_session(self.server.pid)
        assert len(pid) == 1, pid
        with open(os.path.join(self.dir, "errord.pid"), "w") as f:
            f.write(pid[0])

    def log(self):
        with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
            return f.read()[-3000:]

    def stop(self):
        if self.server is None:
            return
        try:
            os.killpg(self.server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.server.wait(30 * SLOW)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
        self.server = None
        deadline = time.monotonic() + 10 * SLOW  # the port is free again before the next
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.listen), timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)

    def run(self, cmd):
        r = subprocess.run(["bash", "-c", self.rewrite(cmd)], cwd=self.dir, env=self.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=120 * SLOW)
        self.ran.append(cmd)
        return r


def is_server(cmd):
    return re.match(r"(make run\b|(\./)?errord --upstream)", cmd) is not None


def covered_elsewhere(cmd):
    return next((p for p in COVERED_ELSEWHERE if re.match(p, cmd)), None)


def test_every_command_in_the_readme_runs_as_shown(tmp_path):
    reader = Reader(str(tmp_path))
    used = set()
    try:
        for info, text, line in blocks():
            words = info.split()
            if len(words) == 2 and words[0] in ("lua", "json"):
                with open(os.path.join(reader.dir, words[1]), "w") as f:
                    f.write(text + "\n")
                continue
            if words[:1] != ["sh"]:
                continue
            if any(l.startswith("$ ") for l in text.split("\n")):
                for cmd, expected in transcript(text):
                    r = reader.run(cmd)
                    actual = r.stdout.rstrip("\n").split("\n") if r.stdout.strip() else []
                    assert matches(expected, actual), (
                        "README line %d: %s\n--- the README shows:\n%s\n--- it printed:\n%s"
                        % (line, cmd, "\n".join(expected), r.stdout))
                continue
            for cmd in commands(text):
                pattern = covered_elsewhere(cmd)
                if pattern:
                    used.add(pattern)
                elif is_server(cmd):
                    reader.start(cmd)
                    reader.ran.append(cmd)
                else:
                    r = reader.run(cmd)
                    assert r.returncode == 0, "README line %d: %s\n%s" % (line, cmd, r.stdout)
    finally:
        reader.stop()
    assert reader.ran, "no command ran"
    # The list of exceptions stays honest: each is still in the README.
    assert used == set(COVERED_ELSEWHERE), set(COVERED_ELSEWHERE) - used
