"""Scheduling: which worker runs what, turning raw worker replies into Results."""

from __future__ import annotations

import asyncio
import gc
import inspect
import linecache
import os
import re
import site
import sys
import sysconfig
import types
import weakref
from collections import deque
from typing import Any, Callable, Sequence

import cloudpickle

from .remote import protocol as remote
from .result import RemoteError, Result, failure
from .worker import AllOk, Worker, WorkerError, decode_results, dumps

DEPTH = 4  # MAP jobs in flight per worker, so tiny items are not bound by round trips
MAX_CHUNK = 2048


class PickleFailure(Exception):
    def __init__(self, what: str, exc: BaseException):
        super().__init__(f"cannot pickle the {what}: {type(exc).__name__}: {exc}")
        self.what = what
        self.message = str(self)


_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for p in {*(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")), *site.getsitepackages()}
)
_BY_VALUE: set[str] = set()
_BY_REF: set[str] = {"__main__", "builtins", "sshjobs"}


def ship_local_code(obj: Any) -> None:
    """Make cloudpickle ship the user's own modules by value.

    cloudpickle pickles a function from an importable module by reference, which a
    bare host cannot import.  Modules that are not installed (not in the stdlib or a
    site-packages folder) are the user's code: register their top-level package for
    pickling by value, and do the same for modules the function refers to by name.
    """
    candidates = [obj, *(getattr(obj, "__globals__", {}).get(n) for n in getattr(getattr(obj, "__code__", None), "co_names", ()))]
    for cand in candidates:
        modname = cand.__name__ if inspect.ismodule(cand) else getattr(cand, "__module__", None)
        if not isinstance(modname, str):
            continue
        top = modname.partition(".")[0]
        if top in _BY_VALUE or top in _BY_REF:
            continue
        module = sys.modules.get(top)
        path = getattr(module, "__file__", None)
        if module is None or not path or os.path.realpath(path).startswith(_INSTALLED):
            _BY_REF.add(top)
            continue
        cloudpickle.register_pickle_by_value(module)
        _BY_VALUE.add(top)


_DYNAMIC_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+), in (\S+)$')


def code_files(fn: Any) -> dict[str, str]:
    """Function name -> source file, for the code cloudpickle ships (it blanks file names)."""
    found: dict[str, str] = {}
    seen: set[int] = set()

    def walk(code):
        if id(code) in seen:
            return
        seen.add(id(code))
        found.setdefault(code.co_name, code.co_filename)
        for const in code.co_consts:
            if inspect.iscode(const):
                walk(const)

    code = getattr(fn, "__code__", None)
    if code is None:
        return found
    walk(code)
    for name in code.co_names:
        ref = getattr(fn, "__globals__", {}).get(name)
        if inspect.isfunction(ref):
            walk(ref.__code__)
    return found


def enrich_traceback(tb: str, files: dict[str, str]) -> str:
    """Put back file names and source lines in a remote traceback, from the controller's copy."""
    if "<dynamic-code>" not in tb or not files:
        return tb
    out = []
    for line in tb.splitlines(keepends=True):
        m = _DYNAMIC_FRAME.match(line.rstrip("\n"))
        path = m and files.get(m.group(2))
        if m and path:
            out.append(f'  File "{path}", line {m.group(1)}, in {m.group(2)}\n')
            src = linecache.getline(path, int(m.group(1))).strip()
            if src:
                out.append(f"    {src}\n")
        else:
            out.append(line)
    return "".join(out)


_IMMUTABLE = frozenset({int, float, str, bytes, bool, type(None), complex})
_NOT_CACHED = object()
# function -> (fingerprint, pickled bytes): submitting the same function again reuses its bytes
_PICKLED: "weakref.WeakKeyDictionary[Callable, tuple]" = weakref.WeakKeyDictionary()


