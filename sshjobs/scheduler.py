"""Scheduling: pickling a job, the one path that sends it to a worker and turns the reply
into Results (``Call``), the controller's queue that decides which worker takes what and
when (``Dispatcher``: submit, gather, ping); a map's own engine is ``stream.MapRun``."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections import deque
from typing import Any, Awaitable, Callable, Sequence


from .errors import (HostLost, NoHosts, NotConnected, PicklingError, ProtocolError, RemoteError, SshjobsError, Timeout,
                     WorkerLost, remote_error)
from .hosts import HostState, Lane
from .remote import protocol
from .result import Result, failed, failure
from .pickling import code_files, dumps, enrich_traceback, pickle_function, ship_local_code  # noqa: F401  (the scheduler's own words)
from .worker import AllOk, Worker, decode_results

DEPTH = 4  # MAP jobs in flight per worker, so tiny items are not bound by round trips
MAX_CHUNK = 2048


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
            etype, msg, tb = d.value[:3]
            module = d.value[3] if len(d.value) > 3 else None
            if len(d.value) > 4 and d.value[4]:
                msg = f"{msg} ({load_hint(d.value[4])})"
            if fn is not None and "<dynamic-code>" in tb:
                tb = enrich_traceback(tb, code_files(fn))
            results.append(Result(host, False, None, remote_error(etype, msg, tb, host, module), so, se,
                                  d.duration, attempts, index))
    if len(results) < len(indices):  # a job that errored before its items ran
        first = results[0] if results else failure(host, ProtocolError.kind, "no result")
        for index in indices[len(results):]:
            results.append(Result(host, False, None, first.error, "", "", 0.0, attempts, index))
    return results


def load_hint(hint: dict) -> str:
    """What a host's failure to unpickle a job's function or arguments means, from the
    package it missed and the versions of it here and there."""
    what, package = hint.get("loading", "arguments"), hint.get("package", "?")
    mine = getattr(sys.modules.get(package), "__version__", None)
    mine = mine if isinstance(mine, str) else None
    if not hint.get("installed"):
        return (f"the job's {what} need {package}, which this host cannot import: install it there"
                f" (requirements=[{package + '==' + mine if mine else package!r}]), or, for a module of your"
                f" own, have cloudpickle send it by value (cloudpickle.register_pickle_by_value)")
    theirs = hint.get("version")
    if mine and theirs and mine != theirs:
        return (f"the job's {what} were pickled with {package} {mine}, and this host has {package} {theirs}:"
                f" install the controller's version there (requirements=[{package + '==' + mine!r}])")
    return f"loading the job's {what} on this host, whose {package} is {theirs or 'of unknown version'}"


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
    (a MAP chunk, one per index); with an ``owner`` (a Dispatcher's Job) the owner hears the
    Results (``settled``) and the resends instead.

    A worker runs its jobs one at a time, in the order sent: the Call enters its worker's
    Lane, and only the first Call of a lane has started.  On ``timeout`` the job fails with
    Timeout and the worker is killed; when the caller gives up (cancels ``out``) a job
    still running is killed, so none runs on unseen; one given up while it waits is killed
    as it starts.  When a worker ends under a job, the Calls waiting behind it had not
    started: they say ``resend`` (run again elsewhere, not charged an attempt), never fail for
    another job's timeout or death.  ``alone``: it should run with nothing beside it on its
    worker, which died while it was there and it may have killed.  ``error`` is what failed
    under it (a lost worker or host) for a caller that may retry; with ``report_errors``
    False the caller reports those Results itself.

    One object per job rather than closures and their cells: with 10,000 submits in
    flight the cyclic GC's re-scans of those objects were half of the submit path's CPU.
    """

    __slots__ = ("state", "worker", "lane", "fn", "indices", "attempt", "loads", "timeout", "limit", "raw", "out",
                 "timer", "error", "one", "report_errors", "owner", "queueable", "expected", "resend", "alone",
                 "abandoned", "began")

    def __init__(self, state: HostState, worker: Worker, kind: int, fn: Callable, fn_bytes: bytes, body,
                 indices: Sequence[int], *, timeout: float | None = None, loads=None, attempt: int = 1,
                 one: bool = True, report_errors: bool = True, owner: "Job | None" = None,
                 out: asyncio.Future | None = None, queueable: bool = False, expected: float = 0.0,
                 limit: float | None = None):
        self.raw = worker.send(kind, fn_bytes, body, len(indices))  # raises if the body does not pickle
        self.state = state
        self.worker = worker
        self.fn = fn
        self.indices = indices
        self.attempt = attempt
        self.loads = loads
        self.timeout = timeout
        self.limit = timeout if limit is None else limit  # the timeout the caller asked for (messages)
        self.error: BaseException | None = None
        self.one = one
        self.report_errors = report_errors
        self.owner = owner
        self.queueable = queueable  # others may wait behind it on its worker (a short job, no timeout)
        self.expected = expected
        self.resend = self.alone = self.abandoned = False
        self.began = time.monotonic()  # sent; when it reached the head of its lane, once it is done
        loop = asyncio.get_running_loop()
        self.out: asyncio.Future = out if out is not None else loop.create_future()
        self.timer = None
        self.lane = lane = state.lane(worker)
        lane.push(self)
        state.events.running(state.name, indices[0], len(indices), worker.slot)
        self.raw.add_done_callback(self.done)
        self.out.add_done_callback(self.given_up)
        if timeout is not None:
            self.timer = loop.call_later(max(0.0, timeout), self.expired)

    def report(self, results: list[Result]) -> None:
        """Tell the Cluster's events these Results are back (``done``, with where and how long)."""
        events = self.state.events
        if events.wanted:
            events.done(self.state.name, results, slot=self.worker.slot, elapsed=time.monotonic() - self.began,
                        function=getattr(self.fn, "__qualname__", None) or type(self.fn).__name__)

    def _started_at(self) -> None:
        # The worker runs its lane's Calls in order: the head's began when the lane's
        # previous head left it (Lane.since); one not at the head never started.
        lane = self.lane
        if lane.calls and lane.calls[0] is self:
            self.began = max(self.began, lane.since)

    def _settle(self, results: list[Result], report: bool = True) -> None:
        if report:
            self.report(results)
        if self.owner is not None:
            self.owner.settled(self, results)
        elif not self.out.done():
            self.out.set_result(results[0] if self.one else results)

    def done(self, f: asyncio.Future) -> None:
        if self.timer is not None:
            self.timer.cancel()
        exc = None if f.cancelled() else f.exception()  # retrieved even when nobody waits
        lane = self.lane
        self._started_at()
        started = lane.end(self) if exc is not None else True
        lane.pop(self)
        try:
            self._outcome(f, exc, started)
        finally:
            self.state.lane_done(self.worker, lane)

    def _outcome(self, f: asyncio.Future, exc: BaseException | None, started: bool) -> None:
        if self.out.done():  # timed out (reported already) or given up
            return
        if f.cancelled():
            self.out.cancel()
            return
        state = self.state
        if exc is None:
            raw, outputs = f.result()
            self._settle(make_results(self.worker, raw, outputs, self.indices, self.attempt, self.loads, self.fn))
            return
        worker = self.worker
        if not isinstance(exc, HostLost) and worker.link is not state.link and worker.exit_status is None \
                and worker.exit_signal is None:
            # its connection was dropped (and closed here): the host was lost, not the worker
            exc = state.lost or HostLost(f"{state.host.target}: connection lost", state.name)
        self.error = exc
        if isinstance(exc, HostLost):
            state.connection_lost(exc, worker.link)
        lane = self.lane
        if lane.killed_for is not None or not started:
            self.resend = not started  # killed for another job, or it waited behind the one that ended
            self.alone = lane.killed_for is None and isinstance(exc, WorkerLost)
        elif isinstance(exc, WorkerLost) and lane.ended_with > 1:
            # Jobs waited behind it: a worker may send a result late (it batches them), so the
            # one that ended it is not known for sure.  Each runs again alone, where a death
            # points at its culprit.
            self.resend = self.alone = True
        if self.resend and self.owner is not None:
            self.owner.resend(self)
            return
        host = state.name
        self._settle([worker_failure(exc, host, i, self.attempt) for i in self.indices],
                     self.report_errors and not self.resend)

    def expired(self) -> None:
        if not self.raw.done() and not self.out.done():
            self._started_at()
            self._settle([timeout_failure(self.state.name, self.limit, i, self.attempt) for i in self.indices])
            self.state.discard(self.worker, self)

    def given_up(self, o: asyncio.Future) -> None:
        if o.cancelled() and not self.raw.done():  # the caller gave up: kill the job
            calls = self.lane.calls
            if calls and calls[0] is self:
                self.state.discard(self.worker, self)
            else:  # it has not started: killed when it does (Lane), the jobs ahead of it go on
                self.abandoned = True


