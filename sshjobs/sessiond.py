"""The session process of ``sshjobs up``: one inventory file's connections and workers, kept
warm for the commands and scripts that follow (their side is ``sshjobs.session``).

    python -m sshjobs.sessiond INVENTORY [--idle SECONDS]

It listens on its Unix socket (``session.socket_path``, mode 0600 in a 0700 folder) and
serves only peers of its own uid (SO_PEERCRED).  A call runs on a view of its Cluster over
the call's hosts, with the caller's events sent back as they happen; the caller closing
its connection cancels the call, which kills its remote jobs.  It ends on ``stop``, on
SIGTERM or SIGINT, or after ``--idle`` seconds without a call, closing every worker; if it
is killed instead, the hosts' workers end with their connections (their stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle

from . import session as wire
from .api import Inventory, use_lean_executor
from .cluster import Cluster
from .connection import Completed, exec_row
from .errors import SessionError, SshjobsError
from .inventory import content_digest
from .log import configure, get_logger
from .requirements import merge_requirements

log = get_logger("sshjobs.sessiond")

# the Cluster verbs a call may name
METHODS = frozenset({"_gather", "ping", "install", "list_envs", "prune_envs", "put", "get", "sync"})
RETRY_FAILED = 30.0  # seconds before a call on a host that failed makes the session start over
ITEMS_AHEAD = 4  # item batches read ahead of the map's own look-ahead


class Call:
    """One caller's connection: the hosts it runs on, whether it hears their events, and what
    is sent back to it."""

    def __init__(self, hosts: set[str], events: bool):
        self.hosts = hosts
        self.events = events
        self.out: asyncio.Queue = asyncio.Queue()


class Session:
    def __init__(self, path: str, idle: float | None):
        self.path = os.path.realpath(path)
        self.idle = idle
        self.started = time.time()
        self.last = time.monotonic()
        self.calls: set[Call] = set()
        self.served = 0
        self.jobs = 0
        self.restarted = time.monotonic()
        self.cluster: Cluster | None = None
        self.content = ""
        self.over = asyncio.Event()
        self.warming: asyncio.Future | None = None

    # -- the Cluster ---------------------------------------------------------------------
    async def load(self) -> None:
        inventory = Inventory.load(self.path)
        use_lean_executor(inventory)
        cluster = Cluster(inventory)
        self.content = inventory.file[1]  # Inventory.load: the file and its content digest
        self.cluster = cluster
        self.restarted = time.monotonic()
        await cluster.start()
        try:
            await cluster.ensure_slots()  # every slot warm: a map starts at full width
        except Exception as exc:  # a host's failure is its state; the session serves the rest
            log.info("not every slot started", error=repr(exc))

    async def reload(self, why: str, old: Cluster | None) -> None:
        """Close ``old`` (taken off ``self.cluster`` by the caller) and start again from the file."""
        log.info("session starts over", why=why, inventory=self.path)
        if old is not None:
            await old.close()
        await self.load()

    def event(self, host: str, kind: str, info: dict) -> None:
        for call in self.calls:
            if call.events and host in call.hosts:
                call.out.put_nowait(("event", host, kind, info))

    def _listen(self) -> None:
        """The Cluster builds its per-job events only while a call hears them."""
        if self.cluster is not None:
            self.cluster.on_event = self.event if any(c.events for c in self.calls) else None

    def status(self) -> dict:
        states = self.cluster.states if self.cluster is not None else []
        idle = 0.0 if self.calls else time.monotonic() - self.last
        try:
            stale = content_digest(Path(self.path).read_bytes()) != self.content
        except OSError:
            stale = True
        return {"pid": os.getpid(), "inventory": self.path, "content": self.content, "stale": stale,
                "started": self.started,
                "idle": idle, "idle_limit": self.idle, "calls": self.served, "jobs": self.jobs,
                "running": len(self.calls),
                "hosts": [{"name": s.name, "up": s.usable, "workers": len(s.live_workers()),
                           "error": None if s.error is None else f"{s.error.kind}: {s.error.message}"}
                          for s in states]}

    # -- serving ----------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _own_peer(writer.get_extra_info("socket")):
                log.warning("refused a peer of another user")
                return
            try:
                request = await _read(reader)
            except (EOFError, asyncio.IncompleteReadError, ConnectionError):
                return
            op = request.get("op")
            if op in ("status", "stop"):
                await _write(writer, ("ok", self.status(), []))
                if op == "stop":
                    self.over.set()
                return
            why, restart = self.usable(request)
            if why is not None:
                await _write(writer, ("stale", why))
                return
            if restart is not None:
                old, self.cluster = self.cluster, None  # from now on other calls hear "starting over"
                await _write(writer, ("restarting", restart))  # the caller waits longer than for a hello
                try:
                    await self.reload(restart, old)
                except Exception as exc:  # the new content does not load: this session can serve nothing
                    log.warning("the session ends: it cannot start over", error=str(exc))
                    self.over.set()
                    return
            await self.run(request, reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()

    def usable(self, request: dict) -> tuple[str | None, str | None]:
        """(why this session may not serve the request, or None; why it must start over first,
        or None): its file changed to what the caller has, or a host of the call failed a
        while ago."""
        if self.cluster is None:
            return "the session is starting over", None
        if request.get("digest") != self.content:
            try:
                now = content_digest(Path(self.path).read_bytes())
            except OSError as exc:
                return f"cannot read {self.path}: {exc.strerror}", None
            if now != request.get("digest"):
                return f"the session serves another content of {self.path}", None
            if self.calls:
                return f"{self.path} changed; the session starts over once its calls are done", None
            return None, f"{self.path} changed"
        hosts = set(request.get("hosts") or ())
        known = {s.name for s in self.cluster.states}
        if not hosts <= known:
            return f"the session has no host {sorted(hosts - known)[0]!r}", None
        failed = [s for s in self.cluster.states if s.name in hosts and s.error is not None]
        if failed and not self.calls and time.monotonic() - self.restarted > RETRY_FAILED:
            return None, f"host {failed[0].name} failed; trying it again"
        return None, None

    async def run(self, request: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.cluster is not None
        call = Call(set(request["hosts"]), bool(request.get("events")))
        view = self.cluster.view(request["hosts"])
        view.installed = merge_requirements(self.cluster.installed, request.get("installed") or ())
        self.calls.add(call)
        self._listen()
        self.served += 1
        await _write(writer, ("accepted",))
        op = request["op"]
        if op == "map":
            work = asyncio.ensure_future(self.map(view, request, reader, call))
        else:
            work = asyncio.ensure_future(_exec(self, view, request) if op == "exec" else self.call(view, request))
        if op != "map" or request.get("items") is not None:  # else the items' reader hears the hang-up
            # the caller hangs up (Ctrl-C): the call is cancelled, its jobs killed
            watch = asyncio.ensure_future(reader.read(1))
            watch.add_done_callback(lambda _: work.cancel())
            work.add_done_callback(lambda _: watch.cancel())
        sender = asyncio.ensure_future(_send_all(writer, call.out, work))
        try:
            try:
                value = await work
                reply: tuple = ("result", value, [s.info() for s in view.states])
            except asyncio.CancelledError:
                if not work.cancelled():
                    raise
                reply = ()
            except Exception as exc:
                reply = ("error", exc)
            if reply:
                call.out.put_nowait(reply)
            call.out.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            self.calls.discard(call)
            self._listen()
            self.last = time.monotonic()
            self.rewarm()

    def rewarm(self) -> None:
        """Start again the workers a call's timeouts or cancel killed, so the next call finds them warm."""
        cluster = self.cluster
        if cluster is None or self.warming is not None and not self.warming.done():
            return
        if any(s.usable and len(s.live_workers()) < s.nslots for s in cluster.states):
            self.warming = asyncio.ensure_future(cluster.ensure_slots())
            self.warming.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def call(self, view: Cluster, request: dict) -> Any:
        method = request.get("method")
        if method not in METHODS:
            raise SessionError(f"a session runs no {method!r}")
        value = await getattr(view, method)(*request.get("args", ()), **request.get("kwargs", {}))
        if isinstance(value, list):
            self.jobs += len(value)
        return (value, view.installed) if method == "install" else value

    async def map(self, view: Cluster, request: dict, reader: asyncio.StreamReader, call: Call) -> None:
        items = request.get("items")
        feed = None
        if items is None:
            queue: asyncio.Queue = asyncio.Queue(ITEMS_AHEAD)
            feed = asyncio.ensure_future(_read_items(reader, queue, asyncio.current_task()))
            items = _items(queue)
        kw = request.get("kwargs", {})
        run = await view._start_map(request["fn"], items, progress=False, **kw)
        try:
            while (batch := await run.next_batch()) is not None:
                self.jobs += len(batch)
                call.out.put_nowait(("batch", batch))
                run.consumed(len(batch))
        finally:
            await run.close()
            if feed is not None:
                feed.cancel()

    # -- the process ------------------------------------------------------------------------
    async def idle_watch(self) -> None:
        while self.idle is not None:
            await asyncio.sleep(min(1.0, self.idle))
            if not self.calls and time.monotonic() - self.last > self.idle:
                log.info("idle: the session ends", idle=self.idle)
                self.over.set()
                return


