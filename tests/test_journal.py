"""The journal against the lab: Results committed as they arrive, a rerun that runs only the
rest, refusals, a controller killed with SIGKILL mid-map, and `sshjobs results`."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sshjobs import Journal, JournalError
from sshjobs.scheduler import DEPTH

from .conftest import quiet, wait_no_processes

ROOT = Path(__file__).resolve().parent.parent


def runs(d: Path) -> dict[int, int]:
    """How many times each item ran, from the marks its jobs left (``ITEM.RANDOM``)."""
    counts: dict[int, int] = {}
    for f in d.iterdir():
        if f.name[0].isdigit():
            item = int(f.name.split(".")[0])
            counts[item] = counts.get(item, 0) + 1
    return counts


def make_job(d: Path, flag: Path):
    def job(x, where=str(d), flag=str(flag)):
        import os

        import uuid

        open(f"{where}/{x}.{uuid.uuid4().hex}", "w").close()  # one file a run: the hosts are users of their own
        if x % 10 == 3 and not os.path.exists(flag):
            raise ValueError(f"item {x} fails until the flag is set")
        return x * x

    return job


def test_a_rerun_takes_the_done_items_from_the_journal_and_runs_the_failed_again(inv, tmp_path, shared):
    marks, flag, path = shared, shared / "flag", tmp_path / "sweep.db"
    marks = shared / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    job = make_job(marks, flag)
    first = inv.map(job, range(50), journal=path)
    assert [r.ok for r in first].count(False) == 5
    with Journal(path) as j:
        assert j.counts == {"ok": 45, "failed": 5, "total": 50}
        assert [r.job for r in j] == list(range(50))
        assert [r.job for r in j.failed()] == [3, 13, 23, 33, 43]
        assert isinstance(next(iter(j.failed())).error, ValueError)
    flag.touch()
    second = inv.map(job, range(50), journal=path)
    assert [r.value for r in second] == [x * x for x in range(50)] and all(r.ok for r in second), [r for r in second if not r.ok]
    counts = runs(marks)
    assert {i for i, n in counts.items() if n == 2} == {3, 13, 23, 33, 43}
    assert all(counts[i] == 1 for i in range(50) if i % 10 != 3)
    assert all(r.meta.get("journal") == str(path) for r in second if r.job % 10 != 3)
    # a third run finds everything done: nothing runs
    third = list(inv.imap(job, iter(range(50)), journal=path))
    assert [r.value for r in third] == [x * x for x in range(50)] and runs(marks) == counts
    with Journal(path) as j:
        assert j.counts == {"ok": 50, "failed": 0, "total": 50}


def test_a_journal_of_another_function_or_other_items_is_refused(inv, tmp_path):
    path = tmp_path / "sweep.db"

    def square(x):
        return x * x

    def cube(x):
        return x ** 3

    inv.map(square, range(10), journal=path)
    with pytest.raises(JournalError, match="cube") as info:
        inv.map(cube, range(10), journal=path)
    assert "square" in str(info.value) and "resume=False" in str(info.value)
    with pytest.raises(JournalError, match="item 0 is not the item"):
        inv.map(square, range(100, 110), journal=path)
    # resume=False starts it over, for the new function
    assert [r.value for r in inv.map(cube, range(3), journal=path, resume=False)] == [0, 1, 8]
    with Journal(path) as j:
        assert j.counts["total"] == 3 and "cube" in j.function


def test_not_a_journal_is_refused(tmp_path):
    bogus = tmp_path / "notes.db"
    bogus.write_text("not sqlite at all " * 100)
    with pytest.raises(JournalError, match="not a journal"):
        Journal(bogus)
    with pytest.raises(JournalError, match="no such journal"):
        Journal(tmp_path / "missing.db")


def test_a_journal_stays_small_and_holds_every_result(inv, tmp_path):
    path = tmp_path / "small.db"
    results = inv.map(lambda x: x + 1, range(20_000), journal=path)
    assert all(r.ok for r in results)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert os.path.getsize(path) / 20_000 <= 100
    with Journal(path) as j:
        assert sum(r.value for r in j) == sum(range(1, 20_001))


CONTROLLER = textwrap.dedent("""
    import sys, time
    from sshjobs import Inventory

    def job(x, where=sys.argv[2]):
        import time
        import uuid
        time.sleep(0.02)
        open(f"{where}/{x}.{uuid.uuid4().hex}", "w").close()
        return x

    inv = Inventory.load(sys.argv[1])
    results = inv.map(job, range(int(sys.argv[4])), journal=sys.argv[3], chunksize=1)
    print(sum(r.ok for r in results))
