"""The remote worker: the loop a host runs for ``python3 -c STUB`` (see sshjobs.remote).

It reads CONFIG, answers HELLO, then serves FUNC, CALL and MAP frames (``protocol``) until
its stdin closes.  cloudpickle is asked for (NEED_MODULES, answered by MODULES) only when a
job needs it and the host has not the controller's version: a plain function is loaded
without it (the light loaders below), so a first contact costs what a later one does.
Nothing but frames is ever written to the protocol stream: ``main()``
moves the real stdout away before running anything and points file descriptors 1 and 2
at pipes the worker reads (``_FdOutput``), so what C code and subprocesses write is the
job's output too, and cannot corrupt the stream.  Output written while no job runs (a
thread a finished job left behind, say) belongs to no job: it goes to the worker's own
stderr, which the controller keeps for its error reports.

After each call (and each batch of a map) the worker puts back the working directory,
``os.environ``, ``sys.stdout`` and ``sys.stderr`` as they were before it; imports,
``sys.path`` and module globals persist for the worker's life, as in multiprocessing.

Stdlib only, and no syntax newer than the oldest host Python that must still be able to
say which Python it is.  The host side of provisioning is not here (``provision``):
compiling it too cost every worker start ~3 ms of CPU.
"""

import _thread
import builtins
import io
import os
import sys
import time

from .files import private_dir, rmtree, save_code, touch_env
from .protocol import (ALL_OK, BYTEARRAY, BYTES, CALL, CONFIG, FATAL, FID, FUNC, HEADER, HELLO, MAP, META_LEN,
                       MODULES, NEED_MODULES, OUTPUT, OUTPUT_HEAD, RESULT, SHUTDOWN, STDERR, STDOUT, Parts, Reader, _json,
                       error_info, index_env, read_frame)

# A worker's start-up is mostly imports: the C modules behind pickle, signal and threading
# spare it pickle.py's and json's `re`, signal.py's `enum` and threading.py (~7 ms of CPU
# per worker).  json is imported only where it is needed.  Beyond what the interpreter
# imports for itself, it reads just copyreg and _compat_pickle (for _pickle) from the
# disk: no types, struct or _queue (tests/test_remote.py holds it to that).

_ModuleType = type(sys)  # types.ModuleType, without importing types


def _import_pickle():
    """_pickle, without importing functools (and collections, operator, reprlib...) first:
    _pickle's init imports functools only to fetch ``partial``, which _functools provides.
    That was ~1.5 ms of CPU of each worker's start, for every job that never needs them.
    The stand-in leaves sys.modules at once: a later ``import functools`` is the real one."""
    if "functools" in sys.modules:
        import _pickle

        return _pickle
    import _functools

    stand_in = _ModuleType("functools")
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
    from _collections import deque
except ImportError:  # pragma: no cover
    from collections import deque

_ATOMS = frozenset({int, float, bool, type(None), complex})  # values pickled without a Pickler
OUTPUT_FLUSH = 64 * 1024  # stream job output in frames of about this size
FLUSH_AFTER = 0.05  # seconds a finished result may wait in the buffer for company
DRAIN_EVERY = 0.0002  # seconds: how stale a job's print may find its descriptors' output
_monotonic = time.monotonic


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


class _Queue(object):
    """The reader thread's frames for the main thread: _queue.SimpleQueue's put, get and
    empty, for one thread putting and one getting, on a deque and a bare lock (_queue is
    a shared library to load at every start, ~0.15 ms of CPU)."""

    def __init__(self):
        self._items = deque()
        self._ready = _thread.allocate_lock()  # released when an item may be there
        self._ready.acquire()

    def put(self, item):
        self._items.append(item)
        try:
            self._ready.release()
        except RuntimeError:  # released already: the getter has not waited since
            pass

    def get(self):
        items = self._items
        while True:
            try:
                return items.popleft()
            except IndexError:
                self._ready.acquire()

    def empty(self):
        return not self._items

    def first(self):
        """The item get() would return now (the queue must not be empty)."""
        return self._items[0]


def _config(payload):
    """CONFIG: a pickled dict from the controller; JSON (older controllers, tests) too."""
    if payload[:1] == b"{":
        import json

        return json.loads(payload.decode("utf-8"))
    return pickle.loads(payload)