# ``sshjobs exec``'s command as a job of the host's warm worker: the user's login shell with
# -c, in the home folder, as sshd runs it; compiled here under a module name no host can
# import, so that cloudpickle ships it by value.
_SHELL_JOB = """
def shell_line(line, timeout):
    import os, pwd, signal, subprocess
    shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    # argv[0] as sshd gives it; in the worker's process group: a cancelled call kills the
    # worker's group, the command with it
    proc = subprocess.Popen([os.path.basename(shell), "-c", line], executable=shell, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.path.expanduser("~"))
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), False
    except subprocess.TimeoutExpired:
        pass
    # the timeout: the command and everything it started, found by their parent pids
    children = {}
    for entry in [e for e in os.listdir("/proc") if e.isdigit()] if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    doomed, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, ()))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    out, err = proc.communicate()
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), True
"""


def _shell_job():
    namespace: dict = {"__name__": "sshjobs_session_exec"}
    exec(compile(_SHELL_JOB, "<sshjobs exec>", "exec"), namespace)
    return namespace["shell_line"]


SHELL_LINE = _shell_job()


async def _exec(session: Session, view: Cluster, request: dict) -> list[dict]:
    """``sshjobs exec`` on the session's warm workers (no channel, no login per host): each
    host's row, in inventory order (``connection.exec_row``)."""
    line, timeout = request["line"], request.get("timeout")
    t0 = time.perf_counter()
    # the job kills the command at its timeout itself; the gather's own is a backstop
    results = await view.gather(SHELL_LINE, line, timeout, timeout=None if timeout is None else timeout + 10)
    rows = []
    for r in results:
        if not r.ok:
            row = exec_row(r.host, None, timeout, f"{r.error.type}: {r.error.message}" if r.error else "failed")
        else:
            status, stdout, stderr, timed_out = r.value
            if timed_out:
                done = Completed(None, stdout, stderr, None, timed_out=True)
            elif status < 0:  # as over SSH: exit status -1 and the signal's name
                done = Completed(-1, stdout, stderr, signal.Signals(-status).name[3:])
            else:
                done = Completed(status, stdout, stderr, None)
            row = exec_row(r.host, done, timeout)
        row["duration"] = r.duration or time.perf_counter() - t0
        rows.append(row)
    session.jobs += len(rows)
    return rows