""")


def test_a_controller_killed_mid_map_loses_no_result_and_the_rerun_finishes_the_rest(lab, tmp_path, shared):
    marks, path = shared, tmp_path / "sweep.db"
    quiet([h.user for h in lab.hosts])
    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER)
    n = 600
    args = [sys.executable, str(script), str(lab.inventory_path), str(marks), str(path), str(n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and done < 100:
        time.sleep(0.1)
        if path.exists():
            try:
                db = sqlite3.connect(path)
                done = db.execute("SELECT count(*) FROM results").fetchone()[0]
                db.close()
            except sqlite3.OperationalError:
                pass
    assert done >= 100, proc.communicate(timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # the hosts end their workers once the connections drop; jobs they had begun may finish first
    assert wait_no_processes([h.user for h in lab.hosts], timeout=30) == {}
    with Journal(path) as j:
        recorded = {r.job for r in j if r.ok}
    ran_before = runs(marks)
    assert recorded and recorded <= set(ran_before) and len(recorded) < n
    # whatever reached the controller is on disk: every item the hosts finished is there
    # but those in flight at the kill: a worker's queue (DEPTH jobs), and results on the wire
    assert len(set(ran_before) - recorded) <= 10 * (DEPTH + 2)

    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == str(n)
    counts = runs(marks)
    assert set(counts) == set(range(n))
    assert all(counts[i] == 1 for i in recorded)  # nothing on disk ran again
    twice = {i for i, c in counts.items() if c > 1}
    assert twice <= set(ran_before) - recorded  # only items in flight at the kill ran twice
    with Journal(path) as j:
        assert j.counts == {"ok": n, "failed": 0, "total": n}


def sshjobs(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sshjobs", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_cli_map_journal_then_results_in_each_format(lab, tmp_path):
    jobs = tmp_path / "jobs.py"
    jobs.write_text("def f(x):\n    if x == 4:\n        raise KeyError(x)\n    return x * 10\n")
    path = tmp_path / "cli.db"
    first = sshjobs("map", f"{jobs}:f", "--range", "8", "--journal", str(path), "-i", str(lab.inventory_path), "--json")
    assert first.returncode == 1, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [d["job"] for d in lines] == list(range(8)) and [d["ok"] for d in lines].count(False) == 1

    as_json = sshjobs("results", str(path), "--json")
    assert as_json.returncode == 1
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(d["job"], d["value"]) for d in rows if d["ok"]] == [(i, i * 10) for i in range(8) if i != 4]
    assert [d["error"]["type"] for d in rows if not d["ok"]] == ["KeyError"]

    as_csv = sshjobs("results", str(path), "--csv")
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["job"] for r in table] == [str(i) for i in range(8)]
    assert table[1]["value"] == "10" and table[4]["ok"] == "0" and "KeyError" in table[4]["error"]

    failed = sshjobs("results", str(path), "--failed")
    assert failed.stdout.count("FAILED") == 1 and "7 of 8 ok, 1 failed" in failed.stdout

    # --fresh starts over; without it the rerun runs only item 4
    jobs.write_text("def f(x):\n    return x * 10\n")
    fresh_needed = sshjobs("map", f"{jobs}:f", "--range", "8", "--journal", str(path), "-i", str(lab.inventory_path))
    assert fresh_needed.returncode == 2 and "--fresh" in fresh_needed.stderr  # the function's code changed
    again = sshjobs("map", f"{jobs}:f", "--range", "8", "--journal", str(path), "--fresh", "-i",
                    str(lab.inventory_path))
    assert again.returncode == 0, again.stderr
    assert "8 of 8 jobs ok" in again.stdout
    assert sshjobs("results", str(path)).returncode == 0


def test_cli_map_streams_its_input_and_its_results(lab, tmp_path):
    jobs = tmp_path / "jobs.py"
    jobs.write_text("def echo(x):\n    return x\n")
    proc = subprocess.Popen([sys.executable, "-m", "sshjobs", "map", f"{jobs}:echo", "--args", "-", "--json",
                             "-i", str(lab.inventory_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        proc.stdin.write('"first"\n')
        proc.stdin.flush()
        line = proc.stdout.readline()  # printed while stdin is still open: read and run as it comes
        assert json.loads(line)["value"] == "first", proc.stderr.read() if not line else line
        proc.stdin.write('{"a": 1}\n')
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
        assert [json.loads(x)["value"] for x in rest.splitlines()] == [{"a": 1}]
    finally:
        proc.kill()
        proc.wait()
