"""Progress events: their names, what each carries, and the sink that emits them.

A Cluster's ``on_event(host_name, event, info)`` hears these, on the event loop, as hosts
and jobs progress.  ``info`` is a plain dict with the keys listed here; the callback must
not block, and an exception in it is logged, never raised into the run.  A host whose
connection drops is reconnected in the background with backoff: ``reconnecting`` at each
attempt (its ``error`` and ``message`` say why the connection dropped), ``reconnected``
once it is back; ``failed`` only when it cannot come back (a changed host key, refused
credentials, a worker that cannot start).  ``op`` of the transfer events is ``put``,
``get`` or ``sync``; ``files`` and ``bytes`` are what that host's copy has to move.

| event              | when                                   | info keys                                   |
|--------------------|----------------------------------------|---------------------------------------------|
| ``connecting``     | a connect starts                       | (none)                                      |
| ``connected``      | connected, first worker up             | connect_time, start_time, python            |
| ``failed``         | the host became unusable for good      | error (kind), message                       |
| ``reconnecting``   | its connection dropped: a new attempt  | attempt (1, 2...), error (kind), message    |
| ``reconnected``    | connected again, a worker up           | attempts, down_for (seconds)                |
| ``running``        | jobs sent to a host                    | jobs, job (the first job's index)           |
| ``done``           | their results are back                 | jobs, job, ok, failed; one job: duration, error |
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

from .log import get_logger

if TYPE_CHECKING:
    from .result import Result

log = get_logger("sshjobs.events")

CONNECTING = "connecting"
CONNECTED = "connected"
FAILED = "failed"
RECONNECTING = "reconnecting"
RECONNECTED = "reconnected"
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
    what is documented above."""

    __slots__ = ("on_event",)

    def __init__(self, on_event: Callback | None = None):
        self.on_event = on_event

    def emit(self, host: str, event: str, info: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(host, event, info)
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

    def running(self, host: str, first: int, count: int) -> None:
        if self.on_event is not None:
            self.emit(host, RUNNING, {"jobs": count, "job": first})

    def done(self, host: str, results: Sequence["Result"]) -> None:
        if self.on_event is None or not results:
            return
        ok = sum(1 for r in results if r.ok)
        info = {"jobs": len(results), "job": results[0].job, "ok": ok, "failed": len(results) - ok}
        if len(results) == 1:
            r = results[0]
            info["duration"] = r.duration
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
