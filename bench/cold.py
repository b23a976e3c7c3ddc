"""One cold run in a process of its own: connect, run one job per host, close.

``python -m bench.cold {sshjobs|sshjobs-req|sshjobs-connect|baseline} {eigen|noop} INVENTORY HOSTS``
(sshjobs: the one-shot ``inv.map``/``inv.gather``; sshjobs-req: the same with
``requirements=["numpy"]``, as a user on hosts with nothing but python3 calls it;
sshjobs-connect: ``async with inv.connect()``, which waits for every host before the
first job) prints one JSON
line: seconds from the first connect to the last result (after imports, before exit,
connections closed), the CPU seconds the whole machine was busy meanwhile (controller,
sshd and the hosts' processes, from /proc/stat), and the process's peak RSS (VmHWM).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time


def load(path: str, hosts: int):
    from sshjobs import Inventory

    inv = Inventory.load(path)
    return Inventory(inv.hosts[:hosts], source=inv.source)


def machine_cpu() -> float:
    """CPU seconds the whole machine (controller, sshd, the hosts' processes) has been busy:
    /proc/stat's first line less idle and iowait."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def run_oneshot(inv, job: str, requirements=None):
    from . import jobs

    t0 = time.perf_counter()
    if job == "eigen":
        results = inv.map(jobs.eigen, range(len(inv)), requirements=requirements)
    else:
        results = inv.gather(jobs.noop, requirements=requirements)
    return checked(time.perf_counter() - t0, results)


async def run_connect(inv, job: str):
    from . import jobs

    t0 = time.perf_counter()
    async with inv.connect() as cluster:
        if job == "eigen":
            results = await cluster.map(jobs.eigen, range(len(inv)))
        else:
            results = await cluster.gather(jobs.noop)
    return checked(time.perf_counter() - t0, results)


def checked(seconds, results):
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"sshjobs: {len(bad)} jobs failed: {bad[0].error}")
    return seconds, [r.value for r in results]


async def run_baseline(inv, job: str):
    from .baseline import Baseline

    python = inv.hosts[0].python
    t0 = time.perf_counter()
    b = await Baseline(inv.hosts, python).connect()
    try:
        values = await (b.fanout() if job == "eigen" else b.noop())
    finally:
        await b.close()
    return time.perf_counter() - t0, values


def main(argv: list[str]) -> None:
    tool, job, path, hosts = argv[0], argv[1], argv[2], int(argv[3])
    # Imports are not part of the figure, on either side: the baseline's asyncssh, and
    # what sshjobs' first call imports (its SSH layers and cloudpickle, loaded on first
    # use since `import sshjobs` stays light: ~80 ms of CPU that the figure held until
    # 2026-12-04).  The whole process, imports included, is `sshjobs run`'s figure.
    import asyncssh  # noqa: F401
    import sshjobs.api  # noqa: F401
    import sshjobs.cluster  # noqa: F401

    inv = load(path, hosts)
    cpu0 = machine_cpu()
    if tool in ("sshjobs", "sshjobs-req"):
        seconds, values = run_oneshot(inv, job, ["numpy"] if tool == "sshjobs-req" else None)
    else:
        seconds, values = asyncio.run((run_connect if tool == "sshjobs-connect" else run_baseline)(inv, job))
    cpu = machine_cpu() - cpu0  # the run's own, nearly: the process's start and end are outside
    print(json.dumps({"seconds": seconds, "machine_cpu": cpu, "rss_mb": peak_rss_mb(), "values": values}))


def peak_rss_mb() -> float:
    """This process's peak RSS.  Not getrusage's ru_maxrss: Linux carries that over from the
    parent across fork and exec, so it would report the bench runner's own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main(sys.argv[1:])
