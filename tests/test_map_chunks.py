"""Many items in one chunk: each keeps its own value, error and output."""

from __future__ import annotations

import threading


def test_one_chunk_of_mixed_items_keeps_each_items_outcome(inv):
    def job(x):
        if x == 2:
            return threading.Lock()  # cannot be pickled
        if x == 4:
            raise KeyError(x)
        if x == 6:
            print("six")
        return lambda: x  # needs cloudpickle on the host

    results = inv.map(job, range(8), chunksize=8)
    assert [r.job for r in results] == list(range(8))
    assert len({r.host for r in results}) == 1  # one chunk, one worker
    for i, r in enumerate(results):
        if i == 2:
            assert not r.ok and r.error.type == "UnpicklableResult"
        elif i == 4:
            assert not r.ok and r.error.type == "KeyError"
        else:
            assert r.ok and r.value() == i
        assert r.stdout == ("six\n" if i == 6 else "")


def test_a_chunk_of_plain_values_comes_back_whole_and_in_order(inv):
    results = inv.map(lambda x: (x, str(x), [x] * 2), range(5000), chunksize=1000)
    assert [r.value for r in results] == [(x, str(x), [x] * 2) for x in range(5000)]
    assert all(r.ok and r.duration >= 0 and r.stdout == "" for r in results)
