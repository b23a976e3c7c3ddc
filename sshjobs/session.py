"""A running session's client: where its socket is, and the calls sent to it.

``sshjobs up`` starts a session process (``sshjobs.sessiond``) that holds the connections
and workers of one inventory file; its Unix socket is in a folder of this user's only
(``$XDG_RUNTIME_DIR/sshjobs``, else ``/tmp/sshjobs-UID``, mode 0700), named after the
file's path.  A call finds it there, sends the inventory's digest (the session serves
the same content only) and the call, with its function pickled here as it would be for a
direct run; it hears the call's events and then its value.  Closing the connection
(Ctrl-C) cancels the call, which ends its remote jobs.

Nothing here imports SSH, asyncio or the Cluster: a command or script that finds a
session starts in the time of its own imports.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import SessionError

HELLO_WAIT = 3.0  # seconds a session may take to accept a call before the call runs directly
RESTART_WAIT = 300.0  # ... and to start over with a changed inventory file
_HEADER = struct.Struct("!Q")


# -- where ---------------------------------------------------------------------------------
def session_dir(create: bool = False) -> Path:
    """This user's folder of session sockets: ``$XDG_RUNTIME_DIR/sshjobs`` when that is ours,
    else ``/tmp/sshjobs-UID``; refused (SessionError) when another user owns it or others
    may enter it."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = None
    if runtime:
        try:
            st = os.stat(runtime)
            if st.st_uid == uid and stat.S_ISDIR(st.st_mode):
                base = Path(runtime) / "sshjobs"
        except OSError:
            pass
    path = base or Path(f"/tmp/sshjobs-{uid}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SessionError(f"{path}: cannot make the session folder: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise SessionError(f"{path}: the session folder must be a folder of this user's that nobody else may"
                           f" enter (mode 0700); it is {stat.filemode(st.st_mode)}, owner uid {st.st_uid}")
    return path


def key(inventory_file: str | os.PathLike) -> str:
    """The session name of an inventory file: a hash of its resolved path."""
    return hashlib.sha256(os.fsencode(os.path.realpath(inventory_file))).hexdigest()[:16]


def socket_path(inventory_file: str | os.PathLike, create: bool = False) -> Path:
    return session_dir(create) / f"{key(inventory_file)}.sock"


# -- the wire: a length, then a pickle --------------------------------------------------------
def send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv(sock: socket.socket) -> Any:
    """The next message; EOFError when the other side is gone."""
    size = _HEADER.unpack(_read(sock, _HEADER.size))[0]
    return pickle.loads(_read(sock, size))


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the session closed the connection")
        buf += chunk
    return bytes(buf)


# -- the client ---------------------------------------------------------------------------------
class Stale(Exception):
    """The session serves other content of the inventory file, or none: run directly."""


def _connect(path: Path, timeout: float | None) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK) or isinstance(exc, TimeoutError):
            return None  # no session, or its process is gone
        raise
    return sock


def find(inventory) -> "Client | None":
    """The client of the session running for this inventory's file, if one is up and the
    inventory may use it (``inventory.session`` is not False, it came from a file)."""
    if getattr(inventory, "session", None) is False or getattr(inventory, "file", None) is None:
        return None
    path, content = inventory.file
    try:
        where = socket_path(path)
    except SessionError:
        return None
    if not where.exists():
        return None
    return Client(where, content, [h.name for h in inventory.hosts], list(getattr(inventory, "installed", ())))


