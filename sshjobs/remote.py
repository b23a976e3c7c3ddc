"""The remote half of sshjobs: one stdlib-only module.

The controller starts ``python3 -c STUB`` on the host; the stub reads this module's
source from stdin, executes it as the module ``sshjobs_remote`` and calls ``main()``.
The same module is imported by the controller for the frame format, and tests run
``main()`` locally over a pipe.

Wire format, both directions: frames of ``HEADER`` (type, job id, payload length)
followed by the payload.  Nothing else is ever written to the protocol stream: the
worker moves the real stdout away before running anything and points file
descriptor 1 at stderr, so stray output from C code or subprocesses cannot corrupt it.

Big payloads travel out of band, both ways: a pickle (protocol 5) of a value holding a
bytes, bytearray or contiguous buffer (a numpy array, say) of ``OOB_MIN`` bytes or more
carries a NEXT_BUFFER opcode in its place, and the buffer itself goes raw in a ``BYTES``
or ``BYTEARRAY`` frame of the same job id just before the job's CALL, MAP or RESULT frame
(see ``Parts``).  The receiver makes each such frame the final bytes or bytearray as it
arrives and hands the job's buffers, in order, to the unpickler (``buffers=``): a 200 MB
value is neither copied into a pickle by the sender nor out of one by the receiver (the
controller copies a mutable argument once, when it is submitted).
"""

import builtins
import io
import os
import struct
import sys
import time
import types

# A worker's start-up is mostly imports: the C modules behind pickle, signal, threading
# and queue spare it pickle.py's and json's `re`, signal.py's `enum` and threading.py
# (~7 ms of CPU per worker).  json is imported only where it is needed.

def _import_pickle():
    """_pickle, without importing functools (and collections, operator, reprlib...) first:
    _pickle's init imports functools only to fetch ``partial``, which _functools provides.
    That was ~1.5 ms of CPU of each worker's start, for every job that never needs them.
    The stand-in leaves sys.modules at once: a later ``import functools`` is the real one."""
    if "functools" in sys.modules:
        import _pickle

        return _pickle
    import _functools

    stand_in = types.ModuleType("functools")
    stand_in.partial = _functools.partial
    sys.modules["functools"] = stand_in
    try:
        import _pickle
    finally:
        if sys.modules.get("functools") is stand_in:
            del sys.modules["functools"]
    return _pickle


try:
    pickle = _import_pickle()
except ImportError:  # pragma: no cover
    import pickle
try:
    import _signal as signal
except ImportError:  # pragma: no cover
    import signal
try:
    import _thread
    from _queue import SimpleQueue
except ImportError:  # pragma: no cover
    import _thread
    from queue import SimpleQueue

HEADER = struct.Struct("!BIQ")
_ATOMS = frozenset({int, float, bool, type(None), complex})  # values pickled without a Pickler

# controller -> worker
CONFIG = 1  # JSON: {"cloudpickle": version, "workdir": path, "env": {...}}
MODULES = 2  # pickled {relative path: source} of cloudpickle
FUNC = 3  # job id = function id; payload: cloudpickled callable
CALL = 4  # FID + pickled (args, kwargs): one result
MAP = 5  # FID + pickled (items,): one result per item
SHUTDOWN = 6
# worker -> controller
HELLO = 10  # JSON facts about the host and worker
RESULT = 11  # META_LEN + pickled meta + the pickled values, one after the other
OUTPUT = 12  # payload: OUTPUT_HEAD (stream 1 stdout / 2 stderr, item) + utf-8 text
FATAL = 13  # JSON: the worker cannot go on
# both ways: one out-of-band buffer of the job's next CALL, MAP or RESULT frame, raw
BYTES = 14  # the receiver makes it a bytes
BYTEARRAY = 15  # ... a bytearray (it stood for a bytearray or a writable buffer)
OOB_MIN = 64 * 1024  # payloads this big leave the pickle (= pickle's own frame size)

META_LEN = struct.Struct("!I")
# RESULT meta: a list of (ok, stdout, stderr, duration, size of the value's pickle, number
# of out-of-band buffers it takes), one per item; or (ALL_OK, durations): one pickled
# list holds every value (and takes all of the job's buffers).
ALL_OK = "all-ok"
FID = struct.Struct("!I")  # the function id that starts a CALL or MAP payload (the rest is
# pickled on its own, so the controller pickles an argument once for every host)
OUTPUT_HEAD = struct.Struct("!BI")  # stream, index of the item within a MAP job
STDOUT, STDERR = 1, 2
OUTPUT_FLUSH = 64 * 1024  # stream job output in frames of about this size
FLUSH_AFTER = 0.05  # seconds a finished result may wait in the buffer for company

