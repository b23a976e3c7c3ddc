"""Scheduling: pickling a job, the one path that sends it to a worker and turns the reply
into Results (``Call``), which worker takes what (``least_loaded``), and ``MapRun``."""

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
import time
import types
import weakref
from collections import deque
from typing import Any, Awaitable, Callable, NamedTuple, Sequence

import cloudpickle

from .errors import (PicklingError, ProtocolError, RemoteError, SshjobsError, Timeout, WorkerLost)
from .hosts import HostState
from .remote import protocol
from .result import Result, failed, failure
from .worker import AllOk, Worker, decode_results, dumps

DEPTH = 4  # MAP jobs in flight per worker, so tiny items are not bound by round trips
MAX_CHUNK = 2048


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
        raise PicklingError(f"cannot pickle the function: {type(exc).__name__}: {exc}") from None
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
        return [failure(host, ProtocolError.kind, f"cannot decode the result: {exc}", job=i, attempts=attempts)
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
    if not outputs and all([d.ok for d in decoded]):
        results = [Result(host, True, d.value, None, d.stdout, d.stderr, d.duration, attempts, index)
                   for index, d in zip(indices, decoded)]
        decoded = ()
    else:
        results = []
    for item, (index, d) in enumerate(zip(indices, decoded)):
        so, se = d.stdout, d.stderr
        if outputs:
            out = outputs.get((item, protocol.STDOUT))
            err = outputs.get((item, protocol.STDERR))
            so = out.text(so) if out else so
            se = err.text(se) if err else se
        if d.ok:
            results.append(Result(host, True, d.value, None, so, se, d.duration, attempts, index))
        elif isinstance(d.value, SshjobsError):  # decoded badly here (unpicklable, unsafe)
            d.value.host = host
            results.append(Result(host, False, None, d.value, so, se, d.duration, attempts, index))
        else:
            etype, msg, tb = d.value
            if fn is not None and "<dynamic-code>" in tb:
                tb = enrich_traceback(tb, code_files(fn))
            results.append(Result(host, False, None, RemoteError(etype, msg, tb, host), so, se, d.duration,
                                  attempts, index))
    if len(results) < len(indices):  # a job that errored before its items ran
        first = results[0] if results else failure(host, ProtocolError.kind, "no result")
        for index in indices[len(results):]:
            results.append(Result(host, False, None, first.error, "", "", 0.0, attempts, index))
    return results


def timeout_failure(host: str, timeout: float | None, index: int, attempts: int = 1) -> Result:
    return failed(Timeout(f"the job did not finish within {timeout:g}s; its process on the host was killed"),
                  host, job=index, attempts=attempts)


def worker_failure(exc: BaseException, host: str, index: int, attempts: int = 1) -> Result:
    """The Result of a job whose worker or host failed under it."""
    if isinstance(exc, SshjobsError):
        return failed(exc, host, job=index, attempts=attempts)
    return failure(host, type(exc).__name__, str(exc), job=index, attempts=attempts)


def pickling_failure(exc: BaseException, host: str, index: int = 0, what: str = "the arguments") -> Result:
    return failed(PicklingError(f"cannot pickle {what}: {type(exc).__name__}: {exc}"), host, job=index)


def chunk_size(n: int, workers: int) -> int:
    """Big enough to amortise a frame, small enough to balance load (about 8 per worker)."""
    if workers <= 0:
        return 1
    return max(1, min(MAX_CHUNK, n // (workers * 8) or 1))


class Call:
    """One job sent to one worker, the only way a job is sent: gather, submit, ping and map
    all go through it.  ``out`` is a future of its Result (``one``) or of a list of Results
    (a MAP chunk, one per index).

    On ``timeout`` the job fails with Timeout and the worker is killed; when the caller
    gives up (cancels ``out``) a job still running is killed, so none runs on unseen.
    ``error`` is what failed under it (a lost worker or host) for a caller that may retry;
    with ``report_errors`` False the caller reports those Results itself.

    One object per job rather than closures and their cells: with 10,000 submits in
    flight the cyclic GC's re-scans of those objects were half of the submit path's CPU.
    """

    __slots__ = ("state", "worker", "fn", "indices", "attempt", "loads", "timeout", "raw", "out", "timer",
                 "error", "one", "report_errors")

    def __init__(self, state: HostState, worker: Worker, kind: int, fn: Callable, fn_bytes: bytes, body,
                 indices: Sequence[int], *, timeout: float | None = None, loads=None, attempt: int = 1,
                 one: bool = True, report_errors: bool = True):
        self.raw = worker.send(kind, fn_bytes, body, len(indices))  # raises if the body does not pickle
        self.state = state
        self.worker = worker
        self.fn = fn
        self.indices = indices
        self.attempt = attempt
        self.loads = loads
        self.timeout = timeout
        self.error: BaseException | None = None
        self.one = one
        self.report_errors = report_errors
        loop = asyncio.get_running_loop()
        self.out: asyncio.Future = loop.create_future()
        self.timer = None
        state.events.running(state.name, indices[0], len(indices))
        self.raw.add_done_callback(self.done)
        self.out.add_done_callback(self.given_up)
        if timeout is not None:
            self.timer = loop.call_later(timeout, self.expired)

    def _settle(self, results: list[Result], report: bool = True) -> None:
        if report:
            self.state.events.done(self.state.name, results)
        self.out.set_result(results[0] if self.one else results)

    def done(self, f: asyncio.Future) -> None:
        if self.timer is not None:
            self.timer.cancel()
        exc = None if f.cancelled() else f.exception()  # retrieved even when nobody waits
        if self.out.done():
            return
        if f.cancelled():
            self.out.cancel()
            return
        host = self.state.name
        if exc is not None:
            self.error = exc
            self._settle([worker_failure(exc, host, i, self.attempt) for i in self.indices], self.report_errors)
        else:
            raw, outputs = f.result()
            self._settle(make_results(self.worker, raw, outputs, self.indices, self.attempt, self.loads, self.fn))

    def expired(self) -> None:
        if not self.raw.done() and not self.out.done():
            self._settle([timeout_failure(self.state.name, self.timeout, i, self.attempt) for i in self.indices])
            self.state.discard(self.worker)

    def given_up(self, o: asyncio.Future) -> None:
        if o.cancelled() and not self.raw.done():  # the caller gave up: kill the job
            self.state.discard(self.worker)


async def call(state: HostState, slot: int, fn: Callable, fn_bytes: bytes, body, index: int, *,
               timeout: float | None = None, loads=None) -> Result:
    """``fn`` on one slot of a host (its worker started if needed): one Result."""
    worker = await state.worker(slot)
    if worker is None:
        return state.failure(index)
    try:
        job = Call(state, worker, protocol.CALL, fn, fn_bytes, body, (index,), timeout=timeout, loads=loads)
    except Exception as exc:
        return pickling_failure(exc, state.name, index)
    return await job.out


async def ping(state: HostState, rounds: int, timeout: float | None) -> Result:
    """An empty job's round trip through slot 0's worker, ``rounds`` times: the median."""
    fn_bytes = pickle_function(int)  # a builtin: nothing to ship, nothing to import
    body = dumps(((), {}))
    times = []
    result = state.failure(state.index)
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        result = await call(state, 0, int, fn_bytes, body, state.index, timeout=timeout, loads=state.loads)
        if not result.ok:
            return result
        times.append(time.perf_counter() - t0)
    result.value = sorted(times)[len(times) // 2]
    result.duration = sum(times)
    return result


def least_loaded(workers: list[Worker]) -> Worker | None:
    best = None
    for w in workers:
        if w.alive and (best is None or w.in_flight < best.in_flight):
            best = w
            if w.in_flight == 0:
                break
    return best


class Chunk(NamedTuple):
    """A range of a map's items waiting to run.  ``alone``: a suspect of killing a worker,
    run with nothing else in flight on its worker so that a death points at its culprit."""

    start: int
    end: int
    attempt: int
    alone: bool


class MapRun:
    """One ``map``: a queue of Chunks, one pump per slot, Results by index.

    ``ready(state)`` waits until a host is up (the Cluster's start); ``loads(state)`` is a
    host's results' unpickler."""

    def __init__(self, hosts: list[HostState], ready: Callable[[HostState], Awaitable[bool]], fn: Callable,
                 fn_bytes: bytes, items: list, *, chunksize: int | None, timeout: float | None, retries: int,
                 loads: Callable[[HostState], Callable | None]):
        self.hosts = hosts
        self.ready = ready
        self.loads = loads
        self.fn = fn
        self.fn_bytes = fn_bytes
        self.items = items
        self.results: list[Result | None] = [None] * len(items)
        self.timeout = timeout
        self.retries = retries
        self.chunksize = chunksize
        self.queue: deque[Chunk] = deque()
        self.last_host = "-"
        self.last_error: Result | None = None
        self.wake = asyncio.Event()
        self.finished = asyncio.Event()
        self.outstanding = 0  # jobs sent and not yet answered, over all pumps
        # With a timeout each job is one item and runs alone, so the clock is its own.
        self.depth = 1 if timeout else DEPTH

    async def run(self) -> list[Result]:
        n = len(self.items)
        if n == 0:
            return []
        # Hosts still starting count with their inventory's slots ("auto" hosts are started).
        nslots = sum(s.nslots if s.up else int(s.host.slots) for s in self.hosts if s.error is None)
        size = self.chunksize or (1 if self.timeout else chunk_size(n, max(1, nslots)))
        for start in range(0, n, size):
            self.queue.append(Chunk(start, min(n, start + size), 1, False))
        # Few jobs: one pump must not take several while other slots stay idle.
        self.depth = max(1, min(self.depth, -(-len(self.queue) // max(1, nslots))))
        # A pump per host: its slots' pumps start when the host is up; a pump whose worker
        # dies replaces it.
        pumps = [asyncio.create_task(self.host_pump(state)) for state in self.hosts]
        try:
            await asyncio.gather(*pumps)
        finally:
            for p in pumps:
                p.cancel()
        self.fail_rest()
        return self.results  # type: ignore[return-value]

    async def host_pump(self, state: HostState) -> None:
        # Wait for the host (its start, its environment), unless the others finish every item first.
        up = asyncio.ensure_future(self.ready(state))
        finished = asyncio.ensure_future(self.finished.wait())
        try:
            await asyncio.wait((up, finished), return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
            up.cancel()  # the host's start goes on (shielded); this map does not wait
        if not up.done() or up.cancelled() or up.exception() is not None:
            return
        if not up.result():
            self.note_lost(state)
            return
        if not state.usable:
            self.note_lost(state)
            return
        await asyncio.gather(*(self.pump(state, slot) for slot in state.slots()))

    def note_lost(self, state: HostState) -> None:
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

    async def pump(self, state: HostState, slot: int) -> None:
        inflight: dict[asyncio.Future, tuple[Chunk, Call]] = {}
        try:
            await self._pump(state, slot, inflight)
        except asyncio.CancelledError:
            # The map was cancelled: the jobs still running are killed (Call.given_up).
            for fut in inflight:
                fut.cancel()
            raise

    async def _pump(self, state: HostState, slot: int, inflight: dict) -> None:
        loads = self.loads(state)
        while True:
            worker = await state.worker(slot)
            if worker is None:  # the host is gone; others take the work
                self.note_lost(state)
                break
            while self.queue and len(inflight) < self.depth and worker.alive:
                if inflight and (self.queue[0].alone or any(c.alone for c, _ in inflight.values())):
                    break
                chunk = self.queue.popleft()
                job = self.send(state, worker, chunk, loads)
                if job is not None:
                    inflight[job.out] = (chunk, job)
                    self.outstanding += 1
                    if chunk.alone:
                        break
            if not inflight:
                if not self.queue and self.outstanding == 0:
                    self.finished.set()
                    break
                # Others still hold work that may come back for a retry.
                self.wake.clear()
                await self.wake.wait()
                continue
            done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                chunk, job = inflight.pop(fut)
                self.outstanding -= 1
                got = fut.result()
                if job.error is None:  # results, or a timeout (never tried again)
                    self.results[chunk.start:chunk.end] = got
                elif not chunk.alone and isinstance(job.error, WorkerLost):
                    # The worker died under this job or one beside it: run its items again one
                    # by one, each alone on its worker (same attempt), so only the item that
                    # kills a worker fails and the others still run.
                    self.queue.extend(Chunk(i, i + 1, chunk.attempt, True) for i in range(chunk.start, chunk.end))
                elif chunk.attempt <= self.retries:
                    self.queue.append(chunk._replace(attempt=chunk.attempt + 1))
                else:
                    self.results[chunk.start:chunk.end] = got
                    self.last_error = got[-1]
                    state.events.done(state.name, got)
            self.wake.set()
        # A pump that stops hands its unfinished work back.
        for chunk, _ in inflight.values():
            self.outstanding -= 1
            self.queue.append(chunk)
        self.wake.set()

    def send(self, state: HostState, worker: Worker, chunk: Chunk, loads) -> Call | None:
        start, end = chunk.start, chunk.end
        try:
            return Call(state, worker, protocol.MAP, self.fn, self.fn_bytes, (self.items[start:end],),
                        range(start, end), timeout=self.timeout, loads=loads, attempt=chunk.attempt, one=False,
                        report_errors=False)
        except Exception:
            pass
        # Something in the chunk does not pickle: fail just those items, send the rest.
        for i in range(start, end):
            try:
                dumps((self.items[i],))
            except Exception as exc:
                self.results[i] = pickling_failure(exc, state.name, i, f"item {i}")
            else:
                self.queue.append(Chunk(i, i + 1, chunk.attempt, False))
        return None
