"""The API for synchronous code: the ``Inventory`` with the verbs of a ``Cluster``
(``sshjobs.cluster``), each on a Cluster of its own or through a running session
(``sshjobs.session``), and ``run_sync``/``stream_sync``, the one way both the sync API and
the command line run a Cluster.  Importing it imports no SSH: the Cluster is imported
when a call runs without a session."""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import threading
from os import PathLike
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, TypeVar

from .args import map_args, seconds
from .events import Callback
from .inventory import BaseInventory
from .result import Result
from .session import Client, Stale, local_lines

if TYPE_CHECKING:
    from .cluster import Cluster
    from .stream import MapRun

T = TypeVar("T")


def __getattr__(name: str):
    if name == "Cluster":  # sshjobs.api.Cluster, as before the Cluster had a module of its own
        from .cluster import Cluster

        return Cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- synchronous code -------------------------------------------------------------------
def use_lean_executor(inventory: BaseInventory) -> None:
    """On an event loop sshjobs owns (the sync calls, the CLI): one executor thread when no
    host needs a name looked up.  asyncssh builds every connection's options in the loop's
    default executor, which started a thread per connect of a burst (up to 6 here), each
    start blocking the loop until that thread ran; building options is Python under the
    GIL, so more threads never ran it faster.  Name lookups do block: with any host name
    that is not an IP address the default pool stays (measured: cold fan-out of 10 lab
    hosts, 12 runs, 0.540 -> 0.532 s)."""
    import asyncio
    import concurrent.futures

    if all(_is_ip(h.address) for h in inventory.hosts):
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sshjobs"))


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def run_loop(inventory: BaseInventory, main: Callable[[], Awaitable[T]], /) -> T:
    """Run ``main()`` on an event loop of sshjobs' own, from synchronous code.

    Inside a running loop (a notebook's, or sync code called from a coroutine) that loop is
    held up by this call, so ``main()`` runs on a loop in a thread of its own.  Ctrl-C then
    does what it does from plain code: ``main()`` is cancelled at once (the Cluster closes,
    which ends the remote jobs) and KeyboardInterrupt is raised once that is done."""

    import asyncio

    async def go() -> T:
        use_lean_executor(inventory)
        return await main()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    return _run_in_thread(go)


CANCEL_WAIT = 10.0  # seconds Ctrl-C waits for a cancelled call to close its Cluster


