"""execnet beside sshjobs' warm figures: gateways held open, one ``remote_exec`` per job.

    .bench/execnet/bin/python -m bench.execnet_peer INVENTORY PYTHON HOSTS

Run by bench/run.py in a venv of its own (execnet is no dependency of sshjobs; see
``venv()``).  Opens one execnet SSH gateway to each of the first HOSTS hosts of INVENTORY (OpenSSH's ``ssh``, the
host's PYTHON on the far side), prints ``ready``, then for every line ``fanout`` on stdin
sends the eigen job to every host (job i on host i, a new ``remote_exec`` of the job's
source each time, as an execnet user sends work) and prints one JSON line: the seconds
from the first send to the last value, and the values.  Ends at end of input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from . import jobs
from .cli_start import ssh_args

ROOT = Path(__file__).resolve().parent.parent
JOB = jobs.source(jobs.eigen) + "\nchannel.send(eigen(channel.receive()))\n"


def venv(uv: str) -> Path:
    """``.bench/execnet``: a venv with execnet from the package index (made once)."""
    where = ROOT / ".bench" / "execnet"
    python = where / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import execnet"], capture_output=True).returncode == 0:
        return python
    subprocess.run([uv, "venv", "-q", "--allow-existing", "--python", sys.executable, str(where)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "execnet"], check=True)
    return python


def specs(inventory: Path, python: str, hosts: int) -> list[str]:
    """execnet's gateway specs for the first ``hosts`` hosts (its ``ssh=`` takes ssh's options)."""
    return [f"ssh={' '.join(args)}//python={python}" for args in ssh_args(inventory)[:hosts]]


def main(argv: list[str]) -> int:
    import execnet

    group = execnet.Group()
    gateways = [group.makegateway(spec) for spec in specs(Path(argv[0]), argv[1], int(argv[2]))]
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "fanout":
                continue
            t0 = time.perf_counter()
            channels = [gw.remote_exec(JOB) for gw in gateways]
            for i, ch in enumerate(channels):
                ch.send(i)
            values = [ch.receive() for ch in channels]
            print(json.dumps({"seconds": time.perf_counter() - t0, "values": values}), flush=True)
    finally:
        group.terminate(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
