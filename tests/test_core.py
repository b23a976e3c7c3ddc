"""The core against a 10-host lab of real sshd servers: gather, map, closures, failures."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from sshjobs import Inventory, RemoteError
from sshjobs.inventory import Host
from sshjobs.lab import Lab

from .conftest import sshd_sessions, user_processes, wait_no_processes


def whoami():
    import os
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name, os.path.expanduser("~"), os.getpid()


def test_gather_runs_once_per_host_as_each_hosts_user(inv, lab):
    results = inv.gather(whoami)
    assert [r.host for r in results] == [h.name for h in inv]
    assert all(r.ok for r in results), [r.error for r in results]
    users = [r.value[0] for r in results]
    homes = [r.value[1] for r in results]
    assert users == [h.user for h in lab.hosts]
    assert len(set(homes)) == 10
    assert all(r.attempts == 1 and r.duration >= 0 for r in results)


def test_map_1000_items_in_input_order(inv):
    def square(x):
        time.sleep(0.002)  # about 2 s of work for one host: the others join as they come up
        return x * x

    results = inv.map(square, range(1000))
    assert len(results) == 1000
    assert [r.value for r in results] == [x * x for x in range(1000)]
    assert [r.job for r in results] == list(range(1000))
    # load-balanced: hosts take items as they come up, so more than one took part
    assert len({r.host for r in results}) > 1





def test_closures_capture_locals(inv):
    offset = 1000
    table = {"a": 1, "b": 2}

    def add(x, scale=1):
        return (x + offset) * scale + table["b"]

    assert [r.unwrap() for r in inv.gather(add, 5, scale=3)] == [(5 + 1000) * 3 + 2] * 10
    assert [r.value for r in inv.map(add, [1, 2, 3])] == [1003, 1004, 1005]


def test_lambdas_and_keyword_arguments(inv):
    results = inv.gather(lambda a, b=0: a - b, 10, b=4)
    assert [r.value for r in results] == [6] * 10


def test_job_that_raises_returns_remote_traceback_and_others_are_fine(inv):
    def boom(names):
        import socket  # noqa: F401
        import pwd
        import os

        me = pwd.getpwuid(os.getuid()).pw_name
        if me == names[3]:
            raise ValueError(f"bad input on {me}")
        return me

    users = [h.user for h in inv]
    results = inv.gather(boom, users)
    bad = results[3]
    assert not bad.ok
    assert bad.error.type == "ValueError"
    assert bad.error.message == f"bad input on {users[3]}"
    assert "Traceback (most recent call last)" in bad.error.traceback
    assert "in boom" in bad.error.traceback and "raise ValueError" in bad.error.traceback
    with pytest.raises(RemoteError) as info:
        bad.unwrap()
    assert info.value.type == "ValueError"
    assert [r.value for i, r in enumerate(results) if i != 3] == [u for i, u in enumerate(users) if i != 3]


def test_unpicklable_return_value_is_a_clear_failure(inv):
    results = inv.map(lambda x: threading.Lock() if x == 1 else x, [0, 1, 2])
    assert results[0].value == 0 and results[2].value == 2
    assert not results[1].ok
    assert results[1].error.type == "UnpicklableResult"
    assert "lock" in results[1].error.message


def test_unpicklable_function_and_argument_are_caught_before_sending(inv):
    lock = threading.Lock()
    results = inv.gather(lambda: lock)
    assert all(not r.ok and r.error.type == "PicklingError" for r in results)
    assert "function" in results[0].error.message
    results = inv.gather(len, lock)
    assert all(not r.ok and r.error.type == "PicklingError" for r in results)
    assert "argument" in results[0].error.message


def test_ten_megabytes_printed_keeps_the_protocol_intact(inv):
    def noisy():
        import sys

        line = "x" * 99 + "\n"
        for _ in range(100_000):
            print(line, end="")
        sys.stderr.write("done\n")
        return 42

    async def go():
        async with inv.select("node01,node02").connect() as cluster:
            first = await cluster.gather(noisy)
            again = await cluster.gather(lambda: "still fine")
            return first, again

    first, again = asyncio.run(go())
    for r in first:
        assert r.ok and r.value == 42
        assert len(r.stdout) == 10_000_000
        assert r.stdout == ("x" * 99 + "\n") * 100_000
        assert r.stderr == "done\n"
    assert [r.value for r in again] == ["still fine"] * 2


def test_output_from_c_level_writes_does_not_corrupt_frames(inv):
    def raw():
        import os
        import subprocess

        os.write(1, b"\x00\x00garbage on fd 1\n")
        subprocess.run(["echo", "child output"])
        print("captured")
        return "ok"

    results = inv.select("node01").gather(raw)
    assert results[0].value == "ok"
    assert results[0].stdout == "\x00\x00garbage on fd 1\nchild output\ncaptured\n"  # the job's, in order


@pytest.fixture
def silent_server():
    """A TCP listener that never speaks SSH: connects to it hang until the timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_unreachable_host_fails_within_connect_timeout_and_others_arrive(inv, silent_server):
    dead = Host("blackhole", address="127.0.0.1", port=silent_server, connect_timeout=2,
                user="nobody", known_hosts=inv.hosts[0].known_hosts)
    mixed = Inventory([*inv.hosts[:5], dead, *inv.hosts[5:9]])
    t0 = time.monotonic()
    Inventory(inv.hosts[:9]).gather(lambda: "up")
    alone = time.monotonic() - t0  # what the nine cost on this machine now
    t0 = time.monotonic()
    results = mixed.gather(lambda: "up")
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 1 + 2 * alone, (elapsed, alone)  # the timeout, not more
    assert [r.host for r in results] == [h.name for h in mixed]
    assert not results[5].ok
    assert results[5].error.type == "ConnectTimeout"
    assert "2s" in results[5].error.message
    assert [r.value for i, r in enumerate(results) if i != 5] == ["up"] * 9