class _Capture(io.TextIOBase):
    """A job's sys.stdout or sys.stderr: kept per job, streamed in large pieces.  What its
    file descriptor gets (``_FdOutput``) joins it in the order the worker reads it."""

    def __init__(self, worker, stream):
        self._worker = worker
        self._stream = stream
        self._parts = []
        self._size = 0
        self._lock = _thread.allocate_lock()  # for takes: the fd pump adds from its own thread
        self.buffer = _CaptureBytes(self)

    @property
    def encoding(self):
        return "utf-8"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if type(text) is not str and not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        worker = self._worker
        if not worker.running or (worker.foreign and _thread.get_ident() in worker.foreign):
            if text:
                worker.log(text)  # no job's: printed by a thread after its job returned
            return len(text)
        fd_output = worker.fd_output
        # What the descriptors got before comes first: after a subprocess, or anything
        # slower than DRAIN_EVERY since the last look (a look on every write made
        # print-heavy jobs 5x slower).
        if fd_output is not None and _monotonic() - fd_output.drained > DRAIN_EVERY:
            fd_output.drain_all()
        self._parts.append(text)
        self._size += len(text)
        if self._size >= OUTPUT_FLUSH:
            self.send()
        return len(text)

    def add(self, text):
        """From the descriptors' pump: ``text`` joins the job's output."""
        self._parts.append(text)
        self._size += len(text)
        if self._size >= OUTPUT_FLUSH:
            self.send()

    def send(self):
        """Stream what is kept so far (taken and sent under the lock: in order)."""
        with self._lock:
            text = self._take()
            if text:
                self._worker.send_output(self._stream, text)

    def take(self):
        with self._lock:
            return self._take()

    def _take(self):
        # Appends take no lock (the main thread's writes must stay cheap): the list is
        # never swapped, and only the parts joined are removed, so an append made by
        # the other thread meanwhile stays for the next take.
        parts = self._parts
        n = len(parts)
        text = "".join(parts[:n])
        del parts[:n]
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


