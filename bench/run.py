"""`make bench`: start a lab, measure every figure for sshjobs and the baseline, stop the lab.

    python -m bench [--runs 5] [--hosts 100] [--subnet N] [--json-out FILE]

Prints a table and then one JSON object (the last line of stdout).  Every figure is the
median of ``--runs`` runs, sshjobs and the baseline measured in the same run; the ratio
is sshjobs / baseline (for a time lower is better, for a rate higher is better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
VENV = BENCH_DIR / "venv"
BULK = 200 * 1000 * 1000
SUBMITS = 10_000
MAP_ITEMS = 1_000_000
BASELINE_TINY = 300  # the baseline runs ~150 jobs/s: fewer jobs give the same rate

# figure key -> (label, unit, higher is better, target test or None, target text)
FIGURES = {
    "cold_fanout": ("cold fan-out, 10 hosts (new process)", "s", False, lambda v, r: r is not None and r <= 0.85,
                    "<= 0.85x baseline"),
    "cold_fanout_connect": ("cold fan-out, 10 hosts, async with (new process)", "s", False,
                            lambda v, r: r is not None and r <= 0.85, "<= 0.85x baseline"),
    "cold_requirements": ("cold fan-out, 10 hosts, requirements=[\"numpy\"] on python3 (new process)", "s", False,
                          lambda v, r: r is not None and r <= 0.85, "<= 0.85x baseline"),
    "cold_cpu": ("cold fan-out, machine CPU during the run", "s", False, None, "- (what bounds the figure)"),
    "warm_fanout": ("warm fan-out, 10 hosts", "s", False, lambda v, r: v <= 0.08, "<= 0.08 s"),
    "warm_requirements": ("warm fan-out, 10 hosts, requirements=[\"numpy\"] on python3", "s", False,
                          lambda v, r: v <= 0.07, "<= 0.07 s"),
    "warm_execnet": ("warm fan-out, 10 hosts, requirements=[\"numpy\"] (baseline: execnet, gateways open,"
                     " a remote_exec per job)", "s", False, lambda v, r: r is not None and r <= 1.1, "<= 1.1x execnet"),
    "submit": ("tiny jobs, 10,000 submits", "jobs/s", True, lambda v, r: v >= 25_000, ">= 25,000 jobs/s"),
    "map": ("tiny jobs, map over 1,000,000 ints", "items/s", True, lambda v, r: v >= 500_000, ">= 500,000 items/s"),
    "bulk_up": ("bulk 200 MB echo, up", "MB/s", True, lambda v, r: v >= 200, ">= 200 MB/s"),
    "bulk_down": ("bulk 200 MB echo, down", "MB/s", True, lambda v, r: v >= 200, ">= 200 MB/s"),
    "scale": ("100 hosts, cold no-op gather (new process)", "s", False, lambda v, r: v <= 1.8, "<= 1.8 s"),
    "scale_cpu": ("100 hosts, machine CPU during the run", "s", False, None, "- (what bounds the figure)"),
    "scale_rss": ("100 hosts, controller peak RSS", "MB", False, lambda v, r: v <= 200, "<= 200 MB"),
    "install": ("install no-op, 10 hosts", "s", False, lambda v, r: v <= 0.3, "<= 0.3 s"),
    # bench.contact (its own 100-host lab): baseline = raw asyncssh `python3 -c pass` per host
    "first_contact": ("100 hosts, first contact (caches empty), no-op gather (new process)", "s", False,
                      lambda v, r: r is not None and r <= 1.2, "<= 1.2x baseline"),
    "later_contact": ("100 hosts, later contact, no-op gather (new process)", "s", False,
                      lambda v, r: r is not None and r <= 1.0, "<= 1.0x baseline"),
    "later_contact_cpu": ("100 hosts, later contact, machine CPU during the run", "s", False, None,
                          "- (what bounds the figure)"),
    # bench.stream (its own 10-host lab): the sync API's one-shot imap and map
    "imap_rate": ("imap over a generator of 10,000,000 ints (baseline: map over a list, 1 M)", "items/s", True,
                  lambda v, r: v >= 500_000, ">= 500,000 items/s"),
    "imap_rss": ("imap over 10 M ints, controller peak RSS above its value before", "MB", False,
                 lambda v, r: v <= 200, "<= 200 MB"),
    "journal_rate": ("map over 1,000,000 ints with a journal (baseline: without)", "items/s", True,
                     lambda v, r: v >= 200_000, ">= 200,000 items/s"),
    "journal_bytes": ("journal size per tiny item", "bytes", False, lambda v, r: v <= 100, "<= 100 bytes"),
    # bench.cli_start (its own 10-host lab), whole processes
    "version": ("`sshjobs --version` (baseline: python -c pass)", "s", False, lambda v, r: v <= 0.08, "<= 0.08 s"),
    "run_10": ("`sshjobs run` tiny job, 10 hosts (baseline: 10 parallel ssh)", "s", False,
               lambda v, r: r is not None and r <= 0.6, "<= 0.6x baseline"),
    # bench.session (its own 100-host lab), whole processes: through `sshjobs up`'s session, beside the direct run
    "session_run_10": ("`sshjobs run` tiny job, 10 hosts, through a session (baseline: --no-session)", "s", False,
                       lambda v, r: v <= 0.15, "<= 0.15 s"),
    "session_exec_100": ("`sshjobs exec -- true`, 100 hosts, through a session (baseline: --no-session)", "s",
                         False, lambda v, r: v <= 0.3, "<= 0.3 s"),
    "session_script_10": ("a script's inv.gather(f), 10 hosts, interpreter start included, through a session"
                          " (baseline: session=False)", "s", False, lambda v, r: v <= 0.2, "<= 0.2 s"),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def numpy_venv() -> Path:
    """One venv with the package index's numpy wheel, used by both sides on every host."""
    python = VENV / "bin" / "python"
    marker = VENV / ".bytecode"
    if python.exists() and marker.exists() and \
            subprocess.run([str(python), "-c", "import numpy"], capture_output=True).returncode == 0:
        return python
    uv = Path(sys.executable).parent / "uv"
    say(f"bench: creating {VENV} with numpy from the package index")
    BENCH_DIR.mkdir(exist_ok=True)
    subprocess.run([str(uv), "venv", "-q", "--allow-existing", "--python", "/usr/bin/python3", str(VENV)], check=True)
    # Compiled: uv does not write bytecode by default and the lab users cannot write
    # __pycache__ here, so otherwise every job would compile numpy's modules again (an
    # import 2x slower on both sides, and figures that depend on whether some earlier
    # import as root happened to leave .pyc files behind).  pip compiles by default.
    subprocess.run([str(uv), "pip", "install", "-q", "--compile-bytecode", "--reinstall", "--python", str(python),
                    "numpy"], check=True)
    for p in (BENCH_DIR, *VENV.rglob("*")):  # lab users read it
        p.chmod(p.stat().st_mode | (0o755 if p.is_dir() else 0o444))
    marker.touch()
    return python


