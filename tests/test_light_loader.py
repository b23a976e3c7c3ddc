"""Functions load on the host without importing cloudpickle; anything else still loads."""

from __future__ import annotations

import asyncio

SCALE = 3


class Point:  # a class from a module shipped by value: needs the real cloudpickle
    def __init__(self, x):
        self.x = x

    def norm(self):
        return abs(self.x) * SCALE


def test_closures_recursion_defaults_and_attributes_load_without_cloudpickle(inv):
    def fact(n):  # refers to itself through a closure cell
        return 1 if n <= 1 else n * fact(n - 1)

    def adder(k):
        def add(x, *, extra=0):
            return x + k + extra + SCALE

        return add

    def tagged(x):
        return tagged.tag + str(x)

    tagged.tag = "t"
    add5 = adder(5)

    def plain():
        import sys

        return "cloudpickle" in sys.modules

    async def go():
        async with inv.select("node01").connect() as cluster:
            before = (await cluster.submit(plain)).unwrap()
            values = [(await cluster.submit(f, *a, **kw)).unwrap()
                      for f, a, kw in [(fact, (6,), {}), (add5, (1,), {"extra": 10}), (tagged, (7,), {})]]
            after_functions = (await cluster.submit(plain)).unwrap()
            point = (await cluster.submit(lambda p: (p.norm(), type(p).__name__), Point(-4))).unwrap()
            after_class = (await cluster.submit(plain)).unwrap()
            return before, values, after_functions, point, after_class

    before, values, after_functions, point, after_class = asyncio.run(go())
    assert values == [720, 1 + 5 + 10 + 3, "t7"]
    assert point == (12, "Point")
    assert before is False and after_functions is False  # a worker's start skipped cloudpickle
    assert after_class is True  # a class needed it: imported on demand


def test_a_returned_function_is_pickled_by_cloudpickle_on_demand(inv):
    results = inv.select("node02").gather(lambda: (lambda y: y * 2))
    assert results[0].ok, results[0].error
    assert results[0].value(21) == 42


def test_a_first_contact_ships_no_cloudpickle_and_compiles_nothing_until_a_job_needs_it(inv):
    """A host whose workdir is empty: a plain function runs without cloudpickle's source
    being sent or written, and on the controller's Python (the same bytecode magic) without
    a compiled-code cache; the first job that needs cloudpickle gets it, once."""
    import dataclasses
    import uuid

    from sshjobs import Inventory

    workdir = f"~/.cache/sshjobs-first-{uuid.uuid4().hex[:8]}"
    one = Inventory([dataclasses.replace(inv.select("node03").hosts[0], workdir=workdir)], source=inv.source)

    def look():
        import os
        import sys

        wd = os.path.expanduser(workdir)
        return sorted(os.listdir(wd)), "cloudpickle" in sys.modules

    def clean():
        import os
        import shutil

        shutil.rmtree(os.path.expanduser(workdir))

    try:
        [first] = one.gather(look)
        assert first.unwrap() == ([], False)  # no lib/ (cloudpickle), no code/ (compiled cache)
        [point] = one.gather(lambda p: p.norm(), Point(-2))
        assert point.unwrap() == 2 * SCALE
        [after] = one.gather(look)
        assert after.unwrap() == (["lib"], False)  # shipped when needed, cached for the next worker
    finally:
        one.gather(clean)
