"""First contact vs a later one: a cold no-op gather on 100 hosts, in a new process each.

    python -m bench.contact [--runs 5] [--hosts 100] [--subnet N] [--compare DIR]

Each run gives every host a workdir it has never seen (``workdir`` set in the inventory
to a fresh folder: its sshjobs caches empty, no cloudpickle, no compiled code), then runs
``bench.cold sshjobs noop`` there (first contact), again on the same workdirs (a later
contact), and the raw asyncssh ``python3 -c`` per host (``bench.cold baseline noop``)
beside them.  ``--compare DIR``: the same first and later contact with another checkout's
code and venv (``DIR/.venv/bin/python -m bench.cold``), in the same runs.  Prints one JSON
line; ratios are to the baseline's median, of the wall times (``ratio``) and of the CPU
seconds the whole machine spent during the runs (``cpu_ratio``: on a shared machine the
steadier of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cold(python: str, root: Path, tool: str, inventory: Path, hosts: int) -> tuple[float, float]:
    """Seconds of one run, and the machine's CPU seconds meanwhile (steadier on a loaded machine)."""
    out = subprocess.run([python, "-m", "bench.cold", tool, "noop", str(inventory), str(hosts)], cwd=root,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{root}: cold {tool} failed: {out.stderr.strip()[-2000:]}")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    return run["seconds"], run["machine_cpu"]


def with_workdir(inventory: Path, workdir: str) -> Path:
    path = inventory.with_name(f"contact-{inventory.name}")
    text = inventory.read_text()
    assert 'workdir = "~/.cache/sshjobs"\n' in text  # the lab names each host's workdir
    path.write_text(text.replace('workdir = "~/.cache/sshjobs"\n', f'workdir = "{workdir}"\n'))
    return path


def remove_workdirs(inventory: Path, pattern: str) -> None:
    from sshjobs import Inventory

    def rm(pattern):
        import glob
        import os
        import shutil

        for d in glob.glob(os.path.expanduser(pattern)):
            shutil.rmtree(d, ignore_errors=True)

    Inventory.load(inventory).gather(rm, pattern)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.contact", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "9")))
    ap.add_argument("--compare", help="another checkout (its .venv) measured beside this one")
    args = ap.parse_args(argv)
    from sshjobs.lab import Lab

    sides = {"ours": (sys.executable, ROOT)}
    if args.compare:
        other = Path(args.compare).resolve()
        sides["compare"] = (str(other / ".venv" / "bin" / "python"), other)
    lab = Lab(args.hosts, ROOT / ".bench" / f"contact{args.subnet}", subnet=args.subnet,
              prefix=f"sshjobs-c{args.subnet}-")
    lab.up(timeout=120)
    data: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # the machine's CPU seconds during each run
    tag = uuid.uuid4().hex[:8]
    try:
        for i in range(args.runs + 1):  # run 0 warms the page cache and the hosts' pythons
            for side, (python, root) in sides.items():
                inv = with_workdir(lab.inventory_path, f"~/.cache/sshjobs-contact-{tag}-{side}-{i}")
                first, first_cpu = cold(python, root, "sshjobs", inv, args.hosts)
                later, later_cpu = cold(python, root, "sshjobs", inv, args.hosts)
                if i:
                    data.setdefault(f"{side}_first", []).append(first)
                    data.setdefault(f"{side}_later", []).append(later)
                    cpu.setdefault(f"{side}_first", []).append(first_cpu)
                    cpu.setdefault(f"{side}_later", []).append(later_cpu)
            base, base_cpu = cold(sys.executable, ROOT, "baseline", lab.inventory_path, args.hosts)
            if i:
                data.setdefault("baseline", []).append(base)
                cpu.setdefault("baseline", []).append(base_cpu)
            print(f"contact: run {i}/{args.runs}: {first:.3f} s first, {later:.3f} s later, {base:.3f} s raw",
                  file=sys.stderr)
        remove_workdirs(lab.inventory_path, f"~/.cache/sshjobs-contact-{tag}-*")
    finally:
        lab.down()
    medians = {k: statistics.median(v) for k, v in data.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"hosts": args.hosts, "runs": data, "median": medians,
           "ratio": {k: v / medians["baseline"] for k, v in medians.items() if k != "baseline"},
           "machine_cpu": cpu_medians, "cpu_runs": cpu,
           "cpu_ratio": {k: v / cpu_medians["baseline"] for k, v in cpu_medians.items() if k != "baseline"},
           "load_1min": os.getloadavg()[0]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