def _code_names(code, names: set) -> None:
    names.update(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            _code_names(const, names)


def _frozen(value):
    """A comparable snapshot of a value that cannot change behind our back, else _NOT_CACHED."""
    t = type(value)
    if t in _IMMUTABLE:
        return (t, value)
    if t is tuple:
        items = tuple(_frozen(v) for v in value)
        return _NOT_CACHED if _NOT_CACHED in items else (t, items)
    if t is types.BuiltinFunctionType:
        return (t, id(value))
    if t is types.ModuleType:  # only modules pickled by reference: the user's own ship their state
        top = value.__name__.partition(".")[0]
        if top in _BY_REF and top != "__main__":
            return (t, id(value))
    return _NOT_CACHED


def _fingerprint(fn):
    """What cloudpickle would ship for a plain function, if all of it is immutable; else None.

    A function's pickle holds its code, defaults, closure cells and the globals its code
    names.  Reusing the bytes is only right while none of those can have changed, so only
    functions whose cells, defaults and referenced globals are immutable values, modules
    or builtins are cached (a cell holding a list, say, is pickled afresh every time).
    """
    if type(fn) is not types.FunctionType or fn.__dict__:
        return None
    code = fn.__code__
    parts = [id(code), _frozen(fn.__defaults__), _frozen(tuple((fn.__kwdefaults__ or {}).items()))]
    for cell in fn.__closure__ or ():
        try:
            parts.append(_frozen(cell.cell_contents))
        except ValueError:  # an empty cell
            return None
    names: set = set()
    _code_names(code, names)
    g = fn.__globals__
    parts.extend(_frozen(g.get(n)) if n in g else ("builtin", n) for n in sorted(names))
    if _NOT_CACHED in parts:
        return None
    return (code, tuple(parts))


def pickle_function(fn: Callable) -> bytes:
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    ship_local_code(fn)
    try:
        fp = _fingerprint(fn)
    except Exception:
        fp = None
    if fp is not None:
        hit = _PICKLED.get(fn)
        if hit is not None and hit[0] == fp:
            return hit[1]
    try:
        data = cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise PickleFailure("function", exc) from None
    if fp is not None:
        _PICKLED[fn] = (fp, data)
    return data


def make_results(worker: Worker, raw, outputs, indices: Sequence[int], attempts: int = 1,
                 loads=None, fn: Any = None) -> list[Result]:
    """Raw RESULT payload of a CALL or MAP job -> Results for the given job indices."""
    host = worker.host.name
    try:
        decoded = decode_results(raw, loads)
    except Exception as exc:  # a broken frame: never silently lose the jobs
        return [failure(host, "ProtocolError", f"cannot decode the result: {exc}", job=i, attempts=attempts)
                for i in indices]
    if not outputs and type(decoded) is AllOk:  # a chunk of quiet successes, kept tight for map
        # Thousands of new objects at once: one young-generation collection after them
        # rather than one every 700, so millions of Results do not keep waking the
        # cyclic GC's older generations (60% of map's controller CPU otherwise).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return [Result(host, True, value, None, "", "", took, attempts, index)
                    for index, value, took in zip(indices, decoded.values, decoded.durations)]
        finally:
            if enabled:
                gc.enable()
    if not outputs and all([d[0] for d in decoded]):
        results = [Result(host, True, value, None, so, se, took, attempts, index)
                   for index, (_, value, so, se, took) in zip(indices, decoded)]
        decoded = ()
    else:
        results = []
    for item, (index, (ok, value, so, se, took)) in enumerate(zip(indices, decoded)):
        if outputs:
            out = outputs.get((item, remote.STDOUT))
            err = outputs.get((item, remote.STDERR))
            so = out.text(so) if out else so
            se = err.text(se) if err else se
        if ok:
            results.append(Result(host, True, value, None, so, se, took, attempts, index))
        else:
            etype, msg, tb = value
            if fn is not None and "<dynamic-code>" in tb:
                tb = enrich_traceback(tb, code_files(fn))
            results.append(Result(host, False, None, RemoteError(etype, msg, tb, host), so, se, took, attempts, index))
    if len(results) < len(indices):  # a job that errored before its items ran
        first = results[0] if results else failure(host, "ProtocolError", "no result")
        for index in indices[len(results):]:
            results.append(Result(host, False, None, first.error, "", "", 0.0, attempts, index))
    return results


def timeout_failure(host: str, timeout: float | None, index: int, attempts: int = 1) -> Result:
    return failure(host, "Timeout", f"the job did not finish within {timeout:g}s; its process on the host"
                   " was killed", job=index, attempts=attempts)


