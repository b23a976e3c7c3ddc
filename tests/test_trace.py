"""Cluster(trace=...), `sshjobs run/map --trace` and `sshjobs timeline`: the run as a Chrome
trace (every connect, worker start and job per host and slot, with its outcome), and that
trace drawn as an HTML page, checked in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from sshjobs import Cluster, ConfigError, Inventory, events
from sshjobs.timeline import render, write_html
from sshjobs.trace import Recorder

ROOT = Path(__file__).resolve().parent.parent


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    assert isinstance(doc["traceEvents"], list)
    return doc


def complete(doc: dict, cat: str | None = None) -> list[dict]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and (cat is None or e["cat"] == cat)]


def names(doc: dict) -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    """process names by pid, thread names by (pid, tid)."""
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    return procs, threads


def check_shape(doc: dict) -> None:
    """What every trace viewer needs: numbers in microseconds, a name for every pid and tid."""
    procs, threads = names(doc)
    for e in complete(doc):
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0, e
        assert e["pid"] in procs and (e["pid"], e["tid"]) in threads, e
        assert procs[e["pid"]] == e["args"]["host"], e
        assert e["args"]["outcome"] in ("ok", "failed", "timeout"), e
    # a worker runs its jobs one at a time: the bars of a slot never overlap
    rows: dict = {}
    for e in complete(doc, "job"):
        rows.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for bars in rows.values():
        bars.sort()
        assert all(a[1] <= b[0] + 0.2 for a, b in zip(bars, bars[1:])), bars


def seven_fails(x):
    import time
    time.sleep(0.02)  # long enough for every slot's worker to start before the map ends
    if x == 7:
        raise ValueError("seven")
    return x * x


# -- the trace from a map and a gather ------------------------------------------------------
def test_map_traces_each_chunk_on_its_host_and_slot_with_its_outcome(inv, tmp_path):
    hosts = [replace(h, slots=2) for h in inv.select("node0[1-3]")]
    path = tmp_path / "map.json"
    results = Inventory(hosts).map(seven_fails, range(40), chunksize=4, trace=path)
    assert [r.ok for r in results] == [i != 7 for i in range(40)]
    doc = load(path)
    check_shape(doc)
    procs, threads = names(doc)
    assert procs == {1: "node01", 2: "node02", 3: "node03"}  # pid: the host's place in the inventory
    for pid in procs:
        assert threads[(pid, 0)] == "host" and threads[(pid, 1)] == "slot 0" and threads[(pid, 2)] == "slot 1"
    connects = complete(doc, "connect")
    assert sorted(e["args"]["host"] for e in connects) == ["node01", "node02", "node03"]
    assert all(e["tid"] == 0 and e["args"]["outcome"] == "ok" and e["dur"] > 0 for e in connects)
    starts = {(e["pid"], e["args"]["slot"]) for e in complete(doc, "worker")}
    assert starts == {(p, s) for p in procs for s in (0, 1)}  # every slot's worker started
    jobs = complete(doc, "job")
    assert len(jobs) == 10  # one bar per chunk
    ranges = sorted(tuple(e["args"]["items"]) for e in jobs)
    assert ranges == [(i, i + 4) for i in range(0, 40, 4)]
    for e in jobs:
        assert e["tid"] == e["args"]["slot"] + 1 and e["name"].startswith("seven_fails [")
        bad = e["args"]["items"] == [4, 8]
        assert e["args"]["outcome"] == ("failed" if bad else "ok") and e["cname"] == ("bad" if bad else "good")
        assert e["args"]["failed"] == int(bad) and e["args"]["ok"] == 4 - int(bad)
        assert e["dur"] > 0 and e["args"]["elapsed"] >= 0
    # the jobs ran where the results say
    for e in jobs:
        lo, hi = e["args"]["items"]
        assert {r.host for r in results[lo:hi]} == {e["args"]["host"]}
    # connects come before their host's worker starts, those before its jobs
    for pid in procs:
        connect = min(e["ts"] for e in connects if e["pid"] == pid)
        first_start = min(e["ts"] for e in complete(doc, "worker") if e["pid"] == pid)
        first_job = min((e["ts"] for e in jobs if e["pid"] == pid), default=float("inf"))
        assert connect <= first_start <= first_job


def role_job(seconds):
    role = os.environ.get("TRACE_ROLE", "ok")
    if role == "fail":
        raise KeyError("this host's job fails")
    if role == "slow":
        import time
        time.sleep(seconds)
    return role


def test_gather_traces_one_job_per_host_ok_failed_and_timeout(inv, tmp_path):
    roles = {"node01": "ok", "node02": "fail", "node03": "slow"}
    hosts = [replace(h, env=(("TRACE_ROLE", roles[h.name]),)) for h in inv.select("node0[1-3]")]
    path = tmp_path / "gather.json"
    results = Inventory(hosts).gather(role_job, 60, timeout=3.0, trace=path)
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].error.type == "KeyError" and results[2].error.type == "Timeout"
    doc = load(path)
    check_shape(doc)
    procs, _ = names(doc)
    jobs = {e["args"]["host"]: e for e in complete(doc, "job")}
    assert set(jobs) == set(roles)
    want = {"node01": ("ok", "good"), "node02": ("failed", "bad"), "node03": ("timeout", "terrible")}
    for host, e in jobs.items():
        assert (e["args"]["outcome"], e["cname"]) == want[host], e
        assert e["name"] == "role_job" and e["tid"] == 1 and e["args"]["slot"] == 0
        assert procs[e["pid"]] == host and e["args"]["job"] == [h.name for h in hosts].index(host)
    assert "KeyError" in jobs["node02"]["args"]["error"]
    assert 2.8e6 <= jobs["node03"]["dur"] <= 10e6  # the timeout, in microseconds


def test_submitted_jobs_are_traced_through_the_executor(inv, tmp_path):
    from sshjobs import Executor

    path = tmp_path / "submit.json"
    with Executor(inv.select("node0[1-2]"), trace=path) as ex:
        futures = [ex.submit(seven_fails, i) for i in range(6, 12)]
        values = [f.exception() or f.result() for f in futures]
    assert values[0] == 36 and isinstance(values[1], ValueError)
    doc = load(path)
    check_shape(doc)
    jobs = complete(doc, "job")
    assert len(jobs) == 6 and all(e["name"] == "seven_fails" for e in jobs)
    assert sorted(e["args"]["outcome"] for e in jobs) == ["failed"] + ["ok"] * 5


def test_a_host_that_cannot_connect_is_a_failed_connect(lab, tmp_path):
    ghost = {"name": "ghost", "address": "127.0.0.1", "port": 1, "user": lab.hosts[0].user,
             "identity": str(lab.identity), "known_hosts": str(lab.known_hosts)}
    both = Inventory(list(Inventory.load(lab.inventory_path).select("node01")) + list(Inventory.from_hosts([ghost])))
    path = tmp_path / "ghost.json"
    results = both.gather(lambda: 1, trace=path)
    assert [r.ok for r in results] == [True, False]
    doc = load(path)
    check_shape(doc)
    (bad,) = [e for e in complete(doc, "connect") if e["args"]["host"] == "ghost"]
    assert bad["args"]["outcome"] == "failed" and bad["cname"] == "bad" and bad["args"]["error"]
    assert [e["args"]["host"] for e in complete(doc, "job")] == ["node01"]


def test_the_trace_is_written_when_the_run_fails(inv, tmp_path):
    path = tmp_path / "failed-run.json"

    async def go():
        async with Cluster(inv.select("node01"), trace=path) as cluster:
            await cluster.gather(lambda: 1)
            raise RuntimeError("the caller's own failure")

    with pytest.raises(RuntimeError):
        asyncio.run(go())
    doc = load(path)
    assert [e["args"]["outcome"] for e in complete(doc, "job")] == ["ok"]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not a temp file's 0600


def test_a_trace_path_is_checked_before_anything_is_contacted(inv, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Cluster(inv, trace=tmp_path / "no" / "such" / "run.json")
    with pytest.raises(ConfigError, match="not a file path"):
        Cluster(inv, trace=tmp_path)
    with pytest.raises(TypeError, match="trace must be a file path"):
        Cluster(inv, trace=3)


def test_the_recorder_draws_installs_reconnects_and_uploads(tmp_path):
    # Fed the events as the Cluster emits them: the paths a lab run rarely takes.
    rec = Recorder(tmp_path / "r.json", ["a", "b"])
    rec("a", events.CONNECTING, {})
    rec("a", events.CONNECTED, {"connect_time": 0.01, "start_time": 0.01, "python": "3.12"})
    rec("a", events.INSTALLING, {"requirements": ["six"], "offline": True})
    rec("a", events.UPLOADING_WHEELS, {"count": 1, "skipped": 0})
    rec("a", events.INSTALLED, {"cached": False, "uv": "path", "hash": "abc"})
    rec("b", events.CONNECTING, {})
    rec("b", events.CONNECTED, {"connect_time": 0.01, "start_time": 0.01, "python": "3.12"})
    rec("b", events.INSTALLING, {"requirements": ["nope"], "offline": False})
    rec("b", events.INSTALL_FAILED, {"type": "InstallError", "error": "no such package"})
    rec("a", events.RECONNECTING, {"attempt": 1, "error": "HostLost", "message": "dropped"})
    rec("a", events.RECONNECTING, {"attempt": 2, "error": "HostLost", "message": "dropped"})
    rec("a", events.RECONNECTED, {"attempts": 2, "down_for": 0.5})
    rec("a", events.WORKER_STARTED, {"slot": 3, "start_time": 0.02})
    rec.write()
    doc = load(tmp_path / "r.json")
    check_shape(doc)
    installs = {e["args"]["host"]: e for e in complete(doc, "install")}
    assert installs["a"]["args"]["outcome"] == "ok" and installs["a"]["args"]["requirements"] == ["six"]
    assert installs["b"]["args"]["outcome"] == "failed" and installs["b"]["args"]["message"] == "no such package"
    (again,) = complete(doc, "reconnect")
    assert again["args"]["attempts"] == 2 and again["args"]["lost"]["message"] == "dropped"
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "i"] == ["uploading-wheels"]
    assert {e["tid"] for e in complete(doc, "worker") if e["args"]["host"] == "a"} == {1, 4}
    _, threads = names(doc)
    assert threads[(1, 4)] == "slot 3"


# -- the command line ---------------------------------------------------------------------
JOBS = '''
def square(x):
    if x == 7:
        raise ValueError("seven")
    return x * x

def hello():
    return "hello"
'''


def sshjobs(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SSHJOBS_INVENTORY"}
    return subprocess.run([sys.executable, "-m", "sshjobs", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=180, cwd=cwd or ROOT)


@pytest.fixture
def jobs(tmp_path) -> Path:
    path = tmp_path / "tracejobs.py"
    path.write_text(JOBS)
    return path


def test_cli_run_and_map_write_a_trace_and_timeline_draws_it(lab, jobs, tmp_path):
    path = tmp_path / "run.json"
    p = sshjobs("run", "-i", lab.inventory_path, "--trace", path, f"{jobs}:hello", "--json")
    assert p.returncode == 0, p.stderr
    doc = load(path)
    check_shape(doc)
    assert sorted(e["args"]["host"] for e in complete(doc, "job")) == sorted(h.name for h in lab.hosts)
    assert len(complete(doc, "connect")) == len(lab.hosts)

    path = tmp_path / "map.json"
    p = sshjobs("map", "-i", lab.inventory_path, "--limit", "node0[1-4]", "--trace", path, f"{jobs}:square",
                "--range", "20", "--json")
    assert p.returncode == 1  # job 7 failed: the trace is written all the same
    jobs_ = complete(load(path), "job")
    assert sum(e["args"]["jobs"] if "jobs" in e["args"] else 1 for e in jobs_) == 20
    assert [e["args"]["outcome"] for e in jobs_].count("failed") == 1

    p = sshjobs("timeline", path, "-o", tmp_path / "map.html")
    assert p.returncode == 0, p.stderr
    assert f"{len(jobs_)} jobs" in p.stdout
    page = (tmp_path / "map.html").read_text()
    assert "<script" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page

    p = sshjobs("run", "-i", lab.inventory_path, "--trace", tmp_path / "no" / "run.json", f"{jobs}:hello")
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = sshjobs("timeline", jobs, "-o", tmp_path / "x.html")
    assert p.returncode == 2 and "not a trace file" in p.stderr


def test_the_page_keeps_a_hostile_name_inert(tmp_path):
    rec = Recorder(tmp_path / "r.json", ["</script><script>alert(1)</script>"])
    rec("</script><script>alert(1)</script>", events.DONE,
        {"jobs": 1, "job": 0, "ok": 1, "failed": 0, "outcome": "ok", "slot": 0, "elapsed": 0.1, "duration": 0.1,
         "function": "<b>f</b>", "error": None})
    page, drawn = render(rec.trace())
    assert drawn.jobs == 1 and page.count("</script>") == 2  # the data's and the code's own


# -- the page in a real browser -------------------------------------------------------------
def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: run `make system-deps` (CI must run the timeline's browser test)")
        pytest.skip("chromium is not installed (apt-get install chromium): the timeline's browser test needs it")
    return found


def browser(binary: str, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                           *map(str, args)], capture_output=True, timeout=120, text=True)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit truecolour PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the row's filter (PNG spec, section 9)
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(px) for row in rows for px in zip(*[iter(row[k::bpp]) for k in range(3)])]


def test_the_timeline_page_draws_every_job_in_chromium(inv, tmp_path):
    binary = chromium()
    hosts = [replace(h, slots=2) for h in inv.select("node0[1-3]")]
    trace = tmp_path / "map.json"
    Inventory(hosts).map(seven_fails, range(24), chunksize=2, trace=trace)
    jobs = complete(load(trace), "job")
    page = tmp_path / "map.html"
    drawn = write_html(trace, page)
    assert drawn.jobs == len(jobs) == 12 and drawn.hosts == 3 and 6 <= drawn.rows <= 9  # host rows, slots

    # the DOM once the page's script ran: one bar per job, coloured by its outcome, a title each
    p = browser(binary, tmp_path, "--dump-dom", page.as_uri())
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert dom.count('class="bar job ') == len(jobs), dom[:2000]
    assert dom.count('class="bar job failed"') == 1 and dom.count('class="bar job ok"') == len(jobs) - 1
    assert dom.count('class="bar connect ok"') == 3
    assert dom.count("<title>") >= len(jobs) + 3 and "seven_fails [6:8)" in dom

    # the picture: not blank, with the green of ok jobs and the red of the failed one
    shot = tmp_path / "timeline.png"
    p = browser(binary, tmp_path, f"--screenshot={shot}", "--window-size=900,420", "--hide-scrollbars", page.as_uri())
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (900, 420)
    assert len(set(pixels)) > 20  # text, bars, axis: far from one colour

    def near(rgb):
        return sum(1 for px in pixels if all(abs(v - w) <= 12 for v, w in zip(px, rgb)))

    assert near((0x3A, 0x9E, 0x5C)) > 500  # ok bars
    assert near((0xD6, 0x45, 0x45)) > 40  # the failed one (and its legend swatch)


def test_the_live_display_keeps_a_hosts_state_when_another_worker_starts():
    from sshjobs.display import Progress

    progress = Progress(["a"])
    progress.event("a", events.RUNNING, {"jobs": 1, "job": 0, "slot": 0})
    progress.event("a", events.WORKER_STARTED, {"slot": 1, "start_time": 0.02})
    assert progress.hosts["a"].state == "running"