def test_one_shot_map_does_not_wait_for_a_silent_host(inv, silent_server):
    # The others finish every item while one host's connect hangs (30 s timeout): a one-shot
    # map returns without it, where `async with` would have waited for its timeout.
    dead = Host("blackhole", address="127.0.0.1", port=silent_server, connect_timeout=30,
                user="nobody", known_hosts=inv.hosts[0].known_hosts)
    t0 = time.monotonic()
    results = Inventory([dead, *inv.hosts[:2]]).map(lambda x: x + 1, range(20))
    elapsed = time.monotonic() - t0
    assert [r.value for r in results] == list(range(1, 21))
    assert {r.host for r in results} <= {inv.hosts[0].name, inv.hosts[1].name}
    assert elapsed < 15, elapsed  # half the connect timeout: it was not waited for


def test_refused_connection_is_reported_per_host(inv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = Host("gone", address="127.0.0.1", port=port, user="nobody", known_hosts=inv.hosts[0].known_hosts)
    results = Inventory([inv.hosts[0], dead]).gather(lambda: 1)
    assert results[0].value == 1
    assert results[1].error.type == "ConnectionRefused"


def test_wrong_host_key_is_refused(inv, lab, tmp_path):
    lines = lab.known_hosts.read_text().splitlines()
    # node02's line carries node01's key
    wrong = lines[1].split()[0] + " " + " ".join(lines[0].split()[1:])
    bad = tmp_path / "known_hosts"
    bad.write_text("\n".join([lines[0], wrong, *lines[2:]]) + "\n")
    hosts = [inv.hosts[0], Host(**{**inv.hosts[1].__dict__, "known_hosts": str(bad)})]
    results = Inventory(hosts).gather(lambda: "ran")
    assert results[0].value == "ran"
    assert not results[1].ok
    assert results[1].error.type == "HostKeyError"
    assert "host key" in results[1].error.message


def test_workers_leave_no_process_behind(inv, lab):
    async def go():
        async with inv.connect() as cluster:
            pids = [r.value for r in await cluster.gather(os.getpid)]
            # a job that leaves a child behind on purpose
            await cluster.gather(lambda: __import__("subprocess").Popen(["sleep", "300"]).pid)
            return pids

    pids = asyncio.run(go())
    assert len(set(pids)) == 10
    left = wait_no_processes([h.user for h in lab.hosts])
    assert left == {}


def test_async_cluster_keeps_workers_across_calls(inv):
    async def go():
        async with inv.connect() as cluster:
            a = await cluster.gather(os.getpid)
            b = await cluster.gather(os.getpid)
            one = await cluster.submit(lambda x: x + 1, 41)
            many = await asyncio.gather(*(cluster.submit(pow, i, 2) for i in range(200)))
            m = await cluster.map(str, range(50))
            return a, b, one, many, m

    a, b, one, many, m = asyncio.run(go())
    assert [r.value for r in a] == [r.value for r in b]  # same worker processes
    assert one.ok and one.value == 42
    assert [r.value for r in many] == [i * i for i in range(200)]
    assert [r.value for r in m] == [str(i) for i in range(50)]


def test_sync_api_works_inside_a_running_event_loop(inv):
    async def notebook_cell():
        return inv.select("node01").gather(lambda: "from a loop")

    assert asyncio.run(notebook_cell())[0].value == "from a loop"


def test_job_exit_and_keyboardinterrupt_are_failures_not_crashes(inv):
    def quit_(x):
        import sys

        if x == 0:
            sys.exit(3)
        if x == 1:
            raise KeyboardInterrupt
        return x

    results = inv.map(quit_, [0, 1, 2], chunksize=1)
    assert results[0].error.type == "SystemExit" and results[0].error.message == "3"
    assert results[1].error.type == "KeyboardInterrupt"
    assert results[2].value == 2


def test_more_slots_than_max_sessions_opens_more_connections(lab):
    inv = Inventory.load(lab.inventory_path).select("node01")
    inv = Inventory([Host(**{**inv.hosts[0].__dict__, "slots": 12})])

    async def go():
        async with inv.connect() as cluster:
            # jobs long enough that the queue keeps every slot's worker busy until all 12 run
            results = await cluster.map(lambda x: (__import__("time").sleep(0.1), __import__("os").getpid())[1],
                                        range(200), chunksize=1)
            user = lab.hosts[0].user
            return results, await asyncio.to_thread(sshd_sessions, user), await asyncio.to_thread(user_processes, user)

    results, sessions, processes = asyncio.run(go())
    assert all(r.ok for r in results)
    assert len([p for p in processes if " -c " in p]) == 12  # 12 workers
    assert len(sessions) == 2  # 10 + 2 channels: sshd's MaxSessions 10 is never exceeded


def test_one_executor_thread_only_when_no_host_needs_a_lookup():
    # asyncssh builds connection options in the loop's default executor; with IP
    # addresses one thread does, but host names keep the default pool: their lookups block.
    from sshjobs.api import use_lean_executor

    async def threads_for(addresses):
        use_lean_executor(Inventory.from_hosts([{"name": f"h{i}", "address": a} for i, a in enumerate(addresses)]))
        loop = asyncio.get_running_loop()
        names = await asyncio.gather(*(loop.run_in_executor(None, lambda: (time.sleep(0.05), threading.current_thread().name)[1])
                                       for _ in range(4)))
        return len(set(names))

    assert asyncio.run(threads_for(["127.0.0.1", "::1"])) == 1
    assert asyncio.run(threads_for(["127.0.0.1", "db.example"])) > 1


def test_blas_threads_are_the_hosts_cores_shared_by_its_slots(tmp_path, root):
    """A host whose sshd sets no BLAS variables (the lab's do): each worker gets
    cores // slots threads, slots = "auto" is one worker per core, an inventory env wins."""
    from .conftest import LAB_SUBNET

    lab = Lab(1, tmp_path / "lab", subnet=LAB_SUBNET, prefix=f"sshjobs-t{LAB_SUBNET}b-", offset=230,
              sshd_options={"SetEnv": "SSHJOBS_TEST=1"}).up()
    try:
        host = Inventory.load(lab.inventory_path).hosts[0]
        cores = os.cpu_count()

        def seen(h):
            def threads(_):
                import os
                return os.getpid(), os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("OMP_NUM_THREADS")
            return Inventory([h]).map(threads, range(40), chunksize=1)

        one = seen(replace(host, slots=1))
        assert {r.value[1:] for r in one} == {(str(cores), str(cores))}
        auto = seen(replace(host, slots="auto"))
        assert {r.value[1:] for r in auto} == {("1", "1")}
        assert len({r.value[0] for r in auto}) <= cores
        told = seen(replace(host, slots=2, env=(("OPENBLAS_NUM_THREADS", "3"),)))
        assert {r.value[1:] for r in told} == {("3", str(max(1, cores // 2)))}
    finally:
        lab.down()
