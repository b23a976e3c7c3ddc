"""Benchmark: installing environments on a 10-host lab (cold, uv already there, no-op).

    python -m bench.install [--subnet 3] [--hosts 10] [--requirements numpy]

Each run uses a fresh workdir on the hosts (no environment, no uv); the lab users' uv
caches (~/.cache/uv) are left as they are, so "cold" means a cold environment, with
packages downloaded only the first time on a machine.  Needs root (the lab's users).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import replace

from sshjobs import Inventory
from sshjobs.lab import Lab


async def run(inv: Inventory, reqs: list[str]) -> dict:
    out = {}
    async with inv.connect() as cluster:
        t = time.perf_counter()
        r = await cluster.install(reqs)
        out["cold (uv uploaded, env built)"] = time.perf_counter() - t
        assert all(x.ok for x in r), [x.error for x in r if not x.ok]
        t = time.perf_counter()
        r = await cluster.install(reqs + ["six"])
        out["new env, uv already there"] = time.perf_counter() - t
        assert all(x.ok and not x.value["cached"] for x in r)
        noops = []
        for _ in range(7):
            t = time.perf_counter()
            r = await cluster.install(reqs)
            noops.append(time.perf_counter() - t)
            assert all(x.value["cached"] for x in r)
        out["no-op (median of 7)"] = statistics.median(noops)
    sessions = []
    for _ in range(3):
        t = time.perf_counter()
        inv.install(reqs)
        sessions.append(time.perf_counter() - t)
    out["inv.install no-op incl. connect (median of 3)"] = statistics.median(sessions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "1")))
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--requirements", nargs="+", default=["numpy"])
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:8]
    lab = Lab(args.hosts, tempfile.mkdtemp(prefix="sshjobs-bench-"), subnet=args.subnet,
              prefix=f"sshjobs-t{args.subnet}-" if args.subnet != 1 else "sshjobs-lab").up()
    inv = Inventory([replace(h, workdir=f"~/.cache/sshjobs-bench-{tag}")
                     for h in Inventory.load(lab.inventory_path).hosts])
    try:
        results = asyncio.run(run(inv, args.requirements))
    finally:
        lab.down()
        for i in range(len(lab.hosts)):
            shutil.rmtree(lab.home(i) / f".cache/sshjobs-bench-{tag}", ignore_errors=True)
        shutil.rmtree(lab.dir, ignore_errors=True)
    print(f"{args.hosts} hosts, requirements {args.requirements}, load average {os.getloadavg()[0]:.1f}")
    for k, v in results.items():
        print(f"  {k:48s} {v * 1000:9.0f} ms")


if __name__ == "__main__":
    main()