def worker_failure(worker: Worker | None, host: str, exc: BaseException, index: int, attempts: int = 1) -> Result:
    if isinstance(exc, WorkerError):
        return failure(host, exc.kind, exc.message, job=index, attempts=attempts)
    if isinstance(exc, asyncio.TimeoutError):
        return failure(host, "Timeout", "the job did not finish in time", job=index, attempts=attempts)
    return failure(host, type(exc).__name__, str(exc), job=index, attempts=attempts)


def chunk_size(n: int, workers: int) -> int:
    """Big enough to amortise a frame, small enough to balance load (about 8 per worker)."""
    if workers <= 0:
        return 1
    return max(1, min(MAX_CHUNK, n // (workers * 8) or 1))


class MapRun:
    """One ``map``: a queue of index ranges, one pump per worker, results by index."""

    def __init__(self, cluster, fn: Callable, fn_bytes: bytes, items: list, *, chunksize: int | None,
                 timeout: float | None, retries: int, exclude: set | None = None,
                 loads: Callable | None = None):
        self.cluster = cluster
        self.exclude = exclude or set()  # host indices that take no items (their install failed)
        self.loads = loads or (lambda state: state.loads)  # HostState -> the results' unpickler
        self.fn = fn
        self.fn_bytes = fn_bytes
        self.items = items
        self.results: list[Result | None] = [None] * len(items)
        self.timeout = timeout
        self.retries = retries
        self.chunksize = chunksize
        # (start, end, attempt, alone); "alone" jobs are suspects of killing a worker: each
        # runs with nothing else in flight on its worker, so a death points at its culprit.
        self.queue: deque[tuple[int, int, int, bool]] = deque()
        self.last_host = "-"
        self.last_error: Result | None = None
        self.wake = asyncio.Event()
        self.outstanding = 0  # jobs sent and not yet answered, over all pumps
        # With a timeout each job is one item and runs alone, so the clock is its own.
        self.depth = 1 if timeout else DEPTH

    async def run(self) -> list[Result]:
        n = len(self.items)
        if n == 0:
            return []
        hosts = [s for s in self.cluster.states if s.index not in self.exclude]
        # Hosts still starting count with their inventory's slots ("auto" hosts are started).
        nslots = sum(s.nslots if s.opening is None or s.opening.done() else int(s.host.slots)
                     for s in hosts if s.error is None)
        size = self.chunksize or (1 if self.timeout else chunk_size(n, max(1, nslots)))
        for start in range(0, n, size):
            self.queue.append((start, min(n, start + size), 1, False))
        # Few jobs: one pump must not take several while other slots stay idle.
        self.depth = max(1, min(self.depth, -(-len(self.queue) // max(1, nslots))))
        self.finished = asyncio.Event()
        # A pump per host: its slots' pumps start when the host is up; a pump whose worker
        # dies replaces it.
        pumps = [asyncio.create_task(self.host_pump(state)) for state in hosts]
        try:
            await asyncio.gather(*pumps)
        finally:
            for p in pumps:
                p.cancel()
        self.fail_rest()
        return self.results  # type: ignore[return-value]

    async def host_pump(self, state) -> None:
        if state.opening is not None and not state.opening.done():
            # Wait for the host, unless the others finish every item first.
            up = asyncio.ensure_future(self.cluster.ready(state))
            finished = asyncio.ensure_future(self.finished.wait())
            try:
                await asyncio.wait((up, finished), return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
                up.cancel()  # the host's start goes on (shielded); this map does not wait
            if not up.done() or up.cancelled() or up.exception() is not None:
                return
        if not state.usable:
            self.note_lost(state)
            return
        await asyncio.gather(*(self.pump(state, slot) for slot in range(state.nslots)))

    def note_lost(self, state) -> None:
        """A host that failed gives the items no host could run their error, if none yet."""
        if state.error is not None and self.last_error is None:
            self.last_error = state.failure()

    def fail_rest(self) -> None:
        for i, r in enumerate(self.results):
            if r is None:
                if self.last_error is not None and self.last_error.error is not None:
                    e = self.last_error.error
                    self.results[i] = failure(self.last_error.host, e.type, e.message, job=i,
                                              attempts=self.last_error.attempts)
                else:
                    self.results[i] = failure(self.last_host, "NoHosts", "no host could run this job", job=i)

    async def pump(self, state, slot: int) -> None:
        inflight: dict[asyncio.Future, tuple[int, int, int, Worker, bool]] = {}
        try:
            await self._pump(state, slot, inflight)
        except asyncio.CancelledError:
            # The map was cancelled: kill the jobs still running, none may go on unseen.
            for fut, (_, _, _, w, _) in inflight.items():
                if not fut.done():
                    fut.cancel()
                    self.cluster.discard_worker(state, slot, w)
            raise

    async def _pump(self, state, slot: int, inflight: dict) -> None:
        loads = self.loads(state)
        while True:
            worker = await self.cluster.worker_for(state, slot)
            if worker is None:  # the host is gone; others take the work
                self.note_lost(state)
                break
            while self.queue and len(inflight) < self.depth and worker.alive:
                if inflight and (self.queue[0][3] or any(job[4] for job in inflight.values())):
                    break
                start, end, attempt, alone = self.queue.popleft()
                fut = self.send(worker, start, end, attempt)
                if fut is not None:
                    inflight[fut] = (start, end, attempt, worker, alone)
                    self.outstanding += 1
                    self.cluster._emit_running(state.name, start, end - start)
                    if alone:
                        break
            if not inflight:
                if not self.queue and self.outstanding == 0:
                    self.finished.set()
                    break
                # Others still hold work that may come back for a retry.
                self.wake.clear()
                await self.wake.wait()
                continue
            done, _ = await asyncio.wait(inflight, timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:  # timed out: the job (one item) fails and the worker is replaced
                for fut, (start, end, attempt, w, _) in inflight.items():
                    for i in range(start, end):
                        self.results[i] = timeout_failure(w.host.name, self.timeout, i, attempt)
                    self.outstanding -= 1
                    fut.cancel()
                    self.cluster._emit_done(state.name, self.results[start:end])
                inflight.clear()
                self.cluster.discard_worker(state, slot, worker)
                self.wake.set()
                continue
            for fut in done:
                start, end, attempt, w, alone = inflight.pop(fut)
                self.outstanding -= 1
                exc = fut.exception()
                if exc is None:
                    raw, outputs = fut.result()
                    got = make_results(w, raw, outputs, range(start, end), attempt, loads, self.fn)
                    if len(got) == end - start:  # always, by make_results' contract
                        self.results[start:end] = got
                    else:
                        for r in got:
                            self.results[r.job] = r
                    self.cluster._emit_done(state.name, got)
                elif not alone and isinstance(exc, WorkerError) and exc.kind == "WorkerLost":
                    # The worker died under this job or one beside it: run its items again one
                    # by one, each alone on its worker (same attempt), so only the item that
                    # kills a worker fails and the others still run.
                    self.queue.extend((i, i + 1, attempt, True) for i in range(start, end))
                elif attempt <= self.retries:
                    self.queue.append((start, end, attempt + 1, alone))
                else:
                    for i in range(start, end):
                        self.results[i] = self.last_error = worker_failure(w, w.host.name, exc, i, attempt)
                    self.cluster._emit_done(state.name, self.results[start:end])
            self.wake.set()
        # A pump that stops hands its unfinished work back.
        for fut, (start, end, attempt, w, alone) in inflight.items():
            self.outstanding -= 1
            self.queue.append((start, end, attempt, alone))
        self.wake.set()

    def send(self, worker: Worker, start: int, end: int, attempt: int):
        chunk = self.items[start:end]
        try:
            return worker.send(remote.MAP, self.fn_bytes, (chunk,), end - start)
        except Exception:
            pass
        # Something in the chunk does not pickle: fail just those items, send the rest.
        good = []
        for i in range(start, end):
            try:
                dumps((self.items[i],))
                good.append(i)
            except Exception as exc:
                self.results[i] = failure(worker.host.name, "PicklingError",
                                          f"cannot pickle item {i}: {type(exc).__name__}: {exc}", job=i)
        for i in good:
            self.queue.append((i, i + 1, attempt, False))
        return None


def least_loaded(workers: list[Worker]) -> Worker | None:
    best = None
    for w in workers:
        if w.alive and (best is None or w.in_flight < best.in_flight):
            best = w
            if w.in_flight == 0:
                break
    return best

