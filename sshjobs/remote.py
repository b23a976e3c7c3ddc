"""The remote half of sshjobs: one stdlib-only module.

The controller starts ``python3 -c STUB`` on the host; the stub reads this module's
source from stdin, executes it as the module ``sshjobs_remote`` and calls ``main()``.
The same module is imported by the controller for the frame format, and tests run
``main()`` locally over a pipe.

Wire format, both directions: frames of ``HEADER`` (type, job id, payload length)
followed by the payload.  Nothing else is ever written to the protocol stream: the
worker moves the real stdout away before running anything and points file
descriptor 1 at stderr, so stray output from C code or subprocesses cannot corrupt it.
"""

import io
import json
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
import traceback

HEADER = struct.Struct("!BIQ")

# controller -> worker
CONFIG = 1  # JSON: {"cloudpickle": version, "workdir": path, "env": {...}}
MODULES = 2  # pickled {relative path: source} of cloudpickle
FUNC = 3  # job id = function id; payload: cloudpickled callable
CALL = 4  # FID + pickled (args, kwargs): one result
MAP = 5  # FID + pickled (items,): one result per item
SHUTDOWN = 6
# worker -> controller
HELLO = 10  # JSON facts about the host and worker
RESULT = 11  # META_LEN + pickled meta + pickled value
OUTPUT = 12  # payload: OUTPUT_HEAD (stream 1 stdout / 2 stderr, item) + utf-8 text
FATAL = 13  # JSON: the worker cannot go on

META_LEN = struct.Struct("!I")
FID = struct.Struct("!I")  # the function id that starts a CALL or MAP payload (the rest is
# pickled on its own, so the controller pickles an argument once for every host)
OUTPUT_HEAD = struct.Struct("!BI")  # stream, index of the item within a MAP job
STDOUT, STDERR = 1, 2
OUTPUT_FLUSH = 64 * 1024  # stream job output in frames of about this size
FLUSH_AFTER = 0.05  # seconds a finished result may wait in the buffer for company

# The command-line bootstrap: a length line, then that many bytes of this module's source.
# It reads fd 0 unbuffered so that no byte meant for the worker is read ahead and lost.
STUB = """import os,sys,types
r=os.fdopen(0,'rb',0)
n=int(r.readline())
b=bytearray()
while len(b)<n:
 c=r.read(n-len(b))
 if not c:sys.exit(3)
 b+=c
m=types.ModuleType('sshjobs_remote');sys.modules[m.__name__]=m
exec(compile(bytes(b),'sshjobs_remote.py','exec'),m.__dict__);m.main()"""


def pack(kind, job_id, payload=b""):
    return HEADER.pack(kind, job_id, len(payload)) + payload


def read_frame(stream):
    """Read one frame from a binary stream; None at end of stream."""
    head = _read_exact(stream, HEADER.size)
    if head is None:
        return None
    kind, job_id, size = HEADER.unpack(head)
    payload = _read_exact(stream, size) if size else b""
    if payload is None:
        return None
    return kind, job_id, payload


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