# The command-line bootstrap: a line "LENGTH [KEY WORKDIR-IN-HEX]", then LENGTH bytes of
# this module's source.  It reads fd 0 unbuffered so that no byte meant for the worker is
# read ahead and lost.  With a KEY (a hash of the source) it runs the code object that an
# earlier worker cached under WORKDIR/code (compiling the source costs ~3 ms of CPU), and
# compiles the source when that file is missing, unreadable, not its user's own or writable
# by others; main() writes it then.
STUB = """import os,sys,types,marshal
r=os.fdopen(0,'rb',0)
h=r.readline().split()
n=int(h[0])
b=bytearray()
while len(b)<n:
 c=r.read(n-len(b))
 if not c:sys.exit(3)
 b+=c
m=types.ModuleType('sshjobs_remote');sys.modules[m.__name__]=m
try:
 p=os.path.join(os.path.expanduser(bytes.fromhex(h[2].decode()).decode()),'code','%s-%s-%x'%(h[1].decode(),sys.implementation.cache_tag,sys.hexversion))
 with open(p,'rb') as f:
  s=os.fstat(f.fileno())
  if s.st_uid!=os.getuid() or s.st_mode&18:raise ValueError
  c=marshal.load(f)
 if type(c) is not types.CodeType:raise ValueError
except Exception:
 c=compile(bytes(b),'sshjobs_remote.py','exec');m.CODE_CACHE=len(h)>2 and(p,c)
exec(c,m.__dict__);m.main()"""


def pack(kind, job_id, payload=b""):
    return HEADER.pack(kind, job_id, len(payload)) + payload


def read_frame(stream):
    """Read one frame from a binary stream; None at end of stream.  A BYTEARRAY frame's
    payload is read straight into a bytearray, any other into one bytes object."""
    head = _read_exact(stream, HEADER.size)
    if head is None:
        return None
    kind, job_id, size = HEADER.unpack(head)
    if kind == BYTEARRAY:
        payload = _read_bytearray(stream, size)
    else:
        payload = _read_exact(stream, size) if size else b""
    if payload is None:
        return None
    return kind, job_id, payload


def _read_bytearray(stream, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        more = stream.readinto(view[got:])
        if not more:
            return None
        got += more
    view.release()
    return buf


def _read_exact(stream, n):
    data = stream.read(n)
    if data is None or len(data) < n:
        if not data:
            return None
        parts = [data]
        got = len(data)
        while got < n:
            more = stream.read(n - got)
            if not more:
                return None
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


_PAYLOAD_HEADS = {0x42: (5, BYTES), 0x8E: (9, BYTES), 0x96: (9, BYTEARRAY)}  # BINBYTES, BINBYTES8, BYTEARRAY8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Parts(object):
    """The file a protocol-5 pickler writes to: it keeps the pieces instead of joining
    them, and takes big payloads out of band.

    The C pickler writes a bytes or bytearray payload of 64 KiB or more (a buffer such as
    a numpy array's too) as the object itself, in a write of its own, right after flushing
    its buffer, which then ends with the payload's opcode and length.  When a write is such
    a payload of OOB_MIN bytes or more, that opcode becomes NEXT_BUFFER (+ READONLY_BUFFER
    for bytes) and the payload goes to ``buffers`` as (BYTES or BYTEARRAY, object): the
    receiver gets it as a frame of its own and passes it to the unpickler (``buffers=``),
    which puts that very object in the value.  Anything else stays in ``parts``.
    ``keep``: keep mutable payloads by reference; the controller copies them (the caller
    may change a bytearray or an array after submitting it), the worker does not."""

    def __init__(self, keep):
        self.parts = []  # the in-band pickle, in pieces
        self.size = 0
        self.buffers = []  # out-of-band, in the order the pickle takes them
        self.keep = keep

    def write(self, data):
        if type(data) is bytes:
            n = len(data)
        else:
            view = memoryview(data)
            n = view.nbytes
            # by reference only where it may be and can be written as it is; else a copy
            # in memory order (what the pickler would have copied into its own buffer)
            data = view if self.keep and n >= OOB_MIN and view.c_contiguous else view.tobytes("A")
        if n >= OOB_MIN and self.parts:
            kind = self._payload_kind(n)
            if kind:
                self.buffers.append((kind, data))
                return n
        self.parts.append(data)
        self.size += n
        return n

    def _payload_kind(self, n):
        """BYTES or BYTEARRAY if the last piece ends with the opcode of an n-byte payload
        (which it then trades for NEXT_BUFFER), else 0.  The piece is parsed from its
        start, so that data that merely looks like such an opcode is never taken for one:
        [PROTO] [FRAME length frame | up to 3 unframed bytes] opcode length."""
        parts = self.parts
        p = parts[-1]
        if type(p) is not bytes:
            return 0
        i = 2 if len(parts) == 1 and p[:1] == b"\x80" else 0
        framed = p[i:i + 1] == b"\x95"
        if framed:
            if len(p) < i + 9:
                return 0
            i += 9 + _U64.unpack_from(p, i + 1)[0]
        for hlen, length in ((5, _U32), (9, _U64)):
            extra = len(p) - hlen - i
            if extra < 0 or extra > (0 if framed else 3):
                continue
            head = _PAYLOAD_HEADS.get(p[len(p) - hlen])
            if head is None or head[0] != hlen or length.unpack_from(p, len(p) - hlen + 1)[0] != n:
                continue
            kind = head[1]
            parts[-1] = p[:len(p) - hlen] + (b"\x97\x98" if kind == BYTES else b"\x97")
            self.size += len(parts[-1]) - len(p)
            return kind
        return 0

    def data(self):
        """The in-band pickle as one bytes (it is small once the payloads are out)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class _Flag(object):
    """threading.Event's set() and wait(timeout) on a bare lock (no threading import)."""

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self):
        try:
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def is_set(self):
        if self._lock.acquire(False):
            self._lock.release()
            return True
        return False

    def wait(self, timeout):
        if self._lock.acquire(True, timeout):
            self._lock.release()
            return True
        return False


