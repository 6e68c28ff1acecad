"""scripts/bench-report: run.sh's results tables, as captured by scripts/bench,
turned into docs/bench/results.md and results.png (here in a tmp dir).

The samples are run.sh's stdout as it prints it (the same printf widths,
target by target, each target's workloads together), for the two runs
`make bench` makes: the peers and errord with its default policy, then
direct and errord without a policy. Each run has its own direct row, and
the two differ, so a ratio taken against the wrong run's direct shows.
scripts/bench itself is run against a stand-in for run.sh."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from support import ROOT

REPORT = os.path.join(ROOT, "scripts", "bench-report")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

POLICY_RUN = """
nginx/1.22.1, lua-nginx-module 1:0.10.23-1+deb12u1, HAProxy 2.6.12-1+deb12u4, wrk debian/4.1.0-3+b2
wrk -t1 -c50 -d10s keep-alive; pin=1 (wrk cpu 0, proxy cpu 1, origin cpu 1)
target             workload      req/s    p50_ms    p99_ms non2xx% vs_direct cpu_wrk% cpu_srv%
direct             ok           82657     0.460     0.900     0.0      1.00       99       97
direct             mixed        80911     0.330     0.960    10.0      1.00       98       96
direct             flaky        71204     0.410     1.120    50.0      1.00       99       95
haproxy-lua        ok           16268     2.900     6.200     0.0      0.20       31       99
haproxy-lua        mixed        17497     2.730     5.700    10.0      0.22       32       99
haproxy-lua        flaky        15873     3.010     6.580    50.0      0.22       30       99
nginx-lua          ok           22549     2.080     4.620     0.0      0.27       38       99
nginx-lua          mixed        20692     2.240     4.980    10.0      0.26       36       99
nginx-lua          flaky        19950     2.310     5.120    50.0      0.28       35      100
errord             ok           21301     2.230     4.920     0.0      0.26       37      100
errord             mixed        19163     2.320   527.000     8.1      0.24       35      100
errord             flaky         8355     4.120   683.400    37.8      0.12       20      100

RSS after run:
  haproxy-lua           16168 KiB  (pid 3145 + children, after its runs)
  nginx-lua             18330 KiB  (pid 3190 + children, after its runs)
  errord                 3584 KiB  (pid 3242 + children, after its runs)
  origin                17104 KiB  (origin nginx master+worker, end of run)
Checks:
  direct             /ok /403 /502 /flaky x4 -> 200 403 502 200 502 200 502 
  haproxy-lua        /ok /403 /502 /flaky x4 -> 200 403 502 200 502 200 502 
  haproxy-lua        policy status: 200=1503912 403=3069 422=3066 500=3071 502=3068 504=3066 | decisions: alert=3071 retry=6139
  nginx-lua          /ok /403 /502 /flaky x4 -> 200 403 502 200 502 200 502 
  nginx-lua          policy status: 200=1841207 403=3761 422=3760 500=3762 502=3763 504=3760 | decisions: alert=3762 retry=7525
  errord             /ok /403 /502 /flaky x4 -> 200 403 502 200 200 200 200 
"""

NOPOLICY_RUN = """
nginx/1.22.1, lua-nginx-module 1:0.10.23-1+deb12u1, HAProxy 2.6.12-1+deb12u4, wrk debian/4.1.0-3+b2
wrk -t1 -c50 -d10s keep-alive; pin=1 (wrk cpu 0, proxy cpu 1, origin cpu 1)
target             workload      req/s    p50_ms    p99_ms non2xx% vs_direct cpu_wrk% cpu_srv%
direct             ok           95755     0.320     0.900     0.0      1.00       99       96
direct             mixed        84913     0.360     1.020    10.0      1.00       98       95
direct             flaky        73410     0.400     1.080    50.0      1.00       99       95
errord-nopolicy    ok           29111     1.580     3.430     0.0      0.30       41      100
errord-nopolicy    mixed        27743     1.640     3.770    10.0      0.33       40      100
errord-nopolicy    flaky        26120     1.740     3.900    50.0      0.36       39      100

RSS after run:
  errord-nopolicy        3174 KiB  (pid 4410 + children, after its runs)
  origin                16980 KiB  (origin nginx master+worker, end of run)
Checks:
  direct             /ok /403 /502 /flaky x4 -> 200 403 502 200 502 200 502 
  errord-nopolicy    /ok /403 /502 /flaky x4 -> 200 403 502 200 502 200 502 