async def _items(queue: asyncio.Queue):
    """The items a caller sends, as the map asks for them; its input's exception is raised here."""
    import pickle

    while True:
        kind, payload = await queue.get()
        if kind == "end":
            if payload is not None:
                raise payload
            return
        for item in pickle.loads(payload)[0]:
            yield item


async def _read_items(reader: asyncio.StreamReader, queue: asyncio.Queue, map_task: asyncio.Task) -> None:
    """The caller's items onto ``queue``, then its hang-up: once it closes the connection
    (Ctrl-C, an imap left early) the map is cancelled, which kills its jobs."""
    try:
        while True:
            message = await _read(reader)
            await queue.put(message)
            if message[0] == "end":
                break
        await reader.read(1)  # nothing more comes but the end of the connection
    except (EOFError, asyncio.IncompleteReadError, ConnectionError):
        pass
    map_task.cancel()


async def _send_all(writer: asyncio.StreamWriter, out: asyncio.Queue, work: asyncio.Future) -> None:
    """Send what the call puts on ``out`` until None; a caller gone cancels the call."""
    try:
        while (message := await out.get()) is not None:
            await _write(writer, message)
    except (ConnectionError, BrokenPipeError, OSError):
        work.cancel()


def _own_peer(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


async def _read(reader: asyncio.StreamReader) -> Any:
    import pickle

    head = await reader.readexactly(8)
    (size,) = struct.unpack("!Q", head)
    return pickle.loads(await reader.readexactly(size))


async def _write(writer: asyncio.StreamWriter, message: Any) -> None:
    try:
        data = cloudpickle.dumps(message, protocol=5)
    except Exception as exc:  # a value that pickles in no way: the caller hears why
        if message and message[0] == "event":
            return
        data = cloudpickle.dumps(("error", SshjobsError(f"the session cannot send the reply: {exc!r}")), protocol=5)
    writer.write(struct.pack("!Q", len(data)) + data)
    await writer.drain()


async def main(path: str, idle: float | None, ready_fd: int | None) -> int:
    session = Session(path, idle)
    where = wire.socket_path(path, create=True)
    if where.exists():
        if wire.ask(path, path=where) is not None:
            _ready(ready_fd, {"error": f"a session is already up for {session.path}"})
            return 1
        where.unlink()
    old = os.umask(0o177)  # the socket file: this user's only
    try:
        server = await asyncio.start_unix_server(session.serve, path=os.fspath(where))
    finally:
        os.umask(old)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, session.over.set)
    try:
        try:
            await session.load()
        except SshjobsError as exc:
            _ready(ready_fd, {"error": str(exc)})
            return 1
        _ready(ready_fd, {"pid": os.getpid(), "socket": os.fspath(where), **session.status()})
        watcher = asyncio.ensure_future(session.idle_watch())
        await session.over.wait()
        watcher.cancel()
    finally:
        server.close()
        try:
            where.unlink()
        except OSError:
            pass
        for call in list(session.calls):
            call.out.put_nowait(None)
        if session.cluster is not None:
            await session.cluster.close()
    return 0


def _ready(fd: int | None, status: dict) -> None:
    """Tell ``sshjobs up`` (waiting on the other end of ``fd``) how the start went."""
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(status, default=str) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sshjobs.sessiond", description=__doc__.split("\n\n")[0])
    ap.add_argument("inventory")
    ap.add_argument("--idle", type=float, default=None, help="end after this many seconds without a call")
    ap.add_argument("--ready-fd", type=int, default=None, help="write the start's outcome (JSON) to this fd")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    import logging

    configure(getattr(logging, args.log_level.upper(), logging.INFO))
    return asyncio.run(main(args.inventory, args.idle, args.ready_fd))


if __name__ == "__main__":
    sys.exit(run())
