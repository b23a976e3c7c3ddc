"""Scheduling holes of issue 13, against the real lab: a timeout or cancel of one job never
fails its neighbours (1), a call's timeout bounds its worker's start too and a hung start is
killed on the host (2), a host whose connection drops comes back (3), and a job that has not
started never waits behind a long one while a worker is free (7).  Each fault is in the
ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import pytest

from sshjobs import Cluster, Inventory, Timeout
from sshjobs.display import Progress

from .conftest import sshd_sessions, user_processes, wait_no_processes
from .test_faults import all_pids, wait_gone, wait_procs


def nap(seconds, tag=None):
    import os
    import time

    time.sleep(seconds)
    return seconds, os.getpid()


def run(coro):
    return asyncio.run(coro)


def signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended meanwhile
            pass


# -- 1. a timeout or cancel of one job kills no neighbour ------------------------------------
def test_a_submit_timeout_fails_that_job_alone_and_the_job_queued_behind_it_runs(inv, faults):
    one = inv.select("node01")  # one slot: the second job waits for the first's worker

    async def go():
        async with one.connect() as c:
            a = c.submit(nap, 5, timeout=1)
            b = c.submit(nap, 0.1)
            return await a, await b

    with faults.inject("submit timeout with a job queued behind it on the same worker"):
        a, b = run(go())
        assert isinstance(a.error, Timeout), a
        assert b.ok and b.value[0] == 0.1, b  # it ran on the worker that replaced the killed one
        assert b.attempts == 1


def test_cancelling_a_queued_submit_drops_it_and_leaves_the_running_one(inv, lab, faults):
    one = inv.select("node02")
    marker = f"~/cancel-{uuid.uuid4().hex[:8]}"

    def mark(path):
        open(os.path.expanduser(path), "w").close()
        return "ran"

    async def go():
        async with one.connect() as c:
            first = c.submit(nap, 1.0)
            queued = c.submit(mark, marker)
            last = c.submit(nap, 0.1)
            await asyncio.sleep(0.3)
            queued.cancel()
            return await first, await last, queued.cancelled()

    with faults.inject("queued submit cancelled"):
        first, last, cancelled = run(go())
        assert cancelled
        assert first.ok and last.ok, (first, last)
        assert first.value[1] == last.value[1]  # the same worker: nobody was killed
        assert not (lab.home(1) / marker[2:]).exists()  # the cancelled job never ran


def test_wait_for_around_one_submit_kills_only_that_job(inv, faults):
    one = inv.select("node03")

    async def go():
        async with one.connect() as c:
            slow = c.submit(nap, 30)
            behind = [c.submit(nap, 0.05, i) for i in range(3)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(slow, 1)
            return [await b for b in behind]

    with faults.inject("asyncio.wait_for gives up one running submit"):
        behind = run(go())
        assert all(r.ok for r in behind), behind
        assert len({r.value[1] for r in behind}) == 1  # on the new worker, one after the other


def test_map_timeout_fails_only_the_item_that_overran_whatever_the_chunksize(inv, faults):
    def slow_at_7(x):
        import time

        if x == 7:
            time.sleep(600)
        time.sleep(0.05)
        return x * 10

    with faults.inject("map item overruns its timeout, chunksize 5"):
        results = inv.select("node04,node05").map(slow_at_7, range(20), timeout=2, chunksize=5)
        assert isinstance(results[7].error, Timeout), results[7]
        faults.expect(results, {i: i * 10 for i in range(20) if i != 7})
        assert all(r.attempts == 1 for r in results)  # nothing was charged a retry


def test_a_map_beside_a_submit_that_times_out_loses_no_item(inv, faults):
    two = Inventory([replace(h, slots=2) for h in inv.select("node06")])

    async def go():
        async with two.connect() as c:
            await c.ensure_slots()
            doomed = c.submit(nap, 30, timeout=1)
            mapped = await c.map(nap, [0.05] * 60)
            return await doomed, mapped

    with faults.inject("submit timeout while a map runs on the same host"):
        doomed, mapped = run(go())
        assert isinstance(doomed.error, Timeout)
        faults.expect(mapped, {i: (0.05, mapped[i].value[1] if mapped[i].ok else None) for i in range(60)})
        assert all(r.attempts == 1 for r in mapped)


# -- 7. no head-of-line blocking ---------------------------------------------------------
def test_a_short_job_never_waits_behind_a_long_one_while_workers_idle(inv):
    async def go():
        async with inv.connect() as c:  # 10 hosts, one slot each
            await c.ensure_slots()
            long = c.submit(nap, 4)
            short = [c.submit(nap, 0.1, i) for i in range(19)]
            done = await asyncio.gather(*short)
            return long.done(), done, await long

    long_was_done, short, long = run(go())
    assert all(r.ok for r in short), short
    assert long.ok
    assert not long_was_done  # every short job finished while the long one still ran
    assert long.value[1] not in {r.value[1] for r in short}  # none ran on the long one's worker


def test_gather_waits_for_a_free_worker_and_its_timeout_kills_no_submit(inv, faults):
    one = inv.select("node07")

    async def go():
        async with one.connect() as c:
            busy = c.submit(nap, 2.5)
            await asyncio.sleep(0.3)
            gathered = await c.gather(nap, 0.1, timeout=1)  # the only worker is busy: it never starts
            return gathered[0], await busy

    with faults.inject("gather timeout while a submit holds the host's worker"):
        gathered, busy = run(go())
        assert isinstance(gathered.error, Timeout) and "did not start" in gathered.error.message, gathered
        assert busy.ok, busy  # the submitted job was not killed for the gather's timeout


# -- 2. a call's timeout bounds its worker's start; a hung start is killed ------------------
@pytest.fixture
def hung_python(lab):
    """node08 whose ``python`` is a program that never answers (``exec sleep``)."""
    marker = f"{297 + int(uuid.uuid4().int % 1000) / 1000:.3f}"
    path = lab.home(7) / f"hang-python-{marker}"
    path.write_text(f"#!/bin/sh\nexec sleep {marker}\n")
    path.chmod(0o755)
    host = replace(Inventory.load(lab.inventory_path).select("node08").hosts[0], python=str(path))
    yield Inventory([host]), marker
    path.unlink(missing_ok=True)


def test_gather_timeout_bounds_a_hung_worker_start_and_the_start_is_killed(hung_python, lab, faults):
    inv, marker = hung_python
    user = lab.hosts[7].user
    with faults.inject("interpreter that never starts (gather timeout=2)"):
        t0 = time.monotonic()
        (r,) = inv.gather(nap, 0, timeout=2)
        took = time.monotonic() - t0
        assert isinstance(r.error, Timeout) and "did not start within 2s" in r.error.message, r
        assert took < 2 + 3, took  # not the 60 s start_timeout
        assert wait_procs([user], marker, timeout=5) == {}  # the hung start was killed on the host
        assert wait_no_processes([user]) == {}


def test_submit_timeout_bounds_the_wait_for_a_worker_that_never_starts(hung_python, lab, faults):
    inv, marker = hung_python
    user = lab.hosts[7].user

    async def go():
        cluster = inv.connect(start_timeout=3)
        try:
            t0 = time.monotonic()
            r = await cluster.submit(nap, 0, timeout=1)
            took = time.monotonic() - t0
            while cluster.hosts[0].error is None:  # the start's own timeout (3 s) ends it
                await asyncio.sleep(0.1)
            return r, took, await asyncio.to_thread(wait_procs, [user], marker, 5)
        finally:
            await cluster.close()

    with faults.inject("interpreter that never starts (submit timeout=1, start_timeout=3)"):
        r, took, left = run(go())
        assert isinstance(r.error, Timeout), r
        assert took < 1 + 2.5, took
        assert left == {}  # killed by the start timeout, while the controller still runs
        assert wait_no_processes([user]) == {}


def test_a_call_on_a_stopped_host_returns_within_its_timeout(inv, lab, faults):
    one = inv.select("node09")  # keepalive 5 s x 3: the connection is not given up meanwhile
    victim = lab.hosts[8].user

    async def go():
        async with one.connect() as c:
            stopped = all_pids(victim)
            signal_all(stopped, signal.SIGSTOP)
            took = []
            try:
                results = []
                for _ in range(2):
                    t0 = time.monotonic()
                    results.append((await c.gather(nap, 0, timeout=2))[0])
                    took.append(time.monotonic() - t0)
            finally:
                signal_all(stopped, signal.SIGCONT)
            after = (await c.gather(nap, 0, timeout=20))[0]
            return results, took, after

    with faults.inject("host SIGSTOPped: two calls with timeout=2"):
        results, took, after = run(go())
        assert all(isinstance(r.error, Timeout) for r in results), results
        assert max(took) < 2 * 2 + 1, took  # the second call too, though its worker must start again
        assert after.ok, after  # continued: the host serves again
        assert wait_no_processes([victim], timeout=10) == {}


# -- 3. a host whose connection drops comes back -------------------------------------------
def fast_keepalive(inv: Inventory, names: str, interval: float = 1.0) -> Inventory:
    return Inventory([replace(h, keepalive_interval=interval) for h in inv.select(names)])


async def until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


def test_a_host_whose_sshd_session_is_killed_reconnects_and_later_calls_use_it(inv, lab, faults):
    two = inv.select("node01,node02")
    victim = lab.hosts[1].user
    events = []

    async def go():
        async with Cluster(two, on_event=lambda h, e, i: events.append((h, e, i))) as c:
            before = [r.value for r in await c.gather(os.getpid)]
            for pid in sshd_sessions(victim):
                os.kill(pid, signal.SIGKILL)  # the connection drops: no job runs, nothing is asked
            await until(lambda: any(e == "reconnected" for _, e, _ in events))
            after = await c.gather(os.getpid)
            return before, after, len(sshd_sessions(victim))

    with faults.inject("host's sshd session killed while idle"):
        before, after, sessions = run(go())
        assert all(r.ok for r in after), after
        assert after[1].value != before[1] and after[0].value == before[0]  # a new worker on node02 only
        mine = [(e, i) for h, e, i in events if h == "node02"]
        names = [e for e, _ in mine]
        assert "failed" not in names
        at = names.index("reconnecting")
        assert mine[at][1]["attempt"] == 1 and mine[at][1]["error"] == "HostLost"
        assert "reconnected" in names[at:]
        back = mine[names.index("reconnected")][1]
        assert back["attempts"] >= 1 and back["down_for"] > 0
        assert sessions == 1  # the new connection, the old one gone


def test_a_stopped_then_continued_host_is_used_again(inv, lab, faults):
    hosts = fast_keepalive(inv, "node03,node04")
    victim = lab.hosts[3].user
    events = []

    async def go():
        async with Cluster(hosts, on_event=lambda h, e, i: events.append((h, e, i))) as c:
            before = [r.value for r in await c.gather(os.getpid)]
            stopped = all_pids(victim)
            signal_all(stopped, signal.SIGSTOP)  # nothing answers: keepalive gives the connection up
            try:
                await until(lambda: any(h == "node04" and e == "reconnecting" for h, e, _ in events))
            finally:
                signal_all(stopped, signal.SIGCONT)
            await until(lambda: any(h == "node04" and e == "reconnected" for h, e, _ in events))
            after = await c.gather(os.getpid)
            left = await asyncio.to_thread(wait_gone, stopped, 10)
            return before, after, left, len(sshd_sessions(victim))

    with faults.inject("host SIGSTOPped then SIGCONTed"):
        before, after, left, sessions = run(go())
        assert all(r.ok for r in after), after
        assert after[1].value != before[1]
        assert left == []  # the old session and worker ended after SIGCONT
        assert sessions == 1


def test_a_map_takes_a_host_back_once_it_reconnected(inv, lab, faults):
    two = fast_keepalive(inv, "node05,node06")
    victim = lab.hosts[5].user

    async def go():
        async with two.connect() as c:
            pid = (await c.gather(os.getpid))[1].value

            async def killer():
                await asyncio.sleep(1.0)
                for p in sshd_sessions(victim):
                    os.kill(p, signal.SIGKILL)
            k = asyncio.create_task(killer())
            results = await c.map(nap, [0.05] * 160, chunksize=1, retries=1)
            await k
            return pid, results, c.hosts[1].reconnects

    with faults.inject("host lost mid-map, back before the map ends"):
        pid, results, reconnects = run(go())
        faults.expect(results, {i: (0.05, results[i].value[1] if results[i].ok else None) for i in range(160)})
        on_victim = {r.value[1] for r in results if r.host == "node06"}
        assert reconnects == 1
        assert pid in on_victim and len(on_victim) >= 2  # it ran items, dropped, came back and ran more


def test_a_cluster_whose_only_host_is_down_fails_fast_and_serves_once_it_is_back(inv, lab, faults):
    one = inv.select("node07")
    victim = lab.hosts[6].user
    sshd = lab.procs[6]

    async def go():
        async with one.connect() as c:
            await c.gather(os.getpid)
            sshd.send_signal(signal.SIGSTOP)  # the listener answers nothing: no new connection
            try:
                for p in sshd_sessions(victim):
                    os.kill(p, signal.SIGKILL)
                await until(lambda: c.hosts[0].lost is not None)
                t0 = time.monotonic()
                down = await c.submit(os.getpid, timeout=1)
                took = time.monotonic() - t0
            finally:
                sshd.send_signal(signal.SIGCONT)
            back = await c.submit(os.getpid)
            return down, took, back

    with faults.inject("the host's sshd stops answering, then answers again"):
        down, took, back = run(go())
        assert isinstance(down.error, Timeout) and "did not start" in down.error.message, down
        assert took < 1 + 2, took
        assert back.ok, back


# -- the CLI says so --------------------------------------------------------------------------
JOBS = '''
import os, time

def slow_pid(x):
    time.sleep(0.05)
    with open(os.path.expanduser("~/cli-items.log"), "a") as f:
        f.write("%d\\n" % x)
    return os.getpid()
'''


def test_the_cli_says_a_host_reconnected_and_uses_it_again(lab, tmp_path, faults):
    jobs = tmp_path / "jobs.py"
    jobs.write_text(JOBS)
    victim = lab.hosts[8].user
    done_log = lab.home(8) / "cli-items.log"
    done_log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SSHJOBS_INVENTORY"}
    proc = subprocess.Popen([sys.executable, "-m", "sshjobs", "map", "-i", str(lab.inventory_path), "--limit",
                             "node09,node10", f"{jobs}:slow_pid", "--range", "200", "--retries", "1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while len(done_log.read_text().split()) < 5 if done_log.exists() else True:
            assert time.monotonic() < deadline, "the map did not start"
            time.sleep(0.05)
        old = [int(p.split()[0]) for p in user_processes(victim) if "python3 -c" in p]
        with faults.inject("host's sshd session killed during `sshjobs map`"):
            for p in sshd_sessions(victim):
                os.kill(p, signal.SIGKILL)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            assert "connection lost, reconnecting" in err and "node09" in err
            assert "reconnected" in err
            rows = [__import__("json").loads(line) for line in out.splitlines()]
            assert len(rows) == 200 and all(r["ok"] for r in rows)
            # items ran on node09's new worker (those its old one ran may have been lost with it)
            assert {r["value"] for r in rows if r["host"] == "node09"} - set(old), rows
    finally:
        if proc.poll() is None:
            proc.kill()
        done_log.unlink(missing_ok=True)


def test_the_live_display_shows_reconnecting_then_connected():
    progress = Progress(["node01"])
    progress.event("node01", "running", {"jobs": 2, "job": 0})
    progress.event("node01", "reconnecting", {"attempt": 1, "error": "HostLost",
                                              "message": "u@h:22: connection lost: closed"})
    h = progress.hosts["node01"]
    assert h.state == "reconnecting" and "attempt 1: HostLost: u@h:22: connection lost" in h.note
    assert h.running == 0
    progress.event("node01", "reconnected", {"attempts": 2, "down_for": 1.5})
    assert h.state == "connected" and h.note == "reconnected after 1.50s"
