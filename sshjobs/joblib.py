"""A joblib backend: ``import sshjobs.joblib`` registers ``"sshjobs"``.

``with joblib.parallel_config(backend="sshjobs", inventory="hosts.toml"):
Parallel(n_jobs=-1)(delayed(f)(i) for i in items)`` runs joblib's batches of tasks on
every slot of every host, through an ``sshjobs.Executor`` (``executor=`` takes one you
made; other keywords go to it: ``requirements``, ``safe_results``, ...).  ``n_jobs=-1`` (the
default) is every slot of the hosts that are up; joblib sizes its batches from the
durations it sees, as with its process backends.  The Executor made from ``inventory``
lives for one ``Parallel`` call (or one ``with Parallel(...) as parallel:`` block, whose
calls share its connections) and closes at its end; one passed as ``executor=`` stays
open, for the caller to shut down.

On the host a batch is a plain loop over its tasks (joblib itself is not needed there,
unless the tasks use it); a task's exception is raised by ``Parallel`` as a
``RemoteError`` of the task's own exception class (see ``sshjobs.RemoteError``).
"""

from __future__ import annotations

import threading
import weakref
from os import PathLike
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from .executor import Executor
from .inventory import BaseInventory
from .scheduler import ship_local_code


def run_batch(tasks: list) -> list:
    """On the host: joblib's ``(func, args, kwargs)`` tasks of one batch, in order."""
    return [func(*args, **kwargs) for func, args, kwargs in tasks]


# the hosts have no sshjobs to import it from; cloudpickle sends a __main__ function by value
run_batch.__module__ = "__main__"


class SshjobsBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackend over an ``sshjobs.Executor``."""

    default_n_jobs = -1
    supports_retrieve_callback = True  # results come back through future callbacks
    supports_timeout = True
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, inventory: BaseInventory | str | PathLike | None = None, *, executor: Executor | None = None,
                 nesting_level: int | None = None, inner_max_num_threads: int | None = None, **cluster_options: Any):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if (inventory is None) == (executor is None):
            raise TypeError('the "sshjobs" joblib backend takes an inventory (an Inventory or its path)'
                            ' or an executor (an sshjobs.Executor), one of the two:'
                            ' joblib.parallel_config(backend="sshjobs", inventory="hosts.toml")')
        if executor is not None and cluster_options:
            raise TypeError(f"options for a new Executor given with executor=: {sorted(cluster_options)}")
        if inventory is not None and not isinstance(inventory, BaseInventory):
            from .api import Inventory

            inventory = Inventory.load(inventory)  # a bad file is an error here, not at the first call
        self.inventory = inventory
        self.cluster_options = cluster_options
        self.own = executor is None  # made here: closed at the end of each Parallel call
        self.executor: Executor | None = executor
        self._lock = threading.Lock()
        self._pending: set = set()

    def _executor(self) -> Executor:
        with self._lock:
            if self.executor is None:
                self.executor = ex = Executor(self.inventory, **self.cluster_options)
                weakref.finalize(self, ex.shutdown, wait=True, cancel_futures=True)  # a backend dropped mid-call
            return self.executor

    def configure(self, n_jobs=1, parallel=None, **backend_kwargs):
        self.parallel = parallel
        self._executor()  # connects now: the hosts that are up give n_jobs=-1 its number
        return self.effective_n_jobs(n_jobs)

    def terminate(self) -> None:
        """The end of a Parallel call (or of ``with Parallel(...)``): an Executor made here
        closes its connections; the next call makes a new one."""
        with self._lock:
            ex, self.executor = (self.executor, None) if self.own else (None, self.executor)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        if self.executor is not None:
            slots = self.executor.slots()
        elif all(isinstance(h.slots, int) for h in self.inventory.hosts):  # outside a call: connect for no count
            slots = sum(h.slots for h in self.inventory.hosts)
        else:
            slots = self._executor().slots()
        return max(slots + 1 + n_jobs, 1)

    def submit(self, func, callback=None):
        # the tasks' functions travel inside the batch: the user's own modules go by value,
        # as a job's function does
        for task in {id(t[0]): t[0] for t in func.items}.values():
            ship_local_code(task)
        future = self._executor().submit(run_batch, func.items)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.discard(future)

    def retrieve_result_callback(self, future):
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or joblib's timeout passed): the batches not done are cancelled,
        which kills those already running on their hosts."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.cancel()


register_parallel_backend("sshjobs", SshjobsBackend)