def error_info(exc):
    """(type name, message, traceback text) of an exception, for the controller."""
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
        self.lock = threading.Lock()
        self.jobs = queue.SimpleQueue()
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
        try:
            return pickle.dumps(value, protocol=5)
        except Exception:
            return self.cloudpickle.dumps(value, protocol=5)

    # -- input ---------------------------------------------------------------
    def reader(self):
        """Feed jobs to the main thread; at end of input, end the whole process group."""
        try:
            while True:
                frame = read_frame(self.inp)
                if frame is None or frame[0] == SHUTDOWN:
                    break
                self.jobs.put(frame)
        except Exception:
            pass
        self.jobs.put(None)
        # A job may be running: stdin closing means the controller is gone or wants
        # this worker dead.  Give an idle main thread a moment to exit cleanly.
        time.sleep(0.05)
        _die()

    # -- setup ---------------------------------------------------------------
    def setup(self):
        frame = read_frame(self.inp)
        if frame is None or frame[0] != CONFIG:
            raise SystemExit("sshjobs worker: expected a CONFIG frame")
        config = json.loads(frame[2])
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
        have = self._import_cloudpickle(workdir, want)
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
        }
        self.send(HELLO, 0, json.dumps(hello).encode())
        if have != want:
            frame = read_frame(self.inp)
            if frame is None or frame[0] != MODULES:
                raise SystemExit("sshjobs worker: expected cloudpickle's source")
            self._install_cloudpickle(workdir, want, pickle.loads(frame[2]))

    def _import_cloudpickle(self, workdir, want):
        lib = os.path.join(workdir, "lib", "cloudpickle-%s" % want)
        if want and os.path.isdir(lib):
            sys.path.insert(0, lib)
        try:
            import cloudpickle
        except Exception:
            if want and os.path.isdir(lib):
                sys.path.remove(lib)
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
            kind, job_id, payload = frame
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
                results = [self.call(funcs, payload, out, err)]
            elif kind == MAP:
                results = self.map(funcs, payload, out, err)
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

    def unpack_job(self, payload):
        (fid,) = FID.unpack_from(payload, 0)
        return (fid,) + tuple(self.loads(memoryview(payload)[FID.size:]))

    def call(self, funcs, payload, out, err):
        start = time.perf_counter()
        try:
            fid, args, kwargs = self.unpack_job(payload)
            fn = funcs[fid]
            value = fn(*args, **kwargs)
            ok = True
        except BaseException as exc:
            value = error_info(exc)
            ok = False
        return (ok, value, out.take(), err.take(), time.perf_counter() - start)

    def map(self, funcs, payload, out, err):
        try:
            fid, items = self.unpack_job(payload)
            fn = funcs[fid]
        except BaseException as exc:
            return [(False, error_info(exc), "", "", 0.0)]
        results = []
        clock = time.perf_counter
        for index, item in enumerate(items):
            self.item = index
            start = clock()
            try:
                results.append((True, fn(item), out.take(), err.take(), clock() - start))
            except BaseException as exc:
                results.append((False, error_info(exc), out.take(), err.take(), clock() - start))
        return results

    def send_result(self, job_id, results, flush):
        """One RESULT frame: a meta list, then each value pickled on its own so that
        one value that cannot be pickled (or unpickled) costs only its own job."""
        meta = []
        blobs = []
        for ok, value, so, se, took in results:
            if ok:
                try:
                    blob = self.dumps(value)
                except BaseException as exc:
                    ok = False
                    value = (
                        "UnpicklableResult",
                        "the job's return value of type %s could not be pickled: %s"
                        % (type(value).__qualname__, exc),
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    )
            if not ok:
                blob = pickle.dumps(value, protocol=4)
            meta.append((ok, so, se, took, len(blob)))
            blobs.append(blob)
        head = pickle.dumps(meta, protocol=4)
        size = META_LEN.size + len(head) + sum(len(b) for b in blobs)
        with self.lock:
            write = self.out.write
            write(HEADER.pack(RESULT, job_id, size))
            write(META_LEN.pack(len(head)))
            write(head)
            for blob in blobs:
                write(blob)
            if flush:
                self.out.flush()


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


def _die(code=0):
    """Exit now, taking the job's children along when this worker leads its group.

    Called from the reader thread too (end of input while a job runs), so no signal
    handlers here (main thread only): the others in the group are signalled one by one."""
    try:
        pgrp = os.getpgrp()
        if pgrp == os.getpid():
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
            worker.send(FATAL, 0, json.dumps(error_info(exc)).encode())
        finally:
            os._exit(1)
    threading.Thread(target=worker.reader, name="sshjobs-reader", daemon=True).start()
    worker.run()
    try:
        out.flush()
    finally:
        _die(0)
