"""A Cluster used without `async with`: the first submits wait for the start in flight."""

from __future__ import annotations

import asyncio


def test_submits_made_before_the_cluster_started_run(inv):
    async def go():
        cluster = inv.connect()  # not entered: nothing connected yet
        try:
            futures = [cluster.submit(lambda x: x + 1, i) for i in range(20)]
            return await asyncio.gather(*futures)
        finally:
            await cluster.close()

    results = asyncio.run(go())
    assert all(r.ok for r in results), next(r for r in results if not r.ok)
    assert [r.value for r in results] == list(range(1, 21))
