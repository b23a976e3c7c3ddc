"""The remote worker on its own, over a local pipe: framing, the STUB, the job loop."""

from __future__ import annotations

import ast
import io
import json
import marshal
import pickle
import stat
import subprocess
import sys
import time

import cloudpickle
import pytest

from sshjobs.remote import PROVISION, SOURCES, STUB, TAG, WORKER, header_line, protocol
from sshjobs.worker import _cloudpickle_sources, decode_results


def test_frames_round_trip_and_partial_reads():
    frames = [(protocol.CALL, 7, b"abc"), (protocol.RESULT, 2**32 - 1, b""), (protocol.OUTPUT, 1, b"x" * 100_000)]
    data = b"".join(protocol.pack(*f) for f in frames)

    class Trickle(io.RawIOBase):  # returns at most 3 bytes per read, like a slow pipe
        def __init__(self, data):
            self.data = data

        def readable(self):
            return True

        def read(self, n=-1):
            k = min(3, n)
            chunk, self.data = self.data[:k], self.data[k:]
            return chunk

    stream = Trickle(data)
    assert [protocol.read_frame(stream) for _ in frames] == frames
    assert protocol.read_frame(stream) is None


def test_truncated_frame_is_end_of_stream():
    data = protocol.pack(protocol.CALL, 1, b"abcdef")[:-2]
    assert protocol.read_frame(io.BytesIO(data)) is None


@pytest.fixture
def worker(tmp_path):
    """A worker run by the host's system python3 (no cloudpickle there) over pipes."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", STUB], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = {"cloudpickle": cloudpickle.__version__, "workdir": str(tmp_path / "wd")}
    proc.stdin.write(WORKER.start() + protocol.pack(protocol.CONFIG, 0, json.dumps(config).encode()))
    proc.stdin.flush()
    kind, _, body = protocol.read_frame(proc.stdout)
    assert kind == protocol.HELLO
    proc.hello = json.loads(body)
    proc.shipped = 0
    yield proc
    proc.kill()
    proc.wait()


def send(proc, *frame):
    proc.stdin.write(protocol.pack(*frame))
    proc.stdin.flush()


def reply(proc):
    """The worker's next frame, answering its NEED_MODULES on the way as the controller
    does (with cloudpickle's source; ``proc.shipped`` counts them)."""
    while True:
        frame = protocol.read_frame(proc.stdout)
        if frame is None or frame[0] != protocol.NEED_MODULES:
            return frame
        proc.shipped = getattr(proc, "shipped", 0) + 1
        send(proc, protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources()))


def test_hello_describes_the_host(worker):
    hello = worker.hello
    assert hello["python"][:2] == list(sys.version_info[:2])
    assert hello["pid"] == worker.pid
    assert hello["cpus"] >= 1


def test_call_and_map_and_output_over_a_pipe(worker, tmp_path):
    k = 10
    send(worker, protocol.FUNC, 1, cloudpickle.dumps(lambda x: print("item", x) or x + k))
    send(worker, protocol.CALL, 5, protocol.FID.pack(1) + pickle.dumps(((1,), {})))
    send(worker, protocol.MAP, 6, protocol.FID.pack(1) + pickle.dumps(([1, 2, "x"],)))
    kind, job, body = reply(worker)
    assert (kind, job) == (protocol.RESULT, 5)
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok and value == 11 and out == "item 1\n" and took >= 0
    kind, job, body = reply(worker)
    assert (kind, job) == (protocol.RESULT, 6)
    results = decode_results(body)
    assert [r[1] for r in results[:2]] == [11, 12]
    assert results[2][0] is False and results[2][1][0] == "TypeError"
    # a plain function loads without cloudpickle: nothing was asked for, nothing written
    lib = tmp_path / "wd" / "lib" / f"cloudpickle-{cloudpickle.__version__}" / "cloudpickle"
    assert worker.shipped == 0 and not lib.exists()


