"""Progress events: their names, what each carries, and the sink that emits them.

A Cluster's ``on_event(host_name, event, info)`` hears these, on the event loop, as hosts
and jobs progress.  ``info`` is a plain dict with the keys listed here; the callback must
not block, and an exception in it is logged, never raised into the run.  A host whose
connection drops is reconnected in the background with backoff: ``reconnecting`` at each
attempt (its ``error`` and ``message`` say why the connection dropped), ``reconnected``
once it is back; ``failed`` only when it cannot come back (a changed host key, refused
credentials, a worker that cannot start).  ``op`` of the transfer events is ``put``,
``get`` or ``sync``; ``files`` and ``bytes`` are what that host's copy has to move.

``connected`` reports the host's first worker (slot 0); ``worker-started`` every later one
(other slots, a worker started again after a kill, a reconnect or an install).  In ``done``,
``outcome`` is "ok" (every job ok), "timeout" (one timed out) or "failed"; ``slot`` is the
worker's slot; ``duration`` the seconds they ran on the host (added up; 0 for a job that
timed out or whose worker was lost); ``elapsed`` the seconds from their start on their worker
(or their send) to their results here, round trips and results sent late in a batch
included; ``function`` the function's name.
``Cluster(trace=...)`` records these events (``sshjobs.trace``).

| event              | when                                   | info keys                                   |
|--------------------|----------------------------------------|---------------------------------------------|
| ``connecting``     | a connect starts                       | (none)                                      |
| ``connected``      | connected, first worker up             | connect_time, start_time, python            |
| ``failed``         | the host became unusable for good      | error (kind), message                       |
| ``reconnecting``   | its connection dropped: a new attempt  | attempt (1, 2...), error (kind), message    |
| ``reconnected``    | connected again, a worker up           | attempts, down_for (seconds)                |
| ``worker-started`` | a worker started, after the first      | slot, start_time                            |
| ``running``        | jobs sent to a host                    | jobs, job (the first job's index), slot     |
| ``done``           | their results are back                 | jobs, job, ok, failed, outcome, slot,       |
|                    |                                        | duration, elapsed, function; one job: error |
| ``installing``     | an install starts on a host            | requirements, offline                       |
| ``uploading-uv``   | the controller's uv goes to the host   | path                                        |
| ``uploading-wheels`` | wheels go to an offline host         | count, skipped                              |
| ``installed``      | the environment is there               | the install Result's value                  |
| ``install-failed`` | the install failed on that host        | type (kind), error (message)                |
| ``transferring``   | files being copied: at the start, then at most every 0.25 s | op, files, bytes, done_files, done_bytes |
| ``transferred``    | a host's copy is complete              | op, and the Result's value (files, bytes...)  |
| ``transfer-failed`` | a host's copy failed                  | op, type (kind), error (message)            |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import Timeout
from .log import get_logger

if TYPE_CHECKING:
    from .result import Result

log = get_logger("sshjobs.events")

CONNECTING = "connecting"
CONNECTED = "connected"
FAILED = "failed"
RECONNECTING = "reconnecting"
RECONNECTED = "reconnected"
WORKER_STARTED = "worker-started"
RUNNING = "running"
DONE = "done"
INSTALLING = "installing"
UPLOADING_UV = "uploading-uv"
UPLOADING_WHEELS = "uploading-wheels"
INSTALLED = "installed"
INSTALL_FAILED = "install-failed"
TRANSFERRING = "transferring"
TRANSFERRED = "transferred"
TRANSFER_FAILED = "transfer-failed"

Callback = Callable[[str, str, dict], Any]


class Events:
    """The sink every part reports progress to; calls ``on_event`` if one is set.

    Its methods build each event's ``info`` in one place, so what a display parses is
    what is documented above.  ``recorder`` is a second listener of the same shape, apart
    from the user's ``on_event`` (``Cluster(trace=...)``'s ``trace.Recorder``)."""

    __slots__ = ("on_event", "recorder")

    def __init__(self, on_event: Callback | None = None, recorder: Callback | None = None):
        self.on_event = on_event
        self.recorder = recorder

    @property
    def wanted(self) -> bool:
        """Someone listens: the per-job events are built only then (submit's hot path)."""
        return self.on_event is not None or self.recorder is not None

    def emit(self, host: str, event: str, info: dict) -> None:
        for listener in (self.on_event, self.recorder):
            if listener is not None:
                try:
                    listener(host, event, info)
                except Exception as exc:
                    log.warning("on_event callback failed", error=f"{type(exc).__name__}: {exc}")

    def connecting(self, host: str) -> None:
        self.emit(host, CONNECTING, {})

    def connected(self, host: str, connect_time: float | None, start_time: float | None, python: str) -> None:
        self.emit(host, CONNECTED, {"connect_time": connect_time, "start_time": start_time, "python": python})

    def failed(self, host: str, kind: str, message: str) -> None:
        self.emit(host, FAILED, {"error": kind, "message": message})

    def reconnecting(self, host: str, attempt: int, kind: str, message: str) -> None:
        self.emit(host, RECONNECTING, {"attempt": attempt, "error": kind, "message": message})

    def reconnected(self, host: str, attempts: int, down_for: float) -> None:
        self.emit(host, RECONNECTED, {"attempts": attempts, "down_for": down_for})

    def worker_started(self, host: str, slot: int, start_time: float) -> None:
        self.emit(host, WORKER_STARTED, {"slot": slot, "start_time": start_time})

    def running(self, host: str, first: int, count: int, slot: int | None = None) -> None:
        if self.on_event is not None:  # a trace's recorder makes its bars from `done`
            self.emit(host, RUNNING, {"jobs": count, "job": first, "slot": slot})

    def done(self, host: str, results: Sequence["Result"], *, slot: int | None = None, elapsed: float | None = None,
             function: str | None = None) -> None:
        if (self.on_event is None and self.recorder is None) or not results:
            return
        ok = sum(1 for r in results if r.ok)
        info = {"jobs": len(results), "job": results[0].job, "ok": ok, "failed": len(results) - ok,
                "outcome": outcome(results), "slot": slot, "elapsed": elapsed,
                "duration": sum(r.duration for r in results), "function": function}
        if len(results) == 1:
            r = results[0]
            info["error"] = None if r.ok else str(r.error)
        self.emit(host, DONE, info)

    def installing(self, host: str, requirements: list[str], offline: bool) -> None:
        self.emit(host, INSTALLING, {"requirements": requirements, "offline": offline})

    def uploading_uv(self, host: str, path: str | None) -> None:
        self.emit(host, UPLOADING_UV, {"path": path})

    def uploading_wheels(self, host: str, count: int, skipped: int) -> None:
        self.emit(host, UPLOADING_WHEELS, {"count": count, "skipped": skipped})

    def installed(self, host: str, value: dict) -> None:
        self.emit(host, INSTALLED, dict(value))

    def install_failed(self, host: str, kind: str, message: str) -> None:
        self.emit(host, INSTALL_FAILED, {"error": message, "type": kind})

    def transferring(self, host: str, op: str, files: int, size: int, done_files: int, done_bytes: int) -> None:
        if self.on_event is not None:
            self.emit(host, TRANSFERRING, {"op": op, "files": files, "bytes": size, "done_files": done_files,
                                           "done_bytes": done_bytes})

    def transferred(self, host: str, op: str, value: dict) -> None:
        self.emit(host, TRANSFERRED, {"op": op, **value})

    def transfer_failed(self, host: str, op: str, kind: str, message: str) -> None:
        self.emit(host, TRANSFER_FAILED, {"op": op, "error": message, "type": kind})

def outcome(results: Sequence["Result"]) -> str:
    """What became of some jobs, in one word: "ok", "timeout" (one of them) or "failed"."""
    if all(r.ok for r in results):
        return "ok"
    return "timeout" if any(isinstance(r.error, Timeout) for r in results) else "failed"


def exec_done(row: dict) -> dict:
    """The info of the DONE event of a host's ``sshjobs exec`` row (see connection.run_line)."""
    return {"jobs": 1, "job": 0, "ok": int(row["ok"]), "failed": int(not row["ok"]), "duration": row["duration"],
            "exit_status": row["exit_status"], "error": row["error"]}