def _run_in_thread(go: Callable[[], Awaitable[T]]) -> T:
    import asyncio
    import concurrent.futures

    lock = threading.Lock()
    running: dict[str, Any] = {"stop": False, "task": None}

    async def guarded() -> T:
        with lock:
            if running["stop"]:  # interrupted before it began
                raise asyncio.CancelledError
            running["loop"], running["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await go()

    # Not `with ThreadPoolExecutor()`: its exit waits for the thread, i.e. for the jobs.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sshjobs-loop")
    try:
        done = pool.submit(asyncio.run, guarded())
        with _sigint_raises():
            try:
                return done.result()
            except KeyboardInterrupt:
                with lock:
                    running["stop"] = True
                    if running["task"] is not None:
                        try:
                            running["loop"].call_soon_threadsafe(running["task"].cancel)
                        except RuntimeError:  # that loop has closed: the call is over
                            pass
                try:
                    done.result(timeout=CANCEL_WAIT)
                except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the cleanup
                    raise
                except BaseException:  # CancelledError (or the call's own end): it is over
                    pass
                raise
    finally:
        pool.shutdown(wait=False)


class _sigint_raises:
    """While a sync call waits on the main thread: Ctrl-C raises KeyboardInterrupt there.

    Only asyncio.run's own handler is set aside: it would just cancel the running loop's
    main task, which cannot run before this call returns (a second Ctrl-C would be needed).
    Python's default handler and a program's own are kept."""

    def __enter__(self):
        self.saved = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if getattr(getattr(handler, "func", None), "__qualname__", "") == "Runner._on_sigint":
                self.saved = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            signal.signal(signal.SIGINT, self.saved)


def run_sync(inventory: BaseInventory, work: Callable[[Cluster], Awaitable[T]], /, **cluster_options: Any) -> T:
    """``work(cluster)`` on a Cluster of ``inventory`` made for it and closed after it: the
    one way synchronous code (the sync API, every CLI command) runs a Cluster.  Not
    ``async with``: gather and map start each host's jobs as soon as it is up.
    ``cluster_options`` go to ``Cluster`` (its keywords; the first two are positional only,
    so no keyword is taken from them)."""

    async def main() -> T:
        from .cluster import Cluster

        cluster = Cluster(inventory, **cluster_options)
        try:
            return await work(cluster)
        finally:
            await cluster.close()

    return run_loop(inventory, main)


_END = object()


def stream_sync(inventory: BaseInventory, start: Callable[[Cluster], Awaitable[MapRun]], /,
                **cluster_options: Any) -> Iterator[Result]:
    """A generator of the Results of ``start(cluster)``'s map run, on a Cluster of ``inventory``
    made for it on an event loop in a thread of its own: the hosts work on while the
    caller's loop body runs, and the run reads its input only as far ahead of what the
    generator has handed out as it allows.  Closing the generator (or an exception in
    it) cancels the run, which kills the jobs still running, and closes the Cluster."""
    import asyncio

    out: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()
    running: dict[str, Any] = {"stop": False}

    async def main() -> None:
        with lock:
            if running["stop"]:  # closed before it began
                out.put(_END)
                return
            running["loop"], running["task"] = asyncio.get_running_loop(), asyncio.current_task()
        use_lean_executor(inventory)
        from .cluster import Cluster

        cluster = Cluster(inventory, **cluster_options)
        failure: Exception | None = None
        try:
            run = await start(cluster)
            running["run"] = run
            try:
                while (batch := await run.next_batch()) is not None:
                    out.put(batch)
            finally:
                await run.close()
        except Exception as exc:
            failure = exc
        finally:
            with lock:
                running["over"] = True  # before the consumer hears: one that leaves then must not cancel the close
            if failure is not None:
                out.put(failure)
            await cluster.close()
            out.put(_END)

    def on_loop(fn: Callable, *args: Any) -> None:
        try:
            running["loop"].call_soon_threadsafe(fn, *args)
        except (KeyError, RuntimeError):  # not begun, or the loop has ended: the run is over
            pass

    def drive() -> None:
        try:  # asyncio.run: the tasks a closing Cluster leaves (the kills of cancelled jobs) run to their end
            asyncio.run(main())
        except asyncio.CancelledError:  # closed by the consumer
            pass

    def results() -> Iterator[Result]:
        thread = threading.Thread(target=drive, name="sshjobs-imap", daemon=True)
        thread.start()
        try:
            with _sigint_raises():
                while (got := out.get()) is not _END:
                    if isinstance(got, BaseException):
                        raise got
                    yield from got
                    on_loop(running["run"].consumed, len(got))
        finally:
            with lock:
                running["stop"] = True
                if "task" in running and not running.get("over"):
                    on_loop(running["task"].cancel)
            thread.join(CANCEL_WAIT)

    return results()


class Inventory(BaseInventory):
    """An ordered set of hosts (``Inventory.load(path)``, ``Inventory.from_hosts(...)``) and
    the verbs to run on them from synchronous code, each on a Cluster of its own.

    ``on_event`` (progress, see ``sshjobs.events``) and ``safe_results`` are sshjobs'
    own keywords (``trace`` too, see ``Cluster``); ``gather`` passes every other keyword to ``fn``."""

    def connect(self, *, connect_concurrency: int = 64, start_timeout: float = 60.0,
                on_output: Callable | None = None, on_event: Callback | None = None,
                offline: bool | None = None, safe_results: bool | Iterable[str] | None = None,
                requirements: str | PathLike | Iterable[str] | None = None, preload: Iterable[str] = (),
                trace: str | PathLike | None = None) -> Cluster:
        """``async with inv.connect() as cluster:`` connections and workers that live across calls
        (the options: see ``Cluster``)."""
        from .cluster import Cluster

        return Cluster(self, connect_concurrency=connect_concurrency, start_timeout=start_timeout,
                       on_output=on_output, on_event=on_event, offline=offline, safe_results=safe_results,
                       requirements=requirements, preload=preload, trace=trace)

    def gather(self, fn: Callable, /, *args: Any, timeout: float | None = None,
               requirements: str | PathLike | Iterable[str] | None = None,
               safe_results: bool | Iterable[str] | None = None, on_event: Callback | None = None,
               progress: bool = False, trace: str | PathLike | None = None, **kwargs: Any) -> list[Result]:
        """Run ``fn(*args, **kwargs)`` once on every host; a list of Result in inventory order
        (``trace``: write the run to this file, see ``Cluster``)."""
        client = self._session(trace)
        if client is not None:
            try:
                results = client.gather(fn, args, kwargs, timeout=seconds("timeout", timeout),
                                        requirements=requirements, safe_results=safe_results, on_event=on_event)
            except Stale:
                pass
            else:
                if progress:
                    list(_counted([results], len(results), "gather"))
                return results
        return run_sync(self, lambda c: c.gather(fn, *args, timeout=timeout, requirements=requirements,
                                                 safe_results=safe_results, progress=progress, **kwargs),
                        on_event=on_event, trace=trace)

    def map(self, fn: Callable, iterable: Iterable, /, *, chunksize: int | None = None,
            timeout: float | None = None, retries: int = 0,
            requirements: str | PathLike | Iterable[str] | None = None,
            safe_results: bool | Iterable[str] | None = None, on_event: Callback | None = None,
            journal: str | PathLike | None = None, resume: bool = True, progress: bool = False,
            trace: str | PathLike | None = None) -> list[Result]:
        """Run ``fn(item)`` for every item over all slots; a list of Result in input order
        (the keywords: see ``Cluster.map``; ``trace``: write the run to this file, see ``Cluster``)."""
        batches = self._session_map(fn, iterable, trace, on_event, progress, ordered=True, chunksize=chunksize,
                                    timeout=timeout, retries=retries, requirements=requirements,
                                    safe_results=safe_results, journal=journal, resume=resume)
        if batches is not None:
            return [r for batch in batches for r in batch]
        return run_sync(self, lambda c: c.map(fn, iterable, chunksize=chunksize, timeout=timeout, retries=retries,
                                              requirements=requirements, safe_results=safe_results, journal=journal,
                                              resume=resume, progress=progress),
                        on_event=on_event, trace=trace)

    def imap(self, fn: Callable, iterable: Iterable, /, *, ordered: bool = True, chunksize: int | None = None,
             timeout: float | None = None, retries: int = 0,
             requirements: str | PathLike | Iterable[str] | None = None,
             safe_results: bool | Iterable[str] | None = None, on_event: Callback | None = None,
             journal: str | PathLike | None = None, resume: bool = True, progress: bool = False,
             trace: str | PathLike | None = None) -> Iterator[Result]:
        """``for r in inv.imap(fn, items)``: ``map``'s Results as they arrive (see ``Cluster.imap``),
        from a generator.  The hosts work on while the loop's body runs; leaving the loop
        (``break``, an exception, or ``close()``) kills the jobs still running and closes the
        connections."""
        map_args(chunksize, timeout, retries)  # a bad argument raises here, not at the first next()
        batches = self._session_map(fn, iterable, trace, on_event, progress, ordered=ordered, chunksize=chunksize,
                                    timeout=timeout, retries=retries, requirements=requirements,
                                    safe_results=safe_results, journal=journal, resume=resume)
        if batches is not None:
            return (r for batch in batches for r in batch)
        return stream_sync(self, lambda c: c._start_map(fn, iterable, ordered=ordered, chunksize=chunksize,
                                                        timeout=timeout, retries=retries, requirements=requirements,
                                                        safe_results=safe_results, journal=journal, resume=resume,
                                                        progress=progress),
                           on_event=on_event, trace=trace)

    def install(self, requirements: str | PathLike | Iterable[str], /, *, offline: bool | None = None,
                uv: str | None = None, on_event: Callback | None = None) -> list[Result]:
        """Install requirements in a cached uv environment on every host (see ``Cluster.install``);
        a list of Result in inventory order.  This Inventory's later calls (and Clusters from
        its ``connect``) run in that environment."""
        done: list[list[str]] = []
        client = self._session()
        if client is not None:
            try:
                results, installed = client.call("install", local_lines(requirements), offline=offline, uv=uv,
                                                 on_event=on_event)
            except Stale:
                pass
            else:
                self.installed = installed
                return results

        async def work(cluster: Cluster) -> list[Result]:
            results = await cluster.install(requirements, offline=offline, uv=uv)
            done.append(cluster.installed)
            return results

        results = run_sync(self, work, on_event=on_event)
        if done:
            self.installed = done[0]
        return results

    def list_envs(self, *, on_event: Callback | None = None) -> list[Result]:
        """The sshjobs environments on every host; a list of Result in inventory order."""
        return self._call("list_envs", (), on_event)

    def prune_envs(self, older_than: str | float = "7d", *, on_event: Callback | None = None) -> list[Result]:
        """Remove environments unused for ``older_than`` (e.g. "7d") on every host."""
        return self._call("prune_envs", (older_than,), on_event)

    def put(self, local_path: str | PathLike, remote_dir: str | PathLike, /, *,
            on_event: Callback | None = None) -> list[Result]:
        """Copy a local file or folder into ``remote_dir`` on every host (see ``Cluster.put``)."""
        return self._call("put", (os.path.abspath(local_path), remote_dir), on_event)

    def get(self, remote_path: str | PathLike, local_dir: str | PathLike, /, *,
            on_event: Callback | None = None) -> list[Result]:
        """Copy a file or folder from every host into ``local_dir/<host name>/`` (see ``Cluster.get``)."""
        return self._call("get", (remote_path, os.path.abspath(local_dir)), on_event)

    def sync(self, local_dir: str | PathLike, remote_dir: str | PathLike, /, *, delete: bool = False,
             on_event: Callback | None = None) -> list[Result]:
        """Send the files of ``local_dir`` whose content differs to ``remote_dir`` on every host
        (see ``Cluster.sync``)."""
        return self._call("sync", (os.path.abspath(local_dir), remote_dir, delete), on_event)

    # -- through a session ----------------------------------------------------------------
    def _session(self, trace: str | PathLike | None = None) -> Client | None:
        """The client of the session ``sshjobs up`` runs for this inventory's file, if one is up
        and may serve this call (a call with a ``trace`` of its own runs directly)."""
        if trace is not None or self.session is False or self.file is None:
            return None
        from .session import find

        return find(self)

    def _call(self, method: str, args: tuple, on_event: Callback | None) -> Any:
        """``cluster.METHOD(*args)``: in the session if one serves, else on a Cluster of its own."""
        client = self._session()
        if client is not None:
            try:
                return client.call(method, *args, on_event=on_event)
            except Stale:
                pass
        return run_sync(self, lambda c: getattr(c, method)(*args), on_event=on_event)

    def _session_map(self, fn: Callable, iterable: Iterable, trace, on_event: Callback | None, progress: bool,
                     **kw: Any) -> Iterator[list[Result]] | None:
        """A map's batches from the session, or None when none serves it."""
        client = self._session(trace)
        if client is None:
            return None
        try:
            batches = client.imap(fn, iterable, on_event=on_event, **kw)
        except Stale:
            return None
        if progress:
            total = len(iterable) if hasattr(iterable, "__len__") else None
            return _counted(batches, total)
        return batches


def _counted(batches: Iterable[list[Result]], total: int | None, what: str = "map") -> Iterator[list[Result]]:
    """The batches, counted on a progress bar as they pass."""
    from .progress import Progress

    bar = Progress(what, total)
    try:
        for batch in batches:
            bar.update(batch)
            yield batch
    finally:
        bar.close()