def test_a_short_jobs_result_is_not_held_back_by_the_long_job_after_it(worker):
    import time

    send(worker, protocol.FUNC, 1, cloudpickle.dumps(lambda s: __import__("time").sleep(s) or s))
    send(worker, protocol.CALL, 5, protocol.FID.pack(1) + pickle.dumps(((0,), {})))
    send(worker, protocol.CALL, 6, protocol.FID.pack(1) + pickle.dumps(((3,), {})))  # queued before the first ends
    started = time.monotonic()
    kind, job, _ = reply(worker)
    assert (kind, job) == (protocol.RESULT, 5) and time.monotonic() - started < 1.5
    kind, job, _ = reply(worker)
    assert (kind, job) == (protocol.RESULT, 6) and time.monotonic() - started >= 3


def test_cloudpickle_is_shipped_when_a_job_needs_it_and_only_once(worker, tmp_path):
    class Point:  # a class of the controller's, pickled by value: its loader is cloudpickle's own
        def __init__(self, x):
            self.x = x

    send(worker, protocol.FUNC, 1, cloudpickle.dumps(lambda p: (type(p).__name__, p.x * 2)))
    send(worker, protocol.CALL, 2, protocol.FID.pack(1) + cloudpickle.dumps(((Point(21),), {})))
    # a value the host's pickle cannot pickle: the worker needs cloudpickle to send it back
    send(worker, protocol.FUNC, 3, cloudpickle.dumps(lambda: (lambda y: y + 1)))
    send(worker, protocol.CALL, 4, protocol.FID.pack(3) + pickle.dumps(((), {})))
    kind, job, body = reply(worker)
    assert (kind, job) == (protocol.RESULT, 2) and decode_results(body)[0][:2] == (True, ("Point", 42))
    kind, job, body = reply(worker)
    [(ok, value, out, err, took)] = decode_results(body)
    assert (kind, job, ok) == (protocol.RESULT, 4, True) and value(1) == 2
    assert worker.shipped == 1
    # cached in the workdir for the next worker
    assert (tmp_path / "wd" / "lib" / f"cloudpickle-{cloudpickle.__version__}" / "cloudpickle").is_dir()


def test_a_workers_start_and_a_plain_job_read_few_modules_from_the_disk(tmp_path):
    """Beyond what ``python3 -c pass`` imports, a worker started as the controller starts
    one, that loaded a function by value, holds its own modules, the interpreter's
    built-in ones and the two that _pickle needs: every module more is one more file
    found, read and run at each of a fleet's starts."""
    python = "/usr/bin/python3"
    bare, builtin = (set(subprocess.run([python, "-c", f"import sys;print(' '.join({names}))"], capture_output=True,
                                        text=True, check=True).stdout.split())
                     for names in ("sys.modules", "sys.builtin_module_names"))
    proc = subprocess.Popen([python, "-c", STUB], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    config = {"cloudpickle": cloudpickle.__version__, "workdir": str(tmp_path / "wd")}
    proc.stdin.write(WORKER.start(config["workdir"]) + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, 4)))
    send(proc, protocol.FUNC, 1, cloudpickle.dumps(lambda: sorted(__import__("sys").modules)))
    send(proc, protocol.CALL, 1, protocol.FID.pack(1) + pickle.dumps(((), {})))
    assert protocol.read_frame(proc.stdout)[0] == protocol.HELLO
    kind, _, body = reply(proc)
    [(ok, value, out, err, took)] = decode_results(body)
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()
    assert ok, value
    more = {m for m in value if m not in bare | builtin and not m.startswith("sshjobs_remote")}
    assert more <= {"copyreg", "_compat_pickle"}, more
    assert getattr(proc, "shipped", 0) == 0  # nor cloudpickle


def test_jobs_see_the_real_functools(worker):
    # The worker loads _pickle with a stand-in functools (see remote.worker._import_pickle):
    # a job importing functools must get the real module, and pickling partials must work.
    def job():
        import functools
        import sys

        cached = functools.lru_cache(maxsize=None)(lambda x: x + 1)
        return (sys.modules["functools"] is functools, cached(1), functools.reduce(int.__add__, [1, 2, 3]),
                functools.partial(pow, 2)(5), type(functools.partial(pow, 2)).__module__)

    send(worker, protocol.FUNC, 1, cloudpickle.dumps(job))
    send(worker, protocol.CALL, 1, protocol.FID.pack(1) + pickle.dumps(((), {})))
    kind, _, body = reply(worker)
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok, value
    assert value == (True, 2, 6, 32, "functools")
    send(worker, protocol.FUNC, 2, cloudpickle.dumps(lambda: __import__("functools").partial(max, 3)))
    send(worker, protocol.CALL, 2, protocol.FID.pack(2) + pickle.dumps(((), {})))
    kind, _, body = reply(worker)
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok and value(7) == 7 and value(1) == 3  # a partial pickled by the host, loaded here


