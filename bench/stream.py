"""Streaming and journal figures on a 10-host lab of its own (median of ``--runs``).

    python -m bench.stream [--runs 5] [--subnet N] [--items 10000000]

- ``inv.imap`` over a generator of ``--items`` ints (a new lambda each run): the
  controller's peak RSS above its RSS just before the call (VmHWM, reset with
  /proc/self/clear_refs), and items/s;
- ``inv.map`` over ``range(1_000_000)`` with ``journal=`` (a new file each run) beside the
  same map without one, in the same run: items/s, and the journal's bytes per item.

The user's path: the sync API, one-shot calls (connect, run, close), timed from the call to
its return.  Prints a table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def imap_run(inv, items: int) -> dict:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    offset = time.time_ns() % 7  # a new lambda per run: nothing cached from the last one
    t0 = time.perf_counter()
    n = total = 0
    for r in inv.imap(lambda x: x + offset, (i for i in range(items))):
        n += 1
        total += r.value
    seconds = time.perf_counter() - t0
    if n != items or total != items * (items - 1) // 2 + offset * items:
        raise RuntimeError("imap results differ from the reference")
    return {"seconds": seconds, "rate": items / seconds, "peak_over_mb": (_kib("VmHWM") - before) / 1024}


def map_run(inv, items: int, journal: Path | None) -> dict:
    offset = time.time_ns() % 7
    t0 = time.perf_counter()
    results = inv.map(lambda x: x + offset, range(items), journal=journal)
    seconds = time.perf_counter() - t0
    if len(results) != items or any(r.value != i + offset for i, r in enumerate(results)):
        raise RuntimeError("map results differ from the reference")
    out = {"seconds": seconds, "rate": items / seconds}
    if journal is not None:
        import sqlite3

        db = sqlite3.connect(journal)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        out["bytes_per_item"] = journal.stat().st_size / items
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "9")))
    ap.add_argument("--items", type=int, default=10_000_000, help="imap's generator length")
    args = ap.parse_args(argv)

    from sshjobs import Inventory
    from sshjobs.lab import Lab

    lab = Lab(10, ROOT / ".bench" / f"stream{args.subnet}", subnet=args.subnet, prefix=f"sshjobs-m{args.subnet}-")
    runs: dict[str, list] = {"imap_rate": [], "imap_rss": [], "journal_rate": [], "plain_rate": [], "journal_bytes": []}
    work = Path(tempfile.mkdtemp(prefix="sshjobs-bench-stream-"))
    try:
        lab.up(timeout=60)
        inv = Inventory.load(lab.inventory_path)
        inv.gather(lambda: None)  # host keys, caches
        for i in range(args.runs + 1):  # run 0 warms up
            print(f"bench.stream: run {i}/{args.runs}", file=sys.stderr)
            im = imap_run(inv, args.items)
            plain = map_run(inv, 1_000_000, None)
            journaled = map_run(inv, 1_000_000, work / f"run{i}.db")
            if i:
                runs["imap_rate"].append(im["rate"])
                runs["imap_rss"].append(im["peak_over_mb"])
                runs["plain_rate"].append(plain["rate"])
                runs["journal_rate"].append(journaled["rate"])
                runs["journal_bytes"].append(journaled["bytes_per_item"])
    finally:
        lab.down()
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"imap over a generator of {args.items:,} ints: {med['imap_rate']:,.0f} items/s,"
          f" peak RSS +{med['imap_rss']:.1f} MB", file=sys.stderr)
    print(f"map of 1,000,000 ints with a journal: {med['journal_rate']:,.0f} items/s"
          f" (without: {med['plain_rate']:,.0f}), {med['journal_bytes']:.1f} bytes/item", file=sys.stderr)
    print(json.dumps({"items": args.items, "median": med, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
