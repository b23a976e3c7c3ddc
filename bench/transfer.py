"""Benchmark: files to a 10-host lab over SFTP (put, sync).

    python -m bench.transfer [--subnet 6] [--hosts 10] [--runs 5] [--mb 100] [--small 1000]

Figures, each the median of ``--runs`` timed runs (after one untimed warm-up) on a Cluster
connected before (connects are the other benchmarks' business), plus the one-shot
``inv.sync`` with its connect for comparison:

- put: one ``--mb`` MB file of random bytes to every host; aggregate MB/s = hosts x size /
  seconds (target >= 150 MB/s); the copies are removed between runs (untimed).
- re-sync: ``cluster.sync`` of an unchanged folder of ``--small`` 1 kB files (in 10
  subfolders) that every host already holds: every host hashes its copy, nothing is sent
  (target <= 0.5 s).

Needs root (the lab's users).  Prints one line per figure, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid

from sshjobs import Inventory
from sshjobs.lab import Lab

PUT_TARGET = 150.0  # MB/s, aggregate
RESYNC_TARGET = 0.5  # seconds


def make_files(root: str, mb: int, small: int) -> tuple[str, str]:
    big = os.path.join(root, "big.bin")
    with open(big, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    folder = os.path.join(root, "small")
    for i in range(small):
        sub = os.path.join(folder, f"d{i % 10}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:04d}.txt"), "wb") as f:
            f.write(os.urandom(1000))
    return big, folder


async def run(inv: Inventory, lab: Lab, tag: str, big: str, folder: str, runs: int) -> dict:
    size = os.path.getsize(big)
    hosts = len(inv.hosts)
    put_times, resync_times = [], []
    async with inv.connect() as cluster:
        for i in range(runs + 1):
            t = time.perf_counter()
            results = await cluster.put(big, f"{tag}/put")
            elapsed = time.perf_counter() - t
            assert all(r.ok and r.value["bytes"] == size for r in results), [r.error for r in results if not r.ok]
            if i:
                put_times.append(elapsed)
            for h in range(hosts):
                shutil.rmtree(lab.home(h) / tag / "put", ignore_errors=True)
        results = await cluster.sync(folder, f"{tag}/small")  # the first sync sends everything (untimed)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        for i in range(runs + 1):
            t = time.perf_counter()
            results = await cluster.sync(folder, f"{tag}/small")
            elapsed = time.perf_counter() - t
            assert all(r.ok and r.value["files"] == 0 and r.value["unchanged"] > 0 for r in results), results
            if i:
                resync_times.append(elapsed)
    oneshot = []
    for _ in range(3):
        t = time.perf_counter()
        results = inv.sync(folder, f"{tag}/small")
        oneshot.append(time.perf_counter() - t)
        assert all(r.ok and r.value["files"] == 0 for r in results)
    put_med = statistics.median(put_times)
    return {
        "put": {"seconds": put_med, "mb_per_s": hosts * size / 1e6 / put_med, "runs": put_times,
                "target_mb_per_s": PUT_TARGET, "met": hosts * size / 1e6 / put_med >= PUT_TARGET},
        "resync": {"seconds": statistics.median(resync_times), "runs": resync_times, "target_s": RESYNC_TARGET,
                   "met": statistics.median(resync_times) <= RESYNC_TARGET},
        "resync_oneshot": {"seconds": statistics.median(oneshot), "runs": oneshot},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "6")))
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--small", type=int, default=1000)
    args = ap.parse_args()
    tag = f"sshjobs-bench-{uuid.uuid4().hex[:8]}"
    local = tempfile.mkdtemp(prefix="sshjobs-bench-files-")
    big, folder = make_files(local, args.mb, args.small)
    lab = Lab(args.hosts, tempfile.mkdtemp(prefix="sshjobs-bench-"), subnet=args.subnet,
              prefix=f"sshjobs-t{args.subnet}-" if args.subnet != 1 else "sshjobs-lab").up()
    inv = Inventory.load(lab.inventory_path)
    load = os.getloadavg()[0]
    try:
        out = asyncio.run(run(inv, lab, tag, big, folder, args.runs))
    finally:
        lab.down()
        for i in range(len(lab.hosts)):
            shutil.rmtree(lab.home(i) / tag, ignore_errors=True)
        shutil.rmtree(lab.dir, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
    out.update(hosts=args.hosts, mb=args.mb, small=args.small, load_before=load, load_after=os.getloadavg()[0])
    put, resync, oneshot = out["put"], out["resync"], out["resync_oneshot"]
    print(f"{args.hosts} hosts, median of {args.runs} runs, load average {load:.1f}")
    print(f"  put {args.mb} MB to each host          {put['seconds']:7.3f} s  {put['mb_per_s']:7.0f} MB/s aggregate"
          f"  (target >= {PUT_TARGET:g}: {'met' if put['met'] else 'NOT met'})")
    print(f"  re-sync {args.small} unchanged files         {resync['seconds']:7.3f} s"
          f"  (target <= {RESYNC_TARGET:g} s: {'met' if resync['met'] else 'NOT met'})")
    print(f"  the same, one-shot inv.sync (connects) {oneshot['seconds']:7.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