class _FdOutput(object):
    """File descriptors 1 and 2 as pipes this worker reads: a pump thread empties them as
    output comes (so a chatty subprocess never blocks), and the main thread empties them
    once more when a job ends, so that all a job wrote before it returned is its own.
    Both read the non-blocking read ends under one lock, so no byte is ever in flight
    between them.  What arrives while no job runs goes to the worker's own stderr."""

    def __init__(self, worker, log_fd):
        import codecs

        self.worker = worker
        self.log_fd = log_fd
        self.lock = _thread.allocate_lock()
        self.fds = {}  # read end -> (stream, incremental decoder)
        for target, stream in ((1, STDOUT), (2, STDERR)):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            os.set_blocking(r, False)
            self.fds[r] = (stream, codecs.getincrementaldecoder("utf-8")("replace"))
        self.captures = None  # {stream: _Capture} once jobs run
        self.drained = 0.0  # monotonic time of the main thread's last drain_all

    def start(self):
        import select

        self.ready = select.poll()  # the main thread's: which pipes hold something now
        poller = select.poll()  # the pump's
        for r in self.fds:
            self.ready.register(r, select.POLLIN)
            poller.register(r, select.POLLIN)
        _thread.start_new_thread(self.pump, (poller,))

    def pump(self, poller):
        while self.fds:
            try:
                ready = poller.poll()
            except InterruptedError:  # pragma: no cover  (PEP 475 retries)
                continue
            with self.lock:
                for r, _ in ready:
                    if not self._drain(r):
                        poller.unregister(r)  # every writer closed it (a job closed fd 1, say)

    def drain_all(self):
        """Everything the descriptors got until now, where it belongs (under the lock, so
        that nothing the pump has read is still on its way)."""
        self.drained = _monotonic()
        with self.lock:
            for r, _ in self.ready.poll(0):
                if not self._drain(r):
                    self.ready.unregister(r)

    def _drain(self, r):
        """Move what the pipe holds to the running job's capture or to the log; False at
        end of file."""
        entry = self.fds.get(r)
        if entry is None:
            return False
        stream, decoder = entry
        chunks = []
        eof = False
        while True:
            try:
                data = os.read(r, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            chunks.append(data)
        if chunks:
            text = decoder.decode(b"".join(chunks))
            if text:
                if self.worker.running and self.captures is not None:
                    self.captures[stream].add(text)
                else:
                    self.worker.log(text)
        if eof:
            del self.fds[r]
            os.close(r)
        return not eof


def _preload(names):
    """Import the modules the controller named (``preload``) before HELLO, so that the first
    jobs do not pay for them; one that cannot be imported here is reported, not fatal.  Their
    prints go to stderr: stdout is the protocol's."""
    errors = []
    saved, sys.stdout = sys.stdout, sys.stderr
    try:
        for name in names:
            try:
                __import__(name)
            except BaseException as exc:  # an import may raise anything (SystemExit too)
                errors.append("%s: %s: %s" % (name, type(exc).__name__, exc))
    finally:
        sys.stdout = saved
    return errors


class Worker:
    def __init__(self, inp, out):
        self.inp = inp
        self.out = out
        self.lock = _thread.allocate_lock()
        self.jobs = _Queue()
        self.exiting = _Flag()
        self.funcs = {}
        self.job_id = 0
        self.item = 0
        self.loads = pickle.loads
        self.cloudpickle = None
        self.missing = None  # (workdir, version) of a cloudpickle the controller must send
        self.modules = None  # MODULES' payload, handed over by the reader thread
        self.modules_came = _Flag()
        self.running = False  # a job runs: its output is captured
        self.foreign = None  # ids of threads older than the running job (their output is no job's)
        self.fd_output = None
        self.log_fd = 2
        self.unflushed = False  # a result waits in the output buffer (for company)
        self.flush_at = 0.0
        self.flush_wake = None  # released to wake the flusher thread, started at the first such wait

    def log(self, text):
        """Write to the worker's own stderr (never the protocol stream)."""
        data = text.encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.log_fd, data):]
        except OSError:
            pass

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
            self.need_cloudpickle()
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
                if kind == MODULES:  # the answer to NEED_MODULES: a job waits for it
                    self.modules = payload
                    self.modules_came.set()
                    continue
                if kind == BYTES or kind == BYTEARRAY:
                    buffers.setdefault(job_id, []).append(payload)
                    continue
                self.jobs.put((kind, job_id, payload, buffers.pop(job_id, None) if buffers else None))
        except Exception:
            pass
        self.modules_came.set()  # nothing more will come: a job waiting for cloudpickle fails
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
        private_dir(workdir)
        want = config.get("cloudpickle")
        have = self._find_cloudpickle(workdir, want)
        if have != want and want:
            self.missing = (workdir, want)
        # the loaders below are cloudpickle 3's
        self.loads = _loader(_LIGHT if str(want).startswith("3.") else {}, self.need_cloudpickle)
        preload_errors = _preload(config.get("preload") or ())
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
            # for the id of environments (see provision.env_hash), so the controller can check for one
            "implementation": sys.implementation.name,
            "realpath": os.path.realpath(sys.executable),
            "prefix": os.path.realpath(sys.prefix),  # an environment's folder, when run in one
            "index_env": index_env(),
            "preload_errors": preload_errors,
        }
        self.send(HELLO, 0, _json(hello).encode())
        save_code()  # after HELLO: the controller need not wait for it
        touch_env()

    def need_cloudpickle(self):
        """Make the controller's cloudpickle importable here, before anything imports it:
        on the first need, ask the controller for its source (a round trip, taken only by
        the first job on this host that needs more than the light loaders)."""
        if self.missing is None:
            return
        workdir, want = self.missing
        self.missing = None
        self.send(NEED_MODULES, 0)
        while not self.modules_came.wait(3600):
            pass
        if self.modules is None:
            raise RuntimeError("sshjobs worker: the controller did not send cloudpickle's source")
        self._install_cloudpickle(workdir, want, pickle.loads(self.modules))
        self.modules = None

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
                rmtree(tmp)
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
        if self.fd_output is not None:
            self.fd_output.captures = {STDOUT: out, STDERR: err}
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
            if kind != CALL and kind != MAP:
                continue
            saved = self.begin()
            try:
                if kind == CALL:
                    results = [self.call(funcs, payload, buffers, out, err)]
                else:
                    results = self.map(funcs, payload, buffers, out, err)
            finally:
                self.end(saved, out, err)
            # Batch replies while more jobs wait, but never hold a finished result back for
            # long: a worker that dies later would take it along.  Nothing to batch with
            # when what waits is the end of the input.
            now = time.monotonic()
            flush = jobs.empty() or jobs.first() is None or now - last_flush > FLUSH_AFTER
            self.send_result(job_id, results, flush=flush)
            if flush:
                last_flush = now
                self.unflushed = False
            elif not self.unflushed:
                self.hold(now)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

    def hold(self, now):
        """A result stays in the buffer while the next job runs: the flusher thread sends it
        after FLUSH_AFTER, so that a long job never holds back the short one before it."""
        self.unflushed = True
        self.flush_at = now + FLUSH_AFTER
        if self.flush_wake is None:
            self.flush_wake = _thread.allocate_lock()
            self.flush_wake.acquire()
            _thread.start_new_thread(self._flusher, ())
        try:
            self.flush_wake.release()
        except RuntimeError:  # woken already
            pass

    def _flusher(self):
        while True:
            self.flush_wake.acquire()
            delay = self.flush_at - _monotonic()
            if delay > 0:
                time.sleep(delay)
            with self.lock:
                if not self.unflushed:
                    continue
                self.unflushed = False
                try:
                    self.out.flush()
                except (OSError, ValueError):  # the controller is gone: the main thread sees it too
                    return

    def begin(self):
        """What a job may change and the next job must not see, as it is before the job."""
        threading = sys.modules.get("threading")
        if threading is not None:  # threads started before this job: their output is no job's
            me = _thread.get_ident()
            self.foreign = set([t for t in getattr(threading, "_active", ()) if t != me]) or None
        else:
            self.foreign = None
        try:
            cwd = os.getcwd()
        except OSError:  # the folder is gone
            cwd = None
        data = getattr(os.environ, "_data", None)
        self.running = True
        return cwd, dict(data) if data is not None else os.environ.copy()

    def end(self, saved, out, err):
        self.running = False
        self.foreign = None
        cwd, env = saved
        if sys.stdout is not out or sys.stderr is not err:
            sys.stdout, sys.stderr = out, err
        try:
            if cwd is not None and os.getcwd() != cwd:
                os.chdir(cwd)
        except OSError:
            try:
                os.chdir(cwd)
            except OSError:
                pass
        data = getattr(os.environ, "_data", None)
        if data is None:  # pragma: no cover  (not CPython)
            if os.environ != env:
                os.environ.clear()
                os.environ.update(env)
        elif data != env:
            for key in [k for k in data if k not in env]:
                del os.environ[os.environ.decodekey(key)]
            for key, value in env.items():
                if data.get(key) != value:
                    os.environ[os.environ.decodekey(key)] = os.environ.decodevalue(value)

    def unpack_job(self, payload, buffers):
        (fid,) = FID.unpack_from(payload, 0)
        body = memoryview(payload)[FID.size:]
        return (fid,) + tuple(self.loads(body, buffers=buffers) if buffers else self.loads(body))

    def call(self, funcs, payload, buffers, out, err):
        start = time.perf_counter()
        ok = False
        try:
            fid, args, kwargs = self.unpack_job(payload, buffers)
            fn = funcs[fid]
        except BaseException as exc:
            value = _load_failure(exc, "arguments")
        else:
            if type(fn) is _Unloadable:
                value = _load_failure(fn.exc, "function")
            else:
                try:
                    value = fn(*args, **kwargs)
                    if _is_coroutine(value):
                        value = _run_coroutine(value)
                    ok = True
                except BaseException as exc:
                    value = error_info(exc)
        if self.fd_output is not None:
            self.fd_output.drain_all()
        return (ok, value, out.take(), err.take(), time.perf_counter() - start)

    def map(self, funcs, payload, buffers, out, err):
        try:
            fid, items = self.unpack_job(payload, buffers)
            fn = funcs[fid]
        except BaseException as exc:
            return [(False, _load_failure(exc, "arguments"), "", "", 0.0)]
        if type(fn) is _Unloadable:
            return [(False, _load_failure(fn.exc, "function"), "", "", 0.0)]
        results = []
        append = results.append
        clock = time.perf_counter
        for index, item in enumerate(items):
            self.item = index
            start = clock()
            try:
                value = fn(item)
                if _is_coroutine(value):
                    value = _run_coroutine(value)
                ok = True
            except BaseException as exc:
                value = error_info(exc)
                ok = False
            took = clock() - start
            append((ok, value, out.take() if out._parts else "", err.take() if err._parts else "", took))
        if self.fd_output is not None and results:
            # Once a batch, not once an item: what the descriptors got before the batch
            # ended is the batch's, given to its last item when no item read it earlier.
            self.fd_output.drain_all()
            if out._parts or err._parts:
                ok, value, so, se, took = results[-1]
                results[-1] = (ok, value, so + out.take(), se + err.take(), took)
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
    if name == "ClassType":
        return type
    found = _BUILTIN_TYPES.get(name)
    if found is None:
        import types

        found = getattr(types, name)
    return found


