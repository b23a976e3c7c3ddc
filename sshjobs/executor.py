"""A ``concurrent.futures.Executor`` over a Cluster: ``sshjobs.Executor(inventory)``.

The Cluster lives on an event loop in a thread the Executor owns; ``submit`` hands each job
to it and returns a ``concurrent.futures.Future``.  A future stays pending until its Result
is back (``running()`` is never True): so ``cancel()`` works until then, and kills the job
on its host when it has started (``Cluster.submit``'s cancel), or drops it from the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from os import PathLike
from typing import Any, Callable

from .api import Inventory, use_lean_executor
from .cluster import Cluster
from .inventory import BaseInventory


class Executor(concurrent.futures.Executor):
    """``with sshjobs.Executor("hosts.toml") as ex: ex.submit(fn, *args).result()``.

    ``inventory``: an Inventory or the path of an inventory file; ``cluster_options`` go to
    ``Cluster`` (``requirements``, ``on_event``, ``safe_results``, ...).  ``submit(fn, *args,
    **kwargs)`` takes sshjobs' own ``timeout`` and ``safe_results`` as ``Cluster.submit``
    does; a future's ``result()`` is the job's value, and its exception the Result's error
    (a job's own exception raised as a RemoteError that is also of the job's exception
    class, see ``sshjobs.RemoteError``).  Safe to use from several threads at once."""

    def __init__(self, inventory: BaseInventory | str | PathLike, **cluster_options: Any):
        inv = inventory if isinstance(inventory, BaseInventory) else Inventory.load(inventory)
        self.inventory = inv
        self._cluster = Cluster(inv, **cluster_options)  # checks the options here, in the caller's thread
        self._lock = threading.Lock()
        self._shutdown = False
        self._futures: set[concurrent.futures.Future] = set()
        self._closed = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="sshjobs-executor", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(use_lean_executor, self.inventory)
        self._loop.run_forever()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._futures.add(future)
        future.add_done_callback(self._forget)
        self._loop.call_soon_threadsafe(self._start, future, fn, args, kwargs)
        return future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _start(self, future: concurrent.futures.Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        """On the loop: the job into the Cluster's queue, its Result into ``future``.

        A cancelled future must still be told so (``set_running_or_notify_cancel``, exactly
        once), else ``concurrent.futures.wait`` never counts it done; ``claim`` does that
        once, on this loop, whichever of the Result and the cancel comes first."""
        if future.cancelled():
            future.set_running_or_notify_cancel()
            return
        try:
            job = self._cluster.submit(fn, *args, **kwargs)
        except BaseException as exc:  # an argument check, or the Cluster closed meanwhile
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            return
        claimed = False

        def claim() -> bool:
            nonlocal claimed
            if claimed:
                return False
            claimed = True
            return future.set_running_or_notify_cancel()

        def settle(job: asyncio.Future) -> None:
            if job.cancelled() or not claim():
                return
            result = job.result()
            if result.ok:
                future.set_result(result.value)
            else:
                future.set_exception(result.error)

        def cancel() -> None:
            job.cancel()  # kills it on its host, or drops it from the queue
            claim()

        def done(f: concurrent.futures.Future) -> None:  # in the thread that cancelled
            if f.cancelled():
                self._loop.call_soon_threadsafe(cancel)

        job.add_done_callback(settle)
        future.add_done_callback(done)

    def slots(self) -> int:
        """How many jobs run at once: the slots of the hosts that are up, connecting to
        every host first (and setting up the Cluster's environment) if that is not done."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot connect after shutdown")

        async def count() -> int:
            await asyncio.shield(self._cluster._environments())  # the start a submit waits for, once
            return sum(len(state.slots()) for state in self._cluster.hosts)

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; with ``cancel_futures`` every job not done is cancelled (killed
        on its host); then the Cluster closes, once the rest are done (``wait``: before this
        returns, else in the background)."""
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            self._close(futures)
        else:
            threading.Thread(target=self._close, args=(futures,), name="sshjobs-executor-close", daemon=True).start()

    def _close(self, futures: list[concurrent.futures.Future]) -> None:
        concurrent.futures.wait(futures)
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._cluster.close(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
