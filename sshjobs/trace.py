"""A Cluster's run as a Chrome trace: ``Cluster(trace="run.json")``, ``sshjobs run --trace``.

The ``Recorder`` hears the Cluster's progress events (``sshjobs.events``, as a second
listener beside ``on_event``) and turns them into the Chrome trace event format, the JSON
that Perfetto (ui.perfetto.dev), chrome://tracing and ``sshjobs timeline`` open, like
``ray timeline`` files:

- one process per host (``pid`` = its place in the inventory, 1 first; ``process_name``
  is the host's name), one thread per slot (``tid`` = slot + 1, named "slot N") and one
  for the host itself (``tid`` 0, named "host": connects, reconnects, installs);
- a complete event (``"ph": "X"``, ``ts`` and ``dur`` in microseconds from the Cluster's
  creation) per connect, worker start, install, reconnect and job (a map's chunk is one
  job whose ``args`` give its item range), ``cat`` saying which ("connect", "worker",
  "install", "reconnect", "job"), ``args.outcome`` how it ended ("ok", "failed",
  "timeout") and ``cname`` a colour for it;
- instant events (``"ph": "i"``) for uploads and for a host failing outside a connect.

A job's bar is its run on its worker: as long as the host measured it (``duration``; for a
job that timed out or whose worker was lost, the time from its start to its failure), ending
as its Results reach the controller, or as the next job on its slot starts when a worker
sent several jobs' results at once.  The file is written when the Cluster closes,
whatever ended the run (a failure, Ctrl-C), through a temporary file renamed into place,
so a reader never sees half of it.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable

from . import events
from .errors import ConfigError
from .log import get_logger
from .version import __version__

log = get_logger("sshjobs.trace")

HOST_TID = 0  # the host's own row: connects, reconnects, installs
COLOURS = {"ok": "good", "failed": "bad", "timeout": "terrible"}  # trace viewers' reserved colour names
CATEGORIES = ("connect", "worker", "install", "reconnect", "job")


def slot_tid(slot: int | None) -> int:
    return HOST_TID if slot is None else int(slot) + 1


def check_path(path: Any) -> Path:
    """A trace file's path, refused before anything is contacted when it cannot be written."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"trace must be a file path (str or PathLike) or None, not {type(path).__name__} {path!r}")
    p = Path(os.path.expanduser(os.fspath(path)))
    if not str(p).strip() or p.is_dir():
        raise ConfigError(f"trace: {str(path)!r} is not a file path")
    if not p.parent.is_dir():
        raise ConfigError(f"trace: {p}: its folder {p.parent} does not exist")
    return p