"""


def report(tmp_path, runs, env=None):
    """Writes the runs as files named after them, runs bench-report on them into
    tmp_path/out; returns (the CompletedProcess, results.md's text or None)."""
    paths = []
    for name, text in runs:
        path = tmp_path / ("%s.txt" % name)
        path.write_text(text)
        paths.append(str(path))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, REPORT, *paths, "--out-dir", str(out),
                        "--plot-dir", str(tmp_path / "plot")],
                       capture_output=True, text=True, timeout=60, env=env)
    md = out / "results.md"
    return p, md.read_text() if md.exists() else None


def table(md):
    """The throughput table's rows in order, as {(run, target, workload): {column: cell}}."""
    lines = md.splitlines()
    start = lines.index(
        "| target | workload | req/s | vs direct | p50 ms | p99 ms | non-2xx % | run |")
    assert re.match(r"^\|(---|---:)(\|(---|---:))+\|$", lines[start + 1]), lines[start + 1]
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        key = (cells["run"], cells["target"], cells["workload"])
        assert key not in rows, "row %r twice" % (key,)
        rows[key] = cells
    return rows


def sample_rps(text, target, workload):
    for line in text.splitlines():
        f = line.split()
        if f[:2] == [target, workload]:
            return float(f[2])
    raise AssertionError("no %s/%s in the sample" % (target, workload))