class Runs:
    def __init__(self):
        self.data: dict[str, dict[str, list[float]]] = {}
        self.notes: dict[str, str] = {}

    def add(self, key: str, tool: str, value: float) -> None:
        self.data.setdefault(key, {}).setdefault(tool, []).append(value)

    def add_pair(self, key: str, ours: float, baseline: float) -> None:
        self.add(key, "sshjobs", ours)
        self.add(key, "baseline", baseline)


def cold(tool: str, job: str, inventory: Path, hosts: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.cold", tool, job, str(inventory), str(hosts)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"cold {tool} {job} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_eigen(n: int) -> list:
    """The reference values, computed by the venv's python (the same numpy wheel)."""
    from . import jobs

    code = jobs.source(jobs.eigen) + f"\nimport json\nprint(json.dumps([eigen(i) for i in range({n})]))\n"
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return json.loads(out.stdout)


def close_enough(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(1.0, abs(y)) for r, s in zip(a, b) for x, y in zip(r, s))


async def warm_figures(inv, python: str, runs: Runs, n: int, expected: list) -> None:
    from . import jobs
    from .baseline import Baseline

    base = await Baseline(inv.hosts, python).connect()
    try:
        async with inv.connect() as cluster:
            await cluster.ensure_slots()
            # The warm fan-outs run one after the other, as NOTES.md measured the peers'
            # (median of 5): interleaved with the other figures, each followed a 200 MB
            # echo, and the first fan-out after one is ~15 ms slower (the workers touch
            # memory afresh; 80 ms vs 60-65 ms for the ones after it).
            for i in range(n + 1):  # run 0 warms up both sides
                say(f"bench: warm fan-out, run {i}/{n}")
                t0 = time.perf_counter()
                res = await cluster.map(jobs.eigen, range(len(inv)))
                t_s = time.perf_counter() - t0
                if not all(r.ok for r in res) or not close_enough([r.value for r in res], expected):
                    raise RuntimeError(f"sshjobs eigen results wrong: {res[:2]}")
                t0 = time.perf_counter()
                vals = await base.fanout()
                t_b = time.perf_counter() - t0
                if not close_enough(vals, expected):
                    raise RuntimeError("baseline eigen results wrong")
                if i:
                    runs.add_pair("warm_fanout", t_s, t_b)

            for i in range(n + 1):  # run 0 warms up both sides
                say(f"bench: tiny jobs and bulk, run {i}/{n}")
                # 10,000 submits of a closure
                double = jobs.make_double()
                t0 = time.perf_counter()
                res = await asyncio.gather(*[cluster.submit(double, k) for k in range(SUBMITS)])
                t_s = time.perf_counter() - t0
                if [r.value for r in res] != [2 * k for k in range(SUBMITS)]:
                    raise RuntimeError(f"sshjobs submit results wrong: {[r for r in res if not r.ok][:1]}")
                t0 = time.perf_counter()
                vals = await base.tiny(BASELINE_TINY)
                t_b = time.perf_counter() - t0
                assert vals == [2 * k for k in range(BASELINE_TINY)]
                if i:
                    runs.add_pair("submit", SUBMITS / t_s, BASELINE_TINY / t_b)

                # map over 1,000,000 ints
                items = range(MAP_ITEMS)
                t0 = time.perf_counter()
                res = await cluster.map(double, items)
                t_s = time.perf_counter() - t0
                if len(res) != MAP_ITEMS or res[-1].value != 2 * (MAP_ITEMS - 1) or not all(r.ok for r in res):
                    raise RuntimeError("sshjobs map results wrong")
                del res
                t0 = time.perf_counter()
                vals = await base.map(list(items))
                t_b = time.perf_counter() - t0
                assert len(vals) == MAP_ITEMS and vals[-1] == 2 * (MAP_ITEMS - 1)
                del vals
                if i:
                    runs.add_pair("map", MAP_ITEMS / t_s, MAP_ITEMS / t_b)

                # bulk: 200 MB echoed; the host stamps when all of it had arrived
                data = os.urandom(1 << 20) * (BULK >> 20) + bytes(BULK - ((BULK >> 20) << 20))
                t0 = time.time()
                r = await cluster.submit(jobs.echo_stamped, data)
                t1 = time.time()
                arrived, back = r.unwrap()
                if back != data:
                    raise RuntimeError("sshjobs echo returned other bytes")
                up_s, down_s = BULK / 1e6 / (arrived - t0), BULK / 1e6 / (t1 - arrived)
                del back, r
                t0 = time.time()
                arrived, back = await base.echo(data)
                t1 = time.time()
                if back != data:
                    raise RuntimeError("baseline echo returned other bytes")
                del back
                if i:
                    runs.add_pair("bulk_up", up_s, BULK / 1e6 / (arrived - t0))
                    runs.add_pair("bulk_down", down_s, BULK / 1e6 / (t1 - arrived))
                del data
    finally:
        await base.close()


class Execnet:
    """bench.execnet_peer in its own venv: execnet gateways to the hosts, held open."""

    def __init__(self, inventory: Path, python: str, hosts: int):
        from .execnet_peer import venv

        self.proc = subprocess.Popen([str(venv(str(Path(sys.executable).parent / "uv"))), "-m", "bench.execnet_peer",
                                      str(inventory), python, str(hosts)], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench.execnet_peer did not start")

    def fanout(self) -> dict:
        self.proc.stdin.write("fanout\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def warm_requirements(inv, inventory: Path, python: str, runs: Runs, n: int, expected: list) -> None:
    """A session on the hosts' own python3 whose calls name their requirements, as a user's do:
    ``cluster.map(eigen, range(10), requirements=["numpy"])`` again and again; beside it the
    baseline's ``python -c`` per job and execnet's warm gateways (``inventory``'s hosts, the
    bench venv's ``python`` on them)."""
    from . import jobs
    from .baseline import Baseline

    base = await Baseline(inv.hosts, python).connect()
    peer = Execnet(inventory, python, len(inv))
    try:
        async with inv.connect() as cluster:
            for i in range(n + 1):  # run 0: the environment found, the workers in it
                say(f"bench: warm fan-out with requirements, run {i}/{n}")
                t0 = time.perf_counter()
                res = await cluster.map(jobs.eigen, range(len(inv)), requirements=["numpy"])
                t_s = time.perf_counter() - t0
                if not all(r.ok for r in res) or not close_enough([r.value for r in res], expected):
                    raise RuntimeError(f"sshjobs eigen results (requirements) wrong: {res[:2]}")
                t0 = time.perf_counter()
                vals = await base.fanout()
                t_b = time.perf_counter() - t0
                if not close_enough(vals, expected):
                    raise RuntimeError("baseline eigen results wrong")
                e = peer.fanout()
                if not close_enough(e["values"], expected):
                    raise RuntimeError("execnet eigen results wrong")
                if i:
                    runs.add_pair("warm_requirements", t_s, t_b)
                    runs.add_pair("warm_execnet", t_s, e["seconds"])
    finally:
        peer.close()
        await base.close()


async def install_figure(inv, python: str, runs: Runs, n: int) -> None:
    """An environment that is already installed, asked for again on 10 hosts.

    The baseline has no environments: its equivalent check is one ``python -c "import
    numpy"`` per host.  The environment is built once, untimed (the first time on a
    machine that downloads numpy into every lab user's uv cache)."""
    from .baseline import Baseline

    reqs = ["numpy"]
    base = await Baseline(inv.hosts, python).connect()
    try:
        async with inv.connect() as cluster:
            say("bench: install, building the environment once (untimed)")
            first = await cluster.install(reqs)
            bad = [r for r in first if not r.ok]
            if bad:
                runs.notes["install"] = f"n/a: install failed: {bad[0].error}"[:200]
                return
            for i in range(n + 1):
                say(f"bench: install no-op, run {i}/{n}")
                t0 = time.perf_counter()
                res = await cluster.install(reqs)
                t_s = time.perf_counter() - t0
                if not all(r.ok and r.value["cached"] for r in res):
                    raise RuntimeError(f"install no-op did not find its environment: {res[0]}")
                t0 = time.perf_counter()
                await asyncio.gather(*(base.run(k, "import numpy") for k in range(len(inv.hosts))))
                t_b = time.perf_counter() - t0
                if i:
                    runs.add_pair("install", t_s, t_b)
    finally:
        await base.close()


def summarise(runs: Runs, n: int) -> dict:
    figures = {}
    for key, (label, unit, higher, test, target) in FIGURES.items():
        d = runs.data.get(key)
        if not d or "sshjobs" not in d:
            figures[key] = {"label": label, "unit": unit, "target": target, "value": None,
                            "note": runs.notes.get(key, "n/a: not measured")}
            continue
        value = statistics.median(d["sshjobs"])
        base = statistics.median(d["baseline"]) if d.get("baseline") else None
        ratio = value / base if base else None
        figures[key] = {
            "label": label, "unit": unit, "target": target, "higher_is_better": higher,
            "value": value, "baseline": base, "ratio": ratio,
            "met": bool(test(value, ratio)) if test else None,
            "runs": d["sshjobs"], "baseline_runs": d.get("baseline", []),
        }
    return {
        "bench": "sshjobs",
        "runs": n,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_1min": os.getloadavg()[0]},
        "figures": figures,
    }


def table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sshjobs bench: medians of {summary['runs']} runs, baseline = asyncssh + python3 -c per job")
    for col in ("figure", "sshjobs", "baseline", "ratio", "target", "met"):
        t.add_column(col, justify="left" if col in ("figure", "target") else "right")

    def fmt(v, unit):
        if v is None:
            return "-"
        if unit == "s":
            return f"{v:.3f} s"
        return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"

    for f in summary["figures"].values():
        if f["value"] is None:
            t.add_row(f["label"], f["note"], "-", "-", f["target"], "-")
            continue
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        met = {True: "yes", False: "NO", None: "-"}[f["met"]]
        t.add_row(f["label"], fmt(f["value"], f["unit"]), fmt(f["baseline"], f["unit"]), ratio, f["target"], met)
    Console(file=sys.stdout, width=130).print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median); at least 5 for the record")
    ap.add_argument("--hosts", type=int, default=100, help="lab hosts for the scale figure (the others use 10)")
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("SSHJOBS_LAB_SUBNET", "9")),
                    help="lab addresses 127.0.SUBNET.x (default $SSHJOBS_LAB_SUBNET or 9)")
    ap.add_argument("--only", default="",
                    help="comma-separated: cold,warm,scale,install,cli_start,contact,stream,session (default all)")
    ap.add_argument("--json-out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or {"cold", "warm", "scale", "install", "cli_start", "contact",
                                                       "stream", "session"}

    # The figures' new processes start as an installed sshjobs does, from .pyc files: caching
    # on (a developer's PYTHONDONTWRITEBYTECODE would make every one compile sshjobs again).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall

    compileall.compile_dir(str(ROOT / "sshjobs"), quiet=1)

    from sshjobs import Inventory
    from sshjobs.lab import Lab

    # SIGTERM (a killed `make`) must still stop the lab: turn it into an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    python = numpy_venv()
    n = args.runs
    runs = Runs()
    nlab = max(10, args.hosts if "scale" in only else 10)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    lab = Lab(nlab, BENCH_DIR / f"lab{args.subnet}", subnet=args.subnet, prefix=f"sshjobs-b{args.subnet}-")
    say(f"bench: starting a {nlab}-host lab on 127.0.{args.subnet}.x")
    try:
        lab.up(timeout=60)
        base_inventory = lab.inventory_path.with_name("python3.toml")  # the hosts' own python3
        base_inventory.write_text(lab.inventory_path.read_text())
        text = lab.inventory_path.read_text().replace("[defaults]\n", f'[defaults]\npython = "{python}"\n', 1)
        lab.inventory_path.write_text(text)
        full = Inventory.load(lab.inventory_path)
        inv10 = Inventory(full.hosts[:10], source=full.source)
        expected = expected_eigen(10)

        if "cold" in only:
            for i in range(n + 1):  # run 0 warms caches (cloudpickle on the hosts, page cache)
                say(f"bench: cold fan-out, run {i}/{n}")
                s = cold("sshjobs", "eigen", lab.inventory_path, 10)
                b = cold("baseline", "eigen", lab.inventory_path, 10)
                c = cold("sshjobs-connect", "eigen", lab.inventory_path, 10)
                if not all(close_enough(x["values"], expected) for x in (s, b, c)):
                    raise RuntimeError("cold eigen results differ from the reference")
                if i:
                    runs.add_pair("cold_fanout", s["seconds"], b["seconds"])
                    runs.add_pair("cold_cpu", s["machine_cpu"], b["machine_cpu"])
                    runs.add_pair("cold_fanout_connect", c["seconds"], b["seconds"])
        if "cold" in only:  # the user's path: hosts' own python3, numpy installed by sshjobs
            say("bench: requirements=['numpy'] on the hosts' python3 (run 0 builds the environments)")
            for i in range(n + 1):
                s = cold("sshjobs-req", "eigen", base_inventory, 10)
                b = cold("baseline", "eigen", lab.inventory_path, 10)
                if not all(close_enough(x["values"], expected) for x in (s, b)):
                    raise RuntimeError("cold eigen results (requirements) differ from the reference")
                if i:
                    runs.add_pair("cold_requirements", s["seconds"], b["seconds"])
        if "warm" in only:
            asyncio.run(warm_figures(inv10, str(python), runs, n, expected))
            asyncio.run(warm_requirements(Inventory.load(base_inventory).select(",".join(h.name for h in inv10)),
                                          lab.inventory_path, str(python), runs, n, expected))
        if "scale" in only and nlab >= 100:
            for i in range(n + 1):
                say(f"bench: {nlab} hosts cold no-op, run {i}/{n}")
                s = cold("sshjobs", "noop", lab.inventory_path, nlab)
                b = cold("baseline", "noop", lab.inventory_path, nlab)
                if i:
                    for key, field in (("scale", "seconds"), ("scale_cpu", "machine_cpu"), ("scale_rss", "rss_mb")):
                        runs.add_pair(key, s[field], b[field])
        if "install" in only:
            asyncio.run(install_figure(inv10, str(python), runs, n))
    finally:
        lab.down()
        say(f"bench: lab stopped after {time.perf_counter() - started:.0f} s")
    extra = {}
    for name in ("cli_start", "contact", "stream", "session"):  # each starts its own lab, so after ours is down
        if name in only:
            say(f"bench: {name}")
            out = subprocess.run([sys.executable, "-m", f"bench.{name}", "--runs", str(n), "--subnet", str(args.subnet)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
            extra[name] = json.loads(out.stdout.strip().splitlines()[-1])
    if "contact" in extra:
        c = extra["contact"]["runs"]
        for ours, theirs in zip(c["ours_first"], c["baseline"]):
            runs.add_pair("first_contact", ours, theirs)
        for ours, theirs in zip(c["ours_later"], c["baseline"]):
            runs.add_pair("later_contact", ours, theirs)
        cpu = extra["contact"]["cpu_runs"]
        for ours, theirs in zip(cpu["ours_later"], cpu["baseline"]):
            runs.add_pair("later_contact_cpu", ours, theirs)
    if "stream" in extra:
        c = extra["stream"]["runs"]
        for key, base in (("imap_rate", "plain_rate"), ("journal_rate", "plain_rate")):
            for ours, theirs in zip(c[key], c[base]):
                runs.add_pair(key, ours, theirs)
        for key in ("imap_rss", "journal_bytes"):
            for v in c[key]:
                runs.add(key, "sshjobs", v)
    if "cli_start" in extra:
        c = extra["cli_start"]
        for ours, theirs in zip(c["version"]["walls"], c["python_pass"]["walls"]):
            runs.add_pair("version", ours, theirs)
        for ours, theirs in zip(c["run_10_hosts"]["walls"], c["ssh_10_parallel"]["walls"]):
            runs.add_pair("run_10", ours, theirs)
    if "session" in extra:
        c = extra["session"]["runs"]
        for key, name in (("session_run_10", "run_10"), ("session_exec_100", "exec_100"),
                          ("session_script_10", "script_10")):
            for ours, theirs in zip(c[name]["session"], c[name]["direct"]):
                runs.add_pair(key, ours, theirs)
    summary = summarise(runs, n)
    summary.update(extra)
    summary["machine"]["load_1min_before"] = load_before
    summary["seconds"] = time.perf_counter() - started
    table(summary)
    line = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
