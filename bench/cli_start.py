"""The command's own start, as whole processes (median of ``--runs``, both sides in each run).

    python -m bench.cli_start [--runs 5] [--subnet N]

``sshjobs --version`` beside ``python -c pass`` (the same interpreter: the floor); and
``sshjobs run tiny.py:tiny`` on 10 lab hosts beside 10 OpenSSH ``ssh`` processes started
in parallel by a shell loop, each running a tiny ``python3 -c`` (NOTES.md: ~0.55 s).
Wall seconds, and the CPU seconds of the process and its children.  Prints one JSON line.
The commands run with bytecode caching on (PYTHONDONTWRITEBYTECODE removed), as an installed
sshjobs has its .pyc files: run 0 writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SSHJOBS = Path(sys.executable).parent / "sshjobs"


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str] | str, **kw) -> tuple[float, float]:
    """Wall and CPU (user + sys of the children) seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, shell=isinstance(cmd, str), env=ENV, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ssh_args(inventory: Path) -> list[list[str]]:
    """For each host of a lab inventory, the OpenSSH ``ssh`` options and destination that
    reach it as sshjobs does (its key, its known_hosts, its port, its user)."""
    doc = tomllib.loads(inventory.read_text())
    d = doc.get("defaults", {})
    base = inventory.parent
    return [["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={base / h.get('known_hosts', d['known_hosts'])}",
             "-i", str(base / h.get("identity", d["identity"])), "-p", str(h.get("port", 22)),
             f"{h.get('user', d.get('user'))}@{h['address']}"] for h in doc["hosts"].values()]


def ssh_loop(inventory: Path) -> str:
    """A shell loop: one `ssh host python3 -c ...` per host, in parallel, then wait."""
    cmds = [" ".join(map(shlex.quote, ["ssh", "-q", *args, "python3 -c 'print(2)'"])) + " &"
            for args in ssh_args(inventory)]
    return "\n".join(cmds) + "\nwait\n"


def median_pairs(pairs: list[tuple[float, float]]) -> dict:
    return {"wall": statistics.median(p[0] for p in pairs), "cpu": statistics.median(p[1] for p in pairs),
            "walls": [round(p[0], 4) for p in pairs]}


def measure(inventory: Path, runs: int, workdir: Path) -> dict:
    tiny = workdir / "tiny.py"
    tiny.write_text("def tiny():\n    return 2\n")
    loop = ssh_loop(inventory)
    version, floor, run10, ssh10 = [], [], [], []
    for i in range(runs + 1):  # run 0 warms the page cache and the hosts' workdirs
        v = timed([str(SSHJOBS), "--version"])
        f = timed([sys.executable, "-c", "pass"])
        r = timed([str(SSHJOBS), "run", "-i", str(inventory), f"{tiny}:tiny"])
        s = timed(loop, executable="/bin/sh")
        if i:
            version.append(v)
            floor.append(f)
            run10.append(r)
            ssh10.append(s)
    out = {"version": median_pairs(version), "python_pass": median_pairs(floor),
           "run_10_hosts": median_pairs(run10), "ssh_10_parallel": median_pairs(ssh10)}
    out["run_ratio"] = out["run_10_hosts"]["wall"] / out["ssh_10_parallel"]["wall"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cli_start", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "9")))
    ap.add_argument("--inventory", help="an existing 10-host inventory instead of a lab of our own")
    args = ap.parse_args(argv)
    from sshjobs.lab import Lab

    bench_dir = ROOT / ".bench"
    lab = None
    if args.inventory:
        inventory = Path(args.inventory).resolve()
    else:
        lab = Lab(10, bench_dir / f"start{args.subnet}", subnet=args.subnet, prefix=f"sshjobs-s{args.subnet}-")
        lab.up(timeout=60)
        inventory = lab.inventory_path
    try:
        out = measure(inventory, args.runs, inventory.parent)
    finally:
        if lab is not None:
            lab.down()
    out["load_1min"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
