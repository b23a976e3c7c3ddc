"""What a job returns to the caller: a Result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import JobError, SshjobsError, make_error


@dataclass
class Result:
    """The outcome of one job on one host.

    ``error`` is None when ``ok``; else an ``SshjobsError`` whose class says why (a
    ``RemoteError`` when the job itself raised, a ``HostError`` when the host could not
    run it, ...) and whose ``type`` is that reason's name."""

    host: str
    ok: bool
    value: Any = None
    error: SshjobsError | None = None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    attempts: int = 1
    job: int = 0
    meta: dict = field(default_factory=dict, repr=False)

    def unwrap(self) -> Any:
        """The value, or raise the job's error."""
        if self.ok:
            return self.value
        raise self.error if self.error else JobError("job failed", self.host)

    def __repr__(self) -> str:
        if self.ok:
            return f"Result(host={self.host!r}, ok=True, value={self.value!r:.200}, duration={self.duration:.3f})"
        return f"Result(host={self.host!r}, ok=False, error={str(self.error)!r:.300})"


def failure(host: str, type: str, message: str, traceback: str = "", **kw: Any) -> Result:
    """A failed Result whose error is the class of kind ``type``."""
    return Result(host=host, ok=False, error=make_error(type, message, traceback, host), **kw)


def failed(error: SshjobsError, host: str, **kw: Any) -> Result:
    """A failed Result carrying ``error`` (its host filled in when it has none)."""
    if error.host is None:
        error.host = host
    return Result(host=host, ok=False, error=error, **kw)