def test_worker_exits_at_end_of_input(worker):
    worker.stdin.close()
    assert worker.wait(timeout=5) == 0


def test_job_reading_stdin_cannot_eat_frames(worker):
    send(worker, protocol.FUNC, 1, cloudpickle.dumps(lambda: __import__("sys").stdin.read()))
    send(worker, protocol.CALL, 1, protocol.FID.pack(1) + pickle.dumps(((), {})))
    send(worker, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((), {})))
    for job in (1, 2):
        kind, got, body = reply(worker)
        assert (kind, got) == (protocol.RESULT, job)
        assert decode_results(body)[0][:2] == (True, "")


def test_hello_json_without_the_json_module():
    """HELLO and FATAL are written by protocol._json (json's import costs every worker start):
    the controller's json.loads must get back exactly what the worker had."""
    odd = 'q"uote \\ back\nnew\ttab \x00 \x7f é € 😀 \udcff'
    for value in ({"home": odd, "python": [3, 11, 2], "cpus": 2, "none": None, "flags": [True, False]},
                  [odd, "Traceback (most recent call last):\n  ...", -1], {}, [], ""):
        assert json.loads(protocol._json(value)) == value


def start_keyed(tmp_path, code=b"", tag=TAG):
    """A worker started the way the controller starts one: with a cache key and the
    workdir on the first line, and a pickled CONFIG; with ``code`` (marshalled) shipped,
    else as for a host of another Python (the STUB compiles or takes its code cache)."""
    wd = str(tmp_path / "wd")
    proc = subprocess.Popen(["/usr/bin/python3", "-c", STUB], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = {"cloudpickle": cloudpickle.__version__, "workdir": wd}
    line = WORKER.header(wd, code)[8:-1].decode().replace(TAG, tag)  # the line, without its length and newline
    proc.stdin.write(header_line(line) + WORKER.data + code
                     + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4)))
    proc.stdin.flush()
    kind, _, body = protocol.read_frame(proc.stdout)
    assert kind == protocol.HELLO, body
    hello = json.loads(body)
    # it serves jobs
    send(proc, protocol.FUNC, 1, cloudpickle.dumps(lambda x: x * 3))
    send(proc, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((5,), {})))
    kind, job, body = reply(proc)
    assert (kind, job) == (protocol.RESULT, 2) and decode_results(body)[0][:2] == (True, 15)
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return hello, tmp_path / "wd" / "code"


