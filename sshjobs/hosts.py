"""One host of a Cluster: its connections, its pool of workers (one per slot) and what each
worker has been sent (``Lane``), why it is unusable if it is, and its way back after its
connection drops (``reconnect``)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Protocol

from .connection import HostLink
from .errors import (AuthenticationError, ConnectError, HostError, HostKeyError, HostLost, NotConnected,
                     PythonMismatch, WorkerError, WorkerStartError)
from .events import Events
from .inventory import Host
from .log import get_logger
from .result import Result, failed
from .worker import Worker

if TYPE_CHECKING:
    from .scheduler import Call

log = get_logger("sshjobs.hosts")

MAX_START_FAILURES = 3  # consecutive worker start failures before a host is given up
# A start failing with one of these would fail the same way again.
_FINAL_START_ERRORS = (PythonMismatch, WorkerStartError)
# A reconnect failing with one of these is not a passing outage: a changed host key must
# not be trusted, refused credentials will not be accepted the next time either.
_FINAL_CONNECT_ERRORS = (AuthenticationError, HostKeyError)
RECONNECT_FIRST = 0.5  # seconds between the first failed reconnect attempt and the next; doubles
RECONNECT_MAX = 30.0  # the longest pause between two attempts


class Lane:
    """The Calls sent to one worker, in the order it runs them: a worker runs one job at a
    time, so ``calls[0]`` is running and the others have not started.

    ``blocking`` counts the Calls nothing may wait behind (not ``queueable``), ``queued`` adds
    up the others' expected seconds; ``since`` is when ``calls[0]`` began.  When the worker
    ends, ``ended`` is the Call that was running then and ``ended_with`` how many it had;
    ``killed_for`` is the Call it was killed for (a timeout, a cancel), if it was."""

    __slots__ = ("calls", "blocking", "queued", "since", "ended", "ended_with", "killed_for")

    def __init__(self):
        self.calls: deque[Call] = deque()
        self.blocking = 0
        self.queued = 0.0
        self.since = time.monotonic()
        self.ended: Call | None = None
        self.ended_with = 0
        self.killed_for: Call | None = None

    def push(self, call: "Call") -> None:
        if not self.calls:
            self.since = time.monotonic()
        self.calls.append(call)
        if call.queueable:
            self.queued += call.expected
        else:
            self.blocking += 1

    def pop(self, call: "Call") -> None:
        calls = self.calls
        if calls and calls[0] is call:
            calls.popleft()
            self.since = time.monotonic()
        else:
            try:
                calls.remove(call)
            except ValueError:
                return
        if call.queueable:
            self.queued = self.queued - call.expected if calls else 0.0
        else:
            self.blocking -= 1

    def end(self, call: "Call") -> bool:
        """The worker ended under ``call`` or beside it: True if ``call`` was running then."""
        if self.ended is None:
            self.ended = self.calls[0] if self.calls else call
            self.ended_with = len(self.calls)
        return self.ended is call


class Listener(Protocol):
    """Who hears that a host can take work again (the Cluster's Dispatcher)."""

    def freed(self, state: "HostState", worker: Worker) -> None: ...

    def host_changed(self, state: "HostState") -> None: ...

    def starting(self, delta: int) -> None: ...


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
        self.lanes: dict[Worker, Lane] = {}
        self.listener: Listener | None = None
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
        # After a dropped connection: why (None while connected), the task that reconnects,
        # whether an attempt is under way, and who waits for its outcome.
        self.lost: HostLost | None = None
        self.lost_since = 0.0
        self.last_attempt: ConnectError | None = None
        self.reconnecting: asyncio.Task | None = None
        self.attempting = False
        self.reconnects = 0
        self._wake: asyncio.Event | None = None
        self._attempt_waiters: list[asyncio.Future] = []
        self._free_waiters: list[asyncio.Future] = []

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def usable(self) -> bool:
        return self.error is None and self.lost is None and self.link is not None and not self.closed

    @property
    def up(self) -> bool:
        """Connected with its first worker up, or failed: nothing more to wait for."""
        return self.opening is None or self.opening.done()

    @property
    def may_come(self) -> bool:
        """Usable, or it may be soon: still connecting, or a reconnect attempt under way."""
        if self.closed or self.error is not None:
            return False
        return self.usable or not self.up or (self.lost is not None and self.attempting)

    def info(self) -> dict:
        """What a command reports of the host after a call (its summary, ``sshjobs ping``):
        plain data, as a session sends it."""
        return {"name": self.name, "target": self.host.target, "error": self.error, "up": self.up,
                "connected": self.link is not None, "python": tuple(self.hello.get("python", ())),
                "connect_time": self.connect_time, "start_time": self.start_time,
                "workers": len(self.live_workers())}

    def fail(self, error: HostError) -> None:
        """The host is unusable from now on, for this reason."""
        if self.error is None:
            error.host = self.name
            self.error = error
            log.warning("host failed", host=self.name, error=error.kind, detail=error.message)
            self.events.failed(self.name, error.kind, error.message)
            self._attempt_over(False)
            self._changed()

    def failure(self, job: int = 0) -> Result:
        """A Result for a job this host cannot run."""
        error = self.error
        if error is None and self.lost is not None:
            error = self.lost
            if self.last_attempt is not None:
                error = HostLost(f"{self.lost.message}; reconnecting: {self.last_attempt.message}", self.name)
        if error is None:
            error = NotConnected(f"{self.host.target}: not connected")
        return failed(error, self.name, job=job)

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener.host_changed(self)
        self._wake_free()

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
        self._watch(self.link)
        self.connect_time = time.perf_counter() - t0
        if self.host.python == "match" and find_python is not None:
            try:
                self.python = self.base_python = await find_python(self)
            except HostError as exc:
                if isinstance(exc, HostLost):
                    self.connection_lost(exc, self.link)
                else:
                    self.fail(exc)
                return
        worker = await self.worker(0)
        if worker is not None:
            self.hello = worker.hello
            slots = self.host.slots
            self.nslots = (worker.hello.get("cpus") or 1) if slots == "auto" else int(slots)
            self.events.connected(self.name, self.connect_time, self.start_time,
                                  ".".join(map(str, worker.hello.get("python") or ())))

    # -- a dropped connection ---------------------------------------------------------------
    def connection_lost(self, exc: HostLost, link: HostLink | None) -> None:
        """The connection ``link`` dropped (or stopped answering keepalives): its workers are
        gone; reconnect in the background, with backoff, until the host answers again."""
        if self.closed or self.error is not None or link is None or link is not self.link:
            return  # closed, failed for good, or news about a connection replaced already
        exc.host = self.name
        self.lost = exc
        self.last_attempt = None
        self.lost_since = time.monotonic()
        self.link = None
        old = [w for w in self.workers if w is not None]
        self.workers = [None] * len(self.workers)
        for w in old:
            w.close()
        link.close()
        log.warning("connection lost, reconnecting", host=self.name, detail=exc.message)
        self.attempting = True  # the first attempt starts at once
        if self.reconnecting is None or self.reconnecting.done():
            self.reconnecting = asyncio.ensure_future(self._reconnect())
        self._changed()

    def _watch(self, link: HostLink) -> None:
        link.on_lost = lambda reason: self.connection_lost(HostLost(reason), link)

    def reconnect_now(self) -> None:
        """A call wants this lost host: try again now rather than after the backoff."""
        if self.lost is not None and not self.attempting and self._wake is not None:
            self.attempting = True
            self._wake.set()

    def next_attempt(self) -> asyncio.Future:
        """A future of the next reconnect attempt's outcome (True: the host is back)."""
        fut = asyncio.get_running_loop().create_future()
        if self.usable or self.lost is None:
            fut.set_result(self.usable)
        else:
            self._attempt_waiters.append(fut)
        return fut

    def _attempt_over(self, ok: bool) -> None:
        waiters, self._attempt_waiters = self._attempt_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(ok)

    async def _reconnect(self) -> None:
        self._wake = asyncio.Event()
        delay = RECONNECT_FIRST
        attempt = 0
        while not self.closed and self.error is None and self.lost is not None:
            attempt += 1
            self.attempting = True
            self.events.reconnecting(self.name, attempt, self.lost.kind, self.lost.message)
            try:
                link = await HostLink.open(self.host)
            except _FINAL_CONNECT_ERRORS as exc:
                self.attempting = False
                self.fail(exc)
                return
            except ConnectError as exc:
                self.last_attempt = exc
                log.info("reconnect attempt failed", host=self.name, attempt=attempt, detail=exc.message)
            else:
                if self.closed:
                    # Closed while this connection was being made: it is no Cluster's to
                    # close, so see it closed here, while the loop still runs (a close left
                    # to the loop's end can leave the socket open, and sshd's session with it).
                    link.close()
                    await link.wait_closed()
                    return
                self.link = link
                self._watch(link)
                self.lost = None
                self.last_attempt = None
                self.lanes = {w: lane for w, lane in self.lanes.items() if lane.calls}
                worker = await self.worker(0)
                if self.closed:
                    return
                if worker is not None:
                    self.attempting = False
                    self.reconnects += 1
                    down = time.monotonic() - self.lost_since
                    log.warning("reconnected", host=self.name, attempts=attempt, down_for=round(down, 3))
                    self.events.reconnected(self.name, attempt, down)
                    self._attempt_over(True)
                    self._changed()
                    return
                if self.lost is None:  # the host failed for good (or closed) while starting
                    return
            self.attempting = False
            self._attempt_over(False)
            self._changed()
            # A pause before the next attempt, cut short by a call that wants the host.
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay * (0.5 + random.random()))
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, RECONNECT_MAX)

    # -- workers --------------------------------------------------------------------------
    async def worker(self, slot: int) -> Worker | None:
        """The live worker of a slot, started (again) if needed; None if the host is unusable."""
        task = self.start_slot(slot)
        if task is None:
            return self.workers[slot] if self.usable and slot < len(self.workers) else None
        return await asyncio.shield(task)

    def start_slot(self, slot: int) -> asyncio.Task | None:
        """Start a slot's worker unless it has a live one (or the host is unusable): the
        start's task, None if there is nothing to wait for."""
        if not self.usable:
            return None
        while len(self.workers) <= slot:
            self.workers.append(None)
        worker = self.workers[slot]
        if worker is not None and worker.alive:
            return None
        task = self.starting.get(slot)
        if task is None:
            task = self.starting[slot] = asyncio.ensure_future(self._start_worker(slot))
            task.add_done_callback(lambda _t: self._started(slot))
            if self.listener is not None:
                self.listener.starting(1)
        return task

    def _started(self, slot: int) -> None:
        self.starting.pop(slot, None)
        if self.listener is not None:
            self.listener.starting(-1)

    async def _start_worker(self, slot: int) -> Worker | None:
        while self.usable:
            link = self.link
            t0 = time.perf_counter()
            alias = self.alias if self.env_key is None else None
            first = f"{self.host.workdir.rstrip('/')}/envs/@{alias}/bin/python" if alias else None
            worker = Worker(link, python=self.python, env=self.env, slots=self.host.slots,
                            on_output=self.on_output, first=first, preload=self.preload)
            try:
                await worker.start(self.start_timeout)
            except HostLost as exc:
                self.connection_lost(exc, link)
                return None
            except WorkerError as exc:
                if link is not self.link:
                    continue  # the connection was replaced meanwhile
                self.start_failures += 1
                if isinstance(exc, _FINAL_START_ERRORS) or self.start_failures >= MAX_START_FAILURES:
                    self.fail(exc)
                    return None
                continue
            if link is not self.link or not self.usable:
                worker.close()  # started on a connection that was lost (or the host closed) meanwhile
                continue
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
            if self.up:  # the host's first worker is in its `connected` event
                self.events.worker_started(self.name, slot, self.start_time)
            if len(self.lanes) > 2 * len(self.workers):  # those of workers that ended idle
                self.lanes = {w: lane for w, lane in self.lanes.items() if lane.calls or w.alive}
            if self.listener is not None:
                self.listener.freed(self, worker)
            self._wake_free()
            return worker
        return None

    # -- lanes: what each worker was sent ----------------------------------------------------
    def lane(self, worker: Worker) -> Lane:
        lane = self.lanes.get(worker)
        if lane is None:
            lane = self.lanes[worker] = Lane()
        return lane

    def lane_done(self, worker: Worker, lane: Lane) -> None:
        """A Call left ``lane``: kill the worker if the job now running there was given up
        while it waited; else tell whoever waits that the worker can take more."""
        calls = lane.calls
        if calls:
            head = calls[0]
            if head.abandoned and not head.raw.done():
                self.discard(worker, head)
                return
        elif not worker.alive:
            self.lanes.pop(worker, None)
        if self.listener is not None:
            self.listener.freed(self, worker)
        if self._free_waiters and (not calls or not worker.alive):
            self._wake_free()

    def when_free(self) -> asyncio.Future:
        """A future set when a worker of this host next goes idle, starts or ends, or the host changes."""
        fut = asyncio.get_running_loop().create_future()
        self._free_waiters.append(fut)
        return fut

    def _wake_free(self) -> None:
        waiters, self._free_waiters = self._free_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def discard(self, worker: Worker, culprit: "Call | None" = None) -> None:
        """Kill a worker now (``culprit``'s job overran or was given up) and free its slot;
        the slot gets a new worker when next asked for.  The jobs that waited behind the
        culprit had not started: their Calls say so (``resend``) and run elsewhere.
        Callable from callbacks: no task needed."""
        lane = self.lanes.get(worker)
        if lane is not None and lane.killed_for is None and lane.ended is None:
            lane.killed_for = culprit or (lane.calls[0] if lane.calls else None)
        worker.kill()
        slot = worker.slot
        if slot is not None and slot < len(self.workers) and self.workers[slot] is worker:
            self.workers[slot] = None

    def serves(self, worker: Worker) -> bool:
        """``worker`` is alive and still its slot's (not discarded, not of a lost connection)."""
        slot = worker.slot
        return (worker.alive and self.usable and slot is not None and slot < len(self.workers)
                and self.workers[slot] is worker)

    def slots(self) -> range:
        return range(self.nslots) if self.usable else range(0)

    def live_workers(self) -> list[Worker]:
        if not self.usable:
            return []
        return [w for w in self.workers if w is not None and w.alive]

    async def use_env(self, python: str, key: str | None = None) -> None:
        """Run later jobs with an environment's interpreter (``key``: its alias); workers of
        another one are replaced (a job running on them ends; those waiting run on the new ones)."""
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
            lane = self.lanes.get(w)
            if lane is not None and lane.killed_for is None and lane.calls:
                lane.killed_for = lane.calls[0]
            w.close()
        if old:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in old], timeout=2)
        await asyncio.gather(*(self.worker(i) for i in slots))

    # -- close ----------------------------------------------------------------------------
    def starts_running(self) -> list[asyncio.Future]:
        """The connect, reconnect and worker starts not finished yet (to cancel on close)."""
        tasks = [self.opening] if self.opening is not None and not self.opening.done() else []
        if self.reconnecting is not None and not self.reconnecting.done():
            tasks.append(self.reconnecting)
        return tasks + [t for t in self.starting.values() if not t.done()]

    def close_workers(self) -> list[Worker]:
        """End every worker's input (each exits, ending its job's processes too); the ones
        with a job still running, which the caller may give time to exit."""
        self.closed = True
        self._attempt_over(False)
        self._wake_free()
        workers = [w for w in self.workers if w is not None]
        for w in workers:
            w.close()
        return [w for w in workers if w.pending]