class Recorder:
    """Follows a Cluster's events (call it as ``on_event``) and writes them as a Chrome trace.

    ``hosts``: the inventory's host names, in order (their ``pid``).  ``write()`` writes
    what was recorded so far (the Cluster calls it as it closes); ``trace()`` is that JSON
    document as a dict."""

    def __init__(self, path: str | os.PathLike, hosts: Iterable[str] = ()):
        self.path = check_path(path)
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.hosts = list(hosts)
        # What was heard, as it was heard: recording is one append (10,000 tiny submits
        # cost 20% more when each built its event at once); trace() makes the events.
        self.heard: list[tuple[float, str, str, dict]] = []
        self._reset()

    def __call__(self, host: str, event: str, info: dict) -> None:
        if event != events.RUNNING:  # a job's bar is made from its `done`
            self.heard.append((time.monotonic(), host, event, info))

    def _reset(self) -> None:
        self.pids: dict[str, int] = {}
        for name in self.hosts:
            self.pid(name)
        self.tids: dict[int, set[int]] = {}
        self.records: list[dict] = []
        self.connecting: dict[str, float] = {}
        self.installing: dict[str, tuple[float, dict]] = {}
        self.reconnecting: dict[str, tuple[float, dict]] = {}

    def pid(self, host: str) -> int:
        pid = self.pids.get(host)
        if pid is None:
            pid = self.pids[host] = len(self.pids) + 1
        return pid

    def _us(self, t: float) -> float:
        return round((t - self.t0) * 1e6, 1)

    def span(self, host: str, tid: int, name: str, cat: str, start: float, end: float, outcome: str,
             args: dict | None = None) -> None:
        """A complete event: ``start`` and ``end`` on the monotonic clock."""
        pid = self.pid(host)
        self.tids.setdefault(pid, set()).add(tid)
        ts = self._us(start)
        self.records.append({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": max(0.0, round(self._us(end) - ts, 1)),
                             "pid": pid, "tid": tid, "cname": COLOURS.get(outcome, "generic_work"),
                             "args": {"host": host, "outcome": outcome, **(args or {})}})

    def instant(self, host: str, name: str, cat: str, args: dict, now: float) -> None:
        pid = self.pid(host)
        self.tids.setdefault(pid, set()).add(HOST_TID)
        self.records.append({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": self._us(now),
                             "pid": pid, "tid": HOST_TID, "args": {"host": host, **args}})

    # -- the events ----------------------------------------------------------------------
    def _event(self, now: float, host: str, event: str, info: dict) -> None:
        if event == events.DONE:
            self._done(host, info, now)
        elif event == events.CONNECTING:
            self.connecting[host] = now
        elif event == events.CONNECTED:
            began = now - (info.get("start_time") or 0.0)
            start = self.connecting.pop(host, began - (info.get("connect_time") or 0.0))
            self.span(host, HOST_TID, "connect", "connect", start, max(start, began), "ok",
                      {"connect_time": info.get("connect_time"), "python": info.get("python")})
            self.span(host, slot_tid(0), "worker start", "worker", began, now, "ok",
                      {"slot": 0, "start_time": info.get("start_time")})
        elif event == events.WORKER_STARTED:
            slot = info.get("slot") or 0
            self.span(host, slot_tid(slot), "worker start", "worker", now - (info.get("start_time") or 0.0), now, "ok",
                      {"slot": slot, "start_time": info.get("start_time")})
        elif event == events.FAILED:
            why = {"error": info.get("error"), "message": info.get("message")}
            if host in self.connecting:
                self.span(host, HOST_TID, "connect", "connect", self.connecting.pop(host), now, "failed", why)
            elif host in self.reconnecting:
                start, first = self.reconnecting.pop(host)
                self.span(host, HOST_TID, "reconnect", "reconnect", start, now, "failed", {**first, "failed": why})
            else:
                self.instant(host, "host failed", "connect", why, now)
        elif event == events.RECONNECTING:
            if host not in self.reconnecting:  # one bar from the first attempt to the last
                self.reconnecting[host] = (now, {"lost": {"error": info.get("error"), "message": info.get("message")}})
        elif event == events.RECONNECTED:
            start, first = self.reconnecting.pop(host, (now - (info.get("down_for") or 0.0), {}))
            self.span(host, HOST_TID, "reconnect", "reconnect", start, now, "ok",
                      {**first, "attempts": info.get("attempts"), "down_for": info.get("down_for")})
        elif event == events.INSTALLING:
            self.installing[host] = (now, {"requirements": info.get("requirements"), "offline": info.get("offline")})
        elif event in (events.INSTALLED, events.INSTALL_FAILED):
            start, args = self.installing.pop(host, (now, {}))
            if event == events.INSTALLED:
                args.update(cached=info.get("cached"), uv=info.get("uv"), env=info.get("hash"))
                self.span(host, HOST_TID, "install", "install", start, now, "ok", args)
            else:
                args.update(error=info.get("type"), message=info.get("error"))
                self.span(host, HOST_TID, "install", "install", start, now, "failed", args)
        elif event in (events.UPLOADING_UV, events.UPLOADING_WHEELS):
            self.instant(host, event, "install", dict(info), now)

    def _done(self, host: str, info: dict, now: float) -> None:
        first, count = info.get("job", 0), info.get("jobs", 1)
        fn = info.get("function") or "job"
        args: dict[str, Any] = {"slot": info.get("slot"), "function": fn}
        if count == 1:
            name = fn
            args.update(job=first, duration=info.get("duration"), error=info.get("error"))
        else:  # a map's chunk
            name = f"{fn} [{first}:{first + count})"
            args.update(items=[first, first + count], jobs=count, ok=info.get("ok"), failed=info.get("failed"),
                        duration=info.get("duration"))
        args.update(elapsed=info.get("elapsed"))
        took = info.get("duration") or info.get("elapsed") or 0.0
        self.span(host, slot_tid(info.get("slot")), name, "job", now - took, now,
                  info.get("outcome") or ("ok" if not info.get("failed") else "failed"), args)

    # -- the file ------------------------------------------------------------------------
    def trace(self) -> dict:
        """The Chrome trace document: metadata events (names, order), then the events by time."""
        self._reset()
        for heard in self.heard:
            self._event(*heard)
        names = {pid: host for host, pid in self.pids.items()}
        meta: list[dict] = []
        for pid in sorted(names):
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": names[pid]}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
            for tid in sorted(self.tids.get(pid, ())):
                label = "host" if tid == HOST_TID else f"slot {tid - 1}"
                meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        timed = laid_out(self.records)
        early = min((e["ts"] for e in timed), default=0.0)
        if early < 0:  # a span measured back from its end began before the Cluster: all of them later
            for e in timed:
                e["ts"] = round(e["ts"] - early, 1)
        return {"traceEvents": meta + sorted(timed, key=lambda e: e["ts"]), "displayTimeUnit": "ms",
                "otherData": {"producer": f"sshjobs {__version__}", "started": self.started.isoformat(timespec="seconds"),
                              "hosts": len(self.pids)}}

    def write(self) -> Path:
        """Write the trace to its file (replacing it whole, never half-written); its path."""
        text = json.dumps(self.trace(), separators=(",", ":"), default=str)
        # Not mkstemp: its file is private (0600); this one gets the umask's mode, as open() would.
        tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        log.info("trace written", path=str(self.path), events=len(self.records))
        return self.path


def laid_out(records: list[dict]) -> list[dict]:
    """The events with each slot's job bars one after another: a worker runs its jobs one at
    a time, but sends the results of jobs that waited behind each other together, so a bar
    that would reach into the next one on its row ends where that one starts."""
    out = [dict(e) for e in records]
    rows: dict[tuple[int, int], list[dict]] = {}
    for e in out:
        if e["ph"] == "X":
            rows.setdefault((e["pid"], e["tid"]), []).append(e)
    for row in rows.values():
        row.sort(key=lambda e: e["ts"] + e["dur"])
        later = float("inf")  # the earliest start of the bars that end after this one
        for e in reversed(row):
            if e["cat"] == "job" and e["ts"] + e["dur"] > later:
                end = later
                e["ts"] = round(max(0.0, end - e["dur"]), 1)
                e["dur"] = round(max(0.0, end - e["ts"]), 1)
            later = min(later, e["ts"])
    return out


def load(path: str | os.PathLike) -> dict:
    """A Chrome trace file (an object with ``traceEvents``, or a bare list of events) as a document."""
    p = Path(path)
    try:
        data = json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such trace file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: not a trace file (JSON): {exc}") from None
    if isinstance(data, list):
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ConfigError(f"{p}: not a Chrome trace: no \"traceEvents\" list")
    return data
