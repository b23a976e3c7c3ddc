"""sshjobs.Executor against the lab: a concurrent.futures.Executor whose jobs run on the hosts."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

import sshjobs
from sshjobs import Executor, RemoteError

from .conftest import user_processes, wait_no_processes


def where(x):
    import socket

    return x, socket.gethostname()


def test_submit_and_map_return_values_in_order(inv):
    with Executor(inv) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
        factor = 3
        assert list(ex.map(lambda x: x * factor, range(50), timeout=60)) == [x * 3 for x in range(50)]
        assert ex.submit(lambda **kw: sorted(kw), b=1, a=2).result(timeout=60) == ["a", "b"]


def test_a_jobs_exception_is_raised_by_result_as_its_own_type(inv):
    def fail(x):
        raise KeyError(x)

    with Executor(inv) as ex:
        future = ex.submit(fail, "missing")
        with pytest.raises(KeyError) as info:
            future.result(timeout=60)
        assert isinstance(info.value, RemoteError) and "fail" in info.value.traceback
        assert isinstance(future.exception(), KeyError)


def test_map_timeout_raises_timeout_error(inv):
    with Executor(inv) as ex:
        results = ex.map(time.sleep, [30], timeout=0.5)
        started = time.monotonic()
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        assert time.monotonic() - started < 20
        ex.shutdown(cancel_futures=True)


def test_as_completed_and_wait_see_the_short_job_first(inv):
    with Executor(inv) as ex:
        slow = ex.submit(lambda: __import__("time").sleep(3) or "slow")
        fast = ex.submit(lambda: "fast")
        first = next(concurrent.futures.as_completed([slow, fast], timeout=60))
        assert first is fast and first.result() == "fast"
        done, pending = concurrent.futures.wait([slow, fast], timeout=60)
        assert done == {slow, fast} and not pending and slow.result() == "slow"


def test_submits_from_many_threads_at_once(inv):
    with Executor(inv) as ex:
        out: dict[int, list] = {}

        def client(k):
            out[k] = [f.result(timeout=60) for f in [ex.submit(where, k * 100 + i) for i in range(20)]]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    for k in range(4):
        assert [x for x, _ in out[k]] == [k * 100 + i for i in range(20)]
    assert len({host for k in out for _, host in out[k]}) >= 1


def test_shutdown_with_cancel_futures_ends_the_remote_jobs(inv, lab):
    ex = Executor(inv)
    futures = [ex.submit(lambda: __import__("time").sleep(306)) for _ in range(len(inv.hosts) + 5)]
    # every host's worker is up and running a job before the cancel
    deadline = time.monotonic() + 60
    users = [h.user for h in lab.hosts]
    while time.monotonic() < deadline:
        if all(any("python" in p for p in user_processes(u))
               for u in users):
            break
        time.sleep(0.1)
    started = time.monotonic()
    ex.shutdown(cancel_futures=True)
    assert time.monotonic() - started < 30
    assert all(f.cancelled() for f in futures)
    assert wait_no_processes(users, timeout=10) == {}
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 2)


def test_cancel_one_future_leaves_the_others(inv):
    with Executor(inv) as ex:
        long = ex.submit(lambda: __import__("time").sleep(306))
        time.sleep(0.5)
        assert long.cancel() and long.cancelled()
        assert concurrent.futures.wait([long], timeout=5).done == {long}
        assert ex.submit(lambda: "after").result(timeout=60) == "after"


def test_an_inventory_path_and_cluster_options(lab, tmp_path):
    path = lab.write_inventory(tmp_path / "inv.toml")
    seen = []
    with sshjobs.Executor(path, on_event=lambda host, event, info: seen.append(event)) as ex:
        assert ex.submit(lambda: 7).result(timeout=60) == 7
    assert "connected" in seen
    with pytest.raises(TypeError):
        Executor(path, no_such_option=1)


def test_an_executor_with_requirements_runs_its_jobs_in_that_environment(inv):
    def version():
        import humanize

        return humanize.intcomma(1234567)

    with Executor(inv.select("node05"), requirements=["humanize"]) as ex:
        assert [f.result(timeout=300) for f in [ex.submit(version) for _ in range(3)]] == ["1,234,567"] * 3


def test_shutdown_while_the_environment_installs_cancels_the_waiting_jobs(fresh_inv):
    ex = Executor(fresh_inv("node06"), requirements=["iniconfig"])
    futures = [ex.submit(lambda: __import__("iniconfig").__name__) for _ in range(3)]
    time.sleep(0.5)  # connected, installing into a workdir that has no environment yet
    started = time.monotonic()
    ex.shutdown(cancel_futures=True)
    assert time.monotonic() - started < 20
    assert all(f.cancelled() for f in futures)