def _cp_subimport(name):
    __import__(name)
    return sys.modules[name]


def _cp_dynamic_subimport(name, vars):
    mod = _ModuleType(name)
    mod.__dict__.update(vars)
    mod.__dict__["__builtins__"] = builtins.__dict__
    return mod


class _EmptyCellValue(object):
    pass


_EMPTY_CELL_VALUE = _EmptyCellValue()


def _cp_make_function(code, globals, name, argdefs, closure):
    globals["__builtins__"] = builtins.__dict__
    return _FunctionType(code, globals, name, argdefs, closure)


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


# The types cloudpickle asks _builtin_type for with every function it loads, without
# importing ``types`` (a module from the disk: ~0.3 ms of a worker's start).
_FunctionType = type(_cp_subimport)
_BUILTIN_TYPES = {
    "CodeType": type(_cp_subimport.__code__),
    "FunctionType": _FunctionType,
    "CellType": type(_cp_make_empty_cell()),
    "ModuleType": _ModuleType,
}

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


def _loader(light, need_cloudpickle):
    """The worker's loads(): cloudpickle's names in ``light`` come from there; any other
    of cloudpickle's first has ``need_cloudpickle()`` make the module importable."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module[:11] == "cloudpickle":
                if module == "cloudpickle.cloudpickle" and name in light:
                    return light[name]
                need_cloudpickle()
            return pickle.Unpickler.find_class(self, module, name)

    def loads(data, buffers=None):
        return Unpickler(Reader(data), buffers=buffers).load()

    return loads


def _is_coroutine(value):
    """``value`` is a coroutine object (``types`` is imported only for one that may be)."""
    if type(value).__name__ != "coroutine":
        return False
    import types

    return type(value) is types.CoroutineType


def _run_coroutine(coro):
    """An ``async def`` job's value: its coroutine run to the end in a new event loop."""
    import asyncio

    return asyncio.run(coro)


