"""The remote worker: the loop a host runs for ``python3 -c STUB`` (see sshjobs.remote).

It reads CONFIG, answers HELLO, then serves FUNC, CALL and MAP frames (``protocol``) until
its stdin closes.  cloudpickle is asked for (NEED_MODULES, answered by MODULES) only when a
job needs it and the host has not the controller's version: a plain function is loaded
without it (the light loaders below), so a first contact costs what a later one does.
Nothing but frames is ever written to the protocol stream: ``main()``
moves the real stdout away before running anything and points file descriptor 1 at
stderr, so stray output from C code or subprocesses cannot corrupt it.

Stdlib only, and no syntax newer than the oldest host Python that must still be able to
say which Python it is.  The host side of provisioning is not here (``provision``):
compiling it too cost every worker start ~3 ms of CPU.
"""

import builtins
import io
import os
import sys
import time
import types

from .files import private_dir, rmtree, save_code, touch_env
from .protocol import (ALL_OK, BYTEARRAY, BYTES, CALL, CONFIG, FATAL, FID, FUNC, HEADER, HELLO, MAP, META_LEN,
                       MODULES, NEED_MODULES, OUTPUT, OUTPUT_HEAD, RESULT, SHUTDOWN, STDERR, STDOUT, Parts, Reader, _json,
                       error_info, index_env, read_frame)

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

_ATOMS = frozenset({int, float, bool, type(None), complex})  # values pickled without a Pickler
OUTPUT_FLUSH = 64 * 1024  # stream job output in frames of about this size
FLUSH_AFTER = 0.05  # seconds a finished result may wait in the buffer for company


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
        self.jobs = SimpleQueue()
        self.exiting = _Flag()
        self.funcs = {}
        self.job_id = 0
        self.item = 0
        self.loads = pickle.loads
        self.cloudpickle = None
        self.missing = None  # (workdir, version) of a cloudpickle the controller must send
        self.modules = None  # MODULES' payload, handed over by the reader thread
        self.modules_came = _Flag()

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
