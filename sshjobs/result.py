"""What a job returns to the caller: a Result, and RemoteError for failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RemoteError(Exception):
    """A job failed: on the host (``traceback`` holds the remote traceback text) or
    around it (connection, worker, pickling), with ``type`` naming what went wrong."""

    def __init__(self, type: str, message: str, traceback: str = "", host: str | None = None):
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.traceback = traceback
        self.host = host

    def __reduce__(self):
        return (RemoteError, (self.type, self.message, self.traceback, self.host))


class Timeout(RemoteError):
    """A job ran out of its ``timeout``; its process on the host was killed."""

    def __init__(self, type: str = "Timeout", message: str = "", traceback: str = "", host: str | None = None):
        super().__init__(type, message, traceback, host)

    def __reduce__(self):
        return (Timeout, (self.type, self.message, self.traceback, self.host))


_ERROR_CLASSES = {"Timeout": Timeout}


def make_error(type: str, message: str, traceback: str = "", host: str | None = None) -> RemoteError:
    return _ERROR_CLASSES.get(type, RemoteError)(type, message, traceback, host)


@dataclass
class Result:
    """The outcome of one job on one host."""

    host: str
    ok: bool
    value: Any = None
    error: RemoteError | None = None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    attempts: int = 1
    job: int = 0
    meta: dict = field(default_factory=dict, repr=False)

    def unwrap(self) -> Any:
        """The value, or raise the job's RemoteError."""
        if self.ok:
            return self.value
        raise self.error if self.error else RemoteError("Error", "job failed", host=self.host)

    def __repr__(self) -> str:
        if self.ok:
            return f"Result(host={self.host!r}, ok=True, value={self.value!r:.200}, duration={self.duration:.3f})"
        return f"Result(host={self.host!r}, ok=False, error={str(self.error)!r:.300})"


def failure(host: str, type: str, message: str, traceback: str = "", **kw: Any) -> Result:
    return Result(host=host, ok=False, error=make_error(type, message, traceback, host), **kw)
