"""The API: a Cluster of connected hosts and their workers, and the sync wrappers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import time
from typing import Any, Callable, Iterable

from . import provisioning, safe
from .remote import protocol as remote
from .connection import ConnectError, HostLink
from .inventory import Host, Inventory
from .log import get_logger
from .result import Result, failure
from .scheduler import (MapRun, PickleFailure, least_loaded, make_results, pickle_function, timeout_failure,
                        worker_failure)
from .worker import Worker, WorkerError, dumps

log = get_logger("sshjobs.api")

MAX_START_FAILURES = 3  # consecutive worker start failures before a host is given up


class HostState:
    """One host within a Cluster: its connections, workers, and why it is unusable if it is."""

    def __init__(self, host: Host, index: int):
        self.host = host
        self.index = index
        self.link: HostLink | None = None
        self.error: tuple[str, str] | None = None  # (type, message)
        self.workers: list[Worker | None] = []
        self.nslots = 1
        self.starting: dict[int, asyncio.Task] = {}
        self.start_failures = 0
        self.loads = None  # the results' unpickler; None = pickle.loads
        self.python = host.python  # the interpreter workers run: an environment's after an install
        self.base_python = host.python  # the host's own (python = "match": the one uv found)
        self.env_python: str | None = None  # set by a successful install
        self.env: dict[str, str] = {}
        self.hello: dict = {}
        self.connect_time: float | None = None
        self.start_time: float | None = None
        self.opening: asyncio.Future | None = None  # the connect and first worker's start
        self.emit: Callable[[str, str, dict], None] | None = None  # the Cluster's on_event

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def usable(self) -> bool:
        return self.error is None and self.link is not None

    def fail(self, kind: str, message: str) -> None:
        if self.error is None:
            self.error = (kind, message)
            log.warning("host failed", host=self.name, error=kind, detail=message)
            if self.emit is not None:
                self.emit(self.name, "failed", {"error": kind, "message": message})

    def failure(self, job: int = 0) -> Result:
        kind, message = self.error or ("NotConnected", f"{self.host.target}: not connected")
        return failure(self.name, kind, message, job=job)


class Cluster:
    """Connections and workers on every host of an inventory, for many calls.

    ``async with inventory.connect() as cluster:`` then ``await cluster.gather(fn)``,
    ``await cluster.map(fn, items)``, ``await cluster.submit(fn, *args)``.

    ``on_event(host_name, event, info)`` is called as hosts and jobs progress (for live
    displays): ``connecting``; ``connected`` (info: connect_time, start_time, python);
    ``failed`` (the host is unusable; info: error, message); ``running`` when jobs are
    sent to a host (info: jobs, job = the first job's index); ``done`` when their results
    are back (info: jobs, job, ok, failed and, for one job, duration and error); installs
    add ``installing``, ``uploading-uv``, ``uploading-wheels``, ``installed`` and
    ``install-failed`` (see ``install``). It runs on the event loop and must not block; an exception in it is logged, not raised.
    """

    def __init__(self, inventory: Inventory, *, connect_concurrency: int = 64,
                 start_timeout: float = 60.0, on_output: Callable | None = None,
                 on_event: Callable[[str, str, dict], Any] | None = None, offline: bool | None = None,
                 safe_results: bool | Iterable[str] | None = None):
        self.inventory = inventory
        self.states = [HostState(h, i) for i, h in enumerate(inventory.hosts)]
        # safe_results (API or inventory): results decoded by the restricted unpickler.
        self.safe_results = safe_results
        for state in self.states:
            state.loads = safe.resolve(safe_results, state.host.safe_results)
        self.connect_concurrency = connect_concurrency
        self.start_timeout = start_timeout
        self.on_output = on_output
        self.on_event = on_event  # callback(host name, event, info): progress for the CLI
        self.offline = offline  # None: each host's inventory `offline`
        for state in self.states:
            state.emit = self.emit
        self._started = False
        self._closed = False
        self._slots_task: asyncio.Task | None = None
        self._start_task: asyncio.Future | None = None

    # -- progress events ----------------------------------------------------------
    def _emit_running(self, host: str, first: int, count: int) -> None:
        if self.on_event is not None:
            self.emit(host, "running", {"jobs": count, "job": first})

    def _emit_done(self, host: str, results: list[Result]) -> None:
        if self.on_event is None or not results:
            return
        ok = sum(1 for r in results if r.ok)
        info = {"jobs": len(results), "job": results[0].job, "ok": ok, "failed": len(results) - ok}
        if len(results) == 1:
            r = results[0]
            info["duration"] = r.duration
            info["error"] = None if r.ok else str(r.error)
        self.emit(host, "done", info)

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> "Cluster":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> "Cluster":
        """Connect to every host (bounded concurrency) and start one worker on each; returns
        when every host is up or has failed (``async with`` does this)."""
        self._begin()
        # Every caller waits for the same start: one arriving while it runs (a submit
        # made before the first await) must not see a cluster with no workers yet.
        if self._start_task is not None:
            await asyncio.shield(self._start_task)
        return self

    def _begin(self) -> None:
        """Start connecting every host, without waiting.  ``gather`` and ``map`` on a Cluster
        not started yet (the one-shot ``Inventory.gather``/``map``, the CLI) send a host its
        jobs as soon as that host is up rather than after the slowest host."""
        if self._start_task is None and not self._closed:
            self._started = True
            sem = asyncio.Semaphore(self.connect_concurrency)
            for state in self.states:
                state.opening = asyncio.ensure_future(self._open(state, sem))
            # return_exceptions: a start cut short by close() is no error for anyone to retrieve
            self._start_task = asyncio.ensure_future(
                asyncio.gather(*(s.opening for s in self.states), return_exceptions=True))

    async def ready(self, state: HostState) -> bool:
        """Wait until one host is connected with its first worker up (or has failed)."""
        self._begin()
        if state.opening is not None:  # None: closed before it ever started
            await asyncio.shield(state.opening)
        return state.usable

    async def _open(self, state: HostState, sem: asyncio.Semaphore) -> None:
        t0 = time.perf_counter()
        async with sem:
            self.emit(state.name, "connecting", {})
            try:
                state.link = await HostLink.open(state.host)
            except ConnectError as exc:
                state.fail(exc.kind, exc.message)
                return
        state.connect_time = time.perf_counter() - t0
        if state.host.python == "match":
            try:
                state.python = state.base_python = await provisioning.match_python(state)
            except provisioning.HostProvisionError as exc:
                state.fail(exc.kind, exc.message)
                return
        worker = await self.worker_for(state, 0)
        if worker is not None:
            state.hello = worker.hello
            slots = state.host.slots
            state.nslots = (worker.hello.get("cpus") or 1) if slots == "auto" else int(slots)
            self.emit(state.name, "connected", {
                "connect_time": state.connect_time, "start_time": state.start_time,
                "python": ".".join(map(str, worker.hello.get("python") or ())),
            })

    async def close(self) -> None:
        """Stop every worker (end of input makes each exit) and close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._slots_task:
            self._slots_task.cancel()
        # Hosts still connecting (a one-shot map that finished without a slow host).
        opening = [s.opening for s in self.states if s.opening is not None and not s.opening.done()]
        opening += [t for s in self.states for t in s.starting.values() if not t.done()]
        for task in opening:
            task.cancel()
        if opening:
            await asyncio.wait(opening)
        # End of input makes each worker exit and end its process group (the job's children
        # too).  A worker with a job still running gets up to 2 s to do that over its
        # connection before the connections close; an idle one just exits, so nothing waits
        # for it (that wait was ~15 ms of every one-shot call).
        workers = [w for s in self.states for w in s.workers if w is not None]
        for w in workers:
            w.close()
        busy = [w for w in workers if w.pending]
        if busy:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in busy], timeout=2)
        for s in self.states:
            if s.link:
                s.link.close()
        await asyncio.gather(*(s.link.wait_closed() for s in self.states if s.link), return_exceptions=True)

    # -- workers ------------------------------------------------------------------
    async def worker_for(self, state: HostState, slot: int) -> Worker | None:
        """The live worker of a slot, started (again) if needed; None if the host is unusable."""
        if not state.usable or self._closed:
            return None
        while len(state.workers) <= slot:
            state.workers.append(None)
        worker = state.workers[slot]
        if worker is not None and worker.alive:
            return worker
        task = state.starting.get(slot)
        if task is None:
            task = state.starting[slot] = asyncio.ensure_future(self._start_worker(state, slot))
            task.add_done_callback(lambda _t: state.starting.pop(slot, None))
        return await asyncio.shield(task)

    async def _start_worker(self, state: HostState, slot: int) -> Worker | None:
        while state.usable:
            t0 = time.perf_counter()
            worker = Worker(state.link, python=state.python, env=state.env, slots=state.host.slots,
                            on_output=self.on_output)
            try:
                await worker.start(self.start_timeout)
            except WorkerError as exc:
                state.start_failures += 1
                if exc.kind in ("PythonMismatch", "WorkerStartError", "HostLost") or \
                        state.start_failures >= MAX_START_FAILURES:
                    state.fail(exc.kind, exc.message)
                    return None
                continue
            state.start_failures = 0
            worker.state = state
            state.start_time = time.perf_counter() - t0
            state.workers[slot] = worker
            return worker
        return None

    async def replace_worker(self, state: HostState, slot: int, worker: Worker) -> None:
        """Kill a worker (its job overran or is cancelled); the slot gets a new one on demand.
        The awaitable twin of ``discard_worker``, for callers already in a coroutine."""
        self.discard_worker(state, slot, worker)

    def discard_worker(self, state: HostState, slot: int, worker: Worker) -> None:
        """Kill a worker now and free its slot; usable from callbacks (no task needed)."""
        worker.kill()
        if slot < len(state.workers) and state.workers[slot] is worker:
            state.workers[slot] = None

    def slots(self) -> list[tuple[HostState, int]]:
        return [(s, i) for s in self.states if s.usable for i in range(s.nslots)]

    def live_workers(self) -> list[Worker]:
        return [w for s in self.states if s.usable for w in s.workers if w is not None and w.alive]

    async def ensure_slots(self) -> None:
        """Start every slot's worker (the first per host starts with the connection)."""
        await self.start()
        await asyncio.gather(*(self.worker_for(s, i) for s, i in self.slots()))

    @property
    def hosts(self) -> list[HostState]:
        return self.states

    def emit(self, host: str, event: str, info: dict) -> None:
        """Tell ``on_event`` (if any) about progress; its errors never break a run."""
        if self.on_event is not None:
            try:
                self.on_event(host, event, info)
            except Exception as exc:
                log.warning("on_event callback failed", error=f"{type(exc).__name__}: {exc}")

    # -- environments -------------------------------------------------------------
    async def install(self, requirements, *, offline: bool | None = None, uv: str | None = None) -> list[Result]:
        """Make ``requirements`` importable on every host: a uv environment under the host's
        workdir, cached by content; later jobs on that host run in it.  One Result per host
        (inventory order) whose value is a dict: ``env``, ``python``, ``hash``, ``cached``,
        ``uv`` (how uv was obtained: path, workdir, uploaded, pip, venv-pip; None if cached).

        ``requirements``: a list of requirement strings or a requirements file's path.
        ``offline``: ship wheels from the controller (default: the Cluster's, else each
        host's inventory setting).  ``uv``: force one way of getting uv (see README).
        """
        await self.start()
        results = await provisioning.install(self, requirements, offline=self.offline if offline is None else offline,
                                             uv=uv)
        await asyncio.gather(*(self._use_env(s, r.value["python"]) for s, r in zip(self.states, results) if r.ok))
        return results

    async def _use_env(self, state: HostState, python: str) -> None:
        """Point the host at an environment's interpreter; workers of the old one are replaced."""
        state.env_python = python
        if state.python == python:
            return
        state.python = python
        slots = [i for i, w in enumerate(state.workers) if w is not None]
        old = [state.workers[i] for i in slots]
        state.workers = [None] * len(state.workers)
        for w in old:
            w.close()
        if old:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in old], timeout=2)
        # the same slots again, in the environment (submit() picks among live workers)
        await asyncio.gather(*(self.worker_for(state, i) for i in slots))

    async def _install_for_jobs(self, requirements) -> dict[int, Result]:
        """Install before jobs; the failed hosts' install Results by host index."""
        if requirements is None:
            return {}
        results = await self.install(requirements)
        return {s.index: r for s, r in zip(self.states, results) if not r.ok}

    async def list_envs(self) -> list[Result]:
        """Environments on every host (see ``provisioning.list_envs``)."""
        return await provisioning.list_envs(self)

    async def prune_envs(self, older_than: str | float = "7d") -> list[Result]:
        """Remove environments unused for ``older_than`` on every host (see ``provisioning.prune_envs``)."""
        return await provisioning.prune_envs(self, older_than)

    # -- jobs ---------------------------------------------------------------------
    async def gather(self, fn: Callable, /, *args: Any, timeout: float | None = None,
                     requirements=None, safe_results: bool | Iterable[str] | None = None,
                     **kwargs: Any) -> list[Result]:
        """``fn(*args, **kwargs)`` once on every host; Results in inventory order.

        ``timeout`` (seconds per job), ``requirements`` (installed first, see ``install``;
        a host whose install failed gets that failure instead of running ``fn``) and
        ``safe_results`` (see sshjobs.safe) are sshjobs' own; every other keyword goes to ``fn``.
        """
        self._begin()  # each host's job goes as soon as that host is up
        try:
            fn_bytes = pickle_function(fn)
            body = dumps((args, kwargs))  # once: every host's frame shares these bytes
        except PickleFailure as exc:
            return [failure(s.name, "PicklingError", exc.message, job=s.index) for s in self.states]
        except Exception as exc:
            msg = f"cannot pickle the arguments: {type(exc).__name__}: {exc}"
            return [failure(s.name, "PicklingError", msg, job=s.index) for s in self.states]
        failed = await self._install_for_jobs(requirements)
        return list(await asyncio.gather(
            *(self._call(s, 0, fn, fn_bytes, body, s.index, timeout, self._loads(s, safe_results))
              if s.index not in failed else _as_job(failed[s.index], s.index) for s in self.states)))

    def _loads(self, state: HostState, safe_results) -> Callable | None:
        if safe_results is None or safe_results is False:
            return state.loads
        return safe.resolve(safe_results, self.safe_results, state.host.safe_results)

    async def _call(self, state: HostState, slot: int, fn: Callable, fn_bytes: bytes, body: bytes,
                    index: int, timeout: float | None, loads=None) -> Result:
        await self.ready(state)
        worker = await self.worker_for(state, slot)
        if worker is None:
            return state.failure(index)
        self._emit_running(state.name, index, 1)
        fut = None
        try:
            fut = worker.send(remote.CALL, fn_bytes, body)
            raw, outputs = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.discard_worker(state, slot, worker)
            result = timeout_failure(state.name, timeout, index)
        except asyncio.CancelledError:
            # The caller gave up: the job must not run on unseen (nor keep the slot busy).
            if fut is not None and (fut.cancelled() or not fut.done()):  # wait_for cancels fut
                self.discard_worker(state, slot, worker)
            raise
        except Exception as exc:
            result = worker_failure(worker, state.name, exc, index)
        else:
            result = make_results(worker, raw, outputs, [index], 1, loads or state.loads, fn)[0]
        self._emit_done(state.name, [result])
        return result

    async def map(self, fn: Callable, iterable: Iterable, /, *, chunksize: int | None = None,
                  timeout: float | None = None, retries: int = 0, requirements=None,
                  safe_results: bool | Iterable[str] | None = None) -> list[Result]:
        """``fn(item)`` for each item, spread over every slot of every host; Results in input order.

        ``retries``: how many more times a job whose worker or host was lost is tried (on any host).
        ``timeout``: seconds per item (each item then runs on its own).
        ``requirements``: installed first (see ``install``); hosts whose install failed take no items.
        ``safe_results``: decode results with the restricted unpickler (see sshjobs.safe).
        """
        items = list(iterable)
        try:
            fn_bytes = pickle_function(fn)
        except PickleFailure as exc:
            return [failure("-", "PicklingError", exc.message, job=i) for i in range(len(items))]
        if requirements is not None or any(s.host.slots == "auto" for s in self.states):
            await self.start()  # an install needs every host; "auto" slots are known at start
        else:
            self._begin()  # each host takes items as soon as it is up
        failed = await self._install_for_jobs(requirements)
        run = MapRun(self, fn, fn_bytes, items, chunksize=chunksize, timeout=timeout, retries=retries,
                     exclude=set(failed), loads=(lambda state: self._loads(state, safe_results)))
        if failed:
            run.last_error = next(iter(failed.values()))
        return await run.run()

    async def ping(self, rounds: int = 3, timeout: float | None = None) -> list[Result]:
        """Time an empty job's round trip through every host's worker, ``rounds`` times.

        One Result per host in inventory order; ``value`` is the median round trip in seconds.
        """
        await self.start()
        fn_bytes = pickle_function(int)  # a builtin: nothing to ship, nothing to import

        async def one(state: HostState) -> Result:
            worker = await self.worker_for(state, 0)
            if worker is None:
                return state.failure(state.index)
            times = []
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                try:
                    raw, outputs = await asyncio.wait_for(worker.send(remote.CALL, fn_bytes, ((), {})), timeout)
                except asyncio.TimeoutError:
                    self.discard_worker(state, 0, worker)
                    return failure(state.name, "Timeout", f"no answer within {timeout:g}s", job=state.index)
                except Exception as exc:
                    return worker_failure(worker, state.name, exc, state.index)
                times.append(time.perf_counter() - t0)
                result = make_results(worker, raw, outputs, [state.index], 1, state.loads)[0]
                if not result.ok:
                    return result
            result.value = sorted(times)[len(times) // 2]
            result.duration = sum(times)
            return result

        return list(await asyncio.gather(*(one(s) for s in self.states)))

    def submit(self, fn: Callable, /, *args: Any, timeout: float | None = None,
               safe_results: bool | Iterable[str] | None = None, **kwargs: Any) -> "asyncio.Future[Result]":
        """Run ``fn(*args, **kwargs)`` on the least-loaded worker; returns an awaitable Result.

        ``timeout`` (seconds) and ``safe_results`` are sshjobs' own; other keywords go to ``fn``.
        Cancelling the awaitable kills the job on its host.
        """
        loop = asyncio.get_running_loop()
        out: asyncio.Future = loop.create_future()
        try:
            fn_bytes = pickle_function(fn)
        except PickleFailure as exc:
            out.set_result(failure("-", "PicklingError", exc.message))
            return out
        worker = least_loaded(self.live_workers()) if self._started else None
        if self._slots_task is None:
            self._slots_task = asyncio.ensure_future(self.ensure_slots())
        if worker is None:
            return asyncio.ensure_future(self._submit_later(fn, fn_bytes, args, kwargs, timeout, safe_results))
        self._send_call(worker, fn, fn_bytes, args, kwargs, out, timeout, safe_results)
        return out

    async def _submit_later(self, fn: Callable, fn_bytes: bytes, args: tuple, kwargs: dict,
                            timeout: float | None, safe_results) -> Result:
        await self.ensure_slots()  # a slot whose worker was killed (timeout, cancel) gets a new one
        worker = least_loaded(self.live_workers())
        if worker is None:
            dead = next((s for s in self.states if s.error), None)
            return dead.failure() if dead else failure("-", "NoHosts", "no host is available")
        out = asyncio.get_running_loop().create_future()
        self._send_call(worker, fn, fn_bytes, args, kwargs, out, timeout, safe_results)
        return await out

    def _send_call(self, worker: Worker, fn: Callable, fn_bytes: bytes, args: tuple, kwargs: dict,
                   out: asyncio.Future, timeout: float | None = None, safe_results=None) -> None:
        try:
            raw = worker.send(remote.CALL, fn_bytes, (args, kwargs))
        except Exception as exc:
            out.set_result(failure(worker.host.name, "PicklingError",
                                   f"cannot pickle the arguments: {type(exc).__name__}: {exc}"))
            return
        self._emit_running(worker.host.name, 0, 1)
        _Call(self, worker, fn, raw, out, self._loads(worker.state, safe_results), timeout)


class _Call:
    """One submitted job's callbacks.  One object per submit rather than four closures and
    their cells: with 10,000 submits in flight the cyclic GC's re-scans of those objects
    were half of the submit path's CPU."""

    __slots__ = ("cluster", "worker", "fn", "raw", "out", "loads", "timeout", "timer")

    def __init__(self, cluster: Cluster, worker: Worker, fn: Callable, raw: asyncio.Future,
                 out: asyncio.Future, loads, timeout: float | None):
        self.cluster = cluster
        self.worker = worker
        self.fn = fn
        self.raw = raw
        self.out = out
        self.loads = loads
        self.timeout = timeout
        self.timer = None
        raw.add_done_callback(self.done)
        out.add_done_callback(self.given_up)
        if timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self.expired)

    def kill(self) -> None:
        worker, state = self.worker, self.worker.state
        slot = state.workers.index(worker) if worker in state.workers else len(state.workers)
        self.cluster.discard_worker(state, slot, worker)

    def done(self, f: asyncio.Future) -> None:
        if self.timer is not None:
            self.timer.cancel()
        exc = None if f.cancelled() else f.exception()  # retrieved even when nobody waits
        out = self.out
        if out.done():
            return
        if f.cancelled():
            out.cancel()
            return
        worker = self.worker
        if exc is not None:
            result = worker_failure(worker, worker.host.name, exc, 0)
        else:
            raw_body, outputs = f.result()
            result = make_results(worker, raw_body, outputs, [0], 1, self.loads, self.fn)[0]
        self.cluster._emit_done(worker.host.name, [result])
        out.set_result(result)

    def expired(self) -> None:
        if not self.raw.done() and not self.out.done():
            self.out.set_result(timeout_failure(self.worker.host.name, self.timeout, 0))
            self.kill()

    def given_up(self, o: asyncio.Future) -> None:
        if o.cancelled() and not self.raw.done():  # cancelled by the caller: kill the job
            self.kill()


