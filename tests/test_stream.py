"""imap against the lab: lazy input, ordered and unordered Results, early exit, progress."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest

from .conftest import quiet, user_processes, wait_no_processes


def counted(n=None):
    """A generator of 0, 1, ... and how far it has been read."""
    read = [0]

    def gen():
        for i in itertools.count() if n is None else range(n):
            read[0] = i + 1
            yield i

    return gen(), read


def test_imap_over_a_generator_yields_results_in_input_order(inv):
    items, read = counted(5000)
    out = [(r.job, r.value) for r in inv.imap(lambda x: x * 3, items)]
    assert out == [(i, i * 3) for i in range(5000)] and read[0] == 5000


def test_imap_reads_its_input_lazily_and_stops_at_a_break(inv):
    items, read = counted()  # endless: only a lazy reader gets through this
    taken = []
    for r in inv.imap(lambda x: x + 1, items):
        taken.append(r.value)
        if len(taken) == 1000:
            break
    assert taken == list(range(1, 1001))
    assert read[0] < 1_000_000  # a bounded look-ahead, not the whole input


def slow_first(seconds: float):
    """A job that returns its item, after ``seconds`` for item 0."""

    def job(x):
        import time

        if x == 0:
            time.sleep(seconds)
        return x

    return job


def test_unordered_imap_yields_results_as_they_complete(inv):
    started = time.monotonic()
    it = inv.imap(slow_first(2), iter(range(40)), ordered=False)
    first = next(it)
    assert first.value != 0 and time.monotonic() - started < 2
    rest = [r.value for r in it]
    assert sorted([first.value, *rest]) == list(range(40))


def test_ordered_imap_gives_the_first_result_only_once_it_is_done(inv):
    started = time.monotonic()
    it = inv.imap(slow_first(1), range(20))
    assert next(it).value == 0 and time.monotonic() - started >= 1
    assert [r.value for r in it] == list(range(1, 20))


def test_an_exception_of_the_input_is_raised_after_the_results_before_it(inv):
    def broken():
        yield from range(5)
        raise LookupError("the input broke")

    got = []
    with pytest.raises(LookupError, match="the input broke"):
        for r in inv.imap(lambda x: x, broken()):
            got.append(r.value)
    assert got == [0, 1, 2, 3, 4]
    assert wait_no_processes([h.user for h in inv.hosts], timeout=10) == {}  # the Cluster closed all the same


def test_breaking_out_of_imap_kills_the_running_jobs_and_leaves_no_process(inv):
    users = [h.user for h in inv.hosts]
    quiet(users)
    it = inv.imap(lambda x: __import__("time").sleep(0 if x == 0 else 60) or x, range(30), chunksize=1)
    started = time.monotonic()
    assert next(it).value == 0
    it.close()
    assert time.monotonic() - started < 20
    assert wait_no_processes(users, timeout=10) == {}


def test_an_async_imap_closed_early_frees_the_workers_for_the_next_call(inv, shared):
    def slow(x, where=str(shared)):
        import time

        if x:
            time.sleep(3)
        open(f"{where}/{x}", "w").close()  # item 0 at once; the others only if they were not killed
        return x

    async def main():
        async with inv.connect() as cluster:
            async with contextlib.aclosing(cluster.imap(slow, range(20), chunksize=1)) as it:
                async for r in it:
                    assert r.value == 0
                    break
            started = time.monotonic()
            results = await cluster.gather(lambda: "free")
            return results, time.monotonic() - started

    results, took = asyncio.run(main())
    assert [r.value for r in results] == ["free"] * 10 and took < 3
    time.sleep(4)  # past the killed jobs' sleep: none of them wrote its mark
    assert [p.name for p in shared.iterdir()] == ["0"]


def test_imap_checks_its_arguments_when_called(inv):
    with pytest.raises(ValueError, match="chunksize"):
        inv.imap(abs, range(3), chunksize=0)
    with pytest.raises(ValueError, match="timeout"):
        inv.imap(abs, range(3), timeout=-1)


def test_map_takes_a_generator_and_gives_every_result(inv):
    results = inv.map(lambda x: -x, (i for i in range(3000)))
    assert [r.value for r in results] == [-i for i in range(3000)]
    assert [r.job for r in results] == list(range(3000))


def test_progress_draws_a_bar_of_done_and_failed(inv, capfd):
    def odd_fails(x):
        if x % 2:
            raise ValueError(x)
        return x

    results = inv.map(odd_fails, range(10), progress=True)
    assert sum(r.ok for r in results) == 5
    err = capfd.readouterr().err
    assert "map" in err and "10/10" in err and "5 failed" in err
    inv.gather(lambda: 1, progress=True)
    err = capfd.readouterr().err
    assert "gather" in err and "10/10" in err


def test_imap_of_no_items_contacts_no_host(lab, inv):
    quiet([h.user for h in inv.hosts])
    assert list(inv.imap(abs, iter([]))) == []
    assert all(not [p for p in user_processes(h.user) if "sshd:" in p] for h in inv.hosts)
