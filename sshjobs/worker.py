"""The controller's side of one remote worker process: start it, frame jobs, read results."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import shlex
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple
from pathlib import Path

import asyncssh
import cloudpickle

from .remote import STUB, WORKER, protocol
from .connection import HostLink, env_prefix, shell_word, split_env
from .errors import HostLost, PythonMismatch, UnpicklableResult, UnsafeResult, WorkerError, WorkerLost, WorkerStartError
from .log import get_logger
from .pickling import Pickled, dumps  # noqa: F401  (frames carry what dumps makes)
from .safe import RefusedType

log = get_logger("sshjobs.worker")

_STUB_WORD = shlex.quote(STUB)
_FUNC_CACHE = 1024  # functions a worker keeps; older ones are forgotten
STDERR_TAIL = 64 * 1024
MAX_OUTPUT = 16 * 1024 * 1024  # characters of a job's stdout (and of its stderr) kept
_WRITE_PIECE = 256 * 1024  # bytes handed to the channel at a time


class OutputTail:
    """The last ``limit`` characters of a stream, and how many were dropped before them."""

    __slots__ = ("parts", "size", "dropped", "limit")

    def __init__(self, limit: int):
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0
        self.limit = limit

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        while self.size > self.limit and self.parts:
            extra = self.size - self.limit
            head = self.parts[0]
            if len(head) <= extra:
                self.parts.pop(0)
                self.size -= len(head)
                self.dropped += len(head)
            else:
                self.parts[0] = head[extra:]
                self.size -= extra
                self.dropped += extra

    def text(self, rest: str = "") -> str:
        if rest:
            self.add(rest)
        body = "".join(self.parts)
        if self.dropped:
            return f"[sshjobs: {self.dropped} earlier characters of output dropped]\n" + body
        return body


def _cloudpickle_sources() -> dict[str, str]:
    root = Path(cloudpickle.__file__).parent
    return {f"cloudpickle/{p.name}": p.read_text("utf-8") for p in root.glob("*.py")}


def stub_command(python: str, env: dict[str, str], first: str | None = None) -> tuple[str, dict[str, str]]:
    """The command line that starts a remote bundle (``python -c STUB``), with the part of
    ``env`` that starting the interpreter needs; and the rest of ``env``, which must travel
    inside the stream (secrets stay off command lines, which ``ps`` shows).  ``first``: an
    interpreter to run instead when it exists there (an environment's, by its alias): the
    shell decides, with a builtin, so a call whose environment exists costs no extra start."""
    early, late = split_env(env)
    if first:
        return (f'e={shell_word(first)}; [ -x "$e" ] || e={shell_word(python)};'
                f' exec {env_prefix(early)}"$e" -c {_STUB_WORD}'), late
    return f"exec {env_prefix(early)}{shell_word(python)} -c {_STUB_WORD}", late


class _Session(asyncssh.SSHClientSession):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    def data_received(self, data, datatype):
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.worker._stderr(data)
        else:
            self.worker._feed(data)

    def exit_status_received(self, status):
        self.worker.exit_status = status

    def exit_signal_received(self, signal, core_dumped, msg, lang):
        self.worker.exit_signal = signal

    def pause_writing(self):
        self.worker._writable.clear()

    def resume_writing(self):
        self.worker._writable.set()
        self.worker._pump_out()

    def connection_lost(self, exc):
        self.worker._lost(exc)


class Worker:
    """One ``python3 -c STUB`` process on a host, serving jobs until closed."""

    def __init__(self, link: HostLink, python: str | None = None, env: dict | None = None,
                 slots: int | str = 1, on_output=None, max_output: int = MAX_OUTPUT, first: str | None = None,
                 preload: Sequence[str] = ()):
        self.link = link
        self.preload = list(preload)  # modules it imports before saying hello
        self.first = first  # an interpreter tried before ``python`` (see stub_command)
        self.host = link.host
        self.python = python or self.host.python
        self.env = dict(self.host.env) | dict(env or {})
        self.slots = slots
        self.on_output = on_output  # callback(worker, job_id, item, stream, text): live output
        self.max_output = max_output
        self.hello: dict = {}
        self.slot: int | None = None  # its slot on the host, once started
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.alive = False
        self.pending: dict[int, asyncio.Future] = {}
        self.outputs: dict[int, list] = {}
        self.in_flight = 0  # items, for load balancing
        self._next_id = 0
        self._funcs: OrderedDict[bytes, int] = OrderedDict()
        self._next_fid = 0
        self._buf = bytearray()
        self._frame: tuple | None = None  # (kind, job_id, sink, bytes still to come)
        self._oob: dict[int, list] = {}  # job id -> out-of-band buffers of its coming RESULT
        self._stderr_tail = bytearray()
        self._hello: asyncio.Future | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._outq: deque = deque()  # frame pieces not yet handed to the channel
        self._chan = None
        self._flush_soon = False
        self._release = None
        self._closed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------
    def command(self) -> str:
        return stub_command(self.python, self.env, self.first)[0]  # the rest of env travels in the CONFIG frame

    async def start(self, timeout: float = 60.0) -> "Worker":
        conn, self._release = await self.link.acquire()
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        try:
            self._chan, _ = await conn.create_session(lambda: _Session(self), self.command(), encoding=None)
        except asyncio.CancelledError:
            self._release()
            raise
        except asyncssh.ChannelOpenError as exc:
            self._release()
            if conn.is_closed():
                raise HostLost(f"{self.host.target}: connection lost: {exc.reason}") from None
            raise WorkerStartError(f"{self.host.target}: cannot open a channel: {exc.reason}") from None
        except (asyncssh.Error, OSError) as exc:
            self._release()
            raise HostLost(f"{self.host.target}: connection lost while starting a worker: {exc}") from None
        self.alive = True
        _, late = split_env(self.env)
        workdir = self.host.workdir or "~/.cache/sshjobs"
        config = {"cloudpickle": cloudpickle.__version__, "workdir": workdir, "slots": self.slots,
                  "env": late, "preload": self.preload}
        try:
            self._chan.write(WORKER.start(workdir) + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4)))
        except (BrokenPipeError, asyncssh.Error, OSError):
            pass  # it ended already (no such python, say): _lost() tells the hello why
        # A start that hangs (an interpreter that never answers, a stopped host) is killed,
        # not just closed: a process that does not read its input would outlive the controller.
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise WorkerStartError(f"{self.host.target}: worker did not start within {timeout:g}s;"
                                   " its process was killed") from None
        except asyncio.CancelledError:
            self.kill()
            raise
        mine, theirs = sys.version_info[:2], tuple(self.hello["python"][:2])
        if mine != theirs:
            self.close()
            raise PythonMismatch(
                f"{self.host.target}: the host's {self.python} is Python {'.'.join(map(str, self.hello['python']))}"
                f" but the controller runs Python {sys.version.split()[0]}; cloudpickle needs the same minor version."
                f' Set python = "python{mine[0]}.{mine[1]}" for this host in the inventory, or python = "match".',
            )
        return self

    def close(self) -> None:
        """End of input: the worker exits (and ends its job, if any)."""
        self._outq.clear()  # what was not sent yet is not wanted any more
        if self._chan is not None and self.alive:
            try:
                self._chan.write_eof()
            except Exception:
                pass
            self._chan.close()

    def kill(self) -> None:
        """Close, and ask sshd to signal the process group too (honoured for non-root logins)."""
        if self._chan is not None and self.alive:
            try:
                self._chan.send_signal("KILL")
            except Exception:
                pass
        self.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- jobs -------------------------------------------------------------------
    def _ensure_func(self, fn_bytes: bytes) -> int:
        fid = self._funcs.get(fn_bytes)
        if fid is not None:
            self._funcs.move_to_end(fn_bytes)
            return fid
        self._next_fid = (self._next_fid + 1) & 0xFFFFFFFF
        fid = self._next_fid
        self._write(protocol.FUNC, fid, fn_bytes)
        self._funcs[fn_bytes] = fid
        if len(self._funcs) > _FUNC_CACHE:
            _, old = self._funcs.popitem(last=False)
            self._write(protocol.FUNC, old, b"")
        return fid

    def send(self, kind: int, fn_bytes: bytes, body: tuple | bytes, size: int = 1) -> asyncio.Future:
        """Send a CALL ((args, kwargs) body) or MAP ((items,) body); a future of raw results.

        ``body`` may come pickled already (``dumps(body)``): gather pickles its arguments
        once and every host's frame shares those bytes (and out-of-band buffers)."""
        fut = asyncio.get_running_loop().create_future()
        if not self.alive:
            fut.set_exception(self._lost_error())
            return fut
        blob = body if isinstance(body, (bytes, bytearray, Pickled)) else dumps(body)
        fid = self._ensure_func(fn_bytes)
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        job_id = self._next_id
        self.pending[job_id] = fut
        self.in_flight += size
        fut.size = size  # type: ignore[attr-defined]
        if type(blob) is Pickled:
            for buf_kind, buf in blob.buffers:
                self._write(buf_kind, job_id, buf)
            blob = blob.data
        self._write(kind, job_id, protocol.FID.pack(fid), blob)
        return fut

    def _write(self, kind: int, job_id: int, *parts: bytes) -> None:
        """Queue a frame.  Big payloads are fed to the channel piece by piece as it drains
        (asyncssh copies whatever it is given into its send buffer), so a 200 MB argument
        sent to ten hosts is held once, not eleven times.  Frames queued in one turn of the
        event loop leave together: asyncssh builds and encrypts a packet per write, which
        bounded many small jobs (2,700 submits/s with a write per frame)."""
        self._outq.append(protocol.HEADER.pack(kind, job_id, sum(len(p) for p in parts)))
        self._outq.extend(memoryview(p) for p in parts if p)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._pump_out)

    def _pump_out(self) -> None:
        self._flush_soon = False
        q = self._outq
        try:
            while q and self._writable.is_set() and self._chan is not None and self.alive:
                head = q[0]
                if len(head) > _WRITE_PIECE:
                    self._chan.write(head[:_WRITE_PIECE])
                    q[0] = head[_WRITE_PIECE:]
                    continue
                batch = []  # small pieces, joined into one write of up to _WRITE_PIECE
                size = 0
                while q and len(q[0]) <= _WRITE_PIECE - size:
                    piece = q.popleft()
                    batch.append(piece)
                    size += len(piece)
                self._chan.write(batch[0] if len(batch) == 1 else b"".join(batch))
        except (BrokenPipeError, asyncssh.Error, OSError):
            q.clear()  # the channel is going away: _lost() fails the pending jobs

    # -- incoming ---------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        """Cut the stream into frames.  A frame that is not all in ``data`` (or is big)
        goes to a sink of its size as its packets arrive: a BYTES frame's sink is a
        BytesIO over ``bytes(size)``, whose getvalue() is that same bytes object, so a
        big out-of-band buffer is copied once, from the packets into the final value."""
        frame = self._frame
        view = memoryview(data)
        pos = 0
        end = len(data)
        while pos < end:
            if frame is not None:
                kind, job_id, sink, left = frame
                take = left if left <= end - pos else end - pos
                sink.write(view[pos:pos + take])
                pos += take
                left -= take
                if left:
                    frame = (kind, job_id, sink, left)
                    break
                frame = None
                self._dispatch(kind, job_id, sink.getvalue())
                continue
            buf = self._buf
            need = protocol.HEADER.size - len(buf)
            if end - pos < need:
                buf += view[pos:end]
                break
            if buf:
                buf += view[pos:pos + need]
                kind, job_id, size = protocol.HEADER.unpack(buf)
                buf.clear()
                pos += need
            else:
                kind, job_id, size = protocol.HEADER.unpack_from(view, pos)
                pos += protocol.HEADER.size
            if size <= end - pos and size < (1 << 20):
                body = bytes(view[pos:pos + size])
                pos += size
                self._dispatch(kind, job_id, bytearray(body) if kind == protocol.BYTEARRAY else body)
            elif size == 0:
                self._dispatch(kind, job_id, bytearray() if kind == protocol.BYTEARRAY else b"")
            else:
                frame = (kind, job_id, _Fill(size) if kind == protocol.BYTEARRAY else io.BytesIO(bytes(size)), size)
        self._frame = frame

    def _dispatch(self, kind: int, job_id: int, body) -> None:
        if kind == protocol.RESULT:
            fut = self.pending.pop(job_id, None)
            out = self.outputs.pop(job_id, None)
            if self._oob:
                buffers = self._oob.pop(job_id, None)
                if buffers is not None:
                    body = Buffered(body, buffers)
            if fut is not None:
                self.in_flight -= fut.size
                if not fut.done():
                    fut.set_result((body, out))
        elif kind == protocol.BYTES or kind == protocol.BYTEARRAY:
            if job_id not in self.pending:
                return  # nobody waits for it (or a broken host): not kept until the worker ends
            buffers = self._oob.get(job_id)
            if buffers is None:
                self._oob[job_id] = [body]
            else:
                buffers.append(body)
        elif kind == protocol.OUTPUT:
            stream, item = protocol.OUTPUT_HEAD.unpack_from(body, 0)
            text = bytes(body[protocol.OUTPUT_HEAD.size:]).decode("utf-8", "replace")
            tails = self.outputs.get(job_id)
            if tails is None:
                tails = self.outputs[job_id] = {}
            tail = tails.get((item, stream))
            if tail is None:
                tail = tails[(item, stream)] = OutputTail(self.max_output)
            tail.add(text)
            if self.on_output is not None:
                self.on_output(self, job_id, item, stream, text)
        elif kind == protocol.NEED_MODULES:  # a job needs cloudpickle and the host has not ours
            log.debug("shipping cloudpickle", host=self.host.name, have=self.hello.get("cloudpickle"))
            self._write(protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources()))
        elif kind == protocol.HELLO:
            if self._hello and not self._hello.done():
                self._hello.set_result(json.loads(body))
        elif kind == protocol.FATAL:
            etype, msg, tb = json.loads(body)[:3]
            err = WorkerStartError(f"{self.host.target}: worker failed to start: {etype}: {msg}")
            if self._hello and not self._hello.done():
                self._hello.set_exception(err)

    def _stderr(self, data: bytes) -> None:
        tail = self._stderr_tail
        tail += data
        if len(tail) > STDERR_TAIL:
            del tail[: len(tail) - STDERR_TAIL]

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", "replace")

    def _lost_error(self) -> WorkerError:
        how = ""
        if self.exit_signal:
            how = f" (killed by signal {self.exit_signal})"
        elif self.exit_status is not None:
            how = f" (exit status {self.exit_status})"
        tail = self.stderr_tail.strip()
        if self.exit_status == 127 or "not found" in tail[-300:]:
            return WorkerStartError(f"{self.host.target}: cannot run {self.python}{how}: {tail[-300:]}")
        detail = f": {tail[-500:]}" if tail else ""
        return WorkerLost(f"{self.host.target}: the worker process ended{how}{detail}")

    def _lost(self, exc) -> None:
        self.alive = False
        self._frame = None  # a frame cut short, a big buffer half received: gone
        self._oob.clear()
        if self._release:
            self._release()
            self._release = None
        err = self._lost_error()
        if exc is not None and self.exit_status is None and self.exit_signal is None:
            err = HostLost(f"{self.host.target}: connection lost: {exc}")
        if self._hello and not self._hello.done():
            self._hello.set_exception(err)
            self._hello.exception()  # retrieved: nobody waits for it when the start was cancelled
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.in_flight = 0
        self._outq.clear()
        self._writable.set()
        self._closed.set()


class _Fill:
    """The sink of a big BYTEARRAY frame: the final bytearray, filled as packets arrive."""

    __slots__ = ("buf", "view", "pos")

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pos = 0

    def write(self, data) -> None:
        end = self.pos + len(data)
        self.view[self.pos:end] = data
        self.pos = end

    def getvalue(self) -> bytearray:
        self.view.release()
        return self.buf


class Buffered:
    """A RESULT payload and the out-of-band buffers (BYTES/BYTEARRAY frames) sent before
    it; decode_results() takes either this or the bare payload."""

    __slots__ = ("body", "buffers")

    def __init__(self, body, buffers: list):
        self.body = body
        self.buffers = buffers


class AllOk(Sequence):
    """decode_results() of a chunk whose items all succeeded quietly: ``values`` and
    ``durations``, and the usual Items only on demand."""

    def __init__(self, values: list, durations: list):
        self.values = values
        self.durations = durations
        self._rows: list | None = None

    def _list(self) -> list:
        if self._rows is None:
            n = len(self.values)
            self._rows = list(map(Item._make, zip(repeat(True, n), self.values, repeat("", n), repeat("", n),
                                                  self.durations)))
        return self._rows

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self._list()[index]

    def __iter__(self):
        return iter(self._list())


class Item(NamedTuple):
    """One job's (or map item's) part of a RESULT.  When not ``ok``, ``value`` is the job's
    exception as (type name, message, traceback text), or the SshjobsError of a value that
    did not decode on the controller."""

    ok: bool
    value: Any
    stdout: str
    stderr: str
    duration: float


def unpickle_hint(exc: BaseException) -> str:
    """For a value that did not unpickle here for want of a module: which package, and its
    version here (a host with another version pickles what this one cannot load)."""
    if isinstance(exc, ImportError) and exc.name:
        package = exc.name.partition(".")[0]
    elif isinstance(exc, AttributeError) and "<module '" in str(exc):
        package = str(exc).split("<module '", 1)[1].split("'", 1)[0].partition(".")[0]
    else:
        return ""
    module = sys.modules.get(package)
    if module is None:
        return f" (the host's value needs {package}, which the controller cannot import: install it here)"
    version = getattr(module, "__version__", None)
    return (f" (the controller has {package} {version}: the host's {package} may be another version;"
            f" install the same one on both)") if isinstance(version, str) else ""


def decode_results(body, safe_loads=None) -> "list[Item] | AllOk":
    """RESULT payload -> one Item per job or map item.

    With ``safe_loads`` (safe_results) every part the host sent goes through it, the
    bookkeeping and error tuples included, not only the values.  ``body`` may be Buffered:
    each value's pickle then takes its share of the out-of-band buffers, in order."""
    buffers = None
    if type(body) is Buffered:
        body, buffers = body.body, body.buffers
    view = memoryview(body)
    (mlen,) = protocol.META_LEN.unpack_from(view, 0)
    pos = protocol.META_LEN.size
    loads = safe_loads or pickle.loads
    meta = loads(view[pos:pos + mlen])
    pos += mlen
    if type(meta) is tuple and meta[0] == protocol.ALL_OK:
        durations = meta[1]
        n = len(durations)
        try:
            values = loads(view[pos:], buffers=buffers) if buffers else loads(view[pos:])
        except Exception as exc:  # the chunk's values arrive together, so they fail together
            if isinstance(exc, RefusedType):
                err = UnsafeResult(str(exc))
            else:
                err = UnpicklableResult("the job's return value could not be unpickled on the controller: "
                                        f"{type(exc).__name__}: {exc}{unpickle_hint(exc)}")
            return list(map(Item._make, zip(repeat(False, n), repeat(err, n), repeat("", n), repeat("", n), durations)))
        return AllOk(values, durations)
    out = []
    taken = 0
    for ok, so, se, took, size, nbuf in meta:
        blob = view[pos:pos + size]
        pos += size
        mine = None
        if nbuf:
            mine = (buffers or [])[taken:taken + nbuf]
            taken += nbuf
        if ok:
            try:
                value = loads(blob, buffers=mine) if nbuf else loads(blob)
            except RefusedType as exc:
                ok = False
                value = UnsafeResult(str(exc))
            except Exception as exc:
                ok = False
                value = UnpicklableResult("the job's return value could not be unpickled on the controller:"
                                          f" {type(exc).__name__}: {exc}{unpickle_hint(exc)}")
        else:
            value = loads(blob, buffers=mine) if nbuf else loads(blob)
        out.append(Item(ok, value, so, se, took))
    return out