# -- the controller's queue: jobs go to a worker when it can take them -----------------------
TINY = 0.001  # seconds: a job expected to take at most this may wait on a worker behind others
PIPELINE = 0.005  # expected seconds of such jobs waiting on one worker, at most
MAX_DEPTH = 128  # jobs sent to one worker and not answered, at most
OVERHEAD = 50e-6  # seconds a job costs its worker beyond its own run (frames, unpickling)
DECAY = 0.8  # how fast a function's expected duration falls after a long run (per result)


class Job:
    """One job of ``submit``, ``gather`` or ``ping`` in a Dispatcher: waiting for a worker,
    or running as ``call``.  ``pin``: the host it must run on (gather, ping); ``deadline``:
    when its timeout ends, counted from the call (start included), for a pinned job."""

    __slots__ = ("dispatcher", "fn", "fn_bytes", "body", "index", "timeout", "deadline", "safe_results", "pin",
                 "out", "key", "alone", "call", "timer")

    def __init__(self, dispatcher: "Dispatcher", fn: Callable, fn_bytes: bytes, body, index: int,
                 timeout: float | None, deadline: float | None, safe_results, pin: HostState | None):
        self.dispatcher = dispatcher
        self.fn = fn
        self.fn_bytes = fn_bytes
        self.body = body
        self.index = index
        self.timeout = timeout
        self.deadline = deadline
        self.safe_results = safe_results
        self.pin = pin
        self.out: asyncio.Future = asyncio.get_running_loop().create_future()
        # what the expected duration is learnt for: the function's code, whatever its cells hold
        self.key = getattr(fn, "__code__", None) or fn_bytes
        self.alone = False
        self.call: Call | None = None
        self.timer = None

    def settled(self, call: Call, results: list[Result]) -> None:
        self.dispatcher.settled(self, call, results[0])

    def resend(self, call: Call) -> None:
        self.dispatcher.resend(self, call)


