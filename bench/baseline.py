"""The baseline: asyncssh, one ``python3 -c`` per job (the best cold peer in NOTES.md).

Connections are opened concurrently with asyncssh's defaults (its default cipher, no
connection reuse beyond the session), and every job is a fresh ``python -c CODE`` on an
exec channel: no persistent worker, so every job pays an interpreter start and its imports.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import shlex

import asyncssh

from . import jobs

EIGEN = jobs.source(jobs.eigen) + "\nimport json, sys\nprint(json.dumps(eigen(int(sys.argv[1]))))\n"
DOUBLE = "import sys\nprint(int(sys.argv[1]) * 2)\n"
NOOP = "pass\n"
# map: one process per host over its slice of the items, pickled both ways
MAP = "import pickle, sys\nxs = pickle.load(sys.stdin.buffer)\nsys.stdout.buffer.write(pickle.dumps([x * 2 for x in xs], 5))\n"
# bulk: echo stdin, and say on stderr when all of it had arrived
ECHO = ("import sys, time\ndata = sys.stdin.buffer.read()\nsys.stderr.write(repr(time.time()))\n"
        "sys.stdout.buffer.write(data)\n")


class Baseline:
    def __init__(self, hosts, python: str, per_host: int = 6):
        self.hosts = list(hosts)
        self.python = python
        self.conns: list[asyncssh.SSHClientConnection] = []
        self.per_host = per_host  # concurrent channels per connection, under sshd's MaxSessions
        self._sems: list[asyncio.Semaphore] = []

    async def connect(self) -> "Baseline":
        async def one(h):
            return await asyncssh.connect(h.address, port=h.port or 22, username=h.user,
                                          client_keys=[h.identity], known_hosts=h.known_hosts)

        self.conns = list(await asyncio.gather(*(one(h) for h in self.hosts)))
        self._sems = [asyncio.Semaphore(self.per_host) for _ in self.conns]
        return self

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        await asyncio.gather(*(c.wait_closed() for c in self.conns), return_exceptions=True)

    async def run(self, i: int, code: str, *args: str, input: bytes | None = None):
        cmd = " ".join([shlex.quote(self.python), "-c", shlex.quote(code), *map(shlex.quote, args)])
        async with self._sems[i % len(self.conns)]:
            for attempt in range(20):
                try:
                    return await self.conns[i % len(self.conns)].run(cmd, input=input, encoding=None, check=True)
                except asyncssh.ChannelOpenError:
                    # sshd frees a session slot a little after the channel closed ("no more sessions")
                    await asyncio.sleep(0.01 * (attempt + 1))
            raise RuntimeError("baseline: no free session")

    # -- the figures ---------------------------------------------------------------
    async def fanout(self, n: int | None = None) -> list:
        """The eigen job once per host (job i on host i)."""
        n = len(self.conns) if n is None else n
        out = await asyncio.gather(*(self.run(i, EIGEN, str(i)) for i in range(n)))
        return [json.loads(r.stdout) for r in out]

    async def noop(self) -> None:
        await asyncio.gather(*(self.run(i, NOOP) for i in range(len(self.conns))))

    async def tiny(self, n: int) -> list[int]:
        out = await asyncio.gather(*(self.run(i, DOUBLE, str(i)) for i in range(n)))
        return [int(r.stdout) for r in out]

    async def map(self, items: list) -> list:
        k = len(self.conns)
        size = -(-len(items) // k)
        slices = [items[i * size:(i + 1) * size] for i in range(k)]
        out = await asyncio.gather(*(self.run(i, MAP, input=pickle.dumps(s, 5)) for i, s in enumerate(slices)))
        result = []
        for r in out:
            result.extend(pickle.loads(r.stdout))
        return result

    async def echo(self, data: bytes) -> tuple[float, bytes]:
        r = await self.run(0, ECHO, input=data)
        return float(r.stderr), r.stdout