def _config(payload):
    """CONFIG: a pickled dict from the controller; JSON (older controllers, tests) too."""
    if payload[:1] == b"{":
        import json

        return json.loads(payload.decode("utf-8"))
    return pickle.loads(payload)


def _json(value):
    """JSON for HELLO's and FATAL's plain values (str, int, bool, None, lists, dicts of
    them) without importing json, whose `re` costs every worker start ~2 ms.  Strings
    come out ASCII, as json.dumps writes them."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        out = []
        for c in value:
            o = ord(c)
            if c == '"' or c == "\\":
                out.append("\\" + c)
            elif 0x20 <= o < 0x7F:
                out.append(c)
            elif o > 0xFFFF:
                o -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 | (o >> 10), 0xDC00 | (o & 0x3FF)))
            else:
                out.append("\\u%04x" % o)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (_json(str(k)), _json(v)) for k, v in value.items()) + "}"
    return _json(str(value))


def error_info(exc):
    """(type name, message, traceback text) of an exception, for the controller."""
    import traceback  # imported when first needed: it pulls in re, tokenize, linecache

    return (
        type(exc).__qualname__,
        str(exc),
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


class _Capture(io.TextIOBase):
    """A job's sys.stdout or sys.stderr: kept per job, streamed in large pieces."""

    def __init__(self, worker, stream):
        self._worker = worker
        self._stream = stream
        self._parts = []
        self._size = 0
        self.buffer = _CaptureBytes(self)

    @property
    def encoding(self):
        return "utf-8"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if text:
            self._parts.append(text)
            self._size += len(text)
            if self._size >= OUTPUT_FLUSH:
                self._worker.send_output(self._stream, self.take())
        return len(text)

    def take(self):
        text = "".join(self._parts)
        self._parts = []
        self._size = 0
        return text


class _CaptureBytes:
    def __init__(self, capture):
        self._capture = capture

    def write(self, data):
        self._capture.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self):
        pass