def _load_failure(exc, what):
    """error_info of a function or arguments that did not unpickle here, with a hint when a
    module was missing: the package, and its version on this host (None: not installed),
    so that the controller can say whether the host lacks it or has another version."""
    info = error_info(exc)
    name = None
    if isinstance(exc, ImportError):
        name = exc.name
    elif isinstance(exc, AttributeError):  # "Can't get attribute 'X' on <module 'pkg.mod' from ...>"
        text = str(exc)
        if "<module '" in text:
            name = text.split("<module '", 1)[1].split("'", 1)[0]
    if not name:
        return info
    top = name.partition(".")[0]
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None) if module is not None else None
    return info + ({"loading": what, "package": top, "installed": module is not None,
                    "version": version if isinstance(version, str) else None},)


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


def _user():
    # sshd sets USER (and LOGNAME) for every session; pwd's lookup (NSS) costs a worker's
    # start ~0.4 ms of CPU
    name = os.environ.get("USER") or os.environ.get("LOGNAME")
    if name:
        return name
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
    # fd 0 and the worker's pipes on fds 1 and 2, so nothing it does can corrupt frames.
    inp = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    worker = Worker(inp, out)
    worker.log_fd = os.dup(2)
    worker.fd_output = _FdOutput(worker, worker.log_fd)
    worker.fd_output.start()
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