class Dispatcher:
    """The controller's queue of a Cluster's jobs (``submit``; ``gather`` and ``ping``,
    pinned to a host): a job goes to a worker only when that worker can take it, so a job
    never waits behind another on a worker while a worker is free, and a worker killed for
    one job's timeout holds no other job that had started.

    A worker takes a job when it has none; it may also take more while it runs one when they
    are all short (their function's measured duration is under ``TINY``, no timeout) and no
    worker is starting, up to ``PIPELINE`` seconds of them: tiny jobs are bound by round
    trips, not by the hosts, and that keeps the pipe full.  A worker whose running job overruns its usual time takes no
    more.  Jobs whose worker ended before they started are sent again, first in line.

    It hears from the hosts (``freed``: a worker can take more or has ended; ``host_changed``:
    failed, lost, back) and starts workers (or reconnects hosts) while jobs wait."""

    def __init__(self, states: list[HostState], loads: Callable[[HostState, Any], Callable | None]):
        self.states = states
        self.loads = loads  # (state, safe_results) -> the results' unpickler
        self.queue: deque[Job] = deque()
        self.pinned: dict[int, deque[Job]] = {}
        self.idle: dict[Worker, HostState] = {}
        self.expected: dict[Any, float] = {}
        self.starts = 0  # worker starts under way: while a worker is coming, no job waits on a busy one
        self.closed = False
        for state in states:
            state.listener = self

    # -- jobs in -----------------------------------------------------------------------
    def submit(self, fn: Callable, fn_bytes: bytes, body, *, timeout: float | None = None, safe_results=None,
               pin: HostState | None = None, index: int = 0, deadline: float | None = None) -> asyncio.Future:
        """A job; the future of its Result (cancel it to give the job up)."""
        job = Job(self, fn, fn_bytes, body, index, timeout, deadline, safe_results, pin)
        if self.closed:
            job.out.set_result(self._closed_failure(job))
        elif not self.place(job):
            self._enqueue(job)
        return job.out

    def place(self, job: Job) -> bool:
        """Send ``job`` now if a worker can take it."""
        pin = job.pin
        if pin is None:
            idle = self.idle
            while idle:
                worker, state = idle.popitem()
                lane = state.lanes.get(worker)
                if state.serves(worker) and (lane is None or not lane.calls):
                    self._send(state, worker, job)
                    return True
            # Jobs wait already: no worker had room for them, and this one goes behind them
            # (freed() hands them out in order), without a look at every worker.
            found = self._pipe(job, self.states) if not self.queue and self._short(job) else None
        else:
            found = self._pipe(job, (pin,), idle_only=not self._short(job))
        if found is None:
            return False
        self._send(found[0], found[1], job)
        return True

    def _short(self, job: Job) -> bool:
        e = self.expected.get(job.key)
        return e is not None and e <= TINY and job.timeout is None and not job.alone and not self.starts

    def starting(self, delta: int) -> None:
        self.starts += delta

    def _pipe(self, job: Job, states, idle_only: bool = False) -> tuple[HostState, Worker] | None:
        """The worker that can take ``job`` with the fewest jobs: an idle one, or (a short job)
        one whose jobs waiting are all short."""
        e = self.expected.get(job.key) or 0.0
        now = time.monotonic()
        best = None
        depth = MAX_DEPTH
        for state in states:
            if not state.usable:
                continue
            lanes = state.lanes
            for w in state.workers:
                if w is None or not w.alive:
                    continue
                lane = lanes.get(w)
                if lane is None or not lane.calls:
                    return state, w
                if not idle_only and len(lane.calls) < depth and _fits(lane, e, now):
                    best, depth = (state, w), len(lane.calls)
        return best

    def _accepts(self, lane: Lane, job: Job) -> bool:
        if not lane.calls:
            return True
        return self._short(job) and _fits(lane, self.expected[job.key], time.monotonic())

    def _enqueue(self, job: Job, first: bool = False) -> None:
        pin = job.pin
        if pin is not None:
            if not pin.may_come and pin.lost is None:
                job.out.set_result(self._host_failure(pin, job))
                return
            queue = self.pinned.get(pin.index)
            if queue is None:
                queue = self.pinned[pin.index] = deque()
            fresh = not queue
        else:
            queue = self.queue
            fresh = not queue
            if fresh and not any(s.may_come or s.lost is not None for s in self.states):
                job.out.set_result(self._no_host(job))
                return
        if first:
            queue.appendleft(job)
        else:
            queue.append(job)
        if job.timer is None and job.call is None:
            loop = asyncio.get_running_loop()
            if job.deadline is not None:
                job.timer = loop.call_at(job.deadline, self._not_started, job)
            elif job.timeout is not None and not self._any_live():
                job.timer = loop.call_later(job.timeout, self._not_started, job)
        if fresh or first:
            self._want_workers(pin)

    def _want_workers(self, pin: HostState | None) -> None:
        """Jobs wait: start the workers missing (a slot whose worker was killed or ended), and
        try a lost host again now."""
        for state in (pin,) if pin is not None else self.states:
            if state.lost is not None:
                state.reconnect_now()
            elif state.usable:
                for slot in range(state.nslots):
                    state.start_slot(slot)

    def _any_live(self) -> bool:
        return any(w is not None and w.alive for s in self.states if s.usable for w in s.workers)

    # -- jobs out ----------------------------------------------------------------------
    def _send(self, state: HostState, worker: Worker, job: Job) -> None:
        self.idle.pop(worker, None)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        timeout = job.timeout
        if job.deadline is not None:
            timeout = job.deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                job.out.set_result(self._timeout(job, started=False))
                return
        e = self.expected.get(job.key)
        try:
            job.call = Call(state, worker, protocol.CALL, job.fn, job.fn_bytes, job.body, (job.index,),
                            timeout=timeout, limit=job.timeout, loads=self.loads(state, job.safe_results),
                            owner=job, out=job.out, queueable=self._short(job), expected=e or 0.0)
        except Exception as exc:
            if not job.out.done():
                job.out.set_result(pickling_failure(exc, state.name, job.index))

    def settled(self, job: Job, call: Call, result: Result) -> None:
        job.call = None
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        error = result.error
        took = call.limit if isinstance(error, Timeout) else result.duration
        if result.ok or isinstance(error, (RemoteError, Timeout)):  # the job ran: what it took
            new = took + OVERHEAD
            old = self.expected.get(job.key)
            if len(self.expected) > 4096:
                self.expected.clear()
            self.expected[job.key] = new if old is None or new > old else max(new, old * DECAY)
        if not job.out.done():
            job.out.set_result(result)

    def resend(self, job: Job, call: Call) -> None:
        """``job``'s worker ended before it started (or beside it): it runs again, first in line."""
        job.call = None
        job.alone = job.alone or call.alone
        if job.out.done():
            return
        if self.closed:
            job.out.set_result(self._closed_failure(job))
        elif not self.place(job):
            self._enqueue(job, first=True)

    # -- what the hosts say ----------------------------------------------------------------
    def freed(self, state: HostState, worker: Worker) -> None:
        """A worker of ``state`` started, finished a job, or ended: give it what it can take."""
        if self.closed:
            return
        pinned = self.pinned.get(state.index)
        queue = self.queue
        if not state.serves(worker):
            self.idle.pop(worker, None)
            if queue or pinned:
                self._want_workers(state if pinned and not queue else None)
            return
        lane = state.lanes.get(worker)
        if pinned or queue:
            if lane is None:
                lane = state.lane(worker)
            while state.serves(worker):
                source = pinned if pinned else queue
                if not source:
                    break
                job = source[0]
                if job.out.done():  # given up or timed out while it waited
                    source.popleft()
                    continue
                if not self._accepts(lane, job):
                    break
                source.popleft()
                self._send(state, worker, job)
        if state.serves(worker) and (lane is None or not lane.calls):
            self.idle[worker] = state

    def host_changed(self, state: HostState) -> None:
        """A host failed, lost its connection, or a reconnect attempt ended: fail the jobs that
        no host can take now."""
        if self.closed:
            return
        pinned = self.pinned.get(state.index)
        if pinned and not state.may_come:
            while pinned:
                job = pinned.popleft()
                if not job.out.done():
                    job.out.set_result(self._host_failure(state, job))
        if self.queue and not any(s.may_come for s in self.states):
            while self.queue:
                job = self.queue.popleft()
                if not job.out.done():
                    job.out.set_result(self._no_host(job))

    def waiting_for(self, state: HostState) -> bool:
        """Jobs wait that a worker of ``state`` could take (a map leaves it room for them)."""
        return bool(self.queue) or bool(self.pinned.get(state.index))

    def close(self) -> None:
        """The Cluster closes: the jobs still waiting fail."""
        self.closed = True
        for queue in (self.queue, *self.pinned.values()):
            while queue:
                job = queue.popleft()
                if not job.out.done():
                    job.out.set_result(self._closed_failure(job))

    # -- failures ------------------------------------------------------------------------
    def _not_started(self, job: Job) -> None:
        job.timer = None
        if job.call is not None or job.out.done():
            return
        if job.deadline is None and self._any_live():
            return  # a submitted job waits for busy workers: not counted against its timeout
        job.out.set_result(self._timeout(job, started=False))

    def _timeout(self, job: Job, started: bool) -> Result:
        return not_started(job.timeout, job.pin, job.index)

    def _host_failure(self, state: HostState, job: Job) -> Result:
        return state.failure(job.index)

    def _no_host(self, job: Job) -> Result:
        dead = next((s for s in self.states if s.error is not None or s.lost is not None), None)
        return dead.failure(job.index) if dead else failed(NoHosts("no host is available"), "-", job=job.index)

    def _closed_failure(self, job: Job) -> Result:
        host = job.pin.name if job.pin is not None else "-"
        return failed(NotConnected("the Cluster was closed before the job was sent"), host, job=job.index)


