"""Through a session (`sshjobs up`) and without, as whole processes, in the same runs.

    python -m bench.session [--runs 5] [--subnet N]

On a lab of 100 hosts of its own (the first 10 for the 10-host figures):
``sshjobs run tiny.py:tiny`` on 10 hosts, ``sshjobs exec -- true`` on 100 hosts, and a
script's ``Inventory.load(...).gather(f)`` on 10 hosts (interpreter start included), each
with ``--no-session`` (or ``session=False``: the direct run) and through a session that
``sshjobs up`` started for the inventory file.  Wall seconds, median of ``--runs``.
Prints one JSON line.  The processes start from .pyc files, as an installed sshjobs does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SSHJOBS = Path(sys.executable).parent / "sshjobs"
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "SSHJOBS_INVENTORY")}

SCRIPT = """
import sys
from sshjobs import Inventory
inv = Inventory.load(sys.argv[1], session=sys.argv[2] == "session")
results = inv.gather(lambda: 2)
assert all(r.ok for r in results) and len(results) == 10, results
"""


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure(inv10: Path, inv100: Path, runs: int, workdir: Path) -> dict:
    tiny = workdir / "tiny.py"
    tiny.write_text("def tiny():\n    return 2\n")
    script = workdir / "script.py"
    script.write_text(SCRIPT)
    cmds = {
        "run_10": lambda extra: [str(SSHJOBS), "run", "-i", str(inv10), f"{tiny}:tiny", *extra],
        "exec_100": lambda extra: [str(SSHJOBS), "exec", "-i", str(inv100), *extra, "--", "true"],
    }
    out: dict[str, dict[str, list[float]]] = {k: {"direct": [], "session": []} for k in (*cmds, "script_10")}
    for inv in (inv10, inv100):
        subprocess.run([str(SSHJOBS), "up", "-i", str(inv), "--idle", "10m"], check=True, env=ENV, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    try:
        for i in range(runs + 1):  # run 0 warms the page cache and the hosts' workdirs
            for key, cmd in cmds.items():
                d = wall(cmd(["--no-session"]))
                s = wall(cmd([]))
                if i:
                    out[key]["direct"].append(d)
                    out[key]["session"].append(s)
            d = wall([sys.executable, str(script), str(inv10), "direct"])
            s = wall([sys.executable, str(script), str(inv10), "session"])
            if i:
                out["script_10"]["direct"].append(d)
                out["script_10"]["session"].append(s)
    finally:
        for inv in (inv10, inv100):
            subprocess.run([str(SSHJOBS), "down", "-i", str(inv)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = {key: {"direct": median(v["direct"]), "session": median(v["session"]),
                     "ratio": median(v["session"]) / median(v["direct"])} for key, v in out.items()}
    return {"figures": summary, "runs": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "9")))
    args = ap.parse_args(argv)
    import compileall

    compileall.compile_dir(str(ROOT / "sshjobs"), quiet=1)
    from sshjobs.lab import Lab

    lab = Lab(100, ROOT / ".bench" / f"session{args.subnet}", subnet=args.subnet, prefix=f"sshjobs-u{args.subnet}-")
    lab.up(timeout=120)
    # a runtime folder of its own: the bench's sessions are apart from the user's
    runtime = tempfile.mkdtemp(prefix="sshjobs-bench-run-")
    ENV["XDG_RUNTIME_DIR"] = runtime
    try:
        inv100 = lab.inventory_path
        inv10 = inv100.with_name("ten.toml")
        from sshjobs.inventory import BaseInventory

        ten = BaseInventory.load(inv100).select([h.name for h in lab.hosts[:10]])
        inv10.write_text(ten.to_toml("the first 10 hosts of the session bench's lab"))
        out = measure(inv10, inv100, args.runs, inv100.parent)
    finally:
        lab.down()
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)
    out["load_1min"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
