"""A ``Cluster``: connections and workers on every host of an inventory, its lifecycle and
the verbs (gather, map, imap, submit, ping, install, files), for async code."""

from __future__ import annotations

import asyncio
import copy
from os import PathLike
from pathlib import Path
from traceback import format_exception
from typing import Any, AsyncIterator, Callable, Iterable

from . import provisioning, safe, transfer
from . import trace as tracing
from .args import count as _count, map_args, seconds as _seconds
from .errors import ClusterClosed, ConfigError, HostError, InstallError, PicklingError
from .events import Callback, Events
from .hosts import HostState
from .inventory import BaseInventory
from .log import get_logger
from .result import Result, failed
from .journal import open_for
from .scheduler import Dispatcher, not_started, pickle_function, pickling_failure
from .scheduler import ping as ping_host
from .stream import MapRun
from .worker import Worker, dumps

log = get_logger("sshjobs.cluster")


class Cluster:
    """Connections and workers on every host of an inventory, for many calls.

    ``async with inventory.connect() as cluster:`` then ``await cluster.gather(fn)``,
    ``await cluster.map(fn, items)``, ``await cluster.submit(fn, *args)``; files with
    ``put``, ``get`` and ``sync``.
    ``on_event(host_name, event, info)`` hears progress (see ``sshjobs.events``).
    ``trace``: a file the run is written to as it closes, every connect, worker start,
    install and job with its outcome per host and slot, in the Chrome trace format
    (``sshjobs.trace``; open it in Perfetto or draw it with ``sshjobs timeline``).
    ``requirements``: every call (``submit`` too) runs in their environment, installed
    where missing; the workers start straight in it where it exists.  ``preload``: modules
    every worker imports as it starts, before the first job (with each host's inventory
    ``preload``); one that does not import there is skipped (logged at INFO).

    A Cluster lives on the event loop of its first call (one ``asyncio.run``); once closed,
    or called from another loop, its methods raise ``ClusterClosed``.  Arguments are checked
    before anything is contacted: a wrong type raises TypeError, a value out of range
    ``ConfigError`` (a ValueError).
    """

    def __init__(self, inventory: BaseInventory, *, connect_concurrency: int = 64,
                 start_timeout: float = 60.0, on_output: Callable | None = None,
                 on_event: Callback | None = None, offline: bool | None = None,
                 safe_results: bool | Iterable[str] | None = None,
                 requirements: str | PathLike | Iterable[str] | None = None, preload: Iterable[str] = (),
                 trace: str | PathLike | None = None):
        connect_concurrency = _count("connect_concurrency", connect_concurrency, 1)
        start_timeout = _seconds("start_timeout", start_timeout)
        self.inventory = inventory
        # the run's trace file, if asked for: a second listener of the events
        self.trace = None if trace is None else tracing.Recorder(trace, [h.name for h in inventory.hosts])
        self.events = Events(on_event, self.trace)
        # safe_results (API or inventory): results decoded by the restricted unpickler.
        self.safe_results = safe_results
        self.states = [HostState(h, i, self.events, start_timeout=start_timeout, on_output=on_output,
                                 loads=safe.resolve(safe_results, h.safe_results), preload=preload)
                       for i, h in enumerate(inventory.hosts)]
        self.connect_concurrency = connect_concurrency
        self.offline = offline  # None: each host's inventory `offline`
        # Requirement lines every call runs in, with each host's inventory `requirements`:
        # the Cluster's own, what its Inventory installed before, and what it installs.
        own = provisioning.requirement_lines(requirements) if requirements is not None else []
        self.installed: list[str] = provisioning.merge_requirements(getattr(inventory, "installed", ()), own)
        self._started = False
        self._closed = False
        self._slots_task: asyncio.Task | None = None
        self._env_task: asyncio.Future | None = None  # start(): every host in the environment
        self._env_ready = False  # submit sends straight to the queue
        self._start_task: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first call
        # The controller's queue: submit, gather and ping jobs go to a worker when it can take them.
        self.dispatcher = Dispatcher(self.states, self._loads)

    @property
    def on_event(self) -> Callback | None:
        return self.events.on_event

    @on_event.setter
    def on_event(self, callback: Callback | None) -> None:
        self.events.on_event = callback

    @property
    def hosts(self) -> list[HostState]:
        if self._loop is not None and self._loop.is_closed() and not self._closed:
            for state in self.states:  # its event loop ended, and its connections with it
                state.closed = True
        return self.states

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> "Cluster":
        self._check_open()
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> "Cluster":
        """Connect to every host (bounded concurrency) and start one worker on each, in the
        Cluster's environment where it has one (installed where missing; a host whose install
        fails has failed); returns when every host is up or has failed (``async with``)."""
        self._check_loop()
        await self._connect()
        specs = self._specs()
        if any(specs):
            downloads = provisioning.WheelDownloads()

            async def one(state: HostState, spec) -> None:
                bad = await self._in_env(state, spec, downloads)
                if bad is not None and isinstance(bad.error, HostError):
                    state.fail(bad.error)

            try:
                await asyncio.gather(*(one(s, spec) for s, spec in zip(self.states, specs)))
            finally:
                downloads.cleanup()
        return self

    async def _connect(self) -> None:
        self._begin()
        # Every caller waits for the same start: one arriving while it runs (a submit
        # made before the first await) must not see a cluster with no workers yet.
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    def _begin(self) -> None:
        """Start connecting every host, without waiting.  ``gather`` and ``map`` on a Cluster
        not started yet (the one-shot ``Inventory.gather``/``map``, the CLI) send a host its
        jobs as soon as that host is up rather than after the slowest host."""
        if self._start_task is None and not self._closed:
            self._started = True
            provisioning.want(self.states, self._specs())  # the first workers try its environment
            sem = asyncio.Semaphore(self.connect_concurrency)
            for state in self.states:
                state.opening = asyncio.ensure_future(state.open(sem, provisioning.match_python))
            # return_exceptions: a start cut short by close() is no error for anyone to retrieve
            self._start_task = asyncio.ensure_future(
                asyncio.gather(*(s.opening for s in self.states), return_exceptions=True))

    async def ready(self, state: HostState) -> bool:
        """Wait until one host is connected with its first worker up (or has failed).  A host
        whose connection dropped is tried again now (it reconnects in the background too)."""
        self._begin()
        if state.opening is not None:  # None: closed before it ever started
            await asyncio.shield(state.opening)
        if state.lost is not None and not state.closed:
            state.reconnect_now()
            await asyncio.shield(state.next_attempt())
        return state.usable

    async def close(self) -> None:
        """Stop every worker (end of input makes each exit) and close the connections; then
        write the trace file, if there is one (also when the closing fails or is cancelled)."""
        if self._closed:
            return
        try:
            await self._shut_down()
        finally:
            if self.trace is not None:
                try:
                    self.trace.write()
                except OSError as exc:  # never hide the run's own outcome behind the trace's
                    log.warning("cannot write the trace", path=str(self.trace.path), error=str(exc))

    async def _shut_down(self) -> None:
        self._closed = True
        self.dispatcher.close()  # jobs still waiting for a worker fail
        for state in self.states:
            state.closed = True  # from now on no host reconnects or starts a worker
        if self._slots_task:
            self._slots_task.cancel()
        if self._env_task and not self._env_task.done():
            self._env_task.cancel()  # the jobs waiting for it fail as closed
        # Hosts still connecting (a one-shot map that finished without a slow host).
        starts = [t for s in self.states for t in s.starts_running()]
        for task in starts:
            task.cancel()
        if starts:
            await asyncio.wait(starts)
        # End of input makes each worker exit and end its process group (the job's children
        # too).  A worker with a job still running gets up to 2 s to do that over its
        # connection before the connections close; an idle one just exits, so nothing waits
        # for it (that wait was ~15 ms of every one-shot call).
        busy = [w for s in self.states for w in s.close_workers()]
        if busy:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in busy], timeout=2)
        links = [s.link for s in self.states if s.link]
        for link in links:
            link.close()
        await asyncio.gather(*(link.wait_closed() for link in links), return_exceptions=True)

    def view(self, names: Iterable[str] | None) -> "Cluster":
        """This Cluster over some of its hosts (``names``; None: all of them), sharing its
        connections, workers and queue: what a session runs a ``--limit`` call on.  Its
        ``installed`` is its own, so that an install through it changes nothing else."""
        picked = copy.copy(self)
        if names is not None:
            wanted = set(names)
            picked.states = [s for s in self.states if s.name in wanted]
        picked.installed = list(self.installed)
        return picked

    def live_workers(self) -> list[Worker]:
        return [w for s in self.states for w in s.live_workers()]

    async def ensure_slots(self) -> None:
        """Start every slot's worker (the first per host starts with the connection)."""
        self._check_loop()
        await self._environments()
        await asyncio.gather(*(s.worker(i) for s in self.states for i in s.slots()))

    def _environments(self) -> asyncio.Future:
        """``start()``, once: every host connected, and in the Cluster's environment where it
        has one (a submit waits for that, rather than run in a worker without it)."""
        if self._env_task is None:
            self._env_task = asyncio.ensure_future(self.start())
        return self._env_task

    # -- environments -------------------------------------------------------------
    async def install(self, requirements: str | PathLike | Iterable[str], *, offline: bool | None = None,
                      uv: str | None = None) -> list[Result]:
        """Make ``requirements`` importable on every host, for every later call of this Cluster:
        a uv environment under the host's workdir, cached by content, holding them with what
        was installed before and the host's inventory ``requirements`` (a later line for the
        same project replaces an earlier one).  One Result per host (inventory order) whose
        value is a dict: ``env``, ``python``, ``hash``, ``cached``, ``uv`` (how uv was
        obtained: path, workdir, uploaded, pip, venv-pip; None if cached).

        ``requirements``: a list of requirement strings or a requirements file's path.
        ``offline``: ship wheels from the controller (default: the Cluster's, else each
        host's inventory setting).  ``uv``: force one way of getting uv (see README).
        """
        self._check_open()
        lines = provisioning.requirement_lines(requirements)
        specs = self._specs(lines)
        self._begin()
        results = await provisioning.install(self.states, specs, self.ready,
                                             offline=self.offline if offline is None else offline, uv=uv)
        if any(r.ok for r in results):
            self.installed = provisioning.merge_requirements(self.installed, lines)
        return results

    def _specs(self, call: list[str] | None = None) -> list[provisioning.EnvSpec | None]:
        """Each host's environment for a call: its inventory ``requirements``, what this
        Cluster installed, and the call's own; None where there are none."""
        memo: dict[tuple, provisioning.EnvSpec | None] = {}
        specs = []
        for state in self.states:
            own = state.host.requirements
            if own not in memo:
                lines = provisioning.merge_requirements(own, self.installed, call)
                memo[own] = provisioning.EnvSpec.parse(lines) if lines else None
            specs.append(memo[own])
        return specs

    def _call_specs(self, requirements) -> list[provisioning.EnvSpec | None]:
        specs = self._specs(provisioning.requirement_lines(requirements) if requirements is not None else None)
        provisioning.want(self.states, specs)  # before the first workers start: they try it
        return specs

    async def _in_env(self, state: HostState, spec: provisioning.EnvSpec | None,
                      downloads: provisioning.WheelDownloads) -> Result | None:
        """Before a call's jobs on a host: None when its workers run in the call's environment
        (installed first if missing), else the failed install's Result."""
        if spec is None:
            return None
        offline = state.host.offline if self.offline is None else self.offline
        return await provisioning.ensure_env(state, spec, self.ready, offline=offline, downloads=downloads)

    async def list_envs(self) -> list[Result]:
        """Environments on every host (see ``provisioning.list_envs``)."""
        self._check_open()
        await self._connect()
        return await provisioning.list_envs(self.states)

    async def prune_envs(self, older_than: str | float = "7d") -> list[Result]:
        """Remove environments unused for ``older_than`` on every host (see ``provisioning.prune_envs``)."""
        self._check_open()
        await self._connect()
        return await provisioning.prune_envs(self.states, older_than)

    # -- files --------------------------------------------------------------------
    async def put(self, local_path: str | PathLike, remote_dir: str | PathLike) -> list[Result]:
        """Copy a local file, or a folder and everything under it, into ``remote_dir`` on every
        host (created if missing; a relative path is under the host's home), over SFTP, every
        host at once.  One Result per host (inventory order) whose value is a dict: ``files``,
        ``bytes``, ``remote`` (where it arrived).  A missing ``local_path`` raises
        ``ConfigError`` before anything is contacted; a host where the copy fails (a path not
        allowed, a full disk) gets a ``TransferError`` Result and the others finish."""
        self._check_open()
        source = transfer.local_path(local_path)
        remote = transfer.remote_path(remote_dir, "remote_dir")
        self._begin()
        return await transfer.put(self.states, self.ready, source, remote)

    async def get(self, remote_path: str | PathLike, local_dir: str | PathLike) -> list[Result]:
        """Copy a file or folder from every host into ``local_dir/<host name>/`` (created if
        missing).  One Result per host (inventory order) whose value is a dict: ``files``,
        ``bytes``, ``local`` (the copy's path); a host without ``remote_path`` (or not
        allowed to read it) gets a ``TransferError`` Result."""
        self._check_open()
        remote = transfer.remote_path(remote_path, "remote_path")
        if not isinstance(local_dir, (str, PathLike)) or not str(local_dir):
            raise TypeError(f"local_dir must be a path (str or os.PathLike), not {local_dir!r}")
        local = Path(local_dir).expanduser()
        if local.exists() and not local.is_dir():
            raise ConfigError(f"{local_dir}: not a folder on the controller")
        self._begin()
        return await transfer.get(self.states, self.ready, remote, local)

    async def sync(self, local_dir: str | PathLike, remote_dir: str | PathLike, delete: bool = False) -> list[Result]:
        """Make ``remote_dir`` on every host hold the files of ``local_dir``, sending only those
        whose content differs from the host's copy (sha256, computed on the host); ``delete``
        also removes there what ``local_dir`` does not have.  One Result per host (inventory
        order) whose value is a dict: ``files`` and ``bytes`` sent, ``unchanged``,
        ``deleted``, ``remote``.  A missing ``local_dir`` raises ``ConfigError`` before anything
        is contacted."""
        self._check_open()
        source = transfer.local_path(local_dir, "local_dir")
        if not source.is_dir():
            raise ConfigError(f"{local_dir}: not a folder (sync copies a folder's files; put copies a file)")
        remote = transfer.remote_path(remote_dir, "remote_dir")
        tree = transfer.scan(source)
        self._begin()
        return await transfer.sync(self.states, self.ready, tree, remote, delete=bool(delete))

    # -- jobs ---------------------------------------------------------------------
    def _loads(self, state: HostState, safe_results) -> Callable | None:
        if safe_results is None or safe_results is False:
            return state.loads
        return safe.resolve(safe_results, self.safe_results, state.host.safe_results)

    async def gather(self, fn: Callable, /, *args: Any, timeout: float | None = None,
                     requirements: str | PathLike | Iterable[str] | None = None,
                     safe_results: bool | Iterable[str] | None = None, progress: bool = False,
                     **kwargs: Any) -> list[Result]:
        """``fn(*args, **kwargs)`` once on every host; Results in inventory order.

        ``timeout`` (seconds per host: its connect and worker start count, an install of
        ``requirements`` does not), ``requirements`` (installed first, see ``install``;
        a host whose install failed gets that failure instead of running ``fn``),
        ``safe_results`` (see sshjobs.safe) and ``progress`` (a progress bar) are sshjobs'
        own; every other keyword goes to ``fn``.
        """
        timeout = _seconds("timeout", timeout)
        self._check_open()
        try:
            fn_bytes = pickle_function(fn)
            body = dumps((args, kwargs))  # once: every host's frame shares these bytes
        except PicklingError as exc:
            return [failed(PicklingError(exc.message), s.name, job=s.index) for s in self.states]
        except Exception as exc:
            return [pickling_failure(exc, s.name, s.index) for s in self.states]
        return await self._gather(fn, fn_bytes, body, timeout, requirements, safe_results, progress)

    async def _gather(self, fn: Callable, fn_bytes: bytes, body, timeout: float | None, requirements,
                      safe_results, progress: bool) -> list[Result]:
        """``gather`` of a function and arguments pickled already (here, or by a session's client)."""
        specs = self._call_specs(requirements)
        self._begin()  # each host's job goes as soon as that host is up
        downloads = provisioning.WheelDownloads()

        loop = asyncio.get_running_loop()

        async def one(state: HostState, spec) -> Result:
            t0 = loop.time()
            if timeout is not None:  # the host's connect and first worker's start count
                try:
                    await asyncio.wait_for(self.ready(state), timeout)  # the start itself goes on
                except asyncio.TimeoutError:
                    return not_started(timeout, state, state.index)
            paused = loop.time()
            bad = await self._in_env(state, spec, downloads)
            if bad is not None:
                return failed(bad.error, state.name, job=state.index)
            if not await self.ready(state):  # failed, or its connection dropped and it is not back
                return state.failure(state.index)
            # the job's own run, and any worker start it waits for, take what is left
            deadline = None if timeout is None else t0 + timeout + (loop.time() - paused)
            return await self.dispatcher.submit(fn, fn_bytes, body, timeout=timeout, safe_results=safe_results,
                                                pin=state, index=state.index, deadline=deadline)

        bar = None
        if progress:
            from .progress import Progress  # rich: only for a bar

            bar = Progress("gather", len(self.states))

        async def counted(state: HostState, spec) -> Result:
            result = await one(state, spec)
            bar.update([result])  # type: ignore[union-attr]
            return result

        each = one if bar is None else counted
        try:
            return list(await asyncio.gather(*(each(s, spec) for s, spec in zip(self.states, specs))))
        finally:
            downloads.cleanup()
            if bar is not None:
                bar.close()

    async def map(self, fn: Callable, iterable: Iterable, /, *, chunksize: int | None = None,
                  timeout: float | None = None, retries: int = 0,
                  requirements: str | PathLike | Iterable[str] | None = None,
                  safe_results: bool | Iterable[str] | None = None, journal: str | PathLike | None = None,
                  resume: bool = True, progress: bool = False) -> list[Result]:
        """``fn(item)`` for each item, spread over every slot of every host; Results in input order.

        ``retries``: how many more times a job whose worker or host was lost is tried (on any host);
        items that had not started on a worker killed or lost are sent again without counting.
        ``timeout``: seconds per item (each item then runs on its own, whatever ``chunksize``);
        it counts the workers' start too while no worker of the map is up: when none starts
        within it, the items fail with Timeout.
        ``requirements``: installed first (see ``install``); hosts whose install failed take no items.
        ``safe_results``: decode results with the restricted unpickler (see sshjobs.safe).
        ``journal``: a file where every Result is committed as it arrives; the same call with
        the same journal takes the items done from it and runs the rest (``resume=False``
        starts it over; see ``sshjobs.journal``).  ``progress``: a progress bar.
        The collection of ``imap(ordered=True)``: the same engine.
        """
        run = await self._start_map(fn, iterable, ordered=True, chunksize=chunksize, timeout=timeout, retries=retries,
                                    requirements=requirements, safe_results=safe_results, journal=journal,
                                    resume=resume, progress=progress)
        results: list[Result] = []
        await run.collect(results.extend)
        return results

    def imap(self, fn: Callable, iterable: Iterable, /, *, ordered: bool = True, chunksize: int | None = None,
             timeout: float | None = None, retries: int = 0,
             requirements: str | PathLike | Iterable[str] | None = None,
             safe_results: bool | Iterable[str] | None = None, journal: str | PathLike | None = None,
             resume: bool = True, progress: bool = False) -> AsyncIterator[Result]:
        """``async for r in cluster.imap(fn, items)``: ``map``'s Results as they arrive, in input
        order, or (``ordered=False``) as they complete.

        The input is read lazily, a few chunks per slot ahead of what was taken, so a
        generator of any length runs in bounded memory; its own exception is raised here
        after the Results before it.  Leaving the loop early (``break``; the iterator is
        closed when collected, or at once with ``contextlib.aclosing``) kills the jobs
        still running and sends no more.  The keywords are ``map``'s; with no
        ``chunksize``, an input of unknown length is cut in chunks from the durations seen.
        """
        args = self._map_args(chunksize, timeout, retries)
        return self._imap(fn, iterable, ordered, args, requirements, safe_results, journal, resume, progress)

    async def _imap(self, fn, iterable, ordered, args, requirements, safe_results, journal, resume,
                    progress) -> AsyncIterator[Result]:
        run = await self._start_map(fn, iterable, ordered=ordered, chunksize=args[0], timeout=args[1],
                                    retries=args[2], requirements=requirements, safe_results=safe_results,
                                    journal=journal, resume=resume, progress=progress)
        try:
            while (batch := await run.next_batch()) is not None:
                for r in batch:
                    yield r
                run.consumed(len(batch))
        finally:
            await run.close()

    _map_args = staticmethod(map_args)

    async def _start_map(self, fn: Callable, iterable: Iterable, *, ordered: bool, chunksize, timeout, retries,
                         requirements, safe_results, journal, resume: bool, progress: bool) -> MapRun:
        """A map's run, started: its pumps take items as each host is up."""
        chunksize, timeout, retries = self._map_args(chunksize, timeout, retries)
        self._check_open()
        if not hasattr(iterable, "__aiter__"):
            iter(iterable)  # not iterable: a TypeError now, before a journal is opened
        recorded = None if journal is None else open_for(journal, fn, resume)
        fail_with = None
        try:
            fn_bytes = pickle_function(fn)
        except PicklingError as exc:
            fn_bytes, fail_with = b"", failed(PicklingError(exc.message), "-")
        specs = dict(zip((s.index for s in self.states), self._call_specs(requirements)))
        if fail_with is None:
            if any(s.host.slots == "auto" for s in self.states):
                await self.start()  # "auto" slots are known at start
            else:
                self._begin()  # each host takes items as soon as it is up
        downloads = provisioning.WheelDownloads()

        async def ready(state: HostState) -> bool:
            """Up, and running in the call's environment; a host whose install failed takes no items,
            nor one still not up when the timeout ends while no other host works for the map."""
            if timeout is not None:
                try:
                    await asyncio.wait_for(self.ready(state), timeout)  # the start itself goes on
                except asyncio.TimeoutError:
                    if not run.active:
                        run.note_slow_start(state)
                        return False
            bad = await self._in_env(state, specs[state.index], downloads)
            if bad is not None:
                if run.last_error is None:
                    run.last_error = bad
                return False
            return await self.ready(state)

        run = MapRun(self.states, ready, fn, fn_bytes, iterable, chunksize=chunksize, timeout=timeout, retries=retries,
                     loads=lambda state: self._loads(state, safe_results), waiting=self.dispatcher.waiting_for,
                     ordered=ordered, recorded=recorded, record=recorded.commit if recorded else None,
                     fail_with=fail_with, cleanup=[downloads.cleanup] + ([recorded.close] if recorded else []))
        if progress:
            from .progress import Progress

            bar = Progress("map", run.total)
            run.record = bar.recorder(run.record)
            run.cleanup.append(bar.close)
        run.start()
        return run

    async def ping(self, rounds: int = 3, timeout: float | None = None) -> list[Result]:
        """Time an empty job's round trip through every host's worker, ``rounds`` times.

        One Result per host in inventory order; ``value`` is the median round trip in seconds.
        """
        rounds = _count("rounds", rounds, 1)
        timeout = _seconds("timeout", timeout)
        self._check_open()
        await self._connect()
        return list(await asyncio.gather(*(ping_host(self.dispatcher, s, rounds, timeout) for s in self.states)))

    def submit(self, fn: Callable, /, *args: Any, timeout: float | None = None,
               safe_results: bool | Iterable[str] | None = None, **kwargs: Any) -> "asyncio.Future[Result]":
        """Run ``fn(*args, **kwargs)`` on a free worker; returns an awaitable Result.

        The job waits in the controller until a worker is free (a short job may also wait
        on a busy worker, see ``scheduler.Dispatcher``), so it never waits behind a long one
        while another worker idles.  The arguments are pickled now: later changes to them
        do not reach the job.  ``timeout`` (seconds of the job's run, and of its wait for a
        worker to start while none is up) and ``safe_results`` are sshjobs' own; other
        keywords go to ``fn``.  Cancelling the awaitable kills the job on its host (or drops
        it, if it has not started); a timeout or cancel never fails another job.
        """
        timeout = _seconds("timeout", timeout)
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            fn_bytes = pickle_function(fn)
        except PicklingError as exc:
            out = loop.create_future()
            out.set_result(failed(PicklingError(exc.message), "-"))
            return out
        try:
            body = dumps((args, kwargs))
        except Exception as exc:
            out = loop.create_future()
            out.set_result(pickling_failure(exc, "-"))
            return out
        self._begin()
        if self._slots_task is None:
            self._slots_task = asyncio.ensure_future(self.ensure_slots())
        if not self._env_ready:
            env = self._environments() if any(self._specs()) else None
            if env is not None and not env.done():
                return asyncio.ensure_future(self._submit_in_env(env, fn, fn_bytes, body, timeout, safe_results))
            self._env_ready = True
        return self.dispatcher.submit(fn, fn_bytes, body, timeout=timeout, safe_results=safe_results)

    async def _submit_in_env(self, env: asyncio.Future, fn: Callable, fn_bytes: bytes, body: bytes,
                             timeout: float | None, safe_results) -> Result:
        """A submit made while the Cluster's environment is still being set up: queued once
        it is (a host whose install failed has failed, and takes no jobs)."""
        try:
            await asyncio.shield(env)
        except asyncio.CancelledError:
            if not env.cancelled():  # this job was cancelled, not the setup (by close())
                raise
        except Exception as exc:  # a host's failure is its state; this is none of those
            return failed(InstallError(f"the environment could not be set up: {exc!r}",
                                       traceback="".join(format_exception(exc))), "-")
        self._env_ready = True
        return await self.dispatcher.submit(fn, fn_bytes, body, timeout=timeout, safe_results=safe_results)

    # -- argument and state checks ---------------------------------------------------
    def _check_open(self) -> None:
        """Refuse a call once the Cluster is closed, or from another loop than its own."""
        if self._closed:
            raise ClusterClosed("this Cluster is closed: its connections are gone; make a new one"
                                " (inventory.connect()) for more calls")
        self._check_loop()

    def _check_loop(self) -> None:
        # A Cluster's connections, tasks and futures belong to the loop they started on; used
        # from the next asyncio.run they would wait forever for that ended loop.
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            ended = ", which has ended" if self._loop.is_closed() else ""
            raise ClusterClosed(f"this Cluster started on another event loop{ended}: a Cluster lives in one"
                                " asyncio.run (or loop); make a new one on this loop")