def test_the_stub_takes_a_start_that_arrives_in_pieces(tmp_path):
    """sshd hands the program its stdin as packets come: the STUB's reads come up short,
    in the length before the first line, in the line and in the code."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", STUB], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = {"cloudpickle": cloudpickle.__version__, "workdir": str(tmp_path / "wd")}
    data = WORKER.start(str(tmp_path / "wd")) + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4))
    cuts = [3, 8, 11, 40, len(WORKER.header(str(tmp_path / "wd"), WORKER.code)) + 5, len(data) - 100, len(data)]
    at = 0
    for cut in cuts:
        proc.stdin.write(data[at:cut])
        proc.stdin.flush()
        at = cut
        time.sleep(0.02)
    kind, _, body = protocol.read_frame(proc.stdout)
    assert kind == protocol.HELLO, proc.stderr.read() if kind is None else body
    assert json.loads(body)["platform"] == sys.platform
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()
    proc.stderr.close()


def test_compiled_worker_is_cached_privately_and_used(tmp_path):
    hello, code = start_keyed(tmp_path)
    [cached] = code.iterdir()
    assert stat.S_IMODE(code.stat().st_mode) == 0o700 and stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "wd").stat().st_mode) == 0o700
    # the next worker runs the cached code, not the source it is sent: prove it with a
    # cached variant that reports another platform
    sources = dict(SOURCES)
    assert b'"platform": sys.platform' in sources["worker"]
    sources["worker"] = sources["worker"].replace(b'"platform": sys.platform', b'"platform": "from-cache"')
    cached.write_bytes(subprocess.run(
        ["/usr/bin/python3", "-c", "import marshal,pickle,sys;sys.stdout.buffer.write(marshal.dumps(tuple("
         "compile(s,'sshjobs_remote/'+n+'.py','exec') for n,s in pickle.load(sys.stdin.buffer))))"],
        input=pickle.dumps([(n, sources[n]) for n in WORKER.names]), capture_output=True, check=True).stdout)
    assert start_keyed(tmp_path)[0]["platform"] == "from-cache"
    assert hello["platform"] == sys.platform
    # a cache file that others could have written is not trusted: compiled again, replaced
    cached.chmod(0o622)
    assert start_keyed(tmp_path)[0]["platform"] == sys.platform
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600


def test_a_broken_code_cache_is_compiled_again(tmp_path):
    _, code = start_keyed(tmp_path)
    [cached] = code.iterdir()
    for junk in (b"", b"\x00garbage", __import__("marshal").dumps("not code")):
        cached.write_bytes(junk)
        hello, _ = start_keyed(tmp_path)
        assert hello["platform"] == sys.platform
        assert cached.read_bytes() != junk  # and rewritten whole
    assert [p.name for p in code.iterdir()] == [cached.name]  # no temporary files left


def variant(**changes):
    """The worker bundle's code as the controller marshals it, but from sources changed
    by ``changes`` (module name -> (old, new) bytes), so a test can tell which code ran."""
    sources = dict(SOURCES)
    for name, (old, new) in changes.items():
        assert old in sources[name]
        sources[name] = sources[name].replace(old, new)
    return marshal.dumps(tuple(compile(sources[n], f"sshjobs_remote/{n}.py", "exec", dont_inherit=True)
                               for n in WORKER.names))


REPORTS_SHIPPED = {"worker": (b'"platform": sys.platform', b'"platform": "shipped"')}


def test_shipped_code_runs_without_compiling_or_caching(tmp_path):
    """/usr/bin/python3 is 3.11.2 and the controller's venv 3.11.7 here: the same cache_tag
    and bytecode magic number, so the controller's code is taken as it is."""
    assert WORKER.start("~/x") == WORKER.header("~/x", WORKER.code) + WORKER.data + WORKER.code
    hello, code = start_keyed(tmp_path, variant(**REPORTS_SHIPPED))
    assert hello["platform"] == "shipped"
    assert not code.exists()  # nothing compiled, so nothing to cache
    assert start_keyed(tmp_path, WORKER.code)[0]["platform"] == sys.platform


def test_shipped_code_for_another_python_is_compiled_from_the_sources(tmp_path):
    # the header's TAG names another Python: the code shipped is not taken
    for other in ("cpython-399-" + TAG.rsplit("-", 1)[1], TAG.rsplit("-", 1)[0] + "-00000000"):
        hello, code = start_keyed(tmp_path, variant(**REPORTS_SHIPPED), tag=other)
        assert hello["platform"] == sys.platform
        [cached] = code.iterdir()  # compiled, so cached for the next start
        assert cached.name.startswith(WORKER.key)
        cached.unlink()


