"""One host of a Cluster: its connections, its pool of workers (one per slot), and why it
is unusable if it is."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable

from .connection import HostLink
from .errors import ConnectError, HostError, HostLost, NotConnected, PythonMismatch, WorkerError, WorkerStartError
from .events import Events
from .inventory import Host
from .log import get_logger
from .result import Result, failed
from .worker import Worker

log = get_logger("sshjobs.hosts")

MAX_START_FAILURES = 3  # consecutive worker start failures before a host is given up
# A start failing with one of these would fail the same way again.
_FINAL_START_ERRORS = (PythonMismatch, WorkerStartError, HostLost)


class HostState:
    """One host within a Cluster: connections, workers by slot, its facts and its error."""

    def __init__(self, host: Host, index: int, events: Events, *, start_timeout: float = 60.0,
                 on_output: Callable | None = None, loads: Callable | None = None, preload: Iterable[str] = ()):
        self.host = host
        self.preload = list(dict.fromkeys((*host.preload, *preload)))  # imported by every worker as it starts
        self.index = index
        self.events = events
        self.start_timeout = start_timeout
        self.on_output = on_output
        self.loads = loads  # the results' unpickler; None = pickle.loads
        self.link: HostLink | None = None
        self.error: HostError | None = None
        self.workers: list[Worker | None] = []
        self.nslots = 1
        self.starting: dict[int, asyncio.Task] = {}
        self.start_failures = 0
        self.python = host.python  # the interpreter workers run: an environment's after an install
        self.base_python = host.python  # the host's own (python = "match": the one uv found)
        self.env_python: str | None = None  # set by a successful install
        # The environment wanted (its alias, see provisioning.EnvSpec.alias): workers started
        # while none runs yet try it first.  env_key: the one the workers run in.
        self.alias: str | None = None
        self.env_key: str | None = None
        self.env_prefix: str | None = None  # that environment's folder on the host
        self.env_lock = asyncio.Lock()
        self.env: dict[str, str] = {}
        self.hello: dict = {}
        self.connect_time: float | None = None
        self.start_time: float | None = None
        self.opening: asyncio.Future | None = None  # the connect and first worker's start
        self.closed = False

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def usable(self) -> bool:
        return self.error is None and self.link is not None and not self.closed

    @property
    def up(self) -> bool:
        """Connected with its first worker up, or failed: nothing more to wait for."""
        return self.opening is None or self.opening.done()

    def fail(self, error: HostError) -> None:
        """The host is unusable from now on, for this reason."""
        if self.error is None:
            error.host = self.name
            self.error = error
            log.warning("host failed", host=self.name, error=error.kind, detail=error.message)
            self.events.failed(self.name, error.kind, error.message)

    def failure(self, job: int = 0) -> Result:
        """A Result for a job this host cannot run."""
        error = self.error or NotConnected(f"{self.host.target}: not connected")
        return failed(error, self.name, job=job)

    # -- connect --------------------------------------------------------------------------
    async def open(self, sem: asyncio.Semaphore,
                   find_python: Callable[["HostState"], Awaitable[str]] | None = None) -> None:
        """Connect (at most ``sem`` hosts at once), find the interpreter (``python = "match"``:
        ``find_python``), start slot 0's worker."""
        t0 = time.perf_counter()
        async with sem:
            self.events.connecting(self.name)
            try:
                self.link = await HostLink.open(self.host)
            except ConnectError as exc:
                self.fail(exc)
                return
        self.connect_time = time.perf_counter() - t0
        if self.host.python == "match" and find_python is not None:
            try:
                self.python = self.base_python = await find_python(self)
            except HostError as exc:
                self.fail(exc)
                return
        worker = await self.worker(0)
        if worker is not None:
            self.hello = worker.hello
            slots = self.host.slots
            self.nslots = (worker.hello.get("cpus") or 1) if slots == "auto" else int(slots)
            self.events.connected(self.name, self.connect_time, self.start_time,
                                  ".".join(map(str, worker.hello.get("python") or ())))

    # -- workers --------------------------------------------------------------------------
    async def worker(self, slot: int) -> Worker | None:
        """The live worker of a slot, started (again) if needed; None if the host is unusable."""
        if not self.usable:
            return None
        while len(self.workers) <= slot:
            self.workers.append(None)
        worker = self.workers[slot]
        if worker is not None and worker.alive:
            return worker
        task = self.starting.get(slot)
        if task is None:
            task = self.starting[slot] = asyncio.ensure_future(self._start_worker(slot))
            task.add_done_callback(lambda _t: self.starting.pop(slot, None))
        return await asyncio.shield(task)

    async def _start_worker(self, slot: int) -> Worker | None:
        while self.usable:
            t0 = time.perf_counter()
            alias = self.alias if self.env_key is None else None
            first = f"{self.host.workdir.rstrip('/')}/envs/@{alias}/bin/python" if alias else None
            worker = Worker(self.link, python=self.python, env=self.env, slots=self.host.slots,
                            on_output=self.on_output, first=first, preload=self.preload)
            try:
                await worker.start(self.start_timeout)
            except WorkerError as exc:
                self.start_failures += 1
                if isinstance(exc, _FINAL_START_ERRORS) or self.start_failures >= MAX_START_FAILURES:
                    self.fail(exc)
                    return None
                continue
            except HostLost as exc:
                self.fail(exc)
                return None
            self.start_failures = 0
            if worker.hello.get("preload_errors"):
                log.info("a module to preload did not import", host=self.name, errors=worker.hello["preload_errors"])
            if alias and self.env_key is None and worker.hello.get("executable", "").endswith(f"/envs/@{alias}/bin/python"):
                # started straight in the wanted environment: later workers start there too
                self.env_key = alias
                self.python = self.env_python = worker.hello["executable"]
                self.env_prefix = worker.hello.get("prefix")
            elif self.env_key is not None and worker.python != self.python:
                worker.kill()  # started before a switch to another environment
                continue
            worker.slot = slot
            self.start_time = time.perf_counter() - t0
            self.workers[slot] = worker
            return worker
        return None

    def discard(self, worker: Worker) -> None:
        """Kill a worker now (its job overran or was given up) and free its slot; the slot
        gets a new worker when next asked for.  Callable from callbacks: no task needed."""
        worker.kill()
        slot = worker.slot
        if slot is not None and slot < len(self.workers) and self.workers[slot] is worker:
            self.workers[slot] = None

    def slots(self) -> range:
        return range(self.nslots) if self.usable else range(0)

    def live_workers(self) -> list[Worker]:
        if not self.usable:
            return []
        return [w for w in self.workers if w is not None and w.alive]

    async def use_env(self, python: str, key: str | None = None) -> None:
        """Run later jobs with an environment's interpreter (``key``: its alias); workers of
        another one are replaced (a job running on them ends)."""
        if key is not None and key == self.env_key:
            return  # the workers run in it already (started by its alias)
        self.env_python = python
        self.env_key = key
        if self.python == python:
            return
        self.python = python
        slots = [i for i, w in enumerate(self.workers) if w is not None]
        old = [self.workers[i] for i in slots]
        self.workers = [None] * len(self.workers)
        for w in old:
            w.close()
        if old:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in old], timeout=2)
        await asyncio.gather(*(self.worker(i) for i in slots))

    # -- close ----------------------------------------------------------------------------
    def starts_running(self) -> list[asyncio.Future]:
        """The connect and worker starts not finished yet (to cancel on close)."""
        tasks = [self.opening] if self.opening is not None and not self.opening.done() else []
        return tasks + [t for t in self.starting.values() if not t.done()]

    def close_workers(self) -> list[Worker]:
        """End every worker's input (each exits, ending its job's processes too); the ones
        with a job still running, which the caller may give time to exit."""
        self.closed = True
        workers = [w for w in self.workers if w is not None]
        for w in workers:
            w.close()
        return [w for w in workers if w.pending]