def _fits(lane: Lane, expected: float, now: float) -> bool:
    """A short job may wait on this worker: only short jobs there, few enough, and the one
    running has not overrun its usual time."""
    calls = lane.calls
    return (not lane.blocking and len(calls) < MAX_DEPTH and lane.queued + expected <= PIPELINE
            and now - lane.since <= 4 * calls[0].expected + 0.002)


async def ping(dispatcher: Dispatcher, state: HostState, rounds: int, timeout: float | None) -> Result:
    """An empty job's round trip through a worker of a host, ``rounds`` times: the median."""
    fn_bytes = pickle_function(int)  # a builtin: nothing to ship, nothing to import
    body = dumps(((), {}))
    times = []
    result = state.failure(state.index)
    loop = asyncio.get_running_loop()
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        deadline = None if timeout is None else loop.time() + timeout
        result = await dispatcher.submit(int, fn_bytes, body, timeout=timeout, pin=state, index=state.index,
                                         deadline=deadline)
        if not result.ok:
            return result
        times.append(time.perf_counter() - t0)
    result.value = sorted(times)[len(times) // 2]
    result.duration = sum(times)
    return result


def not_started(timeout: float, state: HostState | None, index: int) -> Result:
    """The Result of a job whose timeout ran out before it was sent to a worker."""
    if state is not None and state.live_workers():
        why = "its host's workers were busy with other jobs"
    elif state is not None:
        why = "no worker of its host was up in time (connecting, starting or reconnecting)"
    else:
        why = "no worker was up in time (connecting, starting or reconnecting)"
    return failed(Timeout(f"the job did not start within {timeout:g}s: {why}"), state.name if state else "-",
                  job=index)


async def _first(*waits: Awaitable) -> None:
    """Wait until the first of ``waits`` is done; the others are cancelled."""
    futures = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures:
            f.cancel()
