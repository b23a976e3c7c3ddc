"""Cluster(on_event=...): the progress events the CLI's live display is built on."""

from __future__ import annotations

import asyncio

from sshjobs import Cluster, Inventory


def run(coro):
    return asyncio.run(coro)


def test_each_host_goes_connecting_connected_running_done(inv):
    events = []

    async def go():
        async with Cluster(inv, on_event=lambda h, e, i: events.append((h, e, i))) as cluster:
            gathered = await cluster.gather(lambda x: x + 1, 1)
            mapped = await cluster.map(lambda x: x, range(40))
            return gathered, mapped

    gathered, mapped = run(go())
    assert all(r.ok for r in gathered + mapped)
    for h in inv:
        mine = [(e, i) for host, e, i in events if host == h.name]
        names = [e for e, _ in mine]
        assert names[:2] == ["connecting", "connected"], names
        connected = mine[1][1]
        assert connected["connect_time"] > 0 and connected["start_time"] > 0
        assert connected["python"].startswith("3.")
        # the gather's one job on this host
        assert names[2:4] == ["running", "done"]
        assert mine[3][1]["jobs"] == 1 and mine[3][1]["ok"] == 1 and mine[3][1]["error"] is None
        assert mine[3][1]["duration"] >= 0
    # map: what was sent ("running") is what came back ("done"), counted in items
    running = sum(i["jobs"] for _, e, i in events if e == "running")
    done = sum(i["jobs"] for _, e, i in events if e == "done")
    assert running == done == 10 + 40
    assert sum(i["ok"] for _, e, i in events if e == "done") == 50


def test_a_failed_job_and_an_unreachable_host_are_reported(lab):
    inv = Inventory.load(lab.inventory_path)
    ghost = Inventory.from_hosts([{"name": "ghost", "address": "127.0.0.1", "port": 1,
                                   "user": lab.hosts[0].user, "identity": str(lab.identity),
                                   "known_hosts": str(lab.known_hosts)}])
    both = Inventory(list(inv.select("node01")) + list(ghost))
    events = []

    def boom(_):
        raise KeyError("nope")

    async def go():
        async with Cluster(both, on_event=lambda h, e, i: events.append((h, e, i))) as cluster:
            return await cluster.gather(boom, 0)

    results = run(go())
    assert [r.ok for r in results] == [False, False]
    ghost_events = [(e, i) for h, e, i in events if h == "ghost"]
    assert [e for e, _ in ghost_events] == ["connecting", "failed"]
    assert ghost_events[1][1]["error"] == "ConnectionRefused"
    (done,) = [i for h, e, i in events if h == "node01" and e == "done"]
    assert done["failed"] == 1 and done["ok"] == 0 and done["error"].startswith("KeyError")


def test_a_callback_that_raises_does_not_break_the_jobs(inv):
    def bad(host, event, info):
        raise RuntimeError("display bug")

    async def go():
        async with Cluster(inv, on_event=bad) as cluster:
            return await cluster.gather(lambda: 7), await cluster.submit(lambda: 8)

    gathered, submitted = run(go())
    assert [r.value for r in gathered] == [7] * len(inv)
    assert submitted.value == 8


def test_submit_waits_for_new_workers_when_every_worker_was_replaced(inv):
    """After all workers were replaced (timeouts, or an install switching interpreters),
    submit starts new ones instead of failing with NoHosts."""

    async def go():
        async with Cluster(inv.select("node01,node02")) as cluster:
            for state in cluster.hosts:
                for worker in list(state.workers):
                    state.discard(worker)
            assert cluster.live_workers() == []
            results = await asyncio.gather(*(cluster.submit(lambda x: x * 3, i) for i in range(4)))
            await asyncio.sleep(0)  # the starts asked for settle (the jobs ran on whichever came first)
            for _ in range(200):
                if len(cluster.live_workers()) == 2:
                    break
                await asyncio.sleep(0.05)
            return results, {s.name for s in cluster.hosts if s.live_workers()}

    results, hosts_up = run(go())
    assert [r.value for r in results] == [0, 3, 6, 9], results
    assert hosts_up == {"node01", "node02"}  # both slots got a new worker


def test_ping_times_a_round_trip_per_host(inv):
    async def go():
        async with Cluster(inv) as cluster:
            return await cluster.ping(rounds=3)

    results = run(go())
    assert [r.host for r in results] == [h.name for h in inv]
    assert all(r.ok and 0 < r.value < 5 for r in results)