def test_a_corrupt_or_foreign_shipped_payload_falls_back_to_compiling(tmp_path):
    good = WORKER.code
    others = tuple(compile(SOURCES[n], f"sshjobs_remote/{n}.py", "exec", dont_inherit=True)
                   for n in ("files", "protocol", "worker"))  # code objects, but not in the bundle's order
    for junk in (good[:-1], good[: len(good) // 2], b"\x00garbage" + good[9:], marshal.dumps("not code"),
                 marshal.dumps(others), marshal.dumps(others[:2]), marshal.dumps([1, 2, 3])):
        hello, code = start_keyed(tmp_path, junk)
        assert hello["platform"] == sys.platform and hello["cloudpickle"] is None
        [cached] = code.iterdir()  # it compiled (and cached that)
        cached.unlink()


def test_an_unwritable_code_cache_still_starts(tmp_path):
    (tmp_path / "wd").mkdir(mode=0o700)
    (tmp_path / "wd" / "code").write_text("a file where the cache directory would go")
    for _ in range(2):
        assert start_keyed(tmp_path)[0]["platform"] == sys.platform


def test_the_controller_keeps_its_compiled_bundle_privately_and_checks_it(tmp_path, monkeypatch):
    from sshjobs.remote import Bundle, code_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = marshal.dumps(tuple(compile(SOURCES[n], f"sshjobs_remote/{n}.py", "exec", dont_inherit=True,
                                           optimize=2) for n in WORKER.names))
    assert Bundle(*WORKER.names).code == expected
    assert b"The remote worker: the loop a host runs" not in expected  # docstrings stay home
    [path] = code_cache().iterdir()
    assert path.name == f"{WORKER.key}-{TAG}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    other = marshal.dumps(tuple(compile(f"X = {i}", f"sshjobs_remote/{n}.py", "exec") for i, n in enumerate(WORKER.names)))
    path.write_bytes(other)
    assert Bundle(*WORKER.names).code == other  # this user's own, private file: taken as it is
    for junk in (b"garbage", marshal.dumps("not code"), marshal.dumps(tuple(compile("0", "elsewhere.py", "exec")
                                                                           for _ in WORKER.names))):
        path.write_bytes(junk)
        assert Bundle(*WORKER.names).code == expected  # compiled again, and the cache mended
        assert path.read_bytes() == expected
    path.write_bytes(other)
    path.chmod(0o622)  # writable by others: not trusted
    assert Bundle(*WORKER.names).code == expected


def test_a_controller_cache_that_cannot_be_written_still_compiles(tmp_path, monkeypatch):
    from sshjobs.remote import Bundle

    (tmp_path / "sshjobs").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert marshal.loads(Bundle(*WORKER.names).code)[0].co_filename == "sshjobs_remote/protocol.py"


def test_private_files_are_written_whole_even_over_a_dead_writers_leftover(tmp_path):
    import os

    from sshjobs.remote.files import write_private

    path = tmp_path / "new" / "data"
    write_private(str(path), b"one")
    assert path.read_bytes() == b"one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (tmp_path / "new" / f"data.tmp-{os.getpid()}").write_bytes(b"half")  # a dead process of our pid
    write_private(str(path), b"two")
    assert path.read_bytes() == b"two" and sorted(p.name for p in path.parent.iterdir()) == ["data"]


def test_frame_kinds_keep_their_wire_values_and_names():
    assert protocol.KINDS == {1: "CONFIG", 2: "MODULES", 3: "FUNC", 4: "CALL", 5: "MAP", 6: "SHUTDOWN", 10: "HELLO",
                              11: "RESULT", 12: "OUTPUT", 13: "FATAL", 14: "BYTES", 15: "BYTEARRAY",
                              16: "NEED_MODULES"}
    assert all(getattr(protocol, name) == code for code, name in protocol.KINDS.items())
    # kind, job id, payload length (network order), payload
    assert protocol.pack(protocol.CALL, 7, b"abc") == b"\x04" + b"\x00\x00\x00\x07" + b"\x00" * 7 + b"\x03abc"


def test_remote_files_keep_to_old_python_syntax():
    """An older host python3 must get as far as HELLO for the controller to name the
    mismatch: no syntax newer than the remote code has always used (no f-strings either)."""
    for name, source in [*SOURCES.items(), ("STUB", STUB)]:
        tree = ast.parse(source, feature_version=(3, 6))
        assert not any(isinstance(n, ast.JoinedStr) for n in ast.walk(tree)), name


def test_the_worker_bundle_holds_no_provisioning_code():
    assert WORKER.names == ("protocol", "files", "worker") and PROVISION.names[-1] == "provision"
    assert SOURCES["provision"] not in WORKER.data
    for word in (b"def env_hash", b"def find_uv", b"def provision_request", b"uv venv", b"-m venv", b"\nimport json"):
        assert word in PROVISION.data and word not in WORKER.data, word
    assert b"class Worker" not in PROVISION.data
    assert WORKER.key != PROVISION.key


# The host's python3 as on a machine with nothing of sshjobs: isolated (no PYTHON* variables,
# no user site, no current folder on the path), no site-packages.
BARE_PYTHON3 = ["/usr/bin/python3", "-I", "-S", "-c", STUB]


def test_the_worker_bundle_runs_on_a_bare_python3(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    wd = str(tmp_path / "wd")

    def job(x):
        import importlib.util
        import sys

        return (x * 2, sorted(m for m in sys.modules if m.startswith("sshjobs")),
                importlib.util.find_spec("sshjobs"), sys.flags.isolated, sys.flags.no_site)

    for start in ("shipped", "compiled", "from the code cache"):
        proc = subprocess.Popen(BARE_PYTHON3, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.shipped = 0
        config = {"cloudpickle": cloudpickle.__version__, "workdir": wd}
        proc.stdin.write(WORKER.start(wd, compiled=start == "shipped")
                         + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4)))
        proc.stdin.flush()
        kind, _, body = protocol.read_frame(proc.stdout)
        assert kind == protocol.HELLO, (start, body)
        hello = json.loads(body)
        assert hello["cloudpickle"] is None  # not even the system's (no site-packages), and not needed
        code = tmp_path / "wd" / "code"
        if start == "from the code cache":
            assert [p.name.split("-")[0] for p in code.iterdir()] == [WORKER.key]
        elif start == "shipped":
            assert not code.exists()
        send(proc, protocol.FUNC, 1, cloudpickle.dumps(job))
        send(proc, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((21,), {})))
        kind, job_id, body = reply(proc)
        assert (kind, job_id) == (protocol.RESULT, 2) and proc.shipped == 0
        [(ok, value, out, err, took)] = decode_results(body)
        assert ok, value
        assert value == (42, ["sshjobs_remote", "sshjobs_remote.files", "sshjobs_remote.protocol",
                              "sshjobs_remote.worker"], None, 1, 1)
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()