async def _as_job(result: Result, index: int) -> Result:
    return failure(result.host, result.error.type, result.error.message, job=index)


def use_lean_executor(inventory: Inventory) -> None:
    """On an event loop sshjobs owns (the sync calls, the CLI): one executor thread when no
    host needs a name looked up.  asyncssh builds every connection's options in the loop's
    default executor, which started a thread per connect of a burst (up to 6 here), each
    start blocking the loop until that thread ran; building options is Python under the
    GIL, so more threads never ran it faster.  Name lookups do block: with any host name
    that is not an IP address the default pool stays (measured: cold fan-out of 10 lab
    hosts, 12 runs, 0.540 -> 0.532 s)."""
    if all(_is_ip(h.address) for h in inventory.hosts):
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sshjobs"))


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def run_sync(inventory: Inventory, method: str, *args: Any, cluster_options: dict | None = None,
             **kwargs: Any) -> Any:
    """Run one Cluster call from synchronous code (also inside a running event loop)."""

    async def go():
        use_lean_executor(inventory)
        # Not `async with`: gather and map start each host's jobs as soon as it is up.
        cluster = Cluster(inventory, **(cluster_options or {}))
        try:
            return await getattr(cluster, method)(*args, **kwargs)
        finally:
            await cluster.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    # Called from a running loop (a notebook, say): run in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()