class Worker:
    def __init__(self, inp, out):
        self.inp = inp
        self.out = out
        self.lock = _thread.allocate_lock()
        self.jobs = SimpleQueue()
        self.exiting = _Flag()
        self.funcs = {}
        self.job_id = 0
        self.item = 0
        self.loads = pickle.loads
        self.cloudpickle = None

    # -- output --------------------------------------------------------------
    def send(self, kind, job_id, payload=b"", flush=True):
        with self.lock:
            self.out.write(HEADER.pack(kind, job_id, len(payload)))
            self.out.write(payload)
            if flush:
                self.out.flush()

    def send_output(self, stream, text):
        if text:
            self.send(OUTPUT, self.job_id, OUTPUT_HEAD.pack(stream, self.item) + text.encode("utf-8", "replace"))

    def dumps(self, value):
        """A value's pickle as Parts: big payloads out of band, by reference (they are
        written straight from the value's own memory), the rest in pieces."""
        if type(value) in _ATOMS:
            out = Parts(True)
            out.write(pickle.dumps(value, protocol=5))
            return out
        try:
            out = Parts(True)
            pickle.Pickler(out, protocol=5).dump(value)
        except Exception:
            if self.cloudpickle is None:
                import cloudpickle

                self.cloudpickle = cloudpickle
            out = Parts(True)
            self.cloudpickle.Pickler(out, protocol=5).dump(value)
        return out

    # -- input ---------------------------------------------------------------
    def reader(self):
        """Feed jobs to the main thread, each with its out-of-band buffers (or None);
        at end of input, end the whole process group."""
        buffers = {}
        try:
            while True:
                frame = read_frame(self.inp)
                if frame is None or frame[0] == SHUTDOWN:
                    break
                kind, job_id, payload = frame
                if kind == BYTES or kind == BYTEARRAY:
                    buffers.setdefault(job_id, []).append(payload)
                    continue
                self.jobs.put((kind, job_id, payload, buffers.pop(job_id, None) if buffers else None))
        except Exception:
            pass
        self.jobs.put(None)
        # A job may be running: stdin closing means the controller is gone or wants
        # this worker dead.  Give an idle main thread a moment to exit cleanly.
        # If the main thread gets there first it does the cleanup: a second _die() here
        # would exit the process halfway through it, leaving the job's children behind.
        if not self.exiting.wait(0.05):
            _die()

    # -- setup ---------------------------------------------------------------
    def setup(self):
        frame = read_frame(self.inp)
        if frame is None or frame[0] != CONFIG:
            raise SystemExit("sshjobs worker: expected a CONFIG frame")
        config = _config(frame[2])
        for key, value in (config.get("env") or {}).items():
            os.environ[key] = value
        # Each slot gets its share of the cores for BLAS/OpenMP unless told otherwise.
        slots = config.get("slots") or 1
        threads = str(max(1, (os.cpu_count() or 1) // (os.cpu_count() if slots == "auto" else slots)))
        for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(key, threads)
        workdir = os.path.expanduser(config.get("workdir") or "~/.cache/sshjobs")
        _private_dir(workdir)
        want = config.get("cloudpickle")
        have = self._find_cloudpickle(workdir, want)
        if str(want).startswith("3."):  # the loaders below are cloudpickle 3's
            self.loads = _loads
        hello = {
            "python": list(sys.version_info[:3]),
            "executable": sys.executable,
            "pid": os.getpid(),
            "cpus": os.cpu_count(),
            "cloudpickle": have,
            "hostname": os.uname().nodename,
            "user": _user(),
            "home": os.path.expanduser("~"),
            "workdir": workdir,
            "platform": sys.platform,
            "machine": os.uname().machine,
            # for the id of environments (see env_hash), so the controller can check for one
            "implementation": sys.implementation.name,
            "realpath": os.path.realpath(sys.executable),
            "index_env": _index_env(),
        }
        self.send(HELLO, 0, _json(hello).encode())
        _cache_code(globals().get("CODE_CACHE"))
        if have != want:
            frame = read_frame(self.inp)
            if frame is None or frame[0] != MODULES:
                raise SystemExit("sshjobs worker: expected cloudpickle's source")
            self._install_cloudpickle(workdir, want, pickle.loads(frame[2]))

    def _find_cloudpickle(self, workdir, want):
        """cloudpickle's version, found without importing it: its imports are most of a
        worker's start-up (~20 ms of CPU), and most jobs never need more of it than the
        few loaders in _LIGHT.  It is imported when something does need it."""
        lib = os.path.join(workdir, "lib", "cloudpickle-%s" % want)
        if want and os.path.isfile(os.path.join(lib, "cloudpickle", "cloudpickle.py")):
            sys.path.insert(0, lib)
            return want
        found = _version_on_path()
        if found:
            return found
        try:  # an unusual layout (a zip, say): ask the module itself
            import cloudpickle
        except Exception:
            return None
        self.cloudpickle = cloudpickle
        return getattr(cloudpickle, "__version__", None)

    def _install_cloudpickle(self, workdir, want, sources):
        """Cache the shipped source under the workdir, so later workers import it."""
        for name in [m for m in sys.modules if m == "cloudpickle" or m.startswith("cloudpickle.")]:
            del sys.modules[name]
        lib = os.path.join(workdir, "lib", "cloudpickle-%s" % want)
        try:
            os.makedirs(os.path.dirname(lib), mode=0o700, exist_ok=True)
            tmp = "%s.tmp-%d" % (lib, os.getpid())
            os.mkdir(tmp, 0o700)  # makedirs would give the parents it creates the umask's mode
            for rel, source in sources.items():
                path = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(source)
            try:
                os.rename(tmp, lib)
            except OSError:  # another worker won the race: use its copy
                _rmtree(tmp)
        except OSError:
            lib = None
        if lib and os.path.isdir(lib):
            sys.path.insert(0, lib)
            import cloudpickle
        else:  # read-only home: load from memory
            cloudpickle = _load_from_sources(sources)
        self.cloudpickle = cloudpickle

    # -- jobs ----------------------------------------------------------------
    def run(self):
        out = _Capture(self, STDOUT)
        err = _Capture(self, STDERR)
        sys.stdout, sys.stderr = out, err
        funcs = self.funcs
        jobs = self.jobs
        last_flush = time.monotonic()
        while True:
            frame = jobs.get()
            if frame is None:
                break
            kind, job_id, payload, buffers = frame
            self.job_id = job_id
            self.item = 0
            if kind == FUNC:
                if not payload:
                    funcs.pop(job_id, None)
                    continue
                try:
                    funcs[job_id] = self.loads(payload)
                except BaseException as exc:
                    funcs[job_id] = _Unloadable(exc)
                continue
            if kind == CALL:
                results = [self.call(funcs, payload, buffers, out, err)]
            elif kind == MAP:
                results = self.map(funcs, payload, buffers, out, err)
            else:
                continue
            # Batch replies while more jobs wait, but never hold a finished result back for
            # long: a worker that dies later would take it along.
            now = time.monotonic()
            flush = jobs.empty() or now - last_flush > FLUSH_AFTER
            self.send_result(job_id, results, flush=flush)
            if flush:
                last_flush = now
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

    def unpack_job(self, payload, buffers):
        (fid,) = FID.unpack_from(payload, 0)
        body = memoryview(payload)[FID.size:]
        return (fid,) + tuple(self.loads(body, buffers=buffers) if buffers else self.loads(body))

    def call(self, funcs, payload, buffers, out, err):
        start = time.perf_counter()
        try:
            fid, args, kwargs = self.unpack_job(payload, buffers)
            fn = funcs[fid]
            value = fn(*args, **kwargs)
            ok = True
        except BaseException as exc:
            value = error_info(exc)
            ok = False
        return (ok, value, out.take(), err.take(), time.perf_counter() - start)

    def map(self, funcs, payload, buffers, out, err):
        try:
            fid, items = self.unpack_job(payload, buffers)
            fn = funcs[fid]
        except BaseException as exc:
            return [(False, error_info(exc), "", "", 0.0)]
        results = []
        append = results.append
        clock = time.perf_counter
        for index, item in enumerate(items):
            self.item = index
            start = clock()
            try:
                value = fn(item)
                ok = True
            except BaseException as exc:
                value = error_info(exc)
                ok = False
            took = clock() - start
            append((ok, value, out.take() if out._parts else "", err.take() if err._parts else "", took))
        return results

    def send_result(self, job_id, results, flush):
        """One RESULT frame: a meta list, then each value pickled on its own so that
        one value that cannot be pickled (or unpickled) costs only its own job; before
        it, a BYTES or BYTEARRAY frame per out-of-band buffer of those pickles.

        Many items that all succeeded without output go as one pickled list of values
        and a list of durations: per-item pickles and meta bounded map over tiny items.
        """
        if len(results) > 1 and all([r[0] and not r[2] and not r[3] for r in results]):
            try:
                blob = self.dumps([r[1] for r in results])
            except BaseException:
                blob = None  # some value does not pickle: each on its own below
            if blob is not None:
                self._write_result(job_id, pickle.dumps((ALL_OK, [r[4] for r in results]), protocol=4),
                                   [blob], flush)
                return
        meta = []
        blobs = []
        for ok, value, so, se, took in results:
            if ok:
                try:
                    blob = self.dumps(value)
                except BaseException as exc:
                    ok = False
                    import traceback

                    value = (
                        "UnpicklableResult",
                        "the job's return value of type %s could not be pickled: %s"
                        % (type(value).__qualname__, exc),
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    )
            if not ok:
                blob = Parts(True)
                blob.write(pickle.dumps(value, protocol=4))
            meta.append((ok, so, se, took, blob.size, len(blob.buffers)))
            blobs.append(blob)
        self._write_result(job_id, pickle.dumps(meta, protocol=4), blobs, flush)

    def _write_result(self, job_id, head, blobs, flush):
        size = META_LEN.size + len(head) + sum(b.size for b in blobs)
        with self.lock:
            write = self.out.write
            for blob in blobs:
                for kind, buf in blob.buffers:
                    write(HEADER.pack(kind, job_id, memoryview(buf).nbytes))
                    write(buf)
            write(HEADER.pack(RESULT, job_id, size))
            write(META_LEN.pack(len(head)))
            write(head)
            for blob in blobs:
                for part in blob.parts:
                    write(part)
            if flush:
                self.out.flush()


def _version_on_path():
    """The __version__ line of the cloudpickle that ``import cloudpickle`` would find."""
    for entry in sys.path:
        try:
            with open(os.path.join(entry or ".", "cloudpickle", "__init__.py"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("__version__"):
                return line.partition("=")[2].strip().strip("\"'") or None
        return None
    return None


# cloudpickle 3's loaders for functions and closures, as in cloudpickle/cloudpickle.py, so
# that loading a function does not import cloudpickle and what it imports.  Any other
# name (classes, enums, typevars...) is looked up in the real module, imported then.
def _cp_builtin_type(name):
    return type if name == "ClassType" else getattr(types, name)


def _cp_subimport(name):
    __import__(name)
    return sys.modules[name]


def _cp_dynamic_subimport(name, vars):
    mod = types.ModuleType(name)
    mod.__dict__.update(vars)
    mod.__dict__["__builtins__"] = builtins.__dict__
    return mod


class _EmptyCellValue(object):
    pass


_EMPTY_CELL_VALUE = _EmptyCellValue()


def _cp_make_function(code, globals, name, argdefs, closure):
    globals["__builtins__"] = builtins.__dict__
    return types.FunctionType(code, globals, name, argdefs, closure)


def _cp_make_empty_cell():
    if False:
        cell = None
    return (lambda: cell).__closure__[0]  # noqa: F821  (the cell stays empty)


def _cp_make_cell(value=_EMPTY_CELL_VALUE):
    cell = _cp_make_empty_cell()
    if value is not _EMPTY_CELL_VALUE:
        cell.cell_contents = value
    return cell


def _cp_function_setstate(obj, state):
    state, slotstate = state
    obj.__dict__.update(state)
    obj_globals = slotstate.pop("__globals__")
    obj_closure = slotstate.pop("__closure__")
    slotstate.pop("_cloudpickle_submodules")
    obj.__globals__.update(obj_globals)
    obj.__globals__["__builtins__"] = builtins.__dict__
    if obj_closure is not None:
        for i, cell in enumerate(obj_closure):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            obj.__closure__[i].cell_contents = value
    for k, v in slotstate.items():
        setattr(obj, k, v)


_LIGHT = {
    "_builtin_type": _cp_builtin_type,
    "subimport": _cp_subimport,
    "dynamic_subimport": _cp_dynamic_subimport,
    "_empty_cell_value": _EMPTY_CELL_VALUE,
    "_make_function": _cp_make_function,
    "_make_empty_cell": _cp_make_empty_cell,
    "_make_cell": _cp_make_cell,
    "_function_setstate": _cp_function_setstate,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "cloudpickle.cloudpickle" and name in _LIGHT:
            return _LIGHT[name]
        return pickle.Unpickler.find_class(self, module, name)


class _Reader(object):
    """A read-only file over a buffer: io.BytesIO would copy a memoryview first."""

    def __init__(self, data):
        self.view = memoryview(data)
        self.pos = 0

    def read(self, n=-1):
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        chunk = self.view[self.pos:end].tobytes()
        self.pos = end
        return chunk

    def readinto(self, buf):
        n = min(len(buf), len(self.view) - self.pos)
        buf[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def readline(self):
        end = self.pos
        while end < len(self.view):
            i = self.view[end:end + 4096].tobytes().find(b"\n")
            if i >= 0:
                return self.read(end + i + 1 - self.pos)
            end += 4096
        return self.read()


def _loads(data, buffers=None):
    return _Unpickler(_Reader(data), buffers=buffers).load()


class _Unloadable:
    """Stands for a function that could not be unpickled here; calling it says why."""

    def __init__(self, exc):
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


def _load_from_sources(sources):
    import importlib.abc
    import importlib.util

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            rel = name.replace(".", "/")
            for candidate, is_pkg in ((rel + "/__init__.py", True), (rel + ".py", False)):
                if candidate in sources:
                    return importlib.util.spec_from_loader(name, self, is_package=is_pkg)
            return None

        def exec_module(self, module):
            rel = module.__name__.replace(".", "/")
            src = sources.get(rel + "/__init__.py") or sources[rel + ".py"]
            exec(compile(src, "<sshjobs>/" + rel, "exec"), module.__dict__)

    sys.meta_path.insert(0, Finder())
    import cloudpickle

    return cloudpickle


def _cache_code(cache):
    """Write the worker's compiled code where the next worker's STUB looks for it (see
    STUB): a private file, renamed into place whole, in the 0700 workdir."""
    if not cache or not isinstance(cache, tuple):
        return
    path, code = cache
    try:
        import marshal

        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            os.mkdir(folder, 0o700)
        tmp = "%s.tmp-%d" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                marshal.dump(code, f)
            os.rename(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    except Exception:
        pass  # no cache (a read-only home, say): the next worker compiles again


def _private_dir(path):
    """Create the workdir (parents as needed) and keep it mode 0700: everything sshjobs
    puts on a host lives below it, out of other users' reach."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
    except OSError:
        pass  # a read-only home: nothing is written (cloudpickle is loaded from memory)


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        _rmtree(path)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _user():
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except Exception:
        return os.environ.get("USER", "")


def _group_members(pgrp):
    """Other processes of a process group (Linux /proc); None where it cannot tell."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    me = os.getpid()
    found = []
    for name in names:
        if name.isdigit() and int(name) != me:
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
                # pgrp is the 3rd field after the ")" that ends the command name
                if int(stat[stat.rindex(b")") + 2:].split()[2]) == pgrp:
                    found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _never_had_children():
    """True only when this process certainly never had a child, so that its process
    group holds nobody else: then the /proc scan (~3-8 ms of CPU on a busy host, for
    every worker that exits) is skipped.  Only a descendant can be in the group."""
    try:
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:  # children reaped unaccounted
            return False
        try:
            os.waitpid(-1, os.WNOHANG)
            return False  # a child is alive (or a zombie)
        except ChildProcessError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss == 0  # none was ever reaped
    except Exception:
        return False


def _die(code=0):
    """Exit now, taking the job's children along when this worker leads its group.

    Called from the reader thread too (end of input while a job runs), so no signal
    handlers here (main thread only): the others in the group are signalled one by one."""
    try:
        pgrp = os.getpgrp()
        if pgrp == os.getpid() and not _never_had_children():
            for sig, grace in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 0.5)):
                others = _group_members(pgrp)
                if others is None:  # no /proc: the whole group, this process included
                    os.killpg(pgrp, signal.SIGKILL)
                if not others:
                    break
                for pid in others:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
                deadline = time.time() + grace
                while time.time() < deadline and _group_members(pgrp):
                    time.sleep(0.02)
    finally:
        os._exit(code)


def main():
    # The protocol gets private copies of stdin and stdout; the job sees /dev/null on
    # fd 0 and the SSH stderr stream on fd 1, so nothing it does can corrupt frames.
    inp = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    worker = Worker(inp, out)
    try:
        worker.setup()
    except BaseException as exc:
        try:
            worker.send(FATAL, 0, _json(list(error_info(exc))).encode())
        finally:
            os._exit(1)
    _thread.start_new_thread(worker.reader, ())
    worker.run()
    worker.exiting.set()
    try:
        out.flush()
    finally:
        _die(0)


# Index settings from the host's environment: part of an environment's id (HELLO reports them).
INDEX_ENV = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS",
             "UV_NO_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")


def _index_env():
    return ["%s=%s" % (k, os.environ[k]) for k in INDEX_ENV if os.environ.get(k)]


# Workers are sent only the source above this line (sshjobs.worker.WORKER_SOURCE_END).
# -- environments: what sshjobs.provisioning runs on the host ---------------------------
# ``python3 -c PROVISION_STUB`` reads this module like the worker does, then one JSON
# request from the rest of stdin, and prints one JSON reply on stdout.

import json  # noqa: E402  (workers never get this part: see worker.WORKER_SOURCE_END)

PROVISION_STUB = STUB.replace("m.main()", "m.provision()")
ENV_MARKER = "sshjobs-env.json"  # present only in a complete environment
ENV_REQUIREMENTS = "sshjobs-requirements.txt"
ERROR_TAIL = 2000  # characters of uv's (or pip's) message kept


class ProvisionFailure(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def env_hash(python_id, requirements, options):
    """An environment's id: (interpreter, sorted requirement set, index options)."""
    import hashlib

    blob = json.dumps({"python": python_id, "requirements": sorted(set(requirements)),
                       "options": list(options)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def python_id(implementation, version, realpath):
    return "%s-%s %s" % (implementation, version, realpath)


def python_facts(full=False):
    exe = os.path.realpath(sys.executable)
    version = "%d.%d.%d" % sys.version_info[:3]
    facts = {"version": version, "executable": exe, "id": python_id(sys.implementation.name, version, exe)}
    if full:
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (AttributeError, ValueError, OSError):
            libc = ""
        if not libc:
            import platform

            name, ver = platform.libc_ver()
            libc = ("%s %s" % (name, ver)).strip()
        facts.update(implementation=sys.implementation.name, cache_tag=sys.implementation.cache_tag,
                     platform=sys.platform, machine=os.uname().machine, libc=libc)
    return facts


def _complete(target):
    marker = os.path.join(target, ENV_MARKER)
    try:
        os.utime(marker)  # last use, for prune
        return True
    except OSError:
        return False


def _trim(text):
    text = text.strip()
    return text if len(text) <= ERROR_TAIL else "..." + text[-ERROR_TAIL:]


def _run(cmd, what):
    import subprocess

    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise ProvisionFailure("InstallError", "%s: cannot run %s: %s" % (what, cmd[0], exc))
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ProvisionFailure("InstallError", "%s failed (exit status %d):\n%s" % (what, proc.returncode, _trim(out)))
    return out


def _uv_works(path):
    import subprocess

    try:
        proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    except OSError:
        return None
    return proc.stdout.decode("utf-8", "replace").strip() if proc.returncode == 0 else None


def find_uv(workdir, methods=("path", "workdir")):
    """(how, path) of a working uv on this host, or (None, None)."""
    import shutil

    for how in methods:
        if how == "path":
            cands = [shutil.which("uv"), os.path.expanduser("~/.local/bin/uv"), os.path.expanduser("~/.cargo/bin/uv")]
        elif how == "workdir":
            cands = [os.path.join(workdir, "bin", "uv")]
        else:
            continue
        for path in cands:
            if path and os.path.isfile(path) and os.access(path, os.X_OK) and _uv_works(path):
                return how, path
    return None, None


def _pip_uv(workdir, find_links):
    """``python3 -m pip install uv`` into the workdir (--target: allowed where PEP 668
    forbids --user installs); the binary is then linked as <workdir>/bin/uv."""
    target = os.path.join(workdir, "uv-pip")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
           "--upgrade", "--target", target, "uv"]
    if find_links:
        cmd[4:4] = ["--no-index", "--find-links", find_links]
    _run(cmd, "pip install uv")
    path = os.path.join(target, "bin", "uv")
    if not _uv_works(path):
        raise ProvisionFailure("InstallError", "pip installed uv but %s does not run" % path)
    link = os.path.join(workdir, "bin", "uv")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = "%s.tmp-%d" % (link, os.getpid())
    os.symlink(path, tmp)
    os.rename(tmp, link)
    return path


def _get_uv(workdir, methods, find_links):
    """(how, uv path or None for plain pip) following the controller's order of methods."""
    errors = []
    for how in methods:
        if how in ("path", "workdir"):
            found, path = find_uv(workdir, (how,))
            if path:
                return found, path
        elif how == "pip":
            try:
                return "pip", _pip_uv(workdir, find_links)
            except ProvisionFailure as exc:
                errors.append(exc.message)
        elif how == "venv-pip":
            return "venv-pip", None
    raise ProvisionFailure("UvUnavailable", "no uv on the host and no way to get one (tried %s)%s"
                           % (", ".join(methods), (":\n" + "\n".join(errors)) if errors else ""))


def _retarget(tmp, target):
    """A venv made by ``python -m venv`` names its folder in scripts and activate files:
    point them at where it is renamed to (uv's --relocatable venvs need none of this)."""
    old, new = tmp.encode(), target.encode()
    bindir = os.path.join(tmp, "bin")
    for name in os.listdir(bindir):
        path = os.path.join(bindir, name)
        if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > (1 << 20):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if old in data:
            with open(path, "wb") as f:
                f.write(data.replace(old, new))


def _build(tmp, req, workdir, facts, reqfile, target):
    find_links = os.path.join(workdir, "wheels") if req.get("offline") else None
    how, uv = _get_uv(workdir, req.get("uv_methods", ["path", "workdir", "pip", "venv-pip"]), find_links)
    if uv:
        try:
            _run([uv, "venv", "--quiet", "--relocatable", "--python", facts["executable"], tmp], "uv venv")
        except ProvisionFailure as exc:
            if "--relocatable" not in exc.message:  # an old uv: an ordinary venv
                raise
            _run([uv, "venv", "--quiet", "--python", facts["executable"], tmp], "uv venv")
        cmd = [uv, "pip", "install", "--quiet", "--python", os.path.join(tmp, "bin", "python"), "-r", reqfile]
        if find_links:
            cmd += ["--offline", "--no-index", "--find-links", find_links]
        _run(cmd, "uv pip install")
    else:
        _run([facts["executable"], "-m", "venv", tmp], "python -m venv")
        cmd = [os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
               "--quiet", "-r", reqfile]
        if find_links:
            cmd += ["--no-index", "--find-links", find_links]
        _run(cmd, "pip install")
        _retarget(tmp, target)
    return how, uv


def _list_envs(envs):
    out = []
    try:
        names = sorted(os.listdir(envs))
    except OSError:
        return out
    for name in names:
        path = os.path.join(envs, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        info = {"hash": name, "env": path, "complete": False}
        marker = os.path.join(path, ENV_MARKER)
        try:
            with open(marker) as f:
                info.update(json.load(f))
            info["last_used"] = os.stat(marker).st_mtime
            info["complete"] = True
        except (OSError, ValueError):
            pass
        out.append(info)
    return out


def _prune(envs, older_than):
    import fcntl

    removed, kept = [], []
    now = time.time()
    try:
        names = sorted(os.listdir(envs))
    except OSError:
        return {"removed": removed, "kept": kept}
    for name in names:
        path = os.path.join(envs, name)
        if name.startswith(".del-"):  # an interrupted prune
            _remove(path)
            continue
        if name.endswith(".lock") or not (os.path.isdir(path) or name.startswith(".tmp-")):
            continue  # lock files stay: removing one under a waiting builder would break the lock
        h = name[len(".tmp-"):].split("-")[0] if name.startswith(".tmp-") else name
        if not name.startswith("."):
            try:
                age = now - os.stat(os.path.join(path, ENV_MARKER)).st_mtime
            except OSError:
                age = float("inf")  # incomplete: never usable
            if age < older_than:
                kept.append(name)
                continue
        with open(os.path.join(envs, "." + h + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # being built or checked right now
                kept.append(name)
                continue
            gone = os.path.join(envs, ".del-%s-%d" % (name.lstrip("."), os.getpid()))
            os.rename(path, gone)
            _remove(gone)
            removed.append(name)
    return {"removed": removed, "kept": kept}


def provision_request(req):
    """One provisioning request (a dict) -> reply (a dict); see sshjobs.provisioning."""
    import fcntl
    import glob

    os.umask(0o077)  # everything sshjobs creates under the workdir is the user's alone
    workdir = os.path.abspath(os.path.expanduser(req["workdir"]))
    envs = os.path.join(workdir, "envs")
    op = req["op"]
    if op == "list":
        return {"ok": True, "workdir": workdir, "envs": _list_envs(envs)}
    if op == "prune":
        return dict(_prune(envs, float(req["older_than"])), ok=True, workdir=workdir)
    if op == "find-python":
        how, uv = find_uv(workdir, [m for m in req.get("uv_methods", ()) if m in ("path", "workdir")])
        if not uv and "pip" in req.get("uv_methods", ()):
            how, uv = "pip", _pip_uv(workdir, None)
        if not uv:
            os.makedirs(os.path.join(workdir, "bin"), exist_ok=True)  # for an upload
            return {"ok": True, "uv": None, "facts": python_facts(True), "workdir": workdir}
        out = _run([uv, "python", "find", "--system", req["version"]], "uv python find " + req["version"]).strip()
        return {"ok": True, "uv": how, "python": out.splitlines()[-1].strip(), "workdir": workdir}
    facts = python_facts(full=op == "check")
    h = env_hash(facts["id"], req["requirements"], list(req.get("options", ())) + _index_env())
    target = os.path.join(envs, h)
    reply = {"ok": True, "hash": h, "env": target, "python": os.path.join(target, "bin", "python"),
             "workdir": workdir, "version": facts["version"], "cached": True}
    if _complete(target):
        return reply
    reply["cached"] = False
    if op == "check":
        for sub in ("envs", "bin", "wheels"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        how, uv = find_uv(workdir)
        reply.update(facts=facts, uv=how, uv_path=uv)
        if req.get("offline"):
            wheels = os.path.join(workdir, "wheels")
            reply["wheels"] = {n: os.path.getsize(os.path.join(wheels, n)) for n in os.listdir(wheels)
                               if not n.startswith(".")}
        return reply
    if op != "build":
        raise ProvisionFailure("ProtocolError", "unknown request %r" % op)
    os.makedirs(envs, exist_ok=True)
    os.chdir(workdir)  # not the home folder: uv would read a pyproject.toml it finds there
    with open(os.path.join(envs, "." + h + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another controller building the same env: wait for it
        if _complete(target):
            reply["cached"] = True
            return reply
        for stale in glob.glob(os.path.join(envs, ".tmp-%s-*" % h)):
            _remove(stale)  # an interrupted build: we hold the lock, so nobody owns it
        if os.path.isdir(target):
            _rmtree(target)
        tmp = os.path.join(envs, ".tmp-%s-%d" % (h, os.getpid()))
        reqfile = tmp + ".txt"
        with open(reqfile, "w") as f:
            f.write("".join(line + "\n" for line in list(req.get("options", ())) + list(req["requirements"])))
        try:
            how, uv = _build(tmp, req, workdir, facts, reqfile, target)
            os.rename(reqfile, os.path.join(tmp, ENV_REQUIREMENTS))
            with open(os.path.join(tmp, ENV_MARKER), "w") as f:
                json.dump({"hash": h, "requirements": req["requirements"], "options": req.get("options", []),
                           "python": facts["id"], "created": time.time(), "uv": how}, f)
            os.rename(tmp, target)  # complete: from now on others use it
        except BaseException:
            _rmtree(tmp)
            raise
        finally:
            if os.path.exists(reqfile):
                os.unlink(reqfile)
    reply["uv"] = how
    return reply


def provision():
    """Entry point of ``python3 -c PROVISION_STUB``: one request on stdin, one reply on stdout."""
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        request = json.loads(b"".join(chunks).decode("utf-8"))
        os.environ.update(request.pop("env", None) or {})  # the inventory's env (off the command line)
        reply = provision_request(request)
    except ProvisionFailure as exc:
        reply = {"ok": False, "kind": exc.kind, "error": exc.message}
    except BaseException as exc:
        info = error_info(exc)
        reply = {"ok": False, "kind": "InstallError", "error": "%s: %s" % info[:2], "traceback": info[2]}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
