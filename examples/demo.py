"""The seed demo: install numpy on every host at run time, then one eigen job per host.

    python examples/demo.py                  # starts a 10-host lab, runs, stops the lab
    python examples/demo.py --keep-lab       # ... and leaves the lab running
    python examples/demo.py -i hosts.toml    # on your own hosts (or a lab from `make lab-up`)
    python examples/demo.py -i inventory/docker.toml   # on the 10 containers (`make docker-demo`)

`make demo` runs the first form. A lab already running in --dir (from `make lab-up`) is
used as it is and left running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eigen import eigen  # noqa: E402  (shipped by value: the hosts never see this file)

from sshjobs import Cluster, Inventory  # noqa: E402
from sshjobs.log import configure  # noqa: E402


async def demo(inv: Inventory, offline: bool | None) -> int:
    n = len(inv)
    offline_hosts = [h.name for h in inv if (h.offline if offline is None else offline)]
    if not offline_hosts:
        mode = "online (the hosts install from the package index)"
    elif len(offline_hosts) == n:
        mode = "offline (numpy's wheels are shipped from this machine)"
    else:
        mode = f"offline on {', '.join(offline_hosts)} (wheels shipped from this machine), online elsewhere"
    print(f"Install mode: {mode}")
    print(f"Waiting for {n} workers...", flush=True)
    # Workers import numpy as they start (preload), so the jobs' phase holds only the jobs.
    cluster = Cluster(inv, preload=["numpy"])
    try:
        # The install connects too: each host's first worker starts straight in numpy's
        # environment where an earlier run built it.
        installing = asyncio.ensure_future(cluster.install(["numpy"], offline=offline))
        await asyncio.gather(*(cluster.ready(s) for s in cluster.hosts))
        ready = [s for s in cluster.hosts if s.usable]
        print(f"  found {len(ready)} workers", flush=True)
        for s in cluster.hosts:
            if s.error:
                print(f"  ✗ {s.name}: {s.error}")
        if not ready:
            installing.cancel()
            return 1

        print(f"Installing numpy on {len(ready)} workers...", flush=True)
        installed = await installing
        for r in installed:
            if r.host in {s.name for s in ready}:
                print(f"  ✓ {r.host}" if r.ok else f"  ✗ {r.host}: {r.error}", flush=True)
        jobs = sum(1 for r in installed if r.ok)
        if not jobs:
            return 1
        await cluster.ensure_slots()  # every slot's worker, in numpy's environment

        print(f"Submitting {jobs} jobs in parallel...", flush=True)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(cluster.submit(eigen, job_id) for job_id in range(jobs)))
        elapsed = time.perf_counter() - t0
        for job_id, r in enumerate(results):
            if r.ok:
                print(f"  job-{job_id} → {r.host}   eigenvalues: {r.value['top_eigenvalues']}")
            else:
                print(f"  job-{job_id} → {r.host}   FAILED {r.error}")
        failed = sum(1 for r in results if not r.ok)
        if failed:
            print(f"{jobs - failed} of {jobs} jobs completed, {failed} failed, in {elapsed:.2f}s")
            return 1
        print(f"All {jobs} jobs completed in {elapsed:.2f}s")
        return 0 if len(ready) == n and all(r.ok for r in installed) else 1
    finally:
        await cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", help="run on these hosts instead of a local lab")
    parser.add_argument("--hosts", type=int, default=10, help="lab hosts (default 10)")
    parser.add_argument("--dir", default=".lab", help="the lab's folder (default .lab)")
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab running afterwards")
    parser.add_argument("--offline", action="store_true", default=None,
                        help="ship numpy's wheels from here (hosts without internet)")
    args = parser.parse_args()
    configure(logging.WARNING)

    lab = None
    if args.inventory:
        inv = Inventory.load(args.inventory)
    else:
        from sshjobs.lab import Lab

        running = Lab.running(args.dir)
        if running:
            print(f"Using the lab already running in {args.dir} ({len(running)} hosts)")
            inv = Inventory.load(Lab.recorded_inventory(args.dir))
        else:
            print(f"Starting a lab of {args.hosts} OpenSSH servers in {args.dir}...", flush=True)
            lab = Lab(args.hosts, args.dir).up()
            inv = Inventory.load(lab.inventory_path)
    try:
        return asyncio.run(demo(inv, args.offline))
    except KeyboardInterrupt:
        return 130
    finally:
        if lab is not None:
            if args.keep_lab:
                print(f"The lab keeps running: inventory {lab.inventory_path}; "
                      f"stop it with `make lab-down` or `sshjobs lab down --dir {args.dir}`")
            else:
                lab.down()
                print("Stopped the lab.")


if __name__ == "__main__":
    sys.exit(main())
