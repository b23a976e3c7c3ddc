"""Submitting the same function again reuses its pickle only while that is still right."""

from __future__ import annotations

import asyncio

from sshjobs.scheduler import pickle_function

LIMIT = 10


def over_limit(x):
    return x > LIMIT


def test_the_same_function_is_pickled_once_while_nothing_it_captures_can_change():
    factor = 3

    def scale(x):
        return x * factor

    assert pickle_function(scale) is pickle_function(scale)
    items = [1]

    def grab(x):
        return items[0] + x

    assert pickle_function(grab) is not pickle_function(grab)  # a list can change in place


def test_changed_closure_cells_and_globals_reach_the_host(inv):
    global LIMIT
    counter = 0
    seen = []

    def add_counter(x):
        return x + counter

    def seen_so_far():
        return list(seen)

    async def go():
        nonlocal counter
        global LIMIT
        out = []
        async with inv.connect() as cluster:
            for step in range(3):
                out.append((await cluster.submit(add_counter, 100)).unwrap())
                out.append((await cluster.submit(seen_so_far)).unwrap())
                out.append((await cluster.submit(over_limit, 5)).unwrap())
                counter += 1  # a rebound cell
                seen.append(step)  # a mutated captured list
                LIMIT -= 3  # a rebound global
        return out

    try:
        out = asyncio.run(go())
    finally:
        LIMIT = 10
    assert out == [100, [], False, 101, [0], False, 102, [0, 1], True]
