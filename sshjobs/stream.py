"""A map's engine, ``MapRun``: items read lazily from their iterable, in chunks, one pump per
slot, Results handed out in batches as they arrive (in input order, or as they complete).

``Cluster.imap`` yields from it, ``Cluster.map`` collects it: one engine for both.  Memory
stays bounded whatever the input's length: the run reads ahead of what its consumer took
by at most ``ahead`` items (a few chunks per slot), and a consumer that does not take its
Results holds the reading back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from itertools import islice
from typing import Any, Awaitable, Callable, Iterable, NamedTuple

from .errors import JournalError, Timeout, WorkerLost
from .hosts import HostState
from .remote import protocol
from .result import Result, failed, failure
from .scheduler import DEPTH, MAX_CHUNK, Call, _first, chunk_size, pickling_failure
from .worker import Worker, dumps

# An input of unknown length (a generator) is cut into chunks of about this many seconds of
# work, from the durations seen so far; the first chunks are of one item.
CHUNK_SECONDS = 0.05


class Chunk(NamedTuple):
    """Items ``start``, ``start + 1``... of a map waiting to run.  ``alone``: a suspect of
    killing a worker, run with nothing else in flight on its worker so that a death points
    at its culprit."""

    start: int
    items: list
    attempt: int
    alone: bool

    @property
    def end(self) -> int:
        return self.start + len(self.items)


class MapRun:
    """One ``map``/``imap``: a queue of Chunks fed from the input, one pump per slot,
    Results out through ``next_batch``.

    ``ready(state)`` waits until a host is up (the Cluster's start); ``loads(state)`` is a
    host's results' unpickler; ``waiting(state)``: whether jobs of other calls wait for a
    worker of that host (the pumps then leave a worker room for them as its chunks end).
    ``recorded`` (a journal's ``Recorded``) gives the Results of items already done, which
    are handed out without running; ``record`` (the journal's writer, awaited) stores each
    batch before it is handed out.  ``fail_with``: every item fails so (a function that does not
    pickle).  The consumer calls ``consumed(n)`` once it has taken a batch of ``n``."""

    def __init__(self, hosts: list[HostState], ready: Callable[[HostState], Awaitable[bool]], fn: Callable,
                 fn_bytes: bytes, items: Iterable, *, chunksize: int | None, timeout: float | None, retries: int,
                 loads: Callable[[HostState], Callable | None],
                 waiting: Callable[[HostState], bool] = lambda state: False, ordered: bool = True,
                 recorded: Any = None, record: Callable[[list[Result]], Awaitable[None]] | None = None,
                 fail_with: Result | None = None, cleanup: Iterable[Callable[[], Any]] = ()):
        self.hosts = hosts
        self.ready = ready
        self.loads = loads
        self.waiting = waiting
        self.fn = fn
        self.fn_bytes = fn_bytes
        self.timeout = timeout
        self.retries = retries
        self.ordered = ordered
        self.recorded = recorded
        self.record = record
        self.cleanup = list(cleanup)
        try:
            self.total: int | None = len(items)  # type: ignore[arg-type]
        except TypeError:
            self.total = None
        # An async iterable is read by a task of its own into ``buffer`` (a source that waits,
        # such as a pipe, must not hold up the loop); any other is read here, as needed.
        self.async_source = items.__aiter__() if hasattr(items, "__aiter__") else None
        self.source = iter(items) if self.async_source is None else None
        self.buffer: deque = deque()
        self.fed = False  # the async source has ended
        self.room = asyncio.Event()
        self.feeder: asyncio.Task | None = None
        self.exhausted = False
        self.source_error: BaseException | None = None
        self.read = 0  # items taken from the input
        self.taken = 0  # Results the consumer has taken
        self.queue: deque[Chunk] = deque()
        self.out: list[Result] = []  # Results ready to hand out
        self.pending: dict[int, list[Result]] = {}  # ordered: runs of Results ahead of ``next_out``
        self.next_out = 0
        self.has_output = asyncio.Event()
        self.last_error: Result | None = fail_with
        self.wake = asyncio.Event()
        self.finished = asyncio.Event()
        self.outstanding = 0  # jobs sent and not yet answered, over all pumps
        self.active = 0  # pumps at work (one per slot of a host that is up)
        self.given_up: set[int] = set()  # hosts whose worker did not start within the timeout
        self.spent = 0.0  # seconds of work and items measured, for the chunks of an input of unknown length
        self.measured = 0
        self.driver: asyncio.Task | None = None
        self.ended = False  # every item has its Result (handed out or ready)
        # Hosts still starting count with their inventory's slots ("auto" hosts are started).
        self.nslots = max(1, sum(s.nslots if s.up else int(s.host.slots) for s in hosts if s.error is None))
        # With a timeout (per item) each item is a job of its own, whatever the chunksize:
        # one item's overrun must not fail the others of its chunk.
        if timeout:
            self.size: int | None = 1
        elif chunksize:
            self.size = chunksize
        elif self.total is not None:
            self.size = chunk_size(self.total, self.nslots)
        else:
            self.size = None  # from the durations seen
        # With a timeout each job is one item and runs alone, so the clock is its own.
        depth = 1 if timeout else DEPTH
        if self.total is not None:  # few jobs: one pump must not take several while other slots stay idle
            chunks = -(-self.total // self.size)  # type: ignore[operator]
            depth = max(1, min(depth, -(-chunks // self.nslots)))
        elif not timeout:
            # Unknown length: one job a worker until durations are seen (a few long items
            # must not queue on the first host up); then DEPTH while a chunk is short.
            depth = 1
        self.depth = depth

    # -- the consumer's side ----------------------------------------------------------
    def start(self) -> None:
        if self.async_source is not None:
            self.feeder = asyncio.ensure_future(self._feed())
        self.refill()
        self.driver = asyncio.ensure_future(self._drive())

    async def next_batch(self) -> list[Result] | None:
        """The Results ready since the last batch (waiting for one); None once every item's
        is out.  An exception the input raised is raised here after the Results before it."""
        while not self.out:
            if self.ended:
                if self.driver is not None and self.driver.done() and not self.driver.cancelled() \
                        and self.driver.exception() is not None:
                    raise self.driver.exception()  # type: ignore[misc]
                if self.source_error is not None:
                    exc, self.source_error = self.source_error, None
                    raise exc
                return None
            self.has_output.clear()
            await self.has_output.wait()
        batch, self.out = self.out, []
        if self.record is not None:
            await self.record(batch)  # on disk before it is handed out
        return batch

    async def collect(self, take: Callable[[list[Result]], Any]) -> None:
        """Hand every batch to ``take`` as it comes (taken at once), then close."""
        try:
            while (batch := await self.next_batch()) is not None:
                take(batch)
                self.consumed(len(batch))
        finally:
            await self.close()

    def consumed(self, n: int) -> None:
        """The consumer took ``n`` Results: read on, and let the pumps go on."""
        self.taken += n
        self.refill()
        self.wake.set()
        self.room.set()

    async def close(self) -> None:
        """Stop: the jobs still running are killed, the items not sent are dropped; then
        ``cleanup``."""
        try:
            for task in (self.feeder, self.driver):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait([task])
        finally:
            cleanup, self.cleanup = self.cleanup, []
            for step in cleanup:
                step()

    # -- reading the input ------------------------------------------------------------
    @property
    def ahead(self) -> int:
        """How many items may be read beyond those whose Results the consumer took."""
        return 4 * self.nslots * self.depth * (self.size or MAX_CHUNK)

    def _next_size(self) -> int:
        if self.size is not None:
            return self.size
        if not self.measured:
            return 1
        per_item = self.spent / self.measured
        return MAX_CHUNK if per_item <= 0 else max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / per_item)))

    def refill(self) -> None:
        """Chunks into the queue, enough for every pump's depth, as far as ``ahead`` allows."""
        target = self.nslots * self.depth
        limit = self.taken + self.ahead
        while len(self.queue) < target and not self.exhausted and self.read < limit:
            size = min(self._next_size(), limit - self.read)
            if self.source is not None:
                try:
                    block = list(islice(self.source, size))
                except Exception as exc:  # the input's own error: raised to the consumer after what came before
                    self.source_error = exc
                    block = []
                if len(block) < size:
                    self.exhausted = True
                    self.wake.set()
            else:  # what the feeder has read so far
                buffer = self.buffer
                block = [buffer.popleft() for _ in range(min(size, len(buffer)))]
                if not buffer and self.fed:
                    self.exhausted = True
                    self.wake.set()
            if not block:
                break
            start = self.read
            self.read += len(block)
            if self.recorded is None:
                self.queue.append(Chunk(start, block, 1, False))
            else:
                try:
                    self._take_recorded(start, block)
                except JournalError as exc:  # an item differs from the journal's: stop reading here
                    self.source_error = exc
                    self.exhausted = True
                    break

    async def _feed(self) -> None:
        """Read the async source into ``buffer``, no further ahead than ``ahead`` allows."""
        try:
            async for item in self.async_source:  # type: ignore[union-attr]
                self.buffer.append(item)
                self.refill()
                self.wake.set()
                while self.read + len(self.buffer) >= self.taken + self.ahead:
                    self.room.clear()
                    await self.room.wait()
        except Exception as exc:  # the input's own error: raised to the consumer after what came before
            self.source_error = exc
        finally:
            self.fed = True
            self.refill()
            self.wake.set()

    def _take_recorded(self, start: int, block: list) -> None:
        """Items a journal has Results for are handed out as they are; the others queued."""
        done = self.recorded.take(start, block)
        at = start
        for i, result in done:
            if i > at:
                self.queue.append(Chunk(at, block[at - start:i - start], 1, False))
            self.deliver(i, [result])
            at = i + 1
        if at < start + len(block):
            self.queue.append(Chunk(at, block[at - start:], 1, False))

    def deliver(self, start: int, results: list[Result]) -> None:
        if not self.ordered or start == self.next_out:
            self.out.extend(results)
            if self.ordered:
                self.next_out += len(results)
                pending = self.pending
                while self.next_out in pending:
                    more = pending.pop(self.next_out)
                    self.out.extend(more)
                    self.next_out += len(more)
        else:
            self.pending[start] = results
        self.has_output.set()

    # -- the run ----------------------------------------------------------------------
    async def _drive(self) -> None:
        try:
            if self.last_error is None and (self.queue or not self.exhausted):
                # A pump per host: its slots' pumps start when the host is up; a pump whose
                # worker dies replaces it.
                pumps = [asyncio.create_task(self.host_pump(state)) for state in self.hosts]
                try:
                    await asyncio.gather(*pumps)
                finally:
                    for p in pumps:
                        p.cancel()
            await self.fail_rest()
        finally:
            self.ended = True
            self.has_output.set()

    async def fail_rest(self) -> None:
        """Items no host could run get the last host error (or NoHosts), the input's rest too,
        as fast as the consumer takes them."""
        self.finished.set()
        while True:
            while self.queue:
                chunk = self.queue.popleft()
                self.deliver(chunk.start, [self._failure(i) for i in range(chunk.start, chunk.end)])
            if self.exhausted:
                return
            self.refill()
            if not self.queue and not self.exhausted:  # as far ahead as allowed: wait for the consumer
                self.wake.clear()
                await self.wake.wait()

    def _failure(self, index: int) -> Result:
        if self.last_error is not None and self.last_error.error is not None:
            e = self.last_error.error
            return failure(self.last_error.host, e.type, e.message, job=index, attempts=self.last_error.attempts)
        return failure("-", "NoHosts", "no host could run this job", job=index)

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
        while not self.finished.is_set() and state.index not in self.given_up:
            if state.usable:
                await asyncio.gather(*(self.pump(state, slot) for slot in state.slots()))
                continue
            if state.lost is None:  # failed for good, or closed
                self.note_lost(state)
                return
            # Its connection dropped: it reconnects in the background.  While other hosts
            # work, wait for it; alone, give it one more attempt now.
            if not self.active:
                state.reconnect_now()
            attempt = state.next_attempt()
            await _first(attempt, self.finished.wait())
            if attempt.done() and not attempt.cancelled() and not attempt.result() and not self.active \
                    and not state.usable:
                self.note_lost(state)
                return

    def note_lost(self, state: HostState) -> None:
        """A host that failed gives the items no host could run their error, if none yet."""
        if (state.error is not None or state.lost is not None) and self.last_error is None:
            self.last_error = state.failure()

    def note_slow_start(self, state: HostState) -> None:
        """No worker of ``state`` started within the timeout: this map goes on without it."""
        self.given_up.add(state.index)
        if self.last_error is None:
            self.last_error = failed(Timeout(f"the job did not start within {self.timeout:g}s: no worker of"
                                             f" {state.name} was up in time"), state.name)

    async def pump(self, state: HostState, slot: int) -> None:
        inflight: dict[asyncio.Future, tuple[Chunk, Call]] = {}
        self.active += 1
        try:
            await self._pump(state, slot, inflight)
        except asyncio.CancelledError:
            # The map was cancelled: the jobs still running are killed (Call.given_up).
            for fut in inflight:
                fut.cancel()
            raise
        finally:
            self.active -= 1

    async def _worker(self, state: HostState, slot: int) -> Worker | None:
        """The slot's worker, started again if it was killed or ended; None when the host is
        gone, when the map is done meanwhile, or (a timeout) when the start takes longer than
        it while no other pump works: the call's timeout counts a worker's start too."""
        task = state.start_slot(slot)
        if task is None:
            return state.workers[slot] if state.usable and slot < len(state.workers) else None
        start = asyncio.shield(task)  # the start goes on for later calls whatever this map does
        finished = asyncio.ensure_future(self.finished.wait())
        try:
            while True:
                done, _ = await asyncio.wait((start, finished), timeout=self.timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if start in done:
                    return start.result()
                if finished in done:
                    return None
                if self.active <= 1:
                    self.note_slow_start(state)
                    return None
        finally:
            finished.cancel()
            start.cancel()

    async def _pump(self, state: HostState, slot: int, inflight: dict) -> None:
        loads = self.loads(state)
        while True:
            worker = await self._worker(state, slot)
            if worker is None:  # the host is gone; others take the work
                if inflight:  # its jobs end with it: hear how (a lost host's counts as an attempt)
                    done, _ = await asyncio.wait(inflight)
                    self._collect(state, done, inflight)
                    continue
                self.note_lost(state)
                break
            lane = state.lane(worker)
            # Another call's job on this worker: this map sends it nothing more until it is
            # done; and with other calls' jobs waiting, it leaves the worker to them as it frees.
            foreign = len(lane.calls) > len(inflight)
            if not foreign and not (inflight and self.waiting(state)):
                if len(self.queue) < self.depth:
                    self.refill()
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
                if not self.queue and self.outstanding == 0 and self.exhausted:
                    self.finished.set()
                    break
                self.wake.clear()
                if foreign and self.queue:  # wait for the worker to be free
                    await _first(state.when_free(), self.wake.wait())
                else:  # others still hold work that may come back for a retry, or the consumer lags
                    await self.wake.wait()
                continue
            done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            self._collect(state, done, inflight)
        # A pump that stops hands its unfinished work back.
        for chunk, _ in inflight.values():
            self.outstanding -= 1
            self.queue.append(chunk)
        self.wake.set()

    def _collect(self, state: HostState, done, inflight: dict) -> None:
        """Results of finished jobs out; jobs to run again back in the queue."""
        for fut in done:
            chunk, job = inflight.pop(fut)
            self.outstanding -= 1
            got = fut.result()
            if job.resend and not job.alone:  # its worker ended before it started: not charged
                self.queue.appendleft(chunk)
            elif job.error is None:  # results, or a timeout (never tried again)
                if self.total is None and not self.timeout:
                    self.spent += sum(r.duration for r in got)
                    self.measured += len(got)
                    self.depth = DEPTH if self.spent / self.measured * self._next_size() <= CHUNK_SECONDS else 1
                self.deliver(chunk.start, got)
            elif isinstance(job.error, WorkerLost) and (not chunk.alone or job.resend):
                # The worker died under this job or one beside it: run its items again one
                # by one, each alone on its worker (same attempt), so only the item that
                # kills a worker fails and the others still run.
                self.queue.extend(Chunk(i, [item], chunk.attempt, True) for i, item in enumerate(chunk.items, chunk.start))
            elif chunk.attempt <= self.retries:
                self.queue.append(chunk._replace(attempt=chunk.attempt + 1))
            else:
                self.deliver(chunk.start, got)
                self.last_error = got[-1]
                job.report(got)
        self.wake.set()

    def send(self, state: HostState, worker: Worker, chunk: Chunk, loads) -> Call | None:
        try:
            return Call(state, worker, protocol.MAP, self.fn, self.fn_bytes, (chunk.items,),
                        range(chunk.start, chunk.end), timeout=self.timeout, loads=loads, attempt=chunk.attempt,
                        one=False, report_errors=False)
        except Exception:
            pass
        # Something in the chunk does not pickle: fail just those items, send the rest.
        for i, item in enumerate(chunk.items, chunk.start):
            try:
                dumps((item,))
            except Exception as exc:
                self.deliver(i, [pickling_failure(exc, state.name, i, f"item {i}")])
            else:
                self.queue.append(Chunk(i, [item], chunk.attempt, False))
        return None