class Client:
    """One inventory's calls to its session; each call is a connection of its own."""

    def __init__(self, path: Path, content: str, hosts: list[str], installed: list[str]):
        self.path = path
        self.content = content
        self.hosts = hosts
        self.installed = installed

    def _open(self, request: dict) -> socket.socket:
        """A connection with the call sent and accepted; Stale when it cannot be used."""
        sock = _connect(self.path, HELLO_WAIT)
        if sock is None:
            raise Stale("no session answers")
        try:
            send(sock, {"digest": self.content, "hosts": self.hosts, "installed": self.installed, **request})
            reply = recv(sock)
            if reply[0] == "restarting":  # the file changed: the session connects anew, then serves
                sock.settimeout(RESTART_WAIT)
                reply = recv(sock)
        except (OSError, EOFError) as exc:  # a session that hangs or died in between
            sock.close()
            raise Stale(f"the session did not answer: {exc}") from None
        if reply[0] == "stale":
            sock.close()
            raise Stale(reply[1])
        sock.settimeout(None)
        return sock

    def call(self, method: str, *args: Any, on_event: Callable | None = None, seen: list | None = None,
             **kwargs: Any) -> Any:
        """``cluster.METHOD(*args, **kwargs)`` in the session, on this inventory's hosts; its value.
        ``seen`` receives each host's ``HostState.info()`` after the call."""
        return self._ask({"op": "call", "method": method, "args": args, "kwargs": kwargs}, on_event, seen)

    def gather(self, fn: Callable, args: tuple, kwargs: dict, *, timeout: float | None, requirements: Any,
               safe_results: Any, on_event: Callable | None = None, seen: list | None = None) -> list:
        """``cluster.gather(fn, *args, **kwargs)`` in the session, ``fn`` and its arguments pickled
        here; Stale when they do not pickle (a direct run reports that, as Results)."""
        from .pickling import Shipped, dumps

        try:
            shipped, body = Shipped(fn), dumps((args, kwargs))
        except Exception as exc:
            raise Stale(f"the call does not pickle: {exc!r}") from None
        return self.call("_gather", shipped, shipped.data, body, timeout, local_lines(requirements), safe_results,
                         False, on_event=on_event, seen=seen)

    def exec(self, line: str, timeout: float | None, on_event: Callable | None = None) -> list[dict]:
        """A shell command on every host, from the session's workers: one row per host."""
        return self._ask({"op": "exec", "line": line, "timeout": timeout}, on_event, None)

    def imap(self, fn: Callable, items: Iterable, *, on_event: Callable | None = None, seen: list | None = None,
             streaming: bool = False, **kwargs: Any) -> Iterator[list]:
        """A map's Results in batches, as the session's MapRun hands them out (``kwargs``: those of
        ``Cluster._start_map``).  The call is sent now: Stale here (also when ``fn`` does not
        pickle), not at the first batch.  A ``range`` goes whole; other input is read here, in a
        thread, and sent as the session asks for it (``streaming``: item by item, for a source
        that waits for its lines).  Closing the iterator cancels the map."""
        from .pickling import Shipped

        identity = None
        if kwargs.get("journal") is not None:  # the journal is the session's to write, checked as here
            from .journal import function_identity

            identity = function_identity(fn)
            kwargs["journal"] = os.path.abspath(kwargs["journal"])
        try:
            shipped = Shipped(fn, identity)
        except Exception as exc:
            raise Stale(f"the function does not pickle: {exc!r}") from None
        kwargs["requirements"] = local_lines(kwargs.get("requirements"))
        whole = items if isinstance(items, range) else None
        sock = self._open({"op": "map", "fn": shipped, "items": whole, "kwargs": kwargs,
                           "events": on_event is not None})
        if whole is None:
            threading.Thread(target=_feed, args=(sock, items, streaming), name="sshjobs-items", daemon=True).start()
        return self._batches(sock, on_event, seen)

    def _ask(self, request: dict, on_event: Callable | None, seen: list | None) -> Any:
        sock = self._open({**request, "events": on_event is not None})
        try:
            return _done(*_reply(sock, on_event), seen)
        finally:
            sock.close()

    def _batches(self, sock: socket.socket, on_event: Callable | None, seen: list | None) -> Iterator[list]:
        try:
            while True:
                kind, rest = _reply(sock, on_event)
                if kind != "batch":
                    _done(kind, rest, seen)
                    return
                yield rest[0]
        finally:
            sock.close()


def _reply(sock: socket.socket, on_event: Callable | None) -> tuple[str, list]:
    """The next message that is not an event, the events before it handed to ``on_event``."""
    while True:
        kind, *rest = recv(sock)
        if kind != "event":
            return kind, rest
        if on_event is not None:
            on_event(*rest)


def _done(kind: str, rest: list, seen: list | None) -> Any:
    if kind == "error":
        raise rest[0]
    value, hosts = rest
    if seen is not None:
        seen.extend(hosts)
    return value


def local_lines(requirements: Any) -> Any:
    """Requirements as the session reads them: a requirements file's lines read here (its
    path is this process's), anything else as given."""
    if isinstance(requirements, (str, os.PathLike)) and os.path.isfile(requirements):
        with open(requirements, encoding="utf-8") as f:
            return f.read().splitlines()
    return requirements


def _feed(sock: socket.socket, items: Iterable, streaming: bool) -> None:
    """Send the items in batches (1, 2, 4 ... 1024 items; one at a time when ``streaming``),
    then the end, or the input's own exception."""
    from .pickling import dumps

    size = 1
    batch: list = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) >= size:
                send(sock, ("items", dumps((batch,))))
                batch = []
                size = 1 if streaming else min(size * 2, 1024)
        if batch:
            send(sock, ("items", dumps((batch,))))
        send(sock, ("end", None))
    except OSError:  # the call is over (its results are all in, or it was cancelled)
        return
    except BaseException as exc:
        try:
            send(sock, ("end", exc))
        except OSError:
            pass


def stop(inventory_file: str | os.PathLike) -> int | None:
    """Ask the session of an inventory file to end; its pid, or None when none answered."""
    status = ask(inventory_file, "stop")
    return None if status is None else status.get("pid")


def ask(inventory_file: str | os.PathLike, op: str = "status", path: Path | None = None) -> dict | None:
    """A session's status (``op="stop"``: and end it); None when none answers there."""
    where = path or socket_path(inventory_file)
    sock = _connect(where, HELLO_WAIT)
    if sock is None:
        return None
    try:
        send(sock, {"op": op})
        kind, value, _ = recv(sock)
        return value if kind == "ok" else None
    except (OSError, EOFError):
        return None
    finally:
        sock.close()


def running() -> list[dict]:
    """The status of every session of this user that answers."""
    try:
        folder = session_dir()
    except SessionError:
        return []
    found = []
    for sock in sorted(folder.glob("*.sock")) if folder.exists() else []:
        status = ask("", path=sock)
        if status is not None:
            found.append(status)
    return found
