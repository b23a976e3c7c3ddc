"""The library's face under a user's mistakes and interruptions, against the real lab:
Ctrl-C on a sync call made inside a running loop, what logging shows with or without a
configuration, keyword and argument traps, a Cluster used after its close or its loop."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest

import sshjobs
from sshjobs import ClusterClosed, ConfigError, Inventory, SshjobsError
from sshjobs.api import run_sync

from .conftest import LAB_SUBNET, wait_no_processes
from .test_faults import job_pids, wait_gone

GHOST = f"127.0.{LAB_SUBNET}.250"  # an address of the lab's subnet where nothing listens


# -- 6: Ctrl-C on a sync call inside a running loop ---------------------------------------
IN_LOOP = textwrap.dedent('''
    import asyncio, sys
    from sshjobs import Inventory

    def hang(pidfile):
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "306.5"])
        with open(os.path.expanduser(pidfile), "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        time.sleep(600)
        return "ran to its end"

    inv = Inventory.load(sys.argv[1]).select(sys.argv[2])

    def cell():
        try:
            print(inv.gather(hang, "~/inloop.pid"), flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)

    if sys.argv[3] == "asyncio.run":  # sync code called from a coroutine
        async def main():
            cell()
        asyncio.run(main())
    else:  # a notebook's way: the cell runs as a callback of a loop that runs on
        loop = asyncio.new_event_loop()
        loop.call_soon(cell)
        loop.run_forever()
''')


@pytest.mark.parametrize("how", ["asyncio.run", "loop callback"])
def test_ctrl_c_on_a_sync_call_inside_a_running_loop_ends_the_remote_job_at_once(lab, faults, how):
    index = 5  # node06
    user = lab.hosts[index].user
    proc = subprocess.Popen([sys.executable, "-c", IN_LOOP, str(lab.inventory_path), lab.hosts[index].name, how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = job_pids(lab, index, "~/inloop.pid", timeout=30)  # the job runs on the host
        with faults.inject(f"Ctrl-C (SIGINT) on a sync gather called inside a running loop ({how})"):
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)  # the job would run for 600 s
            took = time.monotonic() - t0
            assert proc.returncode == 130 and out == "interrupted\n", (out, err[-2000:])
            # the remote job and its child end with the call, as from plain code (test_faults)
            assert wait_gone(pids, timeout=3) == []
            assert wait_no_processes([user], timeout=3) == {}
            assert took < 15, took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 8: library logging ------------------------------------------------------------------
LOGS = textwrap.dedent('''
    import logging, sys
    from dataclasses import replace
    from sshjobs import Inventory

    inv = Inventory.load(sys.argv[1])
    ghost = replace(inv.hosts[0], name="ghost", address=sys.argv[2])
    if sys.argv[3] == "basicConfig":
        logging.basicConfig()
    elif sys.argv[3] == "json":
        from sshjobs.log import configure
        configure(logging.WARNING, "json")
    results = Inventory([inv.hosts[0], ghost]).gather(abs, -3)
    print([r.ok for r in results])
''')


def _logs(lab, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOGS, str(lab.inventory_path), GHOST, how],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how, prefix", [("nothing", ""), ("basicConfig", "WARNING:sshjobs.hosts:")])
def test_a_failed_host_is_one_readable_log_line_through_plain_logging(lab, how, prefix):
    p = _logs(lab, how)
    assert p.returncode == 0 and p.stdout == "[True, False]\n", p.stderr
    why = f"ConnectionRefused: {lab.hosts[0].user}@{GHOST}:22: connection refused"
    assert p.stderr.splitlines() == [f"{prefix}host ghost failed: {why}"]


def test_log_records_carry_the_event_s_fields_and_json_shows_them(lab, inv):
    p = _logs(lab, "json")
    assert p.returncode == 0, p.stderr
    (line,) = p.stderr.splitlines()
    event = json.loads(line)
    assert {k: event[k] for k in ("event", "host", "error", "level", "logger")} == {
        "event": "host failed", "host": "ghost", "error": "ConnectionRefused", "level": "warning",
        "logger": "sshjobs.hosts"}
    assert event["detail"] == f"{lab.hosts[0].user}@{GHOST}:22: connection refused" and event["timestamp"]

    # A handler of the user's own sees the same fields as record attributes.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("sshjobs")
    logger.addHandler(handler)
    try:
        Inventory([replace(inv.hosts[0], name="ghost", address=GHOST)]).gather(abs, -3)
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert (record.name, record.event, record.host, record.error) == ("sshjobs.hosts", "host failed", "ghost",
                                                                      "ConnectionRefused")
    assert record.getMessage() == f"host ghost failed: ConnectionRefused: {record.detail}"


def test_cli_json_logs_keep_field_names_a_log_record_has_too(lab, tmp_path):
    """The progress event `failed` has a `message` field, which a LogRecord has too."""
    path = lab.write_inventory(tmp_path / "inv.toml")
    path.write_text(path.read_text() + f'\n[hosts.ghost]\naddress = "{GHOST}"\nuser = "{lab.hosts[0].user}"\n')
    jobs = tmp_path / "jobs.py"
    jobs.write_text("def echo(x):\n    return x\n")
    p = subprocess.run([sys.executable, "-m", "sshjobs", "run", "-i", path, "-l", "ghost", f"{jobs}:echo", "1",
                        "--json", "-v", "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    events = [json.loads(line) for line in p.stderr.splitlines()]
    (failed,) = [e for e in events if e["event"] == "failed"]
    assert failed["host"] == "ghost" and failed["error"] == "ConnectionRefused"
    assert failed["message"] == f"{lab.hosts[0].user}@{GHOST}:22: connection refused"


# -- 10: keyword and argument traps ---------------------------------------------------------
def kwargs_of(**kwargs):
    return kwargs


def test_every_keyword_not_sshjobs_own_reaches_the_job(inv):
    one = inv.select("node01")
    passed = {"inventory": 1, "method": 2, "cluster_options": 3, "work": 4, "fn": 5, "main": 6, "self": 7}
    (result,) = one.gather(kwargs_of, **passed)
    assert result.value == passed
    (result,) = run_sync(one, lambda c: c.gather(kwargs_of, **passed))
    assert result.value == passed

    async def go():
        async with one.connect() as cluster:
            return await cluster.gather(kwargs_of, **passed), await cluster.submit(kwargs_of, **passed)

    (gathered,), submitted = asyncio.run(go())
    assert gathered.value == submitted.value == passed


def test_every_one_shot_call_reports_progress(inv):
    one = inv.select("node02")
    calls = {
        "gather": lambda cb: one.gather(abs, -1, on_event=cb),
        "map": lambda cb: one.map(abs, [-1, -2], on_event=cb),
        "list_envs": lambda cb: one.list_envs(on_event=cb),
        "prune_envs": lambda cb: one.prune_envs("3650d", on_event=cb),
    }
    for name, call in calls.items():
        seen = []
        results = call(lambda host, event, info: seen.append((host, event)))
        assert all(r.ok for r in results), (name, results)
        assert ("node02", "connecting") in seen and ("node02", "connected") in seen, (name, seen)


BAD = [
    ("map", {"chunksize": -1}, ConfigError), ("map", {"chunksize": 0}, ConfigError),
    ("map", {"chunksize": 2.5}, TypeError), ("map", {"chunksize": True}, TypeError),
    ("map", {"retries": -1}, ConfigError), ("map", {"timeout": -1}, ConfigError),
    ("gather", {"timeout": 0}, ConfigError), ("gather", {"timeout": -1}, ConfigError),
    ("gather", {"timeout": math.nan}, ConfigError), ("gather", {"timeout": math.inf}, ConfigError),
    ("gather", {"timeout": "5"}, TypeError), ("gather", {"timeout": True}, TypeError),
]


def test_bad_arguments_raise_before_anything_is_contacted(inv, caplog):
    one = inv.select("node03")
    seen = []
    for verb, kwargs, error in BAD:
        with pytest.raises(error, match=next(iter(kwargs))):
            if verb == "map":
                one.map(abs, [1, 2], on_event=lambda *a: seen.append(a), **kwargs)
            else:
                one.gather(abs, 1, on_event=lambda *a: seen.append(a), **kwargs)
    assert seen == []  # no host was contacted

    async def go():
        async with one.connect() as cluster:
            for call in (lambda: cluster.submit(abs, 1, timeout="5"), lambda: cluster.submit(abs, 1, timeout=0),
                         lambda: cluster.ping(rounds=0), lambda: cluster.ping(timeout=-2)):
                with pytest.raises((TypeError, ConfigError)):
                    await call()
            return await cluster.submit(abs, -4, timeout=5)  # still usable

    assert asyncio.run(go()).value == 4
    with pytest.raises(ConfigError):
        one.connect(connect_concurrency=0)
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert [ok.value for ok in one.map(abs, [-1, -2], chunksize=1, timeout=10)] == [1, 2]


def test_a_closed_cluster_raises_cluster_closed_and_its_hosts_say_unusable(inv):
    assert issubclass(ClusterClosed, SshjobsError) and issubclass(ClusterClosed, RuntimeError)
    assert sshjobs.ClusterClosed is ClusterClosed and "ClusterClosed" in sshjobs.errors.__doc__
    two = inv.select("node04,node05")
    cluster = two.connect()

    async def use_then_close():
        async with cluster:
            assert [h.usable for h in cluster.hosts] == [True, True]
            await cluster.gather(abs, -1)
        assert [h.usable for h in cluster.hosts] == [False, False]
        calls = [lambda: cluster.gather(abs, 1), lambda: cluster.map(abs, [1]), lambda: cluster.ping(),
                 lambda: cluster.submit(abs, 1), lambda: cluster.list_envs(), lambda: cluster.install(["six"]),
                 lambda: cluster.__aenter__()]
        for call in calls:
            with pytest.raises(ClusterClosed, match="this Cluster is closed"):
                await call()

    asyncio.run(use_then_close())

    async def later():
        return await cluster.gather(abs, 1)

    with pytest.raises(ClusterClosed, match="this Cluster is closed"):
        asyncio.run(asyncio.wait_for(later(), 20))


REUSED = textwrap.dedent('''
    import asyncio, sys
    from sshjobs import ClusterClosed, Inventory

    cluster = Inventory.load(sys.argv[1]).select(sys.argv[2]).connect()

    async def first():
        await cluster.start()  # and never closed: its loop ends under it
        return (await cluster.gather(abs, -1))[0].value

    async def second():
        return await asyncio.wait_for(cluster.gather(abs, -2), 20)

    print(asyncio.run(first()), [h.usable for h in cluster.hosts])
    try:
        asyncio.run(second())
    except ClusterClosed as exc:
        print("ClusterClosed:", exc)
''')


def test_a_cluster_reused_in_a_second_asyncio_run_raises_instead_of_hanging(lab):
    # In a process of its own: the first loop ends with the connections open, as a user's would.
    p = subprocess.run([sys.executable, "-c", REUSED, str(lab.inventory_path), "node07"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.splitlines()
    assert first == "1 [False]"
    assert second.startswith("ClusterClosed: this Cluster started on another event loop, which has ended")