def test_the_provisioning_bundle_runs_on_a_bare_python3(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    wd = tmp_path / "wd"
    wd.mkdir(mode=0o700)
    request = json.dumps({"op": "list", "workdir": str(wd)}).encode()
    for compiled in (True, False, False):  # shipped; compiled here; then from the code cache
        out = subprocess.run(BARE_PYTHON3, cwd=cwd, input=PROVISION.start(str(wd), compiled) + request,
                             capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"ok": True, "workdir": str(wd), "envs": []}
        if compiled:
            assert not (wd / "code").exists()
            continue
        [cached] = (wd / "code").iterdir()
        assert cached.name.startswith(PROVISION.key) and stat.S_IMODE(cached.stat().st_mode) == 0o600


def test_output_from_a_subprocess_and_prints_at_once_loses_nothing(worker):
    # The pump adds the descriptors' output while the job prints: no line lost or doubled,
    # each writer's lines in its own order, however they interleave.
    def job(n):
        import subprocess
        import sys

        child = subprocess.Popen(["stdbuf", "-oL", "seq", "-f", "fd %g", str(n)])  # a write(2) a line
        for i in range(1, n + 1):
            sys.stdout.write(f"py {i}\n")  # whole lines: print's pieces may have the child's between them
        child.wait()
        return n

    send(worker, protocol.FUNC, 1, cloudpickle.dumps(job))
    send(worker, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((200_000,), {})))
    streamed = []
    while True:
        kind, _, body = reply(worker)
        if kind == protocol.OUTPUT:
            stream, _ = protocol.OUTPUT_HEAD.unpack_from(body)
            streamed.append(body[protocol.OUTPUT_HEAD.size:].decode())
            continue
        break
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok, value
    lines = ("".join(streamed) + out).splitlines()
    assert len(streamed) > 1  # it streamed, in pieces, while the job ran
    expected = [f"{w} {i}" for i in range(1, 200_001) for w in ("py", "fd")]
    assert sorted(lines) == sorted(expected)
    for who in ("py", "fd"):
        assert [ln for ln in lines if ln.startswith(who)] == [f"{who} {i}" for i in range(1, 200_001)]