def test_rows_and_ratios(tmp_path):
    p, md = report(tmp_path, [("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)])
    assert p.returncode == 0, p.stderr
    rows = table(md)
    assert len(rows) == 12 + 6

    assert rows[("policy", "errord", "ok")] == {
        "target": "errord", "workload": "ok", "req/s": "21301", "vs direct": "0.26",
        "p50 ms": "2.230", "p99 ms": "4.920", "non-2xx %": "0.0", "run": "policy"}
    assert rows[("policy", "errord", "mixed")]["p99 ms"] == "527.000"
    assert rows[("policy", "errord", "flaky")]["non-2xx %"] == "37.8"

    # Every ratio is the row's req/s over the direct row of its own run and workload.
    for (run, target, workload), cells in rows.items():
        sample = POLICY_RUN if run == "policy" else NOPOLICY_RUN
        want = sample_rps(sample, target, workload) / sample_rps(sample, "direct", workload)
        assert cells["vs direct"] == "%.2f" % want, (target, workload, cells)
        assert cells["req/s"] == "%.0f" % sample_rps(sample, target, workload)

    # errord-nopolicy against its own run's direct, which differs from the first run's.
    for workload, own in (("ok", "0.30"), ("mixed", "0.33"), ("flaky", "0.36")):
        cells = rows[("nopolicy", "errord-nopolicy", workload)]
        assert cells["run"] == "nopolicy"
        assert cells["vs direct"] == own
        other = 1.0 * int(cells["req/s"]) / sample_rps(POLICY_RUN, "direct", workload)
        assert "%.2f" % other != own

    # Both direct rows are there, each 1.00 and with its own run's figures.
    for workload in ("ok", "mixed", "flaky"):
        for run, sample in (("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)):
            cells = rows[(run, "direct", workload)]
            assert cells["vs direct"] == "1.00"
            assert cells["req/s"] == "%.0f" % sample_rps(sample, "direct", workload)


def test_rows_grouped_by_workload(tmp_path):
    p, md = report(tmp_path, [("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)])
    assert p.returncode == 0, p.stderr
    order = list(table(md))
    assert [w for _, _, w in order] == ["ok"] * 6 + ["mixed"] * 6 + ["flaky"] * 6
    assert [(r, t) for r, t, w in order if w == "ok"] == [
        ("policy", "direct"), ("policy", "haproxy-lua"), ("policy", "nginx-lua"),
        ("policy", "errord"), ("nopolicy", "direct"), ("nopolicy", "errord-nopolicy")]


def test_runs_versions_pin_date_and_rss(tmp_path):
    p, md = report(tmp_path, [("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)])
    assert p.returncode == 0, p.stderr
    versions = ("nginx/1.22.1, lua-nginx-module 1:0.10.23-1+deb12u1, HAProxy 2.6.12-1+deb12u4, "
                "wrk debian/4.1.0-3+b2")
    pin = "wrk -t1 -c50 -d10s keep-alive; pin=1 (wrk cpu 0, proxy cpu 1, origin cpu 1)"
    assert md.count("versions: " + versions) == 2
    assert md.count(pin) == 2
    assert re.search(r"\*\*policy\*\* \(`policy\.txt`, saved \d{4}-\d\d-\d\d \d\d:\d\d", md), md
    assert re.search(r"\*\*nopolicy\*\* \(`nopolicy\.txt`, saved \d{4}-\d\d-\d\d \d\d:\d\d", md), md
    assert re.search(r"on \d{4}-\d\d-\d\d \d\d:\d\d", md)
    assert "| haproxy-lua | 16168 | 15.8 | pid 3145 + children, after its runs | policy |" in md
    assert "| errord | 3584 | 3.5 | pid 3242 + children, after its runs | policy |" in md
    assert "| errord-nopolicy | 3174 | 3.1 | pid 4410 + children, after its runs | nopolicy |" in md
    assert "| origin | 16980 | 16.6 | origin nginx master+worker, end of run | nopolicy |" in md
    assert "haproxy-lua        policy status: 200=1503912 403=3069" in md


def test_png(tmp_path):
    p, md = report(tmp_path, [("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)])
    assert p.returncode == 0, p.stderr
    if not shutil.which("gnuplot"):
        pytest.skip("gnuplot not installed (scripts/setup --bench installs gnuplot-nox)")
    png = tmp_path / "out" / "results.png"
    assert png.exists(), p.stderr
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 500)
    assert "![" in md and "(results.png)" in md
    # Only the report in the output directory; the plot's script and data beside it.
    assert sorted(os.listdir(tmp_path / "out")) == ["results.md", "results.png"]
    script = (tmp_path / "plot" / "results.gp").read_text()
    for title in ("haproxy-lua", "nginx-lua", "errord", "errord-nopolicy"):
        assert '"%s"' % title in script
    assert '"direct"' not in script


def test_without_gnuplot(tmp_path):
    """gnuplot not on PATH: the Markdown alone, no image link, and a stale PNG removed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.png").write_bytes(PNG_SIGNATURE + b"stale")
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    p, md = report(tmp_path, [("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)], env=env)
    assert p.returncode == 0, p.stderr
    assert "gnuplot not found" in p.stderr
    assert os.listdir(out) == ["results.md"]
    assert "results.png" not in md
    assert table(md)[("nopolicy", "errord-nopolicy", "ok")]["vs direct"] == "0.30"


def test_failed_target_and_missing_direct(tmp_path):
    """A target run.sh could not start, a workload wrk failed on, and a run
    without a direct row: FAILED rows, and no ratio rather than a wrong one."""
    failed = (NOPOLICY_RUN
              .replace("errord-nopolicy    mixed        27743     1.640     3.770    10.0      0.33"
                       "       40      100", "errord-nopolicy    mixed        FAILED")
              .replace("direct             flaky        73410     0.400     1.080    50.0      1.00"
                       "       99       95\n", "")
              .replace("\n\nRSS", "\nhaproxy-lua        -           FAILED\n\nRSS"))
    assert failed.count("FAILED") == 2 and "direct             flaky" not in failed
    p, md = report(tmp_path, [("nopolicy", failed)])
    assert p.returncode == 0, p.stderr
    rows = table(md)
    assert rows[("nopolicy", "errord-nopolicy", "mixed")]["req/s"] == "FAILED"
    assert rows[("nopolicy", "haproxy-lua", "-")]["req/s"] == "FAILED"
    assert rows[("nopolicy", "errord-nopolicy", "flaky")]["vs direct"] == "-"
    assert rows[("nopolicy", "errord-nopolicy", "ok")]["vs direct"] == "0.30"


def test_not_a_run(tmp_path):
    p, md = report(tmp_path, [("policy", "[bench] errord did not come up on port 18100\n")])
    assert p.returncode == 2
    assert "no results table" in p.stderr
    assert md is None


def test_notes_go_under_their_run(tmp_path):
    paths = []
    for name, text in (("policy", POLICY_RUN), ("nopolicy", NOPOLICY_RUN)):
        (tmp_path / ("%s.txt" % name)).write_text(text)
        paths.append(str(tmp_path / ("%s.txt" % name)))
    p = subprocess.run([sys.executable, REPORT, *paths, "--out-dir", str(tmp_path / "out"),
                        "--plot-dir", str(tmp_path / "plot"),
                        "--note", "nopolicy: errord-nopolicy ran as `errord --policy off`",
                        "--note", "made on a quiet machine"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = (tmp_path / "out" / "results.md").read_text().splitlines()
    run2 = next(i for i, line in enumerate(lines) if line.startswith("- **nopolicy**"))
    assert lines[run2 + 1] == "  - errord-nopolicy ran as `errord --policy off`"
    assert "- made on a quiet machine" in lines


FAKE_RUN_SH = r"""#!/bin/sh
# Stands in for ../shared/bench/run.sh: notes how it was called, prints a table.
printf '%s|%s|%s|%s\n' "$TARGETS" "$WORKLOADS" "$DAEMON_NAME" "$DAEMON_CMD" >>"$CALLS"
echo
echo "nginx/1.22.1, lua-nginx-module 1:0.10.23-1+deb12u1, HAProxy 2.6.12-1+deb12u4, wrk debian/4.1.0-3+b2"
echo "wrk -t1 -c50 -d${DURATION:-10s} keep-alive; pin=1 (wrk cpu 0, proxy cpu 1, origin cpu 1)"
echo "target             workload      req/s    p50_ms    p99_ms non2xx% vs_direct cpu_wrk% cpu_srv%"
for w in $WORKLOADS; do
    for t in $TARGETS $DAEMON_NAME; do
        rps=20000; [ "$t" = direct ] && rps=80000
        printf '%-18s %-7s %10s %9s %9s %7s %9s %8s %8s\n' "$t" "$w" $rps 1.000 2.000 0.0 - 50 99
    done
done
echo
echo "RSS after run:"
printf '  %-18s %8s KiB  (pid %s + children, after its runs)\n' "$DAEMON_NAME" 3500 4242
"""


def test_bench_makes_both_runs_and_reports(tmp_path):
    """scripts/bench against a stand-in run.sh: the two runs of the default
    comparison, each saved, then the report on both."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "run.sh").write_text(FAKE_RUN_SH)
    (bench / "run.sh").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TARGETS", "WORKLOADS", "ERRORD_ARGS", "DAEMON_NAME", "SCRAPE_EVERY")}
    env.update(BENCH=str(bench), CALLS=str(tmp_path / "calls"), OUT_DIR=str(tmp_path / "runs"),
               REPORT_DIR=str(tmp_path / "report"), DURATION="2s", CHECK_PORTS="0")
    p = subprocess.run([os.path.join(ROOT, "scripts", "bench")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = [line.split("|") for line in (tmp_path / "calls").read_text().splitlines()]
    errord = os.path.join(ROOT, "errord")
    assert [c[:3] for c in calls] == [["direct haproxy-lua nginx-lua", "ok mixed flaky", "errord"],
                                      ["direct", "ok mixed flaky", "errord-nopolicy"]]
    assert calls[0][3].startswith(errord + " --listen 127.0.0.1:18100 ")
    assert calls[0][3].split()[-2:] == ["--policy", os.path.join(ROOT, "lua", "default.lua")]
    assert calls[1][3].split()[-2:] == ["--policy", "off"]
    # the chart's gnuplot script and data only where gnuplot is (make bench installs it)
    plot = ["plot"] if shutil.which("gnuplot") else []
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(["nopolicy.txt", "policy.txt"] + plot)
    assert "errord-nopolicy    flaky" in p.stdout       # the tables are shown too
    md = (tmp_path / "report" / "results.md").read_text()
    rows = table(md)
    assert rows[("policy", "errord", "ok")]["vs direct"] == "0.25"
    assert rows[("nopolicy", "errord-nopolicy", "flaky")]["vs direct"] == "0.25"
    assert "ran as `errord --listen 127.0.0.1:18100" in md and ROOT + "/" not in md


def test_bench_one_run_with_targets(tmp_path):
    """TARGETS given: one run as before, errord with ERRORD_ARGS only, the
    report beside the saved run rather than in docs/bench."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "run.sh").write_text(FAKE_RUN_SH)
    (bench / "run.sh").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORKLOADS", "DAEMON_NAME", "SCRAPE_EVERY", "REPORT_DIR")}
    env.update(BENCH=str(bench), CALLS=str(tmp_path / "calls"), OUT_DIR=str(tmp_path / "runs"),
               TARGETS="direct haproxy-nolua", ERRORD_ARGS="--policy off", WORKLOADS="ok",
               CHECK_PORTS="0")
    p = subprocess.run([os.path.join(ROOT, "scripts", "bench")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = [line.split("|") for line in (tmp_path / "calls").read_text().splitlines()]
    assert [c[:3] for c in calls] == [["direct haproxy-nolua", "ok", "errord"]]
    assert calls[0][3].split()[-2:] == ["--policy", "off"]
    assert "--policy" not in calls[0][3].split()[:-2]
    saved = sorted(os.listdir(tmp_path / "runs"))
    assert saved in (["plot", "results.md", "results.png", "run.txt"],  # with gnuplot
                     ["results.md", "run.txt"])
