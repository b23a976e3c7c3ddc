"""CPU of one worker start, over a pipe, on this machine's python3: ``python -m bench.start``.

Each start is what the controller does on a host: ``python3 -c STUB``, the worker bundle
and a CONFIG frame on stdin, HELLO back, stdin closed, the worker exits.  Measured: the
child's user+sys CPU (wait4), ``--n`` times each: with the controller's compiled code
shipped (a host of the same Python, every start's case), the same followed by one no-op
job (a function loaded by value, its Result: a host's whole part of a later contact),
with sources only and the host's code cache warm, and with sources only and no cache (its
``<workdir>/code`` removed first, so the host compiles), against ``python3 -c pass``.  With
``--valgrind``: the instructions valgrind counts, a figure the other loads of a shared
machine do not move.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import statistics
import subprocess
import tempfile

import cloudpickle

from sshjobs.pickling import dumps, pickle_function
from sshjobs.remote import STUB, WORKER, protocol
from sshjobs.worker import _cloudpickle_sources


def noop():
    return None


def _child(argv: list[str], data: bytes, valgrind: bool, replies: int = 0) -> float:
    """ms of CPU (or millions of instructions) of one run with ``data`` on its stdin: all of
    it at once (the worker meets EOF after HELLO), or with ``replies``, stdin kept open until
    that many frames came back, as the controller closes it after the last Result."""
    if valgrind:
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
    if replies:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(data)
        proc.stdin.flush()
        for _ in range(replies):
            if protocol.read_frame(proc.stdout) is None:
                break
        proc.stdin.close()
        proc.stdout.close()
    else:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            proc = subprocess.Popen(argv, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv[-3:]} failed: {err[-2000:].decode(errors='replace')}")
    if valgrind:
        return int(re.search(rb"Collected : (\d+)", err).group(1)) / 1e6
    return (usage.ru_utime + usage.ru_stime) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--valgrind", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="sshjobs-bench-start-")
    try:
        config = {"cloudpickle": cloudpickle.__version__, "workdir": workdir}
        frame = protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4))
        shipped, sources = WORKER.start(workdir) + frame, WORKER.start(workdir, compiled=False) + frame
        job = (protocol.pack(protocol.FUNC, 1, pickle_function(noop))
               + protocol.pack(protocol.CALL, 1, protocol.FID.pack(1) + bytes(dumps(((), {})))))
        worker = [args.python, "-c", STUB]
        # the first start gets cloudpickle's source and caches it: later ones find it
        _child(worker, sources + protocol.pack(protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources())), False)
        runs: dict[str, list[float]] = {"pass": [], "shipped": [], "job": [], "cached": [], "compile": []}
        for _ in range(args.n):
            runs["pass"].append(_child([args.python, "-c", "pass"], b"", args.valgrind))
            runs["shipped"].append(_child(worker, shipped, args.valgrind))
            runs["job"].append(_child(worker, shipped + job, args.valgrind, replies=2))  # HELLO, RESULT
            runs["cached"].append(_child(worker, sources, args.valgrind))
            shutil.rmtree(os.path.join(workdir, "code"), ignore_errors=True)
            runs["compile"].append(_child(worker, sources, args.valgrind))
        unit = "M instructions" if args.valgrind else "ms CPU"
        base = statistics.median(runs["pass"])
        print(f"{args.python}, {args.n} starts each, median {unit} (worker bundle {len(shipped)} bytes with its"
              f" code, {len(sources)} without)")
        for name, values in runs.items():
            extra = "" if name == "pass" else f"  ({statistics.median(values) - base:+.2f} over pass)"
            print(f"  {name:7s} {statistics.median(values):7.2f}{extra}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
